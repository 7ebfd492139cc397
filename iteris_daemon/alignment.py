"""Inference-solving alignment: the engine behind IterIS and RegMean.

For every targeted layer and task i the merged delta D should map the inputs the
*merged* model feeds that layer (Xt_i) to what task i's own LoRA produced from its
own inputs (X_i D_i^T). Per layer and iteration this engine

1. runs each task's calibration batches through the model (teacher forced) and,
   in forward hooks, accumulates G_i = Xt_i^T Xt_i and Q_i = (X_i A_i^T)^T Xt_i
   batch by batch (Q_i is the only part of C_i = X_i^T Xt_i the solve needs);
2. solves ``D* = [sum_i c_i D_i (C_i + l1_i I)] [sum_i c_i (G_i + l2_i I)]^-1``
   in float64, directly in the exact low-rank form ``D* = [B_1..B_N] A``.

Memory does not grow with the number of samples except for the r_i-wide
projections ``X_i A_i^T`` kept from the first pass, which give Q_i its rows.
The per-task Gram is folded into the running sums as soon as a task's pass ends,
so one d_in x d_in buffer per layer serves every task.

The regularisers use ||G_i||_F for both terms (l1_i = a1 ||G_i||_F, l2_i = a2
||G_i||_F): forming ||C_i||_F would cost another d_in x d_in product per task, and
at the first iteration C_i = G_i, so the two agree there.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .calibration import CalibrationSet
from .errors import CalibrationError, MergeError
from .lora import LoraAdapter
from .lowrank import solve_spd
from .model import BaseModel, Delta
from .strategy import Progress

log = logging.getLogger(__name__)
ACCUMULATE = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class AlignmentOptions:
    iterations: int = 1
    tolerance: float = 0.0
    a1: float = 0.0
    a2: float = 0.0
    adaptive_weights: bool = False
    task_weights: list[float] | None = None
    offdiag_scale: float = 1.0  # RegMean's alpha: shrink off-diagonal Gram entries
    batch_size: int = 16
    max_length: int = 128
    accumulate_dtype: str = "float32"


@dataclass
class TaskLayer:
    """What one task contributes at one layer, fixed after the first pass."""

    module: Any  # LoraModule or None when the task does not adapt this layer
    projections: list[torch.Tensor] = field(default_factory=list)  # X_i A_i^T per call
    PtP: torch.Tensor | None = None  # (X_i A_i^T)^T (X_i A_i^T), for ||X_i D_i^T||^2
    out_sq: float = 0.0  # ||X_i (W0 + D_i)^T||^2, for the adaptive weight
    weight: float = 1.0  # c_i


class GramPass:
    """Accumulators for one task's pass over its calibration data."""

    def __init__(self, layers: dict[str, dict[int, TaskLayer]], task: int, first: bool, dtype, biases, release=False, gram=True):
        self.layers, self.task, self.first, self.dtype, self.biases = layers, task, first, dtype, biases
        self.gram = gram  # False: only record the task's projections (evaluation's task pass)
        self.release = release  # drop each projection once used (single-use evaluation passes)
        self.G: dict[str, torch.Tensor] = {}
        self.Q: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {}

    def __call__(self, path: str, x: torch.Tensor, y: torch.Tensor) -> None:
        if x.shape[0] == 0:
            return
        x = x.to(self.dtype)
        info = self.layers[path][self.task]
        if self.gram:
            G = self.G.get(path)
            if G is None:
                G = self.G[path] = torch.zeros(x.shape[1], x.shape[1], dtype=self.dtype, device=x.device)
            G.addmm_(x.T, x)
        if self.first and self.gram:
            y = y.to(self.dtype)
            if self.biases.get(path) is not None:
                y = y - self.biases[path].to(y)
            info.out_sq += float(y.pow(2).sum())
        if info.module is None:
            return
        if self.first:
            # Xt = X on the task's own pass, so Q = A_i G needs no accumulation here
            # (and computing it from G keeps Q and G consistent to the last bit).
            P = x @ info.module.A.to(x).T
            info.projections.append(P)
            info.PtP = P.T @ P if info.PtP is None else info.PtP + P.T @ P
            return
        call = self.calls.get(path, 0)
        self.calls[path] = call + 1
        P = info.projections[call]
        if self.release:
            info.projections[call] = None
        Q = P.T @ x
        self.Q[path] = Q if path not in self.Q else self.Q[path] + Q


