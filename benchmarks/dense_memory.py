"""Peak memory and time of the data-free strategies on one large layer (an LM head's size).

Random LoRA factors (no model, no data): ``--adapters`` adapters of rank ``--rank`` on
one ``--shape`` module. Each strategy merges in a fresh process (``python -m
benchmarks.dense_memory --one STRATEGY ...``), which reports its resident memory
before the merge (VmRSS, after a tiny warm-up merge and the factors made), its own
peak resident memory after it (:func:`iteris_daemon.memory.process_peak_mb`), and
the merge's seconds. TIES and DARE form
dense deltas; the LoRA-factor strategies never do.

Run: ``python -m benchmarks.dense_memory`` (131072 x 512, 4 adapters of rank 16).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_STRATEGIES = ["ties", "dare", "task_arithmetic", "core_space"]


def measure(strategy: str, d_out: int, d_in: int, adapters: int, rank: int, device: str = "cpu") -> dict:
    """One merge in this process: its RSS before the merge (None without /proc) and the process's own peak RSS."""
    import torch

    from iteris_daemon import memory
    from iteris_daemon.lora import LoraAdapter, LoraModule
    from iteris_daemon.plugin_manager import get_strategy
    from iteris_daemon.strategy import MergeInputs, parse_params

    g = torch.Generator().manual_seed(0)

    def loras(d_out: int, d_in: int, rank: int) -> list[LoraAdapter]:
        return [LoraAdapter(name=f"t{i}", path=Path(f"t{i}"), config={}, modules={"head": LoraModule(
            A=torch.randn(rank, d_in, generator=g) / d_in**0.5, B=torch.randn(d_out, rank, generator=g), scaling=2.0)})
            for i in range(adapters)]

    chosen = get_strategy(strategy)
    params = parse_params(chosen, {})
    # A tiny merge first: imports and the first calls into LAPACK map hundreds of MB of
    # code, once per process; "before" is taken after them, so the rest is the data's.
    chosen.merge(MergeInputs(base=None, adapters=loras(8, 8, 2), calibration=[None] * adapters), params,
                 lambda items, **_: items)
    big = loras(d_out, d_in, rank)
    before = memory.current_rss_mb()
    memory.reset_device_peak(device)
    started = time.perf_counter()
    merged = chosen.merge(MergeInputs(base=None, adapters=big, calibration=[None] * adapters, device=device), params,
                          lambda items, **_: items)
    seconds = time.perf_counter() - started
    B, A = merged.modules["head"]
    return {"strategy": strategy, "seconds": round(seconds, 2), "rss_before_mb": None if before is None else round(before),
            "peak_mb": round(memory.process_peak_mb()),
            "device_peak_mb": memory.device_peak_mb(device), "rank_written": A.shape[0], "truncation_error": merged.metrics.get("truncation_error", {}).get("max")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dense_memory", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--shape", default="131072x512", help="d_out x d_in of the module (default: 131072x512)")
    parser.add_argument("--adapters", type=int, default=4, help="how many adapters are merged (default: 4)")
    parser.add_argument("--rank", type=int, default=16, help="each adapter's LoRA rank (default: 16)")
    parser.add_argument("--strategies", nargs="+", default=DEFAULT_STRATEGIES,
                        help=f"strategies at their defaults (default: {' '.join(DEFAULT_STRATEGIES)})")
    parser.add_argument("--device", default="cpu", help="the merge device (default: cpu); TIES and DARE use it")
    parser.add_argument("--one", metavar="STRATEGY", help=argparse.SUPPRESS)  # the child process's job
    args = parser.parse_args(argv)
    d_out, d_in = (int(x) for x in args.shape.lower().split("x"))
    if args.one:
        print(json.dumps(measure(args.one, d_out, d_in, args.adapters, args.rank, args.device)))
        return 0
    rows = []
    for strategy in args.strategies:
        child = subprocess.run([sys.executable, "-m", "benchmarks.dense_memory", "--one", strategy, "--shape", args.shape,
                                "--adapters", str(args.adapters), "--rank", str(args.rank), "--device", args.device],
                               capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if child.returncode != 0:
            print(child.stderr, file=sys.stderr)
            return 1
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    print(f"one {d_out} x {d_in} module, {args.adapters} adapters of rank {args.rank}, on {args.device} "
          "(one CPU thread, a process each)\n")
    print("| strategy | seconds | RSS before (MB) | peak (MB) | device peak (MB) | rank written | truncation error |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        error = "-" if row["truncation_error"] is None else f"{row['truncation_error']:.3f}"
        device_peak = "-" if row["device_peak_mb"] is None else f"{row['device_peak_mb']:.0f}"
        before = "-" if row["rss_before_mb"] is None else row["rss_before_mb"]
        print(f"| {row['strategy']} | {row['seconds']:.1f} | {before} | {row['peak_mb']} | {device_peak} | "
              f"{row['rank_written']} | {error} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
