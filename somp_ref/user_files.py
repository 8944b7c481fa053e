"""Files the user names for reading: concept lists, prompts, rankings.

They are read with errors that name the file, and only when they are regular files of
bounded size: a FIFO or a device would block or never end (:func:`read_user_text`). Both it
and the store's reader open files with :func:`open_checked`, which never blocks on opening
and checks the opened file itself.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from typing import BinaryIO

#: The most :func:`read_user_text` reads. The largest user file is a ranking JSON, about
#: 2 KB a head (50 atoms: support and increments, one value a line): 64 MiB holds 30,000
#: heads, twice the largest open models (126 layers x 128 heads); a concept list or a
#: prompt file is kilobytes to a few megabytes. Reading stops there, so ``/dev/zero`` or a
#: file that keeps growing cannot exhaust memory.
MAX_USER_FILE_BYTES = 64 << 20


def read_user_text(
    path: str | os.PathLike, what: str, *, max_bytes: int = MAX_USER_FILE_BYTES
) -> str:
    """The UTF-8 text of a file the user named (a leading byte-order mark is dropped).

    The file is opened without blocking (a FIFO with no writer would wait forever) and must
    be a regular file (a FIFO, a terminal or ``/dev/zero`` is refused before anything is
    read) of at most ``max_bytes``.

    Parameters
    ----------
    path : path
    what : str
        What the file should be, for the messages ("concept list", "prompt file").
    max_bytes : int, default=MAX_USER_FILE_BYTES
        A larger file is refused (see :data:`MAX_USER_FILE_BYTES`).

    Raises
    ------
    FileNotFoundError, IsADirectoryError
        Naming the file and what it should be.
    ValueError
        When the file is not a regular file, is larger than ``max_bytes``, or is not UTF-8
        text (a binary file, another encoding).
    """
    name = os.fspath(path)
    if not name:
        raise FileNotFoundError(errno.ENOENT, f"an empty file name, expected a {what}", name)

    def check(info: os.stat_result) -> None:
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(errno.EISDIR, f"is a directory, expected a {what}", name)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(
                f"{name}: not a regular file (a FIFO, device or socket), expected a {what}"
            )
        if info.st_size > max_bytes:
            raise ValueError(
                f"{name}: {info.st_size} bytes, more than the {max_bytes} a {what} may have"
            )

    try:
        opened = open_checked(name, check)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, f"{what} does not exist", name) from None
    except IsADirectoryError:
        raise IsADirectoryError(errno.EISDIR, f"is a directory, expected a {what}", name) from None
    with opened as handle:
        try:
            data = handle.read(max_bytes + 1)  # a file that grew meanwhile stops here
        except OSError as err:  # e.g. EIO from /proc/self/mem: name the file
            raise OSError(err.errno, err.strerror, name) from None
    if len(data) > max_bytes:
        raise ValueError(f"{name}: more than the {max_bytes} bytes a {what} may have")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{name}: not a UTF-8 text {what} (byte {err.start} is {err.object[err.start]:#04x})"
        ) from None


def open_checked(
    path: str | os.PathLike,
    check: Callable[[os.stat_result], None],
    *,
    follow_symlinks: bool = True,
) -> BinaryIO:
    """Open a file for reading in binary, once ``check`` has accepted what it is.

    The file is opened without blocking (``O_NONBLOCK``: a FIFO with no writer would wait
    forever, a regular file reads as usual), then ``check`` is given the opened file's
    ``os.fstat`` and raises to refuse it (a FIFO, a device, a file too large); the
    descriptor is closed then. Checking the opened file, not the name, leaves no gap in
    which the name could be swapped for something else.

    Parameters
    ----------
    path : path
    check : callable
        ``check(stat_result)``; raises to refuse the file.
    follow_symlinks : bool, default=True
        False refuses a symbolic link (``O_NOFOLLOW``): ``os.open`` raises OSError with
        errno ELOOP (EMLINK on some BSDs).

    Raises
    ------
    OSError
        When the file cannot be opened (missing, unreadable, a link not followed).
    Exception
        Whatever ``check`` raises.
    """
    flags = (
        os.O_RDONLY
        | getattr(os, "O_NONBLOCK", 0)
        | getattr(os, "O_CLOEXEC", 0)
        | getattr(os, "O_BINARY", 0)
        | (0 if follow_symlinks else getattr(os, "O_NOFOLLOW", 0))
    )
    fd = os.open(path, flags)
    try:
        check(os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")
