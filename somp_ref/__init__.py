"""somp_ref: reference implementation of Head Pursuit (arXiv 2510.21518).

The core depends on numpy and scipy only. See DESIGN.md for the contract.
"""

from somp_ref.lens import LogitLensResult, ll_head_score, logit_lens
from somp_ref.pursuit import SompResult, matching_pursuit, somp

__all__ = [
    "LogitLensResult",
    "SompResult",
    "ll_head_score",
    "logit_lens",
    "matching_pursuit",
    "somp",
]
__version__ = "0.1.0"
