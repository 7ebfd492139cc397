"""Degenerate calibration data still gives a finite merge (the regularisers keep every
system solvable), or a clear error when there is nothing to learn from at all.

Two levels:

- the solve alone, on synthetic features where the answer is known independently
  (``torch.linalg.lstsq`` of the stacked float64 problem): features 10^8 apart in scale
  across tasks, duplicated rows, a single token, a task whose features are all zero;
- whole IterIS merges on tiny models (BERT, GPT-2) with real PEFT adapters: the same
  sample repeated, one sample, rows that are (almost) all padding, a layer whose inputs
  are exactly zero. Each output must be finite, loadable by PEFT, and the report's
  figures finite.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import transformers as tf
from peft import PeftModel

from builders import build_adapter, random_texts
from iteris_daemon.alignment import fold
from iteris_daemon.calibration import CalibrationSet, Sample
from iteris_daemon.errors import CalibrationError
from iteris_daemon.lora import LoraModule, load_adapter
from iteris_daemon.lowrank import solve_spd
from iteris_daemon.merge import AdapterSpec, MergeRequest, run_merge

# ----------------------------------------------------------------------------- the solve


def _task(g, X: torch.Tensor, r: int = 2, d_out: int = 8) -> tuple:
    module = LoraModule(A=torch.randn(r, X.shape[1], generator=g, dtype=torch.float64),
                        B=torch.randn(d_out, r, generator=g, dtype=torch.float64), scaling=1.0)
    return X, module


def _solve(tasks, a: float):
    """The engine's low-rank solve (first iteration: Xt = X, weights 1)."""
    M, rhs = None, []
    for X, module in tasks:
        G = X.T @ X
        M = fold(M, rhs, G, module.A @ G, module, 1.0, a, a)
    A = solve_spd(M, torch.cat(rhs))
    return torch.cat([m.B for _, m in tasks], 1) @ A


def _reference(tasks, a: float) -> torch.Tensor:
    """argmin_D sum_i ||X_i D^T - X_i D_i^T||^2 + l_i ||D - D_i||^2, l_i = a ||G_i||_F, by lstsq."""
    d_in = tasks[0][0].shape[1]
    lhs, rhs = [], []
    for X, module in tasks:
        lam = a * float(torch.linalg.matrix_norm(X.T @ X))
        D = module.delta()
        lhs += [X, lam**0.5 * torch.eye(d_in, dtype=torch.float64)]
        rhs += [X @ D.T, lam**0.5 * D.T]
    return torch.linalg.lstsq(torch.cat(lhs), torch.cat(rhs), driver="gelsd").solution.T


def _features(kind: str, g) -> list[torch.Tensor]:
    d = 16
    rand = lambda n, scale=1.0: torch.randn(n, d, generator=g, dtype=torch.float64) * scale  # noqa: E731
    return {
        "scales 1e-4 and 1e4": [rand(30, 1e-4), rand(30, 1e4)],
        "duplicated rows": [rand(1).repeat(40, 1), rand(25)],
        "single token": [rand(1), rand(1)],
        "one task all zero": [torch.zeros(20, d, dtype=torch.float64), rand(20)],
    }[kind]


@pytest.mark.parametrize("kind", ["scales 1e-4 and 1e4", "duplicated rows", "single token", "one task all zero"])
def test_the_solve_is_finite_and_matches_lstsq_on_degenerate_features(kind):
    g = torch.Generator().manual_seed(7)
    tasks = [_task(g, X) for X in _features(kind, g)]
    got = _solve(tasks, a=1e-3)
    assert torch.isfinite(got).all()
    expected = _reference(tasks, a=1e-3)
    assert float((got - expected).norm() / expected.norm()) < 1e-6


def test_all_zero_features_everywhere_give_a_zero_delta_not_nan():
    """Nothing to align (no task sends any signal): the minimum-norm answer is no change."""
    g = torch.Generator().manual_seed(8)
    tasks = [_task(g, torch.zeros(10, 16, dtype=torch.float64)) for _ in range(2)]
    got = _solve(tasks, a=1e-3)
    assert torch.isfinite(got).all() and float(got.abs().max()) == 0.0


# ----------------------------------------------------------------------------- whole merges


def _data(texts: list[str]) -> CalibrationSet:
    return CalibrationSet(tuple(Sample(t) for t in texts), source="test")


CASES = {
    "same sample 20 times": lambda seed: ["the market fell late"] * 20,
    "one sample": lambda seed: random_texts(seed, 1),
    "mostly padding": lambda seed: ["a"] * 15 + [" ".join(random_texts(seed, 12, words=12))],
    "a batch of nothing but padding": lambda seed: ["", "", "", "", *random_texts(seed, 3)],  # batch_size 4
}


@pytest.fixture(scope="module")
def bare_tokenizer_models(tiny, tmp_path_factory):
    """Copies of the tiny bases whose tokenizer adds no [CLS]/[SEP], so an empty text
    is a row of nothing but padding (as with GPT-2's own tokenizer)."""
    root = tmp_path_factory.mktemp("bare")
    out = {}
    for family in ("bert", "gpt2"):
        base, adapters = tiny[family]
        copy = shutil.copytree(base, root / family)
        tokenizer = json.loads((copy / "tokenizer.json").read_text())
        tokenizer["post_processor"] = None
        (copy / "tokenizer.json").write_text(json.dumps(tokenizer))
        config = json.loads((copy / "tokenizer_config.json").read_text())
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        (copy / "tokenizer_config.json").write_text(json.dumps(config))
        out[family] = (copy, adapters)
    return out


