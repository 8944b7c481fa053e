"""The result of ranking heads: one score per head, what it is made of, and its files."""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from somp_ref.files import write_text_atomically
from somp_ref.head import Head
from somp_ref.score_files import (
    CSV_COLUMNS,
    JSON_FORMAT,
    JSON_VERSION,
    csv_source_fields,
    read_scores_csv,
    read_scores_json,
)


@dataclass
class HeadScores:
    """Per-head scores of one ranking (higher ranks first).

    Attributes
    ----------
    score : ndarray of shape (n_layers, n_heads), float64
        The ranking score; what it is depends on ``method`` (SOMP's explained variance for
        "somp", the mean concept logit for "ll", ...). NaN for heads not ranked.
    supports : dict of (layer, head) -> ndarray of int64
        Token ids that make up each head's score, most important first (SOMP: the atoms in
        selection order).
    increments : dict of (layer, head) -> ndarray of float64
        What each support token contributes (SOMP: the explained variance it added).
    method : str
    params : dict
        Every parameter of the ranking (n_atoms, center, criterion, layers, ...).
    token_ids : ndarray of int64
        The dictionary: unembedding rows used as atoms.
    tokens : list of str, optional
        Strings of ``token_ids`` when the store knows its vocabulary.
    source : dict
        Where the activations came from (store path, model id, positions rule).
    details : dict of str -> ndarray of shape (n_layers, n_heads)
        Other per-head arrays the score was computed from (e.g. "explained_variance" of the
        concept dictionary, the null distribution's mean and spread).
    """

    score: np.ndarray
    supports: dict[Head, np.ndarray]
    increments: dict[Head, np.ndarray]
    method: str
    params: dict[str, Any]
    token_ids: np.ndarray
    tokens: list[str] | None = None
    source: dict[str, Any] = field(default_factory=dict)
    details: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return self.score.shape[0]

    @property
    def n_heads(self) -> int:
        return self.score.shape[1]

    def ranked(self) -> list[Head]:
        """Every scored head, best first (ties: lower layer, then lower head)."""
        values = self.score
        heads = [(int(i), int(j)) for i, j in zip(*np.nonzero(~np.isnan(values)), strict=True)]
        return sorted(heads, key=lambda lh: (-values[lh], lh))

    def token_string(self, token_id: int) -> str:
        """The string of a dictionary token (its id in brackets when unknown)."""
        if self.tokens is not None:
            where = np.flatnonzero(self.token_ids == token_id)
            if where.size:
                return self.tokens[int(where[0])]
        return f"[{token_id}]"

    def to_pandas(self):
        """One row per scored head, best first: layer, head, score, details, support.

        Requires pandas (not a dependency of somp_ref).
        """
        import pandas as pd

        rows = []
        for rank, (layer, head) in enumerate(self.ranked(), start=1):
            support = self.supports.get((layer, head), np.zeros(0, dtype=np.int64))
            rows.append(
                {
                    "rank": rank,
                    "layer": layer,
                    "head": head,
                    "score": float(self.score[layer, head]),
                    **{name: float(grid[layer, head]) for name, grid in self.details.items()},
                    "support": [self.token_string(t) for t in support],
                }
            )
        return pd.DataFrame(rows)

    # -------------------------------------------------------------- files

    def to_json(self, path: str | os.PathLike) -> None:
        """Write everything (full fidelity) as JSON, atomically."""
        payload = {
            "format": JSON_FORMAT,
            "version": JSON_VERSION,
            "method": self.method,
            "params": self.params,
            "source": self.source,
            "token_ids": self.token_ids.tolist(),
            "tokens": self.tokens,
            "details": {key: _nan_to_none(value) for key, value in self.details.items()},
            "score": _nan_to_none(self.score),
            "heads": [
                {
                    "layer": layer,
                    "head": head,
                    "support": self.supports[layer, head].tolist(),
                    "increments": self.increments[layer, head].tolist(),
                }
                for layer, head in sorted(self.supports)
            ],
        }
        write_text_atomically(path, json.dumps(payload, ensure_ascii=False, indent=1))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> HeadScores:
        """Read what :meth:`to_json` wrote; ValueError naming the file and field if it is
        malformed (see :func:`somp_ref.score_files.read_scores_json`)."""
        return cls(**read_scores_json(path))

    def to_csv(self, path: str | os.PathLike) -> None:
        """One row per head, best first: rank, layer, head, score, method, support tokens."""
        text = io.StringIO(newline="")
        writer = csv.writer(text)
        writer.writerow(CSV_COLUMNS)
        source = csv_source_fields(self.source)
        for rank, (layer, head) in enumerate(self.ranked(), start=1):
            support = self.supports.get((layer, head), np.zeros(0, dtype=np.int64))
            writer.writerow(
                [
                    rank,
                    layer,
                    head,
                    repr(float(self.score[layer, head])),
                    self.method,
                    " ".join(map(str, support.tolist())),
                    json.dumps([self.token_string(t) for t in support], ensure_ascii=False),
                    *(source if rank == 1 else [""] * len(source)),
                ]
            )
        write_text_atomically(path, text.getvalue())

    def with_source(self, **facts: Any) -> HeadScores:
        """A copy whose ``source`` also records ``facts`` (e.g. ``concept="colors"``)."""
        return replace(self, source={**self.source, **facts})

    @classmethod
    def from_csv(cls, path: str | os.PathLike) -> HeadScores:
        """Read the scores (and supports) back from :meth:`to_csv`'s file; ValueError
        naming the file and line if it is malformed (see
        :func:`somp_ref.score_files.read_scores_csv`)."""
        return cls(**read_scores_csv(path))


def format_top_heads(scores: HeadScores, k: int = 10, tokens_shown: int = 6) -> str:
    """The ``k`` best heads as a table with the first tokens of each support."""
    lines = [f"rank  head (L.H)  {scores.method + ' score':>16}  top tokens"]
    for rank, (layer, head) in enumerate(scores.ranked()[:k], start=1):
        support = scores.supports.get((layer, head), np.zeros(0, dtype=np.int64))
        shown = " ".join(repr(scores.token_string(t)) for t in support[:tokens_shown])
        lines.append(
            f"{rank:>4}  {f'{layer}.{head}':>11}  {scores.score[layer, head]:>16.4f}  {shown}"
        )
    return "\n".join(lines)


def _nan_to_none(values: np.ndarray) -> list[list[float | None]]:
    return [[None if np.isnan(x) else float(x) for x in row] for row in values]