def align(
    base: BaseModel,
    adapters: list[LoraAdapter],
    calibration: list[CalibrationSet],
    options: AlignmentOptions,
    progress: Progress,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
    """Run the inference-solving loop; return per-layer (B, A) factors and metrics."""
    n_tasks = len(adapters)
    paths = sorted({p for a in adapters for p in a.modules})
    dtype = ACCUMULATE[options.accumulate_dtype]
    task_weights = options.task_weights or [1.0] * n_tasks
    layers = {p: {i: TaskLayer(module=a.modules.get(p)) for i, a in enumerate(adapters)} for p in paths}
    biases = {p: getattr(base.layer(p), "bias", None) for p in paths}
    base_weights = {p: base.weight(p).double() for p in paths}
    B_cat = {p: torch.cat([layers[p][i].module.B.double() for i in range(n_tasks) if layers[p][i].module is not None], 1) for p in paths}

    batches = [base.batches(c, options.batch_size, options.max_length) for c in calibration]
    for adapter, data, task_batches in zip(adapters, calibration, batches):
        tokens = sum(int(base.output_mask(b).sum()) if base.output_mask(b) is not None else 1 for b in task_batches)
        if not task_batches or tokens == 0:
            raise CalibrationError(data.source, f"no usable tokens for adapter {adapter.name}")

    base.attach(paths)
    timings = {"inference_s": 0.0, "solve_s": 0.0}
    losses: list[list[float]] = [[] for _ in range(n_tasks)]
    changes: list[float] = []
    unused: set[str] = set()
    merged: dict[str, torch.Tensor] | None = None  # path -> A (float64); B is B_cat
    try:
        for iteration in range(options.iterations):
            M = {p: None for p in paths}
            rhs: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
            numerators = [0.0] * n_tasks
            denominators = [0.0] * n_tasks
            bar = progress(total=sum(len(b) for b in batches), desc=f"iteration {iteration}")
            started = time.perf_counter()
            for i, adapter in enumerate(adapters):
                first = merged is None
                if first:
                    base.set_deltas({p: Delta(m.A, m.B, m.scaling) for p, m in adapter.modules.items()})
                else:
                    base.set_deltas({p: Delta(merged[p].float(), B_cat[p].float()) for p in paths})
                recorder = GramPass(layers, i, first, dtype, biases)
                for _ in base.run(batches[i], recorder):
                    bar.update(1)
                _fold_task(i, recorder, layers, paths, base_weights, options, task_weights[i], first, M, rhs)
                if not first:
                    for p in paths:
                        num, den = alignment_terms(layers[p][i], recorder, p, B_cat[p], merged[p])
                        numerators[i] += num
                        denominators[i] += den
            bar.close()
            timings["inference_s"] += time.perf_counter() - started
            if merged is not None:
                for i in range(n_tasks):
                    losses[i].append(numerators[i] / denominators[i] if denominators[i] > 0 else 0.0)
            started = time.perf_counter()
            new = {}
            for p in progress(paths, desc=f"solve {iteration}", leave=False):
                if M[p] is None:  # the forward pass never reached this layer: nothing to align
                    unused.add(p)
                    new[p] = torch.cat([t.module.scaling * t.module.A.double() for t in layers[p].values() if t.module is not None])
                else:
                    new[p] = solve_spd(M[p], torch.cat(rhs[p], 0))
            timings["solve_s"] += time.perf_counter() - started
            changes.append(_relative_change(B_cat, merged, new))
            merged = new
            if not all(torch.isfinite(a).all() for a in merged.values()):
                raise MergeError("the solve produced NaN/Inf; raise a1/a2 or check the calibration data")
            if changes[-1] < options.tolerance:
                break
    finally:
        base.detach()
        base.set_deltas({})

    factors = {p: (B_cat[p].float(), merged[p].float()) for p in paths}
    metrics = {
        "iterations_run": len(changes),
        "relative_change": changes,
        "converged": bool(changes and changes[-1] < options.tolerance),
        # Loss of each solution but the last, measured when it was installed; the
        # evaluation after the merge measures the last one.
        "alignment_loss": {a.name: losses[i] for i, a in enumerate(adapters)},
        "task_weights": {a.name: _mean_weight(layers, i) for i, a in enumerate(adapters)},
        "timings": timings,
    }
    if unused:
        log.warning("%d layers saw no calibration inputs and keep the sum of deltas: %s", len(unused), sorted(unused))
        metrics["layers_without_inputs"] = sorted(unused)
    return factors, metrics


def _fold_task(i, recorder, layers, paths, base_weights, options, user_weight, first, M, rhs) -> None:
    """Add task i's pass to every layer's running system (then its Gram can be dropped)."""
    for p in paths:
        info = layers[p][i]
        G = recorder.G.get(p)
        if G is None:
            continue
        if first:
            info.weight = user_weight * (_adaptive_weight(info, base_weights[p]) if options.adaptive_weights else 1.0)
        Q = None
        if info.module is not None:
            Q = info.module.A.double() @ G.double() if first else recorder.Q[p]
        M[p] = fold(M[p], rhs[p], G, Q, info.module, info.weight, options.a1, options.a2, options.offdiag_scale)


def fold(M, rhs, G, Q, module, weight: float, a1: float, a2: float, offdiag_scale: float = 1.0) -> torch.Tensor:
    """One task's share of one layer's normal equations, in float64.

    ``M += c (G + l2 I)`` and, when the task adapts the layer, appends the rows
    ``c s (Q + l1 A)`` = ``c s A (C + l1 I)`` to ``rhs``; returns the new ``M``.
    With l1 = a1 ||G||_F, l2 = a2 ||G||_F, the solution of ``A_merged M = rhs``
    stacked over tasks is the IterIS update in low-rank form.
    """
    G = G.double()
    norm = float(torch.linalg.matrix_norm(G))
    if offdiag_scale != 1.0:
        G = offdiag_scale * G + (1 - offdiag_scale) * torch.diag(torch.diagonal(G))
    term = weight * G
    term.diagonal().add_(weight * a2 * norm)
    if module is not None:
        rhs.append(weight * module.scaling * (Q.double() + a1 * norm * module.A.double()))
    return term if M is None else M + term


def _adaptive_weight(info: TaskLayer, W0: torch.Tensor) -> float:
    """c_i = ||W0 + D_i||_F^2 / ||X_i (W0 + D_i)^T||_F^2 (0 when the task sent no rows)."""
    W = W0 if info.module is None else W0 + info.module.delta()
    return float(W.pow(2).sum()) / info.out_sq if info.out_sq > 0 else 0.0


def alignment_terms(info: TaskLayer, recorder: GramPass, path: str, B: torch.Tensor, A: torch.Tensor) -> tuple[float, float]:
    """(||Xt D^T - X D_i^T||^2, ||X D_i^T||^2) for the installed merge D = B A, from Gram sums."""
    G = recorder.G.get(path)
    if G is None:
        return 0.0, 0.0
    G = G.double()
    fit = float(torch.trace((B.T @ B) @ (A @ G @ A.T)))
    if info.module is None:
        return fit, 0.0
    s = info.module.scaling
    Bi = info.module.B.double()
    target = s * s * float(torch.trace(Bi @ info.PtP.double() @ Bi.T))
    cross = s * float(((Bi.T @ B) @ A * recorder.Q[path].double()).sum())
    return max(fit - 2 * cross + target, 0.0), target


def _relative_change(B_cat, old, new) -> float:
    if old is None:
        return math.inf
    num = sum(float(torch.trace((B_cat[p].T @ B_cat[p]) @ ((new[p] - old[p]) @ (new[p] - old[p]).T))) for p in new)
    den = sum(float(torch.trace((B_cat[p].T @ B_cat[p]) @ (new[p] @ new[p].T))) for p in new)
    return math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0


def _mean_weight(layers, i: int) -> float:
    weights = [layers[p][i].weight for p in layers]
    return sum(weights) / len(weights) if weights else 0.0
