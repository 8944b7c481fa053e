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
from dataclasses import dataclass
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


#: Which token positions of a prompt become rows of the store (see select_positions):
#: per-prompt rules give one row per prompt, per-token rules one row per kept token.
PER_PROMPT_RULES = ("prompt-mean", "last", "mean", "image-mean")
PER_TOKEN_RULES = ("all", "text", "image")
POSITION_RULES = PER_PROMPT_RULES + PER_TOKEN_RULES


@dataclass(frozen=True)
class PositionMasks:
    """Token masks (batch, pos) that some position rules need.

    Attributes
    ----------
    prompt : Tensor or None
        The tokens of the user's prompt text (not the chat template's own tokens).
    image : Tensor or None
        Image-patch tokens (vision-language models).
    """

    prompt: torch.Tensor | None = None
    image: torch.Tensor | None = None


def position_mask(
    mask: torch.Tensor, rule: str, masks: PositionMasks = PositionMasks()
) -> torch.Tensor:
    """The positions (batch, pos) a rule averages over or keeps ("last": the last real
    token)."""
    mask = mask.bool()
    if rule not in POSITION_RULES:
        raise ValueError(f"positions must be one of {', '.join(POSITION_RULES)}, got {rule!r}")
    if rule == "last":
        last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(dim=1)
        return torch.nn.functional.one_hot(last, mask.shape[1]).bool()
    if rule in ("mean", "all"):
        return mask
    if rule == "prompt-mean":
        if masks.prompt is None:
            raise ValueError("positions='prompt-mean' needs the prompt's token mask")
        return mask & masks.prompt.to(mask.device).bool()
    if masks.image is None:
        raise ValueError(f"positions={rule!r} needs image inputs (an image token mask)")
    image = masks.image.to(mask.device).bool()
    return mask & (~image if rule == "text" else image)


def select_positions(
    z: torch.Tensor, mask: torch.Tensor, rule: str, masks: PositionMasks = PositionMasks()
) -> torch.Tensor:
    """Rows kept from z (batch, pos, n_heads, d_head) under a positions rule.

    Per prompt (one row each): "prompt-mean", the mean over the tokens of the user's
    prompt (the paper's rows for text: the chat template's own tokens left out); "mean",
    over every real token; "last", the last real token; "image-mean", over the image
    patches (the paper's rows for vision-language tasks). Per token: "all" every real
    token, "text" / "image" every real token that is not / is an image token, prompt by
    prompt, in order.
    """
    keep = position_mask(mask.to(z.device), rule, masks)
    if rule in PER_TOKEN_RULES:
        return z[keep]
    counts = keep.sum(dim=1)
    if (counts == 0).any():
        row = int((counts == 0).nonzero()[0])
        raise ValueError(f"positions={rule!r}: prompt {row} of the batch has no such token")
    weights = keep.to(z.dtype) / counts.to(z.dtype)[:, None]
    return torch.einsum("bp,bphd->bhd", weights, z)
