"""The tensor math of the TIES and DARE baselines (:mod:`iteris_daemon.plugins.baselines`).

Each task's dense delta is combined element-wise with the others; the full-rank result
is written back as the best rank-``target_rank`` LoRA (truncated SVD, default rank = sum
of input ranks) and the truncation error is reported. Imported by the strategies'
``merge()`` only: this module imports torch.
"""

from __future__ import annotations

import torch

from iteris_daemon.lowrank import dense_to_lowrank
from iteris_daemon.plugins.baselines import DareParams, DenseParams, TiesParams
from iteris_daemon.strategy import MergedAdapter, MergeInputs, Progress


def _dense_merge(
    inputs: MergeInputs, weights: list[float], params: DenseParams, progress: Progress, combine
) -> MergedAdapter:
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


def ties_merge(inputs: MergeInputs, weights: list[float], params: TiesParams, progress: Progress) -> MergedAdapter:
    """TIES-merging: trim to top-density entries, elect signs, disjoint mean."""

    def combine(deltas: torch.Tensor, weights: torch.Tensor, _path: str) -> torch.Tensor:
        trimmed = torch.stack([_keep_top(d, params.density) for d in deltas])
        weighted = trimmed * weights[:, None, None]
        sign = torch.sign(weighted.sum(0))
        agree = (torch.sign(weighted) == sign) & (weighted != 0)
        count = agree.sum(0).clamp(min=1)
        return (weighted * agree).sum(0) / count

    return _dense_merge(inputs, weights, params, progress, combine)


def _keep_top(delta: torch.Tensor, density: float) -> torch.Tensor:
    k = max(1, int(round(density * delta.numel())))
    if k >= delta.numel():
        return delta
    threshold = delta.abs().flatten().kthvalue(delta.numel() - k + 1).values
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def dare_merge(inputs: MergeInputs, weights: list[float], params: DareParams, progress: Progress) -> MergedAdapter:
    """DARE: drop delta entries at random, rescale by 1/(1-p), then task arithmetic."""
    generator = torch.Generator().manual_seed(params.seed)

    def combine(deltas: torch.Tensor, weights: torch.Tensor, _path: str) -> torch.Tensor:
        keep = torch.rand(deltas.shape, generator=generator, dtype=deltas.dtype) >= params.drop_rate
        rescaled = deltas * keep / (1 - params.drop_rate)
        return (rescaled * weights[:, None, None]).sum(0)

    return _dense_merge(inputs, weights, params, progress, combine)
