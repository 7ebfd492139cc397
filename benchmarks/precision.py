"""What the base model's compute precision (``--dtype``) does to a merge.

The quality benchmark's task adapters (N = 4 and N = 8) are merged with IterIS and
RegMean at their defaults, the base model in float32, bfloat16 and float16, and each
merge is compared with a reference: the same strategy in float32 with float64 Gram
products (``accumulate_dtype=float64``). Reported per merge: the relative difference
of its merged deltas from the reference's (all modules together, and the module that
differs most), the test split's mean normalized accuracy and worst task (every merge
scored with the encoder in float32, so only the merge's precision differs), solves run
and merge time.

Run: ``python -m benchmarks.precision --workdir bench-out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from iteris_daemon.lora import load_adapter

from .evaluate import accuracy
from .quality import GROUPS, merge_and_score, summary
from .train import TrainConfig, default_model_path, train_all

# name -> (the base model's compute dtype, the Gram products' dtype); the first is the reference
SETTINGS: dict[str, tuple[str, str]] = {
    "float32, float64 Grams (reference)": ("float32", "float64"),
    "float32": ("float32", "float32"),
    "bfloat16": ("bfloat16", "float32"),
    "float16": ("float16", "float32"),
}
STRATEGIES = ("iteris", "regmean")


def difference(merged: Path, reference: Path) -> dict[str, float]:
    """Relative Frobenius difference of two merges' deltas: over all modules, and that of the
    module whose relative difference is the largest."""
    ours, ref = load_adapter(merged).modules, load_adapter(reference).modules
    if set(ours) != set(ref):
        raise ValueError(f"{merged} and {reference} adapt different modules")
    errors = {name: (ours[name].delta() - ref[name].delta()).norm() ** 2 for name in ref}
    norms = {name: ref[name].delta().norm() ** 2 for name in ref}
    worst = max(ref, key=lambda name: errors[name] / norms[name])
    return {"overall": float((sum(errors.values()) / sum(norms.values())).sqrt()),
            "worst_module": float((errors[worst] / norms[worst]).sqrt()), "worst_module_name": worst}


def run(workdir: Path, groups: dict[int, tuple[str, ...]] = GROUPS, strategies: tuple[str, ...] = STRATEGIES,
        settings: dict[str, tuple[str, str]] = SETTINGS, train_config: TrainConfig = TrainConfig(),
        params: dict | None = None, limit: int | None = None) -> dict:
    """Every (N, strategy, setting) merge, scored. ``limit`` scores only the first test
    examples (smoke tests)."""
    model = default_model_path()
    tasks = sorted({task for group in groups.values() for task in group})
    adapters = train_all(workdir / "adapters", model, train_config, tasks)
    own = {task: accuracy(model, folder, folder, task, limit=limit) for task, folder in adapters.items()}
    results: dict = {}
    for n, group in groups.items():
        for strategy in strategies:
            reference = None
            for name, (dtype, grams) in settings.items():
                out = workdir / "merges" / "precision" / f"{n}-{strategy}-{dtype}-{grams}"
                entry = merge_and_score(model, {t: adapters[t] for t in group}, strategy,
                                        {**(params or {}), "accumulate_dtype": grams}, out, limit=limit, dtype=dtype)
                reference = reference or out
                row = {**summary(entry["accuracy"], {t: own[t] for t in group}),
                       "difference": difference(out, reference), "merge_seconds": entry["merge_seconds"],
                       "iterations_run": entry["iterations_run"]}
                results.setdefault(str(n), {}).setdefault(strategy, {})[name] = row
                print(f"N = {n}, {strategy}, {name}: {json.dumps({k: v for k, v in row.items() if k != 'normalized'})}",
                      flush=True)
    return results


def table(results: dict) -> str:
    lines = []
    for n, by_strategy in results.items():
        lines += ["", f"**N = {n}**", "", "| strategy | compute dtype | difference from the reference (all modules / "
                  "the module that differs most) | mean normalized | worst task | solves | merge s |", "|---|---|---|---|---|---|---|"]
        for strategy, rows in by_strategy.items():
            for name, row in rows.items():
                d = row["difference"]
                lines.append(f"| {strategy} | {name} | {d['overall']:.2e} / {d['worst_module']:.2e} | "
                             f"{row['mean']:.3f} | {row['worst']:.3f} ({row['worst_task']}) | "
                             f"{row['iterations_run']} | {row['merge_seconds']:.1f} |")
    return "\n".join(lines[1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.precision",
                                     description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--workdir", type=Path, default=Path("bench-out"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    results = run(args.workdir)
    (args.workdir / "precision.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
