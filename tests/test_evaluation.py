"""The merge report's next-token loss, against plain ``transformers`` models with the weights
written in by hand (no PEFT, none of the engine), one sample at a time (no padding)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from builders import apply_by_hand, cli_merge, tokenizer
from iteris_daemon.calibration import read_jsonl
from iteris_daemon.lora import load_adapter

MODELS = {"llama": AutoModelForCausalLM, "gpt2": AutoModelForCausalLM, "t5": AutoModelForSeq2SeqLM}


def _loss_by_hand(model, sample) -> tuple[float, int]:
    """(summed cross-entropy, tokens) of each token given those before it: the text's, or for
    an encoder-decoder the target's as the teacher-forced decoder reads it (start token, then
    the target but its last token)."""
    tok = tokenizer()
    encoded = tok(sample.text, truncation=True, max_length=128, return_tensors="pt")
    ids = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}  # no token types
    if model.config.is_encoder_decoder:
        target = tok(sample.target, truncation=True, max_length=128)["input_ids"]
        start = model.config.decoder_start_token_id
        tokens = torch.tensor([[start if start is not None else tok.pad_token_id, *target[:-1]]])
        logits = model(**ids, decoder_input_ids=tokens).logits
    else:
        tokens = ids["input_ids"]
        logits = model(**ids).logits
    losses = torch.nn.functional.cross_entropy(logits[0, :-1].double(), tokens[0, 1:], reduction="none")
    return float(losses.sum()), losses.numel()


@pytest.mark.parametrize("family", sorted(MODELS))
def test_next_token_loss_of_base_task_and_merge(tiny, tmp_path, family):
    base_dir, adapter_dirs = tiny[family]
    out = tmp_path / "merged"
    assert cli_merge(base_dir, adapter_dirs, out) == 0
    report = json.loads((out / "merge_report.json").read_text())
    cls = MODELS[family]
    models = {"base": cls.from_pretrained(base_dir).eval(), "merged": apply_by_hand(cls.from_pretrained(base_dir), out).eval()}
    for adapter_dir in adapter_dirs:
        models["task"] = apply_by_hand(cls.from_pretrained(base_dir), adapter_dir).eval()
        samples = read_jsonl(adapter_dir / "calibration.jsonl").samples
        got = report["tasks"][load_adapter(adapter_dir).name]["next_token_loss"]
        with torch.no_grad():
            for name, model in models.items():
                sums = [_loss_by_hand(model, sample) for sample in samples]
                want = sum(s for s, _ in sums) / sum(n for _, n in sums)
                assert got[name] == pytest.approx(want, rel=1e-4), (adapter_dir.name, name)


def test_no_next_token_loss_for_a_model_that_does_not_generate(tiny, tmp_path):
    base_dir, adapter_dirs = tiny["bert"]  # AutoModel: hidden states, no language-model head
    assert not AutoModel.from_pretrained(base_dir).can_generate()
    assert cli_merge(base_dir, adapter_dirs, tmp_path / "merged") == 0
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert all("next_token_loss" not in figures for figures in report["tasks"].values())
