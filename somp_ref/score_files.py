"""Reading rankings back: the CSV and JSON files of :class:`somp_ref.heads.HeadScores`.

These files come back from users (``somp-ref generate --heads``), edited, truncated or
mixed up with other files, so every field is checked and every problem is a ValueError
naming the file and the row or field: never a silently wrong ranking (a negative head
index that wraps around, a duplicated head that overwrites another) and never a KeyError.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from typing import Any

import numpy as np

from somp_ref.head import Head
from somp_ref.user_files import read_user_text

JSON_FORMAT = "somp_ref.head_scores"
#: Version 2 names the per-head table "score" (version 1 called it "explained_variance"
#: whatever it held); both are read.
JSON_VERSION = 2
_SCORE_KEY = {1: "explained_variance", 2: "score"}
#: Where the ranking comes from (:mod:`somp_ref.provenance`), on the first row (the best
#: head; empty on the others). "versions" is ``name=version`` pairs.
CSV_SOURCE_COLUMNS = (
    "model_id",
    "model_fingerprint",
    "store_hash",
    "concept",
    "dictionary_hash",
    "versions",
)
CSV_COLUMNS = (
    "rank",
    "layer",
    "head",
    "score",
    "method",
    "support_ids",
    "support_tokens",
    *CSV_SOURCE_COLUMNS,
)
_REQUIRED_COLUMNS = ("layer", "head", "score")
#: No model has a million heads; a larger layer x head grid means a corrupt number, and
#: allocating it would exhaust memory before anything is reported.
MAX_HEADS = 1_000_000
_INDEX = re.compile(r"\d+")


def read_scores_csv(path: str | os.PathLike) -> dict[str, Any]:
    """The :class:`~somp_ref.head_scores.HeadScores` fields stored in a ranking CSV.

    Returns
    -------
    dict
        ``score`` (n_layers, n_heads) with NaN for heads without a row,
        ``supports`` and ``increments`` (NaN: the CSV does not keep them) per head,
        ``method``, ``params`` (empty) and ``token_ids`` (empty).

    Raises
    ------
    ValueError
        Naming the file (and row): not UTF-8, not CSV, no rows, a missing column, a field
        that is not a number, a negative or duplicated head.
    """
    text = read_user_text(path, "ranking CSV")
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = list(reader)
    except csv.Error as err:
        raise ValueError(f"{path}: not a CSV file ({err})") from None
    missing = [name for name in _REQUIRED_COLUMNS if name not in (reader.fieldnames or ())]
    if missing or not rows:
        problem = f"no column {', '.join(missing)}" if missing else "no rows"
        raise ValueError(
            f"{path}: {problem}; expected a ranking CSV from 'somp-ref rank' with columns "
            + ", ".join(CSV_COLUMNS)
        )
    scores: dict[Head, float] = {}
    supports: dict[Head, np.ndarray] = {}
    first_row: dict[Head, int] = {}
    methods = set()
    sources: set[tuple[str, ...]] = set()
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"{path}, line {line}"
        if None in row or None in row.values():
            raise ValueError(f"{where}: {len(reader.fieldnames)} fields expected")
        key = (_index(row["layer"], "layer", where), _index(row["head"], "head", where))
        if key in first_row:
            raise ValueError(
                f"{where}: head {key[0]}.{key[1]} is listed twice (first on line {first_row[key]})"
            )
        first_row[key] = line
        try:
            scores[key] = float(row["score"])
        except ValueError:
            raise ValueError(f"{where}: score must be a number, got {row['score']!r}") from None
        ids = row.get("support_ids", "").split()
        supports[key] = np.asarray([_index(t, "support id", where) for t in ids], dtype=np.int64)
        methods.add(row.get("method", "unknown"))
        source = tuple(row.get(name) or "" for name in CSV_SOURCE_COLUMNS)
        if any(source):
            sources.add(source)
    if len(methods) > 1:
        raise ValueError(f"{path}: rows of several rankings ({', '.join(sorted(methods))})")
    if len(sources) > 1:
        raise ValueError(f"{path}: rows of several rankings (their model or store differ)")
    grid = _empty_grid(
        1 + max(layer for layer, _ in scores), 1 + max(head for _, head in scores), path
    )
    for key, score in scores.items():
        grid[key] = score
    return {
        "score": grid,
        "supports": supports,
        "increments": {key: np.full(ids.size, np.nan) for key, ids in supports.items()},
        "method": methods.pop(),
        "params": {},
        "token_ids": np.zeros(0, dtype=np.int64),
        "source": _csv_source(
            dict(zip(CSV_SOURCE_COLUMNS, sources.pop() if sources else ("",) * 6, strict=True))
        ),
    }


def _csv_source(fields: dict[str, str]) -> dict[str, Any]:
    """A ranking's ``source`` from its CSV columns (empty ones left out)."""
    source: dict[str, Any] = {k: v for k, v in fields.items() if v and k != "versions"}
    if fields["versions"]:
        source["versions"] = dict(
            pair.split("=", 1) for pair in fields["versions"].split() if "=" in pair
        )
    return source


