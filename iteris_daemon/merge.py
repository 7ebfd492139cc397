"""One merge, start to finish: load and check inputs, run a strategy, evaluate, and
write a PEFT adapter folder plus ``merge_report.json``.

Everything that can be wrong with the input is checked before the (slow) model
load, and the output is written to a temporary folder that is renamed into place
only once complete: bad input never leaves a half-written adapter behind.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm

from . import memory, safe_json
from .adapter_config import CARD_NAME, CONFIG_NAME, REPORT_NAME, sha256_file
from .alignment import ACCUMULATE
from .architecture import linear_kind
from .calibration import CalibrationOptions, CalibrationSet, first_calibration, releasing
from .errors import (CalibrationError, IncompatibleAdaptersError, InputsChangedError, IterisError, MergeCancelled,
                     MergeError, OutputError, OutputExistsError, first_line)
from .evaluation import evaluate
from .figures import number, whole_number
from .logs import counted
from .lora import LoraAdapter, load_adapter, save_adapter, widest
from .lowrank import refactor
from .model import DTYPES, BaseModel
from .model_card import merge_card
from .oom import says_out_of_memory
from .paths import (absolute, as_if_created, held_staging_folder, model_location, overlap, real,
                    remove_abandoned_staging, replace_folder, staging_folder, trash_of)
from .plugin_manager import calibration_sources, get_strategy
from .strategy import (DEFAULT_STRATEGY, MergedAdapter, MergeInputs, MergeStrategy, Progress, StrategyParams,
                       check_per_adapter, engine_int, parse_params)
from .validation import named_base_problem, names_another_model

log = logging.getLogger(__name__)


@dataclass
class AdapterSpec:
    path: Path
    calibration: Path | None = None
    name: str | None = None  # default: the folder's name (paths.folder_name: ``.`` in b1 is b1)
    origin: str | None = None  # where the files came from, when ``path`` is a copy (shown in the report)


class _StoppableBar(tqdm):
    """A progress bar that doubles as the cancellation point: strategies report
    progress batch by batch, so a stop request takes effect within one batch."""

    def __init__(self, *args, should_stop: Callable[[], bool], **kwargs):
        self._should_stop = should_stop
        super().__init__(*args, **kwargs)

    def _check(self) -> None:
        if self._should_stop():
            raise MergeCancelled("merge cancelled at a safe point; nothing was written")

    def update(self, n=1):
        self._check()
        return super().update(n)

    def __iter__(self):
        for item in super().__iter__():
            self._check()
            yield item


@dataclass
class MergeRequest:
    base_model: str
    adapters: list[AdapterSpec]
    out: Path
    strategy: str = DEFAULT_STRATEGY
    params: dict[str, Any] | None = None
    device: str = "cpu"
    dtype: str = "float32"  # the base model's compute dtype
    output_dtype: str | None = None  # the merged adapter's dtype (default: the widest of the adapters')
    # Each layer at its own rank (rank_pattern; PEFT >= 0.15 only) instead of all zero-padded to the largest.
    exact_ranks: bool = False
    offload: str = "auto"  # where block weights wait: auto, disk, cpu, none (see weights.py)
    trust_remote_code: bool = False
    modules_to_save_rule: str = "agree"
    overwrite: bool = False
    evaluate: bool = True
    eval_batch_size: int = 16
    eval_samples: int = 50
    eval_max_length: int = 128
    quiet: bool = False
    calibration: CalibrationOptions | None = None  # default: files from the specs, then the folders
    calibration_sets: list[CalibrationSet | None] | None = None  # already gathered (the daemon does)
    should_stop: Callable[[], bool] | None = None
    # A previously merged adapter to score on the same calibration data (the quality gate's baseline).
    reference: Path | None = None
    # The daemon's inputs: a source registered each against ``base_model`` (its setting decides
    # over how an adapter spells its base), so their spellings are not compared.
    base_checked: bool = False


def _tell_apart(adapters: list[LoraAdapter]) -> None:
    """Folders that share a name (``run1/adapter``, ``run2/adapter``, as trainers save them) are
    named with their parent folder's name, else their whole path, and the same folder given
    twice by its place: reports stay unambiguous, and a name, which seeds ``compare``'s
    held-out draw, does not follow the order of the inputs (it did: ``adapter#0``)."""
    place = {id(a): index for index, a in enumerate(adapters)}
    for qualify in (lambda a: f"{Path(a.path).resolve().parent.name}/{a.name}", lambda a: str(Path(a.path).resolve()),
                    lambda a: f"{a.name}#{place[id(a)]}"):
        counts = Counter(a.name for a in adapters)
        for adapter in [a for a in adapters if counts[a.name] > 1]:
            adapter.name = qualify(adapter)


def _warn_repeated(adapters: list[LoraAdapter]) -> None:
    """A folder given more than once merges as that many tasks: its task counts that many
    times over (``task_weights`` is the way to weight a task). Allowed, but never silently."""
    for folder, times in Counter(str(Path(a.path).resolve()) for a in adapters).items():
        if times > 1:
            log.warning("adapter %s is given %d times: it is merged as %d tasks, so its task counts %d times over "
                        "(give it once, with task_weights, to weight it)", folder, times, times, times)


def load_adapters(specs: list[AdapterSpec], base_checked: bool = False,
                  base_model: str | None = None) -> list[LoraAdapter]:
    """Read the inputs and refuse what cannot be one merge: task types, base models (unless
    ``base_checked``: a source registered each against the merge's base) or base revisions
    that differ; adapters that name another model than ``base_model`` (given, and not
    ``base_checked``) are warned of."""
    adapters = [load_adapter(spec.path, spec.name) for spec in specs]
    if base_model is not None and not base_checked:
        _warn_other_base(base_model, adapters)
    _warn_repeated(adapters)
    _tell_apart(adapters)
    if len({a.task_type for a in adapters}) > 1:  # before the base model loads (its class follows the task type)
        listing = ", ".join(f"{a.name}: {a.task_type or 'none'}" for a in adapters)
        untyped = None in {a.task_type for a in adapters}
        raise IncompatibleAdaptersError(
            f"adapters have different task types ({listing}); one merge has one model class"
            + ("; an adapter without one is a plain model's to PEFT: if it was trained for a task (CAUSAL_LM, say), "
               'set "task_type" in its adapter_config.json' if untyped else ""))
    # One spelling per base model: ./base and /srv/base may be one folder.
    bases = {model_location(a.base_model) for a in adapters if a.base_model}
    if len(bases) > 1 and not base_checked:
        listing = ", ".join(f"{a.name}: {a.base_model}" for a in adapters)
        raise IncompatibleAdaptersError(
            f"adapters were trained on different base models ({listing}); if these name one model (a Hub id and "
            "a local copy of it, say), give base_model_name_or_path one spelling in their adapter_config.json")
    if len({a.config.get("revision") for a in adapters} - {None}) > 1:  # PEFT loads the base at its adapter's
        listing = ", ".join(f"{a.name}: {a.config.get('revision')}" for a in adapters)
        raise IncompatibleAdaptersError(f"adapters were trained on different revisions of the base model ({listing})")
    return adapters


def _warn_other_base(base_model: str, adapters: list[LoraAdapter]) -> None:
    """Warn of adapters that name another base model than the merge's, as the daemon's
    sources do: the shapes may match (the merge checks them), yet another model's adapter
    merges into nonsense, and the merged config names the adapters' model."""
    for adapter in adapters:
        if adapter.base_model and names_another_model(adapter.base_model, base_model):
            log.warning("adapter %s names base model %r, not %r: it is merged as an adapter of %r (is it an "
                        "adapter of another model?)", adapter.name, adapter.base_model[:100], base_model, base_model)


def gather_calibration(
    adapters: list[LoraAdapter], options: CalibrationOptions, required: bool
) -> list[CalibrationSet | None]:
    """Ask the calibration sources in ``options.order`` for each adapter's inputs, then
    release them (a model ``generate`` kept is freed before the merge loads the base)."""
    available = calibration_sources()
    unknown = [name for name in options.order if name not in available]
    if unknown:
        raise CalibrationError(unknown[0], f"unknown calibration source; available: {', '.join(sorted(available))}")
    found = []
    with releasing({name: available[name] for name in options.order}):
        for adapter in adapters:
            data = first_calibration(adapter, options, available)
            if data is None and required and not options.order:
                raise CalibrationError(adapter.path, f"no calibration data for adapter {adapter.name}: "
                                                     "--calibration-order names no source (its default: files,adapter)")
            if data is None and required:
                raise CalibrationError(
                    adapter.path,
                    f"no calibration data for adapter {adapter.name} (asked: {', '.join(options.order)}): add "
                    "calibration.jsonl to the folder or pass --adapter DIR=FILE.jsonl",
                )
            found.append(data)
    return found


def calibration_for(adapters: list[LoraAdapter], specs: list[AdapterSpec], options: CalibrationOptions | None,
                    base_model: str, required: bool, samples: int | None = None) -> list[CalibrationSet | None]:
    """Each adapter's calibration set: its spec's file first (the ``files`` source, put
    first in the order), then the sources in ``options.order``. ``samples``: how many a
    generating source makes (default: ``CalibrationOptions``'), and the first ones taken
    (the sources may stop reading there)."""
    options = options or CalibrationOptions()
    mapped = {a.name: s.calibration for a, s in zip(adapters, specs) if s.calibration}
    options.files = {**options.files, **mapped}
    if mapped:  # a file named on the command line is used, whatever the order says (it was ignored without "files")
        options.order = ("files", *(name for name in options.order if name != "files"))
    options.base_model = options.base_model or base_model
    if samples is not None:
        options.samples = samples
        options.limit = samples
    return gather_calibration(adapters, options, required=required)


def load_base(name: str, adapters: list[LoraAdapter], device: str, dtype: str, trust_remote_code: bool,
              offload: str) -> BaseModel:
    """The base model, with every adapter checked against its layers' shapes."""
    log.info("loading base model %s", name)
    base = BaseModel(name, adapters, device, dtype, trust_remote_code, offload=offload)
    for adapter in adapters:
        base.check_adapter(adapter)
    return base


def check_result(strategy: str, modules: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 adapters: list[LoraAdapter]) -> None:
    """What a strategy returned must be LoRA factors of the layers the adapters adapt, of
    their shapes, and finite: a plugin's mistake is refused here, before anything is
    written (PEFT could not load such an adapter, or silently lost a layer)."""
    shapes = {path: (m.B.shape[0], m.A.shape[1]) for a in adapters for path, m in a.modules.items()}
    if not isinstance(modules, dict):
        raise MergeError(f"strategy {strategy} returned modules as {type(modules).__name__}, not a dict "
                         "{layer path: (B, A)}; nothing was written")
    if not modules:
        raise MergeError(f"strategy {strategy} returned no layers; nothing was written")
    for path, factors in modules.items():
        if path not in shapes:
            raise MergeError(f"strategy {strategy} returned layer {path!r}, which no adapter adapts; nothing was written")
        if not (isinstance(factors, (tuple, list)) and len(factors) == 2
                and all(isinstance(t, torch.Tensor) for t in factors)):
            raise MergeError(f"strategy {strategy} returned {type(factors).__name__} for {path}, not a pair of "
                             "tensors (B, A); nothing was written")
        B, A = factors
        if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0] or A.shape[0] < 1 \
                or (B.shape[0], A.shape[1]) != shapes[path]:
            raise MergeError(f"strategy {strategy} returned factors of shapes B {tuple(B.shape)}, A {tuple(A.shape)} "
                             f"for {path}, which needs B (d_out, r) and A (r, d_in) with (d_out, d_in) = "
                             f"{shapes[path]} and r >= 1; nothing was written")
        if not (B.is_floating_point() and A.is_floating_point()):  # a cast would drop imaginary parts, say
            raise MergeError(f"strategy {strategy} returned factors of dtypes B {B.dtype}, A {A.dtype} for {path}; "
                             "LoRA factors are real floating point; nothing was written")
        if B.layout is not torch.strided or A.layout is not torch.strided:  # sparse: isfinite() raised
            raise MergeError(f"strategy {strategy} returned factors of layouts B {B.layout}, A {A.layout} for {path}; "
                             "LoRA factors are dense (torch.strided; .to_dense() makes them so); nothing was written")
        if "meta" in (B.device.type, A.device.type):  # shapes without values: isfinite() could not be read
            raise MergeError(f"strategy {strategy} returned factors on devices B {B.device}, A {A.device} for {path}; "
                             "meta tensors hold no values; nothing was written")
        if not (torch.isfinite(B).all() and torch.isfinite(A).all()):
            raise MergeError(f"merged weights of {path} contain NaN/Inf; nothing was written")
    left_out = sorted(path for path in shapes if path not in modules)
    if left_out:  # the adapters' deltas there would be lost without a word
        adapter = next(a.name for a in adapters if left_out[0] in a.modules)
        more = f" and {counted(len(left_out) - 1, 'other layer')}" if len(left_out) > 1 else ""
        raise MergeError(f"strategy {strategy} returned no factors for layer {left_out[0]} (which {adapter} "
                         f"adapts){more}; nothing was written")


