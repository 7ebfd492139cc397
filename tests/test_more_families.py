"""Architectures beyond the four the engine is checked against in depth: each merges
through the CLI, runs block by block or says why not, loads in PEFT, and reports real
fidelity figures. Tiny models built from configs; PEFT adapters with random weights."""

import json
import shutil

import pytest
import torch
import transformers as tf
from peft import PeftModel
from safetensors.torch import load_file

from builders import build_adapter, cli_merge, model_class, tiny_config, tokenizer
from iteris_daemon.evaluation import evaluate
from iteris_daemon.execution import prepare
from iteris_daemon.lora import load_adapter

TOKENS = dict(vocab_size=30522, pad_token_id=0, bos_token_id=101, eos_token_id=102)
DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, max_position_embeddings=128, **TOKENS)
MIXED = {**DECODER, "num_hidden_layers": 3}  # layers of two attention types (sliding window 4, full)
T5GEMMA_STACK = {**MIXED, "head_dim": 16, "sliding_window": 4,
                 "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}

# family: (config, task type, LoRA targets, expected execution)
CASES = {
    # fused qkv and gate/up projections
    "phi3": (lambda: tf.Phi3Config(**DECODER), "CAUSAL_LM", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
             "blocks"),
    # a mixture-of-experts block (LoRA on attention; the experts are fused parameters)
    "mixtral": (lambda: tf.MixtralConfig(**DECODER, num_local_experts=2, num_experts_per_tok=1), "CAUSAL_LM",
                ["q_proj", "k_proj", "v_proj", "o_proj"], "blocks"),
    # sliding-window and full-attention layers alternate (each block is handed its type's mask)
    "gemma2": (lambda: tf.Gemma2Config(**DECODER, head_dim=16, sliding_window=4), "CAUSAL_LM",
               ["q_proj", "v_proj", "down_proj"], "blocks"),
    "opt": (lambda: tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
                                 max_position_embeddings=128, word_embed_proj_dim=32, **TOKENS),
            "CAUSAL_LM", ["q_proj", "v_proj", "fc2"], "blocks"),
    # the checkpoint names its head embed_out: streamed through the model's renaming to lm_head
    "gpt_neox": (lambda: tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, max_position_embeddings=128, **TOKENS),
                 "CAUSAL_LM", ["query_key_value", "dense_4h_to_h"], "blocks"),
    "bart": (lambda: tf.BartConfig(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                                   decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                   max_position_embeddings=128, decoder_start_token_id=0, **TOKENS),
             "SEQ_2_SEQ_LM", ["q_proj", "v_proj", "fc2"], "blocks"),
    "distilbert": (lambda: tf.DistilBertConfig(vocab_size=30522, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                               max_position_embeddings=128),
                   "FEATURE_EXTRACTION", ["q_lin", "v_lin", "lin2"], "blocks"),
    # biases on q/k/v; PEFT's "all-linear" (every linear layer but the output head)
    "qwen2": (lambda: tf.Qwen2Config(**DECODER), "CAUSAL_LM", "all-linear", "blocks"),
    # query/key norms; sliding-window and full layers, each type with its own rotary embeddings
    "gemma3": (lambda: tf.Gemma3TextConfig(**MIXED, head_dim=16, sliding_window=4, sliding_window_pattern=2),
               "CAUSAL_LM", ["q_proj", "v_proj", "down_proj"], "blocks"),
    # fused query/key/value with parallel attention and MLP
    "falcon": (lambda: tf.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, **TOKENS),
               "CAUSAL_LM", ["query_key_value", "dense_4h_to_h"], "blocks"),
    # ALiBi position biases instead of position embeddings
    "bloom": (lambda: tf.BloomConfig(hidden_size=32, n_layer=2, n_head=2, **TOKENS), "CAUSAL_LM",
              ["query_key_value", "dense_4h_to_h"], "blocks"),
    # multi-query attention
    "gpt_bigcode": (lambda: tf.GPTBigCodeConfig(n_embd=32, n_layer=2, n_head=2, n_positions=128, **TOKENS),
                    "CAUSAL_LM", ["c_attn", "c_proj"], "blocks"),
    # a mixture of experts with a shared expert
    "qwen2_moe": (lambda: tf.Qwen2MoeConfig(**DECODER, num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32,
                                            shared_expert_intermediate_size=32),
                  "CAUSAL_LM", ["q_proj", "v_proj"], "blocks"),
    # disentangled (relative-position) attention
    "deberta_v2": (lambda: tf.DebertaV2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                              intermediate_size=64, max_position_embeddings=128, vocab_size=30522,
                                              pad_token_id=0),
                   "FEATURE_EXTRACTION", ["query_proj", "value_proj"], "blocks"),
    # sliding-window attention on every layer, narrower than the calibration samples
    "mistral": (lambda: tf.MistralConfig(**DECODER, sliding_window=4), "CAUSAL_LM", ["q_proj", "v_proj", "down_proj"],
                "blocks"),
    # query/key norms per head
    "qwen3": (lambda: tf.Qwen3Config(**DECODER, head_dim=16), "CAUSAL_LM", ["q_proj", "v_proj", "down_proj"],
              "blocks"),
    "gemma": (lambda: tf.GemmaConfig(**DECODER, head_dim=16), "CAUSAL_LM", ["q_proj", "v_proj", "down_proj"],
              "blocks"),
    # partial rotary embeddings, a dense (not gated) MLP
    "phi": (lambda: tf.PhiConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 max_position_embeddings=128, **TOKENS), "CAUSAL_LM", ["q_proj", "v_proj", "fc2"],
            "blocks"),
    "stablelm": (lambda: tf.StableLmConfig(**DECODER), "CAUSAL_LM", ["q_proj", "v_proj", "down_proj"], "blocks"),
    # norms after attention and MLP instead of before
    "olmo2": (lambda: tf.Olmo2Config(**DECODER), "CAUSAL_LM", ["q_proj", "v_proj", "down_proj"], "blocks"),
    # embedding, residual and attention multipliers
    "granite": (lambda: tf.GraniteConfig(**DECODER), "CAUSAL_LM", ["q_proj", "v_proj", "down_proj"], "blocks"),
    # parallel attention and MLP from one layer norm
    "cohere": (lambda: tf.CohereConfig(**DECODER), "CAUSAL_LM", ["q_proj", "v_proj", "down_proj"], "blocks"),
    "starcoder2": (lambda: tf.Starcoder2Config(**DECODER), "CAUSAL_LM", ["q_proj", "v_proj", "c_proj"], "blocks"),
    "gptj": (lambda: tf.GPTJConfig(n_embd=32, n_layer=2, n_head=2, n_positions=128, rotary_dim=8, **TOKENS),
             "CAUSAL_LM", ["q_proj", "v_proj", "fc_out"], "blocks"),
    # ALiBi with fused query/key/value
    "mpt": (lambda: tf.MptConfig(d_model=32, n_heads=2, n_layers=2, max_seq_len=128, vocab_size=30522), "CAUSAL_LM",
            ["Wqkv", "out_proj"], "blocks"),
    # position ids that start after the padding index
    "roberta": (lambda: tf.RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                         max_position_embeddings=130, vocab_size=30522, pad_token_id=1),
                "FEATURE_EXTRACTION", ["query", "value"], "blocks"),
    # embeddings narrower than the hidden size (a projection between them)
    "electra": (lambda: tf.ElectraConfig(hidden_size=32, embedding_size=16, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, max_position_embeddings=128, vocab_size=30522),
                "FEATURE_EXTRACTION", ["query", "value"], "blocks"),
    # one block shared by every depth: its layers are called once per depth
    "albert": (lambda: tf.AlbertConfig(hidden_size=32, embedding_size=16, num_hidden_layers=3, num_attention_heads=2,
                                       intermediate_size=64, max_position_embeddings=128, vocab_size=30522),
               "FEATURE_EXTRACTION", ["query", "value", "ffn_output"], "whole model"),
    "xlm_roberta": (lambda: tf.XLMRobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                intermediate_size=64, max_position_embeddings=130, vocab_size=30522,
                                                pad_token_id=1), "FEATURE_EXTRACTION", ["query", "value"], "blocks"),
    # experts with query/key norms; saved with output_router_logits (for its training's auxiliary loss),
    # which made every merge's evaluation fail (the loss over no router logits, or taken for the logits)
    "qwen3_moe": (lambda: tf.Qwen3MoeConfig(**DECODER, head_dim=16, num_experts=2, num_experts_per_tok=1,
                                            moe_intermediate_size=32, output_router_logits=True),
                  "CAUSAL_LM", ["q_proj", "v_proj", "o_proj"], "blocks"),
    "olmoe": (lambda: tf.OlmoeConfig(**DECODER, num_experts=2, num_experts_per_tok=1), "CAUSAL_LM",
              ["q_proj", "v_proj"], "blocks"),
    "marian": (lambda: tf.MarianConfig(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                                       decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                       max_position_embeddings=128, decoder_start_token_id=0, vocab_size=30522,
                                       pad_token_id=0), "SEQ_2_SEQ_LM", ["q_proj", "v_proj", "fc2"], "blocks"),
    "glm": (lambda: tf.GlmConfig(**DECODER, head_dim=16), "CAUSAL_LM", ["q_proj", "v_proj", "down_proj"], "blocks"),
    "nemotron": (lambda: tf.NemotronConfig(**DECODER, head_dim=16), "CAUSAL_LM", ["q_proj", "v_proj", "down_proj"],
                 "blocks"),
    # sliding-window layers with rotary embeddings, full ones without
    "cohere2": (lambda: tf.Cohere2Config(**MIXED, sliding_window=4, sliding_window_pattern=2), "CAUSAL_LM",
                ["q_proj", "v_proj", "down_proj"], "blocks"),
    # full attention in the first max_window_layers layers, sliding-window attention above
    "qwen2_swa": (lambda: tf.Qwen2Config(**MIXED, use_sliding_window=True, sliding_window=4, max_window_layers=1),
                  "CAUSAL_LM", ["q_proj", "v_proj", "down_proj"], "blocks"),
    # sliding-window and full layers alternate, attention sinks, experts
    "gpt_oss": (lambda: tf.GptOssConfig(**MIXED, head_dim=16, sliding_window=4, num_local_experts=2,
                                        num_experts_per_tok=1), "CAUSAL_LM", ["q_proj", "v_proj", "o_proj"], "blocks"),
    # local and global attention layers alternate, each with its own rotary embeddings
    "modernbert": (lambda: tf.ModernBertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                               num_attention_heads=2, vocab_size=30522, pad_token_id=0,
                                               global_attn_every_n_layers=2, local_attention=4),
                   "FEATURE_EXTRACTION", ["Wqkv", "Wo"], "blocks"),
    # use_cache reaches the model only through **kwargs: the config turns it off
    "granitemoe": (lambda: tf.GraniteMoeConfig(**DECODER, num_local_experts=2, num_experts_per_tok=1), "CAUSAL_LM",
                   ["q_proj", "v_proj"], "blocks"),
    # an encoder-decoder whose encoder and decoder mix sliding-window and full layers; its
    # forward reads the encoder output handed to it as a BaseModelOutput, not a tuple
    "t5gemma": (lambda: tf.T5GemmaConfig(encoder=T5GEMMA_STACK, decoder=T5GEMMA_STACK, decoder_start_token_id=0,
                                         **TOKENS), "SEQ_2_SEQ_LM", ["q_proj", "v_proj", "down_proj"], "blocks"),
    # local attention in the encoder; the blocks hand their position biases on (CARRIED_OUTPUTS)
    "longt5": (lambda: tf.LongT5Config(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, local_radius=4,
                                       decoder_start_token_id=0, **TOKENS), "SEQ_2_SEQ_LM", ["q", "v", "wo"], "blocks"),
    # a state-space model: no attention at all
    "mamba": (lambda: tf.MambaConfig(hidden_size=32, num_hidden_layers=2, state_size=4, vocab_size=30522,
                                     pad_token_id=0), "CAUSAL_LM", ["in_proj", "x_proj"], "blocks"),
}
# where a block's inputs go beyond the hidden states (position biases, windows, norms):
# running block by block must give the whole model's merge
BLOCKS_EQUAL_WHOLE = ["bloom", "cohere", "cohere2", "deberta_v2", "falcon", "gemma2", "gemma3", "gpt_oss", "granitemoe",
                      "longt5", "mamba", "mistral", "modernbert", "mpt", "qwen2_moe", "qwen2_swa", "qwen3_moe", "roberta",
                      "t5gemma"]


