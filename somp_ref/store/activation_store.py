"""The activation store as callers use it: :class:`ActivationStore`, made by :meth:`create`
(a new store), :meth:`resume` (finishing an interrupted one) or :meth:`open` (reading a
complete one), with the reading and writing methods of its two halves."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from somp_ref.files import make_directories
from somp_ref.store.json_values import check_json
from somp_ref.store.layout import FORMAT, FORMAT_VERSION, META_FILE, REPLACING, StoreError
from somp_ref.store.locations import real_location, refuse_hidden_sibling, refuse_symlink
from somp_ref.store.locking import WriterLock
from somp_ref.store.reading import StoreReading
from somp_ref.store.regular_files import sha256
from somp_ref.store.replacing import claim, kept_replacement, recovery_hint, remove_store_dir
from somp_ref.store.row_appending import APPENDING
from somp_ref.store.schema import MAX_META_BYTES, largest_meta_bytes, load_meta, validate_meta
from somp_ref.store.writing import StoreWriting


def _new_record(
    n_layers: Any,
    n_heads: Any,
    d_head: Any,
    d_model: Any,
    meta: Mapping[str, Any] | None,
    dtype: Any,
) -> dict[str, Any]:
    """The meta.json record a new store starts with, checked: against the schema, as plain
    JSON, and small enough that its meta.json stays readable once every part is recorded."""
    if meta is not None and not isinstance(meta, Mapping):
        raise TypeError(f"meta must be a mapping of JSON facts, got {type(meta).__name__}")
    reserved = sorted({APPENDING, REPLACING} & set(meta or {}))
    if reserved:
        raise ValueError(f"meta: {reserved} are the store's own keys, not facts to record")
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
    check_json(record, "meta")
    size = largest_meta_bytes(record)
    if size > MAX_META_BYTES:
        raise ValueError(
            f"meta: these facts would make meta.json {size} bytes, over the {MAX_META_BYTES} "
            "a store's meta.json may hold (keep large data in files of their own)"
        )
    return record


def _no_store_directory(path: str | os.PathLike) -> StoreError:
    """The error for a store directory that is missing, saying how to recover it when an
    interrupted overwrite left it beside the path."""
    try:
        hint = recovery_hint(real_location(path))
    except (StoreError, OSError):  # the root, an unreadable parent: nothing to say
        hint = ""
    return StoreError(f"{path}: no such store directory{hint}")


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
        resumable: bool = False,
    ) -> ActivationStore:
        """Start a new store at ``path`` (a directory that must not exist, unless
        ``overwrite``).

        Parameters
        ----------
        n_layers, n_heads, d_head, d_model : int
            The model's shapes; heads are query heads. At most 4096, 4096, 65536 and 2**20.
        meta : mapping, optional
            Extra facts (model id, family, positions rule, ...) as plain JSON values: str,
            int, finite float, bool, None, lists and dicts with string keys; strings valid
            Unicode; meta.json at most 64 MiB once every part is recorded.
        dtype : {"float16", "float32", "float64"}, default="float32"
            How ``z`` is stored (bfloat16 activations are widened to float32 by the caller:
            numpy has no bfloat16). Weights are stored in float32 or wider.
        overwrite : bool, default=False
            Replace an existing store (or use an empty directory). Refused for a directory
            that is not a store or holds files that are not its own, and for a symlink. The
            new store is built beside the old one and swapped in by :meth:`close`; until
            then, and after an error, the old store stays as it was.
        resumable : bool, default=False
            With ``overwrite``: when writing stops with rows written, keep the new store
            beside the old one for :meth:`resume` (as export does: its rows cost hours);
            otherwise it is deleted.

        Raises
        ------
        ValueError, TypeError
            For shapes, dtype or ``meta`` facts out of the schema or not plain JSON; nothing
            is created on disk then.
        StoreError
            When ``path`` exists (and may not be replaced), is one of the hidden copies an
            overwrite makes (``.NAME.new-*``, ``.NAME.old-*``), or another writer holds it;
            or when an interrupted overwrite of ``path`` left beside it a complete store that
            may be the only copy of one (both halves of a swap stopped between its renames,
            or a store beside a missing path): the message names them and how to recover.
        """
        record = _new_record(n_layers, n_heads, d_head, d_model, meta, dtype)
        given = Path(path)
        refuse_symlink(given)  # these are refused before anything is made
        refuse_hidden_sibling(real_location(given))
        make_directories(given.parent)
        target = real_location(given)  # where the lock, the store and its siblings go
        lock = WriterLock(target)
        try:
            existed = target.exists() or target.is_symlink()
            directory, replaces = claim(target, overwrite)
            if resumable and replaces is not None:  # what resume() checks it still replaces
                record[REPLACING] = sha256(target / META_FILE)
            try:
                store = cls(
                    given,
                    record,
                    lock=lock,
                    directory=directory,
                    target=target,
                    replaces=replaces,
                )
                store._save_meta()
            except BaseException:
                if directory != target or not existed:  # made here: nothing is left behind
                    remove_store_dir(directory, n_layers)
                raise
        except BaseException:
            lock.release()
            raise
        return store

    @classmethod
    def resume(cls, path: str | os.PathLike) -> ActivationStore:
        """Reopen an incomplete store for writing; :meth:`missing` says what is left.

        When an interrupted resumable overwrite kept its new store beside the one at
        ``path`` (see ``create``'s ``resumable``), that one is reopened instead, provided the
        store at ``path`` is still the one it replaces: :meth:`close` swaps it in, and until
        then the old store stays.

        Raises
        ------
        StoreError
            When ``path`` is not an incomplete store's directory (nor a complete one with a
            kept replacement), is a symbolic link, is one of the hidden copies an overwrite
            makes (``.NAME.new-*``, ``.NAME.old-*``), or another writer holds it.
        """
        given = Path(path)
        refuse_symlink(given)
        target = real_location(given)
        refuse_hidden_sibling(target)
        if not target.is_dir():
            raise _no_store_directory(path)
        lock = WriterLock(target)
        try:
            meta = load_meta(target)
            directory, replaces = target, None
            kept = kept_replacement(target)
            if kept is not None:
                replacement = load_meta(kept)
                if replacement[REPLACING] != sha256(target / META_FILE):
                    raise StoreError(
                        f"{path}: {kept.name} beside it is the unfinished new store of an "
                        f"overwrite of another store than the one now at {given.name}; "
                        "resume refuses to replace a store it was not started on (delete "
                        "it, or overwrite again)"
                    )
                directory, replaces, meta = kept, meta["n_layers"], replacement
            elif meta["complete"]:
                raise StoreError(f"{given / META_FILE}: the store is complete, nothing to resume")
            store = cls(
                given, meta, lock=lock, directory=directory, target=target, replaces=replaces
            )
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
            Missing directory (saying how to recover it where an interrupted overwrite
            left it beside the path) or meta.json, unknown format version, a meta.json out
            of the schema, an incomplete store (naming the missing parts), a file that is
            not a regular file or whose size differs from the recorded one, or a part that
            disagrees with meta.json: a tensor's dtype or shape (from the file's header) or
            the number of sample records.
        """
        path = Path(path)
        if not path.is_dir():
            raise _no_store_directory(path)
        meta = load_meta(path)
        store = cls(path, meta)
        if not meta["complete"]:
            raise StoreError(
                f"{path} is an incomplete store (missing: {', '.join(store.missing())}); "
                "finish it with ActivationStore.resume or export it again"
            )
        store._check_files()
        store._check_parts()
        return store
