"""Choosing the default ranking on validation data: the selection study.

On a model with tied embeddings (the embedded SmolLM2), the paper's raw explained variance
picks layer-0 heads that copy input embeddings. Every candidate ranking is measured on the
validation splits (never the test split) at the k the experiments target, next to its own
random control (10 sets with its per-layer counts, disjoint from it), and the default is
the candidate the rule below prefers. The study is reported as it comes, candidates and
controls alike.

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

from somp_ref.adapters.evaluation import Evaluator
from somp_ref.adapters.experiment import Condition, Settings, measure_selection, rankings
from somp_ref.adapters.head_export import export_activations
from somp_ref.adapters.tasks import Task, build_task
from somp_ref.concepts import load_concept, store_concept_ids
from somp_ref.ranking import METHODS
from somp_ref.selection import top_heads

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


def _mean(values: list[float]) -> float:
    array = np.asarray(values, dtype=float)
    return float(np.nanmean(array)) if np.isfinite(array).any() else float("nan")


def study_task(
    model: Any, tokenizer: Any, task: Task, k: int, settings: Settings, out: Path
) -> dict:
    """Every candidate and its random control on one task's validation split, at ``k``."""
    started = time.perf_counter()
    name = task.name
    store = export_activations(
        model,
        tokenizer,
        list(task.train),
        out / name / "train_store",
        positions=settings.positions,
        chat_template=True,
        batch_size=settings.batch_size,
        overwrite=True,
    )
    concept = store_concept_ids(store.vocab(), task.concept)
    ranked = rankings(store, concept.ids, METHODS, settings, show=True)
    evaluator = Evaluator(
        model,
        tokenizer,
        task,
        task.validation,
        load_concept(task.concept),
        concept.ids,
        n_generate=settings.n_generate,
        n_neutral=settings.n_neutral,
        batch_size=settings.batch_size,
    )
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
        target = _mean(condition["values"][study["target"]])
        kl = _mean(condition["values"]["kl"])
        random_target = float(np.median([_mean(c["values"][study["target"]]) for c in control]))
        random_kl = float(np.median([_mean(c["values"]["kl"]) for c in control]))
        fluency = "degenerate" if "degenerate" in condition["values"] else "target_degenerate"
        rows[method] = {
            "target": target,
            "random_target": random_target,
            "kl": kl,
            "random_kl": random_kl,
            "degenerate": _mean(condition["values"][fluency]),
            "effect": 1.0 - target / random_target if random_target else float("nan"),
            "collateral": kl / random_kl if random_kl else float("inf"),
        }
        if "other_acc" in condition["values"]:
            rows[method]["other_acc"] = _mean(condition["values"]["other_acc"])
            rows[method]["random_other_acc"] = float(
                np.median([_mean(c["values"]["other_acc"]) for c in control])
            )
    return rows


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
            "mean_effect": _mean([r["effect"] for r in rows]),
            "mean_collateral": _mean([r["collateral"] for r in rows]),
        }
    qualified = {m: v for m, v in verdicts.items() if v["qualifies"]} or verdicts
    top = max(v["mean_effect"] for v in qualified.values())
    tied = [m for m, v in qualified.items() if v["mean_effect"] >= top - EFFECT_TIE]
    best = min(tied, key=lambda m: qualified[m]["mean_collateral"])
    return best, verdicts


def format_study(studies: list[dict]) -> str:
    """The study as tables, and the verdict."""
    best, verdicts = choose(studies)
    lines = [
        "Selection study on the validation splits (alpha -1; each candidate next to its own "
        "random control: median of 10 disjoint sets with its per-layer counts)"
    ]
    for study in studies:
        lines.append(
            f"{study['task']} (k={study['k']}, target = {study['target']}; baseline "
            f"{_mean(study['baseline']['values'][study['target']]):.3f})"
        )
        lines.append(
            f"  {'ranking':<12} {'layers':<28} {'target':>7} {'random':>7} {'effect':>7} "
            f"{'KL':>6} {'random':>7} {'KL x':>6} {'degen':>6}"
        )
        for method, r in judge(study).items():
            layers = ",".join(map(str, study["layers"][method]))
            lines.append(
                f"  {method:<12} {layers:<28} {r['target']:>7.3f} {r['random_target']:>7.3f} "
                f"{r['effect']:>7.2f} {r['kl']:>6.2f} {r['random_kl']:>7.2f} "
                f"{r['collateral']:>6.2f} {r['degenerate']:>6.0%}"
            )
    lines.append(
        "verdict (qualifies: KL <= "
        f"{MAX_COLLATERAL:g}x its control and <= {MAX_DEGENERATE:.0%} degenerate in every "
        f"task; default = the largest mean effect among those, effects within {EFFECT_TIE:g} "
        "tied and the least mean collateral winning a tie): "
        + ", ".join(
            f"{m} {'ok' if v['qualifies'] else 'out'} (effect {v['mean_effect']:.2f}, "
            f"KL x {v['mean_collateral']:.2f})"
            for m, v in verdicts.items()
        )
        + f" -> {best}"
    )
    return "\n".join(lines)


def run_study(model: Any, tokenizer: Any, settings: Settings, out: Path) -> list[dict]:
    """The study over :data:`STUDY_TASKS`."""
    settings = replace(settings, ks=tuple(STUDY_TASKS.values()))
    return [
        study_task(model, tokenizer, build_task(name, seed=settings.seed), k, settings, out)
        for name, k in STUDY_TASKS.items()
    ]