def _base_and_adapters(family: str, tmp_path):
    make_config, task_type, targets, _ = CASES[family]
    base_dir = tmp_path / "base"
    model_class(task_type).from_config(make_config()).save_pretrained(base_dir)
    tokenizer().save_pretrained(base_dir)
    adapters = [build_adapter(base_dir, tmp_path / f"a{seed}", seed=seed, family=family, targets=targets,
                              task_type=task_type, calibration=6) for seed in range(2)]
    return base_dir, adapters


@pytest.mark.parametrize("family", sorted(CASES))
def test_family_merges_and_loads(family, tmp_path):
    _, task_type, _, execution = CASES[family]
    base_dir, adapters = _base_and_adapters(family, tmp_path)

    assert cli_merge(base_dir, adapters, tmp_path / "out", "--param", "iterations=2") == 0
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["metrics"]["execution"] == execution
    assert report["output_rank"]["layers"] == len(load_adapter(adapters[0]).modules)
    for task in report["tasks"].values():
        assert 0 < task["fidelity_gap"] < 1.5  # finite; the task's outputs differ from the base's
    PeftModel.from_pretrained(model_class(task_type).from_pretrained(base_dir), tmp_path / "out")


@pytest.mark.parametrize("family", BLOCKS_EQUAL_WHOLE)
def test_block_by_block_equals_whole_model_passes(family, tmp_path, monkeypatch):
    """``blockwise=false`` (whole-model passes) holds for the merge report's evaluation too: it
    ran block by block in float32 whatever the strategy was told (a model the block executor
    cannot run is why a user says false)."""
    from iteris_daemon import evaluation

    base_dir, adapters = _base_and_adapters(family, tmp_path)
    import iteris_daemon.merge as merge

    evaluated, dtypes = [], []
    monkeypatch.setattr(evaluation, "prepare", lambda *a: evaluated.append(a[3]) or prepare(*a))
    monkeypatch.setattr(merge, "evaluate", lambda *a, **k: dtypes.append(k["accumulate_dtype"]) or evaluate(*a, **k))
    merged, figures = {}, {}
    for blockwise in ("true", "false"):
        out = tmp_path / f"blockwise-{blockwise}"
        assert cli_merge(base_dir, adapters, out, "--param", "iterations=2", "--param", f"blockwise={blockwise}",
                         "--param", "accumulate_dtype=float64") == 0
        report = json.loads((out / "merge_report.json").read_text())
        assert report["metrics"]["execution"] == ("blocks" if blockwise == "true" else "whole model")
        assert evaluated.pop() is (blockwise == "true") and dtypes.pop() == "float64"
        figures[blockwise] = report["tasks"]
        merged[blockwise] = load_file(out / "adapter_model.safetensors")
    for task, whole in figures["false"].items():
        assert figures["true"][task]["fidelity_gap"] == pytest.approx(whole["fidelity_gap"], rel=1e-5)
    assert merged["true"].keys() == merged["false"].keys()
    for name, whole in merged["false"].items():
        torch.testing.assert_close(merged["true"][name].double(), whole.double(), rtol=1e-5, atol=1e-7, msg=name)


