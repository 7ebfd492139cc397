"""Merge quality on a real model and real tasks.

All four task adapters (see :mod:`benchmarks.train`) are merged with every strategy
the project ships; each task is then scored on its held-out test set with its own
head. Reported per task: accuracy and normalized accuracy (merged / own adapter),
plus the mean over tasks. Two IterIS sweeps follow: calibration samples per task,
and iterations. Calibration texts come from the training split only, and no
parameter is chosen by looking at test scores.

Run: ``python -m benchmarks.quality --workdir bench-out`` (writes quality.json and
two PNG plots there).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm.auto import tqdm

from iteris_daemon.merge import AdapterSpec, MergeRequest, run_merge

from .evaluate import accuracy, majority_accuracy
from .tasks import TASKS
from .train import TrainConfig, default_model_path, train_all

STRATEGIES = (
    "iteris", "regmean", "task_arithmetic", "ties", "dare",
    "peft_cat", "peft_linear", "peft_svd", "peft_ties", "peft_ties_svd", "peft_dare_linear", "peft_dare_ties_svd",
    "peft_magnitude_prune_svd",
)
SAMPLE_SWEEP = (5, 10, 20, 50, 100, 200)
ITERATION_SWEEP = (0, 1, 2, 5, 10)  # 0 = the first (RegMean-like) solve only


def merge_and_score(model: str, adapters: dict[str, Path], strategy: str, params: dict, out: Path,
                    limit: int | None = None) -> dict:
    """Merge all adapters with ``strategy`` and return per-task test accuracy plus timing."""
    report = run_merge(MergeRequest(
        base_model=model,
        adapters=[AdapterSpec(folder) for folder in adapters.values()],
        out=out, strategy=strategy, params=params, overwrite=True, evaluate=False, quiet=True,
    ))
    scores = {task: accuracy(model, out, folder, task, limit=limit) for task, folder in adapters.items()}
    return {"accuracy": scores, "merge_seconds": report["merge_seconds"], "iterations_run": report["iterations_run"]}


def normalized(scores: dict[str, float], own: dict[str, float]) -> float:
    return sum(scores[t] / own[t] for t in scores) / len(scores)


def run(workdir: Path, tasks: tuple[str, ...] = TASKS, strategies: tuple[str, ...] = STRATEGIES,
        train_config: TrainConfig = TrainConfig(), sample_sweep=SAMPLE_SWEEP, iteration_sweep=ITERATION_SWEEP,
        test_limit: int | None = None, iteris_params: dict | None = None) -> dict:
    """Train (or reuse) the adapters, then run the strategy table and both IterIS sweeps.
    ``iteris_params`` overrides IterIS defaults everywhere (smoke tests shrink the work)."""
    base_params = dict(iteris_params or {})
    model = default_model_path()
    adapters = train_all(workdir / "adapters", model, train_config, tasks)
    merges = workdir / "merges"
    results: dict = {"tasks": list(tasks), "baselines": {}, "strategies": {}, "samples": {}, "iterations": {}}
    for task, folder in tqdm(adapters.items(), desc="references"):
        results["baselines"][task] = {
            "majority": majority_accuracy(task),
            "base+head": accuracy(model, None, folder, task, limit=test_limit),
            "own adapter": accuracy(model, folder, folder, task, limit=test_limit),
        }
    own = {t: results["baselines"][t]["own adapter"] for t in tasks}
    for strategy in tqdm(strategies, desc="strategies"):
        params = base_params if strategy == "iteris" else {}
        entry = merge_and_score(model, adapters, strategy, params, merges / strategy, test_limit)
        entry["normalized"] = normalized(entry["accuracy"], own)
        results["strategies"][strategy] = entry
    for samples in tqdm(sample_sweep, desc="sample sweep"):
        entry = merge_and_score(model, adapters, "iteris", {**base_params, "samples_per_task": samples}, merges / f"samples-{samples}", test_limit)
        results["samples"][samples] = normalized(entry["accuracy"], own)
    for iterations in tqdm(iteration_sweep, desc="iteration sweep"):
        params = {**base_params, "iterations": iterations + 1, "tolerance": 0.0}
        entry = merge_and_score(model, adapters, "iteris", params, merges / f"iterations-{iterations}", test_limit)
        results["iterations"][iterations] = normalized(entry["accuracy"], own)
    return results


def table(results: dict) -> str:
    tasks = results["tasks"]
    lines = ["| | " + " | ".join(tasks) + " | mean normalized |", "|---" * (len(tasks) + 2) + "|"]
    own = {t: results["baselines"][t]["own adapter"] for t in tasks}
    for name in ("majority", "base+head", "own adapter"):
        row = [results["baselines"][t][name] for t in tasks]
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in row) +
                     f" | {sum(v / own[t] for v, t in zip(row, tasks)) / len(tasks):.3f} |")
    ranked = sorted(results["strategies"].items(), key=lambda item: -item[1]["normalized"])
    for name, entry in ranked:
        cells = [f"{entry['accuracy'][t]:.3f} ({entry['accuracy'][t] / own[t]:.2f})" for t in tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | **{entry['normalized']:.3f}** |")
    return "\n".join(lines)


def plot(results: dict, workdir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best_baseline = max(v["normalized"] for k, v in results["strategies"].items() if k != "iteris")
    paths = []
    for key, xlabel, name, log in (
        ("samples", "calibration samples per task", "iteris_samples.png", True),
        ("iterations", "iterations after the first solve", "iteris_iterations.png", False),
    ):
        xs = [int(x) for x in results[key]]
        ys = list(results[key].values())
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
        ax.plot(xs, ys, marker="o", label="IterIS")
        ax.axhline(best_baseline, color="grey", linestyle="--", label="best baseline (defaults)")
        if log:
            ax.set_xscale("log")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mean normalized accuracy")
        ax.legend(loc="lower right")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(workdir / name)
        plt.close(fig)
        paths.append(workdir / name)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("bench-out"))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = run(args.workdir, tuple(args.tasks), tuple(args.strategies))
    (args.workdir / "quality.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    for path in plot(results, args.workdir):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
