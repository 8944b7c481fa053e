"""The built-in experiments' data: train prompts to rank heads on, test prompts to evaluate
interventions on, with train and test about different entities (animals, countries,
letters), never the same entity in other words.
"""

from __future__ import annotations

import calendar
import json
import random
import string
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

QA_INSTRUCTION = "Answer in a few words. "
TASK_NAMES = ("colors", "countries", "amplification", "animals")


@dataclass
class Task:
    """One experiment's prompts and settings.

    Attributes
    ----------
    name : str
    concept : str
        Shipped concept list: the dictionary for ranking and the words counted.
    kind : {"generation", "qa"}
        "generation": count concept words in free answers; "qa": score short answers
        against gold answers (target questions answer with the concept, others do not).
    alpha : float
        Default scale of the selected heads.
    train : list of dict
        Prompt records exported for ranking.
    target : list of dict
        Test prompts where the concept is expected ("answers" for qa).
    other : list of dict
        Test prompts where it is not: non-target questions (qa) and neutral prompts for
        the KL collateral measure.
    max_new_tokens : int
    """

    name: str
    concept: str
    kind: str
    alpha: float
    train: list[dict[str, Any]]
    target: list[dict[str, Any]]
    other: list[dict[str, Any]]
    max_new_tokens: int
    notes: list[str] = field(default_factory=list)


def _data(name: str) -> dict[str, Any]:
    folder = files("somp_ref.adapters.experiment_data")
    return json.loads((folder / f"{name}.json").read_text("utf-8"))


def general_questions(n: int, seed: int) -> list[dict[str, Any]]:
    """Short questions whose answers are not countries: currencies, month order, sums."""
    rng = random.Random(seed)
    months = list(calendar.month_name[1:])
    questions = [
        {
            "prompt": f"{QA_INSTRUCTION}Which month comes after {m}?",
            "answers": [months[(i + 1) % 12]],
        }
        for i, m in enumerate(months)
    ]
    for _ in range(12):
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        questions.append(
            {"prompt": f"{QA_INSTRUCTION}What is {a} plus {b}?", "answers": [str(a + b)]}
        )
    for entry in _data("countries")["currencies"][:24]:
        questions.append(
            {
                "prompt": f"{QA_INSTRUCTION}What is the currency of {entry['country']} called?",
                "answers": [entry["currency"]],
            }
        )
    rng.shuffle(questions)
    return questions[:n]


def _colors(n_train: int, n_test: int, seed: int, alpha: float, name: str) -> Task:
    animals = list(_data("animals")["animals"])
    random.Random(seed).shuffle(animals)
    templates = ("Describe the color of a {}.", "What color is a {}?")
    train = [
        {"prompt": templates[i % 2].format(a), "object": a} for i, a in enumerate(animals[:n_train])
    ]
    test = [
        {"prompt": templates[0].format(a), "object": a} for a in animals[n_train : n_train + n_test]
    ]
    return Task(
        name,
        "colors",
        "generation",
        alpha,
        train,
        test,
        general_questions(n_test, seed),
        24,
        notes=["train and test describe different animals"],
    )


def _countries(n_train: int, n_test: int, seed: int) -> Task:
    data = _data("countries")
    aliases = data["aliases"]
    by_country: dict[str, list[dict[str, Any]]] = {}
    for entry in data["capitals"]:
        by_country.setdefault(entry["country"], []).append(
            {
                "prompt": f"{QA_INSTRUCTION}{entry['capital']} is the capital of which country?",
                "entity": entry["capital"],
            }
        )
    for entry in data["cities"]:
        if entry["country"] in by_country:
            by_country[entry["country"]].append(
                {
                    "prompt": f"{QA_INSTRUCTION}In which country is the city of {entry['city']}?",
                    "entity": entry["city"],
                }
            )
    countries = sorted(by_country)
    random.Random(seed).shuffle(countries)
    records = []
    for country in countries:
        for record in by_country[country]:
            records.append(
                {**record, "answers": [country, *aliases.get(country, [])], "country": country}
            )
    half = len(countries) // 2
    train_countries, test_countries = set(countries[:half]), set(countries[half:])
    train = [r for r in records if r["country"] in train_countries][:n_train]
    test = [r for r in records if r["country"] in test_countries][:n_test]
    return Task(
        "countries",
        "countries",
        "qa",
        -1.0,
        train,
        test,
        general_questions(n_test, seed),
        8,
        notes=["train and test ask about disjoint sets of countries"],
    )


def _animals(n_train: int, n_test: int, seed: int) -> Task:
    templates = (
        "Name an animal whose name starts with the letter {}.",
        "Tell me about an animal beginning with the letter {}.",
        "Which animal's name begins with {}?",
    )
    letters = list(string.ascii_uppercase)
    train = [{"prompt": t.format(c), "letter": c} for c in letters[:13] for t in templates]
    test = [{"prompt": t.format(c), "letter": c} for c in letters[13:] for t in templates]
    return Task(
        "animals",
        "animals",
        "generation",
        -1.0,
        train[:n_train],
        test[:n_test],
        general_questions(n_test, seed),
        24,
        notes=["train letters A-M, test letters N-Z"],
    )


def build_task(name: str, *, n_train: int = 64, n_test: int = 24, seed: int = 0) -> Task:
    """The data of a built-in experiment (see :data:`TASK_NAMES`)."""
    if name == "colors":
        return _colors(n_train, n_test, seed, -1.0, "colors")
    if name == "amplification":
        return _colors(n_train, n_test, seed, 5.0, "amplification")
    if name == "countries":
        return _countries(n_train, n_test, seed)
    if name == "animals":
        return _animals(n_train, n_test, seed)
    raise ValueError(f"unknown experiment {name!r}; have: {', '.join(TASK_NAMES)}")