# blocks of two attention types, each handed its own type's mask (and rotary embeddings)
MIXED_ATTENTION = ["cohere2", "gemma2", "gemma3", "gpt_oss", "modernbert", "qwen2_swa"]


@pytest.mark.parametrize("family", MIXED_ATTENTION)
def test_mixed_attention_blocks_stream_with_their_own_calls(family, tmp_path, monkeypatch):
    """These models ran whole-model passes with the whole model resident (block 0's call,
    replayed for every block, handed sliding-window blocks the full mask or the reverse).
    Each block's call is captured now: streamed from disk and refined, they merge as
    loaded whole, and replaying block 0's call gives another merge (the test can tell)."""
    from iteris_daemon import execution

    base_dir, adapters = _base_and_adapters(family, tmp_path)

    def merge(name: str, offload: str) -> dict[str, torch.Tensor]:
        out = tmp_path / name
        assert cli_merge(base_dir, adapters, out, "--offload", offload, "--param", "iterations=2", "--param",
                         "accumulate_dtype=float64", "--param", "refine_steps=2") == 0
        report = json.loads((out / "merge_report.json").read_text())
        assert (report["placement"], report["metrics"]["execution"]) == ({"disk": "disk", "none": "resident"}[offload],
                                                                           "blocks")
        assert len(report["metrics"]["refinement"]["blocks"]) == CASES[family][0]().num_hidden_layers
        return load_file(out / "adapter_model.safetensors")

    merged = {offload: merge(offload, offload) for offload in ("disk", "none")}
    assert merged["disk"].keys() == merged["none"].keys()
    for name, whole in merged["none"].items():
        torch.testing.assert_close(merged["disk"][name], whole, rtol=1e-6, atol=1e-8, msg=name)
    monkeypatch.setattr(execution, "_alike", lambda *_: True)  # block 0's call replayed for every block
    replayed = merge("block-0-call", "none")
    assert any(not torch.allclose(replayed[name], whole, rtol=1e-3, atol=1e-5) for name, whole in merged["none"].items())


