"""A store's files are what was written, or an error naming them: each file is hashed the
first time a store object reads it, layer files say which layer they hold, and a store
replaced under a reader is an error, never a mix of two stores."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from stores import write_planted_store

from somp_ref.ranking import rank_heads
from somp_ref.store import (
    META_FILE,
    SAMPLES_FILE,
    UNEMBED_FILE,
    ActivationStore,
    StoreError,
    layer_file,
)
from somp_ref.store import content as content_module

DIFFERS = r"content differs from when it was written \(sha256 mismatch\)"


def flip_data_byte(path: Path) -> None:
    """Flip the low bit of the 4th byte from the end: same size, and still a valid file (a
    tensor's mantissa bit; in samples.jsonl, the 'n' of the last '"train"}' turns 'o')."""
    data = bytearray(path.read_bytes())
    data[-4] ^= 0x01
    path.write_bytes(bytes(data))


def record_as_written(store_path: Path, name: str) -> None:
    """Record a part's current content in meta.json, as if the store had written it so."""
    meta = json.loads((store_path / META_FILE).read_text())
    content = (store_path / name).read_bytes()
    meta["files"][name] = {"bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}
    (store_path / META_FILE).write_text(json.dumps(meta))


def overwrite_with_other_data(path: Path, seed: int) -> None:
    """Replace the planted store at ``path`` by one of the same shapes, sizes and dtypes
    holding other numbers, as another writer would."""
    other = write_planted_store(path.parent / f"other-{seed}", seed=seed)
    with ActivationStore.create(
        path,
        n_layers=other.n_layers,
        n_heads=other.n_heads,
        d_head=other.d_head,
        d_model=other.d_model,
        meta={"model_id": "synthetic", "positions": "last"},
        overwrite=True,
    ) as store:
        for layer in range(other.n_layers):
            z, o_proj = other.layer(layer)
            store.write_layer(layer, z=z, o_proj=o_proj)
        store.write_unembed(other.unembed(), other.final_norm(), other.vocab())
        store.write_samples(other.samples())


def count_hashing(monkeypatch) -> list[int]:
    """A list that grows by one each time a store file is hashed by a read."""
    calls: list[int] = []
    real = content_module.sha256_of

    def counting(handle):
        calls.append(1)
        return real(handle)

    monkeypatch.setattr(content_module, "sha256_of", counting)
    return calls


# ---------------------------------------------------------------------- damaged files


def test_a_layer_file_copied_over_another_is_an_error_not_a_wrong_layer(tmp_path):
    store = write_planted_store(tmp_path / "s")
    (store.path / layer_file(2)).write_bytes((store.path / layer_file(1)).read_bytes())
    reopened = ActivationStore.open(store.path)  # same size: open() cannot tell
    reopened.layer(1)
    with pytest.raises(StoreError, match=r"layer_002.safetensors: " + DIFFERS):
        reopened.layer(2)


def test_two_swapped_layer_files_are_an_error(tmp_path):
    store = write_planted_store(tmp_path / "s")
    one, two = store.path / layer_file(1), store.path / layer_file(2)
    one.rename(tmp_path / "aside")
    two.rename(one)
    (tmp_path / "aside").rename(two)
    reopened = ActivationStore.open(store.path)
    for layer in (1, 2):
        with pytest.raises(StoreError, match=rf"layer_00{layer}.safetensors: " + DIFFERS):
            reopened.layer(layer)
    with pytest.raises(StoreError, match=DIFFERS):
        rank_heads(reopened, [3, 7, 11], n_atoms=2, show_progress=False)


def test_a_layer_file_recorded_under_another_layers_name_says_so(tmp_path):
    """Even with meta.json recording its hash, a file holding layer 1 is not layer 2."""
    store = write_planted_store(tmp_path / "s")
    (store.path / layer_file(2)).write_bytes((store.path / layer_file(1)).read_bytes())
    record_as_written(store.path, layer_file(2))
    with pytest.raises(
        StoreError, match=r"layer_002.safetensors: the file says layer '1', not layer 2"
    ):
        ActivationStore.open(store.path).layer(2)


@pytest.mark.parametrize(
    ("name", "read"),
    [
        (layer_file(1), lambda store: store.layer(1)),
        (layer_file(1), lambda store: store.layer_bias(1)),
        (layer_file(1), lambda store: store.head_output(1, 0)),
        (UNEMBED_FILE, lambda store: store.unembed()),
        (UNEMBED_FILE, lambda store: store.vocab()),
        (UNEMBED_FILE, lambda store: store.final_norm()),
        (SAMPLES_FILE, lambda store: store.samples()),
    ],
    ids=["layer", "layer_bias", "head_output", "unembed", "vocab", "final_norm", "samples"],
)
def test_a_flipped_byte_is_an_error_naming_the_file_whatever_reads_it(tmp_path, name, read):
    store = write_planted_store(tmp_path / "s")
    flip_data_byte(store.path / name)
    reopened = ActivationStore.open(store.path)
    with pytest.raises(StoreError, match=re.escape(name) + ": " + DIFFERS):
        read(reopened)
    with pytest.raises(StoreError, match=DIFFERS):  # every time, not just the first
        read(reopened)


def test_each_file_is_hashed_once_per_store_object_and_still_memory_mapped(tmp_path, monkeypatch):
    store = write_planted_store(tmp_path / "s")
    calls = count_hashing(monkeypatch)
    reopened = ActivationStore.open(store.path)
    assert calls == []  # opening reads no data
    z, _ = reopened.layer(0)
    assert len(calls) == 1 and isinstance(z, np.memmap)
    reopened.layer(0)
    reopened.head_output(0, 1)
    reopened.layer_bias(0)
    assert len(calls) == 1
    reopened.unembed()
    reopened.vocab()
    reopened.final_norm()
    assert len(calls) == 2
    reopened.verify()  # hashes every file again, whatever was read
    assert len(calls) == 2 + 5
    reopened.layer(2)
    reopened.samples()
    assert len(calls) == 7


def test_a_file_changed_after_its_first_read_is_hashed_again(tmp_path):
    store = write_planted_store(tmp_path / "s")
    reopened = ActivationStore.open(store.path)
    reopened.layer(1)
    target = store.path / layer_file(1)
    status = target.stat()
    flip_data_byte(target)  # in place: same inode, same size
    os.utime(target, ns=(status.st_atime_ns, status.st_mtime_ns))  # ctime still moves
    with pytest.raises(StoreError, match=r"layer_001.safetensors: " + DIFFERS):
        reopened.layer(1)


# ---------------------------------------------------------------------- a store replaced


def test_a_reader_of_a_store_overwritten_since_gets_an_error_not_the_new_data(tmp_path):
    path = tmp_path / "s"
    write_planted_store(path, seed=1)
    reader = ActivationStore.open(path)
    old_z0 = np.array(reader.layer(0)[0])
    overwrite_with_other_data(path, seed=2)
    assert all(  # only the content can tell
        (path / name).stat().st_size == info["bytes"] for name, info in reader.meta["files"].items()
    )
    changed = r"the store changed since it was opened .*; open it again"
    with pytest.raises(StoreError, match=r"layer_001.safetensors: " + DIFFERS + ": " + changed):
        reader.layer(1)
    with pytest.raises(StoreError, match=changed):  # a file read before is checked again
        reader.layer(0)
    fresh = ActivationStore.open(path)
    assert not np.array_equal(np.array(fresh.layer(0)[0]), old_z0)
    fresh.verify()


def test_a_damaged_file_is_told_apart_from_a_replaced_store(tmp_path):
    store = write_planted_store(tmp_path / "s")
    flip_data_byte(store.path / layer_file(0))
    with pytest.raises(StoreError, match=DIFFERS + r": the file is corrupt or was replaced$"):
        ActivationStore.open(store.path).layer(0)


# ---------------------------------------------------------------------- meta.json's facts


def say_in_meta(store_path: Path, **facts) -> None:
    meta = json.loads((store_path / META_FILE).read_text())
    (store_path / META_FILE).write_text(json.dumps(meta | facts))


@pytest.mark.parametrize(
    ("facts", "match"),
    [
        ({"n_samples": 39}, r"z has shape \(40, 4, 6\), meta.json's shapes make it \(39, 4, 6\)"),
        ({"n_samples": 41}, r"z has shape \(40, 4, 6\), meta.json's shapes make it \(41, 4, 6\)"),
        ({"n_samples": 1}, r"z has shape \(40, 4, 6\), meta.json's shapes make it \(1, 4, 6\)"),
        ({"dtype": "float16"}, r"z is float32, meta.json says float16"),
        ({"n_heads": 2, "d_head": 12}, r"z has shape \(40, 4, 6\), .* make it \(40, 2, 12\)"),
    ],
    ids=["fewer-rows", "more-rows", "one-row", "narrower-dtype", "heads-regrouped"],
)
def test_a_meta_json_that_the_files_contradict_is_refused_at_open(tmp_path, facts, match):
    """Sizes fit (the schema's lower bound passes), the files' hashes check out: only the
    tensors' headers can tell, and they are read when the store is opened."""
    store = write_planted_store(tmp_path / "s")
    say_in_meta(store.path, **facts)
    with pytest.raises(StoreError, match=r"layer_000.safetensors: " + match):
        ActivationStore.open(store.path)


@pytest.mark.parametrize("change", ["drop-last", "add-one", "blank-line"])
def test_a_samples_file_with_another_record_count_than_rows_is_found_by_verify(tmp_path, change):
    """Not at open (the records can be gigabytes, and every worker opens the store): by
    verify, and when the records are read (a blank line reads as no record)."""
    store = write_planted_store(tmp_path / "s")
    path = store.path / SAMPLES_FILE
    lines = path.read_text().splitlines(keepends=True)
    edited = {
        "drop-last": lines[:-1],
        "add-one": [*lines, lines[0]],
        "blank-line": [*lines[:3], "\n", *lines[3:]],
    }[change]
    path.write_text("".join(edited))
    record_as_written(store.path, SAMPLES_FILE)
    count = 39 if change == "drop-last" else 41
    reader = ActivationStore.open(store.path)
    with pytest.raises(StoreError, match=rf"samples.jsonl: {count} records for 40 rows"):
        reader.verify()
    if change != "blank-line":
        with pytest.raises(StoreError, match=rf"samples.jsonl: {count} records for 40 rows"):
            reader.samples()


def test_samples_checks_its_record_count_when_read(tmp_path):
    """A samples file changed after the store was opened (its hash refreshed too)."""
    store = write_planted_store(tmp_path / "s")
    reader = ActivationStore.open(store.path)
    path = store.path / SAMPLES_FILE
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]) + "\n")
    reader._meta["files"][SAMPLES_FILE] = {
        "bytes": path.stat().st_size,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    with pytest.raises(StoreError, match=r"samples.jsonl: 39 records for 40 rows"):
        reader.samples()


def test_a_layer_file_with_a_tensor_a_store_does_not_write_is_refused(tmp_path):
    from safetensors.numpy import save_file

    store = write_planted_store(tmp_path / "s")
    z, o_proj = store.layer(0)
    path = store.path / layer_file(0)
    tensors = {"z": np.array(z), "o_proj": np.array(o_proj), "extra": np.ones(3, np.float32)}
    save_file(tensors, str(path), {"layer": "0"})
    record_as_written(store.path, layer_file(0))
    with pytest.raises(StoreError, match=r"layer_000.safetensors: holds a tensor 'extra'"):
        ActivationStore.open(store.path)
    bias = np.ones(24, np.float16)  # weights narrower than a store writes them
    save_file({"z": np.array(z), "o_proj": np.array(o_proj), "o_bias": bias}, str(path))
    record_as_written(store.path, layer_file(0))
    with pytest.raises(StoreError, match=r"o_bias is float16, a store writes weights in float32"):
        ActivationStore.open(store.path)


def test_an_unembedding_of_another_width_is_refused_at_open(tmp_path):
    from safetensors.numpy import save_file

    store = write_planted_store(tmp_path / "s")
    save_file({"unembed": np.ones((60, 23), np.float32)}, str(store.path / UNEMBED_FILE))
    record_as_written(store.path, UNEMBED_FILE)
    with pytest.raises(StoreError, match=r"unembed has shape \(60, 23\), .* make it \(v, 24\)"):
        ActivationStore.open(store.path)


def test_opening_reads_headers_only_whatever_the_number_of_layers(tmp_path, monkeypatch):
    """The checks at open read each layer file's header: no tensor is mapped and no file is
    hashed, so a store of many layers opens at the cost of its headers."""
    from somp_ref.store import reading

    store = write_planted_store(tmp_path / "s", n_layers=64, n_samples=5)
    calls = count_hashing(monkeypatch)

    def no_mapping(*args, **kwargs):
        raise AssertionError("a tensor was mapped")

    monkeypatch.setattr(reading, "map_tensors", no_mapping)
    reopened = ActivationStore.open(store.path)
    assert calls == [] and reopened.n_samples == 5
