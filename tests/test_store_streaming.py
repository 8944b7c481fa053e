"""Rows appended batch by batch: the same store as one written whole, nothing lost or
invented by an interruption, and shards merged back into one store."""

from __future__ import annotations

import hashlib
import json
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from stores import write_planted_store

from somp_ref.store import ActivationStore, StoreError
from somp_ref.store.merging import merge_stores
from somp_ref.store.replacing import remove_store_dir
from somp_ref.store.row_appending import RowWriter, partial_name, prompts_hash

SHAPES = {"n_layers": 2, "n_heads": 3, "d_head": 4, "d_model": 8}


def _data(n: int, seed: int = 0, with_bias: bool = True):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((SHAPES["n_layers"], n, 3, 4)).astype(np.float32)
    weights = [
        (
            rng.standard_normal((8, 12)),
            rng.standard_normal(8) if with_bias and layer == 0 else None,
        )
        for layer in range(SHAPES["n_layers"])
    ]
    records = [{"prompt": f"p{i} é", "i": i} for i in range(n)]
    return z, weights, records


def _whole(path, z, weights, records, unembed):
    with ActivationStore.create(path, **SHAPES) as store:
        for layer, (o_proj, bias) in enumerate(weights):
            store.write_layer(layer, z=z[layer], o_proj=o_proj, bias=bias)
        store.write_unembed(unembed)
        store.write_samples(records)
    return ActivationStore.open(path)


def _appended(path, z, weights, records, unembed, cuts):
    with ActivationStore.create(path, **SHAPES) as store:
        writer = RowWriter.start(store, lambda layer: weights[layer])
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            writer.append([zl[a:b] for zl in z], records[a:b], {"upto": b})
        writer.finish()
        store.write_unembed(unembed)
    return ActivationStore.open(path)


def _same_content(a: ActivationStore, b: ActivationStore) -> None:
    assert a.n_samples == b.n_samples
    for layer in range(a.n_layers):
        (za, wa), (zb, wb) = a.layer(layer), b.layer(layer)
        assert np.array_equal(za, zb) and np.array_equal(wa, wb)  # copies: exact
        ba, bb = a.layer_bias(layer), b.layer_bias(layer)
        assert (ba is None and bb is None) or np.array_equal(ba, bb)
    assert a.samples() == b.samples()
    assert a.meta["prompts_hash"] == b.meta["prompts_hash"]
    assert np.array_equal(a.unembed(), b.unembed())


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 30), data=st.data())
def test_appending_batch_by_batch_gives_the_store_written_whole(tmp_path_factory, n, data):
    cuts = sorted(set(data.draw(st.lists(st.integers(1, n - 1), max_size=6)) if n > 1 else []))
    cuts = [0, *cuts, n]
    z, weights, records = _data(n, seed=n)
    unembed = np.eye(8)
    tmp = tmp_path_factory.mktemp("s")
    whole = _whole(tmp / "whole", z, weights, records, unembed)
    appended = _appended(tmp / "appended", z, weights, records, unembed, cuts)
    _same_content(whole, appended)
    appended.verify()


def test_a_streamed_layer_file_is_read_by_safetensors_itself(tmp_path):
    safetensors = pytest.importorskip("safetensors.numpy")
    z, weights, records = _data(5)
    store = _appended(tmp_path / "s", z, weights, records, np.eye(8), [0, 2, 5])
    loaded = safetensors.load_file(str(tmp_path / "s" / "layer_000.safetensors"))
    assert np.array_equal(loaded["z"], z[0])
    assert np.array_equal(loaded["o_proj"], weights[0][0])  # float64 weights stay float64
    assert (
        store.meta["files"]["layer_000.safetensors"]["bytes"]
        == (tmp_path / "s" / "layer_000.safetensors").stat().st_size
    )


# Prompts a hash must not be thrown by: quotes, a backslash, a newline, non-ASCII (kept as is
# with ensure_ascii=False), no prompt, a record without one, a nested value.
_AWKWARD_PROMPTS = [
    {"prompt": 'say "hi" é ✓ 🎨 \\ \n'},
    {"prompt": None},
    {"other": 1},
    {"prompt": "plain"},
    {"prompt": {"a": [1, "b"]}},
]
# prompts_hash of _AWKWARD_PROMPTS as stores written so far record it: a change of the
# encoding would make every existing store's hash disagree with its samples.
_AWKWARD_HASH = "879a2a9c7da9a73067e7622c855c247fa1131aa96d94a718c93913c038428592"


