"""Experiment data: disjoint train/test entities and correct labels."""

from __future__ import annotations

import calendar
import re

import pytest

from somp_ref.adapters.tasks import TASK_NAMES, build_task, general_questions


@pytest.mark.parametrize("name", TASK_NAMES)
def test_sizes_and_fields(name):
    task = build_task(name, n_train=20, n_test=10)
    assert 0 < len(task.train) <= 20 and len(task.target) == 10 and len(task.other) == 10
    assert all(isinstance(r["prompt"], str) and r["prompt"] for r in task.train + task.target)
    assert task.kind in ("generation", "qa")


def test_colors_train_and_test_describe_different_animals():
    task = build_task("colors", n_train=60, n_test=24)
    train, test = {r["object"] for r in task.train}, {r["object"] for r in task.target}
    assert not train & test and len(test) == 24
    assert all(r["object"] in r["prompt"] for r in task.train + task.target)
    assert build_task("amplification").alpha == 5.0 and task.alpha == -1.0


def test_countries_split_by_country_and_answers_are_the_country():
    task = build_task("countries", n_train=200, n_test=200)
    train = {r["country"] for r in task.train}
    test = {r["country"] for r in task.target}
    assert not train & test
    for record in task.train + task.target:
        assert record["answers"][0] == record["country"]
        assert record["entity"] in record["prompt"]
    assert any(
        r["answers"][0] == "United States" and "USA" in r["answers"]
        for r in task.train + task.target
    )


def test_animals_train_and_test_use_different_letters():
    task = build_task("animals")
    letters = lambda records: {r["letter"] for r in records}  # noqa: E731
    assert letters(task.train) == set("ABCDEFGHIJKLM")
    assert not letters(task.train) & letters(task.target)


def test_general_questions_have_correct_answers_and_no_country_answers():
    months = list(calendar.month_name[1:])
    countries_task = build_task("countries", n_train=500, n_test=500)
    countries = {r["country"] for r in countries_task.train + countries_task.target}
    for record in general_questions(48, seed=3):
        answer = record["answers"][0]
        assert answer not in countries
        if match := re.search(r"What is (\d) plus (\d)\?", record["prompt"]):
            assert int(answer) == int(match[1]) + int(match[2])
        if match := re.search(r"comes after (\w+)\?", record["prompt"]):
            assert months.index(answer) == (months.index(match[1]) + 1) % 12


def test_unknown_experiment_is_refused():
    with pytest.raises(ValueError, match=r"unknown experiment 'colours'; have: colors"):
        build_task("colours")
