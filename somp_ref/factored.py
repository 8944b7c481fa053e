"""Per-head kernels on a head's factors, never its (n_samples, d_model) output.

A head's contribution to the residual stream is low-rank, ``H_h = Z_h W_O[:, h]^T`` with
``Z_h`` (n_samples, d_head). Its correlations with the atoms are ``E_h Z_h^T`` with
``E_h = D W_O[:, h]`` (v, d_head), one product per layer for all its heads, and its energy
is a quadratic form in ``W_O[:, h]^T W_O[:, h]`` (d_head, d_head).

With ``criterion="l2"`` and more samples than ``d_head`` the pursuit runs in the head's
d_head-dimensional sample space (:func:`sample_space_factor`): no product with the n
samples is formed per atom, and none per step.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

from somp_ref.batch_omp import SompPath, pursue
from somp_ref.blas_threads import one_blas_thread
from somp_ref.decisions import binary_exponent, signal_energy
from somp_ref.pursuit import (
    NORM_ORDER,
    SompResult,
    pursuit_result,
    residual_energies,
)
from somp_ref.validation import (
    as_matrix,
    check_choice,
    check_flag,
    check_positive_int,
    check_tolerance,
)

#: Dictionaries up to this many atoms keep their Gram matrix (8 v^2 bytes: 128 MiB at
#: 4096); larger ones (a whole vocabulary, ~50k atoms: 19 GiB) compute the rows a pursuit
#: asks for, at most n_atoms of them.
MAX_GRAM_ATOMS = 4096


@dataclass(frozen=True)
class Dictionary:
    """A dictionary with the products every head reuses.

    Atoms whose largest entry lies outside the safe range
    (:data:`somp_ref.decisions.SAFE_EXPONENT`) are rescaled by powers of two (exact);
    unnormalised scores put the factor back, normalised ones ignore it.

    Attributes
    ----------
    atoms : ndarray of shape (v, d_model)
        The (rescaled) atoms.
    sq_norms : ndarray of shape (v,)
    gram : ndarray of shape (v, v) or None
        ``atoms @ atoms.T`` when ``v <= MAX_GRAM_ATOMS``.
    atom_exp : ndarray of shape (v,), int, or None
        ``atoms[j] == given[j] * 2**-atom_exp[j]``; None when nothing was rescaled.
    """

    atoms: np.ndarray
    sq_norms: np.ndarray
    gram: np.ndarray | None
    atom_exp: np.ndarray | None = None

    @classmethod
    def build(cls, atoms: np.ndarray) -> Dictionary:
        atom_exp = binary_exponent(atoms, axis=1)
        if atom_exp.any():
            atoms = np.ldexp(atoms, -atom_exp[:, None])
        sq_norms = np.einsum("ij,ij->i", atoms, atoms)
        gram = atoms @ atoms.T if atoms.shape[0] <= MAX_GRAM_ATOMS else None
        return cls(atoms, sq_norms, gram, atom_exp if atom_exp.any() else None)

    def exponents(self) -> np.ndarray:
        """``atom_exp`` with zeros where nothing was rescaled, shape (v,)."""
        if self.atom_exp is None:
            return np.zeros(self.atoms.shape[0], dtype=np.int64)
        return self.atom_exp

    def gram_row(self, j: int) -> np.ndarray:
        """Row j of ``atoms @ atoms.T``, shape (v,)."""
        return self.gram[j] if self.gram is not None else self.atoms @ self.atoms[j]


def rescaled(values: np.ndarray) -> tuple[np.ndarray, int]:
    """``values`` times a power of two that brings it into the safe range, and the exponent
    e with ``values == rescaled * 2**e`` (no copy when e == 0)."""
    exponent = int(binary_exponent(values))
    return (np.ldexp(values, -exponent) if exponent else values), exponent


#: CholeskyQR2 is accepted when its first pass is orthonormal to this (max-entry) tolerance,
#: i.e. for samples whose condition number is under about 1e5: its factor then matches
#: Householder's to ~1e-11 relative, 100 times inside the tie window (TIE_RTOL = 1e-9).
#: Worse-conditioned (or rank-deficient) samples take Householder QR, slower on
#: OpenBLAS (tall, thin) but backward stable for any input.
CHOLESKY_QR_TOL = 1e-6


def sample_space_factor(zc: np.ndarray) -> np.ndarray:
    """A triangular R with ``zc^T zc == R^T R`` (the R of ``zc = Q R``), shape (k, d_head)
    with k = min(n, d_head).

    ``Q`` has orthonormal columns, so ``||zc f||_2 == ||R f||_2`` for every f: the l2
    criterion's scores, the residual energies and the gains of a pursuit of ``zc W^T``
    are those of the pursuit of ``R W^T``, a problem with k samples. A QR factor rather
    than the Cholesky factor of ``zc^T zc`` alone: a score is then the norm of a vector
    computed from the samples (no quadratic form, whose cancellation would lose half the
    digits of small scores), so its rounding stays that of the n-sample path.

    CholeskyQR2 (Yamamoto et al. 2015, "Roundoff error analysis of the CholeskyQR2
    algorithm"): two Cholesky passes, Householder-accurate for condition numbers under
    ~1e5 and, on OpenBLAS, several times faster than ``geqrf`` on tall thin matrices;
    otherwise Householder QR (see :data:`CHOLESKY_QR_TOL`). numpy's LAPACK only: scipy's
    bundles a second OpenBLAS whose threads would compete with numpy's for the cores.
    """
    n, d = zc.shape
    if n > d:
        # The n x d products on every BLAS thread, the d x d factorizations on one.
        gram = zc.T @ zc
        try:
            with one_blas_thread():
                r1 = np.linalg.cholesky(gram).T
                inv_r1 = np.linalg.inv(r1)
            q1 = zc @ inv_r1  # its error, ~eps * cond, is what the check bounds
            c = q1.T @ q1
            if np.abs(c - np.eye(d)).max() <= CHOLESKY_QR_TOL:
                with one_blas_thread():
                    return np.linalg.cholesky(c).T @ r1
        except np.linalg.LinAlgError:  # rank-deficient (to rounding): Householder below
            pass
    return np.linalg.qr(zc, mode="r")


def sample_space_coef(zc: np.ndarray, projected: np.ndarray, path: SompPath) -> np.ndarray:
    """The least-squares coefficients (n, t) of a pursuit run in the sample space.

    ``H q_i`` for the support's orthonormal directions ``Q_S = D_S^T L^{-T}`` is
    ``A = zc E_S^T L^{-T}`` (``E_S`` the support's rows of ``projected``, L the Cholesky
    factor the pursuit grew), so the coefficients ``A L^{-1}`` are
    ``zc E_S^T (L L^T)^{-1}``: one (n, d_head) x (d_head, t) product after the pursuit.
    """
    support = path.support
    if support.size == 0:
        return np.zeros((zc.shape[0], 0))
    inv_l = np.linalg.inv(path.atom_coords[:, support].T)  # L is well conditioned: DEPENDENT_TOL
    return (zc @ projected[support].T) @ (inv_l.T @ inv_l)


class HeadProblem(NamedTuple):
    """A head ready for its pursuit: the products :func:`pursue_head` starts from.

    Attributes
    ----------
    correlations : ndarray of shape (v, n_samples) or (v, d_head)
        ``E_h zc^T``, or ``E_h R^T`` in the sample space. The pursuit overwrites it.
    energy : float
        ``||zc W^T||_F^2`` of the (centered) head, 0 when zero to rounding.
    zc : ndarray of shape (n_samples, d_head)
        The centered ``z``.
    mean_z : ndarray of shape (d_head,)
        What was subtracted (zeros without centering).
    in_sample_space : bool
        Whether the pursuit runs in the head's sample space (l2, n > d_head).
    """

    correlations: np.ndarray
    energy: float
    zc: np.ndarray
    mean_z: np.ndarray
    in_sample_space: bool


def head_problem(
    z: np.ndarray,
    o_proj_head: np.ndarray,
    projected: np.ndarray,
    *,
    center: bool,
    order: int,
    out: np.ndarray | None = None,
) -> HeadProblem:
    """The products over d_model or the n samples that a head's pursuit starts from.

    ``z`` (n_samples, d_head), ``o_proj_head`` (d_model, d_head) and ``projected = D @
    o_proj_head`` (v, d_head) as :func:`factored_somp` takes them; ``out``, shape (v,
    n_samples), receives l1's correlations (a buffer reused head after head: a fresh
    16 MB array for a 7B head costs more in page faults than its product).
    """
    mean_z = z.mean(axis=0) if center else np.zeros(z.shape[1])
    zc = z - mean_z
    in_sample_space = order == 2 and z.shape[0] > z.shape[1]
    gram_w = o_proj_head.T @ o_proj_head
    samples = sample_space_factor(zc) if in_sample_space else zc
    energy = max(float(np.einsum("ij,ij->", samples @ gram_w, samples)), 0.0)
    if center:
        # ||z W^T||^2 = ||zc W^T||^2 + n ||W mean||^2 (zc's columns sum to zero): the
        # reference of the zero-signal rule, which needs no more than a few digits.
        raw = energy + zc.shape[0] * float(mean_z @ gram_w @ mean_z)
        energy = signal_energy(energy, raw)
    # l1: v x n x d_head, the ranking's floor
    correlations = np.matmul(projected, samples.T, out=None if in_sample_space else out)
    return HeadProblem(correlations, energy, zc, mean_z, in_sample_space)


def pursue_head(
    problem: HeadProblem,
    dictionary: Dictionary,
    n_atoms: int,
    *,
    normalize: bool,
    order: int,
    tol: float,
) -> SompPath:
    """SOMP of a prepared head (its thousands of small BLAS calls: run it inside
    :func:`somp_ref.blas_threads.one_blas_thread`)."""
    v = problem.correlations.shape[0]
    return pursue(
        problem.correlations,
        dictionary.gram_row,
        dictionary.sq_norms,
        problem.energy,
        min(n_atoms, v),
        order=order,
        normalize=normalize,
        tol=tol,
        refit=True,
        atom_exp=dictionary.atom_exp,
        scoring="tracked" if problem.in_sample_space else "lazy",
    )


def factored_somp(
    z: np.ndarray,
    o_proj_head: np.ndarray,
    projected: np.ndarray,
    dictionary: Dictionary,
    n_atoms: int,
    *,
    center: bool,
    normalize: bool,
    order: int,
    tol: float,
) -> SompResult:
    """SOMP of ``z @ o_proj_head.T`` given ``projected = D @ o_proj_head`` (v, d_head).

    Trusts its inputs (float64, finite, consistent shapes, inside the safe range: see
    :func:`rescaled`); :func:`head_somp` checks and rescales them. Coefficients and the
    mean are in the units of the inputs given; explained variance and support are not
    affected by any rescaling.

    Notes
    -----
    "l1" (``order=1``) pursues the correlations ``E_h zc^T`` (v, n). "l2" with n > d_head
    pursues ``E_h R^T`` (v, d_head) instead, R from :func:`sample_space_factor`: the same
    engine (:func:`somp_ref.batch_omp.pursue`, so the same tie, dependence and stopping
    rules) on d_head instead of n columns. Each step costs O(v d_head) and no v x n
    product is formed; the coefficients come from one n x t product at the end
    (:func:`sample_space_coef`).
    """
    # The products over d_model or the n samples on every BLAS thread, the pursuit's
    # thousands of small calls and the coefficients' solve on one.
    problem = head_problem(z, o_proj_head, projected, center=center, order=order)
    with one_blas_thread():
        path = pursue_head(problem, dictionary, n_atoms, normalize=normalize, order=order, tol=tol)
        if problem.in_sample_space:
            coef = sample_space_coef(problem.zc, projected, path)
        else:
            coef = path.coef()
    energies = residual_energies(problem.energy, path.gains)
    mean = problem.mean_z @ o_proj_head.T
    return pursuit_result(path.support, coef, energies, path.stop_reason, mean)


def head_somp(
    z,
    o_proj_head,
    D,
    n_atoms: int = 50,
    *,
    center: bool = True,
    normalize: bool = True,
    criterion: str = "l1",
    tol: float = 0.0,
) -> SompResult:
    """SOMP of one head's contribution ``z @ o_proj_head.T`` without forming it.

    Parameters
    ----------
    z : array_like of shape (n_samples, d_head)
        The head's ``hook_z`` rows.
    o_proj_head : array_like of shape (d_model, d_head)
        The head's columns of the o_proj weight.
    D : array_like of shape (n_atoms_total, d_model)
    n_atoms, center, normalize, criterion, tol
        As in :func:`somp_ref.somp`.

    Returns
    -------
    SompResult
        Equal (to rounding) to ``somp(z @ o_proj_head.T, D, ...)``.
    """
    z = as_matrix(z, "z")
    o_proj_head = as_matrix(o_proj_head, "o_proj_head")
    D = as_matrix(D, "D")
    if o_proj_head.shape[1] != z.shape[1]:
        raise ValueError(
            f"o_proj_head must have d_head={z.shape[1]} columns like z, got {o_proj_head.shape}"
        )
    if o_proj_head.shape[0] != D.shape[1]:
        raise ValueError(
            f"o_proj_head must have d_model={D.shape[1]} rows like D, got {o_proj_head.shape}"
        )
    order = NORM_ORDER[check_choice(criterion, "criterion", NORM_ORDER)]
    n_atoms = check_positive_int(n_atoms, "n_atoms")
    center, normalize = check_flag(center, "center"), check_flag(normalize, "normalize")
    # Rescale by powers of two (exact) so that energies and scores neither overflow nor
    # underflow, as somp does; undo it on the coefficients, mean and residual norms.
    z, z_exp = rescaled(z)
    o_proj_head, w_exp = rescaled(o_proj_head)
    dictionary = Dictionary.build(D)
    res = factored_somp(
        z,
        o_proj_head,
        dictionary.atoms @ o_proj_head,
        dictionary,
        n_atoms,
        center=center,
        normalize=normalize,
        order=order,
        tol=check_tolerance(tol),
    )
    h_exp = z_exp + w_exp
    atom_exp = dictionary.exponents()
    with np.errstate(over="ignore"):
        coef = np.ldexp(res.coef, h_exp - atom_exp[res.support])
    if not np.isfinite(coef).all():
        raise ValueError("the coefficients overflow float64: rescale z, o_proj_head or D")
    return replace(
        res,
        coef=coef,
        mean=np.ldexp(res.mean, h_exp),
        residual_norm=np.ldexp(res.residual_norm, h_exp),
    )


def mean_concept_logits(z: np.ndarray, projected: np.ndarray) -> np.ndarray:
    """Each atom's logit from the head, averaged over samples, shape (v,).

    ``mean_i D_c (W_O,h z_i) = E_h[c] . mean_i z_i``: the paper's Logit Lens head score is
    the mean of this over the concept's atoms.

    Parameters
    ----------
    z : ndarray of shape (n_samples, d_head)
    projected : ndarray of shape (v, d_head)
        ``D @ o_proj_head``.
    """
    return projected @ z.mean(axis=0)
