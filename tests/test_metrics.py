"""Evaluation metrics on known cases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from somp_ref.metrics import (
    contains_answer,
    count_concept_words,
    exact_match,
    is_degenerate,
    kl_divergence,
    normalize_answer,
    token_f1,
)


def test_squad_normalisation_and_scores():
    assert normalize_answer("The  United-States!") == "unitedstates"
    assert exact_match("France.", ["france"]) == 1.0
    assert exact_match("It is France", ["France"]) == 0.0
    assert token_f1("It is France", ["France"]) == pytest.approx(2 * (1 / 3) / (1 / 3 + 1))
    assert token_f1("Paris", ["France"]) == 0.0
    assert token_f1("the", ["a"]) == 1.0  # both normalise to nothing
    assert token_f1("United Kingdom", ["UK", "United Kingdom"]) == 1.0
    assert contains_answer("I think it is France, yes.", ["France"]) == 1.0
    assert contains_answer("Francesca", ["France"]) == 0.0  # whole words only


def test_concept_words_ignore_case_and_punctuation():
    colors = ["red", "blue", "green"]
    assert count_concept_words("Red, blue... and RED! Not reddish.", colors) == 3
    assert count_concept_words("", colors) == 0
    assert count_concept_words("blue-green", colors) == 2


@given(arrays(np.float64, (3, 7), elements=st.floats(-30, 30)))
def test_kl_of_identical_distributions_is_zero(logits):
    assert np.all(np.abs(kl_divergence(logits, logits)) <= 1e-12)


@given(
    arrays(np.float64, (2, 5), elements=st.floats(-10, 10)),
    arrays(np.float64, (2, 5), elements=st.floats(-10, 10)),
)
def test_kl_is_non_negative_and_shift_invariant(p, q):
    kl = kl_divergence(p, q)
    assert np.all(kl >= -1e-12)
    assert np.allclose(kl, kl_divergence(p + 3.0, q - 2.0), rtol=0, atol=1e-9)


def test_kl_known_value():
    p = np.log([[0.5, 0.5]])
    q = np.log([[0.9, 0.1]])
    expected = 0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1)
    assert abs(kl_divergence(p, q)[0] - expected) <= 1e-12


@pytest.mark.parametrize(
    ("text", "degenerate"),
    [
        ("", True),
        ("   ", True),
        ("Yes.", True),
        ("The color of a banana is yellow with brown spots.", False),
        ("theg, theg, theg, theg, theg, theg, theg, theg", True),
        ("to The to a. to a the, the the the the the the the the", True),
        ("1234 5678 !!!! #### a b c", True),
        ("Blue whales are blue and they are large.", False),
    ],
)
def test_degeneracy_detector(text, degenerate):
    assert is_degenerate(text) is degenerate
