"""What an experiment's results hold, and reading them back from ``results.json``.

:data:`FIGURES` names the figures each kind of experiment reports; :func:`load_results`
reads the results of ``somp-ref experiment`` and checks, field by field, what the report
and ``somp-ref compare`` read, so that a malformed file is one line naming the file and
the field, never a traceback deep in a comparison.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from somp_ref.user_files import read_user_text

#: (column title, measure, "ratio" to the unmodified model or "mean") per task kind.
FIGURES = {
    "suppress": [
        ("words x base", "concept_words", "ratio"),
        ("mass", "mass", "mean"),
        ("mass all", "mass_all", "mean"),
        ("KL", "kl", "mean"),
        ("KL first", "kl_first", "mean"),
        ("degenerate", "degenerate", "mean"),
    ],
    "amplify": [
        ("mass x base", "mass_all", "ratio"),
        ("words x base", "concept_words", "ratio"),
        ("KL", "kl", "mean"),
        ("KL first", "kl_first", "mean"),
        ("degenerate", "degenerate", "mean"),
    ],
    "qa": [
        ("tgt acc x base", "target_acc", "ratio"),
        ("tgt F1 x base", "target_f1", "ratio"),
        ("oth acc x base", "other_acc", "ratio"),
        ("oth F1 x base", "other_f1", "ratio"),
        ("KL", "kl", "mean"),
        ("KL first", "kl_first", "mean"),
    ],
}
#: Measures a kind reported only from some version on (suppression's "mass_all"): a results
#: file whose baseline lacks one still loads, without it (its figure is not compared).
ADDED_MEASURES = frozenset({"mass_all"})


def by_method(conditions: list[dict[str, Any]], k: int) -> dict[str, list[dict[str, Any]]]:
    """The conditions measured at ``k``, grouped by ``method`` in the order they come (a
    selection's one condition; the random control's sets)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for condition in conditions:
        if condition["k"] == k:
            groups.setdefault(condition["method"], []).append(condition)
    return groups


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
    arrays (the baseline's too; a measure of :data:`ADDED_MEASURES` the baseline lacks is
    left out everywhere).

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
    base_values = result["baseline"].get("values")
    held = base_values if isinstance(base_values, dict) else {}
    measures = [
        measure
        for _, measure, _ in FIGURES[result["kind"]]
        if measure not in ADDED_MEASURES or measure in held
    ]
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
        "baseline": {"values": _checked_values(base_values, measures, f"{where}: baseline")},
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