def test_blocks_of_one_attention_type_share_its_mask(tmp_path):
    """Every block's captured call holds the tensors the model made (one mask and one pair of
    rotary tables per attention type), not copies per block; the blocks' weights stay on disk."""
    from iteris_daemon.calibration import read_jsonl
    from iteris_daemon.model import BaseModel

    base_dir, adapters = _base_and_adapters("gemma3", tmp_path)  # sliding, full, sliding
    base = BaseModel(str(base_dir), [load_adapter(a) for a in adapters], offload="disk")
    _, [[state, *_]] = prepare(base, [], [base.batches(read_jsonl(adapters[0] / "calibration.jsonl"), 6, 64)])
    sliding, full, sliding_again = (state.context.call(0, b).arguments for b in range(3))
    for name in ("attention_mask", "position_embeddings"):
        assert sliding[name] is sliding_again[name] and sliding[name] is not full[name], name
    assert not torch.equal(sliding["attention_mask"], full["attention_mask"])
    assert all(p.device.type == "meta" for p in base.model.model.layers.parameters())


SEQ_CLS_ENCODER_DECODERS = {
    "bart": lambda: tf.BartConfig(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                                  decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                  max_position_embeddings=128, decoder_start_token_id=0, num_labels=3, **TOKENS),
    "t5": lambda: tf.T5Config(vocab_size=30522, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, pad_token_id=0,
                              eos_token_id=102, decoder_start_token_id=0, num_labels=3),
}


