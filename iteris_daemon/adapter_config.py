"""PEFT LoRA adapter files without their tensors: names, the config and its checks,
PEFT's rank/alpha pattern rules. Pure Python, so the daemon validates adapters and
publishes merges without importing torch (:mod:`iteris_daemon.lora` reads the tensors).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import stat
import subprocess
import sys
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Annotated, Any, NamedTuple

import regex
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import safe_json
from .errors import AdapterError
from .paths import open_checked

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
REPORT_NAME = "merge_report.json"  # beside a merged adapter's files
CARD_NAME = "README.md"  # a merged adapter's model card, beside them too
PICKLED_NAMES = ("adapter_model.bin", "pytorch_model.bin")
KEY_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")

# Why a LoRA on the experts of a mixture-of-experts model that transformers 5 fuses (one
# parameter per projection for all of a block's experts) is refused, however it was saved.
FUSED_EXPERTS_REFUSAL = ("LoRA on a mixture-of-experts model's fused expert weights is not supported: train the "
                         "adapter on the attention projections")

# Config features whose weights are not a plain ``B @ A`` delta on a linear layer.
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA adapters (use_dora=true) are not plain low-rank deltas",
    "lora_bias": "adapters with trained LoRA biases (lora_bias=true) are not supported",
    "layer_replication": "layer_replication changes the model's structure",
    "target_parameters": "target_parameters (LoRA on raw parameters, which PEFT writes for the experts transformers 5 "
                         f"fuses, e.g. with target_modules='all-linear'): {FUSED_EXPERTS_REFUSAL}",
    "megatron_config": "Megatron-parallel LoRA layers are not supported",
    "use_qalora": "QA-LoRA adapters are not supported",
    # PEFT's other LoRA variants (``is_lora_variant`` in its LoraConfig), which change the
    # forward pass. aLoRA's weights look exactly like a plain LoRA's: only this flag tells.
    "alora_invocation_tokens": "Activated LoRA adapters (alora_invocation_tokens) act only from their invocation "
                               "tokens on; a merge would apply them to every token",
    "use_bdlora": "block-diagonal LoRA adapters (use_bdlora, a BdLoraConfig) are not plain low-rank deltas",
    "kasa_config": "KaSA adapters (kasa_config) are not plain low-rank deltas",
    "monteclora_config": "MonteCLoRA adapters (monteclora_config) are not plain low-rank deltas",
    "velora_config": "VeLoRA adapters (velora_config) are not supported",
    "arrow_config": "Arrow adapters (arrow_config) route each token to some of their LoRAs; not one delta",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices) are not supported",
}

# The fields among them PEFT makes a config object of: on once given, even as {} (its defaults).
_CONFIG_OBJECTS = ("use_bdlora", "kasa_config", "monteclora_config", "velora_config", "arrow_config")

# init_lora_weights values whose adapters are deltas on a changed base (PEFT writes
# init_lora_weights=true into the config of an adapter converted to a plain LoRA).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")


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
    ensure_weight_tying: Annotated[bool, Field(strict=True)] | None = None


def sha256_file(path: Path) -> str:
    """The file's SHA-256, read in chunks (a merge's weights can be gigabytes)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


MAX_PATTERN_KEY = 256  # characters in a rank_pattern / alpha_pattern key
# Module-path characters, dots escaped or not (merges write ``model\.layers\.0\.q_proj``):
# '.' is the only metacharacter, so such keys cannot make a match backtrack much.
_PLAIN_KEY = re.compile(r"(?:[\w.-]|\\\.)+")
_REGEX_TIMEOUT = 0.5  # seconds one match of another key may take
_REGEX_BUDGET = 2.0  # seconds of CPU all matches of other keys of one pattern may take together
_REGEX_SPENT: dict[int, list] = {}  # id(pattern) -> [pattern, CPU seconds its other keys took]


def _peft_pattern(key: str) -> str:
    """The regular expression PEFT makes of a pattern key (``peft.utils.other.get_pattern_key``)."""
    return rf"(.*\.)?({key})$"


def _pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    r"""PEFT's rank/alpha pattern lookup: the value of the first key ``k`` for which
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
            matched = _compiled(key).match(module)
        else:
            matched = _bounded_match(pattern, key, module)
        if matched:
            return value
    return default


@functools.lru_cache(maxsize=4096)
def _compiled(key: str) -> re.Pattern:
    """A plain key's PEFT pattern, compiled once: a deep model's merge names each of its
    hundreds of layers, more patterns than ``re``'s own cache keeps."""
    return re.compile(_peft_pattern(key))


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


# Seconds of CPU that compiling the regular expressions PEFT builds from one adapter's config
# and matching them against its module names may take together (benign ones take milliseconds).
MODULE_REGEX_BUDGET = 1.0
# Run in a child process: ``re`` (PEFT's engine) cannot be stopped in a thread, and the
# ``regex`` engine, which can, needs no time for what ``re`` backtracks on for hours (``(.*)*x``).
_TIMED_MATCHES = r"""
import json, re, signal, sys

def stop(signum, frame):
    raise TimeoutError

regexes, names, budget = json.load(sys.stdin)
signal.signal(signal.SIGPROF, stop)
signal.setitimer(signal.ITIMER_PROF, budget)
index, problem = 0, None
try:
    for index, (expression, mode) in enumerate(regexes):
        matches = getattr(re.compile(expression), mode)
        for name in names:
            matches(name)
except TimeoutError:
    problem = "slow"
except Exception as exc:
    problem = f"is not a regular expression PEFT can use ({exc})"
signal.setitimer(signal.ITIMER_PROF, 0)
print(json.dumps([index, problem]))
"""


