"""What an opened store knows about itself: its paths, its meta.json record, and the facts
read from it (shapes, samples, parts still missing), shared by its reading and writing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from somp_ref.store.content import ContentChecks
from somp_ref.store.layout import SAMPLES_FILE, UNEMBED_FILE, layer_file
from somp_ref.store.locking import WriterLock
from somp_ref.store.schema import REQUIRED_KEYS, short


def check_index(value: Any, name: str, bound: int) -> int:
    """``value`` as an int in ``[0, bound)``: a layer or head index.

    Raises
    ------
    TypeError
        For anything but an int or a numpy integer (a bool, a float, a string).
    ValueError
        For an int out of range.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {short(value)}")
    if not 0 <= value < bound:
        raise ValueError(f"{name} must be in [0, {bound}), got {value}")
    return int(value)


class StoreFacts:
    """The state of an opened store; :class:`somp_ref.store.ActivationStore` builds it.

    Parameters
    ----------
    path : Path
        Where the store is (or will be, once swapped in).
    meta : dict
        meta.json's record, already validated.
    lock : WriterLock, optional
        The writer lock, for a store open for writing.
    directory : Path, optional
        Where the files are, when not ``path``: the store's real location (a writer's), or
        the hidden sibling beside it that a replacement is built in.
    target : Path, optional
        The store's real location, for a writer (see :mod:`somp_ref.store.locations`).
    replaces : int, optional
        The layer count of the store that :meth:`close` replaces.
    """

    def __init__(
        self,
        path: Path,
        meta: dict[str, Any],
        *,
        lock: WriterLock | None = None,
        directory: Path | None = None,
        target: Path | None = None,
        replaces: int | None = None,
    ):
        self.path = path
        self._meta = meta
        self._lock = lock  # held while writable
        self._writable = lock is not None
        self._dir = path if directory is None else directory  # where the files are
        self._target = path if target is None else target  # where close() puts the store
        self._content = ContentChecks()  # the files read so far, hashed once
        self._replaces = replaces  # layer count of the store that close() replaces

    @property
    def meta(self) -> dict[str, Any]:
        """A copy of meta.json's content."""
        return json.loads(json.dumps(self._meta))

    @property
    def n_layers(self) -> int:
        return self._meta["n_layers"]

    @property
    def n_heads(self) -> int:
        return self._meta["n_heads"]

    @property
    def d_head(self) -> int:
        return self._meta["d_head"]

    @property
    def d_model(self) -> int:
        return self._meta["d_model"]

    @property
    def n_samples(self) -> int | None:
        return self._meta["n_samples"]

    def missing(self) -> list[str]:
        """Files still to write, in writing order."""
        parts = [layer_file(layer) for layer in range(self.n_layers)]
        parts += [UNEMBED_FILE, SAMPLES_FILE]
        return [part for part in parts if part not in self._meta["files"]]

    def summary(self) -> str:
        """A few human-readable lines about the store."""
        m = self._meta
        extra = {
            k: v
            for k, v in m.items()
            if k not in {"format", "format_version", "files", "complete", *REQUIRED_KEYS}
        }
        lines = [
            f"store      {self.path}",
            f"format     {m['format']} v{m['format_version']}"
            f" ({'complete' if m['complete'] else 'INCOMPLETE'})",
            f"shapes     {m['n_layers']} layers x {m['n_heads']} heads, d_head {m['d_head']}, "
            f"d_model {m['d_model']}",
            f"samples    {m['n_samples']} rows, z stored as {m['dtype']}",
        ]
        lines += [f"{key:<10} {value}" for key, value in sorted(extra.items())]
        return "\n".join(lines)
