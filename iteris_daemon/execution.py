"""Running calibration batches through a model one *unit* at a time.

A unit is either a transformer block or the *tail* (whatever follows the last block:
final norm, pooler, heads). The engine takes one unit at a time, brings its weights to
the device, pushes every stream (a task's own adapter, the current merge, ...) through
it, and moves on; only one block's weights and the streams' hidden states are resident.
This is how GPTQ and llm-compressor's sequential pipeline calibrate 100B+ models on one
GPU, and IterIS is layer-wise in the same way.

- :class:`BlockExecutor` captures what every block of each stack receives (hidden states
  and every keyword the model passes a block: attention mask, rotary embeddings, per-layer
  inputs, the encoder's output) once per batch, in one pass that reads no block weights,
  then calls blocks directly; one call serves every block where they are called alike.
  The tail runs the model's own forward with its blocks replaced by the streamed result,
  so heads and poolers need no architecture knowledge.
- :class:`ModelExecutor` is the fallback for models whose blocks cannot be found: one
  unit, the whole forward pass.

Both present the same interface, so the engine has one code path.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass, field
from collections.abc import MutableMapping, MutableSequence
from typing import Any, Iterator

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

try:  # a key/value cache handed to a block (see BlockExecutor._capture)
    from transformers.cache_utils import Cache
except ImportError:  # pragma: no cover - very old transformers
    Cache = ()  # type: ignore[assignment,misc]

from .errors import first_line
from .architecture import BlockPlan, Stack, block_plan, unit_of
from .model import BaseModel, embeddings

log = logging.getLogger(__name__)


class UnsupportedForBlocks(Exception):
    """This model cannot be run block by block (the message says why)."""


class _StopForward(Exception):
    pass


# What a block's stand-in returns, tried in turn until the model's loop hands each stand-in's
# hidden states on to the next block unchanged: the hidden states alone (0: most blocks), or
# first of a tuple of that length (Bloom indexes [0], DeBERTa unpacks two, T5 three).
_OUTPUT_LENGTHS = (0, 1, 2, 3, 4)


@dataclass(frozen=True)
class _Output:
    """A stand-in's placeholder for output ``index`` of block ``block``. Found in a later
    block's call, the model's loop hands that output on: streamed one at a time, the blocks
    hand on only their hidden states (and the outputs ``BlockPlan.carried`` names)."""

    block: int
    index: int


@dataclass
class Unit:
    name: str
    paths: list[str]  # targeted modules inside this unit
    stack: int | None = None  # None: the tail, or the whole model
    index: int | None = None


@dataclass
class BatchContext:
    """What every stream of one batch shares: the inputs and each stack's block calls."""

    batch: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor | None]
    # per stack: every block's call where they differ (per-layer arguments), else block 0's for all
    calls: list[list[inspect.BoundArguments]] = field(default_factory=list)
    hidden_names: list[str] = field(default_factory=list)
    encoder_argument: str | None = None  # the decoder blocks' argument for the encoder output

    def call(self, stack: int, index: int = 0) -> inspect.BoundArguments:
        """Block ``index``'s call (block 0's, where the stack's blocks are called alike)."""
        calls = self.calls[stack]
        return calls[index] if len(calls) > 1 else calls[0]

    def start(self, stack: int) -> torch.Tensor:
        """The hidden states the stack's first block receives."""
        return self.call(stack).arguments[self.hidden_names[stack]]


@dataclass
class State:
    """One stream's position in the model for one batch."""

    context: BatchContext
    hidden: torch.Tensor | None = None
    output: Any = None  # the last unit's raw output
    carried: dict[str, Any] = field(default_factory=dict)
    encoder: torch.Tensor | None = None  # the encoder's final output, once past the encoder
    stack: int = 0


