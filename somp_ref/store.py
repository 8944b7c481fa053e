"""The on-disk activation store: what each head wrote, layer by layer, in safetensors.

A store is a directory::

    meta.json                 format version, model, shapes, positions rule, dtype, state
    layer_000.safetensors     z (n_samples, n_heads, d_head) = hook_z at the kept positions,
    ...                       o_proj (d_model, n_heads * d_head), optional o_bias (d_model,)
    unembed.safetensors       unembed (vocab, d_model), optional final_norm (d_model,);
                              the vocabulary strings in the file's metadata
    samples.jsonl             one JSON record (prompt, label, split, ...) per sample row

Every file is written under a temporary name and renamed into place, so a file either is
complete or is absent. ``meta.json`` says ``"complete": false`` until :meth:`close` has
seen every part; :meth:`ActivationStore.open` refuses an incomplete store, a file whose
size differs from the one recorded, and an unknown format version, naming the file.
Tensors are read memory-mapped, one layer at a time; opening a store never runs code
(safetensors holds no pickles).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

FORMAT = "somp_ref.activation_store"
FORMAT_VERSION = 1
META_FILE = "meta.json"
UNEMBED_FILE = "unembed.safetensors"
SAMPLES_FILE = "samples.jsonl"
STORE_DTYPES = ("float16", "float32", "float64")

_SAFETENSORS_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own bound on the JSON header


class StoreError(Exception):
    """A store that is missing, partial, corrupt, of another version, or misused."""


def layer_file(layer: int) -> str:
    """File name of one layer's tensors."""
    return f"layer_{layer:03d}.safetensors"


def _write_atomically(path: Path, write) -> None:
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
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse a safetensors header; return it and the byte offset where data starts."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(8)
            if len(raw) != 8:
                raise StoreError(f"{path}: truncated safetensors file (no header length)")
            (length,) = struct.unpack("<Q", raw)
            if length > _MAX_HEADER:
                raise StoreError(f"{path}: corrupt safetensors header (length {length})")
            header = json.loads(handle.read(length))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise StoreError(f"{path}: unreadable safetensors file ({err})") from err
    if not isinstance(header, dict):
        raise StoreError(f"{path}: corrupt safetensors header")
    return header, 8 + length


