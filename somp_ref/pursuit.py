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

import numpy as np
from scipy.linalg import lstsq, solve_triangular

from somp_ref.inputs import (
    as_matrix,
    check_choice,
    check_positive_int,
    check_same_width,
    check_tolerance,
)

EPS = float(np.finfo(np.float64).eps)

#: Relative residual energy below which the residual counts as zero to rounding
#: (DESIGN.md). Only the naive engine can measure it: the fast one tracks the energy by
#: subtraction, whose rounding (~ t * eps) is far above it, and relies on GAIN_FLOOR.
ZERO_RESIDUAL = 1e-24

#: An atom whose best possible energy gain is at most GAIN_FLOOR * ||H||^2 is not taken:
#: explained variance is a float64 number in [0, 1] and cannot resolve a change below eps.
#: This is what stops both engines once the residual is zero to rounding (its correlations
#: are then ~eps^2 ||H||^2) or orthogonal to every atom left.
GAIN_FLOOR = EPS

#: An atom whose component orthogonal to the support has squared norm <= DEPENDENT_TOL
#: times its own is linearly dependent on the support and never selected. The fast engine
#: computes that component by cancellation with error ~ t * eps ~ 1e-14, four orders
#: below the threshold, so both engines classify atoms alike.
DEPENDENT_TOL = 1e-10

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

    def reconstruct(self, D: np.ndarray) -> np.ndarray:
        """Return the approximation of ``H`` (mean added back), shape (n_samples, d_model)."""
        D = np.asarray(D, dtype=np.float64)
        return self.coef @ D[self.support] + self.mean


# --------------------------------------------------------------------------- kernels


