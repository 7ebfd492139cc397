"""The merge report's next-token loss, against plain ``transformers`` models with the weights
written in by hand (no PEFT, none of the engine), in float64, one sample at a time (no padding)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from builders import apply_by_hand, build_adapter, build_tiny_model, cli_merge, tokenizer
from iteris_daemon.calibration import read_jsonl
from iteris_daemon.lora import load_adapter

MODELS = {"llama": AutoModelForCausalLM, "gpt2": AutoModelForCausalLM, "t5": AutoModelForSeq2SeqLM,
          "bart": AutoModelForSeq2SeqLM}


def _loss_by_hand(model, sample) -> tuple[float, int]:
    """(summed cross-entropy in float64, tokens) of each token given those before it: the
    text's, or for an encoder-decoder every token of the target, the decoder's inputs made
    by transformers itself from ``labels`` (shifted right, as its own seq2seq loss does)."""
    tok = tokenizer()
    encoded = tok(sample.text, truncation=True, max_length=128, return_tensors="pt")
    ids = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}  # no token types
    if model.config.is_encoder_decoder:
        target = tok(sample.target, truncation=True, max_length=128, return_tensors="pt")["input_ids"]
        out = model(**ids, labels=target)
        losses = torch.nn.functional.cross_entropy(out.logits[0].double(), target[0], reduction="none")
        assert float(losses.mean()) == pytest.approx(float(out.loss), rel=1e-5)  # transformers' own figure
    else:
        tokens = ids["input_ids"]
        logits = model(**ids).logits
        losses = torch.nn.functional.cross_entropy(logits[0, :-1].double(), tokens[0, 1:], reduction="none")
    return float(losses.sum()), losses.numel()


@pytest.fixture(scope="module")
def bart(tmp_path_factory):
    """A tiny BART and two adapters: an encoder-decoder beside T5."""
    root = tmp_path_factory.mktemp("bart")
    base = build_tiny_model("bart", root / "base", "SEQ_2_SEQ_LM")
    return base, [build_adapter(base, root / f"a{seed}", seed=seed, family="bart", task_type="SEQ_2_SEQ_LM")
                  for seed in range(2)]


@pytest.mark.parametrize("family", sorted(MODELS))
def test_next_token_loss_of_base_task_and_merge(tiny, bart, tmp_path, family):
    """For an encoder-decoder the last target token was left out (the loss read the decoder's
    shifted inputs as the tokens to predict)."""
    base_dir, adapter_dirs = bart if family == "bart" else tiny[family]
    out = tmp_path / "merged"
    assert cli_merge(base_dir, adapter_dirs, out) == 0
    report = json.loads((out / "merge_report.json").read_text())
    cls = MODELS[family]
    models = {"base": cls.from_pretrained(base_dir).double().eval(),
              "merged": apply_by_hand(cls.from_pretrained(base_dir), out).double().eval()}
    for adapter_dir in adapter_dirs:
        models["task"] = apply_by_hand(cls.from_pretrained(base_dir), adapter_dir).double().eval()
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
