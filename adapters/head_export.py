"""Export what every head writes, for a set of text prompts, into an activation store
(the batches themselves are run by :mod:`somp_ref.adapters.batch_export`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from somp_ref.adapters.batch_export import export_batches
from somp_ref.adapters.capture import (
    PositionMasks,
)
from somp_ref.adapters.offload import input_device
from somp_ref.adapters.parallel_export import export_in_shards, process_rank
from somp_ref.adapters.tokenization import (
    encode,
    prompt_token_mask,
    resolve_chat_template,
)
from somp_ref.store import ActivationStore
from somp_ref.store.json_values import check_json

#: The rules a text export offers ("image-mean", "image", "text" need images).
POSITIONS = ("prompt-mean", "last", "mean", "all")


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
    check_json([dict(record) for record in records], "records")
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
