"""The paper's protocol end to end on one model: export the train prompts, rank heads, then
for each k scale the top-k heads (by the chosen ranking, by the Logit Lens, and random heads
with the same count per layer over several seeds) and evaluate on the test prompts."""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from somp_ref.adapters.evaluation import Evaluator
from somp_ref.adapters.export import export_activations
from somp_ref.adapters.summary import summarize
from somp_ref.adapters.tasks import Task, build_task
from somp_ref.concepts import load_concept, store_concept_ids
from somp_ref.files import write_text_atomically
from somp_ref.heads import (
    HeadScores,
    random_heads_like,
    rank_heads,
    top_heads,
)
from somp_ref.progress import progress


@dataclass
class Settings:
    """Everything that defines a run (recorded in results.json)."""

    heads: tuple[int, ...] = (3, 8, 16)
    alpha: float | None = None  # None: the task's default (-1, or 5 for amplification)
    seeds: int = 5
    rank: str = "specificity"
    exclude_layers: tuple[int, ...] = ()
    atoms: int = 20
    n_null: int = 6
    n_train: int = 64
    n_test: int = 24
    batch_size: int = 24
    data_seed: int = 0
    max_new_tokens: int | None = None
    model: str = "default"


def _rankings(store, concept_ids, settings: Settings, show: bool) -> dict[str, HeadScores]:
    options = {"exclude_layers": settings.exclude_layers, "show_progress": show}
    ranked = {
        "somp": rank_heads(store, concept_ids, settings.atoms, "somp", **options),
        "ll": rank_heads(store, concept_ids, settings.atoms, "ll", **options),
    }
    if settings.rank == "specificity":
        ranked["specificity"] = rank_heads(
            store,
            concept_ids,
            settings.atoms,
            "specificity",
            n_null=settings.n_null,
            seed=settings.data_seed,
            **options,
        )
    return ranked


def run_task(
    model: Any,
    tokenizer: Any,
    task: Task,
    settings: Settings,
    out: Path,
    *,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run one experiment; returns its results (also written to ``out/NAME/``)."""
    started = time.perf_counter()
    folder = out / task.name
    folder.mkdir(parents=True, exist_ok=True)
    alpha = task.alpha if settings.alpha is None else settings.alpha
    if settings.max_new_tokens is not None:
        task.max_new_tokens = settings.max_new_tokens
    store = export_activations(
        model,
        tokenizer,
        task.train,
        folder / "train_store",
        chat_template=True,
        batch_size=settings.batch_size,
        overwrite=True,
        show_progress=show_progress,
    )
    concept = store_concept_ids(store.vocab(), task.concept)
    rankings = _rankings(store, concept.ids, settings, show_progress)
    for name, scores in rankings.items():
        scores.to_json(folder / f"scores_{name}.json")
    evaluator = Evaluator(
        model,
        tokenizer,
        task,
        load_concept(task.concept),
        concept.ids,
        batch_size=settings.batch_size,
    )
    methods = [settings.rank] + (["ll"] if settings.rank != "ll" else [])
    conditions = []
    plan = [(k, method, None) for k in settings.heads for method in methods]
    plan += [(k, "random", seed) for k in settings.heads for seed in range(settings.seeds)]
    for k, method, seed in progress(
        plan, desc=f"{task.name}: interventions", enabled=show_progress
    ):
        main = top_heads(rankings[settings.rank], k)
        if method == "random":
            heads = random_heads_like(main, store.n_layers, store.n_heads, seed)
        else:
            heads = top_heads(rankings[method], k)
        result = evaluator.evaluate({head: alpha for head in heads})
        conditions.append(
            {"method": method, "k": k, "seed": seed, "heads": [list(h) for h in heads], **result}
        )
    results = {
        "experiment": task.name,
        "concept": task.concept,
        "kind": task.kind,
        "alpha": alpha,
        "model": getattr(model, "somp_ref_model_id", settings.model),
        "settings": asdict(settings),
        "data": {
            "n_train": len(task.train),
            "n_target": len(task.target),
            "n_other": len(task.other),
            "notes": task.notes,
            "concept_tokens": concept.report(),
        },
        "rankings": {
            name: {
                "top": [list(h) for h in top_heads(scores, max(settings.heads))],
                "layer_counts": _layer_counts(top_heads(scores, max(settings.heads))),
            }
            for name, scores in rankings.items()
        },
        "baseline": evaluator.baseline,
        "conditions": conditions,
        "summary": summarize(
            evaluator.baseline["metrics"],
            conditions,
            task.kind,
            methods + ["random"],
            settings.heads,
        ),
        "seconds": time.perf_counter() - started,
        "environment": {"python": sys.version.split()[0], "platform": platform.platform()},
    }
    write_text_atomically(
        folder / "results.json", json.dumps(results, indent=1, ensure_ascii=False)
    )
    return results


def _layer_counts(heads: list[tuple[int, int]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for layer, _ in heads:
        counts[str(layer)] = counts.get(str(layer), 0) + 1
    return counts


def run_experiments(
    names: list[str], settings: Settings, out: Path, *, show_progress: bool = True
) -> list[dict[str, Any]]:
    """Load the model once and run each named experiment; returns their results."""
    from somp_ref.adapters.models import load_model

    out.mkdir(parents=True, exist_ok=True)  # before the model loads: a bad --out fails fast
    tasks = [
        build_task(name, n_train=settings.n_train, n_test=settings.n_test, seed=settings.data_seed)
        for name in names
    ]
    model, tokenizer = load_model(settings.model)
    return [
        run_task(model, tokenizer, task, settings, out, show_progress=show_progress)
        for task in tasks
    ]
