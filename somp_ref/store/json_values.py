"""What a store may record as JSON (meta.json's facts, sample records): plain JSON values
whose strings are valid Unicode, checked before anything is written, so that every store
written can be read back, by this package or by any other JSON reader.

A writer is held to *plain* values: dicts with string keys, lists (tuples), strings, ints in
the 64-bit range, finite floats, booleans and None, nested at most 100 deep. A reader only
refuses strings that are not valid Unicode (a lone surrogate, which JSON's ``\\ud800``
escape can carry), since they would fail later, far from the file, when printed or written.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

_MAX_DEPTH = 100
_INT64 = 1 << 63
_KINDS = "str, int, float, bool, None, list or dict"


# Where a value sits, spelled out only for a message: ``(where,)`` at the top, else
# ``(place of its container, its key or index)``.
_Place = tuple


def _name(place: _Place) -> str:
    keys = []
    while len(place) == 2:
        place, key = place
        keys.append(f"[{key!r}]")
    return place[0] + "".join(reversed(keys))


def _string_problem(text: str, place: _Place, what: str = "") -> str | None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        shown = ascii(text) if len(text) <= 40 else ascii(text[:37]) + "..."
        return (
            f"{what}{_name(place)} is not valid Unicode: {shown} has a lone surrogate "
            f"{ascii(text[err.start])} at character {err.start}"
        )
    return None


def _scalar_problem(value: Any, place: _Place, strict: bool) -> tuple[type[Exception], str] | None:
    """What is wrong with a value that is not a container (None when nothing)."""
    if isinstance(value, str):
        problem = _string_problem(value, place)
        return None if problem is None else (ValueError, problem)
    if not strict or value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        if -_INT64 <= value < _INT64:
            return None
        return ValueError, f"{_name(place)} is an integer of {value.bit_length()} bits, over 64"
    if isinstance(value, float):
        if math.isfinite(value):
            return None
        return ValueError, f"{_name(place)} is {value}: JSON has no NaN or infinity"
    kind = f"{type(value).__module__}.{type(value).__qualname__}".removeprefix("builtins.")
    return TypeError, f"{_name(place)} is a {kind}, not a JSON value ({_KINDS})"


def json_problem(value: Any, where: str, *, strict: bool) -> tuple[type[Exception], str] | None:
    """The first problem of ``value`` as JSON, with the exception type to raise it as; None
    when there is none.

    Parameters
    ----------
    where : str
        How messages name ``value`` (e.g. ``"meta"``); inner values are named
        ``where['key'][0]``.
    strict : bool
        True for what a writer hands in: plain values only (see the module). False for what
        ``json.loads`` returned: only strings (keys too) that are not valid Unicode.
    """
    if not strict:
        try:  # the common case, fast: nothing to find
            json.dumps(value, ensure_ascii=False).encode("utf-8")
            return None
        except (TypeError, ValueError, RecursionError):  # find it, or leave it to the writer
            pass
    stack: list[tuple[Any, _Place, int]] = [(value, (where,), 0)]
    while stack:
        item, place, depth = stack.pop()
        if depth > _MAX_DEPTH and strict:
            return ValueError, f"{_name(place)} is nested over {_MAX_DEPTH} deep"
        if isinstance(item, Mapping):
            pairs = list(item.items())
            for key, _ in pairs:
                if not isinstance(key, str):
                    if strict:
                        return (
                            TypeError,
                            f"{_name(place)} has the key {key!r}: JSON keys are strings",
                        )
                    continue
                problem = _string_problem(key, place, "a key of ")
                if problem is not None:
                    return ValueError, problem
            stack += [(v, (place, k), depth + 1) for k, v in reversed(pairs)]
        elif isinstance(item, (list, tuple)):
            stack += [(item[i], (place, i), depth + 1) for i in range(len(item) - 1, -1, -1)]
        else:
            problem = _scalar_problem(item, place, strict)
            if problem is not None:
                return problem
    return None


def check_json(value: Any, where: str, *, strict: bool = True) -> None:
    """Raise the first problem :func:`json_problem` finds in ``value``.

    Raises
    ------
    TypeError
        (``strict``) For a value of another type (a numpy array, a set, ...) or a key that
        is not a string.
    ValueError
        For a string that is not valid Unicode; (``strict``) a non-finite float, an integer
        beyond 64 bits, or nesting deeper than 100.
    """
    problem = json_problem(value, where, strict=strict)
    if problem is not None:
        kind, message = problem
        raise kind(message)


def json_bytes(value: Any) -> bytes:
    """``value`` as the indented, key-sorted, ASCII JSON a store writes (meta.json)."""
    return json.dumps(value, indent=1, sort_keys=True).encode("ascii")
