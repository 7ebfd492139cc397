"""Score an encoder (alone, with a PEFT LoRA folder, or with in-memory LoRA deltas)
through a task's linear head on a task split.

The classifier is ``head(mean_pool(last_hidden_state))``. The head lives outside the
adapter (``head.safetensors`` + ``head.json`` beside it) because the adapters are
trained on the bare encoder without ``modules_to_save``: what a merge combines is
then exactly the LoRA deltas, and every merged encoder is read out through each
task's own head.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .tasks import load_task

HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "head.json"
POOLING = "mean"


@dataclass
class Head:
    """A task's classifier and what it expects of the encoder's input."""

    linear: nn.Linear
    labels: list[str]
    max_length: int
    pooling: str = POOLING


def save_head(head_dir: str | Path, head: Head, task: str) -> None:
    head_dir = Path(head_dir)
    head_dir.mkdir(parents=True, exist_ok=True)
    tensors = {"weight": head.linear.weight.detach().contiguous(), "bias": head.linear.bias.detach().contiguous()}
    save_file(tensors, str(head_dir / HEAD_WEIGHTS), metadata={"format": "pt"})
    config = {"task": task, "labels": head.labels, "pooling": head.pooling, "max_length": head.max_length}
    (head_dir / HEAD_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def load_head(head_dir: str | Path) -> Head:
    head_dir = Path(head_dir)
    config = json.loads((head_dir / HEAD_CONFIG).read_text(encoding="utf-8"))
    if config["pooling"] != POOLING:
        raise ValueError(f"{head_dir / HEAD_CONFIG}: unsupported pooling {config['pooling']!r}")
    tensors = load_file(str(head_dir / HEAD_WEIGHTS))
    weight, bias = tensors["weight"], tensors["bias"]
    if weight.shape[0] != len(config["labels"]):
        raise ValueError(f"{head_dir}: head has {weight.shape[0]} outputs for {len(config['labels'])} labels")
    linear = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    return Head(linear=linear, labels=list(config["labels"]), max_length=int(config["max_length"]))


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token vectors, padding excluded: (batch, seq, d) -> (batch, d)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


@functools.lru_cache(maxsize=4)
def tokenizer_for(model_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@functools.lru_cache(maxsize=16)
def _encoded_split(model_path: str, task: str, split: str, max_length: int) -> tuple[list[list[int]], torch.Tensor]:
    """Token ids of a split sorted by length (so batches carry little padding), and labels."""
    examples = load_task(task).split(split)
    ids = tokenizer_for(model_path)([text for text, _ in examples], truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    return [ids[i] for i in order], torch.tensor([examples[i][1] for i in order])


def pad_batch(ids: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token id lists into ``input_ids`` and ``attention_mask`` tensors."""
    width = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def majority_accuracy(task: str, split: str = "test") -> float:
    """Accuracy of always answering the most frequent *train* label."""
    loaded = load_task(task)
    majority = Counter(label for _, label in loaded.train).most_common(1)[0][0]
    examples = loaded.split(split)
    return sum(label == majority for _, label in examples) / len(examples)


def load_encoder(
    model_path: str | Path,
    adapter_dir: str | Path | None = None,
    lora_state: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> nn.Module:
    """The bare encoder, with a PEFT adapter folder or with in-memory LoRA deltas added.

    ``lora_state`` maps a module path of the bare encoder (``encoder.layer.0.attention.
    self.query``) to ``(B, A)`` with the scaling folded in, i.e. ``W += B @ A``: the
    convention of ``iteris_daemon.lora.save_adapter``, so a merge result can be
    scored without writing it to disk first.
    """
    from transformers import AutoModel

    if adapter_dir is not None and lora_state is not None:
        raise ValueError("give adapter_dir or lora_state, not both")
    model = AutoModel.from_pretrained(str(model_path))
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    with torch.no_grad():
        for path, (B, A) in (lora_state or {}).items():
            weight = model.get_submodule(path).weight
            if (B.shape[0], A.shape[1]) != tuple(weight.shape) or B.shape[1] != A.shape[0]:
                raise ValueError(f"{path}: B {tuple(B.shape)} @ A {tuple(A.shape)} does not fit {tuple(weight.shape)}")
            weight += (B.double() @ A.double()).to(weight.dtype)
    return model.eval()


def accuracy(
    model_path: str | Path,
    adapter_dir: str | Path | None,
    head_dir: str | Path,
    task: str,
    split: str = "test",
    lora_state: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    batch_size: int = 64,
    limit: int | None = None,
) -> float:
    """Accuracy on ``split`` of ``task`` of the encoder (see :func:`load_encoder`) read
    out through the head saved in ``head_dir``, at the head's training ``max_length``.
    ``limit`` scores only the first examples of the length-sorted split (smoke tests)."""
    head = load_head(head_dir)
    expected = load_task(task).labels
    if head.labels != expected:
        raise ValueError(f"head in {head_dir} is for labels {head.labels}, task {task!r} has {expected}")
    model = load_encoder(model_path, adapter_dir, lora_state)
    ids, labels = _encoded_split(str(model_path), task, split, head.max_length)
    ids, labels = ids[:limit], labels[:limit]
    pad_token_id = tokenizer_for(str(model_path)).pad_token_id
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(ids), batch_size):
            batch = pad_batch(ids[start : start + batch_size], pad_token_id)
            hidden = model(**batch).last_hidden_state
            logits = head.linear(mean_pool(hidden, batch["attention_mask"]))
            correct += int((logits.argmax(-1) == labels[start : start + batch_size]).sum())
    return correct / len(ids)
