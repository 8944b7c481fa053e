"""The on-disk activation store: what each head wrote, layer by layer, in safetensors.

A store is a directory::

    meta.json                 format version, model, shapes, positions rule, dtype, state
    layer_000.safetensors     z (n_samples, n_heads, d_head) = hook_z at the kept positions,
    ...                       o_proj (d_model, n_heads * d_head), optional o_bias (d_model,)
    unembed.safetensors       unembed (vocab, d_model), optional final_norm (d_model,);
                              the vocabulary strings in the file's metadata
    samples.jsonl             one JSON record (prompt, label, split, ...) per sample row

The store never loses or invents data:

* Every file is written under a temporary name and renamed into place, so a file either is
  complete or is absent. ``meta.json`` says ``"complete": false`` until :meth:`close` has
  seen every part; :meth:`ActivationStore.open` refuses an incomplete store, a file whose
  size differs from the one recorded, and an unknown format version, naming the file.
* One writer per store: :meth:`~ActivationStore.create` and :meth:`~ActivationStore.resume`
  take an exclusive lock on ``PARENT/.NAME.lock`` (a second writer fails at once).
* ``overwrite=True`` replaces only a directory that is a store holding nothing but its own
  files. The new store is built in a hidden sibling ``PARENT/.NAME.new-*`` and swapped in by
  :meth:`~ActivationStore.close`, so an error or a killed process leaves the old store as it
  was; the old store's own files are then unlinked (never through a symlink, never
  recursively) and anything else found in it is kept, with a warning.
* ``meta.json`` is checked against a schema (types, bounds, file names, sizes) before use,
  and a safetensors header (dtypes, shapes, contiguous in-bounds offsets) before its tensors
  are mapped; every file must be a regular file (no symlink, device or FIFO).
* Non-finite values are refused at write time, naming the first one's place.

Tensors are read memory-mapped, one layer at a time; opening a store never runs code
(safetensors holds no pickles).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import secrets
import stat
import struct
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
from safetensors.numpy import save_file

from somp_ref.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: the lock falls back to O_CREAT | O_EXCL
    fcntl = None

FORMAT = "somp_ref.activation_store"
FORMAT_VERSION = 1
META_FILE = "meta.json"
UNEMBED_FILE = "unembed.safetensors"
SAMPLES_FILE = "samples.jsonl"
STORE_DTYPES = ("float16", "float32", "float64")

# Bounds on meta.json's shapes. They are far above any released model (the largest have
# ~128 layers, ~128 query heads, d_head <= 256 and d_model ~ 25k) and small enough that the
# per-layer loops (listing and stat-ing the files) stay cheap whatever meta.json claims.
_SHAPE_BOUNDS = {"n_layers": 4096, "n_heads": 4096, "d_head": 1 << 16, "d_model": 1 << 20}
_MAX_SAMPLES = 1 << 40  # a trillion rows: beyond any export, far inside int64 byte counts
_MAX_FILE_BYTES = (1 << 63) - 1  # off_t's range
_MAX_META_BYTES = 64 << 20  # a 4096-layer meta.json is ~0.5 MiB, plus the caller's facts
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own bound on the JSON header
_MAX_NDIM = 8  # store tensors have at most 3 axes
_REQUIRED_KEYS = (
    "n_layers",
    "n_heads",
    "d_head",
    "d_model",
    "dtype",
    "n_samples",
    "complete",
    "files",
)

_SAFETENSORS_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64}
# Layer indexes are below _SHAPE_BOUNDS["n_layers"] = 4096: 3 or 4 digits.
_LAYER_NAME = re.compile(r"layer_([0-9]{3,4})\.safetensors")
_TEMP_NAME = re.compile(r"\.(.+)\.tmp-[0-9]+")  # _write_atomically's temporary files
_SHA256 = re.compile(r"[0-9a-f]{64}")
_READ_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NOFOLLOW", 0)  # a symlinked store file is refused, not followed
    | getattr(os, "O_NONBLOCK", 0)  # opening a FIFO returns at once (then it is refused)
    | getattr(os, "O_BINARY", 0)
)


class StoreError(UserError):
    """A store that is missing, partial, corrupt, of another version, or misused."""


def layer_file(layer: int) -> str:
    """File name of one layer's tensors."""
    return f"layer_{layer:03d}.safetensors"


# ---------------------------------------------------------------------- small checks