@pytest.mark.parametrize("family", sorted(SEQ_CLS_ENCODER_DECODERS))
def test_a_classifier_on_an_encoder_decoder(family, tmp_path):
    """BART's and T5's classification heads read the decoder at the input's positions, the
    decoder fed the inputs shifted right by the model itself. The merge fed it the
    generation-style start token instead, and every merge ended in an IndexError. One
    adapter merged alone is its own (gap ~0), blocks equal whole-model passes, PEFT loads it."""
    base_dir = tmp_path / "base"
    model_class("SEQ_CLS").from_config(SEQ_CLS_ENCODER_DECODERS[family]()).save_pretrained(base_dir)
    tokenizer().save_pretrained(base_dir)
    adapters = [build_adapter(base_dir, tmp_path / f"a{seed}", seed=seed, family=family, targets=["q", "v"]
                              if family == "t5" else ["q_proj", "v_proj"], task_type="SEQ_CLS", calibration=6)
                for seed in range(2)]
    assert cli_merge(base_dir, adapters[:1], tmp_path / "one", "--param", "iterations=2") == 0
    report = json.loads((tmp_path / "one" / "merge_report.json").read_text())
    assert report["tasks"]["a0"]["fidelity_gap"] < 1e-3
    merged = {}
    for blockwise in ("true", "false"):
        out = tmp_path / f"blockwise-{blockwise}"
        assert cli_merge(base_dir, adapters, out, "--param", "iterations=2", "--param", f"blockwise={blockwise}",
                         "--param", "accumulate_dtype=float64", "--modules-to-save-rule", "average") == 0
        report = json.loads((out / "merge_report.json").read_text())
        assert report["metrics"]["execution"] == ("blocks" if blockwise == "true" else "whole model")
        assert all(0 < task["fidelity_gap"] < 1.5 for task in report["tasks"].values())
        merged[blockwise] = load_file(out / "adapter_model.safetensors")
    for name, whole in merged["false"].items():
        torch.testing.assert_close(merged["true"][name].double(), whole.double(), rtol=1e-5, atol=1e-7, msg=name)
    model = PeftModel.from_pretrained(model_class("SEQ_CLS").from_pretrained(base_dir), tmp_path / "blockwise-true")
    batch = tokenizer()(["the market rallied", "a calm river"], return_tensors="pt", padding=True)
    assert model(**batch).logits.shape == (2, 3)


def test_a_module_saved_between_an_encoder_and_its_decoder_runs_whole_model_passes(tmp_path, caplog):
    """T5 adapters saving the encoder's final norm (``modules_to_save``; it runs after the
    encoder's last block, before the decoder's first) merged block by block 0.43 relative off
    whole-model passes, without a word: the norm ran with whichever task's copy was loaded
    last. They now run whole-model passes, saying why, and merge as ``blockwise=false`` does."""
    import logging

    base_dir = tmp_path / "base"
    model_class("SEQ_2_SEQ_LM").from_config(SEQ_CLS_ENCODER_DECODERS["t5"]()).save_pretrained(base_dir)
    tokenizer().save_pretrained(base_dir)
    adapters = [build_adapter(base_dir, tmp_path / f"a{seed}", seed=seed, family="t5", targets=["q", "v"],
                              task_type="SEQ_2_SEQ_LM", modules_to_save=["encoder.final_layer_norm"], calibration=6)
                for seed in range(2)]
    merged = {}
    for blockwise in ("true", "false"):
        out = tmp_path / blockwise
        with caplog.at_level(logging.INFO, logger="iteris_daemon.execution"):
            assert cli_merge(base_dir, adapters, out, "--param", f"blockwise={blockwise}", "--param", "iterations=2",
                             "--param", "accumulate_dtype=float64", "--modules-to-save-rule", "average") == 0
        assert json.loads((out / "merge_report.json").read_text())["metrics"]["execution"] == "whole model"
        merged[blockwise] = load_file(out / "adapter_model.safetensors")
    assert "modules_to_save encoder.final_layer_norm runs between encoder.block and the next stack's blocks" in caplog.text
    for name, whole in merged["false"].items():
        torch.testing.assert_close(merged["true"][name], whole, rtol=1e-6, atol=1e-8, msg=name)


