"""Speed and memory of the merge, against the floor it cannot beat.

- Every strategy merges the task adapters in its own process, the whole model in
  memory (``--offload none``, as the floor has it); wall time of the strategy and
  the process's peak resident memory come from its ``merge_report.json``.
- The *floor* per iteration: what one IterIS iteration cannot avoid, i.e. one
  forward pass of every task's calibration batches through the plain model (no
  hooks, the whole model in memory) plus, per task, one Gram ``G += X^T X``
  (float32, padding rows zeroed) for every *distinct* input of the targeted layers
  (layers reading the same tensor, query/key/value or gate/up, share one), measured
  over the same batches in the same run. IterIS seconds per iteration / floor
  seconds per iteration is the overhead of everything else (projections, solves,
  moving blocks, bookkeeping).
- Peak memory at 50 and 500 samples per task, for IterIS and for a token-storing
  implementation that keeps every token's layer inputs (as the reference code
  does), each in a fresh process.
- Scaling on synthetic models built from a config: time against the number of
  adapters, and against layer width (where the d^3 solve starts to matter).

Run: ``python -m benchmarks.speed --workdir bench-out`` (writes speed.json).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

from iteris_daemon.calibration import Sample, read_jsonl, write_jsonl

from .tasks import TASKS, load_task
from .train import TrainConfig, default_model_path, train_all

PARTS = ("strategies", "memory", "scaling")
STRATEGIES = ("iteris", "regmean", "task_arithmetic", "ties", "dare", "core_space", "tsv", "iso_c", "iso_cts",
              "knots", "wudi", "peft_cat", "peft_svd", "peft_ties_svd")


def _merge_process(model: str, adapters: list[str], out: Path, strategy: str, params: dict,
                   offload: str = "auto") -> dict:
    command = [sys.executable, "-m", "iteris_daemon", "merge", "--base-model", model, "--strategy", strategy,
               "--out", str(out), "--overwrite", "--no-eval", "-q", "--offload", offload]
    for key, value in params.items():
        command += ["--param", f"{key}={json.dumps(value)}"]
    for adapter in adapters:
        command += ["--adapter", adapter]
    subprocess.run(command, check=True, capture_output=True)
    return json.loads((out / "merge_report.json").read_text())


def calibration_files(adapters: dict[str, Path], samples: int, folder: Path) -> list[str]:
    """``DIR=FILE`` specs with ``samples`` unlabelled training texts per task."""
    folder.mkdir(parents=True, exist_ok=True)
    specs = []
    for task, adapter in adapters.items():
        texts = [text for text, _ in load_task(task).train]
        random.Random(0).shuffle(texts)
        path = folder / f"{task}-{samples}.jsonl"
        write_jsonl(path, [Sample(t) for t in texts[:samples]])
        specs.append(f"{adapter}={path}")
    return specs


class _Grams:
    """Forward pre-hooks that add one ``G += X^T X`` per distinct input tensor of the
    targeted layers and batch (q/k/v, gate/up share theirs), timing only that work."""

    def __init__(self, model: torch.nn.Module, paths: list[str]):
        modules = dict(model.named_modules())
        self.handles = [modules[p].register_forward_pre_hook(self._hook(p)) for p in paths]
        self.mask: torch.Tensor | None = None
        self.seconds = 0.0
        self.G: dict[str, torch.Tensor] = {}  # keyed by the first layer reading the input
        self._seen: list[torch.Tensor] = []

    def new_task(self) -> None:
        self.G = {}

    def new_batch(self, mask: torch.Tensor | None) -> None:
        self.mask, self._seen = mask, []

    def _hook(self, path: str):
        from iteris_daemon.model import masked_rows

        def hook(_module, args):
            x = args[0]
            if any(seen is x for seen in self._seen):  # a Gram of this tensor was formed already
                return
            self._seen.append(x)
            started = time.perf_counter()
            rows = masked_rows(x, self.mask, torch.float32)  # padding rows multiplied by 0
            G = self.G.get(path)
            if G is None:
                G = self.G[path] = torch.zeros(rows.shape[1], rows.shape[1], device=rows.device)
            G.addmm_(rows.T, rows)
            self.seconds += time.perf_counter() - started

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def floor_pass(base, paths: list[str], batches: list[list[dict]]) -> dict:
    """One timed pass of the floor over every task's ``batches`` with ``base``'s plain model:
    the forward passes (no hooks), then, over the same batches in a second pass, one Gram per
    distinct targeted-layer input per task (only the Gram work is timed)."""
    with torch.no_grad():
        started = time.perf_counter()
        for task_batches in batches:
            for batch in task_batches:
                base.model(**batch)
        forward = time.perf_counter() - started
        grams = _Grams(base.model, paths)
        try:
            for task_batches in batches:
                grams.new_task()
                for batch in task_batches:
                    grams.new_batch(base.output_mask(batch))
                    base.model(**batch)
        finally:
            grams.remove()
    return {"forward_s": forward, "gram_s": grams.seconds, "grams_per_task": len(grams.G)}


def floor_seconds(model: str, specs: list[str], passes: int, batch_size: int, max_length: int) -> dict:
    """The per-iteration floor (:func:`floor_pass`), the mean of ``passes`` passes, with
    the whole model in memory (``offload="none"``). Returns seconds per iteration:
    ``forward_s``, ``gram_s`` and their sum."""
    from iteris_daemon.lora import load_adapter
    from iteris_daemon.model import BaseModel

    adapters = [load_adapter(spec.split("=")[0]) for spec in specs]
    base = BaseModel(model, adapters, offload="none")
    paths = sorted({p for a in adapters for p in a.modules})
    batches = [base.batches(read_jsonl(spec.split("=")[1]), batch_size, max_length) for spec in specs]
    with torch.no_grad():
        for batch in batches[0][:2]:  # warm-up
            base.model(**batch)
    measured = [floor_pass(base, paths, batches) for _ in range(passes)]
    forward = sum(m["forward_s"] for m in measured) / passes
    gram = sum(m["gram_s"] for m in measured) / passes
    return {"seconds": forward + gram, "forward_s": forward, "gram_s": gram, "passes": passes,
            "grams_per_task": measured[0]["grams_per_task"], "layers": len(paths)}


def token_storing_peak(model: str, specs: list[str], iterations: int) -> dict:
    """Peak RSS of IterIS implemented by keeping every token's features (run in a child)."""
    code = (
        "import json, sys; from benchmarks.token_storing import main; "
        f"print(json.dumps(main({model!r}, {specs!r}, {iterations})))"
    )
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def synthetic_setup(folder: Path, width: int, n_adapters: int, samples: int = 32, r: int = 8) -> tuple[str, list[str]]:
    """A 2-layer BERT of the given width with random LoRAs on query/value/output.dense."""
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    base = folder / f"bert-{width}"
    if not (base / "config.json").exists():
        torch.manual_seed(0)
        config = tf.BertConfig(vocab_size=30522, hidden_size=width, num_hidden_layers=2,
                               num_attention_heads=max(1, width // 64), intermediate_size=4 * width)
        tf.AutoModel.from_config(config).save_pretrained(base)
        tf.AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(base)
    texts = [text for text, _ in load_task("news").train]
    adapters = []
    for index in range(n_adapters):
        out = folder / f"bert-{width}-lora{index}"
        if not (out / "adapter_model.safetensors").exists():
            torch.manual_seed(index)
            model = get_peft_model(tf.AutoModel.from_pretrained(base), LoraConfig(
                r=r, lora_alpha=2 * r, target_modules=["query", "value", "output.dense"], init_lora_weights=False))
            model.save_pretrained(out)
            write_jsonl(out / "calibration.jsonl", [Sample(t) for t in texts[index * samples:(index + 1) * samples]])
        adapters.append(str(out))
    return str(base), adapters


def run(workdir: Path, tasks: tuple[str, ...] = TASKS, strategies: tuple[str, ...] = STRATEGIES,
        train_config: TrainConfig = TrainConfig(), memory_samples=(50, 500),
        scaling_adapters=(2, 4, 8, 16), scaling_widths=(256, 512, 1024, 2048), iteris_params: dict | None = None,
        parts: tuple[str, ...] = PARTS) -> dict:
    """Strategy timings, the floor, memory against a token-storing implementation, scaling.
    ``iteris_params`` overrides IterIS defaults (smoke tests shrink the work); ``parts``
    picks what to measure (a rerun of one part keeps the others in speed.json)."""
    base_params = dict(iteris_params or {})
    model = default_model_path()
    adapters = train_all(workdir / "adapters", model, train_config, tasks)
    out = workdir / "speed-merges"
    results: dict = {"machine": _machine(), "strategies": {}, "memory": {}, "scaling": {"adapters": {}, "width": {}}}

    specs50 = calibration_files(adapters, 50, workdir / "calibration")
    if "strategies" not in parts:
        strategies = ()
    for strategy in strategies:
        specs = specs50 if strategy in ("iteris", "regmean") else [str(a) for a in adapters.values()]
        # The whole model in memory, like the floor (auto would stream MiniLM's blocks from disk)
        report = _merge_process(model, specs, out / strategy, strategy, base_params if strategy == "iteris" else {},
                                offload="none")
        results["strategies"][strategy] = {
            "seconds": report["merge_seconds"], "peak_rss_mb": report["peak_memory_mb"],
            "merge_memory_mb": report["merge_memory_mb"],
            **({"timings": report["metrics"]["timings"], "iterations_run": report["iterations_run"]}
               if strategy == "iteris" else {}),
        }
    if "iteris" in results["strategies"]:
        iteris = results["strategies"]["iteris"]
        floor = floor_seconds(model, specs50, iteris["iterations_run"], base_params.get("batch_size", 16),
                              base_params.get("max_length", 128))
        per_iteration = iteris["seconds"] / iteris["iterations_run"]
        results["floor"] = {**floor, "iteris_seconds_per_iteration": per_iteration,
                            "ratio": per_iteration / floor["seconds"]}

    for samples in memory_samples if "memory" in parts else ():
        specs = calibration_files(adapters, samples, workdir / "calibration")
        params = {**base_params, "samples_per_task": samples, "iterations": 3, "tolerance": 0.0}
        report = _merge_process(model, specs, out / f"mem-{samples}", "iteris", params)
        results["memory"][samples] = {
            "iteris_peak_rss_mb": report["peak_memory_mb"],
            "iteris_merge_memory_mb": report["merge_memory_mb"],
            "iteris_seconds": report["merge_seconds"],
            "token_storing": token_storing_peak(model, specs, 3),
        }

    synthetic = workdir / "synthetic"
    if "scaling" not in parts:
        scaling_adapters = scaling_widths = ()
    for n in scaling_adapters:
        base, specs = synthetic_setup(synthetic, 512, n)
        report = _merge_process(base, specs, out / f"adapters-{n}", "iteris", {**base_params, "iterations": 2, "tolerance": 0.0})
        results["scaling"]["adapters"][n] = report["metrics"]["timings"]
    for width in scaling_widths:
        base, specs = synthetic_setup(synthetic, width, 4)
        report = _merge_process(base, specs, out / f"width-{width}", "iteris", {**base_params, "iterations": 2, "tolerance": 0.0})
        results["scaling"]["width"][width] = report["metrics"]["timings"]
    return results


def _machine() -> dict:
    import os
    import platform

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def tables(results: dict) -> str:
    """speed.json's tables; with a machine column where its rows were measured on several
    machines (a partial rerun elsewhere, see :func:`kept_with`)."""
    mixed = any("machine" in row for row in _rows(results))
    column, rule = (" machine |", "---|") if mixed else ("", "")

    def on(entry: dict) -> str:
        """The machine cell of ``entry``'s row (none where every row is from one machine)."""
        if not mixed:
            return ""
        machine = entry.get("machine", results["machine"])
        return " " + ", ".join(f"{key} {value}" for key, value in machine.items()) + " |"

    lines = ["| strategy | seconds | process peak RSS (MB) | RSS at merge start (MB) | peak during merge (MB) |" + column,
             "|---|---|---|---|---|" + rule]
    for name, entry in results["strategies"].items():
        mem = entry["merge_memory_mb"]
        lines.append(f"| {name} | {entry['seconds']:.2f} | {entry['peak_rss_mb']:.0f} | {_mb(mem['before'])} | "
                     f"{_mb(mem['peak'])} |" + on(entry))
    if "iteris" in results["strategies"] and "forward_s" in results.get("floor", {}):
        it, floor = results["strategies"]["iteris"], results["floor"]
        lines += ["", f"IterIS: {it['seconds']:.2f}s = inference {it['timings']['inference_s']:.2f}s + solve "
                  f"{it['timings']['solve_s']:.2f}s over {it['iterations_run']} iterations, "
                  f"{floor['iteris_seconds_per_iteration']:.2f}s per iteration; floor per iteration "
                  f"{floor['seconds']:.2f}s = plain forward passes {floor['forward_s']:.2f}s + one Gram per distinct "
                  f"input per task {floor['gram_s']:.2f}s ({floor['grams_per_task']} Grams for {floor['layers']} "
                  f"layers, mean of {floor['passes']} passes); ratio **{floor['ratio']:.2f}x**"]
    lines += ["",
              "| samples/task | IterIS process peak RSS (MB) | IterIS peak during merge (MB) | IterIS seconds | "
              "token-storing process peak (MB) | token-storing peak during merge (MB) |" + column,
              "|---|---|---|---|---|---|" + rule]
    for samples, entry in results["memory"].items():
        lines.append(f"| {samples} | {entry['iteris_peak_rss_mb']:.0f} | {_mb(entry['iteris_merge_memory_mb']['peak'])} | "
                     f"{entry['iteris_seconds']:.1f} | {entry['token_storing']['peak_rss_mb']:.0f} | "
                     f"{_mb(entry['token_storing'].get('merge_peak_mb'))} |" + on(entry))
    lines += ["", "| synthetic | inference s | solve s |" + column, "|---|---|---|" + rule]
    for key, label in (("adapters", "adapters (d=512)"), ("width", "width (4 adapters)")):
        for value, timing in results["scaling"][key].items():
            lines.append(f"| {label} = {value} | {timing['inference_s']:.2f} | {timing['solve_s']:.2f} |" + on(timing))
    return "\n".join(lines)


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def kept_with(previous: dict, results: dict, parts: list[str]) -> dict:
    """A partial rerun's ``results`` over the saved ``previous``: the parts and the strategies
    not rerun stay; the floor stays only beside the IterIS row it was measured with. Every row
    keeps the machine it was measured on: the saved ``machine`` stays that of the rows naming
    none, and a row rerun on another machine names its own (all were labelled the rerun's)."""
    if results["machine"] != previous["machine"]:
        results = _labelled(results)
    kept = {**previous, **{part: results[part] for part in parts}}
    if "strategies" in parts:
        kept["strategies"] = {**previous.get("strategies", {}), **results["strategies"]}
    if "floor" in results:  # iteris was rerun
        kept["floor"] = results["floor"]
    elif "iteris" not in kept["strategies"]:
        kept.pop("floor", None)
    return _one_machine(kept)


def _rows(results: dict) -> list[dict]:
    return [*results["strategies"].values(), *results["memory"].values(),
            *(row for axis in results["scaling"].values() for row in axis.values())]


def _one_machine(results: dict) -> dict:
    """``results`` whose rows all came from one machine (reruns elsewhere replaced every row)
    with that machine saved once, as a whole run would have, and no row naming its own."""
    machines = {json.dumps(row.get("machine", results["machine"]), sort_keys=True) for row in _rows(results)}
    if len(machines) != 1:
        return results

    def bare(rows: dict) -> dict:
        return {key: {k: v for k, v in row.items() if k != "machine"} for key, row in rows.items()}

    return {**results, "machine": json.loads(machines.pop()), "strategies": bare(results["strategies"]),
            "memory": bare(results["memory"]), "scaling": {axis: bare(rows) for axis, rows in results["scaling"].items()}}


def _labelled(results: dict) -> dict:
    """``results`` with every row naming the machine it was measured on (the floor goes with
    the IterIS row)."""
    def on(rows: dict) -> dict:
        return {key: {**row, "machine": results["machine"]} for key, row in rows.items()}

    return {**results, "strategies": on(results["strategies"]), "memory": on(results["memory"]),
            "scaling": {axis: on(rows) for axis, rows in results["scaling"].items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--workdir", type=Path, default=Path("bench-out"))
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure (default: all)")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES),
                        help="strategies of the strategies part (default: all; iteris brings the floor); "
                             "a subset replaces only its own rows of speed.json")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS),
                        help=f"task adapters to merge (default: all {len(TASKS)})")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = run(args.workdir, tasks=tuple(args.tasks), strategies=tuple(args.strategies), parts=tuple(args.parts))
    previous = args.workdir / "speed.json"
    if (set(args.parts) != set(PARTS) or set(args.strategies) != set(STRATEGIES)) and previous.exists():
        results = kept_with(json.loads(previous.read_text()), results, args.parts)
    previous.write_text(json.dumps(results, indent=2) + "\n")
    print(tables(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
