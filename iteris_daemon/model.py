"""The base model at run time: loading, shape checks, and a hook-based LoRA runtime.

Instead of stacking N adapters in PEFT, one forward hook per targeted layer adds
whichever low-rank delta is active (task i's own, or the current merge) and, when
asked, hands the layer's input rows to a recorder. Swapping the active delta is a
dict assignment, so the same loaded model serves every task and every iteration.
"""

from __future__ import annotations

import inspect
import logging
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from .calibration import CalibrationSet, Sample
from .devices import check_device
from .errors import BaseModelError, CalibrationError, ParameterError, first_line
from .architecture import linear_kind, weight_shape
from .lora import LoraAdapter
from .shapes import BaseShapes, check_shapes, head_labels
from .model_class import instantiate, model_class_for

log = logging.getLogger(__name__)
OFFLOAD = ("auto", "disk", "cpu", "none")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_device(name: str) -> torch.device:
    """``name`` as a torch device that exists here, or a one-line error."""
    try:
        device = torch.device(check_device(name))
    except ValueError as exc:
        raise BaseModelError(str(exc)) from None
    except RuntimeError:  # a name torch refuses all the same (an index past its range)
        raise BaseModelError(f"unknown device {name!r} (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise BaseModelError(f"device {name!r} is not available here ({torch.cuda.device_count()} CUDA devices)")
    return device


def _move_except(model: nn.Module, keep: set[int], device: torch.device) -> None:
    """Move ``model`` but the modules in ``keep`` (by id) and their children to ``device``.

    A module holding a kept one moves its own parameters and buffers, the root's too (XLNet's
    ``mask_emb`` stayed on the CPU for the forward to mix with the device's tensors), and its
    parameters stay Parameters (``get_parameter`` and the heads' replacement look them up)."""
    for name, param in model.named_parameters(recurse=False):
        moved = param.to(device)
        if moved is not param:
            model._parameters[name] = nn.Parameter(moved, requires_grad=param.requires_grad)
    for name, buffer in model.named_buffers(recurse=False):
        model._buffers[name] = buffer.to(device)
    for module in model.children():
        if id(module) in keep:
            continue
        if any(id(m) in keep for m in module.modules()):
            _move_except(module, keep, device)
        else:
            module.to(device)


def _label_config(adapters: list[LoraAdapter]) -> dict[str, int]:
    """``num_labels`` for the base model's config, from the adapters' classifier heads.

    Heads travel as ``modules_to_save``; their output width is the label count
    (:func:`~iteris_daemon.shapes.head_labels`; the first adapter with a head says it, and
    a head of another width then fails the shape check against the loaded model). Only
    classifiers take it: other task types' heads are not sized by labels.
    """
    if not adapters or adapters[0].task_type not in ("SEQ_CLS", "TOKEN_CLS"):
        return {}
    labels = next((labels for a in adapters
                   if (labels := head_labels({k: tuple(t.shape) for k, t in a.modules_to_save.items()})) is not None),
                  None)
    return {} if labels is None else {"num_labels": labels}


def pad_within(tokenizer, model: nn.Module, name: str) -> None:
    """Make ``tokenizer`` and ``model``'s config agree on a pad id the model's input embedding
    holds (:func:`_agree_on_padding`): for the merge's passes and for text generated from it."""
    _agree_on_padding(tokenizer, model.config, input_rows(model), name)


def input_rows(model: nn.Module) -> int | None:
    """The rows of ``model``'s input embedding: the token ids it holds (None: no embedding to ask)."""
    tokens = embeddings(model, "input")
    return tokens.weight.shape[0] if isinstance(getattr(tokens, "weight", None), torch.Tensor) else None


def _agree_on_padding(tokenizer, config, rows: int | None, name: str) -> None:
    """Pad with the id the model's config names, else give the tokenizer a pad token (its
    EOS or UNK) and the config that id. A decoder classifier pools the last token that is
    not ``config.pad_token_id``: padded with another id, it read a padding position (stock
    Llama tokenizers have no pad token; their configs name none, or 0), and with none named
    it refused batches of more than one sample.

    Only an id the model holds pads (``rows``: its input embedding's; None: it has none to
    ask). A pad token added to the tokenizer, the embedding not resized (Qwen2Tokenizer's
    ``<pad>`` past a small vocabulary), failed every pass with an IndexError, which the
    block-by-block capture took for an unsupported architecture. Padded positions are
    masked: the EOS or UNK pads alike."""
    limit = len(tokenizer) if rows is None else min(len(tokenizer), rows)

    def held(token_id) -> bool:
        return isinstance(token_id, int) and 0 <= token_id < limit

    named = getattr(config, "pad_token_id", None)
    if held(named):
        if tokenizer.pad_token_id != named:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(named)
        return
    past = [] if rows is None else [
        said for said, token_id in ((f"its config's pad_token_id {named}", named),
                                    (f"its tokenizer's pad token {tokenizer.pad_token} (id {tokenizer.pad_token_id})",
                                     tokenizer.pad_token_id)) if isinstance(token_id, int) and token_id >= rows]
    if not held(tokenizer.pad_token_id):
        given = [(token, tokenizer.convert_tokens_to_ids(token))
                 for token in (tokenizer.pad_token, tokenizer.eos_token, tokenizer.unk_token) if token is not None]
        choice = next((token for token, token_id in given if held(token_id)), None)
        if choice is None and given:
            raise BaseModelError(f"base model {name!r}: none of its tokenizer's pad, EOS and UNK tokens ("
                                 + ", ".join(f"{token} id {token_id}" for token, token_id in given)
                                 + f") is a row of its input embedding to pad with (ids 0-{limit - 1}): resize the "
                                   "embedding to the tokenizer, or save a tokenizer whose pad token it holds")
        tokenizer.pad_token = choice
    if past and tokenizer.pad_token is not None:
        log.info("base model %s: %s %s past its input embedding (%d rows); padding with %s (id %d), which it holds "
                 "(padded positions are masked)", name, " and ".join(past), "is" if len(past) == 1 else "are", rows,
                 tokenizer.pad_token, tokenizer.pad_token_id)
    config.pad_token_id = tokenizer.pad_token_id


@dataclass
class Delta:
    """A low-rank delta ``scaling * B @ A`` installed on one layer."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float = 1.0


def adapter_deltas(adapter: LoraAdapter, paths: Iterable[str] | None = None) -> dict[str, Delta]:
    """An adapter's own deltas, at ``paths`` only when given (those it adapts)."""
    modules = adapter.modules
    chosen = modules if paths is None else [p for p in paths if p in modules]
    return {p: Delta(modules[p].A, modules[p].B, modules[p].scaling) for p in chosen}


def factor_deltas(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Delta]:
    """A merge's ``(B, A)`` factors (scaling folded in) as installable deltas."""
    return {p: Delta(A, B) for p, (B, A) in factors.items()}


LORA_DTYPE = torch.float32
"""What the LoRA path runs in, whatever the model's dtype: PEFT (``autocast_adapter_dtype``,
its default) upcasts float16/bfloat16 adapter weights to float32, casts each layer's input
to them and adds the result to the base output before casting back, so the merge and its
measurements see the model the merged adapter is served as."""


def _add_delta(output: torch.Tensor, x: torch.Tensor, delta: Delta) -> torch.Tensor:
    """``output + scaling * x A^T B^T`` as PEFT's LoRA forward computes it: in the factors'
    dtype (:data:`LORA_DTYPE`), then cast to the output's. A float32 output is written into
    in place (a layer's fresh output, not yet seen by anything else): no output-sized temporaries."""
    h = x.reshape(-1, x.shape[-1]).to(delta.A.dtype) @ delta.A.T
    if output.dtype == delta.B.dtype and output.is_contiguous():
        output.view(-1, output.shape[-1]).addmm_(h, delta.B.T, alpha=delta.scaling)
        return output
    lora = (h @ delta.B.T).mul_(delta.scaling).reshape(output.shape)
    return lora.add_(output).to(output.dtype)


Recorder = Callable[[str, torch.Tensor, torch.Tensor, "torch.Tensor | None"], None]
"""Called as ``recorder(path, x, y, mask)`` with a layer's raw input and output and the
padding mask that applies to them (see :func:`row_mask`)."""


def row_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """A (rows, 1) 0/1 column that zeroes the padding rows of ``x.reshape(-1, d)``, or None.

    Token-level tensors (batch, seq, ..., d) are masked, each token's rows by its mask, and
    so are those with size-1 dimensions among the leading ones: DeepSeek's multi-head latent
    attention (MLA) feeds ``kv_b_proj`` (batch, 1, seq, d), whose padding rows went into its
    Gram (the merge moved 7-9 % with the batch size). Tensors with one vector per sequence (a
    BERT pooler's (batch, d)) have no padding. Multiplying by a mask instead of boolean
    indexing keeps the hot path free of host synchronisation.
    """
    if mask is None:
        return None
    if x.dim() == 2:
        return mask.reshape(-1, 1) if x.shape[0] == mask.numel() and mask.shape[1] > 1 else None
    lead = tuple(x.shape[:-1])
    if lead[:2] == tuple(mask.shape):  # (batch, seq, ...): a token's rows are consecutive
        return mask.reshape(*mask.shape, *(1,) * (len(lead) - 2)).expand(lead).reshape(-1, 1)
    if (lead[0], *(size for size in lead[1:] if size != 1)) == tuple(mask.shape):  # (batch, 1, seq)
        return mask.reshape(-1, 1)
    return None


def masked_rows(x: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x`` as (rows, features) in ``dtype``, padding rows zeroed (they add nothing to a Gram)."""
    rows = x.reshape(-1, x.shape[-1])
    if dtype is not None:
        rows = rows.to(dtype)
    column = row_mask(x, mask)
    return rows if column is None else rows * column.to(rows.dtype)


def base_shapes(model: nn.Module) -> BaseShapes:
    """The shapes :func:`iteris_daemon.shapes.check_shapes` checks adapters against (a
    skeleton from :func:`load_skeleton` gives them without weights)."""
    layers, other = {}, {}
    for path, module in model.named_modules():
        shape = weight_shape(module)
        if shape is not None:
            layers[path] = [linear_kind(module), *shape]
        elif path:
            other[path] = type(module).__name__
    parameters, first = {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        parameters[name] = list(p.shape)
        first.setdefault(id(p), name)
    tied = {name: first[id(p)] for name, p in model.named_parameters(remove_duplicate=False) if first[id(p)] != name}
    return {"layers": layers, "other": other, "parameters": parameters, "tied": tied}


def check_adapter_shapes(model: nn.Module | BaseShapes, adapter: LoraAdapter, model_name: str) -> None:
    """Every LoRA tensor must sit on a linear layer of ``model`` with matching shapes.

    Works on a real model, a weightless skeleton (see :func:`load_skeleton`) or their
    :func:`base_shapes`.
    """
    shapes = model if isinstance(model, dict) else base_shapes(model)
    check_shapes(shapes, {p: (m.B.shape[0], m.A.shape[1]) for p, m in adapter.modules.items()},
                 {k: tuple(t.shape) for k, t in adapter.modules_to_save.items()}, adapter.path, model_name,
                 adapter.tied_copies)


def load_skeleton(name_or_path: str, adapter: LoraAdapter, trust_remote_code: bool = False) -> nn.Module:
    """The base model's module tree on the meta device: shapes without weights or RAM.

    Only the config is read, so checking an adapter against its base model costs
    milliseconds and no download of the weights.
    """
    from transformers import AutoConfig

    _check_local(name_or_path)
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code,
                                            **_label_config([adapter]))
        cls = model_class_for([adapter], config)
        with torch.device("meta"):
            if hasattr(cls, "from_config"):  # an auto class; concrete classes have _from_config
                return cls.from_config(config, trust_remote_code=trust_remote_code)
            return cls._from_config(config)
    except (OSError, ValueError, KeyError) as exc:
        raise BaseModelError(f"cannot read base model config {name_or_path!r}: {first_line(exc)}") from None


IGNORE = -100
"""A ``labels`` entry that predicts nothing (padding), as transformers marks it."""

Cut = tuple[Sample, int, bool]
"""A sample a pass cut at max_length: its token count, and whether its text was longer than
any max_length tokens and shortened before it was tokenized (the count is then a floor)."""

POSITION_HEADS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")
# Another modality's inputs a forward may take besides text (an image's, a video's, audio's).
MODALITY_INPUTS = ("pixel_values", "pixel_values_videos", "input_features", "input_values")
"""PEFT task types whose heads read the model's last hidden states at input positions."""


def _tokenizer(name_or_path: str, trust_remote_code: bool):
    """The base model's tokenizer, or one line saying why there is none (transformers' own
    message for a folder without tokenizer files ends its first line at "from one of:")."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        said = " ".join(str(exc).split())
        raise BaseModelError(f"cannot load the tokenizer of base model {name_or_path!r} (save it beside the weights: "
                             f"tokenizer.save_pretrained): {said[:300]}") from None


def _check_initialised(model: nn.Module, initialised: set[str], resized: set[str], replaced: Iterable[str],
                       name: str) -> None:
    """Judge the weights the checkpoint did not give and the loader initialised at random
    (missing, or of another shape), but for those the adapters' saved modules replace.
    Refused, as a merge on them exits 0 and means nothing: those inside the blocks (the
    model's module lists), the embeddings (token, position, token type: every block reads
    them), and ``resized`` ones (an embedding of another vocabulary, drawn afresh because
    transformers was told to ignore sizes for a classifier's head). Logged: any other (a
    pooler an MLM checkpoint lacks, which a classifier reads as it was drawn when the adapter
    was trained)."""
    lists = [path for path, module in model.named_modules() if isinstance(module, nn.ModuleList)]
    tokens = embeddings(model, "input")
    inputs = {f"{path}.{key}" for path, module in model.named_modules()
              if module is tokens or isinstance(module, nn.Embedding) for key, _ in module.named_parameters()}
    judged = initialised - set(replaced)
    random = sorted(resized & judged | inputs & judged | {
        key for key in judged if any(key.startswith(f"{path}.") for path in lists)})
    if random:
        raise BaseModelError(f"base model {name!r}: its checkpoint gives no usable tensor for {random[0]} (missing, or "
                             f"of another shape: the loader would initialise it at random; {len(random)} such)")
    if judged:
        log.warning("base model %s: its checkpoint gives no tensor for %s, initialised at random as transformers "
                    "does (what reads it depends on that draw)", name, ", ".join(sorted(judged)))


def embeddings(model: nn.Module, side: str) -> nn.Module | None:
    """The model's ``input`` (token) or ``output`` embeddings (its LM head); None for a model
    without (speech models: transformers 5 raises for them)."""
    try:
        return getattr(model, f"get_{side}_embeddings")()
    except (AttributeError, NotImplementedError):
        return None


def _chars_per_token(tokenizer) -> int:
    """How many characters one token may cover, generously: the longest of the vocabulary's
    tokens as written (a byte-level token's bytes, each a character), at least 256 (a word
    the vocabulary cannot split is one unknown token)."""
    if tokenizer is None:
        return 256
    try:
        longest = max(map(len, tokenizer.get_vocab()), default=0)
    except (AttributeError, NotImplementedError, TypeError):  # a tokenizer without a vocabulary to list
        longest = 0
    return max(256, longest)


def _max_tokens(config, tokenizer) -> int | None:
    """The longest input the model reads: its position table's size, and its tokenizer's
    limit where set (RoBERTa's table holds two more rows than it can use); None: no limit."""
    limits = [getattr(config, key, None) for key in ("max_position_embeddings", "n_positions", "max_seq_len")]
    limits.append(getattr(tokenizer, "model_max_length", None))
    limits = [n for n in limits if isinstance(n, int) and 0 < n < 1_000_000]  # tokenizers say "no limit" with 1e30
    return min(limits, default=None)


_HUB_ID = re.compile(r"[\w-][\w.-]*(/[\w-][\w.-]*)?")  # "gpt2", "org/name": at most one "/"


def _check_local(name_or_path: str) -> None:
    """A name that can only be a local path (absolute, ``./``, ``~``, or more than one
    ``/``) must be a folder; transformers would answer with a Hub repo id error."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():  # transformers said "Should have a model_type key in its config.json"
            raise BaseModelError(f"base model folder {name_or_path} has no config.json (is it a model folder?)")
        return
    if _HUB_ID.fullmatch(name_or_path):
        return
    if path.exists():
        raise BaseModelError(f"base model {name_or_path} is not a folder")
    raise BaseModelError(f"base model folder {name_or_path} does not exist")


class BaseModel:
    """A loaded base model plus the runtime that applies LoRA deltas to it."""

    def __init__(
        self,
        name_or_path: str,
        adapters: list[LoraAdapter],
        device: str = "cpu",
        dtype: str = "float32",
        trust_remote_code: bool = False,
        offload: str = "auto",
    ):
        from transformers import AutoConfig

        if offload not in OFFLOAD:
            raise ValueError(f"offload must be one of {', '.join(OFFLOAD)}, got {offload!r}")
        self.task_type = adapters[0].task_type if adapters else None  # one for all: model_class_for checks
        kwargs: dict = {"trust_remote_code": trust_remote_code, **_label_config(adapters)}
        self.name_or_path = name_or_path
        self._stack_paths: list[str] = []
        # Parameters the checkpoint does not give (a classifier a causal LM's checkpoint lacks):
        # initialised at random by the loader. A streamed load initialises only those the
        # adapters' saved modules replace, or is not taken.
        self.initialised: set[str] = set()
        self.device = torch_device(device)
        self.dtype = DTYPES[dtype]
        _check_local(name_or_path)
        try:
            config = AutoConfig.from_pretrained(name_or_path, **kwargs)
            cls = self.model_class = model_class_for(adapters, config)
            self.head_keys = sorted({k for a in adapters for k in a.modules_to_save})
            self.model, self.placement = self._load(cls, config, kwargs, offload)
        except (OSError, ValueError) as exc:
            raise BaseModelError(f"cannot load base model {name_or_path!r}: {first_line(exc)}") from None
        # What the model's forward reads first: ``input_ids`` for text; an image or speech
        # model's pixels or features no calibration text can give (see require_text).
        self.main_input = getattr(self.model, "main_input_name", "input_ids")
        self.tokenizer = _tokenizer(name_or_path, trust_remote_code) if self.main_input == "input_ids" else None
        self.model.eval().requires_grad_(False)  # frozen: only a merge's own factors ever get gradients
        # Every pass is one teacher-forced forward: no key/value cache, whether or not the
        # model's forward takes use_cache by name (the block executor replays one captured
        # call per block; a cache in it would grow with each replay).
        if hasattr(self.model.config, "use_cache"):
            self.model.config.use_cache = False
        # A token id past these rows (a tokenizer's added tokens, the embedding not resized)
        # is refused by name (_check_held), not met as an IndexError in a pass.
        self._rows = input_rows(self.model)
        if self.tokenizer is not None:
            pad_within(self.tokenizer, self.model, name_or_path)
            self.tokenizer.padding_side = "right"
        # (what, source): the warnings given, each once (source "": the model's own); a merge
        # reads a set several times (the task model, each iteration, the evaluation).
        self._warned: set[tuple[str, str]] = set()
        # Per calibration source, how many of its samples a pass cut at max_length (the report's).
        self.samples_cut: dict[str, int] = {}
        self.max_tokens = _max_tokens(self.model.config, self.tokenizer)
        self._chars_per_token = _chars_per_token(self.tokenizer)
        self.is_encoder_decoder = bool(getattr(self.model.config, "is_encoder_decoder", False))
        # An encoder-decoder is teacher-forced on each sample's target, except under a
        # classification or span head (BART, T5 for sequence classification): that model
        # makes its decoder inputs itself, from input_ids shifted right, and reads the
        # decoder at input positions (a bare T5Model makes none: it is teacher-forced).
        self.teacher_forced = self.is_encoder_decoder and self.task_type not in POSITION_HEADS
        self._forward_args = set(inspect.signature(self.model.forward).parameters)
        self._modules = dict(self.model.named_modules())
        self._base_params = {}
        self.deltas: dict[str, Delta] = {}
        self.recorder: Recorder | None = None
        self._mask: torch.Tensor | None = None
        self._masks: dict[str, torch.Tensor | None] = {}
        self._encoder_output: torch.Tensor | None = None
        self._hooks: list = []

    def _load(self, cls, config, kwargs: dict, offload: str):
        """The model and where its block weights live (see :mod:`iteris_daemon.weights`).

        ``auto`` and ``disk``: stream blocks from the safetensors files when the checkpoint
        allows it (read through the model's conversion mapping, as ``from_pretrained`` reads
        it: a Mixtral's experts, stored one by one, stream into its fused parameters), else
        (as ``cpu``) keep the model in CPU memory and visit the device block by block (GPU),
        else load it whole onto the device. An explicit ``disk`` used to go whole onto the
        device there: a checkpoint that cannot stream, onto one GPU.
        """
        from .architecture import block_plan
        from .weights import Offloaded, Resident, WeightsUnavailable, check_files, load_streamed

        checked = False  # check_files' checks, made by a stream refused after them
        if offload in ("auto", "disk"):
            def stacks(model):
                plan = block_plan(model, self.head_keys)
                if not plan.supported:
                    raise WeightsUnavailable(f"no blocks to run one at a time: {plan.reason}")
                self._stack_paths = [stack.path for stack in plan.stacks]
                return self._stack_paths

            try:
                if kwargs.get("trust_remote_code"):  # what its code builds and reads is its own business
                    raise WeightsUnavailable("its own code builds it (trust_remote_code)")
                model, placement = load_streamed(cls, self.name_or_path, config, self.dtype, self.device, stacks,
                                                 ignore_mismatched="num_labels" in kwargs, replaced=self.head_keys)
                self.initialised = set(placement.checkpoint.initialised)
                return model, placement
            except WeightsUnavailable as exc:
                level = logging.WARNING if offload == "disk" else logging.INFO
                where = "into CPU memory, one block at a time on the device" if self.device.type != "cpu" else "whole"
                log.log(level, "loading %s %s: cannot stream its blocks (%s)", self.name_or_path, where, exc)
                checked = exc.checked
        if not checked:
            check_files(cls, self.name_or_path, config, self.dtype, kwargs.get("trust_remote_code", False))
        # With num_labels from an adapter's head: a checkpoint whose own head has another label
        # count loads too (that head is replaced by the adapters' modules_to_save).
        try:
            model, loading = cls.from_pretrained(self.name_or_path, dtype=self.dtype, output_loading_info=True,
                                                 ignore_mismatched_sizes="num_labels" in kwargs, **kwargs)
            resized = {key if isinstance(key, str) else key[0] for key in loading.get("mismatched_keys") or ()}
            self.initialised = set(loading.get("missing_keys") or ()) | resized
        except RuntimeError as exc:  # transformers refuses a tensor its config does not fit (its load report names it)
            raise BaseModelError(f"cannot load base model {self.name_or_path!r}: its checkpoint does not fit its config "
                                 f"({first_line(exc)})") from None
        except ImportError as exc:  # a quantized checkpoint whose quantizer's package is not installed
            raise BaseModelError(f"cannot load base model {self.name_or_path!r}: {first_line(exc)}") from None
        _check_initialised(model, self.initialised, resized, self.head_keys, self.name_or_path)
        if offload != "none" and self.device.type != "cpu":
            plan = block_plan(model, self.head_keys)
            if plan.supported:
                self._stack_paths = [stack.path for stack in plan.stacks]
                blocks = {id(b) for stack in plan.stacks for b in stack.blocks}
                _move_except(model, blocks, self.device)
                return model, Offloaded(self.device)
        return model.to(self.device), Resident()

    def make_resident(self) -> None:
        """Bring every block to the device, for whole-model passes (idempotent)."""
        from .weights import Resident

        if isinstance(self.placement, Resident):
            return
        for path in self._stack_paths:
            for index, block in enumerate(self.model.get_submodule(path)):
                self.placement.load(block, f"{path}.{index}")
        self.placement = Resident()
        self._modules = dict(self.model.named_modules())

    # ------------------------------------------------------------------ layers
    def layer(self, path: str) -> nn.Module:
        module = self._modules.get(path)
        if module is None:
            raise KeyError(path)
        return module

    def weight(self, path: str) -> torch.Tensor:
        """The base weight as (d_out, d_in), whatever the layer's storage convention."""
        module = self.layer(path)
        kind = linear_kind(module)
        if kind is not None:
            return module.weight.detach().T if kind == "conv1d" else module.weight.detach()
        raise TypeError(f"{path} is a {type(module).__name__}, not a linear layer")

    def check_adapter(self, adapter: LoraAdapter) -> None:
        check_adapter_shapes(self.model, adapter, self.name_or_path)

    # ----------------------------------------------------------------- runtime
    def attach(self, paths: Iterable[str]) -> None:
        """Install one forward hook per targeted layer (idempotent per call)."""
        self.detach()
        for path in sorted(set(paths)):
            self._hooks.append(self.layer(path).register_forward_hook(self._hook(path)))
        if self.is_encoder_decoder:
            encoder, decoder = self.model.get_encoder(), self.model.get_decoder()
            self._hooks.append(encoder.register_forward_pre_hook(self._stack_hook("encoder")))
            self._hooks.append(encoder.register_forward_hook(self._encoder_done))
            self._hooks.append(decoder.register_forward_pre_hook(self._stack_hook("decoder")))

    def detach(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def _stack_hook(self, key: str):
        def hook(_module, _args):
            self._mask = self._masks.get(key)

        return hook

    def _encoder_done(self, _module, _args, output):
        self._encoder_output = output[0]

    def _mask_for(self, x: torch.Tensor) -> torch.Tensor | None:
        """Padding mask for a layer input: the current stack's, except for cross-attention
        keys/values in the decoder, which read the encoder's output (encoder padding)."""
        encoder_output = self._encoder_output
        if encoder_output is not None and x.data_ptr() == encoder_output.data_ptr() and x.shape == encoder_output.shape:
            return self._masks.get("encoder")
        return self._mask

    def stack_masks(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        return {"encoder": batch.get("attention_mask"), "decoder": batch.get("decoder_attention_mask")}

    def use_masks(self, masks: dict[str, torch.Tensor | None], stack: str, encoder_output: torch.Tensor | None) -> None:
        """Which padding masks the hooks apply (set by the block executor before each block)."""
        self._masks, self._mask, self._encoder_output = masks, masks.get(stack), encoder_output

    def _hook(self, path: str):
        def hook(_module, args, output):
            x = args[0]
            delta = self.deltas.get(path)
            if delta is not None:
                output = _add_delta(output, x, delta)
            if self.recorder is not None:
                self.recorder(path, x, output, self._mask_for(x))
            return output

        return hook

    def set_deltas(self, deltas: dict[str, Delta]) -> None:
        self.deltas = {
            path: Delta(d.A.to(self.device, LORA_DTYPE), d.B.to(self.device, LORA_DTYPE), d.scaling)
            for path, d in deltas.items()
        }

    def set_head(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load ``modules_to_save`` tensors (task heads); missing keys go back to the base."""
        with torch.no_grad():
            for key in set(tensors) | set(self._base_params):
                if key not in self._base_params:
                    self._base_params[key] = self._own_parameter(key).detach().clone()
                self.model.get_parameter(key).copy_(tensors.get(key, self._base_params[key]))

    def _own_parameter(self, key: str) -> nn.Parameter:
        """``key``'s parameter, first given storage of its own if the model ties it to
        another (an ``lm_head`` tied to the embedding): PEFT's ``modules_to_save`` copies
        the module, so the other keeps the base's weights."""
        path, _, name = key.rpartition(".")
        module = self.model.get_submodule(path)
        param = getattr(module, name)
        if sum(p is param for _, p in self.model.named_parameters(remove_duplicate=False)) > 1:
            module.register_parameter(name, nn.Parameter(param.detach().clone(), requires_grad=False))
        return getattr(module, name)

    # ------------------------------------------------------------------ inputs
    def require_text(self) -> None:
        """Refuse a model that does not read text alone: calibration samples, which every pass
        over the model reads, are text (a speech model's encoder reads audio features; a dual
        encoder, CLIP or SigLIP, reads an image with its text)."""
        if self.tokenizer is None:
            reads = f"reads {self.main_input} ({type(self.model).__name__}), not text"
        elif self._inputs_besides_text:
            reads = (f"reads {' and '.join(self._inputs_besides_text)} with its text ({type(self.model).__name__}), "
                     "not text alone")
        else:
            return
        raise BaseModelError(f"base model {self.name_or_path!r} {reads}, and calibration samples are text: "
                             "merge its adapters with a data-free strategy and --no-eval")

    @cached_property
    def _inputs_besides_text(self) -> list[str]:
        """The other modalities' inputs the model's forward takes and fails without ([] when it
        runs on text alone). Its signature does not tell: a dual encoder (CLIP, SigLIP, CLAP) and
        a vision-language model, whose language model reads text alone, both default
        ``pixel_values`` to None. So a copy built on the meta device (no memory, no weights)
        runs a text batch's inputs; a failure of the meta device itself (a value read out of a
        tensor, which most models do somewhere) came after the inputs were taken, so says the
        model reads text."""
        taken = [name for name in MODALITY_INPUTS if name in self._forward_args]
        if not taken:
            return []
        try:
            with torch.device("meta"), torch.no_grad():
                skeleton = instantiate(type(self.model), self.model.config)
                skeleton(**self._meta_text_inputs())
        except Exception as exc:  # noqa: BLE001 - whatever the forward raised without them
            if isinstance(exc, NotImplementedError) or re.search(r"\bmeta\b", str(exc), re.IGNORECASE):
                return []
            return taken
        return []

    def _meta_text_inputs(self) -> dict[str, torch.Tensor | bool]:
        """What a pass gives the forward (:meth:`_encode`, :meth:`forward`), as meta tensors
        of one two-token sample."""
        ids = torch.ones((1, 2), dtype=torch.long)
        inputs: dict[str, torch.Tensor | bool] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if self.teacher_forced:
            inputs.update(decoder_input_ids=ids, decoder_attention_mask=torch.ones_like(ids))
        flags = {"use_cache": False, "output_router_logits": False}
        return {k: v for k, v in {**inputs, **flags}.items() if k in self._forward_args}

    def batches(self, data: CalibrationSet, batch_size: int, max_length: int) -> list[dict[str, torch.Tensor]]:
        """Tokenised, right-padded batches, sorted by length to waste little on padding.

        The order is deterministic, so rows of every pass over the same data line up:
        the same token sits at the same row for the task model and for the merge.
        A batch of texts that tokenize to nothing (no special tokens, empty text) is
        dropped: no token of it would reach any layer, and models reject length 0.
        """
        self.require_text()
        if not self.tokenizer.chat_template and any(s.messages is not None for s in data.samples):
            self._warn_once("no template", data.source, "%s: the base model's tokenizer has no chat template; its "
                            "conversations are read as plain 'role: content' lines", data.source)
        targets = sum(s.target is not None for s in data.samples)
        if targets and not self.teacher_forced:
            self._warn_once("targets", data.source, '%s: %d of %d samples have a "target", which only an '
                            "encoder-decoder model that generates reads (its decoder is teacher forced on it); "
                            '%s is none: the targets are not used (put a completion in "text", after its prompt, '
                            "or in the conversation)", data.source, targets, len(data.samples),
                            type(self.model).__name__)
        special = self.tokenizer.num_special_tokens_to_add(pair=any(s.text_pair is not None for s in data.samples))
        if max_length <= special:  # the tokenizer keeps its special tokens: nothing would be cut
            raise ParameterError(f"max_length {max_length} leaves no room for text: the tokenizer of "
                                 f"{self.name_or_path} adds {special} special tokens to each sample")
        if self.max_tokens is not None and max_length > self.max_tokens:
            self._warn_once("positions", "", "max_length %d is more than %s reads (%d tokens): samples are cut at %d",
                            max_length, self.name_or_path, self.max_tokens, self.max_tokens)
            max_length = self.max_tokens
        order = sorted(range(len(data.samples)),
                       key=lambda i: len(data.samples[i].text) + len(data.samples[i].text_pair or ""))
        batches = []
        cut: list[Cut] = []
        for start in range(0, len(order), batch_size):
            chunk = [data.samples[i] for i in order[start : start + batch_size]]
            batch = self._encode(chunk, max_length, data.source, cut)
            if all(v.shape[-1] > 0 for v in batch.values()):
                batches.append(batch)
        counted = len({id(sample) for sample, *_ in cut})
        self.samples_cut[data.source] = max(self.samples_cut.get(data.source, 0), counted)
        if cut:
            self._warn_cut(data, cut, max_length)
        return batches

    def _warn_once(self, what: str, source: str, message: str, *args) -> None:
        if (what, source) not in self._warned:
            self._warned.add((what, source))
            log.warning(message, *args)

    def _warn_cut(self, data: CalibrationSet, cut: list[Cut], max_length: int) -> None:
        """Warn of the samples of ``data`` cut at ``max_length`` tokens (with their full token
        counts; a sample whose text and target are both cut counts once): a conversation's cut
        falls on its end, the replies an adapter was trained on (on its start, its template's
        opening too, where the tokenizer truncates on the left)."""
        if max_length == self.max_tokens:
            said = f"longer than the {max_length} tokens {self.name_or_path} reads and are cut there"
        else:
            said = f"longer than max_length {max_length} and are cut at it"
        samples = list({id(s): s for s, *_ in cut}.values())
        chats = sum(s.messages is not None for s in samples)
        longest = max(cut, key=lambda entry: (entry[1], entry[2]))  # (sample, tokens, shortened first)
        lost = ("start, its first turns (the tokenizer truncates on the left)"
                if self.tokenizer.truncation_side == "left" else "end, its last replies")
        self._warn_once("cut", data.source, "%s: %d of %d samples are %s (the longest has %s%d tokens)%s%s", data.source,
                        len(samples), len(data.samples), said, "more than " if longest[2] else "", longest[1],
                        f"; a conversation is cut at its {lost} ({chats} of the {len(samples)} cut)" if chats else "",
                        "" if max_length == self.max_tokens else "; a larger max_length (a strategy parameter) keeps more")

    def _encode(self, chunk, max_length: int, source: str, cut: list[Cut]) -> dict[str, torch.Tensor]:
        if any(s.messages is not None for s in chunk) and self.tokenizer.chat_template:
            # One by one, every key kept: a sentence pair's token types too (dropped, its second
            # segment read as the first, when a conversation shared its batch)
            rows = [self._tokens([s], [self._templated(s, source)], s.messages is None, max_length, cut,
                                 [s.text_pair]) for s in chunk]
            encoded = self.tokenizer.pad({key: [row[key][0] for row in rows] for key in rows[0]}, padding=True,
                                         return_tensors="pt")
        else:
            tokens = self._tokens(chunk, [s.text for s in chunk], True, max_length, cut, [s.text_pair for s in chunk])
            encoded = self.tokenizer.pad(tokens, padding=True, return_tensors="pt")
        batch = {k: v for k, v in encoded.items() if k in self._forward_args}
        if "token_type_ids" in batch and not getattr(self.model.config, "type_vocab_size", 0):
            del batch["token_type_ids"]
        if self.teacher_forced:
            batch.update(self._decoder_inputs(chunk, max_length, cut))
        elif self.is_encoder_decoder and "attention_mask" in batch:  # the shifted inputs' padding
            mask = batch["attention_mask"]
            batch["decoder_attention_mask"] = torch.cat([torch.ones_like(mask[:, :1]), mask[:, :-1]], dim=1)
        self._check_held(batch, source)
        return batch

    def _check_held(self, batch: dict[str, torch.Tensor], source: str) -> None:
        """Refuse token ids past the input embedding: a tokenizer's added tokens (a chat
        template's ``<|im_start|>``), the embedding not resized, failed a pass with an
        IndexError, which the block-by-block capture took for an unsupported architecture."""
        if self._rows is None:
            return
        ids = torch.cat([batch[k].flatten() for k in ("input_ids", "decoder_input_ids") if k in batch])
        if ids.numel() and int(ids.max()) >= self._rows:
            past = sorted({int(i) for i in ids[ids >= self._rows]})
            named = ", ".join(f"{self.tokenizer.convert_ids_to_tokens(i)} (id {i})" for i in past[:5])
            raise CalibrationError(source, f"its samples hold tokens past the input embedding of {self.name_or_path} "
                                           f"({self._rows} rows): {named}{', ...' if len(past) > 5 else ''}. The "
                                           f"tokenizer has {len(self.tokenizer)} tokens; its added ones need rows the "
                                           "model does not have: resize the embedding to the tokenizer, or calibrate "
                                           "with text and a chat template the model holds")

    def _tokens(self, samples: list[Sample], texts: list[str], special: bool, max_length: int,
                cut: list[Cut], pairs: list[str | None] | None = None) -> dict[str, list[list[int]]]:
        """``texts`` (one per sample, each with its ``pairs`` entry as second segment where not
        None) tokenized, those longer than ``max_length`` tokens cut at it, and each sample cut
        added to ``cut`` with its full token count (of its text shortened to what ``max_length``
        tokens can cover, where longer). Only the ones cut are tokenized a second
        time, with the tokenizer's own truncation: it keeps the special tokens its
        post-processor adds (a trailing EOS too) and cuts the side it is set to, which the full
        ids alone do not tell; a pair is cut longest segment first (``truncation=True``)."""
        pairs = pairs or [None] * len(texts)
        # Characters past what max_length tokens can hold are never tokenized: one line of a
        # 64 MiB file took a worker 10 GB and minutes, to be cut at 128 tokens.
        whole = list(zip(texts, pairs))
        texts = [self._enough_of(text, max_length) for text in texts]
        pairs = [None if pair is None else self._enough_of(pair, max_length) for pair in pairs]
        shortened = [(text, pair) != given for text, pair, given in zip(texts, pairs, whole)]
        if any(pair is not None for pair in pairs):  # a batch call takes pairs for every text or none
            rows = [self.tokenizer(text, pair, add_special_tokens=special, verbose=False)
                    for text, pair in zip(texts, pairs)]
            tokens = {key: [row[key] for row in rows] for key in rows[0]}
        else:
            tokens = {key: list(rows) for key, rows in self.tokenizer(texts, add_special_tokens=special,
                                                                       verbose=False).items()}
        for i, ids in enumerate(list(tokens["input_ids"])):
            if len(ids) > max_length or shortened[i]:
                cut.append((samples[i], len(ids), shortened[i]))
            if len(ids) > max_length:
                again = self.tokenizer(texts[i], pairs[i], add_special_tokens=special, truncation=True,
                                       max_length=max_length)
                for key, rows in tokens.items():
                    rows[i] = again[key]
        return tokens

    def _enough_of(self, text: str, max_length: int) -> str:
        """``text``, or as much of it as gives more than ``max_length`` tokens, on the side the
        tokenizer's truncation keeps: from what that many of the vocabulary's longest tokens
        cover, doubled while it gives fewer (a tokenizer that drops whitespace, or reads a long
        word as one unknown token, covers more characters with each)."""
        chars = (max_length + 1) * self._chars_per_token
        while chars < len(text):
            part = self._within(text, chars)
            if len(self.tokenizer(part, add_special_tokens=False, verbose=False)["input_ids"]) > max_length:
                return part
            chars *= 2
        return text

    def _within(self, text: str, chars: int) -> str:
        """At most ``chars`` of ``text`` on the side the tokenizer's truncation keeps, cut at a
        space where one lies in the last tenth (a word cut in two is tokenized otherwise)."""
        if self.tokenizer.truncation_side == "left":
            part = text[-chars:]
            space = part.find(" ", 0, chars // 10)
            return part if space < 0 else part[space:]
        part = text[:chars]
        space = part.rfind(" ", chars - chars // 10)
        return part if space < 0 else part[:space]

    def _templated(self, sample, source: str) -> str:
        """The text a sample is tokenized from: a conversation through the chat template, whose
        text carries its own special tokens (so none are added again, e.g. a second BOS)."""
        if sample.messages is None:
            return sample.text
        messages = [{"role": role, "content": content} for role, content in sample.messages]
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception as exc:  # the template's own raise_exception (jinja2): "roles must alternate", say
            roles = ", ".join(role for role, _ in sample.messages)
            raise CalibrationError(source, f"the base model's chat template refuses a conversation with roles "
                                           f"[{roles}]: {exc}".splitlines()[0]) from None

    def _decoder_inputs(self, chunk, max_length: int, cut: list[Cut]) -> dict[str, torch.Tensor]:
        """Teacher forcing: row by row the decoder reads ``<start> + target[:-1]``, as many
        tokens as the target has (the start token alone when there is no target). The target
        itself travels as ``labels`` (-100 at padding): position j predicts its token j, the
        last one too, which the decoder's inputs do not hold (never passed to the model)."""
        start = self.model.config.decoder_start_token_id
        if start is None:
            start = self.tokenizer.pad_token_id
        targets = [s.target or "" for s in chunk]
        labels = self.tokenizer.pad(self._tokens(chunk, targets, True, max_length, cut), padding=True,
                                    return_tensors="pt")
        ids, mask = labels["input_ids"], labels["attention_mask"]
        expected = ids.masked_fill(mask == 0, IGNORE)
        if ids.shape[1] == 0:
            ids = torch.full((len(chunk), 1), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.ones_like(ids)
            expected = torch.full_like(ids, IGNORE)
        decoder_ids = torch.full_like(ids, self.tokenizer.pad_token_id)
        decoder_ids[:, 0] = start
        decoder_ids[:, 1:] = ids[:, :-1]
        decoder_mask = mask.clone()
        decoder_mask[:, 0] = 1
        decoder_ids[decoder_mask == 0] = self.tokenizer.pad_token_id
        return {"decoder_input_ids": decoder_ids, "decoder_attention_mask": decoder_mask, "labels": expected}

    def output_mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return batch.get("decoder_attention_mask") if self.teacher_forced else batch.get("attention_mask")

    def next_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Per output position, the token it predicts (:data:`IGNORE` where none counts), when the
        model is a language model that generates (causal or encoder-decoder; not a masked LM, not
        a classifier); None otherwise. A causal LM's position j predicts input j + 1 (the last
        predicts nothing); an encoder-decoder's position j the target's token j, every one of them,
        as transformers' own seq2seq loss counts them."""
        if not self.model.can_generate():
            return None
        if self.is_encoder_decoder:
            return batch.get("labels")
        ids = batch.get("input_ids")
        if ids is None:
            return None
        mask = batch.get("attention_mask")
        following = ids[:, 1:] if mask is None else ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE)
        return torch.cat([following, torch.full_like(ids[:, :1], IGNORE)], dim=1)

    def forward(self, batch: dict[str, torch.Tensor], grad: bool = False, **extra) -> torch.Tensor:
        """Run one batch (teacher-forced) and return the model's output: its first (hidden states
        or logits), or a span head's start and end logits as (batch, seq, 2), of which the first
        alone is half the answer; ``grad``: record the autograd graph (to the installed deltas'
        factors)."""
        batch = {k: v.to(self.device) for k, v in batch.items() if k != "labels"}  # the loss is not the model's
        self.use_masks(self.stack_masks(batch), "encoder", None)
        # No key/value cache, and no router logits: a mixture-of-experts checkpoint saved with
        # output_router_logits (for its training's auxiliary loss) made that loss the first output
        flags = {"use_cache": False, "output_router_logits": False}
        inputs = {**batch, **extra, **{flag: value for flag, value in flags.items() if flag in self._forward_args}}
        with torch.set_grad_enabled(grad):
            out = self.model(**inputs)
        if getattr(out, "start_logits", None) is not None and getattr(out, "end_logits", None) is not None:
            return torch.stack([out.start_logits, out.end_logits], dim=-1)
        return out[0]

    def run(self, batches: list[dict[str, torch.Tensor]], recorder: Recorder | None = None) -> Iterator[torch.Tensor]:
        self.recorder = recorder
        try:
            for batch in batches:
                yield self.forward(batch)
        finally:
            self.recorder = None