class ModelExecutor:
    """Whole-model passes: one unit holding every targeted module."""

    blockwise = False

    def __init__(self, base: BaseModel, paths: list[str]):
        self.base = base
        self.units = [Unit("model", sorted(paths))]

    def begin(self, batches: list[dict[str, torch.Tensor]]) -> list[State]:
        return [State(BatchContext(batch, {})) for batch in batches]

    @contextlib.contextmanager
    def loaded(self, unit: Unit) -> Iterator[None]:
        yield

    def run(self, unit: Unit, state: State, grad: bool = False) -> State:
        return State(state.context, output=self.base.forward(state.context.batch, grad=grad))


@contextlib.contextmanager
def _standing_in(blocks: list[nn.Module], forwards: list[Any]) -> Iterator[None]:
    """Calls to ``blocks`` run ``forwards`` instead: instance attributes, which
    ``Module.__call__`` finds as ``self.forward``. The blocks stay where they are, with the
    attributes a model's loop reads (ModernBERT's ``attention_type``), and their weights
    are not read."""
    try:
        for block, forward in zip(blocks, forwards):
            block.forward = forward
        yield
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)


class BlockExecutor:
    """Block-by-block passes over the stacks found by :func:`architecture.block_plan`."""

    blockwise = True

    def __init__(self, base: BaseModel, paths: list[str], plan: BlockPlan):
        self.base, self.plan = base, plan
        self.model = base.model
        by_unit: dict[tuple[int, int], list[str]] = {}
        tail: list[str] = []
        for path in sorted(paths):
            where = unit_of(path, plan)
            (tail if where is None else by_unit.setdefault(where, [])).append(path)
        self.units = [
            Unit(stack.block_path(b), by_unit.get((s, b), []), s, b)
            for s, stack in enumerate(plan.stacks)
            for b in range(len(stack.blocks))
        ]
        self.units.append(Unit("tail", tail))
        # Modules that must run after the blocks: targeted ones outside them, and those whose
        # weights a stream swaps (modules_to_save: a stream's embedding would change its block inputs).
        heads = {key.rpartition(".")[0] for key in base.head_keys}
        self._outside = sorted(set(tail) | {p for p in heads if unit_of(p, plan) is None})
        self._signatures = [inspect.signature(stack.blocks[0].forward) for stack in plan.stacks]
        self._lengths: dict[int, int] = {}  # per stack: how many outputs its stand-ins return (0: a tensor)

    @classmethod
    def create(cls, base: BaseModel, paths: list[str]) -> "BlockExecutor | ModelExecutor":
        """Block by block when the model's blocks can be found, else whole-model passes (logged)."""
        plan = block_plan(base.model, list(base.head_keys))
        if not plan.supported:
            log.info("running whole-model passes for %s: %s", base.name_or_path, plan.reason)
            return ModelExecutor(base, paths)
        return cls(base, paths, plan)

    # -------------------------------------------------------------- capture
    def begin(self, batches: list[dict[str, torch.Tensor]]) -> list[State]:
        """Capture each stack's block calls for every batch (the streams' starting point)."""
        states = []
        for batch in batches:
            batch = {k: v.to(self.base.device) for k, v in batch.items()}
            context = BatchContext(batch, self.base.stack_masks(batch))
            for s, stack in enumerate(self.plan.stacks):
                self._capture(context, s, stack)
            states.append(State(context, hidden=context.start(0)))
        return states

    def _capture(self, context: BatchContext, s: int, stack: Stack) -> None:
        """Every block's call, from one forward pass through stand-ins that read no block weights
        (they may be on disk); block 0's alone where every block is called alike (most models:
        the same mask and rotary tables), else one per block (mixed attention types each hand
        their own; Gemma's per-layer inputs, a slice per block)."""
        hidden_name = next(iter(self._signatures[s].parameters))
        extra: dict[str, Any] = {}
        dummy = None
        if s > 0:  # a decoder: skip the encoder, its output is streamed
            dummy = torch.zeros_like(context.start(0))
            extra["encoder_outputs"] = BaseModelOutput(last_hidden_state=dummy)
        reasons: list[str] = []
        known = self._lengths.get(s)
        for length in sorted(_OUTPUT_LENGTHS, key=lambda n: n != known):  # the length found for an earlier batch first
            recorded = self._record(context.batch, extra, s, stack, hidden_name, length)
            if isinstance(recorded, str):
                reasons.append(recorded)
                continue
            calls = recorded
            self._lengths[s] = length
            break
        else:  # no stand-in's output gets the model's loop to the last block with the hidden states handed on
            raise UnsupportedForBlocks(f"its forward pass cannot run past stand-ins for {stack.path}'s blocks "
                                       f"({reasons[0]})")
        for b, call in enumerate(calls):
            for name, value in _passed(call):
                handed = next((o for o in _contents(value) if isinstance(o, _Output)), None)
                if handed is not None and self.plan.carried.get(handed.index) != name:  # T5's position bias is carried
                    raise UnsupportedForBlocks(f"its forward pass hands output {handed.index} of {stack.path}."
                                               f"{handed.block} on to {stack.path}.{b} ({name}); blocks streamed one "
                                               "at a time hand on only the hidden states")
        first = dict(_passed(calls[0]))
        ignored = {hidden_name, *self.plan.carried.values()}
        alike = all(_alike(first, dict(_passed(call)), ignored) for call in calls[1:])
        context.calls.append(calls[:1] if alike else calls)
        context.hidden_names.append(hidden_name)
        if dummy is not None:
            context.encoder_argument = _argument_holding(calls[0], dummy)
            if context.encoder_argument is None:
                raise UnsupportedForBlocks(f"cannot tell which argument of {stack.path}.0 takes the encoder output")

    def _record(self, batch: dict[str, torch.Tensor], extra: dict[str, Any], s: int, stack: Stack, hidden_name: str,
                length: int) -> list[inspect.BoundArguments] | str:
        """Every block's call, from one forward pass with each block standing in: it returns its
        hidden states, alone (``length`` 0) or first of ``length`` outputs, the others
        :class:`_Output` placeholders. The reason, where the model's loop does not hand each
        stand-in's hidden states on to the next block as they are.

        The pass goes on past the last block, to the output embeddings or another stack's
        blocks, so that a loop calling a block again (a recurrent-depth model's loops) is
        seen: streamed, each block is computed once per pass."""
        signature = self._signatures[s]
        blocks = list(stack.blocks)
        last = len(blocks) - 1
        calls: dict[int, inspect.BoundArguments] = {}
        again: list[int] = []
        early: list[str] = []  # the watched outside modules, in the order they ran
        ran_before_last = 0  # how many of ``early`` ran before the last block

        def stand_in(b: int):
            def forward(*args, **kwargs):
                nonlocal ran_before_last
                if b in calls:
                    again.append(b)
                    raise _StopForward
                calls[b] = signature.bind(*args, **kwargs)
                if b == last:
                    ran_before_last = len(early)
                hidden = calls[b].arguments[hidden_name]  # the real output is the streams' to compute
                return (hidden, *(_Output(b, i) for i in range(1, length))) if length else hidden
            return forward

        def stop_past_the_last_block(*_args) -> None:
            if last in calls:
                raise _StopForward

        modules = dict(self.model.named_modules())
        hooks = [modules[p].register_forward_hook(lambda *_a, p=p: early.append(p)) for p in self._outside]
        ends = [block for other in self.plan.stacks if other is not stack for block in other.blocks]
        ends.append(embeddings(self.model, "output"))  # its logits: the pass's largest tensor, not needed
        hooks += [end.register_forward_pre_hook(stop_past_the_last_block) for end in ends if end is not None]
        failure = None
        try:
            with _standing_in(blocks, [stand_in(b) for b in range(len(blocks))]), torch.no_grad():
                self.base.forward(batch, **extra)
        except _StopForward:
            pass
        except Exception as exc:  # it wants other outputs of a stand-in (a tensor cannot be unpacked into three)
            if last not in calls:  # past it, every call is recorded (code reading a placeholder fails)
                failure = f"{type(exc).__name__}: {first_line(exc)}"
        finally:
            for hook in hooks:
                hook.remove()
        if again:
            raise UnsupportedForBlocks(f"its forward pass calls {stack.path}.{again[0]} more than once")
        if last in calls:
            after, early = early[ran_before_last:], early[:ran_before_last]
            if after and stack is not self.plan.stacks[-1]:  # the tail unit runs after the last stack alone
                raise UnsupportedForBlocks(f"{self._what(after[0])} {after[0]} runs between {stack.path} and the "
                                           "next stack's blocks")
        for b, call in sorted(calls.items()):  # what the model hands its blocks, whatever the stand-ins return
            for name, value in _passed(call):
                if isinstance(value, Cache):  # replaying the call would grow it: whole-model passes start afresh
                    raise UnsupportedForBlocks(f"{stack.path}.{b} is handed a key/value cache ({name})")
                if isinstance(value, (MutableMapping, MutableSequence)):  # one object every stream would share
                    raise UnsupportedForBlocks(f"{stack.path}.{b} is handed a {type(value).__name__} its blocks may "
                                               f"share state through ({name}, as Gemma-4's shared key/values)")
        if failure is not None:
            return failure
        missing = next((b for b in range(len(blocks)) if b not in calls), None)
        if missing is not None:
            raise UnsupportedForBlocks(f"the forward pass never reached {stack.path}.{missing}")
        if early:
            raise UnsupportedForBlocks(f"{self._what(early[0])} {early[0]} runs before {stack.path}'s last block")
        hidden = calls[0].arguments[hidden_name]
        changed = next((b for b in range(1, len(blocks)) if calls[b].arguments[hidden_name] is not hidden), None)
        if changed is not None:  # it took a tensor stand-in's output apart (a pair unpacked), or changed it
            return f"{stack.path}.{changed} is not handed {stack.path}.{changed - 1}'s hidden states"
        return [calls[b] for b in range(len(blocks))]

    def _what(self, outside: str) -> str:
        """Why module ``outside`` (outside the blocks) is watched: targeted, or a saved module."""
        return "targeted" if outside in self.units[-1].paths else "modules_to_save"

    # -------------------------------------------------------------- weights
    @contextlib.contextmanager
    def loaded(self, unit: Unit) -> Iterator[None]:
        if unit.stack is None:
            yield
            return
        block = self.plan.stacks[unit.stack].blocks[unit.index]
        self.base.placement.load(block, self.plan.stacks[unit.stack].block_path(unit.index))
        try:
            yield
        finally:
            self.base.placement.release(block)

    # -------------------------------------------------------------- running
    def run(self, unit: Unit, state: State, grad: bool = False) -> State:
        """Push one batch's stream through ``unit``; the layer hooks fire as in a full pass.
        ``grad``: record the block's autograd graph (for the refinement's steps)."""
        context = state.context
        if unit.stack is None:
            return State(context, output=self._tail(state, grad), stack=state.stack)
        if unit.stack != state.stack:  # leaving the encoder for the decoder
            state = State(context, hidden=context.start(unit.stack), encoder=self._encoder_output(state),
                          stack=unit.stack)
        call = context.call(unit.stack, unit.index)
        bound = inspect.BoundArguments(call.signature, dict(call.arguments))
        _set_argument(bound, context.hidden_names[unit.stack], state.hidden)
        for name, value in state.carried.items():
            _set_argument(bound, name, value)
        if unit.stack > 0:
            _set_argument(bound, context.encoder_argument, state.encoder)
        self.base.use_masks(context.masks, "decoder" if unit.stack > 0 else "encoder", state.encoder)
        block = self.plan.stacks[unit.stack].blocks[unit.index]
        with torch.set_grad_enabled(grad):
            out = block(*bound.args, **bound.kwargs)
        hidden = out if isinstance(out, torch.Tensor) else out[0]
        carried = {name: out[i] for i, name in self.plan.carried.items() if not isinstance(out, torch.Tensor) and i < len(out)}
        return State(context, hidden=hidden, output=out, carried=carried, encoder=state.encoder, stack=unit.stack)

    def _encoder_output(self, state: State) -> torch.Tensor:
        """The encoder's final output (after its final norm) for a stream leaving the encoder."""
        encoder = self.model.get_encoder()
        batch = state.context.batch
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "inputs_embeds") if k in batch}
        self.base.use_masks(state.context.masks, "encoder", None)
        with self._replaying({0: state.output}), torch.no_grad():
            out = encoder(**inputs)
        return out[0]

    def _tail(self, state: State, grad: bool) -> torch.Tensor:
        """The model's own forward with every stack replaced by the streamed outputs."""
        extra = {}
        replays = {len(self.plan.stacks) - 1: state.output}
        if state.encoder is not None:
            extra["encoder_outputs"] = BaseModelOutput(last_hidden_state=state.encoder)
        with self._replaying(replays):
            return self.base.forward(state.context.batch, grad=grad, **extra)

    @contextlib.contextmanager
    def _replaying(self, outputs: dict[int, Any]) -> Iterator[None]:
        """Every block of stack ``s`` returns ``outputs[s]``, the streamed output of its last."""
        with contextlib.ExitStack() as stands:
            for s, output in outputs.items():
                blocks = list(self.plan.stacks[s].blocks)
                stands.enter_context(_standing_in(blocks, [lambda *_a, output=output, **_k: output] * len(blocks)))
            yield


