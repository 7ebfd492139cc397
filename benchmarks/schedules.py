"""Joint (Jacobi) against sequential (Gauss-Seidel) sweeps, on the public tasks.

The four task adapters of :mod:`benchmarks.quality` are merged with IterIS at its
defaults except the schedule and the number of sweeps (tolerance 0, so every sweep
runs); each merge is scored on the tasks' test sets. The table shows the mean
normalized accuracy, the worst task, and the forward passes each merge cost (a
sequential sweep re-runs every block with its new merge, and its first sweep also
runs the tasks' own adapters separately), as the merge reports them.

Run: ``python -m benchmarks.schedules --workdir bench-out`` (writes schedules.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .quality import merge_and_score
from .tasks import ORIGINAL_TASKS
from .train import TrainConfig, default_model_path, train_all

SWEEPS = (1, 2, 3)


def run(workdir: Path, sweeps=SWEEPS, tasks: tuple[str, ...] = ORIGINAL_TASKS, test_limit: int | None = None,
        params: dict | None = None) -> dict:
    from .evaluate import accuracy

    model = default_model_path()
    adapters = train_all(workdir / "adapters", model, TrainConfig(), tasks)
    own = {task: accuracy(model, folder, folder, task, limit=test_limit) for task, folder in adapters.items()}
    results: dict = {"own": own, "runs": []}
    for schedule in ("joint", "sequential"):
        for count in sweeps:
            merged = {**(params or {}), "schedule": schedule, "iterations": count, "tolerance": 0.0}
            entry = merge_and_score(model, adapters, "iteris", merged, workdir / "schedules" / f"{schedule}-{count}",
                                    test_limit)
            ratios = {task: entry["accuracy"][task] / own[task] for task in own}
            # the merge's own count of calibration passes, not a formula of the schedule
            results["runs"].append({"schedule": schedule, "sweeps": count, "forward_passes": entry["calibration_passes"],
                                    "mean": sum(ratios.values()) / len(ratios), "worst": min(ratios.values()),
                                    "seconds": entry["merge_seconds"], "normalized": ratios})
    return results


def table(results: dict) -> str:
    lines = ["| schedule | sweeps | forward passes per task | mean normalized accuracy | worst task | merge s |",
             "|---|---|---|---|---|---|"]
    for run_ in results["runs"]:
        lines.append(f"| {run_['schedule']} | {run_['sweeps']} | {run_['forward_passes']} | {run_['mean']:.3f} | "
                     f"{run_['worst']:.3f} | {run_['seconds']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.schedules", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--workdir", type=Path, default=Path("bench-out"))
    parser.add_argument("--sweeps", type=int, nargs="+", default=list(SWEEPS))
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = run(args.workdir, tuple(args.sweeps))
    (args.workdir / "schedules.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
