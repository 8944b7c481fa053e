"""Greedy sparse pursuits over a dictionary of atoms: SOMP and Matching Pursuit.

Layout (after scikit-learn's ``_omp.py``): private kernels that trust their inputs, one
validated public function per algorithm, one result dataclass.

* ``_pursue`` is the fast kernel shared by both algorithms. It works on the correlations
  ``C = H D^T`` and rows of the Gram matrix ``G = D D^T`` only, so a caller that has ``C``
  in factored form (a head's ``Z E^T``) never builds ``H``.
* ``_somp_naive`` and ``_mp_naive`` are literal transcriptions of the paper's steps, kept
  as the auditing oracle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy.linalg import lstsq, solve_triangular

from somp_ref.validation import (
    as_matrix,
    check_choice,
    check_positive_int,
    check_same_width,
    check_tolerance,
)

EPS = float(np.finfo(np.float64).eps)

# Every discrete decision of a pursuit (which atom, whether it is dependent, whether to stop)
# compares a computed number with a threshold. The thresholds below sit orders of magnitude
# above the rounding of any BLAS kernel (a dot product of length d is exact to ~d * eps of
# the magnitudes it sums, whatever its blocking, vector width or FMA use), so a decision
# never depends on the CPU it runs on. Inputs are first rescaled by powers of two
# (``_binary_exponents``), which is exact, so no threshold depends on the data's units.

#: Relative residual energy below which a signal counts as zero to rounding (DESIGN.md).
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
#: index (the documented rule; DESIGN.md). The window is TIE_RTOL times a bound on the best
#: atom's score and on the rounding of every score compared with it: ``_tie_unit`` (||H||_F,
#: times sqrt(n) for "l1") times ``_window_scale`` (the best atom's norm when scores are
#: not normalised, else 1). A score's rounding error is at most ~(d + t) * eps of that
#: bound, ~1e-12 for d = 4096, t = 50: a window 1e3 times wider makes the choice the rule's,
#: not the last bit's, while scores a billionth of the bound apart are told apart.
TIE_RTOL = 1e-9

#: Relative slack added to the score upper bounds of the fast engine so that rounding in
#: the bound update can never make a bound fall below the score it covers.
_BOUND_SLACK = 64 * EPS

#: Stale candidates scored exactly per round of the fast engine's lazy argmax.
_SCORE_BATCH = 32

#: Samples centered and correlated per block by the fast engine's set-up.
_SAMPLE_BLOCK = 512

_NORM_ORDER = {"l1": 1, "l2": 2}
STOP_REASONS = ("n_atoms", "tol", "converged", "exhausted")


@dataclass(frozen=True)
class SompResult:
    """Outcome of a pursuit of ``H`` (n_samples, d_model) over ``D`` (n_atoms_total, d_model).

    Attributes
    ----------
    support : ndarray of shape (t,), int64
        Indices into the rows of ``D`` in selection order. Matching Pursuit may repeat an
        index (it can select an atom again); SOMP never does.
    coef : ndarray of shape (n_samples, t), float64
        ``H_centered ≈ coef @ D[support]``.
    explained_variance : ndarray of shape (t + 1,), float64
        ``1 - ||R_s||_F^2 / ||H_centered||_F^2`` after s = 0..t atoms; ``[0] == 0``.
    residual_norm : ndarray of shape (t + 1,), float64
        ``||R_s||_F`` after s = 0..t atoms; ``[0] == ||H_centered||_F``.
    stop_reason : str
        ``"n_atoms"`` (asked number reached), ``"tol"`` (relative residual energy at most
        ``tol``), ``"converged"`` (residual zero to rounding, or no atom left can reduce
        it by more than float64 resolves) or ``"exhausted"`` (every atom is used, zero, or
        linearly dependent on the support). Fewer atoms than asked is a normal outcome.
    mean : ndarray of shape (d_model,), float64
        The per-feature mean subtracted from ``H`` (zeros when ``center=False``).
    """

    support: np.ndarray
    coef: np.ndarray
    explained_variance: np.ndarray
    residual_norm: np.ndarray
    stop_reason: str
    mean: np.ndarray

    @property
    def n_selected(self) -> int:
        """Number of pursuit steps taken (``len(support)``)."""
        return int(self.support.shape[0])


# --------------------------------------------------------------------------- kernels


def _score_scale(
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


def _tie_unit(energy: float, n_samples: int, order: int) -> float:
    """``TIE_RTOL`` times the largest possible score of a unit atom.

    A score is ``||D_j R^T||_p / s_j`` with ``||R||_F <= ||H||_F``; by Cauchy-Schwarz a
    unit atom's is at most ``||H||_F`` (l2) or ``sqrt(n) ||H||_F`` (l1), and the rounding of
    the correlations scales with the same product.
    """
    return TIE_RTOL * float(np.sqrt(energy)) * (float(np.sqrt(n_samples)) if order == 1 else 1.0)


def _window_scale(
    sq_norms: np.ndarray, normalize: bool, atom_exp: np.ndarray | None = None
) -> np.ndarray:
    """Per-atom factor of the tie window, shape (v,): 1 for normalised scores, else the
    norm of the atom as given (an unnormalised score, and its rounding, grow with it)."""
    if normalize:
        return np.ones_like(sq_norms)
    norms = np.sqrt(sq_norms)
    return norms if atom_exp is None else np.ldexp(norms, atom_exp)


def _first_within_window(scores: np.ndarray, unit: float, window_scale: np.ndarray) -> int:
    """Lowest index whose score is within the tie window of the best (-1 if all are -inf).

    This is the tie rule of every engine: the window is ``unit * window_scale[best]``.
    """
    j = int(np.argmax(scores))
    if scores[j] == -np.inf:
        return -1
    return int(np.flatnonzero(scores >= scores[j] - unit * window_scale[j])[0])


class PursuitPath(NamedTuple):
    """What the fast kernel returns.

    Attributes
    ----------
    support : ndarray of shape (t,), int64
        Chosen atoms in order.
    At : ndarray of shape (t, n)
        With refit, ``At[i] = (H q_i)^T`` for the orthonormal directions ``q_i`` of the
        support; without refit, the MP coefficients of step i.
    U : ndarray of shape (t, v)
        With refit, ``U[i] = q_i^T D^T`` (``U[:, support]^T`` is the lower Cholesky factor
        of the support's Gram matrix); without refit, the Gram row of the atom of step i.
    gains : ndarray of shape (t,)
        Residual energy removed by each step.
    stop_reason : str
    """

    support: np.ndarray
    At: np.ndarray
    U: np.ndarray
    gains: np.ndarray
    stop_reason: str


def _pursue(
    Ct: np.ndarray,
    gram_row: Callable[[int], np.ndarray],
    sq_norms: np.ndarray,
    energy: float,
    n_atoms: int,
    *,
    order: int,
    normalize: bool,
    tol: float,
    refit: bool,
    atom_exp: np.ndarray | None = None,
) -> PursuitPath:
    """Fast pursuit from correlations (Batch-OMP style), SOMP when ``refit`` else MP.

    Parameters
    ----------
    Ct : ndarray of shape (v, n)
        Correlations ``D H^T`` of every atom with the (centered) samples, one atom a row.
        Overwritten: rows become residual correlations as they are brought up to date.
    gram_row : callable
        ``gram_row(j)`` returns row j of ``D D^T``, shape (v,).
    sq_norms : ndarray of shape (v,)
        Squared atom norms, the diagonal of ``D D^T``.
    energy : float
        ``||H||_F^2`` (0 when the signal is zero to rounding: nothing is selected).
    atom_exp : ndarray of shape (v,), optional
        Atom j is the given atom times ``2**-atom_exp[j]`` (see ``_prepare``).

    Returns
    -------
    PursuitPath

    Notes
    -----
    Atom j's residual correlations after step t are ``Ct[j] - U[:t, j] @ At[:t]``. They
    are brought up to date lazily, row by row, only for the atoms the argmax must score
    (``_Scorer``): each atom keeps an upper bound on its score (the triangle inequality
    gives ``score_t+1 <= score_t + |U[t, j]| ||At[t]||_p``), and only atoms whose bound
    could reach the best exact score (or its tie window) are scored, so a step rarely
    touches all v x n correlations.
    """
    v, n = Ct.shape
    unit = _tie_unit(energy, n, order)
    scorer = _Scorer(Ct, n_atoms, sq_norms, order=order, normalize=normalize, atom_exp=atom_exp)
    rho2 = sq_norms.copy()
    support: list[int] = []
    gains: list[float] = []
    remaining = energy
    reason = "n_atoms" if energy > 0.0 else "converged"
    while len(support) < n_atoms and energy > 0.0:
        t = len(support)
        if tol > 0.0 and remaining <= tol * energy:
            reason = "tol"
            break
        if refit:
            scorer.blocked |= rho2 <= DEPENDENT_TOL * sq_norms
        j = scorer.best_atom(unit)
        if j < 0:
            reason = "exhausted"
            break
        r = scorer.Ct[j]
        gain = float(r @ r) / (rho2[j] if refit else sq_norms[j])
        if gain <= GAIN_FLOOR * energy:
            reason = "converged"
            break
        if refit:
            rho = np.sqrt(rho2[j])
            a = r / rho
            u = (gram_row(j) - scorer.U[:t, j] @ scorer.U[:t]) / rho
            rho2 -= u * u
            rho2[j] = 0.0
        else:
            a = r / sq_norms[j]
            u = gram_row(j)
        scorer.add_step(a, u)
        support.append(j)
        gains.append(gain)
        remaining = max(remaining - gain, 0.0)
    t = len(support)
    return PursuitPath(
        np.asarray(support, dtype=np.int64), scorer.At[:t], scorer.U[:t], np.asarray(gains), reason
    )


class _Scorer:
    """Exact argmax of the pursuit scores with lazily updated residual correlations.

    ``Ct[j]`` holds atom j's residual correlations after ``stamp[j]`` steps; ``bound[j]``
    is an upper bound on its current score, exact where ``fresh[j]``.
    """

    def __init__(
        self,
        Ct: np.ndarray,
        n_atoms: int,
        sq_norms: np.ndarray,
        *,
        order: int,
        normalize: bool,
        atom_exp: np.ndarray | None,
    ):
        v, n = Ct.shape
        self.Ct = Ct
        self.order = order
        self.scale = _score_scale(sq_norms, normalize, atom_exp)
        self.window_scale = _window_scale(sq_norms, normalize, atom_exp)
        self.blocked = sq_norms <= 0.0
        self.bound = np.linalg.norm(Ct, ord=order, axis=1) / self.scale
        self.fresh = np.ones(v, dtype=bool)
        self.stamp = np.zeros(v, dtype=np.int64)
        self.At = np.empty((n_atoms, n))
        self.U = np.empty((n_atoms, v))
        self.steps = 0
        self._rows = np.empty((min(_SCORE_BATCH, v), n))
        self._work = np.empty_like(self._rows)

    def add_step(self, a: np.ndarray, u: np.ndarray) -> None:
        """Record step ``R <- R - a q^T`` (``u = q^T D^T``) and loosen the bounds."""
        t = self.steps
        self.At[t] = a
        self.U[t] = u
        self.bound += np.abs(u) * (np.linalg.norm(a, ord=self.order) / self.scale)
        self.bound *= 1.0 + _BOUND_SLACK
        self.fresh[:] = False
        self.steps += 1

    def _refresh(self, atoms: np.ndarray) -> None:
        """Bring ``Ct[atoms]`` (at most ``_SCORE_BATCH``) up to date and score them exactly.

        Works in two preallocated buffers: fresh (B, n) temporaries would be new mmap'd
        pages each call, and those page faults cost more than the arithmetic.
        """
        t, stamps, size = self.steps, self.stamp[atoms], atoms.shape[0]
        rows, work = self._rows[:size], self._work[:size]
        np.take(self.Ct, atoms, axis=0, out=rows)
        first = int(stamps.min())
        if first < t:
            coeff = self.U[first:t, atoms]
            coeff = np.where(np.arange(first, t)[:, None] >= stamps, coeff, 0.0)
            np.matmul(coeff.T, self.At[first:t], out=work)
            np.subtract(rows, work, out=rows)
            self.Ct[atoms] = rows
        self.stamp[atoms] = t
        if self.order == 1:
            scores = np.abs(rows, out=work).sum(axis=1)
        else:
            scores = np.sqrt(np.einsum("ij,ij->i", rows, rows))
        self.bound[atoms] = scores / self.scale[atoms]
        self.fresh[atoms] = True

    def best_atom(self, unit: float) -> int:
        """The tie rule's choice among unblocked atoms, or -1 when none is left.

        The lowest index whose exact score is within the tie window (``unit`` times the
        best atom's window scale) of the largest. On return ``Ct`` of that atom is up to
        date.
        """
        masked = np.where(self.blocked, -np.inf, self.bound)
        size = masked.shape[0]
        while True:  # the exact maximum
            j = int(np.argmax(masked))
            if masked[j] == -np.inf:
                return -1
            if self.fresh[j]:
                # Every other bound is <= masked[j] and bounds cover scores: exact maximum.
                break
            stale = np.where(self.fresh, -np.inf, masked)
            k = min(_SCORE_BATCH, size)
            picked = np.argpartition(stale, size - k)[size - k :]
            picked = picked[stale[picked] > -np.inf]
            self._refresh(picked)
            masked[picked] = self.bound[picked]
        threshold = masked[j] - unit * self.window_scale[j]
        while True:  # lower indices that may be inside the tie window
            lower = np.flatnonzero(masked[:j] >= threshold)
            stale = lower[~self.fresh[lower]]
            if stale.size == 0:
                return int(lower[0]) if lower.size else j
            picked = stale[:_SCORE_BATCH]
            self._refresh(picked)
            masked[picked] = self.bound[picked]


def _orthogonal_sq_norms(D: np.ndarray, support: list[int]) -> np.ndarray:
    """Squared norm of each atom's component orthogonal to ``D[support]``, shape (v,)."""
    if not support:
        return np.einsum("ij,ij->i", D, D)
    Q = np.linalg.qr(D[support].T)[0]  # (d, t): the support is independent by construction
    orthogonal = D - (D @ Q) @ Q.T
    return np.einsum("ij,ij->i", orthogonal, orthogonal)


def _somp_naive(
    H: np.ndarray,
    D: np.ndarray,
    n_atoms: int,
    *,
    order: int,
    normalize: bool,
    tol: float,
    atom_exp: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """SOMP exactly as written in the paper: score, select, least-squares refit, repeat.

    Returns ``support``, ``coef`` (n, t), the residual energies (t + 1,) and the reason.
    """
    sq_norms = np.einsum("ij,ij->i", D, D)
    scale = _score_scale(sq_norms, normalize, atom_exp)
    energy = float(np.sum(H * H))
    unit = _tie_unit(energy, H.shape[0], order)
    window_scale = _window_scale(sq_norms, normalize, atom_exp)
    energies = [energy]
    support: list[int] = []
    coef = np.zeros((H.shape[0], 0))
    R = H
    reason = "n_atoms" if energy > 0.0 else "converged"
    while len(support) < n_atoms and energy > 0.0:
        remaining = energies[-1]
        if tol > 0.0 and remaining <= tol * energy:
            reason = "tol"
            break
        # Atoms already chosen, zero, or linearly dependent on the support are excluded.
        rho2 = _orthogonal_sq_norms(D, support)
        usable = (sq_norms > 0.0) & (rho2 > DEPENDENT_TOL * sq_norms)
        correlations = R @ D.T
        scores = np.linalg.norm(correlations, ord=order, axis=0) / scale
        j = _first_within_window(np.where(usable, scores, -np.inf), unit, window_scale)
        if j < 0:
            reason = "exhausted"
            break
        gain = float(correlations[:, j] @ correlations[:, j]) / rho2[j]
        if remaining <= ZERO_RESIDUAL * energy or gain <= GAIN_FLOOR * energy:
            reason = "converged"
            break
        support.append(j)
        coef = lstsq(D[support].T, H.T)[0].T
        R = H - coef @ D[support]
        energies.append(float(np.sum(R * R)))
    return np.asarray(support, dtype=np.int64), coef, np.asarray(energies), reason


def _mp_naive(
    H: np.ndarray,
    D: np.ndarray,
    n_atoms: int,
    *,
    order: int,
    normalize: bool,
    tol: float,
    atom_exp: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Matching Pursuit as written: score, select, deflate by that atom alone, repeat."""
    sq_norms = np.einsum("ij,ij->i", D, D)
    scale = _score_scale(sq_norms, normalize, atom_exp)
    unusable = sq_norms <= 0.0
    energy = float(np.sum(H * H))
    unit = _tie_unit(energy, H.shape[0], order)
    window_scale = _window_scale(sq_norms, normalize, atom_exp)
    energies = [energy]
    support: list[int] = []
    columns: list[np.ndarray] = []
    R = H.copy()
    reason = "n_atoms" if energy > 0.0 else "converged"
    while len(support) < n_atoms and energy > 0.0:
        remaining = energies[-1]
        if tol > 0.0 and remaining <= tol * energy:
            reason = "tol"
            break
        correlations = R @ D.T
        scores = np.linalg.norm(correlations, ord=order, axis=0) / scale
        j = _first_within_window(np.where(unusable, -np.inf, scores), unit, window_scale)
        if j < 0:
            reason = "exhausted"
            break
        c = correlations[:, j] / sq_norms[j]
        gain = float(c @ c) * sq_norms[j]
        if remaining <= ZERO_RESIDUAL * energy or gain <= GAIN_FLOOR * energy:
            reason = "converged"
            break
        R -= np.outer(c, D[j])
        support.append(j)
        columns.append(c)
        energies.append(float(np.sum(R * R)))
    coef = np.column_stack(columns) if columns else np.zeros((H.shape[0], 0))
    return np.asarray(support, dtype=np.int64), coef, np.asarray(energies), reason


# ------------------------------------------------------------------------ public API


#: Inputs whose largest magnitude is outside 2**-SAFE_EXPONENT .. 2**SAFE_EXPONENT are
#: rescaled by a power of two before pursuing (exact, undone on the outputs): the scores
#: square products of H and D entries, which would overflow float64 (max ~2**1024) or
#: lose every digit to underflow for data scaled by ~1e150 or ~1e-150. Inside the range
#: nothing is copied and the arithmetic is bit for bit that of the unscaled problem.
SAFE_EXPONENT = 100


@dataclass(frozen=True)
class _Problem:
    """Validated, float64 inputs, rescaled into the safe range.

    ``H == H_in * 2**-h_exp`` and ``D[j] == D_in[j] * 2**-d_exp[j]`` exactly.
    """

    H: np.ndarray  # (n, d)
    D: np.ndarray  # (v, d)
    mean: np.ndarray  # (d,) of the rescaled H, zeros without centering
    h_exp: int
    d_exp: np.ndarray  # (v,) int
    n_atoms: int
    order: int
    tol: float


def _binary_exponent(values: np.ndarray, axis: int | None = None) -> np.ndarray:
    """Exponent e of ``max|values|`` (``2**(e-1) <= max < 2**e``), 0 inside the safe range."""
    exponent = np.frexp(np.max(np.abs(values), axis=axis))[1]
    return np.where(np.abs(exponent) > SAFE_EXPONENT, exponent, 0)


def _prepare(H, D, n_atoms, center, normalize, criterion, tol, engine) -> _Problem:
    """Validate the shared arguments and rescale the inputs (see SAFE_EXPONENT)."""
    H = as_matrix(H, "H")
    D = as_matrix(D, "D")
    check_same_width(H, D, ("H", "D"))
    n_atoms = check_positive_int(n_atoms, "n_atoms")
    order = _NORM_ORDER[check_choice(criterion, "criterion", _NORM_ORDER)]
    tol = check_tolerance(tol)
    check_choice(engine, "engine", ("fast", "naive"))
    h_exp = int(_binary_exponent(H))
    if h_exp:
        H = np.ldexp(H, -h_exp)
    # Atoms are rescaled one by one; unnormalised scores put the factor back
    # (_score_scale), so that atoms of very different norms are compared as given.
    d_exp = _binary_exponent(D, axis=1)
    if d_exp.any():
        D = np.ldexp(D, -d_exp[:, None])
    mean = H.mean(axis=0) if center else np.zeros(H.shape[1])
    return _Problem(H, D, mean, h_exp, d_exp, n_atoms, order, tol)


def _signal_energy(centered: float, raw: float) -> float:
    """The centered energy, or 0.0 when it is zero to rounding (see ZERO_RESIDUAL)."""
    return 0.0 if centered <= ZERO_RESIDUAL * raw else centered


def pursuit_result(
    support: np.ndarray,
    coef: np.ndarray,
    energies: np.ndarray,
    reason: str,
    mean: np.ndarray,
    *,
    energy_exponent: int = 0,
) -> SompResult:
    """Build a :class:`SompResult` from an engine's output.

    ``energies`` (t + 1,) are the residual energies after 0..t steps, in units of
    ``4**energy_exponent`` (so that rescaled problems report unscaled norms without
    squaring huge numbers).
    """
    energies = np.maximum(np.asarray(energies, dtype=np.float64), 0.0)
    explained = np.zeros_like(energies)
    if energies[0] > 0.0:
        explained[1:] = 1.0 - energies[1:] / energies[0]
    return SompResult(
        support=support,
        coef=coef,
        explained_variance=explained,
        residual_norm=np.ldexp(np.sqrt(energies), energy_exponent),
        stop_reason=reason,
        mean=mean,
    )


def _result(problem: _Problem, support, coef, energies, reason) -> SompResult:
    """Package an engine's output, undoing the rescaling of the inputs."""
    coef = np.ldexp(coef, problem.h_exp - problem.d_exp[support])
    if not np.isfinite(coef).all():
        raise ValueError(
            f"the coefficients overflow float64: H is about 2**{problem.h_exp} and the "
            f"chosen atoms about 2**{int(problem.d_exp.min())}; rescale H or D"
        )
    mean = np.ldexp(problem.mean, problem.h_exp)
    return pursuit_result(support, coef, energies, reason, mean, energy_exponent=problem.h_exp)


def _centered_correlations(
    H: np.ndarray, D: np.ndarray, mean: np.ndarray
) -> tuple[np.ndarray, float]:
    """``D (H - mean)^T`` of shape (v, n) and ``||H - mean||_F^2``, centering block by block.

    Centering per block of samples keeps the extra memory at one block instead of a
    centered copy of ``H`` (which for n x d_model = 2000 x 4096 costs as much time as the
    product itself, in page faults).
    """
    n = H.shape[0]
    Ct = np.empty((D.shape[0], n))
    energy = 0.0
    for start in range(0, n, _SAMPLE_BLOCK):
        block = H[start : start + _SAMPLE_BLOCK] - mean
        Ct[:, start : start + _SAMPLE_BLOCK] = D @ block.T
        energy += float(np.einsum("ij,ij->", block, block))
    return Ct, energy


def _run_fast(problem: _Problem, n_atoms: int, *, normalize: bool, refit: bool) -> SompResult:
    H, D, mean = problem.H, problem.D, problem.mean
    Ct, energy = _centered_correlations(H, D, mean)
    if mean.any():
        energy = _signal_energy(energy, float(np.einsum("ij,ij->", H, H)))
    sq_norms = np.einsum("ij,ij->i", D, D)
    path = _pursue(
        Ct,
        lambda j: D @ D[j],
        sq_norms,
        energy,
        n_atoms,
        order=problem.order,
        normalize=normalize,
        tol=problem.tol,
        refit=refit,
        atom_exp=problem.d_exp,
    )
    coef = solve_factored_coef(path.At, path.U, path.support) if refit else path.At.T
    energies = energy - np.concatenate([[0.0], np.cumsum(path.gains)])
    return _result(problem, path.support, coef, energies, path.stop_reason)


def _run_naive(problem: _Problem, n_atoms: int, *, normalize: bool, refit: bool) -> SompResult:
    Hc = problem.H - problem.mean
    if problem.mean.any():
        raw = float(np.einsum("ij,ij->", problem.H, problem.H))
        if _signal_energy(float(np.einsum("ij,ij->", Hc, Hc)), raw) == 0.0:
            Hc = np.zeros_like(Hc)
    engine = _somp_naive if refit else _mp_naive
    options = {"order": problem.order, "normalize": normalize, "tol": problem.tol}
    out = engine(Hc, problem.D, n_atoms, atom_exp=problem.d_exp, **options)
    return _result(problem, *out)


def solve_factored_coef(At: np.ndarray, U: np.ndarray, support: np.ndarray) -> np.ndarray:
    """Least-squares coefficients from the fast kernel's factors.

    Parameters
    ----------
    At : ndarray of shape (t, n)
        ``(H q_i)^T`` for the orthonormal directions q_i of the support.
    U : ndarray of shape (t, v)
        ``q_i^T D^T``; ``U[:, support]^T`` is the lower Cholesky factor L of the support's
        Gram matrix.
    support : ndarray of shape (t,)

    Returns
    -------
    ndarray of shape (n, t)
        ``W = A L^{-1}``, the minimiser of ``||H - W D[support]||_F``.
    """
    if support.size == 0:
        return np.zeros((At.shape[1], 0))
    L = U[:, support].T
    return solve_triangular(L, At, lower=True, trans="T", check_finite=False).T


def somp(
    H,
    D,
    n_atoms: int = 50,
    *,
    center: bool = True,
    normalize: bool = True,
    criterion: str = "l1",
    tol: float = 0.0,
    engine: str = "fast",
) -> SompResult:
    """Simultaneous Orthogonal Matching Pursuit of the rows of ``H`` over the atoms ``D``.

    Parameters
    ----------
    H : array_like of shape (n_samples, d_model)
        Samples of one head's contribution to the residual stream. Any real dtype
        (float16, bfloat16, int, ...); computed in float64. Read-only is fine.
    D : array_like of shape (n_atoms_total, d_model)
        Dictionary atoms (rows of the unembedding, optionally restricted to a concept).
    n_atoms : int, default=50
        Largest number of atoms to select (capped by the dictionary size).
    center : bool, default=True
        Subtract the per-feature mean over samples before decomposing (as the authors).
    normalize : bool, default=True
        Score atoms by their unit-norm direction, ``||D_j R^T||_p / ||D_j||_2``.
    criterion : {"l1", "l2"}, default="l1"
        Norm across samples in the score.
    tol : float, default=0.0
        Stop once ``||R||_F^2 <= tol * ||H||_F^2``; 0 disables this rule.
    engine : {"fast", "naive"}, default="fast"
        ``"naive"`` is the paper's steps literally (least-squares refit each step), the
        auditing oracle; ``"fast"`` computes the same from ``C = H D^T`` (Batch-OMP).

    Returns
    -------
    SompResult
        Support, coefficients, explained variance and residual norm per step, and why the
        pursuit stopped.

    See Also
    --------
    matching_pursuit : the same selection without the refit.
    somp_ref.lens.logit_lens : the one-sample, one-step special case.

    Notes
    -----
    Step t scores every admissible atom by ``||D_j R_t^T||_p / ||D_j||_2``, adds the best
    (lowest index on ties) to the support, refits all samples at once by least squares
    and recomputes the residual (Tropp, Gilbert & Strauss 2006; Head Pursuit, Basile et
    al. 2025, arXiv 2510.21518). The fast engine grows the Cholesky factor of the
    support's Gram matrix one row per step and tracks the residual energy without forming
    the residual (Rubinstein, Zibulevsky & Elad 2008, "Efficient implementation of the
    K-SVD algorithm using batch orthogonal matching pursuit"); it also scores lazily from
    upper bounds, so a step rarely touches all ``n_samples x n_atoms_total`` correlations.
    Both engines agree to ~1e-9 on well-conditioned problems.

    Examples
    --------
    >>> import numpy as np
    >>> from somp_ref import somp
    >>> D = np.eye(4)
    >>> H = np.array([[3.0, 0.0, 1.0, 0.0], [-3.0, 0.0, 2.0, 0.0]])
    >>> res = somp(H, D, n_atoms=3)
    >>> res.support.tolist(), res.stop_reason
    ([0, 2], 'converged')
    """
    problem = _prepare(H, D, n_atoms, center, normalize, criterion, tol, engine)
    run = _run_naive if engine == "naive" else _run_fast
    return run(problem, min(problem.n_atoms, problem.D.shape[0]), normalize=normalize, refit=True)


def matching_pursuit(
    H,
    D,
    n_atoms: int = 50,
    *,
    center: bool = True,
    normalize: bool = True,
    criterion: str = "l1",
    tol: float = 0.0,
    engine: str = "fast",
) -> SompResult:
    """Simultaneous Matching Pursuit: SOMP's selection without the least-squares refit.

    Each step deflates the residual by the chosen atom alone,
    ``R <- R - (R D_j^T / ||D_j||^2) D_j``; an atom may be selected again, in which case
    it appears again in ``support`` (``coef @ D[support]`` sums the repeats).

    Parameters
    ----------
    H : array_like of shape (n_samples, d_model)
    D : array_like of shape (n_atoms_total, d_model)
    n_atoms : int, default=50
        Number of steps (not capped by the dictionary size, since atoms may repeat).
    center, normalize, criterion, tol, engine
        As in :func:`somp`.

    Returns
    -------
    SompResult
        ``explained_variance`` is non-decreasing (each deflation is an orthogonal
        projection of every sample onto the complement of one atom).

    See Also
    --------
    somp : with the refit.
    somp_ref.lens.logit_lens : one step of MP on one sample ranks atoms by |logit|.
    """
    problem = _prepare(H, D, n_atoms, center, normalize, criterion, tol, engine)
    run = _run_naive if engine == "naive" else _run_fast
    return run(problem, problem.n_atoms, normalize=normalize, refit=False)
