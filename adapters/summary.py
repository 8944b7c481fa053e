"""Summaries of experiment results: pure functions of the results, shared by the experiment
(which records them) and the report (which prints them)."""

from __future__ import annotations

from typing import Any

import numpy as np

from somp_ref.heads import jaccard


def target_metric(kind: str) -> str:
    """The headline target measure of a task kind."""
    return "concept_words" if kind == "generation" else "target_acc"


def summarize(
    baseline: dict[str, float],
    conditions: list[dict[str, Any]],
    kind: str,
    methods: list[str],
    ks: tuple[int, ...],
) -> list[dict[str, Any]]:
    """Rows k x method: mean (and std over seeds) of every metric, target relative to the
    baseline as well."""
    rows = []
    key = target_metric(kind)
    for k in ks:
        for method in methods:
            runs = [c["metrics"] for c in conditions if c["k"] == k and c["method"] == method]
            if not runs:
                continue
            row: dict[str, Any] = {"k": k, "method": method, "runs": len(runs)}
            for name in runs[0]:
                values = np.array([np.nan if r[name] is None else r[name] for r in runs])
                row[name] = float(np.mean(values))
                row[f"{name}_std"] = float(np.std(values, ddof=1)) if len(runs) > 1 else 0.0
            base = baseline[key]
            row["target_vs_baseline"] = row[key] / base if base else float("nan")
            row["target_vs_baseline_std"] = row[f"{key}_std"] / base if base else float("nan")
            rows.append(row)
    return rows


def head_overlap(results: list[dict[str, Any]], ranking: str) -> dict[str, Any]:
    """Jaccard similarity of the top-k heads of one ranking across the experiments run."""
    names = [r["experiment"] for r in results]
    tops = [[tuple(h) for h in r["rankings"][ranking]["top"]] for r in results]
    matrix = [[jaccard(a, b) for b in tops] for a in tops]
    return {"experiments": names, "ranking": ranking, "matrix": matrix}
