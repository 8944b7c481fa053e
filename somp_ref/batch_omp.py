"""The fast pursuit engine (Batch-OMP style) shared by SOMP and Matching Pursuit.

It works on the correlations ``C = H D^T`` and rows of the Gram matrix ``G = D D^T``
only, so a caller that has ``C`` in factored form (a head's ``Z E^T``) never builds ``H``.
Kernels here trust their inputs; :mod:`somp_ref.pursuit` validates and rescales them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from somp_ref.decisions import (
    DEPENDENT_TOL,
    GAIN_FLOOR,
    first_within_window,
    score_scale,
    tie_unit,
    window_scale,
)

EPS = float(np.finfo(np.float64).eps)

#: Relative slack added to the score upper bounds of the fast engine so that rounding in
#: the bound update can never make a bound fall below the score it covers.
_BOUND_SLACK = 64 * EPS

#: Relative slack on the drift term of the second bound (``_Scorer``): covers the
#: rounding of its orthonormal basis (classical Gram-Schmidt twice keeps it orthonormal to
#: ~n eps) many times over, and loosens the bound by a millionth of the drift only.
_DRIFT_SLACK = 1e-6

#: A step's ``At`` row opens a new direction of the drift bound's basis when its part
#: orthogonal to the basis is over this fraction of its norm (see ``_Scorer._add_drift``).
_NEW_DIRECTION = 1e-6

#: Gram-Schmidt projects a step's row on the basis a second time when the first pass
#: left under this fraction of its norm (Daniel, Gragg, Kaufman & Stewart 1976: one
#: pass that keeps 1/sqrt(2) of the norm is orthogonal to rounding; "twice is enough").
_REORTHOGONALIZE = 0.7071

#: Steps the fast engine's buffers hold before they first grow.
_INITIAL_STEPS = 64

#: Stale candidates scored exactly per round of the fast engine's lazy argmax.
_SCORE_BATCH = 32

#: Samples centered and correlated per block by the fast engine's set-up: at n = 2000,
#: d = 4096, v = 1000, blocks of 1024 take 117 ms against 126 ms for 512 and 91 ms for
#: the uncentered product (one 32 MB block at a time).
_SAMPLE_BLOCK = 1024

#: Rows of correlations whose l1 norms are summed at a time (a 2 MB buffer at n = 2000).
_NORM_ROWS = 128


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
    scoring : {"lazy", "tracked", "dense"}, default="lazy"
        How the argmax finds the best atom; the same choices either way. "lazy": exact
        scores only where upper bounds require them (below). "tracked" (l2 only): the
        same, with every atom's squared score tracked by a recurrence instead (one (v, n)
        matrix-vector product a step), a bound within rounding of the score, so that a
        step scores exactly a few atoms; for small n (the sample space of
        :func:`somp_ref.factored.factored_somp`), as it copies ``Ct``. "dense": every row
        updated and scored each step (O(v n) a step).

    Returns
    -------
    PursuitPath

    Notes
    -----
    Atom j's residual correlations after step t are ``Ct[j] - U[:t, j] @ At[:t]``. They
    are brought up to date lazily, row by row, only for the atoms the argmax must score
    (``_Scorer``): each atom keeps an upper bound on its score, and only atoms whose bound
    could reach the best exact score (or its tie window) are scored, so a step rarely
    touches all v x n correlations. Two bounds ("lazy"), the smaller is kept: the triangle
    inequality step by step (``score_t+1 <= score_t + |U[t, j]| ||At[t]||_p``), and the
    exact score at the atom's last scoring s plus the norm of everything since,
    ``||sum_{s<=i<t} U[i, j] At[i]||_p <= sqrt(n)^(p==1) ||sum U[i, j] At[i]||_2``, kept
    for every atom in the coordinates of an orthonormal basis of the steps' ``At`` rows
    (at most t numbers an atom). The second grows like a random walk (the square root of
    the steps since s), the first linearly; both are exact bounds, so the choice is the
    one exact scores give.
    """
    v, n = Ct.shape
    unit = tie_unit(energy, n, order)
    kind = {"lazy": _Scorer, "tracked": _TrackedScorer, "dense": _DenseScorer}[scoring]
    scorer = kind(Ct, n_atoms, sq_norms, order=order, normalize=normalize, atom_exp=atom_exp)
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


