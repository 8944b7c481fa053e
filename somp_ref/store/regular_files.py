"""Opening a store's files for reading: regular files only, so a symlink is refused rather
than followed and a FIFO or device is refused rather than read (or waited on forever)."""

from __future__ import annotations

import errno
import stat
from pathlib import Path
from typing import BinaryIO

from somp_ref.store.content import sha256_of
from somp_ref.store.layout import StoreError
from somp_ref.user_files import open_checked


def require_regular(path: Path, mode: int) -> None:
    """Raise StoreError unless ``mode`` (an ``st_mode``) is a regular file's."""
    if stat.S_ISLNK(mode):
        raise StoreError(f"{path}: a symbolic link; a store holds regular files only")
    if not stat.S_ISREG(mode):
        raise StoreError(f"{path}: not a regular file; a store holds regular files only")


def open_regular(path: Path) -> BinaryIO:
    """Open a store file for reading; a symlink, device or FIFO is refused (without a hang).

    Raises
    ------
    StoreError
        For a file that is not a regular file.
    OSError
        For a missing or unreadable one.
    """
    try:
        return open_checked(
            path, lambda info: require_regular(path, info.st_mode), follow_symlinks=False
        )
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.EMLINK):  # O_NOFOLLOW met a symlink
            require_regular(path, stat.S_IFLNK)
        raise


def sha256(path: Path) -> str:
    """The SHA-256 of a store file's content, as 64 lowercase hex digits."""
    with open_regular(path) as handle:
        return sha256_of(handle)
