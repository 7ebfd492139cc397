"""The tensor math of the TIES and DARE baselines (:mod:`iteris_daemon.plugins.baselines`).

Each task's dense delta is combined element-wise with the others; the full-rank result
is written back as the best rank-``target_rank`` LoRA (truncated SVD, default rank = sum
of input ranks) and the truncation error is reported. Imported by the strategies'
``merge()`` only: this module imports torch.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from iteris_daemon.lora import LoraModule
from iteris_daemon.lowrank import dense_to_lowrank
from iteris_daemon.plugins.baselines import DareParams, DenseParams, TiesParams
from iteris_daemon.strategy import MergedAdapter, MergeInputs, Progress


CHUNK_ENTRIES = 1 << 20  # entries of one task's delta combined at once (8 MiB in float64)


def _dense_merge(inputs: MergeInputs, weights: list[float], params: DenseParams, progress: Progress,
                 combine: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor],
                 prepare: Callable[[list[LoraModule]], Any] = lambda modules: None) -> MergedAdapter:
    """Combine each module's dense deltas, a band of rows at a time: ``combine(deltas,
    weights, prepared)`` gets the band of every task (tasks x rows x d_in, float64) and what
    ``prepare(modules)`` computed once per module from the whole deltas. Only the merged
    matrix is whole (the SVD needs it); N dense float64 copies of an LM head were 9 GB."""
    paths = sorted({p for a in inputs.adapters for p in a.modules})
    modules, errors = {}, {}
    for path in progress(paths, desc="layers", leave=False):
        present = [(a.modules[path], w) for a, w in zip(inputs.adapters, weights) if path in a.modules]
        loras = [m for m, _ in present]
        task_weights = torch.tensor([w for _, w in present], dtype=torch.float64)
        prepared = prepare(loras)
        d_out, d_in = loras[0].B.shape[0], loras[0].A.shape[1]
        merged = torch.empty(d_out, d_in, dtype=torch.float64)
        step = max(1, CHUNK_ENTRIES // d_in)
        for start in range(0, d_out, step):
            rows = slice(start, start + step)
            band = torch.stack([m.scaling * (m.B[rows].double() @ m.A.double()) for m in loras])
            merged[rows] = combine(band, task_weights, prepared)
        rank = params.target_rank or sum(m.rank for m in loras)
        B, A, errors[path] = dense_to_lowrank(merged, rank)
        modules[path] = (B, A)
    return MergedAdapter(modules, {"truncation_error": {"max": max(errors.values(), default=0.0)}})


def ties_merge(inputs: MergeInputs, weights: list[float], params: TiesParams, progress: Progress) -> MergedAdapter:
    """TIES-merging: trim to top-density entries, elect signs, disjoint mean."""

    def thresholds(loras: list[LoraModule]) -> torch.Tensor:
        """Each task's trim threshold, from its whole delta (one at a time)."""
        return torch.tensor([_top_threshold(m.delta(), params.density) for m in loras], dtype=torch.float64)

    def combine(deltas: torch.Tensor, weights: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        trimmed = torch.where(deltas.abs() >= threshold[:, None, None], deltas, 0.0)
        weighted = trimmed * weights[:, None, None]
        sign = torch.sign(weighted.sum(0))
        agree = (torch.sign(weighted) == sign) & (weighted != 0)
        count = agree.sum(0).clamp(min=1)
        return (weighted * agree).sum(0) / count

    return _dense_merge(inputs, weights, params, progress, combine, thresholds)


def _top_threshold(delta: torch.Tensor, density: float) -> float:
    """The smallest magnitude among the ``density`` largest entries (0: keep them all)."""
    k = max(1, int(round(density * delta.numel())))
    if k >= delta.numel():
        return 0.0
    return float(delta.abs().flatten().kthvalue(delta.numel() - k + 1).values)


def dare_merge(inputs: MergeInputs, weights: list[float], params: DareParams, progress: Progress) -> MergedAdapter:
    """DARE: drop delta entries at random, rescale by 1/(1-p), then task arithmetic."""
    generator = torch.Generator().manual_seed(params.seed)

    def combine(deltas: torch.Tensor, weights: torch.Tensor, _prepared: None) -> torch.Tensor:
        keep = torch.rand(deltas.shape, generator=generator, dtype=deltas.dtype) >= params.drop_rate
        rescaled = deltas * keep / (1 - params.drop_rate)
        return (rescaled * weights[:, None, None]).sum(0)

    return _dense_merge(inputs, weights, params, progress, combine)
