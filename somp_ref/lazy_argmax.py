"""Which atom is best this step: the pursuit's exact argmax over the atoms, done lazily.

A pursuit step (:func:`somp_ref.batch_omp.pursue`) picks the atom whose residual
correlations have the largest norm (l1 or l2, divided by the atom's norm when normalizing),
the lowest index within the tie window of :mod:`somp_ref.decisions`. A scorer here answers
that question and keeps what it needs for it: the correlations ``Ct`` (v, n), one atom a
row, and the steps taken (:meth:`LazyScorer.add_step`), each an ``a`` (n,) and a ``u``
(v,) that take ``u a^T`` off the correlations. Stacked, the steps' ``a`` are the rows of
``At`` and their ``u`` the rows of ``U``: atom j's residual correlations after t steps are
``Ct[j] - U[:t, j] @ At[:t]``. What the steps mean (SOMP's orthonormal directions or
Matching Pursuit's coefficients) is the pursuit's business, not the scorer's.

Three scorers, the same choices (up to rounding on the tie window's edge):

* :class:`LazyScorer` ("lazy") brings rows up to date only for the atoms the argmax must
  score: each atom keeps an upper bound on its score, and only atoms whose bound could
  reach the best exact score (or its tie window) are scored, so a step rarely touches all
  v x n correlations. Two bounds, the smaller is kept: the triangle inequality step by step
  (``score_t+1 <= score_t + |U[t, j]| ||At[t]||_p``), and the exact score at the atom's last
  scoring s plus the norm of everything since,
  ``||sum_{s<=i<t} U[i, j] At[i]||_p <= sqrt(n)^(p==1) ||sum U[i, j] At[i]||_2``, kept for
  every atom in the coordinates of an orthonormal basis of the steps' ``At`` rows (at most t
  numbers an atom). The second grows like a random walk (the square root of the steps since
  s), the first linearly; both are exact bounds, so the choice is the one exact scores give.
* :class:`TrackedScorer` ("tracked", l2 only) tracks every atom's squared score by a
  recurrence instead (one (v, n) matrix-vector product a step), a bound within rounding of
  the score, so that a step scores exactly a few atoms; for small n (the sample space of
  :func:`somp_ref.factored.factored_somp`), as it copies ``Ct``.
* :class:`DenseScorer` ("dense") updates and scores every row each step (O(v n) a step):
  the plain algorithm the other two are checked against.
"""

from __future__ import annotations

import numpy as np

from somp_ref.decisions import first_within_window, score_scale, window_scale

EPS = float(np.finfo(np.float64).eps)

#: Relative slack added to the score upper bounds so that rounding in the bound update can
#: never make a bound fall below the score it covers.
_BOUND_SLACK = 64 * EPS

#: Relative slack on the drift term of the second bound (``LazyScorer``): covers the
#: rounding of its orthonormal basis (classical Gram-Schmidt twice keeps it orthonormal to
#: ~n eps) many times over, and loosens the bound by a millionth of the drift only.
_DRIFT_SLACK = 1e-6

#: A step's ``a`` opens a new direction of the drift bound's basis when its part
#: orthogonal to the basis is over this fraction of its norm (see
#: ``LazyScorer._add_drift``).
_NEW_DIRECTION = 1e-6

#: Gram-Schmidt projects a step's row on the basis a second time when the first pass
#: left under this fraction of its norm (Daniel, Gragg, Kaufman & Stewart 1976: one
#: pass that keeps 1/sqrt(2) of the norm is orthogonal to rounding; "twice is enough").
_REORTHOGONALIZE = 0.7071

#: Steps the step buffers hold before they first grow.
_INITIAL_STEPS = 64

#: Stale candidates scored exactly per round of the lazy argmax.
_SCORE_BATCH = 32

#: Rows of correlations whose l1 norms are summed at a time (a 2 MB buffer at n = 2000).
_NORM_ROWS = 128


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


class LazyScorer:
    """Exact argmax of the pursuit scores with lazily updated residual correlations.

    A pursuit uses :meth:`best_atom`, :meth:`correlations`, :meth:`block`,
    :meth:`add_step` and the step factors (:attr:`sample_factors`, :attr:`atom_factors`);
    the rest is the scorer's own. ``Ct[j]`` holds atom j's residual correlations after
    ``stamp[j]`` steps; ``bound[j]`` is an upper bound on its current score, exact where
    ``fresh[j]``.
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

    @property
    def sample_factors(self) -> np.ndarray:
        """The steps' ``a``, ndarray of shape (steps, n): a view, valid until the next step."""
        return self.At[: self.steps]

    @property
    def atom_factors(self) -> np.ndarray:
        """The steps' ``u``, ndarray of shape (steps, v): a view, valid until the next step.

        The residual correlations are ``Ct - atom_factors.T @ sample_factors`` (``Ct`` as
        given).
        """
        return self.U[: self.steps]

    def block(self, atoms: np.ndarray) -> None:
        """Never choose ``atoms`` (a boolean mask of shape (v,)) again."""
        self.blocked |= atoms

    def correlations(self, j: int) -> np.ndarray:
        """Atom j's residual correlations, ndarray of shape (n,), for the atom
        :meth:`best_atom` just returned (up to date only for it): a view of the scorer's
        rows, valid until the next step."""
        return self.Ct[j]

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


class TrackedScorer(LazyScorer):
    """l2 scores with every atom's squared score tracked by a recurrence (module docstring).

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


class DenseScorer(LazyScorer):
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


#: The scorer behind each ``scoring`` of :func:`somp_ref.batch_omp.pursue`.
SCORERS = {"lazy": LazyScorer, "tracked": TrackedScorer, "dense": DenseScorer}
