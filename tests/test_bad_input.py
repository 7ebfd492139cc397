"""Bad input: a one-line error naming the culprit, exit status 2, nothing written."""

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest

import torch
import transformers as tf

from builders import build_adapter, build_tiny_model, cli_merge, random_texts, tiny_config, tokenizer
from iteris_daemon.cli import main
from iteris_daemon.lora import load_adapter


class _Payload:
    """Unpickling this would create a marker file: proof that a .bin was loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def workspace(bert, tmp_path):
    base_dir, adapters = bert
    copies = []
    for adapter in adapters[:2]:
        copies.append(tmp_path / adapter.name)
        shutil.copytree(adapter, copies[-1])
    return base_dir, copies, tmp_path


def _merge(capsys, base, adapters, out, *extra):
    code = cli_merge(base, adapters, out, *extra)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def _assert_refused(code, message, out, *fragments):
    assert code == 2
    assert message.startswith("iteris-daemon: error: ")
    for fragment in fragments:
        assert fragment in message, message
    assert not out.exists()


def test_missing_adapter_folder(workspace, capsys):
    base, adapters, tmp = workspace
    missing = tmp / "nope"
    code, message = _merge(capsys, base, [adapters[0], missing], tmp / "out")
    _assert_refused(code, message, tmp / "out", str(missing), "does not exist")


def test_an_adapter_folder_named_with_an_equals_sign(workspace, capsys, tmp_path):
    """``--adapter sweep/lr=1e-4`` was read as folder ``sweep/lr`` with calibration file
    ``1e-4``; a folder given whole is a folder. DIR=FILE still names the calibration file,
    and a FILE that is a folder is said to be one."""
    base, adapters, tmp = workspace
    swept = tmp / "sweep" / "lr=1e-4"
    shutil.copytree(adapters[0], swept)
    assert _merge(capsys, base, [swept, adapters[1]], tmp / "out", "--strategy", "task_arithmetic")[0] == 0
    given = f"{swept}={swept / 'calibration.jsonl'}"
    assert _merge(capsys, base, [given, adapters[1]], tmp / "out2", "--strategy", "task_arithmetic")[0] == 0
    code, message = _merge(capsys, base, [f"{adapters[0]}={adapters[1]}", adapters[1]], tmp / "out3")
    _assert_refused(code, message, tmp / "out3", f"{adapters[1]}: calibration file is a folder, not a file")


@pytest.mark.parametrize("command", ["merge", "compare"])
@pytest.mark.parametrize("given, says", [
    ("", "no folder given (an empty value: an unset shell variable?); the current folder is ."),
    ("=calibration.jsonl", "=calibration.jsonl: no folder before '=' (DIR=CALIBRATION.jsonl; the current folder is .)"),
])
def test_an_adapter_given_without_a_folder_is_refused(workspace, capsys, monkeypatch, command, given, says):
    """``--adapter "$UNSET"`` and ``--adapter =FILE`` merged the current folder (``Path("")``)
    as a task named "" (QA CLI2); now argparse's usage error names the option, for merge and
    for compare (one parser), before anything is read."""
    base, adapters, tmp = workspace
    monkeypatch.chdir(adapters[0])  # an adapter folder: it was merged
    argv = [command, "--base-model", str(base), "--adapter", given, "--adapter", str(adapters[1]), "-q"]
    with pytest.raises(SystemExit) as exited:
        main([*argv, *(["--out", str(tmp / "out")] if command == "merge" else [])])
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert exited.value.code == 2 and message.endswith(f"argument --adapter: {says}")
    assert not (tmp / "out").exists()


@pytest.mark.parametrize("given, inside", [(".", ""), ("..", "sub"), ("../.", "sub")])
def test_an_adapter_given_as_dot_is_named_after_its_folder(workspace, capsys, monkeypatch, given, inside):
    """``--adapter .`` named its task "" (``..``: "..") in the table, merge_report.json and
    the model card (QA CLI2); now the folder's own name."""
    base, adapters, tmp = workspace
    (adapters[0] / "sub").mkdir()
    monkeypatch.chdir(adapters[0] / inside)
    code = cli_merge(base, [given, adapters[1]], tmp / "out", "--strategy", "task_arithmetic")
    assert code == 0, capsys.readouterr().err
    names = [adapters[0].name, adapters[1].name]
    report = json.loads((tmp / "out" / "merge_report.json").read_text())
    assert [i["name"] for i in report["inputs"]] == names and list(report["tasks"]) == names
    assert [i["path"] for i in report["inputs"]] == [str(a) for a in adapters]
    card = (tmp / "out" / "README.md").read_text()
    assert f"| `{names[0]}` |" in card and "| `` |" not in card and "| `..` |" not in card
    assert re.search(rf"^{names[0]} +\S", capsys.readouterr().out, re.M)  # its row of the table


@pytest.mark.parametrize("spelling", ["absolute", "relative"])
def test_missing_base_model(workspace, capsys, monkeypatch, spelling):
    """A path that can only be a local folder is said to be missing (transformers would
    answer with a Hub repo id error)."""
    _, adapters, tmp = workspace
    monkeypatch.chdir(tmp)
    missing = str(tmp / "no-such-model") if spelling == "absolute" else "./models/no-such-model"
    code, message = _merge(capsys, missing, adapters, tmp / "out")
    _assert_refused(code, message, tmp / "out", f"base model folder {missing} does not exist")


def test_a_base_model_folder_without_config_and_an_adapter_given_by_its_file_are_said_so(workspace, capsys):
    """``--base-model ./empty`` (no config.json) ended in transformers' "Should have a
    model_type key in its config.json"; ``--adapter DIR/adapter_config.json`` in "adapter
    folder does not exist" (QA NU)."""
    base, adapters, tmp = workspace
    empty = tmp / "empty"
    empty.mkdir()
    code, message = _merge(capsys, empty, adapters, tmp / "out")
    _assert_refused(code, message, tmp / "out", f"base model folder {empty} has no config.json (is it a model folder?)")
    config_file = adapters[0] / "adapter_config.json"
    code, message = _merge(capsys, base, [config_file, adapters[1]], tmp / "out")
    _assert_refused(code, message, tmp / "out", f"{config_file}: is a file, not an adapter folder")


def test_adapters_for_different_base_models(workspace, capsys):
    base, adapters, tmp = workspace
    config_path = adapters[1] / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "some-org/another-model"
    config_path.write_text(json.dumps(config))
    code, message = _merge(capsys, base, adapters, tmp / "out")
    _assert_refused(code, message, tmp / "out", "different base models", "some-org/another-model")


def test_a_source_says_when_an_adapter_names_another_base_model(workspace, caplog):
    """A source's base model decides over the one an adapter names (often a Hub id for the
    source's local copy, or a path on the machine that trained it), so an adapter of another
    model of the same shapes (a chat model's, for its base) registered without a word. It
    still registers, with a WARNING naming both; one named by another spelling of the same
    model says nothing."""
    import logging

    from iteris_daemon.validation import validate_adapter

    base, adapters, _ = workspace
    config_path = adapters[1] / "adapter_config.json"
    for named, warned in (("some-org/another-model", True), (f"some-org/{base.name.upper()}", False)):
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "base_model_name_or_path": named}))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="iteris_daemon.validation"):
            assert validate_adapter(adapters[1], base_model=str(base)).base_model == str(base)
        said = f"names base model {named!r}, not the source's {str(base)!r}"
        assert (said in caplog.text) is warned, caplog.text


def test_merge_says_when_the_adapters_name_another_base_model(workspace, capsys, caplog):
    """``merge --base-model ./bert`` with adapters that all name another model merged without
    a word, and its config named their model (QA NU). The merge still runs (a local copy
    named by another folder name is common), with a WARNING naming both; another spelling of
    the same model says nothing."""
    import logging

    base, adapters, tmp = workspace
    for number, (named, warned) in enumerate((("some-org/another-model", True), (f"Org/{base.name}", False))):
        for folder in adapters:
            config_path = folder / "adapter_config.json"
            config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "base_model_name_or_path": named}))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="iteris_daemon"):
            assert cli_merge(base, adapters, tmp / f"out{number}", "--strategy", "task_arithmetic", "--no-eval") == 0
        said = f"adapter {adapters[0].name} names base model {named!r}, not {str(base)!r}"
        assert (said in caplog.text) is warned, caplog.text


