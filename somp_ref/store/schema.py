"""meta.json's schema: the types and bounds of every key a store records, checked before any
of it is used, and the reading of meta.json itself."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from somp_ref.store.json_values import json_bytes, json_problem
from somp_ref.store.layout import (
    FORMAT,
    FORMAT_VERSION,
    META_FILE,
    REPLACING,
    SAMPLES_FILE,
    STORE_DTYPES,
    UNEMBED_FILE,
    StoreError,
    is_part_name,
    layer_file,
)
from somp_ref.store.regular_files import open_regular
from somp_ref.store.row_appending import APPENDING

# Bounds on meta.json's shapes. They are far above any released model (the largest have
# ~128 layers, ~128 query heads, d_head <= 256 and d_model ~ 25k) and small enough that the
# per-layer loops (listing and stat-ing the files) stay cheap whatever meta.json claims.
_SHAPE_BOUNDS = {"n_layers": 4096, "n_heads": 4096, "d_head": 1 << 16, "d_model": 1 << 20}
_MAX_SAMPLES = 1 << 40  # a trillion rows: beyond any export, far inside int64 byte counts
_MAX_FILE_BYTES = (1 << 63) - 1  # off_t's range
MAX_META_BYTES = 64 << 20  # a 4096-layer meta.json is ~0.5 MiB, plus the caller's facts
REQUIRED_KEYS = (
    "n_layers",
    "n_heads",
    "d_head",
    "d_model",
    "dtype",
    "n_samples",
    "complete",
    "files",
)
_SHA256 = re.compile(r"[0-9a-f]{64}")


def is_int(value: Any) -> bool:
    """An int that is not a bool (JSON ``true`` must not pass for 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None


def short(value: Any) -> str:
    """``repr(value)``, cut short: an absurd meta.json must not make an absurd message."""
    if is_int(value) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


# Optional meta.json facts that other modules read: checked when present; other keys pass.
_STRING_FACTS = ("model_id", "family", "positions", "hook", "contribution", "model_dtype", "inputs")
_OPTIONAL_KEYS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    **{key: ("a string", lambda v: isinstance(v, str)) for key in _STRING_FACTS},
    "chat_template": ("true or false", lambda v: isinstance(v, bool)),
    "prompts_hash": ("64 lowercase hex digits", _is_sha256),
    "n_sample_records": (
        f"an integer in [0, {_MAX_SAMPLES}]",
        lambda v: is_int(v) and 0 <= v <= _MAX_SAMPLES,
    ),
    REPLACING: ("64 lowercase hex digits", _is_sha256),
    APPENDING: (
        "{rows, samples_bytes, weights, progress} as a row writer records them",
        lambda v: _valid_appending(v),
    ),
}
_WEIGHT_DTYPES = ("F16", "F32", "F64")


def _valid_appending(state: Any) -> bool:
    """The row writer's state (:mod:`somp_ref.store.row_appending`): committed rows and
    sample bytes, each layer's weight tensors as [[name, {dtype, shape, bytes}], ...], and
    the caller's progress facts."""
    if not isinstance(state, dict) or set(state) != {
        "rows",
        "samples_bytes",
        "weights",
        "progress",
    }:
        return False
    counts_ok = all(
        is_int(state[key]) and 0 <= state[key] <= high
        for key, high in (("rows", _MAX_SAMPLES), ("samples_bytes", _MAX_FILE_BYTES))
    )
    if not counts_ok or not isinstance(state["progress"], dict):
        return False
    weights = state["weights"]
    return isinstance(weights, list) and all(
        isinstance(layer, list)
        and all(
            isinstance(pair, list)
            and len(pair) == 2
            and isinstance(pair[0], str)
            and isinstance(entry := pair[1], dict)
            and set(entry) == {"dtype", "shape", "bytes"}
            and entry["dtype"] in _WEIGHT_DTYPES
            and isinstance(entry["shape"], list)
            and all(is_int(d) and 0 <= d <= _MAX_FILE_BYTES for d in entry["shape"])
            and is_int(entry["bytes"])
            and 0 <= entry["bytes"] <= _MAX_FILE_BYTES
            for pair in layer
        )
        for layer in weights
    )


