"""Properties of SOMP and Matching Pursuit (both engines)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st
from numpy.testing import assert_allclose, assert_array_equal
from problems import EDGE_FRACTION, EPS, assert_same_selection, gaussian_problems
from scipy.linalg import lstsq

from somp_ref import batch_omp, logit_lens, matching_pursuit, somp
from somp_ref.batch_omp import MpPath, SompPath
from somp_ref.decisions import tie_unit, window_scale
from somp_ref.pursuit import STOP_REASONS

#: Explained variance is a ratio of float64 energies; the fast engine tracks energy by
#: subtraction (one rounding per step, relative to ||H||^2), so engines agree to ~t * eps.
#: 1e-9 is the numerical contract (docs/ARCHITECTURE.md), far above that.
EV_ATOL = 1e-9

#: Orthogonality of the residual to the chosen atoms, relative to ||R|| ||D_j||: the refit
#: solves a least-squares problem whose normal-equation error is ~ cond * eps.
ORTHO_RTOL = 1e-8

options = st.fixed_dictionaries(
    {
        "criterion": st.sampled_from(["l1", "l2"]),
        "normalize": st.booleans(),
        "center": st.booleans(),
    }
)


def coef_rtol(D, support):
    """Cholesky-based coefficients carry error ~ cond(D_S)^2 eps; lstsq's ~ cond eps."""
    if len(support) == 0:
        return 1e-9
    cond = np.linalg.cond(D[support])
    return max(1e-9, 100 * EPS * cond**2)


def residual(H, D, res):
    Hc = H - res.mean
    return Hc - res.coef @ D[res.support]


# --------------------------------------------------------------- engines agree


@given(gaussian_problems(), st.integers(1, 30), options)
def test_fast_equals_naive(problem, n_atoms, opts):
    H, D = problem
    fast = somp(H, D, n_atoms, **opts)
    naive = somp(H, D, n_atoms, engine="naive", **opts)
    prefix = assert_same_selection(
        fast.support,
        naive.support,
        H - fast.mean,
        D,
        criterion=opts["criterion"],
        normalize=opts["normalize"],
    )
    if prefix < min(fast.n_selected, naive.n_selected):
        return  # a legitimate tie to rounding: the paths part there
    assert_array_equal(fast.support, naive.support)
    assert fast.stop_reason == naive.stop_reason
    rtol = coef_rtol(D, naive.support)
    scale = max(np.linalg.norm(naive.coef), np.finfo(float).tiny)
    err = np.linalg.norm(fast.coef - naive.coef) / scale
    assert err <= rtol, f"coef relative error {err:.3e} > {rtol:.3e}"
    assert_allclose(fast.explained_variance, naive.explained_variance, rtol=0, atol=EV_ATOL)


@given(gaussian_problems(), st.integers(1, 30), options)
def test_mp_fast_equals_naive(problem, n_atoms, opts):
    H, D = problem
    fast = matching_pursuit(H, D, n_atoms, **opts)
    naive = matching_pursuit(H, D, n_atoms, engine="naive", **opts)
    crit = {"criterion": opts["criterion"], "normalize": opts["normalize"]}
    # MP's scores after t steps are not those of a refit, so compare the literal paths
    # only while both agree; a divergence must be a tie in the naive path's own scores.
    common = min(fast.n_selected, naive.n_selected)
    mismatch = np.flatnonzero(fast.support[:common] != naive.support[:common])
    if mismatch.size:
        t = mismatch[0]
        R = H - naive.mean - naive.coef[:, :t] @ D[naive.support[:t]]
        sq_norms = np.sum(D * D, axis=1)
        norms = np.sqrt(sq_norms) if crit["normalize"] else np.ones(len(D))
        order = 1 if crit["criterion"] == "l1" else 2
        s = np.linalg.norm(R @ D.T, ord=order, axis=0) / norms
        Hc = H - naive.mean
        unit = tie_unit(np.sum(Hc * Hc), len(H), order)
        window = unit * window_scale(sq_norms, crit["normalize"])[int(np.argmax(s))]
        edge = s.max() - window
        a, b = fast.support[t], naive.support[t]
        assert min(abs(s[a] - edge), abs(s[b] - edge)) <= EDGE_FRACTION * window
        return
    assert_array_equal(fast.support, naive.support)
    scale = max(np.abs(naive.coef).max(initial=0.0), np.finfo(float).tiny)
    assert_allclose(fast.coef, naive.coef, rtol=0, atol=1e-9 * scale)
    assert_allclose(fast.explained_variance, naive.explained_variance, rtol=0, atol=EV_ATOL)


