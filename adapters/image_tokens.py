"""Which positions of a vision-language model's input are image tokens: the one definition
that export (the "image" rows) and interventions (``positions="image"``) share."""

from __future__ import annotations

from typing import Any

import torch

from somp_ref.adapters.model_heads import model_heads

VISION_FAMILIES = ("llava", "gemma3", "qwen2_5_vl")


def vision_family(model: Any, purpose: str | None = None) -> str:
    """The model's family name, which must be a vision-language family (``purpose`` says
    what needed one, in the error)."""
    name = model_heads(model).family.name
    if name not in VISION_FAMILIES:
        needs = f"{purpose} needs a vision-language model: " if purpose else ""
        raise ValueError(
            f"{needs}{name} is not a vision-language family ({', '.join(VISION_FAMILIES)})"
        )
    return name


def image_token_mask(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Where ``input_ids`` holds the image placeholder token: bool, the shape of input_ids.

    The one definition of "image positions": export's "image"/"image-mean" rows and the
    interventions' ``positions="image"`` / ``"text"`` both use it.
    """
    return input_ids == image_token_id(model)


def image_token_id(model: Any) -> int:
    """The id of the placeholder token that image features replace."""
    config = model.config
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise ValueError(f"{type(model).__name__}: no image token id in the config")
