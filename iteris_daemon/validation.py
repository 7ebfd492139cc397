"""Checks an adapter folder must pass before the catalog registers it.

Order matters: cheap, structural checks that need no trust in the file come
first (config JSON, refusal of pickled weights, the safetensors header against
the file's real size), then the tensors' layout (pairs, ranks, dtypes) and
values (no NaN or Inf), and last the comparison with the base model's layer
shapes (:mod:`iteris_daemon.shapes`). All of it is pure Python (numpy reads
the values): the daemon validates without importing torch, and asks a
:data:`ShapeSource` for the base model's shapes (the daemon's asks a worker once
per base model and caches the answer in the catalog).
Every failure is an :class:`AdapterError` whose reason the catalog records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import stat
import struct
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import safe_json
from .adapter_config import (CONFIG_NAME, KEY_PREFIX, LORA_KEY, PICKLED_NAMES, WEIGHTS_NAME, AdapterConfigView,
                             module_regex_problem, module_scaling, peft_regexes, read_adapter_config,
                             saved_whole)
from .calibration import CALIBRATION_NAME
from .errors import AdapterError, BaseModelError, IncompatibleAdaptersError, IterisError
from .paths import folder_name, open_checked
from .shapes import BaseShapes, check_shapes, local_config_digest, skeleton_key

log = logging.getLogger(__name__)

# Bytes per element of every dtype the safetensors format defines.
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}


@dataclass(frozen=True)
class Limits:
    """Upper bounds that keep a hostile adapter from costing unbounded memory or time
    (set in the daemon config's ``[daemon.limits]``)."""

    max_weights_bytes: int = 2 << 30
    max_header_bytes: int = 16 << 20
    max_tensors: int = 20_000
    max_rank: int = 4096
    max_calibration_bytes: int = 64 << 20
    max_config_bytes: int = 1 << 20  # at most lora.MAX_CONFIG_BYTES

    def file_limit(self, name: str) -> int:
        """The most bytes the adapter file ``name`` may hold."""
        return getattr(self, self.file_setting(name))

    @staticmethod
    def file_setting(name: str) -> str:
        """The setting that bounds the adapter file ``name``."""
        return {CONFIG_NAME: "max_config_bytes", CALIBRATION_NAME: "max_calibration_bytes"}.get(name, "max_weights_bytes")

    def above(self, setting: str) -> str:
        """"above the limit of N ([daemon.limits] setting)": a refusal names what to raise
        (a 70B model's rank-64 LoRA on every linear layer, saved in float32, is 3.3 GB)."""
        return f"above the limit of {getattr(self, setting)} ([daemon.limits] {setting})"

    def file_above(self, name: str) -> str:
        """:meth:`above` for the setting that bounds the adapter file ``name``."""
        return self.above(self.file_setting(name))


# Bump when a release changes what validation accepts or refuses: every verdict the
# catalog holds is then reached again, once (see ``validation_context``).
VALIDATION_RULES = 4


def validation_context(limits: Limits, base_model: str | None, trusted_models: Collection[str]) -> str:
    """A digest of everything besides an adapter's files that its verdict depends on:
    the limits, the source's base model (a local one's ``config.json`` too), the trusted base
    models and the rules. The catalog stores it with each verdict, and a source judges a
    revision again when its context differs: a Hub adapter refused as too big is registered
    once the limit is raised (its commit, the revision, is the same), one past a lowered
    limit is withdrawn, and the adapters of a base model replaced in its folder by another
    shape are withdrawn at the source's next start."""
    key = {"rules": VALIDATION_RULES, "limits": asdict(limits), "base_model": base_model,
           "trusted_models": sorted(trusted_models)}
    if base_model and (config := local_config_digest(base_model)) is not None:
        key["base_config"] = config
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class AdapterInfo:
    """What the catalog records about a valid adapter."""

    base_model: str | None
    task_type: str | None
    rank: int
    alpha: float
    target_modules: list[str]
    size_bytes: int
    content_sha256: str


def folder_fingerprint(folder: Path, limits: Limits = Limits(), pickled_from: Path | None = None,
                       weights_sha256: str | None = None) -> str:
    """Identity of a folder's adapter content: config, weights (pickled or not) and
    calibration data (``pickled_from``: read the pickled files from there instead;
    ``weights_sha256``: the weights' hash, already taken from the bytes the caller read).

    Two scans of unchanged files give the same value, so registering twice is a
    no-op; any byte change in those files gives a new revision. A file past its size
    limit, and a ``calibration.jsonl`` that is not a regular file of the folder (a
    symlink, a device, a FIFO), is not read: what it is (type, size, mtime, link
    target) stands for its content, so swapping one in still makes a new revision,
    which validation then rejects.
    """
    digest = hashlib.sha256()
    for name in (CONFIG_NAME, WEIGHTS_NAME, *PICKLED_NAMES, CALIBRATION_NAME):
        path = (pickled_from or folder) / name if name in PICKLED_NAMES else folder / name
        identity = (weights_sha256 if name == WEIGHTS_NAME and weights_sha256 else
                    _file_identity(path, limits.file_limit(name), follow=name != CALIBRATION_NAME))
        if identity is not None:
            digest.update(f"{name}\0{identity}\0".encode())
    return digest.hexdigest()


def _file_identity(path: Path, limit: int, follow: bool) -> str | None:
    """The sha256 of a regular file of at most ``limit`` bytes, else a description that
    changes when the file does; None when there is no such file."""
    try:
        handle, info = open_checked(path, follow)
    except FileNotFoundError:
        return None
    except OSError:  # a symlink not followed, a link loop, no permission
        try:
            info = path.lstat()
        except FileNotFoundError:
            return None
        link = os.readlink(path) if stat.S_ISLNK(info.st_mode) else ""
        return f"unread:{stat.S_IFMT(info.st_mode):o}:{info.st_size}:{info.st_mtime_ns}:{link}"
    with handle:
        if stat.S_ISREG(info.st_mode) and info.st_size <= limit:
            digest, total = hashlib.sha256(), 0
            while block := handle.read(min(1 << 20, limit + 1 - total)):
                digest.update(block)
                total += len(block)
            if total <= limit:
                return digest.hexdigest()
        return f"unread:{stat.S_IFMT(info.st_mode):o}:{info.st_size}:{info.st_mtime_ns}:"


def copy_adapter_file(source: Path, target: Path, limits: Limits, follow: bool = True) -> None:
    """Copy ``source`` if it is a regular file within its limit, checked on the
    descriptor that is read (a swap between check and copy changes nothing); never
    through a symlink unless ``follow``. Raises :class:`AdapterError` saying what it is
    instead; ``FileNotFoundError`` when there is nothing."""
    try:
        handle, info = open_checked(source, follow)
    except OSError as exc:
        if not follow and source.is_symlink():
            raise AdapterError(source, f"is a symlink; {source.name} must be a regular file of the adapter folder") from None
        if isinstance(exc, FileNotFoundError):
            raise
        raise AdapterError(source, f"cannot read: {exc.strerror}") from None
    limit = limits.file_limit(source.name)
    with handle:
        if not stat.S_ISREG(info.st_mode):
            raise AdapterError(source, "is not a regular file")
        if info.st_size > limit:
            raise AdapterError(source, f"file is {info.st_size} bytes, {limits.file_above(source.name)}")
        copied = 0
        with open(target, "wb") as out:
            while block := handle.read(min(1 << 20, limit + 1 - copied)):
                out.write(block)
                copied += len(block)
    if copied > limit:
        raise AdapterError(source, f"grew past the limit of {limit} bytes while being copied")


def check_calibration_file(folder: Path, limits: Limits) -> None:
    """``calibration.jsonl``, when there is one, must be a regular file of the folder (not
    a symlink, device or FIFO: the run copies it) within ``limits.max_calibration_bytes``."""
    path = folder / CALIBRATION_NAME
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISLNK(info.st_mode):
        raise AdapterError(path, f"is a symlink; {CALIBRATION_NAME} must be a regular file of the adapter folder")
    if not stat.S_ISREG(info.st_mode):
        raise AdapterError(path, "is not a regular file")
    if info.st_size > limits.max_calibration_bytes:
        raise AdapterError(path, f"file is {info.st_size} bytes, {limits.above('max_calibration_bytes')}")


def read_weights(path: Path, limits: Limits) -> bytes:
    """The weights file's bytes, refused unread past ``limits.max_weights_bytes``. Checked
    once open: a FIFO renamed over the file after it was seen held the scan (and the daemon's
    stop) until something wrote to it."""
    handle, info = open_checked(path, follow=True)  # an OSError (no permission, vanished) is the caller's to explain
    with handle:
        if not stat.S_ISREG(info.st_mode):
            raise AdapterError(path, "is not a regular file")
        size = info.st_size
        if size > limits.max_weights_bytes:
            raise AdapterError(path, f"file is {size} bytes, {limits.above('max_weights_bytes')}")
        data = handle.read(size)
        grew = handle.read(1)
    if grew:
        raise AdapterError(path, "changed while being read; it is read again at the next scan")
    return data


def check_safetensors_header(path: Path, limits: Limits, data: bytes | None = None) -> dict[str, Any]:
    """Parse the header without trusting it: offsets, dtypes and shapes must describe
    exactly the bytes the file holds (``data``: the file's bytes, read here if not given).
    Returns the tensor entries."""
    if data is None:
        data = read_weights(path, limits)
    size = len(data)
    if size < 8:
        raise AdapterError(path, "truncated safetensors file (no header)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > min(limits.max_header_bytes, size - 8):
        raise AdapterError(path, f"safetensors header claims {header_len} bytes; the file is truncated or corrupt")
    raw = data[8:8 + header_len]
    try:
        header = safe_json.loads(raw.decode("utf-8"))
    except safe_json.JSONLimitError as exc:
        raise AdapterError(path, f"safetensors header: {exc}") from None
    except ValueError:  # not UTF-8, not JSON
        raise AdapterError(path, "safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise AdapterError(path, "safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None)  # null, or a map of strings, as safetensors allows
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise AdapterError(path, "safetensors header: __metadata__ must map names to strings")
    if len(header) > limits.max_tensors:
        raise AdapterError(path, f"{len(header)} tensors, {limits.above('max_tensors')}")
    data_size = size - 8 - header_len
    spans = []
    for name, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            width = _DTYPE_BYTES[dtype]
            if not all(isinstance(d, int) and d >= 0 for d in shape) or not (isinstance(start, int) and isinstance(end, int)):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise AdapterError(path, f"tensor {name!r} has a malformed header entry") from None
        if not 0 <= start <= end <= data_size:
            raise AdapterError(path, f"tensor {name!r} lies outside the file (truncated or corrupt)")
        if end - start != width * math.prod(shape):
            raise AdapterError(path, f"tensor {name!r}: {dtype}{shape} does not fill its {end - start} bytes")
        spans.append((start, end))
    position = 0
    for start, end in sorted(spans):
        if start != position:
            raise AdapterError(path, "tensor data overlaps or leaves gaps (corrupt file)")
        position = end
    if position != data_size:
        raise AdapterError(path, f"{data_size - position} bytes after the last tensor (corrupt file)")
    return header


# Per floating dtype: the little-endian integer view and the exponent bits that, all set,
# mean NaN or Inf (E4M3 and E8M0 have no Inf: all value bits set is their NaN).
_NON_FINITE = {
    "F64": ("<u8", 0x7FF0000000000000), "F32": ("<u4", 0x7F800000), "F16": ("<u2", 0x7C00),
    "BF16": ("<u2", 0x7F80), "F8_E5M2": ("u1", 0x7C), "F8_E4M3": ("u1", 0x7F), "F8_E8M0": ("u1", 0xFF),
}


@dataclass
class AdapterLayout(AdapterConfigView):
    """What an adapter's files hold, read without torch: its config, per module the LoRA
    delta's (rank, d_out, d_in), the ``modules_to_save`` shapes, and the weights' hash."""

    path: Path
    config: dict[str, Any]
    modules: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    modules_to_save: dict[str, tuple[int, ...]] = field(default_factory=dict)
    content_sha256: str = ""
    name: str = ""  # the adapter's name (calibration sources look files up by it)
    tensor_keys: dict[str, tuple[str, str]] = field(default_factory=dict, repr=False)  # module -> lora_A, lora_B keys


def read_layout(folder: Path, limits: Limits = Limits(), name: str | None = None) -> AdapterLayout:
    """Read and check a PEFT LoRA folder's config and weights; raise :class:`AdapterError`
    naming what is wrong."""
    return read_checked(folder, limits, name)[0]


_WRAPPER_COPY = re.compile(r"^(?P<module>.+)\.(?:modules_to_save|original_module)\.(?P<name>.+)$")


def _wrapper_copy(key: str, header: dict[str, Any]) -> bool:
    """Whether ``key`` is one of the copies PEFT's ``save_embedding_layers`` adds beside a saved
    module ``X.weight`` (set when the vocabulary was resized): ``X.modules_to_save.weight``, the
    same tensor, which PEFT does not load, and ``X.original_module.weight``, the base model's,
    which PEFT loads under the adapter (used only with it disabled). The merge carries ``X.weight``."""
    match = _WRAPPER_COPY.match(key)
    return match is not None and f"{match['module']}.{match['name']}" in header


def read_checked(folder: Path, limits: Limits = Limits(), name: str | None = None) -> tuple[AdapterLayout, bytes]:
    """:func:`read_layout`, and the weights' bytes it checked: the one place an adapter's
    structure is checked (:func:`iteris_daemon.lora.load_adapter` makes its tensors from
    these bytes, so what was checked, hashed and loaded is one read of one file)."""
    folder = Path(folder)
    config = read_adapter_config(folder, limits.max_config_bytes)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        pickled = [n for n in PICKLED_NAMES if (folder / n).exists()]
        if pickled:
            raise AdapterError(folder / pickled[0], "pickled weights are refused (never loaded); convert the adapter to safetensors")
        raise AdapterError(folder, f"no {WEIGHTS_NAME}")
    field_name, rank = _largest_rank(config)
    if rank > limits.max_rank:
        raise AdapterError(folder / CONFIG_NAME, f"{field_name}={rank} is {limits.above('max_rank')}")
    data = read_weights(weights, limits)  # read once: header, values and hash come from the same bytes
    header = check_safetensors_header(weights, limits, data)
    start = 8 + struct.unpack("<Q", data[:8])[0]
    layout = AdapterLayout(folder, config, content_sha256=hashlib.sha256(data).hexdigest(), name=name or folder_name(folder))
    embedding = next((key for key in header if ".lora_embedding_" in key), None)
    if embedding is not None:
        module = embedding.split(".lora_embedding_")[0].removeprefix(KEY_PREFIX)
        raise AdapterError(weights, f"LoRA on an embedding layer ({module}) is not supported: "
                                    "the merge solves linear layers only")
    parts: dict[str, dict[str, dict[str, Any]]] = {}
    for key, entry in header.items():
        match = LORA_KEY.match(key)
        if match:
            parts.setdefault(match["module"], {})[match["part"]] = {**entry, "key": key}
        elif key.endswith(".base_layer.weight"):  # PEFT's save_embedding_layers
            module = key.removeprefix(KEY_PREFIX).removesuffix(".base_layer.weight")
            raise AdapterError(weights, f"holds its own copy of the base layer {module} (PEFT saves one when a LoRA "
                                        "targets an embedding or the output layer, lm_head); a merge would drop it: save the "
                                        "adapter with save_embedding_layers=False if the base model's layer is unchanged")
        elif key.endswith(".bias") and config.get("bias") not in (None, "none") and not saved_whole(key, config):
            module = key.removeprefix(KEY_PREFIX).removesuffix(".bias")
            raise AdapterError(weights, f"trains the bias of {module} (bias={config['bias']!r}): a merge of LoRA "
                                        "factors would drop it")
        elif _wrapper_copy(key, header):
            continue
        elif key.startswith(KEY_PREFIX):  # a saved module, or the tied copy of one (else refused below)
            layout.modules_to_save[key[len(KEY_PREFIX):]] = tuple(entry["shape"])
        else:
            raise AdapterError(weights, f"unexpected tensor {key!r}")
    for copy in layout.tied_copies:
        _check_tied_copy(weights, config, header, data, start, copy)
    if not parts:
        raise AdapterError(weights, "holds no LoRA tensors")
    _check_module_regexes(config, [*parts, *layout.modules_to_save], folder / CONFIG_NAME)
    _check_targets(config, list(parts), folder / CONFIG_NAME)
    for module, pair in sorted(parts.items()):
        if set(pair) != {"A", "B"}:
            raise AdapterError(weights, f"{module} has lora_{'A' if 'A' not in pair else 'B'} missing")
        A, B = pair["A"], pair["B"]
        if len(A["shape"]) != 2 or len(B["shape"]) != 2 or A["shape"][0] != B["shape"][1]:
            raise AdapterError(weights, f"{module}: lora_A {tuple(A['shape'])} and lora_B {tuple(B['shape'])} "
                                        "are not a (r, d_in) / (d_out, r) pair")
        if A["dtype"] not in _NON_FINITE or B["dtype"] not in _NON_FINITE:
            raise AdapterError(weights, f"{module}: LoRA weights must be floating point")
        try:
            rank, _ = module_scaling(config, module)
        except ValueError as exc:
            raise AdapterError(folder / CONFIG_NAME, str(exc)) from None
        if A["shape"][0] != rank:
            raise AdapterError(weights, f"{module}: lora_A has rank {A['shape'][0]} but the config says r={rank}")
        if not all(_finite(data, start, entry) for entry in (A, B)):
            raise AdapterError(weights, f"{module}: weights contain NaN or Inf")
        layout.modules[module] = (rank, B["shape"][0], A["shape"][1])
        layout.tensor_keys[module] = (A["key"], B["key"])
    return layout, data


def _largest_rank(config: dict[str, Any]) -> tuple[str, int]:
    """The largest rank the config gives a module, and where it gives it: ``r``, or a
    ``rank_pattern`` value (only ``r`` was held to ``max_rank``; the weights' ranks must
    equal these, checked module by module)."""
    ranks = [("r", config["r"])]
    ranks += [(f"rank_pattern[{key[:40]!r}{'…' if len(key) > 40 else ''}]", rank)
              for key, rank in (config.get("rank_pattern") or {}).items()]
    return max(ranks, key=lambda named: named[1])


def _check_tied_copy(weights: Path, config: dict[str, Any], header: dict[str, Any], data: bytes, start: int,
                     copy: str) -> None:
    """A saved tensor no ``modules_to_save`` entry names must be the copy PEFT's
    ``ensure_weight_tying`` saves of a tied one (``lm_head.weight`` beside a saved
    ``embed_tokens.weight``): equal to a named one. Any other, PEFT loads into the base
    model's own layer, which the adapter then changes even when disabled."""
    entry = header[KEY_PREFIX + copy]

    def payload(item: dict[str, Any]) -> bytes:
        begin, end = item["data_offsets"]
        return data[start + begin:start + end]

    if config.get("ensure_weight_tying") and any(
            saved_whole(key, config) and (item["dtype"], item["shape"]) == (entry["dtype"], entry["shape"])
            and payload(item) == payload(entry) for key, item in header.items()):
        return
    module = copy.rpartition(".")[0]
    tie = (" and equals none of theirs, as the copy ensure_weight_tying saves of a tied module would"
           if config.get("ensure_weight_tying") else "")
    raise AdapterError(weights, f"tensor {KEY_PREFIX + copy!r} lies under no module that modules_to_save "
                                f"{config.get('modules_to_save') or []} names{tie}: PEFT would load it into the base "
                                f"model's own {module}, changing the model under the adapter")


def _finite(data: bytes, start: int, entry: dict[str, Any]) -> bool:
    import numpy as np  # here, not at the top: config and status import this module for its limits

    view, exponent = _NON_FINITE[entry["dtype"]]
    begin, end = entry["data_offsets"]
    bits = np.frombuffer(data, dtype=view, count=(end - begin) // np.dtype(view).itemsize, offset=start + begin)
    return not np.any((bits & np.array(exponent, dtype=view)) == exponent)


ShapeSource = Callable[[str, AdapterLayout, bool], BaseShapes]
"""``(base model, adapter layout, trust_remote_code) -> shapes``; raises
:class:`BaseModelError` or :class:`IncompatibleAdaptersError` when there are none."""


def validate_adapter(
    folder: Path,
    base_model: str | None = None,
    limits: Limits = Limits(),
    trusted_models: Collection[str] = (),
    shapes: ShapeSource | None = None,
) -> AdapterInfo:
    """Check ``folder`` fully; raise :class:`AdapterError` with the reason, or describe it.

    ``base_model`` (the source's) wins over the adapter's own
    ``base_model_name_or_path``; when neither is given the shape check against a
    base model is skipped. A base model that cannot be read raises
    :class:`~iteris_daemon.errors.BaseModelError` (a problem of the setup, not of the adapter).
    Only a base model named in ``trusted_models`` may run its own code: an adapter
    choosing its base model must not choose what runs. ``shapes`` gives the base
    model's layer shapes (default: :func:`skeleton_shapes`, in this process). A failure
    no check foresaw is a rejection too (logged with its traceback): a hostile folder
    must never stop a scan.
    """
    try:
        return _validate(folder, base_model, limits, trusted_models, shapes or skeleton_shapes)
    except (IterisError, OSError):  # OSError: a file vanished meanwhile (the caller looks again)
        raise
    except Exception as exc:
        log.exception("validating %s failed unexpectedly", folder)
        raise AdapterError(folder, f"could not be validated ({type(exc).__name__}); the daemon's log has the details") from None


def _validate(folder: Path, base_model: str | None, limits: Limits, trusted_models: Collection[str],
              shapes: ShapeSource) -> AdapterInfo:
    config = read_adapter_config(folder, limits.max_config_bytes)
    check_calibration_file(folder, limits)
    named = config.get("base_model_name_or_path")
    if named and not base_model and named not in trusted_models:
        problem = named_base_problem(named)
        if problem:
            raise AdapterError(folder / CONFIG_NAME, f"base_model_name_or_path {named[:100]!r} {problem}")
    layout = read_layout(folder, limits)
    base = base_model or layout.base_model
    if base_model and named and names_another_model(named, base_model):
        # The source's base model decides (an adapter often names a Hub id, or a path on the machine
        # that trained it, for the same model), but another model of the same shapes passes too
        log.warning("%s names base model %r, not the source's %r: it is checked and merged as an adapter of "
                    "the source's (is it an adapter of another model?)", folder, named[:100], base_model)
    if base:
        try:
            found = shapes(base, layout, base in trusted_models)
        except IncompatibleAdaptersError as exc:  # e.g. a task_type no auto class serves
            raise AdapterError(folder / CONFIG_NAME, str(exc)) from None
        except BaseModelError as exc:
            if base_model:  # the source's own setting: a problem of the setup, the adapter waits
                raise
            log.warning("%s: its base model %r cannot be read: %s", folder, base, exc)  # the loader's words stay here
            raise AdapterError(folder / CONFIG_NAME, f"base_model_name_or_path {base[:100]!r} cannot be read (not on "
                                                     "the Hub, or offline); the daemon's log has the details") from None
        check_shapes(found, {p: (d_out, d_in) for p, (_, d_out, d_in) in layout.modules.items()},
                     layout.modules_to_save, folder, base, layout.tied_copies)
    targets = config.get("target_modules")
    return AdapterInfo(
        base_model=base,
        task_type=layout.task_type,
        rank=max(rank for rank, _, _ in layout.modules.values()),
        alpha=float(config["lora_alpha"]),
        target_modules=sorted(targets) if isinstance(targets, list) else sorted({p.rsplit(".", 1)[-1] for p in layout.modules}),
        size_bytes=(folder / WEIGHTS_NAME).stat().st_size,
        content_sha256=layout.content_sha256,
    )


def names_another_model(named: str, base_model: str) -> bool:
    """Whether an adapter's ``base_model_name_or_path`` names another model than
    ``base_model``, by the name without its owner or folder: ``meta-llama/Llama-2-7b-hf``,
    ``/models/llama-2-7b-hf`` and the Hub cache's ``.../models--meta-llama--Llama-2-7b-hf/
    snapshots/<commit>`` name one model; a path is read as the folder it names (``.``)."""
    def name(model: str) -> str:
        parts = list(Path(os.path.normpath(os.path.abspath(os.path.expanduser(model)))).parts
                     if model.startswith(("/", ".", "~")) else model.rstrip("/").split("/"))
        if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
            parts = parts[:-2]  # the Hub cache's folder of a repo's commit
        return parts[-1].rpartition("--")[2].lower() if parts[-1].startswith("models--") else parts[-1].lower()

    return name(named) != name(base_model)


def layout_key(base: str, layout: AdapterLayout, trust_remote_code: bool) -> str:
    """Which skeleton of ``base`` ``layout`` is checked against (see :func:`skeleton_key`)."""
    return skeleton_key(base, layout.config, list(layout.modules), layout.modules_to_save, trust_remote_code)


_SKELETONS: dict[str, BaseShapes] = {}


def skeleton_shapes(base: str, layout: AdapterLayout, trust_remote_code: bool) -> BaseShapes:
    """The base model's shapes from its skeleton built in this process (imports torch and
    transformers); a scan of many adapters of one base reuses one."""
    from .lora import load_adapter
    from .model import base_shapes, load_skeleton

    key = layout_key(base, layout, trust_remote_code)
    if key not in _SKELETONS:
        if len(_SKELETONS) >= 16:
            _SKELETONS.pop(next(iter(_SKELETONS)))
        _SKELETONS[key] = base_shapes(load_skeleton(base, load_adapter(layout.path), trust_remote_code))
    return _SKELETONS[key]


def named_base_problem(name: str) -> str | None:
    """Why the daemon will not look up ``name``, a base model an adapter names itself (the
    source names none), or None. The adapter does not choose what the daemon reads: a
    local path is refused (unless the config names it), anything else must be a Hub repo
    id that is not also a path where the daemon runs."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if os.path.isabs(name) or name.startswith(("~", ".")) or "\\" in name or os.path.lexists(name):
        return ("is a local path; a base model an adapter names is only looked up on the Hub "
                "(set the source's base_model to check adapters against a local model)")
    try:
        validate_repo_id(name)
    except HFValidationError:
        return "is not a Hub repo id"
    return None


def _check_targets(config: dict[str, Any], modules: list[str], where: Path) -> None:
    """Every adapted module must be one PEFT adapts when it loads the adapter: it ignores the
    weights of any other, so a merge of them is not what the adapter serves (a regex
    ``target_modules``, ``layers_to_transform`` or ``exclude_modules`` narrower than the
    weights, in a converted or hand-edited config, was merged whole, silently)."""
    for module in modules:
        if why := _left_out_by_peft(config, module):
            raise AdapterError(where, f"weights adapt {module}, which {why}: PEFT ignores those weights when it "
                                      "loads the adapter, so a merge of them is not what the adapter serves")


def _left_out_by_peft(config: dict[str, Any], key: str) -> str | None:
    """Why PEFT would not adapt the base model's module ``key`` under ``config``, or None: the
    rules of its ``check_target_module_exists``, without torch (peft 0.21's, checked against it
    by the tests; older releases took the last layer index of a key holding two, an MoE expert's)."""
    excluded = config.get("exclude_modules")
    if isinstance(excluded, str) and excluded and re.fullmatch(excluded, key):
        return f"exclude_modules {excluded!r} matches"
    if isinstance(excluded, list) and any(key == e or key.endswith(f".{e}") for e in excluded):
        return f"exclude_modules {excluded} names"
    if any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in config.get("modules_to_save") or ()):
        return "lies in a module modules_to_save saves whole"
    targets = config.get("target_modules")
    if targets is None or targets == "all-linear":  # the shorthand PEFT expands from the base model
        targets = None
    elif isinstance(targets, str):  # a regex, tried alone: PEFT applies no layer restriction to it
        return None if re.fullmatch(targets, key) else f"target_modules {targets!r} does not match"
    elif key in targets:  # named whole: no layer restriction either
        return None
    elif not any(key.endswith(f".{t}") for t in targets):
        return f"target_modules {targets} does not name"
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return None
    patterns = config.get("layers_pattern")
    if not patterns:
        found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        found = next((m for p in ([patterns] if isinstance(patterns, str) else patterns)
                      if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key))), None)
    index = int(found["idx"]) if found else None
    if index is None or index not in ([layers] if isinstance(layers, int) else layers):
        return f"layers_to_transform {layers!r}" + (f" (layers_pattern {patterns!r})" if patterns else "") + " leaves out"
    return None


def _check_module_regexes(config: dict[str, Any], modules: list[str], where: Path) -> None:
    """The regular expressions PEFT builds from the config (a string ``target_modules``,
    ``rank_pattern`` keys, ``modules_to_save`` entries, ...: :func:`peft_regexes`) and runs
    against each module name of the base model when it loads the adapter (for a ``peft_*``
    strategy or the ``generate`` source) must compile and match quickly. Without the base,
    the names they are tried on are the adapter's module paths and their parents (each a
    module of the base), bare and under PEFT's ``base_model.model.``."""
    names = {".".join(parts[:end]) for parts in (m.split(".") for m in modules) for end in range(1, len(parts) + 1)}
    names |= {KEY_PREFIX + name for name in names}
    if found := module_regex_problem(peft_regexes(config), names):
        regex, problem = found
        shown = f"{regex.source[:60]!r}{'…' if len(regex.source) > 60 else ''}"
        remedy = "use module paths as keys" if regex.field.endswith(" key") else "list the module names instead"
        raise AdapterError(where, f"{regex.field} {shown} {problem}; {remedy}")
