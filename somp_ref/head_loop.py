"""The one loop over a store's layers behind every ranking.

It reads each chosen layer once, checked finite (:mod:`somp_ref.layer_reads`), hands the
layers to an engine (SOMP), in this process or in a pool of processes
(:mod:`somp_ref.layer_pool`), or scores them directly (the Logit Lens), and builds the
:class:`~somp_ref.head_scores.HeadScores`; the rankings of :mod:`somp_ref.ranking` are built
from its results.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import numpy as np

from somp_ref.engines import PursuitOptions, load_engine
from somp_ref.factored import Dictionary, mean_concept_logits, rescaled
from somp_ref.head_scores import Head, HeadScores
from somp_ref.layer_pool import pursued_here, pursued_in_workers
from somp_ref.layer_reads import checked_atoms, checked_layers
from somp_ref.progress import progress
from somp_ref.provenance import ranking_source
from somp_ref.pursuit import NORM_ORDER
from somp_ref.store import ActivationStore, StoreError
from somp_ref.validation import check_choice, check_flag, check_positive_int, check_tolerance

#: What the loop itself computes: SOMP's explained variance, and the mean concept logit.
LOOP_METHODS = ("somp", "ll")


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
        :data:`~somp_ref.layer_pool.PARALLEL_MIN_VALUES`). The torch engine batches heads itself:
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
    ids, atoms = checked_atoms(store, token_ids)
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
            pursued = pursued_in_workers(
                store, ids, dictionary, chosen, n_atoms, options, workers, desc, show_progress
            )
        else:
            pursued = pursued_here(
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
            checked_layers(store, chosen), desc=desc, enabled=show_progress, total=len(chosen)
        ):
            projected = dictionary.atoms @ o_proj
            d_head = store.d_head
            for head in range(store.n_heads):
                cols = slice(head * d_head, (head + 1) * d_head)
                where = f"layer {layer}, head {head}"
                logits = _mean_logits(
                    z[:, head], projected[:, cols], atom_exp + o_exp[head], store, where
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


def _token_strings(store: ActivationStore, ids: np.ndarray) -> list[str] | None:
    vocab = store.vocab()
    return None if vocab is None else [vocab[i] for i in ids]