Given = dict[tuple[str | None, str], tuple[tuple[Any, ...], Any]]


def inputs_given(adapters: list[LoraAdapter], calibration: list[CalibrationSet | None]) -> Given:
    """What a strategy must leave as given, each entry as the objects it holds (compared by
    identity) and a value (compared by equality), with no tensor copied: the order and the
    objects of the adapters and calibration sets (``calibration[i]`` belongs to
    ``adapters[i]``), each adapter's layers (their names, module objects and ``scaling``), and
    every factor and saved module with its count of in-place writes (torch keeps one per
    tensor: ``_version``)."""
    found: Given = {(None, "adapters"): (tuple(adapters), None), (None, "calibration"): (tuple(calibration), None)}
    for adapter in adapters:
        found[(adapter.name, "its layers")] = ((), (tuple(adapter.modules), tuple(adapter.modules_to_save)))
        found.update({(adapter.name, f"{path} scaling"): ((m,), m.scaling) for path, m in adapter.modules.items()})
        tensors = {**{f"{path}.lora_{k}": getattr(m, k) for path, m in adapter.modules.items() for k in "AB"},
                   **adapter.modules_to_save}
        found.update({(adapter.name, key): ((tensor,), tensor._version) for key, tensor in tensors.items()})
    return found


def check_inputs_kept(strategy: str, before: Given, adapters: list[LoraAdapter],
                      calibration: list[CalibrationSet | None]) -> None:
    """A strategy that changed its inputs (a tensor in place or replaced, a layer's scaling,
    the adapters' or calibration sets' order) is refused: the evaluation compares the merge
    with them (with the calibration of the adapter it belongs to), so its figures would mislead."""
    after = inputs_given(adapters, calibration)
    for key, (objects, value) in before.items():
        now = after.get(key)
        if now is None or len(now[0]) != len(objects) or any(a is not b for a, b in zip(now[0], objects)) \
                or now[1] != value:
            what = f"inputs.{key[1]} (their order or items)" if key[0] is None else f"input adapter {key[0]} ({key[1]})"
            raise InputsChangedError(f"strategy {strategy} changed its {what}; a strategy must leave its inputs as "
                                     "given (the evaluation compares the merge with them); nothing was written")


