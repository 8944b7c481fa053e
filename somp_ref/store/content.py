"""A store file's content checked against the size and SHA-256 meta.json recorded when it
was written, the first time a store object reads it, so that a corrupted, swapped or
replaced file is an error naming it, never a silent result.

The check hashes the open file by streaming it; the caller then maps or reads that same
open file, so what is used is what was hashed even if the name is pointed at another file
meanwhile. A file that was hashed is known afterwards by its identity (device, inode, size,
modification and change times): reading it again costs one ``fstat`` while that holds, and
a file replaced since (another writer's overwrite, a copy over it) is hashed again.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from somp_ref.store.layout import StoreError

_CHUNK = 1 << 22


def sha256_of(handle: BinaryIO) -> str:
    """The SHA-256 of an open file's whole content (read from its start; the position is
    left at the start)."""
    digest = hashlib.sha256()
    handle.seek(0)
    for chunk in iter(lambda: handle.read(_CHUNK), b""):
        digest.update(chunk)
    handle.seek(0)
    return digest.hexdigest()


def _identity(status: os.stat_result) -> tuple[int, ...]:
    return (
        status.st_dev,
        status.st_ino,
        status.st_size,
        status.st_mtime_ns,
        status.st_ctime_ns,
    )


class ContentChecks:
    """The files one store object has checked, by name, with the identity each had then."""

    def __init__(self) -> None:
        self._checked: dict[str, tuple[int, ...]] = {}

    def check(
        self,
        handle: BinaryIO,
        path: Path,
        recorded: Mapping[str, Any],
        store_changed: Callable[[], bool],
    ) -> None:
        """Check the open file ``handle`` (the store file ``path``) against ``recorded``
        ({bytes, sha256}), unless it was checked before and has not changed since.

        Parameters
        ----------
        store_changed : callable
            Called on a mismatch: whether the store's meta.json no longer says what it said
            when the store was opened (the store was replaced, not just one file damaged).

        Raises
        ------
        StoreError
            Naming the file, when its content differs from the recorded one.
        """
        status = os.fstat(handle.fileno())
        identity = _identity(status)
        if self._checked.get(path.name) == identity:
            return
        if status.st_size != recorded["bytes"] or sha256_of(handle) != recorded["sha256"]:
            self._checked.pop(path.name, None)
            if store_changed():
                raise StoreError(
                    f"{path}: content differs from when it was written (sha256 mismatch): "
                    "the store changed since it was opened (replaced by another writer?); "
                    "open it again"
                )
            raise StoreError(
                f"{path}: content differs from when it was written (sha256 mismatch): "
                "the file is corrupt or was replaced"
            )
        self._checked[path.name] = identity

    def forget(self, name: str | None = None) -> None:
        """Check ``name`` (every file, if None) again the next time it is read."""
        if name is None:
            self._checked.clear()
        else:
            self._checked.pop(name, None)
