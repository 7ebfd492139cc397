"""The merged adapter_config.json as its consumers read it: one rank (``r = lora_alpha``,
no patterns) unless ``--exact-ranks``, the Hub id of the base model the inputs name, and
``fan_in_fan_out`` from the layers."""

import json
import shutil
import warnings

import pytest
import torch
import transformers as tf
from peft import PeftModel
from safetensors.torch import load_file

from builders import build_adapter, build_tied_llama, build_tiny_model, cli_merge, sample_inputs
from iteris_daemon.lora import load_adapter

LLAMA = "CAUSAL_LM"


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A tiny Llama and the task-arithmetic merge of adapters on q, v, o at r=2 and on q, v
    at r=4: rank 6 on q and v, 2 on o; written padded (the default) and with --exact-ranks."""
    root = tmp_path_factory.mktemp("mixed")
    base = build_tiny_model("llama", root / "base", LLAMA)
    adapters = [build_adapter(base, root / "a", seed=1, family="llama", task_type=LLAMA, r=2, alpha=4,
                              targets=["q_proj", "v_proj", "o_proj"]),
                build_adapter(base, root / "b", seed=2, family="llama", task_type=LLAMA, r=4, alpha=8,
                              targets=["q_proj", "v_proj"])]
    padded, exact = root / "padded", root / "exact"
    assert cli_merge(base, adapters, padded, "--strategy", "task_arithmetic", "--no-eval") == 0
    assert cli_merge(base, adapters, exact, "--strategy", "task_arithmetic", "--no-eval", "--exact-ranks") == 0
    return base, padded, exact


def _config(folder):
    return json.loads((folder / "adapter_config.json").read_text())


def _weights(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def test_layers_of_different_ranks_are_written_zero_padded_at_one_rank(mixed):
    _, padded, exact = mixed
    config, tensors, unpadded = _config(padded), _weights(padded), _weights(exact)
    assert not config["rank_pattern"] and not config["alpha_pattern"]
    assert config["r"] == config["lora_alpha"] == 6
    assert {t.shape[0] for k, t in tensors.items() if "lora_A" in k} == {6}
    assert {t.shape[1] for k, t in tensors.items() if "lora_B" in k} == {6}
    for key, tensor in tensors.items():  # the exact factors, then zeros
        own = unpadded[key]
        kept, rest = (tensor[:own.shape[0]], tensor[own.shape[0]:]) if "lora_A" in key else \
            (tensor[:, :own.shape[1]], tensor[:, own.shape[1]:])
        assert torch.equal(kept, own) and not rest.any(), key
    o_proj = [k for k in tensors if "o_proj.lora_A" in k]
    report = json.loads((padded / "merge_report.json").read_text())["output_rank"]
    assert report == {"min": 2, "max": 6, "layers": 3 * len(o_proj), "padded_layers": len(o_proj),
                      "padded_bytes": sum(t.nbytes for t in tensors.values()) - sum(t.nbytes for t in unpadded.values())}
    assert json.loads((exact / "merge_report.json").read_text())["output_rank"]["padded_bytes"] == 0


def test_the_merged_config_is_what_peft_writes_for_the_adapter_it_loads(mixed):
    """Field by field, the merged config equals PEFT's own save of it once loaded: it wrote
    ``inference_mode: false``, which a tool reading the flag took for a trainable adapter
    (found by QA)."""
    base, padded, _ = mixed
    model = tf.AutoModelForCausalLM.from_pretrained(base)
    saved = PeftModel.from_pretrained(model, padded).peft_config["default"].to_dict()
    ours = _config(padded)
    assert ours["inference_mode"] is True
    different = {key for key in ours if key != "target_modules" and json.loads(json.dumps(saved.get(key))) != ours[key]}
    assert not different, {key: (ours[key], saved.get(key)) for key in different}
    assert sorted(saved["target_modules"]) == ours["target_modules"]


def _peft(base, adapter):
    model = tf.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)
    return PeftModel.from_pretrained(model, adapter).double().eval()


def test_peft_serves_the_padded_factors_as_the_exact_ones_in_float64(mixed):
    base, padded, exact = mixed
    inputs = sample_inputs("llama", tf.AutoTokenizer.from_pretrained(base))
    with torch.no_grad():
        got, expected = (_peft(base, folder)(**inputs).logits for folder in (padded, exact))
    assert torch.equal(got, expected)
    assert not torch.equal(expected, tf.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)(**inputs).logits)


def _scalings(base, folder) -> dict[str, tuple[float, float]]:
    """Per adapted layer: llama.cpp's scale (convert_lora_to_gguf keeps only lora_alpha; the
    runtime divides it by the tensor's own rank) and the one PEFT applies."""
    alpha = float(_config(folder)["lora_alpha"])
    layers = dict(_peft(base, folder).base_model.model.named_modules())
    return {key.removeprefix("base_model.model.").removesuffix(".lora_B.weight"):
            (alpha / tensor.shape[1], layers[key.removeprefix("base_model.model.").removesuffix(".lora_B.weight")]
             .scaling["default"])
            for key, tensor in _weights(folder).items() if key.endswith("lora_B.weight")}


