"""Files the command line writes.

Every output is written to a hidden temporary file in the target's directory, flushed to
disk and renamed over the target, so a reader sees either the previous file or the new one,
never a torn mix; a failure (full disk, permissions, a crash mid-write) leaves the previous
file byte-identical and no temporary file behind. A command with several outputs writes
them all before renaming any (:func:`write_all_atomically`), so a failure never leaves new
and old outputs side by side. Outputs are checked before the work that produces them
starts, so a typo in ``--out`` fails in a second, not after an hour of ranking; an output
that is a symbolic link is written to the file it points to (the link stays), and one that
exists as anything but a regular file (a device, a FIFO, ``/dev/stdout``) is refused.

The files a user names for reading are :mod:`somp_ref.user_files`' job.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO


def check_output_file(path: str | os.PathLike) -> Path:
    """Raise unless ``path`` can be written as a file: a non-empty name not ending with
    ``/``, not a directory nor an existing non-regular file (a device, a FIFO, a socket),
    inside an existing, writable directory (for a symbolic link, the directory of the
    file it points to).

    Returns
    -------
    Path
        ``path`` as a Path (:func:`output_target` gives the file a write replaces).

    Raises
    ------
    IsADirectoryError, FileNotFoundError, NotADirectoryError, PermissionError
        Naming ``path``; the check runs before any work, the write itself may still fail.
    ValueError
        An empty path, or an existing file that is not a regular file.
    """
    output_target(path)
    return Path(path)


def output_target(path: str | os.PathLike) -> Path:
    """The file that writing ``path`` replaces: ``path`` with its symbolic links resolved
    (absolute), after the checks of :func:`check_output_file`."""
    given = os.fspath(path)
    if not given:
        raise ValueError("an empty output path: expected a file name")
    if given.endswith(os.sep) or (os.altsep and given.endswith(os.altsep)):
        raise IsADirectoryError(errno.EISDIR, "ends with a '/', expected a file name", given)
    try:
        info = os.stat(given)  # follows symbolic links: the file a write would replace
    except FileNotFoundError:
        info = None
    except NotADirectoryError:
        info = None  # an ancestor is a file: _check_directory names it
    if info is not None and stat.S_ISDIR(info.st_mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory, expected a file name", given)
    if info is not None and not stat.S_ISREG(info.st_mode):
        raise ValueError(
            f"{given}: exists and is not a regular file (a device, FIFO or socket): "
            "refusing to replace it; name a file"
        )
    target = Path(os.path.realpath(given))
    # A link is written where it points; anything else where it is named (so the messages
    # name the directory the user wrote).
    _check_directory(target.parent if os.path.islink(given) else Path(given).parent, Path(given))
    return target


def check_distinct_outputs(outputs: Mapping[str, str | os.PathLike | None]) -> None:
    """ValueError if two of a command's outputs (flag -> path; None: not written) are the
    same file (after resolving symbolic links): the second write would replace the first.
    """
    seen: dict[Path, str] = {}
    for flag, path in outputs.items():
        if path is None:
            continue
        target = Path(os.path.realpath(path))
        if target in seen:
            raise ValueError(
                f"{seen[target]} and {flag} are the same file ({path}): give each its own"
            )
        seen[target] = flag


def check_outside(
    flag: str, path: str | os.PathLike | None, folder: str | os.PathLike, what: str
) -> None:
    """ValueError if the output ``path`` of ``flag`` is ``folder`` or lies inside it (after
    resolving symbolic links): writing it would change ``what`` ("the store STORE")."""
    if path is None:
        return
    target = Path(os.path.realpath(path))
    inside = Path(os.path.realpath(folder))
    if target == inside:
        raise ValueError(f"{flag} {path} is {what} itself: write it elsewhere")
    if inside in target.parents:
        raise ValueError(f"{flag} {path} is inside {what}: write it elsewhere")


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


#: What a directory's fsync may answer where directories cannot be synced (some file
#: systems, or a descriptor opened read-only on some systems): nothing to do then.
_CANNOT_SYNC_DIRECTORY = {errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EOPNOTSUPP}


def sync_directory(path: str | os.PathLike) -> None:
    """Flush a directory's entries to disk (fsync of the directory itself).

    A rename or a new file is durable only once its directory is: ``fsync`` of a file
    writes its data, not the name pointing at it, so after a power cut a replaced file may
    come back as the previous one, or a new store directory vanish. Nothing is done where
    directories cannot be opened (Windows) or synced (:data:`_CANNOT_SYNC_DIRECTORY`).

    Raises
    ------
    OSError
        Any other failure: ``path`` missing or not a directory (a caller's bug), or the
        disk's own error (EIO: the names may not be on disk).
    """
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in _CANNOT_SYNC_DIRECTORY:
            raise
    finally:
        os.close(fd)


def make_directories(path: str | os.PathLike) -> Path:
    """``Path(path).mkdir(parents=True, exist_ok=True)``, each directory it creates made
    durable (:func:`sync_directory` of its parent), so a store or an output written in it
    does not vanish with it after a power cut."""
    path = Path(path)
    missing = []
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        missing.append(ancestor)
        ancestor = ancestor.parent
    path.mkdir(parents=True, exist_ok=True)
    for directory in reversed(missing):
        sync_directory(directory.parent)
    return path


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
        ``path`` is a directory or its directory is missing or read-only, or a write
        failure (``ENOSPC``, ``EFBIG``, ...) re-raised naming ``path`` instead of the
        temporary file. (``path`` is replaced as named: a symbolic link is replaced, not
        followed; :func:`write_all_atomically` is the writer of user outputs, which follows
        it and refuses devices and FIFOs.)
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory, expected a file name", str(path))
    _check_directory(target.parent, target)
    # Same directory, so the rename is atomic; pid and random suffix, so concurrent
    # writers of one target never share a temporary file; hidden, so globs skip it.
    tmp = target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, target)
        sync_directory(target.parent)  # and the name is, before the caller goes on
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


def write_all_atomically(
    outputs: Sequence[tuple[str | os.PathLike, Callable[[Path], object]]],
) -> list[Path]:
    """Write several files so that a failure leaves every one of them as it was.

    Each ``write(temporary)`` creates the complete file at ``temporary``, a hidden path in
    its target's directory that ends with the target's suffix (writers that choose a format
    by extension, such as plots, see the right one); writers that are themselves atomic
    (:meth:`~somp_ref.head_scores.HeadScores.to_csv`) fit as they are. Only when every file
    has been written are they renamed over their targets, in order: a failure before that
    (a full disk, a crash) removes the temporary files and leaves every target untouched.
    The renames do not write data; they fail only if the directory changes meanwhile.

    Parameters
    ----------
    outputs : sequence of (path, write)
        The files (checked by :func:`check_output_file`: a symbolic link is written where it
        points, a device or FIFO is refused; no two may be the same file) and their writers.

    Returns
    -------
    list of Path
        The files written (symbolic links resolved).

    Raises
    ------
    OSError, ValueError
        From the checks, or a writer's failure, an OSError naming the target rather than
        its temporary file.
    """
    targets = [output_target(path) for path, _ in outputs]
    for number, target in enumerate(targets):
        if target in targets[:number]:
            first = outputs[targets.index(target)][0]
            raise ValueError(
                f"{os.fspath(first)} and {os.fspath(outputs[number][0])} are the same file: "
                "give each output its own"
            )
    temporaries: list[Path] = []
    try:
        for (given, write), target in zip(outputs, targets, strict=True):
            # The target's suffix and no other (a name without one must not get ".tmp" as
            # its suffix: a plot would be refused as a .tmp image).
            stem = target.stem.lstrip(".")
            tmp = target.with_name(
                f".{stem}-{os.getpid()}-{secrets.token_hex(4)}-tmp{target.suffix}"
            )
            temporaries.append(tmp)
            try:
                write(tmp)
            except OSError as err:
                if err.errno and err.filename in (None, str(tmp)):
                    raise OSError(err.errno, err.strerror, os.fspath(given)) from err
                raise
            except UnicodeEncodeError as err:
                raise ValueError(
                    f"{os.fspath(given)}: cannot be written as UTF-8 ({err.reason}: "
                    f"{err.object[err.start : err.end]!a})"
                ) from None
        for tmp, target in zip(temporaries, targets, strict=True):
            os.replace(tmp, target)
        for directory in dict.fromkeys(target.parent for target in targets):
            sync_directory(directory)
    except BaseException:
        for tmp in temporaries:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise
    return targets