# ------------------------------------------------------------ invariants of one run


@given(gaussian_problems(), st.integers(1, 30), options, st.sampled_from(["fast", "naive"]))
def test_residual_orthogonal_to_selected_atoms(problem, n_atoms, opts, engine):
    H, D = problem
    res = somp(H, D, n_atoms, engine=engine, **opts)
    R = residual(H, D, res)
    inner = R @ D[res.support].T
    bound = ORTHO_RTOL * np.linalg.norm(H - res.mean) * np.linalg.norm(D[res.support], axis=1)
    assert np.all(np.abs(inner) <= bound + np.finfo(float).tiny)


@given(gaussian_problems(), st.integers(1, 30), options, st.sampled_from(["fast", "naive"]))
def test_explained_variance_monotone_in_unit_interval(problem, n_atoms, opts, engine):
    H, D = problem
    for pursuit in (somp, matching_pursuit):
        ev = pursuit(H, D, n_atoms, engine=engine, **opts).explained_variance
        assert ev[0] == 0.0
        assert np.all((ev >= 0.0) & (ev <= 1.0))
        # Each step projects the residual onto a subspace: energy never grows. Allowed
        # slack: one rounding of a float64 ratio per step.
        assert np.all(np.diff(ev) >= -4 * EPS)


@given(gaussian_problems(), st.integers(1, 30), options)
def test_shapes_bounds_and_reported_energy(problem, n_atoms, opts):
    H, D = problem
    res = somp(H, D, n_atoms, **opts)
    t = res.n_selected
    assert t <= min(n_atoms, D.shape[0])
    assert res.support.dtype == np.int64 and res.support.shape == (t,)
    assert len(set(res.support.tolist())) == t
    assert res.coef.shape == (H.shape[0], t)
    assert res.explained_variance.shape == res.residual_norm.shape == (t + 1,)
    assert res.stop_reason in STOP_REASONS
    if res.stop_reason == "n_atoms":
        assert t == min(n_atoms, D.shape[0])
    # The tracked residual energy is that of the residual the coefficients leave, to the
    # explained-variance contract (the fast engine tracks it by subtraction from ||H||^2).
    measured = np.sum(residual(H, D, res) ** 2)
    total = np.sum((H - res.mean) ** 2)
    assert abs(res.residual_norm[-1] ** 2 - measured) <= EV_ATOL * total


def test_full_support_equals_least_squares():
    rng = np.random.default_rng(0)
    D = rng.standard_normal((5, 9))
    H = rng.standard_normal((7, 9))
    res = somp(H, D, 5, center=False)
    assert sorted(res.support.tolist()) == [0, 1, 2, 3, 4]
    W = lstsq(D[res.support].T, H.T)[0].T
    assert_allclose(res.coef, W, rtol=1e-10, atol=1e-12)
    assert res.stop_reason == "n_atoms"


# ------------------------------------------------------------ planted recovery


@given(
    n=st.integers(1, 10),
    s=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
    criterion=st.sampled_from(["l1", "l2"]),
    engine=st.sampled_from(["fast", "naive"]),
)
def test_recovers_planted_support_on_orthogonal_atoms(n, s, seed, criterion, engine):
    rng = np.random.default_rng(seed)
    v, d = 12, 16
    Q = np.linalg.qr(rng.standard_normal((d, v)))[0].T  # orthonormal rows
    D = Q * rng.uniform(0.2, 5.0, size=(v, 1))
    planted = rng.choice(v, size=s, replace=False)
    W = rng.standard_normal((n, s)) + np.sign(rng.standard_normal((n, s)))
    H = W @ D[planted]
    res = somp(H, D, s + 3, center=False, criterion=criterion, engine=engine)
    assert sorted(res.support.tolist()) == sorted(planted.tolist())
    assert res.stop_reason == "converged"
    assert abs(res.explained_variance[-1] - 1.0) <= 1e-12


