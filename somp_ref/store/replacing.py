"""Where a new store is written, and how it replaces an old one without losing either.

A new store is written in place when its path is free or an empty directory. Over an
existing store (``overwrite=True``, allowed only for a store holding nothing but its own
files) it is built in a hidden sibling ``PARENT/.NAME.new-*`` and swapped in once complete:
the old store is renamed to ``PARENT/.NAME.old-*``, the new one renamed into place, and
only then are the old store's own files unlinked (never through a symlink, never
recursively); anything else found in it is kept, with a warning. A writer killed at any
point leaves a complete store at the path or, between the two renames, both beside it.

What a killed overwrite leaves beside the path is deleted by the next overwrite of it only
where it is provably not the only copy of a store (:func:`only_copies`): a replacement never
swapped in (the store it was to replace is still at the path), an old store whose
replacement is in its place (the old one is named ``.NAME.old-PID-RANDOM`` after its
replacement's ``.NAME.new-PID-RANDOM``, so a lone old one was swapped out), and anything
that is not a complete store. A complete store beside the path that is none of those (both
halves of a swap stopped between its renames, or one left beside a missing path) makes
creating the store refused, and opening a missing one says how to recover it.

A replacement made resumable (``create(..., overwrite=True, resumable=True)``, as export
does) that stops once it holds rows is kept beside the old store (:func:`kept_replacement`),
with the SHA-256 of the old store's meta.json: ``ActivationStore.resume`` of the path
continues it, if the store there is still that one, and swaps it in when done; the next
overwrite of the path deletes it, with a warning.
"""

from __future__ import annotations

import os
import re
import stat
import warnings
from pathlib import Path

from somp_ref.files import sync_directory
from somp_ref.store.layout import META_FILE, REPLACING, StoreError, is_part_name
from somp_ref.store.locations import sibling, sibling_parts, siblings
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


def _holds_complete_store(directory: Path) -> bool:
    """Whether ``directory`` (not a symlink) holds a complete store: its meta.json valid and
    saying so, every file it lists there at its recorded size (only meta.json is read)."""
    if directory.is_symlink() or not directory.is_dir():
        return False
    try:
        meta = load_meta(directory)
    except StoreError:
        return False
    if not meta["complete"]:
        return False
    for name, info in meta["files"].items():
        try:
            status = os.lstat(directory / name)
        except OSError:
            return False
        if not stat.S_ISREG(status.st_mode) or status.st_size != info["bytes"]:
            return False
    return True


def only_copies(target: Path, *, target_is_store: bool) -> list[tuple[list[Path], str]]:
    """The complete stores beside ``target`` that may be the only copy of a store: what no
    overwrite may delete. Each item is the hidden copies of one overwrite, with what they
    hold, in words.

    A hidden copy is provably *not* the only copy, and left out, when it is a replacement
    whose swap never began (no old store under its PID-RANDOM: the store it was to replace
    is still at the path, or the path was emptied by hand), while ``target`` exists; or an
    old store whose replacement is gone from beside it (renamed into place: the swap
    finished), while ``target_is_store`` (a complete store is at the path). Copies that are
    not complete stores are left out too (an unfinished replacement, an old store partly
    deleted).

    Parameters
    ----------
    target_is_store : bool
        Whether ``target`` holds a complete store.
    """
    if not target.parent.is_dir():
        return []
    swaps: dict[str, dict[str, Path]] = {}
    for path in siblings(target):
        kind, token = sibling_parts(path)
        swaps.setdefault(token, {})[kind] = path
    target_exists = target.exists() or target.is_symlink()
    found = []
    for token in sorted(swaps):
        old, new = swaps[token].get("old"), swaps[token].get("new")
        old_complete = old is not None and _holds_complete_store(old)
        new_complete = new is not None and _holds_complete_store(new)
        if old_complete and new is not None:  # the swap stopped between its two renames
            found.append(
                (
                    [old, new],
                    f"{old.name} holds the store that was there and {new.name} the store "
                    "replacing it (an overwrite stopped between the two renames of its swap)",
                )
            )
        elif old_complete and not target_is_store:
            found.append(([old], f"{old.name} holds the store that was there, moved aside"))
        elif new_complete and (old is not None or not target_exists):
            found.append(
                ([new], f"{new.name} holds a complete store built to replace the one there")
            )
    return found


