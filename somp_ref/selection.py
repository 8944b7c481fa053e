"""Choosing heads from a ranking, and the random control the paper compares them with."""

from __future__ import annotations

import numbers
import random
from collections import Counter
from collections.abc import Iterable

from somp_ref.head_scores import Head, HeadScores


def top_heads(scores: HeadScores, k: int) -> list[Head]:
    """The ``k`` best heads, best first (ties: lower layer, then lower head). NaN never."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
        raise ValueError(f"k must be an integer >= 0, got {k!r}")
    return scores.ranked()[: int(k)]


def random_heads_like(
    heads: Iterable[Head], n_layers: int, n_heads: int, seed: int, *, disjoint: bool = True
) -> list[Head]:
    """Random heads with the same count per layer as ``heads`` (the paper's control).

    Parameters
    ----------
    heads : iterable of (layer, head)
        The selection to imitate.
    n_layers, n_heads : int
        The model's shape.
    seed : int
    disjoint : bool, default=True
        Never draw a head of ``heads`` (as the paper). A layer whose free heads are fewer
        than its count takes the rest from the nearest layers with free heads (lower layer
        first); :func:`layer_shortfall` says which layers and by how many.

    Returns
    -------
    list of (layer, head)
        Sorted, without repeats, reproducible from ``seed``.
    """
    heads = [tuple(map(int, head)) for head in heads]
    counts = Counter(layer for layer, _ in heads)
    for layer, head in heads:
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise ValueError(f"head {(layer, head)} is outside {n_layers} x {n_heads}")
    taken = set(heads) if disjoint else set()
    if sum(counts.values()) > n_layers * n_heads - len(taken):
        raise ValueError(
            f"cannot draw {sum(counts.values())} random heads disjoint from {len(taken)} "
            f"of {n_layers * n_heads}"
        )
    rng = random.Random(seed)
    drawn: set[Head] = set()
    for layer in sorted(counts):
        need = counts[layer]
        for source in _nearest_layers(layer, n_layers):
            free = [h for h in range(n_heads) if (source, h) not in taken | drawn]
            picked = rng.sample(free, min(need, len(free)))
            drawn |= {(source, h) for h in picked}
            need -= len(picked)
            if need == 0:
                break
    return sorted(drawn)


def layer_shortfall(heads: Iterable[Head], n_heads: int) -> dict[int, int]:
    """Layers where a disjoint random control cannot keep the count: layer -> missing."""
    counts = Counter(layer for layer, _ in map(tuple, heads))
    # A layer with c selected heads has n_heads - c free ones and needs c of them.
    return {layer: 2 * c - n_heads for layer, c in sorted(counts.items()) if 2 * c > n_heads}


def _nearest_layers(layer: int, n_layers: int) -> list[int]:
    """``layer`` first, then the others by distance (lower first on ties)."""
    return sorted(range(n_layers), key=lambda other: (abs(other - layer), other))


def jaccard(heads_a: Iterable[Head], heads_b: Iterable[Head]) -> float:
    """|A ∩ B| / |A ∪ B| of two head sets; 1.0 when both are empty."""
    a, b = set(map(tuple, heads_a)), set(map(tuple, heads_b))
    return 1.0 if not a | b else len(a & b) / len(a | b)
