"""A fast end-to-end experiment on the real model: the result schema, and alpha = 1
reproducing the baseline exactly."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from somp_ref.adapters.experiment import Settings, run_task  # noqa: E402
from somp_ref.adapters.report import format_table, write_report  # noqa: E402
from somp_ref.adapters.tasks import build_task  # noqa: E402

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def smollm():
    from somp_ref.adapters.models import load_model

    return load_model("default")


@pytest.mark.parametrize("name", ["colors", "countries"])
def test_alpha_one_reproduces_the_baseline_exactly(smollm, tmp_path, name):
    model, tokenizer = smollm
    settings = Settings(
        heads=(2, 4),
        alpha=1.0,
        seeds=2,
        rank="specificity",
        atoms=4,
        n_null=2,
        n_train=8,
        n_test=3,
        max_new_tokens=6,
    )
    task = build_task(name, n_train=8, n_test=3)
    result = run_task(model, tokenizer, task, settings, tmp_path, show_progress=False)

    methods = {"specificity", "ll", "random"}
    assert {(c["method"], c["k"]) for c in result["conditions"]} == {
        (m, k) for m in methods for k in (2, 4)
    }
    assert sum(c["method"] == "random" for c in result["conditions"]) == 2 * 2
    for condition in result["conditions"]:
        assert condition["outputs"] == result["baseline"]["outputs"]
        assert condition["metrics"] == result["baseline"]["metrics"]
        assert condition["metrics"]["kl_neutral"] == 0.0
    for row in result["summary"]:
        assert row["k"] in (2, 4) and row["method"] in methods
        if result["baseline"]["metrics"].get("concept_words"):
            assert row["target_vs_baseline"] == 1.0

    saved = json.loads((tmp_path / name / "results.json").read_text())
    assert saved["experiment"] == name and saved["alpha"] == 1.0
    assert set(saved["rankings"]) == {"somp", "ll", "specificity"}
    assert saved["settings"]["heads"] == [2, 4]
    assert len(saved["rankings"]["specificity"]["top"]) == 4
    text = write_report([result], tmp_path)
    assert format_table(result).splitlines()[0].startswith(f"{name} — alpha 1")
    assert "Jaccard" in text and (tmp_path / "results.md").is_file()
    assert (tmp_path / name / "plot.png").stat().st_size > 0