def test_a_bare_t5_model_is_teacher_forced(tmp_path):
    """A T5Model base (no head) with adapters of no task type: T5 makes no decoder inputs
    of its own, so the merge gives it the teacher-forced targets, as for generation (the
    change for classifier heads first sent it none: a ValueError)."""
    from builders import build_tiny_model

    base = build_tiny_model("t5", tmp_path / "base")  # AutoModel: T5Model
    adapters = [build_adapter(base, tmp_path / f"a{seed}", seed=seed, family="t5", calibration=6) for seed in range(2)]
    assert cli_merge(base, adapters, tmp_path / "out", "--param", "iterations=2") == 0
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert all(0 < task["fidelity_gap"] < 1.5 for task in report["tasks"].values())


def test_a_speech_model_is_refused_before_the_merge_and_merges_data_free(tmp_path, capsys):
    """Whisper's encoder reads audio features, and calibration samples are text: IterIS
    failed as "strategy iteris failed: AttributeError: 'NoneType' object has no attribute
    'shape'" (blaming the strategy), and a data-free merge with its evaluation died after
    the merge in a transformers traceback. Now one line before the merge; data-free
    without the evaluation it merges (the sum of the deltas, exactly)."""
    config = tf.WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=2,
                              encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                              decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16, max_target_positions=64,
                              **TOKENS, decoder_start_token_id=101)
    base_dir = tmp_path / "whisper"
    tf.WhisperForConditionalGeneration(config).save_pretrained(base_dir)
    tokenizer().save_pretrained(base_dir)
    adapters = [build_adapter(base_dir, tmp_path / f"a{seed}", seed=seed, family="whisper", targets=["q_proj", "v_proj"],
                              base_class=tf.WhisperForConditionalGeneration, calibration=4) for seed in range(2)]
    for extra in ([], ["--strategy", "task_arithmetic"]):
        assert cli_merge(base_dir, adapters, tmp_path / "out", *extra) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"base model '{base_dir}' reads input_features (WhisperForConditionalGeneration), not text" in last
        assert not (tmp_path / "out").exists()
    assert cli_merge(base_dir, adapters, tmp_path / "out", "--strategy", "task_arithmetic", "--no-eval") == 0
    merged, inputs = load_adapter(tmp_path / "out"), [load_adapter(a) for a in adapters]
    for path, module in merged.modules.items():
        expected = sum(a.modules[path].delta() for a in inputs)
        torch.testing.assert_close(module.delta(), expected, rtol=1e-5, atol=1e-7)


TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
DUAL_ENCODERS = {
    "clip": lambda: tf.CLIPConfig(text_config={**TOWER, **TOKENS, "max_position_embeddings": 130},
                                  vision_config={**TOWER, "image_size": 32, "patch_size": 8}, projection_dim=16),
    "siglip": lambda: tf.SiglipConfig(text_config={**TOWER, **TOKENS, "max_position_embeddings": 130},
                                      vision_config={**TOWER, "image_size": 32, "patch_size": 8}),
}


@pytest.mark.parametrize("family", sorted(DUAL_ENCODERS))
def test_a_dual_encoder_is_refused_before_the_merge_and_merges_data_free(family, tmp_path, capsys):
    """CLIPModel and SiglipModel read text (their main input is input_ids, the tokenizer is
    there) and an image together: every merge that ran a pass (IterIS, RegMean, a data-free
    strategy's evaluation) died in transformers as "AttributeError: 'NoneType' object has no
    attribute 'shape'", and compare printed that error for every strategy. Now the one line
    a vision or speech model gets, before the merge; data-free without the evaluation it
    merges (the sum of the deltas)."""
    from iteris_daemon.cli import main

    base_class = tf.AutoModel.from_config(DUAL_ENCODERS[family]()).__class__
    base_dir = tmp_path / family
    torch.manual_seed(0)
    base_class(DUAL_ENCODERS[family]()).save_pretrained(base_dir)
    tokenizer().save_pretrained(base_dir)
    adapters = [build_adapter(base_dir, tmp_path / f"a{seed}", seed=seed, family=family, targets=["q_proj", "v_proj"],
                              base_class=base_class, calibration=4) for seed in range(2)]
    refusal = (f"base model '{base_dir}' reads pixel_values with its text ({base_class.__name__}), not text alone, "
               "and calibration samples are text: merge its adapters with a data-free strategy and --no-eval")
    compare = ["compare", "--base-model", str(base_dir), "-q", *(f"--adapter={a}" for a in adapters)]
    for run in (lambda: cli_merge(base_dir, adapters, tmp_path / "out"),
                lambda: cli_merge(base_dir, adapters, tmp_path / "out", "--strategy", "regmean"),
                lambda: cli_merge(base_dir, adapters, tmp_path / "out", "--strategy", "task_arithmetic"),
                lambda: main(compare)):
        assert run() == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].endswith(refusal) and not any("AttributeError" in line for line in err)
        assert not (tmp_path / "out").exists()
    assert cli_merge(base_dir, adapters, tmp_path / "out", "--strategy", "task_arithmetic", "--no-eval") == 0
    merged, inputs = load_adapter(tmp_path / "out"), [load_adapter(a) for a in adapters]
    for path, module in merged.modules.items():
        torch.testing.assert_close(module.delta(), sum(a.modules[path].delta() for a in inputs), rtol=1e-5, atol=1e-7)