def _whole_list_hash(records) -> str:
    """The definition meta.json's prompts_hash follows, computed on the whole list."""
    prompts = json.dumps([record.get("prompt") for record in records], ensure_ascii=False)
    return hashlib.sha256(prompts.encode("utf-8")).hexdigest()


@settings(max_examples=20, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=5), st.none(), st.integers()), max_size=6))
def test_the_streamed_prompts_hash_is_the_whole_lists(prompts):
    records = [{"prompt": p} for p in prompts] + [{"other": 1}]
    assert prompts_hash(iter(records)) == _whole_list_hash(records)


def test_the_prompts_hash_of_awkward_prompts_is_the_one_stores_record():
    assert prompts_hash(_AWKWARD_PROMPTS) == _whole_list_hash(_AWKWARD_PROMPTS) == _AWKWARD_HASH
    assert prompts_hash([]) == _whole_list_hash([])


def test_a_store_written_whole_and_one_appended_record_the_same_prompts_hash(tmp_path):
    n = len(_AWKWARD_PROMPTS)
    z, weights, _ = _data(n)
    whole = _whole(tmp_path / "whole", z, weights, _AWKWARD_PROMPTS, np.eye(8))
    appended = _appended(tmp_path / "appended", z, weights, _AWKWARD_PROMPTS, np.eye(8), [0, 2, n])
    assert whole.meta["prompts_hash"] == appended.meta["prompts_hash"] == _AWKWARD_HASH


def _interrupted(path, z, weights, records, batches_done, garbage=True):
    """A store whose writer committed ``batches_done`` batches of 2 rows, then died while
    writing the next one (some bytes of it on disk, not committed)."""
    store = ActivationStore.create(path, **SHAPES)
    writer = RowWriter.start(store, lambda layer: weights[layer], {"batches": 0})
    for i in range(batches_done):
        a = 2 * i
        writer.append([zl[a : a + 2] for zl in z], records[a : a + 2], {"batches": i + 1})
    writer.close()
    if garbage:  # the next batch half written: bytes past the committed sizes
        with open(path / partial_name("layer_000.safetensors"), "ab") as handle:
            handle.write(b"\x7f" * 40)
        with open(path / partial_name("samples.jsonl"), "ab") as handle:
            handle.write(b'{"prompt": "inven')
    store._abandon()  # what the with block does on an error: release the lock
    return store


def test_an_interrupted_writer_resumes_from_its_last_commit_with_nothing_invented(tmp_path):
    z, weights, records = _data(8)
    _interrupted(tmp_path / "s", z, weights, records, batches_done=2)
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore.open(tmp_path / "s")
    store = ActivationStore.resume(tmp_path / "s")
    writer = RowWriter.resume(store)
    assert writer.rows == 4 and writer.progress == {"batches": 2}
    writer.append([zl[4:8] for zl in z], records[4:8], {"batches": 3})
    writer.finish()
    store.write_unembed(np.eye(8))
    store.close()
    whole = _whole(tmp_path / "whole", z, weights, records, np.eye(8))
    _same_content(whole, ActivationStore.open(tmp_path / "s"))


def test_a_partial_file_shorter_than_committed_is_lost_rows_not_a_silent_store(tmp_path):
    z, weights, records = _data(6)
    _interrupted(tmp_path / "s", z, weights, records, batches_done=2, garbage=False)
    partial = tmp_path / "s" / partial_name("layer_001.safetensors")
    with open(partial, "r+b") as handle:
        handle.truncate(partial.stat().st_size - 1)
    store = ActivationStore.resume(tmp_path / "s")
    with pytest.raises(StoreError, match="fewer than the .* committed: rows are lost"):
        RowWriter.resume(store)
    store._abandon()


def test_bad_batches_are_refused_before_anything_is_written(tmp_path):
    z, weights, records = _data(4)
    store = ActivationStore.create(tmp_path / "s", **SHAPES)
    writer = RowWriter.start(store, lambda layer: weights[layer])
    bad = z.copy()
    bad[1, 1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="layer 1: z is not finite at sample 1, head 2"):
        writer.append(list(bad), records)
    with pytest.raises(ValueError, match="one entry per row"):
        writer.append(list(z), records[:3])
    with pytest.raises(ValueError, match="same rows in every layer"):
        writer.append([z[0], z[1][:3]], records)
    assert writer.rows == 0
    with pytest.raises(StoreError, match="no rows"):
        writer.finish()
    writer.close()
    store._abandon()


