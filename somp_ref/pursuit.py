"""Greedy sparse pursuits over a dictionary of atoms: SOMP and Matching Pursuit.

Layout (after scikit-learn's ``_omp.py``): one validated public function per algorithm,
one result dataclass; the kernels behind them trust their inputs:

* :mod:`somp_ref.batch_omp` — the fast engine (Batch-OMP style), its argmax over the atoms
  in :mod:`somp_ref.lazy_argmax` (lazy, bound-pruned);
* :mod:`somp_ref.oracle` — the paper's steps written literally, the auditing oracle;
* :mod:`somp_ref.decisions` — every threshold and the tie rule both engines apply.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from somp_ref.batch_omp import centered_correlations, pursue
from somp_ref.decisions import (
    DEPENDENT_TOL,
    GAIN_FLOOR,
    TIE_RTOL,
    ZERO_RESIDUAL,
    binary_exponent,
    signal_energy,
)
from somp_ref.oracle import mp_naive, somp_naive
from somp_ref.validation import (
    as_matrix,
    check_choice,
    check_flag,
    check_positive_int,
    check_same_width,
    check_tolerance,
)

__all__ = [
    "DEPENDENT_TOL",
    "GAIN_FLOOR",
    "NORM_ORDER",
    "STOP_REASONS",
    "TIE_RTOL",
    "ZERO_RESIDUAL",
    "SompResult",
    "explained_variance",
    "matching_pursuit",
    "pursuit_result",
    "residual_energies",
    "somp",
]

NORM_ORDER = {"l1": 1, "l2": 2}
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
    normalize: bool


def _prepare(H, D, n_atoms, center, normalize, criterion, tol, engine) -> _Problem:
    """Validate the shared arguments and rescale the inputs (see decisions.SAFE_EXPONENT)."""
    H = as_matrix(H, "H")
    D = as_matrix(D, "D")
    check_same_width(H, D, ("H", "D"))
    n_atoms = check_positive_int(n_atoms, "n_atoms")
    order = NORM_ORDER[check_choice(criterion, "criterion", NORM_ORDER)]
    tol = check_tolerance(tol)
    center, normalize = check_flag(center, "center"), check_flag(normalize, "normalize")
    check_choice(engine, "engine", ("fast", "naive"))
    h_exp = int(binary_exponent(H))
    if h_exp:
        H = np.ldexp(H, -h_exp)
    # Atoms are rescaled one by one; unnormalised scores put the factor back
    # (score_scale), so that atoms of very different norms are compared as given.
    d_exp = binary_exponent(D, axis=1)
    if d_exp.any():
        D = np.ldexp(D, -d_exp[:, None])
    mean = H.mean(axis=0) if center else np.zeros(H.shape[1])
    return _Problem(H, D, mean, h_exp, d_exp, n_atoms, order, tol, normalize)


def residual_energies(energy: float, gains: np.ndarray) -> np.ndarray:
    """The residual energy after 0..t steps, shape (t + 1,), from the steps' gains (t,)."""
    return energy - np.concatenate([[0.0], np.cumsum(gains)])


def explained_variance(energies: np.ndarray) -> np.ndarray:
    """``1 - energies[s] / energies[0]`` for s = 0..t, shape (t + 1,); zeros when
    ``energies[0]`` is 0. ``energies`` (t + 1,): residual energies after 0..t steps,
    negatives (rounding) read as 0."""
    energies = np.maximum(np.asarray(energies, dtype=np.float64), 0.0)
    explained = np.zeros_like(energies)
    if energies[0] > 0.0:
        explained[1:] = 1.0 - energies[1:] / energies[0]
    return explained


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
    return SompResult(
        support=support,
        coef=coef,
        explained_variance=explained_variance(energies),
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


def _run_fast(problem: _Problem, n_atoms: int, *, normalize: bool, refit: bool) -> SompResult:
    H, D, mean = problem.H, problem.D, problem.mean
    Ct, energy = centered_correlations(H, D, mean)
    if mean.any():
        energy = signal_energy(energy, float(np.einsum("ij,ij->", H, H)))
    sq_norms = np.einsum("ij,ij->i", D, D)
    path = pursue(
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
    coef = path.coef()
    energies = residual_energies(energy, path.gains)
    return _result(problem, path.support, coef, energies, path.stop_reason)


def _run_naive(problem: _Problem, n_atoms: int, *, normalize: bool, refit: bool) -> SompResult:
    Hc = problem.H - problem.mean
    if problem.mean.any():
        raw = float(np.einsum("ij,ij->", problem.H, problem.H))
        if signal_energy(float(np.einsum("ij,ij->", Hc, Hc)), raw) == 0.0:
            Hc = np.zeros_like(Hc)
    engine = somp_naive if refit else mp_naive
    options = {"order": problem.order, "normalize": normalize, "tol": problem.tol}
    out = engine(Hc, problem.D, n_atoms, atom_exp=problem.d_exp, **options)
    return _result(problem, *out)


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
    n_atoms = min(problem.n_atoms, problem.D.shape[0])
    return run(problem, n_atoms, normalize=problem.normalize, refit=True)


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
    return run(problem, problem.n_atoms, normalize=problem.normalize, refit=False)