def test_a_base_folder_without_its_tokenizer_is_said_whole(tmp_path, capsys):
    """transformers' message for a folder saved with ``model.save_pretrained`` alone ends its
    first line at "from one of:": the error said nothing after it."""
    base_dir = tmp_path / "llama"
    tf.AutoModelForCausalLM.from_config(tiny_config("llama")).save_pretrained(base_dir)  # no tokenizer
    with_tokenizer = tmp_path / "with"
    shutil.copytree(base_dir, with_tokenizer)
    tokenizer().save_pretrained(with_tokenizer)
    adapter = build_adapter(with_tokenizer, tmp_path / "a", seed=0, family="llama", task_type="CAUSAL_LM")
    assert cli_merge(base_dir, [adapter], tmp_path / "out", "--strategy", "task_arithmetic", "--no-eval") == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"cannot load the tokenizer of base model '{base_dir}' (save it beside the weights" in last
    assert not last.rstrip().endswith("from one of:") and len(last) > 200


def test_a_vision_language_models_causal_lm_adapter_merges_on_its_own_class(tmp_path):
    """TRL's recipes save a LoRA on a vision-language model (LLaVA, Qwen2.5-VL, Mistral-3 ...)
    with task_type CAUSAL_LM, and PEFT loads it on the model's own class; the merge asked
    AutoModelForCausalLM, which does not know these models: "Unrecognized configuration
    class". The same weights with task_type None merged."""
    config = tf.LlavaConfig(text_config=tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                       num_attention_heads=2, num_key_value_heads=1,
                                                       max_position_embeddings=128, **TOKENS).to_dict(),
                            vision_config=tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                              num_attention_heads=2, image_size=28,
                                                              patch_size=14).to_dict(), image_token_index=30000)
    base_dir = tmp_path / "llava"
    tf.LlavaForConditionalGeneration(config).save_pretrained(base_dir)
    tokenizer().save_pretrained(base_dir)
    adapters = [build_adapter(base_dir, tmp_path / f"a{seed}", seed=seed, family="llava", task_type="CAUSAL_LM",
                              targets=r".*(language_model|vision_tower).*\.(q_proj|v_proj)", calibration=4,
                              base_class=tf.LlavaForConditionalGeneration) for seed in range(2)]
    assert cli_merge(base_dir, adapters[:1], tmp_path / "alone") == 0
    merged, adapter = load_adapter(tmp_path / "alone"), load_adapter(adapters[0])
    assert merged.modules.keys() == adapter.modules.keys()
    for path, module in adapter.modules.items():  # one adapter merged alone is itself
        error = (merged.modules[path].delta() - module.delta()).norm() / module.delta().norm()
        assert error < 1e-4, (path, float(error))  # float32 Grams
    # The vision tower's layers see no input from text calibration: their loss is undefined, not 0.
    losses = json.loads((tmp_path / "alone" / "merge_report.json").read_text())["tasks"]["a0"]["alignment_loss_by_layer"]
    vision = {path for path in losses if ".vision_tower." in path}
    assert vision and all(losses[path] is None for path in vision)
    assert all(isinstance(loss, float) for path, loss in losses.items() if path not in vision)
    assert cli_merge(base_dir, adapters, tmp_path / "out") == 0
    PeftModel.from_pretrained(tf.LlavaForConditionalGeneration.from_pretrained(base_dir), tmp_path / "out")


