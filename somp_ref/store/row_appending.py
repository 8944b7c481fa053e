"""Writing a store's rows as they come, batch by batch, so that memory stays at one batch
whatever the number of rows and an interrupted writer loses at most the batch in flight.

While rows are appended, each layer lives in a hidden partial file ``.layer_NNN.safetensors
.rows`` laid out as its final safetensors file will be: the 8-byte header length, a header
reserved at a fixed size, the layer's weights (o_proj, o_bias), then z, row after row. The
sample records go to ``.samples.jsonl.rows``. A batch is committed in two steps: its bytes
are written and flushed to disk in every partial file, then meta.json (written atomically)
records the new row count, the samples' byte count and the caller's progress facts. Bytes
past the committed sizes are never read: the next append, and a resume, cut them off.
:meth:`RowWriter.finish` writes each header (the tensors' final shapes, padded with spaces
to the reserved size, as safetensors allows), renames every partial file to its part name
and records it like any other part; the store is then closed as usual.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, BinaryIO

import numpy as np

from somp_ref.store.arrays import checked, weight_dtype
from somp_ref.store.json_values import check_json
from somp_ref.store.layout import FORMAT, FORMAT_VERSION, SAMPLES_FILE, StoreError, layer_file

#: meta.json's key holding the state of an append in progress.
APPENDING = "appending"
#: Bytes reserved for a layer file's JSON header: its longest form (three tensors with
#: 13-digit shapes and offsets, the metadata) is under 700 bytes. A multiple of 8, so the
#: data starts 8-byte aligned.
HEADER_BYTES = 1024
_SAFETENSORS_NAMES = {
    np.dtype(np.float16): "F16",
    np.dtype(np.float32): "F32",
    np.dtype(np.float64): "F64",
}
_PARTIAL = re.compile(r"\.(layer_[0-9]{3,4}\.safetensors|samples\.jsonl)\.rows")


def partial_name(part: str) -> str:
    """The hidden file a part is appended to before :meth:`RowWriter.finish` renames it."""
    return f".{part}.rows"


def part_of_partial(name: str) -> str | None:
    """The part whose partial file ``name`` is, or None."""
    match = _PARTIAL.fullmatch(name)
    return None if match is None else match[1]


@contextlib.contextmanager
def _naming(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise an OSError that names no file (a write, flush, fsync or truncate of an open
    file: ``[Errno 27] File too large``) as one naming ``path``."""
    try:
        yield
    except OSError as err:
        if err.filename is not None:
            raise
        raise OSError(err.errno, err.strerror or str(err), os.fspath(path)) from err


def prompts_hash(records: Iterable[Mapping[str, Any]]) -> str:
    """What meta.json's ``prompts_hash`` holds: the SHA-256 of
    ``json.dumps([record.get("prompt") for record in records], ensure_ascii=False)`` in
    UTF-8, computed one record at a time (a streamed store's samples are read line by line,
    never held whole). Each prompt is encoded, and the items joined, by the encoder
    ``json.dumps`` itself uses, so the hash is byte for byte that of the whole list."""
    encoder = json.JSONEncoder(ensure_ascii=False)
    digest = hashlib.sha256(b"[")
    separator = b""
    for record in records:
        digest.update(separator + encoder.encode(record.get("prompt")).encode("utf-8"))
        separator = encoder.item_separator.encode("utf-8")
    digest.update(b"]")
    return digest.hexdigest()