@given(
    n=st.integers(1, 20),
    s=st.integers(1, 3),
    seed=st.integers(0, 2**32 - 1),
    engine=st.sampled_from(["fast", "naive"]),
)
@example(n=1, s=3, seed=0, engine="fast")
def test_recovers_planted_row_sparse_signal_on_incoherent_dictionary(n, s, seed, engine):
    rng = np.random.default_rng(seed)
    v, d = 30, 512
    D = rng.standard_normal((v, d))
    Dn = D / np.linalg.norm(D, axis=1, keepdims=True)
    coherence = np.max(np.abs(Dn @ Dn.T - np.eye(v)))
    # Exact recovery condition (Tropp 2004; Tropp, Gilbert & Strauss 2006 for SOMP).
    assume(coherence < 1.0 / (2 * s - 1))
    planted = rng.choice(v, size=s, replace=False)
    W = rng.standard_normal((n, s))
    H = W @ D[planted]
    res = somp(H, D, s, center=False, engine=engine)
    assert sorted(res.support.tolist()) == sorted(planted.tolist())
    assert abs(res.explained_variance[-1] - 1.0) <= 1e-12


# ------------------------------------------------------------ special cases


def tiny_omp(x, D, k):
    """Textbook OMP for one signal (Pati et al. 1993), the test's own oracle."""
    support, r = [], x.copy()
    norms = np.linalg.norm(D, axis=1)
    for _ in range(k):
        scores = np.abs(D @ r) / norms
        scores[support] = -np.inf
        support.append(int(np.argmax(scores)))
        c = lstsq(D[support].T, x)[0]
        r = x - D[support].T @ c
    return support, c


@given(
    d=st.integers(8, 20),
    v=st.integers(2, 12),
    k=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
    criterion=st.sampled_from(["l1", "l2"]),
)
def test_one_sample_somp_is_omp(d, v, k, seed, criterion):
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((v, d))
    x = rng.standard_normal(d)
    k = min(k, v)
    expected_support, expected_coef = tiny_omp(x, D, k)
    res = somp(x[None], D, k, center=False, criterion=criterion)
    prefix = assert_same_selection(res.support, expected_support, x[None], D)
    if prefix == k:
        assert_array_equal(res.support, expected_support)
        assert_allclose(res.coef[0], expected_coef, rtol=1e-9, atol=1e-12)


@given(gaussian_problems(), st.integers(1, 10), options, st.integers(0, 2**32 - 1))
def test_invariant_to_sample_order(problem, n_atoms, opts, seed):
    H, D = problem
    perm = np.random.default_rng(seed).permutation(H.shape[0])
    base = somp(H, D, n_atoms, **opts)
    permuted = somp(H[perm], D, n_atoms, **opts)
    prefix = assert_same_selection(
        permuted.support,
        base.support,
        H - base.mean,
        D,
        criterion=opts["criterion"],
        normalize=opts["normalize"],
    )
    if prefix == base.n_selected == permuted.n_selected:
        assert_allclose(
            permuted.coef,
            base.coef[perm],
            rtol=1e-9,
            atol=1e-9 * np.abs(base.coef).max(initial=1.0),
        )