@pytest.mark.parametrize("strategy", ["tsv", "ties", "core_space:method=iso_cts", "dare"])
def test_a_padded_merge_merged_again_counts_as_its_own_ranks(mixed, tmp_path, strategy):
    """Merged again with another adapter, the padded merge gave other deltas than the same
    merge written at its exact ranks (TSV, Core Space, Iso-CTS share a budget out by the
    inputs' ranks; TIES and DARE truncate to their sum: up to 0.6 relative). Zero
    components are left out when an adapter is read, so both merge alike. Both go by one name
    (DARE draws each adapter's mask by its name)."""
    base, padded, exact = mixed
    padded, exact = (shutil.copytree(folder, tmp_path / kind / "merged") for kind, folder in
                     (("padded", padded), ("exact", exact)))
    assert {m.A.shape[0] for m in load_adapter(padded).modules.values()} == {2, 6}
    third = build_adapter(base, tmp_path / "c", seed=3, family="llama", task_type=LLAMA, r=4, targets=["q_proj", "v_proj"])
    name, _, param = strategy.partition(":")
    deltas = []
    for first in (padded, exact):
        out = tmp_path / f"again-{first.parent.name}"
        assert cli_merge(base, [first, third], out, "--strategy", name, *(["--param", param] if param else []),
                         "--no-eval", "--exact-ranks") == 0
        deltas.append({path: module.B @ module.A for path, module in load_adapter(out).modules.items()})
    assert deltas[0].keys() == deltas[1].keys()
    for path in deltas[0]:
        torch.testing.assert_close(deltas[0][path], deltas[1][path], rtol=1e-5, atol=1e-6)


def test_llama_cpp_scales_the_default_output_as_peft_does(mixed):
    base, padded, exact = mixed
    assert all(llama_cpp == peft == 1.0 for llama_cpp, peft in _scalings(base, padded).values())
    # What the padding avoids: the exact ranks' patterns are PEFT's alone.
    assert any(llama_cpp != peft for llama_cpp, peft in _scalings(base, exact).values())


def test_exact_ranks_keep_each_layer_at_its_own_rank_in_patterns(mixed):
    base, _, exact = mixed
    config, adapter = _config(exact), load_adapter(exact)
    assert config["r"] == config["lora_alpha"] == 6
    o_proj = {p for p in adapter.modules if p.endswith("o_proj")}
    assert config["rank_pattern"] == config["alpha_pattern"] == {p.replace(".", r"\."): 2 for p in o_proj}
    assert {p: m.rank for p, m in adapter.modules.items()} == {p: 2 if p in o_proj else 6 for p in adapter.modules}


def _named(adapter, base_model_name_or_path):
    config = _config(adapter)
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": base_model_name_or_path}))
    return adapter