def _score_scale(sq_norms: np.ndarray, normalize: bool) -> np.ndarray:
    """Divisor of each atom's score: its norm (1 for zero atoms, which are never scored)."""
    if not normalize:
        return np.ones_like(sq_norms)
    return np.sqrt(np.where(sq_norms > 0.0, sq_norms, 1.0))


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
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
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
        ``||H||_F^2``.

    Returns
    -------
    support : (t,) int64; At : (t, n); U : (t, v); gains : (t,); stop_reason : str
        With refit, ``At[i] = (H q_i)^T`` and ``U[i] = q_i^T D^T`` for the orthonormal
        directions ``q_i`` of the support (left-looking Cholesky: ``U[:, support]^T`` is
        the Cholesky factor of the support's Gram matrix). Without refit, ``At[i]`` are
        the MP coefficients and ``U[i]`` the Gram row of the atom chosen at step i.

    Notes
    -----
    Atom j's residual correlations after step t are ``Ct[j] - U[:t, j] @ At[:t]``. They
    are brought up to date lazily, row by row, only for the atoms the argmax must score
    (``_Scorer``): each atom keeps an upper bound on its score (the triangle inequality
    gives ``score_t+1 <= score_t + |U[t, j]| ||At[t]||_p``), and only atoms whose bound
    could beat the best exact score are scored, so a step rarely touches all v x n
    correlations.
    """
    v, n = Ct.shape
    scorer = _Scorer(Ct, n_atoms, sq_norms, order=order, normalize=normalize)
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
        j = scorer.best_atom()
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
    return (
        np.asarray(support, dtype=np.int64),
        scorer.At[:t],
        scorer.U[:t],
        np.asarray(gains),
        reason,
    )


class _Scorer:
    """Exact argmax of the pursuit scores with lazily updated residual correlations.

    ``Ct[j]`` holds atom j's residual correlations after ``stamp[j]`` steps; ``bound[j]``
    is an upper bound on its current score, exact where ``fresh[j]``.
    """

    def __init__(
        self, Ct: np.ndarray, n_atoms: int, sq_norms: np.ndarray, *, order: int, normalize: bool
    ):
        v, n = Ct.shape
        self.Ct = Ct
        self.order = order
        self.scale = _score_scale(sq_norms, normalize)
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
        """Bring ``Ct[atoms]`` up to the current step and score them exactly.

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

    def best_atom(self) -> int:
        """The unblocked atom with the largest score (lowest index on ties), or -1.

        On return ``Ct`` of that atom is up to date.
        """
        masked = np.where(self.blocked, -np.inf, self.bound)
        size = masked.shape[0]
        while True:
            j = int(np.argmax(masked))
            if masked[j] == -np.inf:
                return -1
            if self.fresh[j]:
                # Every other bound is <= masked[j] (strictly below for lower indices) and
                # bounds cover scores: j is the exact argmax, ties to the lowest index.
                return j
            stale = np.where(self.fresh, -np.inf, masked)
            k = min(_SCORE_BATCH, size)
            picked = np.argpartition(stale, size - k)[size - k :]
            picked = picked[stale[picked] > -np.inf]
            self._refresh(picked)
            masked[picked] = self.bound[picked]


def _somp_naive(
    H: np.ndarray, D: np.ndarray, n_atoms: int, *, order: int, normalize: bool, tol: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """SOMP exactly as written in the paper: score, select, least-squares refit, repeat.

    Returns ``support``, ``coef`` (n, t), the residual energies (t + 1,) and the reason.
    """
    sq_norms = np.einsum("ij,ij->i", D, D)
    scale = _score_scale(sq_norms, normalize)
    unusable = sq_norms <= 0.0
    energy = float(np.sum(H * H))
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
        correlations = R @ D.T
        scores = np.linalg.norm(correlations, ord=order, axis=0) / scale
        scores[unusable] = -np.inf
        while True:
            j = int(np.argmax(scores))
            if scores[j] == -np.inf:
                break
            # Component of atom j orthogonal to the atoms already chosen.
            if support:
                fit = lstsq(D[support].T, D[j])[0]
                rho2 = float(np.sum((D[j] - D[support].T @ fit) ** 2))
            else:
                rho2 = float(sq_norms[j])
            if rho2 > DEPENDENT_TOL * sq_norms[j]:
                break
            unusable[j] = True
            scores[j] = -np.inf
        if scores[j] == -np.inf:
            reason = "exhausted"
            break
        gain = float(correlations[:, j] @ correlations[:, j]) / rho2
        if remaining <= ZERO_RESIDUAL * energy or gain <= GAIN_FLOOR * energy:
            reason = "converged"
            break
        support.append(j)
        unusable[j] = True
        coef = lstsq(D[support].T, H.T)[0].T
        R = H - coef @ D[support]
        energies.append(float(np.sum(R * R)))
    return np.asarray(support, dtype=np.int64), coef, np.asarray(energies), reason


def _mp_naive(
    H: np.ndarray, D: np.ndarray, n_atoms: int, *, order: int, normalize: bool, tol: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Matching Pursuit as written: score, select, deflate by that atom alone, repeat."""
    sq_norms = np.einsum("ij,ij->i", D, D)
    scale = _score_scale(sq_norms, normalize)
    unusable = sq_norms <= 0.0
    energy = float(np.sum(H * H))
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
        scores[unusable] = -np.inf
        j = int(np.argmax(scores))
        if scores[j] == -np.inf:
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


def _prepare(H, D, n_atoms, center, criterion, tol, engine):
    """Validate the shared arguments; return float64 H, D, the mean to remove and options."""
    H = as_matrix(H, "H")
    D = as_matrix(D, "D")
    check_same_width(H, D, ("H", "D"))
    n_atoms = check_positive_int(n_atoms, "n_atoms")
    order = _NORM_ORDER[check_choice(criterion, "criterion", _NORM_ORDER)]
    tol = check_tolerance(tol)
    check_choice(engine, "engine", ("fast", "naive"))
    mean = H.mean(axis=0) if center else np.zeros(H.shape[1])
    return H, D, mean, n_atoms, order, tol


def _result(support, coef, energies, reason, mean) -> SompResult:
    energies = np.maximum(np.asarray(energies, dtype=np.float64), 0.0)
    if energies[0] > 0.0:
        explained = 1.0 - energies / energies[0]
    else:
        explained = np.zeros_like(energies)
    explained[0] = 0.0
    return SompResult(
        support=support,
        coef=coef,
        explained_variance=explained,
        residual_norm=np.sqrt(energies),
        stop_reason=reason,
        mean=mean,
    )


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


def _run_fast(H, D, mean, n_atoms, *, order, normalize, tol, refit):
    Ct, energy = _centered_correlations(H, D, mean)
    sq_norms = np.einsum("ij,ij->i", D, D)
    support, At, U, gains, reason = _pursue(
        Ct,
        lambda j: D @ D[j],
        sq_norms,
        energy,
        n_atoms,
        order=order,
        normalize=normalize,
        tol=tol,
        refit=refit,
    )
    coef = solve_factored_coef(At, U, support) if refit else At.T
    energies = energy - np.concatenate([[0.0], np.cumsum(gains)])
    return support, coef, energies, reason


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
    H, D, mean, n_atoms, order, tol = _prepare(H, D, n_atoms, center, criterion, tol, engine)
    n_atoms = min(n_atoms, D.shape[0])
    if engine == "naive":
        out = _somp_naive(H - mean, D, n_atoms, order=order, normalize=normalize, tol=tol)
    else:
        out = _run_fast(H, D, mean, n_atoms, order=order, normalize=normalize, tol=tol, refit=True)
    return _result(*out, mean)


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
    H, D, mean, n_atoms, order, tol = _prepare(H, D, n_atoms, center, criterion, tol, engine)
    if engine == "naive":
        out = _mp_naive(H - mean, D, n_atoms, order=order, normalize=normalize, tol=tol)
    else:
        out = _run_fast(H, D, mean, n_atoms, order=order, normalize=normalize, tol=tol, refit=False)
    return _result(*out, mean)
