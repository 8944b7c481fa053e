"""Summaries, tables and markdown of what the experiments return: the experiments' tables,
the selection study's, and ``somp-ref compare``'s.

Every figure of a selected head set comes with its 95 % bootstrap interval over the
prompts; the random control is the median [interquartile range] of the figure over its
head sets. A star marks a figure whose interval excludes the random median (the selection
differs from random heads at the 5 % level, prompt resampling only). The figures are
computed by :mod:`somp_ref.statistics`; this module arranges and prints them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from somp_ref.adapters.comparison import COMPARED_BY
from somp_ref.adapters.results_files import FIGURES, by_method
from somp_ref.files import write_text_atomically
from somp_ref.selection import jaccard
from somp_ref.statistics import Estimate, estimate, median_iqr, nan_mean, point

LABELS = {"somp": "somp (paper: raw EV)", "ll": "ll (paper: Logit Lens)"}


#: How a run chose its primary ranking (``Settings.method_chosen_by``), in words.
CHOSEN_BY = {
    "flag": "given by --method",
    "study": "the selection study's choice, --method not given",
    "default": "the default ranking, --method not given",
}


def summarize(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows (k, method) with every figure: an Estimate dict for a selection, the median
    [IQR] over sets for the random control."""
    base = result["baseline"]["values"]
    rows = []
    for k in result["settings"]["ks"]:
        for method, conditions in by_method(result["conditions"], k).items():
            row: dict[str, Any] = {"k": k, "method": method, "sets": len(conditions)}
            for title, measure, how in FIGURES[result["kind"]]:
                if method == "random":
                    per_set = [point(c["values"][measure], base[measure], how) for c in conditions]
                    finite = [v for v in per_set if np.isfinite(v)]
                    row[title] = (
                        median_iqr(finite).as_dict()
                        if finite
                        else {"median": np.nan, "q1": np.nan, "q3": np.nan, "n_sets": 0}
                    )
                else:
                    values = conditions[0]["values"][measure]
                    row[title] = estimate(values, base[measure], how).as_dict()
            rows.append(row)
    return rows


