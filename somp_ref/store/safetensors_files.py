"""A store's safetensors files: written by safetensors itself (atomically), read by the
small reader here, which validates the header and memory-maps the tensors.

Why a reader of our own rather than ``safetensors.safe_open(path, framework="np")``:

- Zero copy. ``safe_open``'s numpy tensors are copies (``get_tensor`` and ``get_slice``
  copy the bytes out of its map into a fresh array), and a ranking reads a layer's z
  (gigabytes at 7B shape with many samples) head by head. :func:`map_tensors` returns
  read-only ``np.memmap`` views of the file: the pages read stay in the page cache
  (shared, reclaimable), and the only private memory is what the caller converts (a
  ranking widens one head's samples at a time), whatever the layer's size.
- The file that was checked is the file that is read. The tensors are mapped from the
  descriptor the caller opened (a regular file, no symbolic link followed:
  :func:`somp_ref.store.regular_files.open_regular`) after ``check`` hashed its content
  through that descriptor; ``safe_open`` would open the file again by its name, which may
  point elsewhere by then.
- Strict validation first, in the store's terms: only the store's dtypes (F16, F32, F64),
  at most 8 axes of positive sizes, byte counts that match dtype and shape, tensors that
  tile the data exactly (no gap, overlap or trailing bytes) and a bounded header, every
  failure a StoreError naming the file and the tensor, before anything is mapped.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import save_file

from somp_ref.files import write_atomically
from somp_ref.store.layout import StoreError
from somp_ref.store.regular_files import open_regular
from somp_ref.store.schema import is_int, short

_MAX_HEADER = 100 * 1024 * 1024  # the reader's bound on the JSON header
MAX_METADATA_BYTES = 100_000_000 - (1 << 20)  # safetensors' writer bound, less the tensors'
_OS_ERROR = re.compile(r"\(os error ([0-9]+)\)")
_MAX_NDIM = 8  # store tensors have at most 3 axes
_SAFETENSORS_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64}


def write_tensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write ``tensors`` and ``metadata`` as the safetensors file ``path``, complete or not
    at all (:func:`somp_ref.files.write_atomically`).

    safetensors streams the arrays straight onto the temporary file, by its name; its
    in-memory ``save`` would hold the whole file twice at its peak.

    Raises
    ------
    OSError
        Naming ``path``, when the file cannot be written: safetensors' own error (a full disk,
        a file too large) is raised as an OSError, with its errno when it gives one.
    """

    def write(handle: BinaryIO) -> None:
        try:
            save_file(tensors, handle.name, metadata)
        except SafetensorError as err:
            raise _os_error(err, path) from err

    write_atomically(path, write)


def _os_error(err: SafetensorError, path: Path) -> OSError:
    """safetensors' write error as an OSError naming ``path`` ("... (os error 28)": ENOSPC)."""
    found = _OS_ERROR.search(str(err))
    if found is None:
        return OSError(f"{path}: cannot write the file ({err})")
    code = int(found[1])
    return OSError(code, os.strerror(code), str(path))


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
    where = f"{path}: tensor {short(name)}"
    if not isinstance(info, dict):
        raise StoreError(f"{where}: entry is not an object")
    dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype_name, str) or dtype_name not in _SAFETENSORS_DTYPES:
        raise StoreError(f"{where}: unsupported dtype {short(dtype_name)}")
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_NDIM
        or not all(is_int(n) and n >= 1 for n in shape)
    ):
        raise StoreError(f"{where}: invalid shape {short(shape)}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(is_int(x) for x in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise StoreError(f"{where}: invalid data_offsets {short(offsets)}")
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
                f"{path}: tensor {short(name)} starts at data byte {tensor.start}, "
                f"not {covered}: it {how}"
            )
        covered = tensor.end
    if covered != data_size:
        how = "past the end of the file" if covered > data_size else "with trailing bytes"
        raise StoreError(f"{path}: tensors cover {covered} of {data_size} data bytes ({how})")


def _validated_header(
    handle: BinaryIO, path: Path
) -> tuple[dict[str, _Tensor], int, dict[str, str]]:
    """The validated header of the open safetensors file ``path``: its tensors, where their
    data starts, and its metadata."""
    size = os.fstat(handle.fileno()).st_size
    header, offset = _read_header(handle, path, size)
    metadata = _header_metadata(header, path)
    entries = {name: _tensor_entry(name, info, path) for name, info in header.items()}
    _check_layout(entries, size - offset, path)
    return entries, offset, metadata


def tensor_shapes(path: Path) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """The dtype and shape of every tensor of a safetensors file, from its header alone
    (validated as :func:`map_tensors` validates it; no tensor data is read).

    Raises
    ------
    StoreError
        Naming the file, as :func:`map_tensors`.
    """
    try:
        with open_regular(path) as handle:
            entries, _, _ = _validated_header(handle, path)
    except OSError as err:
        raise StoreError(f"{path}: unreadable safetensors file ({err})") from err
    return {name: (tensor.dtype, tensor.shape) for name, tensor in entries.items()}


def map_tensors(
    path: Path, check: Callable[[BinaryIO], None] | None = None
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Memory-map every tensor of a safetensors file read-only, once its header is validated;
    also return its metadata.

    Parameters
    ----------
    check : callable, optional
        Called with the open file before anything is read from it (to check its content);
        the tensors are mapped from that same open file.

    Raises
    ------
    StoreError
        Naming the file: not a regular file, unreadable, or a header that does not describe
        its data exactly (or what ``check`` raises).
    """
    try:
        with open_regular(path) as handle:
            if check is not None:
                check(handle)
            entries, offset, metadata = _validated_header(handle, path)
            tensors = {
                name: np.memmap(
                    handle, dtype=t.dtype, mode="r", offset=offset + t.start, shape=t.shape
                )
                for name, t in entries.items()
            }
    except OSError as err:
        raise StoreError(f"{path}: unreadable safetensors file ({err})") from err
    return tensors, metadata
