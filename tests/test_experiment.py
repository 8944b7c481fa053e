"""The experiment end to end on the real model, on a few prompts: the result's schema, alpha
= 1 reproducing the baseline exactly, the alpha sweep on validation, and the report."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from somp_ref.adapters.comparison import compare_runs, load_results  # noqa: E402
from somp_ref.adapters.experiment import Settings, run_task  # noqa: E402
from somp_ref.adapters.report import (  # noqa: E402
    FIGURES,
    format_table,
    summarize,
    write_report,
)
from somp_ref.adapters.tasks import Split, build_task  # noqa: E402

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def smollm():
    from somp_ref.adapters.models import load_model

    return load_model("default")


def small(name: str):
    task = build_task(name)

    def cut(split: Split) -> Split:
        return Split(split.target[:5], split.other[:5], split.neutral[:3])

    return replace(task, train=task.train[:8], validation=cut(task.validation), test=cut(task.test))


SETTINGS = Settings(ks=(2, 3), n_random=2, n_generate=3, n_neutral=3, method="somp", n_null=2)


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


def test_amplification_chooses_alpha_on_validation_and_reports(smollm, tmp_path):
    model, tokenizer = smollm
    settings = replace(SETTINGS, ks=(2,), alpha_grid=(2.0, 3.0))
    result = run_task(
        model, tokenizer, small("amplification"), settings, tmp_path, show_progress=False
    )
    assert [row["alpha"] for row in result["sweep"]] == [2.0, 3.0]
    assert result["alpha"] in (2.0, 3.0)
    assert all(c["alpha"] == result["alpha"] for c in result["conditions"])
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


def test_the_selection_study_measures_every_ranking_against_its_own_control(smollm, tmp_path):
    from somp_ref.adapters.selection_study import choose, format_study, study_task
    from somp_ref.ranking import METHODS

    model, tokenizer = smollm
    study = study_task(model, tokenizer, small("colors"), 2, SETTINGS, tmp_path)
    by_method = {c["method"]: c for c in study["conditions"] if "random" not in c["method"]}
    assert set(by_method) == set(METHODS)
    for method, condition in by_method.items():
        controls = [c for c in study["conditions"] if c["method"] == f"random:{method}"]
        assert len(controls) == SETTINGS.n_random
        chosen = set(map(tuple, condition["heads"]))
        assert all(not chosen & set(map(tuple, c["heads"])) for c in controls)
        # Measured on the validation split, never the test split.
        assert len(condition["values"]["mass"]) == len(small("colors").validation.target)
    best, verdicts = choose([study])
    assert best in METHODS and set(verdicts) == set(METHODS)
    assert format_study([study]).splitlines()[-1].endswith(f"-> {best}")
