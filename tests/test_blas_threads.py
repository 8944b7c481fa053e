"""BLAS held to one thread where the pursuits need it (:mod:`somp_ref.blas_threads`), and
given back afterwards."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
from threadpoolctl import threadpool_info

from somp_ref.blas_threads import THREAD_VARIABLES, one_blas_thread, one_thread_in_children


def blas_threads() -> list[int]:
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def test_one_blas_thread_limits_blas_while_it_lasts():
    np.ones(2) @ np.ones(2)  # numpy's BLAS loaded
    before = blas_threads()
    assert before  # numpy's BLAS is seen: the limit has something to act on
    with one_blas_thread():
        assert blas_threads() == [1] * len(before)
    assert blas_threads() == before


def test_children_start_with_one_thread_and_the_environment_is_restored(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    script = f"import os; print(' '.join(os.environ[n] for n in {THREAD_VARIABLES!r}))"
    with one_thread_in_children():
        seen = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert seen.stdout.split() == ["1"] * len(THREAD_VARIABLES)
    assert os.environ["OMP_NUM_THREADS"] == "7"
    assert "OPENBLAS_NUM_THREADS" not in os.environ


def test_a_worker_holds_its_blas_to_one_thread_for_good():
    # In a child process: the limit lasts for the rest of the process that sets it.
    script = (
        "import numpy as np; from threadpoolctl import threadpool_info;"
        "from somp_ref.blas_threads import one_thread_from_now; one_thread_from_now();"
        "print({p['num_threads'] for p in threadpool_info() if p['user_api'] == 'blas'})"
    )
    seen = _in_a_fresh_process(script)
    assert seen.stdout.strip() == "{1}", seen.stderr


def test_a_blas_loaded_after_the_first_limit_is_limited_too():
    """In a fresh process: limit once with numpy's BLAS alone, then load scipy's (its own
    OpenBLAS in wheels) and limit again: every BLAS pool is held to one thread."""
    script = (
        "import numpy as np; from threadpoolctl import threadpool_info\n"
        "from somp_ref.blas_threads import one_blas_thread\n"
        "with one_blas_thread(): pass\n"
        "import scipy.linalg\n"
        "with one_blas_thread():\n"
        "    print({p['num_threads'] for p in threadpool_info() if p['user_api'] == 'blas'})\n"
    )
    seen = _in_a_fresh_process(script)
    assert seen.stdout.strip() == "{1}", seen.stdout + seen.stderr


def _in_a_fresh_process(script: str) -> subprocess.CompletedProcess:
    """Run ``script`` in a new interpreter whose BLAS starts with its default threads (no
    thread-count variable inherited)."""
    environment = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=environment
    )