def test_an_interrupted_store_is_removed_whole_with_its_partial_files(tmp_path):
    z, weights, records = _data(4)
    _interrupted(tmp_path / "s", z, weights, records, batches_done=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a leftover file would warn
        remove_store_dir(tmp_path / "s", None)
    assert not (tmp_path / "s").exists()


def test_an_interrupted_store_can_be_overwritten(tmp_path):
    z, weights, records = _data(4)
    _interrupted(tmp_path / "s", z, weights, records, batches_done=1)
    _appended(tmp_path / "s2", z, weights, records, np.eye(8), [0, 4])
    with ActivationStore.create(tmp_path / "s", overwrite=True, **SHAPES) as store:
        writer = RowWriter.start(store, lambda layer: weights[layer])
        writer.append(list(z), records)
        writer.finish()
        store.write_unembed(np.eye(8))
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == sorted(
        p.name for p in (tmp_path / "s2").iterdir()
    )


@pytest.mark.parametrize("sizes", [(7,), (3, 5, 1)])
def test_shards_merge_into_the_store_they_were_cut_from(tmp_path, sizes):
    n = sum(sizes)
    whole = write_planted_store(tmp_path / "whole", n_samples=n)
    edges = np.cumsum([0, *sizes])
    shards = []
    for i, (a, b) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        path = tmp_path / f"shard{i}"
        with ActivationStore.create(
            path,
            n_layers=whole.n_layers,
            n_heads=whole.n_heads,
            d_head=whole.d_head,
            d_model=whole.d_model,
            meta={"model_id": "synthetic", "positions": "last"},
        ) as store:
            for layer in range(whole.n_layers):
                z, o_proj = whole.layer(layer)
                store.write_layer(layer, z=z[a:b], o_proj=o_proj)
            store.write_unembed(whole.unembed(), whole.final_norm(), whole.vocab())
            store.write_samples(whole.samples()[a:b])
        shards.append(path)
    merged = merge_stores(shards, tmp_path / "merged", chunk_rows=2, show_progress=False)
    _same_content(whole, merged)
    assert merged.meta["model_id"] == "synthetic"
    assert merged.meta["merged_from"] == [str(p) for p in shards]


def test_shards_of_different_exports_are_refused(tmp_path):
    a = write_planted_store(tmp_path / "a", n_samples=5)
    b = write_planted_store(tmp_path / "b", n_samples=5, seed=1)  # other weights
    with pytest.raises(StoreError, match="unembeddings differ"):
        merge_stores([a.path, b.path], tmp_path / "m", show_progress=False)
    meta = json.loads((tmp_path / "b" / "meta.json").read_text())
    assert meta["positions"] == "last"
    c = write_planted_store(tmp_path / "c", n_samples=5, n_heads=5)
    with pytest.raises(StoreError, match="n_heads 5 != 4"):
        merge_stores([a.path, c.path], tmp_path / "m", show_progress=False)
    assert not (tmp_path / "m").exists()


def test_a_writer_killed_while_finishing_resumes_and_finishes(tmp_path, monkeypatch):
    z, weights, records = _data(6)
    _interrupted(tmp_path / "s", z, weights, records, batches_done=3, garbage=False)
    store = ActivationStore.resume(tmp_path / "s")
    writer = RowWriter.resume(store)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # after the renames, before meta.json records the parts

    monkeypatch.setattr(ActivationStore, "_record_files", killed)
    with pytest.raises(KeyboardInterrupt):
        writer.finish()
    store._abandon()
    monkeypatch.undo()
    assert (tmp_path / "s" / "layer_000.safetensors").exists()  # renamed, not recorded
    store = ActivationStore.resume(tmp_path / "s")
    writer = RowWriter.resume(store)
    assert writer.rows == 6
    writer.finish()
    store.write_unembed(np.eye(8))
    store.close()
    _same_content(
        _whole(tmp_path / "w", z, weights, records, np.eye(8)), ActivationStore.open(tmp_path / "s")
    )


def test_line_separators_inside_records_stay_inside_them(tmp_path):
    z, weights, records = _data(3)
    records[1]["prompt"] = "one\u2028two\u2029three\x85four"  # str.splitlines breaks at these
    store = _appended(tmp_path / "s", z, weights, records, np.eye(8), [0, 3])
    assert store.samples() == records
    whole = _whole(tmp_path / "w", z, weights, records, np.eye(8))
    assert whole.samples() == records


def test_a_batch_without_rows_commits_only_its_progress(tmp_path):
    z, weights, records = _data(4)
    with ActivationStore.create(tmp_path / "s", **SHAPES) as store:
        writer = RowWriter.start(store, lambda layer: weights[layer], {"batches": 0})
        writer.append([zl[:2] for zl in z], records[:2], {"batches": 1})
        writer.append([np.zeros((0, 3, 4))] * 2, [], {"batches": 2})
        writer.append([zl[2:] for zl in z], records[2:], {"batches": 3})
        assert writer.rows == 4 and writer.progress == {"batches": 3}
        writer.finish()
        store.write_unembed(np.eye(8))
    _same_content(
        _whole(tmp_path / "w", z, weights, records, np.eye(8)), ActivationStore.open(tmp_path / "s")
    )


def test_a_batch_whose_commit_failed_is_appended_again_not_twice(tmp_path, monkeypatch):
    z, weights, records = _data(5)
    with ActivationStore.create(tmp_path / "s", **SHAPES) as store:
        writer = RowWriter.start(store, lambda layer: weights[layer])
        writer.append([zl[:2] for zl in z], records[:2])
        real = ActivationStore._save_meta

        def full_disk(self):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(ActivationStore, "_save_meta", full_disk)
        with pytest.raises(OSError):
            writer.append([zl[2:] for zl in z], records[2:])
        monkeypatch.setattr(ActivationStore, "_save_meta", real)
        assert writer.rows == 2
        writer.append([zl[2:] for zl in z], records[2:])  # the retry
        writer.finish()
        with pytest.raises(StoreError, match="closed or finished"):
            writer.append([zl[:1] for zl in z], records[:1])
        store.write_unembed(np.eye(8))
    _same_content(
        _whole(tmp_path / "w", z, weights, records, np.eye(8)), ActivationStore.open(tmp_path / "s")
    )


def test_a_merged_store_merges_again(tmp_path):
    a = write_planted_store(tmp_path / "a", n_samples=3)
    b = write_planted_store(tmp_path / "b", n_samples=3)  # the same export, again
    ab = merge_stores([a.path, b.path], tmp_path / "ab", show_progress=False)
    abc = merge_stores([ab.path, a.path], tmp_path / "abc", show_progress=False)
    assert abc.n_samples == 9
    assert np.array_equal(abc.layer(0)[0][6:], a.layer(0)[0])
    with pytest.raises(StoreError, match="already exists"):
        merge_stores([a.path], tmp_path / "ab", show_progress=False)


def test_a_merge_into_a_folder_inside_a_shard_is_refused_and_into_a_shard_replaces_it(tmp_path):
    a = write_planted_store(tmp_path / "a", n_samples=3)
    b = write_planted_store(tmp_path / "b", n_samples=3)
    before = _snapshot(a.path)
    for out in (a.path / "sub", a.path / "sub" / "deeper", tmp_path / "link" / "sub"):
        (tmp_path / "link").unlink(missing_ok=True)
        (tmp_path / "link").symlink_to(a.path)  # the same folder by another path
        with pytest.raises(StoreError, match=r"is inside the store .*a it merges"):
            merge_stores([b.path, a.path], out, show_progress=False)
        assert _snapshot(a.path) == before  # no folder made inside the shard
    merged = merge_stores([a.path, b.path], a.path, overwrite=True, show_progress=False)
    assert merged.n_samples == 6 and np.array_equal(merged.layer(0)[0][3:], b.layer(0)[0])


def _refresh(store_path, name):
    """Record a part's current content in meta.json, as if the store had written it so."""
    meta = json.loads((store_path / "meta.json").read_text())
    content = (store_path / name).read_bytes()
    meta["files"][name] = {"bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}
    (store_path / "meta.json").write_text(json.dumps(meta))


def test_a_shard_whose_records_cannot_be_merged_is_named(tmp_path):
    a = write_planted_store(tmp_path / "a", n_samples=4)
    b = write_planted_store(tmp_path / "b", n_samples=4)
    samples = b.path / "samples.jsonl"
    lines = samples.read_text().splitlines(keepends=True)
    samples.write_text("".join(lines[:-1]))  # 3 records for 4 rows
    _refresh(b.path, "samples.jsonl")
    with pytest.raises(StoreError, match=r"b/samples.jsonl: 3 records for 4 rows"):
        merge_stores([a.path, b.path], tmp_path / "m", show_progress=False)
    lines[2] = '{"prompt": "prompt 2", "score": NaN}\n'  # as a lenient writer stored it
    samples.write_text("".join(lines))
    _refresh(b.path, "samples.jsonl")
    with pytest.raises(StoreError, match=r"b, rows 0-3: records\[2\]\['score'\] is nan"):
        merge_stores([a.path, b.path], tmp_path / "m", show_progress=False)


def test_a_failed_append_names_the_file_and_leaves_the_last_commit(tmp_path, monkeypatch):
    """An OSError of an open file names no file ('[Errno 28] No space left on device'):
    the writer names it, and closing the writer afterwards raises nothing more."""
    import errno
    import os

    z, weights, records = _data(6)
    store = ActivationStore.create(tmp_path / "s", **SHAPES)
    writer = RowWriter.start(store, lambda layer: weights[layer])
    writer.append([zl[:2] for zl in z], records[:2], {})
    real = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match=r"No space left on device") as raised:
        writer.append([zl[2:] for zl in z], records[2:], {})
    assert raised.value.filename == str(tmp_path / "s" / partial_name("layer_000.safetensors"))
    monkeypatch.setattr(os, "fsync", real)
    writer.close()  # nothing raised, every file closed
    store._abandon()
    resumed = ActivationStore.resume(tmp_path / "s")
    writer = RowWriter.resume(resumed)
    assert writer.rows == 2  # the last commit
    writer.append([zl[2:] for zl in z], records[2:], {})
    writer.finish()
    resumed.write_unembed(np.eye(8))
    resumed.close()
    _same_content(
        _whole(tmp_path / "whole", z, weights, records, np.eye(8)),
        ActivationStore.open(tmp_path / "s"),
    )


def _snapshot(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@settings(max_examples=10, deadline=None)
@given(batches_done=st.integers(0, 3), data=st.data())
def test_an_interrupted_overwrite_keeps_the_old_store_and_resumes_the_new(
    tmp_path_factory, batches_done, data
):
    """An overwrite written batch by batch that dies after ``batches_done`` batches: the
    old store stays whole; with rows committed, resume continues the new one beside it and
    swaps it in; without, nothing of it is left."""
    tmp = tmp_path_factory.mktemp("s")
    old_z, old_weights, old_records = _data(4, seed=1)
    old = _whole(tmp / "s", old_z, old_weights, old_records, np.eye(8))
    before = _snapshot(old.path)
    n = 8
    z, weights, records = _data(n, seed=2)
    store = ActivationStore.create(tmp / "s", **SHAPES, overwrite=True, resumable=True)
    writer = RowWriter.start(store, lambda layer: weights[layer], {"batches": 0})
    for i in range(batches_done):
        writer.append([zl[2 * i : 2 * i + 2] for zl in z], records[2 * i : 2 * i + 2], {})
    writer.close()
    store._abandon()  # what the with block does on an error
    assert _snapshot(tmp / "s") == before
    ActivationStore.open(tmp / "s").verify()
    kept = list(tmp.glob(".s.new-*"))
    if batches_done == 0:
        assert kept == []  # nothing worth keeping
        with pytest.raises(StoreError, match="the store is complete, nothing to resume"):
            ActivationStore.resume(tmp / "s")
        return
    assert len(kept) == 1
    resumed = ActivationStore.resume(tmp / "s")
    writer = RowWriter.resume(resumed)
    assert writer.rows == 2 * batches_done
    cut = data.draw(st.integers(writer.rows, n))
    for a, b in ((writer.rows, cut), (cut, n)):
        writer.append([zl[a:b] for zl in z], records[a:b], {})
    assert _snapshot(tmp / "s") == before  # the old store stays until the swap
    writer.finish()
    resumed.write_unembed(np.eye(8))
    resumed.close()
    assert sorted(p.name for p in tmp.iterdir()) == [".s.lock", "s"]  # swapped, nothing left
    _same_content(
        _whole(tmp / "whole", z, weights, records, np.eye(8)), ActivationStore.open(tmp / "s")
    )


def _interrupted_overwrite(path, z, weights, records, rows, *, resumable=True):
    """Start a resumable overwrite of the store at ``path`` and stop it after ``rows`` rows."""
    store = ActivationStore.create(path, **SHAPES, overwrite=True, resumable=resumable)
    writer = RowWriter.start(store, lambda layer: weights[layer])
    writer.append([zl[:rows] for zl in z], records[:rows], {})
    writer.close()
    store._abandon()
    return store


def test_an_overwrite_not_made_resumable_leaves_nothing_behind(tmp_path):
    """Merges and library callers that did not ask for it: the old behaviour."""
    _whole(tmp_path / "s", *_data(3, seed=1), np.eye(8))
    _interrupted_overwrite(tmp_path / "s", *_data(6), rows=4, resumable=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".s.lock", "s"]


@pytest.mark.parametrize("stop", ["after-finish", "before-swap"])
def test_a_finished_replacement_stopped_before_its_swap_is_swapped_in_by_resume(
    tmp_path, monkeypatch, stop
):
    from somp_ref.store import writing

    old = _whole(tmp_path / "s", *_data(3, seed=1), np.eye(8))
    before = _snapshot(old.path)
    z, weights, records = _data(6)
    with pytest.raises(KeyboardInterrupt):
        with ActivationStore.create(
            tmp_path / "s", **SHAPES, overwrite=True, resumable=True
        ) as store:
            writer = RowWriter.start(store, lambda layer: weights[layer])
            writer.append(z, records, {})
            writer.finish()
            store.write_unembed(np.eye(8))
            if stop == "after-finish":
                raise KeyboardInterrupt
            monkeypatch.setattr(
                writing, "swap_in", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt)
            )
    monkeypatch.undo()
    assert _snapshot(tmp_path / "s") == before
    resumed = ActivationStore.resume(tmp_path / "s")
    assert resumed.missing() == []
    resumed.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".s.lock", "s"]
    swapped = ActivationStore.open(tmp_path / "s")
    assert "replacing" not in swapped.meta
    _same_content(_whole(tmp_path / "whole", z, weights, records, np.eye(8)), swapped)


