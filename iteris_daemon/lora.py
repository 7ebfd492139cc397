"""PEFT LoRA adapter I/O: read and validate an adapter folder, write a merged one.

Only ``adapter_model.safetensors`` is ever read: a pickled ``adapter_model.bin`` is
refused before anything touches it, because unpickling runs arbitrary code.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import regex
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file

from . import safe_json
from .errors import AdapterError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLED_NAMES = ("adapter_model.bin", "pytorch_model.bin")
KEY_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")

# Config features whose weights are not a plain ``B @ A`` delta on a linear layer.
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA adapters (use_dora=true) are not plain low-rank deltas",
    "lora_bias": "adapters with trained LoRA biases (lora_bias=true) are not supported",
    "layer_replication": "layer_replication changes the model's structure",
    "target_parameters": "target_parameters (LoRA on raw parameters) is not supported",
    "megatron_config": "Megatron-parallel LoRA layers are not supported",
    "use_qalora": "QA-LoRA adapters are not supported",
}


class _TypedFields(BaseModel):
    """Types of the config fields this project reads (PEFT writes these; a hostile file may not)."""

    model_config = ConfigDict(extra="allow")

    target_modules: list[str] | str | None = None
    # Strict: JSON's own types, as PEFT writes them and reads them (it converts nothing:
    # a rank "4" or a flag "false" would be a string to PEFT, and "false" is true).
    rank_pattern: dict[str, Annotated[int, Field(gt=0, strict=True)]] | None = None
    alpha_pattern: dict[str, Annotated[float, Field(gt=0, allow_inf_nan=False, strict=True)]] | None = None
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    use_rslora: Annotated[bool, Field(strict=True)] | None = None
    fan_in_fan_out: Annotated[bool, Field(strict=True)] | None = None


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
class LoraAdapter:
    """A loaded, self-consistent PEFT LoRA adapter (not yet checked against a base model)."""

    name: str
    path: Path
    config: dict[str, Any]
    modules: dict[str, LoraModule]
    modules_to_save: dict[str, torch.Tensor] = field(default_factory=dict)
    content_sha256: str = ""
    dtype: torch.dtype = torch.float32  # of the LoRA weights as saved (the merge is written in it by default)

    @property
    def task_type(self) -> str | None:
        return self.config.get("task_type")

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


MAX_PATTERN_KEY = 256  # characters in a rank_pattern / alpha_pattern key
_PLAIN_KEY = re.compile(r"[\w.-]+")  # module-path characters: '.' is the only metacharacter
_REGEX_TIMEOUT = 0.5  # seconds one match of another key may take
_REGEX_BUDGET = 2.0  # seconds of CPU all matches of other keys of one pattern may take together
_REGEX_SPENT: dict[int, list] = {}  # id(pattern) -> [pattern, CPU seconds its other keys took]


def _peft_pattern(key: str) -> str:
    """The regular expression PEFT makes of a pattern key (``peft.utils.other.get_pattern_key``)."""
    return rf"(.*\.)?({key})$"


def _pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank/alpha pattern lookup: the value of the first key ``k`` for which
    ``re.match(rf"(.*\.)?({k})$", module)`` holds (a module path ending in it).

    The keys come from an untrusted file. A key of module-path characters (nearly all
    keys: ``q_proj``, ``layers.0.self_attn.q_proj``) is matched exactly as PEFT does:
    with '.' its only metacharacter it cannot make the match backtrack much. Any other
    key is a regular expression that could (``(a|a)+`` against ``aaa…a!``: hours), so
    it is matched by the ``regex`` engine under a timeout, and such matches of one
    pattern share a CPU budget; past either the adapter is rejected.
    """
    for key, value in (pattern or {}).items():
        if _PLAIN_KEY.fullmatch(key):
            matched = re.match(_peft_pattern(key), module)
        else:
            matched = _bounded_match(pattern, key, module)
        if matched:
            return value
    return default


