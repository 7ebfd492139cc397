"""PEFT's own ``add_weighted_adapter`` combination types, exposed as strategies
``peft_<type>`` so users can compare against what PEFT does out of the box."""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import warnings
from collections.abc import Iterator
from importlib.metadata import version
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, model_validator

from iteris_daemon import hookimpl
from iteris_daemon.errors import MergeError, ParameterError
from iteris_daemon.strategy import (SEED_BOUNDS, MergedAdapter, MergeInputs, Progress, StrategyParams, per_adapter,
                                    refuse_all_zero)

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from torch import nn

COMBINATION_TYPES = {
    "cat": "concatenate the LoRA factors (exact weighted sum)",
    "linear": "weighted sum of the LoRA factors themselves (needs equal ranks)",
    "svd": "SVD of the weighted sum of dense deltas",
    "ties": "TIES on the LoRA factors",
    "ties_svd": "TIES on dense deltas, then SVD",
    "dare_linear": "DARE on the LoRA factors, then linear",
    "dare_ties": "DARE + TIES on the LoRA factors",
    "dare_linear_svd": "DARE on dense deltas, then SVD",
    "dare_ties_svd": "DARE + TIES on dense deltas, then SVD",
    "magnitude_prune": "magnitude pruning of the LoRA factors",
    "magnitude_prune_svd": "magnitude pruning of dense deltas, then SVD",
}

# The add_weighted_adapter arguments each type reads (PEFT 0.21): a type's parameters are
# those it reads (`plugins --params` lists them), and another is refused, naming the types that read it.
READERS = {
    "density": [t for t in COMBINATION_TYPES if any(k in t for k in ("ties", "dare", "prune"))],
    "majority_sign_method": [t for t in COMBINATION_TYPES if "ties" in t],
    "svd_rank": [t for t in COMBINATION_TYPES if t.endswith("svd")],
    "seed": [t for t in COMBINATION_TYPES if "dare" in t],
}


# Each with its type and field: a type's Params holds those READERS says it reads.
READ_BY_SOME = {
    "density": (float, Field(0.5, gt=0, le=1, description="fraction kept by ties/dare/magnitude_prune types")),
    "svd_rank": (int | None, Field(None, ge=1, description="rank of *_svd results (PEFT default: largest input "
                                                            "rank)")),
    "majority_sign_method": (Literal["total", "frequency"], Field(
        "total", description="ties types: the sign each entry keeps, by the sum of the deltas (total) or by "
                             "how many deltas have it (frequency)")),
    "seed": (int, Field(0, **SEED_BOUNDS, description="dare types: seed of PEFT's drop masks (fixed: merges are "
                                                      "reproducible; PEFT draws them from torch's global generator)")),
}


class PeftParams(StrategyParams):
    """What every type reads; :func:`params_of` adds what its type reads of :data:`READ_BY_SOME`."""

    combination_type: ClassVar[str]

    weights: list[float] | None = Field(None, json_schema_extra=per_adapter(1.0),
                                        description="per-adapter weights, in --adapter order")

    @model_validator(mode="before")
    @classmethod
    def _read_by_the_type(cls, given: Any) -> Any:
        """One the type does not read: refused naming the types that do (not "extra field")."""
        for name in sorted(given.keys() & READERS.keys() if isinstance(given, dict) else ()):
            if cls.combination_type not in READERS[name]:
                raise ValueError(f"{name} is read only by " + ", ".join(f"peft_{t}" for t in READERS[name])
                                 + f", not by peft_{cls.combination_type}")
        return given

    @model_validator(mode="after")
    def _weights_not_all_zero(self):
        refuse_all_zero("weights", self.weights)
        return self


def params_of(combination_type: str) -> type[PeftParams]:
    """``peft_<combination_type>``'s parameters: ``weights`` and what the type reads."""
    read = {name: spec for name, spec in READ_BY_SOME.items() if combination_type in READERS[name]}
    return type(f"PeftParams_{combination_type}", (PeftParams,), {
        "__annotations__": {name: annotation for name, (annotation, _) in read.items()},
        **{name: copy.deepcopy(field) for name, (_, field) in read.items()}, "combination_type": combination_type})


