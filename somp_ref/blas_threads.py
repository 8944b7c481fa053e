"""How many threads BLAS runs on: one where a pursuit makes its thousands of small calls,
and one in each worker process of a ranking (each worker is one of the cores already).

Two means, for two moments: threadpoolctl (a core dependency) limits the thread pools of
the BLAS libraries already loaded in this process, for a while (:func:`one_blas_thread`)
or for good (:func:`one_thread_from_now`); the thread-count environment variables size a
pool when its library loads, which is how a spawned process's BLAS starts with one thread
(:func:`one_thread_in_children`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from threadpoolctl import ThreadpoolController

#: Environment variables that size a BLAS (or OpenMP) thread pool when its library loads.
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


#: The controller made last, and how many modules were imported then.
_MADE: list[tuple[ThreadpoolController, int]] = []


def _controller() -> ThreadpoolController:
    """threadpoolctl's controller of this process's thread pools, made again whenever a
    module was imported since the last one (a BLAS library loads with an extension module:
    scipy's, say; a controller made before it would leave it unlimited). Making one looks
    up every loaded library (a quarter of a millisecond), reusing it costs nothing."""
    modules = len(sys.modules)
    if not _MADE or _MADE[0][1] != modules:
        _MADE[:] = [(ThreadpoolController(), modules)]
    return _MADE[0][0]


def one_blas_thread() -> contextlib.AbstractContextManager:
    """A context in which BLAS runs on one thread.

    A pursuit calls BLAS on small operands thousands of times (a refresh is a 32 x t by
    t x n product): threads cost more than they save there, and when another process
    holds a core, OpenBLAS threads waiting for each other make a pursuit up to ten times
    slower (measured on 2 cores: 120 ms a 7B head on one thread, 0.7-1.7 s on two), and
    so do small LAPACK calls (a 128 x 128 Cholesky: 0.1 ms, or 60 ms). The large products
    (``D W_O``, ``E_h Z_h^T``, a head's ``W^T W`` and the n x d_head products of its
    sample-space factor) run outside it, on every thread. The limit is process-wide while
    it lasts (threadpoolctl's own caveat for threaded callers).
    """
    return _controller().limit(limits=1, user_api="blas")


def one_thread_from_now() -> None:
    """Hold every thread pool of this process (BLAS and OpenMP) to one thread for the rest
    of its life: a ranking worker's, whose parent runs one worker per core."""
    _controller().limit(limits=1)


@contextlib.contextmanager
def one_thread_in_children() -> Iterator[None]:
    """Set every thread-count variable (:data:`THREAD_VARIABLES`) to 1 in this process's
    environment while the context lasts, so that processes started meanwhile (which
    inherit it) load their BLAS with one thread; restore the variables after."""
    saved = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    os.environ.update(dict.fromkeys(THREAD_VARIABLES, "1"))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
