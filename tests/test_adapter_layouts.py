"""Adapters made with and without a PEFT task_type, on every architecture family.

Without a task_type PEFT keys the weights under the class it wrapped
(``base_model.model.transformer.h.0...`` on GPT2LMHeadModel) and names that class in
``auto_mapping``; the merge must load that class, and its output must load in PEFT.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys

import pytest
import torch
import transformers as tf
from peft import AutoPeftModel, PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from builders import apply_by_hand, build_adapter, build_tiny_model, cli_merge, sample_inputs, tiny_config, tokenizer
from iteris_daemon.errors import AdapterError, IncompatibleAdaptersError
from iteris_daemon.model_class import choose_model_class
from iteris_daemon.validation import validate_adapter

# The task type each family's base model is saved under (its config's architectures[0]).
BASE_TASK = {"bert": None, "gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM"}
CASES = [
    ("bert", "FEATURE_EXTRACTION", tf.AutoModel),
    ("bert", None, tf.BertModel),
    ("gpt2", "CAUSAL_LM", tf.AutoModelForCausalLM),
    ("gpt2", None, tf.GPT2LMHeadModel),
    ("llama", "CAUSAL_LM", tf.AutoModelForCausalLM),
    ("llama", None, tf.LlamaForCausalLM),
    ("t5", "SEQ_2_SEQ_LM", tf.AutoModelForSeq2SeqLM),
    ("t5", None, tf.T5ForConditionalGeneration),
]
FAST = ["--param", "iterations=2", "--param", "samples_per_task=6"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Builds on demand, once per module: a base model per family, two adapters per case."""
    root = tmp_path_factory.mktemp("layouts")
    cache: dict = {}

    def get(family: str, task_type: str | None = None, cls=None):
        if family not in cache:
            cache[family] = build_tiny_model(family, root / f"{family}-base", BASE_TASK[family])
        base = cache[family]
        if cls is None:
            return base
        key = (family, task_type, cls.__name__)
        if key not in cache:
            cache[key] = [
                build_adapter(base, root / f"{family}-{task_type}-{cls.__name__}-{seed}", seed=seed, family=family,
                              task_type=task_type, base_class=cls, r=2 + seed, alpha=4, calibration=6)
                for seed in range(2)
            ]
        return base, cache[key]

    return get


def merge(base, adapters, out, *extra) -> int:
    return cli_merge(base, adapters, out, *FAST, *extra)