@pytest.mark.parametrize("named, base, other", [
    ("gpt2", "/srv/hub/models--gpt2/snapshots/0123abc", False),  # the Hub cache's folder of a commit (QA RV8)
    ("meta-llama/Llama-2-7b-hf", "/m/models--meta-llama--Llama-2-7b-hf/snapshots/0123", False),
    ("meta-llama/Llama-2-7b-hf", "models--meta-llama--Llama-2-7b-hf", False),
    ("Llama-2-7b-hf", "/srv/models/Llama-2-7b-hf/.", False),
    ("Llama-2-7b-hf", "/srv/models/x/../Llama-2-7b-hf/", False),
    ("meta-llama/Llama-2-7b-hf", "/models/llama-2-7b-hf", False),
    ("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-chat-hf", True),
    ("some-org/another-model", "/srv/hub/models--gpt2/snapshots/0123abc", True),
])
def test_another_base_model_is_told_by_the_model_name_whatever_its_spelling(named, base, other):
    from iteris_daemon.validation import names_another_model

    assert names_another_model(named, base) is other


def test_weights_of_modules_target_modules_does_not_name_are_refused(workspace, capsys):
    """An adapter whose weights adapt modules its ``target_modules`` does not name (PEFT would
    not load them there): the daemon's sources refused it, ``merge`` merged it (QA NU). One
    check now, where the adapter's structure is read, for both."""
    from iteris_daemon.errors import AdapterError
    from iteris_daemon.validation import validate_adapter

    base, adapters, tmp = workspace
    config_path = adapters[1] / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "target_modules": ["nonexistent"]}))
    code, message = _merge(capsys, base, adapters, tmp / "out")
    _assert_refused(code, message, tmp / "out", f"{config_path}: weights adapt ", "which target_modules ['nonexistent'] "
                    "does not name")
    with pytest.raises(AdapterError, match=r"which target_modules \['nonexistent'\] does not name"):
        validate_adapter(adapters[1], base_model=str(base))


@pytest.mark.parametrize("narrower, said", [
    ({"target_modules": ".*\\.layer\\.0\\..*\\.query"}, "does not match"),
    ({"layers_to_transform": [0], "layers_pattern": "layer"}, "layers_to_transform [0] (layers_pattern 'layer') leaves out"),
    ({"layers_to_transform": [0]}, "layers_to_transform [0] leaves out"),
    ({"exclude_modules": ["value"]}, "exclude_modules ['value'] names"),
    ({"exclude_modules": ".*\\.1\\..*"}, "exclude_modules '.*\\\\.1\\\\..*' matches"),
])
def test_weights_outside_what_the_config_lets_peft_adapt_are_refused(workspace, capsys, narrower, said):
    """A converted or hand-edited config narrower than the weights (a regex ``target_modules``,
    ``layers_to_transform``, ``exclude_modules``): PEFT adapts only what the config names and
    ignores the rest; the merge used every weight, so merging the adapter alone gave another
    model than PEFT serves (logits 0.5-0.8 apart), exit 0 (QA CLI). Refused now, naming the field,
    as for a list ``target_modules``; PEFT itself, loading the adapter, leaves that module alone."""
    from peft import PeftModel
    from transformers import AutoModel

    base, adapters, tmp = workspace
    config_path = adapters[1] / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **narrower}))
    code, message = _merge(capsys, base, adapters, tmp / "out")
    _assert_refused(code, message, tmp / "out", f"{config_path}: weights adapt encoder.layer.", said)
    module = message.split("weights adapt ", 1)[1].split(",", 1)[0]
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(base), adapters[1])
    assert not hasattr(peft_model.base_model.model.get_submodule(module), "lora_A"), module  # PEFT leaves it out


def test_which_modules_peft_adapts_agrees_with_peft_itself():
    """The torch-free rule the check above applies against PEFT's own
    ``check_target_module_exists``, on 13 configs x 10 module names (Llama, BERT, GPT-2, an MoE
    expert, an adapted module inside a saved one): the same verdict on every pair."""
    from types import SimpleNamespace

    from peft.tuners.tuners_utils import check_target_module_exists
    from iteris_daemon.validation import _left_out_by_peft

    keys = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.12.mlp.down_proj",
            "model.layers.1.mlp.experts.0.down_proj", "encoder.layer.0.attention.self.query",
            "encoder.layer.1.attention.self.value", "transformer.h.3.attn.c_attn", "lm_head", "score.dense",
            "model.layers.0.self_attn.v_proj"]
    configs = [{"target_modules": ["q_proj", "v_proj"]}, {"target_modules": ["query"], "layers_to_transform": [0]},
               {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [1], "layers_pattern": "layers"},
               {"target_modules": ["down_proj"], "layers_to_transform": 1, "layers_pattern": ["layers", "h"]},
               {"target_modules": ["c_attn"], "layers_to_transform": [3], "layers_pattern": "h"},
               {"target_modules": r".*\.(q_proj|value)"}, {"target_modules": r".*layers\.1\..*", "layers_to_transform": [0]},
               {"target_modules": ["q_proj", "v_proj"], "exclude_modules": ["v_proj"]},
               {"target_modules": ["q_proj", "query", "lm_head"], "exclude_modules": r".*\.1\..*"},
               {"target_modules": ["dense", "down_proj"], "modules_to_save": ["score"]},
               {"target_modules": ["q_proj"], "layers_to_transform": []},
               {"target_modules": ["down_proj"], "layers_to_transform": [0, 1], "layers_pattern": "experts"},
               {"target_modules": ["lm_head", "q_proj"], "layers_to_transform": [0]}]
    fields = ("target_modules", "exclude_modules", "modules_to_save", "layers_to_transform", "layers_pattern")
    for config in configs:
        namespace = SimpleNamespace(**{f: config.get(f) for f in fields}, target_parameters=None)
        for key in keys:
            assert (_left_out_by_peft(config, key) is None) == bool(check_target_module_exists(namespace, key)), \
                (config, key)


def test_the_base_models_revision_is_kept_and_must_agree(workspace, capsys):
    """PEFT's AutoPeftModel loads the base model at the adapter config's ``revision``. The
    merge wrote none, and adapters of two revisions merged without a word."""
    base, adapters, tmp = workspace

    def set_revision(folder: Path, revision: str) -> None:
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "revision": revision}))

    for folder in adapters:
        set_revision(folder, "v1.0")
    assert cli_merge(base, adapters, tmp / "same", "--strategy", "task_arithmetic", "--no-eval") == 0
    assert json.loads((tmp / "same" / "adapter_config.json").read_text())["revision"] == "v1.0"
    set_revision(adapters[1], "v2.0")
    code, message = _merge(capsys, base, adapters, tmp / "out")
    _assert_refused(code, message, tmp / "out", "different revisions of the base model", ": v1.0, ", ": v2.0")


def test_an_unknown_task_type_names_the_adapter_and_peft_s_types(workspace, capsys):
    """A lower-case ``causal_lm`` (PEFT's names are upper case) was refused without naming
    the adapter or what would do."""
    base, adapters, tmp = workspace
    for folder in adapters:  # both: a mix of task types is refused before
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "task_type": "causal_lm"}))
    code, message = _merge(capsys, base, adapters, tmp / "out")
    _assert_refused(code, message, tmp / "out", f"adapter {adapters[0].name}: unsupported PEFT task_type 'causal_lm' "
                    "(PEFT's are CAUSAL_LM, FEATURE_EXTRACTION,")


def test_pickled_weights_are_refused_never_loaded(workspace, capsys):
    base, adapters, tmp = workspace
    marker = tmp / "unpickled"
    (adapters[1] / "adapter_model.safetensors").unlink()
    (adapters[1] / "adapter_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    code, message = _merge(capsys, base, adapters, tmp / "out")
    _assert_refused(code, message, tmp / "out", "adapter_model.bin", "pickled")
    assert not marker.exists()


def test_truncated_safetensors(workspace, capsys):
    base, adapters, tmp = workspace
    weights = adapters[0] / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    code, message = _merge(capsys, base, adapters, tmp / "out")
    _assert_refused(code, message, tmp / "out", str(weights))


def test_shape_mismatch_with_base_model(workspace, capsys):
    base, _, tmp = workspace
    config = tiny_config("bert")
    config.intermediate_size = 48  # same module names, different shapes
    other = tmp / "other-base"
    tf.AutoModel.from_config(config).save_pretrained(other)
    tokenizer().save_pretrained(other)
    adapter = build_adapter(other, tmp / "mismatched", seed=7, family="bert", targets=["dense"])
    code, message = _merge(capsys, base, [adapter], tmp / "out")
    _assert_refused(code, message, tmp / "out", "mismatched", "intermediate.dense", "48")


def test_lora_on_an_embedding_layer_is_refused_by_name(workspace, capsys):
    """PEFT saves lora_embedding_A/B (and the base embedding) for a LoRA on embeddings;
    the merge solves linear layers only and says so, naming the layer."""
    base, adapters, tmp = workspace
    adapter = build_adapter(base, tmp / "embedding", seed=3, family="bert", targets=["word_embeddings", "query"])
    code, message = _merge(capsys, base, [adapters[0], adapter], tmp / "out")
    _assert_refused(code, message, tmp / "out", "adapter_model.safetensors", "embedding layer",
                    "embeddings.word_embeddings")


@pytest.mark.filterwarnings("ignore:Model has .tie_word_embeddings=True:UserWarning",
                            "ignore:Setting .save_embedding_layers. to .True.:UserWarning")
def test_a_saved_copy_of_a_base_layer_is_refused_by_name(tmp_path, capsys):
    """A LoRA on the output layer (here of a model with tied embeddings; untied is the
    same): PEFT saves the layer's base weight beside the factors. The merge names it
    instead of a bare 'unexpected tensor'."""
    base = tmp_path / "base"
    tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       num_key_value_heads=1, vocab_size=30522, tie_word_embeddings=True)
                        ).save_pretrained(base)
    tokenizer().save_pretrained(base)
    adapters = [build_adapter(base, tmp_path / f"a{seed}", seed=seed, family="llama", task_type="CAUSAL_LM",
                              targets=["q_proj", "lm_head"]) for seed in range(2)]
    code, message = _merge(capsys, base, adapters, tmp_path / "out")
    _assert_refused(code, message, tmp_path / "out", "adapter_model.safetensors", "copy of the base layer lm_head",
                    "save_embedding_layers=False")


