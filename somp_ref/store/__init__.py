"""The on-disk activation store: what each head wrote, layer by layer, in safetensors.

A store is a directory::

    meta.json                 format version, model, shapes, positions rule, dtype, state
    layer_000.safetensors     z (n_samples, n_heads, d_head) = hook_z at the kept positions,
    ...                       o_proj (d_model, n_heads * d_head), optional o_bias (d_model,)
    unembed.safetensors       unembed (vocab, d_model), optional final_norm (d_model,);
                              the vocabulary strings in the file's metadata
    samples.jsonl             one JSON record (prompt, label, split, ...) per sample row

The store never loses or invents data:

* Every file is written under a temporary name, flushed to disk and renamed into place
  (:func:`somp_ref.files.write_atomically`; rows appended batch by batch go to a ``.rows``
  file that is renamed into place when finished), so a file either is complete or is
  absent.
  ``meta.json`` says ``"complete": false`` until :meth:`~ActivationStore.close` has seen
  every part; :meth:`ActivationStore.open` refuses an incomplete store, a file whose size
  differs from the one recorded, and an unknown format version, naming the file.
* One writer per store: :meth:`~ActivationStore.create` and :meth:`~ActivationStore.resume`
  take an exclusive lock on ``PARENT/.NAME.lock`` (a second writer fails at once), PARENT
  being the real path of the store's parent directory, so every path to a store (a
  symlinked parent, ``..``) meets the same lock; a symlink to a store, and the hidden
  copies an overwrite makes (``.NAME.new-*``, ``.NAME.old-*``), are refused for writing.
* ``overwrite=True`` replaces only a directory that is a store holding nothing but its own
  files. The new store is built in a hidden sibling ``PARENT/.NAME.new-*`` and swapped in by
  :meth:`~ActivationStore.close`, so an error or a killed process leaves the old store as it
  was; the old store's own files are then unlinked (never through a symlink, never
  recursively) and anything else found in it is kept, with a warning. What a killed
  overwrite leaves beside the path is deleted later only where it is provably not the only
  copy of a store; a swap killed between its two renames makes writing the path refused,
  and reading it an error naming both copies and how to recover one.
* ``meta.json`` is checked against a schema (types, bounds, file names, sizes) before use,
  and a safetensors header (dtypes, shapes, contiguous in-bounds offsets) before its tensors
  are mapped; every file must be a regular file (no symlink, device or FIFO). Opening a
  store checks that its parts agree with meta.json exactly: each tensor's dtype and shape
  (from the headers alone; no tensor data is read); one sample record per row is checked
  when the records are read, by ``verify`` and before a merge.
* Each file's SHA-256 is checked against meta.json's record the first time a store object
  reads it (then mapped from the very file hashed), and a layer file must say it holds the
  layer asked for: a damaged, swapped or copied file, or a store replaced under a reader,
  is an error naming the file, never a silent result.
* Non-finite values are refused at write time, naming the first one's place; meta facts
  must be plain JSON with valid Unicode, small enough for meta.json to stay readable, and
  are checked before anything is made on disk.

Tensors are read memory-mapped, one layer at a time; opening a store never runs code
(safetensors holds no pickles).

Modules: :mod:`~somp_ref.store.layout` (format, file names, :class:`StoreError`),
:mod:`~somp_ref.store.schema` and :mod:`~somp_ref.store.json_values` (meta.json),
:mod:`~somp_ref.store.regular_files`, :mod:`~somp_ref.store.safetensors_files` and
:mod:`~somp_ref.store.content` (the files, and their hashes), :mod:`~somp_ref.store.arrays`
(what a writer hands in), :mod:`~somp_ref.store.locations`, :mod:`~somp_ref.store.locking`
and :mod:`~somp_ref.store.replacing` (one writer, overwrite by swap), and
:mod:`~somp_ref.store.activation_store` with its :mod:`~somp_ref.store.facts`,
:mod:`~somp_ref.store.reading` and :mod:`~somp_ref.store.writing` halves;
:mod:`~somp_ref.store.row_appending` (rows batch by batch, resumable) and
:mod:`~somp_ref.store.merging` (one store from several).
"""

from somp_ref.store.activation_store import ActivationStore
from somp_ref.store.layout import (
    FORMAT,
    FORMAT_VERSION,
    META_FILE,
    SAMPLES_FILE,
    STORE_DTYPES,
    UNEMBED_FILE,
    StoreError,
    layer_file,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "META_FILE",
    "SAMPLES_FILE",
    "STORE_DTYPES",
    "UNEMBED_FILE",
    "ActivationStore",
    "StoreError",
    "layer_file",
]