class RowWriter:
    """Appends rows to every layer of a store open for writing (see the module docstring).

    Use :meth:`start` on a new store or :meth:`resume` on an interrupted one, then
    :meth:`append` batch by batch and :meth:`finish`; write the unembedding and close the
    store as usual.

    Attributes
    ----------
    rows : int
        Rows committed so far.
    progress : dict
        The caller's facts committed with the last batch (e.g. how many batches are done).
    """

    def __init__(self, store: Any) -> None:
        self._store = store
        self._state: dict[str, Any] = store._meta[APPENDING]
        self._files: list[BinaryIO] = []

    @property
    def rows(self) -> int:
        return self._state["rows"]

    @property
    def progress(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._state["progress"]))

    @classmethod
    def start(
        cls,
        store: Any,
        weights: Callable[[int], tuple[Any, Any]],
        progress: Mapping[str, Any] | None = None,
    ) -> RowWriter:
        """Begin appending to a new store: write every layer's weights.

        Parameters
        ----------
        store : ActivationStore
            Open for writing, with no layer written yet.
        weights : callable
            ``weights(layer) -> (o_proj, bias)``: o_proj (d_model, n_heads * d_head) and the
            bias (d_model,) or None, as :meth:`write_layer` takes them; called once per layer.
        progress : mapping, optional
            The caller's facts before any batch (plain JSON).
        """
        store._require_writable()
        if store.n_samples is not None or APPENDING in store._meta:
            raise StoreError(f"{store.path}: rows were already written to this store")
        shapes = []
        files = []
        try:
            for layer in range(store.n_layers):
                o_proj, bias = weights(layer)
                tensors = {
                    "o_proj": checked(
                        o_proj,
                        f"layer {layer}: o_proj",
                        (store.d_model, store.n_heads * store.d_head),
                        weight_dtype(o_proj),
                        ("row", "column"),
                    )
                }
                if bias is not None:
                    tensors["o_bias"] = checked(
                        bias, f"layer {layer}: bias", (store.d_model,), weight_dtype(bias), ("row",)
                    )
                handle = open(store._dir / partial_name(layer_file(layer)), "w+b")  # noqa: SIM115
                files.append(handle)
                with _naming(handle.name):
                    handle.write(struct.pack("<Q", HEADER_BYTES) + b" " * HEADER_BYTES)
                    for array in tensors.values():
                        handle.write(array.tobytes())
                # A list, not an object: meta.json sorts keys, and this order is the files'.
                shapes.append([[name, _entry(array)] for name, array in tensors.items()])
            files.append(open(store._dir / partial_name(SAMPLES_FILE), "w+b"))  # noqa: SIM115
            for handle in files:
                _flush(handle)
        except BaseException:
            _close_quietly(files)
            raise
        progress = dict(progress or {})
        check_json(progress, "progress")
        store._meta[APPENDING] = {
            "rows": 0,
            "samples_bytes": 0,
            "weights": shapes,
            "progress": progress,
        }
        store._save_meta()
        writer = cls(store)
        writer._files = files
        return writer

    @classmethod
    def resume(cls, store: Any) -> RowWriter:
        """Continue appending to a store whose writer was interrupted (reopened with
        :meth:`somp_ref.store.ActivationStore.resume`): whatever was written after the last
        committed batch is cut off.

        Raises
        ------
        StoreError
            When the store is not being appended to, or a partial file is missing or
            shorter than what meta.json says was committed (rows would be lost).
        """
        store._require_writable()
        if APPENDING not in store._meta:
            raise StoreError(
                f"{store.path}: no rows are being appended to this store (it was not written "
                "batch by batch), nothing to resume"
            )
        writer = cls(store)
        try:
            for part, size in writer._committed_sizes():
                path = store._dir / partial_name(part)
                if not path.exists() and (store._dir / part).is_file():
                    os.replace(store._dir / part, path)  # renamed by an interrupted finish
                try:
                    handle = open(path, "r+b")  # noqa: SIM115
                except FileNotFoundError:
                    raise StoreError(
                        f"{path}: missing; the rows appended so far are lost"
                    ) from None
                writer._files.append(handle)
                found = os.fstat(handle.fileno()).st_size
                if found < size:
                    raise StoreError(
                        f"{path}: {found} bytes, fewer than the {size} committed: rows are lost"
                    )
                with _naming(path):
                    handle.truncate(size)
        except BaseException:
            writer._close_files()
            raise
        return writer

    def append(
        self,
        z: Sequence[Any],
        records: Sequence[Mapping[str, Any]],
        progress: Mapping[str, Any] | None = None,
    ) -> None:
        """Append one batch of rows to every layer, with their sample records, and commit it.

        Parameters
        ----------
        z : sequence of array_like, one per layer, each of shape (b, n_heads, d_head)
        records : sequence of mapping, length b
            One JSON record per row.
        progress : mapping, optional
            The caller's facts once this batch is committed (replace the previous ones).

        Raises
        ------
        ValueError, TypeError
            For arrays of the wrong shape or with non-finite values, or records that are
            not plain JSON (a key that is not a string, a NaN or infinity: see
            :meth:`~somp_ref.store.ActivationStore.write_samples`), naming the record's
            index; nothing is written then.
        OSError
            When a file cannot be written; the batch is not committed.
        """
        store = self._store
        self._require_appending()
        if len(z) != store.n_layers:
            raise ValueError(f"z must have one array per layer ({store.n_layers}), got {len(z)}")
        for index, record in enumerate(records):
            if not isinstance(record, Mapping):
                raise TypeError(
                    f"records[{index}] must be a mapping (a dict), got {type(record).__name__}"
                )
        progress = dict(progress if progress is not None else self._state["progress"])
        check_json(progress, "progress")
        if not records and all(np.shape(values)[:1] == (0,) for values in z):
            # A batch that kept no rows (a per-token rule on prompts without such tokens):
            # only the progress moves on.
            self._commit({**self._state, "progress": progress})
            return
        arrays = [
            checked(
                values,
                f"layer {layer}: z",
                (None, store.n_heads, store.d_head),
                store._meta["dtype"],
                ("sample", "head", None),
            )
            for layer, values in enumerate(z)
        ]
        n = arrays[0].shape[0]
        if any(array.shape[0] != n for array in arrays):
            raise ValueError(
                f"z must have the same rows in every layer, got {[len(a) for a in arrays]}"
            )
        records = [dict(record) for record in records]
        if len(records) != n:
            raise ValueError(f"records must have one entry per row ({n}), got {len(records)}")
        check_json(records, "records")  # strict, as write_samples: read back unchanged
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
        sizes = self._committed_sizes()
        for handle, (_, size), data in zip(
            self._files, sizes, [*(a.tobytes() for a in arrays), lines], strict=True
        ):
            with _naming(handle.name):  # a full disk names the file it filled
                handle.seek(size)
                handle.write(data)
                handle.truncate()
                _flush(handle)
        self._commit(
            {
                **self._state,
                "rows": self._state["rows"] + n,
                "samples_bytes": self._state["samples_bytes"] + len(lines),
                "progress": progress,
            }
        )

    def _commit(self, state: dict[str, Any]) -> None:
        """Save ``state`` in meta.json (the commit), and only then adopt it: a failed write
        leaves the writer at its last commit, so the batch may be appended again."""
        meta = self._store._meta
        previous = meta[APPENDING]
        meta[APPENDING] = state
        try:
            self._store._save_meta()
        except BaseException:
            meta[APPENDING] = previous
            raise
        self._state = state

    def _require_appending(self) -> None:
        self._store._require_writable()
        if not self._files:
            raise StoreError(f"{self._store.path}: this row writer is closed or finished")

    def finish(self) -> None:
        """Turn the partial files into the store's layer files and samples.jsonl, recorded
        like any part; then write the unembedding and close the store."""
        store = self._store
        self._require_appending()
        rows = self.rows
        if rows == 0:
            raise StoreError(f"{store.path}: no rows were appended")
        store._meta["n_samples"] = rows
        itemsize = np.dtype(store._meta["dtype"]).itemsize
        z_bytes = rows * store.n_heads * store.d_head * itemsize
        for layer, (handle, shapes) in enumerate(
            zip(self._files[:-1], self._state["weights"], strict=True)
        ):
            header: dict[str, Any] = {
                "__metadata__": {
                    "format": FORMAT,
                    "format_version": str(FORMAT_VERSION),
                    "layer": str(layer),
                }
            }
            offset = 0
            for name, entry in shapes:
                header[name] = {**entry, "data_offsets": [offset, offset + entry["bytes"]]}
                del header[name]["bytes"]
                offset += entry["bytes"]
            header["z"] = {
                "dtype": _SAFETENSORS_NAMES[np.dtype(store._meta["dtype"])],
                "shape": [rows, store.n_heads, store.d_head],
                "data_offsets": [offset, offset + z_bytes],
            }
            text = json.dumps(header, separators=(",", ":")).encode()
            if len(text) > HEADER_BYTES:  # unreachable within the schema's bounds
                raise StoreError(f"{store.path}: layer {layer}'s header outgrew its space")
            with _naming(handle.name):
                handle.truncate(8 + HEADER_BYTES + offset + z_bytes)
                handle.seek(8)
                handle.write(text.ljust(HEADER_BYTES))
                _flush(handle)
        samples = self._files[-1]
        with _naming(samples.name):
            samples.truncate(self._state["samples_bytes"])
            _flush(samples)
        samples.seek(0)
        hashed = prompts_hash(json.loads(line) for line in samples)
        self._close_files()
        names = [layer_file(layer) for layer in range(store.n_layers)] + [SAMPLES_FILE]
        for name in names:
            os.replace(store._dir / partial_name(name), store._dir / name)
        store._meta["prompts_hash"] = hashed
        store._meta["n_sample_records"] = rows
        # One write of meta.json makes the parts the store's: until then it still says rows
        # are being appended, and a resume renames the files back and finishes again.
        store._record_files(names, drop=APPENDING)

    def close(self) -> None:
        """Close the partial files (the store stays resumable where it was committed)."""
        self._close_files()

    def _committed_sizes(self) -> list[tuple[str, int]]:
        """(part, committed bytes of its partial file) for every layer, then the samples."""
        store = self._store
        row_bytes = store.n_heads * store.d_head * np.dtype(store._meta["dtype"]).itemsize
        sizes = []
        for layer, shapes in enumerate(self._state["weights"]):
            weights = sum(entry["bytes"] for _, entry in shapes)
            sizes.append((layer_file(layer), 8 + HEADER_BYTES + weights + self.rows * row_bytes))
        sizes.append((SAMPLES_FILE, self._state["samples_bytes"]))
        return sizes

    def _close_files(self) -> None:
        files, self._files = self._files, []
        _close_quietly(files)


def _entry(array: np.ndarray) -> dict[str, Any]:
    return {
        "dtype": _SAFETENSORS_NAMES[array.dtype],
        "shape": list(array.shape),
        "bytes": array.nbytes,
    }


def _flush(handle: BinaryIO) -> None:
    """To the disk (fsync), not just the OS's buffers, before meta.json commits the batch."""
    with _naming(handle.name):
        handle.flush()
        os.fsync(handle.fileno())


def _close_quietly(files: Iterable[BinaryIO]) -> None:
    """Close every partial file, ignoring what closing raises.

    Closing flushes what a failed write left in a file's buffer, and fails again the same
    way (a full disk): raised, that second error would hide the first, which names the file,
    and leave the other files open. Nothing is lost by ignoring it: every committed byte was
    flushed and fsynced before meta.json recorded it, and bytes past the commit are cut off.
    """
    for handle in files:
        with contextlib.suppress(OSError):
            handle.close()
