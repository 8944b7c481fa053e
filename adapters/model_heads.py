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

import numpy as np
import torch

from somp_ref.adapters.families import Family, UnsupportedModelError, family_of, resolve
from somp_ref.adapters.offload import materialized


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
    o_proj : tuple of torch.nn.Module
        The attention output projection of every decoder layer, in order: an ``nn.Linear``,
        or GPT-2's ``Conv1D`` whose weight is stored transposed; :meth:`o_proj_weight` gives
        either as (d_model, n_heads * d_head). Hooks on it see z as its first input.
    attn_out_norms : tuple of torch.nn.Module or None
        The norm each layer applies to the attention output before it joins the residual
        stream (Gemma2/3, OLMo2), or None for families without one.
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

    def o_proj_weight(self, layer: int) -> torch.Tensor:
        """W_O of layer ``layer``, (d_model, n_heads * d_head), in the model's dtype: the
        parameter itself or (Conv1D) its transposed view, so in-place edits reach the model."""
        weight = self.o_proj[layer].weight
        return weight.T if self.family.o_proj_transposed else weight

    def o_proj_bias(self, layer: int) -> np.ndarray | None:
        """The o_proj bias of layer ``layer`` as a float32 numpy array (d_model,) on the CPU,
        or None where o_proj has none."""
        if getattr(self.o_proj[layer], "bias", None) is None:
            return None
        return materialized(self.o_proj[layer], "bias").float().cpu().numpy()

    def effective_o_proj(self, layer: int) -> torch.Tensor:
        """The o_proj weight a head's contribution factors through, float32 and contiguous
        (d_model, n_heads * d_head): the weight itself, or ``g * W_O`` under an
        attention-output norm with effective weight g (see :mod:`somp_ref.adapters.capture`).
        """
        weight = materialized(self.o_proj[layer], "weight")  # also when offloaded
        if self.family.o_proj_transposed:
            weight = weight.T
        weight = weight.float().contiguous()
        if self.attn_out_norms is None:
            return weight
        norm = materialized(self.attn_out_norms[layer], "weight").to(weight.device)
        gain = norm.float() + self.family.norm_weight_offset
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
        in_features, out_features = _features(module, family)
        if in_features != n_heads * d_head or out_features != d_model:
            raise UnsupportedModelError(
                f"{family.name}: o_proj is {in_features} -> {out_features}, "
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


def _features(module: Any, family: Family) -> tuple[int, int]:
    """(in_features, out_features) of an o_proj: nn.Linear says; GPT-2's Conv1D does not, and
    its weight is (in_features, out_features)."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise UnsupportedModelError(
            f"{family.name}: o_proj ({type(module).__name__}) has no 2-D weight"
        )
    in_features, out_features = weight.shape if family.o_proj_transposed else weight.T.shape
    return in_features, out_features
