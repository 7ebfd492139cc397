"""Hostile adapter files against the validator, with a fixed fuzzing budget.

Every generated case ends in one of two ways, and the test asserts which:

- **rejected**: an ``AdapterError`` whose path names the file (or the folder) and whose
  reason is not empty; for a config, the reason names a field of the config or the
  file. Any other exception fails the test.
- **accepted**, only in the harmless ways each test documents and checks (e.g. a
  safetensors header that describes the file's bytes exactly, as safetensors' own
  parser reads them; a config whose changed fields PEFT reads the same way).

The budget is ``ITERIS_FUZZ_EXAMPLES`` cases per class (150 by default, the CI run;
``ITERIS_FUZZ_EXAMPLES=1000`` for the long run in RELIABILITY.md), derandomized, so a
run is repeatable. Each class prints its counts (``pytest -s -n 0`` shows them: in parallel workers the output is not shown).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import struct
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest
import safetensors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft.utils.other import get_pattern_key

from builders import build_adapter, build_tiny_model
from iteris_daemon.errors import AdapterError
from iteris_daemon.validation import Limits, check_safetensors_header, validate_adapter

EXAMPLES = int(os.environ.get("ITERIS_FUZZ_EXAMPLES", "150"))
BUDGET = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
LIMITS = Limits(max_weights_bytes=1 << 20, max_header_bytes=1 << 16, max_tensors=64, max_rank=64)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "calibration.jsonl")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
entries = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOGUS", 7]),
    "shape": st.lists(st.integers(-3, 300), max_size=3) | json_values,
    "data_offsets": st.lists(st.integers(-5, 5000), min_size=0, max_size=3) | json_values,
})


WIDTHS = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U8": 1, "F64": 8, "BOOL": 1}


@st.composite
def near_valid_files(draw) -> tuple[dict, int, int]:
    """A header describing its data exactly, then (mostly) one lie: an offset moved, a
    dtype or a shape changed, a tensor dropped or duplicated, bytes added or cut."""
    header, position = {}, 0
    for index in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from(sorted(WIDTHS)))
        shape = draw(st.lists(st.integers(0, 6), max_size=3))
        size = WIDTHS[dtype] * math.prod(shape)
        header[f"t{index}"] = {"dtype": dtype, "shape": shape, "data_offsets": [position, position + size]}
        position += size
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.just({"format": "pt"}) | json_values)
    padding, lie = position, 0
    names = [n for n in header if n != "__metadata__"]
    match draw(st.sampled_from(["none", "offset", "dtype", "shape", "drop", "duplicate", "bytes", "length"])):
        case "offset" if names:
            entry = header[draw(st.sampled_from(names))]
            entry["data_offsets"][draw(st.integers(0, 1))] += draw(st.integers(-9, 9))
        case "dtype" if names:
            header[draw(st.sampled_from(names))]["dtype"] = draw(st.sampled_from(sorted(WIDTHS) + ["F8", "f32"]))
        case "shape" if names:
            entry = header[draw(st.sampled_from(names))]
            entry["shape"] = draw(st.lists(st.integers(-1, 2**40), max_size=4))
        case "drop" if names:
            del header[draw(st.sampled_from(names))]
        case "duplicate" if names:
            header[f"copy{len(header)}"] = dict(header[draw(st.sampled_from(names))])
        case "bytes":
            padding += draw(st.integers(-8, 8))
        case "length":
            lie = draw(st.integers(-16, 16) | st.sampled_from([2**40, 2**63]))
    return header, max(0, padding), lie


def report(name: str, outcomes: Counter) -> None:
    total = sum(outcomes.values())
    print(f"\nfuzz {name}: {total} cases: " + ", ".join(f"{count} {kind}" for kind, count in outcomes.most_common()))
    assert total >= EXAMPLES, f"{name}: only {total} cases ran, the budget is {EXAMPLES}"


def assert_names_the_file(exc: AdapterError, folder: Path) -> None:
    """The error's path is the folder or one of its adapter files (the pattern-key
    timeouts, raised below the folder's level, name the config file alone)."""
    path = Path(exc.path)
    assert exc.reason.strip(), exc
    assert path == folder or (path.name in ADAPTER_FILES and path.parent in (folder, Path("."))), exc


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    base = build_tiny_model("bert", root / "base")
    return base, build_adapter(base, root / "lora", seed=0, family="bert")


# ----------------------------------------------------------------------- safetensors headers


