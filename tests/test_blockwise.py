"""The block-by-block engine: joint schedule == whole-model passes, sequential schedule ==
a naive implementation of its definition, shared Grams == one Gram per module, the
fallback, streamed weights, the hot path's device hygiene, output dtype, and CUDA."""

import io
import json
import shutil
import logging
import re
from functools import partial

import pytest
import torch
from safetensors import safe_open
from tqdm import tqdm

from iteris_daemon import execution
from iteris_daemon.alignment import AlignmentOptions, TaskLayer, UnitPass, align
from iteris_daemon.architecture import BlockPlan, block_plan
from iteris_daemon.calibration import read_jsonl
from iteris_daemon.lora import load_adapter
from iteris_daemon.merge import AdapterSpec, MergeRequest, run_merge
from iteris_daemon.model import BaseModel, Delta, _move_except
from builders import tiny_config
from reference import reference_sequential

quiet = partial(tqdm, disable=True)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _inputs(tiny, family, **kwargs):
    base_dir, adapter_dirs = tiny[family]
    adapters = [load_adapter(d) for d in adapter_dirs]
    data = [read_jsonl(d / "calibration.jsonl") for d in adapter_dirs]
    return base_dir, adapter_dirs, adapters, data, BaseModel(str(base_dir), adapters, **kwargs)


def _options(**overrides) -> AlignmentOptions:
    values = dict(iterations=2, a1=1e-3, a2=1e-3, adaptive_weights=True, batch_size=5, accumulate_dtype="float64")
    return AlignmentOptions(**{**values, **overrides})


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "t5"])
def test_joint_blocks_equal_whole_model(tiny, family):
    """Blocks streamed from the safetensors files, one at a time, give the whole-model result
    (BERT's pooler runs in the tail; T5's decoder reads the streamed encoder output)."""
    _, _, adapters, data, base = _inputs(tiny, family)
    assert base.placement.name == "disk"
    blocks, metrics = align(base, adapters, data, _options(), quiet)
    assert metrics["execution"] == "blocks" and metrics["iterations_run"] == 2
    whole, whole_metrics = align(base, adapters, data, _options(blockwise=False), quiet)
    assert whole_metrics["execution"] == "whole model"
    assert set(blocks) == set(whole)
    for path, (B, A) in blocks.items():
        Bw, Aw = whole[path]
        assert _relative(B @ A, Bw @ Aw) < 1e-5, path
    for name, losses in metrics["alignment_loss"].items():
        assert losses == pytest.approx(whole_metrics["alignment_loss"][name], rel=1e-5)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_sequential_matches_naive_definition(tiny, family):
    """Gauss-Seidel sweeps against tests/reference.py's whole-model, one-sample-at-a-time,
    dense lstsq implementation of the same definition."""
    _, adapter_dirs, adapters, data, base = _inputs(tiny, family)
    factors, metrics = align(base, adapters, data, _options(schedule="sequential"), quiet)
    assert metrics["schedule"] == "sequential" and metrics["execution"] == "blocks"
    base.make_resident()
    expected = reference_sequential(base.model, base.tokenizer, adapter_dirs, 2, 1e-3)
    assert set(expected) == set(factors)
    for path, (B, A) in factors.items():
        assert _relative(B @ A, expected[path]) < 2e-4, path
    joint, _ = align(base, adapters, data, _options(), quiet)
    # Not a copy of the joint schedule: the two differ after the first block.
    assert max(_relative(B @ A, joint[p][0] @ joint[p][1]) for p, (B, A) in factors.items()) > 1e-3


def test_sequential_on_whole_model_passes_runs_the_joint_schedule_and_says_so(tiny, caplog):
    """Whole-model passes (a model that cannot run block by block, here forced) have no merged
    block to feed the next: the sequential schedule gave the joint merge at 2.5 times its
    passes, and the report said "sequential". The joint schedule runs, with a WARNING (not
    refused: a config that started before starts as before)."""
    _, _, adapters, data, base = _inputs(tiny, "bert")
    with caplog.at_level("WARNING", logger="iteris_daemon.alignment"):
        factors, metrics = align(base, adapters, data, _options(schedule="sequential", blockwise=False), quiet)
    joint, joint_metrics = align(base, adapters, data, _options(blockwise=False), quiet)
    assert metrics["schedule"] == "joint" and metrics["calibration_passes"] == joint_metrics["calibration_passes"] == 2
    assert all(torch.equal(B @ A, joint[p][0] @ joint[p][1]) for p, (B, A) in factors.items())
    assert any("the joint schedule is run" in m for m in caplog.messages), caplog.messages


@pytest.mark.parametrize("schedule", ["joint", "sequential"])
@pytest.mark.parametrize("targets", [None, ["layers.0.self_attn.q_proj", "layers.0.mlp.down_proj"]])
def test_each_sweeps_progress_bar_ends_at_its_total(tiny, tmp_path, schedule, targets):
    """The sequential schedule's first bar ended at 16/18: its total counted three passes
    of every unit, but a unit runs once more only with targeted modules, and its tasks'
    own streams apart only after the first such unit (BERT: every block and the pooler
    targeted; Llama: only the first block, the second then runs twice)."""
    from builders import build_adapter

    if targets is None:
        _, _, adapters, data, base = _inputs(tiny, "bert")
    else:
        base_dir, _ = tiny["llama"]
        dirs = [build_adapter(base_dir, tmp_path / f"a{seed}", seed=seed, family="llama", task_type="CAUSAL_LM",
                              targets=targets) for seed in range(2)]
        adapters, data = [load_adapter(d) for d in dirs], [read_jsonl(d / "calibration.jsonl") for d in dirs]
        base = BaseModel(str(base_dir), adapters)
    bars = []

    def progress(**kwargs):
        bars.append(tqdm(file=io.StringIO(), **kwargs))
        return bars[-1]

    align(base, adapters, data, _options(schedule=schedule, iterations=3), progress)
    assert len(bars) == 3
    assert [(bar.n, bar.total) for bar in bars] == [(bar.total, bar.total) for bar in bars]


