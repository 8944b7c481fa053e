"""The activation store: round trips, laziness, and refusing partial or corrupt stores."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from stores import write_planted_store

from somp_ref.store import META_FILE, ActivationStore, StoreError, layer_file

WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from somp_ref.store import ActivationStore
    rng = np.random.default_rng(7)
    with ActivationStore.create(sys.argv[1], n_layers=2, n_heads=3, d_head=4, d_model=5,
                                meta={"model_id": "x"}, dtype=sys.argv[2]) as store:
        for layer in range(2):
            store.write_layer(layer, z=rng.standard_normal((6, 3, 4)),
                              o_proj=rng.standard_normal((5, 12)),
                              bias=rng.standard_normal(5))
        store.write_unembed(rng.standard_normal((9, 5)), final_norm=rng.standard_normal(5),
                            vocab=[f"t{i}é" for i in range(9)])
        store.write_samples([{"prompt": f"p{i}", "label": i} for i in range(6)])
    """
)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_store_written_by_one_process_is_read_bit_exactly_by_another(tmp_path, dtype):
    path = tmp_path / "store"
    subprocess.run([sys.executable, "-c", WRITER, str(path), dtype], check=True)
    rng = np.random.default_rng(7)  # the writer's stream, replayed
    store = ActivationStore.open(path)
    for layer in range(2):
        z, o_proj = store.layer(layer)
        expected_z = rng.standard_normal((6, 3, 4)).astype(dtype)
        expected_w = rng.standard_normal((5, 12))  # weights keep float64 when given it
        expected_b = rng.standard_normal(5)
        assert z.dtype == np.dtype(dtype) and np.array_equal(z, expected_z)
        assert o_proj.dtype == np.float64 and np.array_equal(o_proj, expected_w)
        assert np.array_equal(store.layer_bias(layer), expected_b)
    assert np.array_equal(store.unembed(), rng.standard_normal((9, 5)))
    assert np.array_equal(store.final_norm(), rng.standard_normal(5))
    assert store.vocab() == [f"t{i}é" for i in range(9)]
    assert store.samples() == [{"prompt": f"p{i}", "label": i} for i in range(6)]
    assert store.n_samples == 6 and store.meta["model_id"] == "x"
    store.verify()


def test_layers_are_memory_mapped_read_only(tmp_path):
    store = write_planted_store(tmp_path / "s")
    z, o_proj = store.layer(0)
    assert isinstance(z, np.memmap) and isinstance(o_proj, np.memmap)
    with pytest.raises(ValueError, match="read-only"):
        z[0, 0, 0] = 1.0


def test_head_output_is_z_times_head_columns(tmp_path):
    store = write_planted_store(tmp_path / "s")
    z, o_proj = store.layer(1)
    expected = np.asarray(z[:, 2], np.float64) @ np.asarray(o_proj[:, 12:18], np.float64).T
    assert np.array_equal(store.head_output(1, 2), expected)


def test_interrupted_write_leaves_an_incomplete_store_that_does_not_open(tmp_path):
    path = tmp_path / "s"
    with pytest.raises(RuntimeError, match="boom"):
        with ActivationStore.create(path, n_layers=2, n_heads=1, d_head=2, d_model=3) as st:
            st.write_layer(0, z=np.ones((4, 1, 2)), o_proj=np.ones((3, 2)))
            raise RuntimeError("boom")
    with pytest.raises(StoreError, match=r"incomplete store \(missing: layer_001"):
        ActivationStore.open(path)
    resumed = ActivationStore.resume(path)
    assert resumed.missing() == [layer_file(1), "unembed.safetensors", "samples.jsonl"]
    resumed.write_layer(1, z=np.ones((4, 1, 2)), o_proj=np.ones((3, 2)))
    resumed.write_unembed(np.ones((5, 3)))
    resumed.write_samples([{}] * 4)
    resumed.close()
    assert ActivationStore.open(path).missing() == []


def test_close_refuses_missing_parts(tmp_path):
    store = ActivationStore.create(tmp_path / "s", n_layers=1, n_heads=1, d_head=2, d_model=3)
    with pytest.raises(StoreError, match=r"cannot complete the store, missing \['layer_000"):
        store.close()


def test_truncated_layer_is_reported_by_name(tmp_path):
    store = write_planted_store(tmp_path / "s")
    target = store.path / layer_file(1)
    target.write_bytes(target.read_bytes()[:-10])
    with pytest.raises(StoreError, match=r"layer_001.safetensors: \d+ bytes, \d+ recorded"):
        ActivationStore.open(store.path)


