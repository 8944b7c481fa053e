"""Heads pursued one after another, the next heads' products made while one is pursued.

A head's l1 pursuit runs on one core (thousands of small BLAS calls: see
:func:`somp_ref.blas_threads.one_blas_thread`), so in one process every other core idles
through it. At 7B shape (1000 atoms, 2000 samples, k = 50) a pursuit takes about 30 ms,
and the products it starts from (its share of ``D W_O``, ``E_h zc^T``, its Gram and
energy, the layer's read) about 25 ms on one core: made by a second thread during the
pursuits before it, they cost no time. numpy releases the GIL inside its products, and
both threads run BLAS on one thread (the limit is process-wide: it is set once around
the whole overlap, never changed while the other thread is inside a product).

Overlapping pays only where the products on one core take not much longer than the
pursuits (not for short pursuits, small ``n_atoms``, or many cores that make the products
fast): so the first few heads are prepared and pursued in turn and timed, and the rest
overlap only where that shows it pays (:func:`_pays`). The products are the same calls
either way, only on one BLAS thread instead of all: the results are those of the heads
taken in turn (bit for bit where the BLAS rounds a product alike on any number of threads;
see "Ranking" in docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import numpy as np

from somp_ref.blas_threads import one_blas_thread

Problem = TypeVar("Problem")
Result = TypeVar("Result")


class Stopped(Exception):
    """Raised in the preparing thread when the pursuits have stopped (see :class:`Slots`)."""


class Slot:
    """Where one prepared problem keeps its large array while it is in flight."""

    def __init__(self) -> None:
        self._array: np.ndarray | None = None

    def buffer(self, shape: tuple[int, ...]) -> np.ndarray:
        """A float64 array of ``shape`` (contents undefined), allocated once per shape."""
        if self._array is None or self._array.shape != shape:
            self._array = np.empty(shape)
        return self._array


class Slots:
    """At most ``count`` prepared problems in flight, each holding a :class:`Slot`.

    The preparing side takes a slot per problem (waiting while all are in flight), the
    pursuing side gives it back once the problem is pursued: the prefetch stays at most
    ``count - 1`` problems ahead, and their arrays are allocated once (a fresh 16 MB
    array for a 7B head's correlations costs more in page faults than its product).
    """

    def __init__(self, count: int) -> None:
        # Last in, first out: problems made in turn reuse one slot's array.
        self._free: queue.LifoQueue[Slot | None] = queue.LifoQueue()
        for _ in range(count):
            self._free.put(Slot())
        self._stopped = False

    def take(self) -> Slot:
        """A free slot, once there is one. Raises Stopped once :meth:`stop` was called."""
        if self._stopped:
            raise Stopped
        slot = self._free.get()
        if slot is None:
            raise Stopped
        return slot

    def give_back(self, slot: Slot) -> None:
        self._free.put(slot)

    def stop(self) -> None:
        """Make the preparing side's current or next :meth:`take` raise Stopped."""
        self._stopped = True
        self._free.put(None)


class Timing:
    """Seconds spent on the problems' products (counted by their maker: not waits, nor
    reads of the store) and on their pursuits (counted by :func:`pursued_in_turn`)."""

    def __init__(self) -> None:
        self.prepared = 0.0
        self.pursued = 0.0


def can_overlap() -> bool:
    """Whether overlapping can pay here: this process may run on more than one core (one
    pursues while the other makes products)."""
    return _cores() > 1


def pursued_in_turn(
    problems: Iterable[Problem],
    pursue: Callable[[Problem], Result],
    *,
    overlap: bool,
    slots: Slots,
    timing: Timing,
    probe_ends: Callable[[Problem], bool],
) -> Iterator[Result]:
    """``pursue(problem)`` for each problem in order, the next problems made meanwhile.

    Parameters
    ----------
    problems : iterable
        Made lazily (its ``next`` makes the products, adding their time to
        ``timing.prepared``), each holding a slot of ``slots`` that ``pursue`` gives back.
    pursue : callable
        A problem's pursuit; it runs with BLAS on one thread.
    overlap : bool
        Whether to try (see :func:`can_overlap`); False when the process's cores are busy
        with other work already. The problems up to the first for which ``probe_ends``
        holds are then made and pursued in turn, on one BLAS thread, and the rest overlap
        only where their timing shows it pays (:func:`_pays`).
    slots : Slots
        The slots the problems take: their number bounds the prefetch.
    timing : Timing
    probe_ends : callable

    Yields
    ------
    The results, in order. While the problems overlap, BLAS stays on one thread for the
    whole process, between the results too: consume them promptly, and close the
    generator (``contextlib.closing``) when stopping early.
    """
    problems = iter(problems)
    if overlap:
        while True:
            with one_blas_thread():  # timed as it would run overlapped
                problem = next(problems, _END)
                if problem is _END:
                    return
                start = time.perf_counter()
                result = pursue(problem)
                timing.pursued += time.perf_counter() - start
            yield result
            if probe_ends(problem):
                break
        overlap = _pays(timing)
    if not overlap:
        for problem in problems:  # made on every BLAS thread
            with one_blas_thread():
                result = pursue(problem)
            yield result
        return
    made: queue.SimpleQueue = queue.SimpleQueue()
    thread = threading.Thread(
        target=_prepare_all, args=(problems, made), name="somp-ref-prefetch", daemon=True
    )
    with one_blas_thread():
        try:
            thread.start()
            while (problem := made.get()) is not _END:
                if isinstance(problem, _Failure):
                    error = problem.error
                    del problem  # no cycle through the traceback holding a slot
                    raise error
                yield pursue(problem)
        finally:
            slots.stop()
            _join(thread)


def _join(thread: threading.Thread) -> None:
    """Wait for the preparing thread (at most its current product), through interrupts too:
    the BLAS limit must not be lifted while it is inside a product."""
    interrupted = None
    while thread.is_alive():
        try:
            thread.join()
        except KeyboardInterrupt as err:
            interrupted = err
    if interrupted is not None:
        raise interrupted


def _pays(timing: Timing) -> bool:
    """Whether overlapping the rest beats making the products between the pursuits.

    Overlapped, a head costs the longer of its products on one thread (P, as timed) and
    its pursuit (S); in turn, the products on every core (at best P / c on c cores) plus
    S. ``P (1 - 1 / c) < S`` makes the first the shorter, however well the products use
    the cores (on 2 cores: products up to twice the pursuits still pay).
    """
    return timing.prepared * (1.0 - 1.0 / _cores()) < timing.pursued


_END = object()


class _Failure:
    """An exception of the preparing thread, raised by the pursuing one in its turn."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def _prepare_all(problems: Iterator, made: queue.SimpleQueue) -> None:
    """Prepare every problem in turn into ``made``, then the end (or the failure)."""
    try:
        for problem in problems:
            made.put(problem)
    except Stopped:
        return
    except BaseException as error:  # noqa: BLE001 - re-raised by the pursuing thread
        made.put(_Failure(error))
        return
    made.put(_END)


def _cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