def test_shared_grams_equal_one_gram_per_module(tiny):
    """Llama's q_proj and v_proj read one tensor: one Gram serves both, same result."""
    _, _, adapters, data, base = _inputs(tiny, "llama")
    shared, metrics = align(base, adapters, data, _options(), quiet)
    unshared, unshared_metrics = align(base, adapters, data, _options(share_inputs=False), quiet)
    # 2 blocks x (q_proj, v_proj -> 1 input; down_proj -> 1 input)
    assert metrics["grams"] == {"modules": 6, "distinct_inputs": 4}
    assert unshared_metrics["grams"] == {"modules": 6, "distinct_inputs": 6}
    for path, (B, A) in shared.items():
        assert _relative(B @ A, unshared[path][0] @ unshared[path][1]) < 1e-12, path


def test_unsupported_blocks_fall_back_with_a_log_line(tiny, monkeypatch, caplog):
    _, _, adapters, data, base = _inputs(tiny, "gpt2")
    expected, _ = align(base, adapters, data, _options(), quiet)
    monkeypatch.setattr(execution, "block_plan", lambda *a, **k: BlockPlan(reason="no blocks in this test"))
    with caplog.at_level(logging.INFO, logger="iteris_daemon.execution"):
        factors, metrics = align(base, adapters, data, _options(), quiet)
    assert metrics["execution"] == "whole model"
    assert any("whole-model passes" in r.message and "no blocks in this test" in r.message for r in caplog.records)
    for path, (B, A) in factors.items():
        assert _relative(B @ A, expected[path][0] @ expected[path][1]) < 1e-5


def _llama_with_layers_shared():
    model = _tiny_llama()
    model.model.layers[1] = model.model.layers[0]
    return model


def _llama_running_fewer_layers():
    model = _tiny_llama()
    model.config.num_hidden_layers = 1  # LlamaModel.forward runs layers[:1]
    return model


def _tiny_llama():
    import transformers as tf

    return tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                              num_attention_heads=2, vocab_size=64))


def _tiny_jamba():
    """A hybrid: Mamba and attention blocks alternate in one list (on the meta device)."""
    import transformers as tf

    config = tf.JambaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                            num_attention_heads=2, num_key_value_heads=1, attn_layer_period=2, attn_layer_offset=1,
                            expert_layer_period=2, expert_layer_offset=1, num_experts=2, mamba_d_state=4,
                            mamba_d_conv=2, mamba_expand=2)
    with torch.device("meta"):
        return tf.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("make, reason", [
    (_llama_with_layers_shared, "model.layers holds one block at several depths"),
    (_llama_running_fewer_layers, "model.layers holds 2 blocks but the config runs 1 layers"),
    # the reason said only "no stack of identical blocks found" (QA FAM2)
    (_tiny_jamba, "no stack of identical blocks found (model.layers mixes JambaAttentionDecoderLayer, "
                  "JambaMambaDecoderLayer)"),
])
def test_blocks_not_called_once_each_run_whole(make, reason):
    """Streaming a stack runs each of its blocks once, in order: a model whose forward does
    not (a block at two depths, a config that runs fewer layers) must not stream."""
    plan = block_plan(make())
    assert not plan.supported and reason in plan.reason
    assert block_plan(_tiny_llama()).supported


def test_a_block_handed_a_cache_is_not_streamed(tmp_path, caplog):
    """GraniteMoE's forward takes use_cache only through **kwargs, so the config decides:
    the base model turns caching off and the blocks stream. Turned back on, block 0's
    captured call holds a DynamicCache that every replay would grow; the merge runs
    whole-model passes instead, saying why, and still equals the streamed merge."""
    import transformers as tf

    from builders import build_adapter, tokenizer

    base_dir = tmp_path / "granitemoe"
    torch.manual_seed(0)
    tf.GraniteMoeForCausalLM(tf.GraniteMoeConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=2, num_key_value_heads=1, vocab_size=30522,
                                                 num_local_experts=2, num_experts_per_tok=1)).save_pretrained(base_dir)
    tokenizer().save_pretrained(base_dir)
    adapter_dirs = [build_adapter(base_dir, tmp_path / f"a{i}", seed=i, family="llama", task_type="CAUSAL_LM",
                                  targets=["q_proj", "v_proj"], calibration=6) for i in range(2)]
    adapters = [load_adapter(d) for d in adapter_dirs]
    data = [read_jsonl(d / "calibration.jsonl") for d in adapter_dirs]
    base = BaseModel(str(base_dir), adapters)
    streamed, metrics = align(base, adapters, data, _options(), quiet)
    assert metrics["execution"] == "blocks"
    base.model.config.use_cache = True
    with caplog.at_level(logging.INFO, logger="iteris_daemon.execution"):
        whole, metrics = align(base, adapters, data, _options(), quiet)
    assert metrics["execution"] == "whole model"
    assert any("is handed a key/value cache" in r.message for r in caplog.records)
    for path, (B, A) in whole.items():
        assert _relative(B @ A, streamed[path][0] @ streamed[path][1]) < 1e-5, path


@pytest.mark.parametrize("blockwise", [True, False])
def test_both_executors_record_a_graph_only_when_asked(tiny, blockwise):
    """``run(..., grad=)`` means the same for blocks and whole-model passes: with a delta
    whose factor requires grad, the output carries a graph only with ``grad=True``, and
    it reaches the factor."""
    _, _, adapters, data, base = _inputs(tiny, "bert")
    paths = sorted(adapters[0].modules)
    batches = base.batches(data[0], 4, 32)[:1]
    executor, [states] = execution.prepare(base, paths, [batches], blockwise)
    assert executor.blockwise is blockwise
    unit = executor.units[0]
    module = adapters[0].modules[unit.paths[0]]
    A = module.A.clone().requires_grad_(True)
    base.attach(paths)
    try:
        base.set_deltas({unit.paths[0]: Delta(A, module.B.clone())})
        with executor.loaded(unit):
            plain, graph = (executor.run(unit, states[0], grad=grad) for grad in (False, True))
        # A block's result is the stream's hidden state; a whole-model pass's, the model's output.
        plain, graph = ((s.hidden if blockwise else s.output) for s in (plain, graph))
        assert not plain.requires_grad and graph.requires_grad
        graph.sum().backward()
        assert A.grad is not None and A.grad.abs().sum() > 0
    finally:
        base.detach()
        base.set_deltas({})