def _is_int(value: Any) -> bool:
    """An int that is not a bool (JSON ``true`` must not pass for 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None


def _short(value: Any) -> str:
    """``repr(value)``, cut short: an absurd meta.json must not make an absurd message."""
    if _is_int(value) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


# Optional meta.json facts that other modules read: checked when present; other keys pass.
_STRING_FACTS = ("model_id", "family", "positions", "hook", "contribution", "model_dtype", "inputs")
_OPTIONAL_KEYS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    **{key: ("a string", lambda v: isinstance(v, str)) for key in _STRING_FACTS},
    "chat_template": ("true or false", lambda v: isinstance(v, bool)),
    "final_logit_softcapping": (
        "a number or null",
        lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)),
    ),
    "prompts_hash": ("64 lowercase hex digits", _is_sha256),
    "n_sample_records": (
        f"an integer in [0, {_MAX_SAMPLES}]",
        lambda v: _is_int(v) and 0 <= v <= _MAX_SAMPLES,
    ),
}


def _is_part_name(name: str, n_layers: int | None) -> bool:
    """Whether ``name`` is a part of a store of ``n_layers`` layers (any count if None).

    Checked by pattern and range, so an absurd ``n_layers`` costs nothing.
    """
    if name in (UNEMBED_FILE, SAMPLES_FILE):
        return True
    match = _LAYER_NAME.fullmatch(name)
    if match is None or layer_file(int(match[1])) != name:  # one spelling per layer
        return False
    return n_layers is None or int(match[1]) < n_layers


def _is_own_entry(entry: os.DirEntry, n_layers: int | None) -> bool:
    """Whether a directory entry is one a store of ``n_layers`` layers writes: meta.json, a
    part, or a temporary file of either; never a directory."""
    if entry.is_dir(follow_symlinks=False):
        return False
    if entry.name == META_FILE or _is_part_name(entry.name, n_layers):
        return True
    match = _TEMP_NAME.fullmatch(entry.name)
    return match is not None and (match[1] == META_FILE or _is_part_name(match[1], n_layers))


def _first_foreign(directory: Path, n_layers: int | None) -> str | None:
    """Name of the first entry (by name) of ``directory`` that is not a store's own, or None."""
    with os.scandir(directory) as entries:
        names = sorted(e.name for e in entries if not _is_own_entry(e, n_layers))
    return names[0] if names else None


# ---------------------------------------------------------------------- meta.json schema


def _check_int(meta: Mapping[str, Any], key: str, low: int, high: int) -> None:
    value = meta[key]
    if not _is_int(value) or not low <= value <= high:
        raise ValueError(f"{key} must be an integer in [{low}, {high}], got {_short(value)}")


def _min_part_bytes(meta: Mapping[str, Any], name: str) -> int:
    """The fewest bytes part ``name`` can hold given meta's shapes (Python ints: exact)."""
    if name == SAMPLES_FILE:
        return 0
    if name == UNEMBED_FILE:
        return 8 + 4 * meta["d_model"]  # header length, then at least one float32 row
    if meta["n_samples"] is None:
        raise ValueError(f"{name} is listed but n_samples is null")
    per_head = meta["n_heads"] * meta["d_head"]
    z = meta["n_samples"] * per_head * np.dtype(meta["dtype"]).itemsize
    return 8 + z + meta["d_model"] * per_head * 4  # o_proj is float32 or wider


def _validate_files(meta: Mapping[str, Any]) -> None:
    """``files`` maps part names of this store to {bytes, sha256}, sizes fitting the shapes."""
    files, n_layers = meta["files"], meta["n_layers"]
    if not isinstance(files, dict):
        raise ValueError(f"files must be an object, got {_short(files)}")
    for name, info in files.items():
        if not _is_part_name(name, n_layers):
            raise ValueError(f"files lists {_short(name)}, not a part of a {n_layers}-layer store")
        if not isinstance(info, dict) or set(info) != {"bytes", "sha256"}:
            raise ValueError(f"files[{name!r}] must be {{bytes, sha256}}, got {_short(info)}")
        _check_int(info, "bytes", 0, _MAX_FILE_BYTES)
        if not _is_sha256(info["sha256"]):
            raise ValueError(f"files[{name!r}].sha256 must be 64 lowercase hex digits")
        need = _min_part_bytes(meta, name)
        if info["bytes"] < need:
            raise ValueError(f"{name} has {info['bytes']} bytes, its shapes need at least {need}")
    if meta["complete"] and len(files) != n_layers + 2:
        raise ValueError(f"a complete store lists {n_layers + 2} files, this one {len(files)}")


def _validate_meta(meta: Mapping[str, Any]) -> None:
    """Check a store record against the schema (format and version are checked by the caller).

    Raises
    ------
    ValueError
        Naming the first key that is missing, of the wrong type or out of bounds.
    """
    absent = [key for key in _REQUIRED_KEYS if key not in meta]
    if absent:
        raise ValueError(f"missing keys {absent}")
    for key, high in _SHAPE_BOUNDS.items():
        _check_int(meta, key, 1, high)
    if not isinstance(meta["dtype"], str) or meta["dtype"] not in STORE_DTYPES:
        raise ValueError(f"dtype must be one of {STORE_DTYPES}, got {_short(meta['dtype'])}")
    if meta["n_samples"] is not None:
        _check_int(meta, "n_samples", 1, _MAX_SAMPLES)
    if not isinstance(meta["complete"], bool):
        raise ValueError(f"complete must be true or false, got {_short(meta['complete'])}")
    for key, (kind, is_valid) in _OPTIONAL_KEYS.items():
        if key in meta and not is_valid(meta[key]):
            raise ValueError(f"{key} must be {kind}, got {_short(meta[key])}")
    _validate_files(meta)


