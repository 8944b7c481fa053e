"""Prompt sources: a text file (one prompt a line), a JSONL file (records with a "prompt"
field, other fields kept), a JSON file (an array of prompt strings or of such records), or
a built-in set (``builtin:NAME``).

The kind of file is its suffix, in any case (``.JSONL`` is JSONL): a suffix that is none of
these is refused rather than read as text, so a JSON file is never taken for prompts that
are lines of JSON. Every prompt must have some text: an empty one is refused before any
model loads."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from somp_ref.user_files import read_user_text

_COLOR_OBJECTS = (
    "a ripe banana",
    "a fire truck",
    "the sky on a clear day",
    "fresh grass",
    "a lemon",
    "an emerald",
    "a ripe tomato",
    "snow",
    "coal",
    "a pumpkin",
    "a blueberry",
    "milk",
    "a flamingo",
    "a carrot",
    "an eggplant",
    "the sun",
    "a polar bear",
    "a crow",
    "a strawberry",
    "a lime",
    "a sapphire",
    "chocolate",
    "an orange",
    "a school bus",
)
_NEUTRAL = (
    "Explain how a bicycle works.",
    "Write a short note to a colleague about a meeting.",
    "What is the capital of France?",
    "List three uses of a hammer.",
    "How many days are in a leap year?",
    "Describe your favourite breakfast.",
    "What does a librarian do?",
    "Give one tip for learning to swim.",
)

BUILTIN: dict[str, list[dict[str, Any]]] = {
    "colors": [
        {"prompt": f"Describe the color of {obj}.", "object": obj} for obj in _COLOR_OBJECTS
    ],
    "neutral": [{"prompt": text} for text in _NEUTRAL],
}


#: Prompt file suffixes (compared in lower case) and what each holds.
PROMPT_SUFFIXES = {
    ".txt": "one prompt a line",
    "": "one prompt a line",
    ".jsonl": "one JSON record with a 'prompt' string a line",
    ".json": "a JSON array of prompt strings or of records with a 'prompt' string",
}
_WHAT = "prompt file (.txt: one prompt a line, .jsonl: records, .json: an array)"


def read_prompts(spec: str) -> list[dict[str, Any]]:
    """Prompt records from ``builtin:NAME``, or a ``.txt`` (or suffix-less), ``.jsonl`` or
    ``.json`` file (see :data:`PROMPT_SUFFIXES`).

    Raises
    ------
    ValueError
        Naming the file (and line or entry): an unknown built-in set, another suffix, a
        malformed or too deeply nested JSON value, a record without a 'prompt' string, an
        empty prompt, or no prompts at all.
    OSError
        The file is missing or a directory (see :func:`somp_ref.user_files.read_user_text`).
    """
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in BUILTIN:
            raise ValueError(f"unknown built-in prompts {name!r}; have: {', '.join(BUILTIN)}")
        return [dict(r) for r in BUILTIN[name]]
    path = Path(spec)
    suffix = path.suffix.lower()
    if suffix not in PROMPT_SUFFIXES:
        raise ValueError(
            f"{spec}: unknown prompt file suffix {path.suffix!r}; use .txt or none (one "
            "prompt a line), .jsonl (one record with a 'prompt' string a line), .json (an "
            "array of prompt strings or records), in any case, or builtin:NAME"
        )
    text = read_user_text(path, _WHAT)
    if suffix == ".json":
        records = _json_records(_parse_json(text, spec, "valid JSON"), spec)
    elif suffix == ".jsonl":
        records = []
        for number, line in enumerate(_lines(text), start=1):
            if line.strip():
                where = f"{spec}:{number}"
                records.append(_record(_parse_json(line, where, "a JSON record"), where))
    else:
        records = [{"prompt": line.strip()} for line in _lines(text) if line.strip()]
    if not records:
        raise ValueError(f"{path} holds no prompts")
    return records


def _parse_json(text: str, where: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not {what} ({err.msg})") from None
    except RecursionError:  # json's decoder recurses once per level of nesting
        raise ValueError(f"{where}: JSON too deeply nested, not prompts") from None


def _json_records(value: Any, where: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a .json prompt file: an array of strings or of records."""
    if not isinstance(value, list):
        raise ValueError(
            f"{where}: a .json prompt file is an array of prompt strings or of records with "
            f"a 'prompt' string, got {type(value).__name__}"
        )
    return [
        _record({"prompt": item} if isinstance(item, str) else item, f"{where}: entry {number}")
        for number, item in enumerate(value)
    ]


def _record(value: Any, where: str) -> dict[str, Any]:
    """A prompt record, checked: an object whose 'prompt' is a string with some text."""
    if not isinstance(value, dict) or not isinstance(value.get("prompt"), str):
        raise ValueError(f"{where}: each record needs a 'prompt' string")
    if not value["prompt"].strip():
        raise ValueError(f"{where}: empty prompt (a prompt needs some text)")
    return value


def _lines(text: str) -> list[str]:
    """A file's lines, broken at line feeds only (a CR before one is dropped): not at the
    Unicode separators (U+2028, U+2029, U+0085) that str.splitlines also breaks at, which
    web text holds inside prompts."""
    return [line.removesuffix("\r") for line in text.split("\n")]
