"""Where a store really is, for a writer: the one location its lock is taken on, whatever
path (symlinked parent, ``..``, relative) names it, and the hidden siblings an overwrite
of it makes, which are never a store to write.

Two writers of one store must meet on one lock, so the lock and the files are placed by the
real path of the store's parent directory plus the store's name. A symlink *to* a store is
refused rather than followed: following it would put the lock beside the link, where the
writer of the real store never looks.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

from somp_ref.store.layout import StoreError

# ``.NAME.new-PID-RANDOM`` (a replacement being built) and ``.NAME.old-PID-RANDOM`` (the
# store it replaces, moved aside, under its replacement's PID-RANDOM: the two copies of one
# swap are known as such): see somp_ref.store.replacing.
_HIDDEN_SIBLING = re.compile(r"\.(.+)\.(new|old)-([0-9]+-[0-9a-f]+)")


def real_location(path: str | os.PathLike) -> Path:
    """The real path of ``path``'s parent directory plus ``path``'s own name (which is not
    followed: it may be a symlink, or not exist yet); a path ending in ``..`` or naming the
    current directory is resolved whole.

    Raises
    ------
    StoreError
        For the root directory.
    """
    given = Path(path)
    if given.name in ("", ".."):  # "", ".", "/" or a path ending in ".."
        real = Path(os.path.realpath(given))
    else:
        real = Path(os.path.realpath(given.parent)) / given.name
    if not real.name:
        raise StoreError(f"{path}: a store cannot be the root directory")
    return real


def refuse_symlink(path: str | os.PathLike) -> None:
    """Raise StoreError when ``path`` itself is a symbolic link (to a store or anything)."""
    if Path(path).is_symlink():
        raise StoreError(
            f"{path} is a symbolic link: refusing to write a store through it "
            f"(write it at its real path, {os.path.realpath(path)})"
        )


def refuse_hidden_sibling(target: Path) -> None:
    """Raise StoreError when ``target``'s name is one an overwrite gives its hidden copies."""
    match = _HIDDEN_SIBLING.fullmatch(target.name)
    if match is None:
        return
    name, kind = match[1], match[2]
    what = (
        "the new store an overwrite of it is building"
        if kind == "new"
        else "the old store an overwrite of it moved aside"
    )
    raise StoreError(
        f"{target} is a hidden copy beside the store {name!r} ({what}), not a store to write: "
        f"refusing it. If no writer of {name!r} is running, it can be opened for reading, or "
        f"renamed to {name!r} to recover it"
    )


def sibling(target: Path, kind: str, like: Path | None = None) -> Path:
    """A hidden name beside ``target``: ``.NAME.KIND-PID-RANDOM`` (KIND: new, old), fresh,
    or with the PID-RANDOM of the hidden sibling ``like`` (the old store of a swap is named
    after the replacement that takes its place)."""
    token = f"{os.getpid()}-{secrets.token_hex(4)}" if like is None else sibling_parts(like)[1]
    return target.parent / f".{target.name}.{kind}-{token}"


def sibling_parts(path: Path) -> tuple[str, str]:
    """The KIND (new, old) and PID-RANDOM of the hidden sibling ``path``."""
    match = _HIDDEN_SIBLING.fullmatch(path.name)
    if match is None:
        raise ValueError(f"{path} is not a hidden sibling of a store")
    return match[2], match[3]


def siblings(target: Path, kind: str | None = None) -> list[Path]:
    """The hidden directories that overwrites of ``target`` build in (``kind="new"``) or
    move the old store to (``"old"``), both by default, sorted by name."""
    with os.scandir(target.parent) as entries:
        found = [
            target.parent / entry.name
            for entry in entries
            if (match := _HIDDEN_SIBLING.fullmatch(entry.name))
            and match[1] == target.name
            and kind in (None, match[2])
        ]
    return sorted(found)
