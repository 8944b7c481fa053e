"""The paper's protocol end to end on one model, returning results only (the report
module turns them into tables):

1. export each head's output for the train prompts (by default averaged over the prompt's
   own tokens, the paper's rows; ``Settings.positions``);
2. rank the heads for the concept: the chosen ranking (default
   :data:`somp_ref.ranking.DEFAULT_METHOD`), the paper's raw explained variance ("somp")
   and the Logit Lens baseline ("ll"), always all three;
3. choose alpha on the validation split when the task does not fix it (amplification: a
   sweep over the paper's 2..8, one alpha for each k), never on the test split;
4. for each k, scale the top-k heads of each ranking, and 10 random head sets with the same
   per-layer counts and disjoint from the selection, and measure every test prompt; the
   heads are scaled at the positions ``Settings.intervene_positions`` selects (every
   position by default, as the paper; "generated": the answer's tokens only).
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from somp_ref.adapters.evaluation import Evaluator, Measurement
from somp_ref.adapters.head_export import export_activations
from somp_ref.adapters.intervene import check_positions
from somp_ref.adapters.tasks import Split, Task
from somp_ref.concepts import ConceptTokens, load_concept, store_concept_ids
from somp_ref.head_scores import Head, HeadScores
from somp_ref.progress import progress
from somp_ref.provenance import package_versions
from somp_ref.ranking import DEFAULT_ATOMS, DEFAULT_METHOD, DEFAULT_NULL, rank_heads
from somp_ref.selection import layer_shortfall, random_heads_like, top_heads
from somp_ref.statistics import estimate, nan_mean, point
from somp_ref.store import ActivationStore

#: The paper's amplification sweep (alpha in 2..8).
ALPHA_GRID = (2.0, 3.0, 5.0, 8.0)
#: The sweep's rule, for each k: the alpha with the largest concept gain on validation among
#: those whose neutral KL stays at or below this (nats) and whose answers stay mostly
#: fluent; where none does, the gentlest alpha of the grid. One alpha for every k would let
#: the largest k decide for all (a strong alpha that breaks the model at k = 16 is refused
#: for k = 3 too, where it may be what amplifies).
SWEEP_MAX_KL = 0.5
SWEEP_MAX_DEGENERATE = 0.1


@dataclass(frozen=True)
class Settings:
    """Everything that defines a run (recorded in results.json)."""

    ks: tuple[int, ...] = (3, 8, 16)
    method: str = DEFAULT_METHOD
    alpha: float | None = None  # None: the task's own, or the validation sweep's
    n_random: int = 10
    atoms: int = DEFAULT_ATOMS
    n_null: int = DEFAULT_NULL
    positions: str = "prompt-mean"
    exclude_layers: tuple[int, ...] = ()
    n_generate: int = 32
    n_neutral: int = 32
    batch_size: int = 32
    seed: int = 0
    model: str = "default"
    alpha_grid: tuple[float, ...] = ALPHA_GRID
    intervene_positions: str = "all"  # where heads are scaled: intervene.POSITION_RULES
    #: How the command chose ``method``: "flag" (--method), "study" (the selection study's
    #: verdict), "default" (DEFAULT_METHOD); None when the caller built the Settings.
    method_chosen_by: str | None = None


@dataclass
class Condition:
    """One measured intervention."""

    method: str
    k: int
    alpha: float
    heads: list[Head]
    seed: int | None = None
    values: dict[str, list[float]] = field(default_factory=dict)
    outputs: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, method, k, alpha, heads, measurement: Measurement, seed=None) -> Condition:
        return cls(
            method,
            k,
            alpha,
            [tuple(map(int, h)) for h in heads],
            seed,
            {name: v.tolist() for name, v in measurement.values.items()},
            measurement.outputs,
        )


@dataclass(frozen=True)
class TaskSetup:
    """One task's train prompts exported and its concept found in the store's vocabulary:
    what ranking heads and measuring a split of the task need (:func:`set_up`)."""

    model: Any
    tokenizer: Any
    task: Task
    settings: Settings
    store: ActivationStore
    concept: ConceptTokens
    words: list[str]

    def evaluator(self, split: Split) -> Evaluator:
        """Measures interventions on ``split`` of the task, with the heads scaled at the
        positions ``settings.intervene_positions`` selects."""
        settings = self.settings
        return Evaluator(
            self.model,
            self.tokenizer,
            self.task,
            split,
            self.words,
            self.concept.ids,
            n_generate=settings.n_generate,
            n_neutral=settings.n_neutral,
            batch_size=settings.batch_size,
            positions=settings.intervene_positions,
        )


def set_up(
    model: Any, tokenizer: Any, task: Task, settings: Settings, out: Path, *, show: bool = True
) -> TaskSetup:
    """Export the task's train prompts to ``out/NAME/train_store`` (rows as
    ``settings.positions``, after the chat template) and find its concept's tokens."""
    store = export_activations(
        model,
        tokenizer,
        list(task.train),
        out / task.name / "train_store",
        positions=settings.positions,
        chat_template=None,  # the tokenizer's template where it has one (a base model: raw)
        batch_size=settings.batch_size,
        overwrite=True,
        show_progress=show,
    )
    concept = store_concept_ids(store.vocab(), task.concept)
    return TaskSetup(
        model, tokenizer, task, settings, store, concept, list(load_concept(task.concept))
    )


