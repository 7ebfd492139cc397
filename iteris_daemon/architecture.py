"""Where a transformers model keeps its blocks, and how one block hands over to the next.

The block-by-block engine (:mod:`iteris_daemon.execution`) needs a few facts about an
architecture, and this module is the only place that knows them:

- the *stacks*: the ``ModuleList`` s of identical blocks, in the order the forward pass
  runs them (decoder-only and encoder-only models have one; encoder-decoder models two,
  the one under ``model.get_encoder()`` first);
- which outputs of a block feed the next block's arguments. Most blocks take only the
  hidden states from their predecessor; T5's first block computes the relative position
  bias that the later blocks of its stack reuse (``CARRIED_OUTPUTS``);
- whether the forward pass leaves the blocks' weights as loaded: RWKV's first pass in eval
  mode divides them in place every ``rescale_every`` blocks, which blocks brought in one at
  a time would miss;
- whether the forward pass calls each block of a stack exactly once. ALBERT calls one
  shared block at every depth, and a config may run fewer layers than the stack holds;
  a stack whose length is not the depth its config declares, or that holds one module
  twice, runs whole too.

Everything else (attention masks, rotary embeddings, per-layer inputs, the encoder's output
for the decoder's cross-attention) is captured from the model's own forward pass, not known here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from .figures import whole_number

try:  # GPT-2 style layers store their weight transposed (d_in, d_out).
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - very old transformers
    Conv1D = ()  # type: ignore[assignment]

# model_type -> {index of a block output: name of the next block's argument it feeds}.
CARRIED_OUTPUTS: dict[str, dict[int, str]] = {
    "t5": {1: "position_bias", 2: "encoder_decoder_position_bias"},
    "mt5": {1: "position_bias", 2: "encoder_decoder_position_bias"},
    "longt5": {1: "position_bias", 3: "encoder_decoder_position_bias"},
}


def linear_kind(module: nn.Module) -> str | None:
    """``linear`` (weight stored (d_out, d_in)), ``conv1d`` (GPT-2's, stored (d_in, d_out):
    PEFT's ``fan_in_fan_out``), or None: not a layer a LoRA of ours adapts."""
    if isinstance(module, nn.Linear):
        return "linear"
    if Conv1D and isinstance(module, Conv1D):
        return "conv1d"
    return None


def weight_shape(module: nn.Module) -> tuple[int, int] | None:
    """(d_out, d_in) of a linear layer, whichever way it stores its weight, else None."""
    kind = linear_kind(module)
    if kind is None:
        return None
    d0, d1 = module.weight.shape
    return (d1, d0) if kind == "conv1d" else (d0, d1)


@dataclass
class Stack:
    """One ``ModuleList`` of blocks, e.g. ``model.layers`` or ``encoder.block``."""

    path: str
    blocks: nn.ModuleList

    def block_path(self, index: int) -> str:
        return f"{self.path}.{index}"


@dataclass
class BlockPlan:
    """The stacks to stream through, or the reason the model must run whole."""

    stacks: list[Stack] = field(default_factory=list)
    carried: dict[int, str] = field(default_factory=dict)
    reason: str | None = None  # set: no block-by-block execution for this model

    @property
    def supported(self) -> bool:
        return self.reason is None


def _candidate_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Outermost ModuleLists whose entries share one class and hold linear layers."""
    found: list[tuple[str, nn.ModuleList]] = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(path.startswith(f"{outer}.") for outer, _ in found):
            continue  # e.g. a MoE block's experts inside a stack already found
        if len({type(block) for block in module}) != 1:
            continue
        if not any(linear_kind(m) for m in module[0].modules()):
            continue
        found.append((path, module))
    return found


def _no_stack(model: nn.Module) -> str:
    """Why no stack was found, naming a list of blocks of several kinds where there is one
    (hybrids such as Jamba and Zamba2 alternate Mamba and attention blocks in one list)."""
    for path, module in model.named_modules():
        kinds = sorted({type(block).__name__ for block in module}) if isinstance(module, nn.ModuleList) else []
        if len(kinds) > 1 and any(linear_kind(m) for m in module.modules()):
            return f"no stack of identical blocks found ({path} mixes {', '.join(kinds)})"
    return "no stack of identical blocks found"


def block_plan(model: nn.Module, modules_to_save: Iterable[str] = ()) -> BlockPlan:
    """Find the stacks of blocks ``model`` runs one after another (none, with the reason,
    where it cannot run block by block: ``modules_to_save`` tensors inside a block, say).

    Targeted layers outside every stack must come after the last block (a pooler, a
    head): they run in the tail pass. Whether they really do is checked when the first
    block's inputs are captured (``execution.BlockExecutor``).
    """
    config = getattr(model, "config", None)
    candidates = _candidate_stacks(model)
    if not candidates:
        return BlockPlan(reason=_no_stack(model))
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    if encoder_decoder:
        encoder = model.get_encoder()
        encoder_lists = {id(m) for m in encoder.modules() if isinstance(m, nn.ModuleList)}
        ordered = sorted(candidates, key=lambda c: id(c[1]) not in encoder_lists)
        if len(ordered) != 2 or id(ordered[0][1]) not in encoder_lists:
            return BlockPlan(reason=f"expected one encoder and one decoder stack, found {[p for p, _ in candidates]}")
    elif len(candidates) != 1:
        return BlockPlan(reason=f"several block stacks ({', '.join(p for p, _ in candidates)})")
    else:
        ordered = candidates
    if getattr(config, "rescale_every", 0):  # RWKV
        return BlockPlan(reason="its forward pass rescales its blocks' weights in place (rescale_every)")
    for key in modules_to_save:
        if any(key.startswith(f"{p}.") for p, _ in ordered):
            return BlockPlan(reason=f"modules_to_save {key} lies inside a block")
    for (path, blocks), depth in zip(ordered, _declared_depths(config, encoder_decoder)):
        if len({id(block) for block in blocks}) != len(blocks):
            return BlockPlan(reason=f"{path} holds one block at several depths (shared weights)")
        if depth is not None and depth != len(blocks):
            return BlockPlan(reason=f"{path} holds {len(blocks)} blocks but the config runs {depth} layers "
                                    "(blocks shared across depths, or some skipped)")
    stacks = [Stack(path, blocks) for path, blocks in ordered]
    model_type = getattr(config, "model_type", "")
    return BlockPlan(stacks=stacks, carried=CARRIED_OUTPUTS.get(model_type, {}))


def _declared_depths(config, encoder_decoder: bool) -> list[int | None]:
    """How many layers the config says each stack's forward runs (None: it does not say).
    ``num_hidden_layers`` is the only stack's, or the encoder's (transformers maps each
    family's own name onto it); the decoder's has one of two names."""
    def integer(*names: str) -> int | None:
        values = [getattr(config, name, None) for name in names]
        return next((v for v in values if whole_number(v)), None)

    depths = [integer("num_hidden_layers")]
    if encoder_decoder:
        depths.append(integer("decoder_layers", "num_decoder_layers"))
    return depths


def unit_of(path: str, plan: BlockPlan) -> tuple[int, int] | None:
    """(stack index, block index) of a module path, or None when it is outside every block."""
    for s, stack in enumerate(plan.stacks):
        prefix = f"{stack.path}."
        if path.startswith(prefix):
            head = path[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                return s, int(head)
    return None
