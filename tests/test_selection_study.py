"""The selection study's rule: how the default ranking is chosen from validation figures."""

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("torch")

from somp_ref.adapters.report import format_study, write_study  # noqa: E402
from somp_ref.adapters.selection_study import (  # noqa: E402
    EFFECT_TIE,
    MAX_COLLATERAL,
    MAX_DEGENERATE,
    choose,
    judge,
    study_verdict,
)


def study(figures: dict[str, tuple[float, float, float]], random=(1.0, 1.0), sets=3) -> dict:
    """A study of one task: per candidate (target, KL, degenerate share), each measured on
    two prompts, and a control of ``sets`` sets with the given (target, KL)."""
    conditions = []
    for method, (target, kl, degenerate) in figures.items():
        conditions.append(
            {
                "method": method,
                "values": {
                    "mass": [target, target],
                    "kl": [kl, kl],
                    "degenerate": [degenerate, degenerate],
                },
            }
        )
        for _ in range(sets):
            conditions.append(
                {
                    "method": f"random:{method}",
                    "values": {"mass": [random[0]] * 2, "kl": [random[1]] * 2},
                }
            )
    return {
        "task": "colors",
        "k": 8,
        "target": "mass",
        "baseline": {"values": {"mass": [0.5, 0.7]}},
        "conditions": conditions,
        "layers": {method: [3, 5] for method in figures},
    }


def test_effect_and_collateral_are_measured_against_the_candidates_own_control():
    rows = judge(study({"a": (0.25, 0.5, 0.0)}, random=(0.5, 2.0)))
    assert rows["a"]["effect"] == pytest.approx(0.5)  # 1 - 0.25 / 0.5
    assert rows["a"]["collateral"] == pytest.approx(0.25)  # 0.5 / 2.0


def test_the_largest_effect_among_qualifying_candidates_wins():
    figures = {
        "destroys": (0.0, 1.0, MAX_DEGENERATE + 0.2),  # largest effect, not fluent
        "harms": (0.1, MAX_COLLATERAL + 0.5, 0.0),  # large effect, too much collateral
        "good": (0.5, 1.0, 0.0),
        "weak": (0.9, 0.2, 0.0),
    }
    best, verdicts = choose([study(figures)])
    assert best == "good"
    assert not verdicts["destroys"]["qualifies"] and not verdicts["harms"]["qualifies"]


@given(
    gap=st.floats(0, EFFECT_TIE * 0.9),
    kl_first=st.floats(0.1, 1.9),
    kl_second=st.floats(0.1, 1.9),
)
def test_a_near_tie_in_effect_goes_to_the_least_collateral(gap, kl_first, kl_second):
    # Effects a validation split cannot tell apart must not decide by their last digit.
    figures = {"first": (0.5, kl_first, 0.0), "second": (0.5 + gap, kl_second, 0.0)}
    best, _ = choose([study(figures)])
    assert best == ("first" if kl_first < kl_second else "second") or kl_first == kl_second


def test_a_clear_effect_wins_over_less_collateral():
    figures = {"strong": (0.2, 1.5, 0.0), "gentle": (0.2 + 3 * EFFECT_TIE, 0.1, 0.0)}
    assert choose([study(figures)])[0] == "strong"


def test_the_verdict_says_whether_the_best_candidate_qualifies():
    good = study_verdict([study({"good": (0.5, 1.0, 0.0), "weak": (0.9, 0.2, 0.0)})])
    assert good["best"] == "good" and good["qualified"]
    assert good["rule"] == {
        "max_collateral": MAX_COLLATERAL,
        "max_degenerate": MAX_DEGENERATE,
        "effect_tie": EFFECT_TIE,
    }
    # None qualifies: the largest effect is named, and said not to qualify (the command
    # then keeps the default ranking).
    harmful = {"a": (0.1, MAX_COLLATERAL + 1, 0.0), "b": (0.5, 1.0, MAX_DEGENERATE + 0.1)}
    none = study_verdict([study(harmful)])
    assert none["best"] == "a" and not none["qualified"]


@pytest.mark.parametrize("sets", [3, 10])
def test_the_study_tables_say_how_many_random_sets_each_control_has(sets, tmp_path):
    studies = [study({"good": (0.5, 1.0, 0.0), "weak": (0.9, 0.2, 0.0)}, sets=sets)]
    verdict = study_verdict(studies)
    text = format_study(studies, verdict)
    lines = text.splitlines()
    assert f"median of {sets} disjoint sets" in lines[0]
    assert lines[1] == "colors (k=8, target = mass; baseline 0.600)"
    assert lines[-1].endswith("-> good") and "good ok (effect 0.50" in lines[-1]
    assert write_study(studies, verdict, tmp_path) == text
    assert (tmp_path / "study.md").read_text() == f"```\n{text}\n```\n"
    assert json.loads((tmp_path / "study.json").read_text()) == studies


@given(
    masses=st.lists(st.floats(0.0, 1.0), min_size=2, max_size=20),
    random_target=st.floats(0.05, 1.0),
)
def test_the_study_gives_each_figure_its_interval_over_prompts(masses, random_target):
    condition = study({"a": (0.0, 1.0, 0.0)}, random=(random_target, 1.0))
    condition["conditions"][0]["values"]["mass"] = masses
    row = judge(condition)["a"]
    low, high = row["target_ci"]
    slack = 4 * np.finfo(float).eps * max(1.0, max(masses))  # the mean's rounding
    assert min(masses) - slack <= low <= high <= max(masses) + slack
    # The effect's interval is the target's, through 1 - target / random (decreasing).
    assert row["effect_ci"] == pytest.approx([1 - high / random_target, 1 - low / random_target])
    text = format_study([condition], study_verdict([condition]))
    assert f"{row['target']:.3f} [{low:.3f},{high:.3f}]" in text
