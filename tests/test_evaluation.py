"""The merge report's next-token loss, against plain ``transformers`` models with the weights
written in by hand (no PEFT, none of the engine), in float64, one sample at a time (no padding)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForQuestionAnswering,
                          AutoModelForSeq2SeqLM, AutoModelForSequenceClassification, AutoTokenizer)

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


def _outputs_by_hand(cls, base_dir, adapter_dir, texts, fields, without_deltas=False) -> list[torch.Tensor]:
    """float64 outputs of the base model (``adapter_dir`` None) or of it with an adapter
    applied by PEFT (its saved head included; ``without_deltas``: its LoRA deltas zeroed, so
    the head alone), one sample at a time, so no padding: per sample the ``fields`` of the
    output, concatenated."""
    from peft import PeftModel

    model = cls.from_pretrained(base_dir)
    if adapter_dir is None:  # the base model alone, with the head its checkpoint holds
        return _outputs(model.double().eval(), base_dir, texts, fields)
    model = PeftModel.from_pretrained(model, adapter_dir)
    if without_deltas:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.zero_()
    return _outputs(model.merge_and_unload().double().eval(), base_dir, texts, fields)


def _outputs(model, base_dir, texts, fields) -> list[torch.Tensor]:
    tok = AutoTokenizer.from_pretrained(base_dir)
    with torch.no_grad():
        outputs = [model(**tok(text, truncation=True, max_length=128, return_tensors="pt")) for text in texts]
    return [torch.cat([getattr(out, field).reshape(-1) for field in fields]) for out in outputs]


def _base_without_pad_token(base_dir: Path, config_pad: int | None) -> None:
    """``base_dir`` as stock Llama checkpoints come: a tokenizer without a pad token, and a
    config naming none or 0."""
    config = json.loads((base_dir / "config.json").read_text())
    config["pad_token_id"] = config_pad
    (base_dir / "config.json").write_text(json.dumps(config))
    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.pad_token = None
    tok.save_pretrained(base_dir)


@pytest.mark.parametrize("case", ["span head", "classifier on a causal checkpoint", "classifier, config pad 0"])
def test_the_fidelity_gap_of_heads_matches_peft_by_hand(tmp_path, case):
    """The fidelity gap of merged classifiers and span heads against float64 PEFT outputs, a
    sample at a time; the base model reads out through its checkpoint's head, or the merge's
    where the checkpoint has none. Before the fixes: a span head's gap read its start logits
    only, padding positions included; the base model read out through the random head a
    checkpoint without one gets (the gap changed from one run to the next); a decoder classifier whose config
    names no pad token ended the merge in a traceback, and one whose config names 0 beside a
    tokenizer without a pad token pooled a padding position."""
    family = "bert" if case == "span head" else "llama"
    cls = AutoModelForQuestionAnswering if case == "span head" else AutoModelForSequenceClassification
    fields = ("start_logits", "end_logits") if case == "span head" else ("logits",)
    base_dir = tmp_path / "base"
    if case == "span head":  # saved with a span head of its own
        build_tiny_model(family, base_dir, base_class=cls)
    else:  # a causal LM's checkpoint: no classifier in it, as Llama's
        build_tiny_model(family, base_dir, "CAUSAL_LM")
        _base_without_pad_token(base_dir, None if case == "classifier on a causal checkpoint" else 0)
    task_type = "QUESTION_ANS" if case == "span head" else "SEQ_CLS"
    adapters = [build_adapter(base_dir, tmp_path / f"a{seed}", seed=seed, family=family, task_type=task_type,
                              base_class=cls) for seed in range(2)]
    out = tmp_path / "merged"
    assert cli_merge(base_dir, adapters, out, "--strategy", "task_arithmetic",
                     "--modules-to-save-rule", "average") == 0
    report = json.loads((out / "merge_report.json").read_text())
    for adapter_dir in adapters:
        texts = [s.text for s in read_jsonl(adapter_dir / "calibration.jsonl").samples]
        task = _outputs_by_hand(cls, base_dir, adapter_dir, texts, fields)
        merged = _outputs_by_hand(cls, base_dir, out, texts, fields)
        if case == "span head":  # the checkpoint's own head
            base = _outputs_by_hand(cls, base_dir, None, texts, fields)
        else:  # none in the checkpoint: the merge's
            base = _outputs_by_hand(cls, base_dir, out, texts, fields, without_deltas=True)
        num = sum(float((m - t).pow(2).sum()) for m, t in zip(merged, task))
        den = sum(float((b - t).pow(2).sum()) for b, t in zip(base, task))
        got = report["tasks"][load_adapter(adapter_dir).name]["fidelity_gap"]
        assert got == pytest.approx((num / den) ** 0.5, rel=1e-4), adapter_dir.name


def test_a_pad_token_past_the_input_embedding_pads_with_one_the_model_holds(tmp_path):
    """A tokenizer given a pad token the model's embedding lacks (added, the embedding not
    resized; Qwen2Tokenizer's ``<pad>`` past a small vocabulary): the block-by-block capture
    failed with an IndexError, taken for an unsupported architecture, and the whole-model
    passes it fell back to (the whole model onto the device) failed the same. Padded positions
    are masked: it pads with the UNK the model holds, the merge of a tokenizer without it."""
    merged = []
    for case in ("no pad token", "a pad token past the embedding"):
        base = build_tiny_model("llama", tmp_path / case / "base", "CAUSAL_LM")
        _base_without_pad_token(base, None)
        if case != "no pad token":
            tok = AutoTokenizer.from_pretrained(base)
            tok.add_special_tokens({"pad_token": "<pad>"})  # id 30522, of a 30522-row embedding
            tok.save_pretrained(base)
        adapters = [build_adapter(base, tmp_path / case / f"a{seed}", seed=seed, family="llama", task_type="CAUSAL_LM")
                    for seed in range(2)]
        assert cli_merge(base, adapters, tmp_path / case / "out", "--param", "iterations=2") == 0
        merged.append(load_file(tmp_path / case / "out" / "adapter_model.safetensors"))
    assert merged[0].keys() == merged[1].keys() and all(merged[0][k].equal(merged[1][k]) for k in merged[0])


@pytest.mark.parametrize("case", ["tokenizer's pad", "config's pad", "none held"])
def test_padding_takes_only_an_id_the_input_embedding_holds(case, caplog):
    """Both the config's pad id and the tokenizer's are checked against the embedding's rows;
    the config is told the id padded with (a decoder classifier pools the last other token)."""
    from transformers import LlamaConfig

    from iteris_daemon.errors import BaseModelError
    from iteris_daemon.model import _agree_on_padding

    tok, config = tokenizer(), LlamaConfig(pad_token_id=30522 if case == "config's pad" else None)
    if case != "config's pad":
        tok.add_special_tokens({"pad_token": "<pad>"})  # id 30522
    if case == "none held":
        tok.add_special_tokens({"eos_token": "</s>", "unk_token": "<unk>"})  # ids 30523, 30524
        with pytest.raises(BaseModelError) as caught:
            _agree_on_padding(tok, config, 30522, "llama-base")
        assert str(caught.value) == (
            "base model 'llama-base': none of its tokenizer's pad, EOS and UNK tokens (<pad> id 30522, </s> id 30523, "
            "<unk> id 30524) is a row of its input embedding to pad with (ids 0-30521): resize the embedding to the "
            "tokenizer, or save a tokenizer whose pad token it holds")
        return
    caplog.set_level("INFO", logger="iteris_daemon.model")
    _agree_on_padding(tok, config, 30522, "llama-base")
    held = ("[UNK]", 100) if case == "tokenizer's pad" else ("[PAD]", 0)
    assert (tok.pad_token, tok.pad_token_id, config.pad_token_id) == (*held, held[1])
    past = ("its tokenizer's pad token <pad> (id 30522)" if case == "tokenizer's pad"
            else "its config's pad_token_id 30522")
    assert caplog.messages == [f"base model llama-base: {past} is past its input embedding (30522 rows); padding "
                               f"with {held[0]} (id {held[1]}), which it holds (padded positions are masked)"]


def test_a_layer_the_task_does_not_adapt_has_no_per_layer_loss_but_counts_in_the_total(tmp_path):
    """Where a task's own delta is zero and the merge's is not (another adapter targets the
    layer), the task's per-layer alignment loss relative to its delta is undefined: null. It
    was 0.0, read as perfectly aligned, though the total counts that misfit (QA measured 37% of
    a task's total at such layers)."""
    base = build_tiny_model("llama", tmp_path / "base", "CAUSAL_LM")
    a = build_adapter(base, tmp_path / "a", seed=0, family="llama", task_type="CAUSAL_LM", targets=["q_proj", "v_proj"])
    b = build_adapter(base, tmp_path / "b", seed=1, family="llama", task_type="CAUSAL_LM",
                      targets=["q_proj", "down_proj"])
    assert cli_merge(base, [a, b], tmp_path / "out", "--strategy", "task_arithmetic") == 0
    tasks = json.loads((tmp_path / "out" / "merge_report.json").read_text())["tasks"]
    only_b = {p for p in tasks["b"]["alignment_loss_by_layer"] if p.endswith("down_proj")}
    assert only_b and all(tasks["a"]["alignment_loss_by_layer"][p] is None for p in only_b)
    assert all(tasks["b"]["alignment_loss_by_layer"][p] > 0 for p in only_b)
    assert all(v is not None for p, v in tasks["a"]["alignment_loss_by_layer"].items() if p not in only_b)


def test_a_merge_without_calibration_data_for_one_adapter_evaluates_the_others(tmp_path, capsys):
    """A data-free strategy merges an adapter that has no calibration data; the merge was then
    not evaluated at all (``tasks`` empty), so the daemon's gates held no task. The others are
    evaluated as they are with it (its layers, which they do not adapt, still in the merge's
    passes), and the report names it in ``not_evaluated``."""
    from iteris_daemon.config import Gates
    from iteris_daemon.gates import judge

    base = build_tiny_model("llama", tmp_path / "base", "CAUSAL_LM")
    a = build_adapter(base, tmp_path / "a", seed=0, family="llama", task_type="CAUSAL_LM", targets=["q_proj", "v_proj"])
    b = build_adapter(base, tmp_path / "b", seed=1, family="llama", task_type="CAUSAL_LM",
                      targets=["q_proj", "down_proj"])
    c = build_adapter(base, tmp_path / "c", seed=2, family="llama", task_type="CAUSAL_LM", targets=["q_proj", "v_proj"])
    assert cli_merge(base, [a, b, c], tmp_path / "all", "--strategy", "task_arithmetic") == 0
    everyone = json.loads((tmp_path / "all" / "merge_report.json").read_text())
    (b / "calibration.jsonl").unlink()
    capsys.readouterr()
    assert cli_merge(base, [a, b, c], tmp_path / "out", "--strategy", "task_arithmetic") == 0
    assert f"{'b':24} not evaluated: no calibration data" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert sorted(report["tasks"]) == ["a", "c"] and report["not_evaluated"] == {"b": "no calibration data"}
    assert everyone["not_evaluated"] == {}
    assert "Not evaluated: `b` (no calibration data)." in (tmp_path / "out" / "README.md").read_text()
    for name, figures in report["tasks"].items():
        want = everyone["tasks"][name]
        assert set(figures) == set(want)
        for key in ("alignment_loss", "fidelity_gap", "next_token_loss"):
            assert figures[key] == pytest.approx(want[key], rel=1e-6), (name, key)
        layers, wanted = figures["alignment_loss_by_layer"], want["alignment_loss_by_layer"]
        assert {p for p, v in layers.items() if v is None} == {p for p, v in wanted.items() if v is None}
        assert {p: v for p, v in layers.items() if v is not None} == pytest.approx(
            {p: v for p, v in wanted.items() if v is not None}, rel=1e-6), name
    assert any(p.endswith("down_proj") for p in report["tasks"]["a"]["alignment_loss_by_layer"])
    gap = report["tasks"]["c"]["fidelity_gap"]
    verdict = judge(report, Gates(max_fidelity_gap=gap / 2))
    assert verdict.refused is not None and verdict.refused.startswith("task c: fidelity gap")
    assert verdict.notes == ["no gate applied to the tasks not evaluated (task b: no calibration data)"]
