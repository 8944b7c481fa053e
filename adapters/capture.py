"""Capturing what each head computes: forward pre-hooks on every o_proj.

The input of a layer's o_proj is the concatenation of its heads' outputs (``hook_z``,
[batch, pos, head_index, d_head] once reshaped); head h's contribution to the residual
stream is ``z_h @ W_O[:, h]^T``. Hooks are added only inside a context manager that removes
them in ``finally``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from adapters.families import family_of, head_layout, o_proj_modules


@contextmanager
def capture_z(model: Any) -> Iterator[dict[int, torch.Tensor]]:
    """Inside the block, every forward fills ``captured[layer]`` with that layer's z,
    shape (batch, pos, n_heads, d_head), detached, in the model's dtype."""
    family = family_of(model)
    layout = head_layout(model, family)
    captured: dict[int, torch.Tensor] = {}
    handles = []

    def hook_for(layer: int):
        def hook(module, args):
            x = args[0]
            captured[layer] = x.detach().reshape(*x.shape[:-1], layout.n_heads, layout.d_head)

        return hook

    try:
        for layer, module in enumerate(o_proj_modules(model, family)):
            handles.append(module.register_forward_pre_hook(hook_for(layer)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def select_positions(z: torch.Tensor, mask: torch.Tensor, rule: str) -> torch.Tensor:
    """Rows kept from z (batch, pos, n_heads, d_head) under a positions rule.

    "last": the last real token of each prompt (batch rows); "mean": the mean over its real
    tokens (batch rows); "all": every real token, prompt by prompt, in order.
    """
    mask = mask.to(z.device)
    if rule == "last":
        last = (mask * torch.arange(mask.shape[1], device=z.device)).argmax(dim=1)
        return z[torch.arange(z.shape[0], device=z.device), last]
    if rule == "mean":
        keep = mask.bool()[:, :, None, None]
        total = torch.where(keep, z, torch.zeros((), dtype=z.dtype, device=z.device)).sum(dim=1)
        return total / mask.sum(dim=1).to(z.dtype)[:, None, None]
    if rule == "all":
        return z[mask.bool()]
    raise ValueError(f"positions must be one of 'last', 'all', 'mean', got {rule!r}")
