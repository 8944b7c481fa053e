"""SOMP and Matching Pursuit exactly as the paper writes them: the auditing oracle.

Score every atom, take the best, refit by least squares (SOMP) or deflate by that atom
alone (MP), repeat. Short, obviously right, slow; the fast engine
(:mod:`somp_ref.batch_omp`) must agree with it, and the golden vectors are written from it.
"""

from __future__ import annotations

import numpy as np

from somp_ref.decisions import (
    DEPENDENT_TOL,
    GAIN_FLOOR,
    ZERO_RESIDUAL,
    first_within_window,
    score_scale,
    tie_unit,
    window_scale,
)


def orthogonal_sq_norms(D: np.ndarray, support: list[int]) -> np.ndarray:
    """Squared norm of each atom's component orthogonal to ``D[support]``, shape (v,)."""
    if not support:
        return np.einsum("ij,ij->i", D, D)
    Q = np.linalg.qr(D[support].T)[0]  # (d, t): the support is independent by construction
    orthogonal = D - (D @ Q) @ Q.T
    return np.einsum("ij,ij->i", orthogonal, orthogonal)


def somp_naive(
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
    # Imported here: scipy takes 0.16 s to load, and the processes that rank heads in
    # parallel import this package without ever calling the oracle.
    from scipy.linalg import lstsq

    sq_norms = np.einsum("ij,ij->i", D, D)
    scale = score_scale(sq_norms, normalize, atom_exp)
    energy = float(np.sum(H * H))
    unit = tie_unit(energy, H.shape[0], order)
    windows = window_scale(sq_norms, normalize, atom_exp)
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
        rho2 = orthogonal_sq_norms(D, support)
        usable = (sq_norms > 0.0) & (rho2 > DEPENDENT_TOL * sq_norms)
        correlations = R @ D.T
        scores = np.linalg.norm(correlations, ord=order, axis=0) / scale
        j = first_within_window(np.where(usable, scores, -np.inf), unit, windows)
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


def mp_naive(
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
    scale = score_scale(sq_norms, normalize, atom_exp)
    unusable = sq_norms <= 0.0
    energy = float(np.sum(H * H))
    unit = tie_unit(energy, H.shape[0], order)
    windows = window_scale(sq_norms, normalize, atom_exp)
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
        j = first_within_window(np.where(unusable, -np.inf, scores), unit, windows)
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
