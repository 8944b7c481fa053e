"""Progress bars for long loops (layers, batches, interventions): tqdm's, on stderr when it
is a terminal, quiet when a caller switches them off.

Only a terminal gets bars: on a pipe or a log file they would be lines of carriage returns
standing before the one line an error is (see :mod:`somp_ref.cli`)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(
    items: Iterable[T], *, desc: str, enabled: bool = True, total: int | None = None
) -> Iterable[T]:
    """``items``, with a tqdm bar ``desc: done/total`` on stderr while they are iterated, if
    stderr is a terminal.

    Parameters
    ----------
    items : iterable
        Yielded unchanged.
    desc : str
        What the bar counts, e.g. "export (batches)".
    enabled : bool, default=True
        False: no bar, nothing written. True: a bar when stderr is a terminal.
    total : int, optional
        The number of items when ``items`` has no length (a generator).
    """
    # disable=None: tqdm's "no bar unless the file is a terminal".
    return tqdm(items, desc=desc, total=total, disable=None if enabled else True, file=sys.stderr)
