"""Where each model family keeps its heads: one small declarative entry per family.

An entry names attribute paths (dotted, from the top-level model) to the decoder layers, and
inside each layer to the attention's output projection, plus the unembedding and the final
norm. Adding a family is adding an entry; :func:`somp_ref.adapters.model_heads.model_heads`
resolves an entry against a loaded model once, and capture, export and scaling share it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce
from typing import Any


@dataclass(frozen=True)
class Family:
    """Where one architecture keeps its parts.

    Attributes
    ----------
    name : str
        Short name used in stores and messages.
    model_types : tuple of str
        ``config.model_type`` values this entry covers.
    layers : str
        Dotted path from the model to the list of decoder layers.
    o_proj : str
        Dotted path from one decoder layer to the attention output projection.
    unembed : str
        Dotted path to the unembedding ``nn.Linear`` (its weight is (vocab, d_model)).
    final_norm : str
        Dotted path to the final norm before the unembedding.
    text_config : str or None
        Attribute of ``config`` holding the language model's config (VLMs), or None.
    norm_weight_offset : float
        Added to a norm's stored weight to get its effective scale (Gemma: 1).
    attn_out_norm : str or None
        Dotted path from a decoder layer to a norm applied to the attention output before
        it joins the residual stream (Gemma3's ``post_attention_layernorm``), or None.
    """

    name: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"
    o_proj: str = "self_attn.o_proj"
    unembed: str = "lm_head"
    final_norm: str = "model.norm"
    text_config: str | None = None
    norm_weight_offset: float = 0.0
    attn_out_norm: str | None = None


_VLM_TEXT = {
    "layers": "model.language_model.layers",
    "final_norm": "model.language_model.norm",
    "text_config": "text_config",
}

FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama",)),
    Family("mistral", ("mistral",)),
    Family("llava", ("llava",), **_VLM_TEXT),
    Family(
        "gemma3",
        ("gemma3",),
        **_VLM_TEXT,
        norm_weight_offset=1.0,
        attn_out_norm="post_attention_layernorm",
    ),
    Family("qwen2_5_vl", ("qwen2_5_vl",), **_VLM_TEXT),
)


class UnsupportedModelError(ValueError):
    """The model's architecture has no family entry."""


def supported_model_types() -> list[str]:
    return sorted(t for family in FAMILIES for t in family.model_types)


def family_of(model: Any) -> Family:
    """The family entry for a loaded model, from ``model.config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise UnsupportedModelError(
        f"model type {model_type!r} is not supported; supported: "
        f"{', '.join(supported_model_types())} "
        "(add an entry to somp_ref.adapters.families.FAMILIES)"
    )


def resolve(root: Any, path: str) -> Any:
    """Follow a dotted attribute path."""
    return reduce(getattr, path.split("."), root)