@pytest.mark.filterwarnings("ignore:Model has .tie_word_embeddings=True:UserWarning")
def test_a_saved_tensor_no_modules_to_save_entry_names_is_refused_by_name(tmp_path, capsys):
    """``ensure_weight_tying`` saves ``lm_head.weight``, the tied copy of a saved embedding. Any
    saved tensor passed once ``modules_to_save`` was non-empty: with the tie dropped from the
    config (as merges wrote it), or onto a base that does not tie lm_head, PEFT loads it into
    the base model's own lm_head, which the adapter then changes even when disabled. Both are
    refused naming it, by the merge and the daemon's check; so is a merge of saved modules
    that one input ties and another saves apart."""
    from builders import build_tied_llama
    from iteris_daemon.errors import AdapterError
    from iteris_daemon.validation import validate_adapter

    tied_base, untied_base = build_tied_llama(tmp_path / "tied"), build_tiny_model("llama", tmp_path / "untied",
                                                                                   "CAUSAL_LM")
    tied = build_adapter(tied_base, tmp_path / "tied-adapter", seed=1, family="llama", task_type="CAUSAL_LM",
                         targets=["q_proj"], modules_to_save=["embed_tokens"], ensure_weight_tying=True)
    untie = tmp_path / "untie"
    shutil.copytree(tied, untie)
    config = json.loads((untie / "adapter_config.json").read_text())
    (untie / "adapter_config.json").write_text(json.dumps({**config, "ensure_weight_tying": False}))
    said = "tensor 'base_model.model.lm_head.weight' lies under no module that modules_to_save"
    code, message = _merge(capsys, tied_base, [untie], tmp_path / "out", "--strategy", "task_arithmetic")
    _assert_refused(code, message, tmp_path / "out", "untie/adapter_model.safetensors", said,
                    "PEFT would load it into the base model's own lm_head")
    with pytest.raises(AdapterError, match=said):
        validate_adapter(untie, base_model=str(tied_base))

    said = "lm_head.weight is saved as the copy ensure_weight_tying keeps of a tied module, but the base model"
    code, message = _merge(capsys, untied_base, [tied], tmp_path / "out", "--strategy", "task_arithmetic")
    _assert_refused(code, message, tmp_path / "out", "tied-adapter/adapter_model.safetensors", said)
    with pytest.raises(AdapterError, match=said):
        validate_adapter(tied, base_model=str(untied_base))

    apart = build_adapter(tied_base, tmp_path / "apart", seed=2, family="llama", task_type="CAUSAL_LM",
                          targets=["q_proj"], modules_to_save=["embed_tokens", "lm_head"])
    code, message = _merge(capsys, tied_base, [tied, apart], tmp_path / "out", "--strategy", "task_arithmetic",
                           "--modules-to-save-rule", "average")
    _assert_refused(code, message, tmp_path / "out", "differ in ensure_weight_tying")


@pytest.mark.filterwarnings("ignore:Setting .save_embedding_layers. to .True.:UserWarning")
def test_an_adapter_with_a_resized_vocabulary_says_so(tmp_path, capsys):
    """Tokens added, the embeddings resized and saved (``modules_to_save=[embed_tokens,
    lm_head]``): PEFT also writes its ``.modules_to_save.weight`` and ``.original_module.weight``
    copies, and the merge refused "lm_head.modules_to_save.weight has no parameter in the base
    model" (without the copies, a bare shape message), though the README said a resized
    embedding merges. The merge and the daemon's check now say the vocabulary was resized and
    what merges it (tests/test_merge.py merges it so)."""
    from iteris_daemon.errors import AdapterError
    from iteris_daemon.validation import validate_adapter

    base = build_tiny_model("llama", tmp_path / "base", "CAUSAL_LM")
    adapter = build_adapter(base, tmp_path / "tools", seed=1, family="llama", task_type="CAUSAL_LM",
                            modules_to_save=["embed_tokens", "lm_head"], added_tokens=["<tool>", "</tool>"])
    said = (f"tools/adapter_model.safetensors: lm_head.weight: the adapter's vocabulary was resized (30524 tokens "
            f"against the base model's 30522); it does not merge onto {base}: save that model resized to 30524 tokens, "
            "with the adapter's tokenizer, and merge onto that folder")
    code, message = _merge(capsys, base, [adapter], tmp_path / "out")
    _assert_refused(code, message, tmp_path / "out", said)
    with pytest.raises(AdapterError) as refused:
        validate_adapter(adapter, base_model=str(base))
    assert str(refused.value).endswith(said)


@pytest.mark.filterwarnings("ignore:Setting .save_embedding_layers. to .True.:UserWarning")
@pytest.mark.parametrize("command", ["merge", "compare"])
@pytest.mark.parametrize("rule", ["agree", "average", "good"])
def test_a_resized_vocabulary_is_said_before_the_modules_to_save_rule(tmp_path, capsys, rule, command):
    """Beside an adapter without saved modules, one that saved a resized lm_head was refused as
    "adapters carry different modules_to_save … choose a rule with --modules-to-save-rule";
    following that advice gave another refusal, and only its own name as the rule said the
    vocabulary was resized. Each adapter is checked against the base model first, by
    ``merge`` and ``compare`` alike."""
    base = build_tiny_model("llama", tmp_path / "base", "CAUSAL_LM")
    good = build_adapter(base, tmp_path / "good", seed=0, family="llama", task_type="CAUSAL_LM")
    tools = build_adapter(base, tmp_path / "tools", seed=1, family="llama", task_type="CAUSAL_LM",
                          modules_to_save=["embed_tokens", "lm_head"], added_tokens=["<tool>", "</tool>"])
    if command == "merge":
        code, message = _merge(capsys, base, [good, tools], tmp_path / "out", "--modules-to-save-rule", rule)
    else:
        code = main(["compare", "--base-model", str(base), "-q", "--adapter", str(good), "--adapter", str(tools),
                     "--modules-to-save-rule", rule])
        message = capsys.readouterr().err.strip().splitlines()[-1]
    _assert_refused(code, message, tmp_path / "out", "tools/adapter_model.safetensors: lm_head.weight: the adapter's "
                    "vocabulary was resized (30524 tokens against the base model's 30522)")


def test_a_saved_matrix_of_another_row_count_is_no_resized_vocabulary():
    """Only the vocabulary's rows (the largest embedding's) are called a resized vocabulary;
    a head of another label count beside 2 token types keeps the shape message."""
    from iteris_daemon.errors import AdapterError
    from iteris_daemon.shapes import check_shapes

    shapes = {"layers": {}, "other": {"bert.embeddings.word_embeddings": "Embedding",
                                      "bert.embeddings.token_type_embeddings": "Embedding"},
              "parameters": {"bert.embeddings.word_embeddings.weight": [30522, 32],
                             "bert.embeddings.token_type_embeddings.weight": [2, 32], "classifier.weight": [2, 32]}}
    with pytest.raises(AdapterError, match=r"classifier\.weight is \(3, 32\), base model has \(2, 32\)$"):
        check_shapes(shapes, {}, {"classifier.weight": (3, 32)}, Path("a"), "base")
    with pytest.raises(AdapterError, match=r"vocabulary was resized \(30600 tokens against the base model's 30522\)"):
        check_shapes(shapes, {}, {"bert.embeddings.word_embeddings.weight": (30600, 32)}, Path("a"), "base")


