"""Where a new store is written, and how it replaces an old one without losing either.

A new store is written in place when its path is free or an empty directory. Over an
existing store (``overwrite=True``, allowed only for a store holding nothing but its own
files) it is built in a hidden sibling ``PARENT/.NAME.new-*`` and swapped in once complete:
the old store is renamed to ``PARENT/.NAME.old-*``, the new one renamed into place, and
only then are the old store's own files unlinked (never through a symlink, never
recursively); anything else found in it is kept, with a warning. A writer killed at any
point leaves a complete store at the path or, between the two renames, both beside it.

A replacement made resumable (``create(..., overwrite=True, resumable=True)``, as export
does) that stops once it holds rows is kept beside the old store (:func:`kept_replacement`),
with the SHA-256 of the old store's meta.json: ``ActivationStore.resume`` of the path
continues it, if the store there is still that one, and swaps it in when done; the next
overwrite of the path deletes it, with a warning.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

from somp_ref.files import sync_directory
from somp_ref.store.layout import META_FILE, REPLACING, StoreError, is_part_name
from somp_ref.store.locations import sibling, siblings
from somp_ref.store.row_appending import APPENDING, part_of_partial
from somp_ref.store.schema import load_meta

# The temporary files of somp_ref.files.write_atomically, which writes every store file:
# ``.NAME.PID-RANDOM.tmp``. A writer killed mid-write leaves one behind.
_TEMP_NAME = re.compile(r"\.(.+)\.[0-9]+-[0-9a-f]+\.tmp")
# safetensors' writer (0.5 and later) writes a file's data to ``.tmpXXXXXX`` beside it (the
# Rust tempfile crate's name) and renames it over the file: a writer killed meanwhile
# leaves one behind, in the store or in the hidden sibling a replacement is built in.
_SAFETENSORS_TEMP_NAME = re.compile(r"\.tmp[A-Za-z0-9]{6}")


def is_own_entry(entry: os.DirEntry, n_layers: int | None) -> bool:
    """Whether a directory entry is one a store of ``n_layers`` layers writes: meta.json, a
    part, or a temporary file of either (its own or safetensors'); never a directory."""
    if entry.is_dir(follow_symlinks=False):
        return False
    if entry.name == META_FILE or is_part_name(entry.name, n_layers):
        return True
    partial = part_of_partial(entry.name)  # a part whose rows were being appended
    if partial is not None and is_part_name(partial, n_layers):
        return True
    if _SAFETENSORS_TEMP_NAME.fullmatch(entry.name):
        return True
    match = _TEMP_NAME.fullmatch(entry.name)
    return match is not None and (match[1] == META_FILE or is_part_name(match[1], n_layers))


def _first_foreign(directory: Path, n_layers: int | None) -> str | None:
    """Name of the first entry (by name) of ``directory`` that is not a store's own, or None."""
    with os.scandir(directory) as entries:
        names = sorted(e.name for e in entries if not is_own_entry(e, n_layers))
    return names[0] if names else None


def remove_store_dir(directory: Path, n_layers: int | None) -> None:
    """Delete a store directory this package made: unlink its own entries (never following a
    symlink, never recursing; meta.json last, so a half-deleted store still says what it
    is), then rmdir. Anything else stays, and so does the directory, with a warning."""
    if directory.is_symlink() or not directory.is_dir():
        warnings.warn(f"left {directory} alone: not a directory", stacklevel=3)
        return
    with os.scandir(directory) as entries:
        own = [Path(e.path) for e in entries if is_own_entry(e, n_layers)]
    for path in sorted(own, key=lambda p: p.name == META_FILE):
        path.unlink(missing_ok=True)
    try:
        os.rmdir(directory)
    except OSError:
        warnings.warn(
            f"kept {directory}: it holds files that are not part of a store", stacklevel=3
        )


def _remove_stale_siblings(target: Path) -> None:
    """Delete what killed overwrites of ``target`` left beside it (``target`` exists, so
    none of it is the only copy of a store); keep, with a warning, what does not look like
    one of our store directories."""
    for stale in siblings(target):
        if stale.is_symlink() or not stale.is_dir() or _first_foreign(stale, None):
            warnings.warn(f"left {stale} alone: it is not a store directory", stacklevel=3)
            continue
        meta = _resumable_meta(stale)
        if meta is not None:
            warnings.warn(
                f"deleted {stale.name}, the unfinished new store of an interrupted overwrite "
                f"of {target.name} ({held_rows(meta)} rows; a resume would have continued "
                "it)",
                stacklevel=3,
            )
        remove_store_dir(stale, None)


def _check_replaceable(target: Path) -> int | None:
    """Check that the directory ``target`` is empty or a store holding only its own files;
    touch nothing.

    Returns
    -------
    int or None
        The store's layer count; None for an empty directory.
    """
    with os.scandir(target) as entries:
        if next(entries, None) is None:
            return None
    try:
        n_layers = load_meta(target)["n_layers"]
    except StoreError as err:
        raise StoreError(
            f"{target} exists and is not a store: refusing to overwrite it ({err})"
        ) from err
    foreign = _first_foreign(target, n_layers)
    if foreign is not None:
        raise StoreError(
            f"{target} holds {foreign!r}, which is not part of a store: refusing to overwrite it"
        )
    return n_layers


def claim(target: Path, overwrite: bool) -> tuple[Path, int | None]:
    """Make the directory a new store at ``target`` is written in (the writer lock is held).

    Returns
    -------
    directory : Path
        ``target`` itself when it did not exist or was empty, else a hidden sibling that
        :func:`swap_in` puts in its place.
    replaces : int or None
        The layer count of the store being replaced; None when there is none.

    Raises
    ------
    StoreError
        When ``target`` is a symlink, exists without ``overwrite``, or may not be replaced.
    """
    if target.is_symlink():
        raise StoreError(f"{target} is a symbolic link: refusing to write a store through it")
    if not target.exists():
        orphans = siblings(target)
        if orphans:
            warnings.warn(
                f"{target} is missing but an interrupted overwrite left {orphans}: one of them "
                f"holds the store; rename it to {target.name} to recover it",
                stacklevel=3,
            )
        target.mkdir()
        sync_directory(target.parent)  # the new store's name survives a power cut
        return target, None
    if not overwrite:
        raise StoreError(f"{target} already exists (pass overwrite=True to replace it)")
    if not target.is_dir():
        raise StoreError(f"{target} exists and is not a directory: refusing to overwrite it")
    replaces = _check_replaceable(target)
    _remove_stale_siblings(target)
    if replaces is None:
        return target, None
    directory = sibling(target, "new")
    directory.mkdir()
    return directory, replaces


def swap_in(built: Path, target: Path, replaces: int) -> None:
    """Put the finished store ``built`` beside ``target`` in the place of the store there
    (of ``replaces`` layers): move the old store to a hidden sibling, move the new one in,
    then delete the old."""
    old = sibling(target, "old")
    try:
        os.rename(target, old)
    except FileNotFoundError:  # the old store was removed meanwhile: nothing to delete
        old = None
    os.rename(built, target)
    sync_directory(target.parent)  # the swap is durable before the old store goes
    if old is not None:
        remove_store_dir(old, replaces)


def held_rows(meta: dict) -> int:
    """Rows a store holds: written whole (``n_samples``) or committed batch by batch."""
    if meta["n_samples"] is not None:
        return meta["n_samples"]
    return meta[APPENDING]["rows"] if APPENDING in meta else 0


def worth_resuming(meta: dict) -> bool:
    """Whether a replacement stopped midway is kept for a resume: it was made resumable and
    holds rows."""
    return REPLACING in meta and held_rows(meta) > 0


def kept_replacement(target: Path) -> Path | None:
    """The replacement of the store at ``target`` that an interrupted overwrite kept (see
    the module's notes; finished or not), or None.

    Raises
    ------
    StoreError
        When several are kept (each overwrite deletes those before it, unless one holds a
        file that is not a store's: delete all but one then).
    """
    kept = [path for path in siblings(target, "new") if _resumable_meta(path) is not None]
    if len(kept) > 1:
        raise StoreError(
            f"{target}: several unfinished replacements are kept beside it "
            f"({', '.join(p.name for p in kept)}); delete all but one to resume"
        )
    return kept[0] if kept else None


def _resumable_meta(directory: Path) -> dict | None:
    """The meta.json of the replacement at ``directory`` if it is kept for a resume
    (:func:`worth_resuming`); None for anything else (a symlink, not a store, nothing to
    resume)."""
    if directory.is_symlink() or not directory.is_dir():
        return None
    try:
        meta = load_meta(directory)
    except StoreError:
        return None
    return meta if worth_resuming(meta) else None