def test_lying_safetensors_headers_are_rejected_cleanly(tmp_path):
    """Random headers, and exact headers with one lie (an offset, a dtype, a shape, a
    tensor dropped or duplicated, bytes added or cut, the length). Accepted only when
    the header describes the file exactly: safetensors' own parser
    then reads the same tensors (names, dtypes, shapes); and rejected only when
    safetensors refuses it too, or when it is past one of the daemon's limits (tensors,
    header bytes). The check never allocates
    from a size the header claims: its peak allocation stays below 2x the file + 64 KiB."""
    path = tmp_path / "adapter_model.safetensors"
    outcomes: Counter = Counter()

    @BUDGET
    @given(file=st.tuples(st.dictionaries(st.text(max_size=20), entries | json_values, max_size=6),
                          st.integers(0, 4000), st.integers(-64, 64)) | near_valid_files())
    def case(file):
        header, padding, lie = file
        raw = json.dumps(header, allow_nan=True).encode()
        data = struct.pack("<Q", min(2**64 - 1, max(0, len(raw) + lie))) + raw + b"\0" * padding
        path.write_bytes(data)
        tracemalloc.start()
        try:
            accepted = check_safetensors_header(path, LIMITS)
        except AdapterError as exc:
            assert exc.path == str(path) and exc.reason.strip(), exc
            try:  # safetensors refuses it too, unless it is past one of the daemon's own limits
                safetensors.deserialize(data)
            except Exception:
                outcomes["rejected (safetensors refuses it too)"] += 1
            else:
                assert re.search(r"above the limit|claims \d+ bytes", exc.reason), (exc.reason, header, padding, lie)
                outcomes["rejected: past a limit of [daemon.limits]"] += 1
            return
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert peak < 2 * len(data) + (64 << 10), f"{peak} bytes allocated for a {len(data)}-byte file"
        theirs = {name: (spec["dtype"], list(spec["shape"])) for name, spec in safetensors.deserialize(data)}
        ours = {name: (entry["dtype"], list(entry["shape"])) for name, entry in accepted.items()}
        assert ours == theirs, (header, padding, lie)
        outcomes["accepted: exact description (safetensors reads the same tensors)"] += 1

    case()
    report("headers", outcomes)


# ----------------------------------------------------------------------- adapter_config.json

MODULES = ["query", "value", "dense", "key", "nonexistent", "", ".*", "(", "attention.self.query"]
FIELDS = {
    "r": st.sampled_from([4, 4.0, 4.5, 0, -1, 65, True]) | st.integers(-2, 70) | json_values,
    "lora_alpha": st.integers(-2, 10**6) | st.floats(allow_nan=True, allow_infinity=True) | st.just("8") | json_values,
    "target_modules": st.lists(st.sampled_from(MODULES), max_size=4) | st.sampled_from(MODULES) | json_values,
    "rank_pattern": st.dictionaries(st.sampled_from(MODULES), st.sampled_from([4, 2, 0, -1, 4.0, "4", True]),
                                    max_size=3) | json_values,
    "alpha_pattern": st.dictionaries(st.sampled_from(MODULES), st.sampled_from([8, 0.5, 0, -1, "8", math.inf, True]),
                                     max_size=3) | json_values,
    "peft_type": st.sampled_from(["LORA", "lora", "LOHA"]) | json_values,
    "use_rslora": st.booleans() | json_values,
    "fan_in_fan_out": st.booleans() | json_values,
    "modules_to_save": st.lists(st.sampled_from(["classifier", "pooler", ""]), max_size=2) | json_values,
    "task_type": st.sampled_from(["CAUSAL_LM", "SEQ_CLS", "FEATURE_EXTRACTION", "TOKEN_CLS", "BOGUS"]) | json_values,
    "base_model_name_or_path": st.sampled_from(["/etc", "../base", "org/model"]) | json_values,
    "use_dora": st.booleans() | json_values,
    "layer_replication": st.lists(st.lists(st.integers(0, 3), min_size=2, max_size=2), max_size=2) | json_values,
}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf


def _unset(field: str, value) -> bool:
    """PEFT's own default for ``field``, or a value PEFT reads as "off"."""
    if field in ("use_dora", "layer_replication"):
        return not value  # PEFT tests both for truth, as the validator does
    return value is None or value == {} and field.endswith("_pattern") or value == [] and field == "modules_to_save" \
        or value is False and field in ("use_rslora", "fan_in_fan_out")


