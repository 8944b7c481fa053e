"""Summaries, tables, markdown and plots of experiment results.

Every figure of a selected head set comes with its 95 % bootstrap interval over the
prompts; the random control is the median [interquartile range] of the figure over its
head sets. A star marks a figure whose interval excludes the random median (the selection
differs from random heads at the 5 % level, prompt resampling only).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from somp_ref.files import write_text_atomically
from somp_ref.selection import jaccard
from somp_ref.statistics import Estimate, bootstrap, median_iqr

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
LABELS = {"somp": "somp (paper: raw EV)", "ll": "ll (paper: Logit Lens)"}


def figure(values: list[float], baseline: list[float], how: str, seed: int = 0) -> Estimate:
    """One figure of one condition with its interval (prompts where either is NaN dropped)."""
    x, b = np.asarray(values, float), np.asarray(baseline, float)
    keep = np.isfinite(x) & np.isfinite(b)
    if not keep.any():
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    if how == "ratio":
        return bootstrap([x[keep], b[keep]], lambda v, w: v.mean() / w.mean(), seed=seed)
    return bootstrap([x[keep]], np.mean, seed=seed)


def summarize(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows (k, method) with every figure: an Estimate dict for a selection, the median
    [IQR] over sets for the random control."""
    base = result["baseline"]["values"]
    rows = []
    for k in result["settings"]["ks"]:
        by_method: dict[str, list[dict]] = {}
        for c in result["conditions"]:
            if c["k"] == k:
                by_method.setdefault(c["method"], []).append(c)
        for method, conditions in by_method.items():
            row: dict[str, Any] = {"k": k, "method": method, "sets": len(conditions)}
            for title, measure, how in FIGURES[result["kind"]]:
                if method == "random":
                    per_set = [
                        figure(c["values"][measure], base[measure], how).value for c in conditions
                    ]
                    finite = [v for v in per_set if np.isfinite(v)]
                    row[title] = (
                        median_iqr(finite).as_dict()
                        if finite
                        else {"median": np.nan, "q1": np.nan, "q3": np.nan, "n_sets": 0}
                    )
                else:
                    row[title] = figure(conditions[0]["values"][measure], base[measure], how)
                    row[title] = row[title].as_dict()
            rows.append(row)
    return rows


def _significant(row: dict, rows: list[dict], title: str) -> bool:
    random = next((r for r in rows if r["k"] == row["k"] and r["method"] == "random"), None)
    if random is None or "value" not in row[title] or not np.isfinite(random[title]["median"]):
        return False
    estimate = row[title]
    if not (np.isfinite(estimate["low"]) and np.isfinite(estimate["high"])):
        return False  # no interval (one prompt): no claim either way
    return not estimate["low"] <= random[title]["median"] <= estimate["high"]


def format_cell(entry: dict[str, float], star: bool) -> str:
    """A figure as a table cell: "value [low,high]" (``*`` when ``star``) for an estimate,
    "median [q1-q3]" for the random control, "-" when it is not a number."""
    if "median" in entry and not np.isfinite(entry["median"]):
        return "-"
    if "median" in entry:
        return f"{entry['median']:.2f} [{entry['q1']:.2f}-{entry['q3']:.2f}]"
    if not np.isfinite(entry["value"]):
        return "-"
    return f"{entry['value']:.2f} [{entry['low']:.2f},{entry['high']:.2f}]" + ("*" if star else "")


