"""Writing an opened store: each part checked, written atomically and recorded (size and
SHA-256) in meta.json, which says ``"complete": true`` only once :meth:`close` has seen every
part and swapped the store in for the one it replaces."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from somp_ref.files import write_bytes_atomically, write_text_atomically
from somp_ref.store.arrays import checked, weight_dtype
from somp_ref.store.facts import StoreFacts, check_index
from somp_ref.store.json_values import check_json, json_bytes
from somp_ref.store.layout import (
    FORMAT,
    FORMAT_VERSION,
    META_FILE,
    REPLACING,
    SAMPLES_FILE,
    UNEMBED_FILE,
    StoreError,
    layer_file,
)
from somp_ref.store.regular_files import sha256
from somp_ref.store.replacing import remove_store_dir, swap_in, worth_resuming
from somp_ref.store.row_appending import prompts_hash
from somp_ref.store.safetensors_files import MAX_METADATA_BYTES, write_tensors
from somp_ref.store.schema import MAX_META_BYTES

_Writer = TypeVar("_Writer", bound="StoreWriting")


class StoreWriting(StoreFacts):
    """The writing methods of :class:`somp_ref.store.ActivationStore`."""

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
        TypeError
            For a layer that is not an int (a bool, a float).
        ValueError
            For a layer out of range, a wrong shape, or a value that is not finite once
            stored (NaN, Inf, or too large for the store's dtype), naming layer, sample and
            head, or row and column.
        OSError
            When the file cannot be written (a full disk: ENOSPC, EFBIG), naming it.
        """
        self._require_writable()
        layer = check_index(layer, "layer", self.n_layers)
        z = checked(
            z,
            f"layer {layer}: z",
            (None, self.n_heads, self.d_head),
            self._meta["dtype"],
            ("sample", "head", None),
        )
        o_proj = checked(
            o_proj,
            f"layer {layer}: o_proj",
            (self.d_model, self.n_heads * self.d_head),
            weight_dtype(o_proj),
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
            tensors["o_bias"] = checked(
                bias, f"layer {layer}: bias", (self.d_model,), weight_dtype(bias), ("row",)
            )
        self._save_tensors(layer_file(layer), tensors, {"layer": str(layer)})

    def write_unembed(self, unembed, final_norm=None, vocab: Sequence[str] | None = None) -> None:
        """Write the unembedding (v, d_model), the final norm's weight (d_model,) if any, and
        the vocabulary strings (v,) if known. Non-finite values are refused by row/column."""
        self._require_writable()
        unembed = checked(
            unembed, "unembed", (None, self.d_model), weight_dtype(unembed), ("row", "column")
        )
        tensors = {"unembed": unembed}
        if final_norm is not None:
            tensors["final_norm"] = checked(
                final_norm, "final_norm", (self.d_model,), weight_dtype(final_norm), ("row",)
            )
        metadata = {}
        if vocab is not None:
            vocab = [str(token) for token in vocab]
            if len(vocab) != unembed.shape[0]:
                raise ValueError(
                    f"vocab must have one string per unembedding row ({unembed.shape[0]}), "
                    f"got {len(vocab)}"
                )
            check_json(vocab, "vocab", strict=False)
            metadata["vocab"] = json.dumps(vocab, ensure_ascii=False)
            size = len(json.dumps(metadata["vocab"], ensure_ascii=False).encode("utf-8"))
            if size > MAX_METADATA_BYTES:
                raise ValueError(
                    f"vocab: {size} bytes in the file's header, over the {MAX_METADATA_BYTES} "
                    "a safetensors header may hold"
                )
        self._save_tensors(UNEMBED_FILE, tensors, metadata)

    def write_samples(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Write one JSON record per sample row (prompt, label, split, ...).

        Raises
        ------
        TypeError
            For a record that is not a mapping, or holds a key that is not a string or a
            value that is not plain JSON (a numpy scalar, a set), naming the record's index
            and the place in it.
        ValueError
            For a NaN or infinity, an integer beyond 64 bits, a string that is not valid
            Unicode, or as many records as rows; nothing is written then.
        """
        self._require_writable()
        records = list(records)
        for index, record in enumerate(records):
            if not isinstance(record, Mapping):
                raise TypeError(
                    f"records[{index}] must be a mapping (a dict), got {type(record).__name__}"
                )
        records = [dict(record) for record in records]
        # Strict: json.dumps would write {1: x} as {"1": x} and NaN as a bare NaN (not
        # JSON): a record read back would differ from the one written, or not parse.
        check_json(records, "records")
        if self.n_samples is not None and len(records) != self.n_samples:
            raise ValueError(
                f"records must have one entry per sample row ({self.n_samples}), got {len(records)}"
            )
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        write_text_atomically(self._dir / SAMPLES_FILE, text)
        self._meta["prompts_hash"] = prompts_hash(records)
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
        if not self._meta["complete"]:  # (a resumed replacement may be complete already)
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
            if REPLACING in self._meta:  # in place now: what it replaced is gone
                del self._meta[REPLACING]
                self._save_meta()
        self._writable = False
        self._lock.release()

    def __enter__(self: _Writer) -> _Writer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.close()
        finally:
            self._abandon()  # after an error; nothing to do after a successful close

    def _require_writable(self) -> None:
        if not self._writable:
            raise StoreError(f"{self.path} is open for reading; use ActivationStore.resume")

    def _save_tensors(
        self, name: str, tensors: dict[str, np.ndarray], metadata: dict[str, str]
    ) -> None:
        metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), **metadata}
        write_tensors(self._dir / name, tensors, metadata)
        self._record_file(name)

    def _record_file(self, name: str) -> None:
        self._record_files([name])

    def _record_files(self, names: Sequence[str], *, drop: str | None = None) -> None:
        """Record the size and hash of each file in ``names``, and forget the meta key
        ``drop``, in one write of meta.json."""
        for name in names:
            path = self._dir / name
            self._content.forget(name)
            self._meta["files"][name] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
        if drop is not None:
            del self._meta[drop]
        self._save_meta()

    def _save_meta(self) -> None:
        data = json_bytes(self._meta)
        if len(data) > MAX_META_BYTES:  # create() refuses facts that could get here
            raise StoreError(
                f"{self._dir / META_FILE}: would be {len(data)} bytes, over the "
                f"{MAX_META_BYTES} a store's meta.json may hold"
            )
        write_bytes_atomically(self._dir / META_FILE, data)

    def _swap_in(self) -> None:
        """Put the finished store, built beside the one it replaces, in that one's place."""
        swap_in(self._dir, self._target, self._replaces)
        self._dir = self._target

    def _abandon(self) -> None:
        """Stop writing after an error and release the lock. A store built beside the one it
        replaces is deleted (the old store stays), unless it was made resumable and holds
        rows: then it is kept for :meth:`resume`; a new store stays incomplete, resumable."""
        if not self._writable:
            return
        if self._replaces is not None and not worth_resuming(self._meta):
            remove_store_dir(self._dir, self.n_layers)
        self._writable = False
        self._lock.release()