@pytest.mark.parametrize("offload", ["none", "cpu", "disk"])
def test_placements_agree(tiny, offload):
    _, _, adapters, data, reference_base = _inputs(tiny, "llama", offload="none")
    expected, _ = align(reference_base, adapters, data, _options(iterations=1), quiet)
    _, _, _, _, base = _inputs(tiny, "llama", offload=offload)
    assert base.placement.name == {"none": "resident", "cpu": "resident", "disk": "disk"}[offload]  # cpu == device here
    factors, _ = align(base, adapters, data, _options(iterations=1), quiet)
    for path, (B, A) in factors.items():
        assert _relative(B @ A, expected[path][0] @ expected[path][1]) < 1e-6


def test_streamed_half_precision_keeps_what_transformers_keeps_in_float32(tiny):
    """T5 in float16: transformers loads ``wo`` in float32 (its ``_keep_in_fp32_modules``;
    its activations overflow float16). Blocks streamed from the checkpoint do the same, so
    the merge equals the one on a model loaded whole (it was 0.7% off; found in review)."""
    merges, kept = {}, {}
    for offload in ("none", "disk"):
        _, _, adapters, data, base = _inputs(tiny, "t5", dtype="float16", offload=offload)
        block = base.model.get_submodule("encoder.block.0")
        base.placement.load(block, "encoder.block.0")
        kept[offload] = (block.layer[1].DenseReluDense.wo.weight.dtype, block.layer[0].SelfAttention.q.weight.dtype)
        base.placement.release(block)
        merges[offload], _ = align(base, adapters, data, _options(iterations=1, accumulate_dtype="float32"), quiet)
    assert kept["disk"] == kept["none"] == (torch.float32, torch.float16)
    for path, (B, A) in merges["disk"].items():
        expected = merges["none"][path][0] @ merges["none"][path][1]
        assert _relative(B @ A, expected) < 1e-6, path


def _bfloat16_checkpoint(tmp_path, family: str):
    """A tiny causal LM of ``family`` saved in bfloat16 (as most LLM checkpoints are), whose
    buffers are computed when the model is built (GPT-J's rotary table, Gemma's embed_scale)."""
    import transformers as tf

    from builders import tokenizer

    tokens = dict(vocab_size=30522, pad_token_id=0, bos_token_id=101, eos_token_id=102)
    config = {"gptj": lambda: tf.GPTJConfig(n_embd=64, n_layer=2, n_head=2, n_positions=128, rotary_dim=16, **tokens),
              "gemma": lambda: tf.GemmaConfig(hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=2, num_key_value_heads=1, head_dim=48,
                                              max_position_embeddings=128, **tokens)}[family]()
    torch.manual_seed(0)
    base_dir = tmp_path / family
    tf.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(base_dir)
    tokenizer().save_pretrained(base_dir)
    return base_dir


@pytest.mark.parametrize("family, dtype", [("gptj", "float32"), ("gptj", "bfloat16"), ("gemma", "float32"),
                                           ("gemma", "float16")])
def test_streamed_buffers_are_the_ones_transformers_loads(tmp_path, family, dtype):
    """A streamed model's buffers equal a whole-model load's, dtype and values, in any compute
    dtype. The skeleton was built in the checkpoint's bfloat16: GPT-J's rotary table came out
    1.2e-2 off and Gemma's embed_scale stayed bfloat16 under float32 (found in QA)."""
    base_dir = _bfloat16_checkpoint(tmp_path, family)
    buffers = {}
    for offload in ("disk", "none"):
        base = BaseModel(str(base_dir), [], dtype=dtype, offload=offload)
        assert base.placement.name == {"disk": "disk", "none": "resident"}[offload]
        buffers[offload] = dict(base.model.named_buffers())
    assert buffers["disk"].keys() == buffers["none"].keys()
    for name, expected in buffers["none"].items():
        assert buffers["disk"][name].dtype == expected.dtype, name
        assert torch.equal(buffers["disk"][name], expected), name


@pytest.mark.parametrize("family, targets", [("gptj", ["q_proj", "v_proj", "fc_out"]),
                                             ("gemma", ["q_proj", "v_proj", "down_proj"])])
def test_streamed_merge_of_a_bfloat16_checkpoint_equals_the_whole_models(tmp_path, family, targets):
    """The merge does not depend on --offload (Gemma's differed by 1.5e-3 in float32)."""
    from builders import build_adapter

    base_dir = _bfloat16_checkpoint(tmp_path, family)
    adapter_dirs = [build_adapter(base_dir, tmp_path / f"a{seed}", seed=seed, family=family, targets=targets,
                                  task_type="CAUSAL_LM", calibration=6) for seed in range(2)]
    adapters = [load_adapter(d) for d in adapter_dirs]
    data = [read_jsonl(d / "calibration.jsonl") for d in adapter_dirs]
    merges = {offload: align(BaseModel(str(base_dir), adapters, offload=offload), adapters, data,
                             _options(iterations=1), quiet)[0] for offload in ("disk", "none")}
    for path, (B, A) in merges["disk"].items():
        assert _relative(B @ A, merges["none"][path][0] @ merges["none"][path][1]) < 1e-6, path


