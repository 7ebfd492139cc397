"""Where a base model's block weights live while the engine works on other blocks.

Three placements, one interface (``load(block, path)`` before a block is computed on,
``release(block)`` after):

- :class:`Resident`: the whole model sits on the compute device (small models);
- :class:`Offloaded`: the model sits in CPU memory and one block at a time is moved to
  the (GPU) device;
- :class:`Streamed`: only the modules outside the blocks (embeddings, final norm, heads)
  are loaded; each block is read from the memory-mapped safetensors checkpoint when it
  is needed and dropped afterwards, so peak memory does not grow with depth.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from . import malloc
from .errors import BaseModelError

log = logging.getLogger(__name__)


class WeightsUnavailable(Exception):
    """The checkpoint cannot be streamed (the message says why); load it whole instead."""


class Resident:
    name = "resident"

    def load(self, block: nn.Module, path: str) -> None:
        pass

    def release(self, block: nn.Module) -> None:
        pass


class Offloaded:
    """Blocks live in CPU memory and visit the device one at a time."""

    name = "cpu"

    def __init__(self, device: torch.device):
        self.device = device

    def load(self, block: nn.Module, path: str) -> None:
        block.to(self.device)

    def release(self, block: nn.Module) -> None:
        block.to("cpu")


class Streamed:
    """Blocks are read from the safetensors files when needed and dropped afterwards."""

    name = "disk"

    def __init__(self, checkpoint: "Checkpoint", device: torch.device, dtype: torch.dtype):
        self.checkpoint, self.device, self.dtype = checkpoint, device, dtype

    def load(self, block: nn.Module, path: str) -> None:
        self.checkpoint.load_into(block, path, self.device, self.dtype)

    def release(self, block: nn.Module) -> None:
        for name, param in list(block.named_parameters()):
            _replace_parameter(block, name, torch.empty(param.shape, dtype=param.dtype, device="meta"))


def _replace_parameter(root: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_path, _, leaf = name.rpartition(".")
    owner = root.get_submodule(owner_path) if owner_path else root
    owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)


class Checkpoint:
    """Tensor names of a local safetensors checkpoint, mapped onto a model's parameter names.

    Every tensor the model will read is checked against its file's header here (the file is
    there, holds the tensor, in the parameter's shape and kind of dtype), so a broken
    checkpoint is one clear error before the merge starts, not a traceback or a silently
    broadcast weight when its block is reached.
    """

    def __init__(self, folder: Path, model: nn.Module, ignore_mismatched: bool = False):
        self.folder = folder
        index = folder / "model.safetensors.index.json"
        # transformers reads model.safetensors where both it and an index are present
        if (folder / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(folder / "model.safetensors", framework="pt") as handle:
                self.files = {key: folder / "model.safetensors" for key in handle.keys()}
        elif index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            self.files = {key: folder / name for key, name in weight_map.items()}
        else:
            raise WeightsUnavailable(f"no safetensors checkpoint in {folder}")
        prefix = getattr(model, "base_model_prefix", "") or ""
        self.keys: dict[str, str] = {}
        missing = []
        # Tied parameters are listed once, under the name that is loaded (tie_weights()
        # restores the others after loading): the skeleton must be tied already.
        for name, _param in model.named_parameters():
            key = _checkpoint_key(name, prefix, self.files)
            if key is None:
                missing.append(name)
            else:
                self.keys[name] = key
        if missing:
            raise WeightsUnavailable(f"the checkpoint has no tensor named {missing[0]} ({len(missing)} such)")
        _check_headers(self.files, self.keys, model, ignore_mismatched)
        # Modules transformers keeps in float32 when it loads the model in half precision
        # (T5's ``wo``, whose activations overflow float16): the same here.
        strict = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
        self.float32_modules = {torch.float16: strict | set(getattr(model, "_keep_in_fp32_modules", None) or ()),
                                torch.bfloat16: strict}

    def load_into(self, module: nn.Module, path: str, device: torch.device, dtype: torch.dtype,
                  names: list[str] | None = None) -> None:
        """Materialise ``names`` (default: every parameter) of ``module``, which sits at
        ``path`` in the model, on ``device``; floating-point tensors in ``dtype`` (float32
        where transformers keeps them so, see :meth:`dtype_of`)."""
        from safetensors import safe_open

        if names is None:
            names = [name for name, _param in module.named_parameters()]
        wanted: dict[Path, list[tuple[str, str, torch.dtype]]] = {}
        for name in names:
            full = f"{path}.{name}" if path else name
            if full in self.keys:
                wanted.setdefault(self.files[self.keys[full]], []).append((name, self.keys[full], self.dtype_of(full, dtype)))
        for file, names in wanted.items():
            with safe_open(file, framework="pt", device="cpu") as handle:
                for name, key, target in names:
                    tensor = handle.get_tensor(key)
                    if tensor.is_floating_point():
                        tensor = tensor.to(target)
                    _replace_parameter(module, name, tensor.to(device))

    def dtype_of(self, name: str, dtype: torch.dtype) -> torch.dtype:
        """The dtype parameter ``name`` is loaded in when the model computes in ``dtype``."""
        parts = f".{name}."
        kept = self.float32_modules.get(dtype, ())
        return torch.float32 if any(f".{module}." in parts for module in kept) else dtype


def _checkpoint_key(name: str, prefix: str, files: dict[str, Path]) -> str | None:
    """The checkpoint's name for a parameter: the same, or with the base model's prefix
    added or removed (a ``LlamaModel`` loaded from a ``LlamaForCausalLM`` checkpoint)."""
    candidates = [name]
    if prefix:
        candidates += [f"{prefix}.{name}", name[len(prefix) + 1:] if name.startswith(f"{prefix}.") else None]
    return next((c for c in candidates if c and c in files), None)


def _check_headers(files: dict[str, Path], keys: dict[str, str], model: nn.Module,
                   ignore_mismatched: bool) -> None:
    """Raise :class:`BaseModelError` naming the file and tensor where the checkpoint cannot
    give a parameter: its file is missing, lacks the tensor, or holds it in another shape
    or kind of dtype (an integer tensor for a float weight). A shape that differs where
    transformers is told to ignore sizes (a classifier head resized to the adapters' labels)
    is left to transformers: the model loads whole."""
    from safetensors import SafetensorError, safe_open

    parameters = dict(model.named_parameters())
    by_file: dict[Path, list[str]] = {}
    for name, key in keys.items():
        by_file.setdefault(files[key], []).append(name)
    for file in dict.fromkeys(files.values()):
        if not file.is_file():
            raise BaseModelError(f"base model checkpoint file {file} is missing (its index names it)")
    for file, names in by_file.items():
        try:
            with safe_open(file, framework="pt") as handle:
                stored = set(handle.keys())
                for name in names:
                    key, param = keys[name], parameters[name]
                    if key not in stored:
                        raise BaseModelError(f"base model checkpoint file {file} has no tensor {key} (its index names it)")
                    header = handle.get_slice(key)
                    shape, dtype = header.get_shape(), header.get_dtype()
                    if _floating(dtype) != param.is_floating_point():
                        raise BaseModelError(f"base model checkpoint file {file}: tensor {key} is {dtype} where "
                                             f"the model has a {param.dtype} parameter")
                    if shape != list(param.shape):
                        mismatch = f"tensor {key} has shape {shape} where the model's config gives {list(param.shape)}"
                        if ignore_mismatched:
                            raise WeightsUnavailable(mismatch)
                        raise BaseModelError(f"base model checkpoint file {file}: {mismatch}")
        except SafetensorError as exc:
            raise BaseModelError(f"base model checkpoint file {file} cannot be read: {exc}".splitlines()[0]) from None


def _floating(dtype: str) -> bool:
    """Whether a safetensors header dtype (``F32``, ``BF16``, ``F8_E4M3``, ``I64`` ...) is a float."""
    return dtype.startswith(("F", "BF"))


def local_folder(name_or_path: str) -> Path | None:
    """The folder holding the checkpoint: a local path as is, a Hub id from the local cache."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors"], local_files_only=True))
    except Exception:  # not cached: let from_pretrained download it (whole-model load)
        return None