def rankings(
    store, concept_ids: list[int], methods: Iterable[str], settings: Settings, show: bool
) -> dict[str, HeadScores]:
    """Every ranking asked for, computed once each."""
    return {
        method: rank_heads(
            store,
            concept_ids,
            settings.atoms,
            method,
            n_null=settings.n_null,
            seed=settings.seed,
            exclude_layers=settings.exclude_layers,
            show_progress=show,
        )
        for method in dict.fromkeys(methods)
    }


def measure_selection(
    evaluator: Evaluator,
    ranked: dict[str, HeadScores],
    ks: Iterable[int],
    alpha: float | Mapping[int, float],
    n_random: int,
    n_layers: int,
    n_heads: int,
    *,
    controls: Iterable[str],
    seed: int = 0,
    show: bool = True,
) -> list[Condition]:
    """Each ranking's top-k heads, and ``n_random`` random sets shaped like (same per-layer
    counts) and disjoint from each control ranking's selection, labelled "random" for one
    control and "random:METHOD" for several; scaled by ``alpha``, or ``alpha[k]``."""
    controls = list(controls)
    plan = [(k, method, None, None) for k in ks for method in ranked]
    plan += [
        (k, "random" if len(controls) == 1 else f"random:{control}", control, draw)
        for k in ks
        for control in controls
        for draw in range(seed, seed + n_random)
    ]
    conditions = []
    for k, method, control, draw in progress(plan, desc="interventions", enabled=show):
        if control is not None:
            heads = random_heads_like(top_heads(ranked[control], k), n_layers, n_heads, draw)
        else:
            heads = top_heads(ranked[method], k)
        scale = alpha[k] if isinstance(alpha, Mapping) else alpha
        measurement = evaluator.measure({head: scale for head in heads})
        conditions.append(Condition.of(method, k, scale, heads, measurement, draw))
    return conditions