def csv_source_fields(source: dict[str, Any]) -> list[str]:
    """The :data:`CSV_SOURCE_COLUMNS` values of a ranking's ``source``."""
    versions = " ".join(f"{k}={v}" for k, v in source.get("versions", {}).items())
    return [*(str(source.get(name) or "") for name in CSV_SOURCE_COLUMNS[:-1]), versions]


def read_scores_json(path: str | os.PathLike) -> dict[str, Any]:
    """The :class:`~somp_ref.head_scores.HeadScores` fields stored in a ranking JSON file.

    Returns
    -------
    dict
        Every field of :class:`~somp_ref.head_scores.HeadScores`; ``score`` and each of
        ``details`` is (n_layers, n_heads) float64 with NaN for unranked heads.

    Raises
    ------
    ValueError
        Naming the file and the field: not JSON (e.g. truncated, or too deeply nested),
        another format or version, a missing field, a field of the wrong type or shape, a
        head outside the score table or listed twice, a support and its increments of
        different lengths.
    """
    text = read_user_text(path, "ranking JSON file")
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
            "truncated?"
        ) from None
    except RecursionError:  # json's decoder recurses once per level of nesting
        raise ValueError(f"{path}: JSON too deeply nested, not a ranking") from None
    if not isinstance(payload, dict) or payload.get("format") != JSON_FORMAT:
        raise ValueError(f"{path}: not a somp_ref head-scores JSON file")
    version = payload.get("version")
    if version not in _SCORE_KEY:
        raise ValueError(
            f"{path}: version {version!r}; this somp_ref reads versions "
            + ", ".join(map(str, _SCORE_KEY))
        )
    fields = _Fields(payload, path)
    key = _SCORE_KEY[version]
    score = fields.grid(key, payload.get(key))
    n_layers, n_heads = score.shape
    details = {}
    for name, value in fields.get("details", dict, {}).items():
        details[name] = fields.grid(f"details.{name}", value)
        if details[name].shape != score.shape:
            raise ValueError(
                f"{path}: details.{name} has shape {details[name].shape}, {key} {score.shape}"
            )
    supports: dict[Head, np.ndarray] = {}
    increments: dict[Head, np.ndarray] = {}
    for number, entry in enumerate(fields.get("heads", list)):
        where = f"heads[{number}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: {where} must be an object")
        entry_fields = _Fields(entry, f"{path}: {where}")
        layer, head = (entry_fields.get(name, int) for name in ("layer", "head"))
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise ValueError(
                f"{path}: {where} is head {layer}.{head}, outside the "
                f"{n_layers} x {n_heads} table of {key}"
            )
        if (layer, head) in supports:
            raise ValueError(f"{path}: {where}: head {layer}.{head} is listed twice")
        supports[layer, head] = entry_fields.ids("support")
        increments[layer, head] = entry_fields.numbers("increments")
        if increments[layer, head].size != supports[layer, head].size:
            raise ValueError(f"{path}: {where}: support and increments differ in length")
    token_ids = fields.ids("token_ids")
    tokens = fields.get("tokens", list, None)
    if tokens is not None and (
        len(tokens) != token_ids.size or not all(isinstance(t, str) for t in tokens)
    ):
        raise ValueError(f"{path}: tokens must be {token_ids.size} strings, one per token id")
    return {
        "score": score,
        "supports": supports,
        "increments": increments,
        "method": fields.get("method", str),
        "params": fields.get("params", dict),
        "token_ids": token_ids,
        "tokens": tokens,
        "source": fields.get("source", dict, {}),
        "details": details,
    }