def _copy_checkpoint(base_dir, folder, tensors: dict[str, dict[str, torch.Tensor]]):
    """``base_dir``'s config and tokenizer with ``tensors`` (file name -> tensors) as its
    weights; an index maps them when there are several files."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(base_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    for name, part in tensors.items():
        save_file(part, folder / name, metadata={"format": "pt"})
    if len(tensors) > 1:
        weight_map = {key: name for name, part in tensors.items() for key in part}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def _sharded(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    return {"outside.safetensors": {k: v for k, v in tensors.items() if ".layers." not in k},
            "blocks.safetensors": {k: v for k, v in tensors.items() if ".layers." in k}}


NORM, UP = "model.layers.1.input_layernorm.weight", "model.layers.1.mlp.up_proj.weight"


@pytest.mark.parametrize("case, file, detail", [
    ("broadcasting shape", "model.safetensors", f": tensor {NORM} has shape [1] where the model's config gives [32]"),
    ("wrong shape", "model.safetensors", f": tensor {UP} has shape [64, 16] where the model's config gives [64, 32]"),
    ("integer dtype", "model.safetensors", f": tensor {NORM} is I64 where the model has a torch.float32 parameter"),
    ("missing shard", "blocks.safetensors", " is missing (its index names it)"),
    ("tensor not in its shard", "blocks.safetensors", f" has no tensor {UP} (its index names it)"),
])
def test_a_broken_checkpoint_is_refused_before_streaming(tiny, tmp_path, case, file, detail):
    """The tensors are checked against their files' headers when the model loads: a norm
    weight of shape [1] merged silently (it broadcasts), the others failed mid-merge with a
    traceback (found in QA). Offload none refuses a wrong shape in one line too."""
    from safetensors.torch import load_file, save_file

    from iteris_daemon.errors import BaseModelError

    base_dir, _ = tiny["llama"]
    tensors = load_file(base_dir / "model.safetensors")
    files = {"model.safetensors": tensors}
    if case == "broadcasting shape":
        tensors[NORM] = torch.tensor([2.0])
    elif case == "wrong shape":
        tensors[UP] = tensors[UP][:, :16].contiguous()
    elif case == "integer dtype":
        tensors[NORM] = tensors[NORM].long()
    else:
        files = _sharded(tensors)
    folder = _copy_checkpoint(base_dir, tmp_path / "broken", files)
    if case == "missing shard":
        (folder / file).unlink()
    elif case == "tensor not in its shard":
        save_file({k: v for k, v in files[file].items() if k != UP}, folder / file)
    with pytest.raises(BaseModelError) as refused:
        BaseModel(str(folder), [], offload="disk")
    assert str(refused.value) == f"base model checkpoint file {folder / file}{detail}"
    if "shape" in case:
        with pytest.raises(BaseModelError, match="its checkpoint does not fit its config"):
            BaseModel(str(folder), [], offload="none")


@pytest.mark.parametrize("offload", ["disk", "none"])
def test_a_tensor_outside_the_blocks_that_its_shard_lacks_is_refused_whatever_the_placement(tiny, tmp_path, offload):
    """The final norm named by the index but not in its shard: streaming refused it in one
    line, the whole load initialised it and merged (exit 0, a warning): placements must take
    or refuse the same checkpoint."""
    from safetensors.torch import load_file, save_file

    from iteris_daemon.errors import BaseModelError

    base_dir, _ = tiny["llama"]
    files = _sharded(load_file(base_dir / "model.safetensors"))
    folder = _copy_checkpoint(base_dir, tmp_path / "broken", files)
    save_file({k: v for k, v in files["outside.safetensors"].items() if k != "model.norm.weight"},
              folder / "outside.safetensors")
    with pytest.raises(BaseModelError) as refused:
        BaseModel(str(folder), [], offload=offload)
    assert str(refused.value) == (f"base model checkpoint file {folder / 'outside.safetensors'} has no tensor "
                                  "model.norm.weight (its index names it)")


def test_a_single_file_beside_an_index_is_read_as_transformers_reads_it(tiny, tmp_path):
    """With both model.safetensors and an index (and its shards), transformers reads the
    single file; streamed blocks were read through the index (found in QA)."""
    from safetensors.torch import load_file

    base_dir, _ = tiny["llama"]
    tensors = load_file(base_dir / "model.safetensors")
    other = {k: v + 1 if ".layers." in k else v for k, v in tensors.items()}
    folder = _copy_checkpoint(base_dir, tmp_path / "both", _sharded(other))
    _copy_checkpoint(base_dir, tmp_path / "single", {"model.safetensors": tensors})
    (tmp_path / "single" / "model.safetensors").replace(folder / "model.safetensors")
    weights = {}
    for offload in ("disk", "none"):
        base = BaseModel(str(folder), [], offload=offload)
        block = base.model.get_submodule("layers.0")  # a LlamaModel, read from a LlamaForCausalLM checkpoint
        base.placement.load(block, "layers.0")
        weights[offload] = block.self_attn.q_proj.weight
    assert torch.equal(weights["disk"], weights["none"])
    assert torch.equal(weights["disk"], tensors["model.layers.0.self_attn.q_proj.weight"])


EXPERT = {"mixtral": "model.layers.1.block_sparse_moe.experts.1.w3.weight",
          "qwen3_moe": "model.layers.1.mlp.experts.2.down_proj.weight"}
FUSED = {"mixtral": "layers.1.mlp.experts.gate_up_proj", "qwen3_moe": "layers.1.mlp.experts.down_proj"}


def _moe_checkpoint(tmp_path, family):
    """A tiny mixture-of-experts model saved as the Hub stores them: one tensor per expert
    and projection (transformers 5 fuses them into 3D parameters on loading and splits them
    again on saving)."""
    from builders import build_tiny_model

    base_dir = build_tiny_model(family, tmp_path / family, task_type="CAUSAL_LM")
    with safe_open(base_dir / "model.safetensors", framework="pt") as handle:
        assert EXPERT[family] in handle.keys()
    return base_dir


@pytest.mark.parametrize("family, dtype", [("mixtral", "float32"), ("qwen3_moe", "bfloat16")])
def test_a_checkpoint_of_experts_one_by_one_streams(tmp_path, family, dtype):
    """Blocks streamed from a Mixtral or Qwen3-MoE checkpoint are built through the model's
    own conversion mapping: every parameter equals ``from_pretrained``'s, the fused experts
    too. Such checkpoints loaded whole into CPU memory (a 47B Mixtral)."""
    import transformers as tf

    base_dir = _moe_checkpoint(tmp_path, family)
    base = BaseModel(str(base_dir), [], dtype=dtype, offload="disk")  # a MixtralModel from a ...ForCausalLM's
    assert base.placement.name == "disk"
    whole = dict(tf.AutoModel.from_pretrained(base_dir, dtype=getattr(torch, dtype)).named_parameters())
    for path in ("layers.0", "layers.1"):
        block = base.model.get_submodule(path)
        base.placement.load(block, path)
        for name, param in block.named_parameters():
            assert param.dtype == whole[f"{path}.{name}"].dtype and torch.equal(param, whole[f"{path}.{name}"]), name
    assert base.model.get_parameter(FUSED[family]).dim() == 3


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_a_streamed_merge_of_experts_one_by_one_equals_the_whole_models(tmp_path, family):
    """LoRAs on the attention of a mixture of experts (PEFT writes one on fused experts as
    target_parameters, which no strategy merges) merge the same streamed as loaded whole."""
    from safetensors.torch import load_file

    from builders import build_adapter, cli_merge

    base_dir = _moe_checkpoint(tmp_path, family)
    adapters = [build_adapter(base_dir, tmp_path / f"a{seed}", seed=seed, family=family, task_type="CAUSAL_LM",
                              targets=["q_proj", "v_proj", "o_proj"], calibration=6) for seed in range(2)]
    merged = {}
    for offload in ("disk", "none"):
        out = tmp_path / offload
        assert cli_merge(base_dir, adapters, out, "--offload", offload, "--param", "iterations=2",
                         "--param", "accumulate_dtype=float64") == 0
        report = json.loads((out / "merge_report.json").read_text())
        assert (report["placement"], report["metrics"]["execution"]) == ({"disk": "disk", "none": "resident"}[offload],
                                                                           "blocks")
        merged[offload] = load_file(out / "adapter_model.safetensors")
    assert merged["disk"].keys() == merged["none"].keys()
    for name, whole in merged["none"].items():
        torch.testing.assert_close(merged["disk"][name], whole, rtol=1e-6, atol=1e-8, msg=name)


@pytest.mark.parametrize("case", ["missing", "wrong shape", "integer dtype"])
def test_a_broken_expert_tensor_is_refused_before_streaming(tmp_path, case):
    """The header checks hold for the tensors a fused parameter is built from: an expert's
    weight missing, cut or of integers is one line naming it (transformers answers a missing
    one with a conversion report and "We encountered some issues")."""
    from safetensors.torch import load_file

    from iteris_daemon.errors import BaseModelError

    base_dir = _moe_checkpoint(tmp_path, "mixtral")
    tensors = load_file(base_dir / "model.safetensors")
    key = EXPERT["mixtral"]
    if case == "missing":
        del tensors[key]
    elif case == "wrong shape":
        tensors[key] = tensors[key][:, :16].contiguous()
    else:
        tensors[key] = tensors[key].long()
    folder = _copy_checkpoint(base_dir, tmp_path / "broken", {"model.safetensors": tensors})
    with pytest.raises(BaseModelError) as refused:
        BaseModel(str(folder), [], offload="disk")
    file = folder / "model.safetensors"
    assert str(refused.value) == {
        "missing": f"base model checkpoint {file} has no tensor {key} (transformers builds {FUSED['mixtral']} from it)",
        "wrong shape": f"base model checkpoint file {file}: tensor {key} has shape [64, 16] where the model's config "
                       f"gives [64, 32]",
        "integer dtype": f"base model checkpoint file {file}: tensor {key} is I64 where the model has a torch.float32 "
                         f"parameter"}[case]


@pytest.mark.parametrize("case", ["quantized", "rename_source_key", "revert_weight_conversion"])
def test_what_streaming_cannot_read_loads_whole(tiny, tmp_path, monkeypatch, case):
    """Two checkpoints streaming leaves to transformers' own loader (a whole load, as for
    any checkpoint that cannot stream): a quantized one, whose scales and packed weights
    only its quantizer reads (streamed, its weights were cast without their scales), and
    any, where transformers' loading internals that streaming reads have moved (a later
    5.x; here one of those it reads up front is deleted): a whole load, not a traceback."""
    import transformers as tf
    import transformers.core_model_loading as loading

    from iteris_daemon.weights import WeightsUnavailable, load_streamed

    base_dir, _ = tiny["llama"]
    config = tf.AutoConfig.from_pretrained(base_dir)
    if case == "quantized":
        config.quantization_config = {"quant_method": "fp8", "weight_block_size": [128, 128]}
        reason = "a quantized checkpoint (quantization_config)"
    else:
        monkeypatch.delattr(loading, case)
        reason = "cannot read this transformers' loading internals"
    with pytest.raises(WeightsUnavailable, match=re.escape(reason)):  # BaseModel then loads it whole
        load_streamed(tf.LlamaModel, str(base_dir), config, torch.float32, torch.device("cpu"), lambda m: ["layers"])


def test_only_streamed_loads_fix_the_mmap_threshold(tiny, monkeypatch):
    """Streaming fixes glibc's mmap threshold before it builds the skeleton: fixed after it
    (whose build frees large blocks, raising glibc's threshold), block weights still came
    from the heap and the scale benchmark's peak grew by 77% of the added weights (21%
    fixed first). A model the checks then send to a whole load gets glibc's heap back
    (fast forward passes on the CPU)."""
    import iteris_daemon.architecture as architecture
    import iteris_daemon.weights as weights
    from iteris_daemon import malloc

    calls = []
    monkeypatch.setattr(malloc, "keep_large_blocks_in_mmap", lambda: calls.append("fixed"))
    monkeypatch.setattr(malloc, "serve_large_blocks_from_heap", lambda: calls.append("heap"))
    skeleton = weights._skeleton
    monkeypatch.setattr(weights, "_skeleton", lambda *args: calls.append("skeleton") or skeleton(*args))
    base_dir, _ = tiny["llama"]
    assert BaseModel(str(base_dir), [], offload="disk").placement.name == "disk"
    assert calls == ["fixed", "skeleton"]
    calls.clear()
    monkeypatch.setattr(architecture, "block_plan", lambda *a, **k: BlockPlan(reason="no blocks in this test"))
    assert BaseModel(str(base_dir), [], offload="disk").placement.name == "resident"
    assert calls == ["fixed", "skeleton", "heap"]  # the whole load reuses the stream's checks (no skeleton of its own)


def test_a_stream_refused_at_its_tie_gives_glibc_s_heap_back(tiny, monkeypatch):
    """The tie, after the weights outside the blocks are read, can send a model to a whole
    load too (transformers' internals moved: ``_transformers_internals``); it kept every
    large tensor mapped, forward passes 20-35% slower (found by QA)."""
    import transformers as tf

    from iteris_daemon import malloc

    calls = []
    monkeypatch.setattr(malloc, "keep_large_blocks_in_mmap", lambda: calls.append("fixed"))
    monkeypatch.setattr(malloc, "serve_large_blocks_from_heap", lambda: calls.append("heap"))
    tie = tf.PreTrainedModel.tie_weights

    def moved_once(self, *args, **kwargs):
        if "recompute_mapping" in kwargs and "moved" not in calls:
            calls.append("moved")
            raise TypeError("tie_weights() got an unexpected keyword argument 'recompute_mapping'")
        return tie(self, *args, **kwargs)

    monkeypatch.setattr(tf.PreTrainedModel, "tie_weights", moved_once)
    base_dir, _ = tiny["llama"]
    assert BaseModel(str(base_dir), [], offload="disk").placement.name == "resident"
    assert calls == ["fixed", "moved", "heap"]


def test_streamed_blocks_take_no_memory_between_uses(tiny):
    _, _, adapters, _, base = _inputs(tiny, "llama")
    blocks = base.model.get_submodule("model.layers")
    assert all(p.device.type == "meta" for p in blocks.parameters())
    assert base.model.get_submodule("model.embed_tokens").weight.device.type == "cpu"


@pytest.mark.parametrize("cls", ["XLNetModel", "XLNetLMHeadModel", "LlamaForCausalLM"])
def test_a_model_kept_in_cpu_memory_moves_all_but_its_blocks_as_parameters(cls):
    """The model in CPU memory, its blocks visiting the device one at a time (:func:`_move_except`;
    the meta device stands in for CUDA: the same path). The root's own parameter (XLNetModel's
    ``mask_emb``) stayed on the CPU, and a module holding the blocks (XLNetLMHeadModel's
    ``transformer``) had its parameters replaced by plain tensors, which ``get_parameter``
    refuses (found by QA). The blocks stay on the CPU."""
    import transformers as tf

    config = (tf.XLNetConfig(vocab_size=100, d_model=32, n_layer=2, n_head=2, d_inner=64)
              if cls.startswith("XLNet") else tiny_config("llama"))
    model = getattr(tf, cls)(config)
    blocks = [block for stack in block_plan(model, []).stacks for block in stack.blocks]
    _move_except(model, {id(block) for block in blocks}, torch.device("meta"))
    kept = {id(tensor) for block in blocks for tensor in [*block.parameters(), *block.buffers()]}
    assert kept
    for name, param in model.named_parameters():
        assert isinstance(param, torch.nn.Parameter) and model.get_parameter(name) is param, name
        assert param.device.type == ("cpu" if id(param) in kept else "meta"), name
    for name, buffer in model.named_buffers():
        assert buffer.device.type == ("cpu" if id(buffer) in kept else "meta"), name


def test_hot_path_stays_on_the_device_without_host_sync(tiny):
    """The forward hook and the Gram recorder on meta tensors: a CPU tensor mixed in, or a
    host synchronisation (``.item()``, boolean indexing), raises on the meta device."""
    _, _, adapters, _, base = _inputs(tiny, "llama")
    path = "model.layers.0.self_attn.q_proj"
    module = adapters[0].modules[path]
    meta = torch.device("meta")
    base.device = meta
    base.set_deltas({path: Delta(module.A, module.B, module.scaling)})
    layers = {path: TaskLayer(module, A=module.A.to(meta))}
    x = torch.empty(3, 7, module.A.shape[1], device=meta)
    y = torch.empty(3, 7, module.B.shape[0], device=meta)
    mask = torch.empty(3, 7, dtype=torch.long, device=meta)
    own = UnitPass(layers, torch.float32, {path: None}, own=True, gram=True)
    base.recorder, base._masks, base._mask = own, {"encoder": mask}, mask
    own.new_batch()
    out = base._hook(path)(None, (x,), y)
    assert out.device == meta and own.G[path].device == meta and layers[path].projections[0].device == meta
    merged = UnitPass(layers, torch.float32, {path: None}, own=False, gram=True)
    base.recorder = merged
    merged.new_batch()
    base._hook(path)(None, (x,), y)
    assert merged.Q[path].device == meta


def _merge(base_dir, adapter_dirs, out, **kwargs):
    return run_merge(MergeRequest(base_model=str(base_dir), adapters=[AdapterSpec(d) for d in adapter_dirs], out=out,
                                  params={"iterations": 1}, quiet=True, **kwargs))


def test_output_dtype(tiny, tmp_path):
    base_dir, adapter_dirs = tiny["llama"]
    default = _merge(base_dir, adapter_dirs, tmp_path / "default")
    assert default["output_dtype"] == "float32"  # the adapters'
    bf16 = _merge(base_dir, adapter_dirs, tmp_path / "bf16", output_dtype="bfloat16")
    assert bf16["output_dtype"] == "bfloat16"
    with safe_open(tmp_path / "bf16" / "adapter_model.safetensors", framework="pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.bfloat16}
    report = json.loads((tmp_path / "bf16" / "merge_report.json").read_text())
    assert report["metrics"]["execution"] == "blocks" and report["placement"] == "disk"


def test_the_default_output_dtype_does_not_depend_on_the_adapters_order(tiny, tmp_path):
    """It was the first adapter's: [bfloat16, float32] adapters were written in bfloat16,
    [float32, bfloat16] in float32. Now the widest of them, in either order."""
    from safetensors.torch import load_file, save_file

    base_dir, (first, second, _) = tiny["llama"]
    half = tmp_path / "half"
    shutil.copytree(first, half)
    weights = half / "adapter_model.safetensors"
    save_file({k: t.to(torch.bfloat16) for k, t in load_file(weights).items()}, weights)
    for order in ([half, second], [second, half]):
        report = _merge(base_dir, order, tmp_path / f"out-{order[0].name}")
        assert report["output_dtype"] == "float32", order
    assert _merge(base_dir, [half], tmp_path / "alone")["output_dtype"] == "bfloat16"
    # Within one adapter too: it was its last module's dtype (here bfloat16, the first float16).
    mixed = tmp_path / "mixed"
    shutil.copytree(first, mixed)
    tensors = dict(sorted(load_file(mixed / "adapter_model.safetensors").items()))
    last = len(tensors) - 2
    save_file({k: t.to(torch.float16 if i == 0 else torch.bfloat16 if i >= last else torch.float32)
               for i, (k, t) in enumerate(tensors.items())}, mixed / "adapter_model.safetensors")
    assert _merge(base_dir, [mixed], tmp_path / "mixed-out")["output_dtype"] == "float32"
    # torch promotes no float8 type: one float8 factor among bfloat16 ones crashed the load.
    save_file({k: t.to(torch.float8_e4m3fn if i == 0 else torch.bfloat16) for i, (k, t) in enumerate(tensors.items())},
              mixed / "adapter_model.safetensors")
    assert _merge(base_dir, [mixed], tmp_path / "eight-out")["output_dtype"] == "bfloat16"


def test_float16_overflow_names_the_layer_and_the_dtype(tiny, tmp_path):
    """Activations past float16's range ended in "the solve produced NaN/Inf; raise a1/a2",
    which no ridge fixes: the forward pass had overflowed. Now the message names the layer
    and the dtype to merge in; bfloat16 merges the same checkpoint."""
    from safetensors.torch import load_file, save_file

    from iteris_daemon.errors import MergeError

    base_dir, adapter_dirs = tiny["llama"]
    loud = tmp_path / "loud"
    shutil.copytree(base_dir, loud)
    weights = loud / "model.safetensors"
    tensors = load_file(weights)
    norm = "model.layers.0.post_attention_layernorm.weight"
    save_file({**tensors, norm: tensors[norm] * 1e4}, weights, metadata={"format": "pt"})
    with pytest.raises(MergeError, match=r"^model\.layers\.\S+: its inputs in the float16 forward pass with adapter "
                                         r"\S+ are not finite \(NaN/Inf\); float16 overflowed: merge with --dtype "
                                         r"bfloat16 or float32"):
        _merge(loud, adapter_dirs, tmp_path / "half", dtype="float16")
    assert _merge(loud, adapter_dirs, tmp_path / "bf16", dtype="bfloat16")["dtype"] == "bfloat16"


@pytest.mark.parametrize("strategy", ["iteris", "regmean"])
def test_an_adapter_whose_delta_overflows_is_named(tiny, tmp_path, strategy):
    """lora_alpha = 3e38 (finite: registered) made every run of its group fail with "its
    inputs ... are not finite; check the calibration data", naming no adapter (QA SEC): the
    operator had to bisect the group. Now the adapter is named, first of the tasks."""
    from iteris_daemon.errors import MergeError

    base_dir, adapter_dirs = tiny["llama"]
    loud = shutil.copytree(adapter_dirs[1], tmp_path / "loud")
    config = json.loads((loud / "adapter_config.json").read_text())
    (loud / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 3e38}))
    with pytest.raises(MergeError, match=r": its inputs in the float32 forward pass with adapter loud are not finite "
                                         r"\(NaN/Inf\); check the calibration data, and the adapter's lora_alpha"):
        run_merge(MergeRequest(base_model=str(base_dir), adapters=[AdapterSpec(adapter_dirs[0]), AdapterSpec(loud)],
                               out=tmp_path / "out", strategy=strategy, params={"iterations": 1} if strategy == "iteris" else {},
                               quiet=True))


def test_float16_outputs_that_overflow_past_the_adapted_layers_are_refused(tiny, tmp_path, capsys):
    """The last block's MLP overflows float16 after its adapted input: no layer's inputs say
    so, and the outputs' NaN was read as "the adapter does not change them" (a zero delta?,
    every figure null, exit 0, and the daemon's gates had nothing to compare). Refused,
    naming the dtype; bfloat16 merges the same checkpoint."""
    from safetensors.torch import load_file, save_file

    from iteris_daemon.errors import MergeError

    from builders import build_adapter

    loud = shutil.copytree(tiny["llama"][0], tmp_path / "loud")
    weights = loud / "model.safetensors"
    tensors = load_file(weights)
    last = max(int(k.split(".")[2]) for k in tensors if k.startswith("model.layers."))
    down = f"model.layers.{last}.mlp.down_proj.weight"  # its largest entry ~2e4: float16 holds it
    save_file({**tensors, down: tensors[down] * 1e6}, weights, metadata={"format": "pt"})
    adapter_dirs = [build_adapter(loud, tmp_path / f"a{seed}", seed=seed, family="llama", task_type="CAUSAL_LM",
                                  targets=["q_proj", "v_proj"]) for seed in range(2)]  # PEFT's default targets
    with pytest.raises(MergeError, match=r"^the outputs on a0, a1 are not finite \(NaN/Inf\) in the float16 forward "
                                         r"pass; float16 overflowed: merge with --dtype bfloat16 or float32; nothing"):
        _merge(loud, adapter_dirs, tmp_path / "half", dtype="float16")
    assert not (tmp_path / "half").exists()
    report = _merge(loud, adapter_dirs, tmp_path / "bf16", dtype="bfloat16")
    assert all(task["fidelity_gap"] > 0 for task in report["tasks"].values())
    # compare scores with the same evaluation: that contender is an error, not a row of NaN
    from iteris_daemon.cli import main

    adapters = [arg for adapter in adapter_dirs for arg in ("--adapter", str(adapter))]
    capsys.readouterr()
    assert main(["compare", "--base-model", str(loud), *adapters, "-q", "--dtype", "float16",
                 "--strategy", "task_arithmetic"]) == 1  # none could merge
    assert "task_arithmetic  error: the outputs on a0, a1 are not finite" in capsys.readouterr().out


def test_a_checkpoint_the_model_renames_streams_through_its_renaming(tmp_path):
    """GPT-NeoX stores its LM head as embed_out; transformers renames it to lm_head on a
    normal load (the model's conversion mapping), and the class declares it tiable while the
    config leaves it untied. Streaming left that head empty (fidelity gaps came out 0 and
    NaN), then loaded such a model whole; it now streams through the same renaming: the
    merge and its figures are the whole-model load's."""
    import transformers as tf
    from safetensors.torch import load_file

    from builders import build_adapter, tokenizer

    config = tf.GPTNeoXConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, max_position_embeddings=128, pad_token_id=0,
                              bos_token_id=101, eos_token_id=102, tie_word_embeddings=False)
    torch.manual_seed(0)
    base_dir = tmp_path / "neox"
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(base_dir)
    tokenizer().save_pretrained(base_dir)
    with safe_open(base_dir / "model.safetensors", framework="pt") as handle:
        assert "embed_out.weight" in handle.keys()
    adapters = [build_adapter(base_dir, tmp_path / f"a{seed}", seed=seed, family="neox", targets=["query_key_value"],
                              task_type="CAUSAL_LM", calibration=6) for seed in range(2)]
    reports = {offload: _merge(base_dir, adapters, tmp_path / offload, offload=offload) for offload in ("disk", "none")}
    assert reports["disk"]["placement"] == "disk"
    for name, task in reports["disk"]["tasks"].items():
        assert 0 < task["fidelity_gap"] < 1.5  # finite, and the tasks' outputs differ from the base's
        assert task["fidelity_gap"] == pytest.approx(reports["none"]["tasks"][name]["fidelity_gap"], rel=1e-5)
    merged = {offload: load_file(tmp_path / offload / "adapter_model.safetensors") for offload in reports}
    for name, whole in merged["none"].items():
        torch.testing.assert_close(merged["disk"][name], whole, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "t5"])