def _delta_overflows(B: torch.Tensor, A: torch.Tensor, dtype: torch.dtype, rows: int = 1024) -> bool:
    """Whether an entry of ``B @ A`` passes ``dtype``'s largest value, which PEFT's forward
    would meet (caught by the evaluation, which ``--no-eval`` skips). The bound max row norm
    of B x max column norm of A settles it almost always; past it the product is formed,
    in float64, ``rows`` rows at a time."""
    limit = torch.finfo(dtype).max
    B64, A64 = B.double(), A.double()
    if float(B64.norm(dim=1).max() * A64.norm(dim=0).max()) <= limit:
        return False
    return any(bool((B64[i:i + rows] @ A64).abs().max() > limit) for i in range(0, B64.shape[0], rows))


_RULE_OPTION = "--modules-to-save-rule (a daemon group's modules_to_save_rule)"


def check_heads(adapters: list[LoraAdapter], rule: str) -> None:
    """What refuses the ``modules_to_save`` of ``adapters`` whatever the base model, checked
    before it loads: an unknown rule (also when no adapter has modules_to_save, so that a
    mistyped one never passes unnoticed), copies tied in some only, shapes that differ."""
    names = {a.name: a for a in adapters}
    if rule not in ("agree", "average", *names):
        raise IncompatibleAdaptersError(
            f"unknown modules_to_save rule {rule!r}: use agree, average, or an adapter name ({', '.join(names)})"
        )
    heads = [a.modules_to_save for a in adapters]
    if not any(heads):
        return
    saved = {key.rsplit(".", 1)[0]: a.name for a in _head_sources(adapters, rule) for key in a.modules_to_save}
    for adapter in adapters:
        if clash := next((path for path in adapter.modules if path in saved), None):
            # PEFT wraps a module modules_to_save names, and ignores a LoRA on it: the merge
            # would be served without that delta, and scored with it
            raise IncompatibleAdaptersError(
                f"{clash} carries a LoRA in {adapter.name} and is saved whole (modules_to_save) in {saved[clash]}: "
                "PEFT loads the saved module in its place and ignores a LoRA on it, so the merged adapter would lose "
                f"{adapter.name}'s delta there; merge adapters that adapt that module one way, or take the heads of "
                f"an adapter without it ({_RULE_OPTION} ADAPTER_NAME)")
    tying = {a.name: bool(a.tied_copies) for a in _head_sources(adapters, rule)}
    if len(set(tying.values())) > 1:  # one config says whether PEFT ties the saved copies
        raise IncompatibleAdaptersError(
            f"the adapters whose modules_to_save are merged differ in ensure_weight_tying (saved a tied copy: "
            f"{tying}): PEFT ties all of a merged adapter's copies or none; choose one adapter's with "
            f"{_RULE_OPTION} ADAPTER_NAME")
    for key in sorted({k for h in heads for k in h}):  # e.g. heads trained for different label counts
        shapes = {a.name: tuple(h[key].shape) for a, h in zip(adapters, heads) if key in h}
        if len(set(shapes.values())) > 1:  # one model holds one; each task's is evaluated in it
            raise IncompatibleAdaptersError(
                f"modules_to_save {key} differs in shape between adapters ({shapes}): a merged adapter carries one "
                "head, so merge adapters trained for the same labels")