def _bounded_match(pattern: dict[str, Any], key: str, module: str) -> bool:
    spent = _REGEX_SPENT.get(id(pattern))
    if spent is None or spent[0] is not pattern:  # holding the pattern keeps its id from being reused
        spent = _REGEX_SPENT[id(pattern)] = [pattern, 0.0]
        while len(_REGEX_SPENT) > 64:
            _REGEX_SPENT.pop(next(iter(_REGEX_SPENT)))
    if spent[1] > _REGEX_BUDGET:
        raise AdapterError(CONFIG_NAME, f"pattern keys took too long to match the module names "
                                        f"(over {_REGEX_BUDGET:g} s); use module paths as keys")
    started = time.thread_time()
    try:
        return regex.match(_peft_pattern(key), module, timeout=_REGEX_TIMEOUT) is not None
    except TimeoutError:
        raise AdapterError(CONFIG_NAME, f"pattern key {key!r} took too long to match module {module[:80]!r} "
                                        "(a regular expression that backtracks); use module paths as keys") from None
    finally:
        spent[1] += time.thread_time() - started


def _pattern_key_problem(key: str) -> str | None:
    """Why PEFT could not use ``key`` as a pattern key, or None."""
    if len(key) > MAX_PATTERN_KEY:
        return f"is longer than {MAX_PATTERN_KEY} characters"
    try:
        re.compile(_peft_pattern(key))
        if not _PLAIN_KEY.fullmatch(key):
            regex.compile(_peft_pattern(key))
    except Exception as exc:  # re.error, regex.error, and whatever else a hostile pattern finds
        return f"is not a regular expression PEFT can use ({exc})"
    return None


def module_scaling(config: dict[str, Any], module: str) -> tuple[int, float]:
    """The rank and the scaling PEFT applies to ``module`` under ``config``."""
    rank = int(_pattern_value(config.get("rank_pattern"), module, config["r"]))
    alpha = float(_pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"]))
    if rank <= 0:
        raise ValueError(f"rank of {module} must be positive, got {rank}")
    denominator = math.sqrt(rank) if config.get("use_rslora") else rank
    return rank, alpha / denominator


MAX_CONFIG_BYTES = 16 << 20  # no adapter_config.json is read past this (the configured limit may be lower)


def read_adapter_config(path: Path, max_bytes: int = MAX_CONFIG_BYTES) -> dict[str, Any]:
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterError(path, f"no {CONFIG_NAME} (not a PEFT adapter folder)")
    try:
        with open(config_path, "rb") as handle:
            raw = handle.read(max_bytes + 1)
        if len(raw) > max_bytes:
            size = config_path.stat().st_size
            raise AdapterError(config_path, f"file is {max(size, len(raw))} bytes, above the limit of {max_bytes}")
        config = safe_json.loads(raw.decode("utf-8"))
    except ValueError as exc:  # not UTF-8, not JSON, nested too deep
        raise AdapterError(config_path, f"invalid JSON: {exc}") from None
    except OSError as exc:  # vanished or unreadable since it was seen
        raise AdapterError(config_path, f"cannot read: {exc.strerror}") from None
    if not isinstance(config, dict):
        raise AdapterError(config_path, "must hold a JSON object")
    if config.get("peft_type") != "LORA":
        raise AdapterError(config_path, f"peft_type is {config.get('peft_type')!r}, expected 'LORA'")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
            raise AdapterError(config_path, f"{key} must be a positive number, got {value!r}")
    if not isinstance(config["r"], int):  # PEFT makes layers of r rows: 4.0 or 4.5 is no rank
        raise AdapterError(config_path, f"r must be a whole number, got {config['r']!r}")
    try:
        _TypedFields.model_validate(config)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(p) for p in error["loc"])
        raise AdapterError(config_path, f"{field}: {error['msg']}") from None
    for name in ("rank_pattern", "alpha_pattern"):
        for key in config.get(name) or {}:
            problem = _pattern_key_problem(key)
            if problem:
                raise AdapterError(config_path, f"{name} key {key[:40]!r}{'…' if len(key) > 40 else ''} {problem}")
    for flag, reason in _UNSUPPORTED_FLAGS.items():
        if config.get(flag):
            raise AdapterError(config_path, reason)
    return config


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
        match = _LORA_KEY.match(key)
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