def _passed(call: inspect.BoundArguments) -> Iterator[tuple[str, Any]]:
    """Each argument of ``call`` by name, those passed through ``**kwargs`` too."""
    for name, value in call.arguments.items():
        if call.signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            yield from value.items()
        else:
            yield name, value


def _contents(value: Any) -> Iterator[Any]:
    """``value`` and, inside tuples and lists, everything it holds."""
    yield value
    if isinstance(value, (tuple, list)):
        for item in value:
            yield from _contents(item)


def _alike(first: dict[str, Any], other: dict[str, Any], ignored: set[str]) -> bool:
    """Whether a block called with ``other`` is called as with ``first`` (``ignored`` aside:
    the hidden states and carried outputs, which each stream sets): every argument one object,
    equal tensors, or equal tuples of them."""
    def same(a: Any, b: Any) -> bool:
        if a is b:
            return True
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
        if isinstance(a, (tuple, list)) and type(a) is type(b):
            return len(a) == len(b) and all(map(same, a, b))
        return isinstance(a, (bool, int, float, str)) and type(a) is type(b) and a == b

    names = first.keys() - ignored
    return names == other.keys() - ignored and all(same(first[n], other[n]) for n in names)


def _argument_holding(call: inspect.BoundArguments, value: torch.Tensor) -> str | None:
    """The name ``value`` is passed under in ``call`` (through ``**kwargs`` too), or None."""
    return next((name for name, argument in _passed(call) if argument is value), None)