def base_and_head(adapters: list[LoraAdapter], request: Any) -> tuple[BaseModel, dict[str, torch.Tensor]]:
    """The base model of ``request`` (a merge's or a comparison's) with every adapter checked
    against it, and the adapters' merged ``modules_to_save``, refused in this order: what no
    base changes before it loads (a 70B load for nothing), the rule's own refusals after the
    base checked each adapter (a saved lm_head of a resized vocabulary was refused as
    modules_to_save that differ, and the rule that advised led to another refusal)."""
    check_heads(adapters, request.modules_to_save_rule)
    base = load_base(request.base_model, adapters, request.device, request.dtype, request.trust_remote_code,
                     request.offload)
    return base, merged_head(adapters, request.modules_to_save_rule)


def merged_head(adapters: list[LoraAdapter], rule: str) -> dict[str, torch.Tensor]:
    """Resolve ``modules_to_save`` (heads, embeddings) across adapters, once
    :func:`check_heads` passed them.

    ``agree``: all adapters carry identical tensors (or none); ``average``: the mean;
    an adapter's name: that adapter's modules are taken.
    """
    check_heads(adapters, rule)
    names = {a.name: a for a in adapters}
    heads = [a.modules_to_save for a in adapters]
    if not any(heads):
        return {}
    if rule == "average":
        keys = set(heads[0])
        if any(set(h) != keys for h in heads):
            raise IncompatibleAdaptersError("cannot average modules_to_save: adapters save different modules")
        return {k: torch.stack([h[k].float() for h in heads]).mean(0).to(heads[0][k].dtype) for k in keys}
    if rule in names:
        return dict(names[rule].modules_to_save)
    first = heads[0]
    agree = all(set(h) == set(first) and all(torch.equal(h[k], first[k]) for k in first) for h in heads)
    if not agree:
        raise IncompatibleAdaptersError(
            "adapters carry different modules_to_save (e.g. classifier heads); choose a rule with "
            f"{_RULE_OPTION} average|ADAPTER_NAME"
        )
    return dict(first)


def _head_sources(adapters: list[LoraAdapter], rule: str) -> list[LoraAdapter]:
    """The adapters whose modules :func:`merged_head` takes under ``rule``."""
    named = [a for a in adapters if a.name == rule]
    return named if rule != "average" and named else [a for a in adapters if a.modules_to_save]


def head_names(adapters: list[LoraAdapter], rule: str) -> list[str] | None:
    """The merged config's ``modules_to_save``: the names in the configs of the adapters
    whose modules :func:`merged_head` took. Taken from the first adapter, a merge whose
    lm_head came from another one listed none, and PEFT then loaded that head into the
    base model's own lm_head, and through a tied one into the input embedding."""
    names = sorted({name for a in _head_sources(adapters, rule) for name in a.config.get("modules_to_save") or ()})
    return names or None


def head_tied(adapters: list[LoraAdapter], rule: str) -> bool:
    """The merged config's ``ensure_weight_tying``: whether the modules :func:`merged_head`
    took hold PEFT's copies of tied ones (``lm_head.weight`` of a saved embedding). Without
    it PEFT loaded that copy into the base model's own lm_head, tied to the input embedding:
    the adapter changed the model even when disabled."""
    return any(a.tied_copies for a in _head_sources(adapters, rule))


def _own_storage(tensor: torch.Tensor, seen: set[int]) -> torch.Tensor:
    """``tensor``, copied if another one already written shares its memory (safetensors
    refuses to save shared tensors)."""
    pointer = tensor.untyped_storage().data_ptr()
    if pointer in seen:
        tensor = tensor.clone()
        pointer = tensor.untyped_storage().data_ptr()
    seen.add(pointer)
    return tensor


