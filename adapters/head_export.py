"""Export what every head writes, for a set of prompts, into an activation store."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
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
from somp_ref.adapters.offload import input_device, materialized
from somp_ref.adapters.parallel_export import export_in_shards, process_rank
from somp_ref.adapters.provenance import model_fingerprint
from somp_ref.adapters.tokenization import (
    encode,
    prompt_token_mask,
    real_positions,
    resolve_chat_template,
)
from somp_ref.progress import progress
from somp_ref.store import ActivationStore
from somp_ref.store.json_values import check_json
from somp_ref.store.row_appending import RowWriter

#: The rules a text export offers ("image-mean", "image", "text" need images).
POSITIONS = ("prompt-mean", "last", "mean", "all")


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


def export_activations(
    model: Any,
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    out: str | Path,
    *,
    positions: str = "prompt-mean",
    batch_size: int = 8,
    chat_template: bool | None = None,
    dtype: str = "float32",
    padding_side: str = "left",
    overwrite: bool = False,
    resume: bool = False,
    show_progress: bool = True,
) -> ActivationStore | None:
    """Run the prompts through the model and store every head's z at the chosen positions.

    Rows are written batch by batch (memory holds one batch). Launched as several
    processes (``torchrun`` or ``accelerate launch``: ``RANK`` and ``WORLD_SIZE`` set),
    each process exports its contiguous block of the prompts to a shard beside ``out``
    (:func:`somp_ref.store.merging.shard_path`), and the first merges the shards into
    ``out`` once all are done.

    Parameters
    ----------
    model, tokenizer
        A loaded causal LM of a supported family (see :mod:`somp_ref.adapters.families`).
    records : sequence of dict
        One per prompt, each with a "prompt" string; other fields go to samples.jsonl.
    out : path
        The store directory (must not exist unless ``overwrite``).
    positions : {"prompt-mean", "last", "mean", "all"}, default="prompt-mean"
        Which token positions become sample rows (see :func:`select_positions`); the
        default is the paper's: each head's output averaged over the prompt's own tokens.
    batch_size : int, default=8
        Prompts per forward pass; results do not depend on it.
    chat_template : bool, optional
        Wrap each prompt as a user turn of the tokenizer's chat template (True), or feed its
        raw text (False). Default (None): the template when the tokenizer has one, as
        :func:`export`, ``experiment`` and the command line's ``--chat-template`` (this
        default used to be raw text: pass False for it); the store's meta records which.
    dtype : {"float32", "float16"}, default="float32"
        How z is stored.
    padding_side : {"left", "right"}, default="left"
        Results do not depend on it either (position ids count real tokens only).
    overwrite : bool, default=False
        Replace the store at ``out``.
    resume : bool, default=False
        Continue an interrupted export to ``out`` (same model, prompts and options) from
        its last finished batch.

    Returns
    -------
    ActivationStore or None
        Opened for reading. If anything fails midway the directory is left marked
        incomplete: it will not open as a store, and ``resume=True`` finishes it (after an
        ``overwrite``, the old store stays until the new one, kept beside it once a batch
        is in, is finished). None in a data-parallel launch whose shards lie on machines
        this one cannot see.
    """
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not records:
        raise ValueError("records must not be empty")
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other")
    # Before the model runs: a record that cannot be stored would stop the export midway.
    check_json([dict(record) for record in records], "records", strict=False)
    chat_template = resolve_chat_template(tokenizer, chat_template)
    options = {
        "positions": positions,
        "batch_size": batch_size,
        "chat_template": chat_template,
        "dtype": dtype,
        "padding_side": padding_side,
        "overwrite": overwrite,
        "resume": resume,
        "show_progress": show_progress,
    }
    rank, world = process_rank()
    if world > 1:
        return export_in_shards(
            _export_here, model, tokenizer, records, out, rank, world, **options
        )
    return _export_here(model, tokenizer, records, out, **options)


def _export_here(
    model: Any,
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    out: str | Path,
    *,
    positions: str,
    batch_size: int,
    chat_template: bool,
    dtype: str,
    padding_side: str,
    overwrite: bool,
    resume: bool,
    show_progress: bool,
) -> ActivationStore:
    """:func:`export_activations` in this process alone."""
    device = input_device(model)

    def batches():
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            prompts = [str(r["prompt"]) for r in chunk]
            inputs = encode(
                tokenizer,
                prompts,
                chat_template=chat_template,
                padding_side=padding_side,
                device=device,
            )
            masks = PositionMasks()
            if positions == "prompt-mean":
                masks = PositionMasks(
                    prompt=prompt_token_mask(
                        tokenizer, prompts, inputs, chat_template=chat_template
                    )
                )
            yield chunk, inputs, masks

    return export_batches(
        model,
        tokenizer,
        batches(),
        out,
        positions=positions,
        dtype=dtype,
        overwrite=overwrite,
        resume=resume,
        fingerprint=inputs_fingerprint(
            records,
            batch_size=batch_size,
            chat_template=chat_template,
            padding_side=padding_side,
            positions=positions,
        ),
        show_progress=show_progress,
        n_batches=-(-len(records) // batch_size),
        meta={"chat_template": chat_template},
    )


def export(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str | dict[str, Any]],
    path: str | Path,
    *,
    positions: str = "prompt-mean",
    chat_template: bool | None = None,
    **options: Any,
) -> ActivationStore:
    """Export what every head writes for ``prompts`` into a store at ``path``, in one call.

    Parameters
    ----------
    model, tokenizer
    prompts : sequence of str or dict
        Prompt strings, or records with a "prompt" field (other fields are kept).
    path : path
    positions : str, default="prompt-mean"
        The paper's rows: each head's output averaged over the prompt's own tokens.
    chat_template : bool, optional
        As :func:`export_activations`: by default, wrap prompts in the tokenizer's chat
        template when it has one.
    **options
        Passed to :func:`export_activations` (batch_size, dtype, overwrite, ...).

    Returns
    -------
    ActivationStore
    """
    records = [p if isinstance(p, dict) else {"prompt": p} for p in prompts]
    return export_activations(
        model,
        tokenizer,
        records,
        path,
        positions=positions,
        chat_template=chat_template,
        **options,
    )


def inputs_fingerprint(records: Sequence[dict[str, Any]], **options: Any) -> str:
    """SHA-256 of the prompts and the options that decide how they are batched and encoded:
    what a resumed export must share with the one it continues."""
    text = json.dumps({"records": list(records), **options}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


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
        Identifies the inputs (:func:`inputs_fingerprint`); a resume with another one is
        refused.
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
