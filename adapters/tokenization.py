"""Turning prompts into model inputs: chat template, padding, position ids."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def resolve_chat_template(tokenizer: Any, chat_template: bool | None) -> bool:
    """Whether prompts go through ``tokenizer``'s chat template: ``chat_template`` where the
    caller says (True, False), else (None) when the tokenizer has one. The one default of
    ``export_activations``, ``export``, ``generate`` and ``--chat-template``."""
    if chat_template is None:
        return getattr(tokenizer, "chat_template", None) is not None
    return bool(chat_template)


def render(tokenizer: Any, prompt: str, chat_template: bool) -> str:
    """The text fed to the model: the prompt itself, or a one-turn chat ending where the
    assistant's answer starts."""
    if not chat_template:
        return prompt
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("chat_template=True but the tokenizer has no chat template")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def encode(
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    chat_template: bool,
    padding_side: str = "left",
    device: Any = "cpu",
) -> dict[str, Any]:
    """A padded batch with ``input_ids``, ``attention_mask`` and ``position_ids``.

    Position ids count real tokens only, so a prompt gets the same positions whatever the
    padding side and whatever else is in its batch (transformers' forward would otherwise
    number left-padded prompts from the first pad).
    """
    if not prompts:
        raise ValueError("prompts must not be empty")
    texts = [render(tokenizer, p, chat_template) for p in prompts]
    previous = tokenizer.padding_side
    tokenizer.padding_side = padding_side
    try:
        # A chat template already writes the BOS/start tokens it wants.
        batch = tokenizer(
            texts, padding=True, return_tensors="pt", add_special_tokens=not chat_template
        )
    finally:
        tokenizer.padding_side = previous
    mask = batch["attention_mask"]
    if (mask.sum(dim=1) == 0).any():
        raise ValueError("a prompt encodes to no tokens")
    return {
        "input_ids": batch["input_ids"].to(device),
        "attention_mask": mask.to(device),
        "position_ids": real_positions(mask).to(device),
    }


def prompt_token_mask(
    tokenizer: Any, prompts: Sequence[str], batch: dict[str, Any], *, chat_template: bool
) -> Any:
    """Which tokens of an :func:`encode` batch belong to the prompts' own text, (batch, pos).

    The chat template's tokens (role markers, a system prompt, the assistant's header) and
    special tokens are left out: these are the tokens the paper averages a head's output
    over. A token counts when its characters overlap the prompt's span in the rendered text.

    Raises
    ------
    ValueError
        When the tokenizer gives no character offsets (a slow tokenizer) or the chat
        template rewrote the prompt so that its text cannot be found.
    """
    import torch

    texts = [render(tokenizer, p, chat_template) for p in prompts]
    spans = []
    for prompt, text in zip(prompts, texts, strict=True):
        start = text.rfind(prompt)
        if start < 0 or not prompt:
            raise ValueError(f"cannot find the prompt {prompt[:40]!r} in its rendered text")
        spans.append((start, start + len(prompt)))
    ids = batch["input_ids"].cpu()
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    for row, (text, (start, end)) in enumerate(zip(texts, spans, strict=True)):
        plain = tokenizer(text, add_special_tokens=not chat_template, return_offsets_mapping=True)
        if "offset_mapping" not in plain:
            raise ValueError("positions='prompt-mean' needs a fast tokenizer (character offsets)")
        real = batch["attention_mask"][row].cpu().bool().nonzero().squeeze(-1)
        if ids[row, real].tolist() != plain["input_ids"]:
            raise ValueError("the prompt tokenizes differently alone and in its batch")
        inside = [a < end and b > start and b > a for a, b in plain["offset_mapping"]]
        mask[row, real] = torch.tensor(inside, dtype=torch.bool)
    if (mask.sum(dim=1) == 0).any():
        raise ValueError("a prompt has no token of its own text (an empty prompt?)")
    return mask.to(batch["input_ids"].device)


def real_positions(mask: Any) -> Any:
    """Each token's index among the real (unpadded) tokens of its row, (batch, pos); pads
    get 0. Used as position ids, it makes a prompt's computation independent of padding."""
    return (mask.long().cumsum(dim=-1) - 1).clamp(min=0)
