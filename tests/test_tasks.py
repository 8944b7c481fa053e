"""Experiment data: splits disjoint by entity, sizes the protocol needs, correct answers."""

from __future__ import annotations

import calendar
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from somp_ref.adapters.tasks import (
    SPLIT_SHARES,
    build_task,
    data,
    general_questions,
    split_entities,
)
from somp_ref.metrics import contains_answer

SPLITS = ("train", "validation", "test")


def entities(task, key):
    return {
        "train": {r[key] for r in task.train},
        "validation": {r[key] for r in task.validation.target},
        "test": {r[key] for r in task.test.target},
    }


@given(st.lists(st.text(min_size=1, max_size=5), max_size=40), st.integers(0, 2**31))
def test_split_entities_is_a_partition_of_the_given_shares(names, seed):
    parts = split_entities(names, SPLIT_SHARES, seed)
    together = [e for part in parts.values() for e in part]
    assert sorted(together) == sorted(set(names))  # every entity once
    for name, share in list(SPLIT_SHARES.items())[:-1]:
        assert abs(len(parts[name]) - share * len(set(names))) <= 0.5
    assert parts == split_entities(list(reversed(names)), SPLIT_SHARES, seed)  # order-free


@pytest.mark.parametrize(("name", "key"), [("colors", "object"), ("countries", "country")])
def test_train_validation_and_test_are_disjoint_by_entity(name, key):
    by_split = entities(build_task(name), key)
    for a in SPLITS:
        for b in SPLITS:
            assert a == b or not by_split[a] & by_split[b], (a, b)


@pytest.mark.parametrize("name", ["amplification", "sentiment"])
def test_descriptions_are_disjoint_by_place_and_never_ask_for_the_concept(name):
    task = build_task(name)
    by_split = entities(task, "place")
    assert (
        not by_split["train"] & by_split["test"] and not by_split["validation"] & by_split["test"]
    )
    concept = set(data("descriptions")["places"])
    assert by_split["test"] <= concept
    assert not any(re.search(r"colou?r|happy|positive", r["prompt"], re.I) for r in task.train)
    assert task.alpha is None  # chosen by a sweep on the validation split


def test_the_protocol_sizes_are_met():
    colors, countries = build_task("colors"), build_task("countries")
    assert len(colors.test.target) >= 96
    assert len(countries.test.target) >= 150 and len(countries.test.other) >= 150
    assert countries.validation.target and countries.validation.other


def test_country_questions_are_answered_by_their_country():
    task = build_task("countries")
    for record in task.train + task.test.target:
        assert record["answers"][0] == record["country"]
        assert record["entity"] in record["prompt"]
        assert "one to three words" in record["prompt"]
    usa = [
        r
        for r in task.train + task.test.target + task.validation.target
        if r["country"] == "United States"
    ]
    assert usa and all("USA" in r["answers"] for r in usa)


def test_non_target_questions_name_no_country_and_are_answered_right():
    countries = data("countries")["countries"]
    spelled = [c["country"] for c in countries] + [a for c in countries for a in c["aliases"]]
    names = {" ".join(re.findall(r"[a-z]+", name.lower())) for name in spelled} - {""}
    months = list(calendar.month_name[1:])
    for split, questions in general_questions(seed=0).items():
        assert questions, split
        for q in questions:
            text = " ".join(
                re.findall(r"[a-z]+", (q["question"] + " " + " ".join(q["answers"])).lower())
            )
            # Whole words or word sequences: "south africa", "new zealand" as well as "chad".
            assert not [n for n in names if re.search(rf"\b{re.escape(n)}\b", text)], q
            if match := re.fullmatch(r"What is (\d+) (plus|minus|times) (\d+)\?", q["question"]):
                a, op, b = int(match[1]), match[2], int(match[3])
                assert int(q["answers"][0]) == {"plus": a + b, "minus": a - b, "times": a * b}[op]
            if match := re.fullmatch(r"Which month comes after (\w+)\?", q["question"]):
                assert months.index(q["answers"][0]) == (months.index(match[1]) + 1) % 12
            # A right answer in a chatty sentence still counts.
            assert contains_answer(f"It is {q['answers'][0]}.", q["answers"]) == 1.0


@pytest.mark.parametrize("name", ["colors", "countries", "amplification", "sentiment"])
def test_the_neutral_prompts_cover_every_question_family(name):
    # The collateral measure takes the first --neutral prompts: they must not all be sums.
    families = set(data("general_questions")["families"])
    for split in (build_task(name).validation, build_task(name).test):
        assert {r["family"] for r in split.neutral[: len(families)]} == families


def test_unknown_experiment_is_refused():
    with pytest.raises(ValueError, match=r"unknown experiment 'colours'; have: colors"):
        build_task("colours")
