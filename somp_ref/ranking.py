"""Rank a store's heads by how much of what they write a concept's tokens account for.

One loop over layers (:func:`rank_heads`) serves every ranking method and every engine:
it validates the store's data, reads each layer once, and builds the result; an engine
only pursues a layer's heads (numpy here; ``"torch"``, on any device, from the ``hf``
extra through the ``somp_ref.engines`` entry points, so the core never imports torch).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Protocol

import numpy as np

from somp_ref.factored import (
    Dictionary,
    factored_somp,
    head_somp,
    mean_concept_logits,
    rescaled,
)
from somp_ref.head_scores import Head, HeadScores
from somp_ref.progress import progress
from somp_ref.pursuit import NORM_ORDER, SompResult
from somp_ref.store import ActivationStore, StoreError
from somp_ref.validation import check_choice, check_flag, check_positive_int, check_tolerance

#: Every ranking :func:`rank_heads` offers (see its ``method``).
METHODS = ("somp", "ll", "specificity")
#: The ranking :func:`rank` uses unless told otherwise.
DEFAULT_METHOD = "specificity"
ENGINE_GROUP = "somp_ref.engines"


@dataclass(frozen=True)
class PursuitOptions:
    """SOMP's options, as :func:`somp_ref.somp` takes them (``order``: 1 for "l1")."""

    center: bool
    normalize: bool
    order: int
    tol: float


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
    ) -> list[SompResult]:
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
        list of SompResult
            One per head; explained variance and support as
            :func:`somp_ref.factored.head_somp` returns them (coefficients may be in the
            units of rescaled inputs).
        """
        ...


class NumpyEngine:
    """The reference engine: :func:`somp_ref.factored.factored_somp`, head by head.

    Each head's z is widened to float64 alone, so memory stays at one head's samples.
    """

    name = "numpy"

    def pursue_layer(self, z, o_proj, dictionary, n_atoms, options):
        d_head = z.shape[2]
        projected = dictionary.atoms @ o_proj  # (v, n_heads * d_head): every E_h at once
        results = []
        for head in range(z.shape[1]):
            cols = slice(head * d_head, (head + 1) * d_head)
            z_head, _ = rescaled(np.asarray(z[:, head], dtype=np.float64))
            results.append(
                factored_somp(
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
            )
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


# ------------------------------------------------------------------ the loop


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


def _finite(values: np.ndarray, store: ActivationStore, what: str) -> np.ndarray:
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
            _finite(z[:, head], store, f"layer {layer}, head {head}: z (sample, d_head)")
        o_proj = _finite(np.asarray(o_proj, dtype=np.float64), store, f"layer {layer}: o_proj")
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


def rank_heads(
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
    n_null: int = 8,
    seed: int = 0,
    engine: str = "numpy",
    device: str | None = None,
    show_progress: bool = True,
) -> HeadScores:
    """Score every head of a store against a concept's tokens.

    Parameters
    ----------
    store : ActivationStore
    token_ids : sequence of int
        The concept: rows of the unembedding used as atoms (duplicates dropped).
    n_atoms : int, default=50
        SOMP atoms per head (capped by the number of tokens), as the paper.
    method : {"somp", "ll", "specificity"}, default="somp"
        "somp": SOMP's explained variance after ``n_atoms`` (the paper's ranking); "ll":
        the mean logit the head gives the concept's tokens (the paper's Logit Lens
        baseline); "specificity": the explained variance as a z-score against ``n_null``
        dictionaries of random word tokens of the concept's size (see
        :func:`specificity_scores`).
    center : bool, optional
        Center each head's samples before SOMP (default True, as the authors; "ll"
        ignores it).
    normalize, criterion, tol
        As in :func:`somp_ref.somp`.
    layers : iterable of int, optional
        Layers to rank (default all); ``exclude_layers`` are skipped. Unranked heads get NaN.
    n_null, seed : int
        Null dictionaries of "specificity" and the seed that draws them.
    engine : {"numpy", "torch"}, default="numpy"
        Who pursues each layer's heads; "torch" (the ``hf`` extra) batches them on
        ``device`` (e.g. "cuda").
    device : str, optional
    show_progress : bool, default=True
        A progress bar over layers on stderr.

    Returns
    -------
    HeadScores
        ``details["explained_variance"]`` for the SOMP-based methods.
    """
    check_choice(method, "method", METHODS)
    if method == "specificity":
        return specificity_scores(
            store,
            token_ids,
            n_atoms,
            n_null=n_null,
            seed=seed,
            center=center,
            normalize=normalize,
            criterion=criterion,
            tol=tol,
            layers=layers,
            exclude_layers=exclude_layers,
            engine=engine,
            device=device,
            show_progress=show_progress,
        )
    n_atoms = check_positive_int(n_atoms, "n_atoms")
    options = PursuitOptions(
        center=True if center is None else check_flag(center, "center"),
        normalize=check_flag(normalize, "normalize"),
        order=NORM_ORDER[check_choice(criterion, "criterion", NORM_ORDER)],
        tol=check_tolerance(tol),
    )
    unembed = store.unembed()
    ids = check_token_ids(token_ids, unembed.shape[0])
    atoms = _finite(np.asarray(unembed[ids], dtype=np.float64), store, "unembed (token, d_model)")
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
        source=_source(store),
        details={"explained_variance": score.copy()} if method == "somp" else {},
    )


def _token_strings(store: ActivationStore, ids: np.ndarray) -> list[str] | None:
    vocab = store.vocab()
    return None if vocab is None else [vocab[i] for i in ids]


def _source(store: ActivationStore) -> dict[str, Any]:
    meta = store.meta  # a fresh copy each access: read once
    keys = ("model_id", "family", "positions")
    return {key: meta[key] for key in keys if key in meta} | {"store": os.fspath(store.path)}


# ------------------------------------------------------------------ specificity

_WORD_TOKEN = re.compile(r"^ ?[A-Za-z]{3,}$")


def word_token_pool(vocab: list[str] | None, vocab_size: int) -> np.ndarray:
    """Token ids that look like words (an optional leading space, then 3+ ASCII letters);
    all ids when the vocabulary strings are unknown. The null dictionaries of
    :func:`specificity_scores` are drawn from it, so that they resemble concept tokens."""
    if vocab is None:
        return np.arange(vocab_size)
    return np.asarray(
        [i for i, text in enumerate(vocab) if _WORD_TOKEN.match(text)], dtype=np.int64
    )


def specificity_scores(
    store: ActivationStore,
    token_ids: Sequence[int],
    n_atoms: int = 50,
    *,
    n_null: int = 8,
    seed: int = 0,
    **options: Any,
) -> HeadScores:
    """How much better a concept explains each head than random token sets of its size.

    ``score = (EV_concept - mean(EV_null)) / std(EV_null)``: a z-score of the head's SOMP
    explained variance with the concept's dictionary against ``n_null`` dictionaries of
    the same number of random word-like tokens (see :func:`word_token_pool`, concept tokens
    excluded). Heads that explain *any* token set well, such as layer-0 heads that copy
    input embeddings in a model with tied embeddings, get a high raw EV but a low
    specificity; heads that write the concept stand out.

    Parameters
    ----------
    store : ActivationStore
    token_ids : sequence of int
    n_atoms : int, default=50
    n_null : int, default=8
        Random dictionaries in the null distribution (>= 2).
    seed : int, default=0
    **options
        Passed to :func:`rank_heads` (center, normalize, criterion, tol, layers,
        exclude_layers, engine, device, show_progress).

    Returns
    -------
    HeadScores
        ``method="specificity"``; ``details`` holds "explained_variance" (the concept's),
        "null_mean" and "null_std".
    """
    if n_null < 2:
        raise ValueError(f"n_null must be >= 2 to estimate a spread, got {n_null}")
    concept = rank_heads(store, token_ids, n_atoms, "somp", **options)
    pool = np.setdiff1d(word_token_pool(store.vocab(), store.unembed().shape[0]), concept.token_ids)
    if pool.size < concept.token_ids.size:
        raise ValueError(
            f"only {pool.size} candidate tokens for null dictionaries of {concept.token_ids.size}"
        )
    rng = np.random.default_rng(seed)
    draws = [rng.choice(pool, concept.token_ids.size, replace=False) for _ in range(n_null)]
    nulls = np.stack([rank_heads(store, ids, n_atoms, "somp", **options).score for ids in draws])
    mean, std = nulls.mean(axis=0), nulls.std(axis=0, ddof=1)
    z = (concept.score - mean) / np.maximum(std, np.finfo(np.float64).tiny)
    return HeadScores(
        score=z,
        supports=concept.supports,
        increments=concept.increments,
        method="specificity",
        params={**concept.params, "n_null": n_null, "seed": seed},
        token_ids=concept.token_ids,
        tokens=concept.tokens,
        source=concept.source,
        details={"explained_variance": concept.score, "null_mean": mean, "null_std": std},
    )


# ------------------------------------------------------------------ conveniences


def rank(
    store: ActivationStore | str | os.PathLike,
    concept: str | os.PathLike | Sequence[int],
    *,
    method: str = DEFAULT_METHOD,
    n_atoms: int = 50,
    **options: Any,
) -> HeadScores:
    """Rank a store's heads for a concept, in one call.

    Parameters
    ----------
    store : ActivationStore or path
    concept : str, path or sequence of int
        A shipped concept ("colors"), a word-list file, or token ids.
    method : str, default=DEFAULT_METHOD
        See :func:`rank_heads`.
    n_atoms : int, default=50
    **options
        Passed to :func:`rank_heads`.

    Examples
    --------
    >>> scores = rank("runs/colors", "colors")  # doctest: +SKIP
    >>> top_heads(scores, 8)  # doctest: +SKIP
    """
    from somp_ref.concepts import store_concept_ids

    if not isinstance(store, ActivationStore):
        store = ActivationStore.open(store)
    if isinstance(concept, (str, os.PathLike)):
        token_ids = store_concept_ids(store.vocab(), concept).ids
    else:
        token_ids = concept
    return rank_heads(store, token_ids, n_atoms, method, **options)


def head_signature(
    store: ActivationStore,
    layer: int,
    head: int,
    n_atoms: int = 20,
    token_ids: Sequence[int] | None = None,
) -> list[tuple[int, str, float]]:
    """A head's SOMP signature: the tokens it writes, with the explained variance each adds.

    Parameters
    ----------
    store : ActivationStore
    layer, head : int
    n_atoms : int, default=20
    token_ids : sequence of int, optional
        Restrict the dictionary (default: the whole vocabulary).

    Returns
    -------
    list of (token_id, token_string, explained_variance_increment)
        In selection order, as in the paper's head-signature tables.
    """
    if not 0 <= head < store.n_heads:
        raise ValueError(f"head must be in [0, {store.n_heads}), got {head}")
    unembed = store.unembed()
    ids = (
        np.arange(unembed.shape[0])
        if token_ids is None
        else check_token_ids(token_ids, unembed.shape[0])
    )
    z_layer, o_proj = store.layer(layer)
    cols = slice(head * store.d_head, (head + 1) * store.d_head)
    z = _finite(np.asarray(z_layer[:, head], dtype=np.float64), store, f"layer {layer}: z")
    res = head_somp(
        z,
        _finite(np.asarray(o_proj[:, cols], dtype=np.float64), store, f"layer {layer}: o_proj"),
        _finite(np.asarray(unembed[ids], dtype=np.float64), store, "unembed"),
        n_atoms,
    )
    vocab = store.vocab()
    chosen = ids[res.support]
    return [
        (int(t), vocab[t] if vocab else f"[{t}]", float(gain))
        for t, gain in zip(chosen, np.diff(res.explained_variance), strict=True)
    ]
