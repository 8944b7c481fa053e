"""The one loop over a store's layers behind every ranking.

It validates the store's data (finite values), reads each layer once, hands the layer to
an engine (SOMP) or scores it directly (the Logit Lens), and builds the
:class:`~somp_ref.head_scores.HeadScores`; the rankings of :mod:`somp_ref.ranking` are built
from its results.

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
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from somp_ref.engines import NumpyEngine, PursuitOptions, load_engine
from somp_ref.factored import Dictionary, mean_concept_logits, rescaled
from somp_ref.head_scores import Head, HeadScores
from somp_ref.progress import progress
from somp_ref.provenance import ranking_source
from somp_ref.pursuit import NORM_ORDER
from somp_ref.store import ActivationStore, StoreError
from somp_ref.validation import check_choice, check_flag, check_positive_int, check_tolerance

#: What the loop itself computes: SOMP's explained variance, and the mean concept logit.
LOOP_METHODS = ("somp", "ll")

#: The command line ranks in one process (its ``--workers`` default) when the ranked
#: layers hold fewer z values than this (n_samples x n_heads x d_head, summed): about one
#: layer of a 7B model (32 heads x 128 x 2000 samples, seconds of pursuit). Below it,
#: starting the processes (spawn: each imports numpy and the package and maps the
#: dictionary, about half a second) costs more than the pursuit saves; the embedded
#: SmolLM2's stores fall below it.
PARALLEL_MIN_VALUES = 2**23

#: Environment variables that size a BLAS thread pool when the library loads: set to 1
#: while the workers start, so that their BLAS starts with one thread (threadpoolctl,
#: when installed, also limits it once loaded).
_BLAS_THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


#: Samples of a layer's z checked finite at a time (4096 x 32 heads x 128: 16 MB of
#: booleans).
_FINITE_BLOCK = 4096


def check_token_ids(token_ids: Sequence[int], vocab_size: int) -> np.ndarray:
    """Validated token ids as int64 (n,), duplicates dropped, order kept."""
    ids = np.asarray(token_ids)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"token_ids must be a non-empty 1-D list, got shape {ids.shape}")
    if ids.dtype.kind not in "iu":
        raise TypeError(f"token_ids must be integers, got dtype {ids.dtype}")
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
        raise ValueError(
            f"token_ids must be in [0, {vocab_size}) (the unembedding's rows), got {bad[:5]}"
        )
    _, first = np.unique(ids, return_index=True)
    return ids[np.sort(first)].astype(np.int64)


def check_finite(values: np.ndarray, store: ActivationStore, what: str) -> np.ndarray:
    """``values`` unchanged, or a StoreError naming the first NaN/Inf entry.

    Stores refuse non-finite values when written; one that holds them was altered or
    written by other code, and no score computed from it would mean anything.
    """
    bad = ~np.isfinite(values)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise StoreError(
            f"{store.path}: {what} holds {values[index]} at {index}; the store is corrupt"
        )
    return values


def _chosen_layers(
    store: ActivationStore, layers: Iterable[int] | None, exclude_layers: Iterable[int]
) -> list[int]:
    excluded = set(exclude_layers)
    chosen = [
        int(layer)
        for layer in (range(store.n_layers) if layers is None else layers)
        if layer not in excluded
    ]
    for layer in chosen:
        if not 0 <= layer < store.n_layers:
            raise ValueError(f"layers must be in [0, {store.n_layers}), got {layer}")
    return chosen


def _all_finite(z: np.ndarray) -> bool:
    """Whether every value of a layer's z (n, heads, d_head) is finite, read in its stored
    order a block of samples at a time (head by head, the reads would be strided: seven
    times slower on a 7B layer, and the temporaries stay at one block)."""
    return all(
        np.isfinite(z[start : start + _FINITE_BLOCK]).all()
        for start in range(0, z.shape[0], _FINITE_BLOCK)
    )


def _layers(store: ActivationStore, chosen: list[int]):
    """Yield (layer, z (n, heads, d_head) as stored, o_proj (d_model, heads * d_head) in
    float64 rescaled into the safe range, o_proj's exponent), every value checked finite.
    """
    for layer in chosen:
        z, o_proj = store.layer(layer)
        if not _all_finite(z):  # name the first head that holds a NaN/Inf
            for head in range(store.n_heads):
                check_finite(z[:, head], store, f"layer {layer}, head {head}: z (sample, d_head)")
        o_proj = check_finite(np.asarray(o_proj, dtype=np.float64), store, f"layer {layer}: o_proj")
        yield (layer, z, *rescaled(o_proj))


def _mean_logits(
    z: np.ndarray, projected: np.ndarray, exponents: np.ndarray, store: ActivationStore, where: str
) -> np.ndarray:
    """Each atom's mean logit from one head in the units of the data as given (v,).

    ``projected`` is the rescaled ``D @ o_proj_head``; ``exponents`` (v,) the powers of two
    that undo the rescaling of o_proj and of each atom.
    """
    z, z_exp = rescaled(np.asarray(z, dtype=np.float64))
    with np.errstate(over="ignore"):
        logits = np.ldexp(mean_concept_logits(z, projected), exponents + z_exp)
    if not np.isfinite(logits).all():
        raise StoreError(f"{store.path}: {where}: a mean logit overflows float64")
    return logits


def score_heads(
    store: ActivationStore,
    token_ids: Sequence[int],
    n_atoms: int = 50,
    method: str = "somp",
    *,
    center: bool | None = None,
    normalize: bool = True,
    criterion: str = "l1",
    tol: float = 0.0,
    layers: Iterable[int] | None = None,
    exclude_layers: Iterable[int] = (),
    engine: str = "numpy",
    device: str | None = None,
    workers: int = 1,
    show_progress: bool = True,
) -> HeadScores:
    """Score every head of a store with SOMP ("somp") or the Logit Lens ("ll").

    Parameters
    ----------
    store : ActivationStore
    token_ids : sequence of int
        The dictionary: rows of the unembedding used as atoms (duplicates dropped).
    n_atoms : int, default=50
        SOMP atoms per head (capped by the number of tokens).
    method : {"somp", "ll"}, default="somp"
        "somp": SOMP's explained variance after ``n_atoms``; "ll": the mean logit the head
        gives the tokens.
    center : bool, optional
        Center each head's samples before SOMP (default True, as the authors; "ll"
        ignores it).
    normalize, criterion, tol
        As in :func:`somp_ref.somp`.
    layers : iterable of int, optional
        Layers to score (default all); ``exclude_layers`` are skipped. Unscored heads get NaN.
    engine : {"numpy", "torch"}, default="numpy"
        Who pursues each layer's heads (see :mod:`somp_ref.engines`).
    device : str, optional
    workers : int, default=1
        Processes pursuing layers at once (numpy engine; "ll" and a single layer ignore
        it). 1 runs in this process: a library spawns nothing unasked. The scores do not
        depend on it. Each call starts its own pool (about half a second: every worker
        imports the package and maps the dictionary, which the parent writes under
        ``$TMPDIR``), so it pays on stores of seconds a layer (see
        :data:`PARALLEL_MIN_VALUES`). The torch engine batches heads itself:
        ``workers > 1`` with it is a ValueError.
    show_progress : bool, default=True
        A progress bar over layers on stderr (on a terminal), advancing per layer.

    Returns
    -------
    HeadScores
        ``details["explained_variance"]`` for "somp".
    """
    check_choice(method, "method", LOOP_METHODS)
    n_atoms = check_positive_int(n_atoms, "n_atoms")
    workers = check_positive_int(workers, "workers")
    if workers > 1 and method == "somp" and engine != "numpy":
        raise ValueError(
            f"workers={workers} runs the numpy engine in processes; the {engine} engine "
            "batches a layer's heads itself: use workers=1"
        )
    options = PursuitOptions(
        center=True if center is None else check_flag(center, "center"),
        normalize=check_flag(normalize, "normalize"),
        order=NORM_ORDER[check_choice(criterion, "criterion", NORM_ORDER)],
        tol=check_tolerance(tol),
    )
    unembed = store.unembed()
    ids = check_token_ids(token_ids, unembed.shape[0])
    atoms = check_finite(
        np.asarray(unembed[ids], dtype=np.float64), store, "unembed (token, d_model)"
    )
    chosen = _chosen_layers(store, layers, exclude_layers)
    pursuer = load_engine(engine, device) if method == "somp" else None
    dictionary = Dictionary.build(atoms)
    score = np.full((store.n_layers, store.n_heads), np.nan)
    supports: dict[Head, np.ndarray] = {}
    increments: dict[Head, np.ndarray] = {}
    if not chosen:
        raise ValueError(f"no layer left to rank (layers {layers}, excluded {exclude_layers})")
    atom_exp = dictionary.exponents()
    desc = f"rank ({method})"
    if method == "somp":
        if workers > 1 and len(chosen) > 1:
            pursued = _pursued_in_workers(
                store, ids, dictionary, chosen, n_atoms, options, workers, desc, show_progress
            )
        else:
            pursued = _pursued(
                store, chosen, pursuer, dictionary, n_atoms, options, desc, show_progress
            )
        # closing: an error here (an interrupt) stops the workers and removes their files
        # at once, not when the traceback is freed.
        with contextlib.closing(pursued):
            for layer, results in pursued:
                for head, (support, explained) in enumerate(results):
                    score[layer, head] = explained[-1]
                    supports[layer, head] = ids[support]
                    increments[layer, head] = np.diff(explained)
    else:
        for layer, z, o_proj, o_exp in progress(
            _layers(store, chosen), desc=desc, enabled=show_progress, total=len(chosen)
        ):
            projected = dictionary.atoms @ o_proj
            d_head = store.d_head
            for head in range(store.n_heads):
                cols = slice(head * d_head, (head + 1) * d_head)
                where = f"layer {layer}, head {head}"
                logits = _mean_logits(
                    z[:, head], projected[:, cols], atom_exp + o_exp, store, where
                )
                order = np.argsort(-logits, kind="stable")[:n_atoms]
                # The mean as a sum of logit / v: no partial sum can overflow.
                score[layer, head] = float(np.sum(logits / logits.size))
                supports[layer, head] = ids[order]
                increments[layer, head] = logits[order]
    params = {
        "n_atoms": n_atoms,
        "criterion": criterion,
        "normalize": options.normalize,
        "tol": options.tol,
        "layers": chosen,
        "exclude_layers": sorted(set(exclude_layers)),
    }
    if method == "somp":
        params |= {"center": options.center, "engine": pursuer.name}
    return HeadScores(
        score=score,
        supports=supports,
        increments=increments,
        method=method,
        params=params,
        token_ids=ids,
        tokens=_token_strings(store, ids),
        source=ranking_source(store, ids),
        details={"explained_variance": score.copy()} if method == "somp" else {},
    )


#: What a pursued layer hands back: per head, its support and explained variance.
LayerResults = list[tuple[np.ndarray, np.ndarray]]


def _pursued(
    store: ActivationStore,
    chosen: list[int],
    pursuer,
    dictionary: Dictionary,
    n_atoms: int,
    options: PursuitOptions,
    desc: str,
    show: bool,
) -> Iterator[tuple[int, LayerResults]]:
    """(layer, results) for each chosen layer, pursued in this process (the bar advances
    as layers are pursued: an engine may read the next layer sooner)."""
    layers = ((layer, z, o_proj) for layer, z, o_proj, _ in _layers(store, chosen))
    pursued = pursuer.pursue_layers(layers, dictionary, n_atoms, options)
    with contextlib.closing(pursued):
        for layer, results in progress(pursued, desc=desc, enabled=show, total=len(chosen)):
            yield layer, [(res.support, res.explained_variance) for res in results]


def _pursued_in_workers(
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
        with _one_blas_thread_for_children():  # the processes start at submit()
            futures = [pool.submit(_pursue_in_worker, layer) for layer in chosen]
        for layer, future in zip(progress(chosen, desc=desc, enabled=show), futures, strict=True):
            yield layer, future.result()


@contextlib.contextmanager
def _one_blas_thread_for_children() -> Iterator[None]:
    """Set every BLAS thread-count variable to 1 in this process's environment (which
    the spawned workers inherit), and restore them after."""
    saved = {name: os.environ.get(name) for name in _BLAS_THREAD_VARIABLES}
    os.environ.update(dict.fromkeys(_BLAS_THREAD_VARIABLES, "1"))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


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
    with contextlib.suppress(ImportError):  # the environment already asked for 1 thread
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    store = ActivationStore.open(path)
    if directory is None:
        atoms = check_finite(
            np.asarray(store.unembed()[ids], dtype=np.float64), store, "unembed (token, d_model)"
        )
        dictionary = Dictionary.build(atoms)
    else:
        dictionary = _mapped_dictionary(Path(directory))
    _WORKER.update(store=store, dictionary=dictionary, n_atoms=n_atoms, options=options)


def _pursue_in_worker(layer: int) -> LayerResults:
    """One layer's (support, explained variance) per head, in a worker."""
    state = _WORKER
    ((_, results),) = _pursued(
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


def _token_strings(store: ActivationStore, ids: np.ndarray) -> list[str] | None:
    vocab = store.vocab()
    return None if vocab is None else [vocab[i] for i in ids]
