"""Evaluation metrics of the experiments (pure Python/numpy, no torch).

SQuAD-style answer matching, concept word counting, KL divergence between next-token
distributions, and a degeneracy detector for generated text.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Iterable

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_WORDS = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, golds: Iterable[str]) -> float:
    """1.0 if the normalised prediction equals a normalised gold answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


def token_f1(prediction: str, golds: Iterable[str]) -> float:
    """SQuAD token F1 against the best-matching gold answer."""
    pred = normalize_answer(prediction).split()
    best = 0.0
    for gold in golds:
        ref = normalize_answer(gold).split()
        common = sum((Counter(pred) & Counter(ref)).values())
        if not pred or not ref:
            score = float(pred == ref)
        elif common == 0:
            score = 0.0
        else:
            precision, recall = common / len(pred), common / len(ref)
            score = 2 * precision * recall / (precision + recall)
        best = max(best, score)
    return best


def contains_answer(prediction: str, golds: Iterable[str]) -> float:
    """1.0 if a normalised gold answer appears as whole words in the normalised prediction
    (lenient accuracy for chatty answers such as "Paris is in France.")."""
    pred = f" {normalize_answer(prediction)} "
    return float(any(f" {normalize_answer(g)} " in pred for g in golds if normalize_answer(g)))


def words_of(text: str) -> list[str]:
    """Lower-case words (letters, inner apostrophes), punctuation and digits removed."""
    return [w.lower() for w in _WORDS.findall(text)]


def count_concept_words(text: str, concept: Iterable[str]) -> int:
    """How many words of ``text`` belong to the concept (case and punctuation ignored)."""
    vocabulary = {w.lower() for w in concept}
    return sum(1 for word in words_of(text) if word in vocabulary)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (stable)."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(p || q) per row of two logit arrays (..., vocab), in nats, float64."""
    log_p, log_q = log_softmax(p_logits), log_softmax(q_logits)
    return np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)


def is_degenerate(text: str, *, min_words: int = 3, min_distinct: float = 0.5) -> bool:
    """Whether a generation is empty, too short, or repetitive.

    Degenerate when it has fewer than ``min_words`` words, or when fewer than
    ``min_distinct`` of its word trigrams (bigrams for short texts) are distinct, or when
    one word makes up more than 40 % of eight or more words (fluent English stays below
    ~10 %), or when less than half its non-space characters are letters.
    """
    words = words_of(text)
    if len(words) < min_words:
        return True
    if len(words) >= 8 and Counter(words).most_common(1)[0][1] > 0.4 * len(words):
        return True
    n = 3 if len(words) >= 6 else 2
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if len(set(grams)) < min_distinct * len(grams):
        return True
    chars = [c for c in text if not c.isspace()]
    return sum(c.isalpha() for c in chars) < 0.5 * len(chars)
