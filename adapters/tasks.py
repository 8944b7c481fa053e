"""The experiments' data: prompts to rank heads on, to make choices on, and to report on.

Every task splits its entities (animals, countries, places, general-question topics) into
train, validation and test, so that no entity of the test split was seen while ranking
heads (train) or choosing k, alpha or the ranking (validation). Data come from the JSON
files of :mod:`somp_ref.adapters.experiment_data`, built from PyPI packages.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

Record = dict[str, Any]

#: The paper's QA template (its appendix): a short answer and no explanation.
QA_TEMPLATE = (
    "Answer the question in one to three words, with no explanation.\nQuestion: {question}"
)
#: Shares of each task's entities in train, validation and test.
SPLIT_SHARES = {"train": 0.4, "validation": 0.2, "test": 0.4}
#: Non-target questions are never ranked on: they split into validation and test only.
OTHER_SHARES = {"validation": 0.35, "test": 0.65}
COLOR_TEMPLATES = ("Describe the color of a {}.", "What color is a {}?")
TASK_NAMES = ("colors", "countries", "amplification", "sentiment")


@dataclass(frozen=True)
class Split:
    """The prompts of one evaluation split.

    Attributes
    ----------
    target : tuple of dict
        Prompts where the concept is expected ("suppress", "qa": answers name it) or
        possible ("amplify": open descriptions that do not ask for it).
    other : tuple of dict
        QA only: questions whose question and answer name no instance of the concept.
    neutral : tuple of dict
        Prompts unrelated to the concept, for the collateral measure (KL).
    """

    target: tuple[Record, ...]
    other: tuple[Record, ...] = ()
    neutral: tuple[Record, ...] = ()


@dataclass(frozen=True)
class Task:
    """One experiment.

    Attributes
    ----------
    name : str
    concept : str
        Shipped concept list: the dictionary heads are ranked for, and the words counted.
    kind : {"suppress", "qa", "amplify"}
        "suppress": fewer concept words in answers that would have them (alpha < 0);
        "qa": wrong answers to questions answered by the concept, right answers to the
        others; "amplify": more concept words in answers that need none (alpha > 1).
    train : tuple of dict
        Prompts exported and ranked on.
    validation, test : Split
    alpha : float or None
        The scale of the selected heads; None: chosen by a sweep on the validation split.
    max_new_tokens : int
    notes : tuple of str
        What is disjoint from what, in words, for the report.
    """

    name: str
    concept: str
    kind: str
    train: tuple[Record, ...]
    validation: Split
    test: Split
    alpha: float | None
    max_new_tokens: int
    notes: tuple[str, ...] = field(default=())


def data(name: str) -> dict[str, Any]:
    """One shipped data file (countries, general_questions, animals, descriptions)."""
    folder = files("somp_ref.adapters.experiment_data")
    return json.loads((folder / f"{name}.json").read_text("utf-8"))


def split_entities(
    entities: Sequence[str], shares: dict[str, float], seed: int
) -> dict[str, list[str]]:
    """Shuffle ``entities`` (sorted first, so the input order does not matter) and cut them
    into consecutive parts of the given shares; the last part takes the rounding rest."""
    order = sorted(set(entities))
    random.Random(seed).shuffle(order)
    parts, start = {}, 0
    names = list(shares)
    for i, name in enumerate(names):
        end = len(order) if i == len(names) - 1 else start + round(shares[name] * len(order))
        parts[name] = order[start:end]
        start = end
    return parts


def qa_prompt(question: str) -> str:
    return QA_TEMPLATE.format(question=question)


def general_questions(seed: int) -> dict[str, list[Record]]:
    """The non-target questions by split (validation, test): arithmetic, months, weekdays,
    plurals, number words, chemical symbols, units; split by what each asks about.

    Each split lists its families in turn (one question of each, then the next of each),
    so that any prefix, such as the neutral prompts the collateral measure takes, covers
    every family rather than the first one.
    """
    families = data("general_questions")["families"]
    entities = [f"{family}:{q['entity']}" for family, qs in families.items() for q in qs]
    parts = split_entities(entities, OTHER_SHARES, seed)
    where = {entity: name for name, members in parts.items() for entity in members}
    by_family: dict[str, dict[str, list[Record]]] = {name: {} for name in parts}
    for family, questions in families.items():
        for q in questions:
            by_family[where[f"{family}:{q['entity']}"]].setdefault(family, []).append(
                {
                    "prompt": qa_prompt(q["question"]),
                    "question": q["question"],
                    "answers": q["answers"],
                    "family": family,
                }
            )
    return {name: _in_turn(list(groups.values())) for name, groups in by_family.items()}


def _in_turn(groups: list[list[Record]]) -> list[Record]:
    """The first item of every group, then the second of every group that has one, ..."""
    turns = itertools.zip_longest(*groups)
    return [record for turn in turns for record in turn if record is not None]


def _colors(seed: int) -> Task:
    parts = split_entities(data("animals")["animals"], SPLIT_SHARES, seed)
    questions = general_questions(seed)

    def prompts(animals: list[str]) -> tuple[Record, ...]:
        return tuple(
            {"prompt": template.format(animal), "object": animal}
            for animal in animals
            for template in COLOR_TEMPLATES
        )

    return Task(
        name="colors",
        concept="colors",
        kind="suppress",
        train=prompts(parts["train"]),
        validation=Split(prompts(parts["validation"]), neutral=tuple(questions["validation"])),
        test=Split(prompts(parts["test"]), neutral=tuple(questions["test"])),
        alpha=-1.0,
        max_new_tokens=24,
        notes=("train, validation and test describe disjoint sets of animals",),
    )


def _countries(seed: int) -> Task:
    entries = data("countries")["countries"]
    parts = split_entities([e["country"] for e in entries], SPLIT_SHARES, seed)
    questions = general_questions(seed)

    def prompts(countries: list[str]) -> tuple[Record, ...]:
        chosen = set(countries)
        records = []
        for entry in entries:
            if entry["country"] not in chosen:
                continue
            answers = [entry["country"], *entry["aliases"]]
            asked = [(entry["capital"], f"{entry['capital']} is the capital of which country?")]
            asked += [
                (city, f"In which country is the city of {city}?") for city in entry["cities"]
            ]
            for entity, question in asked:
                if entity:
                    records.append(
                        {
                            "prompt": qa_prompt(question),
                            "question": question,
                            "answers": answers,
                            "country": entry["country"],
                            "entity": entity,
                        }
                    )
        return tuple(records)

    def split(name: str) -> Split:
        other = tuple(questions[name])
        return Split(prompts(parts[name]), other=other, neutral=other)

    return Task(
        name="countries",
        concept="countries",
        kind="qa",
        train=prompts(parts["train"]),
        validation=split("validation"),
        test=split("test"),
        alpha=-1.0,
        max_new_tokens=8,
        notes=(
            "train, validation and test ask about disjoint sets of countries",
            "non-target questions name no country in question or answer",
        ),
    )


def _descriptions(seed: int) -> dict[str, tuple[Record, ...]]:
    content = data("descriptions")
    parts = split_entities(content["places"], SPLIT_SHARES, seed)
    return {
        name: tuple(
            {"prompt": template.format(place=place, time=time), "place": place}
            for place in places
            for time in content["times"]
            for template in content["templates"][:1]
        )
        for name, places in parts.items()
    }


def _amplify(name: str, concept: str, seed: int) -> Task:
    described = _descriptions(seed)
    questions = general_questions(seed)
    return Task(
        name=name,
        concept=concept,
        kind="amplify",
        train=described["train"],
        validation=Split(described["validation"], neutral=tuple(questions["validation"])),
        test=Split(described["test"], neutral=tuple(questions["test"])),
        alpha=None,
        max_new_tokens=32,
        notes=(
            "open descriptions that do not ask for the concept",
            "train, validation and test describe disjoint sets of places",
        ),
    )


def build_task(name: str, *, seed: int = 0) -> Task:
    """The data of a built-in experiment (see :data:`TASK_NAMES`)."""
    if name == "colors":
        return _colors(seed)
    if name == "countries":
        return _countries(seed)
    if name == "amplification":
        return _amplify("amplification", "colors", seed)
    if name == "sentiment":
        return _amplify("sentiment", "positive", seed)
    raise ValueError(f"unknown experiment {name!r}; have: {', '.join(TASK_NAMES)}")
