"""Files the command line writes and reads.

Every output is written to a hidden temporary file in the target's directory, flushed to
disk and renamed over the target, so a reader sees either the previous file or the new one,
never a torn mix; a failure (full disk, permissions, a crash mid-write) leaves the previous
file byte-identical and no temporary file behind. Outputs are checked before the work that
produces them starts, so a typo in ``--out`` fails in a second, not after an hour of
ranking. User text files (concept lists, prompts, rankings) are read with errors that name
the file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def check_output_file(path: str | os.PathLike) -> Path:
    """Raise OSError unless ``path`` can be written as a file: not a directory, inside an
    existing, writable directory.

    Returns
    -------
    Path
        ``path`` as a Path.

    Raises
    ------
    IsADirectoryError, FileNotFoundError, NotADirectoryError, PermissionError
        Naming ``path``; the check runs before any work, the write itself may still fail.
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory, expected a file name", str(path))
    _check_directory(target.parent, target)
    return target


def check_output_dir(path: str | os.PathLike) -> Path:
    """Raise OSError unless ``path`` is a directory or can be created as one.

    Raises
    ------
    NotADirectoryError, PermissionError
        When ``path`` or one of its ancestors is a file, or the nearest existing ancestor
        is not writable.
    """
    target = Path(path)
    if target.exists():
        if not target.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory", str(path))
        return target
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    _check_directory(ancestor, target)
    return target


def _check_directory(folder: Path, target: Path) -> None:
    where = str(folder) if str(folder) else "."
    if not folder.exists():
        raise FileNotFoundError(errno.ENOENT, f"directory {where} does not exist", str(target))
    if not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{where} is not a directory", str(target))
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, f"directory {where} is not writable", str(target))


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Write a file through ``write(handle)`` under a temporary name, then rename it over
    ``path``.

    Parameters
    ----------
    path : path
        The file to create or replace (never a directory).
    write : callable
        Called once with a binary file handle open for writing; whatever it raises
        propagates after the temporary file is removed, leaving ``path`` untouched.

    Returns
    -------
    Path
        ``path`` as a Path.

    Raises
    ------
    OSError
        From :func:`check_output_file`, or a write failure (``ENOSPC``, ``EFBIG``, ...)
        re-raised naming ``path`` instead of the temporary file.
    """
    target = check_output_file(path)
    # Same directory, so the rename is atomic; pid and random suffix, so concurrent
    # writers of one target never share a temporary file; hidden, so globs skip it.
    tmp = target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, target)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError) and err.errno and err.filename in (None, str(tmp)):
            # OSError(errno, ...) picks the subclass (PermissionError, ...) from errno.
            raise OSError(err.errno, err.strerror, str(target)) from err
        raise
    return target


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> Path:
    """:func:`write_atomically` of ``data``."""
    return write_atomically(path, lambda handle: handle.write(data))


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """:func:`write_atomically` of ``text`` as UTF-8, newlines written as they are."""
    return write_bytes_atomically(path, text.encode("utf-8"))


def read_user_text(path: str | os.PathLike, what: str) -> str:
    """The UTF-8 text of a file the user named (a leading byte-order mark is dropped).

    Parameters
    ----------
    path : path
    what : str
        What the file should be, for the messages ("concept list", "prompt file").

    Raises
    ------
    FileNotFoundError, IsADirectoryError
        Naming the file and what it should be.
    ValueError
        When the file is not UTF-8 text (a binary file, another encoding).
    """
    file = Path(path)
    if file.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"is a directory, expected a {what}", str(path))
    if not file.exists():
        raise FileNotFoundError(errno.ENOENT, f"{what} does not exist", str(path))
    try:
        return file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path}: not a UTF-8 text {what} (byte {err.start} is {err.object[err.start]:#04x})"
        ) from None
