"""Choosing the default ranking on validation data: the selection study.

On a model with tied embeddings (the embedded SmolLM2), the paper's raw explained variance
picks layer-0 heads that copy input embeddings. Every candidate ranking is measured on the
validation splits (never the test split) at the k the experiments target, next to its own
random control (``Settings.n_random`` sets, 10 by default, with its per-layer counts,
disjoint from it), and the default is the candidate the rule below prefers. The study is
reported as it comes, candidates and controls alike (``report.format_study``); runs of
``somp-ref experiment`` that include the study take its verdict as their primary ranking
unless ``--method`` is given (:func:`study_verdict`).

The rule, per task: a candidate's *effect* is how much of the target it removes beyond its
random control, ``1 - target / random median target``; its *collateral* is its
whole-answer neutral KL over its control's median. A candidate qualifies when its
collateral stays within ``MAX_COLLATERAL`` and its answers stay fluent (at most
``MAX_DEGENERATE`` degenerate) in every task; the default is the qualifying candidate with
the largest mean effect. Effects within ``EFFECT_TIE`` of the largest are a tie (a
validation split of tens of prompts cannot tell them apart), and the tied candidate with
the least mean collateral wins.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from somp_ref.adapters.experiment import Condition, Settings, measure_selection, rankings, set_up
from somp_ref.adapters.tasks import Task, build_task
from somp_ref.ranking import METHODS
from somp_ref.selection import top_heads
from somp_ref.statistics import estimate, nan_mean

#: The tasks and the k each experiment's target is stated at.
STUDY_TASKS = {"colors": 8, "countries": 3}
#: What each task's target effect is measured by on validation (teacher-forced mass where
#: generation would be too noisy; answer accuracy for QA).
TARGET = {"colors": "mass", "countries": "target_acc"}
MAX_COLLATERAL = 2.0
MAX_DEGENERATE = 0.1
#: Mean effects closer than this to the best are tied: one prompt of a 48-prompt validation
#: split moves a task's effect by about 0.02, and the mean is over two tasks.
EFFECT_TIE = 0.05


def study_task(
    model: Any, tokenizer: Any, task: Task, k: int, settings: Settings, out: Path
) -> dict:
    """Every candidate and its random control on one task's validation split, at ``k``."""
    started = time.perf_counter()
    name = task.name
    # The study scales heads at every position, whatever the experiments do.
    setup = set_up(model, tokenizer, task, replace(settings, intervene_positions="all"), out)
    store = setup.store
    ranked = rankings(store, setup.concept.ids, METHODS, settings, show=True)
    evaluator = setup.evaluator(task.validation)
    conditions = measure_selection(
        evaluator,
        ranked,
        [k],
        -1.0,
        settings.n_random,
        store.n_layers,
        store.n_heads,
        controls=METHODS,
        seed=settings.seed,
    )
    return {
        "task": name,
        "k": k,
        "target": TARGET[name],
        "baseline": asdict(Condition.of("baseline", 0, 1.0, [], evaluator.baseline)),
        "conditions": [asdict(c) for c in conditions],
        "layers": {m: sorted(h[0] for h in top_heads(s, k)) for m, s in ranked.items()},
        "seconds": time.perf_counter() - started,
    }


def judge(study: dict) -> dict[str, dict[str, float]]:
    """Per candidate: target, KL, degenerate share, its control's medians, effect and
    collateral (see the module's rule)."""
    rows = {}
    by = {c["method"]: c for c in study["conditions"] if not c["method"].startswith("random")}
    for method, condition in by.items():
        control = [c for c in study["conditions"] if c["method"] == f"random:{method}"]
        target = nan_mean(condition["values"][study["target"]])
        kl = nan_mean(condition["values"]["kl"])
        random_target = float(np.median([nan_mean(c["values"][study["target"]]) for c in control]))
        random_kl = float(np.median([nan_mean(c["values"]["kl"]) for c in control]))
        fluency = "degenerate" if "degenerate" in condition["values"] else "target_degenerate"
        # 95 % intervals over the validation prompts (the control's median held fixed: its
        # spread over sets is another matter), for reading the verdict, not for making it.
        target_ci = _interval(condition["values"][study["target"]])
        kl_ci = _interval(condition["values"]["kl"])
        rows[method] = {
            "target": target,
            "target_ci": target_ci,
            "random_target": random_target,
            "kl": kl,
            "kl_ci": kl_ci,
            "random_kl": random_kl,
            "degenerate": nan_mean(condition["values"][fluency]),
            "effect": 1.0 - target / random_target if random_target else float("nan"),
            "effect_ci": (
                [1.0 - target_ci[1] / random_target, 1.0 - target_ci[0] / random_target]
                if random_target
                else [float("nan"), float("nan")]
            ),
            "collateral": kl / random_kl if random_kl else float("inf"),
        }
        if "other_acc" in condition["values"]:
            rows[method]["other_acc"] = nan_mean(condition["values"]["other_acc"])
            rows[method]["random_other_acc"] = float(
                np.median([nan_mean(c["values"]["other_acc"]) for c in control])
            )
    return rows


def _interval(values: list[float]) -> list[float]:
    """The 95 % bootstrap interval [low, high] of the mean of the finite ``values`` (NaN
    where none is)."""
    found = estimate(values, values, "mean")
    return [found.low, found.high]


def choose(studies: list[dict]) -> tuple[str, dict[str, dict[str, Any]]]:
    """The default ranking by the module's rule, and each candidate's verdict."""
    judged = [judge(study) for study in studies]
    verdicts = {}
    for method in judged[0]:
        rows = [j[method] for j in judged]
        fits = all(
            r["collateral"] <= MAX_COLLATERAL and r["degenerate"] <= MAX_DEGENERATE for r in rows
        )
        verdicts[method] = {
            "qualifies": fits,
            "mean_effect": nan_mean([r["effect"] for r in rows]),
            "mean_collateral": nan_mean([r["collateral"] for r in rows]),
        }
    qualified = {m: v for m, v in verdicts.items() if v["qualifies"]} or verdicts
    top = max(v["mean_effect"] for v in qualified.values())
    tied = [m for m, v in qualified.items() if v["mean_effect"] >= top - EFFECT_TIE]
    best = min(tied, key=lambda m: qualified[m]["mean_collateral"])
    return best, verdicts


def study_verdict(studies: list[dict]) -> dict[str, Any]:
    """The study's outcome, for the report and the command: ``best`` (by :func:`choose`),
    ``qualified`` (whether ``best`` meets the rule; when no candidate does, ``best`` is only
    the largest effect and the experiments keep the default ranking), ``candidates`` (each
    one's verdict), ``judged`` (per study, :func:`judge`'s rows) and ``rule`` (its limits)."""
    best, verdicts = choose(studies)
    return {
        "best": best,
        "qualified": verdicts[best]["qualifies"],
        "candidates": verdicts,
        "judged": [judge(study) for study in studies],
        "rule": {
            "max_collateral": MAX_COLLATERAL,
            "max_degenerate": MAX_DEGENERATE,
            "effect_tie": EFFECT_TIE,
        },
    }


def run_study(model: Any, tokenizer: Any, settings: Settings, out: Path) -> list[dict]:
    """The study over :data:`STUDY_TASKS`."""
    settings = replace(settings, ks=tuple(STUDY_TASKS.values()))
    return [
        study_task(model, tokenizer, build_task(name, seed=settings.seed), k, settings, out)
        for name, k in STUDY_TASKS.items()
    ]
