"""IterIS' stopping rules: the relative change of the merge, or the alignment objective."""

from functools import partial

import pytest
import torch
from tqdm import tqdm

from iteris_daemon.alignment import AlignmentOptions, align
from iteris_daemon.calibration import read_jsonl
from iteris_daemon.lora import load_adapter
from iteris_daemon.model import BaseModel

quiet = partial(tqdm, disable=True)


def _setup(tiny, family):
    base_dir, adapter_dirs = tiny[family]
    adapters = [load_adapter(d) for d in adapter_dirs]
    return BaseModel(str(base_dir), adapters), adapters, [read_jsonl(d / "calibration.jsonl") for d in adapter_dirs]


def _options(**kw) -> AlignmentOptions:
    return AlignmentOptions(**{"a1": 1e-3, "a2": 1e-3, "adaptive_weights": True, **kw})


def _mean_losses(metrics) -> list[float]:
    losses = list(metrics["alignment_loss"].values())
    return [sum(task[k] for task in losses) / len(losses) for k in range(len(losses[0]))]


def _first_rise(mean: list[float]) -> int | None:
    """The index of the first measured loss no lower than the one before (None: none)."""
    return next((k for k in range(1, len(mean)) if mean[k] >= mean[k - 1]), None)


@pytest.mark.parametrize("family, stops", [("gpt2", True), ("bert", False)])
def test_objective_rule_returns_the_best_measured_merge(tiny, family, stops):
    """The rule, checked against the loss sequence of a run that never stops: it stops
    at the first solve whose measured loss is no better than its predecessor's and
    returns that predecessor, bit for bit the merge of a run with that many solves.
    On the tiny models, GPT-2's loss rises at its fifth solve and BERT's keeps falling."""
    base, adapters, data = _setup(tiny, family)
    _, full = align(base, adapters, data, _options(iterations=6), quiet)
    rise = _first_rise(_mean_losses(full))
    assert (rise is not None) == stops
    factors, metrics = align(base, adapters, data, _options(iterations=6, stop="objective"), quiet)
    if rise is None:
        assert metrics["iterations_run"] == metrics["returned_iteration"] == 6
        return
    assert metrics["returned_iteration"] == rise and metrics["iterations_run"] == rise + 1
    assert metrics["calibration_passes"] == rise + 2  # the sweep that measured no gain ran too
    expected, _ = align(base, adapters, data, _options(iterations=rise), quiet)
    for path, (B, A) in factors.items():
        assert torch.equal(B @ A, expected[path][0] @ expected[path][1]), path


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_objective_rule_with_a_tolerance_returns_the_better_of_the_last_two(tiny, family):
    """With a tolerance, a solve that improves the loss by less than it stops the run, and
    the better of the two merges is returned: that solve (it did improve), not the one
    before it, which the rule returned whenever it stopped (at the default tolerance 1.0,
    always the first solve). Checked against the loss sequence of a run that never stops."""
    base, adapters, data = _setup(tiny, family)
    _, full = align(base, adapters, data, _options(iterations=6), quiet)
    mean = _mean_losses(full)
    stop = next(k for k in range(1, len(mean)) if mean[k] >= mean[k - 1] * 0.5)  # tolerance 0.5
    better = stop + 1 if mean[stop] < mean[stop - 1] else stop  # which solve (1 = the first)
    factors, metrics = align(base, adapters, data, _options(iterations=6, stop="objective", tolerance=0.5), quiet)
    assert metrics["returned_iteration"] == better and metrics["iterations_run"] == stop + 1
    assert any(mean[k] < mean[k - 1] for k in range(1, len(mean)))  # a gain to keep exists on these models
    expected, _ = align(base, adapters, data, _options(iterations=better), quiet)
    for path, (B, A) in factors.items():
        assert torch.equal(B @ A, expected[path][0] @ expected[path][1]), path


def test_change_rule_stops_at_the_tolerance(tiny):
    base, adapters, data = _setup(tiny, "llama")
    _, metrics = align(base, adapters, data, _options(iterations=20, tolerance=0.05), quiet)
    changes = metrics["relative_change"]
    assert changes[-1] < 0.05 and all(c >= 0.05 for c in changes[:-1])
    assert metrics["returned_iteration"] == metrics["iterations_run"] < 20
    assert metrics["calibration_passes"] == metrics["iterations_run"]  # joint: one pass per solve


@pytest.mark.parametrize("tolerance", [0.0, 0.5])
def test_a_run_the_objective_stopped_converged_and_lists_each_solve_once(tiny, tmp_path, tolerance):
    """A run the objective rule stopped reported ``converged: false``, as one that hit the
    cap, and its history listed the returned solve twice (measured by the rule, then by the
    final evaluation), or the rejected solve after it. Now the report lists one loss per solve
    up to the one returned, the last the evaluation's; and ``--no-eval`` keeps the solves'
    losses in the metrics (they were dropped)."""
    import json

    from builders import cli_merge

    base_dir, adapter_dirs = tiny["gpt2"]  # its loss rises at the fifth solve (above): the rule stops
    params = ["--param", "stop=objective", "--param", f"tolerance={tolerance}", "--param", "iterations=8"]
    assert cli_merge(base_dir, adapter_dirs, tmp_path / "out", *params) == 0
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    metrics = report["metrics"]
    assert metrics["converged"] and metrics["returned_iteration"] < 8
    for figures in report["tasks"].values():
        assert len(figures["alignment_loss"]) == metrics["returned_iteration"]
    assert cli_merge(base_dir, adapter_dirs, tmp_path / "bare", *params, "--no-eval") == 0
    bare = json.loads((tmp_path / "bare" / "merge_report.json").read_text())["metrics"]
    assert {name: len(losses) for name, losses in bare["alignment_loss"].items()} == {
        d.name: metrics["returned_iteration"] - 1 for d in adapter_dirs}