@given(gaussian_problems(), st.integers(1, 10), options, st.floats(1e-3, 1e3))
def test_equivariant_to_scaling_h(problem, n_atoms, opts, factor):
    H, D = problem
    base = somp(H, D, n_atoms, **opts)
    scaled = somp(H * factor, D, n_atoms, **opts)
    prefix = assert_same_selection(
        scaled.support,
        base.support,
        H - base.mean,
        D,
        criterion=opts["criterion"],
        normalize=opts["normalize"],
    )
    if prefix == base.n_selected == scaled.n_selected:
        assert_allclose(
            scaled.coef,
            factor * base.coef,
            rtol=1e-8,
            atol=1e-9 * factor * np.abs(base.coef).max(initial=1.0),
        )
        assert_allclose(scaled.explained_variance, base.explained_variance, rtol=0, atol=EV_ATOL)


@given(
    gaussian_problems(),
    st.integers(1, 10),
    options,
    st.sampled_from([1e150, 1e-150]),
    st.sampled_from(["H", "D", "both"]),
    st.sampled_from(["fast", "naive"]),
)
def test_extreme_scales_give_the_same_selection(problem, n_atoms, opts, factor, which, engine):
    # Scores square products of H and D entries: at 1e150 they would overflow and at
    # 1e-150 underflow to an empty "converged" support, unless the pursuit rescales first.
    H, D = problem
    fh = factor if which in ("H", "both") else 1.0
    fd = factor if which in ("D", "both") else 1.0
    for pursuit in (somp, matching_pursuit):
        base = pursuit(H, D, n_atoms, engine=engine, **opts)
        scaled = pursuit(H * fh, D * fd, n_atoms, engine=engine, **opts)
        assert_array_equal(scaled.support, base.support)
        assert scaled.stop_reason == base.stop_reason
        assert_allclose(scaled.explained_variance, base.explained_variance, rtol=0, atol=EV_ATOL)
        # Residual energies agree to EV_ATOL of the total: norms to its square root.
        floor = np.sqrt(EV_ATOL) * fh * base.residual_norm[0]
        assert_allclose(scaled.residual_norm, fh * base.residual_norm, rtol=1e-9, atol=floor)
        scale = np.abs(base.coef).max(initial=0.0)
        assert_allclose(scaled.coef, base.coef * (fh / fd), rtol=1e-8, atol=1e-9 * scale * fh / fd)
    lens, scaled_lens = logit_lens(H, D, top=3), logit_lens(H * fh, D * fd, top=3)
    assert_array_equal(scaled_lens.indices, lens.indices)
    # Logits are rounded relative to ||x|| ||D_j||, not to themselves (they may cancel).
    unit = np.linalg.norm(H, axis=1).max() * np.linalg.norm(D, axis=1).max() * fh * fd
    assert_allclose(scaled_lens.logits, lens.logits * fh * fd, rtol=0, atol=1e-13 * unit)


def test_coefficients_that_overflow_are_an_error():
    # H ~ 1e300 over atoms ~ 1e-300: the coefficient ~ 1e600 has no float64 value.
    H = np.array([[3.0, 1.0], [1.0, 2.0]]) * 1e300
    with pytest.raises(ValueError, match="overflow float64"):
        somp(H, np.eye(2) * 1e-300, 2, center=False)


@given(gaussian_problems(), st.integers(1, 10), options, st.integers(0, 2**32 - 1))
def test_permuting_atoms_permutes_support(problem, n_atoms, opts, seed):
    H, D = problem
    perm = np.random.default_rng(seed).permutation(D.shape[0])
    base = somp(H, D, n_atoms, **opts)
    permuted = somp(H, D[perm], n_atoms, **opts)
    mapped = perm[permuted.support]  # back to the original atom indices
    prefix = assert_same_selection(
        mapped,
        base.support,
        H - base.mean,
        D,
        criterion=opts["criterion"],
        normalize=opts["normalize"],
    )
    if prefix == base.n_selected == permuted.n_selected:
        assert_array_equal(mapped, base.support)


