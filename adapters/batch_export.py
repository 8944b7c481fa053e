"""Export from prebuilt model inputs, batch by batch: the engine under text and image
exports. Each batch runs the model for its hooks only, keeps the rows its positions rule
selects, and appends them to the store (memory holds one batch; an interrupted export keeps
every batch it finished)."""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from somp_ref.adapters.capture import (
    PER_PROMPT_RULES,
    PositionMasks,
    capture_z,
    position_mask,
    select_positions,
)
from somp_ref.adapters.export_resume import finished_export, resume_export, skipping
from somp_ref.adapters.model_heads import ModelHeads, model_heads
from somp_ref.adapters.offload import materialized
from somp_ref.adapters.provenance import model_fingerprint
from somp_ref.adapters.tokenization import real_positions
from somp_ref.progress import progress
from somp_ref.store import ActivationStore
from somp_ref.store.row_appending import RowWriter


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


def unembedding(heads: ModelHeads) -> tuple[np.ndarray, np.ndarray | None]:
    """The unembedding (v, d_model) and the final norm's effective weight (d_model,), or
    None for a norm without a weight."""
    weight = materialized(heads.unembed, "weight").float().cpu().numpy()
    norm = None
    if getattr(heads.final_norm, "weight", None) is not None:
        norm = materialized(heads.final_norm, "weight").float().cpu().numpy()
        norm = norm + heads.family.norm_weight_offset
    return weight, norm


def forward_without_logits(model: Any, inputs: dict[str, Any]) -> None:
    """Run the model for its hooks only: no KV cache, and the unembedding applied to the last
    position alone (``logits_to_keep=1``) where the model takes it, not to every position."""
    params = inspect.signature(model.forward).parameters
    keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    model(**inputs, use_cache=False, **keep)


@torch.no_grad()
def export_batches(
    model: Any,
    tokenizer: Any,
    batches: Iterable[tuple[Sequence[dict[str, Any]], dict[str, Any], Any]],
    out: str | Path,
    *,
    positions: str = "last",
    dtype: str = "float32",
    overwrite: bool = False,
    resume: bool = False,
    fingerprint: str | None = None,
    show_progress: bool = True,
    n_batches: int | None = None,
    meta: dict[str, Any] | None = None,
) -> ActivationStore:
    """Export from prebuilt model inputs: each batch is ``(records, inputs, masks)`` with
    ``inputs`` passed as ``model(**inputs)`` (an ``attention_mask`` is required) and
    ``masks`` the :class:`PositionMasks` the positions rule needs (prompt or image tokens).

    Heads' contributions are stored as factors: z (normalised under an attention-output
    norm, see :mod:`somp_ref.adapters.capture`) and the matching effective o_proj weight.
    Rows go to disk batch by batch (:class:`somp_ref.store.row_appending.RowWriter`), so
    memory holds one batch whatever the number of rows, and an interrupted export keeps
    every batch it finished.

    Parameters
    ----------
    resume : bool, default=False
        Continue the interrupted export at ``out`` from its last finished batch: ``batches``
        must be the same as the first time (from the start; the finished ones are skipped).
    fingerprint : str, optional
        Identifies the inputs
        (:func:`somp_ref.adapters.head_export.inputs_fingerprint`); a resume with another
        one is refused.
    """
    heads = model_heads(model)
    facts = {
        "model_id": getattr(model, "somp_ref_model_id", None)
        or getattr(model.config, "_name_or_path", "unknown"),
        "family": heads.family.name,
        "positions": positions,
        "hook": "o_proj input (hook_z)",
        "contribution": "post-attention-norm share"
        if heads.attn_out_norms is not None
        else "z @ W_O[:, head]^T",
        "model_dtype": str(next(model.parameters()).dtype),
        "model_fingerprint": model_fingerprint(model),
        **({"inputs_fingerprint": fingerprint} if fingerprint is not None else {}),
        **(meta or {}),
    }
    if resume:
        if fingerprint is None:
            raise ValueError("resume=True needs the inputs' fingerprint (inputs_fingerprint)")
        finished = finished_export(out, facts, dtype)
        if finished is not None:
            return finished
        store, writer = resume_export(out, facts, dtype)
        if writer is None:  # every part was written; only closing it was interrupted
            store.close()
            return ActivationStore.open(out)
    else:
        store = ActivationStore.create(
            out,
            n_layers=heads.n_layers,
            n_heads=heads.n_heads,
            d_head=heads.d_head,
            d_model=heads.d_model,
            dtype=dtype,
            overwrite=overwrite,
            resumable=True,
            meta=facts,
        )
        try:
            writer = RowWriter.start(
                store,
                lambda layer: (
                    heads.effective_o_proj(layer).cpu().numpy(),
                    heads.o_proj_bias(layer),
                ),
                {"batches": 0},
            )
            # Before the rows: once the last batch is in, finishing the rows and closing
            # the store are all that is left.
            unembed, final_norm = unembedding(heads)
            vocab = vocabulary(tokenizer, unembed.shape[0])
            store.write_unembed(unembed, final_norm, vocab=vocab)
        except BaseException:
            store.__exit__(*sys.exc_info())
            raise
    done = writer.progress["batches"]
    # On any error the with block releases the writer lock: a new store stays incomplete,
    # resumable from its last committed batch (an interrupted overwrite leaves the old
    # store as it was: it is built in a hidden sibling, kept for --resume once a batch is in).
    with store, contextlib.closing(writer), capture_z(model, contributions=True) as captured:
        remaining = None if n_batches is None else max(n_batches - done, 0)
        given = 0
        for records, inputs, masks in progress(
            skipping(batches, done),
            desc="export (batches)",
            enabled=show_progress,
            total=remaining,
        ):
            given += 1
            forward_without_logits(model, inputs)
            mask = inputs["attention_mask"]
            z = [
                select_positions(captured[layer], mask, positions, masks).float().cpu().numpy()
                for layer in range(heads.n_layers)
            ]
            samples = _sample_records(records, inputs, tokenizer, positions, masks)
            writer.append(z, samples, {"batches": done + given})
        writer.finish()
    print(
        f"wrote {store.path}: {store.n_samples} rows x {heads.n_layers} layers x "
        f"{heads.n_heads} heads",
        file=sys.stderr,
    )
    return ActivationStore.open(out)


def _sample_records(
    records: Sequence[dict[str, Any]],
    inputs: dict[str, Any],
    tokenizer: Any,
    positions: str,
    masks: PositionMasks,
) -> list[dict[str, Any]]:
    """One record per stored row; with a per-token rule, one per kept token."""
    if positions in PER_PROMPT_RULES:
        return [dict(r) for r in records]
    rows = []
    real_index = real_positions(inputs["attention_mask"])
    kept = position_mask(inputs["attention_mask"], positions, masks)
    for row, (record, ids, keep) in enumerate(zip(records, inputs["input_ids"], kept, strict=True)):
        for index in keep.nonzero().squeeze(-1).tolist():
            rows.append(
                {
                    **record,
                    "position": int(real_index[row, index]),
                    "token": tokenizer.decode([int(ids[index])]),
                }
            )
    return rows
