"""Hostile adapter files against the validator, with a fixed fuzzing budget: every
input ends in a clean AdapterInfo or an AdapterError naming the file, never another
exception and never a pickle load."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builders import build_adapter, build_tiny_model
from iteris_daemon.errors import AdapterError
from iteris_daemon.validation import Limits, check_safetensors_header, validate_adapter

BUDGET = settings(max_examples=150, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
LIMITS = Limits(max_weights_bytes=1 << 20, max_header_bytes=1 << 16, max_tensors=64, max_rank=64)

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


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    base = build_tiny_model("bert", root / "base")
    return base, build_adapter(base, root / "lora", seed=0, family="bert")


@BUDGET
@given(header=st.dictionaries(st.text(max_size=20), entries | json_values, max_size=6),
       padding=st.integers(0, 4000), lie=st.integers(-64, 64))
def test_lying_safetensors_headers_are_rejected_cleanly(tmp_path, header, padding, lie):
    raw = json.dumps(header, allow_nan=True).encode()
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(struct.pack("<Q", max(0, len(raw) + lie)) + raw + b"\0" * padding)
    try:
        check_safetensors_header(path, LIMITS)
    except AdapterError as exc:
        assert str(path) in str(exc)


@BUDGET
@given(changes=st.dictionaries(
    st.sampled_from(["r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "peft_type",
                     "use_rslora", "fan_in_fan_out", "modules_to_save", "task_type", "base_model_name_or_path",
                     "use_dora", "layer_replication"]),
    json_values, min_size=1, max_size=4))
def test_hostile_configs_are_rejected_cleanly(adapter, tmp_path, changes):
    base, lora = adapter
    folder = tmp_path / "a"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(lora, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config, allow_nan=True))
    try:
        validate_adapter(folder, str(base), LIMITS)
    except AdapterError as exc:
        assert str(folder) in str(exc)


@BUDGET
@given(cut=st.integers(0, 4000), flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=6))
def test_corrupted_weights_are_rejected_cleanly(adapter, tmp_path, cut, flips):
    base, lora = adapter
    folder = tmp_path / "a"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(lora, folder)
    weights = folder / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    for position, value in flips:
        data[position % len(data)] = value
    weights.write_bytes(bytes(data[:max(0, len(data) - cut)]))
    try:
        validate_adapter(folder, str(base), LIMITS)
    except AdapterError as exc:
        assert str(folder) in str(exc)


@pytest.mark.parametrize("changes,word", [
    ({"task_type": "BOGUS"}, "task_type"),
    ({"r": 0}, "r must be a positive number"),
    ({"r": 10**9}, "above the limit"),
    ({"lora_alpha": -1}, "lora_alpha must be a positive number"),
    ({"lora_alpha": float("inf")}, "lora_alpha must be a positive number"),
    ({"target_modules": ["nonexistent"]}, "target_modules"),
    ({"target_modules": 5}, "target_modules"),
    ({"rank_pattern": {"query": -2}}, "rank_pattern"),
    ({"use_dora": True}, "DoRA"),
])
def test_absurd_config_values_have_clear_reasons(adapter, tmp_path, changes, word):
    base, lora = adapter
    folder = tmp_path / "a"
    shutil.copytree(lora, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=word):
        validate_adapter(folder, str(base), LIMITS)