def test_trained_base_biases_are_refused_by_name(workspace, tmp_path, capsys):
    """PEFT's bias="lora_only" trains (and saves) the biases of the adapted layers; a merge
    of B A factors would drop them. A model with no biases saves none: that adapter is
    plain and merges."""
    base, adapters, tmp = workspace
    adapter = build_adapter(base, tmp / "biased", seed=3, family="bert", targets=["query"], bias="lora_only")
    code, message = _merge(capsys, base, [adapters[0], adapter], tmp / "out")
    _assert_refused(code, message, tmp / "out", "adapter_model.safetensors", "trains the bias of",
                    "attention.self.query", "bias='lora_only'")

    llama = tmp_path / "llama"
    tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       num_key_value_heads=1, vocab_size=30522)).save_pretrained(llama)
    tokenizer().save_pretrained(llama)
    plain = [build_adapter(llama, tmp_path / f"l{seed}", seed=seed, family="llama", task_type="CAUSAL_LM",
                           targets=["q_proj", "v_proj"], bias="all" if seed else "none") for seed in range(2)]
    assert cli_merge(llama, plain, tmp_path / "merged", "--param", "iterations=1") == 0


@pytest.mark.parametrize(
    "content, fragment",
    [(b"", "empty"), (b'{"text": "ok"}\n{"text": "fine"}\nnot json\n', ":3"), (b'{"txt": "typo"}\n', ":1"),
     (b'{"text": "ok"}\n{"messages": "hi"}\n', '2: "messages" must be a non-empty list'),
     (b'{"messages": [{"role": "user"}]}\n', 'messages[0] must have string "role" and "content"'),
     (b'{"messages": [{"role": "user", "content": "hi"}], "text": "x"}\n', ':1: a "messages" sample takes no "text"'),
     (b'{"id": 7, "messages": [{"role": "user", "content": "hi"}], "target": "x"}\n', 'sample takes no "target"'),
     (b'{"messages": [{"role": "user", "content": "hi"}], "text_pair": null}\n', 'sample takes no "text_pair"'),
     (b'{"messages": [{"role": "user", "content": " "}]}\n', "has no content"),
     # valid JSON, yet no tokenizer takes a lone surrogate: a TypeError after the model load
     (b'{"text": "ok"}\n{"text": "a \\ud800 b"}\n', "calibration.jsonl:2: holds an unpaired surrogate escape"),
     (b'{"text": "ok", "target": "\\udfff"}\n', ":1: holds an unpaired surrogate"),
     (b'{"messages": [{"role": "user", "content": "\\ud83d"}]}\n', ":1: holds an unpaired surrogate")],
)
def test_bad_calibration_file(workspace, capsys, content, fragment):
    base, adapters, tmp = workspace
    calibration = adapters[0] / "calibration.jsonl"
    calibration.write_bytes(content)
    code, message = _merge(capsys, base, adapters, tmp / "out")
    _assert_refused(code, message, tmp / "out", "calibration.jsonl", fragment)


def test_a_calibration_file_that_is_no_regular_file_says_what_it_is(workspace, capsys, tmp_path):
    """/dev/null and a symlink loop were "calibration file does not exist"."""
    base, adapters, tmp = workspace
    loop = tmp / "loop.jsonl"
    loop.symlink_to(loop)
    for path, says in ((Path("/dev/null"), "calibration file is not a regular file"),
                       (loop, "calibration file is a symlink to nothing (or a loop)")):
        code, message = _merge(capsys, base, [f"{adapters[0]}={path}", adapters[1]], tmp / "out")
        _assert_refused(code, message, tmp / "out", f"{path}: {says}")


def test_a_byte_order_mark_is_not_part_of_the_first_line(workspace, capsys):
    """Some editors start UTF-8 files with a BOM; the first line was "not valid JSON"."""
    from iteris_daemon.calibration import read_jsonl

    base, adapters, tmp = workspace
    path = tmp / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "first"}\n{"text": "second"}\n')
    assert [s.text for s in read_jsonl(path).samples] == ["first", "second"]


def test_a_task_with_fewer_samples_than_asked_is_logged(workspace, capsys, caplog):
    base, adapters, tmp = workspace
    assert _merge(capsys, base, adapters, tmp / "out", "--param", "iterations=1")[0] == 0
    assert f"task {adapters[0].name}: 12 calibration samples, fewer than the 50 asked for" in caplog.messages


def test_max_length_beyond_the_models_positions_is_cut_there(workspace, capsys, caplog):
    """``max_length`` 200 on a model with 128 positions: a 300-word sample ended in an
    IndexError (GPT-2) or a size mismatch (BERT). Samples are cut at what the model reads."""
    base, adapters, tmp = workspace
    long = tmp / "long.jsonl"
    long.write_text(json.dumps({"text": " ".join(["market"] * 300)}) + "\n")
    code, _ = _merge(capsys, base, [f"{adapters[0]}={long}", adapters[1]], tmp / "out", "--param", "max_length=200",
                     "--param", "iterations=1")
    assert code == 0
    assert any(r.getMessage() == f"max_length 200 is more than {base} reads (128 tokens): samples are cut at 128"
               for r in caplog.records)
    # and the set's own count, without the advice to raise max_length, which would keep nothing more
    assert f"{long}: 1 of 1 samples are longer than the 128 tokens {base} reads and are cut there (the longest " \
           "has 302 tokens)" in caplog.messages


def test_no_calibration_for_iteris(workspace, capsys):
    base, adapters, tmp = workspace
    (adapters[1] / "calibration.jsonl").unlink()
    code, message = _merge(capsys, base, adapters, tmp / "out")
    _assert_refused(code, message, tmp / "out", "no calibration data", adapters[1].name)


def test_calibration_file_given_on_the_command_line_wins(workspace, capsys):
    """Also when --calibration-order does not list ``files``: the folder's own file was used."""
    base, adapters, tmp = workspace
    missing = tmp / "missing.jsonl"
    code, message = _merge(capsys, base, [f"{adapters[0]}={missing}", adapters[1]], tmp / "out")
    _assert_refused(code, message, tmp / "out", str(missing))
    given = tmp / "given.jsonl"
    shutil.copy(adapters[1] / "calibration.jsonl", given)
    code, _ = _merge(capsys, base, [f"{adapters[0]}={given}", adapters[1]], tmp / "out", "--calibration-order",
                     "adapter", "--strategy", "task_arithmetic")
    report = json.loads((tmp / "out" / "merge_report.json").read_text())
    assert code == 0 and [i["calibration"]["source"] for i in report["inputs"]] == [
        str(given), str(adapters[1] / "calibration.jsonl")]


def test_the_report_names_relative_paths_by_their_absolute_ones(workspace, capsys, monkeypatch):
    """Given relative to the working directory, the base, the adapters and a calibration file
    were written to the report as given: read anywhere else, "base" looks like a Hub id and
    "a0" names nothing."""
    base, adapters, tmp = workspace
    monkeypatch.chdir(tmp)
    shutil.copytree(base, tmp / "base")
    shutil.copy(adapters[0] / "calibration.jsonl", tmp / "given.jsonl")
    code, _ = _merge(capsys, "base", [f"{adapters[0].name}=given.jsonl", adapters[1].name], "out",
                     "--strategy", "task_arithmetic")
    report = json.loads((tmp / "out" / "merge_report.json").read_text())
    assert code == 0 and report["base_model"] == str(tmp / "base")
    assert [(i["path"], i["calibration"]["source"]) for i in report["inputs"]] == [
        (str(adapters[0]), str(tmp / "given.jsonl")), (str(adapters[1]), str(adapters[1] / "calibration.jsonl"))]


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--strategy", "nonesuch"], "unknown strategy 'nonesuch'"),
        (["--param", "iterationz=3"], "iterationz"),
        (["--param", "iterations=0"], "iterations"),
        (["--param", "a1=-1"], "a1"),
        (["--param", "task_weights=[1]"], "task_weights has 1 entry for 2 adapters"),
        (["--param", "task_weights=[0, 0]"], "task_weights are all 0"),
        # a zero delta written with exit 0; negative weights stay legal (task negation)
        *[(["--strategy", s, "--param", "weights=[0, 0]"], "weights are all 0")
          for s in ("task_arithmetic", "ties", "dare", "peft_cat", "peft_ties_svd")],
        (["--strategy", "peft_cat", "--param", "weights=[]"], "weights has 0 entries for 2 adapters"),  # was 1 each
        # the last one silently won, as compare refuses a key given twice in a spec
        (["--strategy", "ties", "--param", "density=0.3", "--param", "density=0.9"], "--param density is given twice"),
        (["--strategy", "ties", "--strategy", "dare"], "--strategy is given twice (ties, dare)"),
        (["--param", "samples_per_task=true"], "samples_per_task: Input should be a valid integer"),  # was 1
        (["--param", "blockwise=1"], "blockwise: Input should be a valid boolean"),
        # PEFT wrote B (d_out x 32) with A (40 x d_in): "returned factors of shapes", a contract error
        (["--strategy", "peft_svd", "--param", "svd_rank=40"], "svd_rank 40 is more than layer"),
        # BERT's tokenizer keeps [CLS] and [SEP]: max_length 2 cut nothing, and the report said 2
        (["--param", "max_length=2"], "max_length 2 leaves no room for text: the tokenizer of"),
    ],
)
def test_bad_strategy_or_parameters(workspace, capsys, extra, fragment):
    base, adapters, tmp = workspace
    code, message = _merge(capsys, base, adapters, tmp / "out", *extra)
    _assert_refused(code, message, tmp / "out", fragment)


