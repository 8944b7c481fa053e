"""Continuing an interrupted export: the store it left, checked to be the same export
(model, rule, dtype, inputs), and the batches it still needs.

An export commits its rows batch by batch (:class:`somp_ref.store.row_appending.RowWriter`);
``export --resume`` gives the same inputs again, the finished batches are skipped, and the
store is finished as if nothing had happened. An interrupted ``--overwrite`` is continued
the same way: its unfinished store was kept beside the old one, which stays until the new
one is swapped in. A store of another export is never continued: the error says which
fact differs.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from somp_ref.store import ActivationStore, StoreError
from somp_ref.store.locations import real_location
from somp_ref.store.replacing import kept_replacement
from somp_ref.store.row_appending import APPENDING, RowWriter


def skipping(batches: Iterable[Any], done: int) -> Iterator[Any]:
    """``batches`` without the first ``done``; StoreError if there are fewer than that."""
    iterator = iter(batches)
    skipped = sum(1 for _ in itertools.islice(iterator, done))
    if skipped < done:
        raise StoreError(f"{done} batches were exported before, but only {skipped} are given now")
    yield from iterator


#: The facts a resumed export must share with the one it continues (the weights'
#: fingerprint stands for the model: the same checkpoint named by another path is the same).
_SAME_EXPORT = ("model_fingerprint", "family", "positions", "model_dtype", "dtype")


def check_same_export(out: str | Path, found: dict[str, Any], wanted: dict[str, Any]) -> None:
    """A StoreError naming the first fact (of :data:`_SAME_EXPORT`, then the inputs'
    fingerprint) in which the store's meta ``found`` differs from this export's ``wanted``."""
    for key in (*_SAME_EXPORT, "inputs_fingerprint"):
        if found.get(key) != wanted.get(key):
            if key == "inputs_fingerprint":
                raise StoreError(
                    f"{out}: cannot resume, it was started with other prompts or options "
                    "(batch size, chat template, padding, positions); resume with the same "
                    "ones, or export again with --overwrite"
                )
            raise StoreError(
                f"{out}: cannot resume, it was exported with {key} {found.get(key)!r}, "
                f"not {wanted.get(key)!r}"
            )


def finished_export(out: str | Path, facts: dict[str, Any], dtype: str) -> ActivationStore | None:
    """The complete store at ``out`` if it is this very export (nothing to resume), None if
    there is something to resume (``out`` is incomplete, or an interrupted --overwrite kept
    its unfinished replacement beside it); StoreError if ``out`` is a complete store of
    another export and nothing was kept."""
    try:
        store = ActivationStore.open(out)
    except StoreError:
        return None
    if kept_replacement(real_location(out)) is not None:
        return None  # an interrupted overwrite of it: continue that one
    try:
        check_same_export(out, store.meta, {**facts, "dtype": dtype})
    except StoreError as err:
        raise StoreError(
            f"{out} is a complete store of another export ({err}), and no interrupted "
            "--overwrite of it left rows to continue: export again"
        ) from None
    print(f"{out}: already complete, nothing to resume", file=sys.stderr)
    return store


def resume_export(
    out: str | Path, facts: dict[str, Any], dtype: str
) -> tuple[ActivationStore, RowWriter | None]:
    """The interrupted store at ``out`` and its row writer (None when every row and the
    unembedding were written), once it is known to be an export of the same model, rule
    and inputs."""
    store = ActivationStore.resume(out)
    writer = None
    try:
        if APPENDING in store.meta or store.missing():
            writer = RowWriter.resume(store)  # says so when it was not written batch by batch
        check_same_export(out, store.meta, {**facts, "dtype": dtype})
    except BaseException:
        if writer is not None:
            writer.close()
        store.__exit__(*sys.exc_info())
        raise
    return store, writer
