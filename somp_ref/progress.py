"""A dependency-free progress bar on stderr for long loops (layers, batches, prompts)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Sized
from typing import TypeVar

T = TypeVar("T")


def progress(
    items: Iterable[T], *, desc: str, enabled: bool = True, total: int | None = None
) -> Iterator[T]:
    """Yield ``items`` while drawing ``desc: done/total elapsed, eta`` on stderr.

    On a terminal the line redraws in place; elsewhere (logs, CI) about ten lines are
    printed in all. ``enabled=False`` yields silently.
    """
    if total is None and isinstance(items, Sized):
        total = len(items)
    if not enabled:
        yield from items
        return
    stream = sys.stderr
    live = stream.isatty()
    start = time.perf_counter()
    step = max(1, (total or 10) // 10)
    done = 0

    def draw(final: bool = False) -> None:
        elapsed = time.perf_counter() - start
        text = f"{desc}: {done}/{total if total is not None else '?'} {elapsed:.1f}s"
        if total and 0 < done < total:
            text += f", eta {elapsed / done * (total - done):.1f}s"
        if live:
            stream.write("\r" + text.ljust(60) + ("\n" if final else ""))
        else:
            stream.write(text + "\n")
        stream.flush()

    for item in items:
        yield item
        done += 1
        if live or done % step == 0 or done == total:
            draw(final=done == total)