def _listed(copies: list[tuple[list[Path], str]]) -> str:
    return "; ".join(what for _, what in copies)


def recovery_hint(target: Path) -> str:
    """For a store directory ``target`` that is missing: what an interrupted overwrite left
    beside it and how to recover it (``""`` when nothing)."""
    copies = only_copies(target, target_is_store=False)
    if not copies:
        return ""
    return (
        f"; an overwrite of it was interrupted: {_listed(copies)}. Rename the one to keep to "
        f"{target.name!r} to recover it (and delete the other, if any)"
    )


def _refuse_only_copies(target: Path, target_is_store: bool) -> None:
    """Raise StoreError when a complete store beside ``target`` may be its only copy."""
    copies = only_copies(target, target_is_store=target_is_store)
    if not copies:
        return
    if target.exists() or target.is_symlink():
        raise StoreError(
            f"refusing to write {target}: an interrupted overwrite left beside it what may "
            f"be the only copy of a store: {_listed(copies)}. Move what you want to keep out "
            f"of the way (to {target.name!r}, in place of what is there, or elsewhere) and "
            "delete the rest, then write it again"
        )
    raise StoreError(f"refusing to write {target}: it is missing{recovery_hint(target)}")


def _remove_stale_siblings(target: Path, target_is_store: bool) -> None:
    """Delete what killed overwrites of ``target`` left beside it, except what may be the
    only copy of a store (:func:`only_copies`; :func:`_refuse_only_copies` refused those
    already); keep, with a warning, what does not look like one of our store directories."""
    kept = {p for paths, _ in only_copies(target, target_is_store=target_is_store) for p in paths}
    for stale in siblings(target):
        if stale in kept:
            warnings.warn(f"left {stale} alone: it may be the only copy of a store", stacklevel=3)
            continue
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


def check_claim(target: Path, overwrite: bool) -> None:
    """Raise what :func:`claim` would raise for ``target``, touching nothing: the dry run a
    command makes before hours of work (``export`` checks its ``--out`` before the model
    loads)."""
    _checked_claim(target, overwrite)


def _checked_claim(target: Path, overwrite: bool) -> tuple[int | None, bool]:
    """:func:`claim`'s checks; returns the layer count of the store ``target`` holds (None:
    missing or empty) and whether it is a complete store."""
    if target.is_symlink():
        raise StoreError(f"{target} is a symbolic link: refusing to write a store through it")
    if not target.exists():
        _refuse_only_copies(target, target_is_store=False)
        return None, False
    if not overwrite:
        raise StoreError(f"{target} already exists (pass overwrite=True to replace it)")
    if not target.is_dir():
        raise StoreError(f"{target} exists and is not a directory: refusing to overwrite it")
    replaces = _check_replaceable(target)
    target_is_store = replaces is not None and _holds_complete_store(target)
    _refuse_only_copies(target, target_is_store)
    return replaces, target_is_store


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
        When ``target`` is a symlink, exists without ``overwrite``, or may not be replaced
        (:func:`check_claim`).
    """
    replaces, target_is_store = _checked_claim(target, overwrite)
    if not target.exists():
        orphans = siblings(target)
        if orphans:
            warnings.warn(
                f"{target} is missing but an interrupted overwrite left "
                f"{', '.join(p.name for p in orphans)} beside it, none a complete store (an "
                f"unfinished replacement renamed to {target.name!r} can be resumed); the next "
                f"overwrite of {target.name!r} deletes them",
                stacklevel=3,
            )
        target.mkdir()
        sync_directory(target.parent)  # the new store's name survives a power cut
        return target, None
    _remove_stale_siblings(target, target_is_store)
    if replaces is None:
        return target, None
    directory = sibling(target, "new")
    directory.mkdir()
    return directory, replaces


def swap_in(built: Path, target: Path, replaces: int) -> None:
    """Put the finished store ``built`` beside ``target`` in the place of the store there
    (of ``replaces`` layers): move the old store to a hidden sibling, move the new one in,
    then delete the old."""
    old = sibling(target, "old", like=built)  # known as this swap's: see only_copies
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
