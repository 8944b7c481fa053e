"""The activation store as callers use it: :class:`ActivationStore`, made by :meth:`create`
(a new store), :meth:`resume` (finishing an interrupted one) or :meth:`open` (reading a
complete one), with the reading and writing methods of its two halves."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from somp_ref.store.layout import FORMAT, FORMAT_VERSION, META_FILE, StoreError
from somp_ref.store.locking import WriterLock
from somp_ref.store.reading import StoreReading
from somp_ref.store.replacing import claim
from somp_ref.store.schema import load_meta, validate_meta
from somp_ref.store.writing import StoreWriting


class ActivationStore(StoreReading, StoreWriting):
    """An activation store directory, opened for writing or for reading.

    Use :meth:`create` (new store), :meth:`resume` (finish an interrupted one) or
    :meth:`open` (read a complete one); do not call the constructor directly. The facts
    (shapes, :meth:`missing`, :meth:`summary`) come from
    :class:`~somp_ref.store.facts.StoreFacts`, the reading methods from
    :class:`~somp_ref.store.reading.StoreReading`, the writing ones from
    :class:`~somp_ref.store.writing.StoreWriting`.

    Examples
    --------
    >>> with ActivationStore.create(path, n_layers=2, n_heads=4, d_head=8,
    ...                             d_model=32) as store:          # doctest: +SKIP
    ...     for layer in range(2):
    ...         store.write_layer(layer, z=Z[layer], o_proj=W_O[layer])
    ...     store.write_unembed(W_U)
    ...     store.write_samples([{"prompt": p} for p in prompts])
    >>> store = ActivationStore.open(path)                          # doctest: +SKIP
    >>> z, o_proj = store.layer(0)                                  # memory-mapped
    """

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        *,
        n_layers: int,
        n_heads: int,
        d_head: int,
        d_model: int,
        meta: Mapping[str, Any] | None = None,
        dtype: str = "float32",
        overwrite: bool = False,
    ) -> ActivationStore:
        """Start a new store at ``path`` (a directory that must not exist, unless
        ``overwrite``).

        Parameters
        ----------
        n_layers, n_heads, d_head, d_model : int
            The model's shapes; heads are query heads. At most 4096, 4096, 65536 and 2**20.
        meta : mapping, optional
            Extra JSON-serialisable facts (model id, family, positions rule, ...).
        dtype : {"float16", "float32", "float64"}, default="float32"
            How ``z`` is stored (bfloat16 activations are widened to float32 by the caller:
            numpy has no bfloat16). Weights are stored in float32 or wider.
        overwrite : bool, default=False
            Replace an existing store (or use an empty directory). Refused for a directory
            that is not a store or holds files that are not its own, and for a symlink. The
            new store is built beside the old one and swapped in by :meth:`close`; until
            then, and after an error, the old store stays as it was.

        Raises
        ------
        ValueError
            For shapes, dtype or ``meta`` facts out of the schema.
        StoreError
            When ``path`` exists (and may not be replaced) or another writer holds it.
        """
        shapes = {"n_layers": n_layers, "n_heads": n_heads, "d_head": d_head, "d_model": d_model}
        record = {
            **dict(meta or {}),  # first: the caller cannot override the store's own keys
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **{k: int(v) if isinstance(v, np.integer) else v for k, v in shapes.items()},
            "dtype": dtype,
            "n_samples": None,
            "complete": False,
            "files": {},
        }
        validate_meta(record)
        target = Path(os.path.abspath(path))
        if not target.name:
            raise StoreError(f"{path}: a store cannot be the root directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = WriterLock(target)
        try:
            directory, replaces = claim(target, overwrite)
            store = cls(Path(path), record, lock=lock, directory=directory, replaces=replaces)
            store._save_meta()
        except BaseException:
            lock.release()
            raise
        return store

    @classmethod
    def resume(cls, path: str | os.PathLike) -> ActivationStore:
        """Reopen an incomplete store for writing; :meth:`missing` says what is left."""
        path = Path(path)
        if not path.is_dir():
            raise StoreError(f"{path}: no such store directory")
        lock = WriterLock(Path(os.path.abspath(path)))
        try:
            meta = load_meta(path)
            if meta["complete"]:
                raise StoreError(f"{path / META_FILE}: the store is complete, nothing to resume")
            store = cls(path, meta, lock=lock)
            store._check_files()
        except BaseException:
            lock.release()
            raise
        return store

    @classmethod
    def open(cls, path: str | os.PathLike) -> ActivationStore:
        """Open a complete store for reading (lazily: nothing is loaded yet).

        Raises
        ------
        StoreError
            Missing directory or meta.json, unknown format version, a meta.json out of the
            schema, an incomplete store (naming the missing parts), or a file that is not a
            regular file or whose size differs from the recorded one.
        """
        path = Path(path)
        meta = load_meta(path)
        store = cls(path, meta)
        if not meta["complete"]:
            raise StoreError(
                f"{path} is an incomplete store (missing: {', '.join(store.missing())}); "
                "finish it with ActivationStore.resume or export it again"
            )
        store._check_files()
        return store
