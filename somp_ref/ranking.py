"""Rank a store's heads for a concept: every method behind one name, :func:`rank_heads`.

"somp" (the paper's explained variance) and "ll" (the paper's Logit Lens baseline) come
straight from the layer loop (:mod:`somp_ref.head_loop`); "specificity", "excess" and
"share" compare the concept with null dictionaries (:mod:`somp_ref.null_dictionaries`) to
find heads that write the concept rather than heads that explain any token set.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from somp_ref.factored import head_somp
from somp_ref.head_loop import score_heads
from somp_ref.head_scores import HeadScores
from somp_ref.layer_reads import check_finite, checked_atoms
from somp_ref.null_dictionaries import (
    frequent_word_pool,
    matched_draws,
    random_draws,
    word_token_pool,
)
from somp_ref.store import ActivationStore
from somp_ref.validation import check_choice

#: Every ranking :func:`rank_heads` offers (see its ``method``).
METHODS = ("somp", "ll", "specificity", "excess", "share")
#: The ranking :func:`rank` and the command line use unless told otherwise: chosen by the
#: selection study on validation splits (README, "Choosing the default ranking").
DEFAULT_METHOD = "specificity"
#: The competing dictionary of "share": the most frequent word tokens (about as many as
#: the common words of English a model's vocabulary spells as one token).
SHARE_POOL = 8192
#: SOMP atoms per head unless told otherwise (:func:`rank_heads`, :func:`rank`,
#: :func:`head_signature` and every command's ``--atoms``): the paper's number.
DEFAULT_ATOMS = 50
#: Null dictionaries behind "specificity" and "excess" unless told otherwise (the API's
#: ``n_null`` and the command line's ``--null``): the number the README's selection study
#: was measured with.
DEFAULT_NULL = 6


def rank_heads(
    store: ActivationStore,
    token_ids: Sequence[int],
    n_atoms: int = DEFAULT_ATOMS,
    method: str = "somp",
    *,
    n_null: int = DEFAULT_NULL,
    seed: int = 0,
    **options: Any,
) -> HeadScores:
    """Score every head of a store against a concept's tokens.

    Parameters
    ----------
    store : ActivationStore
    token_ids : sequence of int
        The concept: rows of the unembedding used as atoms (duplicates dropped).
    n_atoms : int, default=DEFAULT_ATOMS (50)
        SOMP atoms per head (capped by the dictionary's size), as the paper.
    method : {"somp", "ll", "specificity", "excess", "share"}, default="somp"
        - "somp": SOMP's explained variance after ``n_atoms`` (the paper's ranking);
        - "ll": the mean logit the head gives the concept's tokens (the paper's Logit Lens
          baseline);
        - "specificity": the explained variance as a z-score against ``n_null``
          dictionaries of random word tokens of the concept's size;
        - "excess": the explained variance minus its mean over ``n_null`` dictionaries
          matched token by token in leading space, case, length and frequency
          (:func:`somp_ref.null_dictionaries.matched_draws`);
        - "share": the variance the concept's tokens explain when SOMP chooses among the
          concept and the ``SHARE_POOL`` most frequent word tokens at once.
    n_null, seed : int, default=DEFAULT_NULL (6), 0
        Null dictionaries of "specificity" and "excess" and the seed that draws them.
    **options
        Passed to :func:`somp_ref.head_loop.score_heads`: center, normalize, criterion,
        tol, layers, exclude_layers, engine ("numpy" or "torch"), device, workers (numpy:
        layers pursued in that many processes, the same scores), show_progress.

    Returns
    -------
    HeadScores
        ``details["explained_variance"]`` for every method but "ll".
    """
    check_choice(method, "method", METHODS)
    if method in ("somp", "ll"):
        return score_heads(store, token_ids, n_atoms, method, **options)
    concept = score_heads(store, token_ids, n_atoms, "somp", **options)
    if method == "share":
        return _share(store, concept, n_atoms, options)
    if n_null < 2:
        raise ValueError(f"n_null must be >= 2 to estimate a spread, got {n_null}")
    vocab = store.vocab()
    if method == "excess" and vocab is not None:
        draws = matched_draws(vocab, concept.token_ids, n_null, seed)
    else:  # without the vocabulary's strings nothing can be matched: uniform draws
        pool = word_token_pool(vocab, store.unembed().shape[0])
        draws = random_draws(pool, concept.token_ids, n_null, seed)
    nulls = np.stack([score_heads(store, ids, n_atoms, "somp", **options).score for ids in draws])
    mean, std = nulls.mean(axis=0), nulls.std(axis=0, ddof=1)
    if method == "specificity":
        score = (concept.score - mean) / np.maximum(std, np.finfo(np.float64).tiny)
    else:
        score = concept.score - mean
    return replace(
        concept,
        score=score,
        method=method,
        params={**concept.params, "n_null": n_null, "seed": seed},
        details={"explained_variance": concept.score, "null_mean": mean, "null_std": std},
    )


def specificity_scores(
    store: ActivationStore,
    token_ids: Sequence[int],
    n_atoms: int = DEFAULT_ATOMS,
    **options: Any,
) -> HeadScores:
    """:func:`rank_heads` with ``method="specificity"``: the concept's explained variance
    as a z-score against random word-token dictionaries of its size."""
    return rank_heads(store, token_ids, n_atoms, "specificity", **options)


def _share(
    store: ActivationStore, concept: HeadScores, n_atoms: int, options: dict[str, Any]
) -> HeadScores:
    """The "share" ranking from the concept's own SOMP and one over the common words."""
    pool = frequent_word_pool(
        store.vocab(), store.unembed().shape[0], SHARE_POOL, concept.token_ids
    )
    words = score_heads(store, pool, n_atoms, "somp", **options)
    mine = set(concept.token_ids.tolist())
    share = np.full_like(words.score, np.nan)
    supports, increments = {}, {}
    for head, support in words.supports.items():
        own = np.array([int(t) in mine for t in support], dtype=bool)
        share[head] = float(words.increments[head][own].sum())
        supports[head], increments[head] = support[own], words.increments[head][own]
    return replace(
        concept,
        score=share,
        supports=supports,
        increments=increments,
        method="share",
        params={**concept.params, "pool": int(pool.size)},
        details={
            "explained_variance": concept.score,
            "explained_variance_words": words.score,
        },
    )


