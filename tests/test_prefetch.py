"""The next heads' products made by a second thread while one is pursued
(:mod:`somp_ref.prefetch`): same results, in order, nothing left running."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose
from stores import write_planted_store

from somp_ref import engines, prefetch
from somp_ref.engines import NumpyEngine
from somp_ref.head_loop import score_heads
from somp_ref.prefetch import Slots, Timing, pursued_in_turn
from somp_ref.store import StoreError

CONCEPT = [3, 7, 11, 19, 23]
THREAD = "somp-ref-prefetch"


@pytest.fixture(autouse=True)
def two_cores(monkeypatch):
    """Overlap as on any machine with two cores or more."""
    monkeypatch.setattr(prefetch, "_cores", lambda: 2)


def no_thread_left() -> bool:
    return all(thread.name != THREAD for thread in threading.enumerate())


class Run:
    """Problems 0..count-1 made and pursued through :func:`pursued_in_turn`, recording
    who made each, and how many were in flight at most."""

    def __init__(self, count: int, *, slow_products: bool, slots: int = 3, fail_at=None):
        self.count, self.slow, self.fail_at = count, slow_products, fail_at
        self.slots, self.timing = Slots(slots), Timing()
        self.makers: list[str] = []
        self.in_flight = self.most_in_flight = 0
        self.lock = threading.Lock()

    def problems(self):
        for i in range(self.count):
            slot = self.slots.take()
            if i == self.fail_at:
                raise ValueError(f"problem {i} is broken")
            with self.lock:
                self.in_flight += 1
                self.most_in_flight = max(self.most_in_flight, self.in_flight)
            self.makers.append(threading.current_thread().name)
            # Products slower than any pursuit, or free (a pursuit sleeps 1 ms at least).
            self.timing.prepared += 1e3 if self.slow else 0.0
            yield i, slot

    def pursue(self, problem):
        i, slot = problem
        time.sleep(0.001)
        with self.lock:
            self.in_flight -= 1
        self.slots.give_back(slot)
        return i * i

    def results(self, *, probe_size: int, overlap: bool = True):
        return pursued_in_turn(
            self.problems(),
            self.pursue,
            overlap=overlap,
            slots=self.slots,
            timing=self.timing,
            probe_ends=lambda problem: problem[0] == probe_size - 1,
        )


@settings(deadline=None, max_examples=25)
@given(
    count=st.integers(0, 12),
    probe_size=st.integers(1, 4),
    slow=st.booleans(),
    slots=st.integers(1, 4),
)
def test_the_results_come_in_order_overlapped_or_not(count, probe_size, slow, slots):
    run = Run(count, slow_products=slow, slots=slots)
    assert list(run.results(probe_size=probe_size)) == [i * i for i in range(count)]
    probed = min(probe_size, count)
    assert set(run.makers[:probed]) <= {"MainThread"}
    rest = set(run.makers[probed:])
    # Overlapped only where the probe's timing shows it pays.
    assert rest <= ({"MainThread"} if slow else {THREAD})
    assert run.most_in_flight <= slots
    assert no_thread_left()


def test_without_overlap_every_problem_is_made_in_turn():
    run = Run(6, slow_products=False)
    assert list(run.results(probe_size=1, overlap=False)) == [i * i for i in range(6)]
    assert set(run.makers) == {"MainThread"}
    assert run.most_in_flight == 1


def test_a_failure_while_preparing_comes_in_its_turn():
    run = Run(8, slow_products=False, fail_at=5)
    results = run.results(probe_size=1)
    assert [next(results) for _ in range(5)] == [i * i for i in range(5)]
    with pytest.raises(ValueError, match=r"problem 5 is broken"):
        next(results)
    assert no_thread_left()


@pytest.mark.parametrize("stop_after", [0, 1, 4])
def test_stopping_early_leaves_no_thread(stop_after):
    run = Run(50, slow_products=False, slots=2)
    results = run.results(probe_size=1)
    for _ in range(stop_after):
        next(results)
    results.close()
    assert no_thread_left()
    assert len(run.makers) <= stop_after + 2  # the prefetch stopped with the slots


def test_a_failed_pursuit_stops_the_preparing_thread():
    run = Run(50, slow_products=False, slots=2)
    pursue = run.pursue

    def failing(problem):
        if problem[0] == 3:
            raise RuntimeError("pursuit failed")
        return pursue(problem)

    run.pursue = failing
    with pytest.raises(RuntimeError, match=r"pursuit failed"):
        list(run.results(probe_size=1))
    assert no_thread_left()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_planted_store(
        tmp_path_factory.mktemp("prefetch") / "store", n_layers=4, n_heads=5, d_head=6
    )


@pytest.fixture
def makers(monkeypatch):
    """The names of the threads that made the engine's problems."""
    names = set()
    problems = engines._problems

    def recorded(*args):
        for prepared in problems(*args):
            names.add(threading.current_thread().name)
            yield prepared

    monkeypatch.setattr(engines, "_problems", recorded)
    return names


class FreeProducts(Timing):
    """A timing in which products cost nothing: the engine always overlaps."""

    @property
    def prepared(self) -> float:
        return 0.0

    @prepared.setter
    def prepared(self, value: float) -> None:
        pass