def _merge(base, adapters, out, calibration, **params):
    report = run_merge(MergeRequest(
        base_model=str(base), adapters=[AdapterSpec(a) for a in adapters], out=out, quiet=True,
        params={"iterations": 3, "batch_size": 4, **params}, calibration_sets=calibration,
    ))
    merged = load_adapter(out)
    assert all(torch.isfinite(m.A).all() and torch.isfinite(m.B).all() for m in merged.modules.values())
    for name, figures in report["tasks"].items():
        assert all(math.isfinite(v) for v in figures["alignment_loss"]), name
        assert math.isfinite(figures["fidelity_gap"]), name
    return report


@pytest.mark.parametrize("family", ["bert", "gpt2"])
@pytest.mark.parametrize("case", list(CASES))
def test_degenerate_calibration_gives_a_finite_merge_peft_loads(bare_tokenizer_models, family, case, tmp_path):
    base, adapters = bare_tokenizer_models[family]
    calibration = [_data(CASES[case](seed)) for seed in range(len(adapters))]
    _merge(base, adapters, tmp_path / "merged", calibration)
    model_class = tf.AutoModel if family == "bert" else tf.AutoModelForCausalLM
    model = PeftModel.from_pretrained(model_class.from_pretrained(base), tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.isfinite(model(**tf.AutoTokenizer.from_pretrained(base)(["the film"], return_tensors="pt"))[0]).all()


def test_a_task_with_no_tokens_at_all_is_a_clear_error(bare_tokenizer_models, tmp_path):
    base, adapters = bare_tokenizer_models["gpt2"]
    calibration = [_data(["", ""]), *(_data(random_texts(s, 4)) for s in (1, 2))]
    with pytest.raises(CalibrationError, match="no usable tokens for adapter"):
        _merge(base, adapters, tmp_path / "merged", calibration)
    assert not (tmp_path / "merged").exists()


def test_a_layer_whose_inputs_are_all_zero_is_merged_finitely(tiny, tmp_path):
    """BERT's FFN output layer reads gelu(intermediate(x)); with the intermediate layer
    zeroed (and not adapted) its inputs are exactly 0, so its Gram matrices, and the
    norms that scale the regularisers, are 0 for every task. The data says nothing about
    that layer: it takes the tasks' deltas averaged with their ``task_weights`` (no task's
    inputs carried energy for the adaptive weights; until 2026-12-07 no change at all, the
    minimum-norm answer, which lost even a lone adapter's delta there). Every other layer
    merges as usual."""
    base, _ = tiny["bert"]
    zeroed = tmp_path / "zeroed-base"
    model = tf.AutoModel.from_pretrained(base)
    with torch.no_grad():
        for layer in model.encoder.layer:
            layer.intermediate.dense.weight.zero_()
            layer.intermediate.dense.bias.zero_()
    model.save_pretrained(zeroed)
    tf.AutoTokenizer.from_pretrained(base).save_pretrained(zeroed)
    adapters = [build_adapter(zeroed, tmp_path / f"task{i}", seed=30 + i, family="bert",
                              targets=["query", "value", "output.dense"]) for i in range(2)]
    calibration = [_data(random_texts(seed, 6)) for seed in range(len(adapters))]
    for weights in ([1, 1], [1, 0]):  # task 1 weighted 0 got half of the layer (QA RV6)
        out = tmp_path / f"merged-{weights[1]}"
        _merge(zeroed, adapters, out, calibration, task_weights=weights)
        merged = load_adapter(out)
        ffn_out = [p for p in merged.modules if p.endswith("output.dense") and ".attention." not in p]
        assert len(ffn_out) == 2
        for p in ffn_out:
            mean = sum(w * load_adapter(a).modules[p].delta().double() for w, a in zip(weights, adapters)) / sum(weights)
            assert float((merged.modules[p].delta().double() - mean).norm() / mean.norm()) < 1e-6, (weights, p)
        assert all(float(m.delta().abs().max()) > 0 for p, m in merged.modules.items() if p not in ffn_out)


def test_a_layer_no_pass_reaches_takes_the_tasks_deltas_averaged_with_their_weights(tmp_path):
    """A BERT decoder with cross-attention, run without encoder states, never calls its
    cross-attention layers: the calibration data says nothing there. They kept the sum of
    the deltas, so a lone adapter given twice came back doubled (QA RV6); now they take
    the tasks' deltas averaged with ``task_weights``, as a dead input feature does, and the
    report names them."""
    from builders import tokenizer

    base = tmp_path / "base"
    torch.manual_seed(0)
    tf.BertModel(tf.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=128, is_decoder=True,
                               add_cross_attention=True)).save_pretrained(base)
    tokenizer().save_pretrained(base)
    first, second = (build_adapter(base, tmp_path / f"task{i}", seed=i, family="bert", targets=["query", "value"])
                     for i in range(2))
    deltas = [{p: m.delta().double() for p, m in load_adapter(a).modules.items()} for a in (first, second)]
    for adapters, weights in (([first, first], [1, 1]), ([first, second], [3, 1])):
        out = tmp_path / f"merged-{weights[0]}"
        report = run_merge(MergeRequest(base_model=str(base), adapters=[AdapterSpec(a) for a in adapters], out=out,
                                        quiet=True, params={"task_weights": weights}))
        unreached = report["metrics"]["layers_without_inputs"]
        assert len(unreached) == 4 and all(".crossattention." in p for p in unreached)
        merged = load_adapter(out)
        own = [deltas[0 if a == first else 1] for a in adapters]
        for p in unreached:
            expected = sum(w * d[p] for w, d in zip(weights, own)) / sum(weights)
            assert float((merged.modules[p].delta().double() - expected).norm() / expected.norm()) < 1e-6, p