def test_cuda_merge_equals_cpu(tiny, tmp_path, family):
    base_dir, adapter_dirs = tiny[family]
    cpu = _merge(base_dir, adapter_dirs, tmp_path / "cpu")
    cuda = _merge(base_dir, adapter_dirs, tmp_path / "cuda", device="cuda")
    assert cuda["device_memory_mb"]["peak"] > 0
    with safe_open(tmp_path / "cpu" / "adapter_model.safetensors", framework="pt") as a, \
            safe_open(tmp_path / "cuda" / "adapter_model.safetensors", framework="pt") as b:
        for key in a.keys():
            assert _relative(b.get_tensor(key), a.get_tensor(key)) < 1e-3, key
    for name, figures in cpu["tasks"].items():
        assert cuda["tasks"][name]["fidelity_gap"] == pytest.approx(figures["fidelity_gap"], rel=1e-2, abs=1e-3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("device, message", [("cuda", "not available here"), ("gpu", "unknown device"),
                                             ("mps", "unknown device"), ("cuda:\u0661", "unknown device"),
                                             ("cuda:99999999999999999999", "unknown device")])  # as the daemon's config says
def test_a_device_that_is_not_here_is_a_one_line_error(tiny, tmp_path, capsys, device, message):
    from iteris_daemon.cli import main

    base_dir, adapter_dirs = tiny["llama"]
    argv = ["merge", "--base-model", str(base_dir), "--out", str(tmp_path / "out"), "--device", device, "-q"]
    for folder in adapter_dirs:
        argv += ["--adapter", str(folder)]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["missing", "wrong shape"])
