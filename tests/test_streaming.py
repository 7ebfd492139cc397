"""A streamed base model (``--offload disk``) holds what ``from_pretrained`` loads, buffers
and ties included, for checkpoints that differ from what the config suggests; and the
checkpoints neither can read are one line naming the file."""

import json
import logging
import re

import pytest
import torch
import transformers as tf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from builders import build_adapter, build_tied_llama, build_tiny_model, cli_merge, tiny_config, tokenizer
from iteris_daemon.architecture import block_plan
from iteris_daemon.errors import BaseModelError
from iteris_daemon.lora import load_adapter
from iteris_daemon.model import BaseModel
from iteris_daemon.weights import WeightsUnavailable, load_streamed
from test_blockwise import _copy_checkpoint, _sharded


def _save(model, folder, edit=None):
    """``model`` saved with the tiny models' tokenizer; ``edit`` rewrites its tensors."""
    model.save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return _rewrite(folder, edit) if edit is not None else folder


def _rewrite(folder, edit):
    file = folder / "model.safetensors"
    save_file(edit(load_file(file)), file, metadata={"format": "pt"})
    return folder


def _with_buffer(model, name):
    """``model`` with persistent buffer ``name`` random, as a trained checkpoint has it
    (DeepSeek-V3's router bias; the model makes it zeros)."""
    with torch.no_grad():
        model.get_buffer(name).normal_()
    return model


def _deepseek_v3(folder):
    """A buffer inside a block the checkpoint holds (the router's e_score_correction_bias of
    DeepSeek-V3, Kimi-K2, GLM-4.5...): streaming left it zeros."""
    config = tf.DeepseekV3Config(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                 n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                                 first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
                                 qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1, pad_token_id=0,
                                 bos_token_id=101, eos_token_id=102)
    model = _with_buffer(tf.DeepseekV3ForCausalLM(config), "model.layers.1.mlp.gate.e_score_correction_bias")
    return tf.DeepseekV3ForCausalLM, _save(model, folder)


def _bart(folder):
    """A buffer outside the blocks the checkpoint holds (BART's final_logits_bias): the same."""
    model = _with_buffer(tf.BartForConditionalGeneration(tiny_config("bart")), "final_logits_bias")
    return tf.BartForConditionalGeneration, _save(model, folder)


def _head_of_its_own(folder):
    """Config tied, checkpoint not: transformers keeps the stored head ("we will NOT tie them")."""
    edit = lambda t: {**t, "lm_head.weight": torch.randn_like(t["model.embed_tokens.weight"])}  # noqa: E731
    return tf.LlamaForCausalLM, _rewrite(build_tied_llama(folder), edit)


def _head_only(folder):
    """The tied weight stored under the head's name only: transformers ties the embedding to it."""
    edit = lambda t: {("lm_head.weight" if k == "model.embed_tokens.weight" else k): v for k, v in t.items()}  # noqa: E731
    return tf.LlamaForCausalLM, _rewrite(build_tied_llama(folder), edit)


def _t5_without_shared(folder):
    """Encoder and decoder embeddings stored, ``shared.weight`` not: transformers ties it to them."""
    def edit(tensors):
        shared = tensors.pop("shared.weight")
        return {**tensors, "encoder.embed_tokens.weight": shared, "decoder.embed_tokens.weight": shared.clone()}

    return tf.T5ForConditionalGeneration, _save(tf.T5ForConditionalGeneration(tiny_config("t5")), folder, edit)


def _index_leaves_one_out(folder):
    """An index whose weight_map omits a tensor its shard holds: transformers reads every
    tensor of the shards an index names."""
    whole = build_tiny_model("llama", folder.with_name("whole"), "CAUSAL_LM")
    _copy_checkpoint(whole, folder, _sharded(load_file(whole / "model.safetensors")))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return tf.LlamaForCausalLM, folder


def _streamed(cls, folder, dtype):
    """``cls`` streamed from ``folder``, every block loaded."""
    stacks = lambda model: [stack.path for stack in block_plan(model, []).stacks]  # noqa: E731
    model, placement = load_streamed(cls, str(folder), tf.AutoConfig.from_pretrained(folder), dtype,
                                     torch.device("cpu"), stacks)
    for path in stacks(model):
        for i, block in enumerate(model.get_submodule(path)):
            placement.load(block, f"{path}.{i}")
    return model


