"""verify/: the agreement suite, the golden vectors and port checking."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from problems import assert_same_selection, gaussian_problems

from somp_ref import somp
from somp_ref.cli import main
from somp_ref.verify.ports import check_port, golden_cases, load_port


def uncentered(H, D, n_atoms, **options):
    """A deliberately wrong port: it never centers."""
    options["center"] = False
    return somp(H, D, n_atoms, **options)


def highest_index_ties(H, D, n_atoms, **options):
    """Another wrong port: ties go to the highest index (reverse the atoms, map back)."""
    res = somp(H, D[::-1], n_atoms, **options)
    return {
        "support": D.shape[0] - 1 - res.support,
        "coef": res.coef,
        "explained_variance": res.explained_variance,
    }


def test_golden_files_regenerate_to_tolerance():
    done = subprocess.run(
        [sys.executable, "-m", "somp_ref.verify.golden.regenerate", "--check"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    total = len(golden_cases())
    assert f"agree to tolerance: {total} of {total}" in done.stdout


def test_check_reports_a_changed_golden_value():
    from somp_ref.verify.golden.regenerate import compare

    tensors = dict(golden_cases()["planted"][0])
    assert compare(tensors, tensors) == []
    moved = dict(tensors, **{"somp.coef": tensors["somp.coef"] * (1 + 1e-6)})
    assert [d.split(":")[0] for d in compare(tensors, moved)] == ["somp.coef"]
    swapped = dict(tensors, **{"somp.support": tensors["somp.support"][::-1].copy()})
    assert [d.split(":")[0] for d in compare(tensors, swapped)] == ["somp.support"]


def test_every_golden_decision_is_clear():
    # The shipped margins: each step's runner-up is far outside the tie window, and atoms
    # inside it are tied to rounding (the lowest index then wins by the rule).
    from somp_ref.verify.golden.margins import CLEAR_MARGIN, CLEAR_SPREAD

    for name, (tensors, _) in golden_cases().items():
        for path in ("somp", "mp"):
            assert np.all(tensors[f"{path}.margin"] >= CLEAR_MARGIN), name
            assert np.all(tensors[f"{path}.spread"] <= CLEAR_SPREAD), name


@pytest.mark.parametrize("gap", [1e-7, 1e-10])
def test_generator_refuses_a_case_decided_by_rounding(gap):
    # Two atoms whose scores differ by ~gap of the noise scale: inside the tie window (1e-9)
    # or just outside it, neither is a decision every kernel makes alike.
    from somp_ref.verify.golden.regenerate import expected

    rng = np.random.default_rng(0)
    D = rng.standard_normal((5, 6))
    D[1] = D[0] * (1 + gap) + gap * rng.standard_normal(6)
    H = np.tile(D[0] + D[1], (3, 1)) + 1e-3 * rng.standard_normal((3, 6))
    with pytest.raises(AssertionError, match="margin|spread|lens"):
        expected(H, D, {"n_atoms": 2, "center": False})


def test_reference_passes_every_golden_case():
    reports = check_port(somp)
    assert len(reports) == len(golden_cases()) >= 10
    assert all(r.passed for r in reports), [r for r in reports if not r.passed]


def test_wrong_ports_fail_exactly_the_cases_they_break():
    centered = {
        name
        for name, (_, meta) in golden_cases().items()
        if json.loads(meta["params"]).get("center", True)
    }
    failed = {r.case for r in check_port(uncentered) if not r.passed}
    assert failed == centered - {"constant"} | {"constant"}
    failed = {r.case for r in check_port(highest_index_ties) if not r.passed}
    assert failed == {"ties", "rank_deficient"}


@pytest.mark.parametrize("field", ["coef", "explained_variance"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_port_returning_non_finite_numbers_fails_every_case(field, value):
    def poisoned(*args, **kwargs):
        result = somp(*args, **kwargs)  # the right support, then a NaN or Inf
        values = getattr(result, field).copy()
        if values.size:  # a case that selects nothing has nothing to poison
            values.flat[-1] = value
        return dataclasses.replace(result, **{field: values})

    reports = check_port(poisoned)
    name = "coef" if field == "coef" else "explained variance"
    failed = [r for r in reports if not r.passed]
    assert len(failed) >= len(reports) - 1, reports  # all but the constant case's empty coef
    assert all(r.detail == f"{name} holds NaN or Inf" for r in failed), failed


def test_port_reports_exceptions_and_bad_specs():
    def broken(*args, **kwargs):
        raise RuntimeError("not implemented")

    assert all("raised RuntimeError: not implemented" in r.detail for r in check_port(broken))
    with pytest.raises(ValueError, match=r"a port is 'package.module:function'"):
        check_port("somp_ref.somp")


def test_a_port_that_exits_fails_its_cases_and_ctrl_c_stops_the_check():
    def exits(*args, **kwargs):
        raise SystemExit(0)

    reports = check_port(exits)
    assert reports and not any(r.passed for r in reports)
    assert all(r.detail == "raised SystemExit: 0" for r in reports)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        check_port(interrupted)


@pytest.mark.parametrize(
    "source, message",
    [
        ("def f(:\n", r"port module {name} has a syntax error \(.*{name}.py, line 1\)"),
        ("raise RuntimeError('boom')\n", r"port module {name} failed while imported: Runtime"),
        ("raise SystemExit(0)\n", r"port module {name} failed while imported: SystemExit: 0"),
        ("from os import no_such_name\n", r"port module {name} failed while imported: Import"),
        ("import no_such_module_xyz\n", r"port module {name} failed while imported: ModuleNot"),
    ],
    ids=["syntax-error", "raises", "exits", "bad-import", "missing-dependency"],
)
def test_a_port_module_that_fails_to_import_is_a_value_error(
    tmp_path, monkeypatch, source, message
):
    name = f"broken_port_{abs(hash(source))}"
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=message.format(name=name)):
        load_port(f"{name}:f")


def test_verify_exits_1_when_a_port_raises_system_exit(tmp_path, monkeypatch, capsys):
    (tmp_path / "exiting_port_cli.py").write_text("def f(*a, **k):\n    raise SystemExit(0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["verify", "--port", "exiting_port_cli:f"]) == 1
    out = capsys.readouterr().out
    assert "raised SystemExit: 0" in out and "0 passed or skipped" in out


def test_verify_command_passes_and_reports_a_failing_port(capsys):
    assert main(["verify", "--model", "none", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["failed"] == []
    assert {row["status"] for row in report["checks"]} <= {"pass", "skip"}
    assert main(["verify", "--port", "test_verify:uncentered"]) == 1
    out = capsys.readouterr().out
    assert "random_l1_centered" in out and "FAIL" in out and "failed: " in out


torch = pytest.importorskip("torch")


@given(
    gaussian_problems(max_n=8, max_d=10, max_v=14),
    st.integers(1, 10),
    st.sampled_from(["l1", "l2"]),
    st.booleans(),
)
def test_torch_port_equals_numpy_engine(problem, n_atoms, criterion, center):
    from somp_ref.adapters.torch_somp import somp_torch

    H, D = problem
    ref = somp(H, D, n_atoms, criterion=criterion, center=center)
    port = somp_torch(H, D, n_atoms, criterion=criterion, center=center)
    prefix = assert_same_selection(port.support, ref.support, H - ref.mean, D, criterion=criterion)
    if prefix == ref.n_selected == port.n_selected:
        assert port.stop_reason == ref.stop_reason
        scale = max(np.abs(ref.coef).max(initial=0.0), 1e-300)
        # Full-pass vs lazy scoring only reorders float64 sums: rounding, far below 1e-9.
        assert np.max(np.abs(port.coef - ref.coef), initial=0.0) <= 1e-9 * scale
        assert np.max(np.abs(port.explained_variance - ref.explained_variance)) <= 1e-9


@pytest.mark.parametrize("center", [True, False])
def test_torch_engine_ranks_like_the_numpy_engine(tmp_path, center):
    from stores import write_planted_store

    from somp_ref.heads import rank_heads

    store = write_planted_store(tmp_path / "s")
    ids = [3, 7, 11, 19, 23, 40, 41, 42]
    options = {"center": center, "exclude_layers": [0], "show_progress": False}
    a = rank_heads(store, ids, 6, **options)
    b = rank_heads(store, ids, 6, engine="torch", device="cpu", **options)
    assert b.params["engine"] == "torch" and a.params["engine"] == "numpy"
    assert np.isnan(b.score[0]).all()  # the same options, through the same loop
    assert np.nanmax(np.abs(a.score - b.score)) <= 1e-9
    assert a.supports.keys() == b.supports.keys()
    assert all(np.array_equal(a.supports[key], b.supports[key]) for key in a.supports)
    assert all(np.allclose(a.increments[k], b.increments[k], atol=1e-9) for k in a.supports)


@pytest.mark.model
def test_verify_with_the_embedded_model_passes(capsys):
    assert main(["verify", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    model_rows = [r for r in report["checks"] if r["name"].startswith("default:")]
    assert len(model_rows) == 3 and all(r["status"] == "pass" for r in model_rows)


def test_verify_offline_skips_the_model_checks_with_the_reason(tmp_path):
    # No network: an empty model cache and pip forbidden to reach an index.
    env = {
        **os.environ,
        "SOMP_REF_CACHE": str(tmp_path),
        "PIP_NO_INDEX": "1",
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("SOMP_REF_GGUF", None)
    done = subprocess.run(
        [sys.executable, "-m", "somp_ref", "verify", "--json"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    rows = {row["name"]: row for row in json.loads(done.stdout)["checks"]}
    model = rows["model internals"]
    assert model["status"] == "skip"
    assert model["detail"].startswith("default model unavailable: could not download")