def format_table(result: dict[str, Any]) -> str:
    """The terminal table of one experiment."""
    rows = summarize(result)
    titles = [title for title, _, _ in FIGURES[result["kind"]]]
    default = result["settings"]["method"]
    data = result["data"]
    where = result["settings"].get("intervene_positions", "all")
    lines = [
        f"{result['experiment']} — alpha {result['alpha']:g} at {where} positions, "
        f"{result['model']}",
        f"test: {data['n_test_target']} target prompts"
        + (f", {data['n_test_other']} other questions" if data["n_test_other"] else "")
        + _target_subsets(result)
        + f", {data['n_neutral']} neutral prompts; 95 % bootstrap CI over prompts, "
        f"random: median [IQR] over {result['settings']['n_random']} disjoint sets; "
        "* = CI excludes the random median",
    ]
    width = 20
    lines.append(f"{'k':>3}  {'heads':<28}" + "".join(f"{t:>{width}}" for t in titles))
    for row in rows:
        label = LABELS.get(row["method"], row["method"])
        if row["method"] == default:
            label += " (default)"
        if row["method"] == "random":
            label = f"random ({row['sets']} sets)"
        cells = [format_cell(row[t], _significant(row, rows, t)) for t in titles]
        # One space at least between columns, however wide a cell (the same text otherwise).
        line = "".join(f" {c:>{width - 1}}" for c in cells)
        lines.append(f"{row['k']:>3}  {label:<28}" + line)
    if result["sweep"]:
        lines.append("alpha sweep on the validation split (the chosen alpha is used on test):")
        for r in result["sweep"]:
            lines.append(
                f"  k={r['k']:<3} alpha={r['alpha']:<4g} mass x base {r['gain']:.2f}  "
                f"words x base {r['words_gain']:.2f}  KL {r['kl']:.2f}  "
                f"degenerate {r['degenerate']:.0%}"
            )
    for k, layers in result["shortfall"].items():
        for layer, missing in sorted(layers.items(), key=lambda item: int(item[0])):
            lines.append(
                f"k={k}: layer {layer} has {missing} free head{'s' if missing > 1 else ''} too "
                "few for a disjoint random set; each set takes them from the nearest layers"
            )
    return "\n".join(lines)


def _target_subsets(result: dict[str, Any]) -> str:
    """The target prompts answered by generation, and, where it is not all of them, those
    the teacher-forced mass is measured on (whose unmodified answer has a concept token)."""
    parts = []
    if result["data"]["n_generated"]:
        parts.append(f"{result['data']['n_generated']} generated")
    values = result["baseline"]["values"].get("mass")
    if result["kind"] == "suppress" and values is not None:
        measured = int(np.isfinite(np.asarray(values, dtype=float)).sum())
        if measured < len(values):
            parts.append(
                f"mass on the {measured} whose answer has the concept, "
                f"mass all on every answer token of all {len(values)}"
            )
    return f" ({'; '.join(parts)})" if parts else ""


def head_overlap(results: list[dict[str, Any]], ranking: str) -> dict[str, Any]:
    """Jaccard similarity of the top-k heads of one ranking across the experiments run."""
    names = [r["experiment"] for r in results]
    tops = [[tuple(h) for h in r["rankings"][ranking]["top"]] for r in results]
    return {
        "experiments": names,
        "ranking": ranking,
        "matrix": [[jaccard(a, b) for b in tops] for a in tops],
    }


def format_overlap(overlap: dict[str, Any]) -> str:
    names = overlap["experiments"]
    width = max(len(n) for n in names) + 2
    lines = [f"Jaccard similarity of the top heads ({overlap['ranking']}) across experiments"]
    lines.append(" " * width + "".join(f"{n:>{width}}" for n in names))
    for name, row in zip(names, overlap["matrix"], strict=True):
        lines.append(f"{name:<{width}}" + "".join(f"{v:>{width}.2f}" for v in row))
    return "\n".join(lines)


def write_report(results: list[dict[str, Any]], out: Path) -> str:
    """results.md and results.json (all experiments, with the summaries); returns the text
    printed to the terminal."""
    texts = [format_table(r) for r in results]
    overlap = head_overlap(results, results[0]["settings"]["method"])
    if len(results) > 1:
        texts.append(format_overlap(overlap))
    md = ["# somp-ref experiment results", ""]
    for result, text in zip(results, texts, strict=False):
        md += [f"## {result['experiment']}", "", "```", text, "```", ""]
        md += [f"- {note}" for note in result["data"]["notes"]]
        md += [f"- time: {result['seconds']:.0f} s ({_timing(result)})", ""]
    write_text_atomically(out / "results.md", "\n".join(md))
    combined = {
        "experiments": [dict(r, summary=summarize(r)) for r in results],
        "overlap": overlap,
    }
    write_text_atomically(out / "results.json", json.dumps(combined, indent=1, ensure_ascii=False))
    return "\n\n".join(texts)


def _timing(result: dict[str, Any]) -> str:
    return ", ".join(f"{name} {seconds:.0f} s" for name, seconds in result["timing"].items())