def _row_norms(Ct: np.ndarray, order: int) -> np.ndarray:
    """``np.linalg.norm(Ct, ord=order, axis=1)``, a block of rows at a time: the l1 norm of
    a whole (v, n) matrix at once writes a v x n temporary of absolute values (16 MB for a
    7B head), whose fresh pages cost more than the sums."""
    if order != 1:
        return np.sqrt(np.einsum("ij,ij->i", Ct, Ct))
    norms = np.empty(Ct.shape[0])
    block = np.empty((min(_NORM_ROWS, Ct.shape[0]), Ct.shape[1]))
    for start in range(0, Ct.shape[0], block.shape[0]):
        rows = Ct[start : start + block.shape[0]]
        np.abs(rows, out=block[: rows.shape[0]]).sum(
            axis=1, out=norms[start : start + rows.shape[0]]
        )
    return norms


#: What one more product call costs in the refresh, in units of one row's update by one
#: step (n multiply-adds): about 5 us against 0.07 us at n = 2000 (measured on 2 cores).
_CALL_COST = 64


def _split(lags: np.ndarray) -> int:
    """Where to cut a refresh batch (``lags``: steps each atom is behind, ascending) into
    two products, each over the steps its most-behind atom needs: the cut that saves the
    most row-steps, or none (``lags.size``) when no cut saves a product call's cost."""
    size = lags.shape[0]
    if size < 2:
        return size
    cuts = np.arange(1, size)
    costs = cuts * lags[:-1] + (size - cuts) * lags[-1]
    best = int(np.argmin(costs))
    return best + 1 if costs[best] + _CALL_COST < size * lags[-1] else size


