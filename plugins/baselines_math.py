"""The tensor math of the TIES and DARE baselines (:mod:`iteris_daemon.plugins.baselines`).

Each task's dense delta is combined element-wise with the others; the full-rank result
is written back as the best rank-``target_rank`` LoRA (Eckart-Young, through the Gram matrix of
its smaller side: :func:`iteris_daemon.lowrank.dense_to_lowrank`; default rank = sum
of input ranks) and the truncation error is reported. Imported by the strategies'
``merge()`` only: this module imports torch.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

import torch

from iteris_daemon.lora import LoraModule
from iteris_daemon.lowrank import dense_to_lowrank
from iteris_daemon.plugins.baselines import DareParams, DenseParams, TiesParams
from iteris_daemon.strategy import MergedAdapter, MergeInputs, Progress


CHUNK_ENTRIES = 1 << 20  # entries of one task's delta combined at once (8 MiB in float64)


def _band(module: LoraModule, rows: slice) -> torch.Tensor:
    """Rows ``rows`` of the module's dense delta, float64. Every use goes through this one
    expression: a band of a matrix product need not be bit-identical to the same rows of
    the whole product, and TIES compares entries with a threshold taken from them."""
    return module.scaling * (module.B[rows].double() @ module.A.double())


def drop_generator(seed: int, adapter: str, path: str) -> torch.Generator:
    """The generator of one adapter's drop mask at one layer, seeded by the merge's ``seed``,
    the adapter's name and the layer: an adapter's mask does not depend on the other adapters
    or their order (one generator drawn over the adapters in turn made the merge follow the
    order they were given in)."""
    digest = hashlib.sha256(f"{seed}\0{adapter}\0{path}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _dense_merge(inputs: MergeInputs, weights: list[float], params: DenseParams, progress: Progress,
                 combine: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor],
                 prepare: Callable[[list[LoraModule], list[slice], list[str], str], Any] = lambda *layer: None
                 ) -> MergedAdapter:
    """Combine each module's dense deltas a band of rows at a time: ``combine(deltas,
    weights, prepared)`` gets the band of every task (tasks x rows x d_in, float64) and
    what ``prepare(modules, bands, names, path)`` computed once per module (``names``: the
    adapters the modules belong to). The merged matrix is whole
    (its Gram matrix needs it), on the merge device, where its low-rank factors are
    computed (products and an eigendecomposition: what a GPU does fast); the tasks'
    deltas are never all whole at once (N float64 copies of an LM head's were 9 GB)."""
    paths = sorted({p for a in inputs.adapters for p in a.modules})
    modules, errors = {}, {}
    for path in progress(paths, desc="layers", leave=False):
        present = [(a, w) for a, w in zip(inputs.adapters, weights) if path in a.modules]
        loras = [a.modules[path] for a, _ in present]
        task_weights = torch.tensor([w for _, w in present], dtype=torch.float64)
        d_out, d_in = loras[0].B.shape[0], loras[0].A.shape[1]
        step = max(1, CHUNK_ENTRIES // d_in)
        bands = [slice(start, start + step) for start in range(0, d_out, step)]
        prepared = prepare(loras, bands, [a.name for a, _ in present], path)
        merged = torch.empty(d_out, d_in, dtype=torch.float64, device=inputs.device)
        for rows in bands:
            merged[rows] = combine(torch.stack([_band(m, rows) for m in loras]), task_weights, prepared)
        rank = params.target_rank or sum(m.rank for m in loras)
        B, A, errors[path] = dense_to_lowrank(merged, rank)
        modules[path] = (B.cpu(), A.cpu())
    return MergedAdapter(modules, {"truncation_error": {"max": max(errors.values(), default=0.0)}})


def ties_merge(inputs: MergeInputs, weights: list[float], params: TiesParams, progress: Progress) -> MergedAdapter:
    """TIES-merging: trim to top-density entries, elect signs, disjoint mean."""

    def thresholds(loras: list[LoraModule], bands: list[slice], *_owners) -> torch.Tensor:
        """Each task's trim threshold over its whole delta, one task at a time in one buffer."""
        magnitudes = torch.empty(loras[0].B.shape[0], loras[0].A.shape[1], dtype=torch.float64)
        found = []
        for m in loras:
            for rows in bands:
                torch.abs(_band(m, rows), out=magnitudes[rows])
            found.append(top_threshold(magnitudes, params.density))
        return torch.tensor(found, dtype=torch.float64)

    def combine(deltas: torch.Tensor, weights: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        trimmed = torch.where(deltas.abs() >= threshold[:, None, None], deltas, 0.0)
        weighted = trimmed * weights[:, None, None]
        sign = torch.sign(weighted.sum(0))
        agree = (torch.sign(weighted) == sign) & (weighted != 0)
        count = agree.sum(0).clamp(min=1)
        return (weighted * agree).sum(0) / count

    return _dense_merge(inputs, weights, params, progress, combine, thresholds)


def top_threshold(magnitudes: torch.Tensor, density: float) -> float:
    """The smallest of the ``density`` largest ``magnitudes`` (0: keep them all). Reorders
    ``magnitudes`` in place (a partial sort, no copy)."""
    k = max(1, int(round(density * magnitudes.numel())))
    if k >= magnitudes.numel():
        return 0.0
    flat = magnitudes.numpy().reshape(-1)
    flat.partition(flat.size - k)
    return float(flat[flat.size - k])


def dare_merge(inputs: MergeInputs, weights: list[float], params: DareParams, progress: Progress) -> MergedAdapter:
    """DARE: drop delta entries at random, rescale by 1/(1-p), then task arithmetic. Each
    adapter's mask is drawn by its own :func:`drop_generator`, band by band."""

    def generators(_loras, _bands, names: list[str], path: str) -> list[torch.Generator]:
        return [drop_generator(params.seed, name, path) for name in names]

    def combine(deltas: torch.Tensor, weights: torch.Tensor, drawn: list[torch.Generator]) -> torch.Tensor:
        keep = torch.stack([torch.rand(deltas.shape[1:], generator=g, dtype=deltas.dtype) for g in drawn])
        rescaled = deltas * (keep >= params.drop_rate) / (1 - params.drop_rate)
        return (rescaled * weights[:, None, None]).sum(0)

    return _dense_merge(inputs, weights, params, progress, combine, generators)
