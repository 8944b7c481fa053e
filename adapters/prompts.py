"""Prompt sources: a text file (one prompt a line), a JSONL file (records with a "prompt"
field, other fields kept), or a built-in set (``builtin:NAME``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from somp_ref.files import read_user_text

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


def read_prompts(spec: str) -> list[dict[str, Any]]:
    """Prompt records from ``builtin:NAME``, a ``.jsonl`` file or a text file."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in BUILTIN:
            raise ValueError(f"unknown built-in prompts {name!r}; have: {', '.join(BUILTIN)}")
        return [dict(r) for r in BUILTIN[name]]
    path = Path(spec)
    text = read_user_text(path, "prompt file (.txt: one prompt a line, .jsonl: records)")
    lines = [line for line in text.splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not a JSON record ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f"{path}:{number}: each JSONL record needs a 'prompt' string")
            records.append(record)
    else:
        records = [{"prompt": line.strip()} for line in lines]
    if not records:
        raise ValueError(f"{path} holds no prompts")
    return records