def _check_int(meta: Mapping[str, Any], key: str, low: int, high: int) -> None:
    value = meta[key]
    if not is_int(value) or not low <= value <= high:
        raise ValueError(f"{key} must be an integer in [{low}, {high}], got {short(value)}")


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
        raise ValueError(f"files must be an object, got {short(files)}")
    for name, info in files.items():
        if not is_part_name(name, n_layers):
            raise ValueError(f"files lists {short(name)}, not a part of a {n_layers}-layer store")
        if not isinstance(info, dict) or set(info) != {"bytes", "sha256"}:
            raise ValueError(f"files[{name!r}] must be {{bytes, sha256}}, got {short(info)}")
        _check_int(info, "bytes", 0, _MAX_FILE_BYTES)
        if not _is_sha256(info["sha256"]):
            raise ValueError(f"files[{name!r}].sha256 must be 64 lowercase hex digits")
        need = _min_part_bytes(meta, name)
        if info["bytes"] < need:
            raise ValueError(f"{name} has {info['bytes']} bytes, its shapes need at least {need}")
    if meta["complete"] and len(files) != n_layers + 2:
        raise ValueError(f"a complete store lists {n_layers + 2} files, this one {len(files)}")


def validate_meta(meta: Mapping[str, Any]) -> None:
    """Check a store record against the schema (format and version are checked by the caller).

    Raises
    ------
    ValueError
        Naming the first key that is missing, of the wrong type or out of bounds.
    """
    absent = [key for key in REQUIRED_KEYS if key not in meta]
    if absent:
        raise ValueError(f"missing keys {absent}")
    for key, high in _SHAPE_BOUNDS.items():
        _check_int(meta, key, 1, high)
    if not isinstance(meta["dtype"], str) or meta["dtype"] not in STORE_DTYPES:
        raise ValueError(f"dtype must be one of {STORE_DTYPES}, got {short(meta['dtype'])}")
    if meta["n_samples"] is not None:
        _check_int(meta, "n_samples", 1, _MAX_SAMPLES)
    if not isinstance(meta["complete"], bool):
        raise ValueError(f"complete must be true or false, got {short(meta['complete'])}")
    for key, (kind, is_valid) in _OPTIONAL_KEYS.items():
        if key in meta and not is_valid(meta[key]):
            raise ValueError(f"{key} must be {kind}, got {short(meta[key])}")
    if APPENDING in meta and len(meta[APPENDING]["weights"]) != meta["n_layers"]:
        raise ValueError(
            f"appending lists the weights of {len(meta[APPENDING]['weights'])} layers, "
            f"not {meta['n_layers']}"
        )
    _validate_files(meta)


def load_meta(path: Path) -> dict[str, Any]:
    """Read and validate ``path/meta.json`` (at most MAX_META_BYTES are read).

    Raises
    ------
    StoreError
        Naming meta.json: missing, unreadable, not a store's, of another format version, or
        out of the schema.
    """
    meta_path = path / META_FILE
    if not path.is_dir():
        raise StoreError(f"{path}: no such store directory")
    try:
        with open_regular(meta_path) as handle:
            raw = handle.read(MAX_META_BYTES + 1)
    except FileNotFoundError:
        raise StoreError(f"{meta_path}: missing; {path} is not an activation store") from None
    except OSError as err:
        raise StoreError(f"{meta_path}: unreadable ({err})") from err
    if len(raw) > MAX_META_BYTES:
        raise StoreError(f"{meta_path}: over {MAX_META_BYTES} bytes, not a store's meta file")
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as err:  # RecursionError: absurdly nested JSON
        raise StoreError(f"{meta_path}: unreadable ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StoreError(f"{meta_path}: not a {FORMAT} meta file")
    version = meta.get("format_version")
    if not is_int(version) or version != FORMAT_VERSION:
        raise StoreError(
            f"{meta_path}: format version {short(version)}, this somp_ref "
            f"reads version {FORMAT_VERSION}"
        )
    try:
        validate_meta(meta)
    except ValueError as err:
        raise StoreError(f"{meta_path}: corrupt, {err}") from None
    problem = json_problem(meta, META_FILE, strict=False)
    if problem is not None:
        raise StoreError(f"{meta_path}: corrupt, {problem[1]}")
    return meta


def largest_meta_bytes(meta: Mapping[str, Any]) -> int:
    """The most bytes meta.json can take while a store begun with the record ``meta`` is
    written: every part recorded with the longest size and hash, the sample facts set."""
    parts = [layer_file(layer) for layer in range(meta["n_layers"])] + [UNEMBED_FILE, SAMPLES_FILE]
    largest = {"bytes": _MAX_FILE_BYTES, "sha256": "0" * 64}
    full = {
        **meta,
        "n_samples": _MAX_SAMPLES,
        "complete": False,  # "false" is longer than "true"
        "prompts_hash": "0" * 64,
        "n_sample_records": _MAX_SAMPLES,
        "files": dict.fromkeys(parts, largest),
    }
    return len(json_bytes(full))
