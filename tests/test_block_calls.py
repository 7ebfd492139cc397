"""What the block-by-block engine hands each block: every block's own call where a model's
loop hands its blocks different arguments (whatever the config says), one call for all
where it does not, and whole-model passes where a loop hands a block's other outputs on."""

import json
import logging
from functools import partial

import pytest
import torch
import transformers as tf
from torch import nn
from tqdm import tqdm
from transformers.modeling_outputs import BaseModelOutput

from builders import build_adapter, tokenizer
from iteris_daemon.alignment import AlignmentOptions, align
from iteris_daemon.calibration import read_jsonl
from iteris_daemon.execution import prepare
from iteris_daemon.lora import load_adapter
from iteris_daemon.model import BaseModel

quiet = partial(tqdm, disable=True)
TOKENS = dict(vocab_size=30522, pad_token_id=0, bos_token_id=101, eos_token_id=102)


class LoopConfig(tf.PretrainedConfig):
    """``outputs``: how many outputs a layer returns (0: its hidden states alone), the loop
    taking them apart as models do; ``hand_on``: each layer reads the gate the one before returns;
    ``loops``: how many times the loop runs the layers (a recurrent-depth model's)."""

    model_type = "iteris_test_loop"

    def __init__(self, hidden_size: int = 32, num_hidden_layers: int = 3, outputs: int = 0, hand_on: bool = False,
                 loops: int = 1, **kwargs):
        self.hidden_size, self.num_hidden_layers, self.outputs, self.hand_on = hidden_size, num_hidden_layers, outputs, hand_on
        self.loops = loops
        super().__init__(**{**TOKENS, **kwargs})


class LoopLayer(nn.Module):
    def __init__(self, config: LoopConfig):
        super().__init__()
        self.outputs = config.outputs
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.down_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor | None = None):
        own = torch.sigmoid(self.q_proj(hidden_states))
        gate = own if gate is None else own * gate  # as an indexer's top-k handed from layer to layer
        out = hidden_states + self.down_proj(gate * hidden_states)
        return (out, gate, own, own)[:self.outputs] if self.outputs else out


class LoopModel(tf.PreTrainedModel):
    config_class = LoopConfig

    def __init__(self, config: LoopConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LoopLayer(config) for _ in range(config.num_hidden_layers))
        self.post_init()

    def forward(self, input_ids: torch.Tensor, **kwargs) -> BaseModelOutput:
        hidden, gate = self.embed_tokens(input_ids), None
        for layer in [*self.layers] * self.config.loops:
            out = layer(hidden, gate)
            if self.config.outputs == 0:  # Llama
                hidden = out
            elif self.config.outputs == 1:  # Bloom
                hidden = out[0]
            elif self.config.outputs == 2:  # DeBERTa
                hidden, handed = out
            elif self.config.outputs == 3:  # T5
                hidden, handed, _ = out
            else:  # four: hidden states, attention weights, cache, router logits
                hidden, handed, _, _ = out
            gate = handed if self.config.hand_on else None
        return BaseModelOutput(last_hidden_state=hidden)


tf.AutoConfig.register(LoopConfig.model_type, LoopConfig, exist_ok=True)
tf.AutoModel.register(LoopConfig, LoopModel, exist_ok=True)


def _per_layer_gemma() -> tf.PretrainedConfig:
    """EmbeddingGemma-2's text model: Gemma-4's per-layer inputs (a slice per layer), one
    attention type, and no shared key/value dict (Gemma-4's text model is handed one, and
    runs whole-model passes for it)."""
    return tf.EmbeddingGemma2TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=16, global_head_dim=16,
                                        max_position_embeddings=128, hidden_size_per_layer_input=8, embedding_dim=16,
                                        layer_types=["full_attention"] * 3, **TOKENS)


def _base(tmp_path, config, targets, **kwargs):
    base_dir = tmp_path / "base"
    torch.manual_seed(0)
    model = tf.AutoModel.from_config(config)
    model.save_pretrained(base_dir)
    tokenizer().save_pretrained(base_dir)
    dirs = [build_adapter(base_dir, tmp_path / f"a{seed}", seed=seed, family="x", targets=targets, calibration=6,
                          base_class=type(model)) for seed in range(2)]
    for d in dirs:  # PEFT records a class outside transformers (the test's own) that the merge refuses to load
        config = json.loads((d / "adapter_config.json").read_text())
        config.pop("auto_mapping", None)
        (d / "adapter_config.json").write_text(json.dumps(config))
    adapters, data = [load_adapter(d) for d in dirs], [read_jsonl(d / "calibration.jsonl") for d in dirs]
    return BaseModel(str(base_dir), adapters, **kwargs), adapters, data


def _options(**overrides) -> AlignmentOptions:
    values = dict(iterations=2, a1=1e-3, a2=1e-3, adaptive_weights=True, accumulate_dtype="float64")
    return AlignmentOptions(**{**values, **overrides})


def _assert_merges_as_whole(base, adapters, data, execution: str, batch_size: int = 3) -> None:
    blocks, metrics = align(base, adapters, data, _options(batch_size=batch_size), quiet)
    assert metrics["execution"] == execution
    whole, whole_metrics = align(base, adapters, data, _options(batch_size=batch_size, blockwise=False), quiet)
    assert whole_metrics["execution"] == "whole model" and blocks.keys() == whole.keys()
    for path, (B, A) in blocks.items():
        Bw, Aw = whole[path]
        torch.testing.assert_close((B @ A).double(), (Bw @ Aw).double(), rtol=1e-5, atol=1e-7, msg=path)


