"""One IterIS merge at Llama-3-8B scale on a GPU: time, device and host memory, the goal.

``python -m benchmarks.gpu`` (default ``--shape llama3-8b --device cuda``):

1. writes a Llama-3-8B-shaped causal LM (hidden 4096, intermediate 14336, 32 layers,
   32 heads, 8 KV heads, vocab 128256, rope_theta 500000, untied head) with random
   weights as sharded bfloat16 safetensors, one block at a time (the model never
   exists whole in memory), plus a word-level tokenizer whose vocabulary is the model's
   (``t4 ... t128255``), built with ``tokenizers``: nothing is downloaded;
2. writes 8 random PEFT LoRAs of rank 16 on all seven projections (q, k, v, o, gate,
   up, down), their keys and config taken from ``get_peft_model`` on a weightless
   (meta) copy of the model, and 50 calibration texts per task of random tokens, long
   enough to fill 256 tokens each;
3. runs one merge through the CLI in a fresh process (``--device cuda --dtype bfloat16
   --offload disk``, IterIS with 2 iterations) and prints its time, the peak GPU
   memory (``device_memory_mb.peak``), the peak host memory (``peak_memory_mb``) and
   the goal check: under 5 minutes and at most 24 GiB of GPU memory. With
   ``--refine-steps K`` the merge also runs IterIS' opt-in refinement (K steps per
   block, its other settings at their defaults) and prints the refinement's share of the
   time; the goal is then checked on the whole merge.

Built files are kept in ``--workdir`` and reused when their spec matches, so a rerun
only merges. The build runs in a child process and the merge in another, so this
process stays small: on Linux a child's ``ru_maxrss``, which the merge report gives as
the process peak, starts at its parent's peak. ``--shape small --device cpu`` (hidden
512, 4 layers, vocab 30522, 2 LoRAs) runs the same steps on a CPU in a few minutes;
``--shape tiny`` in seconds (tests).
Needs torch, transformers, peft, safetensors and this project, installed editable (``-e``:
it runs from the checkout), with what a merge imports: pydantic, pluggy, sqlalchemy,
tenacity and huggingface_hub 2.x (httpx2). The daemon's alembic, watchdog, apscheduler
and prometheus_client are not needed.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

# torch is imported where it is used: a process that only runs merges (this one, or
# benchmarks.scale's) stays small, and on Linux a child's ru_maxrss (the merge report's
# process peak) starts at its parent's peak.

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SPECIAL = ("<pad>", "<unk>", "<s>", "</s>")
GOAL_SECONDS = 300.0
GOAL_DEVICE_MB = 24 * 1024.0  # 24 GiB, in the MiB that device_memory_mb reports

SHAPES: dict[str, dict] = {
    "llama3-8b": {
        "config": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False,
                       max_position_embeddings=8192, rms_norm_eps=1e-5),
        "adapters": 8, "rank": 16, "samples": 50, "tokens": 256,
    },
    "small": {
        "config": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=2, vocab_size=30522, rope_theta=500000.0, tie_word_embeddings=False,
                       max_position_embeddings=1024, rms_norm_eps=1e-5),
        "adapters": 2, "rank": 16, "samples": 50, "tokens": 256,
    },
    "tiny": {
        "config": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=1000, rope_theta=500000.0, tie_word_embeddings=False,
                       max_position_embeddings=256, rms_norm_eps=1e-5),
        "adapters": 2, "rank": 4, "samples": 8, "tokens": 32,
    },
}


# ------------------------------------------------------------------ building blocks
def seeded_normal(name: str, seed: int, shape, std: float, device: str = "cpu"):
    """A float32 N(0, std^2) tensor that depends only on (seed, name, shape): the same
    parameter name gets the same values in a model of any depth."""
    import torch

    generator = torch.Generator(device=device)
    generator.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randn(tuple(shape), generator=generator, device=device) * std


def _synthetic_value(name: str, shape, seed: int, device: str, std: float):
    import torch

    if len(shape) == 1:  # RMSNorm weights: ones, as a fresh model has them
        return torch.ones(tuple(shape), device=device)
    return seeded_normal(name, seed, shape, std, device)


def write_checkpoint(config, folder: Path, *, seed: int = 0, dtype: str = "bfloat16", device: str = "cpu",
                     std: float = 0.02) -> dict:
    """Save a randomly initialised ``LlamaForCausalLM`` of ``config`` as sharded safetensors,
    one shard per block plus one for the rest, generating one shard at a time.

    The tensor names are the model's ``named_parameters`` (what ``save_pretrained``
    writes); ``model.safetensors.index.json`` maps them to their shard. Returns the
    parameter count and byte size.
    """
    import torch
    import transformers as tf
    from safetensors.torch import save_file

    dtype = getattr(torch, dtype)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(config)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}  # tied weights listed once
    layers = config.num_hidden_layers
    groups: list[list[str]] = [[] for _ in range(layers + 1)]
    for name in shapes:
        parts = name.split(".")
        if parts[:2] == ["model", "layers"]:
            groups[int(parts[2])].append(name)
        else:
            groups[layers].append(name)
    weight_map, total, count = {}, 0, 0
    for index, names in enumerate(groups):
        file = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            tensor = _synthetic_value(name, shapes[name], seed, device, std).to(dtype).cpu()
            tensors[name] = tensor
            weight_map[name] = file
            total += tensor.numel() * tensor.element_size()
            count += tensor.numel()
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = dtype
    config.save_pretrained(folder)
    return {"parameters": count, "bytes": total}


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A whitespace word-level tokenizer over ``<pad> <unk> <s> </s> t4 ... t{vocab-1}``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL)}
    vocab.update({f"t{i}": i for i in range(len(SPECIAL), vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)


def token_texts(seed: int, n: int, tokens: int, vocab_size: int) -> list[str]:
    """``n`` texts of ``tokens`` random vocabulary words each (one token per word)."""
    rng = random.Random(seed)
    return [" ".join(f"t{rng.randrange(len(SPECIAL), vocab_size)}" for _ in range(tokens)) for _ in range(n)]


def lora_config(r: int, alpha: float | None = None, targets=PROJECTIONS):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha if alpha is not None else r, target_modules=list(targets),
                      task_type="CAUSAL_LM", init_lora_weights=False, lora_dropout=0.0)


def fill_lora(peft_model, seed: int, std: float = 0.02) -> None:
    """Overwrite every LoRA weight of a (materialised) PEFT model with seeded values."""
    import torch

    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(seeded_normal(name, seed, param.shape, std).to(param.dtype))


def write_lora(config, base: Path, out: Path, *, seed: int, r: int, dtype: str = "bfloat16",
               std: float = 0.02) -> None:
    """A PEFT LoRA folder for ``base`` with random weights, without materialising the base:
    ``get_peft_model`` on a meta copy gives the saved names, shapes and config."""
    import torch
    import transformers as tf
    from peft import get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file

    dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(config)
    peft_model = get_peft_model(model, lora_config(r))
    tensors = {
        key: seeded_normal(key, seed, value.shape, std).to(dtype)
        for key, value in get_peft_model_state_dict(peft_model).items()
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    peft_config = peft_model.peft_config["default"]
    peft_config.base_model_name_or_path = str(base)
    peft_config.save_pretrained(str(out))


def write_calibration(path: Path, texts: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for text in texts:
            handle.write(json.dumps({"text": text}) + "\n")


def merge_command(base: Path, specs: list[str], out: Path, *, device: str, dtype: str = "bfloat16",
                  offload: str = "disk", params: dict) -> list[str]:
    command = [sys.executable, "-m", "iteris_daemon", "merge", "--base-model", str(base), "--out", str(out),
               "--overwrite", "--device", device, "--dtype", dtype, "--offload", offload, "--no-eval", "-q"]
    for key, value in params.items():
        command += ["--param", f"{key}={json.dumps(value)}"]
    for spec in specs:
        command += ["--adapter", spec]
    return command


def run_merge(command: list[str], out: Path) -> dict:
    """Run one merge in its own process; its report (the child's stderr on failure)."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"merge failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads((out / "merge_report.json").read_text())


# ------------------------------------------------------------------------ the run
def _built(folder: Path, wanted: dict) -> dict | None:
    marker = folder / "build.json"
    if marker.exists():
        built = json.loads(marker.read_text())
        if built.get("spec") == wanted:
            return built
    return None


def build(folder: Path, shape: str, spec: dict, device: str) -> dict:
    """The model, adapters and calibration files (reused when ``spec`` matches)."""
    import torch
    import transformers as tf

    wanted = {"shape": shape, **spec}
    built = _built(folder, wanted)
    if built is not None:
        return built
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    config = tf.LlamaConfig(**spec["config"], pad_token_id=0, bos_token_id=2, eos_token_id=3)
    base = folder / "base"
    started = time.perf_counter()
    # Generate on the GPU when there is one (fast); the files are the same kind either way.
    generator_device = "cuda" if device.startswith("cuda") and torch.cuda.is_available() else "cpu"
    info = write_checkpoint(config, base, seed=0, device=generator_device)
    write_tokenizer(base, config.vocab_size)
    specs = []
    for task in range(spec["adapters"]):
        adapter = folder / f"lora{task}"
        write_lora(config, base, adapter, seed=100 + task, r=spec["rank"])
        calibration = folder / f"lora{task}.jsonl"
        # One spare word: the texts are truncated to exactly ``tokens`` tokens.
        write_calibration(calibration, token_texts(1000 + task, spec["samples"], spec["tokens"] + 1, config.vocab_size))
        specs.append(f"{adapter}={calibration}")
    info["build_seconds"] = round(time.perf_counter() - started, 1)
    built = {"spec": wanted, "base": str(base), "specs": specs, "info": info}
    (folder / "build.json").write_text(json.dumps(built, indent=2) + "\n")
    return built


def _spec(shape: str, overrides: dict | None) -> dict:
    spec = json.loads(json.dumps(SHAPES[shape]))
    spec.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return spec


def _override_flags(overrides: dict | None) -> list[str]:
    return [f"--{k}={v}" for k, v in (overrides or {}).items() if v is not None]


def run(workdir: Path, shape: str = "llama3-8b", device: str = "cuda", iterations: int = 2,
        overrides: dict | None = None, refine_steps: int = 0) -> dict:
    """Build (in a child process, once) and merge (in another); the merge's figures."""
    spec = _spec(shape, overrides)
    folder = workdir / shape
    built = _built(folder, {"shape": shape, **spec})
    if built is None:  # a child builds, so this process never holds weights
        subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--build-only", "--shape", shape, "--device", device,
                        "--workdir", str(workdir), *_override_flags(overrides)], check=True)
        built = _built(folder, {"shape": shape, **spec})
    params = {"iterations": iterations, "tolerance": 0, "samples_per_task": spec["samples"],
              "max_length": spec["tokens"], "refine_steps": refine_steps}
    out = folder / "merged"
    report = run_merge(merge_command(Path(built["base"]), built["specs"], out, device=device, params=params), out)
    seconds = report["merge_seconds"]
    device_peak = report["device_memory_mb"]["peak"]
    on_gpu = device.startswith("cuda")
    result = {
        "shape": shape, "device": device, "spec": spec, "model": built["info"],
        "merge_seconds": seconds, "total_seconds": report["total_seconds"],
        "device_peak_mb": device_peak, "host_peak_mb": report["peak_memory_mb"],
        "merge_memory_mb": report["merge_memory_mb"], "placement": report["placement"],
        "execution": report["metrics"].get("execution"), "timings": report["metrics"].get("timings"),
        "iterations_run": report["iterations_run"], "refinement": _refinement(report["metrics"].get("refinement")),
        "goal": None if not on_gpu or device_peak is None else {
            "seconds_ok": seconds < GOAL_SECONDS, "memory_ok": device_peak <= GOAL_DEVICE_MB,
        },
    }
    suffix = f"-refine{refine_steps}" if refine_steps else ""
    (workdir / f"gpu-{shape}-{device.replace(':', '')}{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _refinement(metrics: dict | None) -> dict | None:
    """The refinement's time and what it did, from the merge report (None: it was off)."""
    if not metrics:
        return None
    blocks = metrics.get("blocks", [])
    return {"seconds": metrics.get("refine_s"), "refined_blocks": metrics["refined_blocks"], "blocks": len(blocks),
            "steps_taken": sum(b["steps_taken"] for b in blocks)}


def summary(result: dict) -> str:
    spec, model = result["spec"], result["model"]
    timings = result["timings"] or {}
    lines = [
        f"shape {result['shape']}: {model['parameters'] / 1e6:,.1f} M parameters, "
        f"{model['bytes'] / 2**30:.2f} GiB bf16; "
        f"{spec['adapters']} LoRAs r={spec['rank']} on {', '.join(PROJECTIONS)}; "
        f"{spec['samples']} samples x {spec['tokens']} tokens per task",
        f"device {result['device']}, placement {result['placement']}, execution {result['execution']}, "
        f"{result['iterations_run']} iterations",
        f"merge time:        {result['merge_seconds']:.1f} s (inference {timings.get('inference_s', 0):.1f} s, "
        f"solve {timings.get('solve_s', 0):.1f} s; whole command {result['total_seconds']:.1f} s)",
        *([] if not result["refinement"] else [
            f"refinement:        {result['refinement']['seconds']:.1f} s of the merge time, "
            f"{result['refinement']['steps_taken']} steps, {result['refinement']['refined_blocks']} of "
            f"{result['refinement']['blocks']} blocks refined"]),
        f"peak GPU memory:   {_mb(result['device_peak_mb'])}",
        f"peak host memory:  {_mb(result['host_peak_mb'])} (process); merge window "
        f"{_mb(result['merge_memory_mb']['before'])} -> {_mb(result['merge_memory_mb']['peak'])}",
    ]
    goal = result["goal"]
    if goal is None:
        lines.append("goal (< 5 min, <= 24 GiB GPU memory): not checked, no CUDA device figures")
    else:
        verdict = "MET" if goal["seconds_ok"] and goal["memory_ok"] else "MISSED"
        lines.append(f"goal: {verdict} (time {result['merge_seconds']:.0f} s "
                     f"{'<' if goal['seconds_ok'] else '>='} {GOAL_SECONDS:.0f} s; GPU memory "
                     f"{_mb(result['device_peak_mb'])} {'<=' if goal['memory_ok'] else '>'} {GOAL_DEVICE_MB:.0f} MiB)")
    return "\n".join(lines)


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} MiB ({value / 1024:.2f} GiB)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--device", default="cuda", help="torch device of the merge (default: cuda)")
    parser.add_argument("--workdir", type=Path, default=Path("bench-out/gpu"))
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--adapters", type=int, help="override the shape's LoRA count")
    parser.add_argument("--samples", type=int, help="override the shape's samples per task")
    parser.add_argument("--tokens", type=int, help="override the shape's tokens per sample")
    parser.add_argument("--refine-steps", type=int, default=0,
                        help="also run IterIS' refinement, this many steps per block (default 0: off)")
    parser.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)  # run() builds in a child
    args = parser.parse_args(argv)
    overrides = {"adapters": args.adapters, "samples": args.samples, "tokens": args.tokens}
    if args.build_only:
        build(args.workdir / args.shape, args.shape, _spec(args.shape, overrides), args.device)
        return 0
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device here; use --device cpu (with --shape small or tiny)")
    result = run(args.workdir, args.shape, args.device, args.iterations, overrides, args.refine_steps)
    print(summary(result))
    goal = result["goal"]
    return 0 if goal is None or (goal["seconds_ok"] and goal["memory_ok"]) else 1


if __name__ == "__main__":
    sys.exit(main())
