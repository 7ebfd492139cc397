"""Sentence-pair calibration (``{"text": ..., "text_pair": ...}`` lines): a pair classifier
(NLI, paraphrase) reads ``[CLS] a [SEP] b [SEP]`` with token type ids 0 then 1. The pair was
dropped without a word: the fingerprint and the merge were those of ``text`` alone, so the
tasks were aligned on inputs their adapters never see."""

import json

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

from builders import build_adapter, cli_merge, random_texts, tiny_config, tokenizer
from iteris_daemon.calibration import CalibrationSet, Sample, read_jsonl, write_jsonl
from iteris_daemon.cli import main
from iteris_daemon.errors import CalibrationError
from iteris_daemon.lora import load_adapter
from iteris_daemon.model import BaseModel


def _pairs(seed: int, n: int = 8) -> list[dict]:
    return [{"text": a, "text_pair": b} for a, b in zip(random_texts(seed, n), random_texts(seed + 50, n))]


def _write(path, records: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A tiny BERT pair classifier (3 labels) and two SEQ_CLS adapters calibrated on pairs."""
    root = tmp_path_factory.mktemp("pairs")
    config = tiny_config("bert")
    config.num_labels = 3
    torch.manual_seed(0)
    tf.BertForSequenceClassification(config).save_pretrained(root / "base")
    tokenizer().save_pretrained(root / "base")
    adapters = []
    for seed in range(2):
        adapters.append(build_adapter(root / "base", root / f"a{seed}", seed=seed, family="bert", task_type="SEQ_CLS",
                                      targets=["query", "value"]))
        _write(adapters[-1] / "calibration.jsonl", _pairs(seed))
    return root / "base", adapters


def test_a_pair_is_read_written_carried_and_fingerprinted(tmp_path):
    path = _write(tmp_path / "c.jsonl", [{"text": "the market fell", "text_pair": "prices dropped"},
                                         {"text": "the market fell"}])
    data = read_jsonl(path)
    pair, single = data.samples
    assert pair == Sample("the market fell", text_pair="prices dropped")
    assert single.to_json() == ["the market fell", None]  # as before pairs: the same fingerprint
    assert [Sample.from_json(json.loads(json.dumps(s.to_json()))) for s in data.samples] == list(data.samples)
    write_jsonl(tmp_path / "again.jsonl", data.samples)
    assert read_jsonl(tmp_path / "again.jsonl").samples == data.samples
    alone = CalibrationSet((Sample("the market fell"), single), "c")
    assert data.fingerprint() != alone.fingerprint()


@pytest.mark.parametrize("record, said", [
    ({"text": "a b", "text_pair": 3}, '"text_pair" must be a non-empty string'),
    ({"text": "a b", "text_pair": ["c"]}, '"text_pair" must be a non-empty string'),
    ({"text": "a b", "text_pair": "  "}, '"text_pair" must be a non-empty string'),
    ({"messages": [{"role": "user", "content": "hi"}], "text_pair": "c"}, 'a "messages" sample takes no "text_pair"'),
])
def test_a_pair_that_cannot_apply_is_refused_naming_the_line(tmp_path, record, said):
    path = _write(tmp_path / "c.jsonl", [{"text": "fine"}, record])
    with pytest.raises(CalibrationError, match=":2") as caught:
        read_jsonl(path)
    assert said in str(caught.value)


def test_a_pair_is_tokenized_as_the_tokenizer_joins_it(classifier):
    """Each row is ``tokenizer(text, text_pair)``, token type ids included, in a batch that
    mixes pairs and single texts; a pair past max_length is cut by the tokenizer's own
    truncation (longest segment first) and counted as cut."""
    base_dir, adapter_dirs = classifier
    base = BaseModel(str(base_dir), [load_adapter(adapter_dirs[0])])
    tok = tokenizer()
    long = Sample(" ".join(["market"] * 30), text_pair="prices dropped late")
    samples = (Sample("the market fell", text_pair="prices dropped"), Sample("a bright film"), long)
    (batch,) = base.batches(CalibrationSet(samples, "pairs"), batch_size=4, max_length=16)
    rows = [{key: batch[key][i][batch["attention_mask"][i].bool()].tolist() for key in ("input_ids", "token_type_ids")}
            for i in range(3)]
    expected = [tok("a bright film"), tok("the market fell", "prices dropped"),
                tok(long.text, long.text_pair, truncation="longest_first", max_length=16)]
    assert rows == [{key: e[key] for key in ("input_ids", "token_type_ids")} for e in expected]
    assert rows[1]["token_type_ids"].count(1) == len(tok("prices dropped")["input_ids"]) - 1  # b [SEP]
    assert base.samples_cut["pairs"] == 1


def test_a_pair_changes_the_merge_and_compare_holds_pairs_out(classifier, tmp_path):
    """The merge on pairs is not the merge on their first texts (fingerprint, features and
    weights differ); compare scores held-out pairs and lists them as [text, text_pair]."""
    base_dir, adapter_dirs = classifier
    singles = [_write(tmp_path / f"single{i}.jsonl", [{"text": r["text"]} for r in _pairs(i)]) for i in range(2)]
    fast = ["--param", "iterations=2", "--modules-to-save-rule", "average"]
    assert cli_merge(base_dir, adapter_dirs, tmp_path / "pairs", *fast) == 0
    assert cli_merge(base_dir, [f"{a}={s}" for a, s in zip(adapter_dirs, singles)], tmp_path / "singles", *fast) == 0
    reports = [json.loads((tmp_path / out / "merge_report.json").read_text()) for out in ("pairs", "singles")]
    hashes = [[i["calibration"]["sha256"] for i in report["inputs"]] for report in reports]
    assert all(a != b for a, b in zip(*hashes))
    weights = [load_file(tmp_path / out / "adapter_model.safetensors") for out in ("pairs", "singles")]
    assert any(not torch.equal(weights[0][key], weights[1][key]) for key in weights[0] if "lora_" in key)

    base = BaseModel(str(base_dir), [load_adapter(adapter_dirs[0])], offload="none")  # whole: run() as is
    sets = [read_jsonl(adapter_dirs[0] / "calibration.jsonl"), read_jsonl(singles[0])]
    features = [torch.cat(list(base.run(base.batches(data, batch_size=4, max_length=64)))) for data in sets]
    assert not torch.allclose(features[0], features[1])

    out = tmp_path / "compare.json"
    args = ["compare", "--base-model", str(base_dir), "-q", "--strategy", "task_arithmetic", "--json", str(out),
            "--modules-to-save-rule", "average", *(f"--adapter={a}" for a in adapter_dirs)]
    assert main(args) == 0
    held = json.loads(out.read_text())["tasks"][0]["held_out"]
    pairs = [[r["text"], r["text_pair"]] for r in _pairs(0)]
    assert held and all(h in pairs for h in held)
