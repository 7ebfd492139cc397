"""IterIS per iteration against its floor, interleaved so a busy machine hurts both alike.

The floor per iteration (as in :mod:`benchmarks.speed`): plain forward passes over every
task's calibration batches plus one Gram per distinct targeted-layer input per task.
Each round times the floor, then one IterIS merge of ``--iterations`` iterations (all of
it: batching, capture, solves; divided by the iteration count), then the floor again;
the ratio of a round divides IterIS' time per iteration by the mean of the two floors
around it. The median over rounds is reported.

Run: ``python -m benchmarks.speed_ratio --workdir bench-out`` (the four original task
adapters, 50 samples each; ``--tasks`` for others).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path

from tqdm import tqdm

from iteris_daemon.alignment import AlignmentOptions, align
from iteris_daemon.calibration import read_jsonl
from iteris_daemon.lora import load_adapter
from iteris_daemon.model import BaseModel
from iteris_daemon.plugins.iteris import IterISParams

from .speed import floor_pass
from .tasks import ORIGINAL_TASKS, TASKS
from .train import TrainConfig, default_model_path, train_all


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed_ratio", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--workdir", type=Path, default=Path("bench-out"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=2, help="default: 2, what the default stop runs")
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(ORIGINAL_TASKS),
                        help="task adapters to merge (default: the original four)")
    args = parser.parse_args(argv)
    model = default_model_path()
    folders = train_all(args.workdir / "adapters", model, TrainConfig(), tuple(args.tasks))
    adapters = [load_adapter(folder) for folder in folders.values()]
    data = [read_jsonl(folder / "calibration.jsonl").head(args.samples) for folder in folders.values()]
    base = BaseModel(model, adapters, offload="none")
    paths = sorted({p for a in adapters for p in a.modules})
    batches = [base.batches(c, 16, 128) for c in data]  # IterIS' defaults: batch 16, 128 tokens

    def floor() -> float:
        measured = floor_pass(base, paths, batches)
        return measured["forward_s"] + measured["gram_s"]

    defaults = IterISParams()  # the strategy's shipped regularisation and task weights
    options = AlignmentOptions(iterations=args.iterations, a1=defaults.a1, a2=defaults.a2,
                               adaptive_weights=defaults.adaptive_weights)
    ratios = []
    for round_ in range(args.rounds):
        before = floor()
        started = time.perf_counter()
        align(base, adapters, data, options, partial(tqdm, disable=True))
        per_iteration = (time.perf_counter() - started) / args.iterations
        after = floor()
        ratios.append(per_iteration / ((before + after) / 2))
        print(f"round {round_}: floor {before:.2f} s / {after:.2f} s, IterIS {per_iteration:.2f} s per iteration, "
              f"ratio {ratios[-1]:.2f}", flush=True)
    print(f"median ratio over {args.rounds} rounds: {statistics.median(ratios):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