WHOLE_WITH_REASON = {  # mixed attention types, and what keeps their blocks from running one at a time
    # "reuse" layers read the keys and values "store" layers wrote into one dict per forward
    "gemma4": (lambda: tf.Gemma4TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                           global_head_dim=16, max_position_embeddings=128, sliding_window=4,
                                           hidden_size_per_layer_input=0, num_kv_shared_layers=2,
                                           layer_types=["sliding_attention", "full_attention"] * 2, **TOKENS),
               ["q_proj", "k_proj", "v_proj"], "share state through (shared_kv_states"),
    # a recurrent-depth model of recurrent layers only: its loop runs every block twice per pass
    "dory": (lambda: tf.DoryConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, head_dim=16, max_position_embeddings=128, sliding_window=4,
                                   n_input_layers=0, n_output_layers=0, n_recurrent_loops=2, **TOKENS),
             ["q_proj", "v_proj", "down_proj"], "its forward pass calls model.layers.0 more than once"),
    # its first pass in eval mode divides the blocks' weights in place (every rescale_every blocks)
    "rwkv": (lambda: tf.RwkvConfig(hidden_size=32, num_hidden_layers=4, rescale_every=2, attention_hidden_size=32,
                                   intermediate_size=64, context_length=128, **TOKENS),
             ["key", "value", "receptance"], "rescales its blocks' weights in place (rescale_every)"),
}


@pytest.mark.parametrize("family", sorted(WHOLE_WITH_REASON))
def test_blocks_a_stand_in_cannot_capture_run_whole_model_passes(family, tmp_path, caplog):
    """Gemma-4 with shared key/values merged silently wrong (every stream of a batch wrote into
    and read one captured dict: fidelity gaps 0.637 against 0.614), and so did RWKV with
    rescaled layers (0.69 relative: the capture's pass marked the empty blocks rescaled, and
    the weights loaded after were not). They now run whole-model passes, saying why, and
    merge as ``blockwise=false`` does. (Bamba, refused here once as
    its loop unpacks a pair from each stand-in, streams: tests/test_block_calls.py.)"""
    import logging

    make, targets, reason = WHOLE_WITH_REASON[family]
    base_dir = tmp_path / family
    tf.AutoModelForCausalLM.from_config(make()).save_pretrained(base_dir)
    tokenizer().save_pretrained(base_dir)
    adapters = [build_adapter(base_dir, tmp_path / f"a{seed}", seed=seed, family=family, task_type="CAUSAL_LM",
                              targets=targets, calibration=6) for seed in range(2)]
    merged = {}
    for blockwise in ("true", "false"):
        out = tmp_path / blockwise
        with caplog.at_level(logging.INFO, logger="iteris_daemon.execution"):
            assert cli_merge(base_dir, adapters, out, "--param", f"blockwise={blockwise}", "--param", "iterations=2",
                             "--param", "accumulate_dtype=float64") == 0
        assert json.loads((out / "merge_report.json").read_text())["metrics"]["execution"] == "whole model"
        merged[blockwise] = load_file(out / "adapter_model.safetensors")
    assert reason in caplog.text
    for name, whole in merged["false"].items():
        torch.testing.assert_close(merged["true"][name], whole, rtol=1e-6, atol=1e-8, msg=name)


def test_padding_stays_out_of_a_layer_that_reads_its_tokens_with_a_size_1_dimension(tmp_path):
    """DeepSeek's multi-head latent attention (MLA; V2, V3, Kimi, MiniCPM3...) feeds
    ``kv_b_proj`` (batch, 1, seq, d): the padding mask, matched on the first two dimensions,
    was not applied, padding tokens went into that layer's Gram, and a RegMean or IterIS
    merge moved 7-9 % between batch sizes 1 and 16, with no word (QA FAM2). The mask now
    reaches every token row, so the batch size changes the merge at float level only."""
    config = tf.DeepseekV3Config(
        vocab_size=30522, pad_token_id=0, bos_token_id=101, eos_token_id=102, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
        q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=2,
        num_experts_per_tok=1, moe_intermediate_size=32, first_k_dense_replace=2, n_shared_experts=1, n_group=1,
        topk_group=1)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    tokenizer().save_pretrained(tmp_path / "base")
    targets = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
    adapters = [build_adapter(tmp_path / "base", tmp_path / f"a{seed}", seed=seed, family="deepseek_v3",
                              targets=targets, task_type="CAUSAL_LM", calibration=8) for seed in range(2)]
    merged = {}
    for batch_size in (1, 16):
        out = tmp_path / f"bs{batch_size}"
        assert cli_merge(tmp_path / "base", adapters, out, "--strategy", "regmean", "--param",
                         f"batch_size={batch_size}", "--param", "accumulate_dtype=float64", "--no-eval") == 0
        merged[batch_size] = load_adapter(out)
    for path, module in merged[1].modules.items():
        one, many = module.delta().double(), merged[16].modules[path].delta().double()
        assert float((one - many).norm() / one.norm()) < 1e-5, path