def _significant(row: dict, rows: list[dict], title: str) -> bool:
    """Whether a selection's interval excludes the random control's median at its k."""
    random = next((r for r in rows if r["k"] == row["k"] and r["method"] == "random"), None)
    if random is None or "value" not in row[title]:
        return False
    return Estimate.from_dict(row[title]).excludes(random[title]["median"])


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
        f"{result['experiment']} — {alpha_text(result['alpha'])} at {where} positions, "
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
        lines.append(
            "alpha sweep on the validation split (the alpha chosen for each k is used on test):"
        )
        for r in result["sweep"]:
            gain = _with_interval(r["gain"], r.get("gain_ci"), 2)
            words = _with_interval(r["words_gain"], r.get("words_gain_ci"), 2)
            kl = _with_interval(r["kl"], r.get("kl_ci"), 2)
            lines.append(
                f"  k={r['k']:<3} alpha={r['alpha']:<4g} mass x base {gain}  "
                f"words x base {words}  KL {kl}  degenerate {r['degenerate']:.0%}"
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
        if result["settings"].get("method_chosen_by"):
            md += [f"- {ranking_line(result['settings'])}"]
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


def ranking_line(settings: dict[str, Any]) -> str:
    """The run's primary ranking and how it was chosen, in words (``settings`` as recorded
    in results.json)."""
    how = CHOSEN_BY.get(settings.get("method_chosen_by"), "set by the caller")
    return f"primary ranking: {settings['method']} ({how})"


# ------------------------------------------------------------------ somp-ref compare


def finite_or_null(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None (standard JSON)."""
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_null(item) for item in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def comparison_cell(entry: dict | None, how: str) -> str:
    """``format_cell`` of a compared figure, starred when its interval (if it has one)
    excludes no change (a ratio of 1, a difference of 0)."""
    if entry is None:
        return "-"
    star = "value" in entry and Estimate.from_dict(entry).excludes(1.0 if how == "ratio" else 0.0)
    return format_cell(entry, star)


def format_comparison(comparison: list[dict[str, Any]], first: str, second: str) -> str:
    """The terminal tables of :func:`somp_ref.adapters.comparison.compare_runs`
    (``first``/``second``: the runs' names)."""
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
            cells = [comparison_cell(row[title], how) for title, how, _ in titles]
            lines.append(
                f"{row['k']:>3}  {label:<16}{row['heads_jaccard']:>11.2f}"
                + "".join(f" {c:>{width}}" for c in cells)
            )
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


# ------------------------------------------------------------------ the selection study


def format_study(studies: list[dict[str, Any]], verdict: dict[str, Any]) -> str:
    """The selection study as tables, and its verdict.

    Parameters
    ----------
    studies : list of dict
        As :func:`somp_ref.adapters.selection_study.run_study` returns them.
    verdict : dict
        As :func:`somp_ref.adapters.selection_study.study_verdict` returns it.
    """
    rule = verdict["rule"]
    lines = [
        "Selection study on the validation splits (alpha -1; each candidate next to its own "
        f"random control: median of {_control_sets(studies)} disjoint sets with its per-layer "
        "counts)"
    ]
    for study, judged in zip(studies, verdict["judged"], strict=True):
        lines.append(
            f"{study['task']} (k={study['k']}, target = {study['target']}; baseline "
            f"{nan_mean(study['baseline']['values'][study['target']]):.3f})"
        )
        lines.append(
            f"  {'ranking':<12} {'layers':<28} {'target [95% CI]':>21} {'random':>7} "
            f"{'effect [95% CI]':>19} {'KL [95% CI]':>18} {'random':>7} {'KL x':>6} "
            f"{'degen':>6}"
        )
        for method, r in judged.items():
            layers = ",".join(map(str, study["layers"][method]))
            target = _with_interval(r["target"], r.get("target_ci"), 3)
            effect = _with_interval(r["effect"], r.get("effect_ci"), 2)
            kl = _with_interval(r["kl"], r.get("kl_ci"), 2)
            lines.append(
                f"  {method:<12} {layers:<28} {target:>21} {r['random_target']:>7.3f} "
                f"{effect:>19} {kl:>18} {r['random_kl']:>7.2f} "
                f"{r['collateral']:>6.2f} {r['degenerate']:>6.0%}"
            )
    lines.append(
        "verdict (qualifies: KL <= "
        f"{rule['max_collateral']:g}x its control and <= {rule['max_degenerate']:.0%} "
        "degenerate in every task; default = the largest mean effect among those, effects "
        f"within {rule['effect_tie']:g} tied and the least mean collateral winning a tie): "
        + ", ".join(
            f"{m} {'ok' if v['qualifies'] else 'out'} (effect {v['mean_effect']:.2f}, "
            f"KL x {v['mean_collateral']:.2f})"
            for m, v in verdict["candidates"].items()
        )
        + f" -> {verdict['best']}"
    )
    return "\n".join(lines)


def alpha_text(alpha: float | dict[str, float]) -> str:
    """ "alpha -1", or "alpha 5 (k=3), 3 (k=8)" where the validation sweep chose one per k."""
    if isinstance(alpha, dict):
        return "alpha " + ", ".join(f"{a:g} (k={k})" for k, a in alpha.items())
    return f"alpha {alpha:g}"


def _with_interval(value: float, interval: list[float] | None, digits: int) -> str:
    """``value [low,high]``; the value alone for a record without an interval."""
    if interval is None:
        return f"{value:.{digits}f}"
    low, high = interval
    return f"{value:.{digits}f} [{low:.{digits}f},{high:.{digits}f}]"


def _control_sets(studies: list[dict[str, Any]]) -> str:
    """How many random sets each candidate's control has ("8-10" where they differ)."""
    counts = [
        sum(c["method"] == f"random:{method}" for c in study["conditions"])
        for study in studies
        for method in study["layers"]
    ]
    low, high = min(counts), max(counts)
    return str(low) if low == high else f"{low}-{high}"


def write_study(studies: list[dict[str, Any]], verdict: dict[str, Any], out: Path) -> str:
    """study.json (every candidate's and control's per-prompt values) and study.md (the
    tables) in ``out``; returns the tables."""
    text = format_study(studies, verdict)
    write_text_atomically(out / "study.json", json.dumps(studies, indent=1))
    write_text_atomically(out / "study.md", f"```\n{text}\n```\n")
    return text