class PeftRegex(NamedTuple):
    """A regular expression PEFT builds from an adapter config and runs with ``re`` against
    the base model's module names when it loads the adapter."""

    field: str  # where the config gives it: "target_modules", "rank_pattern key", ...
    source: str  # the config's own text
    expression: str  # what PEFT compiles
    mode: str  # the ``re.Pattern`` method PEFT calls: "match" or "fullmatch"


def peft_regexes(config: dict[str, Any]) -> list[PeftRegex]:
    """Each regular expression PEFT 0.21 builds from ``config`` (``check_target_module_exists``,
    ``get_pattern_key``, and with ``ensure_weight_tying`` its ``_add_*_to_tie``)."""
    found = [PeftRegex(name, value, value, "fullmatch") for name in ("target_modules", "exclude_modules")
             if isinstance(value := config.get(name), str)]
    for name in ("rank_pattern", "alpha_pattern"):
        found += [PeftRegex(f"{name} key", key, _peft_pattern(key), "match") for key in config.get(name) or {}]
    entries = [("modules_to_save entry", m) for m in config.get("modules_to_save") or ()]
    if config.get("ensure_weight_tying") and isinstance(config.get("target_modules"), list):
        entries += [("target_modules entry", m) for m in config["target_modules"]]
    found += [PeftRegex(name, m, rf"(^|.*\.){m}($|\..*)", "match") for name, m in entries]
    layers = config.get("layers_pattern")
    found += [PeftRegex("layers_pattern", p, rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", "match")
              for p in ([layers] if isinstance(layers, str) else layers if isinstance(layers, list) else [])
              if isinstance(p, str)]
    return found


def module_regex_problem(regexes: Sequence[PeftRegex], names: Collection[str]) -> tuple[PeftRegex, str] | None:
    """The first of ``regexes`` PEFT cannot use, and why, or None: it does not compile, or
    matching them all against ``names`` takes past :data:`MODULE_REGEX_BUDGET` (a regular
    expression that backtracks would hang the merge or generation in PEFT). One child
    process times them all; one from a plain ``source`` is not run."""
    timed = [regex for regex in regexes if not _PLAIN_KEY.fullmatch(regex.source)]  # nothing to backtrack on
    if not timed:
        return None
    slow = f"takes over {MODULE_REGEX_BUDGET:g} s to match the adapter's module names (a regular expression that backtracks)"
    try:
        done = subprocess.run([sys.executable, "-I", "-S", "-c", _TIMED_MATCHES], capture_output=True, text=True,
                              input=json.dumps([[(r.expression, r.mode) for r in timed], sorted(names),
                                                MODULE_REGEX_BUDGET]), check=True,
                              timeout=MODULE_REGEX_BUDGET + 30)  # the child's own timer stops it; this, a stuck start
    except subprocess.TimeoutExpired:
        return timed[0], slow
    index, problem = json.loads(done.stdout)
    return None if problem is None else (timed[index], slow if problem == "slow" else problem)


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
        handle, info = open_checked(config_path, follow=True)  # a FIFO swapped in since is_file: not waited on
        with handle:
            if not stat.S_ISREG(info.st_mode):
                raise AdapterError(config_path, "is not a regular file")
            raw = handle.read(max_bytes + 1)
        if len(raw) > max_bytes:
            size = max(info.st_size, len(raw))
            raise AdapterError(config_path, f"file is {size} bytes, above the limit of {max_bytes}")
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
        if config.get(flag) is not None if flag in _CONFIG_OBJECTS else config.get(flag):
            raise AdapterError(config_path, reason)
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise AdapterError(config_path, f"init_lora_weights={init!r}: this initialisation subtracts its initial factors "
                                        "from the base weights, so the adapter is a delta on a changed base model; "
                                        "save it converted to a plain LoRA (PEFT's save_pretrained with "
                                        "path_initial_model_for_weight_conversion; LoftQ cannot be converted)")
    return config


def saved_whole(key: str, config: dict[str, Any]) -> bool:
    """Whether tensor ``key`` lies under a module listed in ``modules_to_save`` (PEFT
    matches each name against the end of a module path: ``pooler`` is ``bert.pooler``)."""
    path = key.removeprefix(KEY_PREFIX)
    return any(f".{name}." in f".{path}" for name in config.get("modules_to_save") or ())


class AdapterConfigView:
    """What both views of an adapter (its tensors, :class:`iteris_daemon.lora.LoraAdapter`;
    its layout, :class:`iteris_daemon.validation.AdapterLayout`) read from its ``config``."""

    config: dict[str, Any]
    modules_to_save: dict[str, Any]

    @property
    def tied_copies(self) -> list[str]:
        """The saved tensors no ``modules_to_save`` entry names: the copies PEFT's
        ``ensure_weight_tying`` saves of tied ones (``lm_head.weight`` of a saved embedding),
        equal to them (:func:`iteris_daemon.validation.read_checked` refuses any other)."""
        return [key for key in self.modules_to_save if not saved_whole(key, self.config)]

    @property
    def task_type(self) -> str | None:
        return self.config.get("task_type")

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))