@given(gaussian_problems(), st.integers(1, 10), st.sampled_from(["l1", "l2"]))
def test_center_true_equals_precentered_input(problem, n_atoms, criterion):
    H, D = problem
    centered = somp(H, D, n_atoms, center=True, criterion=criterion)
    manual = somp(H - H.mean(axis=0), D, n_atoms, center=False, criterion=criterion)
    assert_allclose(centered.mean, H.mean(axis=0), rtol=0, atol=0)
    prefix = assert_same_selection(
        centered.support, manual.support, H - H.mean(axis=0), D, criterion=criterion
    )
    if prefix == centered.n_selected == manual.n_selected:
        assert_allclose(
            centered.explained_variance, manual.explained_variance, rtol=0, atol=EV_ATOL
        )


def test_ties_go_to_lowest_index():
    D = np.vstack([np.eye(3), np.eye(3)])  # atoms 3..5 duplicate 0..2
    H = np.array([[1.0, 1.0, 0.0]])
    for engine in ("fast", "naive"):
        res = somp(H, D, 5, center=False, engine=engine)
        assert res.support.tolist() == [0, 1]


def test_duplicate_and_zero_atoms_are_never_selected():
    rng = np.random.default_rng(3)
    base = rng.standard_normal((4, 10))
    D = np.vstack([base, base[1] * 2.0, np.zeros(10), base[2] + base[3]])
    H = rng.standard_normal((6, 10))
    for engine in ("fast", "naive"):
        res = somp(H, D, 7, engine=engine)
        chosen = set(res.support.tolist())
        assert 5 not in chosen  # the zero atom
        assert not {1, 4} <= chosen  # an atom and its multiple
        assert not {2, 3, 6} <= chosen  # an atom dependent on two others
        assert res.stop_reason == "exhausted"
        assert res.n_selected == 4


@pytest.mark.parametrize("engine", ["fast", "naive"])
def test_zero_signal_gives_empty_support(engine):
    res = somp(np.zeros((4, 3)), np.eye(3), 2, engine=engine)
    assert res.n_selected == 0
    assert_array_equal(res.explained_variance, [0.0])
    assert_array_equal(res.residual_norm, [0.0])
    assert res.coef.shape == (4, 0)


@pytest.mark.parametrize("engine", ["fast", "naive"])
def test_constant_signal_is_zero_after_centering(engine):
    H = np.tile([1.0, 2.0, 3.0], (5, 1))
    assert somp(H, np.eye(3), 2, engine=engine).n_selected == 0
    # Uncentered, the constant row needs all three axis atoms.
    assert somp(H, np.eye(3), 5, center=False, engine=engine).n_selected == 3


@given(gaussian_problems(max_d=10, max_v=30), st.floats(0.05, 0.95))
def test_tol_stops_once_met(problem, tol):
    H, D = problem
    res = somp(H, D, 30, tol=tol)
    energy = res.residual_norm**2
    if res.stop_reason == "tol":
        assert energy[-1] <= tol * energy[0] * (1 + 1e-12)
        # ... and not one step later than needed.
        assert energy[-2] > tol * energy[0] * (1 - 1e-12)


def test_read_only_non_contiguous_and_low_precision_inputs():
    rng = np.random.default_rng(5)
    H = rng.standard_normal((8, 12))
    D = rng.standard_normal((10, 24))[:, ::2]  # non-contiguous view
    H.flags.writeable = False
    D_ro = np.array(D)
    D_ro.flags.writeable = False
    reference = somp(np.ascontiguousarray(H), np.ascontiguousarray(D), 4)
    for h, dic in [(H, D), (H, D_ro), (np.asfortranarray(H), D)]:
        res = somp(h, dic, 4)
        assert_array_equal(res.support, reference.support)
        assert_allclose(res.coef, reference.coef, rtol=0, atol=1e-12)
    res16 = somp(H.astype(np.float16), D.astype(np.float16), 4)
    assert res16.coef.dtype == np.float64


def test_integer_inputs_are_widened():
    H = np.array([[3, 0, 1], [-3, 0, 2]])
    res = somp(H, np.eye(3, dtype=np.int32), 3)
    assert res.support.tolist() == [0, 2]


# ------------------------------------------------------------ Matching Pursuit


