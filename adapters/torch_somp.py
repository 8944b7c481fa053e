"""A torch port of SOMP's fast engine, batched over heads and device-agnostic (CPU, CUDA).

Same mathematics and rules as ``somp_ref.pursuit`` (docs/ARCHITECTURE.md): residual
correlations from ``D H^T``, the support's Cholesky factor grown one row per step
(left-looking: ``U``), ties to the lowest index, dependent and zero atoms never selected,
the same stopping rules. It keeps the full (heads, atoms, samples) residual correlations and
updates them by a rank-1 product per step, which is what a GPU does best; the numpy engine's
lazy scoring is a CPU optimisation and changes nothing in the result. ``verify`` holds it to
the numpy engine.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import torch

from somp_ref.adapters.preflight import check_device
from somp_ref.engines import HeadPursuit, PursuitOptions
from somp_ref.factored import Dictionary, rescaled
from somp_ref.pursuit import (
    DEPENDENT_TOL,
    GAIN_FLOOR,
    NORM_ORDER,
    STOP_REASONS,
    TIE_RTOL,
    ZERO_RESIDUAL,
    SompResult,
    explained_variance,
    pursuit_result,
    residual_energies,
)


def signal_energy(centered: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
    """:func:`somp_ref.decisions.signal_energy` elementwise on tensors: each centered
    energy, or 0 where it is zero to rounding (at most ``ZERO_RESIDUAL`` times the raw
    energy), so that rounding noise left by centering is not pursued."""
    return torch.where(centered <= ZERO_RESIDUAL * raw, torch.zeros_like(centered), centered)


@torch.no_grad()
def somp_batched(
    Ct: torch.Tensor,
    gram: torch.Tensor,
    energy: torch.Tensor,
    n_atoms: int,
    *,
    criterion: str = "l1",
    normalize: bool = True,
    tol: float = 0.0,
    coefficients: bool = True,
) -> dict[str, torch.Tensor]:
    """SOMP for a batch of problems sharing one dictionary.

    Parameters
    ----------
    Ct : Tensor of shape (batch, v, n)
        Correlations ``D H_b^T`` of each (centered) problem with every atom.
    gram : Tensor of shape (v, v)
        ``D D^T``.
    energy : Tensor of shape (batch,)
        ``||H_b||_F^2``.
    n_atoms : int
    criterion, normalize, tol
        As in :func:`somp_ref.somp`.
    coefficients : bool, default=True
        Solve for the coefficients (a ranking needs none).

    Returns
    -------
    dict
        "support" (batch, k) int64 padded with -1, "coef" (batch, n, k) zero-padded
        (absent without ``coefficients``),
        "gains" (batch, k) zero-padded, "n_selected" (batch,), "reason" (batch,) codes
        0 n_atoms, 1 tol, 2 converged, 3 exhausted.
    """
    batch, v, n = Ct.shape
    dtype, device = Ct.dtype, Ct.device
    k = min(n_atoms, v)
    R = Ct.clone()
    sq_norms = torch.diagonal(gram).clone()
    scale = torch.where(sq_norms > 0, sq_norms, torch.ones_like(sq_norms)).sqrt()
    if not normalize:
        scale = torch.ones_like(scale)
    rho2 = sq_norms.expand(batch, v).clone()
    blocked = (sq_norms <= 0).expand(batch, v).clone()
    U = torch.zeros(batch, k, v, dtype=dtype, device=device)
    At = torch.zeros(batch, k, n, dtype=dtype, device=device)
    support = torch.full((batch, k), -1, dtype=torch.long, device=device)
    gains = torch.zeros(batch, k, dtype=dtype, device=device)
    remaining = energy.clone()
    # somp_ref.decisions.tie_unit and window_scale: the tie window is unit * window_scale
    # of the best atom.
    unit = TIE_RTOL * energy.sqrt() * (n**0.5 if criterion == "l1" else 1.0)
    window_scale = torch.ones_like(sq_norms) if normalize else sq_norms.sqrt()
    active = energy > 0
    reason = torch.where(active, 0, 2).to(torch.long)
    rows = torch.arange(batch, device=device)
    for t in range(k):
        if tol > 0:
            met = active & (remaining <= tol * energy)
            reason[met] = 1
            active = active & ~met
        blocked |= rho2 <= DEPENDENT_TOL * sq_norms
        scores = torch.linalg.vector_norm(R, ord=NORM_ORDER[criterion], dim=-1) / scale
        scores = scores.masked_fill(blocked, -torch.inf)
        best, top = scores.max(dim=-1)
        # The tie rule: the lowest index within the tie window of the best score.
        tied = scores >= (best - unit * window_scale[top])[:, None]
        j = tied.to(torch.uint8).argmax(dim=-1)  # argmax returns the first maximum
        exhausted = active & (best == -torch.inf)
        reason[exhausted] = 3
        active = active & ~exhausted
        j = torch.where(active, j, 0)
        r = R[rows, j]  # (batch, n)
        rho2_j = rho2[rows, j]
        gain = (r * r).sum(-1) / torch.where(active, rho2_j, torch.ones_like(rho2_j))
        converged = active & (gain <= GAIN_FLOOR * energy)
        reason[converged] = 2
        active = active & ~converged
        if not bool(active.any()):
            break
        rho = torch.where(active, rho2_j, torch.ones_like(rho2_j)).sqrt()
        a = r / rho[:, None] * active[:, None]
        prior = torch.einsum("bt,btv->bv", U[rows, :t, j], U[:, :t]) if t else 0.0
        u = (gram[j] - prior) / rho[:, None] * active[:, None]
        rho2 = rho2 - u * u
        rho2[rows[active], j[active]] = 0.0
        R -= u[:, :, None] * a[:, None, :]
        U[:, t], At[:, t] = u, a
        support[active, t] = j[active]
        gains[:, t] = torch.where(active, gain, torch.zeros_like(gain))
        remaining = remaining - gains[:, t]
    n_selected = (support >= 0).sum(-1)
    out = {"support": support, "gains": gains, "n_selected": n_selected, "reason": reason}
    if coefficients:
        coef = torch.zeros(batch, n, k, dtype=dtype, device=device)
        for b in range(batch):
            t = int(n_selected[b])
            if t:
                L = U[b, :t, support[b, :t]].T  # lower Cholesky factor of the support's Gram
                coef[b, :, :t] = torch.linalg.solve_triangular(L.T, At[b, :t], upper=True).T
        out["coef"] = coef
    return out


def somp_torch(
    H: Any,
    D: Any,
    n_atoms: int = 50,
    *,
    center: bool = True,
    normalize: bool = True,
    criterion: str = "l1",
    tol: float = 0.0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
) -> SompResult:
    """Single-problem SOMP on any torch device, same calling convention as
    :func:`somp_ref.somp` (usable as a port: ``somp-ref verify --port
    somp_ref.adapters.torch_somp:somp_torch``). Returns a numpy :class:`SompResult`."""
    H = torch.as_tensor(np.asarray(H, dtype=np.float64), device=device).to(dtype)
    D = torch.as_tensor(np.asarray(D, dtype=np.float64), device=device).to(dtype)
    mean = H.mean(dim=0) if center else torch.zeros(H.shape[1], dtype=dtype, device=device)
    Hc = H - mean
    energy = (Hc * Hc).sum()
    if center:
        energy = signal_energy(energy, (H * H).sum())
    out = somp_batched(
        (D @ Hc.T)[None],
        D @ D.T,
        energy[None],
        n_atoms,
        criterion=criterion,
        normalize=normalize,
        tol=tol,
    )
    t = int(out["n_selected"][0])
    energy = float(energy.double())
    gains = out["gains"][0, :t].double().cpu().numpy()
    return pursuit_result(
        out["support"][0, :t].cpu().numpy().astype(np.int64),
        out["coef"][0, :, :t].double().cpu().numpy(),
        residual_energies(energy, gains),
        STOP_REASONS[int(out["reason"][0])],
        mean.double().cpu().numpy(),
    )


class TorchEngine:
    """The ``"torch"`` engine of :func:`somp_ref.ranking.rank_heads`: a layer's heads pursued
    together with :func:`somp_batched` on ``device`` (CPU, CUDA, ...).

    Parameters
    ----------
    device : str, default="cpu"
    dtype : torch.dtype, default=torch.float64
        float32 is about twice as fast on a GPU; supports may then part from numpy's where
        two atoms score within float32 rounding of each other.
    """

    name = "torch"

    def __init__(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float64):
        check_device(str(device))  # before any layer is read: not a traceback after them
        self.device = torch.device(device)
        self.dtype = dtype

    def pursue_layers(self, layers, dictionary, n_atoms, options):
        """SOMP of every head of each layer (see :class:`somp_ref.engines.Engine`)."""
        for layer, z, o_proj in layers:
            yield layer, self.pursue_layer(z, o_proj, dictionary, n_atoms, options)

    @torch.no_grad()
    def pursue_layer(
        self,
        z: np.ndarray,
        o_proj: np.ndarray,
        dictionary: Dictionary,
        n_atoms: int,
        options: PursuitOptions,
    ) -> list[HeadPursuit]:
        """SOMP of every head of a layer (see :class:`somp_ref.engines.Engine`)."""
        if not options.normalize and dictionary.atom_exp is not None:
            raise ValueError(
                "the torch engine compares unnormalised scores of atoms as given; these atoms "
                "span more than float64's safe range: use engine='numpy' or normalize=True"
            )
        n, n_heads, d_head = z.shape
        as_tensor = partial(torch.tensor, dtype=self.dtype, device=self.device)  # copies
        z, _ = rescaled(np.asarray(z, dtype=np.float64))  # EV and support are scale-free
        Z = as_tensor(z).permute(1, 0, 2)  # (heads, n, d_head)
        W = as_tensor(o_proj).reshape(-1, n_heads, d_head).permute(1, 0, 2)
        D = as_tensor(dictionary.atoms)
        gram_w = W.transpose(1, 2) @ W  # (heads, d_head, d_head)
        raw = torch.einsum("hnd,hde,hne->h", Z, gram_w, Z)
        mean = Z.mean(dim=1, keepdim=True) if options.center else torch.zeros_like(Z[:, :1])
        Zc = Z - mean
        energy = torch.einsum("hnd,hde,hne->h", Zc, gram_w, Zc).clamp(min=0)
        if options.center:
            energy = signal_energy(energy, raw)
        Ct = torch.einsum("vm,hmd,hnd->hvn", D, W, Zc)  # (heads, v, n)
        out = somp_batched(
            Ct,
            D @ D.T,
            energy,
            min(n_atoms, D.shape[0]),
            criterion="l1" if options.order == 1 else "l2",
            normalize=options.normalize,
            tol=options.tol,
            coefficients=False,
        )
        results = []
        for head in range(n_heads):
            t = int(out["n_selected"][head])
            gains = out["gains"][head, :t].double().cpu().numpy()
            results.append(
                HeadPursuit(
                    out["support"][head, :t].cpu().numpy().astype(np.int64),
                    explained_variance(residual_energies(float(energy[head]), gains)),
                )
            )
        return results