# ------------------------------------------------------------------ conveniences


def rank(
    store: ActivationStore | str | os.PathLike,
    concept: str | os.PathLike | Sequence[int],
    *,
    method: str = DEFAULT_METHOD,
    n_atoms: int = DEFAULT_ATOMS,
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
    n_atoms : int, default=DEFAULT_ATOMS (50)
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
        name = os.fspath(concept)
    else:
        token_ids, name = concept, None
    scores = rank_heads(store, token_ids, n_atoms, method, **options)
    return scores if name is None else scores.with_source(concept=name)


def head_signature(
    store: ActivationStore,
    layer: int,
    head: int,
    n_atoms: int = DEFAULT_ATOMS,
    token_ids: Sequence[int] | None = None,
) -> list[tuple[int, str, float]]:
    """A head's SOMP signature: the tokens it writes, with the explained variance each adds.

    Parameters
    ----------
    store : ActivationStore
    layer, head : int
    n_atoms : int, default=DEFAULT_ATOMS (50)
        Tokens in the signature, as ``inspect --atoms``.
    token_ids : sequence of int, optional
        Restrict the dictionary (default: the whole vocabulary).

    Returns
    -------
    list of (token_id, token_string, explained_variance_increment)
        In selection order, as in the paper's head-signature tables.
    """
    if not 0 <= head < store.n_heads:
        raise ValueError(f"head must be in [0, {store.n_heads}), got {head}")
    every_token = np.arange(store.unembed().shape[0])
    ids, atoms = checked_atoms(store, every_token if token_ids is None else token_ids)
    z_layer, o_proj = store.layer(layer)
    cols = slice(head * store.d_head, (head + 1) * store.d_head)
    z = check_finite(np.asarray(z_layer[:, head], dtype=np.float64), store, f"layer {layer}: z")
    res = head_somp(
        z,
        check_finite(
            np.asarray(o_proj[:, cols], dtype=np.float64), store, f"layer {layer}: o_proj"
        ),
        atoms,
        n_atoms,
    )
    vocab = store.vocab()
    chosen = ids[res.support]
    return [
        (int(t), vocab[t] if vocab else f"[{t}]", float(gain))
        for t, gain in zip(chosen, np.diff(res.explained_variance), strict=True)
    ]
