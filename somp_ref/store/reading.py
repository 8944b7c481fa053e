"""Reading an opened store: its tensors memory-mapped one file at a time and checked against
meta.json's shapes, its vocabulary and sample records, and each file checked against the
size and SHA-256 meta.json recorded, the first time this store object reads it (see
:mod:`somp_ref.store.content`).

When a store is opened, each part is checked against meta.json exactly, cheaply: every
tensor's dtype and shape from its file's safetensors header (no tensor data is read, so a
store of thousands of layers opens in milliseconds). A meta.json that says 39 rows, or
float16, over files that hold 40 rows of float32 is refused, naming the file, instead of
reporting facts the files contradict. The sample records (one line each) are counted when
they are read (:meth:`StoreReading.samples`) and by :meth:`StoreReading.verify`, not at
open: with one record per token they can be gigabytes, and every ranking worker opens the
store.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from somp_ref.store.facts import StoreFacts, check_index
from somp_ref.store.layout import META_FILE, SAMPLES_FILE, UNEMBED_FILE, StoreError, layer_file
from somp_ref.store.regular_files import open_regular, require_regular
from somp_ref.store.safetensors_files import map_tensors, tensor_shapes
from somp_ref.store.schema import load_meta, short

#: The dtypes a store writes its weights in (:func:`somp_ref.store.arrays.weight_dtype`).
_WEIGHT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_COUNT_CHUNK = 1 << 22


def _shape_text(shape: tuple[int | None, ...]) -> str:
    """A shape as a message shows it, None as ``v`` (any length)."""
    inner = ", ".join("v" if n is None else str(n) for n in shape)
    return f"({inner},)" if len(shape) == 1 else f"({inner})"


class StoreReading(StoreFacts):
    """The reading methods of :class:`somp_ref.store.ActivationStore`."""

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
        head = check_index(head, "head", self.n_heads)
        z, o_proj = self.layer(layer)
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
        if SAMPLES_FILE not in self._meta["files"]:
            raise StoreError(f"{path}: the sample records have not been written")
        try:
            with open_regular(path) as handle:
                self._check_content(handle, path)
                # "\n" only: str.splitlines also breaks at U+2028, U+2029 and U+0085,
                # which json.dumps(ensure_ascii=False) leaves inside strings.
                lines = handle.read().decode("utf-8").split("\n")
            records = [json.loads(line) for line in lines if line]
        except (OSError, ValueError, RecursionError) as err:
            raise StoreError(f"{path}: unreadable samples file ({err})") from err
        if self.n_samples is not None and len(records) != self.n_samples:
            raise StoreError(
                f"{path}: {len(records)} records for {self.n_samples} rows "
                f"({META_FILE}'s n_samples)"
            )
        return records

    def verify(self) -> None:
        """Check every file's SHA-256 against the one recorded when it was written, whether
        or not this store object read it before (reading them later costs no hashing).

        Raises
        ------
        StoreError
            Naming the first file whose content changed.
        """
        self._check_files()
        self._content.forget()
        for name in self._meta["files"]:
            path = self._dir / name
            try:
                with open_regular(path) as handle:
                    self._check_content(handle, path)
            except OSError as err:
                raise StoreError(f"{path}: unreadable ({err})") from err
        self._check_parts(count_records=True)

    def _check_content(self, handle, path) -> None:
        """Check an open store file against meta.json's record of it (once per file)."""
        self._content.check(handle, path, self._meta["files"][path.name], self._store_changed)

    def _store_changed(self) -> bool:
        """Whether meta.json no longer says what this store object holds: the store was
        replaced (or damaged) since it was opened."""
        try:
            return load_meta(self._dir) != self._meta
        except StoreError:
            return True

    def _map(self, name: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        path = self._dir / name
        return map_tensors(path, check=lambda handle: self._check_content(handle, path))

    def _layer_tensors(self, layer: int) -> dict[str, np.ndarray]:
        layer = check_index(layer, "layer", self.n_layers)
        path = self._dir / layer_file(layer)
        if layer_file(layer) not in self._meta["files"]:
            raise StoreError(f"{path}: layer {layer} has not been written")
        tensors, metadata = self._map(layer_file(layer))
        found = metadata.get("layer")
        if found != str(layer):
            says = "does not say which layer" if found is None else f"says layer {short(found)}"
            raise StoreError(
                f"{path}: the file {says}, not layer {layer} "
                "(copied or moved here from another layer's file?)"
            )
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
        tensors, metadata = self._map(UNEMBED_FILE)
        if "unembed" not in tensors or tensors["unembed"].shape[1:] != (self.d_model,):
            raise StoreError(f"{path}: no (vocab, {self.d_model}) 'unembed' tensor")
        return tensors, metadata

    def _check_parts(self, *, count_records: bool = False) -> None:
        """Every recorded part agrees with meta.json exactly (see the module's notes): the
        tensors' dtypes and shapes, from the headers alone, and (``count_records``) one
        sample record per row.

        Raises
        ------
        StoreError
            Naming the file and what differs from meta.json.
        """
        n, heads, d_head, d_model = self.n_samples, self.n_heads, self.d_head, self.d_model
        layer_tensors = {
            "z": ((n, heads, d_head), (np.dtype(self._meta["dtype"]),)),
            "o_proj": ((d_model, heads * d_head), _WEIGHT_DTYPES),
            "o_bias": ((d_model,), _WEIGHT_DTYPES),
        }
        unembed_tensors = {
            "unembed": ((None, d_model), _WEIGHT_DTYPES),
            "final_norm": ((d_model,), _WEIGHT_DTYPES),
        }
        for name in self._meta["files"]:
            path = self._dir / name
            if name == SAMPLES_FILE:
                if count_records:
                    self.check_record_count()
                continue
            expected, required = (
                (unembed_tensors, ("unembed",))
                if name == UNEMBED_FILE
                else (layer_tensors, ("z", "o_proj"))
            )
            found = tensor_shapes(path)
            for tensor in required:
                if tensor not in found:
                    raise StoreError(f"{path}: no {tensor!r} tensor")
            for tensor, (dtype, shape) in found.items():
                if tensor not in expected:
                    raise StoreError(
                        f"{path}: holds a tensor {short(tensor)}, which a store's file does not"
                    )
                want, dtypes = expected[tensor]
                if len(shape) != len(want) or any(
                    w is not None and w != got for w, got in zip(want, shape, strict=False)
                ):
                    raise StoreError(
                        f"{path}: {tensor} has shape {_shape_text(shape)}, {META_FILE}'s "
                        f"shapes make it {_shape_text(want)}"
                    )
                if dtype not in dtypes:
                    says = (
                        f"{META_FILE} says {self._meta['dtype']}"
                        if tensor == "z"
                        else "a store writes weights in float32 or float64"
                    )
                    raise StoreError(f"{path}: {tensor} is {dtype}, {says}")

    def check_record_count(self) -> None:
        """Raise StoreError unless samples.jsonl holds one record (one line) per row,
        counted a chunk at a time (nothing parsed: cheaper than :meth:`samples`)."""
        path = self._dir / SAMPLES_FILE
        lines = 0
        try:
            with open_regular(path) as handle:
                for chunk in iter(lambda: handle.read(_COUNT_CHUNK), b""):
                    lines += chunk.count(b"\n")
        except OSError as err:
            raise StoreError(f"{path}: unreadable samples file ({err})") from err
        if lines != self.n_samples:
            raise StoreError(
                f"{path}: {lines} records for {self.n_samples} rows ({META_FILE}'s n_samples)"
            )

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
            require_regular(path, status.st_mode)
            if status.st_size != info["bytes"]:
                raise StoreError(
                    f"{path}: {status.st_size} bytes, {info['bytes']} recorded: "
                    "the file is truncated or was replaced"
                )
