"""One writer per store: the exclusive lock a writer holds on ``PARENT/.NAME.lock``."""

from __future__ import annotations

import os
import weakref
from pathlib import Path

from somp_ref.store.layout import StoreError

try:
    import fcntl
except ImportError:  # Windows: the lock falls back to O_CREAT | O_EXCL
    fcntl = None


def _lock_fd(path: Path) -> int | None:
    """Open ``path`` and lock it exclusively; None when another writer holds it."""
    if fcntl is None:  # no advisory locks: the lock is the file's existence
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return None
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _unlock(fd: int, path: Path) -> None:
    os.close(fd)  # releases a flock
    if fcntl is None:
        path.unlink(missing_ok=True)


class WriterLock:
    """The one-writer lock of the store at ``target``: ``PARENT/.NAME.lock``, held until
    :meth:`release` or until this object is collected.

    ``fcntl.flock`` is dropped by the kernel when the process dies, so a killed writer leaves
    no stale lock. The lock file is kept: unlinking it would let a third writer lock a new
    file while the second still holds the old one. Without fcntl (Windows) the lock is the
    file itself (O_CREAT | O_EXCL), removed on release.

    Raises
    ------
    StoreError
        When another writer holds the lock, or the lock file cannot be opened.
    """

    def __init__(self, target: Path):
        self.path = target.parent / f".{target.name}.lock"
        try:
            fd = _lock_fd(self.path)
        except OSError as err:
            raise StoreError(f"{target}: cannot take the writer lock {self.path} ({err})") from err
        if fd is None:
            stale = "" if fcntl else "; if no writer is running, delete the lock file"
            raise StoreError(
                f"{target} is being written by another writer (lock {self.path}){stale}"
            )
        self.release = weakref.finalize(self, _unlock, fd, self.path)