def _harmless(field: str, value, config: dict, modules: list[str]) -> str | None:
    """Why accepting ``field = value`` is harmless, or None: the reasons the docstring of
    ``test_hostile_configs_are_rejected_cleanly`` lists."""
    if _unset(field, value):
        return "PEFT's default"
    if field == "r" and type(value) is int:
        return "r as the weights' rank"  # checked for every module below, as PEFT resolves it
    if field == "rank_pattern" and all(type(v) is int for v in value.values()):
        return "ranks as the weights' ranks"
    if field == "lora_alpha" and _number(value):
        return "a scaling factor"
    if field == "alpha_pattern" and all(_number(v) for v in value.values()):
        return "scaling factors"
    if field == "use_rslora" and value is True:
        return "a scaling switch"
    if field == "fan_in_fan_out" and value is True:
        return "a layout flag PEFT sets per layer on loading"
    if field == "target_modules" and isinstance(value, list) and all(
            any(m == t or m.endswith("." + t) for t in value) for m in modules):
        return "names every adapted module"
    if field == "target_modules" and (isinstance(value, str) or value == []):
        return "a regex or empty: not matched, the weights' own module names are merged"
    if field == "modules_to_save" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "no such tensors in the weights: nothing saved"
    if field == "task_type" and value in ("FEATURE_EXTRACTION", "SEQ_CLS", "TOKEN_CLS", "CAUSAL_LM"):
        return "a task type the base has a class for"
    if field == "base_model_name_or_path" and isinstance(value, str):
        return "ignored: the source names the base model"
    if field == "peft_type" and value == "LORA":
        return "unchanged"
    return None


def test_hostile_configs_are_rejected_cleanly(adapter, tmp_path):
    """1 to 4 fields replaced by hostile or near-valid values. A rejection's reason names
    the file and, when the config is at fault, one of the changed fields. Accepted only
    when every changed field is harmless: PEFT's default for it; ``r``/``rank_pattern``
    integers giving every module the rank its weights have (resolved with PEFT's own
    ``get_pattern_key``); positive finite ``lora_alpha``/``alpha_pattern`` and
    ``use_rslora=true`` (scaling); ``fan_in_fan_out=true`` (PEFT sets it per layer); ``target_modules`` naming every adapted module, or a
    string or an empty list (not matched: the weights' own module names are merged); ``modules_to_save`` naming
    tensors the weights do not have; a task type the base model has a class for;
    ``base_model_name_or_path`` (the source's base model wins). An accepted adapter
    reports the weights' rank (4), its ``lora_alpha`` and the unchanged weights' hash."""
    base, lora = adapter
    original = hashlib.sha256((lora / "adapter_model.safetensors").read_bytes()).hexdigest()
    folder = tmp_path / "a"
    outcomes: Counter = Counter()

    @BUDGET
    @given(changes=st.lists(st.sampled_from(sorted(FIELDS)), min_size=1, max_size=4, unique=True)
           .flatmap(lambda names: st.fixed_dictionaries({n: FIELDS[n] for n in names})))
    def case(changes):
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(lora, folder)
        config = json.loads((folder / "adapter_config.json").read_text())
        config.update(changes)
        (folder / "adapter_config.json").write_text(json.dumps(config, allow_nan=True))
        try:
            info = validate_adapter(folder, str(base), LIMITS)
        except AdapterError as exc:
            assert_names_the_file(exc, folder)
            if Path(exc.path).name == "adapter_config.json":
                named = [f for f in changes if f in exc.reason] or ["target_modules" if "target_modules" in exc.reason
                                                                    else None]
                assert named[0] is not None or "JSON" in exc.reason, (changes, exc.reason)
            outcomes["rejected"] += 1
            return
        from iteris_daemon.lora import load_adapter

        modules = list(load_adapter(folder).modules)
        reasons = {f: _harmless(f, v, config, modules) for f, v in changes.items()}
        assert all(reasons.values()), f"accepted {changes}: not a documented harmless change ({reasons})"
        pattern = config.get("rank_pattern") or {}
        for module in modules:
            key = get_pattern_key(list(pattern), module) if pattern else None
            assert pattern.get(key, config["r"]) == 4, (module, changes)
        assert info.rank == 4 and info.alpha == float(config["lora_alpha"]) and info.content_sha256 == original
        outcomes["accepted (harmless)"] += 1
        why.update(set(reasons.values()))

    why: Counter = Counter()
    case()
    report("configs", outcomes)
    print("  changed fields of the accepted ones: " + "; ".join(f"{n}x {k}" for k, n in why.most_common()))


# ----------------------------------------------------------------------- weights


def _tensor_entries(data: bytes) -> dict | None:
    """The tensor entries (without ``__metadata__``) of a safetensors file, or None."""
    try:
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + length])
        header.pop("__metadata__", None)
        return header
    except Exception:
        return None