def _tensors(model) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}


def _ties(model) -> set[tuple[str, str]]:
    """The pairs of parameter names that are one parameter."""
    params = list(model.named_parameters(remove_duplicate=False))
    return {(a, b) for a, p in params for b, q in params if a < b and p is q}


@pytest.mark.parametrize("make, dtype", [
    pytest.param(_deepseek_v3, torch.float32, id="deepseek_v3 router bias"),
    pytest.param(_deepseek_v3, torch.bfloat16, id="deepseek_v3 router bias bf16"),
    pytest.param(_bart, torch.float32, id="bart final_logits_bias"),
    pytest.param(_bart, torch.float16, id="bart final_logits_bias fp16"),
    pytest.param(_head_of_its_own, torch.float32, id="config tied, head stored apart"),
    pytest.param(_head_only, torch.float32, id="tied, stored as lm_head only"),
    pytest.param(_t5_without_shared, torch.float32, id="t5 without shared.weight"),
    pytest.param(_index_leaves_one_out, torch.float32, id="index leaves a stored tensor out"),
])
def test_a_streamed_model_holds_what_from_pretrained_loads(tmp_path, make, dtype):
    """Every parameter and buffer of a streamed model equals ``from_pretrained``'s, and the
    same ones are tied, for checkpoints that are not what their config suggests (each
    case's builder says how; all found in QA: the merges differed between placements, or
    the model loaded whole though it can stream)."""
    cls, folder = make(tmp_path / "base")
    streamed = _streamed(cls, folder, dtype)
    whole = cls.from_pretrained(folder, dtype=dtype)
    expected, got = _tensors(whole), _tensors(streamed)
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    assert _ties(streamed) == _ties(whole)


@pytest.mark.parametrize("offload", ["disk", "none"])
def test_a_truncated_checkpoint_is_one_line_naming_it(tmp_path, offload):
    """A model.safetensors cut short (an interrupted copy) was a SafetensorError traceback."""
    base_dir = build_tiny_model("llama", tmp_path / "cut", "CAUSAL_LM")
    file = base_dir / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    with pytest.raises(BaseModelError) as refused:
        BaseModel(str(base_dir), [], offload=offload)
    assert str(refused.value).startswith(f"base model checkpoint file {file} cannot be read: ")
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("offload", ["disk", "none"])
@pytest.mark.parametrize("case", ["no weight_map", "null shard name", "not JSON"])
def test_a_malformed_index_is_one_line_naming_it(tmp_path, case, offload):
    """An index without a weight_map, or naming no shard for a tensor, was a KeyError or
    TypeError traceback (streamed first, then still loaded whole: transformers' own)."""
    whole = build_tiny_model("llama", tmp_path / "whole", "CAUSAL_LM")
    folder = _copy_checkpoint(whole, tmp_path / "sharded", _sharded(load_file(whole / "model.safetensors")))
    index = folder / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    if case == "no weight_map":
        del content["weight_map"]
    elif case == "null shard name":
        content["weight_map"][next(iter(content["weight_map"]))] = None
    index.write_text(json.dumps(content) if case != "not JSON" else "{")
    with pytest.raises(BaseModelError) as refused:
        BaseModel(str(folder), [], offload=offload)
    assert str(refused.value) == (f'base model checkpoint index {index} is malformed: it needs a "weight_map" of '
                                  f"tensor names to shard file names")


def test_an_empty_quantization_config_is_judged_as_transformers_judges_it(tmp_path):
    """``"quantization_config": {}`` streamed (an empty dict is falsy) where transformers
    refuses it (no quant_method): every placement refuses it now."""
    base_dir = build_tiny_model("llama", tmp_path / "q", "CAUSAL_LM")
    config = json.loads((base_dir / "config.json").read_text())
    (base_dir / "config.json").write_text(json.dumps({**config, "quantization_config": {}}))
    for offload in ("disk", "none"):
        with pytest.raises(BaseModelError, match="quant_method"):
            BaseModel(str(base_dir), [], offload=offload)



