"""The l2 criterion's fast path: the factored pursuit in each head's d_head-dimensional
sample space (``somp_ref.factored.sample_space_factor``) against the reference ``somp``."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from numpy.testing import assert_allclose
from problems import assert_same_selection

from somp_ref import somp
from somp_ref.factored import CHOLESKY_QR_TOL, head_somp, sample_space_factor

#: Explained variance of the two paths differs by the rounding of gains summed over at
#: most a few dozen steps, each exact to ~(d + t) eps of the energy: far below this.
EV_ATOL = 1e-9
#: Coefficients go through (L L^T)^-1 with L's condition bounded by DEPENDENT_TOL (1e-6
#: of an atom's own norm squared): rounding amplified by up to ~1e6, relative to the
#: largest coefficient.
COEF_RTOL = 1e-7
#: Two factors of the same samples agree to rounding amplified by their condition number
#: (at most ~1e5 on the CholeskyQR2 path, by CHOLESKY_QR_TOL).
FACTOR_RTOL = 1e-9


@st.composite
def sample_space_heads(draw):
    """(z, o_proj_head, D): more samples than d_head mostly (the fast path), sometimes
    fewer; z of full rank, of lower rank (repeated columns), or with a large mean."""
    d_head = draw(st.integers(1, 8))
    n = draw(st.integers(1, 40))
    d_model = draw(st.integers(d_head, 24))
    v = draw(st.integers(1, 30))
    rank = draw(st.integers(1, d_head))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    z = rng.standard_normal((n, rank)) @ rng.standard_normal((rank, d_head))
    z += rng.standard_normal(d_head) * draw(st.sampled_from([0.0, 5.0]))
    o_proj_head = rng.standard_normal((d_model, d_head))
    D = rng.standard_normal((v, d_model)) * rng.uniform(0.5, 2.0, size=(v, 1))
    return z, o_proj_head, D


def assert_agrees_with_somp(z, o_proj_head, D, n_atoms, **options):
    H = z @ o_proj_head.T
    fast = head_somp(z, o_proj_head, D, n_atoms, criterion="l2", **options)
    for engine in ("fast", "naive"):
        ref = somp(H, D, n_atoms, criterion="l2", engine=engine, **options)
        prefix = assert_same_selection(
            fast.support,
            ref.support,
            H - ref.mean,
            D,
            criterion="l2",
            normalize=options.get("normalize", True),
        )
        if prefix == fast.n_selected == ref.n_selected:
            assert fast.stop_reason == ref.stop_reason
            assert_allclose(fast.explained_variance, ref.explained_variance, rtol=0, atol=EV_ATOL)
            scale = max(np.abs(ref.coef).max(initial=0.0), 1e-300)
            assert_allclose(fast.coef, ref.coef, rtol=0, atol=COEF_RTOL * scale)
    return fast


@given(sample_space_heads(), st.integers(1, 12), st.booleans(), st.booleans())
@example(case=(np.ones((5, 3)), np.eye(4, 3), np.eye(4)), n_atoms=3, center=True, normalize=True)
def test_l2_sample_space_path_agrees_with_somp(case, n_atoms, center, normalize):
    assert_agrees_with_somp(*case, n_atoms, center=center, normalize=normalize)


@given(st.integers(0, 2**32 - 1), st.integers(1, 4), st.sampled_from([3, 40, 400]))
def test_l2_sample_space_path_recovers_a_planted_support(seed, s, n):
    # A head that writes s of 30 near-orthogonal atoms (plus nothing else): the support is
    # the planted one whatever n, below, at or above d_head = 8.
    rng = np.random.default_rng(seed)
    D = np.linalg.qr(rng.standard_normal((64, 30)))[0].T
    planted = rng.choice(30, size=s, replace=False)
    o_proj_head = D[planted].T @ rng.standard_normal((s, 8))
    z = rng.standard_normal((n, 8))
    res = assert_agrees_with_somp(z, o_proj_head, D, 10, center=False)
    assert set(res.support.tolist()) == set(planted.tolist())
    assert abs(res.explained_variance[-1] - 1.0) <= EV_ATOL


def test_fewer_samples_than_d_head_and_rank_deficient_samples():
    rng = np.random.default_rng(3)
    D = rng.standard_normal((20, 16))
    o_proj_head = rng.standard_normal((16, 8))
    few = rng.standard_normal((3, 8))  # n < d_head: the factor is (n, d_head)
    assert sample_space_factor(few - few.mean(axis=0)).shape == (3, 8)
    assert_agrees_with_somp(few, o_proj_head, D, 6)
    low_rank = rng.standard_normal((50, 2)) @ rng.standard_normal((2, 8))  # rank 2 of 8
    assert sample_space_factor(low_rank - low_rank.mean(axis=0)).shape == (8, 8)
    assert_agrees_with_somp(low_rank, o_proj_head, D, 6)


@pytest.mark.parametrize("condition", [1.0, 1e3, 1e8])
def test_the_factor_is_a_qr_factor_well_and_ill_conditioned(condition):
    # CholeskyQR2 below ~1e5, Householder above: R^T R = zc^T zc either way, so every
    # l2 norm in the sample space is the norm over the samples.
    rng = np.random.default_rng(0)
    q = np.linalg.qr(rng.standard_normal((300, 6)))[0]
    zc = q * np.geomspace(1.0, 1.0 / condition, 6) @ np.linalg.qr(rng.standard_normal((6, 6)))[0]
    R = sample_space_factor(zc)
    f = rng.standard_normal((6, 5))
    assert_allclose(
        np.linalg.norm(R @ f, axis=0),
        np.linalg.norm(zc @ f, axis=0),
        rtol=FACTOR_RTOL * min(condition, 1 / np.sqrt(CHOLESKY_QR_TOL)),
        atol=0,
    )


def test_extreme_scales_take_the_same_l2_path():
    rng = np.random.default_rng(1)
    z, w, D = (
        rng.standard_normal((30, 4)),
        rng.standard_normal((12, 4)),
        rng.standard_normal((9, 12)),
    )
    base = head_somp(z, w, D, 5, criterion="l2")
    for factor in (1e-150, 1e150):
        scaled = head_somp(z * factor, w, D, 5, criterion="l2")
        assert scaled.support.tolist() == base.support.tolist()
        assert_allclose(scaled.explained_variance, base.explained_variance, rtol=0, atol=EV_ATOL)
