"""Turning prompts into model inputs: chat template, padding, position ids."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


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


def real_positions(mask: Any) -> Any:
    """Each token's index among the real (unpadded) tokens of its row, (batch, pos); pads
    get 0. Used as position ids, it makes a prompt's computation independent of padding."""
    return (mask.long().cumsum(dim=-1) - 1).clamp(min=0)
