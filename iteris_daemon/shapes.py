"""A base model's layer shapes as plain data, and the check of an adapter against them.

The shapes come from the model's module tree on the meta device (:func:`iteris_daemon.model.base_shapes`),
computed once per base model and adapter kind, by a worker process in the daemon, and
cached in the catalog; checking an adapter against them is then pure Python, so the
daemon validates thousands of adapters without importing torch. The merge checks a
loaded model with the same function.

``BaseShapes``: ``{"layers": {path: [kind, d_out, d_in]}, "other": {path: class name},
"parameters": {name: shape}, "tied": {name: the first name of the parameter it shares}}``
where ``kind`` is ``"linear"`` or ``"conv1d"`` (GPT-2's transposed linear layer).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from .adapter_config import FUSED_EXPERTS_REFUSAL, WEIGHTS_NAME
from .errors import AdapterError

BaseShapes = dict[str, dict[str, Any]]
_EXPERT = re.compile(r"(?:^|\.)experts\.\d+\.")  # one expert's layer, as transformers 4 stored them
_FUSED = re.compile(r"(?:^|\.)experts\.[^.\d][^.]*$")  # a parameter of all of a block's experts
SHAPES_FORMAT = 2  # part of each cached entry's key: bumped when BaseShapes gains a field (2: "tied")


def check_shapes(shapes: BaseShapes, lora: Mapping[str, tuple[int, int]], saved: Mapping[str, tuple[int, ...]],
                 folder: Path, model_name: str, tied_copies: Collection[str] = ()) -> None:
    """Every LoRA pair (``lora``: module path -> (d_out, d_in) of its delta) must sit on a
    linear layer of the base model with matching shapes, every ``modules_to_save``
    tensor (``saved``: name -> shape) on a parameter of the same shape, and each of
    ``tied_copies`` (saved as ``ensure_weight_tying``'s copy of another) on a parameter the
    base model ties to another saved one: PEFT ties only those, and loads the rest into the
    base model's own layer.

    The config's ``fan_in_fan_out`` is not checked: ``lora_A``/``lora_B`` have the same
    layout on Linear and Conv1D layers, and PEFT sets the flag per layer when it loads an
    adapter (an adapter on GPT-2's Conv1D layers and its Linear ``lm_head`` is saved with
    one value that fits only one of the two kinds)."""
    where = folder / WEIGHTS_NAME
    layers, other, parameters = shapes["layers"], shapes["other"], shapes["parameters"]
    for path, (d_out, d_in) in lora.items():
        layer = layers.get(path)
        if layer is None:
            if path in other:
                raise AdapterError(where, f"{path} is a {other[path]}; only Linear/Conv1D LoRA can be merged")
            if _EXPERT.search(path) and (fused := next((name for name, shape in parameters.items()
                                                         if _FUSED.search(name) and len(shape) == 3), None)):
                raise AdapterError(where, f"targets {path}, one expert's layer, which transformers 5 fuses with the "
                                          f"other experts' into one parameter ({fused} in {model_name}; PEFT loads "
                                          f"such a LoRA on target_parameters): {FUSED_EXPERTS_REFUSAL}")
            raise AdapterError(where, f"targets {path}, which the base model ({model_name}) does not have")
        _, base_out, base_in = layer
        if (d_out, d_in) != (base_out, base_in):
            raise AdapterError(where, f"{path}: LoRA delta is {d_out}x{d_in} but the base layer is {base_out}x{base_in}")
    for key, shape in saved.items():
        if key not in parameters:
            raise AdapterError(where, f"modules_to_save tensor {key} has no parameter in the base model")
        base = tuple(parameters[key])
        if base != tuple(shape):
            if len(shape) == 2 and base[1:] == tuple(shape[1:]) and base[0] == _vocabulary(shapes):
                raise AdapterError(where, f"{key}: the adapter's vocabulary was resized ({shape[0]} tokens against the "
                                          f"base model's {base[0]}); it does not merge onto {model_name}: save that "
                                          f"model resized to {shape[0]} tokens, with the adapter's tokenizer, and merge "
                                          "onto that folder")
            raise AdapterError(where, f"{key} is {tuple(shape)}, base model has {base}")
    tied = shapes["tied"] if tied_copies else {}
    for copy in tied_copies:
        if not any(tied.get(key, key) == tied.get(copy, copy) for key in saved if key not in tied_copies):
            raise AdapterError(where, f"{copy} is saved as the copy ensure_weight_tying keeps of a tied module, but the "
                                      f"base model ({model_name}) ties it to no other saved one: PEFT would load it "
                                      "into the base model's own layer")


def _vocabulary(shapes: BaseShapes) -> int | None:
    """The base model's vocabulary size: the rows of its largest embedding (positions and
    token types have fewer), or None without one."""
    rows = [shape[0] for path, kind in shapes["other"].items() if "Embedding" in kind
            and len(shape := shapes["parameters"].get(f"{path}.weight", ())) == 2]
    return max(rows, default=None)


HEADS = ("classifier", "score", "classification_head", "qa_outputs")
"""The output heads transformers' classification and span models name (``modules_to_save``)."""


def head_labels(saved: Mapping[str, tuple[int, ...]]) -> int | None:
    """The label count a classifier head saved in ``modules_to_save`` (name -> shape) was
    trained with: the rows of its output projection (``classifier.weight``, or
    ``classifier.out_proj.weight`` behind a dense layer). Not any saved matrix's rows: a
    saved ``token_type_embeddings`` (2 rows) set 2 labels for a 3-label head. None: no head."""
    for name, shape in saved.items():
        parts = name.split(".")
        for head in HEADS:
            if head in parts and len(shape) == 2 and parts[-1] == "weight":
                after = parts[parts.index(head) + 1:-1]  # the module path inside the head
                if after in ([], ["out_proj"]):
                    return shape[0]
    return None


def skeleton_key(base: str, config: Mapping[str, Any], modules: list[str], saved: Mapping[str, tuple[int, ...]],
                 trust_remote_code: bool) -> str:
    """What the skeleton of ``base`` depends on for this adapter, as a hash: a local base
    model's config; the class loaded depends on ``task_type``, else ``auto_mapping``, else the
    adapted paths; a classifier head's width (a ``modules_to_save`` matrix) sets the label count."""
    mapping = config.get("auto_mapping")
    wanted = mapping.get("base_model_class") if isinstance(mapping, dict) else None
    task_type = config.get("task_type")
    paths = sorted(modules) if task_type is None and wanted is None else None
    labels = head_labels(saved)
    payload = [SHAPES_FORMAT, base, local_config_digest(base), task_type, repr(wanted), paths, labels, trust_remote_code]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


def local_config_digest(base: str) -> str | None:
    """The sha256 of a local base model's ``config.json``, so that a model replaced in its folder
    (a wider checkpoint saved to the same path) is measured again; None for a Hub id."""
    try:
        return hashlib.sha256((Path(base) / "config.json").read_bytes()).hexdigest()
    except OSError:
        return None
