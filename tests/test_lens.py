"""The Logit Lens as the one-sample, one-step case of the pursuit."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from numpy.testing import assert_allclose, assert_array_equal

from somp_ref import ll_head_score, logit_lens, matching_pursuit
from somp_ref.decisions import GAIN_FLOOR, TIE_RTOL

finite = st.floats(-10, 10, allow_nan=False, allow_infinity=False)


@st.composite
def sample_and_dictionary(draw):
    d = draw(st.integers(2, 8))
    v = draw(st.integers(1, 12))
    x = draw(arrays(np.float64, (d,), elements=finite))
    D = draw(arrays(np.float64, (v, d), elements=finite))
    return x, D


def _coefficient(x, atom):
    """``atom @ x / ||atom||^2`` computed on both rescaled by powers of two (exact), so that
    nothing underflows; inf when the true value overflows float64."""
    ex, ea = np.frexp(np.abs(x).max())[1], np.frexp(np.abs(atom).max())[1]
    unit_x, unit_a = np.ldexp(x, -ex), np.ldexp(atom, -ea)
    with np.errstate(over="ignore"):
        return np.ldexp((unit_a @ unit_x) / (unit_a @ unit_a), ex - ea)


def _unit(values):
    """``values`` times a power of two (exact) so that its largest entry is in [0.5, 1)."""
    return np.ldexp(values, -np.frexp(np.abs(values).max())[1])


@given(sample_and_dictionary())
def test_one_step_mp_on_one_sample_is_the_logit_lens(case):
    x, D = case
    # The expected values are computed in a rescaled frame (x and D each times a power of
    # two), where nothing the comparison needs underflows: same order, same ties.
    logits = _unit(D) @ _unit(x) if x.any() and D.any() else np.zeros(len(D))
    magnitude = np.abs(logits)
    best = int(np.argmax(magnitude))
    if np.isinf(_coefficient(x, D[best])):
        with pytest.raises(ValueError, match="overflow"):
            matching_pursuit(x[None], D, 1, center=False, normalize=False)
        return
    mp = matching_pursuit(x[None], D, 1, center=False, normalize=False)
    if mp.n_selected == 0:
        # Nothing to select only when the best atom would explain at most GAIN_FLOOR of x's
        # energy (or x is zero).
        x_unit = _unit(x) if x.any() else x
        a_unit = _unit(D[best]) if D[best].any() else D[best]
        gain = (a_unit @ x_unit) ** 2 / (a_unit @ a_unit) if a_unit.any() else 0.0
        assert gain <= GAIN_FLOOR * (x_unit @ x_unit) * (1 + 1e-9)
        return
    j = mp.support[0]
    # MP picks the largest |logit|, the lowest index among those tied to rounding ...
    window = TIE_RTOL * np.linalg.norm(_unit(x)) * np.linalg.norm(_unit(D)[best])
    assert magnitude[j] >= magnitude.max() - window
    assert np.all(magnitude[:j] < magnitude.max() - window)
    # ... with the coefficient logit / ||D_j||^2 ...
    assert_allclose(mp.coef[0, 0], _coefficient(x, D[j]), rtol=1e-12, atol=0)
    # ... which is the lens's top-1 whenever the top logit is also the largest in magnitude.
    lens = logit_lens(x[None], D, top=1)
    if logits.max() > -logits.min() + window:
        assert lens.indices[0, 0] == j
        plain = D[j] @ x
        if abs(plain) > 1e-290:  # the plain product is exact enough to compare with
            assert_allclose(lens.logits[0, 0], plain, rtol=1e-14, atol=0)


@given(st.integers(0, 2**32 - 1), st.integers(1, 5))
def test_lens_ranks_by_logit_with_stable_ties(seed, top):
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((6, 4))
    D = np.vstack([D, D[:2]])  # rows 6, 7 tie with rows 0, 1
    X = rng.standard_normal((3, 4))
    res = logit_lens(X, D, top=top)
    logits = X @ D.T
    for i in range(3):
        # Duplicated rows may differ in the last bit (a BLAS kernel need not sum two equal
        # rows alike); the tie rule orders them by index all the same.
        canonical = logits[i, [0, 1, 2, 3, 4, 5, 0, 1]]
        expected = sorted(range(8), key=lambda j: (-canonical[j], j))[:top]
        assert res.indices[i].tolist() == expected
    assert_array_equal(res.logits, np.take_along_axis(logits, res.indices, axis=1))


def test_lens_top_is_capped_by_dictionary_size():
    res = logit_lens(np.ones((2, 3)), np.eye(3), top=10)
    assert res.indices.shape == (2, 3)


@given(st.integers(0, 2**32 - 1), st.integers(1, 9), st.integers(1, 7))
def test_ll_head_score_is_the_mean_concept_logit(seed, n, v):
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((v, 5)) * rng.uniform(0.1, 3, size=(v, 1))
    H = rng.standard_normal((n, 5))
    expected = np.mean([[D[c] @ H[i] for c in range(v)] for i in range(n)])
    # Both are sums of n * v * 5 products of O(|H| |D|): rounding only.
    scale = np.abs(H).max() * np.abs(D).max() * 5
    assert abs(ll_head_score(H, D) - expected) <= 1e-13 * scale
    assert ll_head_score(-H, D) == -ll_head_score(H, D)  # a signed score: direction matters


def test_softcap_changes_values_not_ranking():
    rng = np.random.default_rng(4)
    X, D = rng.standard_normal((3, 5)) * 10, rng.standard_normal((9, 5))
    plain = logit_lens(X, D, top=9)
    capped = logit_lens(X, D, top=9, softcap=5.0)
    assert_array_equal(capped.indices, plain.indices)
    assert_allclose(capped.logits, 5.0 * np.tanh(plain.logits / 5.0), rtol=1e-15, atol=0)
    assert np.all(np.abs(capped.logits) < 5.0)