class PeftCombination:
    needs_calibration = False

    def __init__(self, combination_type: str, summary: str):
        self.combination_type = combination_type
        self.Params = params_of(combination_type)
        self.name = f"peft_{combination_type}"
        self.description = f"PEFT add_weighted_adapter({combination_type!r}): {summary}"

    def merge(self, inputs: MergeInputs, params: PeftParams, progress: Progress) -> MergedAdapter:
        adapters = inputs.adapters
        if getattr(params, "svd_rank", None) is not None:
            _check_svd_rank(params.svd_rank, adapters)
        cut: dict[str, float] = {}  # the *_svd types: per layer, the relative error of PEFT's SVD cut
        with _seeded(getattr(params, "seed", 0), inputs.device):  # PEFT draws its layers' init and DARE's masks
            model = self._combined(inputs, params, cut)
        modules = {}
        prefix = "base_model.model."
        for name, layer in model.named_modules():
            lora_A = getattr(layer, "lora_A", None)
            if lora_A is None or "merged" not in lora_A:
                continue
            A = layer.lora_A["merged"].weight.detach().float()
            # The merged adapter's scaling as PEFT means it, lora_alpha / r (= 1): PEFT 0.21
            # copies use_rslora from the first adapter into it, which made it sqrt(r)
            # (huggingface/peft#3449); the factors already carry each adapter's own scaling.
            B = layer.lora_B["merged"].weight.detach().float() * (layer.lora_alpha["merged"] / layer.r["merged"])
            modules[name.removeprefix(prefix)] = (B.clone(), A.clone())
        left_out = sorted({path for a in adapters for path in a.modules} - set(modules))
        if left_out and (why := _restricted(adapters)):  # else the merge's own check names the layer
            raise MergeError(f"PEFT's {self.combination_type!r} left out layer {left_out[0]}, which "
                             f"{next(a.name for a in adapters if left_out[0] in a.modules)} adapts ({why})")
        if not cut:  # not an *_svd type, or PEFT's cut not measured
            return MergedAdapter(modules)
        return MergedAdapter(modules, {"truncation_error": {"max": max(cut.values(), default=0.0), "layers": len(cut)}})

    def _combined(self, inputs: MergeInputs, params: PeftParams, cut: dict[str, float]):
        """The PeftModel holding ``inputs``' adapters and PEFT's combination of them, "merged"
        (``cut``: the *_svd types' errors, by :func:`_measure_svd_cuts`)."""
        from peft import PeftModel

        adapters = inputs.adapters
        weights = [1.0] * len(adapters) if params.weights is None else params.weights
        with warnings.catch_warnings():  # PEFT asks transformers a deprecated question; nothing for a user to do
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            model = PeftModel.from_pretrained(_weightless_copy(inputs.base.model, inputs.device),
                                              str(adapters[0].path), adapter_name="t0")
        for index, adapter in enumerate(adapters[1:], start=1):
            model.load_adapter(str(adapter.path), adapter_name=f"t{index}")
        if self.combination_type.endswith("svd") and not _measure_svd_cuts(model, cut):
            log.warning("PEFT %s's SVD combination is not the one this release measures: the error of its rank cut "
                        "is not reported (rank_cap_error)", version("peft"))
        kwargs = {name: getattr(params, name) for name in ("density", "majority_sign_method", "svd_rank")
                  if getattr(params, name, None) is not None}
        try:
            model.add_weighted_adapter([f"t{i}" for i in range(len(adapters))], weights, "merged",
                                       combination_type=self.combination_type, **kwargs)
        except (ValueError, RuntimeError, IndexError, KeyError) as exc:  # PEFT's messages name no layer or field
            why = (_rank_mismatch(adapters) if self.combination_type in _EQUAL_RANKS else None) or _restricted(adapters)
            raise MergeError(f"PEFT could not combine these adapters with {self.combination_type!r}: "
                             f"{type(exc).__name__}: {exc}" + (f" ({why})" if why else "")) from None
        return model


@contextlib.contextmanager
def _seeded(seed: int, device: str) -> Iterator[None]:
    """The CPU's generator and ``device``'s seeded with ``seed``, and put back as they were
    afterwards: PEFT draws DARE's masks from torch's global generators, so the same inputs
    gave another merge on each run. Only those two: ``torch.manual_seed`` seeds every GPU's
    (queued until CUDA starts), which nothing here put back."""
    import torch

    index = (torch.device(device).index or 0) if device != "cpu" else None
    with torch.random.fork_rng(devices=[] if index is None else [index]):
        torch.random.default_generator.manual_seed(seed)
        if index is not None:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


_MEASURED_ARGUMENTS = {"new_rank", "target_lora_A", "target_lora_B", "target"}