def _classifier_adapters(tmp_path, base_dir, labels=None):
    """Two SEQ_CLS LoRAs of ``base_dir`` (PEFT saves their ``score`` head), trained as
    ``labels``-way classifiers where given (from a copy of the base resized to them)."""
    start = base_dir
    if labels is not None:
        start = tmp_path / f"start-{labels}"
        tf.AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=labels,
                                                             ignore_mismatched_sizes=True).save_pretrained(start)
        tokenizer().save_pretrained(start)
    adapters = [build_adapter(start, tmp_path / f"cls{seed}", seed=seed, family="llama", task_type="SEQ_CLS",
                              targets=["q_proj", "v_proj"], calibration=4) for seed in range(2)]
    for adapter in adapters:
        config = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base_dir)}))
    return adapters


@pytest.mark.parametrize("case", ["causal LM checkpoint", "other label count"])
def test_a_classifier_whose_head_the_checkpoint_cannot_give_streams(tmp_path, case):
    """A reward model's LoRA on a causal LM's checkpoint (no ``score`` in it), or a head of
    other labels than the checkpoint's: streaming refused the missing or resized head and
    the model loaded whole, in CPU memory (a 70B merge needed the whole model in RAM). The
    head, which the adapters' saved modules replace, is initialised as from_pretrained
    initialises it: the merge streams, and equals the whole load's."""
    if case == "causal LM checkpoint":
        base_dir = build_tiny_model("llama", tmp_path / "base", "CAUSAL_LM")  # lm_head stored, no score
        adapters = _classifier_adapters(tmp_path, base_dir)
    else:
        base_dir = build_tiny_model("llama", tmp_path / "base", "SEQ_CLS")  # a 2-label score stored
        adapters = _classifier_adapters(tmp_path, base_dir, labels=3)
    with safe_open(base_dir / "model.safetensors", framework="pt") as handle:
        assert case == "other label count" or "score.weight" not in handle.keys()
    loaded = [load_adapter(a) for a in adapters]
    for offload in ("disk", "none"):
        base = BaseModel(str(base_dir), loaded, offload=offload)
        assert base.placement.name == {"disk": "disk", "none": "resident"}[offload]
        assert base.initialised == {"score.weight"}  # the evaluation reads the base out through the merge's head
        head = base.model.get_parameter("score.weight")  # drawn as from_pretrained draws it, not left empty
        assert head.shape[0] == len(base.model.config.id2label) and 0.01 < float(head.std()) < 0.03
    reports, merged = {}, {}
    for offload in ("disk", "none"):
        out = tmp_path / offload
        assert cli_merge(base_dir, adapters, out, "--offload", offload, "--modules-to-save-rule", "average",
                         "--param", "iterations=2", "--param", "accumulate_dtype=float64") == 0
        reports[offload] = json.loads((out / "merge_report.json").read_text())
        merged[offload] = load_file(out / "adapter_model.safetensors")
    assert (reports["disk"]["placement"], reports["none"]["placement"]) == ("disk", "resident")
    assert merged["disk"].keys() == merged["none"].keys()
    assert merged["none"]["base_model.model.score.weight"].shape[0] == (2 if case == "causal LM checkpoint" else 3)
    for name, whole in merged["none"].items():
        torch.testing.assert_close(merged["disk"][name], whole, rtol=1e-6, atol=1e-8, msg=name)
    for name, task in reports["none"]["tasks"].items():  # the base reads out through the merged head in both
        assert reports["disk"]["tasks"][name]["fidelity_gap"] == pytest.approx(task["fidelity_gap"], rel=1e-5)


@pytest.mark.parametrize("key, change", [
    ("model.norm.weight", "missing"),
    ("model.layers.1.mlp.up_proj.weight", "missing"),
    ("model.embed_tokens.weight", "resized"),
])
def test_only_the_replaced_head_may_be_missing_or_resized(tmp_path, key, change):
    """Beside the head the adapters replace, a tensor the checkpoint lacks or holds in another
    shape (under a classifier's num_labels) still does not stream: the whole load judges it
    (a block weight is then one line, see test_blockwise)."""
    base_dir = build_tiny_model("llama", tmp_path / "base", "CAUSAL_LM")
    tensors = load_file(base_dir / "model.safetensors")
    if change == "missing":
        del tensors[key]
    else:
        tensors[key] = tensors[key][:, :16].contiguous()
    save_file(tensors, base_dir / "model.safetensors", metadata={"format": "pt"})
    config = tf.AutoConfig.from_pretrained(base_dir, num_labels=2)
    stacks = lambda model: [stack.path for stack in block_plan(model, []).stacks]  # noqa: E731
    with pytest.raises(WeightsUnavailable, match=re.escape(key)):
        load_streamed(tf.LlamaForSequenceClassification, str(base_dir), config, torch.float32, torch.device("cpu"),
                      stacks, ignore_mismatched=True, replaced=["score.weight"])


