"""One store from several: the shards of a data-parallel export, rows in shard order.

Shards must be exports of the same model with the same rule: the same shapes and dtype,
the same facts in meta.json (model, family, positions, ...), equal unembeddings (compared
by content, not by the files' bytes) and equal weights in every layer. Rows are copied a
chunk at a time through a :class:`~somp_ref.store.row_appending.RowWriter`, so memory
holds one chunk whatever the size of the shards.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from somp_ref.progress import progress
from somp_ref.store.activation_store import ActivationStore
from somp_ref.store.layout import StoreError
from somp_ref.store.row_appending import RowWriter
from somp_ref.store.schema import REQUIRED_KEYS

#: meta.json keys that differ between shards of one export (their rows, their files).
_PER_SHARD = {
    *REQUIRED_KEYS,
    "format",
    "format_version",
    "prompts_hash",
    "inputs_fingerprint",
    "merged_from",
}
#: Rows copied per append: 4096 rows of a 7B layer (32 heads x 128, float32) are 64 MiB
#: per layer read, one layer at a time.
CHUNK_ROWS = 4096


def merge_stores(
    shards: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    chunk_rows: int = CHUNK_ROWS,
    show_progress: bool = True,
) -> ActivationStore:
    """Write the rows of ``shards``, in order, as one store at ``out``.

    Parameters
    ----------
    shards : sequence of path
        Complete stores, at least one.
    out : path
        The merged store (must not exist unless ``overwrite``).
    chunk_rows : int, default=CHUNK_ROWS
        Rows copied at a time.

    Returns
    -------
    ActivationStore
        The merged store, opened for reading.

    Raises
    ------
    StoreError
        A shard that is not a complete store, or that differs from the first in shapes,
        dtype, facts, unembedding or weights (naming what differs); ``out`` inside a shard.
        (``out`` may be a shard itself, with ``overwrite``: the merged store is built beside
        it and swapped in; ``somp-ref store merge`` refuses that, as a likely slip.)
    """
    if not shards:
        raise ValueError("merge needs at least one store")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    for shard in shards:  # the merged store would be a file of the shard it reads
        if Path(os.path.realpath(shard)) in Path(os.path.realpath(out)).parents:
            raise StoreError(f"{out} is inside the store {shard} it merges: write it elsewhere")
    if not overwrite and (Path(out).exists() or Path(out).is_symlink()):  # before any hashing
        raise StoreError(f"{out} already exists (pass overwrite=True to replace it)")
    opened = [ActivationStore.open(path) for path in shards]
    for store in opened:  # before the merged store is made: a short shard fails here
        store.check_record_count()
    first = opened[0]
    facts = {k: v for k, v in first.meta.items() if k not in _PER_SHARD}
    for store in opened[1:]:
        _check_same_export(first, store, facts)
    with ActivationStore.create(
        out,
        n_layers=first.n_layers,
        n_heads=first.n_heads,
        d_head=first.d_head,
        d_model=first.d_model,
        dtype=first.meta["dtype"],
        overwrite=overwrite,
        meta={**facts, "merged_from": [os.fspath(path) for path in shards]},
    ) as merged:
        writer = RowWriter.start(
            merged, lambda layer: (first.layer(layer)[1], first.layer_bias(layer))
        )
        try:
            chunks = [
                (store, start)
                for store in opened
                for start in range(0, store.n_samples, chunk_rows)
            ]
            for store, start in progress(chunks, desc="merge (chunks)", enabled=show_progress):
                if start == 0:
                    records = store.samples()  # one per row, or a StoreError naming the file
                end = min(start + chunk_rows, store.n_samples)
                try:
                    writer.append(
                        [store.layer(layer)[0][start:end] for layer in range(store.n_layers)],
                        records[start:end],
                    )
                except (ValueError, TypeError) as err:  # what a shard holds: name it
                    raise StoreError(f"{store.path}, rows {start}-{end - 1}: {err}") from err
            writer.finish()
        finally:
            writer.close()
        merged.write_unembed(first.unembed(), first.final_norm(), first.vocab())
    return ActivationStore.open(out)


def _check_same_export(first: ActivationStore, store: ActivationStore, facts: dict[str, Any]):
    """Raise unless ``store`` is a shard of the same export as ``first``."""
    where = f"{store.path} cannot merge with {first.path}"
    for key in ("n_layers", "n_heads", "d_head", "d_model", "dtype"):
        if store.meta[key] != first.meta[key]:
            raise StoreError(f"{where}: {key} {store.meta[key]!r} != {first.meta[key]!r}")
    theirs = {k: v for k, v in store.meta.items() if k not in _PER_SHARD}
    for key in sorted(set(facts) | set(theirs)):
        if facts.get(key) != theirs.get(key):
            raise StoreError(f"{where}: {key} {theirs.get(key)!r} != {facts.get(key)!r}")
    # Compared by content: safetensors writes a header's metadata in no fixed order, so
    # equal files need not be equal bytes.
    norms = first.final_norm(), store.final_norm()
    if not (
        np.array_equal(first.unembed(), store.unembed())
        and _same_optional(*norms)
        and first.vocab() == store.vocab()
    ):
        raise StoreError(f"{where}: their unembeddings differ")
    for layer in range(first.n_layers):
        same_bias = _same_optional(first.layer_bias(layer), store.layer_bias(layer))
        if not (np.array_equal(first.layer(layer)[1], store.layer(layer)[1]) and same_bias):
            raise StoreError(f"{where}: the weights of layer {layer} differ")


def _same_optional(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))


def shard_path(out: str | os.PathLike, rank: int, world: int) -> Path:
    """Where process ``rank`` of ``world`` writes its shard of an export to ``out``."""
    out = Path(out)
    return out.parent / f"{out.name}.shard-{rank:03d}-of-{world:03d}"
