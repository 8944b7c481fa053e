"""Head interventions: scale what chosen heads write into the residual stream."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from somp_ref.adapters.model_heads import model_heads
from somp_ref.head_scores import Head


@contextmanager
def scale_heads(model: Any, alphas: Mapping[Head, float]) -> Iterator[dict[int, int]]:
    """Multiply head h's slice of the o_proj input by alpha, for every (layer, head) given.

    The head's contribution to the residual stream (``z_h W_O[:, h]^T``) is scaled and
    nothing else: other heads, the o_proj bias and the KV cache of the same layer are
    untouched (the cache holds keys and values, computed before o_proj). alpha = 1 leaves
    the logits bit-identical (multiplying by 1.0 is exact); alpha = 0 ablates the head.
    Works with ``generate`` and the KV cache. Hooks are removed on exit, also on errors.

    Yields
    ------
    dict of int -> int
        Calls of each hooked layer's hook, updated live (for checking that the path ran).
    """
    heads = model_heads(model)
    per_layer: dict[int, dict[int, float]] = {}
    for (layer, head), alpha in alphas.items():
        if not (0 <= layer < heads.n_layers and 0 <= head < heads.n_heads):
            raise ValueError(
                f"head {(layer, head)} is outside {heads.n_layers} layers x {heads.n_heads} heads"
            )
        per_layer.setdefault(int(layer), {})[int(head)] = float(alpha)
    calls = {layer: 0 for layer in per_layer}
    handles = []

    def hook_for(layer: int, scale: torch.Tensor):
        cache: dict[tuple, torch.Tensor] = {}

        def hook(module, args):
            x = args[0]
            key = (x.dtype, x.device)
            if key not in cache:
                cache[key] = scale.to(dtype=x.dtype, device=x.device)
            calls[layer] += 1
            return (x * cache[key], *args[1:])

        return hook

    try:
        for layer, scaled in per_layer.items():
            scale = torch.ones(heads.n_heads, heads.d_head, dtype=torch.float64)
            for head, alpha in scaled.items():
                scale[head] = alpha
            handle = heads.o_proj[layer].register_forward_pre_hook(hook_for(layer, scale.flatten()))
            handles.append(handle)
        yield calls
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def steer(model: Any, heads: Iterable[Head], alpha: float = -1.0) -> Iterator[dict[int, int]]:
    """Scale every head of ``heads`` by ``alpha`` inside the block (see :func:`scale_heads`).

    ``alpha=-1`` flips the heads (suppresses what they write), ``0`` ablates them, ``5``
    amplifies them.

    Examples
    --------
    >>> with steer(model, top_heads(scores, 8), alpha=-1):  # doctest: +SKIP
    ...     print(generate(model, tokenizer, ["Describe the color of a banana."]))
    """
    with scale_heads(model, {tuple(head): alpha for head in heads}) as calls:
        yield calls