def _prepare_out(out: Path, overwrite: bool, inputs: list[Path]) -> Path:
    """Refuse an output that exists (unless ``overwrite``), would replace one of ``inputs``
    (files and folders the merge reads), or cannot be written, before anything is loaded.
    The merge writes a staging folder in ``out.parent`` (created if missing) and renames it
    to ``out``; this checks that both will work, leaving nothing. Returns the folder to
    write: ``out``, or the folder a symlink at ``out`` points to where it is empty or, with
    ``overwrite``, holds a previous merge (``ln -s /bigdisk/merged out``: the link was replaced
    by a folder on the link's own disk, and what reads /bigdisk/merged kept the old merge);
    with ``--overwrite`` over a link to a folder that holds anything else, the link is
    replaced and that folder kept."""
    for path in inputs:
        if overlap(real(path), real(out)):
            raise OutputError(f"{out}: the output would replace or write into {path}, which the merge reads; "
                              "choose another --out")
    with suppress(OSError):  # an unreadable one is refused below
        if out.is_symlink() and out.is_dir() and (
                not any(out.iterdir()) or overwrite and (out / REPORT_NAME).is_file()):
            out = real(out)
    renamed = "the merge writes a new folder beside --out and renames it into place"
    if out.name in ("", ".", "..") or real(out) in (here := real(Path.cwd()), *here.parents):
        raise OutputError(f"{out}: is the current folder or one above it, which cannot be replaced ({renamed}); "
                          "give --out a folder of its own, such as merged")
    if out.is_dir() and os.path.ismount(out):
        raise OutputError(f"{out}: is a mount point, which cannot be renamed over ({renamed}); give a folder "
                          f"inside it, such as {out / 'merged'}")
    try:
        if out.is_symlink() and not out.exists():
            if not overwrite:
                raise OutputExistsError(f"{out}: is a symlink to {os.readlink(out)}, which does not exist (use "
                                        "--overwrite to replace the link)")
        elif out.exists() and (not out.is_dir() or any(out.iterdir())):
            if not overwrite:
                what = "output folder exists and is not empty" if out.is_dir() else "exists and is not a folder"
                raise OutputExistsError(f"{out}: {what} (use --overwrite to replace it)")
            if out.is_dir() and not out.is_symlink() and not (out / REPORT_NAME).is_file():
                raise OutputExistsError(f"{out}: holds no merge (no {REPORT_NAME}: a trained adapter or any other "
                                        "folder), so --overwrite does not replace it: all its files would be deleted; "
                                        "remove it yourself, or choose another --out")
    except OSError as exc:  # e.g. an unreadable folder
        raise OutputError(f"{out}: cannot use as the output folder: {exc.strerror or exc}") from None
    # The nearest ancestor that exists; the folders below it are created by the merge.
    existing = out.parent
    while not (existing.exists() or existing.is_symlink()) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{out}: cannot create the output folder: {existing} is not a folder")
    try:  # a probe, removed at once: permissions, read-only or pseudo file systems (/proc)
        staging_folder(out, beside=existing).rmdir()
    except OSError as exc:
        raise OutputError(f"{out}: cannot create the output folder in {existing} ({renamed}): "
                          f"{exc.strerror or exc}") from None
    return out


def local_inputs(base_model: str | None, adapters: list[AdapterSpec], calibration: CalibrationOptions | None = None,
                 reference: Path | None = None) -> list[Path]:
    """The local files and folders a merge (or a comparison) reads, which its outputs must
    not replace: adapters, calibration files, the base model's folder and the reference adapter."""
    paths = [p for spec in adapters for p in (spec.path, spec.calibration) if p is not None]
    paths += list(calibration.files.values()) if calibration is not None else []
    if base_model and Path(base_model).expanduser().exists():
        paths.append(Path(base_model).expanduser())
    return paths + ([reference] if reference is not None else [])


def _pad_ranks(modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
               ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int]:
    """Every layer's factors at the largest rank of ``modules``, zero-padded (rows of A,
    columns of B: the product is unchanged, exactly), and the bytes the padding adds.

    One rank, ``r = lora_alpha``, is the config every consumer reads alike: llama.cpp's
    converter keeps only ``lora_alpha`` and scales each tensor by alpha over its own rank,
    vLLM checks ``--max-lora-rank`` against ``r``; a ``rank_pattern`` is PEFT's alone."""
    rank = max(A.shape[0] for _, A in modules.values())
    padded, added = {}, 0
    for path, (B, A) in modules.items():
        missing = rank - A.shape[0]
        if missing:
            B = torch.cat([B, B.new_zeros(B.shape[0], missing)], dim=1)
            A = torch.cat([A, A.new_zeros(missing, A.shape[1])])
            added += missing * (B.shape[0] + A.shape[1]) * A.element_size()
        padded[path] = (B, A)
    return padded, added


def _peft_config(request: MergeRequest, adapters: list[LoraAdapter], ranks: dict[str, int], head: dict,
                 fan_in_fan_out: bool) -> dict:
    """A config under which PEFT applies each (B, A) with scaling exactly 1: ``r =
    lora_alpha`` the most common rank, the others in ``rank_pattern = alpha_pattern``,
    whose full-path keys PEFT >= 0.15 matches (older versions need a dot before a key)."""
    from peft import LoraConfig

    from .model_class import merged_auto_mapping

    rank = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {_escape(p): r for p, r in ranks.items() if r != rank}
    first = adapters[0].config
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        rank_pattern=pattern,
        alpha_pattern={k: v for k, v in pattern.items()},
        target_modules=sorted(ranks),
        fan_in_fan_out=fan_in_fan_out,
        lora_dropout=0.0,
        bias="none",
        inference_mode=True,  # a merge to serve, as PEFT's own save of a loaded adapter says (false: trainable)
        task_type=first.get("task_type"),
        modules_to_save=head_names(adapters, request.modules_to_save_rule) if head else None,
        ensure_weight_tying=bool(head) and head_tied(adapters, request.modules_to_save_rule),
        base_model_name_or_path=merged_base(request.base_model, adapters),
        revision=_common(a.config.get("revision") for a in adapters),  # AutoPeftModel loads the base at it
    )
    with tempfile.TemporaryDirectory() as tmp:
        # Without a task_type, AutoPeftModel finds the base model's class here.
        config.save_pretrained(tmp, auto_mapping_dict=merged_auto_mapping([a.config for a in adapters]))
        saved = json.loads((Path(tmp) / "adapter_config.json").read_text())
    # PEFT holds target_modules as a set and writes it in the process's string-hash order;
    # sorted, equal merges write equal bytes (the publishers skip a version equal to the last).
    saved["target_modules"] = sorted(saved["target_modules"])
    return saved


def merged_base(base_model: str, adapters: list[LoraAdapter]) -> str:
    """The base model the merged config names: the Hub id every input names when the merge
    ran on a local folder (a copy of it: the merge checked the shapes), so that a published
    merge names a model its users can fetch; else the merge's own, a folder by its absolute
    path (usable from anywhere on this machine)."""
    location = model_location(base_model)
    named = _common(a.base_model for a in adapters)
    if Path(location).is_absolute() and named and named_base_problem(named) is None:
        return named
    return location


