"""Engines: who pursues the heads of one layer for :func:`somp_ref.ranking.rank_heads`.

"numpy" is built in; others (``"torch"``, on any device, from the ``hf`` extra) are found
through the ``somp_ref.engines`` entry points, so the core never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import NamedTuple, Protocol

import numpy as np

from somp_ref.factored import Dictionary, factored_path, rescaled

ENGINE_GROUP = "somp_ref.engines"


@dataclass(frozen=True)
class PursuitOptions:
    """SOMP's options, as :func:`somp_ref.somp` takes them (``order``: 1 for "l1")."""

    center: bool
    normalize: bool
    order: int
    tol: float


class HeadPursuit(NamedTuple):
    """What a ranking keeps of one head's SOMP (no coefficients: nothing ranks by them).

    Attributes
    ----------
    support : ndarray of shape (t,), int64
        Chosen atoms (indices into the dictionary) in order.
    explained_variance : ndarray of shape (t + 1,)
        As :attr:`somp_ref.SompResult.explained_variance`.
    """

    support: np.ndarray
    explained_variance: np.ndarray


class Engine(Protocol):
    """Pursues every head of one layer; :func:`rank_heads` does everything else."""

    name: str

    def pursue_layer(
        self,
        z: np.ndarray,
        o_proj: np.ndarray,
        dictionary: Dictionary,
        n_atoms: int,
        options: PursuitOptions,
    ) -> list[HeadPursuit]:
        """SOMP of each head of a layer.

        Parameters
        ----------
        z : ndarray of shape (n_samples, n_heads, d_head)
            As stored (any float dtype, possibly memory-mapped), checked finite.
        o_proj : ndarray of shape (d_model, n_heads * d_head), float64
            Rescaled into the safe range (:func:`somp_ref.factored.rescaled`).
        dictionary : Dictionary
        n_atoms : int
        options : PursuitOptions

        Returns
        -------
        list of HeadPursuit
            One per head; explained variance and support as
            :func:`somp_ref.factored.head_somp` returns them.
        """
        ...


class NumpyEngine:
    """The reference engine: :func:`somp_ref.factored.factored_path`, head by head.

    Each head's z is widened to float64 alone, so memory stays at one head's samples.
    "l1" pursues each head's (v, n) correlations with the lazy argmax; "l2" pursues in
    the head's d_head-dimensional sample space (no v x n product at all). The large
    products use every BLAS thread, the pursuits one
    (:func:`somp_ref.factored.one_blas_thread`); ``score_heads(workers=N)`` runs layers in
    N processes for the rest of the cores.
    """

    name = "numpy"

    def pursue_layer(self, z, o_proj, dictionary, n_atoms, options):
        d_head = z.shape[2]
        projected = dictionary.atoms @ o_proj  # (v, n_heads * d_head): every E_h at once
        results = []
        for head in range(z.shape[1]):
            cols = slice(head * d_head, (head + 1) * d_head)
            z_head, _ = rescaled(np.asarray(z[:, head], dtype=np.float64))
            head_path = factored_path(
                z_head,
                o_proj[:, cols],
                projected[:, cols],
                dictionary,
                n_atoms,
                center=options.center,
                normalize=options.normalize,
                order=options.order,
                tol=options.tol,
            )
            results.append(HeadPursuit(head_path.path.support, head_path.explained_variance()))
        return results


def load_engine(name: str, device: str | None = None) -> Engine:
    """The engine called ``name``: "numpy", or one installed under ``somp_ref.engines``."""
    if name == "numpy":
        if device not in (None, "cpu"):
            raise ValueError(f"the numpy engine runs on the CPU; for {device!r} use engine='torch'")
        return NumpyEngine()
    found = {entry.name: entry for entry in entry_points(group=ENGINE_GROUP)}
    if name not in found:
        raise ValueError(f"unknown engine {name!r}; installed: {', '.join(['numpy', *found])}")
    try:
        factory = found[name].load()
    except ImportError as err:
        raise ImportError(
            f"engine {name!r} needs the hf extra: pip install torch==2.13.0 'somp-ref[hf]' ({err})"
        ) from err
    return factory(device=device or "cpu")