def test_the_hub_id_every_input_names_is_kept_when_the_merge_runs_on_a_local_copy(tmp_path):
    base = build_tiny_model("llama", tmp_path / "local-copy", LLAMA)
    adapters = [_named(build_adapter(base, tmp_path / f"a{seed}", seed=seed, family="llama", task_type=LLAMA),
                       "acme/tiny-llama") for seed in (1, 2)]
    assert cli_merge(base, adapters, tmp_path / "merged", "--strategy", "task_arithmetic", "--no-eval") == 0
    assert _config(tmp_path / "merged")["base_model_name_or_path"] == "acme/tiny-llama"
    # An input that names none: no id all agree on, the merge's own base model (absolute).
    _named(adapters[1], None)
    assert cli_merge(base, adapters, tmp_path / "other", "--strategy", "task_arithmetic", "--no-eval") == 0
    assert _config(tmp_path / "other")["base_model_name_or_path"] == str(base.resolve())


def test_fan_in_fan_out_follows_the_layers_not_the_first_input(tmp_path):
    base = build_tiny_model("gpt2", tmp_path / "base", LLAMA)
    first, second = (build_adapter(base, tmp_path / f"a{seed}", seed=seed, family="gpt2", task_type=LLAMA)
                     for seed in (1, 2))
    (first / "adapter_config.json").write_text(json.dumps({**_config(first), "fan_in_fan_out": False}))
    configs = []
    for name, order in (("ab", [first, second]), ("ba", [second, first])):
        assert cli_merge(base, order, tmp_path / name, "--strategy", "task_arithmetic", "--no-eval") == 0
        configs.append((tmp_path / name / "adapter_config.json").read_bytes())
    assert configs[0] == configs[1] and json.loads(configs[0])["fan_in_fan_out"] is True
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(base), tmp_path / "ab")
    assert not [w for w in seen if "fan_in_fan_out" in str(w.message)]


def test_a_saved_tied_embedding_stays_tied_and_leaves_the_base_model_alone(tmp_path):
    """``ensure_weight_tying=True`` on a tied model: PEFT saves the embedding and its tied copy
    ``lm_head.weight``. The merged config dropped ``ensure_weight_tying``, so PEFT loaded that
    copy into the base model's own lm_head (tied to the input embedding): with the adapter
    disabled the model was no longer the base (logits 11.9 away). Now the merge keeps the tie:
    enabled it is the float64 sum of the weighted deltas and the merged embedding, disabled the
    base model exactly."""
    base = build_tied_llama(tmp_path / "base")
    adapters = [build_adapter(base, tmp_path / name, seed=seed, family="llama", task_type=LLAMA, targets=["q_proj"],
                              modules_to_save=saved, ensure_weight_tying=True)
                for seed, name, saved in ((1, "a", ["embed_tokens"]), (2, "b", ["lm_head"]))]
    assert all(a.tied_copies == ["lm_head.weight"] for a in map(load_adapter, adapters))
    weights = [0.7, 0.5]
    out = tmp_path / "merged"
    assert cli_merge(base, adapters, out, "--strategy", "task_arithmetic", "--param", f"weights={weights}",
                     "--modules-to-save-rule", "average", "--no-eval") == 0
    assert _config(out)["ensure_weight_tying"] is True

    reference = tf.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64).eval()
    layers = dict(reference.named_modules())
    loaded = [load_adapter(a) for a in adapters]
    with torch.no_grad():
        for weight, adapter in zip(weights, loaded):
            for path, module in adapter.modules.items():
                layers[path].weight += weight * module.delta()
        embedding = torch.stack([a.modules_to_save["model.embed_tokens.weight"].double() for a in loaded]).mean(0)
        reference.get_input_embeddings().weight.copy_(embedding)  # lm_head with it: tied
    inputs = sample_inputs("llama", tf.AutoTokenizer.from_pretrained(base))
    model = PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(base).eval(), out).eval()
    with torch.no_grad():
        plain = tf.AutoModelForCausalLM.from_pretrained(base).eval()(**inputs).logits
        enabled = model(**inputs).logits
        with model.disable_adapter():
            disabled = model(**inputs).logits
        expected = reference(**inputs).logits
    torch.testing.assert_close(enabled.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(disabled, plain)