@pytest.mark.parametrize("family, task_type, cls", CASES, ids=[f"{f}-{t}" for f, t, _ in CASES])
def test_merges_and_loads_in_peft(made, family, task_type, cls, tmp_path):
    base_dir, adapters = made(family, task_type, cls)
    recorded = json.loads((adapters[0] / "adapter_config.json").read_text())
    assert recorded["task_type"] == task_type
    if task_type is None:  # what PEFT writes for adapters made without a task type
        assert recorded["auto_mapping"]["base_model_class"] == cls.__name__
    out = tmp_path / "merged"
    assert merge(base_dir, adapters, out) == 0

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == task_type
    assert config.get("auto_mapping") == recorded.get("auto_mapping")
    if task_type is None:  # auto_mapping is what lets AutoPeftModel pick the class
        assert type(AutoPeftModel.from_pretrained(out).get_base_model()) is cls

    base = cls.from_pretrained(base_dir).eval()
    by_hand = apply_by_hand(copy.deepcopy(base), out).eval()
    inputs = sample_inputs(family, tf.AutoTokenizer.from_pretrained(base_dir))
    with torch.no_grad():
        before = base(**inputs)[0]
    peft_model = PeftModel.from_pretrained(base, out).eval()

    files = load_file(str(out / "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(peft_model)
    assert set(loaded) == set(files)
    assert all(torch.equal(loaded[key], files[key]) for key in files)
    with torch.no_grad():
        got = peft_model(**inputs)[0]
        expected = by_hand(**inputs)[0]
    assert not torch.allclose(got, before, atol=1e-4)  # the merge is not a no-op
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4)


def test_rule_order_without_task_type_or_auto_mapping():
    """No task_type, no auto_mapping: the base model's recorded class if the paths fit, else AutoModel."""
    config = tiny_config("llama")
    config.architectures = ["LlamaForCausalLM"]
    assert choose_model_class({"a": {}}, config, {"model.layers.0.self_attn.q_proj"}) is tf.LlamaForCausalLM
    assert choose_model_class({"a": {}}, config, {"layers.0.self_attn.q_proj"}) is tf.AutoModel
    config.architectures = ["NoSuchModelForCausalLM"]
    assert choose_model_class({"a": {}}, config, {"model.layers.0.self_attn.q_proj"}) is tf.AutoModel
    config.architectures = ["LlamaForCausalLM"]
    assert choose_model_class({"a": {"task_type": "CAUSAL_LM"}}, config) is tf.AutoModelForCausalLM
    with pytest.raises(IncompatibleAdaptersError, match="task_type"):
        choose_model_class({"a": {"task_type": "BOGUS"}}, config)
    with pytest.raises(IncompatibleAdaptersError, match="different task types"):
        choose_model_class({"a": {"task_type": "CAUSAL_LM"}, "b": {}}, config)


def test_a_task_class_building_blocks_the_checkpoint_lacks_gives_way_to_the_recorded_class():
    """FEATURE_EXTRACTION's AutoModel builds a T5Model, decoder included, from a T5EncoderModel's
    config: the load was refused ("its checkpoint gives no usable tensor for decoder.block.0...").
    The recorded class serves where it holds the adapted modules and the task class would build
    blocks it lacks; a head or pooler it lacks does not count (a BertForMaskedLM checkpoint under
    a classifier), nor a class holding more blocks (a T5ForConditionalGeneration checkpoint)."""
    encoder = {"encoder.block.0.layer.0.SelfAttention.q"}
    config = tiny_config("t5")
    config.architectures = ["T5EncoderModel"]
    assert choose_model_class({"a": {"task_type": "FEATURE_EXTRACTION"}}, config, encoder) is tf.T5EncoderModel
    config.architectures = ["T5ForConditionalGeneration"]
    assert choose_model_class({"a": {"task_type": "FEATURE_EXTRACTION"}}, config, encoder) is tf.AutoModel
    config = tiny_config("bert")
    config.architectures = ["BertForMaskedLM"]
    paths = {"bert.encoder.layer.0.attention.self.query"}
    assert choose_model_class({"a": {"task_type": "SEQ_CLS"}}, config, paths) is tf.AutoModelForSequenceClassification


def test_a_feature_extraction_adapter_on_a_t5_encoder_merges_exactly(tmp_path):
    """A T5EncoderModel checkpoint (sentence-T5, a diffusion pipeline's text encoder) with an
    adapter saved with task_type FEATURE_EXTRACTION: one adapter merges to itself, and the
    merge loads in PEFT on the T5EncoderModel."""
    torch.manual_seed(0)
    base = tmp_path / "base"
    tf.T5EncoderModel(tiny_config("t5")).save_pretrained(base)
    tokenizer().save_pretrained(base)
    adapter = build_adapter(base, tmp_path / "a", seed=1, family="t5", task_type="FEATURE_EXTRACTION",
                            base_class=tf.T5EncoderModel, targets=["q", "v"])
    assert cli_merge(base, [adapter], tmp_path / "out", *FAST) == 0
    inputs = {k: v for k, v in sample_inputs("t5", tokenizer()).items() if k != "decoder_input_ids"}
    outputs = []
    for folder in (adapter, tmp_path / "out"):
        model = PeftModel.from_pretrained(tf.T5EncoderModel.from_pretrained(base), folder).eval()
        with torch.no_grad():
            outputs.append(model(**inputs).last_hidden_state)
    assert (outputs[1] - outputs[0]).norm() / outputs[0].norm() < 1e-4  # float32 solves: ~3e-6


def _retarget(src, dst, **auto_mapping):
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config["auto_mapping"] = {**config["auto_mapping"], **auto_mapping}
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


PROBE = "iteris_probe_parent_library"


@pytest.fixture
def probe(tmp_path, monkeypatch):
    """An importable module that must never be imported (an adapter names it)."""
    folder = tmp_path / "probe"
    folder.mkdir()
    (folder / f"{PROBE}.py").write_text("raise SystemExit('an adapter made this run')\n")
    monkeypatch.syspath_prepend(str(folder))
    yield PROBE
    assert PROBE not in sys.modules


def test_unknown_class_is_refused(made, tmp_path, capsys, probe):
    base_dir, adapters = made("llama", None, tf.LlamaForCausalLM)
    bad = _retarget(adapters[1], tmp_path / "bad", base_model_class="EvilModelForCausalLM", parent_library=probe)
    assert merge(base_dir, [adapters[0], bad], tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "auto_mapping.base_model_class" in err and "EvilModelForCausalLM" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("other", ["LlamaModel", "GPT2LMHeadModel"])
def test_conflicting_or_foreign_classes_are_refused(made, tmp_path, capsys, other):
    base_dir, adapters = made("llama", None, tf.LlamaForCausalLM)
    bad = _retarget(adapters[1], tmp_path / "bad", base_model_class=other)
    assert merge(base_dir, [adapters[0], bad], tmp_path / "out") == 2
    err = capsys.readouterr().err
    if other == "LlamaModel":  # two real classes of this base: which one is meant is unknowable
        assert "different model classes" in err and "LlamaForCausalLM" in err and "LlamaModel" in err
        assert adapters[0].name in err and "bad" in err
    else:
        assert "auto_mapping.base_model_class GPT2LMHeadModel is for gpt2 models" in err
    assert not (tmp_path / "out").exists()


def test_validation_accepts_adapters_without_task_type(made, tmp_path, probe):
    base_dir, adapters = made("llama", None, tf.LlamaForCausalLM)
    info = validate_adapter(adapters[0], str(base_dir))
    assert info.task_type is None and info.rank == 2
    # The same base, an adapter made on the bare LlamaModel (paths without "model."):
    # validated right after, it must not reuse the LlamaForCausalLM skeleton.
    _, bare = made("llama", None, tf.LlamaModel)
    assert validate_adapter(bare[0], str(base_dir)).task_type is None
    # parent_library is never imported, whatever it names.
    assert validate_adapter(_retarget(adapters[0], tmp_path / "probe-named", parent_library=probe), str(base_dir))

    wrong = tmp_path / "wrong"
    shutil.copytree(adapters[0], wrong)
    tensors = load_file(str(wrong / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.zeros(2, 16)  # d_in of a 32-wide layer
    save_file(tensors, str(wrong / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="q_proj: LoRA delta is"):
        validate_adapter(wrong, str(base_dir))
