"""somp_ref: reference implementation of Head Pursuit (arXiv 2510.21518).

The core depends on numpy and scipy, safetensors (the store's files), tqdm (progress bars)
and threadpoolctl (BLAS threads), never on torch; docs/ARCHITECTURE.md describes the design.
"""

from somp_ref.head_scores import HeadScores
from somp_ref.lens import LogitLensResult, ll_head_score, logit_lens
from somp_ref.pursuit import SompResult, matching_pursuit, somp
from somp_ref.ranking import rank, rank_heads
from somp_ref.selection import random_heads_like, top_heads

__all__ = [
    "HeadScores",
    "LogitLensResult",
    "SompResult",
    "ll_head_score",
    "logit_lens",
    "matching_pursuit",
    "random_heads_like",
    "rank",
    "rank_heads",
    "somp",
    "top_heads",
]
__version__ = "0.1.0"
