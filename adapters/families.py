"""Where each model family keeps its heads: one small declarative entry per family.

An entry names attribute paths (dotted, from the top-level model) to the decoder layers, and
inside each layer to the attention's output projection, plus the unembedding and the final
norm. Adding a family is adding an entry; capture and scaling code is shared.
Heads are query heads (GQA shares keys/values, not o_proj columns); head h of a layer owns
o_proj input features ``h * d_head : (h + 1) * d_head`` (TransformerLens's ``hook_z``).
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
    """Follow a dotted attribute path (integers index lists)."""
    return reduce(
        lambda obj, name: obj[int(name)] if name.isdigit() else getattr(obj, name),
        path.split("."),
        root,
    )


@dataclass(frozen=True)
class HeadLayout:
    """Shapes of the heads, read from the config (transformers 5's attention modules do not
    carry ``num_heads``)."""

    n_layers: int
    n_heads: int
    d_head: int
    d_model: int


def text_config(model: Any, family: Family | None = None) -> Any:
    family = family or family_of(model)
    config = model.config
    return getattr(config, family.text_config) if family.text_config else config


def head_layout(model: Any, family: Family | None = None) -> HeadLayout:
    """Heads per layer, head size and model width of a loaded model."""
    family = family or family_of(model)
    config = text_config(model, family)
    n_heads = config.num_attention_heads
    d_model = config.hidden_size
    d_head = getattr(config, "head_dim", None) or d_model // n_heads
    n_layers = len(resolve(model, family.layers))
    o_proj = resolve(resolve(model, family.layers)[0], family.o_proj)
    if o_proj.in_features != n_heads * d_head or o_proj.out_features != d_model:
        raise UnsupportedModelError(
            f"{family.name}: o_proj is {o_proj.in_features} -> {o_proj.out_features}, expected "
            f"{n_heads} heads x {d_head} -> {d_model}"
        )
    return HeadLayout(n_layers, n_heads, d_head, d_model)


def attn_out_norms(model: Any, family: Family | None = None) -> list[Any] | None:
    """The attention-output norm of every decoder layer, or None for families without."""
    family = family or family_of(model)
    if family.attn_out_norm is None:
        return None
    return [resolve(layer, family.attn_out_norm) for layer in resolve(model, family.layers)]


def o_proj_modules(model: Any, family: Family | None = None) -> list[Any]:
    """The attention output projection of every decoder layer, in order."""
    family = family or family_of(model)
    return [resolve(layer, family.o_proj) for layer in resolve(model, family.layers)]
