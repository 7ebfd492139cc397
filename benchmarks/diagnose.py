"""Where an IterIS merge loses: per task, on the validation split (never test data).

Merges the task adapters with IterIS (defaults, or ``--param`` overrides) with the
evaluation on, then prints per task: normalized validation accuracy (merged / own
adapter), the adaptive task weight, the alignment loss and fidelity gap on its
calibration inputs, and the layers that carry most of its alignment loss.

Run: ``python -m benchmarks.diagnose --workdir bench-out [--tasks ...] [--param a1=1e-4]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from iteris_daemon.merge import AdapterSpec, MergeRequest, run_merge

from .evaluate import accuracy
from .tasks import TASKS
from .train import TrainConfig, default_model_path, train_all


def diagnose(workdir: Path, tasks: tuple[str, ...], params: dict, top: int = 3,
             train_config: TrainConfig = TrainConfig(), limit: int | None = None) -> dict:
    """``limit`` scores only the first validation examples (smoke tests)."""
    model = default_model_path()
    adapters = train_all(workdir / "adapters", model, train_config, tasks)
    out = workdir / "merges" / "diagnose"
    report = run_merge(MergeRequest(base_model=model, adapters=[AdapterSpec(f) for f in adapters.values()], out=out,
                                    strategy="iteris", params=params, overwrite=True, quiet=True))
    weights = report["metrics"]["task_weights"]
    rows = {}
    for task, folder in adapters.items():
        own = accuracy(model, folder, folder, task, split="validation", limit=limit)
        merged = accuracy(model, out, folder, task, split="validation", limit=limit)
        figures = report["tasks"][folder.name]
        layers = figures["alignment_loss_by_layer"]
        rows[task] = {
            "normalized_validation": merged / own, "task_weight": weights[folder.name],
            "alignment_loss": figures["alignment_loss"][-1], "fidelity_gap": figures["fidelity_gap"],
            "worst_layers": sorted((p for p in layers if layers[p] is not None), key=layers.get, reverse=True)[:top], "by_layer": layers,
        }
    return {"params": report["params"], "iterations_run": report["iterations_run"], "tasks": rows}


def table(results: dict) -> str:
    lines = ["| task | normalized validation accuracy | task weight | alignment loss | fidelity gap | "
             "layers with the largest loss |", "|---|---|---|---|---|---|"]
    for task, row in sorted(results["tasks"].items(), key=lambda item: item[1]["normalized_validation"]):
        worst = ", ".join(f"{p} {row['by_layer'][p]:.3f}" for p in row["worst_layers"])
        lines.append(f"| {task} | {row['normalized_validation']:.3f} | {row['task_weight']:.3g} | "
                     f"{row['alignment_loss']:.3f} | {row['fidelity_gap']:.3f} | {worst} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.diagnose", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--workdir", type=Path, default=Path("bench-out"))
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="default: all")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=JSON", help="an IterIS parameter")
    args = parser.parse_args(argv)
    params = {}
    for item in args.param:
        key, _, value = item.partition("=")
        params[key] = json.loads(value)
    results = diagnose(args.workdir, tuple(args.tasks), params)
    (args.workdir / "diagnose.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