def test_mp_may_reselect_an_atom_and_coef_reconstructs():
    D = np.array([[1.0, 0.0], [np.cos(0.3), np.sin(0.3)]])
    H = np.array([[0.2, 1.0]])
    res = matching_pursuit(H, D, 6, center=False)
    assert len(set(res.support.tolist())) < res.n_selected  # an atom came back
    R = H - res.coef @ D[res.support]
    assert abs(np.linalg.norm(R) - res.residual_norm[-1]) <= 1e-12


def test_mp_one_step_equals_somp_one_step():
    rng = np.random.default_rng(2)
    H, D = rng.standard_normal((5, 7)), rng.standard_normal((9, 7))
    mp = matching_pursuit(H, D, 1)
    sp = somp(H, D, 1)
    assert_array_equal(mp.support, sp.support)
    assert_allclose(mp.coef, sp.coef, rtol=1e-12, atol=1e-14)


@given(gaussian_problems(max_n=30, max_d=12, max_v=10), st.integers(1, 8))
def test_correlations_centered_block_by_block_are_those_of_the_centered_samples(problem, block):
    H, D = problem
    mean = H.mean(axis=0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(batch_omp, "_SAMPLE_BLOCK", block)
        Ct, energy = batch_omp.centered_correlations(H, D, mean)
    centered = H - mean
    # The same products, summed over d; rounding ~d eps of |D| |H - mean|.
    scale = np.abs(D) @ np.abs(centered).T
    assert np.all(np.abs(Ct - D @ centered.T) <= 4 * H.shape[1] * EPS * scale)
    assert energy == pytest.approx(float(np.sum(centered * centered)), rel=1e-12, abs=1e-300)


#: The fast engine's factors against dense products of the same problem: rounding of a few
#: dozen products of standard normals, and of the Cholesky factor's growth (~cond eps).
FACTOR_ATOL = 1e-9


def _path(H, D, n_atoms, *, refit):
    return batch_omp.pursue(
        D @ H.T,
        lambda j: D @ D[j],
        np.einsum("ij,ij->i", D, D),
        float(np.sum(H * H)),
        n_atoms,
        order=1,
        normalize=True,
        tol=0.0,
        refit=refit,
    )


def test_somp_path_holds_the_cholesky_factor_and_the_samples_coordinates():
    rng = np.random.default_rng(4)
    H, D = rng.standard_normal((20, 10)), rng.standard_normal((15, 10))
    path = _path(H, D, 6, refit=True)
    assert isinstance(path, SompPath) and path.support.size == 6
    DS = D[path.support]
    L = path.atom_coords[:, path.support].T
    assert_allclose(np.triu(L, 1), 0.0, rtol=0, atol=FACTOR_ATOL)
    assert_allclose(L @ L.T, DS @ DS.T, rtol=0, atol=FACTOR_ATOL)
    Q = np.linalg.solve(L, DS).T  # the orthonormal directions q_i, (d, t)
    assert_allclose(Q.T @ Q, np.eye(6), rtol=0, atol=FACTOR_ATOL)
    assert_allclose(path.atom_coords, (D @ Q).T, rtol=0, atol=FACTOR_ATOL)
    assert_allclose(path.sample_coords, (H @ Q).T, rtol=0, atol=FACTOR_ATOL)
    assert_allclose(path.coef(), lstsq(DS.T, H.T)[0].T, rtol=0, atol=FACTOR_ATOL)


def test_mp_path_holds_each_steps_coefficients():
    rng = np.random.default_rng(5)
    H, D = rng.standard_normal((20, 10)), rng.standard_normal((15, 10))
    path = _path(H, D, 8, refit=False)
    assert isinstance(path, MpPath)
    assert path.coef().shape == (20, 8)
    R = H - path.coef() @ D[path.support]
    energy = float(np.sum(H * H))
    assert abs(float(np.sum(R * R)) - (energy - path.gains.sum())) <= FACTOR_ATOL * energy
    mp = matching_pursuit(H, D, 8, center=False)
    assert_array_equal(path.support, mp.support)
    assert_allclose(path.coef(), mp.coef, rtol=0, atol=FACTOR_ATOL)
