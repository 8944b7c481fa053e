"""The fast engine's lazy argmax: every bound it keeps covers the score it stands for."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from problems import assert_same_selection, gaussian_problems

from somp_ref import batch_omp, lazy_argmax, somp
from somp_ref.lazy_argmax import LazyScorer

#: A bound may sit below its score by the rounding of the two computations (each ~(n + t)
#: eps of the largest score at the start: residual correlations are computed by
#: subtraction from those); far below the tie window (TIE_RTOL = 1e-9 of that scale), so
#: no choice can hinge on it.
BOUND_RTOL = 1e-12


@contextlib.contextmanager
def checked_bounds():
    """Run every best_atom of the bounded scorers (lazy, tracked) after checking each bound
    against the exact score, from the correlations as they were first given; counts the
    checks."""
    seen = {"checks": 0}
    original_init, original_best = LazyScorer.__init__, LazyScorer.best_atom

    def init(self, Ct, *args, **kwargs):
        original_init(self, Ct, *args, **kwargs)
        self.first_ct = Ct.copy()

    def best_atom(self, unit):
        rows = self.first_ct - self.atom_factors.T @ self.sample_factors
        exact = np.linalg.norm(rows, ord=self.order, axis=1) / self.scale
        open_ = ~self.blocked
        first = np.linalg.norm(self.first_ct, ord=self.order, axis=1) / self.scale
        slack = BOUND_RTOL * first.max(initial=0.0)  # the scale of the rounding
        assert np.all(self.bound[open_] >= exact[open_] - slack)
        seen["checks"] += 1
        return original_best(self, unit)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lazy_argmax.LazyScorer, "__init__", init)
        patch.setattr(lazy_argmax.LazyScorer, "best_atom", best_atom)
        yield seen


@given(
    gaussian_problems(max_n=30, max_d=24, max_v=40),
    st.integers(1, 20),
    st.sampled_from(["l1", "l2"]),
    st.booleans(),
)
def test_every_bound_covers_its_score(problem, n_atoms, criterion, normalize):
    H, D = problem
    with checked_bounds():
        somp(H, D, n_atoms, criterion=criterion, normalize=normalize)


def test_the_check_runs():
    rng = np.random.default_rng(0)
    with checked_bounds() as seen:
        somp(rng.standard_normal((50, 30)), rng.standard_normal((60, 30)), 10)
    assert seen["checks"] >= 10


#: Gains of the three scorings come from the same rows, updated in other orders.
GAIN_RTOL = 1e-9


@given(
    gaussian_problems(max_n=30, max_d=24, max_v=40),
    st.integers(1, 20),
    st.sampled_from(["l1", "l2"]),
    st.booleans(),
)
def test_the_scorings_make_the_same_choices(problem, n_atoms, criterion, normalize):
    H, D = problem
    order = 1 if criterion == "l1" else 2
    sq_norms = np.einsum("ij,ij->i", D, D)
    energy = float(np.sum(H * H))
    paths = {}
    scorings = ("lazy", "dense", "tracked") if order == 2 else ("lazy", "dense")
    for scoring in scorings:
        with checked_bounds():
            paths[scoring] = batch_omp.pursue(
                D @ H.T,
                lambda j: D @ D[j],
                sq_norms,
                energy,
                min(n_atoms, D.shape[0]),
                order=order,
                normalize=normalize,
                tol=0.0,
                refit=True,
                scoring=scoring,
            )
    lazy = paths["lazy"]
    for scoring, path in paths.items():
        # Rows updated in another order round differently: a choice may differ only where
        # a score sits on the tie window's edge (then the paths part).
        prefix = assert_same_selection(
            path.support, lazy.support, H, D, criterion=criterion, normalize=normalize
        )
        if prefix == len(path.support) == len(lazy.support):
            assert path.stop_reason == lazy.stop_reason, scoring
            np.testing.assert_allclose(
                path.gains, lazy.gains, rtol=GAIN_RTOL, atol=GAIN_RTOL * energy
            )


def test_tracked_scoring_is_for_l2_only():
    with pytest.raises(ValueError, match=r"tracked scoring is for the l2 criterion"):
        batch_omp.pursue(
            np.ones((3, 2)),
            lambda j: np.ones(3),
            np.ones(3),
            1.0,
            2,
            order=1,
            normalize=True,
            tol=0.0,
            refit=True,
            scoring="tracked",
        )


@given(st.lists(st.integers(1, 80), min_size=1, max_size=32))
def test_a_refresh_batch_is_cut_where_it_saves_most(lags):
    lags = np.sort(np.asarray(lags))  # as _refresh orders them: the most-behind last
    size = lags.size

    def cost(cut):  # rows x steps: each product goes as deep as its most-behind row
        return cut * lags[:cut].max(initial=0) + (size - cut) * lags[cut:].max()

    cut = lazy_argmax._split(lags)
    best = min(range(1, size), key=cost, default=size)
    if cut == size:
        assert size == 1 or cost(best) + lazy_argmax._CALL_COST >= cost(0)
    else:
        assert cost(cut) == cost(best)
        assert cost(cut) + lazy_argmax._CALL_COST < cost(0)


@given(
    st.integers(1, 40),
    st.integers(1, 12),
    st.integers(1, 30),
    st.integers(0, 2**32 - 1),
)
def test_a_refresh_brings_every_row_up_to_date_whatever_it_lags(v, n, steps, seed):
    rng = np.random.default_rng(seed)
    first_ct = rng.standard_normal((v, n))
    scorer = LazyScorer(first_ct.copy(), steps, np.ones(v), order=1, normalize=False, atom_exp=None)
    scorer.At[:steps] = rng.standard_normal((steps, n))
    scorer.U[:steps] = rng.standard_normal((steps, v))
    scorer.steps = steps
    # Each row as it stood after a random number of steps.
    scorer.stamp[:] = rng.integers(0, steps + 1, v)
    taken = np.arange(steps)[:, None] < scorer.stamp
    scorer.Ct[:] = first_ct - (scorer.U[:steps] * taken).T @ scorer.At[:steps]
    atoms = rng.permutation(v)[: min(v, scorer.batch)]
    scorer._refresh(atoms)
    exact = first_ct - scorer.U[:steps].T @ scorer.At[:steps]
    # Rounding of sums of ~steps products of standard normals: far inside 1e-12.
    np.testing.assert_allclose(scorer.Ct[atoms], exact[atoms], rtol=0, atol=1e-12 * steps * 10)
    np.testing.assert_array_equal(scorer.stamp[atoms], steps)
    np.testing.assert_allclose(scorer.bound[atoms], np.abs(exact[atoms]).sum(axis=1), rtol=1e-12)


def _lazy_scorer(seed, v=30, n=12):
    rng = np.random.default_rng(seed)
    Ct = rng.standard_normal((v, n))
    return LazyScorer(Ct.copy(), 5, np.ones(v), order=1, normalize=False, atom_exp=None), Ct


def test_a_blocked_atom_is_not_chosen():
    scorer, Ct = _lazy_scorer(1)
    best = int(np.argmax(np.abs(Ct).sum(axis=1)))
    mask = np.zeros(Ct.shape[0], dtype=bool)
    mask[best] = True
    scorer.block(mask)
    assert scorer.best_atom(0.0) == int(np.argmax(np.where(mask, -np.inf, np.abs(Ct).sum(axis=1))))
    scorer.block(~mask)
    assert scorer.best_atom(0.0) == -1  # every atom blocked


def test_the_chosen_atom_has_up_to_date_correlations_and_the_factors_are_the_steps():
    scorer, Ct = _lazy_scorer(2)
    rng = np.random.default_rng(3)
    steps = [(rng.standard_normal(Ct.shape[1]), rng.standard_normal(Ct.shape[0])) for _ in range(3)]
    for a, u in steps:
        scorer.add_step(a, u)
    np.testing.assert_array_equal(scorer.sample_factors, np.stack([a for a, _ in steps]))
    np.testing.assert_array_equal(scorer.atom_factors, np.stack([u for _, u in steps]))
    exact = Ct - scorer.atom_factors.T @ scorer.sample_factors
    j = scorer.best_atom(0.0)
    assert j == int(np.argmax(np.abs(exact).sum(axis=1)))
    # Rounding of a few products of standard normals, summed in another order.
    np.testing.assert_allclose(scorer.correlations(j), exact[j], rtol=0, atol=1e-12)
