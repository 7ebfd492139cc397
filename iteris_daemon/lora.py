"""PEFT LoRA adapter I/O: read and validate an adapter folder, write a merged one.

Only ``adapter_model.safetensors`` is ever read: a pickled ``adapter_model.bin`` is
refused before anything touches it, because unpickling runs arbitrary code.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file

from .adapter_config import (CONFIG_NAME, AdapterConfigView, KEY_PREFIX, LORA_KEY, PICKLED_NAMES, WEIGHTS_NAME,  # noqa: F401 (re-exported)
                             module_scaling, read_adapter_config)
from .errors import AdapterError


@dataclass
class LoraModule:
    """One adapted linear layer: ``delta W = scaling * B @ A`` with A (r, d_in), B (d_out, r)."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        return self.scaling * (self.B.double() @ self.A.double())


@dataclass
class LoraAdapter(AdapterConfigView):
    """A loaded, self-consistent PEFT LoRA adapter (not yet checked against a base model)."""

    name: str
    path: Path
    config: dict[str, Any]
    modules: dict[str, LoraModule]
    modules_to_save: dict[str, torch.Tensor] = field(default_factory=dict)
    content_sha256: str = ""
    dtype: torch.dtype = torch.float32  # of the LoRA weights as saved (the merge is written in it by default)


def load_adapter(path: str | Path, name: str | None = None) -> LoraAdapter:
    """Read and check a PEFT LoRA folder; raise :class:`AdapterError` naming what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(path, "adapter folder does not exist")
    config = read_adapter_config(path)
    weights_path = path / WEIGHTS_NAME
    if not weights_path.is_file():
        pickled = [n for n in PICKLED_NAMES if (path / n).exists()]
        if pickled:
            raise AdapterError(
                path / pickled[0],
                "pickled weights are refused (never loaded); convert the adapter to safetensors",
            )
        raise AdapterError(path, f"no {WEIGHTS_NAME}")

    # Read once: the tensors and the content hash come from the same bytes, even when
    # the file is replaced meanwhile.
    try:
        data = weights_path.read_bytes()
    except OSError as exc:
        raise AdapterError(weights_path, f"cannot read: {exc.strerror}") from None
    try:
        tensors: dict[str, torch.Tensor] = safetensors_load(data)
    except Exception as exc:  # safetensors raises several untyped errors for bad files
        raise AdapterError(weights_path, f"unreadable safetensors file: {exc}") from None

    embedding = next((key for key in tensors if ".lora_embedding_" in key), None)
    if embedding is not None:
        module = embedding.split(".lora_embedding_")[0].removeprefix(KEY_PREFIX)
        raise AdapterError(weights_path, f"LoRA on an embedding layer ({module}) is not supported: "
                                         "the merge solves linear layers only")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    modules_to_save: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        match = LORA_KEY.match(key)
        if match:
            parts.setdefault(match["module"], {})[match["part"]] = tensor
        elif key.startswith(KEY_PREFIX) and config.get("modules_to_save"):
            modules_to_save[key[len(KEY_PREFIX):]] = tensor
        else:
            raise AdapterError(weights_path, f"unexpected tensor {key!r}")
    if not parts:
        raise AdapterError(weights_path, "holds no LoRA tensors")

    modules: dict[str, LoraModule] = {}
    for module, pair in sorted(parts.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterError(weights_path, f"{module} has lora_{'A' if 'A' not in pair else 'B'} missing")
        A, B = pair["A"], pair["B"]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise AdapterError(
                weights_path,
                f"{module}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} are not a (r, d_in) / (d_out, r) pair",
            )
        if not (A.is_floating_point() and B.is_floating_point()):
            raise AdapterError(weights_path, f"{module}: LoRA weights must be floating point")
        rank, scaling = module_scaling(config, module)
        if A.shape[0] != rank:
            raise AdapterError(
                weights_path, f"{module}: lora_A has rank {A.shape[0]} but the config says r={rank}"
            )
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise AdapterError(weights_path, f"{module}: weights contain NaN or Inf")
        modules[module] = LoraModule(A=A.float(), B=B.float(), scaling=scaling)
        saved_dtype = A.dtype

    return LoraAdapter(
        name=name or path.name,
        path=path,
        config=config,
        modules=modules,
        modules_to_save=modules_to_save,
        content_sha256=hashlib.sha256(data).hexdigest(),
        dtype=saved_dtype,
    )


def save_adapter(
    out: Path,
    config: dict[str, Any],
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]],
    modules_to_save: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write a PEFT LoRA folder. ``modules`` maps module path to (B, A) with scaling 1
    as encoded in ``config`` (``lora_alpha == r`` per module)."""
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for module, (B, A) in modules.items():
        tensors[f"{KEY_PREFIX}{module}.lora_A.weight"] = A.contiguous()
        tensors[f"{KEY_PREFIX}{module}.lora_B.weight"] = B.contiguous()
    for key, tensor in (modules_to_save or {}).items():
        tensors[f"{KEY_PREFIX}{key}"] = tensor.contiguous()
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