class _Scorer:
    """Exact argmax of the pursuit scores with lazily updated residual correlations.

    ``Ct[j]`` holds atom j's residual correlations after ``stamp[j]`` steps; ``bound[j]``
    is an upper bound on its current score, exact where ``fresh[j]``.
    """

    #: Stale atoms scored exactly per round of the argmax.
    batch = _SCORE_BATCH

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
        self.scale = score_scale(sq_norms, normalize, atom_exp)
        self.window_scale = window_scale(sq_norms, normalize, atom_exp)
        self.blocked = sq_norms <= 0.0
        self.bound = _row_norms(Ct, order) / self.scale
        self.fresh = np.ones(v, dtype=bool)
        self.stamp = np.zeros(v, dtype=np.int64)
        # Step buffers grow by doubling: Matching Pursuit's n_atoms is not capped by the
        # dictionary, and a huge one must cost nothing until the steps are taken.
        capacity = min(n_atoms, _INITIAL_STEPS)
        self.At = np.empty((capacity, n))
        self.U = np.empty((capacity, v))
        self.steps = 0
        self.batch = min(self.batch, v)
        self._rows = np.empty((self.batch, n))
        self._work = np.empty_like(self._rows)
        self._start_bounds(Ct, capacity)

    def _start_bounds(self, Ct: np.ndarray, capacity: int) -> None:
        """The drift bound's state: the exact score at the last scoring (``base``), an
        orthonormal basis of the At rows (``basis``) and each atom's change since, in its
        coordinates (``drift``, steps x v: a step's update and the norms then run along
        contiguous rows, twice as fast as down the columns of v x steps)."""
        v, n = Ct.shape
        self.base = self.bound.copy()
        self.basis = np.zeros((capacity, n))
        self.drift = np.zeros((capacity, v))
        self.loose = np.zeros(v)
        self.root_n = float(np.sqrt(n)) if self.order == 1 else 1.0

    def add_step(self, a: np.ndarray, u: np.ndarray) -> None:
        """Record step ``R <- R - a q^T`` (``u = q^T D^T``) and loosen the bounds."""
        t = self.steps
        if t == self.At.shape[0]:  # full: double the step buffers
            self.At = np.concatenate([self.At, np.empty_like(self.At)])
            self.U = np.concatenate([self.U, np.empty_like(self.U)])
            self._grow_bounds()
        self.At[t] = a
        self.U[t] = u
        self._loosen(t, a, u)
        self.fresh[:] = False
        self.steps += 1

    def _grow_bounds(self) -> None:
        """Double the drift bound's buffers with the step buffers."""
        self.basis = np.concatenate([self.basis, np.zeros_like(self.basis)])
        self.drift = np.concatenate([self.drift, np.zeros_like(self.drift)])

    def _loosen(self, t: int, a: np.ndarray, u: np.ndarray) -> None:
        """Raise every bound to cover step t: the triangle inequality, then the drift."""
        self.bound += np.abs(u) * (np.linalg.norm(a, ord=self.order) / self.scale)
        self.bound *= 1.0 + _BOUND_SLACK
        self._add_drift(t, a, u)

    def _add_drift(self, t: int, a: np.ndarray, u: np.ndarray) -> None:
        """Add ``u[j] a`` to every atom's drift, and tighten the bounds with it.

        ``a``'s component orthogonal to the basis becomes a new basis vector when it is a
        real direction (over ``_NEW_DIRECTION`` of ``||a||``: then Gram-Schmidt keeps
        the basis orthonormal to ~eps / _NEW_DIRECTION, inside ``_DRIFT_SLACK``);
        otherwise (rounding, or a direction the basis nearly holds) its norm goes to a
        per-atom triangle-inequality term, ``loose``.
        """
        basis = self.basis[:t]
        coords = np.zeros(t + 1)
        rest = a.copy()
        a_norm = float(np.sqrt(a @ a))
        for _ in range(2):  # classical Gram-Schmidt, again when it cancelled (DGKS)
            c = basis @ rest
            rest -= c @ basis
            coords[:t] += c
            rest_norm = float(np.sqrt(rest @ rest))
            if rest_norm >= _REORTHOGONALIZE * a_norm:
                break
        if rest_norm > _NEW_DIRECTION * a_norm:
            coords[t] = rest_norm
            self.basis[t] = rest / rest_norm
        elif rest_norm > 0.0:
            self.loose += np.abs(u) * rest_norm
        drift = self.drift[: t + 1]
        drift += np.einsum("i,j->ij", coords, u)
        reach = np.sqrt(np.einsum("ij,ij->j", drift, drift)) * (1 + _DRIFT_SLACK) + self.loose
        np.minimum(
            self.bound,
            (self.base + reach * (self.root_n / self.scale)) * (1.0 + _BOUND_SLACK),
            out=self.bound,
        )

    def _refresh(self, atoms: np.ndarray) -> None:
        """Bring ``Ct[atoms]`` (at most ``batch``) up to date and score them exactly.

        Works in two preallocated buffers: fresh (B, n) temporaries would be new mmap'd
        pages each call, and those page faults cost more than the arithmetic.
        """
        t, size = self.steps, atoms.shape[0]
        atoms = atoms[np.argsort(-self.stamp[atoms], kind="stable")]  # latest first
        stamps = self.stamp[atoms]
        rows, work = self._rows[:size], self._work[:size]
        # mode="clip": the indices are valid, and with the default mode numpy copies
        # through a temporary whenever ``out`` is given (three times slower).
        np.take(self.Ct, atoms, axis=0, out=rows, mode="clip")
        if stamps[-1] < t:
            split = _split(t - stamps)
            for group in (slice(0, split), slice(split, size)):
                self._catch_up(atoms[group], stamps[group], work[group])
            np.subtract(rows, work, out=rows)
            self.Ct[atoms] = rows
        self.stamp[atoms] = t
        if self.order == 1:
            scores = np.abs(rows, out=work).sum(axis=1)
        else:
            scores = np.sqrt(np.einsum("ij,ij->i", rows, rows))
        self.bound[atoms] = scores / self.scale[atoms]
        self.base[atoms] = self.bound[atoms]
        self.drift[: self.steps, atoms] = 0.0
        self.loose[atoms] = 0.0
        self.fresh[atoms] = True

    def _catch_up(self, atoms: np.ndarray, stamps: np.ndarray, out: np.ndarray) -> None:
        """``out[i] = sum_{stamps[i] <= s < t} U[s, atoms[i]] At[s]``: what atom i's
        correlations lost since it was last brought up to date (stamps: latest first)."""
        if atoms.size == 0:
            return
        t, first = self.steps, int(stamps[-1])
        coeff = self.U[first:t, atoms]  # no steps (all up to date): a product of zeros
        coeff = np.where(np.arange(first, t)[:, None] >= stamps, coeff, 0.0)
        if t - first == 1:
            # An outer product: OpenBLAS's gemm with one inner dimension is several
            # times slower than einsum's (both round each product once: same bits).
            np.einsum("i,j->ij", coeff[0], self.At[first], out=out)
        else:
            np.matmul(coeff.T, self.At[first:t], out=out)

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
            k = self.batch
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
            picked = stale[: self.batch]
            self._refresh(picked)
            masked[picked] = self.bound[picked]