def test_corrupted_weights_are_rejected_cleanly(adapter, tmp_path):
    """Truncated by 0-4000 bytes and up to 6 bytes overwritten anywhere. Accepted only
    when the file keeps its length and its tensor entries (names, dtypes, shapes,
    offsets): the bytes changed were tensor data (a different, finite, well-formed
    adapter; its hash is the new bytes') or ``__metadata__`` text / header padding."""
    base, lora = adapter
    original = (lora / "adapter_model.safetensors").read_bytes()
    entries_before = _tensor_entries(original)
    folder = tmp_path / "a"
    outcomes: Counter = Counter()

    @BUDGET
    @given(cut=st.integers(0, 4000) | st.just(0),
           flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=6))
    def case(cut, flips):
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(lora, folder)
        weights = folder / "adapter_model.safetensors"
        data = bytearray(original)
        for position, value in flips:
            data[position % len(data)] = value
        data = bytes(data[:max(0, len(data) - cut)])
        weights.write_bytes(data)
        try:
            info = validate_adapter(folder, str(base), LIMITS)
        except AdapterError as exc:
            assert_names_the_file(exc, folder)
            outcomes["rejected"] += 1
            return
        assert len(data) == len(original) and _tensor_entries(data) == entries_before, (cut, flips)
        assert info.content_sha256 == hashlib.sha256(data).hexdigest()
        (length,) = struct.unpack("<Q", data[:8])
        kind = "tensor data" if data[:8 + length] == original[:8 + length] else "metadata or padding"
        outcomes[f"accepted: {'unchanged' if data == original else kind}"] += 1

    case()
    report("weights", outcomes)


@pytest.mark.parametrize("changes,word", [
    ({"task_type": "BOGUS"}, "task_type"),
    ({"r": 0}, "r must be a positive number"),
    ({"r": 10**9}, "above the limit"),
    ({"r": 4.5}, "r must be a whole number"),
    ({"lora_alpha": -1}, "lora_alpha must be a positive number"),
    ({"lora_alpha": float("inf")}, "lora_alpha must be a positive number"),
    ({"target_modules": ["nonexistent"]}, "target_modules"),
    ({"target_modules": 5}, "target_modules"),
    ({"rank_pattern": {"query": -2}}, "rank_pattern"),
    ({"rank_pattern": {"query": "4"}}, "rank_pattern"),
    ({"alpha_pattern": {"query": "8"}}, "alpha_pattern"),
    ({"use_rslora": "false"}, "use_rslora"),
    ({"use_dora": True}, "DoRA"),
    # what PEFT writes for a mixture-of-experts model's fused experts (all-linear included)
    ({"target_parameters": ["mlp.experts.gate_up_proj"]}, "train the adapter on the attention projections"),
    # PEFT 0.21's other variants: aLoRA's weights are a plain LoRA's, and it merged as one
    ({"alora_invocation_tokens": [2023, 2001]}, "alora_invocation_tokens"),
    ({"use_bdlora": {"nblocks": 2}}, "(use_bdlora, a BdLoraConfig)"),
    # {} is a variant's default config to PEFT (on), though falsy; it merged as a plain LoRA
    ({"use_bdlora": {}}, "use_bdlora"),
    ({"kasa_config": {}}, "kasa_config"),
    ({"monteclora_config": {}}, "monteclora_config"),
    ({"velora_config": {}}, "velora_config"),
    ({"arrow_config": {}}, "arrow_config"),
    ({"kasa_config": {"r": 2}}, "kasa_config"),
    ({"monteclora_config": {"n": 2}}, "monteclora_config"),
    ({"velora_config": {"rank": 2}}, "velora_config"),
    ({"arrow_config": {"top_k": 2}}, "arrow_config"),
    ({"trainable_token_indices": [5, 6]}, "trainable_token_indices"),
    # unconverted PiSSA / OLoRA / CorDA / LoRA-GA / LoftQ: deltas on a base their initialisation changed
    ({"init_lora_weights": "pissa_niter_4"}, "changed base model"),
    ({"init_lora_weights": "olora"}, "changed base model"),
    ({"init_lora_weights": "corda"}, "changed base model"),
    ({"init_lora_weights": "lora_ga"}, "changed base model"),  # PEFT converts LoRA-GA as it does PiSSA
    ({"init_lora_weights": "loftq"}, "changed base model"),
])
def test_absurd_config_values_have_clear_reasons(adapter, tmp_path, changes, word):
    with pytest.raises(AdapterError, match=re.escape(word)):
        _validate_with(adapter, tmp_path, changes)


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal", "mica"])
def test_initialisations_that_leave_the_base_alone_are_accepted(adapter, tmp_path, init):
    """So are the converted ones: PEFT writes init_lora_weights=true when it converts."""
    info = _validate_with(adapter, tmp_path, {"init_lora_weights": init, "bias": "none"})
    assert info.rank > 0


def _validate_with(adapter, tmp_path, changes: dict):
    base, lora = adapter
    folder = tmp_path / "a"
    shutil.copytree(lora, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return validate_adapter(folder, str(base), LIMITS)