_MISSING = object()
_JSON_NAMES = {int: "an integer", str: "a string", list: "a list", dict: "an object"}


class _Fields:
    """Typed access to one JSON object's fields, with errors naming the file and field."""

    def __init__(self, payload: dict[str, Any], where: str | os.PathLike) -> None:
        self.payload = payload
        self.where = where

    def get(self, name: str, kind: type, default: Any = _MISSING) -> Any:
        value = self.payload.get(name, default)
        if value is _MISSING:
            raise ValueError(f"{self.where}: missing field {name!r}")
        if value is not default and not _is(value, kind):
            raise ValueError(f"{self.where}: {name} must be {_JSON_NAMES[kind]}, got {value!r:.40}")
        return value

    def ids(self, name: str) -> np.ndarray:
        """A list of token ids (integers >= 0) as int64 (n,)."""
        values = self.get(name, list)
        if not all(_is(v, int) and v >= 0 for v in values):
            raise ValueError(f"{self.where}: {name} must be a list of token ids (integers >= 0)")
        return np.asarray(values, dtype=np.int64)

    def numbers(self, name: str) -> np.ndarray:
        """A list of numbers as float64 (n,)."""
        values = self.get(name, list)
        if not all(_is(v, float) for v in values):
            raise ValueError(f"{self.where}: {name} must be a list of numbers")
        return np.asarray(values, dtype=np.float64)

    def grid(self, name: str, rows: Any) -> np.ndarray:
        """A non-empty rectangular table of numbers (null: not ranked) as float64
        (n_layers, n_heads) with NaN for null."""
        if rows is None:
            raise ValueError(f"{self.where}: missing field {name!r}")
        valid = (
            isinstance(rows, list)
            and rows
            and all(isinstance(row, list) and len(row) == len(rows[0]) for row in rows)
            and rows[0]
            and all(x is None or _is(x, float) for row in rows for x in row)
        )
        if not valid:
            raise ValueError(
                f"{self.where}: {name} must be a non-empty table (list of equal-length "
                "lists) of numbers, null for heads not ranked"
            )
        grid = np.array([[np.nan if x is None else x for x in row] for row in rows], np.float64)
        if grid.size > MAX_HEADS:
            raise ValueError(f"{self.where}: {name} has {grid.shape} heads, not a real model")
        return grid


def _is(value: Any, kind: type) -> bool:
    """JSON typing: bools are not numbers, integers are numbers."""
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def _index(text: str, name: str, where: str) -> int:
    if not _INDEX.fullmatch(text.strip()):
        raise ValueError(f"{where}: {name} must be an integer >= 0, got {text!r}")
    return int(text)


def _empty_grid(n_layers: int, n_heads: int, path: str | os.PathLike) -> np.ndarray:
    if n_layers * n_heads > MAX_HEADS:
        raise ValueError(
            f"{path}: heads up to {n_layers - 1}.{n_heads - 1} make a table of "
            f"{n_layers * n_heads} heads, not a real model (a corrupt number?)"
        )
    return np.full((n_layers, n_heads), np.nan)
