"""What a merge strategy receives and returns. Strategies are registered by plugins
through the ``register_strategies`` hook (see :mod:`iteris_daemon.hookspecs`)."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import PydanticSerializationError

from .calibration import CalibrationSet
from .errors import ParameterError, first_line
from .figures import whole_number
from .logs import counted
from .strict import STRICT

if TYPE_CHECKING:  # torch stays out of the daemon: only merges (in worker processes) import it
    import torch

    from .lora import LoraAdapter
    from .model import BaseModel as LoadedModel

DEFAULT_STRATEGY = "iteris"  # what `merge`, a daemon group and `plugins` default to

SEED_BOUNDS = {"ge": -(2**63), "le": 2**64 - 1}
"""A ``seed`` parameter's bounds, ``Field(0, **SEED_BOUNDS)``: what ``torch.Generator.manual_seed``
takes (beyond, it failed inside the merge, after the base model loaded, naming no parameter)."""

Progress = Callable[..., Any]
"""A ``tqdm``-like factory: ``progress(total=n, desc=...)`` returns a bar with ``update()``."""


class StrategyParams(BaseModel):
    """Base for strategy parameter models: unknown keys are an error, not a silent no-op;
    inf and nan are no parameter value (a ridge of inf turned IterIS into a no-op); values
    are not coerced across types (``samples_per_task=true`` was taken as 1; an int is
    still a float)."""

    model_config = ConfigDict(**STRICT, frozen=True)


@dataclass
class MergeInputs:
    """Everything a strategy may use. ``calibration[i]`` belongs to ``adapters[i]``."""

    base: LoadedModel
    adapters: list[LoraAdapter]
    calibration: list[CalibrationSet]
    device: str = "cpu"
    head: dict[str, torch.Tensor] = field(default_factory=dict)  # the modules_to_save tensors the merge carries


@dataclass
class MergedAdapter:
    """The result: per layer a (B, A) pair whose product is the merged delta (scaling 1)."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    metrics: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class MergeStrategy(Protocol):
    name: ClassVar[str] | str
    description: ClassVar[str] | str
    Params: ClassVar[type[StrategyParams]]
    needs_calibration: ClassVar[bool] | bool

    def merge(self, inputs: MergeInputs, params: StrategyParams, progress: Progress) -> MergedAdapter: ...


def per_adapter(unnamed: float) -> dict[str, Any]:
    """A parameter field's ``json_schema_extra`` marking it as one value per adapter, in the
    adapters' order (``weights``); ``unnamed`` is the value of an adapter a daemon group's
    table does not name (:func:`by_adapter_name`)."""
    return {"per_adapter": unnamed}


def per_adapter_fields(params: type[StrategyParams]) -> dict[str, Any]:
    """The per-adapter fields of a parameter model, each with the value of an adapter not named."""
    return {name: extra["per_adapter"] for name, info in params.model_fields.items()
            if isinstance(extra := info.json_schema_extra, dict) and "per_adapter" in extra}


def check_per_adapter(strategy: MergeStrategy, params: StrategyParams, count: int) -> None:
    """One value per adapter: checked before the base model loads, not by the strategy hours later."""
    for name in per_adapter_fields(type(params)):
        values = getattr(params, name)
        if values is not None and not isinstance(values, (list, tuple)):
            raise ParameterError(f"strategy {strategy.name!r}: {name} is one value per adapter (per_adapter), so a "
                                 f"list, not {type(values).__name__}")
        if values is not None and len(values) != count:
            raise ParameterError(f"strategy {strategy.name!r}: {name} has {counted(len(values), 'entry')} for "
                                 f"{counted(count, 'adapter')}")


def by_adapter_name(strategy: MergeStrategy, raw: dict[str, Any], names: list[str] | None) -> dict[str, Any]:
    """A daemon group's parameters for a run of the adapters ``names``. Its adapters come and
    go, so a per-adapter parameter is a table ``{adapter name: value}`` (a list, taken by
    position, gave an adapter's weight to whichever took its place): here the list of
    ``names``' values, an adapter not named taking the field's ``unnamed`` value. ``names``
    None: the table's values, to validate them when the config loads."""
    given = dict(raw)
    for key, unnamed in per_adapter_fields(strategy.Params).items():
        table = raw.get(key)
        if table is None:
            continue
        if not isinstance(table, dict):
            raise ParameterError(f"strategy {strategy.name!r}: {key}: a group's adapters change from run to run, so "
                                 f"give {key} by adapter name, as a table ({key} = {{ news = 2.0, topic = 0.5 }}; an "
                                 f"adapter not named takes {unnamed}), not by position")
        given[key] = list(table.values()) if names is None else [table.get(name, unnamed) for name in names]
    return given


