"""Large-model paths at small scale: exports that stream and resume, models spread by a
device map (a layer offloaded to disk), data-parallel export with torchrun (2 CPU processes,
gloo), and merging shards; the same commands the README's "Large models" section gives."""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from models import save_tiny_checkpoint  # noqa: E402

from somp_ref.adapters.head_export import export_activations  # noqa: E402
from somp_ref.adapters.intervene import scale_heads  # noqa: E402
from somp_ref.adapters.models import load_model  # noqa: E402
from somp_ref.adapters.parallel_export import shard_bounds  # noqa: E402
from somp_ref.cli import main  # noqa: E402
from somp_ref.head_scores import HeadScores  # noqa: E402
from somp_ref.store import ActivationStore, StoreError  # noqa: E402

PROMPTS = [" ".join(f"w{(7 * i + j) % 250}" for j in range(3 + i % 5)) for i in range(11)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama")


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_model(str(checkpoint))


def _same_store(a: ActivationStore, b: ActivationStore, rtol: float = 0.0) -> None:
    assert a.n_samples == b.n_samples and a.samples() == b.samples()
    for layer in range(a.n_layers):
        (za, wa), (zb, wb) = a.layer(layer), b.layer(layer)
        np.testing.assert_allclose(za, zb, rtol=rtol, atol=rtol * float(np.abs(za).max()))
        assert np.array_equal(wa, wb)
    assert np.array_equal(a.unembed(), b.unembed())


class Interrupt(Exception):
    pass


def test_an_interrupted_export_resumes_and_runs_only_the_batches_left(loaded, tmp_path):
    model, tokenizer = loaded
    records = [{"prompt": p} for p in PROMPTS]
    options = {"positions": "all", "batch_size": 2, "show_progress": False}
    calls = []

    def forward_hook(module, args, kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise Interrupt  # dies in the 4th batch: 3 are on disk

    handle = model.register_forward_pre_hook(forward_hook, with_kwargs=True)
    try:
        with pytest.raises(Interrupt):
            export_activations(model, tokenizer, records, tmp_path / "s", **options)
    finally:
        handle.remove()
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore.open(tmp_path / "s")
    assert ActivationStore.resume(tmp_path / "s").meta["appending"]["progress"]["batches"] == 3
    calls.clear()
    handle = model.register_forward_pre_hook(forward_hook, with_kwargs=True)
    try:
        resumed = export_activations(
            model, tokenizer, records, tmp_path / "s", resume=True, **options
        )
    finally:
        handle.remove()
    assert len(calls) == 3  # 6 batches, 3 done before
    whole = export_activations(model, tokenizer, records, tmp_path / "whole", **options)
    _same_store(whole, resumed)  # the same batches in the same order: bit-identical


def test_resume_refuses_other_prompts_and_a_finished_store(loaded, tmp_path, capsys, checkpoint):
    model, tokenizer = loaded
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    store = ActivationStore.create(tmp_path / "s", n_layers=2, n_heads=4, d_head=8, d_model=32)
    store._abandon()  # an incomplete store that was never appended to
    base = ["export", "--model", str(checkpoint), "--prompts", str(prompts), "--out"]
    assert main([*base, str(tmp_path / "s"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    records = [{"prompt": p} for p in PROMPTS]
    calls = []

    def die_second(module, args, kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise Interrupt

    handle = model.register_forward_pre_hook(die_second, with_kwargs=True)
    try:
        with pytest.raises(Interrupt):
            export_activations(
                model, tokenizer, records, tmp_path / "t", batch_size=8, show_progress=False
            )
    finally:
        handle.remove()
    prompts.write_text("\n".join(PROMPTS[1:]) + "\n")
    assert main([*base, str(tmp_path / "t"), "--resume"]) == 2
    assert "started with other prompts" in capsys.readouterr().err
    prompts.write_text("\n".join(PROMPTS) + "\n")
    assert main([*base, str(tmp_path / "t"), "--resume"]) == 0  # the same ones finish it
    whole = export_activations(
        model, tokenizer, records, tmp_path / "whole", batch_size=8, show_progress=False
    )
    _same_store(whole, ActivationStore.open(tmp_path / "t"))
    capsys.readouterr()
    assert main([*base, str(tmp_path / "t"), "--resume"]) == 0  # done already: says so
    assert "already complete, nothing to resume" in capsys.readouterr().err
    prompts.write_text("\n".join(PROMPTS[2:]) + "\n")
    assert main([*base, str(tmp_path / "t"), "--resume"]) == 2  # not this export's store
    assert "complete store of another export" in capsys.readouterr().err


def test_a_model_spread_by_a_device_map_exports_and_scales_as_loaded_whole(
    loaded, checkpoint, tmp_path
):
    model, tokenizer = loaded
    device_map = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",  # offloaded: its weights are on the meta device
        "model.norm": "cpu",
        "lm_head": "cpu",
    }
    spread, _ = load_model(
        str(checkpoint), device_map=device_map, offload_folder=str(tmp_path / "offload")
    )
    assert spread.model.layers[1].self_attn.o_proj.weight.device.type == "meta"
    records = [{"prompt": p} for p in PROMPTS[:5]]
    options = {"positions": "last", "batch_size": 2, "show_progress": False}
    a = export_activations(model, tokenizer, records, tmp_path / "a", **options)
    b = export_activations(spread, tokenizer, records, tmp_path / "b", **options)
    _same_store(a, b)  # the same CPU arithmetic: equal
    ids = tokenizer(["w1 w2 w3 w4"], return_tensors="pt")
    with torch.no_grad():
        base = spread(**ids).logits
        with scale_heads(spread, {(1, 2): 1.0, (0, 0): 1.0}):
            same = spread(**ids).logits
        with scale_heads(spread, {(1, 2): 0.0}):
            ablated = spread(**ids).logits
        with scale_heads(model, {(1, 2): 0.0}):
            reference = model(**ids).logits
    assert torch.equal(base, same)
    assert not torch.equal(base, ablated)
    torch.testing.assert_close(ablated, reference, rtol=0, atol=0)


def test_the_device_map_flags_export_a_model_with_a_layer_on_disk(checkpoint, tmp_path):
    device_map = tmp_path / "map.json"
    device_map.write_text(
        '{"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "disk", '
        '"model.layers.1": "cpu", "model.norm": "cpu", "lm_head": "disk"}'
    )
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS[:4]) + "\n")
    common = ["export", "--model", str(checkpoint), "--prompts", str(prompts), "--out"]
    spread = [*common, str(tmp_path / "spread"), "--device-map", str(device_map)]
    assert main([*spread, "--offload-folder", str(tmp_path / "offload")]) == 0
    assert main([*common, str(tmp_path / "whole")]) == 0
    _same_store(ActivationStore.open(tmp_path / "whole"), ActivationStore.open(tmp_path / "spread"))


def test_device_and_device_map_exclude_each_other(checkpoint, capsys, tmp_path):
    out = str(tmp_path / "x")
    args = ["export", "--model", str(checkpoint), "--prompts", "builtin:colors", "--out", out]
    assert main([*args, "--device", "meta", "--device-map", "auto"]) == 2
    assert "not both" in capsys.readouterr().err


@pytest.mark.parametrize("n,world", [(11, 2), (1, 3), (9, 4)])
def test_shards_are_contiguous_blocks_covering_every_prompt_once(n, world):
    bounds = shard_bounds(n, world)
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_torchrun_exports_shards_and_merges_them_into_the_single_process_store(
    checkpoint, tmp_path
):
    torchrun = shutil.which("torchrun") or pytest.skip("torchrun is not installed")
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    common = ["--model", str(checkpoint), "--prompts", str(prompts), "--batch-size", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [torchrun, "--nproc-per-node", "2", "-m", "somp_ref", "export", *common,
         "--out", str(tmp_path / "parallel")],
        check=True, env=env, capture_output=True, timeout=300,
    )  # fmt: skip
    assert main(["export", *common, "--out", str(tmp_path / "single")]) == 0
    parallel = ActivationStore.open(tmp_path / "parallel")
    # Other batches (3 prompts each, from each block): the same rows to float32 rounding.
    _same_store(ActivationStore.open(tmp_path / "single"), parallel, rtol=1e-5)
    assert parallel.meta["merged_from"] == [
        str(tmp_path / "parallel.shard-000-of-002"),
        str(tmp_path / "parallel.shard-001-of-002"),
    ]
    assert not [p for p in tmp_path.iterdir() if "shard" in p.name]  # merged and removed


def test_store_merge_command_joins_stores_and_names_what_differs(tmp_path, capsys):
    from stores import write_planted_store

    a = write_planted_store(tmp_path / "a", n_samples=4)
    b = write_planted_store(tmp_path / "b", n_samples=4)  # the same export, again
    assert main(["store", "merge", str(a.path), str(b.path), "--out", str(tmp_path / "m")]) == 0
    merged = ActivationStore.open(tmp_path / "m")
    assert merged.n_samples == 8
    z, _ = merged.layer(1)
    assert np.array_equal(z[4:], a.layer(1)[0])
    c = write_planted_store(tmp_path / "c", n_samples=4, d_head=5)
    assert main(["store", "merge", str(a.path), str(c.path), "--out", str(tmp_path / "n")]) == 2
    assert "d_head 5 != 6" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()


def test_rankings_record_their_model_store_concept_and_versions(loaded, tmp_path):
    from somp_ref.adapters.provenance import model_fingerprint
    from somp_ref.head_scores import HeadScores
    from somp_ref.provenance import ids_hash, store_content_hash

    model, tokenizer = loaded
    store = export_activations(
        model, tokenizer, [{"prompt": p} for p in PROMPTS], tmp_path / "s", show_progress=False
    )
    concept = tmp_path / "words.txt"
    concept.write_text("w1\nw2\nw3\nw5\nw8\n")
    args = ["rank", str(store.path), "--concept", str(concept), "--method", "somp"]
    outputs = ["--out", str(tmp_path / "r.csv"), "--json-out", str(tmp_path / "r.json")]
    assert main([*args, *outputs]) == 0
    expected = {
        "model_id": model.somp_ref_model_id,
        "model_fingerprint": model_fingerprint(model),
        "store_hash": store_content_hash(store.meta),
        "concept": str(concept),
    }
    for ranking in (
        HeadScores.from_csv(tmp_path / "r.csv"),
        HeadScores.from_json(tmp_path / "r.json"),
    ):
        assert expected.items() <= ranking.source.items()
        assert ranking.source["versions"]["numpy"] == np.__version__
    from_json = HeadScores.from_json(tmp_path / "r.json")
    assert from_json.source["dictionary_hash"] == ids_hash(from_json.token_ids)


def test_generate_refuses_a_ranking_of_another_model_unless_forced(tmp_path, capsys):
    first = save_tiny_checkpoint(tmp_path / "first", seed=0)
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    concept = tmp_path / "words.txt"
    concept.write_text("w1\nw2\nw3\nw5\nw8\n")
    assert (
        main(
            [
                "export",
                "--model",
                str(first),
                "--prompts",
                str(prompts),
                "--out",
                str(tmp_path / "s"),
            ]
        )
        == 0
    )
    rank = ["rank", str(tmp_path / "s"), "--concept", str(concept), "--method", "somp"]
    assert main([*rank, "--out", str(tmp_path / "r.csv")]) == 0
    generate = ["generate", "--heads", str(tmp_path / "r.csv"), "--top", "2", "--no-chat-template"]
    generate += ["--max-new-tokens", "2", "w1 w2"]
    assert main([*generate, "--model", str(first)]) == 0  # its own model
    other = save_tiny_checkpoint(tmp_path / "other", seed=1)
    capsys.readouterr()
    assert main([*generate, "--model", str(other)]) == 2
    assert "was made on model" in capsys.readouterr().err
    save_tiny_checkpoint(first, seed=1)  # other weights under the same path
    assert main([*generate, "--model", str(first)]) == 2
    assert "other weights" in capsys.readouterr().err
    assert main([*generate, "--model", str(first), "--force"]) == 0
    assert "applied anyway" in capsys.readouterr().err


def test_the_weights_decide_whether_a_ranking_fits_a_model():
    from somp_ref.provenance import ModelMismatchError, check_same_model

    source = {"model_id": "./ckpt", "model_fingerprint": "a" * 64}
    check_same_model(source, "/abs/ckpt", "a" * 64)  # the same weights under another path
    with pytest.raises(ModelMismatchError, match="other weights"):
        check_same_model(source, "./ckpt", "b" * 64)
    with pytest.raises(ModelMismatchError, match="made on model './ckpt'"):
        check_same_model({"model_id": "./ckpt"}, "other", "a" * 64)  # no fingerprint: ids
    check_same_model({}, "anything", None)  # an old file records nothing: nothing to compare


def test_prompt_files_break_lines_at_line_feeds_only(tmp_path):
    from somp_ref.adapters.prompts import read_prompts

    path = tmp_path / "p.txt"
    path.write_text("one\u2028still one\r\ntwo\n\nthree\x85still three\n", encoding="utf-8")
    assert [r["prompt"] for r in read_prompts(str(path))] == [
        "one\u2028still one",
        "two",
        "three\x85still three",
    ]
    lines = tmp_path / "p.jsonl"
    lines.write_text('{"prompt": "a\u2028b"}\n{"prompt": "c"}\n', encoding="utf-8")
    assert [r["prompt"] for r in read_prompts(str(lines))] == ["a\u2028b", "c"]


@pytest.mark.parametrize("old_prompts", [3, len(PROMPTS)])  # another export, or this one
def test_an_interrupted_overwrite_resumes_and_keeps_the_old_store_until_done(
    loaded, tmp_path, old_prompts
):
    model, tokenizer = loaded
    options = {"positions": "all", "batch_size": 2, "show_progress": False}
    old = export_activations(
        model, tokenizer, [{"prompt": p} for p in PROMPTS[:old_prompts]], tmp_path / "s", **options
    )
    before = {p.name: p.read_bytes() for p in old.path.iterdir()}
    records = [{"prompt": p} for p in PROMPTS]
    calls = []

    def die_third(module, args, kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise Interrupt  # 2 batches of the new export are on disk

    handle = model.register_forward_pre_hook(die_third, with_kwargs=True)
    try:
        with pytest.raises(Interrupt):
            export_activations(model, tokenizer, records, tmp_path / "s", overwrite=True, **options)
    finally:
        handle.remove()
    assert {p.name: p.read_bytes() for p in old.path.iterdir()} == before
    calls.clear()
    handle = model.register_forward_pre_hook(lambda *a, **k: calls.append(1), with_kwargs=True)
    try:
        resumed = export_activations(
            model, tokenizer, records, tmp_path / "s", resume=True, **options
        )
    finally:
        handle.remove()
    assert len(calls) == 4  # 6 batches, 2 done before the interruption
    whole = export_activations(model, tokenizer, records, tmp_path / "whole", **options)
    _same_store(whole, resumed)
    assert not list(tmp_path.glob(".s.*-*"))  # the old store is gone, nothing hidden left
    with pytest.raises(StoreError, match="no interrupted --overwrite of it left rows"):
        export_activations(model, tokenizer, records[1:], tmp_path / "s", resume=True, **options)


def _readme_commands(section: str) -> list[list[str]]:
    """The ``somp-ref`` commands of a README section's bash blocks, as argument lists
    (continuation lines joined, comments dropped; placeholders ``...`` kept for the caller)."""
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    text = readme.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "somp-ref":
                commands.append(words[1:])
    return commands


#: Words the null dictionaries can draw from (3+ letters), and the shipped colors concept's.
WORDS = [
    "red", "green", "blue", "yellow", "orange", "purple", "black", "white", "brown", "pink",
    *("".join(letters) for letters in itertools.product("bdfgklmnpstv", "aeiou", "nrst")),
][:253]  # fmt: skip


def test_the_readme_large_model_commands_run_at_small_scale(tmp_path, monkeypatch):
    """Every complete ``somp-ref`` command of the README's "Large models" section, with the
    hub ids replaced by a tiny checkpoint whose vocabulary holds color words, cuda by the CPU
    and ``--top 16`` by 2 of its 8 heads (the torchrun lines are run by the torchrun test
    above; lines with ``...`` are placeholders)."""
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny", vocabulary=WORDS)
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    prompts = [" ".join(rng.choice(WORDS, 3 + i % 5)) for i in range(12)]
    Path("prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    replace = {
        "meta-llama/Llama-3.1-8B": str(checkpoint),
        "meta-llama/Llama-3.1-70B": str(checkpoint),
        "cuda": "cpu",
        "/scratch/offload": str(tmp_path / "offload"),
    }
    commands = [
        [replace.get(word, word) for word in command]
        for command in _readme_commands("Large models")
        if "..." not in command
    ]
    for command in commands:  # the tiny model has 8 heads
        if "--top" in command:
            command[command.index("--top") + 1] = "2"
    # Exports first, then the rankings the generate line reads (the README's order is by topic).
    commands.sort(key=lambda command: ["export", "rank", "generate"].index(command[0]))
    assert [command[0] for command in commands] == ["export", "export", "rank", "rank", "generate"]
    for command in commands:
        assert main(command) == 0, command
    assert ActivationStore.open("runs/llama8b").n_samples == sum(len(p.split()) for p in prompts)
    assert ActivationStore.open("runs/llama70b").n_samples == len(prompts)
    assert HeadScores.from_csv("colors.csv").method == "specificity"


def test_export_applies_the_unembedding_to_one_position_only(loaded, tmp_path):
    """No full-vocabulary logits: the model's head sees one position of each prompt."""
    model, tokenizer = loaded
    seen = []
    handle = model.lm_head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    try:
        records = [{"prompt": p} for p in PROMPTS[:4]]
        export_activations(
            model, tokenizer, records, tmp_path / "s", batch_size=2, show_progress=False
        )
    finally:
        handle.remove()
    assert [shape[:2] for shape in seen] == [(2, 1), (2, 1)]
    longest = max(len(tokenizer(p)["input_ids"]) for p in PROMPTS[:4])
    assert longest > 1  # so one position is fewer than the prompts have


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), {1: "a non-string key"}])
def test_a_record_the_store_cannot_keep_is_refused_before_the_model_runs(loaded, tmp_path, bad):
    model, tokenizer = loaded
    calls = []
    handle = model.register_forward_pre_hook(lambda *args: calls.append(1))
    records = [{"prompt": PROMPTS[0]}, {"prompt": PROMPTS[1], "score": bad}]
    try:
        with pytest.raises((ValueError, TypeError), match=r"records\[1\]"):
            export_activations(model, tokenizer, records, tmp_path / "s", show_progress=False)
    finally:
        handle.remove()
    assert calls == [] and not (tmp_path / "s").exists()


def test_a_backend_the_model_needs_and_lacks_is_one_line(checkpoint, tmp_path, monkeypatch, capsys):
    """transformers raises a plain ImportError for a missing backend (flash_attention_2,
    sentencepiece, ...): a model that cannot be loaded, one line, not a traceback."""
    import transformers

    def lacking(*args, **kwargs):
        raise ImportError("FlashAttention2 has been toggled on, but it cannot be used")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lacking)
    args = ["export", "--model", str(checkpoint), "--prompts", "builtin:colors"]
    assert main([*args, "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "could not load model" in err and "FlashAttention2" in err
    assert len(err.strip().splitlines()) == 1, err


def test_export_refuses_a_path_whose_only_copy_lies_beside_it_before_loading(
    checkpoint, tmp_path, monkeypatch, capsys
):
    """The store's own dry run, before the model loads: a lone old copy beside a missing
    --out may be the only copy of a store, so export refuses to write there."""
    from stores import write_planted_store

    from somp_ref.adapters import commands

    old = write_planted_store(tmp_path / "s")
    old.path.rename(tmp_path / ".s.old-1-0123abcd")  # as a swap killed between its renames

    def tripwire(args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(commands, "load", tripwire)
    for flags in ([], ["--overwrite"]):
        args = ["export", "--model", str(checkpoint), "--prompts", "builtin:colors", *flags]
        assert main([*args, "--out", str(tmp_path / "s")]) == 2
        err = capsys.readouterr().err
        assert "refusing to write" in err and ".s.old-1-0123abcd" in err, err
    assert not (tmp_path / "s").exists()
