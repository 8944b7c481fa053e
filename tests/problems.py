"""Problem generators and comparisons shared by the pursuit tests."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from scipy.linalg import lstsq

from somp_ref.decisions import tie_unit, window_scale

EPS = np.finfo(np.float64).eps

#: Where a score sits this close (a fraction of the tie window) to the window's edge, two
#: correct implementations may classify it differently by rounding. The engines share the
#: tie rule, so a different pick is legitimate only there.
EDGE_FRACTION = 1e-3


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
    """Literal SOMP scores of every atom after refitting ``H`` on ``D[support]``, and the
    tie window around the best of them (somp_ref.pursuit's rule)."""
    R = H
    if len(support):
        W = lstsq(D[support].T, H.T)[0].T
        R = H - W @ D[support]
    sq_norms = np.sum(D * D, axis=1)
    norms = np.sqrt(sq_norms) if normalize else np.ones(D.shape[0])
    order = 1 if criterion == "l1" else 2
    scores = np.linalg.norm(R @ D.T, ord=order, axis=0) / np.where(norms > 0, norms, 1.0)
    unit = tie_unit(float(np.sum(H * H)), H.shape[0], order)
    return scores, unit * window_scale(sq_norms, normalize)[int(np.argmax(scores))]


def assert_same_selection(support_a, support_b, H, D, **score_kw):
    """Supports agree up to the first step where a score sits on the tie window's edge.

    Both engines pick the lowest index within the tie window of the best score; they may
    differ only where rounding decides whether an atom is inside the window. After that
    the paths part, so nothing later is compared. Returns the length of the common prefix.
    """
    common = min(len(support_a), len(support_b))
    for t in range(common):
        a, b = support_a[t], support_b[t]
        if a != b:
            scores, window = scores_at(H, D, list(support_a[:t]), **score_kw)
            edge = max(scores[a], scores[b]) - window
            distance = min(abs(scores[a] - edge), abs(scores[b] - edge))
            assert distance <= EDGE_FRACTION * window, (
                f"step {t}: engines picked {a} and {b} with scores {scores[a]!r} and "
                f"{scores[b]!r}; neither is on the edge of the tie window ({window:.3e})"
            )
            return t
    return common
