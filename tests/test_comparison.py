"""``somp-ref compare``: two runs of an experiment paired prompt by prompt."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from somp_ref.adapters.comparison import compare_runs
from somp_ref.adapters.report import comparison_cell, format_comparison
from somp_ref.adapters.results_files import FIGURES, load_results
from somp_ref.cli import main

MEASURES = [measure for _, measure, _ in FIGURES["suppress"]]


def run(values: dict[str, dict[str, np.ndarray]], *, seeds=(0, 1, 2), **settings) -> dict:
    """One colors-like result: ``values[method][measure]`` per prompt; "baseline" and
    "random" (one array per seed, stacked) among the methods."""
    conditions = []
    for method, measures in values.items():
        if method == "baseline":
            continue
        if method == "random":
            for number, seed in enumerate(seeds):
                conditions.append(
                    {
                        "method": "random",
                        "k": 8,
                        "seed": seed,
                        "heads": [[1, seed], [2, seed]],
                        "values": {m: v[number].tolist() for m, v in measures.items()},
                    }
                )
        else:
            conditions.append(
                {
                    "method": method,
                    "k": 8,
                    "seed": None,
                    "heads": [[5, 1], [6, 2]],
                    "values": {m: v.tolist() for m, v in measures.items()},
                }
            )
    return {
        "experiment": "colors",
        "kind": "suppress",
        "alpha": -1.0,
        "model_fingerprint": "sha256:abc",
        "settings": {"ks": [8], "intervene_positions": "all", **settings},
        "baseline": {"values": {m: v.tolist() for m, v in values["baseline"].items()}},
        "conditions": conditions,
    }


def measures(rng: np.random.Generator, n: int, sets: int | None = None) -> dict[str, np.ndarray]:
    shape = (n,) if sets is None else (sets, n)
    return {
        "concept_words": rng.integers(0, 3, shape).astype(float),
        "mass": rng.uniform(0.1, 0.9, shape),
        "mass_all": rng.uniform(0.1, 0.9, shape),
        "kl": rng.uniform(0.01, 2.0, shape),
        "kl_first": rng.uniform(0.01, 2.0, shape),
        "degenerate": rng.integers(0, 2, shape).astype(float),
    }


def pair(n: int = 24, seed: int = 0):
    rng = np.random.default_rng(seed)
    first = {
        "baseline": measures(rng, n),
        "specificity": measures(rng, n),
        "random": measures(rng, n, sets=3),
    }
    return first, rng


def test_a_run_against_itself_changes_nothing():
    values, _ = pair()
    (result,) = compare_runs([run(values)], [run(values)])
    assert result["differs"] == {}
    for row in result["rows"]:
        assert row["heads_jaccard"] == 1.0
        for title, measure, _ in FIGURES["suppress"]:
            entry = row[title]
            expected = 0.0 if measure == "degenerate" else 1.0
            if "median" in entry:
                assert entry["median"] == entry["q1"] == entry["q3"] == expected
            else:  # every resample pairs a prompt with itself
                assert entry["value"] == entry["low"] == entry["high"] == expected


@settings(max_examples=25, deadline=None)
@given(st.floats(0.05, 20.0), st.floats(-0.5, 0.5), st.integers(0, 2**31))
def test_a_uniform_change_is_measured_exactly(factor, shift, seed):
    """KL scaled by ``factor`` on every prompt: B/A is the factor in every resample;
    degenerate shifted by ``shift`` everywhere: B-A is the shift (to rounding)."""
    first, _ = pair(seed=seed % 1000)
    second = {
        method: {
            m: v * factor if m == "kl" else v + shift if m == "degenerate" else v
            for m, v in by_measure.items()
        }
        for method, by_measure in first.items()
        if method != "baseline"
    } | {"baseline": first["baseline"]}
    (result,) = compare_runs([run(first)], [run(second)], seed=seed)
    chosen = next(r for r in result["rows"] if r["method"] == "specificity")
    random = next(r for r in result["rows"] if r["method"] == "random")
    # Rounding: a mean of 24 values scaled, and a quotient: a few ulps, 1e-12 relative.
    for key in ("value", "low", "high"):
        assert chosen["KL"][key] == pytest.approx(factor, rel=1e-12)
        assert chosen["degenerate"][key] == pytest.approx(shift, abs=1e-12)
        assert chosen["mass"][key] == pytest.approx(1.0, rel=1e-12)
    assert random["KL"]["median"] == pytest.approx(factor, rel=1e-12)
    assert random["sets"] == 3


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 40), st.integers(0, 2**31))
def test_the_ratio_is_of_paired_means_and_its_interval_holds_it(n, seed):
    first, rng = pair(n=n, seed=seed % 1000)
    second = {"baseline": first["baseline"], **{m: measures(rng, n) for m in ["specificity"]}}
    second["random"] = measures(rng, n, sets=3)
    (result,) = compare_runs([run(first)], [run(second)], seed=seed)
    chosen = next(r for r in result["rows"] if r["method"] == "specificity")
    kl_a, kl_b = first["specificity"]["kl"], second["specificity"]["kl"]
    entry = chosen["KL"]
    assert entry["value"] == pytest.approx(kl_b.mean() / kl_a.mean(), rel=1e-12)
    # The percentile interval of resampled ratios holds the full-sample ratio unless the
    # resamples all fall to one side, which 2000 resamples of >= 2 prompts make remote.
    assert entry["low"] <= entry["value"] * (1 + 1e-12) and entry["value"] <= entry["high"] * (
        1 + 1e-12
    )


def test_random_sets_pair_by_draw_not_by_order():
    first, _ = pair()
    values = run(first)
    shuffled = run(first)
    shuffled["conditions"] = shuffled["conditions"][:1] + shuffled["conditions"][1:][::-1]
    (result,) = compare_runs([values], [shuffled])
    random = next(r for r in result["rows"] if r["method"] == "random")
    assert random["KL"]["median"] == random["KL"]["q1"] == random["KL"]["q3"] == 1.0


def test_a_prompt_missing_anywhere_leaves_every_figure_of_its_measure():
    first, _ = pair()
    second = {m: {k: v.copy() for k, v in d.items()} for m, d in first.items()}
    second["specificity"]["kl"][3] = np.nan
    (result,) = compare_runs([run(first)], [run(second)])
    assert result["n_prompts"]["kl"] == 23 and result["n_prompts"]["mass"] == 24
    random = next(r for r in result["rows"] if r["method"] == "random")
    assert random["KL"]["median"] == 1.0  # the same 23 prompts on both sides
    chosen = next(r for r in result["rows"] if r["method"] == "specificity")
    assert chosen["KL"]["value"] == 1.0


def test_settings_that_differ_are_named():
    values, _ = pair()
    (result,) = compare_runs(
        [run(values, positions="prompt-mean")],
        [run(values, positions="mean") | {"alpha": 3.0}],
    )
    assert result["differs"] == {"positions": ["prompt-mean", "mean"], "alpha": [-1.0, 3.0]}
    text = format_comparison([result], "runs/a", "runs/b")
    assert "positions prompt-mean -> mean" in text.splitlines()[0]


def test_runs_of_other_prompts_or_models_are_refused():
    values, rng = pair()
    other = dict(values, baseline=measures(rng, 24))
    with pytest.raises(ValueError, match="did not measure the same test prompts"):
        compare_runs([run(values)], [run(other)])
    shorter = {m: {k: v[..., :20] for k, v in d.items()} for m, d in values.items()}
    with pytest.raises(ValueError, match="did not measure the same test prompts"):
        compare_runs([run(values)], [run(shorter)])
    foreign = run(values) | {"model_fingerprint": "sha256:def"}
    with pytest.raises(ValueError, match="different models"):
        compare_runs([run(values)], [foreign])
    with pytest.raises(ValueError, match="share no experiment"):
        compare_runs([run(values)], [run(values) | {"experiment": "countries"}])


def test_the_command_prints_and_writes_json(tmp_path, capsys):
    first, _ = pair()
    second = {m: {k: v * 0.5 if k == "kl" else v for k, v in d.items()} for m, d in first.items()}
    second["baseline"] = first["baseline"]
    for name, values in (("a", first), ("b", second)):
        (tmp_path / name).mkdir()
        payload = {"experiments": [run(values)]}
        (tmp_path / name / "results.json").write_text(json.dumps(payload))
    args = ["compare", str(tmp_path / "a"), str(tmp_path / "b" / "results.json")]
    assert main(args) == 0
    text = capsys.readouterr().out
    row = next(line for line in text.splitlines() if "specificity" in line)
    assert "0.50 [0.50,0.50]*" in row  # KL halved on every prompt
    assert main([*args, "--json"]) == 0
    saved = json.loads(capsys.readouterr().out)
    assert saved["experiments"][0]["rows"][0]["KL"]["value"] == 0.5


@pytest.mark.parametrize(
    "payload, message",
    [
        ("[1, 2]", "no 'experiments' list"),
        ('{"experiments": [{"experiment": "colors"}]}', "missing or malformed 'kind'"),
        ('{"experiments": [', "not valid JSON"),
    ],
)
def test_other_files_are_refused_by_name(tmp_path, payload, message):
    path = tmp_path / "results.json"
    path.write_text(payload)
    with pytest.raises(ValueError, match=message):
        load_results(tmp_path)


def mutated(change) -> dict:
    values, _ = pair()
    result = run(values)
    change(result)
    return result


def _set(path, value):
    def change(result):
        *parents, last = path
        target = result
        for key in parents:
            target = target[key]
        target[last] = value

    return change


@pytest.mark.parametrize(
    "change, message",
    [
        (_set(["settings", "ks"], 8), "settings.ks must be a list of distinct integers"),
        (_set(["settings", "ks"], None), "settings.ks must be a list of distinct integers"),
        (_set(["settings", "ks"], [8, 8]), "settings.ks must be a list of distinct integers"),
        (_set(["conditions", 0, "values", "kl"], [{}] * 24), "values.kl must be a list of num"),
        (_set(["conditions", 0, "values", "kl"], [10**400] * 24), "values.kl must be a list"),
        (_set(["conditions", 0, "values", "kl"], "x"), "values.kl must be a list of numbers"),
        (_set(["conditions", 0, "values", "kl"], [[1.0]] * 24), "must be a flat list"),
        (_set(["conditions", 0, "heads"], 3), "'heads' must be a list of [layer, head]"),
        (_set(["conditions", 0, "heads"], [[[1], 2]]), "'heads' must be a list of [layer, h"),
        (_set(["conditions", 0, "k"], "8"), "needs a 'method' (string) and a 'k' (integer)"),
        (_set(["conditions", 1, "seed"], [1]), "'seed' must be an integer or null"),
        (_set(["baseline", "values"], None), "baseline: no per-prompt 'values'"),
        (lambda r: r["conditions"].insert(0, r["conditions"][0]), "specificity at k = 8 is lis"),
        (lambda r: r["conditions"][0].pop("heads"), "'heads' must be a list of [layer, head]"),
    ],
)
def test_malformed_results_are_refused_by_file_and_field(tmp_path, capsys, change, message):
    values, _ = pair()
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text(json.dumps({"experiments": [run(values)]}))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"experiments": [mutated(change)]}))
    assert main(["compare", str(tmp_path / "a"), str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad}: experiments[0]" in err and message in err, err


def test_runs_without_a_common_condition_compare_nothing_and_say_so():
    values, _ = pair()
    other = run(values)
    other["settings"]["ks"] = [16]
    for condition in other["conditions"]:
        condition["k"] = 16
    with pytest.raises(ValueError, match="share no k and heads"):
        compare_runs([run(values)], [other])


def test_random_sets_pair_on_the_draws_both_runs_hold():
    values, _ = pair()
    second = run(values)
    # The second run holds draws 2 and 1 only, in that order: pairing by position would
    # compare draw 0 with 2 and 1 with 1.
    second["conditions"] = [
        second["conditions"][0],
        second["conditions"][3],
        second["conditions"][2],
    ]
    (result,) = compare_runs([run(values)], [second])
    random = next(r for r in result["rows"] if r["method"] == "random")
    assert random["sets"] == 2 and random["heads_jaccard"] == 1.0
    assert random["KL"]["median"] == random["KL"]["q1"] == random["KL"]["q3"] == 1.0


def test_a_figure_without_an_interval_gets_no_star():
    entry = {"value": 1.5, "low": float("nan"), "high": float("nan"), "n": 1}
    assert comparison_cell(entry, "ratio") == "1.50 [nan,nan]"
    assert comparison_cell({"value": 1.5, "low": 1.2, "high": 1.8, "n": 9}, "ratio").endswith("*")
    assert not comparison_cell({"value": 0.1, "low": -0.1, "high": 0.3}, "difference").endswith("*")
    assert comparison_cell(None, "ratio") == "-"


def test_a_results_file_from_before_mass_all_still_loads_and_compares(tmp_path, capsys):
    """Suppression reports "mass all" since a later version: files written before it (no
    ``mass_all`` anywhere) load, compare with each other and with a newer run on the other
    figures, and show the missing one as "-"."""
    values, _ = pair()
    old = run({m: {k: v for k, v in d.items() if k != "mass_all"} for m, d in values.items()})
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.json").write_text(json.dumps({"experiments": [old]}))
    (loaded,) = load_results(tmp_path / "old")
    assert "mass_all" not in loaded["baseline"]["values"] and "mass" in loaded["baseline"]["values"]
    (result,) = compare_runs([old], [run(values)])
    assert result["n_prompts"]["mass_all"] == 0 and result["n_prompts"]["kl"] == 24
    for row in result["rows"]:
        assert row["mass all"] is None
        assert row["KL"] is not None
    assert main(["compare", str(tmp_path / "old"), str(tmp_path / "old")]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "specificity" in line)
    # k, heads, same heads, then words B/A and mass B/A (value and interval), mass all.
    assert row.split()[3:8] == ["1.00", "[1.00,1.00]", "1.00", "[1.00,1.00]", "-"]
    # A measure reported from the start is still required.
    del old["baseline"]["values"]["kl"]
    with pytest.raises(ValueError, match="baseline: values.kl must be a list of numbers"):
        compare_runs([old], [old])


def test_the_json_output_is_standard_json(tmp_path, capsys):
    values, _ = pair()
    values["specificity"]["concept_words"][:] = 0.0  # B/A of words: 0/0, NaN
    values["baseline"]["concept_words"][:] = 0.0
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text(json.dumps({"experiments": [run(values)]}))
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "a"), "--json"]) == 0
    text = capsys.readouterr().out
    assert "NaN" not in text and "Infinity" not in text
    json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard {name}"))


def test_a_reader_that_stops_reading_ends_the_command_quietly(tmp_path):
    """``somp-ref compare A B --json | head -1``: status 141 (SIGPIPE's), nothing on stderr."""
    import subprocess
    import sys

    values, _ = pair()
    result = run(values)
    ks = list(range(1, 121))  # ~140 KB of output: twice a Linux pipe buffer (64 KiB)
    result["settings"]["ks"] = ks
    result["conditions"] = [dict(c, k=k) for k in ks for c in result["conditions"]]
    (tmp_path / "results.json").write_text(json.dumps({"experiments": [result]}))
    process = subprocess.Popen(
        [sys.executable, "-m", "somp_ref", "compare", str(tmp_path), str(tmp_path), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout.readline().strip() == b"{"
    process.stdout.close()
    err = process.stderr.read()
    assert process.wait(timeout=300) == 141, err
    assert err == b""
