"""Batched greedy generation (deterministic, for comparing interventions)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from somp_ref.adapters.offload import input_device
from somp_ref.adapters.tokenization import encode, resolve_chat_template
from somp_ref.progress import progress


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 40,
    chat_template: bool | None = None,
    batch_size: int = 8,
    show_progress: bool = False,
    use_cache: bool = True,
) -> list[str]:
    """Greedy continuations of ``prompts`` (new text only, special tokens removed).

    Prompts are left-padded in batches; position ids count real tokens, so the result for a
    prompt does not depend on its batch. ``use_cache=False`` recomputes the whole sequence
    at each step (slow; the same text, which the position rules of
    :func:`somp_ref.adapters.intervene.scale_heads` are tested against). ``chat_template``:
    True, False, or None for the tokenizer's template where it has one (as ``export``).
    """
    chat_template = resolve_chat_template(tokenizer, chat_template)
    device = input_device(model)
    texts: list[str] = []
    starts = range(0, len(prompts), batch_size)
    for start in progress(starts, desc="generate (batches)", enabled=show_progress):
        batch = encode(
            tokenizer,
            list(prompts[start : start + batch_size]),
            chat_template=chat_template,
            padding_side="left",
            device=device,
        )
        batch.pop("position_ids")  # generate derives them from the attention mask
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=use_cache,
            pad_token_id=tokenizer.pad_token_id,
            top_p=None,
            top_k=None,
            temperature=None,
        )
        new = out[:, batch["input_ids"].shape[1] :]
        texts += tokenizer.batch_decode(new, skip_special_tokens=True)
    return texts