@pytest.mark.parametrize("strategy, param", [("iteris", "task_weights"), ("ties", "weights"), ("peft_cat", "weights")])
def test_per_adapter_values_of_another_count_are_refused_before_the_base_model_loads(workspace, capsys, monkeypatch,
                                                                                    strategy, param):
    """Each strategy checked the count itself, after the base model (70B, say) had loaded."""
    import iteris_daemon.merge as merge

    base, adapters, tmp = workspace
    monkeypatch.setattr(merge, "load_base", lambda *args: pytest.fail("the base model was loaded"))
    code, message = _merge(capsys, base, adapters, tmp / "out", "--strategy", strategy, "--param", f"{param}=[1, 2, 3]")
    _assert_refused(code, message, tmp / "out", f"strategy {strategy!r}: {param} has 3 entries for 2 adapters")


@pytest.mark.parametrize("param, says", [
    ("density=.5", "write 0.5"), ("density=+0.5", "write 0.5"), ("density=5.", "write 5.0"),
    ("weights=[1,2,]", 'Expecting value at character 5; a string is written in quotes, weights="..."'),
])
def test_a_value_that_starts_like_a_number_or_list_but_is_no_json_is_named(workspace, capsys, param, says):
    """It was taken for a string: "density: Input should be a valid number" for ``density=.5``."""
    base, adapters, tmp = workspace
    with pytest.raises(SystemExit) as exited:  # argparse's usage error
        cli_merge(base, adapters, tmp / "out", "--strategy", "ties", "--param", param)
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert exited.value.code == 2 and message.endswith(f"argument --param: {param}: not a JSON value ({says})")
    assert not (tmp / "out").exists()


def test_a_bare_string_parameter_stays_a_string_whatever_it_starts_with():
    from iteris_daemon.strategy import parse_param

    for value in ("ties", "./calibration", "-x", "."):
        assert parse_param(f"label={value}") == ("label", value)


def test_a_solve_that_overflows_under_a_huge_a1_names_the_values(workspace, capsys):
    """``a1=1e300`` overflowed the solve, and the error advised to "raise a1/a2" (QA CLI): it
    names the values now and says which way to move them."""
    base, adapters, tmp = workspace
    code, message = _merge(capsys, base, adapters, tmp / "out", "--param", "a1=1e300", "--param", "iterations=1")
    _assert_refused(code, message, tmp / "out", "the solve produced NaN/Inf (a1 = 1e+300, a2 = 0.001): raise them "
                    "where they are near 0, lower them where they are huge, or check the calibration data")


def test_existing_output_is_kept(workspace, capsys):
    """A folder that is no merge's is kept with --overwrite too: `--out ~/project --overwrite`
    (a typo) replaced the whole tree by the merge (QA CLI); a previous merge's is replaced."""
    base, adapters, tmp = workspace
    out = tmp / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, message = _merge(capsys, base, adapters, out)
    assert code == 2 and "--overwrite" in message
    code, message = _merge(capsys, base, adapters, out, "--overwrite")
    refused = (f"iteris-daemon: error: {out}: holds no merge (no merge_report.json: a trained adapter or any other "
               "folder), so --overwrite does not replace it: all its files would be deleted; remove it yourself, or "
               "choose another --out")
    assert code == 2 and message == refused, message
    (out / "adapter_config.json").write_text("{}")  # a training run's folder: an adapter, a checkpoint, its log
    assert _merge(capsys, base, adapters, out, "--overwrite") == (2, refused)
    assert (out / "keep.txt").read_text() == "precious"
    (out / "adapter_config.json").unlink()
    (out / "keep.txt").unlink()
    flags = ("--strategy", "task_arithmetic", "--no-eval")
    assert _merge(capsys, base, adapters, out, *flags)[0] == 0  # empty: no --overwrite needed
    assert _merge(capsys, base, adapters, out, *flags, "--overwrite")[0] == 0  # a merge's: replaced
    assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("which", ["adapter", "parent of an adapter", "base model", "calibration file's folder",
                                   "inside an adapter", "inside the base model"])
def test_an_output_that_would_replace_an_input_is_refused(workspace, capsys, which):
    """With --overwrite, --out naming an adapter (or the base model, or a folder holding an
    input) replaced it: the adapter's weights and calibration data were gone, or the merge
    named itself as its base. An output inside an input folder wrote the merge into it (an
    adapter folder holding another adapter). Refused before anything is loaded, and nothing changes."""
    base, adapters, tmp = workspace
    calibration = tmp / "calib" / "data.jsonl"
    calibration.parent.mkdir()
    shutil.copy(adapters[1] / "calibration.jsonl", calibration)
    out = {"adapter": adapters[0], "parent of an adapter": tmp, "base model": Path(base),
           "calibration file's folder": calibration.parent, "inside an adapter": adapters[0] / "merged",
           "inside the base model": Path(base) / "merged"}[which]
    watched = out if out.exists() else out.parent
    before = _tree(watched)
    code = cli_merge(base, [adapters[0], f"{adapters[1]}={calibration}"], out, "--overwrite")
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and message.startswith(f"iteris-daemon: error: {out}: the output would replace or write into ")
    assert message.endswith(", which the merge reads; choose another --out") and _tree(watched) == before


@pytest.mark.parametrize("kind", ["dangling symlink", "file", "symlink to a folder"])
def test_an_output_that_is_not_a_folder(workspace, capsys, kind):
    """A dangling symlink as --out was taken for a free name: the whole merge ran, then the
    rename failed in a traceback. A file or a symlink replaced with --overwrite left
    ``.NAME.old`` beside it. Now each needs --overwrite, and is replaced cleanly."""
    base, adapters, tmp = workspace
    out, elsewhere = tmp / "out", tmp / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("kept")
    if kind == "file":
        out.write_text("x")
    else:
        out.symlink_to(tmp / "nowhere" if kind == "dangling symlink" else elsewhere)
    code, message = _merge(capsys, base, adapters, out, "--strategy", "task_arithmetic", "--no-eval")
    expected = {"dangling symlink": f"{out}: is a symlink to {tmp / 'nowhere'}, which does not exist (use --overwrite "
                                    "to replace the link)",
                "file": f"{out}: exists and is not a folder (use --overwrite to replace it)",
                "symlink to a folder": f"{out}: output folder exists and is not empty (use --overwrite to replace it)"}
    assert code == 2 and message == f"iteris-daemon: error: {expected[kind]}"
    code, _ = _merge(capsys, base, adapters, out, "--strategy", "task_arithmetic", "--no-eval", "--overwrite")
    assert code == 0 and not out.is_symlink() and (out / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in tmp.iterdir() if p.name.startswith(".")) == []  # no .out.old left
    assert (elsewhere / "keep.txt").read_text() == "kept"  # a link is replaced, not what it points to


