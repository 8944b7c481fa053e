"""The one loop over a store's layers behind every ranking.

It validates the store's data (finite values), reads each layer once, hands the layer to
an engine (SOMP) or scores it directly (the Logit Lens), and builds the
:class:`~somp_ref.head_scores.HeadScores`; the rankings of :mod:`somp_ref.ranking` are built
from its results.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from somp_ref.engines import PursuitOptions, load_engine
from somp_ref.factored import Dictionary, mean_concept_logits, rescaled
from somp_ref.head_scores import Head, HeadScores
from somp_ref.progress import progress
from somp_ref.provenance import ranking_source
from somp_ref.pursuit import NORM_ORDER
from somp_ref.store import ActivationStore, StoreError
from somp_ref.validation import check_choice, check_flag, check_positive_int, check_tolerance

#: What the loop itself computes: SOMP's explained variance, and the mean concept logit.
LOOP_METHODS = ("somp", "ll")


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


def _layers(store: ActivationStore, chosen: list[int], desc: str, show: bool):
    """Yield (layer, z (n, heads, d_head) as stored, o_proj (d_model, heads * d_head) in
    float64 rescaled into the safe range, o_proj's exponent), every value checked finite.
    """
    for layer in progress(chosen, desc=desc, enabled=show):
        z, o_proj = store.layer(layer)
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
    show_progress : bool, default=True
        A progress bar over layers on stderr (on a terminal).

    Returns
    -------
    HeadScores
        ``details["explained_variance"]`` for "somp".
    """
    check_choice(method, "method", LOOP_METHODS)
    n_atoms = check_positive_int(n_atoms, "n_atoms")
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
    for layer, z, o_proj, o_exp in _layers(store, chosen, f"rank ({method})", show_progress):
        if method == "somp":
            results = pursuer.pursue_layer(z, o_proj, dictionary, n_atoms, options)
            for head, res in enumerate(results):
                score[layer, head] = res.explained_variance[-1]
                supports[layer, head] = ids[res.support]
                increments[layer, head] = np.diff(res.explained_variance)
        else:
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


def _token_strings(store: ActivationStore, ids: np.ndarray) -> list[str] | None:
    vocab = store.vocab()
    return None if vocab is None else [vocab[i] for i in ids]