def test_changed_bytes_are_caught_by_verify(tmp_path):
    store = write_planted_store(tmp_path / "s")
    target = store.path / layer_file(2)
    data = bytearray(target.read_bytes())
    data[-3] ^= 0xFF
    target.write_bytes(bytes(data))
    reopened = ActivationStore.open(store.path)  # same size: only the hash can tell
    with pytest.raises(StoreError, match=r"layer_002.safetensors: content differs"):
        reopened.verify()


def test_garbage_header_is_reported_by_name(tmp_path):
    store = write_planted_store(tmp_path / "s")
    target = store.path / layer_file(0)
    garbage = b"\xff" * target.stat().st_size
    target.write_bytes(garbage)
    meta = json.loads((store.path / META_FILE).read_text())  # recorded as if written so:
    meta["files"][layer_file(0)]["sha256"] = hashlib.sha256(garbage).hexdigest()
    (store.path / META_FILE).write_text(json.dumps(meta))  # only the header check can tell
    with pytest.raises(StoreError, match=r"layer_000.safetensors: corrupt safetensors header"):
        ActivationStore.open(store.path).layer(0)


def test_wrong_version_and_non_store_are_refused(tmp_path):
    store = write_planted_store(tmp_path / "s")
    meta = json.loads((store.path / META_FILE).read_text())
    meta["format_version"] = 99
    (store.path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=r"format version 99, this somp_ref reads version 1"):
        ActivationStore.open(store.path)
    with pytest.raises(StoreError, match=r"no such store directory"):
        ActivationStore.open(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match=r"meta.json: missing"):
        ActivationStore.open(tmp_path / "empty")


def test_create_refuses_existing_paths_unless_overwrite(tmp_path):
    write_planted_store(tmp_path / "s")
    with pytest.raises(StoreError, match=r"already exists \(pass overwrite=True"):
        ActivationStore.create(tmp_path / "s", n_layers=1, n_heads=1, d_head=1, d_model=1)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("keep me")
    with pytest.raises(StoreError, match=r"is not a store: refusing to overwrite"):
        ActivationStore.create(
            tmp_path / "other", n_layers=1, n_heads=1, d_head=1, d_model=1, overwrite=True
        )
    assert (tmp_path / "other" / "precious.txt").read_text() == "keep me"
    fresh = ActivationStore.create(
        tmp_path / "s", n_layers=1, n_heads=1, d_head=1, d_model=1, overwrite=True
    )
    assert fresh.missing()[0] == layer_file(0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"z": np.ones((4, 2, 2)), "o_proj": np.ones((3, 2))},
            ValueError,
            r"z must have shape \(n, 1, 2\), got \(4, 2, 2\)",
        ),
        (
            {"z": np.ones((4, 1, 2)), "o_proj": np.ones((2, 3))},
            ValueError,
            r"o_proj must have shape \(3, 2\), got \(2, 3\)",
        ),
        (
            {"z": np.full((4, 1, 2), np.nan), "o_proj": np.ones((3, 2))},
            ValueError,
            r"layer 0: z is not finite at sample 0, head 0 \(nan\)",
        ),
        (
            {"z": np.ones((4, 1, 2)).astype(complex), "o_proj": np.ones((3, 2))},
            TypeError,
            r"z must be a real numeric array",
        ),
        (
            {"z": np.ones((4, 1, 2)), "o_proj": np.ones((3, 2)), "bias": np.ones(4)},
            ValueError,
            r"bias must have shape \(3,\)",
        ),
    ],
)
def test_write_layer_rejects_bad_tensors(tmp_path, kwargs, error, match):
    store = ActivationStore.create(tmp_path / "s", n_layers=1, n_heads=1, d_head=2, d_model=3)
    with pytest.raises(error, match=match):
        store.write_layer(0, **kwargs)


def test_sample_counts_must_agree(tmp_path):
    store = ActivationStore.create(tmp_path / "s", n_layers=2, n_heads=1, d_head=2, d_model=3)
    store.write_layer(0, z=np.ones((4, 1, 2)), o_proj=np.ones((3, 2)))
    with pytest.raises(ValueError, match=r"z must have 4 samples .* got 5"):
        store.write_layer(1, z=np.ones((5, 1, 2)), o_proj=np.ones((3, 2)))
    with pytest.raises(ValueError, match=r"one entry per sample row \(4\), got 3"):
        store.write_samples([{}] * 3)
    with pytest.raises(ValueError, match=r"vocab must have one string per unembedding row"):
        store.write_unembed(np.ones((5, 3)), vocab=["a"])


def test_reading_store_cannot_be_written(tmp_path):
    store = write_planted_store(tmp_path / "s")
    with pytest.raises(StoreError, match=r"open for reading"):
        store.write_samples([])