def _set_argument(bound: inspect.BoundArguments, name: str, value: Any) -> None:
    """Set a named argument, also when the block takes it through ``**kwargs``."""
    parameters = bound.signature.parameters
    if name in parameters and parameters[name].kind is not inspect.Parameter.VAR_KEYWORD:
        bound.arguments[name] = value
        return
    var = next((p for p in parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    if var is None:
        raise UnsupportedForBlocks(f"the block takes no argument {name!r}")
    bound.arguments[var.name] = {**bound.arguments.get(var.name, {}), name: value}


Executor = BlockExecutor | ModelExecutor


def prepare(
    base: BaseModel, paths: list[str], task_batches: list[list[dict[str, torch.Tensor]]], blockwise: bool = True
) -> tuple[Executor, list[list[State]]]:
    """The executor for a merge and every task's starting states.

    Block by block unless ``blockwise`` is false or the model cannot be (logged once,
    with the reason); then whole-model passes, with every block brought to the device.
    """
    if blockwise:
        executor = BlockExecutor.create(base, paths)
        if executor.blockwise:
            try:
                return executor, [executor.begin(batches) for batches in task_batches]
            except UnsupportedForBlocks as exc:
                log.info("running whole-model passes for %s: %s", base.name_or_path, exc)
    executor = ModelExecutor(base, paths)
    base.make_resident()
    return executor, [executor.begin(batches) for batches in task_batches]