def test_a_block_weight_the_checkpoint_cannot_give_is_refused_whatever_the_placement(tmp_path, capsys, case):
    """A block weight missing from the checkpoint, or of another shape under classifier
    adapters (whose loads tell transformers to ignore sizes, for their head): streaming
    fell back to a whole load, and the whole load initialised the weight at random and the
    merge exited 0, under both placements. Now one line naming it, nothing written."""
    from safetensors.torch import load_file

    from builders import build_adapter, build_tiny_model, cli_merge

    base_dir = build_tiny_model("bert", tmp_path / "base", "SEQ_CLS")
    adapters = [build_adapter(base_dir, tmp_path / f"cls{seed}", seed=seed, family="bert", task_type="SEQ_CLS",
                              targets=["query"], calibration=4) for seed in range(2)]
    tensors = load_file(base_dir / "model.safetensors")
    key = next(k for k in tensors if k.endswith("encoder.layer.1.intermediate.dense.weight"))
    if case == "missing":
        del tensors[key]
    else:
        tensors[key] = tensors[key][:, :16].contiguous()
    folder = _copy_checkpoint(base_dir, tmp_path / "broken", {"model.safetensors": tensors})
    for offload in ("disk", "none"):
        assert cli_merge(folder, adapters, tmp_path / offload, "--offload", offload, "--modules-to-save-rule",
                         "average") == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"its checkpoint gives no usable tensor for {key} (missing, or of another shape" in last, last
        assert not (tmp_path / offload).exists()


def test_a_quantized_base_whose_quantizer_is_not_installed_is_one_line(tiny, tmp_path, capsys):
    """A GPTQ checkpoint on a host without its quantizer's package: streaming declines (its
    scales are the quantizer's), then the whole load's ImportError was a traceback, exit 1."""
    from builders import cli_merge

    base_dir, adapters = tiny["llama"]
    folder = tmp_path / "gptq"
    shutil.copytree(base_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq",
                                                                                      "bits": 4}}))
    assert cli_merge(folder, adapters, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(f"iteris-daemon: error: cannot load base model '{folder}': ")
    assert "Traceback" not in err
