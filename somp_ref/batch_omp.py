"""The fast pursuit engine (Batch-OMP style) shared by SOMP and Matching Pursuit.

It works on the correlations ``C = H D^T`` and rows of the Gram matrix ``G = D D^T``
only, so a caller that has ``C`` in factored form (a head's ``Z E^T``) never builds ``H``.
The loop here decides what a step does (its gain, SOMP's orthonormal direction, when to
stop); which atom a step takes is :mod:`somp_ref.lazy_argmax`'s job. Kernels here trust
their inputs; :mod:`somp_ref.pursuit` validates and rescales them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from somp_ref.decisions import DEPENDENT_TOL, GAIN_FLOOR, tie_unit
from somp_ref.lazy_argmax import SCORERS

#: Samples centered and correlated per block by the fast engine's set-up: at n = 2000,
#: d = 4096, v = 1000, blocks of 1024 take 117 ms against 126 ms for 512 and 91 ms for
#: the uncentered product (one 32 MB block at a time).
_SAMPLE_BLOCK = 1024


class SompPath(NamedTuple):
    """What :func:`pursue` returns with refit (SOMP).

    The chosen atoms, Gram-Schmidt orthonormalized in order, give directions ``q_i`` in
    d_model; both factors are coordinates along them.

    Attributes
    ----------
    support : ndarray of shape (t,), int64
        Chosen atoms in order.
    sample_coords : ndarray of shape (t, n)
        ``(H q_i)^T``: every sample's coordinate along ``q_i`` (n: the columns of the
        correlations given, the samples or a factor's rows).
    atom_coords : ndarray of shape (t, v)
        ``q_i^T D^T``: every atom's coordinate along ``q_i``; ``atom_coords[:, support]^T``
        is the lower Cholesky factor L of the support's Gram matrix.
    gains : ndarray of shape (t,)
        Residual energy removed by each step.
    stop_reason : str
    """

    support: np.ndarray
    sample_coords: np.ndarray
    atom_coords: np.ndarray
    gains: np.ndarray
    stop_reason: str

    def coef(self) -> np.ndarray:
        """Least-squares coefficients, ndarray of shape (n, t): ``W = A L^{-1}`` (``A =
        sample_coords^T``), the minimiser of ``||H - W D[support]||_F``."""
        if self.support.size == 0:
            return np.zeros((self.sample_coords.shape[1], 0))
        # W^T = L^-T A^T. numpy's solve (LU: L^T is upper triangular, so no row is
        # swapped), not scipy's solve_triangular: scipy bundles a second OpenBLAS whose
        # threads, right after numpy's products, fight numpy's for the cores (a 50 x 50
        # solve took 10 ms).
        return np.linalg.solve(self.atom_coords[:, self.support], self.sample_coords).T


class MpPath(NamedTuple):
    """What :func:`pursue` returns without refit (Matching Pursuit).

    Attributes
    ----------
    support : ndarray of shape (t,), int64
        The atom of each step in order (an atom may come back).
    step_coef : ndarray of shape (t, n)
        The coefficient of step i's atom for every sample.
    gains : ndarray of shape (t,)
        Residual energy removed by each step.
    stop_reason : str
    """

    support: np.ndarray
    step_coef: np.ndarray
    gains: np.ndarray
    stop_reason: str

    def coef(self) -> np.ndarray:
        """The coefficients, ndarray of shape (n, t): column i is step i's."""
        return self.step_coef.T


def pursue(
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
    scoring: str = "lazy",
) -> SompPath | MpPath:
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
    scoring : {"lazy", "tracked", "dense"}, default="lazy"
        How the argmax finds the best atom (:mod:`somp_ref.lazy_argmax`); the same
        choices either way. "lazy": exact scores only where upper bounds require them.
        "tracked" (l2 only): every atom's squared score tracked by a recurrence, for small
        n (the sample space of :func:`somp_ref.factored.factored_somp`). "dense": every
        row updated and scored each step (O(v n) a step).

    Returns
    -------
    SompPath with ``refit``, MpPath without

    Notes
    -----
    Step t takes the atom j the scorer chooses, with residual correlations r. SOMP
    (Rubinstein, Zibulevsky & Elad 2008, Batch-OMP) orthonormalizes it against the atoms
    before it: ``rho2[j]`` is the squared norm of its part orthogonal to them, the step's
    direction is that part over its norm, and its sample and atom coordinates are ``r /
    rho`` and ``(G[j] - U[:t, j] @ U[:t]) / rho``; atoms whose ``rho2`` falls under
    ``DEPENDENT_TOL`` of their squared norm are blocked. Matching Pursuit takes ``r`` over
    the atom's squared norm and the atom's Gram row. Either way the scorer takes
    ``u a^T`` off every atom's correlations.
    """
    n = Ct.shape[1]
    unit = tie_unit(energy, n, order)
    scorer = SCORERS[scoring](
        Ct, n_atoms, sq_norms, order=order, normalize=normalize, atom_exp=atom_exp
    )
    rho2 = sq_norms.copy()
    support: list[int] = []
    gains: list[float] = []
    remaining = energy
    reason = "n_atoms" if energy > 0.0 else "converged"
    while len(support) < n_atoms and energy > 0.0:
        if tol > 0.0 and remaining <= tol * energy:
            reason = "tol"
            break
        if refit:
            scorer.block(rho2 <= DEPENDENT_TOL * sq_norms)
        j = scorer.best_atom(unit)
        if j < 0:
            reason = "exhausted"
            break
        r = scorer.correlations(j)
        gain = float(r @ r) / (rho2[j] if refit else sq_norms[j])
        if gain <= GAIN_FLOOR * energy:
            reason = "converged"
            break
        if refit:
            rho = np.sqrt(rho2[j])
            a = r / rho
            U = scorer.atom_factors
            u = (gram_row(j) - U[:, j] @ U) / rho
            rho2 -= u * u
            rho2[j] = 0.0
        else:
            a = r / sq_norms[j]
            u = gram_row(j)
        scorer.add_step(a, u)
        support.append(j)
        gains.append(gain)
        remaining = max(remaining - gain, 0.0)
    chosen = np.asarray(support, dtype=np.int64)
    if refit:
        return SompPath(
            chosen, scorer.sample_factors, scorer.atom_factors, np.asarray(gains), reason
        )
    return MpPath(chosen, scorer.sample_factors, np.asarray(gains), reason)


def centered_correlations(
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
