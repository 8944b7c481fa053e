"""How clearly each discrete decision of a golden case is made.

A golden case may only pin what every correct implementation computes on every machine.
A pursuit step is **well-determined** when the atoms tied with the best score (within the
tie window, ``TIE_RTOL`` of the problem's noise scale) are tied to rounding, so that the
documented rule (lowest index) decides, and every other atom scores clearly lower. The
margins are measured on the literal steps (least-squares refit, or MP's deflation) in
units of the noise scale, and stored in each golden file beside the outputs.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import lstsq

from somp_ref.decisions import (
    DEPENDENT_TOL,
    GAIN_FLOOR,
    TIE_RTOL,
    score_scale,
    tie_unit,
    window_scale,
)
from somp_ref.oracle import orthogonal_sq_norms

#: A runner-up this far below the best score (in noise-scale units) cannot be confused
#: with a tie: 1000 tie windows, ~1e6 times any kernel's rounding of a score.
CLEAR_MARGIN = 1e3 * TIE_RTOL
#: Scores tied "to rounding" differ by at most this (noise-scale units): a thousandth of
#: the tie window, ~1000 times the rounding of a score.
CLEAR_SPREAD = 1e-3 * TIE_RTOL
#: Atom independence ratios ``rho2 / ||D_j||^2`` must be this far (a factor) from
#: DEPENDENT_TOL, and gains this far from GAIN_FLOOR and from ``tol``.
CLEAR_FACTOR = 1e3


def step_margins(
    H: np.ndarray, D: np.ndarray, support: np.ndarray, params: dict, *, refit: bool
) -> dict[str, np.ndarray]:
    """Margins of every selection step of a pursuit path.

    Parameters
    ----------
    H : ndarray of shape (n, d)
        The samples, centered already if the case centers.
    D : ndarray of shape (v, d)
    support : ndarray of shape (t,)
        The path whose steps are measured.
    params : dict
        ``criterion``, ``normalize`` (defaults "l1", True).
    refit : bool
        SOMP (least-squares refit, dependent atoms excluded) or MP (deflation).

    Returns
    -------
    dict
        ``margin`` (t,): best score minus the best score outside the tie group;
        ``spread`` (t,): best score minus the lowest score inside it (both in units of the
        noise scale; ``inf`` margin when no other atom is admissible); ``independence``
        (t,): the smallest ``|log10(rho2 / (DEPENDENT_TOL ||D_j||^2))|`` over admissible or
        excluded atoms at each step (SOMP only; ``inf`` for MP).
    """
    order = 1 if params.get("criterion", "l1") == "l1" else 2
    normalize = params.get("normalize", True)
    sq_norms = np.einsum("ij,ij->i", D, D)
    scale = score_scale(sq_norms, normalize)
    unit = tie_unit(float(np.sum(H * H)), H.shape[0], order)
    windows = window_scale(sq_norms, normalize)
    margins, spreads, independence = [], [], []
    R = H.copy()
    for t, chosen in enumerate(support.tolist()):
        usable = sq_norms > 0.0
        if refit:
            if t:
                W = lstsq(D[support[:t]].T, H.T)[0].T
                R = H - W @ D[support[:t]]
            ratio = orthogonal_sq_norms(D, support[:t].tolist())[usable] / sq_norms[usable]
            with np.errstate(divide="ignore"):  # chosen atoms: ratio 0, clearly dependent
                independence.append(float(np.min(np.abs(np.log10(ratio / DEPENDENT_TOL)))))
            usable &= orthogonal_sq_norms(D, support[:t].tolist()) > DEPENDENT_TOL * sq_norms
        else:
            independence.append(np.inf)
        scores = np.where(usable, np.linalg.norm(R @ D.T, ord=order, axis=0) / scale, -np.inf)
        top = int(np.argmax(scores))
        best, noise = scores[top], unit * windows[top] / TIE_RTOL
        group = scores >= best - unit * windows[top]
        if int(np.flatnonzero(group)[0]) != chosen:
            raise AssertionError(f"step {t}: the path chose {chosen}, the tie rule another atom")
        others = scores[~group & usable]
        margins.append((best - others.max()) / noise if others.size else np.inf)
        spreads.append((best - scores[group].min()) / noise)
        if not refit:
            c = (R @ D[chosen]) / sq_norms[chosen]
            R = R - np.outer(c, D[chosen])
    return {
        "margin": np.asarray(margins, dtype=np.float64),
        "spread": np.asarray(spreads, dtype=np.float64),
        "independence": np.asarray(independence, dtype=np.float64),
    }


def unclear_steps(margins: dict[str, np.ndarray]) -> list[str]:
    """Descriptions of the steps whose decision is not clear (empty when all are)."""
    problems = []
    for t, (margin, spread, indep) in enumerate(
        zip(margins["margin"], margins["spread"], margins["independence"], strict=True)
    ):
        if margin < CLEAR_MARGIN:
            problems.append(f"step {t}: runner-up margin {margin:.2e} < {CLEAR_MARGIN:.0e}")
        if spread > CLEAR_SPREAD:
            problems.append(f"step {t}: tie spread {spread:.2e} > {CLEAR_SPREAD:.0e}")
        if indep < np.log10(CLEAR_FACTOR):
            problems.append(f"step {t}: an atom's independence is within 1e3 of DEPENDENT_TOL")
    return problems


def unclear_stop(
    H: np.ndarray,
    D: np.ndarray,
    support: np.ndarray,
    coef: np.ndarray,
    energies: np.ndarray,
    reason: str,
    params: dict,
    *,
    refit: bool,
) -> list[str]:
    """Whether the stop decision (and each earlier decision to go on) is clear.

    ``H`` is centered if the case centers; ``coef`` (n, t) and ``energies`` (t + 1,) are
    the path's. A "tol" stop needs every relative energy to be a factor ``1/CLEAR_FACTOR``
    of ``tol`` away from it; every gain taken must exceed ``CLEAR_FACTOR * GAIN_FLOOR`` of
    the energy, and at a "converged" stop the best gain left must be ``CLEAR_FACTOR``
    below it.
    """
    problems = []
    total = float(energies[0])
    if total <= 0.0:
        return problems
    gains = -np.diff(energies) / total
    if gains.size and gains.min() < CLEAR_FACTOR * GAIN_FLOOR:
        problems.append(f"a gain of {gains.min():.2e} is near the gain floor")
    tol = params.get("tol", 0.0)
    if tol > 0.0 and np.min(np.abs(energies / total - tol)) < tol / CLEAR_FACTOR:
        problems.append("a residual energy is within 0.1 % of tol")
    if reason == "converged":
        R = H - coef @ D[support]
        sq_norms = np.einsum("ij,ij->i", D, D)
        rho2 = orthogonal_sq_norms(D, support.tolist()) if refit else sq_norms
        usable = (sq_norms > 0.0) & (rho2 > DEPENDENT_TOL * sq_norms)
        left = np.sum((R @ D[usable].T) ** 2, axis=0) / rho2[usable]
        if left.size and left.max() / total > GAIN_FLOOR / CLEAR_FACTOR:
            problems.append(f"converged with a gain of {left.max() / total:.2e} left")
    return problems
