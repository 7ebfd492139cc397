"""Data-free baselines that sit beside IterIS: task arithmetic, TIES and DARE.

Task arithmetic is exact as a concatenated LoRA. TIES and DARE act element-wise on
each task's dense delta, so their result is full rank; it is written back as the
best rank-``target_rank`` LoRA (truncated SVD, default rank = sum of input ranks)
and the truncation error is reported.
"""

from __future__ import annotations

import torch
from pydantic import Field

from iteris_daemon import hookimpl
from iteris_daemon.errors import ParameterError
from iteris_daemon.lowrank import dense_to_lowrank
from iteris_daemon.strategy import MergedAdapter, MergeInputs, Progress, StrategyParams, task_arithmetic_factors


class WeightedParams(StrategyParams):
    weights: list[float] | None = Field(None, description="per-adapter weights in --adapter order (default 1 each)")
    scale: float = Field(1.0, gt=0, description="global multiplier lambda on the merged delta")


def _weights(inputs: MergeInputs, params: WeightedParams) -> list[float]:
    if params.weights is None:
        return [params.scale] * len(inputs.adapters)
    if len(params.weights) != len(inputs.adapters):
        raise ParameterError(f"weights has {len(params.weights)} entries for {len(inputs.adapters)} adapters")
    return [params.scale * w for w in params.weights]


class TaskArithmetic:
    name = "task_arithmetic"
    description = "Task arithmetic: lambda * sum_i w_i D_i, exact as a rank-sum LoRA"
    Params = WeightedParams
    needs_calibration = False

    def merge(self, inputs: MergeInputs, params: WeightedParams, progress: Progress) -> MergedAdapter:
        return MergedAdapter(task_arithmetic_factors(inputs.adapters, _weights(inputs, params)))


class DenseParams(WeightedParams):
    target_rank: int | None = Field(None, ge=1, description="rank of the written LoRA (default: sum of input ranks)")


def _dense_merge(inputs: MergeInputs, params: DenseParams, progress: Progress, combine) -> MergedAdapter:
    weights = _weights(inputs, params)
    paths = sorted({p for a in inputs.adapters for p in a.modules})
    modules, errors = {}, {}
    for path in progress(paths, desc="layers", leave=False):
        present = [(a.modules[path], w) for a, w in zip(inputs.adapters, weights) if path in a.modules]
        deltas = torch.stack([m.delta() for m, _ in present])
        merged = combine(deltas, torch.tensor([w for _, w in present], dtype=deltas.dtype), path)
        rank = params.target_rank or sum(m.rank for m, _ in present)
        B, A, errors[path] = dense_to_lowrank(merged, rank)
        modules[path] = (B, A)
    return MergedAdapter(modules, {"truncation_error": {"max": max(errors.values(), default=0.0)}})


class TiesParams(DenseParams):
    density: float = Field(0.2, gt=0, le=1, description="fraction of each delta's largest-magnitude entries kept")


class Ties:
    name = "ties"
    description = "TIES-merging: trim to top-density entries, elect signs, disjoint mean"
    Params = TiesParams
    needs_calibration = False

    def merge(self, inputs: MergeInputs, params: TiesParams, progress: Progress) -> MergedAdapter:
        def combine(deltas: torch.Tensor, weights: torch.Tensor, _path: str) -> torch.Tensor:
            trimmed = torch.stack([_keep_top(d, params.density) for d in deltas])
            weighted = trimmed * weights[:, None, None]
            sign = torch.sign(weighted.sum(0))
            agree = (torch.sign(weighted) == sign) & (weighted != 0)
            count = agree.sum(0).clamp(min=1)
            return (weighted * agree).sum(0) / count

        return _dense_merge(inputs, params, progress, combine)


def _keep_top(delta: torch.Tensor, density: float) -> torch.Tensor:
    k = max(1, int(round(density * delta.numel())))
    if k >= delta.numel():
        return delta
    threshold = delta.abs().flatten().kthvalue(delta.numel() - k + 1).values
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


class DareParams(DenseParams):
    drop_rate: float = Field(0.5, ge=0, lt=1, description="probability of dropping each delta entry")
    seed: int = Field(0, description="random seed of the drop masks (fixed: merges are reproducible)")


class Dare:
    name = "dare"
    description = "DARE: drop delta entries at random, rescale by 1/(1-p), then task arithmetic"
    Params = DareParams
    needs_calibration = False

    def merge(self, inputs: MergeInputs, params: DareParams, progress: Progress) -> MergedAdapter:
        generator = torch.Generator().manual_seed(params.seed)

        def combine(deltas: torch.Tensor, weights: torch.Tensor, _path: str) -> torch.Tensor:
            keep = torch.rand(deltas.shape, generator=generator, dtype=deltas.dtype) >= params.drop_rate
            rescaled = deltas * keep / (1 - params.drop_rate)
            return (rescaled * weights[:, None, None]).sum(0)

        return _dense_merge(inputs, params, progress, combine)


@hookimpl
def register_strategies(register):
    register(TaskArithmetic())
    register(Ties())
    register(Dare())
