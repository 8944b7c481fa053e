"""The Logit Lens as the one-sample, one-step case of the pursuit."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from numpy.testing import assert_allclose, assert_array_equal

from somp_ref import ll_head_score, logit_lens, matching_pursuit, somp

finite = st.floats(-10, 10, allow_nan=False, allow_infinity=False)


@st.composite
def sample_and_dictionary(draw):
    d = draw(st.integers(2, 8))
    v = draw(st.integers(1, 12))
    x = draw(arrays(np.float64, (d,), elements=finite))
    D = draw(arrays(np.float64, (v, d), elements=finite))
    return x, D


@given(sample_and_dictionary())
def test_one_step_mp_on_one_sample_is_the_logit_lens(case):
    x, D = case
    logits = D @ x
    mp = matching_pursuit(x[None], D, 1, center=False, normalize=False)
    if mp.n_selected == 0:
        # Nothing to select only when no atom correlates with x (beyond float64 resolution).
        assert np.max(np.abs(logits)) ** 2 <= 1e-15 * max(x @ x, 1e-300) * max(
            np.max(np.sum(D * D, axis=1)), 1e-300
        )
        return
    j = mp.support[0]
    # MP picks the largest |logit| (lowest index on ties) ...
    assert_array_equal(j, np.argmax(np.abs(logits)))
    # ... with the coefficient logit / ||D_j||^2 ...
    assert_allclose(mp.coef[0, 0], logits[j] / (D[j] @ D[j]), rtol=1e-12, atol=0)
    # ... which is the lens's top-1 whenever the top logit is also the largest in magnitude.
    lens = logit_lens(x[None], D, top=1)
    if logits.max() > -logits.min():
        assert lens.indices[0, 0] == j
        assert lens.logits[0, 0] == logits[j]


@given(st.integers(0, 2**32 - 1), st.integers(1, 5))
def test_lens_ranks_by_logit_with_stable_ties(seed, top):
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((6, 4))
    D = np.vstack([D, D[:2]])  # rows 6, 7 tie with rows 0, 1
    X = rng.standard_normal((3, 4))
    res = logit_lens(X, D, top=top)
    logits = X @ D.T
    for i in range(3):
        expected = sorted(range(8), key=lambda j: (-logits[i, j], j))[:top]
        assert res.indices[i].tolist() == expected
    assert_array_equal(res.logits, np.take_along_axis(logits, res.indices, axis=1))


def test_lens_top_is_capped_by_dictionary_size():
    res = logit_lens(np.ones((2, 3)), np.eye(3), top=10)
    assert res.indices.shape == (2, 3)


@given(st.integers(0, 2**32 - 1), st.integers(1, 9))
def test_ll_head_score_is_mean_one_step_somp_per_sample(seed, n):
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((7, 5)) * rng.uniform(0.1, 3, size=(7, 1))
    H = rng.standard_normal((n, 5))
    per_sample = [
        somp(h[None], D, 1, center=False, criterion="l2").explained_variance[-1] for h in H
    ]
    # Both are float64 ratios of the same products: rounding only.
    assert abs(ll_head_score(H, D) - np.mean(per_sample)) <= 1e-12


def test_ll_head_score_counts_zero_samples_as_zero():
    D = np.eye(3)
    H = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert ll_head_score(H, D) == 0.5


def test_softcap_changes_values_not_ranking():
    rng = np.random.default_rng(4)
    X, D = rng.standard_normal((3, 5)) * 10, rng.standard_normal((9, 5))
    plain = logit_lens(X, D, top=9)
    capped = logit_lens(X, D, top=9, softcap=5.0)
    assert_array_equal(capped.indices, plain.indices)
    assert_allclose(capped.logits, 5.0 * np.tanh(plain.logits / 5.0), rtol=1e-15, atol=0)
    assert np.all(np.abs(capped.logits) < 5.0)