def load_streamed(cls, name_or_path: str, config, dtype: torch.dtype, device: torch.device,
                  block_paths, ignore_mismatched: bool = False) -> tuple[nn.Module, Streamed]:
    """The model with real weights outside its blocks and empty (meta) blocks.

    ``block_paths(model)`` names the block stacks; parameters under them stay on the
    meta device until :class:`Streamed` loads them block by block. ``ignore_mismatched``:
    what ``from_pretrained`` is told (see :func:`_check_headers`).
    """
    folder = local_folder(name_or_path)
    if folder is None:
        raise WeightsUnavailable(f"{name_or_path} is not a local folder or cached snapshot")
    model = _skeleton(cls, config, dtype)
    checkpoint = Checkpoint(folder, model, ignore_mismatched)
    stacks = tuple(f"{p}." for p in block_paths(model))
    if not stacks:
        raise WeightsUnavailable("no block stacks to stream")
    # After the checks that send the model to a whole load (which keeps glibc's
    # defaults), before any weight is read: block weights read and dropped block after
    # block would otherwise fragment the heap, and the peak grow with depth (+75% of the
    # added weights in benchmarks.scale with glibc's defaults, +23% with this).
    malloc.keep_large_blocks_in_mmap()
    outside = [n for n, _ in model.named_parameters() if not n.startswith(stacks)]
    checkpoint.load_into(model, "", device, dtype, names=outside)
    model.tie_weights()
    for name, buffer in model.named_buffers():
        if buffer.device.type != "meta":
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            module._buffers[leaf] = buffer.to(device)
    model.eval()
    return model, Streamed(checkpoint, device, dtype)


def _skeleton(cls, config, dtype: torch.dtype) -> nn.Module:
    """The model's modules with meta parameters, tied, and buffers as ``from_pretrained``
    leaves them when it loads in ``dtype``: created in ``dtype``, then computed again by
    the model's own initialisation (in the process's default dtype) into them. Built in
    the checkpoint's dtype instead, Gemma's ``embed_scale`` stayed bfloat16 and GPT-J's
    rotary table was computed in bfloat16, so merges differed between placements."""
    from accelerate import init_empty_weights
    from transformers.initialization import no_init_weights

    with init_empty_weights(include_buffers=False), no_init_weights():
        build = cls.from_config if hasattr(cls, "from_config") else cls._from_config
        model = build(config, dtype=dtype)
    for param in model.parameters():
        param._is_hf_initialized = True  # every weight comes from the checkpoint: only buffers are computed
    model.initialize_weights()
    model.tie_weights()
    return model
