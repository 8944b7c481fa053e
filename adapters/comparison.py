"""Paired comparison of two runs of the same experiments.

Two runs that differ in one setting (where the heads are scaled, ``--intervene-positions``;
the train store's rows, ``--positions``; the ranking, ``--method``) measure the same test
prompts with the same unmodified model, so each prompt's figure in one run pairs with its
figure in the other. For each experiment both ran and each (k, heads) both measured, a
figure is compared as the ratio of its means over the prompts (second run / first run),
or as their difference for proportions that may be 0 in the first run
(:data:`COMPARED_BY`), with a 95 % bootstrap interval that resamples the prompts jointly.
The random control is paired set by set (the same draw in both runs) and reported as the
median [IQR] of the per-set figure. A figure one run's results file does not hold (written
before the figure was reported: ``results_files.ADDED_MEASURES``) is not compared. The
tables are :func:`somp_ref.adapters.report.format_comparison`'s.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from somp_ref.adapters.results_files import FIGURES, by_method, checked_result
from somp_ref.selection import jaccard
from somp_ref.statistics import median_iqr, paired_ci, point

#: Measures compared by their difference (second - first) rather than the ratio of their
#: means: proportions of answers, often 0 in both runs.
COMPARED_BY = {"degenerate": "difference"}

#: Two runs measured the same test prompts when their baselines (the unmodified model's
#: figures, prompt by prompt) agree to this relative tolerance: the same prompts agree to
#: float32 rounding whatever the batch size or the machine's BLAS (bit for bit on one
#: machine), other prompts differ at the first digit.
BASELINE_RTOL = 1e-3
#: ... plus this absolute one, for figures that are 0 on a prompt (no concept word).
BASELINE_ATOL = 1e-6

#: Settings worth naming when two runs differ in them (the others are the data's or the
#: machine's and must not differ).
_COMPARED_SETTINGS = (
    "positions",
    "intervene_positions",
    "method",
    "alpha",
    "atoms",
    "n_null",
    "exclude_layers",
    "ks",
    "n_random",
)


def compare_runs(
    first: list[dict[str, Any]], second: list[dict[str, Any]], *, seed: int = 0
) -> list[dict[str, Any]]:
    """The paired comparison of every experiment both runs hold (see the module's notes).

    Parameters
    ----------
    first, second : list of dict
        The experiments of two runs
        (:func:`somp_ref.adapters.results_files.load_results`, or results as
        :func:`somp_ref.adapters.experiment.run_task` returns them).
    seed : int, default=0
        Of the bootstrap.

    Returns
    -------
    list of dict
        Per experiment: ``experiment``, ``differs`` (setting -> [first, second]),
        ``n_prompts`` and ``rows``, one per (k, heads): ``k``, ``method``, ``heads_jaccard``
        (of the two runs' head sets; random: the median over sets) and, per figure, an
        Estimate dict (selections) or a median/IQR dict (random), None where no prompt or
        set is left.

    Raises
    ------
    ValueError
        When the runs share no experiment, or no (k, heads) within one, or measured other
        prompts or another model, or a result is malformed.
    """
    first = [checked_result(r, f"first run: experiments[{i}]") for i, r in enumerate(first)]
    second = [checked_result(r, f"second run: experiments[{i}]") for i, r in enumerate(second)]
    second_by_name = {result["experiment"]: result for result in second}
    pairs = [
        (a, second_by_name[a["experiment"]]) for a in first if a["experiment"] in second_by_name
    ]
    if not pairs:
        names = sorted({r["experiment"] for r in first}), sorted(second_by_name)
        raise ValueError(f"the runs share no experiment (first: {names[0]}, second: {names[1]})")
    return [_compare_experiment(a, b, seed) for a, b in pairs]


def _compare_experiment(first: dict, second: dict, seed: int) -> dict[str, Any]:
    name = first["experiment"]
    _check_same_prompts(first, second)
    figures = FIGURES[first["kind"]]
    plan = []  # (k, method, [(condition in first, condition in second), ...])
    for k in [k for k in first["settings"]["ks"] if k in second["settings"]["ks"]]:
        groups_a = by_method(first["conditions"], k)
        groups_b = by_method(second["conditions"], k)
        for method in [m for m in groups_a if m in groups_b]:
            if method.startswith("random"):
                matched = _paired_sets(groups_a[method], groups_b[method])
            else:
                matched = [(groups_a[method][0], groups_b[method][0])]
            if matched:
                plan.append((k, method, matched))
    if not plan:
        raise ValueError(f"{name}: the runs share no k and heads to compare")
    compared = [c for _, _, matched in plan for pair in matched for c in pair]
    baselines = [first["baseline"], second["baseline"]]
    # A measure an older results file lacks (results_files.ADDED_MEASURES) keeps no prompt.
    keep = {
        measure: np.logical_and.reduce(
            [np.isfinite(c["values"][measure]) for c in baselines + compared]
        )
        if all(measure in c["values"] for c in baselines)
        else np.zeros(0, dtype=bool)
        for _, measure, _ in figures
    }
    rows = []
    for k, method, matched in plan:
        row: dict[str, Any] = {"k": k, "method": method}
        if method.startswith("random"):
            row["sets"] = len(matched)
            row["heads_jaccard"] = float(
                np.median([jaccard(a["heads"], b["heads"]) for a, b in matched])
            )
        else:
            ((a, b),) = matched
            row["heads_jaccard"] = jaccard(a["heads"], b["heads"])
        for title, measure, _ in figures:
            how = COMPARED_BY.get(measure, "ratio")
            if not keep[measure].any():
                row[title] = None
            elif method.startswith("random"):
                per_set = [point(*_values(b, a, measure, keep[measure]), how) for a, b in matched]
                finite = [v for v in per_set if np.isfinite(v)]
                row[title] = median_iqr(finite).as_dict() if finite else None
            else:
                pair = _values(b, a, measure, keep[measure])
                row[title] = paired_ci(*pair, how, seed=seed).as_dict()
        rows.append(row)
    differs = {
        key: [first["settings"].get(key), second["settings"].get(key)]
        for key in _COMPARED_SETTINGS
        if first["settings"].get(key) != second["settings"].get(key)
    }
    if first.get("alpha") != second.get("alpha"):
        differs["alpha"] = [first.get("alpha"), second.get("alpha")]
    return {
        "experiment": name,
        "kind": first["kind"],
        "differs": differs,
        "n_prompts": {m: int(keep[m].sum()) for _, m, _ in figures},
        "rows": rows,
    }


def _check_same_prompts(first: dict, second: dict) -> None:
    """A ValueError unless both runs measured the same prompts with the same model."""
    name = first["experiment"]
    fingerprints = first.get("model_fingerprint"), second.get("model_fingerprint")
    if None not in fingerprints and fingerprints[0] != fingerprints[1]:
        raise ValueError(
            f"{name}: the runs used different models ({fingerprints[0]} and {fingerprints[1]})"
        )
    bases = first["baseline"]["values"], second["baseline"]["values"]
    for _, measure, _ in FIGURES[first["kind"]]:
        if measure not in bases[0] or measure not in bases[1]:
            continue  # a measure an older file lacks: not compared
        a, b = bases[0][measure], bases[1][measure]
        if a.shape != b.shape or not np.allclose(
            a, b, rtol=BASELINE_RTOL, atol=BASELINE_ATOL, equal_nan=True
        ):
            raise ValueError(
                f"{name}: the runs did not measure the same test prompts (the unmodified "
                f"model's '{measure}' differs): pair runs of one experiment, seed and model"
            )
    for result in (first, second):
        for condition in result["conditions"]:
            for measure, values in condition["values"].items():
                if values.shape != result["baseline"]["values"][measure].shape:
                    raise ValueError(
                        f"{name}: {condition['method']} at k = {condition['k']} holds "
                        f"{values.size} '{measure}' values, the baseline "
                        f"{result['baseline']['values'][measure].size}"
                    )


def _paired_sets(first: list[dict], second: list[dict]) -> list[tuple[dict, dict]]:
    """Random sets paired by their draw (the seeds both runs hold, in the first run's
    order); in order when neither run records its draws."""
    if all(c["seed"] is None for c in first + second):
        return list(zip(first, second, strict=False))
    by_seed = {c["seed"]: c for c in second if c["seed"] is not None}
    return [(c, by_seed[c["seed"]]) for c in first if c["seed"] in by_seed]


def _values(second: dict, first: dict, measure: str, keep: np.ndarray) -> tuple[np.ndarray, ...]:
    return tuple(c["values"][measure][keep] for c in (second, first))
