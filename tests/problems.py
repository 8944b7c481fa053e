"""Problem generators and comparisons shared by the pursuit tests."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from scipy.linalg import lstsq

EPS = np.finfo(np.float64).eps

#: Two atoms whose scores differ by less than this (relative) tie to rounding: DESIGN.md lets
#: the engines pick either. Scores are sums of n * d products, each rounded at ~eps, so a
#: real (non-tie) difference is many orders above it.
TIE_RTOL = 1e-9


@st.composite
def gaussian_problems(draw, max_n=12, max_d=16, max_v=24):
    """(H, D) with i.i.d. Gaussian entries; shapes drawn, values from a drawn seed."""
    n = draw(st.integers(1, max_n))
    d = draw(st.integers(2, max_d))
    v = draw(st.integers(1, max_v))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    H = rng.standard_normal((n, d)) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
    D = rng.standard_normal((v, d)) * rng.uniform(0.5, 2.0, size=(v, 1))
    return H, D


def scores_at(H, D, support, *, criterion="l1", normalize=True):
    """Literal SOMP scores of every atom after refitting ``H`` on ``D[support]``."""
    R = H
    if len(support):
        W = lstsq(D[support].T, H.T)[0].T
        R = H - W @ D[support]
    norms = np.linalg.norm(D, axis=1) if normalize else np.ones(D.shape[0])
    order = 1 if criterion == "l1" else 2
    return np.linalg.norm(R @ D.T, ord=order, axis=0) / norms


def assert_same_selection(support_a, support_b, H, D, **score_kw):
    """Supports agree up to the first step where the two picks tie to rounding.

    After a legitimate tie the pursuits follow different paths, so nothing later is
    compared. Returns the length of the common prefix.
    """
    common = min(len(support_a), len(support_b))
    for t in range(common):
        a, b = support_a[t], support_b[t]
        if a != b:
            scores = scores_at(H, D, list(support_a[:t]), **score_kw)
            gap = abs(scores[a] - scores[b])
            assert gap <= TIE_RTOL * max(scores[a], scores[b]), (
                f"step {t}: engines picked {a} and {b} with scores {scores[a]!r} and "
                f"{scores[b]!r} (relative gap {gap / max(scores[a], scores[b]):.3e} is no tie)"
            )
            return t
    return common