class _TrackedScorer(_Scorer):
    """l2 scores with every atom's squared score tracked by a recurrence (see ``pursue``).

    After step t, ``||r_j - u_j a||^2 = ||r_j||^2 - 2 u_j (r_j . a) + u_j^2 ||a||^2`` with
    ``r_j . a = C0_j . a - sum_i U[i, j] (At[i] . a)`` (``C0`` the correlations as given).
    The recurrence cancels, so it is only a bound: it carries its own worst-case rounding
    (``err``, from the magnitudes of every term) and the bound is ``sqrt(sq + err)``. An
    exact scoring resets both. Where the residual is still large the bound is within a
    few ulps of the score, and a step scores exactly a handful of atoms.
    """

    batch = 8

    def _start_bounds(self, Ct: np.ndarray, capacity: int) -> None:
        """The recurrence's state (no drift bound: the tracked one alone covers each
        score, within rounding of it)."""
        if self.order != 2:
            raise ValueError("tracked scoring is for the l2 criterion")
        self.C0 = Ct.copy()
        self.c0_norms = np.sqrt(np.einsum("ij,ij->i", Ct, Ct))
        self.sq = self.c0_norms**2
        self.err = np.zeros_like(self.sq)
        self.reach = np.zeros_like(self.sq)  # sum_i |U[i, j]| ||At[i]||
        self.unit_err = (Ct.shape[1] + 8) * EPS

    def _grow_bounds(self) -> None:
        """Nothing: the recurrence keeps no per-step buffer."""

    def _loosen(self, t: int, a: np.ndarray, u: np.ndarray) -> None:
        """Track every squared score through step t; the bound is the tracked one."""
        a_norm = float(np.sqrt(a @ a))
        cross = self.C0 @ a
        if t:
            cross -= self.U[:t].T @ (self.At[:t] @ a)
        cross_err = (self.unit_err + t * EPS) * (self.c0_norms + self.reach) * a_norm
        terms = np.abs(self.sq) + 2.0 * np.abs(u * cross) + (u * a_norm) ** 2
        self.sq += u * (u * a_norm**2 - 2.0 * cross)
        self.err += 2.0 * np.abs(u) * cross_err + 4.0 * EPS * terms
        self.reach += np.abs(u) * a_norm
        tracked = np.sqrt(np.maximum(self.sq + self.err, 0.0)) / self.scale
        np.multiply(tracked, 1.0 + _BOUND_SLACK, out=self.bound)

    def _refresh(self, atoms: np.ndarray) -> None:
        """Score ``atoms`` exactly from the correlations as given: with d_head columns
        the whole product over the steps is cheaper than the lazy engine's bookkeeping
        (stamps, masks), and rounds no worse."""
        t = self.steps
        rows = self.C0[atoms]
        if t:
            rows -= self.U[:t, atoms].T @ self.At[:t]
        self.Ct[atoms] = rows
        self.stamp[atoms] = t
        exact_sq = np.einsum("ij,ij->i", rows, rows)
        self.bound[atoms] = np.sqrt(exact_sq) / self.scale[atoms]
        self.sq[atoms] = exact_sq
        self.err[atoms] = self.unit_err * exact_sq
        self.fresh[atoms] = True


class _DenseScorer(_Scorer):
    """Every residual correlation kept up to date (a rank-1 update per step) and every
    atom scored exactly each step; the same tie rule (:func:`first_within_window`)."""

    def _loosen(self, t: int, a: np.ndarray, u: np.ndarray) -> None:
        """Nothing: every score is exact each step."""

    def add_step(self, a: np.ndarray, u: np.ndarray) -> None:
        super().add_step(a, u)
        # Ct -= u a^T through a preallocated buffer (einsum's outer product is twice as
        # fast as numpy's broadcasting one). Not scipy's BLAS ``dger``: its OpenBLAS is
        # not numpy's, and the two thread pools would compete for the cores.
        if not hasattr(self, "_outer"):
            self._outer = np.empty_like(self.Ct)
        np.subtract(self.Ct, np.einsum("i,j->ij", u, a, out=self._outer), out=self.Ct)
        self.stamp[:] = self.steps

    def best_atom(self, unit: float) -> int:
        if self.order == 1:
            scores = np.abs(self.Ct).sum(axis=1)
        else:
            scores = np.sqrt(np.einsum("ij,ij->i", self.Ct, self.Ct))
        scores /= self.scale
        scores[self.blocked] = -np.inf
        return first_within_window(scores, unit, self.window_scale)


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
    # W^T = L^-T A^T. numpy's solve (LU: L^T is upper triangular, so no row is swapped),
    # not scipy's solve_triangular: scipy bundles a second OpenBLAS whose threads, right
    # after numpy's products, fight numpy's for the cores (a 50 x 50 solve took 10 ms).
    return np.linalg.solve(U[:, support], At).T