def test_resume_never_replaces_a_store_its_overwrite_did_not_start_on(tmp_path):
    _whole(tmp_path / "s", *_data(3, seed=1), np.eye(8))
    _interrupted_overwrite(tmp_path / "s", *_data(6), rows=4)
    remove_store_dir(tmp_path / "s", SHAPES["n_layers"])  # by hand: another store comes
    with pytest.warns(UserWarning, match="interrupted overwrite left"):
        other = _whole(tmp_path / "s", *_data(5, seed=3), np.eye(8))
    before = _snapshot(other.path)
    with pytest.raises(StoreError, match="an overwrite of another store than the one now at s"):
        ActivationStore.resume(tmp_path / "s")
    assert _snapshot(tmp_path / "s") == before


def test_an_overwrite_of_an_incomplete_store_resumes_the_overwrite(tmp_path):
    z, weights, records = _data(6)
    _interrupted(tmp_path / "s", *_data(6, seed=1), batches_done=1)  # an old, unfinished one
    _interrupted_overwrite(tmp_path / "s", z, weights, records, rows=4)
    resumed = ActivationStore.resume(tmp_path / "s")
    writer = RowWriter.resume(resumed)
    assert writer.rows == 4  # the overwrite's rows, not the old store's 2
    writer.append([zl[4:] for zl in z], records[4:], {})
    writer.finish()
    resumed.write_unembed(np.eye(8))
    resumed.close()
    _same_content(
        _whole(tmp_path / "whole", z, weights, records, np.eye(8)),
        ActivationStore.open(tmp_path / "s"),
    )


