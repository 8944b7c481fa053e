"""Capturing what each head computes: forward hooks on every o_proj.

The input of a layer's o_proj is the concatenation of its heads' outputs (``hook_z``,
[batch, pos, head_index, d_head] once reshaped); head h's contribution to the residual
stream is ``z_h @ W_O[:, h]^T``. Where the attention output is normalised before it joins
the residual stream (Gemma3's ``post_attention_layernorm``, an RMSNorm with weight g), the
contribution is the normalised share ``g * (z_h W_O[:, h]^T) / rms(o)`` with o the whole
o_proj output at that position; it factors as ``(z_h / rms(o)) (g * W_O[:, h])^T``, so the
store keeps ``z / rms(o)`` and ``g * W_O`` (``ModelHeads.effective_o_proj``) and every
downstream computation is unchanged.
Hooks are added only inside a context manager that removes them in ``finally``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from somp_ref.adapters.model_heads import model_heads


def _norm_eps(norm: Any) -> float:
    for name in ("eps", "variance_epsilon"):
        if hasattr(norm, name):
            return float(getattr(norm, name))
    raise TypeError(f"cannot find the epsilon of norm {type(norm).__name__}")


@contextmanager
def capture_z(model: Any, *, contributions: bool = False) -> Iterator[dict[int, torch.Tensor]]:
    """Inside the block, every forward fills ``captured[layer]`` with that layer's z,
    shape (batch, pos, n_heads, d_head), detached.

    With ``contributions=True`` and a family that normalises the attention output, z is
    divided by the RMS of the o_proj output at its position (float32), so that
    ``z_h @ model_heads(model).effective_o_proj(layer)[:, h]^T`` is the head's normalised
    share.
    """
    heads = model_heads(model)
    norms = heads.attn_out_norms if contributions else None
    captured: dict[int, torch.Tensor] = {}
    handles = []

    def hook_for(layer: int):
        eps = None if norms is None else _norm_eps(norms[layer])

        def hook(module, args, output):
            z = args[0].detach()
            if eps is not None:
                out = output.detach().float()
                z = z.float() * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + eps)
            captured[layer] = z.reshape(*z.shape[:-1], heads.n_heads, heads.d_head)

        return hook

    try:
        for layer, module in enumerate(heads.o_proj):
            handles.append(module.register_forward_hook(hook_for(layer)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def select_positions(
    z: torch.Tensor, mask: torch.Tensor, rule: str, image_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Rows kept from z (batch, pos, n_heads, d_head) under a positions rule.

    "last": the last real token of each prompt (batch rows); "mean": the mean over its real
    tokens (batch rows); "all": every real token, prompt by prompt, in order; "image" /
    "text": every real token that is / is not an image token (needs ``image_mask``).
    """
    mask = mask.to(z.device).bool()
    if rule == "last":
        last = (mask * torch.arange(mask.shape[1], device=z.device)).argmax(dim=1)
        return z[torch.arange(z.shape[0], device=z.device), last]
    if rule == "mean":
        keep = mask[:, :, None, None]
        total = torch.where(keep, z, torch.zeros((), dtype=z.dtype, device=z.device)).sum(dim=1)
        return total / mask.sum(dim=1).to(z.dtype)[:, None, None]
    if rule == "all":
        return z[mask]
    if rule in ("image", "text"):
        if image_mask is None:
            raise ValueError(f"positions={rule!r} needs image inputs (an image token mask)")
        image_mask = image_mask.to(z.device).bool()
        return z[mask & (image_mask if rule == "image" else ~image_mask)]
    raise ValueError(
        f"positions must be one of 'last', 'all', 'mean', 'image', 'text', got {rule!r}"
    )