def _fan_in_fan_out(base: BaseModel, paths: Iterable[str]) -> bool:
    """``fan_in_fan_out`` as the merged layers want it: True on GPT-2's Conv1D (weights
    stored (d_in, d_out)), False on Linear. PEFT sets it per layer on loading (and warns
    where the config differs), so one value fits the most layers, whatever the inputs said."""
    conv1d = [linear_kind(base.layer(path)) == "conv1d" for path in paths]
    return 2 * sum(conv1d) > len(conv1d)


def _common(values: Iterable[Any]) -> Any:
    """The value all of ``values`` share, else None."""
    distinct = set(values)
    return distinct.pop() if len(distinct) == 1 else None


def _escape(path: str) -> str:
    return path.replace(".", r"\.")


def evaluation_settings(params: StrategyParams) -> dict[str, Any]:
    """How an evaluation runs the model: as the strategy did, where its parameters say so
    (the built-ins' ``accumulate_dtype`` and ``blockwise``: whole-model passes for a model
    the block executor cannot run); a plugin's parameters of those names with other
    meanings are not read."""
    dtype, blockwise = getattr(params, "accumulate_dtype", None), getattr(params, "blockwise", None)
    return {"accumulate_dtype": dtype if dtype in ACCUMULATE else "float32", "blockwise": blockwise is not False}


def run_strategy(strategy: MergeStrategy, params: StrategyParams, inputs: MergeInputs,
                 progress: Progress) -> MergedAdapter:
    """``strategy``'s merge of ``inputs``, checked as ``merge`` and ``compare`` both take it: a
    plugin's exception is one line naming it (-v shows the traceback), and a result that is
    not LoRA factors of the adapted layers, or inputs the strategy changed, are refused."""
    adapters, calibration = inputs.adapters, inputs.calibration  # the caller's lists, whatever merge() assigns
    given = inputs_given(adapters, calibration)
    try:
        result = strategy.merge(inputs, params, progress)
    except (IterisError, MemoryError):
        check_inputs_kept(strategy.name, given, adapters, calibration)  # what `compare` must know first
        raise
    except (Exception, SystemExit) as exc:  # sys.exit(3) in a plugin ended `merge` with no word
        check_inputs_kept(strategy.name, given, adapters, calibration)
        if says_out_of_memory(str(exc)):  # torch's allocator: the worker reports it as out of memory
            raise
        raise MergeError(f"strategy {strategy.name} failed: {type(exc).__name__}: {exc}") from exc
    check_inputs_kept(strategy.name, given, adapters, calibration)
    if not isinstance(result, MergedAdapter):
        raise MergeError(f"strategy {strategy.name} returned {type(result).__name__}, not a MergedAdapter; "
                         "nothing was written")
    if not isinstance(result.metrics, dict):
        raise MergeError(f"strategy {strategy.name} returned a MergedAdapter whose metrics are a "
                         f"{type(result.metrics).__name__}, not a dict; nothing was written")
    check_result(strategy.name, result.modules, adapters)
    result.metrics = check_metrics(strategy.name, result.metrics, adapters)
    return result


def check_metrics(strategy: str, metrics: dict[str, Any], adapters: list[LoraAdapter]) -> dict[str, Any]:
    """A strategy's metrics as the report writes them: 0-d tensors and numpy scalars (what
    torch's and numpy's reductions return) as Python numbers, anything else that is not JSON
    refused, and the keys the engine reads in their form. These were a traceback at writing
    the report, after the whole merge, or (a ``truncation_error`` not ``{"max": ...}``) ignored."""
    plain = {}
    for key, value in metrics.items():
        try:
            plain[key] = _plain(value)
            json.dumps({key: plain[key]})
        except (TypeError, ValueError, RuntimeError) as exc:  # RecursionError: a cycle
            raise MergeError(f"strategy {strategy} returned metric {key!r}, which is not JSON "
                             f"({type(exc).__name__}: {exc}); nothing was written") from None
    loss, names = plain.get("alignment_loss"), {a.name for a in adapters}
    if loss is not None and not (isinstance(loss, dict) and set(loss) <= names and all(
            isinstance(values, list) and all(v is None or (number(v) and math.isfinite(v)) for v in values)
            for values in loss.values())):
        raise MergeError(f"strategy {strategy} returned metric 'alignment_loss' as {loss!r:.80}; that key is "
                         "reserved for a table {adapter name: [loss, ...]} of finite numbers (None where a loss is "
                         "undefined); nothing was written")
    iterations = plain.get("iterations_run")
    if iterations is not None and not (whole_number(iterations) and 0 <= iterations < 2**31):
        raise MergeError(f"strategy {strategy} returned metric 'iterations_run' as {iterations!r:.80}; that key is "
                         "reserved for the count of iterations run (an int >= 0); nothing was written")
    cap = plain.get("truncation_error")
    if cap is not None and not (isinstance(cap, dict) and number(top := cap.get("max"))
                                and math.isfinite(top) and top >= 0):
        raise MergeError(f"strategy {strategy} returned metric 'truncation_error' as {cap!r:.80}; that key is "
                         "reserved for {\"max\": relative error >= 0, ...} (the report's rank_cap_error); "
                         "nothing was written")
    return plain


