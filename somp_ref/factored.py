"""Per-head kernels on a head's factors, never its (n_samples, d_model) output.

A head's contribution to the residual stream is low-rank, ``H_h = Z_h W_O[:, h]^T`` with
``Z_h`` (n_samples, d_head). Its correlations with the atoms are ``E_h Z_h^T`` with
``E_h = D W_O[:, h]`` (v, d_head), one product per layer for all its heads, and its energy
is a quadratic form in ``W_O[:, h]^T W_O[:, h]`` (d_head, d_head).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from somp_ref.batch_omp import pursue, solve_factored_coef
from somp_ref.decisions import signal_energy
from somp_ref.pursuit import NORM_ORDER, SompResult, pursuit_result
from somp_ref.validation import as_matrix, check_choice, check_positive_int, check_tolerance

#: Dictionaries up to this many atoms keep their Gram matrix (8 v^2 bytes: 128 MiB at
#: 4096); larger ones (a whole vocabulary, ~50k atoms: 19 GiB) compute the rows a pursuit
#: asks for, at most n_atoms of them.
MAX_GRAM_ATOMS = 4096


@dataclass(frozen=True)
class Dictionary:
    """A dictionary with the products every head reuses.

    Attributes
    ----------
    atoms : ndarray of shape (v, d_model)
    sq_norms : ndarray of shape (v,)
    gram : ndarray of shape (v, v) or None
        ``atoms @ atoms.T`` when ``v <= MAX_GRAM_ATOMS``.
    """

    atoms: np.ndarray
    sq_norms: np.ndarray
    gram: np.ndarray | None

    @classmethod
    def build(cls, atoms: np.ndarray) -> Dictionary:
        sq_norms = np.einsum("ij,ij->i", atoms, atoms)
        gram = atoms @ atoms.T if atoms.shape[0] <= MAX_GRAM_ATOMS else None
        return cls(atoms, sq_norms, gram)

    def gram_row(self, j: int) -> np.ndarray:
        """Row j of ``atoms @ atoms.T``, shape (v,)."""
        return self.gram[j] if self.gram is not None else self.atoms @ self.atoms[j]


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

    Trusts its inputs (float64, finite, consistent shapes); :func:`head_somp` checks them.
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
    return factored_somp(
        z,
        o_proj_head,
        D @ o_proj_head,
        Dictionary.build(D),
        check_positive_int(n_atoms, "n_atoms"),
        center=center,
        normalize=normalize,
        order=order,
        tol=check_tolerance(tol),
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
