"""What a writer hands the store is checked before anything is made on disk: meta facts are
plain JSON, valid Unicode, and small enough for meta.json to stay readable; layer and head
indexes are ints. A meta.json a reader could not use is refused naming it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from stores import write_planted_store

from somp_ref.store import META_FILE, ActivationStore, StoreError, layer_file
from somp_ref.store.schema import MAX_META_BYTES


def create(path, **kwargs) -> ActivationStore:
    return ActivationStore.create(path, n_layers=2, n_heads=1, d_head=2, d_model=3, **kwargs)


def everything(root: Path) -> dict[str, bytes | None]:
    """Every entry under ``root`` (a directory as None), hidden ones included."""
    found: dict[str, bytes | None] = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            found[os.path.relpath(os.path.join(folder, name), root)] = None
        for name in files:
            found[os.path.relpath(os.path.join(folder, name), root)] = Path(
                folder, name
            ).read_bytes()
    return found


# ---------------------------------------------------------------------- meta facts

BAD_META = [
    ({"x": np.arange(3)}, TypeError, r"meta\['x'\] is a numpy.ndarray, not a JSON value"),
    ({"x": {1, 2}}, TypeError, r"meta\['x'\] is a set, not a JSON value"),
    ({"x": [1, object()]}, TypeError, r"meta\['x'\]\[1\] is a object, not a JSON value"),
    ({"x": {1: "a"}}, TypeError, r"meta\['x'\] has the key 1: JSON keys are strings"),
    ({"x": float("nan")}, ValueError, r"meta\['x'\] is nan: JSON has no NaN or infinity"),
    ({"x": [float("-inf")]}, ValueError, r"meta\['x'\]\[0\] is -inf"),
    ({"x": 10**30}, ValueError, r"meta\['x'\] is an integer of 100 bits, over 64"),
    (
        {"model_id": "bad\ud800id"},
        ValueError,
        r"meta\['model_id'\] is not valid Unicode: 'bad\\ud800id' has a lone surrogate "
        r"'\\ud800' at character 3",
    ),
    ({"x": {"k\udcff": 1}}, ValueError, r"a key of meta\['x'\] is not valid Unicode"),
    ({"notes": "x" * (65 << 20)}, ValueError, r"would make meta.json \d+ bytes, over the 67108864"),
    ([("model_id", "m")], TypeError, r"meta must be a mapping of JSON facts, got list"),
]


@pytest.mark.parametrize(
    ("meta", "error", "match"),
    BAD_META,
    ids=[
        "ndarray",
        "set",
        "object",
        "int-key",
        "nan",
        "inf",
        "huge-int",
        "surrogate",
        "surrogate-key",
        "65MiB",
        "not-a-mapping",
    ],
)
@pytest.mark.parametrize("overwrite", [False, True])
def test_meta_facts_a_store_could_not_read_back_are_refused_before_anything_is_made(
    tmp_path, meta, error, match, overwrite
):
    if overwrite:
        write_planted_store(tmp_path / "runs" / "s")
    before = everything(tmp_path)
    with pytest.raises(error, match=match):
        create(tmp_path / "runs" / "s", meta=meta, overwrite=overwrite)
    assert everything(tmp_path) == before  # no directory, no lock, no hidden sibling


def test_facts_that_would_outgrow_meta_json_as_parts_are_recorded_are_refused(tmp_path):
    """meta.json grows by a record per part: facts that fit now but not then are refused
    at create, not found out at open() after the whole export."""
    create(tmp_path / "probe", meta={"notes": ""})
    empty = len((tmp_path / "probe" / META_FILE).read_bytes())
    notes = "x" * (MAX_META_BYTES - empty - 1000)  # fits now: meta.json is ~1000 bytes short
    with pytest.raises(ValueError, match=r"would make meta.json \d+ bytes, over the 67108864"):
        ActivationStore.create(
            tmp_path / "s", n_layers=100, n_heads=1, d_head=2, d_model=3, meta={"notes": notes}
        )
    assert not (tmp_path / "s").exists()


def test_large_facts_within_the_bound_are_written_and_read_back(tmp_path):
    notes = "é" * (1 << 20)
    with create(tmp_path / "s", meta={"notes": notes, "nested": {"a": [1, 2.5, None, True]}}) as s:
        for layer in range(2):
            s.write_layer(layer, z=np.ones((4, 1, 2)), o_proj=np.ones((3, 2)))
        s.write_unembed(np.ones((5, 3)))
        s.write_samples([{}] * 4)
    meta = ActivationStore.open(tmp_path / "s").meta
    assert meta["notes"] == notes and meta["nested"] == {"a": [1, 2.5, None, True]}


def test_a_meta_json_grown_past_the_bound_while_resumed_is_refused_unwritten(tmp_path):
    store = create(tmp_path / "s")
    store.write_layer(0, z=np.ones((4, 1, 2)), o_proj=np.ones((3, 2)))
    del store
    path = tmp_path / "s" / META_FILE
    meta = json.loads(path.read_text())
    meta["notes"] = ""
    size = len(json.dumps(meta, indent=1, sort_keys=True).encode())
    meta["notes"] = "x" * (MAX_META_BYTES - size - 10)  # 10 bytes short of the bound
    path.write_text(json.dumps(meta, indent=1, sort_keys=True))
    before = path.read_bytes()
    resumed = ActivationStore.resume(tmp_path / "s")
    with pytest.raises(StoreError, match=r"meta.json: would be \d+ bytes, over the 67108864"):
        resumed.write_layer(1, z=np.ones((4, 1, 2)), o_proj=np.ones((3, 2)))
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("key", "raw", "match"),
    [
        ("model_id", '"bad\\ud800id"', r"meta.json\['model_id'\] is not valid Unicode"),
        ("extra", '{"k\\udcff": 1}', r"a key of meta.json\['extra'\] is not valid Unicode"),
        ("chat_template", '"yes"', r"chat_template must be true or false, got 'yes'"),
    ],
)
def test_a_meta_json_a_reader_could_not_use_is_refused_naming_it(tmp_path, key, raw, match):
    store = write_planted_store(tmp_path / "s")
    meta = json.loads((store.path / META_FILE).read_text())
    meta[key] = "PLACEHOLDER"  # then written as raw JSON text, escapes and all
    (store.path / META_FILE).write_text(json.dumps(meta).replace('"PLACEHOLDER"', raw))
    with pytest.raises(StoreError, match=r"s/meta.json: corrupt, " + match):
        ActivationStore.open(store.path)


@pytest.mark.parametrize("softcap", [30.0, None])
def test_a_store_recording_the_dropped_logit_softcapping_still_opens(tmp_path, softcap):
    """Exports once recorded final_logit_softcapping, which nothing read: the key is no
    longer checked, and stores that carry it open and verify as before, the fact kept."""
    store = write_planted_store(tmp_path / "s")
    meta = json.loads((store.path / META_FILE).read_text())
    meta["final_logit_softcapping"] = softcap
    (store.path / META_FILE).write_text(json.dumps(meta))
    reopened = ActivationStore.open(store.path)
    reopened.verify()
    assert reopened.meta["final_logit_softcapping"] == softcap


def test_unicode_that_cannot_be_written_is_refused_naming_its_place(tmp_path):
    store = create(tmp_path / "s")
    store.write_layer(0, z=np.ones((4, 1, 2)), o_proj=np.ones((3, 2)))
    with pytest.raises(ValueError, match=r"vocab\[4\] is not valid Unicode: '\\udcff'"):
        store.write_unembed(np.ones((5, 3)), vocab=["a", "b", "c", "d", "\udcff"])
    with pytest.raises(ValueError, match=r"records\[2\]\['label'\] is not valid Unicode"):
        store.write_samples([{}, {}, {"label": "\ud800"}, {}])
    with pytest.raises(TypeError, match=r"records\[1\] must be a mapping \(a dict\), got int"):
        store.write_samples([{}, 1, {}, {}])
    assert store.missing() == [layer_file(1), "unembed.safetensors", "samples.jsonl"]


BAD_RECORDS = [
    ({1: "a"}, TypeError, r"records\[2\] has the key 1: JSON keys are strings"),
    ({True: "b"}, TypeError, r"records\[2\] has the key True: JSON keys are strings"),
    ({None: "c"}, TypeError, r"records\[2\] has the key None: JSON keys are strings"),
    ({"x": {2.5: 1}}, TypeError, r"records\[2\]\['x'\] has the key 2.5: JSON keys are"),
    ({"x": float("nan")}, ValueError, r"records\[2\]\['x'\] is nan: JSON has no NaN or inf"),
    ({"x": [float("inf")]}, ValueError, r"records\[2\]\['x'\]\[0\] is inf: JSON has no"),
    ({"x": np.float32(1.5)}, TypeError, r"records\[2\]\['x'\] is a numpy.float32, not a JSON"),
]
BAD_RECORD_IDS = ["int-key", "bool-key", "none-key", "float-key", "nan", "inf", "numpy-scalar"]


@pytest.mark.parametrize(("bad", "error", "match"), BAD_RECORDS, ids=BAD_RECORD_IDS)
def test_sample_records_are_plain_json_or_refused_naming_the_record(tmp_path, bad, error, match):
    """json.dumps would store {1: 'a'} as {"1": "a"} and NaN as a bare NaN (not JSON): a
    record read back would not be the one written."""
    store = create(tmp_path / "s")
    with pytest.raises(error, match=match):
        store.write_samples([{}, {}, bad, {}])
    assert "samples.jsonl" in store.missing()
    assert not (tmp_path / "s" / "samples.jsonl").exists()


@pytest.mark.parametrize(("bad", "error", "match"), BAD_RECORDS, ids=BAD_RECORD_IDS)
def test_appended_records_are_plain_json_or_refused_naming_the_record(tmp_path, bad, error, match):
    from somp_ref.store.row_appending import RowWriter

    store = create(tmp_path / "s")
    writer = RowWriter.start(store, lambda layer: (np.ones((3, 2)), None))
    z = [np.ones((4, 1, 2))] * 2
    with pytest.raises(error, match=match):
        writer.append(z, [{}, {}, bad, {}])
    assert writer.rows == 0  # nothing committed, and the batch can be appended again
    writer.append(z, [{"i": i} for i in range(4)])
    writer.finish()
    store.write_unembed(np.ones((5, 3)))
    store.close()
    assert ActivationStore.open(tmp_path / "s").samples() == [{"i": i} for i in range(4)]


def test_a_vocabulary_too_large_for_a_safetensors_header_is_refused_before_writing(tmp_path):
    store = ActivationStore.create(tmp_path / "s", n_layers=1, n_heads=1, d_head=2, d_model=4)
    with pytest.raises(ValueError, match=r"vocab: \d+ bytes in the file's header, over the"):
        store.write_unembed(np.ones((1000, 4)), vocab=["x" * 110_000] * 1000)
    assert "unembed.safetensors" in store.missing()


# ---------------------------------------------------------------------- indexes


@pytest.mark.parametrize(
    ("layer", "error", "match"),
    [
        (True, TypeError, r"layer must be an integer, got True"),
        (np.bool_(True), TypeError, r"layer must be an integer, got "),
        (1.0, TypeError, r"layer must be an integer, got 1.0"),
        ("1", TypeError, r"layer must be an integer, got '1'"),
        (2, ValueError, r"layer must be in \[0, 2\), got 2"),
        (-1, ValueError, r"layer must be in \[0, 2\), got -1"),
    ],
)
def test_write_layer_takes_an_int_layer_only(tmp_path, layer, error, match):
    store = create(tmp_path / "s")
    with pytest.raises(error, match=match):
        store.write_layer(layer, z=np.ones((4, 1, 2)), o_proj=np.ones((3, 2)))
    assert store.missing()[:2] == [layer_file(0), layer_file(1)]
    store.write_layer(np.int64(1), z=np.ones((4, 1, 2)), o_proj=np.ones((3, 2)))
    assert store.missing()[0] == layer_file(0) and layer_file(1) not in store.missing()


def test_reading_takes_int_layers_and_heads_only(tmp_path):
    store = write_planted_store(tmp_path / "s")
    for read in (store.layer, store.layer_bias, lambda layer: store.head_output(layer, 0)):
        with pytest.raises(TypeError, match=r"layer must be an integer, got True"):
            read(True)
        with pytest.raises(TypeError, match=r"layer must be an integer, got 1.0"):
            read(1.0)
    with pytest.raises(TypeError, match=r"head must be an integer, got True"):
        store.head_output(1, True)
    with pytest.raises(ValueError, match=r"head must be in \[0, 4\), got 4"):
        store.head_output(1, 4)
    assert np.array_equal(store.head_output(np.int64(1), np.int32(2)), store.head_output(1, 2))
