"""Who pursues a ranking's layers: this process, or a pool of processes.

With ``workers > 1`` the numpy engine's layers are pursued by a pool of processes (spawn
start method: safe with threads and any BLAS). Each worker opens the store by its path,
limits its BLAS to one thread, memory-maps the parent's dictionary (written once to a
temporary directory, removed afterwards) and pursues the layers it is handed; the
parent gathers the results in layer order, so the scores are those of ``workers=1``: each
head's arithmetic is the same calls, only who runs them changes, and on how many BLAS
threads (bit for bit where the BLAS rounds a product alike on any number of threads; see
"Ranking" in docs/ARCHITECTURE.md).
Where the dictionary cannot be written (no room under ``$TMPDIR``), each worker builds it
from the store as the parent did, with a warning.
A script that ranks with workers needs the usual ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import tempfile
import warnings
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from somp_ref.blas_threads import one_thread_from_now, one_thread_in_children
from somp_ref.engines import Engine, NumpyEngine, PursuitOptions
from somp_ref.factored import Dictionary
from somp_ref.layer_reads import checked_atoms, checked_layers
from somp_ref.progress import progress
from somp_ref.store import ActivationStore

#: The command line ranks in one process (its ``--workers`` default) when the ranked
#: layers hold fewer z values than this (n_samples x n_heads x d_head, summed): about one
#: layer of a 7B model (32 heads x 128 x 2000 samples, seconds of pursuit). Below it,
#: starting the processes (spawn: each imports numpy and the package and maps the
#: dictionary, about half a second) costs more than the pursuit saves; the embedded
#: SmolLM2's stores fall below it.
PARALLEL_MIN_VALUES = 2**23

#: What a pursued layer hands back: per head, its support and explained variance.
LayerResults = list[tuple[np.ndarray, np.ndarray]]


def pursued_here(
    store: ActivationStore,
    chosen: list[int],
    pursuer: Engine,
    dictionary: Dictionary,
    n_atoms: int,
    options: PursuitOptions,
    desc: str,
    show: bool,
) -> Iterator[tuple[int, LayerResults]]:
    """(layer, results) for each chosen layer, pursued in this process (the bar advances
    as layers are pursued: an engine may read the next layer sooner)."""
    layers = ((layer, z, o_proj) for layer, z, o_proj, _ in checked_layers(store, chosen))
    pursued = pursuer.pursue_layers(layers, dictionary, n_atoms, options)
    with contextlib.closing(pursued):
        for layer, results in progress(pursued, desc=desc, enabled=show, total=len(chosen)):
            yield layer, [(res.support, res.explained_variance) for res in results]


def pursued_in_workers(
    store: ActivationStore,
    ids: np.ndarray,
    dictionary: Dictionary,
    chosen: list[int],
    n_atoms: int,
    options: PursuitOptions,
    workers: int,
    desc: str,
    show: bool,
) -> Iterator[tuple[int, LayerResults]]:
    """(layer, results) for each chosen layer in order, pursued by a pool of processes."""
    context = multiprocessing.get_context("spawn")
    with contextlib.ExitStack() as stack:
        # The parent's dictionary reaches the workers as files they memory-map: its
        # products are the parent's, bit for bit, no worker recomputes the Gram matrix,
        # and the pages are shared (pickled, a 1000-atom dictionary of d_model 4096 took
        # 0.25 s to reach two workers; a whole vocabulary would be copied into each).
        # Where there is no room for it (a whole vocabulary is gigabytes), each worker
        # builds it from the store as the parent did.
        try:
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="somp-ref-"))
            _write_dictionary(dictionary, Path(directory))
        except OSError as err:
            warnings.warn(
                f"each ranking worker rebuilds the dictionary: it could not be written under "
                f"{tempfile.gettempdir()} ({err}); set TMPDIR to a roomier place",
                RuntimeWarning,
                stacklevel=4,
            )
            directory = None
        setup = (os.fspath(store.path), directory, ids, n_atoms, options)
        pool = stack.enter_context(
            ProcessPoolExecutor(
                min(workers, len(chosen)),
                mp_context=context,
                initializer=_start_worker,
                initargs=setup,
            )
        )
        # A worker error (a corrupt layer) must not wait for the other layers: cancel the
        # queue on the way out.
        stack.callback(pool.shutdown, wait=True, cancel_futures=True)
        with one_thread_in_children():  # the processes start at submit()
            futures = [pool.submit(_pursue_in_worker, layer) for layer in chosen]
        for layer, future in zip(progress(chosen, desc=desc, enabled=show), futures, strict=True):
            yield layer, future.result()


#: A worker's store, dictionary and options (set once by :func:`_start_worker`).
_WORKER: dict[str, Any] = {}


#: The arrays of a :class:`Dictionary`, as the workers receive them.
_DICTIONARY_ARRAYS = ("atoms", "sq_norms", "gram", "atom_exp")


def _write_dictionary(dictionary: Dictionary, directory: Path) -> None:
    """One ``.npy`` file per array of ``dictionary`` (those it has) in ``directory``."""
    for name in _DICTIONARY_ARRAYS:
        value = getattr(dictionary, name)
        if value is not None:
            np.save(directory / f"{name}.npy", value)


def _mapped_dictionary(directory: Path) -> Dictionary:
    """The dictionary :func:`_write_dictionary` wrote, its arrays memory-mapped (read-only)."""
    arrays = {
        name: np.load(path, mmap_mode="r") if (path := directory / f"{name}.npy").exists() else None
        for name in _DICTIONARY_ARRAYS
    }
    return Dictionary(**arrays)


def _start_worker(
    path: str, directory: str | None, ids: np.ndarray, n_atoms: int, options: PursuitOptions
) -> None:
    """Limit BLAS to 1 thread, open the store, map the parent's dictionary (or, without
    its files, build it from the store as the parent did)."""
    one_thread_from_now()
    store = ActivationStore.open(path)
    if directory is None:
        dictionary = Dictionary.build(checked_atoms(store, ids)[1])
    else:
        dictionary = _mapped_dictionary(Path(directory))
    _WORKER.update(store=store, dictionary=dictionary, n_atoms=n_atoms, options=options)


def _pursue_in_worker(layer: int) -> LayerResults:
    """One layer's (support, explained variance) per head, in a worker."""
    state = _WORKER
    ((_, results),) = pursued_here(
        state["store"],
        [layer],
        NumpyEngine(overlap=False),
        state["dictionary"],
        state["n_atoms"],
        state["options"],
        "",
        False,
    )
    return results