def _map_tensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Memory-map every tensor of a safetensors file read-only; also return its metadata."""
    header, offset = _read_header(path)
    size = path.stat().st_size
    metadata = header.pop("__metadata__", {}) or {}
    tensors = {}
    for name, info in header.items():
        try:
            dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
            shape = tuple(int(s) for s in info["shape"])
            start, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as err:
            raise StoreError(f"{path}: tensor {name!r} has an unsupported entry {info}") from err
        if end - start != dtype.itemsize * int(np.prod(shape)) or offset + end > size:
            raise StoreError(f"{path}: tensor {name!r} is truncated or corrupt")
        if end == start:
            tensors[name] = np.zeros(shape, dtype=dtype)
        else:
            tensors[name] = np.memmap(
                path, dtype=dtype, mode="r", offset=offset + start, shape=shape
            )
    return tensors, metadata


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

    def __init__(self, path: Path, meta: dict[str, Any], writable: bool):
        self.path = path
        self._meta = meta
        self._writable = writable

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
            The model's shapes; heads are query heads.
        meta : mapping, optional
            Extra JSON-serialisable facts (model id, family, positions rule, ...).
        dtype : {"float16", "float32", "float64"}, default="float32"
            How ``z`` is stored (bfloat16 activations are widened to float32 by the caller:
            numpy has no bfloat16). Weights are stored in float32 or wider.
        """
        path = Path(path)
        for name, value in (
            ("n_layers", n_layers),
            ("n_heads", n_heads),
            ("d_head", d_head),
            ("d_model", d_model),
        ):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if dtype not in STORE_DTYPES:
            raise ValueError(f"dtype must be one of {STORE_DTYPES}, got {dtype!r}")
        if path.exists():
            if not overwrite:
                raise StoreError(f"{path} already exists (pass overwrite=True to replace it)")
            if (path / META_FILE).exists() or not any(path.iterdir()):
                for child in path.iterdir():
                    child.unlink()
            else:
                raise StoreError(f"{path} exists and is not a store: refusing to overwrite it")
        path.mkdir(parents=True, exist_ok=True)
        record = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **dict(meta or {}),
            "n_layers": int(n_layers),
            "n_heads": int(n_heads),
            "d_head": int(d_head),
            "d_model": int(d_model),
            "dtype": dtype,
            "n_samples": None,
            "complete": False,
            "files": {},
        }
        store = cls(path, record, writable=True)
        store._save_meta()
        return store

    @classmethod
    def resume(cls, path: str | os.PathLike) -> ActivationStore:
        """Reopen an incomplete store for writing; :meth:`missing` says what is left."""
        path = Path(path)
        meta = _load_meta(path)
        if meta["complete"]:
            raise StoreError(f"{path / META_FILE}: the store is complete, nothing to resume")
        store = cls(path, meta, writable=True)
        store._check_files()
        return store

    @classmethod
    def open(cls, path: str | os.PathLike) -> ActivationStore:
        """Open a complete store for reading (lazily: nothing is loaded yet).

        Raises
        ------
        StoreError
            Missing directory or meta.json, unknown format version, an incomplete store
            (naming the missing parts), or a file whose size differs from the recorded one.
        """
        path = Path(path)
        meta = _load_meta(path)
        store = cls(path, meta, writable=False)
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
            if k
            not in {
                "format",
                "format_version",
                "files",
                "n_layers",
                "n_heads",
                "d_head",
                "d_model",
                "dtype",
                "n_samples",
                "complete",
            }
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
        """
        self._require_writable()
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer must be in [0, {self.n_layers}), got {layer}")
        z = self._checked(z, "z", (None, self.n_heads, self.d_head), self._meta["dtype"])
        o_proj = self._checked(
            o_proj, "o_proj", (self.d_model, self.n_heads * self.d_head), self._weight_dtype(o_proj)
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
            tensors["o_bias"] = self._checked(
                bias, "bias", (self.d_model,), self._weight_dtype(bias)
            )
        self._save_tensors(layer_file(layer), tensors, {"layer": str(layer)})

    def write_unembed(self, unembed, final_norm=None, vocab: Sequence[str] | None = None) -> None:
        """Write the unembedding (v, d_model), the final norm's weight (d_model,) if any, and
        the vocabulary strings (v,) if known."""
        self._require_writable()
        unembed = self._checked(
            unembed, "unembed", (None, self.d_model), self._weight_dtype(unembed)
        )
        tensors = {"unembed": unembed}
        if final_norm is not None:
            tensors["final_norm"] = self._checked(
                final_norm, "final_norm", (self.d_model,), self._weight_dtype(final_norm)
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
        target = self.path / SAMPLES_FILE
        _write_text(target, text)
        self._meta["prompts_hash"] = _prompts_hash(records)
        self._meta["n_sample_records"] = len(records)
        self._record_file(SAMPLES_FILE)

    def close(self) -> None:
        """Finish writing: mark the store complete if every part is present.

        Raises
        ------
        StoreError
            When parts are missing (the store stays incomplete and resumable).
        """
        if not self._writable:
            return
        missing = self.missing()
        if missing:
            raise StoreError(f"{self.path}: cannot complete the store, missing {missing}")
        records = self._meta.pop("n_sample_records")
        if records != self.n_samples:
            raise StoreError(
                f"{self.path / SAMPLES_FILE}: {records} records for {self.n_samples} samples"
            )
        self._meta["complete"] = True
        self._save_meta()
        self._writable = False

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        # On an exception the store stays incomplete: it will not open as complete.

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
        """The vocabulary strings, one per unembedding row, or None."""
        metadata = self._unembed_tensors()[1]
        return json.loads(metadata["vocab"]) if "vocab" in metadata else None

    def samples(self) -> list[dict[str, Any]]:
        """The per-sample records."""
        path = self.path / SAMPLES_FILE
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
            return [json.loads(line) for line in lines if line]
        except (OSError, ValueError) as err:
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
            if _sha256(self.path / name) != info["sha256"]:
                raise StoreError(
                    f"{self.path / name}: content differs from when it was "
                    "written (sha256 mismatch): the file is corrupt"
                )

    # ------------------------------------------------------------------ internals

    def _layer_tensors(self, layer: int) -> dict[str, np.ndarray]:
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer must be in [0, {self.n_layers}), got {layer}")
        path = self.path / layer_file(layer)
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
        return tensors

    def _unembed_tensors(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        path = self.path / UNEMBED_FILE
        if UNEMBED_FILE not in self._meta["files"]:
            raise StoreError(f"{path}: the unembedding has not been written")
        tensors, metadata = _map_tensors(path)
        if "unembed" not in tensors or tensors["unembed"].shape[1:] != (self.d_model,):
            raise StoreError(f"{path}: no (vocab, {self.d_model}) 'unembed' tensor")
        return tensors, metadata

    def _require_writable(self) -> None:
        if not self._writable:
            raise StoreError(f"{self.path} is open for reading; use ActivationStore.resume")

    def _weight_dtype(self, value) -> str:
        """Weights keep float64 if given float64, else float32 (never narrower)."""
        return "float64" if np.asarray(value).dtype == np.float64 else "float32"

    @staticmethod
    def _checked(value, name: str, shape: tuple, dtype: str) -> np.ndarray:
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
        array = np.ascontiguousarray(array, dtype=dtype)
        if not np.isfinite(array).all():
            raise ValueError(f"{name} must be finite (after conversion to {dtype})")
        return array

    def _save_tensors(
        self, name: str, tensors: dict[str, np.ndarray], metadata: dict[str, str]
    ) -> None:
        metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), **metadata}
        _write_atomically(self.path / name, lambda tmp: save_file(tensors, tmp, metadata))
        self._record_file(name)

    def _record_file(self, name: str) -> None:
        path = self.path / name
        self._meta["files"][name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        self._save_meta()

    def _save_meta(self) -> None:
        _write_text(self.path / META_FILE, json.dumps(self._meta, indent=1, sort_keys=True))

    def _check_files(self) -> None:
        for name, info in self._meta["files"].items():
            path = self.path / name
            if not path.is_file():
                raise StoreError(f"{path}: recorded in {META_FILE} but missing")
            if path.stat().st_size != info["bytes"]:
                raise StoreError(
                    f"{path}: {path.stat().st_size} bytes, {info['bytes']} recorded: "
                    "the file is truncated or was replaced"
                )


def _load_meta(path: Path) -> dict[str, Any]:
    meta_path = path / META_FILE
    if not path.is_dir():
        raise StoreError(f"{path}: no such store directory")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StoreError(f"{meta_path}: missing; {path} is not an activation store") from None
    except (OSError, ValueError) as err:
        raise StoreError(f"{meta_path}: unreadable ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StoreError(f"{meta_path}: not a {FORMAT} meta file")
    if meta.get("format_version") != FORMAT_VERSION:
        raise StoreError(
            f"{meta_path}: format version {meta.get('format_version')!r}, this somp_ref "
            f"reads version {FORMAT_VERSION}"
        )
    required = (
        "n_layers",
        "n_heads",
        "d_head",
        "d_model",
        "dtype",
        "n_samples",
        "complete",
        "files",
    )
    absent = [key for key in required if key not in meta]
    if absent:
        raise StoreError(f"{meta_path}: corrupt, missing keys {absent}")
    return meta