def test_an_output_linked_to_an_empty_folder_is_written_there(workspace, capsys):
    """``ln -s /bigdisk/merged out; merge --out out``: accepted (the folder is empty), then the
    link was replaced by a folder on the link's own disk and /bigdisk/merged stayed empty (QA CLI)."""
    base, adapters, tmp = workspace
    out, bigdisk = tmp / "out", tmp / "bigdisk" / "merged"
    bigdisk.mkdir(parents=True)
    out.symlink_to(bigdisk)
    code, _ = _merge(capsys, base, adapters, out, "--strategy", "task_arithmetic", "--no-eval")
    assert code == 0 and out.is_symlink() and os.readlink(out) == str(bigdisk)
    assert (bigdisk / "adapter_model.safetensors").is_file() and (bigdisk / "merge_report.json").is_file()
    assert not [p.name for p in (tmp, bigdisk.parent) for p in p.iterdir() if p.name.startswith(".")]
    # Again with --overwrite: the link was replaced by a folder on its own disk, and what reads
    # /bigdisk/merged kept the old merge (QA DOC). The merge there is replaced, the link kept.
    first = (bigdisk / "merge_report.json").read_text()
    code, _ = _merge(capsys, base, adapters, out, "--strategy", "ties", "--no-eval", "--overwrite")
    assert code == 0 and out.is_symlink() and os.readlink(out) == str(bigdisk)
    assert json.loads((bigdisk / "merge_report.json").read_text())["strategy"] == "ties" != json.loads(first)["strategy"]
    assert not [p.name for p in (tmp, bigdisk.parent) for p in p.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("where", [".", "..", "here"])
def test_an_output_that_is_the_current_folder_is_refused_before_merging(workspace, capsys, monkeypatch, where):
    """``cd merged && merge --out .`` merged, then failed in a traceback (``PosixPath('.') has an
    empty name``); ``--out .. --overwrite`` with EBUSY (QA CLI). Refused before loading now."""
    base, adapters, tmp = workspace
    here = tmp / "runs" / "merged"  # .. holds no input (one that did would be refused for that)
    here.mkdir(parents=True)
    monkeypatch.chdir(here)
    out = Path(where) if where != "here" else here
    code, message = _merge(capsys, base, adapters, out, "--strategy", "task_arithmetic", "--no-eval", "--overwrite")
    assert code == 2 and message == (f"iteris-daemon: error: {out}: is the current folder or one above it, which "
                                     "cannot be replaced (the merge writes a new folder beside --out and renames it "
                                     "into place); give --out a folder of its own, such as merged"), message
    assert not any(here.iterdir())


def test_an_output_at_a_mount_point_is_refused_before_merging(workspace, capsys):
    """Docker's ``-v ./merged:/out ... --out /out``: the whole merge ran, then the rename over the
    mount point failed in a traceback, EBUSY, exit 1 (QA CLI). A real tmpfs mount point here."""
    from mounts import tmpfs

    base, adapters, tmp = workspace
    with tmpfs(tmp / "out", 1 << 20) as out:
        code, message = _merge(capsys, base, adapters, out, "--strategy", "task_arithmetic", "--no-eval")
        assert code == 2 and message == (f"iteris-daemon: error: {out}: is a mount point, which cannot be renamed "
                                         "over (the merge writes a new folder beside --out and renames it into "
                                         f"place); give a folder inside it, such as {out / 'merged'}"), message
        assert not any(out.iterdir())
        code, _ = _merge(capsys, base, adapters, out / "merged", "--strategy", "task_arithmetic", "--no-eval")
        assert code == 0 and (out / "merged" / "adapter_model.safetensors").is_file()


def test_a_full_disk_while_writing_the_merge_is_one_line(workspace, capsys):
    """The output's disk filled while the merge was written: ``OSError: [Errno 28]`` in a
    traceback, exit 1 (QA CLI). One line, exit 2, nothing left behind. A real 8 KiB tmpfs."""
    from mounts import tmpfs

    base, adapters, tmp = workspace
    with tmpfs(tmp / "small", 8 << 10) as small:
        out = small / "merged"
        code, message = _merge(capsys, base, adapters, out, "--strategy", "task_arithmetic", "--no-eval")
        assert code == 2 and message == (f"iteris-daemon: error: {out}: cannot write the merge: No space left on "
                                         "device; nothing was written"), message
        assert not any(small.iterdir())


def test_an_output_that_appears_during_the_merge_is_not_replaced(workspace, capsys, monkeypatch):
    """A second merge to the same --out (a sweep script), or the user, made the folder while
    this one merged: it was replaced at the end, its files gone, exit 0 (QA CLI). It is left as
    it is now, and the error names where the merge was written. The other writer is a stand-in
    that writes the folder when the merge starts writing its own."""
    import iteris_daemon.merge as merge_module

    base, adapters, tmp = workspace
    out = tmp / "out"
    save = merge_module.save_adapter

    def meanwhile(*args, **kwargs):
        out.mkdir()
        (out / "precious.txt").write_text("kept")
        return save(*args, **kwargs)

    monkeypatch.setattr(merge_module, "save_adapter", meanwhile)
    code, message = _merge(capsys, base, adapters, out, "--strategy", "task_arithmetic", "--no-eval")
    kept = Path(message.split("the merge is in ", 1)[-1].split(" (", 1)[0])
    assert code == 2 and message == (f"iteris-daemon: error: {out}: appeared during the merge and is not empty, so it "
                                     f"was left as it is; the merge is in {kept} (move it, or merge again with "
                                     "--overwrite)"), message
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"] and kept.parent == tmp
    assert (kept / "adapter_model.safetensors").is_file() and (kept / "merge_report.json").is_file()


# ``merge ARGS`` in a process of its own that stops once the adapter is written into its
# staging folder (gigabytes, for an LLM), says where, and waits there to be killed.
_STALLED_WRITER = """
import sys, time
import iteris_daemon.merge as merge
from iteris_daemon.cli import main
save = merge.save_adapter
def stalled(folder, *args, **kwargs):
    save(folder, *args, **kwargs)
    print(folder, flush=True)
    time.sleep(600)
merge.save_adapter = stalled
sys.exit(main(sys.argv[1:]))
"""


def test_the_partial_copies_of_killed_merges_are_removed_by_the_next_merge_to_the_output(workspace, capsys):
    """A merge killed while it wrote (SIGKILL, the OOM killer, or SIGTERM, which the CLI did
    not handle) left its hidden staging folder ``.OUT.xxxxxxxx`` beside --out, a partial
    adapter nothing removed, one more per kill (QA LEAK). Now SIGTERM stops the merge as
    Ctrl-C does (its folder removed, exit 130), and the next merge to OUT removes the folders
    of killed writers: never one whose writer still runs (its lock is held), a whole merge an
    error named (it has merge_report.json), an empty folder (a writer between its mkdir and its
    lock), another output's (``.out.v2.*``), or what a link points to."""
    import signal
    import subprocess
    import sys

    base, adapters, tmp = workspace
    out = tmp / "out"
    argv = ["merge", "--base-model", str(base), "--out", str(out), "-q", "--strategy", "task_arithmetic", "--no-eval",
            *(f"--adapter={a}" for a in adapters)]
    killed, live = (subprocess.Popen([sys.executable, "-c", _STALLED_WRITER, *argv], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True) for _ in range(2))
    try:
        staging = {process: Path(process.stdout.readline().strip()) for process in (killed, live)}
        for process, folder in staging.items():  # both got as far as a partial merge, beside --out
            assert folder.parent == tmp and folder.name.startswith(".out."), process.stderr.read()
            assert (folder / "adapter_model.safetensors").is_file() and not (folder / "merge_report.json").exists()
        killed.kill()
        assert killed.wait(timeout=60) == -signal.SIGKILL and staging[killed].is_dir()  # left behind
        whole, empty, other, pointed = tmp / ".out.k33p1ng0", tmp / ".out.3mpty000", tmp / ".out.v2.abcdefgh", tmp / "p"
        for folder in (whole, other, pointed):
            shutil.copytree(staging[killed], folder)
        (whole / "merge_report.json").write_text("{}")
        empty.mkdir()
        (tmp / ".out.l1nk0000").symlink_to(pointed)
        assert cli_merge(base, adapters, out, "--strategy", "task_arithmetic", "--no-eval") == 0
        assert (out / "merge_report.json").is_file()
        assert not staging[killed].exists()
        assert sorted(tmp.glob(".out.*")) == sorted([staging[live], whole, empty, other, tmp / ".out.l1nk0000"])
        assert (staging[live] / "adapter_model.safetensors").is_file() and any(pointed.iterdir())
        live.send_signal(signal.SIGTERM)  # as Ctrl-C: its staging folder is removed
        assert live.wait(timeout=60) == 130 and live.stderr.read().endswith("iteris-daemon: interrupted\n")
        assert not staging[live].exists() and (out / "merge_report.json").is_file()
    finally:
        for process in (killed, live):
            process.kill()
            process.wait()
            process.stdout.close()
            process.stderr.close()


def test_different_heads_need_a_rule(tmp_path, capsys):
    """Adapters whose modules_to_save (classifier heads) differ are not silently merged."""
    base = build_tiny_model("bert", tmp_path / "cls-base", "SEQ_CLS")
    adapters = [
        build_adapter(base, tmp_path / f"cls{seed}", seed=seed, family="bert", task_type="SEQ_CLS", targets=["query"])
        for seed in range(2)
    ]
    code, message = _merge(capsys, base, adapters, tmp_path / "out")
    _assert_refused(code, message, tmp_path / "out", "modules_to_save", "--modules-to-save-rule")

    code, _ = _merge(capsys, base, adapters, tmp_path / "out", "--modules-to-save-rule", "average")
    assert code == 0
    merged, first, second = (load_adapter(p) for p in (tmp_path / "out", *adapters))
    for key, tensor in merged.modules_to_save.items():
        assert (tensor - (first.modules_to_save[key] + second.modules_to_save[key]) / 2).abs().max() < 1e-6


def test_a_lora_on_a_module_another_adapter_saves_whole_is_refused(tmp_path, capsys):
    """One adapter with a LoRA on ``lm_head``, another saving ``lm_head`` whole: the merged
    config listed it in target_modules and modules_to_save, PEFT loaded the saved head and
    ignored the LoRA on it without a word, and the report scored the delta the served model
    lacks (QA MIX). Refused now, naming the module and both adapters, whatever the rule that
    takes the saved head; the rule that takes the other adapter's (no head) merges."""
    base = build_tiny_model("llama", tmp_path / "base", "CAUSAL_LM")
    head_lora = build_adapter(base, tmp_path / "H", seed=5, family="llama", targets=["q_proj", "lm_head"],
                              task_type="CAUSAL_LM", save_embedding_layers=False)
    saved = build_adapter(base, tmp_path / "S", seed=6, family="llama", targets=["q_proj"], task_type="CAUSAL_LM",
                          modules_to_save=["lm_head"])
    for rule in ("agree", "S", "average"):
        code, message = _merge(capsys, base, [head_lora, saved], tmp_path / "out", "--strategy", "task_arithmetic",
                               "--modules-to-save-rule", rule, "--no-eval")
        _assert_refused(code, message, tmp_path / "out", "lm_head carries a LoRA in H and is saved whole "
                        "(modules_to_save) in S: PEFT loads the saved module in its place and ignores a LoRA on it")
    code, _ = _merge(capsys, base, [head_lora, saved], tmp_path / "out", "--strategy", "task_arithmetic",
                     "--modules-to-save-rule", "H", "--no-eval")
    assert code == 0 and "lm_head" in load_adapter(tmp_path / "out").modules and not load_adapter(
        tmp_path / "out").modules_to_save


def test_the_label_count_comes_from_the_head(tmp_path, capsys):
    """A 3-label classifier adapter that also saves ``token_type_embeddings`` (2 rows) loaded
    its base with 2 labels, the smallest saved matrix: without disk offload the merge ended
    in a traceback, and the daemon's check refused the adapter ("classifier.bias is (3,),
    base model has (2,)"). A base checkpoint whose own head has another label count loads (the
    adapter's head replaces it). Heads of different label counts cannot be merged, whatever the
    rule: one line before the base model loads (with an adapter's name as the rule, the error
    named the base model's classifier after the first adapter's: "ner5/...: classifier.bias is
    (5,), base model has (3,)", once the base had loaded)."""
    import transformers as tf

    from iteris_daemon.shapes import head_labels
    from iteris_daemon.validation import validate_adapter

    assert head_labels({"bert.embeddings.token_type_embeddings.weight": (2, 32), "classifier.weight": (3, 32)}) == 3
    assert head_labels({"classifier.dense.weight": (32, 32), "classifier.out_proj.weight": (5, 32)}) == 5
    assert head_labels({"model.classification_head.out_proj.weight": (4, 32), "score.bias": (4,)}) == 4
    assert head_labels({"bert.pooler.dense.weight": (32, 32)}) is None
    base = tmp_path / "base"
    tf.AutoModelForSequenceClassification.from_config(tf.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128)).save_pretrained(base)  # a generic base: 2 labels in its config
    tokenizer().save_pretrained(base)
    three, four = (_head_adapter(base, tmp_path, labels) for labels in (3, 4))
    validate_adapter(three, base_model=str(base))
    assert _merge(capsys, base, [three], tmp_path / "out", "--offload", "none")[0] == 0
    for rule in ("average", "agree", four.name):
        code = cli_merge(base, [three, four], tmp_path / "mixed", "--modules-to-save-rule", rule)
        err = capsys.readouterr().err
        _assert_refused(code, err.strip().splitlines()[-1], tmp_path / "mixed", "modules_to_save classifier.bias "
                        f"differs in shape between adapters ({{'{three.name}': (3,), '{four.name}': (4,)}}): a merged "
                        "adapter carries one head")
        assert "loading base model" not in err


