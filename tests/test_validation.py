"""Every bad input raises an error that names the argument, what was expected, what came."""

from __future__ import annotations

import numpy as np
import pytest

from somp_ref import ll_head_score, logit_lens, matching_pursuit, somp

GOOD_H = np.ones((3, 4))
GOOD_D = np.eye(4)


@pytest.mark.parametrize("pursuit", [somp, matching_pursuit])
@pytest.mark.parametrize(
    ("H", "D", "kwargs", "error", "match"),
    [
        (np.ones(4), GOOD_D, {}, ValueError, r"H must be 2-D, got 1-D"),
        (GOOD_H, np.ones((2, 2, 4)), {}, ValueError, r"D must be 2-D, got 3-D"),
        (GOOD_H, np.eye(5), {}, ValueError, r"same number of columns.*H.shape=\(3, 4\)"),
        (np.ones((0, 4)), GOOD_D, {}, ValueError, r"H must not be empty, got shape \(0, 4\)"),
        (GOOD_H, np.ones((0, 4)), {}, ValueError, r"D must not be empty"),
        (np.full((3, 4), np.nan), GOOD_D, {}, ValueError, r"H must be finite, found 12 NaN/Inf"),
        (GOOD_H, np.diag([1.0, np.inf, 1, 1]), {}, ValueError, r"D must be finite, found 1"),
        (GOOD_H.astype(bool), GOOD_D, {}, TypeError, r"H must hold real numbers.*bool"),
        (GOOD_H.astype(complex), GOOD_D, {}, TypeError, r"H must hold real numbers.*complex"),
        (np.array([["a"] * 4] * 3), GOOD_D, {}, TypeError, r"H must hold real numbers.*<U1"),
        (GOOD_H, GOOD_D, {"n_atoms": 0}, ValueError, r"n_atoms must be >= 1, got 0"),
        (GOOD_H, GOOD_D, {"n_atoms": 2.5}, TypeError, r"n_atoms must be an integer.*2.5"),
        (GOOD_H, GOOD_D, {"n_atoms": True}, TypeError, r"n_atoms must be an integer"),
        (GOOD_H, GOOD_D, {"criterion": "l3"}, ValueError, r"criterion must be one of 'l1', 'l2'"),
        (GOOD_H, GOOD_D, {"engine": "gpu"}, ValueError, r"engine must be one of 'fast'"),
        (GOOD_H, GOOD_D, {"tol": 1.0}, ValueError, r"tol must be in \[0, 1\), got 1.0"),
        (GOOD_H, GOOD_D, {"tol": -0.1}, ValueError, r"tol must be in \[0, 1\)"),
        (GOOD_H, GOOD_D, {"tol": "x"}, TypeError, r"tol must be a number"),
        (GOOD_H, GOOD_D, {"tol": "0.5"}, TypeError, r"tol must be a number, got str"),
        (GOOD_H, GOOD_D, {"tol": True}, TypeError, r"tol must be a number, got bool"),
        (GOOD_H, GOOD_D, {"center": "no"}, TypeError, r"center must be True or False, got str"),
        (GOOD_H, GOOD_D, {"normalize": None}, TypeError, r"normalize must be True or False"),
        (GOOD_H, GOOD_D, {"center": np.ones(2)}, TypeError, r"center must be True or False"),
        (GOOD_H, GOOD_D, {"criterion": np.ones(2)}, ValueError, r"criterion must be one of"),
    ],
)
def test_bad_pursuit_inputs_raise(pursuit, H, D, kwargs, error, match):
    with pytest.raises(error, match=match):
        pursuit(H, D, **kwargs)


def test_bad_lens_inputs_raise():
    with pytest.raises(ValueError, match=r"X and D must have the same number of columns"):
        logit_lens(np.ones((2, 3)), np.eye(4))
    with pytest.raises(ValueError, match=r"top must be >= 1, got 0"):
        logit_lens(np.ones((2, 4)), np.eye(4), top=0)
    with pytest.raises(ValueError, match=r"H must be finite"):
        ll_head_score(np.full((2, 4), np.inf), np.eye(4))


def test_bad_lens_options_raise():
    for softcap, error in ((np.inf, ValueError), (0.0, ValueError), ("30", TypeError)):
        with pytest.raises(error, match="softcap must be a"):
            logit_lens(np.ones((2, 4)), np.eye(4), softcap=softcap)


def test_a_mean_logit_beyond_float64_is_an_error():
    H, D = np.ones((2, 4)) * 1e300, np.eye(4) * 1e300
    with pytest.raises(ValueError, match="overflows float64"):
        ll_head_score(H, D)
    # Each factor alone is fine, and the means are computed without overflowing.
    assert ll_head_score(H, np.eye(4)) == pytest.approx(1e300)  # (1/4, ...) . (1e300, ...)


def test_matching_pursuit_with_a_huge_step_budget_stops_by_itself():
    # n_atoms is not capped for MP (atoms may repeat); its buffers must grow with the steps
    # taken, not be allocated for the budget (10**8 steps: 15 GiB).
    rng = np.random.default_rng(0)
    res = matching_pursuit(rng.standard_normal((2, 5)), rng.standard_normal((7, 5)), 10**8)
    assert res.stop_reason in ("converged", "exhausted")
    assert res.explained_variance[-1] > 1 - 1e-9
