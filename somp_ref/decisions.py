"""Every rule that turns a pursuit's numbers into a discrete decision.

Which atom is taken, whether an atom is dependent on the support, whether the pursuit
stops: each compares a computed number with a threshold. The thresholds here sit orders of
magnitude above the rounding of any BLAS kernel (a dot product of length d is exact to
~d * eps of the magnitudes it sums, whatever its blocking, vector width or FMA use), so a
decision never depends on the CPU it runs on, and every engine (numpy's fast and naive
engines, the torch port, any port checked by ``somp-ref verify``) applies the same rules.
Inputs are first rescaled by powers of two (:func:`binary_exponent`), which is exact, so
no threshold depends on the data's units.
"""

from __future__ import annotations

import numpy as np

#: Relative residual energy below which a signal counts as zero to rounding (docs/ARCHITECTURE.md).
#: Centering ``n`` equal samples leaves ~eps * |mean| per entry, an energy ~1e-32 of the
#: raw one; ``somp`` treats a centered signal whose energy is at most ZERO_RESIDUAL times
#: the raw energy as zero (empty support, "converged") instead of pursuing rounding noise.
ZERO_RESIDUAL = 1e-24

#: An atom whose energy gain is at most GAIN_FLOOR * ||H||^2 is not taken ("converged").
#: Once the residual is zero to rounding, its correlations are noise of at most
#: ~d * eps * ||D_j|| ||H|| (the fast engine derives them from ``D H^T`` by subtraction) and
#: the gain of an admissible atom (squared orthogonal part >= DEPENDENT_TOL of its own) is
#: at most (d * eps)^2 / DEPENDENT_TOL ~ 1e-18 of ||H||^2 for d = 8192: 1e-12 is far above
#: that worst case, and a real atom adding less than 1e-12 of the variance is below
#: anything explained variance reports.
GAIN_FLOOR = 1e-12

#: An atom whose component orthogonal to the support has squared norm <= DEPENDENT_TOL
#: times its own (an angle under 0.06 degrees to the support's span) is treated as
#: linearly dependent and never selected. Its gain and coefficients would be computed
#: through a division by that squared norm, amplifying rounding by up to 1 / DEPENDENT_TOL:
#: at 1e-6 the explained variance stays exact to ~1e-10 (the contract's 1e-9), where a
#: smaller threshold would let two kernels report gains that differ in the eighth digit.
#: Both engines compute the component by cancellation with error ~ t * eps ~ 1e-14, eight
#: orders below the threshold, so every kernel classifies atoms alike. Real unembedding
#: rows are never that close to the span of 50 others in d_model dimensions; exact
#: duplicates (tokens with identical rows) are excluded as they must be.
DEPENDENT_TOL = 1e-6

#: Scores within the tie window of the best score are a tie, and a tie goes to the lowest
#: index (the documented rule; docs/ARCHITECTURE.md). The window is TIE_RTOL times a bound
#: on the best atom's score and on the rounding of every score compared with it:
#: ``tie_unit`` (||H||_F, times sqrt(n) for "l1") times ``window_scale`` (the best atom's
#: norm when scores are not normalised, else 1). A score's rounding error is at most ~(d +
#: t) * eps of that bound, ~1e-12 for d = 4096, t = 50: a window 1e3 times wider makes the
#: choice the rule's, not the last bit's, while scores a billionth of the bound apart are
#: told apart.
TIE_RTOL = 1e-9

#: Inputs whose largest magnitude is outside 2**-SAFE_EXPONENT .. 2**SAFE_EXPONENT are
#: rescaled by a power of two before pursuing (exact, undone on the outputs): the scores
#: square products of H and D entries, which would overflow float64 (max ~2**1024) or
#: lose every digit to underflow for data scaled by ~1e150 or ~1e-150. Inside the range
#: nothing is copied and the arithmetic is bit for bit that of the unscaled problem.
SAFE_EXPONENT = 100


def binary_exponent(values: np.ndarray, axis: int | None = None) -> np.ndarray:
    """Exponent e of ``max|values|`` (``2**(e-1) <= max < 2**e``), 0 inside the safe range."""
    # max(max, -min), not max(abs): no temporary copy of a head's samples.
    largest = np.maximum(np.max(values, axis=axis), -np.min(values, axis=axis))
    exponent = np.frexp(largest)[1]
    return np.where(np.abs(exponent) > SAFE_EXPONENT, exponent, 0)


def signal_energy(centered: float, raw: float) -> float:
    """The centered energy, or 0.0 when it is zero to rounding (see ZERO_RESIDUAL)."""
    return 0.0 if centered <= ZERO_RESIDUAL * raw else centered


def score_scale(
    sq_norms: np.ndarray, normalize: bool, atom_exp: np.ndarray | None = None
) -> np.ndarray:
    """Divisor of each atom's score, shape (v,).

    Normalised: the atom's norm (1 for zero atoms, which are never scored). Otherwise 1,
    or ``2**-atom_exp[j]`` when atom j was rescaled by that power of two (so that the score
    is that of the atom as given).
    """
    if normalize:
        return np.sqrt(np.where(sq_norms > 0.0, sq_norms, 1.0))
    if atom_exp is None:
        return np.ones_like(sq_norms)
    return np.ldexp(1.0, -atom_exp)


def tie_unit(energy: float, n_samples: int, order: int) -> float:
    """``TIE_RTOL`` times the largest possible score of a unit atom.

    A score is ``||D_j R^T||_p / s_j`` with ``||R||_F <= ||H||_F``; by Cauchy-Schwarz a
    unit atom's is at most ``||H||_F`` (l2) or ``sqrt(n) ||H||_F`` (l1), and the rounding of
    the correlations scales with the same product.
    """
    return TIE_RTOL * float(np.sqrt(energy)) * (float(np.sqrt(n_samples)) if order == 1 else 1.0)


def window_scale(
    sq_norms: np.ndarray, normalize: bool, atom_exp: np.ndarray | None = None
) -> np.ndarray:
    """Per-atom factor of the tie window, shape (v,): 1 for normalised scores, else the
    norm of the atom as given (an unnormalised score, and its rounding, grow with it)."""
    if normalize:
        return np.ones_like(sq_norms)
    norms = np.sqrt(sq_norms)
    return norms if atom_exp is None else np.ldexp(norms, atom_exp)


def first_within_window(scores: np.ndarray, unit: float, window_scale: np.ndarray) -> int:
    """Lowest index whose score is within the tie window of the best (-1 if all are -inf).

    This is the tie rule of every engine: the window is ``unit * window_scale[best]``.
    """
    j = int(np.argmax(scores))
    if scores[j] == -np.inf:
        return -1
    return int(np.flatnonzero(scores >= scores[j] - unit * window_scale[j])[0])