def refuse_all_zero(name: str, weights: list[float] | None) -> None:
    """For a parameter model's validator: per-task weights that are all 0 merge to a zero
    delta, a useless adapter written with exit 0 (negative weights stay legal: task negation)."""
    if weights and not any(weights):
        raise ValueError(f"{name} are all 0: no task would count (the merge was a zero delta)")


_LOOKS_LIKE_JSON = re.compile(r"\s*([+-]?\.?\d|[\[{])")  # a number, list or object; "./x" and "-x" stay strings


def parse_param(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` -> (key, value); VALUE is JSON when it parses (3, 0.1, true, [1,2]), else a
    string (``method=ties``), unless it starts like a number, list or object: ``density=.5`` as the
    string ".5" was refused as "Input should be a valid number"."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ParameterError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(raw)
    except json.JSONDecodeError as exc:
        if not _LOOKS_LIKE_JSON.match(raw):
            return key.strip(), raw
        raise ParameterError(f"{text}: not a JSON value ({_json_hint(key.strip(), raw, exc)})") from None


def _json_hint(key: str, raw: str, exc: json.JSONDecodeError) -> str:
    """The JSON spelling of a number JSON does not take (.5, +1, 5., 007), else JSON's own complaint."""
    for number in (int, float):
        try:
            value = number(raw)
        except ValueError:
            continue
        if math.isfinite(value):
            return f"write {json.dumps(value)}"
    return f'{exc.msg} at character {exc.pos}; a string is written in quotes, {key}="..."'


def unique_params(pairs: list[tuple[str, Any]], where: str) -> dict[str, Any]:
    """``(key, value)`` pairs as a dict; a key given twice is an error (the last silently won)."""
    repeated = sorted(key for key, count in Counter(key for key, _ in pairs).items() if count > 1)
    if repeated:
        raise ParameterError(f"{where}{repeated[0]} is given twice")
    return dict(pairs)


def parse_params(strategy: MergeStrategy, raw: dict[str, Any],
                 entry_names: dict[str, list[str]] | None = None) -> StrategyParams:
    """Validate ``raw`` against the strategy's parameter model, with a one-line error.
    ``entry_names`` names a list field's entries where they came from a table by adapter name
    (a daemon group's ``weights``): its error says ``weights.news``, not ``weights.1``."""
    try:
        params = strategy.Params(**raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{_location(err['loc'], entry_names or {}) or 'params'}: {err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors()
        )
        raise ParameterError(f"strategy {strategy.name!r}: {problems}") from None
    try:  # the report and the catalog record them: a value that is not JSON failed there, after the merge
        params.model_dump(mode="json")
    except (PydanticSerializationError, TypeError, ValueError) as exc:
        raise ParameterError(f"strategy {strategy.name!r}: its parameters cannot be written as JSON "
                             f"({first_line(exc)}); a Params field's value must be") from None
    return params


def engine_int(params: StrategyParams, name: str, default: int | None = None) -> int | None:
    """A parameter the engine reads besides the strategy (the built-ins' ``samples_per_task``,
    ``batch_size`` and ``max_length``) where it is a positive int, else ``default``: a plugin's
    field of that name with another meaning (a fraction, "auto") is its own."""
    value = getattr(params, name, None)
    return value if whole_number(value) and value >= 1 else default


def _location(loc: tuple, entry_names: dict[str, list[str]]) -> str:
    """A pydantic error location as ``field.entry``, an entry named where ``entry_names`` knows it."""
    parts = [str(p) for p in loc]
    names = entry_names.get(parts[0]) if parts else None
    if names and len(loc) > 1 and isinstance(loc[1], int) and loc[1] < len(names):
        parts[1] = names[loc[1]]
    return ".".join(parts)


def task_arithmetic_factors(
    adapters: list[LoraAdapter], weights: list[float]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Exact ``sum_i w_i s_i B_i A_i`` as one LoRA: B and A concatenated along the rank."""
    import torch

    paths = sorted({p for a in adapters for p in a.modules})
    out = {}
    for path in paths:
        Bs, As = [], []
        for adapter, weight in zip(adapters, weights):
            module = adapter.modules.get(path)
            if module is not None:
                Bs.append(module.B * (weight * module.scaling))
                As.append(module.A)
        out[path] = (torch.cat(Bs, dim=1), torch.cat(As, dim=0))
    return out