def _measure_svd_cuts(model, cut: dict[str, float]) -> bool:
    """Have ``model``'s *_svd combinations record, per layer (its path in the base model), the
    relative Frobenius error of PEFT's SVD cut: ``||written - combination|| / ||combination||``,
    the combination being the dense one PEFT cuts (the weighted sum for ``svd``; after TIES,
    DARE or pruning for the others, DARE's masks as PEFT drew them). Nothing reported it,
    and ``rank_cap_error`` said 0.0 where the cut dropped 17-62 % of the sum.

    PEFT (0.21's ``_svd_generalized_task_arithmetic_weighted_adapter``, per layer) forms the
    combination, takes its SVD and returns the first ``new_rank`` columns of ``U S`` and rows of
    ``V^T``. Asked here for all ``min(d_out, d_in)`` of them and cut to ``new_rank`` after (the
    same factors: PEFT's clamp, the only step after the cut, is not used), the error is read
    off the factors: ``V^T``'s rows are orthonormal, so it is the norm of the dropped columns
    of ``U S`` over that of all of them (Eckart-Young), with no further matrix formed.

    False, measuring nothing, where PEFT has no such method (a private one: another PEFT
    release may rename it or its arguments); the merge is PEFT's all the same."""
    import inspect

    lora = model.base_model
    svd_combination = getattr(lora, "_svd_generalized_task_arithmetic_weighted_adapter", None)
    if svd_combination is None or not _MEASURED_ARGUMENTS <= set(inspect.signature(svd_combination).parameters):
        return False
    signature = inspect.signature(svd_combination)
    names = {id(module): name.removeprefix("base_model.model.") for name, module in model.named_modules()}

    def measured(*args, **kwargs):
        call = signature.bind(*args, **kwargs)
        rank = call.arguments["new_rank"]
        d_out, d_in = call.arguments["target_lora_B"].shape[0], call.arguments["target_lora_A"].shape[1]
        call.arguments["new_rank"] = min(d_out, d_in)
        A, B = svd_combination(*call.args, **call.kwargs)  # V^T (all rows) and U S (all columns)
        strength = B.double().pow(2).sum(0)  # the squared singular values
        total = float(strength.sum())
        cut[names[id(call.arguments["target"])]] = (float(strength[rank:].sum()) / total) ** 0.5 if total > 0 else 0.0
        return A[:rank].clone(), B[:, :rank].clone()  # clones: the slices would hold the full factors

    lora._svd_generalized_task_arithmetic_weighted_adapter = measured
    return True


def _weightless_copy(model: nn.Module, device: str) -> nn.Module:
    """A private copy of ``model`` for PEFT to wrap (it rewrites the modules it wraps), whose
    parameters and buffers are placeholders of their shapes and dtypes on ``device`` that
    hold one element each: the combinations read only the adapters' factors. A copy of the
    weights themselves, brought to the device, took twice the model's size there (a 34B
    base past an 80 GB GPU) whatever ``--offload`` said."""
    import torch
    from torch import nn

    memo: dict[int, torch.Tensor] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        placeholder = torch.zeros((), dtype=tensor.dtype, device=device).expand(tensor.shape)
        memo[id(tensor)] = nn.Parameter(placeholder, requires_grad=False) if isinstance(tensor, nn.Parameter) \
            else placeholder
    return copy.deepcopy(model, memo)


# The types whose factors PEFT combines entry by entry: every layer's rank must agree.
_EQUAL_RANKS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
# Config fields that restrict which layers an adapter is injected into.
_LAYER_FIELDS = ("layers_to_transform", "layers_pattern", "exclude_modules")


def _rank_mismatch(adapters) -> str | None:
    """The first layer the adapters adapt at different ranks (a ``rank_pattern`` makes them
    differ where their ``r`` agrees, which PEFT's own check compares): PEFT's error names none."""
    for path in sorted({p for a in adapters for p in a.modules}):
        ranks = {a.name: a.modules[path].rank for a in adapters if path in a.modules}
        if len(set(ranks.values())) > 1:
            return f"layer {path} has " + ", ".join(f"rank {r} in {name}" for name, r in ranks.items())
    return None


def _restricted(adapters) -> str | None:
    """Why PEFT cannot combine the adapters' layers: its merged adapter adapts every adapter's
    target modules, on the layers the first adapter's restrictions allow. So it misses the
    others' layers outside those, or holds layers no adapter adapts, which PEFT fails on."""
    if len(adapters) == 1:
        return None
    restricted = {a.name: fields for a in adapters
                  if (fields := [f for f in _LAYER_FIELDS if a.config.get(f) not in (None, [], "")])}
    if not restricted:
        return None
    instead = ("put first an adapter without them that adapts every module the others do, or use one of this "
               "project's strategies (task_arithmetic is peft_cat's exact sum)")
    first = adapters[0]
    if first.name in restricted:
        return (f"PEFT gives the merged adapter the first adapter's {' and '.join(restricted[first.name])}, "
                f"{first.name}'s; {instead}")
    named = ", ".join(f"{name} (its {' and '.join(fields)})" for name, fields in restricted.items())
    return (f"PEFT's merged adapter takes every adapter's target modules on each layer the first adapter, "
            f"{first.name}, allows, and {named} "
            f"{'restricts the layers it adapts' if len(restricted) == 1 else 'restrict the layers they adapt'}: PEFT "
            f"may make modules there that no adapter has; {instead}")


def _check_svd_rank(rank: int, adapters) -> None:
    """PEFT truncates a layer's SVD factors inconsistently past the layer's smaller side
    (B d_out x min, A rank x d_in): refused here, naming the layer, not as a broken result."""
    for adapter in adapters:
        for path, module in sorted(adapter.modules.items()):
            d_out, d_in = module.B.shape[0], module.A.shape[1]
            if rank > min(d_out, d_in):
                raise ParameterError(f"svd_rank {rank} is more than layer {path} ({d_out}x{d_in}) can hold: at "
                                     f"most {min(d_out, d_in)} there")


@hookimpl
def register_strategies(register):
    for combination_type, summary in COMBINATION_TYPES.items():
        register(PeftCombination(combination_type, summary))