def _plain(value: Any) -> Any:
    """``value`` with its 0-d tensors and numpy scalars as Python numbers and tuples as lists."""
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)) and value.ndim == 0:
        return value.item()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def run_merge(request: MergeRequest) -> dict[str, Any]:
    """Merge ``request.adapters`` into ``request.out``; return the report that is also written."""
    started = time.perf_counter()
    progress = partial(tqdm, disable=request.quiet, dynamic_ncols=True)
    if request.should_stop is not None:
        progress = partial(_StoppableBar, should_stop=request.should_stop, disable=request.quiet, dynamic_ncols=True)
    strategy = get_strategy(request.strategy)
    params = parse_params(strategy, request.params or {})
    out = _prepare_out(request.out, request.overwrite,
                       local_inputs(request.base_model, request.adapters, request.calibration, request.reference))
    adapters = load_adapters(request.adapters, request.base_checked, request.base_model)
    check_per_adapter(strategy, params, len(adapters))
    # Strategies that read calibration data are evaluated on the samples they used;
    # data-free ones on the first ``eval_samples`` of each set.
    samples = engine_int(params, "samples_per_task") if strategy.needs_calibration else request.eval_samples
    if request.calibration_sets is not None:
        calibration = list(request.calibration_sets)
    else:
        calibration = calibration_for(adapters, request.adapters, request.calibration, request.base_model,
                                      required=strategy.needs_calibration, samples=samples)
    for adapter, data in zip(adapters, calibration):
        if strategy.needs_calibration and samples is not None and data is not None and len(data.samples) < samples:
            log.info("task %s: %d calibration samples, fewer than the %d asked for", adapter.name,
                     len(data.samples), samples)
    calibration = [c.head(samples) if c is not None else None for c in calibration]
    base, head = base_and_head(adapters, request)
    # A data-free strategy merges an adapter without calibration data: the others are still
    # evaluated (and gated); that one is named in the report's ``not_evaluated``.
    scored = [i for i, c in enumerate(calibration) if c is not None] if request.evaluate else []
    if strategy.needs_calibration or scored:  # before the merge, not after it
        base.require_text()

    log.info("merging %s with %s", counted(len(adapters), "adapter"), strategy.name)
    rss_before = memory.current_rss_mb()
    window = memory.reset_peak()
    memory.reset_device_peak(base.device)
    merge_started = time.perf_counter()
    result = run_strategy(strategy, params, MergeInputs(base, adapters, calibration, request.device, head), progress)
    merge_seconds = time.perf_counter() - merge_started
    merge_peak = memory.window_peak_mb() if window else None
    device_peak = memory.device_peak_mb(base.device)
    # Default: the widest of the inputs' dtypes, whatever their order (bfloat16 and float16 give float32),
    # the saved modules written included (PEFT keeps a bfloat16 model's head in bfloat16, its LoRA in float32).
    output_dtype = DTYPES[request.output_dtype] if request.output_dtype else widest(
        [a.dtype for a in adapters] + [t.dtype for t in head.values() if t.is_floating_point()])

    modules, truncation = _as_written(result.modules, output_dtype)
    ranks = {path: A.shape[0] for path, (_B, A) in modules.items()}
    head = _head_in(head, output_dtype)  # before the evaluation: it scores what is written

    per_task: dict[str, dict[str, Any]] = {}
    reference, reference_note = _load_reference(request.reference, base)
    if scored:
        batch_size = engine_int(params, "batch_size", request.eval_batch_size)
        max_length = engine_int(params, "max_length", request.eval_max_length)
        try:
            per_task = evaluate(base, [adapters[i] for i in scored], [calibration[i] for i in scored], modules, head,
                                batch_size, max_length, progress, reference=reference, **evaluation_settings(params))
        except (IterisError, MemoryError):
            raise
        except Exception as exc:  # the model's own forward refused the inputs: one line, -v shows where
            if says_out_of_memory(str(exc)):
                raise
            raise MergeError(f"evaluating the merge failed: {type(exc).__name__}: {first_line(exc)}"
                             + "; nothing was written (--no-eval skips the evaluation)") from exc
    if per_task:  # else (--no-eval) the solves' losses stay in the metrics, as measured
        history = result.metrics.pop("alignment_loss", {})
        for name, figures in per_task.items():
            figures["alignment_loss"] = [*history.get(name, []), figures["alignment_loss"]]

    report = {
        "strategy": strategy.name,
        "params": params.model_dump(mode="json"),
        # Folders by their absolute paths: the report is read away from the directory the merge ran in
        "base_model": model_location(request.base_model),
        "inputs": [
            {
                "name": a.name,
                "path": spec.origin or str(absolute(a.path)),
                "sha256": a.content_sha256,  # of the weights file
                # alpha, rank and alpha patterns, targets: the config changes a merge as the weights do
                "config_sha256": sha256_file(Path(a.path) / CONFIG_NAME),
                "ranks": sorted({m.rank for m in a.modules.values()}),
                "calibration": None if c is None else {
                    "source": c.source, "samples": len(c.samples), "sha256": c.fingerprint(), "generated": c.generated,
                    # cut at max_length in a pass (None: no pass read them: a data-free merge, --no-eval)
                    "samples_cut": base.samples_cut.get(c.source),
                },
            }
            for a, c, spec in zip(adapters, calibration, request.adapters)
        ],
        "iterations_run": result.metrics.get("iterations_run", 0),
        "merge_seconds": round(merge_seconds, 3),
        "total_seconds": None,
        "peak_memory_mb": round(memory.process_peak_mb(), 1),
        # The strategy's own footprint: RSS when it started and its peak (None off Linux).
        "merge_memory_mb": {"before": _round(rss_before), "peak": _round(merge_peak)},
        # Peak memory allocated on the compute device during the merge (None on the CPU,
        # where merge_memory_mb is the figure).
        "device_memory_mb": {"device": str(base.device), "peak": _round(device_peak)},
        "placement": base.placement.name,
        "dtype": request.dtype,  # the base model's compute dtype
        "output_dtype": str(output_dtype).removeprefix("torch."),
        # The layers' own ranks; unless exact_ranks, each is written zero-padded to the largest.
        "output_rank": {"min": min(ranks.values()), "max": max(ranks.values()), "layers": len(ranks),
                        "padded_layers": 0, "padded_bytes": 0},
        "rank_cap_error": max([*truncation.values(), _strategy_cap_error(result.metrics)], default=0.0),
        "tasks": per_task,
        # Why a task has no figures (and no gate) though the merge was evaluated (--no-eval: none has)
        "not_evaluated": {a.name: "no calibration data" for a, c in zip(adapters, calibration)
                          if c is None and request.evaluate},
        "metrics": result.metrics,
    }
    if request.reference is not None:
        report["reference"] = {"path": str(request.reference), "sha256": reference.content_sha256 if reference else None,
                               "note": reference_note}
    if not request.exact_ranks:  # one rank for every consumer (see _pad_ranks); the report keeps each layer's own
        modules, padded_bytes = _pad_ranks(modules)
        top = max(ranks.values())
        report["output_rank"].update(padded_layers=sum(r < top for r in ranks.values()), padded_bytes=padded_bytes)
        ranks = dict.fromkeys(ranks, top)
    config = _peft_config(request, adapters, ranks, head, _fan_in_fan_out(base, ranks))
    _write_atomically(out, request.overwrite, config, modules, head, report, started)
    return report