@pytest.mark.parametrize("offload", ["disk", "none"])
def test_a_resized_tensor_beside_the_replaced_head_is_refused(tmp_path, offload):
    """Under a classifier's num_labels transformers is told to ignore sizes: an embedding the
    checkpoint holds in another shape was drawn at random by the whole load (streaming
    refuses it, then loads whole) and the merge exited 0 on it. Only the head the adapters
    replace may be of another shape."""
    base_dir = build_tiny_model("llama", tmp_path / "base", "SEQ_CLS")  # a 2-label score stored
    adapters = [load_adapter(a) for a in _classifier_adapters(tmp_path, base_dir, labels=3)]
    key = "model.embed_tokens.weight"
    _rewrite(base_dir, lambda tensors: {**tensors, key: tensors[key][:, :16].contiguous()})
    with pytest.raises(BaseModelError, match=f"gives no usable tensor for {re.escape(key)} "):
        BaseModel(str(base_dir), adapters, offload=offload)


@pytest.mark.parametrize("offload", ["disk", "none"])
def test_a_missing_tensor_outside_the_blocks_is_refused_or_named(tmp_path, offload, caplog):
    """A checkpoint without its input embeddings, or its final norm, loaded whole (streaming
    refuses it) with those tensors initialised, and the merge exited 0 without a word. The
    input embeddings are refused; any other is named in a warning (a classifier's pooler,
    which MLM checkpoints lack, is read as it was drawn)."""
    base_dir = build_tiny_model("llama", tmp_path / "base", "CAUSAL_LM")
    _rewrite(base_dir, lambda tensors: {k: v for k, v in tensors.items() if k != "model.embed_tokens.weight"})
    with pytest.raises(BaseModelError, match=r"gives no usable tensor for embed_tokens\.weight "):  # LlamaModel's
        BaseModel(str(base_dir), [], offload=offload)
    base_dir = build_tiny_model("llama", tmp_path / "base2", "CAUSAL_LM")
    _rewrite(base_dir, lambda tensors: {k: v for k, v in tensors.items() if k != "model.norm.weight"})
    with caplog.at_level(logging.WARNING, logger="iteris_daemon.model"):
        BaseModel(str(base_dir), [], offload=offload)
    assert "its checkpoint gives no tensor for norm.weight, initialised" in caplog.text


@pytest.mark.parametrize("offload", ["disk", "none"])
def test_missing_position_embeddings_are_refused(tmp_path, offload):
    """Every embedding feeds every block: GPT-2 without ``wpe.weight`` merged, exit 0, under
    a warning only."""
    base_dir = build_tiny_model("gpt2", tmp_path / "base", "CAUSAL_LM")
    _rewrite(base_dir, lambda tensors: {k: v for k, v in tensors.items() if not k.endswith("wpe.weight")})
    with pytest.raises(BaseModelError, match=r"gives no usable tensor for wpe\.weight "):
        BaseModel(str(base_dir), [], offload=offload)


def test_a_model_without_token_embeddings_is_judged_without_a_traceback(tmp_path):
    """A speech model's ``get_input_embeddings`` raises NotImplementedError in transformers 5:
    the whole load's check ended in that traceback instead of the one-line refusal of a model
    that does not read text."""
    folder = tmp_path / "w2v"
    config = tf.Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                               conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4,
                               num_conv_pos_embedding_groups=2)
    tf.Wav2Vec2Model(config).save_pretrained(folder)
    model = BaseModel(str(folder), [], offload="none")  # loads; merges refuse it for its input, see test_more_families
    assert model.initialised == set()