def _load_meta(path: Path) -> dict[str, Any]:
    """Read and validate ``path/meta.json`` (at most _MAX_META_BYTES are read)."""
    meta_path = path / META_FILE
    if not path.is_dir():
        raise StoreError(f"{path}: no such store directory")
    try:
        with _open_regular(meta_path) as handle:
            raw = handle.read(_MAX_META_BYTES + 1)
    except FileNotFoundError:
        raise StoreError(f"{meta_path}: missing; {path} is not an activation store") from None
    except OSError as err:
        raise StoreError(f"{meta_path}: unreadable ({err})") from err
    if len(raw) > _MAX_META_BYTES:
        raise StoreError(f"{meta_path}: over {_MAX_META_BYTES} bytes, not a store's meta file")
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as err:  # RecursionError: absurdly nested JSON
        raise StoreError(f"{meta_path}: unreadable ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StoreError(f"{meta_path}: not a {FORMAT} meta file")
    version = meta.get("format_version")
    if not _is_int(version) or version != FORMAT_VERSION:
        raise StoreError(
            f"{meta_path}: format version {_short(version)}, this somp_ref "
            f"reads version {FORMAT_VERSION}"
        )
    try:
        _validate_meta(meta)
    except ValueError as err:
        raise StoreError(f"{meta_path}: corrupt, {err}") from None
    return meta


# ---------------------------------------------------------------------- files


def _require_regular(path: Path, mode: int) -> None:
    if stat.S_ISLNK(mode):
        raise StoreError(f"{path}: a symbolic link; a store holds regular files only")
    if not stat.S_ISREG(mode):
        raise StoreError(f"{path}: not a regular file; a store holds regular files only")


def _open_regular(path: Path) -> BinaryIO:
    """Open a store file for reading; a symlink, device or FIFO is refused (without a hang).

    Raises
    ------
    StoreError
        For a file that is not a regular file.
    OSError
        For a missing or unreadable one.
    """
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.EMLINK):  # O_NOFOLLOW met a symlink
            _require_regular(path, stat.S_IFLNK)
        raise
    try:
        _require_regular(path, os.fstat(fd).st_mode)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)``, then rename over ``path`` (same directory, so atomic)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_text(path: Path, text: str) -> None:
    _write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with _open_regular(path) as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------- safetensors


class _Tensor(NamedTuple):
    """One validated header entry: data bytes ``[start, end)`` after the header."""

    dtype: np.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def _read_header(handle: BinaryIO, path: Path, size: int) -> tuple[dict[str, Any], int]:
    """Parse a safetensors header of a ``size``-byte file; return it and where data starts."""
    raw = handle.read(8)
    if len(raw) != 8:
        raise StoreError(f"{path}: truncated safetensors file (no header length)")
    (length,) = struct.unpack("<Q", raw)
    if length > min(_MAX_HEADER, size - 8):
        raise StoreError(f"{path}: corrupt safetensors header (length {length}, file {size} B)")
    try:
        header = json.loads(handle.read(length).decode("utf-8"))
    except (ValueError, RecursionError) as err:
        raise StoreError(f"{path}: corrupt safetensors header ({err})") from err
    if not isinstance(header, dict):
        raise StoreError(f"{path}: corrupt safetensors header (not a JSON object)")
    return header, 8 + length


def _header_metadata(header: dict[str, Any], path: Path) -> dict[str, str]:
    """Remove and return the header's ``__metadata__`` (strings to strings)."""
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise StoreError(f"{path}: corrupt safetensors header (__metadata__ is not all strings)")
    return metadata


