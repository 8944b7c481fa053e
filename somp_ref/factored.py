"""Per-head kernels on a head's factors, never its (n_samples, d_model) output.

A head's contribution to the residual stream is low-rank, ``H_h = Z_h W_O[:, h]^T`` with
``Z_h`` (n_samples, d_head). Its correlations with the atoms are ``E_h Z_h^T`` with
``E_h = D W_O[:, h]`` (v, d_head), one product per layer for all its heads, and its energy
is a quadratic form in ``W_O[:, h]^T W_O[:, h]`` (d_head, d_head).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from somp_ref.batch_omp import pursue, solve_factored_coef
from somp_ref.decisions import binary_exponent, signal_energy
from somp_ref.pursuit import NORM_ORDER, SompResult, pursuit_result
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
    """
    mean_z = z.mean(axis=0) if center else np.zeros(z.shape[1])
    zc = z - mean_z
    gram_w = o_proj_head.T @ o_proj_head
    energy = max(float(np.einsum("ij,ij->", zc @ gram_w, zc)), 0.0)
    if center:
        energy = signal_energy(energy, float(np.einsum("ij,ij->", z @ gram_w, z)))
    path = pursue(
        projected @ zc.T,
        dictionary.gram_row,
        dictionary.sq_norms,
        energy,
        min(n_atoms, projected.shape[0]),
        order=order,
        normalize=normalize,
        tol=tol,
        refit=True,
        atom_exp=dictionary.atom_exp,
    )
    coef = solve_factored_coef(path.At, path.U, path.support)
    energies = energy - np.concatenate([[0.0], np.cumsum(path.gains)])
    return pursuit_result(path.support, coef, energies, path.stop_reason, mean_z @ o_proj_head.T)


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
