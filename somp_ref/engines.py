"""Engines: who pursues the heads of one layer for :func:`somp_ref.ranking.rank_heads`.

"numpy" is built in; others (``"torch"``, on any device, from the ``hf`` extra) are found
through the ``somp_ref.engines`` entry points, so the core never imports torch.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import NamedTuple, Protocol

import numpy as np

from somp_ref.errors import MissingExtraError
from somp_ref.factored import (
    Dictionary,
    HeadProblem,
    head_problem,
    pursue_head,
    rescaled,
)
from somp_ref.prefetch import Slot, Slots, Timing, can_overlap, pursued_in_turn
from somp_ref.pursuit import explained_variance, residual_energies

ENGINE_GROUP = "somp_ref.engines"

#: How to install the ``hf`` extra (torch, transformers, ...), pinned to the torch release
#: the tests run: the hint of every error that needs it (here and the model commands).
HF_INSTALL = "pip install torch==2.13.0 'somp-ref[hf]'"

#: For l1, the numpy engine makes ``D W_O`` this many columns (whole heads) at a time:
#: small enough to be made during a few pursuits, and nearly as fast as the whole layer's
#: product (on 2 cores, 10% slower a 7B layer; a head's 128 columns alone: 50% slower,
#: each call packing D again). The same calls in every mode; l2 makes the whole layer's
#: at once.
PRODUCT_COLUMNS = 512

#: Heads prepared ahead of the one pursued, when overlapped: enough to carry the
#: pursuits over the product of the next :data:`PRODUCT_COLUMNS` (one head in four pays
#: for it, several times the cost of the other three's products).
PREFETCHED = 3

#: At most this much memory for the prepared heads' (v, n_samples) l1 correlations (16 MB
#: each at 7B shape, 1000 atoms and 2000 samples): fewer heads ahead past it, and no
#: overlap where one alone is more (then memory stays at the pursued head's).
PREFETCH_BYTES = 2**28


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


#: What an engine is handed: (layer, z, o_proj) per layer, in order (see :class:`Engine`).
Layers = Iterable[tuple[int, np.ndarray, np.ndarray]]


class Engine(Protocol):
    """Pursues every head of the layers it is handed; :func:`rank_heads` does the rest."""

    name: str

    def pursue_layers(
        self, layers: Layers, dictionary: Dictionary, n_atoms: int, options: PursuitOptions
    ) -> Iterator[tuple[int, list[HeadPursuit]]]:
        """SOMP of each head of each layer, a layer's results as soon as it is done.

        Parameters
        ----------
        layers : iterable of (int, ndarray, ndarray)
            Each layer's index, z of shape (n_samples, n_heads, d_head) as stored (any
            float dtype, possibly memory-mapped, checked finite) and o_proj of shape
            (d_model, n_heads * d_head), float64, rescaled into the safe range
            (:func:`somp_ref.factored.rescaled`). Read lazily: an engine may read the
            next layer while it pursues one.
        dictionary : Dictionary
        n_atoms : int
        options : PursuitOptions

        Yields
        ------
        (int, list of HeadPursuit)
            A layer's index and one result per head; explained variance and support as
            :func:`somp_ref.factored.head_somp` returns them.
        """
        ...


class _Prepared(NamedTuple):
    """A head ready for its pursuit, and where it belongs."""

    place: tuple[int, int, int]  # layer, head, heads in the layer
    ends_product: bool  # the last head of its share of D W_O
    problem: HeadProblem
    slot: Slot


class NumpyEngine:
    """The reference engine: :func:`somp_ref.factored.head_problem` and
    :func:`somp_ref.factored.pursue_head`, head by head.

    Each head's z is widened to float64 alone, so memory stays at one head's samples, and
    ``E_h = D W_O[:, h]`` is made for a few heads at a time (l1: :data:`PRODUCT_COLUMNS`)
    or the whole layer (l2). "l1" pursues each head's (v, n) correlations with the lazy
    argmax; "l2" pursues in the head's d_head-dimensional sample space (no v x n product
    at all) where the head has more samples than d_head, else on its correlations as l1.
    The pursuits run BLAS on one thread
    (:func:`somp_ref.blas_threads.one_blas_thread`); with ``overlap`` the next heads' products
    (and layers' reads) are made meanwhile by a second thread, where that pays
    (:mod:`somp_ref.prefetch`: l1 only, whose pursuits are the longer, and within
    :data:`PREFETCH_BYTES`), else on every BLAS thread between pursuits.
    ``score_heads(workers=N)`` runs layers in N processes, each with ``overlap=False``.
    """

    name = "numpy"

    def __init__(self, *, overlap: bool = True) -> None:
        self.overlap = overlap

    def pursue_layers(self, layers, dictionary, n_atoms, options):
        layers = iter(layers)
        first = next(layers, None)
        if first is None:
            return
        n_samples = first[1].shape[0]
        layers = _put_back(first, layers)
        del first  # the layer's arrays go with the prefetch, not with this frame
        ahead = PREFETCH_BYTES // (8 * dictionary.atoms.shape[0] * n_samples)
        overlap = self.overlap and options.order == 1 and ahead > 0 and can_overlap()
        slots = Slots(1 + min(ahead, PREFETCHED) if overlap else 1)
        timing = Timing()

        def pursue(prepared: _Prepared) -> tuple[tuple[int, int, int], HeadPursuit]:
            path = pursue_head(
                prepared.problem,
                dictionary,
                n_atoms,
                normalize=options.normalize,
                order=options.order,
                tol=options.tol,
            )
            energies = residual_energies(prepared.problem.energy, path.gains)
            explained = explained_variance(energies)
            slots.give_back(prepared.slot)  # its buffer may now be written again
            return prepared.place, HeadPursuit(path.support, explained)

        pursued = pursued_in_turn(
            _problems(layers, dictionary, options, slots, timing),
            pursue,
            overlap=overlap,
            slots=slots,
            timing=timing,
            probe_ends=lambda prepared: prepared.ends_product,
        )
        results: list[HeadPursuit] = []
        with contextlib.closing(pursued):  # an error here stops the prefetch at once
            for (layer, head, n_heads), result in pursued:
                results.append(result)
                if head == n_heads - 1:
                    yield layer, results
                    results = []


def _put_back(first: tuple, rest: Iterator[tuple]) -> Iterator[tuple]:
    """``first`` then ``rest``, holding ``first`` no longer than it is in use (unlike
    ``itertools.chain``, whose arguments live as long as it does: a whole layer)."""
    yield first
    del first
    yield from rest


def _problems(
    layers: Layers,
    dictionary: Dictionary,
    options: PursuitOptions,
    slots: Slots,
    timing: Timing,
) -> Iterator[_Prepared]:
    """Each head of each layer made ready for its pursuit, in order."""
    v = dictionary.atoms.shape[0]
    for layer, z, o_proj in layers:
        n_samples, n_heads, d_head = z.shape
        # l2 pursuits never overlap (its sample-space factor changes the BLAS limit: it must
        # not run beside a pursuit): its product for the whole layer, the fastest.
        per_product = max(1, PRODUCT_COLUMNS // d_head) if options.order == 1 else n_heads
        for first in range(0, n_heads, per_product):
            last = min(first + per_product, n_heads)
            start = time.perf_counter()
            projected = dictionary.atoms @ o_proj[:, first * d_head : last * d_head]
            timing.prepared += time.perf_counter() - start
            for head in range(first, last):
                slot = slots.take()  # waits while the pursuits are behind
                start = time.perf_counter()
                z_head, _ = rescaled(np.asarray(z[:, head], dtype=np.float64))
                own = slice((head - first) * d_head, (head - first + 1) * d_head)
                out = slot.buffer((v, n_samples)) if options.order == 1 else None
                problem = head_problem(
                    z_head,
                    o_proj[:, head * d_head : (head + 1) * d_head],
                    projected[:, own],
                    center=options.center,
                    order=options.order,
                    out=out,
                )
                timing.prepared += time.perf_counter() - start
                yield _Prepared((layer, head, n_heads), head == last - 1, problem, slot)


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
    except ModuleNotFoundError as err:  # not installed (a broken install keeps its traceback)
        raise MissingExtraError(
            f"engine {name!r} needs the hf extra: {HF_INSTALL} ({err})"
        ) from err
    return factory(device=device or "cpu")
