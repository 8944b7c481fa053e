"""Export what every head writes, for a set of prompts, into an activation store."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adapters.capture import capture_z, select_positions
from adapters.families import family_of, head_layout, o_proj_modules, resolve
from adapters.inputs import encode
from somp_ref.progress import progress
from somp_ref.store import ActivationStore

POSITIONS = ("last", "all", "mean")


def vocabulary(tokenizer: Any, size: int) -> list[str]:
    """Decoded string of every unembedding row (empty beyond the tokenizer's vocabulary)."""
    known = min(size, len(tokenizer))
    ids = [[i] for i in range(known)]
    backend = getattr(tokenizer, "backend_tokenizer", None)  # Rust: ~15x faster, same strings
    if backend is not None:
        strings = backend.decode_batch(ids, skip_special_tokens=False)
    else:
        strings = tokenizer.batch_decode(ids)
    return strings + [""] * (size - known)


def unembedding(model: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """The unembedding (v, d_model) and the final norm's effective weight (d_model,)."""
    family = family_of(model)
    weight = resolve(model, family.unembed).weight.detach().float().cpu().numpy()
    norm = getattr(resolve(model, family.final_norm), "weight", None)
    if norm is not None:
        norm = norm.detach().float().cpu().numpy() + family.norm_weight_offset
    return weight, norm


@torch.no_grad()
def export_activations(
    model: Any,
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    out: str | Path,
    *,
    positions: str = "last",
    batch_size: int = 8,
    chat_template: bool = False,
    dtype: str = "float32",
    padding_side: str = "left",
    overwrite: bool = False,
    show_progress: bool = True,
) -> ActivationStore:
    """Run the prompts through the model and store every head's z at the chosen positions.

    Parameters
    ----------
    model, tokenizer
        A loaded causal LM of a supported family (see :mod:`adapters.families`).
    records : sequence of dict
        One per prompt, each with a "prompt" string; other fields go to samples.jsonl.
    out : path
        The store directory (must not exist unless ``overwrite``).
    positions : {"last", "all", "mean"}, default="last"
        Which token positions become sample rows (see :func:`select_positions`).
    batch_size : int, default=8
        Prompts per forward pass; results do not depend on it.
    chat_template : bool, default=False
        Wrap each prompt as a user turn of the tokenizer's chat template.
    dtype : {"float32", "float16"}, default="float32"
        How z is stored.
    padding_side : {"left", "right"}, default="left"
        Results do not depend on it either (position ids count real tokens only).

    Returns
    -------
    ActivationStore
        Opened for reading. If anything fails midway the directory is left marked
        incomplete and will not open as a store.
    """
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not records:
        raise ValueError("records must not be empty")
    family = family_of(model)
    layout = head_layout(model, family)
    device = next(model.parameters()).device
    prompts = [str(r["prompt"]) for r in records]
    store = ActivationStore.create(
        out,
        n_layers=layout.n_layers,
        n_heads=layout.n_heads,
        d_head=layout.d_head,
        d_model=layout.d_model,
        dtype=dtype,
        overwrite=overwrite,
        meta={
            "model_id": getattr(model, "somp_ref_model_id", None)
            or getattr(model.config, "_name_or_path", "unknown"),
            "family": family.name,
            "positions": positions,
            "chat_template": chat_template,
            "hook": "o_proj input (hook_z)",
            "model_dtype": str(next(model.parameters()).dtype),
        },
    )
    per_layer: list[list[np.ndarray]] = [[] for _ in range(layout.n_layers)]
    samples: list[dict[str, Any]] = []
    starts = range(0, len(prompts), batch_size)
    with capture_z(model) as captured:
        for start in progress(starts, desc="export (batches)", enabled=show_progress):
            batch = encode(
                tokenizer,
                prompts[start : start + batch_size],
                chat_template=chat_template,
                padding_side=padding_side,
                device=device,
            )
            model(**batch, use_cache=False)
            mask = batch["attention_mask"]
            for layer in range(layout.n_layers):
                rows = select_positions(captured[layer], mask, positions)
                per_layer[layer].append(rows.float().cpu().numpy().astype(dtype))
            samples += _sample_records(
                records[start : start + batch_size], batch, tokenizer, positions
            )
    for layer, module in enumerate(
        progress(o_proj_modules(model, family), desc="write layers", enabled=show_progress)
    ):
        bias = None if module.bias is None else module.bias.detach().float().cpu().numpy()
        store.write_layer(
            layer,
            z=np.concatenate(per_layer[layer]),
            o_proj=module.weight.detach().float().cpu().numpy(),
            bias=bias,
        )
        per_layer[layer] = []
    unembed, final_norm = unembedding(model)
    store.write_unembed(unembed, final_norm, vocab=vocabulary(tokenizer, unembed.shape[0]))
    store.write_samples(samples)
    store.close()
    print(
        f"wrote {store.path}: {store.n_samples} rows x {layout.n_layers} layers x "
        f"{layout.n_heads} heads",
        file=sys.stderr,
    )
    return ActivationStore.open(out)


def _sample_records(records, batch, tokenizer, positions) -> list[dict[str, Any]]:
    """One record per stored row; with positions="all", one per real token."""
    if positions != "all":
        return [dict(r) for r in records]
    rows = []
    for record, ids, mask in zip(records, batch["input_ids"], batch["attention_mask"], strict=True):
        real = ids[mask.bool()].tolist()
        for position, token in enumerate(real):
            rows.append({**record, "position": position, "token": tokenizer.decode([token])})
    return rows
