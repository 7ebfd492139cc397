"""PEFT LoRA adapter I/O: read and validate an adapter folder, write a merged one.

Only ``adapter_model.safetensors`` is ever read: a pickled ``adapter_model.bin`` is
refused before anything touches it, because unpickling runs arbitrary code.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterable
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file

from .adapter_config import CONFIG_NAME, KEY_PREFIX, WEIGHTS_NAME, AdapterConfigView, module_scaling
from .errors import AdapterError
from .validation import Limits, read_checked


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


# The daemon's size limits guard against hostile files it finds; files a user hands to
# a merge (and the daemon's own validated snapshots) are read whatever their size.
NO_SIZE_LIMITS = Limits(max_weights_bytes=1 << 62, max_header_bytes=1 << 62, max_tensors=1 << 62, max_rank=1 << 62)


def load_adapter(path: str | Path, name: str | None = None) -> LoraAdapter:
    """Read and check a PEFT LoRA folder (:func:`~iteris_daemon.validation.read_checked`'s
    checks, without size limits); raise :class:`AdapterError` naming what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(path, "is a file, not an adapter folder (give the folder that holds it)" if path.exists()
                           else "adapter folder does not exist")
    weights_path = path / WEIGHTS_NAME
    try:
        layout, data = read_checked(path, NO_SIZE_LIMITS, name)
    except OSError as exc:
        raise AdapterError(weights_path, f"cannot read: {exc.strerror}") from None
    try:
        tensors: dict[str, torch.Tensor] = safetensors_load(data)
    except Exception as exc:  # the header passed read_checked; safetensors raises untyped errors
        raise AdapterError(weights_path, f"unreadable safetensors file: {exc}") from None
    modules = {}
    for module, (a_key, b_key) in layout.tensor_keys.items():
        A, B = _unpadded(tensors[a_key].float(), tensors[b_key].float())
        modules[module] = LoraModule(A=A, B=B, scaling=module_scaling(layout.config, module)[1])
    saved = [tensors[key].dtype for pair in layout.tensor_keys.values() for key in pair]
    return LoraAdapter(
        name=layout.name,
        path=path,
        config=layout.config,
        modules=modules,
        modules_to_save={key: tensors[KEY_PREFIX + key] for key in layout.modules_to_save},
        content_sha256=layout.content_sha256,
        # the saved dtype: the widest of the factors' (bfloat16 and float16 give float32)
        dtype=widest(saved),
    )


def widest(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """The dtype that holds every one of ``dtypes`` (bfloat16 and float16 give float32;
    float32 where there are none). torch promotes no float8 type: it yields to the others."""
    def wider(a: torch.dtype, b: torch.dtype) -> torch.dtype:
        try:
            return torch.promote_types(a, b)
        except RuntimeError:  # a float8 type: the other, or bfloat16 for two float8 kinds
            bits = {torch.finfo(a).bits, torch.finfo(b).bits}
            return torch.bfloat16 if bits == {8} else max(a, b, key=lambda dtype: torch.finfo(dtype).bits)

    found = list(dtypes)
    return functools.reduce(wider, found) if found else torch.float32


def _unpadded(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` without the rank components whose row of A and column of B are both zero:
    a merge pads its layers to one rank that way (``merge._pad_ranks``), and merged again a
    padded layer must count as its own rank (the data-free strategies share a budget out by
    the inputs' ranks). The product is unchanged; one component is kept if all are zero."""
    used = A.any(dim=1) | B.any(dim=0)
    if bool(used.all()):
        return A, B
    used[0] |= not bool(used.any())
    return A[used], B[:, used]


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
