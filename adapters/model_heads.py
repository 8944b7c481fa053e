"""A loaded model's heads, resolved once: its family entry, head shapes and the modules that
capture, export and interventions hook or read.

:func:`model_heads` looks the family up and follows its attribute paths on the first call
for a model, and caches the result for as long as the model lives (keyed by the model
object, held weakly: a copy of a model is resolved afresh, to its own modules).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

from somp_ref.adapters.families import Family, UnsupportedModelError, family_of, resolve


@dataclass(frozen=True)
class ModelHeads:
    """Where a loaded model's heads are and what shape they have.

    Heads are query heads (GQA shares keys/values, not o_proj columns); head h of a layer owns
    o_proj input features ``h * d_head : (h + 1) * d_head`` (TransformerLens's ``hook_z``).

    Attributes
    ----------
    family : Family
        The model's family entry.
    n_layers, n_heads, d_head, d_model : int
        Decoder layers, query heads per layer, head size and model width, from the (text)
        config: transformers 5's attention modules do not carry ``num_heads``.
    o_proj : tuple of torch.nn.Linear
        The attention output projection of every decoder layer, in order; each weight is
        (d_model, n_heads * d_head).
    attn_out_norms : tuple of torch.nn.Module or None
        The norm each layer applies to the attention output before it joins the residual
        stream (Gemma3), or None for families without one.
    unembed : torch.nn.Linear
        The unembedding; its weight is (vocab, d_model).
    final_norm : torch.nn.Module
        The norm before the unembedding.
    """

    family: Family
    n_layers: int
    n_heads: int
    d_head: int
    d_model: int
    o_proj: tuple[torch.nn.Module, ...]
    attn_out_norms: tuple[torch.nn.Module, ...] | None
    unembed: torch.nn.Module
    final_norm: torch.nn.Module

    def columns(self, head: int) -> slice:
        """The o_proj input features (weight columns) of head ``head``: d_head of them."""
        return slice(head * self.d_head, (head + 1) * self.d_head)

    def effective_o_proj(self, layer: int) -> torch.Tensor:
        """The o_proj weight a head's contribution factors through, float32
        (d_model, n_heads * d_head): the weight itself, or ``g * W_O`` under an
        attention-output norm with effective weight g (see :mod:`somp_ref.adapters.capture`).
        """
        weight = self.o_proj[layer].weight.detach().float()
        if self.attn_out_norms is None:
            return weight
        gain = self.attn_out_norms[layer].weight.detach().float() + self.family.norm_weight_offset
        return gain[:, None] * weight


_RESOLVED: weakref.WeakKeyDictionary[Any, ModelHeads] = weakref.WeakKeyDictionary()


def model_heads(model: Any) -> ModelHeads:
    """The heads of a loaded model of a supported family, resolved on the first call for
    ``model`` and cached while it lives.

    Raises
    ------
    UnsupportedModelError
        The model type has no family entry, or its o_proj shapes do not match its config.
    """
    heads = _RESOLVED.get(model)
    if heads is None:
        heads = _RESOLVED[model] = _resolve(model)
    return heads


def _resolve(model: Any) -> ModelHeads:
    family = family_of(model)
    config = getattr(model.config, family.text_config) if family.text_config else model.config
    n_heads = config.num_attention_heads
    d_model = config.hidden_size
    d_head = getattr(config, "head_dim", None) or d_model // n_heads
    layers = resolve(model, family.layers)
    o_proj = tuple(resolve(layer, family.o_proj) for layer in layers)
    for module in o_proj:
        if module.in_features != n_heads * d_head or module.out_features != d_model:
            raise UnsupportedModelError(
                f"{family.name}: o_proj is {module.in_features} -> {module.out_features}, "
                f"expected {n_heads} heads x {d_head} -> {d_model}"
            )
    norms = None
    if family.attn_out_norm is not None:
        norms = tuple(resolve(layer, family.attn_out_norm) for layer in layers)
    return ModelHeads(
        family=family,
        n_layers=len(o_proj),
        n_heads=n_heads,
        d_head=d_head,
        d_model=d_model,
        o_proj=o_proj,
        attn_out_norms=norms,
        unembed=resolve(model, family.unembed),
        final_norm=resolve(model, family.final_norm),
    )