def _as_written(factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                dtype: torch.dtype) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, float]]:
    """The strategy's factors as they are written: at most the layer's full rank (the same
    delta, re-factored exactly: that error is returned per layer), in ``dtype`` on the CPU,
    each in its own storage, and refused where the cast or the product overflows."""
    written, truncation = {}, {}
    storages: set[int] = set()
    for path, (B, A) in factors.items():
        d_out, d_in = B.shape[0], A.shape[1]
        if A.shape[0] > min(d_out, d_in):  # the same delta fits in a smaller rank, exactly
            B, A, truncation[path] = refactor(B, A, min(d_out, d_in))
        B, A = (_own_storage(t.to(dtype).cpu(), storages) for t in (B, A))
        if not (torch.isfinite(B).all() and torch.isfinite(A).all()):
            raise MergeError(f"merged weights of {path} overflow {dtype} (NaN/Inf once cast); nothing was written "
                             "(write them in a wider --output-dtype)")
        if _delta_overflows(B, A, dtype):
            raise MergeError(f"the merged delta B @ A of {path} overflows {dtype} (finite factors, an infinite "
                             "product); nothing was written")
        written[path] = (B, A)
    return written, truncation


def _head_in(head: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The merged ``modules_to_save`` in the output dtype, like the factors (PEFT saves a
    bfloat16 model's head in bfloat16); tensors that are not floating point as they are."""
    cast = {}
    for key, tensor in head.items():
        if tensor.is_floating_point():
            wide, tensor = tensor, tensor.to(dtype)
            if not torch.isfinite(tensor).all():
                hint = " (write it in a wider --output-dtype)" if torch.isfinite(wide).all() else ""
                raise MergeError(f"modules_to_save {key} is not finite (NaN/Inf) in {dtype}; nothing was written{hint}")
        cast[key] = tensor
    return cast


def _load_reference(path: Path | None, base: BaseModel) -> tuple[LoraAdapter | None, str | None]:
    """The adapter to compare with, or None and why it cannot be (never fatal: the merge
    itself is fine; only the comparison is lost)."""
    if path is None:
        return None, None
    try:
        reference = load_adapter(path, "reference")
        base.check_adapter(reference)
    except IterisError as exc:
        log.warning("cannot compare with %s: %s", path, exc)
        return None, f"not comparable: {exc}"
    return reference, None


def _strategy_cap_error(metrics: dict[str, Any]) -> float:
    """The relative error of the strategy's own rank cap (``target_rank``), which the
    built-ins report as ``truncation_error.max`` (its form checked by :func:`check_metrics`);
    the writer's re-factoring is exact."""
    cap = metrics.get("truncation_error")
    return 0.0 if cap is None else float(cap["max"])


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _io_error(message: str) -> str:
    """The OS's words in safetensors' "Error while serializing: I/O error: No space left on
    device (os error 28)", else the message."""
    found = re.search(r"I/O error: (.*?) \(os error \d+\)", message)
    return found[1] if found else message


def _write_atomically(out: Path, overwrite: bool, config, modules, head, report, started) -> None:
    """Write the merge beside ``out`` and rename it into place. Something that appeared at
    ``out`` during the merge (a second merge to it, say) is not replaced without ``overwrite``:
    the merge stays where it was written, named in the error. First the partial copies that
    merges to ``out`` killed while writing left beside it are deleted (gigabytes each, hidden,
    one more per kill); never a running merge's (its staging folder is locked while written),
    nor a whole one an error named (it holds merge_report.json, which is written last)."""
    with ExitStack() as held:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            for leftover in remove_abandoned_staging(out, keep=lambda folder: (folder / REPORT_NAME).exists()):
                log.info("removed %s: a partial merge to %s, left by a merge killed while writing it", leftover, out)
            staging = held.enter_context(held_staging_folder(out))
        except OSError as exc:
            raise OutputError(f"{out}: cannot write the merge: {exc.strerror or exc}; nothing was written") from None
        try:
            save_adapter(staging, config, modules, head)
            report["total_seconds"] = round(time.perf_counter() - started, 3)
            (staging / CARD_NAME).write_text(merge_card(config, report), encoding="utf-8")  # the Hub's card
            (staging / REPORT_NAME).write_text(safe_json.dumps(report, indent=2) + "\n", encoding="utf-8")  # last
            as_if_created(staging)
        except BaseException as exc:  # Ctrl-C, and SIGTERM (the CLI's: see cli.merge.sigterm_interrupts), too
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(exc, (OSError, SafetensorError)):  # a full disk, say: one line, as any other output error
                why = getattr(exc, "strerror", None) or _io_error(str(exc))
                raise OutputError(f"{out}: cannot write the merge: {why}; nothing was written") from None
            raise
        if not overwrite and (out.is_symlink() or out.exists()) and not _empty_folder(out):
            raise OutputExistsError(f"{out}: appeared during the merge and is not empty, so it was left as it is; the "
                                    f"merge is in {staging} (move it, or merge again with --overwrite)")
        try:
            replace_folder(staging, out)
        except OSError as exc:  # the merge is kept, and what it was to replace may be out of the way already
            moved = trash_of(out)
            raise OutputError(f"{out}: cannot put the merge in place: {exc.strerror or exc}; the merge is in "
                              f"{staging}" + (f", what was at {out} in {moved}" if moved.exists() else "")) from None


def _empty_folder(path: Path) -> bool:
    try:
        return path.is_dir() and not any(path.iterdir())
    except OSError:  # unreadable: not known to be empty
        return False