def test_per_layer_inputs_of_one_attention_type_reach_each_block(tmp_path):
    """Only a config whose layer_types mixed attention types had every block's call captured:
    with one type, every block was handed block 0's per-layer input, and the merge differed
    from the whole model's (1.28 relative) without a word. Now each block's own, streamed
    from disk, merges as the whole model does."""
    base, adapters, data = _base(tmp_path, _per_layer_gemma(), ["q_proj", "v_proj", "down_proj"],
                                 offload="disk")
    _, [[state, *_]] = prepare(base, [], [base.batches(data[0], 3, 64)])
    calls = [call.arguments for call in state.context.calls[0]]
    assert len(calls) == 3  # one call per block, the weights still on disk
    assert all(p.device.type == "meta" for p in base.model.layers.parameters())
    slices = [call["per_layer_input"] for call in calls]
    assert not torch.equal(slices[0], slices[1])
    # each block's slice a view of the one tensor the model made, the mask the one object
    assert len({s.untyped_storage().data_ptr() for s in slices}) == 1
    assert calls[0]["attention_mask"] is calls[1]["attention_mask"] is calls[2]["attention_mask"]
    _assert_merges_as_whole(base, adapters, data, "blocks")


def test_blocks_called_alike_keep_one_call(tiny):
    """Llama's blocks get one mask and one pair of rotary tables: block 0's call serves all."""
    base_dir, adapter_dirs = tiny["llama"]
    base = BaseModel(str(base_dir), [load_adapter(d) for d in adapter_dirs])
    _, [[state, *_]] = prepare(base, [], [base.batches(read_jsonl(adapter_dirs[0] / "calibration.jsonl"), 3, 64)])
    assert len(state.context.calls) == 1 and len(state.context.calls[0]) == 1


def test_a_loop_handing_a_blocks_other_output_on_runs_whole(tmp_path, caplog):
    """A layer returning (hidden states, gate) whose next layer reads the gate: block 0's call
    (no gate) was replayed for every block, a silently different merge. Now the capture sees
    the gate handed on, and the merge runs whole-model passes, saying why."""
    base, adapters, data = _base(tmp_path, LoopConfig(outputs=2, hand_on=True), ["q_proj", "down_proj"])
    with caplog.at_level(logging.INFO, logger="iteris_daemon.execution"):
        _assert_merges_as_whole(base, adapters, data, "whole model", batch_size=2)
    assert "hands output 1 of layers.0 on to layers.1 (gate)" in caplog.text


def test_a_loop_calling_its_blocks_again_runs_whole(tmp_path, caplog):
    """A recurrent-depth model runs its blocks more than once per pass (Dory's loops): the
    capture stopped at the last block's first call and streamed each block once, a merge off
    the whole model's without a word (0.24 relative for a Dory of recurrent layers only). The
    capture now runs on past the last block, sees the second call, and says why it runs
    whole-model passes."""
    base, adapters, data = _base(tmp_path, LoopConfig(loops=2), ["q_proj", "down_proj"])
    with caplog.at_level(logging.INFO, logger="iteris_daemon.execution"):
        _assert_merges_as_whole(base, adapters, data, "whole model", batch_size=2)
    assert "its forward pass calls layers.0 more than once" in caplog.text


def test_the_capture_stops_before_the_lm_head(tiny):
    """Going on past the last block, the capture pass stops at the LM head: its logits (tokens
    x vocabulary) are the largest tensor of a pass, and nothing the blocks need."""
    base_dir, adapter_dirs = tiny["llama"]
    base = BaseModel(str(base_dir), [load_adapter(d) for d in adapter_dirs])
    head, norm = base.model.get_output_embeddings(), base.model.model.norm
    ran = []
    hooks = [module.register_forward_hook(lambda module, *_: ran.append(module)) for module in (head, norm)]
    prepare(base, [], [base.batches(read_jsonl(adapter_dirs[0] / "calibration.jsonl"), 3, 64)])
    for hook in hooks:
        hook.remove()
    assert ran and all(module is norm for module in ran)  # past the last block, not into the head


@pytest.mark.parametrize("outputs", [0, 1, 2, 3, 4])
def test_blocks_whose_loop_takes_their_output_apart_stream(tmp_path, outputs):
    """A stand-in returns as many outputs as the model's loop takes apart (Bloom's indexes [0],
    DeBERTa's unpacks two, T5's three, four), also where the hidden states alone would unpack
    without an error: batches as long as the loop unpacks."""
    base, adapters, data = _base(tmp_path, LoopConfig(outputs=outputs), ["q_proj", "down_proj"])
    _assert_merges_as_whole(base, adapters, data, "blocks", batch_size=max(outputs, 2))


def test_bamba_whose_loop_unpacks_a_pair_streams(tmp_path):
    """Bamba's loop unpacks (hidden states, attention weights) from each layer: its merges ran
    whole-model passes, the capture's stand-ins returning the hidden states alone. They return
    a pair now, and its mamba and attention layers, each handed its own mask, stream from disk
    and merge as the whole model does (batches of two, which a tensor unpacks without an error)."""
    config = tf.BambaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                            num_key_value_heads=1, max_position_embeddings=128, attn_layer_indices=[1, 3],
                            mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8, mamba_chunk_size=4,
                            **TOKENS)
    base, adapters, data = _base(tmp_path, config, ["q_proj", "v_proj", "in_proj", "down_proj"], offload="disk")
    _assert_merges_as_whole(base, adapters, data, "blocks", batch_size=2)
