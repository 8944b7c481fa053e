"""The Logit Lens and its head score: the one-sample, one-step special case of the pursuit."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from somp_ref.decisions import TIE_RTOL, binary_exponent
from somp_ref.validation import as_matrix, check_positive_int, check_real, check_same_width

#: Samples per block when a computation needs the (n_samples, n_atoms_total) logits: keeps
#: memory bounded for full vocabularies (~50k atoms).
_ROW_BLOCK = 256


@dataclass(frozen=True)
class LogitLensResult:
    """Top atoms per sample.

    Attributes
    ----------
    indices : ndarray of shape (n_samples, top), int64
        Rows of ``D`` with the largest logits, best first (lowest index on ties).
    logits : ndarray of shape (n_samples, top), float64
        ``D[indices[i]] @ X[i]``.
    """

    indices: np.ndarray
    logits: np.ndarray


def logit_lens(X, D, top: int = 10, *, softcap: float | None = None) -> LogitLensResult:
    """Project samples onto the dictionary and keep the ``top`` largest logits.

    Parameters
    ----------
    X : array_like of shape (n_samples, d_model)
        Residual-stream vectors (or one head's contributions).
    D : array_like of shape (n_atoms_total, d_model)
        Dictionary, usually the unembedding matrix.
    top : int, default=10
        How many atoms to keep per sample (capped by the dictionary size).
    softcap : float, optional
        Final logit soft-capping (Gemma: ``cap * tanh(logit / cap)``). Monotonic, so it
        changes the reported logits, never the ranking.

    Returns
    -------
    LogitLensResult

    Raises
    ------
    ValueError
        When a reported logit overflows float64 (the ranking itself is computed on
        rescaled inputs and never overflows).

    Notes
    -----
    The order is the pursuit's tie rule applied repeatedly: the next atom is the lowest
    index whose logit is within ``TIE_RTOL * ||x|| ||D_best||`` of the largest logit left,
    so that logits equal to rounding are ordered by index on every BLAS kernel.

    The Logit Lens is one step of Matching Pursuit on one sample with
    ``center=False, normalize=False``: MP selects ``argmax_j |D_j x|``, which is the lens's
    top-1 whenever the largest logit is also the largest in magnitude, and its coefficient
    is that logit divided by ``||D_j||^2``.
    """
    X = as_matrix(X, "X")
    D = as_matrix(D, "D")
    check_same_width(X, D, ("X", "D"))
    top = min(check_positive_int(top, "top"), D.shape[0])
    if softcap is not None:
        softcap = check_real(softcap, "softcap")
        if not 0.0 < softcap < np.inf:
            raise ValueError(f"softcap must be a finite number > 0, got {softcap}")
    # Ranking is invariant to each sample's scale: rescale samples by powers of two (exact)
    # so that huge or tiny inputs neither overflow nor underflow; atoms too, putting their
    # factor back on the logits (they are ranked as given); undo it on the reported values.
    x_exp = binary_exponent(X, axis=1)
    d_exp = binary_exponent(D, axis=1)
    if x_exp.any():
        X = np.ldexp(X, -x_exp[:, None])
    if d_exp.any():
        D = np.ldexp(D, -d_exp[:, None])
    norms = np.ldexp(np.sqrt(np.einsum("ij,ij->i", D, D)), d_exp)
    indices = np.empty((X.shape[0], top), dtype=np.int64)
    values = np.empty((X.shape[0], top))
    for start in range(0, X.shape[0], _ROW_BLOCK):
        block = X[start : start + _ROW_BLOCK]
        logits = block @ D.T
        if d_exp.any():
            with np.errstate(over="ignore"):
                logits = np.ldexp(logits, d_exp)
        units = TIE_RTOL * np.linalg.norm(block, axis=1)
        for i, (row, unit) in enumerate(zip(logits, units, strict=True)):
            order = _top_with_ties(row, top, unit, norms)
            indices[start + i] = order
            values[start + i] = row[order]
    with np.errstate(over="ignore"):
        values = np.ldexp(values, x_exp[:, None])
    if not np.isfinite(values).all():
        raise ValueError("logits overflow float64: rescale X or D")
    if softcap is not None:
        values = softcap * np.tanh(values / softcap)
    return LogitLensResult(indices=indices, logits=values)


def _top_with_ties(logits: np.ndarray, top: int, unit: float, norms: np.ndarray) -> np.ndarray:
    """Indices of the ``top`` largest ``logits`` in the tie rule's order, shape (top,).

    Each next index is the lowest whose logit is within ``unit * norms[best]`` of the
    largest left (``norms`` (v,): the atoms' norms; a logit and its rounding scale with
    its atom's norm). The usual case, where no two neighbours among the kept logits and the
    first dropped one are that close, is one sort; otherwise the rule is applied step by
    step to the few candidates near the cut.
    """
    v = logits.shape[0]
    order = np.argsort(-logits, kind="stable")[: min(top + 1, v)]
    kept = logits[order]
    widest = unit * float(np.max(norms[order]))
    if not np.any(kept[:-1] - kept[1:] <= widest):
        return order[:top]
    candidates = np.flatnonzero(logits >= kept[-1] - unit * float(np.max(norms)))
    scores = logits[candidates].copy()
    chosen = np.empty(top, dtype=np.int64)
    for step in range(top):
        _best = int(np.argmax(scores))
        first = np.flatnonzero(scores >= scores[_best] - unit * norms[candidates[_best]])[0]
        chosen[step] = candidates[first]
        scores[first] = -np.inf
    return chosen


def ll_head_score(H, D) -> float:
    """The paper's Logit Lens head score: the mean logit the head gives the concept's tokens.

    ``mean_i mean_c D_c . h_i`` over the samples (rows of ``H``) and the concept's atoms
    (rows of ``D``, raw unembedding rows): how much, on average, what the head writes raises
    the concept's logits (Basile et al. 2025, the "LL" baseline).

    Parameters
    ----------
    H : array_like of shape (n_samples, d_model)
        One head's contributions to the residual stream.
    D : array_like of shape (n_atoms_total, d_model)
        The concept's unembedding rows.

    Returns
    -------
    float
        ``(mean of the rows of D) . (mean of the rows of H)``, computed in that order.
    """
    H = as_matrix(H, "H")
    D = as_matrix(D, "D")
    check_same_width(H, D, ("H", "D"))
    # Rescale by powers of two (exact) so that neither the means nor their product
    # overflow or underflow on the way; the value itself must fit in float64.
    h_exp, d_exp = int(binary_exponent(H)), int(binary_exponent(D))
    unit = np.ldexp(D, -d_exp).mean(axis=0) @ np.ldexp(H, -h_exp).mean(axis=0)
    with np.errstate(over="ignore"):
        score = float(np.ldexp(unit, h_exp + d_exp))
    if not np.isfinite(score):
        raise ValueError("the mean concept logit overflows float64: rescale H or D")
    return score
