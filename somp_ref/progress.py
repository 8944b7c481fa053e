"""Progress bars for long loops (layers, batches, interventions): tqdm's, on stderr, quiet
when a caller switches them off."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(
    items: Iterable[T], *, desc: str, enabled: bool = True, total: int | None = None
) -> Iterable[T]:
    """``items``, with a tqdm bar ``desc: done/total`` on stderr while they are iterated.

    Parameters
    ----------
    items : iterable
        Yielded unchanged.
    desc : str
        What the bar counts, e.g. "export (batches)".
    enabled : bool, default=True
        False: no bar, nothing written.
    total : int, optional
        The number of items when ``items`` has no length (a generator).
    """
    return tqdm(items, desc=desc, total=total, disable=not enabled, file=sys.stderr)
