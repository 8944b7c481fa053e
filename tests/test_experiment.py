"""The experiment end to end on a few prompts. On a tiny random model with a word-level
tokenizer: which split each step measures (the alpha sweep and the selection study
validation, the tables test) and the primary ranking ``somp-ref experiment`` takes from the
selection study. On the real model (marked ``model``): the result's schema, alpha = 1
reproducing the baseline exactly, the alpha sweep on validation, and the report."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from models import tiny_causal_lm  # noqa: E402
from test_selection_study import study as synthetic_study  # noqa: E402

from somp_ref.adapters import experiment, experiment_commands, selection_study, tasks  # noqa: E402
from somp_ref.adapters.comparison import compare_runs  # noqa: E402
from somp_ref.adapters.experiment import Settings, run_task, sweep_alpha  # noqa: E402
from somp_ref.adapters.report import (  # noqa: E402
    CHOSEN_BY,
    FIGURES,
    LABELS,
    format_study,
    format_table,
    summarize,
    write_report,
)
from somp_ref.adapters.results_files import load_results  # noqa: E402
from somp_ref.adapters.selection_study import MAX_COLLATERAL, study_verdict  # noqa: E402
from somp_ref.adapters.tasks import TASK_NAMES, Split, build_task  # noqa: E402
from somp_ref.cli import main  # noqa: E402
from somp_ref.concepts import load_concept  # noqa: E402
from somp_ref.heads import HeadScores  # noqa: E402
from somp_ref.ranking import DEFAULT_METHOD  # noqa: E402


def small(name: str):
    """A few prompts of a task. Validation and test differ in size (4 and 5 target prompts,
    2 and 3 other and neutral ones) besides holding other prompts, so a figure measured on
    the wrong split shows in its length too."""
    task = build_task(name)

    def cut(split: Split, n: int) -> Split:
        return Split(split.target[:n], split.other[: n - 2], split.neutral[: n - 2])

    return replace(
        task, train=task.train[:8], validation=cut(task.validation, 4), test=cut(task.test, 5)
    )


def tiny_task(name: str):
    """:func:`small`, answered in 4 new tokens (the tiny model's answers are noise)."""
    return replace(small(name), max_new_tokens=4)


def prompts(records) -> list[str]:
    return [record["prompt"] for record in records]


@pytest.fixture
def evaluators(monkeypatch):
    """Every Evaluator the experiment and the study build, in order, each with ``calls``:
    how many conditions it measured (its baseline included)."""
    built = []

    class Recording(experiment.Evaluator):
        def __init__(self, *args, **kwargs):
            self.calls = 0
            built.append(self)
            super().__init__(*args, **kwargs)

        def measure(self, alphas):
            self.calls += 1
            return super().measure(alphas)

    monkeypatch.setattr(experiment, "Evaluator", Recording)
    return built


# ------------------------------------------------------------------ a tiny random model


@pytest.fixture(scope="module")
def tiny():
    """A tiny random Llama and a word-level tokenizer with a chat template, which spells
    every word of the small tasks' prompts and of their concepts as one token."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = set()
    for name in TASK_NAMES:
        task = small(name)
        for split in (task.validation, task.test):
            for records in (split.target, split.other, split.neutral):
                words.update(w for p in prompts(records) for w in p.split())
        words.update(w for p in prompts(task.train) for w in p.split())
        words.update(w for entry in load_concept(task.concept) for w in entry.split())
    vocab = ["[PAD]", "[UNK]", "[EOS]", "<user>", "<assistant>", *sorted(words)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<user> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    model = tiny_causal_lm("llama", len(vocab))
    model.somp_ref_model_id = "tiny"
    return model, tokenizer


TINY = Settings(ks=(2,), n_random=2, n_generate=3, n_neutral=3, method="somp", n_null=2, atoms=10)


def test_alpha_is_swept_on_validation_and_the_tables_measure_test(tiny, tmp_path, evaluators):
    model, tokenizer = tiny
    task = tiny_task("amplification")
    settings = replace(TINY, alpha_grid=(2.0, 3.0))
    result = run_task(model, tokenizer, task, settings, tmp_path, show_progress=False)
    sweep, test = evaluators
    assert prompts(sweep.split.target) == prompts(task.validation.target)
    assert prompts(sweep.split.neutral) == prompts(task.validation.neutral)
    assert sweep.calls == 1 + len(settings.ks) * len(settings.alpha_grid)
    assert prompts(test.split.target) == prompts(task.test.target)
    assert prompts(test.split.neutral) == prompts(task.test.neutral)
    assert test.calls == 1 + len(result["conditions"])
    assert [row["alpha"] for row in result["sweep"]] == [2.0, 3.0]
    for row in result["sweep"]:  # each figure with its interval over validation prompts
        for figure in ("gain", "words_gain", "kl"):
            low, high = row[f"{figure}_ci"]
            assert (np.isnan(low) and np.isnan(high)) or low <= high, (figure, row)
        assert 0.0 <= row["kl_ci"][0] <= row["kl_ci"][1]  # KL: never negative, always known
    chosen = result["alpha"]  # one alpha for each k, from the grid
    assert set(chosen) == {str(k) for k in settings.ks} and set(chosen.values()) <= {2.0, 3.0}
    assert all(c["alpha"] == chosen[str(c["k"])] for c in result["conditions"])
    # Reported: the test split's prompts (5 target, 3 neutral), not validation's (4, 2).
    for condition in [result["baseline"], *result["conditions"]]:
        assert len(condition["values"]["mass_all"]) == len(task.test.target) == 5
        assert len(condition["values"]["kl"]) == len(task.test.neutral) == 3
    assert result["data"]["n_test_target"] == 5 and result["data"]["n_neutral"] == 3


def test_a_fixed_alpha_measures_the_test_split_only(tiny, tmp_path, evaluators):
    model, tokenizer = tiny
    task = tiny_task("countries")
    result = run_task(model, tokenizer, task, TINY, tmp_path, show_progress=False)
    (test,) = evaluators
    assert prompts(test.split.target) == prompts(task.test.target)
    assert prompts(test.split.other) == prompts(task.test.other)
    assert result["sweep"] == [] and result["alpha"] == task.alpha
    assert len(result["baseline"]["values"]["target_acc"]) == len(task.test.target)
    assert len(result["baseline"]["values"]["other_acc"]) == len(task.test.other) == 3
    # Provenance: the model's weights, and per ranking its store, concept and versions.
    from somp_ref.adapters.provenance import model_fingerprint

    assert result["model"] == "tiny" and result["model_fingerprint"] == model_fingerprint(model)
    for name, ranking in result["rankings"].items():
        source = ranking["source"]
        assert source["model_fingerprint"] == result["model_fingerprint"], name
        assert source["concept"] == task.concept and len(source["store_hash"]) == 64, name
        assert source["versions"]["numpy"] == np.__version__, name
    assert result["environment"]["versions"]["numpy"] == np.__version__
    hashes = {ranking["source"]["dictionary_hash"] for ranking in result["rankings"].values()}
    assert len(hashes) == 1 and len(hashes.pop()) == 64  # every ranking: the concept's tokens


def test_the_selection_study_measures_the_validation_split_only(tiny, tmp_path, evaluators):
    model, tokenizer = tiny
    task = tiny_task("colors")
    # The study scales heads at every position, whatever the experiments do.
    settings = replace(TINY, intervene_positions="generated")
    study = selection_study.study_task(model, tokenizer, task, 2, settings, tmp_path)
    (validation,) = evaluators
    assert prompts(validation.split.target) == prompts(task.validation.target)
    assert prompts(validation.split.neutral) == prompts(task.validation.neutral)
    assert validation.positions == "all"
    for condition in [study["baseline"], *study["conditions"]]:
        assert len(condition["values"]["mass"]) == len(task.validation.target) == 4
        assert len(condition["values"]["kl"]) == len(task.validation.neutral) == 2


COMMAND = ["--k", "2", "--random", "1", "--generate", "2", "--neutral", "2", "--atoms", "10"]


@pytest.mark.parametrize(
    "names, flags, qualifies, method, chosen_by",
    [
        (["all"], [], True, "ll", "study"),
        (["study", "colors"], ["--method", "somp"], True, "somp", "flag"),
        (["study", "colors"], [], False, DEFAULT_METHOD, "default"),
        (["colors"], [], None, DEFAULT_METHOD, "default"),
        (["colors"], ["--method", "ll"], None, "ll", "flag"),
    ],
)
def test_a_run_with_the_study_takes_its_verdict_unless_method_is_given(
    tiny, tmp_path, monkeypatch, capsys, names, flags, qualifies, method, chosen_by
):
    model, tokenizer = tiny
    monkeypatch.setattr(experiment_commands, "load", lambda args: (model, tokenizer))
    monkeypatch.setattr(tasks, "build_task", lambda name, seed=0: tiny_task(name))
    studied = []

    def run_study(model, tokenizer, settings, out):
        # "ll" removes the most; both candidates qualify, or neither (too much collateral).
        studied.append(out)
        kl = 1.0 if qualifies else MAX_COLLATERAL + 1.0
        return [synthetic_study({"ll": (0.2, kl, 0.0), "specificity": (0.6, kl, 0.0)})]

    monkeypatch.setattr(selection_study, "run_study", run_study)
    out = tmp_path / "out"
    assert main(["experiment", *names, *flags, *COMMAND, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert len(studied) == (qualifies is not None)
    results = json.loads((out / "results.json").read_text())["experiments"]
    expected = list(TASK_NAMES) if names == ["all"] else [n for n in names if n != "study"]
    assert [result["experiment"] for result in results] == expected
    for result in results:
        assert result["settings"]["method"] == method
        assert result["settings"]["method_chosen_by"] == chosen_by
        assert set(result["rankings"]) == {method, "somp", "ll"}
        # The random control is drawn for the primary ranking's selection: disjoint from it.
        chosen = next(c for c in result["conditions"] if c["method"] == method)
        for control in (c for c in result["conditions"] if c["method"] == "random"):
            assert not set(map(tuple, control["heads"])) & set(map(tuple, chosen["heads"]))
    line = f"primary ranking: {method} ({CHOSEN_BY[chosen_by]})"
    assert line in printed and line in (out / "results.md").read_text()
    assert f"{LABELS.get(method, method)} (default)" in printed
    warned = "warning: the selection study qualified no ranking" in printed
    assert warned == (qualifies is False)
    if qualifies is not None:
        assert (out / "study.md").is_file() and (out / "study.json").is_file()
        assert printed.index("Selection study") < printed.index(line)


# ------------------------------------------------------------------ the embedded model


@pytest.fixture(scope="module")
def smollm():
    from somp_ref.adapters.models import load_model

    return load_model("default")


SETTINGS = Settings(ks=(2, 3), n_random=2, n_generate=3, n_neutral=3, method="somp", n_null=2)


@pytest.mark.model
@pytest.mark.parametrize("name", ["colors", "countries"])
def test_alpha_one_reproduces_the_baseline_exactly(smollm, tmp_path, name):
    model, tokenizer = smollm
    result = run_task(
        model, tokenizer, small(name), replace(SETTINGS, alpha=1.0), tmp_path, show_progress=False
    )
    methods = {"somp", "ll", "random"}
    assert {(c["method"], c["k"]) for c in result["conditions"]} == {
        (m, k) for m in methods for k in (2, 3)
    }
    for condition in result["conditions"]:
        assert condition["outputs"] == result["baseline"]["outputs"]
        base = result["baseline"]["values"]
        assert condition["values"].keys() == base.keys()
        assert all(np.array_equal(condition["values"][k], base[k], equal_nan=True) for k in base)
        assert all(v == 0.0 for v in condition["values"]["kl"])
        if condition["method"] == "random":  # the paper's control: disjoint, same layers
            chosen = next(
                c
                for c in result["conditions"]
                if c["k"] == condition["k"] and c["method"] == "somp"
            )
            assert not set(map(tuple, condition["heads"])) & set(map(tuple, chosen["heads"]))
            layers = sorted(h[0] for h in condition["heads"])
            if not result["shortfall"][str(condition["k"])]:
                assert layers == sorted(h[0] for h in chosen["heads"])
    for row in summarize(result):
        for title, entry in row.items():
            if not (isinstance(entry, dict) and "x base" in title):
                continue
            if "median" in entry:  # the random control's median [IQR] over its sets
                assert not np.isfinite(entry["median"]) or entry["q1"] == entry["q3"] == 1.0
            elif np.isfinite(entry["value"]):
                assert entry["value"] == entry["low"] == entry["high"] == 1.0
    text = format_table(result)
    assert text.splitlines()[0].startswith(f"{name} — alpha 1")
    json.dumps(result)  # everything is plain JSON


@pytest.mark.model
def test_amplification_chooses_alpha_on_validation_and_reports(smollm, tmp_path, evaluators):
    model, tokenizer = smollm
    task = small("amplification")
    settings = replace(SETTINGS, ks=(2,), alpha_grid=(2.0, 3.0))
    result = run_task(model, tokenizer, task, settings, tmp_path, show_progress=False)
    assert [row["alpha"] for row in result["sweep"]] == [2.0, 3.0]
    assert set(result["alpha"]) == {"2"} and result["alpha"]["2"] in (2.0, 3.0)
    assert all(c["alpha"] == result["alpha"]["2"] for c in result["conditions"])
    # The sweep measured the validation prompts (4), every condition the test prompts (5).
    sweep, test = evaluators
    assert prompts(sweep.split.target) == prompts(task.validation.target)
    assert sweep.calls == 1 + len(settings.alpha_grid)
    assert prompts(test.split.target) == prompts(task.test.target)
    assert all(len(c["values"]["mass_all"]) == 5 for c in result["conditions"])
    text = write_report([result], tmp_path)
    assert "alpha sweep on the validation split" in text
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["experiments"][0]["summary"] and (tmp_path / "results.md").is_file()
    # somp-ref compare reads the file as written: a run against itself changes nothing.
    (compared,) = compare_runs(load_results(tmp_path), load_results(tmp_path))
    assert {(row["k"], row["method"]) for row in compared["rows"]} == {
        (2, method) for method in ("somp", "ll", "random")
    }
    for row in compared["rows"]:
        for title, measure, _ in FIGURES["amplify"]:
            entry, unchanged = row[title], 0.0 if measure == "degenerate" else 1.0
            if entry is not None and "value" in entry and np.isfinite(entry["value"]):
                assert entry["value"] == entry["low"] == entry["high"] == unchanged


@pytest.mark.model
def test_the_selection_study_measures_every_ranking_against_its_own_control(
    smollm, tmp_path, evaluators
):
    from somp_ref.adapters.selection_study import study_task
    from somp_ref.ranking import METHODS

    model, tokenizer = smollm
    task = small("colors")
    study = study_task(model, tokenizer, task, 2, SETTINGS, tmp_path)
    by_method = {c["method"]: c for c in study["conditions"] if "random" not in c["method"]}
    assert set(by_method) == set(METHODS)
    for method, condition in by_method.items():
        controls = [c for c in study["conditions"] if c["method"] == f"random:{method}"]
        assert len(controls) == SETTINGS.n_random
        chosen = set(map(tuple, condition["heads"]))
        assert all(not chosen & set(map(tuple, c["heads"])) for c in controls)
        # Measured on the validation split (4 prompts), never the test split (5).
        assert len(condition["values"]["mass"]) == len(task.validation.target) == 4
    (validation,) = evaluators
    assert prompts(validation.split.target) == prompts(task.validation.target)
    verdict = study_verdict([study])
    assert verdict["best"] in METHODS and set(verdict["candidates"]) == set(METHODS)
    lines = format_study([study], verdict).splitlines()
    assert lines[-1].endswith(f"-> {verdict['best']}")
    assert f"median of {SETTINGS.n_random} disjoint sets" in lines[0]


class SweepEvaluator:
    """Measures a sweep without a model: the concept's gain grows with alpha, and so does the
    neutral KL, faster with more heads (k = 2 keeps KL <= 0.5 up to alpha 5, k = 8 only at
    alpha 2)."""

    def __init__(self):
        values = {
            "mass_all": [1.0, 1.0],
            "concept_words": [1.0, 1.0],
            "kl": [0.0],
            "degenerate": [0.0],
        }
        self.baseline = SimpleNamespace(values=values)

    def measure(self, alphas):
        alpha, k = next(iter(alphas.values())), len(alphas)
        return SimpleNamespace(
            values={
                "mass_all": [alpha, alpha],
                "concept_words": [alpha, alpha],
                "kl": [alpha * k / 20],
                "degenerate": [0.0],
            }
        )


def test_the_sweep_chooses_an_alpha_for_each_k():
    scores = HeadScores(np.arange(16.0).reshape(2, 8), {}, {}, "somp", {}, np.zeros(0, np.int64))
    chosen, rows = sweep_alpha(SweepEvaluator(), scores, iter([2, 8, 16]), (2.0, 3.0, 5.0, 8.0))
    # k=2: KL 0.8 at alpha 8 is too much, 5 the strongest within 0.5; k=8: alpha 2 (KL 0.8
    # at 2 already too much: the gentlest); k=16: none within, the gentlest.
    assert chosen == {2: 5.0, 8: 2.0, 16: 2.0}
    assert [(r["k"], r["alpha"]) for r in rows][:4] == [(2, 2.0), (2, 3.0), (2, 5.0), (2, 8.0)]
    assert len(rows) == 12


def test_a_base_model_without_a_chat_template_runs_the_experiment_on_raw_text(tiny, tmp_path):
    """The one chat-template rule: raw text for a tokenizer without a template, in the
    export, the generations and the teacher-forced answers alike."""
    import copy

    model, tokenizer = tiny
    base = copy.deepcopy(tokenizer)
    base.chat_template = None
    result = run_task(model, base, tiny_task("colors"), TINY, tmp_path, show_progress=False)
    store_meta = json.loads((tmp_path / "colors" / "train_store" / "meta.json").read_text())
    assert store_meta["chat_template"] is False
    assert np.isfinite(result["baseline"]["values"]["kl"]).all()