@pytest.mark.parametrize("offload", ["disk", "none"])
@pytest.mark.parametrize("kind", [torch.int64, torch.bool], ids=["int64", "bool"])
@pytest.mark.parametrize("key", ["model.layers.1.self_attn.q_proj.weight", "model.norm.weight"])
def test_an_integer_tensor_for_a_float_weight_is_refused_whatever_the_placement(tmp_path, offload, kind, key):
    """A weight stored as integers or booleans was refused streamed and cast loaded whole
    (from_pretrained casts it: packed values or a mask read as weights, the merge exiting 0):
    one line naming the file and tensor under every placement."""
    base_dir = build_tiny_model("llama", tmp_path / "base", "CAUSAL_LM")
    _rewrite(base_dir, lambda tensors: {**tensors, key: tensors[key].to(kind)})
    with pytest.raises(BaseModelError) as refused:
        BaseModel(str(base_dir), [], offload=offload)
    stored = {torch.int64: "I64", torch.bool: "BOOL"}[kind]
    assert str(refused.value) == (f"base model checkpoint file {base_dir / 'model.safetensors'}: tensor {key} is "
                                  f"{stored} where the model has a torch.float32 parameter")


def test_remote_code_loads_whole_and_an_explicit_disk_says_so(tmp_path, caplog):
    """With trust_remote_code the model was loaded whole, even under an explicit ``--offload
    disk``, without a word: a 70B merge expected to stream took the whole model in memory."""
    base_dir = build_tiny_model("llama", tmp_path / "base", "CAUSAL_LM")
    with caplog.at_level(logging.INFO, logger="iteris_daemon.model"):
        assert BaseModel(str(base_dir), [], offload="disk", trust_remote_code=True).placement.name == "resident"
    record = next(r for r in caplog.records if "cannot stream its blocks" in r.getMessage())
    assert record.levelno == logging.WARNING and "its own code builds it (trust_remote_code)" in record.getMessage()


@pytest.mark.parametrize("refusal", ["no block plan", "a tensor missing", "the tie moved"])
def test_a_refused_stream_s_checks_count_for_the_whole_load(tmp_path, monkeypatch, refusal):
    """A stream refused after check_files' checks (no blocks to run one at a time, a tensor it
    cannot give, transformers' tie moved) sent the whole load to build a second skeleton of
    the model to make them again: seconds and gigabytes on a 70B. One skeleton now, and a
    tensor of the wrong kind is still refused, by the same line, whatever refuses the stream."""
    import iteris_daemon.architecture as architecture
    import iteris_daemon.weights as weights
    from iteris_daemon.architecture import BlockPlan

    base_dir = build_tiny_model("llama", tmp_path / "base", "CAUSAL_LM")
    if refusal == "no block plan":
        monkeypatch.setattr(architecture, "block_plan", lambda *a, **k: BlockPlan(reason="no blocks in this test"))
    elif refusal == "a tensor missing":
        _rewrite(base_dir, lambda tensors: {k: v for k, v in tensors.items() if k != "model.norm.weight"})
    else:
        tie, moved = tf.PreTrainedModel.tie_weights, []

        def moved_once(self, *args, **kwargs):  # the stream's tie; the whole load's ties as it did
            if "recompute_mapping" in kwargs and not moved:
                moved.append(True)
                raise TypeError("tie_weights() got an unexpected keyword argument 'recompute_mapping'")
            return tie(self, *args, **kwargs)

        monkeypatch.setattr(tf.PreTrainedModel, "tie_weights", moved_once)
    skeletons = []
    skeleton = weights._skeleton
    monkeypatch.setattr(weights, "_skeleton", lambda *args: skeletons.append(args) or skeleton(*args))
    assert BaseModel(str(base_dir), [], offload="disk").placement.name == "resident"
    assert len(skeletons) == 1
    key = "model.layers.1.self_attn.q_proj.weight"
    _rewrite(base_dir, lambda tensors: {**tensors, key: tensors[key].to(torch.int64)})
    with pytest.raises(BaseModelError) as refused:
        BaseModel(str(base_dir), [], offload="disk")
    assert str(refused.value) == (f"base model checkpoint file {base_dir / 'model.safetensors'}: tensor {key} is "
                                  f"I64 where the model has a torch.float32 parameter")
