"""Heads: rank them for a concept, choose among them, and the scores' type.

The names users import, gathered from the modules that own them:

* :mod:`somp_ref.head_scores` — :class:`HeadScores` (the result of a ranking and its CSV,
  JSON and pandas forms), the ``Head`` type, :func:`format_top_heads`;
* :mod:`somp_ref.factored` — per-head pursuit on a head's factors (:func:`head_somp`);
* :mod:`somp_ref.ranking` — :func:`rank_heads` (every method, every engine),
  :func:`rank`, :func:`specificity_scores`, :func:`head_signature`;
* :mod:`somp_ref.selection` — :func:`top_heads`, :func:`random_heads_like`,
  :func:`layer_shortfall`, :func:`jaccard`.
"""

from somp_ref.factored import head_somp
from somp_ref.head_scores import Head, HeadScores, format_top_heads
from somp_ref.ranking import (
    METHODS,
    head_signature,
    rank,
    rank_heads,
    specificity_scores,
    word_token_pool,
)
from somp_ref.selection import jaccard, layer_shortfall, random_heads_like, top_heads

__all__ = [
    "METHODS",
    "Head",
    "HeadScores",
    "format_top_heads",
    "head_signature",
    "head_somp",
    "jaccard",
    "layer_shortfall",
    "random_heads_like",
    "rank",
    "rank_heads",
    "specificity_scores",
    "top_heads",
    "word_token_pool",
]
