"""Where each model family keeps its heads: one small declarative entry per family.

An entry names attribute paths (dotted, from the top-level model) to the decoder layers, and
inside each layer to the attention's output projection, plus the unembedding and the final
norm. Adding a family is adding an entry; :func:`somp_ref.adapters.model_heads.model_heads`
resolves an entry against a loaded model once, and capture, export and scaling share it.

Families (``config.model_type`` in brackets where it differs from the name):

- text: llama, mistral, qwen2 (Qwen2 and Qwen2.5), qwen3, phi3 (Phi-3), gpt2 (o_proj is the
  ``Conv1D`` ``attn.c_proj``, its weight stored transposed, with a bias);
- text, with the attention output normalised before the residual add
  (``post_attention_layernorm``): gemma2, gemma3_text (Gemma3ForCausalLM), olmo2;
- vision-language (the language model's heads): llava, gemma3 (normalised as above),
  qwen2_5_vl.

Any other model type laid out as Llama (``model.layers[i].self_attn.o_proj`` an
``nn.Linear``, ``model.norm``, ``lm_head``) and without the sandwich norms of Gemma2/OLMo2 is
served as Llama-like, with a warning naming that assumption (see :func:`family_of`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import reduce
from typing import Any

import torch


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
    o_proj_transposed : bool
        The o_proj weight is stored (in_features, out_features), as GPT-2's ``Conv1D``, not
        (out_features, in_features) as ``nn.Linear``.
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
        it joins the residual stream (Gemma2/3's and OLMo2's ``post_attention_layernorm``,
        an RMSNorm), or None.
    """

    name: str
    model_types: tuple[str, ...]
    layers: str = "model.layers"
    o_proj: str = "self_attn.o_proj"
    o_proj_transposed: bool = False
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

#: Gemma's RMSNorms store the gain minus one; its attention output is normalised.
_GEMMA_NORM = {"norm_weight_offset": 1.0, "attn_out_norm": "post_attention_layernorm"}

#: Llama's layout: the defaults, which an unlisted Llama-like model type also gets.
_LLAMA = Family("llama", ("llama",))

FAMILIES: tuple[Family, ...] = (
    _LLAMA,
    Family("mistral", ("mistral",)),
    Family("qwen2", ("qwen2",)),
    Family("qwen3", ("qwen3",)),
    Family("phi3", ("phi3",)),
    Family("gemma2", ("gemma2",), **_GEMMA_NORM),
    Family("gemma3_text", ("gemma3_text",), **_GEMMA_NORM),
    Family("olmo2", ("olmo2",), attn_out_norm="post_attention_layernorm"),
    Family(
        "gpt2",
        ("gpt2",),
        layers="transformer.h",
        o_proj="attn.c_proj",
        o_proj_transposed=True,
        final_norm="transformer.ln_f",
    ),
    Family("llava", ("llava",), **_VLM_TEXT),
    Family("gemma3", ("gemma3",), **_VLM_TEXT, **_GEMMA_NORM),
    Family("qwen2_5_vl", ("qwen2_5_vl",), **_VLM_TEXT),
)

#: Layer modules that mark a sandwich-norm layout (Gemma2/3, OLMo2/3, EXAONE 4), where the
#: attention output may be normalised before it joins the residual stream: an unlisted model
#: type with one is not assumed to be Llama-like.
_SANDWICH_NORMS = ("post_feedforward_layernorm", "pre_feedforward_layernorm")


class UnsupportedModelError(ValueError):
    """The model's architecture has no family entry."""


def supported_model_types() -> list[str]:
    return sorted(t for family in FAMILIES for t in family.model_types)


def family_of(model: Any) -> Family:
    """The family entry for a loaded model, from ``model.config.model_type``.

    An unlisted model type whose model is laid out as Llama (every
    ``model.layers[i].self_attn.o_proj`` an ``nn.Linear``, ``model.norm``, an ``nn.Linear``
    ``lm_head``, no sandwich norms) gets the Llama entry under its own name, with a
    ``UserWarning`` naming that assumption: heads are the o_proj input slices and the
    attention output joins the residual stream unnormalised.

    Raises
    ------
    UnsupportedModelError
        The model type is not listed and the model is not laid out as Llama.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    reason = _not_llama_like(model)
    if reason is None:
        warnings.warn(
            f"model type {model_type!r} is not listed; treating it as Llama-like: heads are "
            "the o_proj input slices of model.layers[i].self_attn.o_proj, no attention-output "
            "norm (if that is wrong, add an entry to somp_ref.adapters.families.FAMILIES)",
            UserWarning,
            stacklevel=2,
        )
        return Family(str(model_type), (str(model_type),))
    raise UnsupportedModelError(
        f"model type {model_type!r} is not supported; supported: "
        f"{', '.join(supported_model_types())} "
        f"(add an entry to somp_ref.adapters.families.FAMILIES); not Llama-like: {reason}"
    )


def _not_llama_like(model: Any) -> str | None:
    """Why ``model`` cannot be served as Llama-like, or None if it can."""
    llama = _LLAMA
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) is None:
        return "no config.model_type"
    if not all(hasattr(config, name) for name in ("num_attention_heads", "hidden_size")):
        return "its config has no num_attention_heads or hidden_size"
    try:
        layers = list(resolve(model, llama.layers))
        o_proj = [resolve(layer, llama.o_proj) for layer in layers]
        unembed = resolve(model, llama.unembed)
        resolve(model, llama.final_norm)
    except (AttributeError, TypeError):
        return f"not laid out as Llama: {llama.layers}[i].{llama.o_proj}, {llama.final_norm}"
    linear = torch.nn.Linear
    if not o_proj or not all(isinstance(m, linear) for m in [*o_proj, unembed]):
        return f"{llama.o_proj} and {llama.unembed} are not all nn.Linear"
    sandwich = [name for name in _SANDWICH_NORMS if hasattr(layers[0], name)]
    if sandwich:
        return f"its layers have {sandwich[0]}: its attention output may be normalised"
    return None


def resolve(root: Any, path: str) -> Any:
    """Follow a dotted attribute path."""
    return reduce(getattr, path.split("."), root)
