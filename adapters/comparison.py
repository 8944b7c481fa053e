"""Paired comparison of two runs of the same experiments.

Two runs that differ in one setting (where the heads are scaled, ``--intervene-positions``;
the train store's rows, ``--positions``; the ranking, ``--method``) measure the same test
prompts with the same unmodified model, so each prompt's figure in one run pairs with its
figure in the other. For each experiment both ran and each (k, heads) both measured, a
figure is compared as the ratio of its means over the prompts (second run / first run),
or as their difference for proportions that may be 0 in the first run
(:data:`COMPARED_BY`), with a 95 % bootstrap interval that resamples the prompts jointly.
The random control is paired set by set (the same draw in both runs) and reported as the
median [IQR] of the per-set figure.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from somp_ref.adapters.report import FIGURES, LABELS, format_cell
from somp_ref.files import read_user_text
from somp_ref.selection import jaccard
from somp_ref.statistics import bootstrap, median_iqr

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

#: A result's statistic of a pair of per-prompt arrays (second, first).
_STATISTICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "ratio": lambda second, first: second.mean() / first.mean(),
    "difference": lambda second, first: second.mean() - first.mean(),
}


def load_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The experiments of one run, checked (:func:`checked_result`): its ``results.json``,
    or a directory that holds one.

    Raises
    ------
    FileNotFoundError, ValueError
        Naming the file (and the field): missing, not JSON, or not the results of
        ``somp-ref experiment``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    text = read_user_text(path, "results.json of somp-ref experiment")
    try:
        payload = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise ValueError(
            f"{path}: not valid JSON; not the results of somp-ref experiment"
        ) from None
    experiments = payload.get("experiments") if isinstance(payload, dict) else None
    if not isinstance(experiments, list) or not experiments:
        raise ValueError(f"{path}: no 'experiments' list; not the results of somp-ref experiment")
    checked = [
        checked_result(result, f"{path}: experiments[{number}]")
        for number, result in enumerate(experiments)
    ]
    names = [result["experiment"] for result in checked]
    if len(set(names)) < len(names):
        raise ValueError(f"{path}: an experiment is listed twice ({names})")
    return checked


def _is_int(value: Any) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def checked_result(result: Any, where: str) -> dict[str, Any]:
    """One experiment's results with what a comparison reads checked and converted: ``ks``
    (distinct ints), per condition ``method``, ``k``, ``seed`` (int or None), ``heads``
    ((layer, head) int pairs) and the per-prompt ``values`` of every figure as 1-D float64
    arrays (the baseline's too).

    Raises
    ------
    ValueError
        Naming ``where`` and the first field that is missing or malformed.
    """
    if not isinstance(result, dict):
        raise ValueError(f"{where} must be an object")
    for key, kind in (
        ("experiment", str),
        ("kind", str),
        ("settings", dict),
        ("baseline", dict),
        ("conditions", list),
    ):
        if not isinstance(result.get(key), kind):
            raise ValueError(f"{where}: missing or malformed '{key}'")
    if result["kind"] not in FIGURES:
        raise ValueError(f"{where}: unknown kind {result['kind']!r}")
    ks = result["settings"].get("ks")
    if (
        not isinstance(ks, list | tuple)
        or not all(_is_int(k) for k in ks)
        or len(set(ks)) < len(ks)
    ):
        raise ValueError(f"{where}: settings.ks must be a list of distinct integers")
    measures = [measure for _, measure, _ in FIGURES[result["kind"]]]
    conditions = []
    seen = set()
    for number, condition in enumerate(result["conditions"]):
        label = f"{where}: conditions[{number}]"
        if not isinstance(condition, dict):
            raise ValueError(f"{label} must be an object")
        method, k, seed = condition.get("method"), condition.get("k"), condition.get("seed")
        if not isinstance(method, str) or not _is_int(k):
            raise ValueError(f"{label}: needs a 'method' (string) and a 'k' (integer)")
        if seed is not None and not _is_int(seed):
            raise ValueError(f"{label}: 'seed' must be an integer or null")
        heads = condition.get("heads")
        if not isinstance(heads, list | tuple) or not all(
            isinstance(h, list | tuple) and len(h) == 2 and all(map(_is_int, h)) for h in heads
        ):
            raise ValueError(f"{label}: 'heads' must be a list of [layer, head] integer pairs")
        key = (method, k, seed if method.startswith("random") else None)
        if key in seen:
            raise ValueError(f"{label}: {method} at k = {k} is listed twice")
        seen.add(key)
        conditions.append(
            {
                "method": method,
                "k": int(k),
                "seed": None if seed is None else int(seed),
                "heads": [(int(layer), int(head)) for layer, head in heads],
                "values": _checked_values(condition.get("values"), measures, label),
            }
        )
    return {
        **result,
        "settings": {**result["settings"], "ks": [int(k) for k in ks]},
        "baseline": {
            "values": _checked_values(
                result["baseline"].get("values"), measures, f"{where}: baseline"
            )
        },
        "conditions": conditions,
    }


def _checked_values(values: Any, measures: list[str], where: str) -> dict[str, np.ndarray]:
    """Each measure's per-prompt values as a 1-D float64 array (NaN where not measured)."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: no per-prompt 'values'")
    arrays = {}
    for measure in measures:
        raw = values.get(measure)
        try:
            if not isinstance(raw, list | tuple | np.ndarray):
                raise TypeError
            array = np.array(raw, dtype=np.float64)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{where}: values.{measure} must be a list of numbers") from None
        if array.ndim != 1:
            raise ValueError(f"{where}: values.{measure} must be a flat list of numbers")
        arrays[measure] = array
    return arrays


def compare_runs(
    first: list[dict[str, Any]], second: list[dict[str, Any]], *, seed: int = 0
) -> list[dict[str, Any]]:
    """The paired comparison of every experiment both runs hold (see the module's notes).

    Parameters
    ----------
    first, second : list of dict
        The experiments of two runs (:func:`load_results`, or results as
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
        groups_a, groups_b = _by_method(first, k), _by_method(second, k)
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
    keep = {
        measure: np.logical_and.reduce(
            [np.isfinite(c["values"][measure]) for c in baselines + compared]
        )
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
            for title, measure, _ in figures:
                how = COMPARED_BY.get(measure, "ratio")
                with np.errstate(divide="ignore", invalid="ignore"):  # 0/0: NaN, left out
                    per_set = [
                        _STATISTICS[how](*_values(b, a, measure, keep[measure])) for a, b in matched
                    ]
                finite = [v for v in per_set if np.isfinite(v)]
                row[title] = median_iqr(finite).as_dict() if finite else None
        else:
            ((a, b),) = matched
            row["heads_jaccard"] = jaccard(a["heads"], b["heads"])
            for title, measure, _ in figures:
                how = COMPARED_BY.get(measure, "ratio")
                row[title] = _paired(b, a, measure, keep[measure], how, seed)
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
    for _, measure, _ in FIGURES[first["kind"]]:
        a, b = first["baseline"]["values"][measure], second["baseline"]["values"][measure]
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


def _by_method(result: dict, k: int) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for condition in result["conditions"]:
        if condition["k"] == k:
            groups.setdefault(condition["method"], []).append(condition)
    return groups


def _paired_sets(first: list[dict], second: list[dict]) -> list[tuple[dict, dict]]:
    """Random sets paired by their draw (the seeds both runs hold, in the first run's
    order); in order when neither run records its draws."""
    if all(c["seed"] is None for c in first + second):
        return list(zip(first, second, strict=False))
    by_seed = {c["seed"]: c for c in second if c["seed"] is not None}
    return [(c, by_seed[c["seed"]]) for c in first if c["seed"] in by_seed]


def _values(second: dict, first: dict, measure: str, keep: np.ndarray) -> tuple[np.ndarray, ...]:
    return tuple(c["values"][measure][keep] for c in (second, first))


def _paired(second: dict, first: dict, measure: str, keep: np.ndarray, how: str, seed: int):
    """The paired statistic with its interval, or None when no prompt is left."""
    if not keep.any():
        return None
    pair = list(_values(second, first, measure, keep))
    return bootstrap(pair, _STATISTICS[how], seed=seed).as_dict()


def finite_or_null(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (standard JSON)."""
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_null(item) for item in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _cell(entry: dict | None, how: str) -> str:
    """``format_cell``, starred when the interval (if there is one) excludes no change."""
    if entry is None:
        return "-"
    star = False
    if "value" in entry and np.isfinite(entry["low"]) and np.isfinite(entry["high"]):
        null = 1.0 if how == "ratio" else 0.0
        star = not entry["low"] <= null <= entry["high"]
    return format_cell(entry, star)


def format_comparison(comparison: list[dict[str, Any]], first: str, second: str) -> str:
    """The terminal tables of :func:`compare_runs` (``first``/``second``: the runs' names)."""
    blocks = []
    for result in comparison:
        figures = FIGURES[result["kind"]]
        titles = []
        for title, measure, _ in figures:
            base = title.removesuffix(" x base")
            how = COMPARED_BY.get(measure, "ratio")
            titles.append((title, how, f"{base} B/A" if how == "ratio" else f"{base} B-A"))
        differs = ", ".join(f"{key} {a} -> {b}" for key, (a, b) in result["differs"].items())
        counts = ", ".join(
            f"{title.removesuffix(' x base')} {result['n_prompts'][measure]}"
            for title, measure, _ in figures
        )
        lines = [
            f"{result['experiment']}: B = {second} against A = {first}"
            + (f" ({differs})" if differs else " (no setting differs)"),
            f"paired over the same prompts ({counts}); B/A: ratio of the means, B-A: "
            "difference; 95 % bootstrap CI, * = excludes no change; random: median [IQR] over "
            "sets paired by draw; same heads: Jaccard",
        ]
        width = 22  # a column is at least one space from the next, however wide
        lines.append(
            f"{'k':>3}  {'heads':<16}{'same heads':>11}"
            + "".join(f" {t:>{width}}" for *_, t in titles)
        )
        for row in result["rows"]:
            label = LABELS.get(row["method"], row["method"]).split(" (")[0]
            if row["method"].startswith("random"):
                label = f"{row['method']} ({row['sets']})"
            cells = [_cell(row[title], how) for title, how, _ in titles]
            lines.append(
                f"{row['k']:>3}  {label:<16}{row['heads_jaccard']:>11.2f}"
                + "".join(f" {c:>{width}}" for c in cells)
            )
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
