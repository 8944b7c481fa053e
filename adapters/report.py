"""Tables, markdown and plots of experiment results (shaped like the paper's tables:
rows k, columns per head-selection method, target effect next to collateral damage)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from somp_ref.adapters.summary import head_overlap, target_metric
from somp_ref.files import write_text_atomically

_COLUMNS = {
    "generation": [
        ("target_vs_baseline", "x base", "{:.2f}"),
        ("concept_mass", "mass", "{:.3f}"),
        ("kl_neutral", "KL", "{:.2f}"),
        ("degenerate", "degen", "{:.0%}"),
    ],
    "qa": [
        ("target_acc", "tgt acc", "{:.2f}"),
        ("target_f1", "tgt F1", "{:.2f}"),
        ("other_acc", "oth acc", "{:.2f}"),
        ("kl_neutral", "KL", "{:.2f}"),
        ("degenerate", "degen", "{:.0%}"),
    ],
}
_WIDTH = 9


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None or value != value:  # None or NaN
        return "-"
    text = fmt.format(value)
    if row["runs"] > 1 and f"{key}_std" in row:
        text += "±" + fmt.format(row[f"{key}_std"]).rstrip("%")
    return text


def describe(result: dict[str, Any]) -> str:
    """One line saying what the table's numbers mean."""
    base = result["baseline"]["metrics"]
    if result["kind"] == "generation":
        mass = base["concept_mass"]
        mass = "n/a: no concept token in the answers" if mass is None else f"{mass:.3f}"
        return (
            f"target: {result['concept']} words per answer relative to the unmodified "
            f"model ({base['concept_words']:.2f} per answer); mass: probability on "
            f"{result['concept']} tokens where the baseline answer has one (baseline "
            f"{mass}); KL: next-token KL on neutral prompts (nats); "
            "degen: degenerate answers"
        )
    return (
        f"tgt/oth acc: answer contains the gold (target questions answer with a country, "
        f"others do not; baseline {base['target_acc']:.2f} / {base['other_acc']:.2f}); "
        f"tgt F1: SQuAD token F1 (baseline {base['target_f1']:.2f}); KL on the other "
        "questions (nats); degen: degenerate answers"
    )


def format_table(result: dict[str, Any]) -> str:
    """The terminal table of one experiment."""
    columns = _COLUMNS[result["kind"]]
    methods = list(dict.fromkeys(row["method"] for row in result["summary"]))
    seeds = result["settings"]["seeds"]
    titles = [m if m != "random" else f"random ({seeds} seeds)" for m in methods]
    block = len(columns) * (_WIDTH + 1) + 1
    lines = [
        f"{result['experiment']} — alpha {result['alpha']:g}, {result['model']}",
        describe(result),
        "    k |" + "|".join(f" {t:<{block - 1}}" for t in titles),
        "      |" + "|".join(" " + "".join(f"{c[1]:>{_WIDTH}} " for c in columns) for _ in methods),
    ]
    for k in result["settings"]["heads"]:
        cells = []
        for method in methods:
            row = next(
                (r for r in result["summary"] if r["k"] == k and r["method"] == method), None
            )
            cells.append(
                " "
                + "".join(
                    f"{_cell(row, key, fmt) if row else '-':>{_WIDTH}} " for key, _, fmt in columns
                )
            )
        lines.append(f"{k:>5} |" + "|".join(cells))
    return "\n".join(lines)


def format_overlap(overlap: dict[str, Any]) -> str:
    names = overlap["experiments"]
    width = max(len(n) for n in names) + 2
    lines = [f"Jaccard similarity of the top heads ({overlap['ranking']}) across experiments"]
    lines.append(" " * width + "".join(f"{n:>{width}}" for n in names))
    for name, row in zip(names, overlap["matrix"], strict=True):
        lines.append(f"{name:<{width}}" + "".join(f"{v:>{width}.2f}" for v in row))
    return "\n".join(lines)


def write_plot(result: dict[str, Any], path: Path) -> bool:
    """Target metric and KL against k, one line per method. False without matplotlib."""
    try:
        from somp_ref.plots import _pyplot, save_figure

        plt = _pyplot()
    except ImportError:
        return False
    target = target_metric(result["kind"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    methods = list(dict.fromkeys(row["method"] for row in result["summary"]))
    for method in methods:
        rows = [r for r in result["summary"] if r["method"] == method]
        ks = [r["k"] for r in rows]
        for ax, key in zip(axes, (target, "kl_neutral"), strict=True):
            ax.errorbar(
                ks,
                [r[key] for r in rows],
                yerr=[r[f"{key}_std"] for r in rows],
                marker="o",
                capsize=3,
                label=method,
            )
    axes[0].axhline(result["baseline"]["metrics"][target], color="gray", ls="--", label="baseline")
    axes[0].set_title(f"{result['experiment']}: {target} (alpha {result['alpha']:g})")
    axes[1].set_title("collateral: KL on neutral prompts")
    for ax in axes:
        ax.set_xlabel("heads scaled (k)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    return True


def write_report(results: list[dict[str, Any]], out: Path) -> str:
    """results.md, results.json (all experiments), a plot per experiment; returns the text
    printed to the terminal."""
    texts = [format_table(r) for r in results]
    ranking = results[0]["settings"]["rank"]
    overlap = head_overlap(results, ranking)
    texts.append(format_overlap(overlap))
    for result in results:
        write_plot(result, out / result["experiment"] / "plot.png")
    terminal = "\n\n".join(texts)
    md = ["# somp-ref experiment results", ""]
    for result, text in zip(results, texts, strict=False):
        md += [
            f"## {result['experiment']}",
            "",
            "```",
            text,
            "```",
            "",
            f"- data: {result['data']}",
            f"- top heads by ranking: "
            f"{ {k: v['layer_counts'] for k, v in result['rankings'].items()} } (per layer)",
            f"- time: {result['seconds']:.0f} s",
            "",
        ]
    md += ["## head overlap", "", "```", texts[-1], "```", ""]
    write_text_atomically(out / "results.md", "\n".join(md))
    combined = {"experiments": results, "overlap": overlap}
    write_text_atomically(out / "results.json", json.dumps(combined, indent=1, ensure_ascii=False))
    return terminal
