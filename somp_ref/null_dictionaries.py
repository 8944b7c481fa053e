"""Null dictionaries: token sets a concept is compared with, so that a head that explains
any token set well (a layer-0 head copying input embeddings, under tied embeddings) does
not pass for one that writes the concept."""

from __future__ import annotations

import math
import re
from collections import defaultdict

import numpy as np

_WORD_TOKEN = re.compile(r"^ ?[A-Za-z]{3,}$")
#: A matched null token is drawn among this many candidates closest in frequency.
MATCH_CANDIDATES = 30
#: Fewer candidates of the exact letter count than this: allow one letter more or less.
MIN_EXACT_LENGTH = 20


def word_token_pool(vocab: list[str] | None, vocab_size: int) -> np.ndarray:
    """Token ids that look like words (an optional leading space, then 3+ ASCII letters);
    all ids when the vocabulary strings are unknown."""
    if vocab is None:
        return np.arange(vocab_size)
    return np.asarray(
        [i for i, text in enumerate(vocab) if _WORD_TOKEN.match(text)], dtype=np.int64
    )


def random_draws(
    pool: np.ndarray, concept: np.ndarray, n_draws: int, seed: int
) -> list[np.ndarray]:
    """``n_draws`` sets of ``concept.size`` tokens drawn uniformly from ``pool`` minus the
    concept."""
    pool = np.setdiff1d(pool, concept)
    if pool.size < concept.size:
        raise ValueError(
            f"only {pool.size} candidate tokens for null dictionaries of {concept.size}"
        )
    rng = np.random.default_rng(seed)
    return [np.sort(rng.choice(pool, concept.size, replace=False)) for _ in range(n_draws)]


def matched_draws(
    vocab: list[str], concept: np.ndarray, n_draws: int, seed: int
) -> list[np.ndarray]:
    """Null sets matched token by token on what the unembedding of a token depends on
    besides its meaning: a leading space, the first letter's case, the letter count, and
    the frequency.

    Frequency is taken from the token id: a BPE vocabulary numbers its merges in the order
    they were learned, most frequent first, so nearby ids (on a log scale) have similar
    frequencies. Each concept token is matched by a word token with the same space and case,
    the same letter count (one more or less where fewer than ``MIN_EXACT_LENGTH`` share it),
    drawn among the ``MATCH_CANDIDATES`` closest by log id, without repeats in a set.

    Parameters
    ----------
    vocab : list of str
        The vocabulary strings, one per unembedding row.
    concept : ndarray of int64
        The concept's token ids (word-like: see :func:`word_token_pool`).
    n_draws, seed : int

    Returns
    -------
    list of ndarray
        ``n_draws`` sorted arrays of ``concept.size`` token ids disjoint from the concept.
    """
    taken = set(concept.tolist())
    groups: dict[tuple[bool, bool], list[tuple[int, int]]] = defaultdict(list)
    for i in word_token_pool(vocab, len(vocab)).tolist():
        if i not in taken:
            word = vocab[i].lstrip(" ")
            groups[vocab[i].startswith(" "), word[0].isupper()].append((len(word), i))
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_draws):
        chosen: set[int] = set()
        for token in concept.tolist():
            text = vocab[token]
            word = text.lstrip(" ") or text
            group = [(n, i) for n, i in groups[text.startswith(" "), word[:1].isupper()]]
            free = [(n, i) for n, i in group if i not in chosen]
            same = [i for n, i in free if n == len(word)]
            if len(same) < MIN_EXACT_LENGTH:
                same = [i for n, i in free if abs(n - len(word)) <= 1]
            if not same:
                raise ValueError(f"no word token matches {text!r} for a null dictionary")
            distance = [abs(math.log(i + 1) - math.log(token + 1)) for i in same]
            nearest = [same[j] for j in np.argsort(distance, kind="stable")[:MATCH_CANDIDATES]]
            chosen.add(int(rng.choice(nearest)))
        draws.append(np.asarray(sorted(chosen), dtype=np.int64))
    return draws


def frequent_word_pool(
    vocab: list[str] | None, vocab_size: int, size: int, concept: np.ndarray
) -> np.ndarray:
    """The ``size`` most frequent word tokens (lowest BPE ids) and the concept's tokens: the
    competing dictionary of the "share" ranking."""
    words = word_token_pool(vocab, vocab_size)
    words = np.setdiff1d(words, concept)[:size]
    return np.union1d(words, concept)