@pytest.mark.parametrize("criterion", ["l1", "l2"])
@pytest.mark.parametrize("columns", [6, 12, 512])  # one, two or every head a product
def test_overlapped_rankings_are_those_in_turn_bit_for_bit(
    store, monkeypatch, makers, criterion, columns
):
    monkeypatch.setattr(engines, "PRODUCT_COLUMNS", columns)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engines, "can_overlap", lambda: False)
        in_turn = score_heads(store, CONCEPT, 4, criterion=criterion, show_progress=False)
    assert makers == {"MainThread"}
    makers.clear()
    monkeypatch.setattr(engines, "Timing", FreeProducts)
    overlapped = score_heads(store, CONCEPT, 4, criterion=criterion, show_progress=False)
    # l2's pursuits (in the sample space) are never overlapped.
    assert makers == ({"MainThread", THREAD} if criterion == "l1" else {"MainThread"})
    assert np.array_equal(in_turn.score, overlapped.score)
    for head, support in in_turn.supports.items():
        assert np.array_equal(support, overlapped.supports[head])
        assert np.array_equal(in_turn.increments[head], overlapped.increments[head])


def test_the_engine_yields_each_layer_as_it_is_done(store, monkeypatch):
    monkeypatch.setattr(engines, "Timing", FreeProducts)
    dictionary = engines.Dictionary.build(np.asarray(store.unembed()[CONCEPT], dtype=np.float64))
    options = engines.PursuitOptions(center=True, normalize=True, order=1, tol=0.0)
    handed: list[int] = []

    def layers():
        for layer in range(store.n_layers):
            z, o_proj = store.layer(layer)
            if layer == 2:
                raise StoreError("layer 2 is unreadable")
            handed.append(layer)
            yield layer, z, np.asarray(o_proj, dtype=np.float64)

    pursued = NumpyEngine().pursue_layers(layers(), dictionary, 4, options)
    assert [next(pursued)[0], next(pursued)[0]] == [0, 1]
    with pytest.raises(StoreError, match=r"layer 2 is unreadable"):
        next(pursued)
    assert handed == [0, 1]
    assert no_thread_left()


@pytest.mark.parametrize(("heads_of_memory", "slots"), [(0.5, 1), (1, 2), (2.5, 3), (100, 4)])
def test_the_prefetch_stays_within_its_memory(store, monkeypatch, makers, heads_of_memory, slots):
    one_head = 8 * len(CONCEPT) * store.n_samples  # a head's (v, n) correlations
    monkeypatch.setattr(engines, "PREFETCH_BYTES", int(heads_of_memory * one_head))
    monkeypatch.setattr(engines, "Timing", FreeProducts)
    made = []
    monkeypatch.setattr(engines, "Slots", lambda count: made.append(count) or Slots(count))
    score_heads(store, CONCEPT, 4, show_progress=False)
    assert made == [slots]  # the pursued head's and those prepared ahead
    assert (THREAD in makers) == (slots > 1)


@given(
    products=st.floats(0.0, 10.0),
    pursuits=st.floats(1e-3, 10.0),
    cores=st.integers(2, 64),
)
def test_overlap_is_chosen_only_where_it_beats_any_use_of_the_cores(products, pursuits, cores):
    timing = Timing()
    timing.prepared, timing.pursued = products, pursuits
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(prefetch, "_cores", lambda: cores)
        pays = prefetch._pays(timing)
    overlapped = max(products, pursuits)  # the two threads side by side
    in_turn = products / cores + pursuits  # the products on every core, at best
    if pays:  # never slower (to the rounding of the two sides' few operations)
        assert overlapped <= in_turn * (1 + 1e-12)
    if products <= pursuits:  # the products hide entirely behind the pursuits
        assert pays


#: At sizes where BLAS threads, a product on one thread may round otherwise than on two
#: (OpenBLAS's SkylakeX kernels, with 900 samples: ~1e-16 relative): explained variances
#: then agree to the rounding of the pursuit's sums, far inside this.
THREADED_EV_ATOL = 1e-12


@pytest.fixture(scope="module")
def threaded_store(tmp_path_factory):
    """Heads large enough that their products run on several BLAS threads."""
    return write_planted_store(
        tmp_path_factory.mktemp("threaded") / "store",
        n_layers=2,
        n_heads=8,
        d_head=64,
        d_model=256,
        vocab=300,
        n_samples=900,
        concept=tuple(range(0, 300, 3)),
        planted=((1, 2),),
    )


def test_overlapped_rankings_agree_where_blas_threads(threaded_store, monkeypatch):
    concept = list(range(0, 300, 3))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engines, "can_overlap", lambda: False)
        in_turn = score_heads(threaded_store, concept, 8, show_progress=False)
    monkeypatch.setattr(engines, "Timing", FreeProducts)
    overlapped = score_heads(threaded_store, concept, 8, show_progress=False)
    assert_allclose(in_turn.score, overlapped.score, rtol=0, atol=THREADED_EV_ATOL)
    for head, support in in_turn.supports.items():
        assert np.array_equal(support, overlapped.supports[head]), head


def test_a_layer_is_let_go_once_pursued(store, monkeypatch):
    monkeypatch.setattr(engines, "Timing", FreeProducts)
    dictionary = engines.Dictionary.build(np.asarray(store.unembed()[CONCEPT], dtype=np.float64))
    options = engines.PursuitOptions(center=True, normalize=True, order=1, tol=0.0)
    handed = []

    def layers():
        for layer in range(store.n_layers):
            z, o_proj = store.layer(layer)
            o_proj = np.array(o_proj, dtype=np.float64)
            handed.append(weakref.ref(o_proj))
            yield layer, np.asarray(z), o_proj

    pursued = NumpyEngine().pursue_layers(layers(), dictionary, 4, options)
    for layer, _ in pursued:
        gc.collect()
        # Alive at most: the layer just pursued, and the next one read ahead.
        assert all(ref() is None for ref in handed[: max(layer, 0)]), layer