def _tensor_entry(name: str, info: Any, path: Path) -> _Tensor:
    """Validate one header entry: known dtype, shape of positive ints, byte count that fits.

    Zero-size tensors are refused: the store never writes one (``write_*`` refuse them).
    """
    where = f"{path}: tensor {_short(name)}"
    if not isinstance(info, dict):
        raise StoreError(f"{where}: entry is not an object")
    dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype_name, str) or dtype_name not in _SAFETENSORS_DTYPES:
        raise StoreError(f"{where}: unsupported dtype {_short(dtype_name)}")
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_NDIM
        or not all(_is_int(n) and n >= 1 for n in shape)
    ):
        raise StoreError(f"{where}: invalid shape {_short(shape)}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(x) for x in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise StoreError(f"{where}: invalid data_offsets {_short(offsets)}")
    dtype = np.dtype(_SAFETENSORS_DTYPES[dtype_name])
    start, end = offsets
    need = dtype.itemsize * math.prod(shape)  # Python ints: no overflow
    if end - start != need:
        raise StoreError(f"{where}: {end - start} bytes, its dtype and shape need {need}")
    return _Tensor(dtype, tuple(shape), start, end)


def _check_layout(tensors: Mapping[str, _Tensor], data_size: int, path: Path) -> None:
    """The tensors tile the data exactly: contiguous from 0, no overlap, nothing after."""
    covered = 0
    for name, tensor in sorted(tensors.items(), key=lambda item: item[1][2:]):
        if tensor.start != covered:
            how = "overlaps the tensor before it" if tensor.start < covered else "leaves a gap"
            raise StoreError(
                f"{path}: tensor {_short(name)} starts at data byte {tensor.start}, "
                f"not {covered}: it {how}"
            )
        covered = tensor.end
    if covered != data_size:
        how = "past the end of the file" if covered > data_size else "with trailing bytes"
        raise StoreError(f"{path}: tensors cover {covered} of {data_size} data bytes ({how})")


def _map_tensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Memory-map every tensor of a safetensors file read-only, once its header is validated;
    also return its metadata."""
    try:
        with _open_regular(path) as handle:
            size = os.fstat(handle.fileno()).st_size
            header, offset = _read_header(handle, path, size)
            metadata = _header_metadata(header, path)
            entries = {name: _tensor_entry(name, info, path) for name, info in header.items()}
            _check_layout(entries, size - offset, path)
            tensors = {
                name: np.memmap(
                    handle, dtype=t.dtype, mode="r", offset=offset + t.start, shape=t.shape
                )
                for name, t in entries.items()
            }
    except OSError as err:
        raise StoreError(f"{path}: unreadable safetensors file ({err})") from err
    return tensors, metadata


# ---------------------------------------------------------------------- writing checks


def _first_non_finite(
    converted: np.ndarray, original: np.ndarray
) -> tuple[tuple[int, ...], str] | None:
    """Index and description of the first non-finite value of ``converted`` (None when all
    are finite); a value that only overflowed when converted from ``original`` says so."""
    finite = np.isfinite(converted)
    if finite.all():
        return None
    index = tuple(int(i) for i in np.unravel_index(int(np.argmin(finite)), finite.shape))
    found = f"{converted[index]}"
    source = np.float64(original[index])
    if np.isfinite(source):
        found += f" after conversion to {converted.dtype} from {float(source)!r}"
    return index, found


def _checked(
    value: Any,
    name: str,
    shape: tuple[int | None, ...],
    dtype: str,
    axes: tuple[str | None, ...],
) -> np.ndarray:
    """``value`` as a C-contiguous ``dtype`` array of ``shape`` (None: any length), finite
    after the conversion.

    Parameters
    ----------
    name : str
        How messages name the array (e.g. ``"layer 3: z"``).
    axes : tuple of str or None, one per axis
        How messages name an index along each axis (None: not named).

    Raises
    ------
    TypeError
        For non-real values.
    ValueError
        For a wrong or empty shape, or a non-finite value (naming the first one's place).
    """
    array = np.asarray(value)
    if array.dtype.kind not in "fiu" and not array.dtype.name.startswith("bfloat16"):
        raise TypeError(f"{name} must be a real numeric array, got dtype {array.dtype}")
    if array.ndim != len(shape) or any(
        want is not None and got != want for got, want in zip(array.shape, shape, strict=True)
    ):
        want = ", ".join("n" if s is None else str(s) for s in shape)
        want = f"({want},)" if len(shape) == 1 else f"({want})"
        raise ValueError(f"{name} must have shape {want}, got {array.shape}")
    if 0 in array.shape:
        raise ValueError(f"{name} must not be empty, got shape {array.shape}")
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below
        converted = np.ascontiguousarray(array, dtype=dtype)
    bad = _first_non_finite(converted, array)
    if bad is not None:
        index, found = bad
        place = ", ".join(f"{axis} {i}" for axis, i in zip(axes, index, strict=True) if axis)
        raise ValueError(f"{name} is not finite at {place} ({found})")
    return converted


# ---------------------------------------------------------------------- one writer


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


class _WriterLock:
    """The one-writer lock of the store at ``target``: ``PARENT/.NAME.lock``, held until
    :meth:`release` or until this object is collected.

    ``fcntl.flock`` is dropped by the kernel when the process dies, so a killed writer leaves
    no stale lock. The lock file is kept: unlinking it would let a third writer lock a new
    file while the second still holds the old one. Without fcntl (Windows) the lock is the
    file itself (O_CREAT | O_EXCL), removed on release.
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


# ---------------------------------------------------------------------- replacing a store


def _sibling(target: Path, kind: str) -> Path:
    """A fresh hidden name beside ``target``: ``.NAME.KIND-PID-RANDOM``."""
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _siblings(target: Path) -> list[Path]:
    """Hidden directories that overwrites of ``target`` build in or move the old store to."""
    pattern = re.compile(re.escape(f".{target.name}.") + r"(?:new|old)-[0-9]+-[0-9a-f]+")
    with os.scandir(target.parent) as entries:
        return sorted(target.parent / e.name for e in entries if pattern.fullmatch(e.name))


def _remove_store_dir(directory: Path, n_layers: int | None) -> None:
    """Delete a store directory this module made: unlink its own entries (never following a
    symlink, never recursing; meta.json last, so a half-deleted store still says what it
    is), then rmdir. Anything else stays, and so does the directory, with a warning."""
    if directory.is_symlink() or not directory.is_dir():
        warnings.warn(f"left {directory} alone: not a directory", stacklevel=3)
        return
    with os.scandir(directory) as entries:
        own = [Path(e.path) for e in entries if _is_own_entry(e, n_layers)]
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
    for sibling in _siblings(target):
        if sibling.is_symlink() or not sibling.is_dir() or _first_foreign(sibling, None):
            warnings.warn(f"left {sibling} alone: it is not a store directory", stacklevel=3)
        else:
            _remove_store_dir(sibling, None)


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
        n_layers = _load_meta(target)["n_layers"]
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


def _claim(target: Path, overwrite: bool) -> tuple[Path, int | None]:
    """Make the directory a new store at ``target`` is written in (the lock is held).

    Returns
    -------
    directory : Path
        ``target`` itself when it did not exist or was empty, else a hidden sibling that
        :meth:`ActivationStore.close` swaps in.
    replaces : int or None
        The layer count of the store being replaced; None when there is none.
    """
    if target.is_symlink():
        raise StoreError(f"{target} is a symbolic link: refusing to write a store through it")
    if not target.exists():
        orphans = _siblings(target)
        if orphans:
            warnings.warn(
                f"{target} is missing but an interrupted overwrite left {orphans}: one of them "
                f"holds the store; rename it to {target.name} to recover it",
                stacklevel=3,
            )
        target.mkdir()
        return target, None
    if not overwrite:
        raise StoreError(f"{target} already exists (pass overwrite=True to replace it)")
    if not target.is_dir():
        raise StoreError(f"{target} exists and is not a directory: refusing to overwrite it")
    replaces = _check_replaceable(target)
    _remove_stale_siblings(target)
    if replaces is None:
        return target, None
    directory = _sibling(target, "new")
    directory.mkdir()
    return directory, replaces


def _prompts_hash(records: Sequence[Mapping[str, Any]]) -> str:
    prompts = json.dumps([record.get("prompt") for record in records], ensure_ascii=False)
    return hashlib.sha256(prompts.encode("utf-8")).hexdigest()


class ActivationStore:
    """An activation store directory, opened for writing or for reading.

    Use :meth:`create` (new store), :meth:`resume` (finish an interrupted one) or
    :meth:`open` (read a complete one); do not call the constructor directly.

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

    def __init__(
        self,
        path: Path,
        meta: dict[str, Any],
        *,
        lock: _WriterLock | None = None,
        directory: Path | None = None,
        replaces: int | None = None,
    ):
        self.path = path
        self._meta = meta
        self._lock = lock  # held while writable
        self._writable = lock is not None
        self._dir = path if directory is None else directory  # where the files are
        self._replaces = replaces  # layer count of the store that close() replaces

    # ------------------------------------------------------------------ constructors

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
    ) -> ActivationStore:
        """Start a new store at ``path`` (a directory that must not exist, unless
        ``overwrite``).

        Parameters
        ----------
        n_layers, n_heads, d_head, d_model : int
            The model's shapes; heads are query heads. At most 4096, 4096, 65536 and 2**20.
        meta : mapping, optional
            Extra JSON-serialisable facts (model id, family, positions rule, ...).
        dtype : {"float16", "float32", "float64"}, default="float32"
            How ``z`` is stored (bfloat16 activations are widened to float32 by the caller:
            numpy has no bfloat16). Weights are stored in float32 or wider.
        overwrite : bool, default=False
            Replace an existing store (or use an empty directory). Refused for a directory
            that is not a store or holds files that are not its own, and for a symlink. The
            new store is built beside the old one and swapped in by :meth:`close`; until
            then, and after an error, the old store stays as it was.

        Raises
        ------
        ValueError
            For shapes, dtype or ``meta`` facts out of the schema.
        StoreError
            When ``path`` exists (and may not be replaced) or another writer holds it.
        """
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
        _validate_meta(record)
        target = Path(os.path.abspath(path))
        if not target.name:
            raise StoreError(f"{path}: a store cannot be the root directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = _WriterLock(target)
        try:
            directory, replaces = _claim(target, overwrite)
            store = cls(Path(path), record, lock=lock, directory=directory, replaces=replaces)
            store._save_meta()
        except BaseException:
            lock.release()
            raise
        return store

    @classmethod
    def resume(cls, path: str | os.PathLike) -> ActivationStore:
        """Reopen an incomplete store for writing; :meth:`missing` says what is left."""
        path = Path(path)
        if not path.is_dir():
            raise StoreError(f"{path}: no such store directory")
        lock = _WriterLock(Path(os.path.abspath(path)))
        try:
            meta = _load_meta(path)
            if meta["complete"]:
                raise StoreError(f"{path / META_FILE}: the store is complete, nothing to resume")
            store = cls(path, meta, lock=lock)
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
            Missing directory or meta.json, unknown format version, a meta.json out of the
            schema, an incomplete store (naming the missing parts), or a file that is not a
            regular file or whose size differs from the recorded one.
        """
        path = Path(path)
        meta = _load_meta(path)
        store = cls(path, meta)
        if not meta["complete"]:
            raise StoreError(
                f"{path} is an incomplete store (missing: {', '.join(store.missing())}); "
                "finish it with ActivationStore.resume or export it again"
            )
        store._check_files()
        return store

    # ------------------------------------------------------------------ facts

    @property
    def meta(self) -> dict[str, Any]:
        """A copy of meta.json's content."""
        return json.loads(json.dumps(self._meta))

    @property
    def n_layers(self) -> int:
        return self._meta["n_layers"]

    @property
    def n_heads(self) -> int:
        return self._meta["n_heads"]

    @property
    def d_head(self) -> int:
        return self._meta["d_head"]

    @property
    def d_model(self) -> int:
        return self._meta["d_model"]

    @property
    def n_samples(self) -> int | None:
        return self._meta["n_samples"]

    def missing(self) -> list[str]:
        """Files still to write, in writing order."""
        parts = [layer_file(layer) for layer in range(self.n_layers)]
        parts += [UNEMBED_FILE, SAMPLES_FILE]
        return [part for part in parts if part not in self._meta["files"]]

    def summary(self) -> str:
        """A few human-readable lines about the store."""
        m = self._meta
        extra = {
            k: v
            for k, v in m.items()
            if k not in {"format", "format_version", "files", "complete", *_REQUIRED_KEYS}
        }
        lines = [
            f"store      {self.path}",
            f"format     {m['format']} v{m['format_version']}"
            f" ({'complete' if m['complete'] else 'INCOMPLETE'})",
            f"shapes     {m['n_layers']} layers x {m['n_heads']} heads, d_head {m['d_head']}, "
            f"d_model {m['d_model']}",
            f"samples    {m['n_samples']} rows, z stored as {m['dtype']}",
        ]
        lines += [f"{key:<10} {value}" for key, value in sorted(extra.items())]
        return "\n".join(lines)

    # ------------------------------------------------------------------ writing

    def write_layer(self, layer: int, *, z, o_proj, bias=None) -> None:
        """Write one layer.

        Parameters
        ----------
        layer : int
            0-based layer index.
        z : array_like of shape (n_samples, n_heads, d_head)
            Per-head attention outputs before o_proj (TransformerLens's ``hook_z``) at the
            kept positions.
        o_proj : array_like of shape (d_model, n_heads * d_head)
            The output projection's weight (torch's ``nn.Linear`` layout); head h's
            columns are ``h * d_head : (h + 1) * d_head``.
        bias : array_like of shape (d_model,), optional

        Raises
        ------
        ValueError
            For a wrong shape, or a value that is not finite once stored (NaN, Inf, or
            too large for the store's dtype), naming layer, sample and head, or row and
            column.
        """
        self._require_writable()
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer must be in [0, {self.n_layers}), got {layer}")
        z = _checked(
            z,
            f"layer {layer}: z",
            (None, self.n_heads, self.d_head),
            self._meta["dtype"],
            ("sample", "head", None),
        )
        o_proj = _checked(
            o_proj,
            f"layer {layer}: o_proj",
            (self.d_model, self.n_heads * self.d_head),
            _weight_dtype(o_proj),
            ("row", "column"),
        )
        if self.n_samples is None:
            self._meta["n_samples"] = int(z.shape[0])
        elif z.shape[0] != self.n_samples:
            raise ValueError(
                f"z must have {self.n_samples} samples like the layers already written, "
                f"got {z.shape[0]}"
            )
        tensors = {"z": z, "o_proj": o_proj}
        if bias is not None:
            tensors["o_bias"] = _checked(
                bias, f"layer {layer}: bias", (self.d_model,), _weight_dtype(bias), ("row",)
            )
        self._save_tensors(layer_file(layer), tensors, {"layer": str(layer)})

    def write_unembed(self, unembed, final_norm=None, vocab: Sequence[str] | None = None) -> None:
        """Write the unembedding (v, d_model), the final norm's weight (d_model,) if any, and
        the vocabulary strings (v,) if known. Non-finite values are refused by row/column."""
        self._require_writable()
        unembed = _checked(
            unembed, "unembed", (None, self.d_model), _weight_dtype(unembed), ("row", "column")
        )
        tensors = {"unembed": unembed}
        if final_norm is not None:
            tensors["final_norm"] = _checked(
                final_norm, "final_norm", (self.d_model,), _weight_dtype(final_norm), ("row",)
            )
        metadata = {}
        if vocab is not None:
            vocab = [str(token) for token in vocab]
            if len(vocab) != unembed.shape[0]:
                raise ValueError(
                    f"vocab must have one string per unembedding row ({unembed.shape[0]}), "
                    f"got {len(vocab)}"
                )
            metadata["vocab"] = json.dumps(vocab, ensure_ascii=False)
        self._save_tensors(UNEMBED_FILE, tensors, metadata)

    def write_samples(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Write one JSON record per sample row (prompt, label, split, ...)."""
        self._require_writable()
        records = [dict(record) for record in records]
        if self.n_samples is not None and len(records) != self.n_samples:
            raise ValueError(
                f"records must have one entry per sample row ({self.n_samples}), got {len(records)}"
            )
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        _write_text(self._dir / SAMPLES_FILE, text)
        self._meta["prompts_hash"] = _prompts_hash(records)
        self._meta["n_sample_records"] = len(records)
        self._record_file(SAMPLES_FILE)

    def close(self) -> None:
        """Finish writing: mark the store complete if every part is present, swap it in
        for the store it replaces (if any), and release the writer lock.

        Raises
        ------
        StoreError
            When parts are missing (the store stays incomplete, open for writing and
            locked; a replaced store stays as it was).
        """
        if not self._writable:
            return
        missing = self.missing()
        if missing:
            raise StoreError(f"{self.path}: cannot complete the store, missing {missing}")
        records = self._meta["n_sample_records"]
        if records != self.n_samples:
            raise StoreError(
                f"{self.path / SAMPLES_FILE}: {records} records for {self.n_samples} samples"
            )
        del self._meta["n_sample_records"]
        self._meta["complete"] = True
        self._save_meta()
        if self._replaces is not None:
            self._swap_in()
        self._writable = False
        self._lock.release()

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.close()
        finally:
            self._abandon()  # after an error; nothing to do after a successful close

    # ------------------------------------------------------------------ reading

    def layer(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Memory-mapped ``z`` (n_samples, n_heads, d_head) and ``o_proj``
        (d_model, n_heads * d_head) of one layer, read-only, in their stored dtype."""
        tensors = self._layer_tensors(layer)
        return tensors["z"], tensors["o_proj"]

    def layer_bias(self, layer: int) -> np.ndarray | None:
        """The o_proj bias (d_model,) of one layer, or None."""
        return self._layer_tensors(layer).get("o_bias")

    def head_output(self, layer: int, head: int) -> np.ndarray:
        """Head ``head``'s contribution to the residual stream, float64 (n_samples, d_model).

        ``z[:, head] @ o_proj[:, head * d_head:(head + 1) * d_head].T``. Materialising it is
        for inspection; the ranking works on the factors.
        """
        z, o_proj = self.layer(layer)
        if not 0 <= head < self.n_heads:
            raise ValueError(f"head must be in [0, {self.n_heads}), got {head}")
        cols = slice(head * self.d_head, (head + 1) * self.d_head)
        return (
            np.asarray(z[:, head], dtype=np.float64)
            @ np.asarray(o_proj[:, cols], dtype=np.float64).T
        )

    def unembed(self) -> np.ndarray:
        """The unembedding (vocab, d_model), memory-mapped."""
        return self._unembed_tensors()[0]["unembed"]

    def final_norm(self) -> np.ndarray | None:
        """The final norm's weight (d_model,), or None."""
        return self._unembed_tensors()[0].get("final_norm")

    def vocab(self) -> list[str] | None:
        """The vocabulary strings (vocab,), one per unembedding row, or None.

        Raises
        ------
        StoreError
            When the recorded vocabulary is not a list of strings, one per row.
        """
        tensors, metadata = self._unembed_tensors()
        if "vocab" not in metadata:
            return None
        path = self._dir / UNEMBED_FILE
        try:
            vocab = json.loads(metadata["vocab"])
        except (ValueError, RecursionError) as err:
            raise StoreError(f"{path}: unreadable vocabulary ({err})") from err
        if not isinstance(vocab, list) or not all(isinstance(token, str) for token in vocab):
            raise StoreError(f"{path}: the vocabulary is not a list of strings")
        rows = tensors["unembed"].shape[0]
        if len(vocab) != rows:
            raise StoreError(f"{path}: {len(vocab)} vocabulary strings for {rows} unembedding rows")
        return vocab

    def samples(self) -> list[dict[str, Any]]:
        """The per-sample records."""
        path = self._dir / SAMPLES_FILE
        try:
            with _open_regular(path) as handle:
                lines = handle.read().decode("utf-8").splitlines()
            return [json.loads(line) for line in lines if line]
        except (OSError, ValueError, RecursionError) as err:
            raise StoreError(f"{path}: unreadable samples file ({err})") from err

    def verify(self) -> None:
        """Check every file's SHA-256 against the one recorded when it was written.

        Raises
        ------
        StoreError
            Naming the first file whose content changed.
        """
        self._check_files()
        for name, info in self._meta["files"].items():
            if _sha256(self._dir / name) != info["sha256"]:
                raise StoreError(
                    f"{self._dir / name}: content differs from when it was "
                    "written (sha256 mismatch): the file is corrupt"
                )

    # ------------------------------------------------------------------ internals

    def _layer_tensors(self, layer: int) -> dict[str, np.ndarray]:
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer must be in [0, {self.n_layers}), got {layer}")
        path = self._dir / layer_file(layer)
        if layer_file(layer) not in self._meta["files"]:
            raise StoreError(f"{path}: layer {layer} has not been written")
        tensors, _ = _map_tensors(path)
        expected = {
            "z": (self.n_samples, self.n_heads, self.d_head),
            "o_proj": (self.d_model, self.n_heads * self.d_head),
        }
        for name, shape in expected.items():
            if name not in tensors or tensors[name].shape != shape:
                got = tensors[name].shape if name in tensors else "nothing"
                raise StoreError(f"{path}: {name} should have shape {shape}, found {got}")
        if tensors["z"].dtype != np.dtype(self._meta["dtype"]):
            raise StoreError(
                f"{path}: z is {tensors['z'].dtype}, {META_FILE} says {self._meta['dtype']}"
            )
        return tensors

    def _unembed_tensors(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        path = self._dir / UNEMBED_FILE
        if UNEMBED_FILE not in self._meta["files"]:
            raise StoreError(f"{path}: the unembedding has not been written")
        tensors, metadata = _map_tensors(path)
        if "unembed" not in tensors or tensors["unembed"].shape[1:] != (self.d_model,):
            raise StoreError(f"{path}: no (vocab, {self.d_model}) 'unembed' tensor")
        return tensors, metadata

    def _require_writable(self) -> None:
        if not self._writable:
            raise StoreError(f"{self.path} is open for reading; use ActivationStore.resume")

    def _save_tensors(
        self, name: str, tensors: dict[str, np.ndarray], metadata: dict[str, str]
    ) -> None:
        metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), **metadata}
        _write_atomically(self._dir / name, lambda tmp: save_file(tensors, tmp, metadata))
        self._record_file(name)

    def _record_file(self, name: str) -> None:
        path = self._dir / name
        self._meta["files"][name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        self._save_meta()

    def _save_meta(self) -> None:
        _write_text(self._dir / META_FILE, json.dumps(self._meta, indent=1, sort_keys=True))

    def _check_files(self) -> None:
        """Every recorded file is a regular file of the recorded size (nothing is read)."""
        for name, info in self._meta["files"].items():
            path = self._dir / name
            try:
                status = os.lstat(path)
            except FileNotFoundError:
                raise StoreError(f"{path}: recorded in {META_FILE} but missing") from None
            except OSError as err:
                raise StoreError(f"{path}: unreadable ({err})") from err
            _require_regular(path, status.st_mode)
            if status.st_size != info["bytes"]:
                raise StoreError(
                    f"{path}: {status.st_size} bytes, {info['bytes']} recorded: "
                    "the file is truncated or was replaced"
                )

    def _swap_in(self) -> None:
        """Put the finished store, built beside the one it replaces, in that one's place:
        move the old store to a hidden sibling, move the new one in, then delete the old."""
        target = Path(os.path.abspath(self.path))
        old = _sibling(target, "old")
        try:
            os.rename(target, old)
        except FileNotFoundError:  # the old store was removed meanwhile: nothing to delete
            old = None
        os.rename(self._dir, target)
        self._dir = self.path
        if old is not None:
            _remove_store_dir(old, self._replaces)

    def _abandon(self) -> None:
        """Stop writing after an error and release the lock. A store built beside the one it
        replaces is deleted (the old store stays); a new store stays incomplete, resumable."""
        if not self._writable:
            return
        if self._replaces is not None:
            _remove_store_dir(self._dir, self.n_layers)
        self._writable = False
        self._lock.release()


def _weight_dtype(value: Any) -> str:
    """Weights keep float64 if given float64, else float32 (never narrower)."""
    return "float64" if np.asarray(value).dtype == np.float64 else "float32"