def sweep_alpha(
    evaluator: Evaluator, scores: HeadScores, ks: Iterable[int], grid: Iterable[float]
) -> tuple[dict[int, float], list[dict[str, Any]]]:
    """The alpha the validation sweep chooses for each k (see SWEEP_MAX_KL), with the sweep's
    rows."""
    ks = list(ks)
    base = evaluator.baseline.values
    rows = []
    for k in ks:
        heads = top_heads(scores, k)
        for alpha in grid:
            values = evaluator.measure({head: alpha for head in heads}).values
            # The choice is made on the figures; their 95 % intervals are for the reader.
            gain = estimate(values["mass_all"], base["mass_all"], "ratio")
            words = estimate(values["concept_words"], base["concept_words"], "ratio")
            kl = estimate(values["kl"], values["kl"], "mean")
            rows.append(
                {
                    "k": k,
                    "alpha": alpha,
                    "gain": point(values["mass_all"], base["mass_all"], "ratio"),
                    "gain_ci": [gain.low, gain.high],
                    "words_gain": point(values["concept_words"], base["concept_words"], "ratio"),
                    "words_gain_ci": [words.low, words.high],
                    "kl": nan_mean(values["kl"]),
                    "kl_ci": [kl.low, kl.high],
                    "degenerate": nan_mean(values["degenerate"]),
                }
            )
    chosen = {}
    for k in ks:
        tried = [r for r in rows if r["k"] == k]
        fine = [
            r for r in tried if r["kl"] <= SWEEP_MAX_KL and r["degenerate"] <= SWEEP_MAX_DEGENERATE
        ]
        best = max(fine, key=lambda r: r["gain"]) if fine else min(tried, key=lambda r: r["alpha"])
        chosen[k] = best["alpha"]
    return chosen, rows


def run_task(
    model: Any,
    tokenizer: Any,
    task: Task,
    settings: Settings,
    out: Path,
    *,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run one experiment (the store goes to ``out/NAME/train_store``); returns its results."""
    check_positions(settings.intervene_positions)
    started = time.perf_counter()
    setup = set_up(model, tokenizer, task, settings, out, show=show_progress)
    store, concept = setup.store, setup.concept
    ranked = rankings(store, concept.ids, (settings.method, "somp", "ll"), settings, show_progress)
    timing = {"export_and_rank": time.perf_counter() - started}

    alpha, sweep = settings.alpha, []
    if alpha is None and task.alpha is None:
        alpha, sweep = sweep_alpha(
            setup.evaluator(task.validation),
            ranked[settings.method],
            settings.ks,
            settings.alpha_grid,
        )
        timing["validation_sweep"] = time.perf_counter() - started - sum(timing.values())
    elif alpha is None:
        alpha = task.alpha
    test = setup.evaluator(task.test)
    conditions = measure_selection(
        test,
        ranked,
        settings.ks,
        alpha,
        settings.n_random,
        store.n_layers,
        store.n_heads,
        controls=[settings.method],
        seed=settings.seed,
        show=show_progress,
    )
    timing["test"] = time.perf_counter() - started - sum(timing.values())
    return {
        "experiment": task.name,
        "concept": task.concept,
        "kind": task.kind,
        # A number, or {k: alpha} where the validation sweep chose one for each k.
        "alpha": {str(k): a for k, a in alpha.items()} if isinstance(alpha, Mapping) else alpha,
        "model": getattr(model, "somp_ref_model_id", settings.model),
        "model_fingerprint": store.meta.get("model_fingerprint"),
        "settings": asdict(settings),
        "data": {
            "n_train": len(task.train),
            "n_test_target": len(task.test.target),
            "n_test_other": len(task.test.other),
            "n_generated": len(test.generated),
            "n_neutral": len(test.neutral),
            "notes": list(task.notes),
            "concept_tokens": concept.report(),
        },
        "rankings": {
            name: {
                "top": [list(h) for h in top_heads(scores, max(settings.ks))],
                "params": scores.params,
                "source": scores.with_source(concept=task.concept).source,
            }
            for name, scores in ranked.items()
        },
        "shortfall": {
            str(k): layer_shortfall(top_heads(ranked[settings.method], k), store.n_heads)
            for k in settings.ks
        },
        "sweep": sweep,
        "baseline": asdict(Condition.of("baseline", 0, 1.0, [], test.baseline)),
        "conditions": [asdict(c) for c in conditions],
        "seconds": time.perf_counter() - started,
        "timing": timing,
        "environment": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "versions": package_versions(),
        },
    }
