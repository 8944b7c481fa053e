""".ci/run runs the tests under other OpenBLAS kernels as well as the default (issue 10,
point 2), so that a result that depends on the CPU's vector unit fails CI on any machine.

The script itself is run, in a copy of its folder layout, with every program it calls
(python3, python, ruff, somp-ref, and the grep and uname that detect the CPU) replaced by a
stub that logs its arguments and the OPENBLAS_CORETYPE it ran under: what is checked is what
the script would run, not what its text says, and nothing is installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "run"
BASH = shutil.which("bash")

pytestmark = pytest.mark.skipif(
    sys.platform == "win32" or BASH is None, reason="runs .ci/run with bash"
)

STUB = """#!/bin/sh
echo "$(basename "$0") ${OPENBLAS_CORETYPE:-default} $*" >> "$CI_STUB_LOG"
"""
#: The CPU as the stubs report it: ``grep -qw avx2 /proc/cpuinfo`` and ``uname -m``.
GREP_STUB = """#!/bin/sh
case "$*" in *avx2*) exit "$CI_STUB_AVX2" ;; esac
exec /usr/bin/env -i PATH=/usr/bin:/bin grep "$@"
"""
UNAME_STUB = """#!/bin/sh
echo "$CI_STUB_MACHINE"
"""
KERNEL_TESTS = "-m pytest -q -m not model and not packaging -p no:cacheprovider"


def run_ci(tmp_path: Path, *, avx2: bool, machine: str = "x86_64") -> list[str]:
    """Run a copy of .ci/run with stubs; return the log of what it ran, one call a line."""
    root = tmp_path / "repo"
    (root / ".ci").mkdir(parents=True)
    shutil.copy(SCRIPT, root / ".ci" / "run")
    (root / ".venv" / "bin").mkdir(parents=True)
    (root / ".venv" / "bin" / "activate").write_text("")  # the venv is the stubs' PATH
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name, text in [
        *((name, STUB) for name in ("python3", "python", "ruff", "somp-ref")),
        ("grep", GREP_STUB),
        ("uname", UNAME_STUB),
    ]:
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    log = tmp_path / "log"
    env = {
        "PATH": f"{stubs}{os.pathsep}/usr/bin{os.pathsep}/bin",
        "HOME": str(tmp_path),
        "CI_STUB_LOG": str(log),
        "CI_STUB_AVX2": "0" if avx2 else "1",
        "CI_STUB_MACHINE": machine,
    }
    done = subprocess.run(
        [BASH, str(root / ".ci" / "run")], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return log.read_text().splitlines()


def kernel_runs(log: list[str], kernel: str) -> list[str]:
    """What ran under ``OPENBLAS_CORETYPE=kernel``, without the program's kernel field."""
    runs = []
    for line in log:
        program, coretype, *args = line.split(" ")
        if coretype == kernel:
            runs.append(" ".join([program, *args]))
    return runs


def test_ci_runs_the_tests_under_prescott_and_haswell_as_well_as_the_default(tmp_path):
    log = run_ci(tmp_path, avx2=True)
    default = kernel_runs(log, "default")
    assert "ruff check ." in default
    assert "python -m pytest" in default  # the README's test command, on the default kernel
    for kernel in ("Prescott", "Haswell"):
        runs = kernel_runs(log, kernel)
        assert f"python {KERNEL_TESTS}" in runs, (kernel, log)
        assert "somp-ref verify --model none" in runs, (kernel, log)
        assert "python -m somp_ref.verify.golden.regenerate --check" in runs, (kernel, log)
    tests = [line.split(" ")[1] for line in log if " -m pytest" in line]
    assert tests == ["default", "Prescott", "Haswell"], log


def test_ci_skips_haswell_without_avx2_and_every_kernel_off_x86_64(tmp_path):
    log = run_ci(tmp_path / "no-avx2", avx2=False)
    assert f"python {KERNEL_TESTS}" in kernel_runs(log, "Prescott")
    assert kernel_runs(log, "Haswell") == []
    log = run_ci(tmp_path / "arm", avx2=True, machine="aarch64")
    assert kernel_runs(log, "Prescott") == kernel_runs(log, "Haswell") == []
    assert "python -m pytest" in kernel_runs(log, "default")