def _head_adapter(base: Path, tmp_path: Path, labels: int) -> Path:
    """An adapter of ``base`` trained as a ``labels``-way classifier, saving its head and the
    token type embeddings."""
    import transformers as tf

    start = tmp_path / f"base-{labels}"
    tf.AutoModelForSequenceClassification.from_pretrained(base, num_labels=labels,
                                                     ignore_mismatched_sizes=True).save_pretrained(start)
    tokenizer().save_pretrained(start)
    adapter = build_adapter(start, tmp_path / f"labels-{labels}", seed=labels, family="bert", task_type="SEQ_CLS",
                            targets=["query"], modules_to_save=["classifier", "token_type_embeddings"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    return adapter


def test_adapters_of_different_task_types_are_named_before_the_model_loads(workspace, capsys):
    """The message listed the types only ("['CAUSAL_LM', 'None']"), after the base model
    had started loading."""
    base, (first, second), tmp = workspace
    config = json.loads((second / "adapter_config.json").read_text())
    (second / "adapter_config.json").write_text(json.dumps({**config, "task_type": "FEATURE_EXTRACTION"}))
    code, message = _merge(capsys, tmp / "no-such-base", [first, second], tmp / "out")
    _assert_refused(code, message, tmp / "out", f"adapters have different task types ({first.name}: "
                    f"{json.loads((first / 'adapter_config.json').read_text()).get('task_type') or 'none'}, "
                    f"{second.name}: FEATURE_EXTRACTION); one merge has one model class")
    # An adapter saved without a task_type beside a CAUSAL_LM one: the error says how to fix it (QA CLI).
    (second / "adapter_config.json").write_text(json.dumps({**config, "task_type": None}))
    first_config = json.loads((first / "adapter_config.json").read_text())
    (first / "adapter_config.json").write_text(json.dumps({**first_config, "task_type": "CAUSAL_LM"}))
    code, message = _merge(capsys, tmp / "no-such-base", [first, second], tmp / "out")
    _assert_refused(code, message, tmp / "out", f"({first.name}: CAUSAL_LM, {second.name}: none); one merge has one "
                    "model class; an adapter without one is a plain model's to PEFT: if it was trained for a task "
                    '(CAUSAL_LM, say), set "task_type" in its adapter_config.json')


def test_an_empty_calibration_order_is_named_as_such(workspace, capsys):
    """`--calibration-order ""` ended in "no calibration data ... (asked: )" (QA CLI)."""
    base, adapters, tmp = workspace
    code, message = _merge(capsys, base, adapters, tmp / "out", "--calibration-order", "")
    _assert_refused(code, message, tmp / "out", f"no calibration data for adapter {adapters[0].name}: "
                    "--calibration-order names no source (its default: files,adapter)")


def test_an_unknown_modules_to_save_rule_is_refused(workspace, capsys):
    """Also when no adapter has modules_to_save: a typo is not silently ignored."""
    base, adapters, tmp = workspace
    code, message = _merge(capsys, base, adapters, tmp / "out", "--modules-to-save-rule", "zzz")
    _assert_refused(code, message, tmp / "out", "unknown modules_to_save rule 'zzz'", adapters[0].name)


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("below", ["sub", "sub/deeper"])
def test_output_below_a_file_is_refused_before_merging(workspace, capsys, below):
    """--out under an existing file: one line naming both, before anything is loaded or written."""
    base, adapters, tmp = workspace
    blocker = tmp / "bfile"
    blocker.write_text("not a folder")
    before = _tree(tmp)
    out = blocker / below
    code, message = _merge(capsys, base, adapters, out, "--strategy", "task_arithmetic", "--no-eval")
    _assert_refused(code, message, out, str(out), f"{blocker} is not a folder")
    assert blocker.read_text() == "not a folder"
    assert _tree(tmp) == before  # no staging folder, no probe left behind


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_output_that_cannot_be_created_is_refused_before_merging(workspace, capsys):
    base, adapters, _ = workspace
    out = Path("/proc/iteris-daemon-test-out")
    code, message = _merge(capsys, base, adapters, out, "--strategy", "task_arithmetic", "--no-eval")
    _assert_refused(code, message, out, str(out), "cannot create the output folder in /proc")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere")
def test_output_in_a_read_only_folder_is_refused(workspace, capsys):
    base, adapters, tmp = workspace
    locked = tmp / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        out = locked / "new" / "out"
        code, message = _merge(capsys, base, adapters, out, "--strategy", "task_arithmetic", "--no-eval")
        _assert_refused(code, message, out, str(out), str(locked))
        assert not any(locked.iterdir())
    finally:
        locked.chmod(0o755)


def test_reports_are_standard_json():
    """``safe_json.dumps`` writes non-finite floats as null, at any depth."""
    import json
    import math

    from iteris_daemon import safe_json

    value = {"a": [math.inf, 1.5, {"b": -math.inf, "c": (math.nan, 2)}], "d": "Infinity"}
    assert json.loads(safe_json.dumps(value)) == {"a": [None, 1.5, {"b": None, "c": [None, 2]}], "d": "Infinity"}


def test_an_adapter_that_changes_nothing_has_no_fidelity_gap(workspace, capsys):
    """An adapter whose B is zero (PEFT's initial state) moves no output, so a gap relative to
    its move is undefined; it was reported 0.0, "behaves like the task's own adapter", though
    the merge moved its outputs by the other adapter's delta. Now null, and "-" in the CLI;
    the gates judge the other tasks."""
    import json

    from safetensors.torch import load_file, save_file

    from iteris_daemon.config import Gates
    from iteris_daemon.gates import judge

    base, (zero, other), tmp = workspace
    weights = zero / "adapter_model.safetensors"
    save_file({k: v * 0 if ".lora_B." in k else v for k, v in load_file(weights).items()}, weights)
    assert _merge(capsys, base, [zero, other], tmp / "out", "--strategy", "task_arithmetic")[0] == 0
    report = json.loads((tmp / "out" / "merge_report.json").read_text())
    assert report["tasks"][zero.name]["fidelity_gap"] is None
    assert report["tasks"][zero.name]["alignment_loss"][-1] is None
    assert report["tasks"][other.name]["fidelity_gap"] < 1e-3  # the other task's own delta, unchanged
    verdict = judge(report, Gates(max_fidelity_gap=0.5))
    assert verdict.refused is None
    assert judge({**report, "tasks": {zero.name: report["tasks"][zero.name]}}, Gates()).notes == [
        "quality gate: no comparison (no task's adapter changes its outputs)"]

    # Merged alone, the merge moves nothing either: 0 / 0 was reported 0.0, now null too.
    assert _merge(capsys, base, [zero], tmp / "alone", "--strategy", "task_arithmetic")[0] == 0
    alone = json.loads((tmp / "alone" / "merge_report.json").read_text())["tasks"][zero.name]
    assert alone["fidelity_gap"] is None and alone["alignment_loss"] == [None]
    # IterIS's per-iteration history said 0.0 ("aligned") for the same task; now null all along.
    assert _merge(capsys, base, [zero, other], tmp / "iteris", "--param", "iterations=3", "--param",
                  "tolerance=0")[0] == 0
    history = json.loads((tmp / "iteris" / "merge_report.json").read_text())["tasks"]
    assert len(history[zero.name]["alignment_loss"]) == 3 and set(history[zero.name]["alignment_loss"]) == {None}
    assert all(loss >= 0 for loss in history[other.name]["alignment_loss"])


def test_lora_on_routed_experts_is_refused_naming_the_layer(tmp_path, capsys):
    """A mixture-of-experts expert that is a plain linear layer (SwitchTransformers', and
    remote-code MoE models') reads only the tokens routed to it, and routing differs from
    model to model, so no token's features pair up. IterIS and RegMean stopped with a
    matrix-shape RuntimeError; a data-free strategy's evaluation with a traceback. Now one
    line names the layer; a data-free merge without evaluation still merges."""
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    base = tmp_path / "base"
    config = tf.SwitchTransformersConfig(
        vocab_size=30522, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2, num_experts=4,
        num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, pad_token_id=0, eos_token_id=102,
        decoder_start_token_id=0)
    torch.manual_seed(0)
    tf.AutoModelForSeq2SeqLM.from_config(config).save_pretrained(base)
    tokenizer().save_pretrained(base)
    adapters = []
    for seed, targets in enumerate((["wi", "wo"], ["q", "v"])):
        torch.manual_seed(seed)
        model = get_peft_model(tf.AutoModelForSeq2SeqLM.from_pretrained(base), LoraConfig(
            r=4, lora_alpha=8, target_modules=targets, task_type="SEQ_2_SEQ_LM", init_lora_weights=False))
        model.save_pretrained(tmp_path / f"a{seed}")
        rows = [json.dumps({"text": text, "target": "the good river"}) for text in random_texts(seed, 8)]
        (tmp_path / f"a{seed}" / "calibration.jsonl").write_text("\n".join(rows) + "\n")
        adapters.append(tmp_path / f"a{seed}")
    for strategy in ("iteris", "regmean"):
        code, message = _merge(capsys, base, adapters, tmp_path / strategy, "--strategy", strategy)
        _assert_refused(code, message, tmp_path / strategy, ".mlp.experts.expert_", " rows from a batch of ",
                        "it sees only some tokens (a mixture-of-experts expert?)")
    assert cli_merge(base, adapters, tmp_path / "data-free", "--strategy", "task_arithmetic", "--no-eval") == 0


@pytest.mark.parametrize("family,expert", [("mixtral", "block_sparse_moe.experts.{}.w1"),
                                           ("qwen2_moe", "mlp.experts.{}.gate_proj")])
def test_a_lora_on_experts_stored_one_by_one_is_refused_as_fused_experts(tmp_path, capsys, family, expert):
    """An expert LoRA as transformers 4 saved it, one Linear per expert (most 2024 Mixtral
    LoRAs): transformers 5 fuses the experts into one parameter, and the refusal said the
    base model "does not have" the layer, which read as the wrong base model. It now says
    the experts are fused, as for target_parameters, naming the layer."""
    from safetensors.torch import save_file

    from iteris_daemon.errors import AdapterError
    from iteris_daemon.validation import validate_adapter

    config = dict(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=128, pad_token_id=0)
    config = (tf.MixtralConfig(**config, num_local_experts=2) if family == "mixtral" else
              tf.Qwen2MoeConfig(**config, num_experts=2, moe_intermediate_size=64, shared_expert_intermediate_size=32))
    base = tmp_path / "base"
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(base)
    tokenizer().save_pretrained(base)
    adapter = tmp_path / "experts"
    adapter.mkdir()
    paths = {f"model.layers.{layer}.self_attn.q_proj": 32 for layer in range(2)}
    paths.update({f"model.layers.{layer}.{expert.format(e)}": 64 for layer in range(2) for e in range(2)})
    save_file({f"base_model.model.{path}.lora_{part}.weight": torch.randn(*shape) for path, d_out in paths.items()
               for part, shape in (("A", (4, 32)), ("B", (d_out, 4)))}, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "base_model_name_or_path": str(base),
        "target_modules": ["q_proj", expert.rsplit(".", 1)[1]], "peft_version": "0.13.2"}))
    (adapter / "calibration.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in random_texts(1, 8)))
    said = (f"targets model.layers.0.{expert.format(0)}, one expert's layer, which transformers 5 fuses with the "
            "other experts' into one parameter (model.layers.0.mlp.experts.gate_up_proj in ")
    code, message = _merge(capsys, base, [adapter], tmp_path / "out", "--strategy", "task_arithmetic", "--no-eval")
    _assert_refused(code, message, tmp_path / "out", said, "train the adapter on the attention projections")
    with pytest.raises(AdapterError, match=re.escape(said)):
        validate_adapter(adapter, base_model=str(base))


def test_a_layer_reading_its_batch_sequence_first_is_refused_naming_it(tmp_path, capsys):
    """XLNet's feed-forward layers read (tokens, sequences, features): the padding mask, laid
    over those rows as (sequences, tokens), kept padding in the Grams and zeroed tokens, and
    IterIS and RegMean merged silently by batch size (RegMean's delta 11-41% apart between
    batch sizes 1 and 16, QA). Refused naming the layer where a batch is padded; data-free without
    evaluation merges, and so does one sample per batch (nothing to mask)."""
    base = tmp_path / "base"
    torch.manual_seed(0)
    tf.XLNetModel(tf.XLNetConfig(vocab_size=30522, d_model=32, n_layer=2, n_head=2, d_inner=64,
                                 pad_token_id=0)).save_pretrained(base)
    tokenizer().save_pretrained(base)
    adapters = [build_adapter(base, tmp_path / f"a{seed}", seed=seed, family="bert", targets=["layer_1", "layer_2"])
                for seed in range(2)]
    for strategy in ("iteris", "regmean"):
        code, message = _merge(capsys, base, adapters, tmp_path / strategy, "--strategy", strategy)
        _assert_refused(code, message, tmp_path / strategy, "ff.layer_1 reads its batch sequence first (",
                        "merge it with batch_size = 1 (no padding)")
    assert cli_merge(base, adapters, tmp_path / "data-free", "--strategy", "task_arithmetic", "--no-eval") == 0
    # Without padding the row order changes no sum: one sample per batch merges (as it did)
    assert cli_merge(base, adapters, tmp_path / "one", "--strategy", "regmean", "--param", "batch_size=1") == 0


def test_a_layer_reading_more_rows_than_the_batch_has_tokens_is_said_so():
    """LED, Longformer, PEGASUS-X pad to their attention window (FSMT's cross-attention reads the
    encoder's tokens): their refusal said the layer "sees only some tokens (a mixture-of-experts
    expert?)" where it reads more rows than the batch has tokens."""
    from iteris_daemon.alignment import _check_token_rows
    from iteris_daemon.errors import MergeError

    mask = torch.ones(2, 6)
    with pytest.raises(MergeError, match=r"read 32 rows from a batch of 2 sequences of 6 tokens: it sees more rows "
                                         r"than the batch has tokens \(padded to an attention window"):
        _check_token_rows("layers.0.q", torch.zeros(2, 16, 4), mask)
    with pytest.raises(MergeError, match="it sees only some tokens"):
        _check_token_rows("layers.0.expert", torch.zeros(5, 4), mask)
    _check_token_rows("layers.0.q", torch.zeros(2, 6, 4), mask)  # every token: no error
