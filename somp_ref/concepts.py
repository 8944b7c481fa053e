"""Concepts as token ids: shipped word lists and the tokenizer rule that turns words into
dictionary atoms (rows of the unembedding).

Only a tokenizer's ``encode`` is used, so this works with any tokenizer object (Hugging
Face, SentencePiece wrappers, tiktoken-like) and never imports torch.
"""

from __future__ import annotations

import importlib.resources
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from somp_ref.user_files import read_user_text

MULTI_TOKEN_RULES = ("single", "first")


def shipped_concepts() -> list[str]:
    """Names of the concept lists shipped with somp_ref (colors, countries, ...)."""
    folder = importlib.resources.files("somp_ref.concept_lists")
    return sorted(p.name[:-4] for p in folder.iterdir() if p.name.endswith(".txt"))


def load_concept(name_or_path: str | os.PathLike) -> list[str]:
    """Words of a shipped concept (``"colors"``) or of a list file (one word a line).

    A bare name of a shipped concept is always the shipped list, whatever the working
    directory holds (``--out colors`` makes a directory named like the concept); write
    ``./colors`` for a file of that name. Blank lines and lines starting with ``#`` are
    ignored; order and case are kept.
    """
    path, name = Path(name_or_path), str(name_or_path)
    written_as_path = bool(path.suffix) or os.sep in name or "/" in name
    resource = importlib.resources.files("somp_ref.concept_lists") / f"{name}.txt"
    if not written_as_path and resource.is_file():
        text = resource.read_text(encoding="utf-8")
    elif written_as_path or path.exists():
        text = read_user_text(path, "concept list (one word a line)")
    else:
        raise ValueError(
            f"unknown concept {name!r}; shipped: {', '.join(shipped_concepts())}"
            " (or pass the path of a file with one word a line)"
        )
    words = [line.strip() for line in text.splitlines()]
    words = [w for w in words if w and not w.startswith("#")]
    if not words:
        raise ValueError(f"concept list {name_or_path} has no words")
    return words


def word_variants(word: str) -> list[str]:
    """The spellings a word may take mid-sentence or at its start: as is, capitalised,
    each with and without a leading space (distinct, in that order)."""
    forms = [word, word.capitalize(), word.lower()]
    variants = []
    for form in forms:
        for text in (" " + form, form):
            if text not in variants:
                variants.append(text)
    return variants


def _encode(tokenizer: Any, text: str) -> list[int]:
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)
    except TypeError:  # encoders without that keyword
        ids = tokenizer.encode(text)
    return [int(i) for i in ids]


@dataclass
class ConceptTokens:
    """What :func:`concept_token_ids` found.

    Attributes
    ----------
    ids : list of int
        Distinct token ids, in the order first found.
    by_word : dict of str -> list of int
        The ids each kept word contributed.
    dropped : list of str
        Words that gave no token under the rule.
    """

    ids: list[int]
    by_word: dict[str, list[int]] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)

    def report(self) -> str:
        """One line: how many words gave how many tokens, and which were dropped."""
        kept = len(self.by_word)
        text = f"{kept} words -> {len(self.ids)} tokens"
        if self.dropped:
            shown = ", ".join(self.dropped[:8]) + (" ..." if len(self.dropped) > 8 else "")
            text += f"; dropped {len(self.dropped)} (no single-token form): {shown}"
        return text


def concept_token_ids(
    tokenizer: Any, words: Iterable[str], *, multi_token: str = "single"
) -> ConceptTokens:
    """Token ids of a concept's words, for use as dictionary atoms.

    Parameters
    ----------
    tokenizer : object with ``encode(text)``
        ``add_special_tokens=False`` is passed when the encoder accepts it.
    words : iterable of str
    multi_token : {"single", "first"}, default="single"
        The rule for a variant that encodes to several tokens. "single": the variant is
        skipped, so only variants that are exactly one token count, and a word none of
        whose variants is one token is dropped (and reported). "first": the variant
        contributes its first token; more coverage, but first pieces (" bl", " tur") are
        shared with unrelated words, so use it only with long, distinctive words.

    Returns
    -------
    ConceptTokens
        Variants tried for each word: with and without a leading space, as given,
        capitalised and lower-case (see :func:`word_variants`).
    """
    if multi_token not in MULTI_TOKEN_RULES:
        raise ValueError(f"multi_token must be one of {MULTI_TOKEN_RULES}, got {multi_token!r}")
    result = ConceptTokens(ids=[])
    seen: set[int] = set()
    for word in words:
        word = word.strip()
        if not word:
            continue
        found: list[int] = []
        for variant in word_variants(word):
            ids = _encode(tokenizer, variant)
            if len(ids) == 1 or (ids and multi_token == "first"):
                if ids[0] not in found:
                    found.append(ids[0])
        if not found:
            result.dropped.append(word)
            continue
        result.by_word[word] = found
        for token in found:
            if token not in seen:
                seen.add(token)
                result.ids.append(token)
    return result


class VocabTokenizer:
    """A tokenizer made from a vocabulary of decoded token strings (an activation store's).

    ``encode`` returns the single id of a string that is one vocabulary entry exactly
    (the lowest id when several entries decode alike), and otherwise a greedy
    longest-prefix split: exact for the "single" rule of :func:`concept_token_ids`, an
    approximation of the real tokenizer for anything else.
    """

    def __init__(self, vocab: list[str]):
        self._ids: dict[str, int] = {}
        for index, text in enumerate(vocab):
            self._ids.setdefault(text, index)
        self._longest = max((len(t) for t in self._ids), default=0)

    def encode(self, text: str) -> list[int]:
        if text in self._ids:
            return [self._ids[text]]
        ids, start = [], 0
        while start < len(text):
            for end in range(min(len(text), start + self._longest), start, -1):
                if text[start:end] in self._ids:
                    ids.append(self._ids[text[start:end]])
                    start = end
                    break
            else:
                return []  # a character no entry covers: not encodable
        return ids


def store_concept_ids(vocab: list[str] | None, concept: str | os.PathLike) -> ConceptTokens:
    """Token ids of a shipped concept or list file, using a store's vocabulary strings.

    Raises
    ------
    ValueError
        The store has no vocabulary strings, or none of the concept's words is a single
        token of it (the "single" rule of :func:`concept_token_ids`): there is nothing to
        rank against.
    """
    if vocab is None:
        raise ValueError(
            "the store has no vocabulary strings: pass token ids, or export with a tokenizer"
        )
    words = load_concept(concept)
    found = concept_token_ids(VocabTokenizer(vocab), words)
    if not found.ids:
        shown = ", ".join(words[:5]) + (", ..." if len(words) > 5 else "")
        raise ValueError(
            f"concept {concept}: none of its {len(words)} words ({shown}) is a single token "
            f"of this store's vocabulary ({len(vocab)} tokens), with or without a leading "
            "space, as given, capitalised or lower-case; words that split into several "
            "tokens are dropped (the 'single' multi-token rule)"
        )
    return found