def test_the_next_overwrite_says_it_deletes_kept_rows(tmp_path):
    _whole(tmp_path / "s", *_data(3, seed=1), np.eye(8))
    _interrupted_overwrite(tmp_path / "s", *_data(6), rows=4)
    with pytest.warns(UserWarning, match=r"deleted \.s\.new-.*4 rows; a resume would have"):
        ActivationStore.create(tmp_path / "s", **SHAPES, overwrite=True)._abandon()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".s.lock", "s"]


@pytest.mark.parametrize(
    "state",
    [{"rows": "3"}, 7, {}, {"rows": 1, "samples_bytes": 0, "weights": [], "progress": {}}],
)
def test_a_malformed_append_state_is_a_store_error(tmp_path, state):
    z, weights, records = _data(4)
    _interrupted(tmp_path / "s", z, weights, records, batches_done=1, garbage=False)
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    meta["appending"] = state
    (tmp_path / "s" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="appending"):
        ActivationStore.resume(tmp_path / "s")


@pytest.mark.parametrize("key", ["appending", "replacing"])
def test_the_store_s_own_keys_are_not_facts_a_caller_records(tmp_path, key):
    with pytest.raises(ValueError, match="the store's own keys"):
        ActivationStore.create(tmp_path / "s", **SHAPES, meta={key: 1})
    assert not (tmp_path / "s").exists()
