"""Inference-solving alignment: the engine behind IterIS and RegMean.

For every targeted layer and task i the merged delta D should map the inputs the
*merged* model feeds that layer (Xt_i) to what task i's own LoRA produced from its
own inputs (X_i D_i^T). The closed form per layer is

    D* = [sum_i c_i D_i (C_i + l1_i I)] [sum_i c_i (G_i + l2_i I)]^-1,

solved in float64 directly in its exact low-rank form ``D* = [B_1..B_N] A``; only
``G_i = Xt_i^T Xt_i`` and ``Q_i = (X_i A_i^T)^T Xt_i`` (the part of ``C_i = X_i^T Xt_i``
the solve needs) are accumulated, batch by batch, in forward hooks.

The model runs one *unit* at a time (a transformer block, then the tail; or the whole
model when its blocks cannot be found, see :mod:`iteris_daemon.execution`): each task's
stream passes through the unit, its sums are folded into the unit's systems, the
unit's modules are solved, and the streams move on. Only one unit's weights, Grams and
systems are resident. Modules that read the same input tensor (q/k/v, gate/up) share
one Gram.

Two schedules decide which merge feeds the streams:

- ``joint`` (the paper's iteration): every unit of sweep t sees inputs produced by the
  merge of sweep t-1 everywhere (the tasks' own adapters at t = 0). Identical to
  whole-model passes;
- ``sequential`` (Gauss-Seidel): unit k of sweep t sees inputs produced by the units
  before it as already solved in this sweep, and the previous sweep's merge (the task's
  own adapter at t = 0) inside itself. Each unit then re-runs the streams with its new
  merge, one extra forward pass per unit and task.

The regularisers use ||G_i||_F for both terms (l1_i = a1 ||G_i||_F, l2_i = a2 ||G_i||_F):
forming ||C_i||_F would cost another d_in x d_in product per task, and at the first
iteration C_i = G_i, so the two agree there.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch

from . import malloc
from .calibration import CalibrationSet
from .errors import CalibrationError, MergeError
from .execution import State, Unit, prepare
from .logs import counted
from .lora import LoraAdapter, LoraModule
from .lowrank import solve_spd
from .model import BaseModel, Delta, adapter_deltas, masked_rows, row_mask
from .strategy import Progress

log = logging.getLogger(__name__)
ACCUMULATE = {"float32": torch.float32, "float64": torch.float64}
LOSS_WEIGHT_FLOOR = 1e-2  # a task served (almost) exactly at a layer keeps some weight there


@dataclass
class AlignmentOptions:
    iterations: int = 1
    tolerance: float = 0.0
    # "change": stop when the merged delta changes by less than ``tolerance`` (relative);
    # "objective": stop when the mean alignment loss of the installed merge improved by less
    # than ``tolerance`` (relative) on the one before, and return the better of the two.
    stop: Literal["change", "objective"] = "change"
    a1: float = 0.0
    a2: float = 0.0
    adaptive_weights: bool = False
    task_weights: list[float] | None = None
    # gamma: from the second solve on, a task's weight at a layer is multiplied by its
    # relative alignment loss there under the merge before, to the power gamma (at least
    # LOSS_WEIGHT_FLOOR): the tasks that merge served worst count more. 0: the paper.
    loss_weighting: float = 0.0
    offdiag_scale: float = 1.0  # RegMean's alpha: shrink off-diagonal Gram entries
    batch_size: int = 16
    max_length: int = 128
    accumulate_dtype: str = "float32"
    schedule: Literal["joint", "sequential"] = "joint"
    blockwise: bool = True  # False: whole-model passes even when blocks can be found
    share_inputs: bool = True  # one Gram per distinct input tensor (False: one per module, for checks)


@dataclass
class TaskLayer:
    """What one task contributes at one layer, fixed after its own-adapter pass."""

    module: LoraModule | None  # None when the task does not adapt this layer
    A: torch.Tensor | None = None  # the module's A on the device, accumulation dtype
    projections: list[torch.Tensor | None] = field(default_factory=list)  # X_i A_i^T per call, in call order
    PtP: torch.Tensor | None = None  # (X_i A_i^T)^T (X_i A_i^T), for ||X_i D_i^T||^2
    out_sq: torch.Tensor | float = 0.0  # ||X_i (W0 + D_i)^T||^2, for the adaptive weight
    weight: float | None = None  # c_i, once known


def _check_token_rows(path: str, x: torch.Tensor, mask: torch.Tensor | None) -> None:
    """A layer must read every token of the batch (or one vector per sequence, as a pooler
    does): the solves pair each token's features under one model with the same token's
    under another. A layer that reads a subset (a mixture-of-experts expert, given the
    tokens routed to it; routing differs from model to model) has no such pairing."""
    if mask is None:
        return
    if x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape[::-1]) != tuple(mask.shape) and not bool(mask.all()):
        # XLNet's and FSMT's (tokens, sequences, features): the row count matches, and the
        # padding mask, laid over it, zeroed tokens and kept padding in the Grams. Without
        # padding no row is masked, and the row order changes no sum. (A square batch, as many
        # tokens as sequences, cannot be told apart; a run's other batches are.)
        raise MergeError(f"{path} reads its batch sequence first ({mask.shape[1]} positions by {mask.shape[0]} "
                         "sequences), where the padding mask does not fit its rows: merge it with batch_size = 1 "
                         "(no padding), or with a data-free strategy (task_arithmetic, ties, ...) and --no-eval")
    tokens = x.shape[0] if x.dim() == 2 else math.prod(x.shape[:2])
    if tokens not in (mask.numel(), mask.shape[0]) and not (x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape)):
        sees = ("only some tokens (a mixture-of-experts expert?)" if tokens < mask.numel() else
                "more rows than the batch has tokens (padded to an attention window, or another sequence's tokens)")
        raise MergeError(f"{path} read {tokens} rows from a batch of {mask.shape[0]} sequences of {mask.shape[1]} "
                         f"tokens: it sees {sees}, so no token's features pair up across models; merge it with a "
                         "data-free strategy (task_arithmetic, ties, ...) and --no-eval")


class UnitPass:
    """One task's sums over its batches through one unit (the forward hooks' recorder).

    ``own``: the stream runs the task's own adapter, so its inputs are X_i: record the
    projections X_i A_i^T and ||X_i (W0 + D_i)^T||^2 (for the adaptive weight). ``gram``:
    accumulate G = Xt^T Xt, one per distinct input tensor; on a stream that is not the
    task's own, also Q = (X_i A_i^T)^T Xt from the recorded projections.
    """

    def __init__(self, layers: dict[str, TaskLayer], dtype: torch.dtype, biases: dict, *, own: bool, gram: bool,
                 release: bool = False, share: bool = True):
        self.layers, self.dtype, self.biases = layers, dtype, biases
        self.own, self.gram, self.release, self.share = own, gram, release, share
        self.G: dict[str, torch.Tensor] = {}  # keyed by the first module reading the input
        self.Q: dict[str, torch.Tensor] = {}
        self.owner: dict[str, str] = {}  # module -> module whose Gram it shares
        # Calls of each module so far: the k-th call of a stream pairs with the k-th
        # projection its own pass recorded (a module shared across depths, like ALBERT's
        # one block, is called several times per batch).
        self.calls: dict[str, int] = {}
        self._seen: list[tuple[torch.Tensor, torch.Tensor, str]] = []

    def new_batch(self) -> None:
        self._seen = []

    def gram_of(self, path: str) -> torch.Tensor | None:
        owner = self.owner.get(path)
        return None if owner is None else self.G.get(owner)

    def _rows(self, path: str, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The masked rows of ``x``, computed once per input tensor; notes shared inputs."""
        for seen, rows, owner in self._seen if self.share else ():
            if seen is x:
                break
        else:
            _check_token_rows(path, x, mask)
            rows, owner = masked_rows(x, mask, self.dtype), path
            self._seen.append((x, rows, owner))
        known = self.owner.setdefault(path, owner)
        if known != owner:
            raise MergeError(f"{path} shared its input with {known} in one batch and not in another")
        return rows

    def __call__(self, path: str, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> None:
        if x.numel() == 0:
            return
        rows = self._rows(path, x, mask)
        if self.gram and self.owner[path] == path:
            G = self.G.get(path)
            if G is None:
                G = self.G[path] = torch.zeros(rows.shape[1], rows.shape[1], dtype=self.dtype, device=rows.device)
            G.addmm_(rows.T, rows)
        info = self.layers[path]
        if self.own:
            out = y.reshape(-1, y.shape[-1]).to(self.dtype)
            bias = self.biases.get(path)
            if bias is not None:
                out = out - bias.to(out)
            column = row_mask(y, mask)
            if column is not None:
                out = out * column.to(out.dtype)
            info.out_sq = info.out_sq + out.pow(2).sum()
            if info.A is not None:
                P = rows @ info.A.T
                info.projections.append(P)
                info.PtP = P.T @ P if info.PtP is None else info.PtP + P.T @ P
            return
        if info.A is not None and self.gram:
            call = self.calls[path] = self.calls.get(path, -1) + 1
            P = info.projections[call]
            if self.release:
                info.projections[call] = None
            Q = P.T @ rows
            self.Q[path] = Q if path not in self.Q else self.Q[path] + Q


def fold(M, rhs, G, Q, module, weight: float, a1: float, a2: float, offdiag_scale: float = 1.0) -> torch.Tensor:
    """One task's share of one layer's normal equations, in float64.

    ``M += c (G + l2 I)`` and, when the task adapts the layer, appends the rows
    ``c s (Q + l1 A)`` = ``c s A (C + l1 I)`` to ``rhs``; returns the new ``M``.
    ``Q=None`` means the task's own inputs (Xt = X): then ``Q = A G``, with the same
    off-diagonal scaling as ``M`` (RegMean's Gram, which keeps a lone adapter exact).
    With l1 = a1 ||G||_F, l2 = a2 ||G||_F, the solution of ``A_merged M = rhs``
    stacked over tasks is the IterIS update in low-rank form.
    """
    G = G.to(torch.float64, copy=True)  # the one d_in x d_in temporary: the rest is in place
    norm = float(torch.linalg.matrix_norm(G))
    if offdiag_scale != 1.0:
        diagonal = torch.diagonal(G).clone()
        G.mul_(offdiag_scale)
        G.diagonal().add_((1 - offdiag_scale) * diagonal)
    if module is not None:
        A = module.A.to(G.device, torch.float64)
        Q = A @ G if Q is None else Q.to(G.device, torch.float64)
        rhs.append(weight * module.scaling * (Q + a1 * norm * A))
    if M is None:
        M = torch.zeros_like(G)
    M.add_(G, alpha=weight)
    M.diagonal().add_(weight * a2 * norm)
    return M


def adaptive_weight(module: LoraModule | None, W0: torch.Tensor, out_sq: float) -> float:
    """c_i = ||W0 + D_i||_F^2 / ||X_i (W0 + D_i)^T||_F^2 (0 when the task sent no rows).

    ``||W0 + s B A||^2 = ||W0||^2 + 2 s <B^T W0, A> + s^2 <B^T B, A A^T>``: no dense
    delta and no float64 copy of the base weight.
    """
    if out_sq <= 0:
        return 0.0
    W = W0.float()
    total = float(W.pow(2).sum())
    if module is not None:
        A, B = module.A.to(W.device, torch.float32), module.B.to(W.device, torch.float32)
        s = module.scaling
        total += 2 * s * float(((B.T @ W) * A).sum()) + s * s * float(((B.T @ B) * (A @ A.T)).sum())
    return total / out_sq


def alignment_terms(info: TaskLayer, G: torch.Tensor | None, Q: torch.Tensor | None, B: torch.Tensor,
                    A: torch.Tensor) -> tuple[float, float]:
    """(||Xt D^T - X D_i^T||^2, ||X D_i^T||^2) for the installed merge D = B A, from Gram sums."""
    if G is None:
        return 0.0, 0.0
    G, B, A = G.double(), B.double().to(G.device), A.double().to(G.device)
    fit = float(torch.trace((B.T @ B) @ (A @ G @ A.T)))
    if info.module is None:
        return fit, 0.0
    s = info.module.scaling
    Bi = info.module.B.to(G.device, torch.float64)
    target = s * s * float(((Bi.T @ Bi) * info.PtP.double().T).sum())  # trace(Bi PtP Bi^T), never d_out x d_out
    cross = s * float(((Bi.T @ B) @ A * Q.double()).sum())
    return max(fit - 2 * cross + target, 0.0), target


def loss_ratio(num: float, den: float) -> float | None:
    """A task's alignment loss from its summed terms: None when its adapter moves nothing
    (den 0): no move is relative to that, whether or not the merge moves its outputs."""
    return num / den if den > 0 else None


class _Alignment:
    """One run of the inference-solving loop (the state shared by its steps)."""

    def __init__(self, base: BaseModel, adapters: list[LoraAdapter], calibration: list[CalibrationSet],
                 options: AlignmentOptions, progress: Progress, head: dict[str, torch.Tensor] | None = None):
        self.base, self.adapters, self.options, self.progress = base, adapters, options, progress
        self.head = head or {}  # the merge's modules_to_save; a task's own model runs with the task's
        self.n = len(adapters)
        self.paths = sorted({p for a in adapters for p in a.modules})
        self.dtype = ACCUMULATE[options.accumulate_dtype]
        self.user_weights = options.task_weights or [1.0] * self.n
        self.layers = {p: [TaskLayer(a.modules.get(p)) for a in adapters] for p in self.paths}
        self.batches = [base.batches(c, options.batch_size, options.max_length) for c in calibration]
        for adapter, data, task_batches in zip(adapters, calibration, self.batches):
            masks = [base.output_mask(b) for b in task_batches]
            tokens = sum(int(m.sum()) if m is not None else 1 for m in masks)
            if not task_batches or tokens == 0:
                raise CalibrationError(data.source, f"no usable tokens for adapter {adapter.name}")
        self.executor, self.starts = prepare(base, self.paths, self.batches, options.blockwise)
        if options.schedule == "sequential" and not self.executor.blockwise:
            # Whole-model passes: no merged block feeds the next, and the merge is the joint
            # schedule's at 2.5 times its passes (the report said "sequential" all the same)
            log.warning("schedule sequential runs block by block, and this model's passes run whole (the line above "
                        "says why): the joint schedule is run, which gives the same merge")
            self.options = options = replace(options, schedule="joint")
        self.B_cat = {
            p: torch.cat([t.module.B for t in self.layers[p] if t.module is not None], 1) for p in self.paths
        }
        self.merged: dict[str, torch.Tensor] | None = None  # path -> A (float32, CPU); B is B_cat
        self.bar = None
        self.unused: set[str] = set()
        self.grams = {"modules": 0, "distinct_inputs": 0}  # one task's Grams in the first sweep
        self.timing = {"inference_s": 0.0, "solve_s": 0.0}

    # ---------------------------------------------------------------- passes
    def _deltas(self, unit: Unit, task: int | None, merge: dict[str, torch.Tensor] | None) -> dict[str, Delta]:
        """The deltas a stream runs with in ``unit``: task ``task``'s own, or ``merge``."""
        if merge is None:
            return adapter_deltas(self.adapters[task], unit.paths)
        return {p: Delta(merge[p], self.B_cat[p]) for p in unit.paths if p in merge}

    def _run(self, unit: Unit, states: list[State], deltas: dict[str, Delta], recorder: UnitPass | None,
             head: dict[str, torch.Tensor]) -> list[State]:
        self.base.set_deltas(deltas)
        if unit.stack is None:  # the tail or the whole model: where modules_to_save (heads, embeddings) run
            self.base.set_head(head)
        self.base.recorder = recorder
        out = []
        try:
            for state in states:
                if recorder is not None:
                    recorder.new_batch()
                out.append(self.executor.run(unit, state))
                self.bar.update(1)
        finally:
            self.base.recorder = None
        return out

    def _on_device(self, unit: Unit, task: int) -> dict[str, TaskLayer]:
        """Task ``task``'s layers of ``unit``, with A and the projections on the device."""
        device = self.base.device
        layers = {}
        for p in unit.paths:
            info = self.layers[p][task]
            if info.module is not None and info.A is None:
                info.A = info.module.A.to(device, self.dtype)
            info.projections = [P.to(device) for P in info.projections]
            layers[p] = info
        return layers

    def _forget(self, unit: Unit) -> None:
        """Done with ``unit`` for this sweep: its projections wait in CPU memory (they
        grow with depth; the device keeps one block's worth)."""
        for p in unit.paths:
            for info in self.layers[p]:
                info.A = None
                info.projections = [P.cpu() for P in info.projections]

    # ----------------------------------------------------------------- sweeps
    def run(self) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
        options = self.options
        timings = self.timing
        losses: list[list[float | None]] = [[] for _ in range(self.n)]
        changes: list[float] = []
        units = [u for u in self.executor.units if u.paths or u.stack is not None]
        best: tuple[dict[str, torch.Tensor], float] | None = None  # stop="objective": the best merge measured
        returned = 0
        stopped = False  # by a stop rule, not at the iterations' cap
        passes_run = 0  # passes of the calibration data through the model (the cost of the sweeps)
        self.base.attach(self.paths)
        try:
            for sweep in range(options.iterations):
                self.loss_terms = [[0.0, 0.0] for _ in range(self.n)]
                self.change = [0.0, 0.0]
                passes = 1 if options.schedule == "joint" else (3 if sweep == 0 else 2)
                passes_run += passes
                self.bar = self.progress(total=self._passes(units, sweep) * sum(len(b) for b in self.batches),
                                         desc=f"iteration {sweep}")
                states = [list(s) for s in self.starts]
                # Sequential, first sweep: the tasks' own streams (the targets X_i) part from
                # the merged streams at the first solved unit; until then they are one.
                own = list(states) if options.schedule == "sequential" and sweep == 0 else None
                new: dict[str, torch.Tensor] = {}
                for unit in units:
                    with self.executor.loaded(unit):
                        states, own = self._unit(unit, sweep, states, own, new)
                    self._forget(unit)
                self.bar.close()
                malloc.release_free_heap()  # the sweep's freed temporaries and streams
                if self.merged is not None:
                    for i, (num, den) in enumerate(self.loss_terms):
                        losses[i].append(loss_ratio(num, den))  # None as the final evaluation: a task moving nothing
                    defined = [task[-1] for task in losses if task[-1] is not None]
                    loss = sum(defined) / len(defined) if defined else 0.0
                    if options.stop == "objective" and best is not None and loss >= best[1] * (1 - options.tolerance):
                        if loss >= best[1]:  # the solve measured is no better: the one before it
                            self.merged, returned = best[0], sweep - 1
                        stopped = True
                        break  # else the one measured, a gain below the tolerance
                    best = (self.merged, loss)
                changes.append(self._relative_change())
                self.merged, returned = new, sweep + 1
                if options.stop == "change" and changes[-1] < options.tolerance:
                    stopped = True
                    break
        finally:
            self.base.detach()
            self.base.set_deltas({})
            self.base.set_head({})
        if self.unused:
            log.warning("%s saw no calibration inputs and keep the tasks' deltas averaged with their task_weights: %s",
                        counted(len(self.unused), "layer"), sorted(self.unused))
        factors = {p: (self.B_cat[p].float(), self.merged[p].float()) for p in self.paths}
        metrics = {
            "iterations_run": len(changes),
            "calibration_passes": passes_run,  # with stop="objective", the sweep that measured no gain too
            "returned_iteration": returned,  # which solve (1 = the first) the merge is
            "relative_change": changes,
            "converged": stopped,
            "schedule": options.schedule,
            "execution": "blocks" if self.executor.blockwise else "whole model",
            # Loss of each solve before the one returned, measured when it was installed; the
            # evaluation after the merge measures the one returned (the objective rule measured
            # it, and a solve after it, already: listed once, the history ends with it).
            "alignment_loss": {a.name: losses[i][:returned - 1] for i, a in enumerate(self.adapters)},
            "task_weights": {a.name: self._mean_weight(i) for i, a in enumerate(self.adapters)},
            "timings": timings,
            "grams": self.grams,
        }
        if self.unused:
            metrics["layers_without_inputs"] = sorted(self.unused)
        return factors, metrics

    def _passes(self, units: list[Unit], sweep: int) -> int:
        """How many times each batch goes through a unit in sweep ``sweep`` (the progress bar
        counts them): once per unit jointly. Sequentially a unit with targeted modules runs
        again with its solve, and in the first sweep the tasks' own streams, once apart from
        the merged ones (from the first such unit on), run on their own (see :meth:`_unit`)."""
        if self.options.schedule == "joint":
            return len(units)
        total, apart = 0, False
        for unit in units:
            total += 1 + bool(unit.paths) + (sweep == 0 and apart)
            apart = apart or (sweep == 0 and bool(unit.paths))
        return total

    def _unit(self, unit: Unit, sweep: int, states, own, new):
        """Align one unit for every task; return the streams after it."""
        options = self.options
        sequential = options.schedule == "sequential"
        previous = self.merged  # None on the first sweep: the tasks' own adapters
        biases = {p: getattr(self.base.layer(p), "bias", None) for p in unit.paths}
        M: dict[str, torch.Tensor | None] = {p: None for p in unit.paths}
        rhs: dict[str, list[torch.Tensor]] = {p: [] for p in unit.paths}
        started = time.perf_counter()
        merged_deltas = self._deltas(unit, None, previous) if previous is not None else None
        for i in range(self.n):
            layers = self._on_device(unit, i)
            own_deltas, own_head = self._deltas(unit, i, None), self.adapters[i].modules_to_save
            first = previous is None and (own is None or own[i] is states[i])
            if first:  # Xt = X: one pass gives the projections and the Gram
                recorder = UnitPass(layers, self.dtype, biases, own=True, gram=True, share=options.share_inputs)
                out = self._run(unit, states[i], own_deltas, recorder, own_head)
                if own is not None:
                    own[i] = out
                if not sequential or not unit.paths:  # else re-run below with the unit's merge
                    states[i] = out
            else:
                if own is not None:  # sequential, first sweep: the own stream moves on its own
                    own[i] = self._run(unit, own[i], own_deltas, UnitPass(layers, self.dtype, biases, own=True, gram=False),
                                       own_head)
                recorder = UnitPass(layers, self.dtype, biases, own=False, gram=True, share=options.share_inputs)
                if merged_deltas is not None:
                    moved = self._run(unit, states[i], merged_deltas, recorder, self.head)
                else:  # sequential, first sweep: this unit is not solved yet, the task's own runs here
                    moved = self._run(unit, states[i], own_deltas, recorder, own_head)
                if not sequential or not unit.paths:
                    states[i] = moved
            factors: dict[str, float] = {}  # loss weighting: task i's weight multipliers, by layer
            if previous is not None:
                for p in unit.paths:
                    G = recorder.gram_of(p)
                    num, den = alignment_terms(self.layers[p][i], G, recorder.Q.get(p), self.B_cat[p], previous[p])
                    self.loss_terms[i][0] += num
                    self.loss_terms[i][1] += den
                    if options.loss_weighting and den > 0:
                        factors[p] = max(num / den, LOSS_WEIGHT_FLOOR) ** options.loss_weighting
            self._fold(unit, i, recorder, layers, first, M, rhs, factors)
            if i == 0 and sweep == 0:
                self.grams["modules"] += sum(recorder.gram_of(p) is not None for p in unit.paths)
                self.grams["distinct_inputs"] += len(recorder.G)
        self.timing["inference_s"] += time.perf_counter() - started
        started = time.perf_counter()
        for p in unit.paths:
            if M[p] is None:  # the forward pass never reached this layer: nothing to align
                self.unused.add(p)
                new[p] = self._weighted_mean(p).float()
            else:
                self._check_finite(p, M[p], rhs[p])
                new[p] = solve_spd(M[p], torch.cat(rhs[p], 0), self.dtype,
                                   definite=options.a2 > 0 or options.offdiag_scale < 1,
                                   fill=self._weighted_mean(p)).float().cpu()  # where the Grams resolve nothing
            if not torch.isfinite(new[p]).all():
                raise MergeError(f"{p}: the solve produced NaN/Inf (a1 = {options.a1:g}, a2 = {options.a2:g}): raise "
                                 "them where they are near 0, lower them where they are huge, or check the "
                                 "calibration data")
            if previous is not None:
                self._track_change(p, previous[p], new[p])
        self.timing["solve_s"] += time.perf_counter() - started
        if sequential and unit.paths:  # move the streams on through the unit as just solved
            started = time.perf_counter()
            solved = self._deltas(unit, None, new)
            states = [self._run(unit, states[i], solved, None, self.head) for i in range(self.n)]
            self.timing["inference_s"] += time.perf_counter() - started
        return states, own

    def _weighted_mean(self, p: str) -> torch.Tensor:
        """The merged ``A`` (with ``B_cat``) of the tasks' deltas on layer ``p`` averaged with
        their weights (a task that does not adapt it adds a zero delta): what the solve gives
        where the tasks' inputs look alike, so the answer where the calibration data says
        nothing: an input feature no token reached, a layer no pass reached (it kept the sum
        of the deltas, twice a lone adapter given twice). A lone adapter, or copies of one,
        stays exact there. The weights are the solve's (``task_weights`` times the adaptive
        ones), or ``task_weights`` alone where no task's inputs carried energy."""
        weights = [t.weight or 0.0 for t in self.layers[p]]
        if not any(weights):
            weights = list(self.user_weights)
        total = sum(weights)
        return torch.cat([w / total * t.module.scaling * t.module.A for w, t in zip(weights, self.layers[p])
                          if t.module is not None])

    def _fold(self, unit: Unit, i: int, recorder: UnitPass, layers: dict[str, TaskLayer], first: bool, M, rhs,
              factors: dict[str, float]) -> None:
        """Add task i's pass to the unit's systems (then its Grams can be dropped); ``factors``
        multiply its weight at some layers (loss weighting)."""
        options = self.options
        for p in unit.paths:
            G = recorder.gram_of(p)
            if G is None:
                continue
            info = layers[p]
            if info.weight is None:
                c = 1.0
                if options.adaptive_weights:
                    c = adaptive_weight(info.module, self.base.weight(p), float(info.out_sq))
                info.weight = self.user_weights[i] * c
            Q = None if first else recorder.Q.get(p)  # first: Xt = X, so fold forms Q = A G
            M[p] = fold(M[p], rhs[p], G, Q, info.module, info.weight * factors.get(p, 1.0), options.a1, options.a2,
                        options.offdiag_scale)
            # the first task to make it so is named where its stream is its own adapter's
            self._check_finite(p, M[p], rhs[p], task=i if first else None)

    def _relative_change(self) -> float:
        """||D_new - D_old|| / ||D_new|| over all layers (inf after the first sweep)."""
        if self.merged is None:
            return math.inf
        num, den = self.change
        return math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0

    def _check_finite(self, path: str, M: torch.Tensor, rhs: list[torch.Tensor], task: int | None = None) -> None:
        """A system built from non-finite hidden states says so, naming the compute dtype
        (float16 overflows where bfloat16 and float32 do not, and no ridge helps then) and
        the task whose pass made it so: an adapter with a huge lora_alpha or huge weights
        (finite, so registered) failed every run of its group, in a line naming none."""
        if torch.isfinite(M).all() and all(torch.isfinite(r).all() for r in rhs):
            return
        compute = str(self.base.dtype).removeprefix("torch.")
        adapter = "" if task is None else f" with adapter {self.adapters[task].name}"
        hint = ("float16 overflowed: merge with --dtype bfloat16 or float32 (a group's dtype)"
                if self.base.dtype == torch.float16 else
                "check the calibration data" + ("" if task is None else ", and the adapter's lora_alpha and weights "
                                                "(a delta this large overflows); merged without it, the others merge"))
        raise MergeError(f"{path}: its inputs in the {compute} forward pass{adapter} are not finite (NaN/Inf); {hint}")

    def _track_change(self, p: str, old: torch.Tensor, new: torch.Tensor) -> None:
        BtB = self.B_cat[p].double().T @ self.B_cat[p].double()
        diff = new.double() - old.double()
        self.change[0] += float(torch.trace(BtB @ (diff @ diff.T)))
        self.change[1] += float(torch.trace(BtB @ (new.double() @ new.double().T)))

    def _mean_weight(self, i: int) -> float:
        weights = [self.layers[p][i].weight or 0.0 for p in self.paths]
        return sum(weights) / len(weights) if weights else 0.0


def align(
    base: BaseModel,
    adapters: list[LoraAdapter],
    calibration: list[CalibrationSet],
    options: AlignmentOptions,
    progress: Progress,
    head: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
    """Run the inference-solving loop; return per-layer (B, A) factors and metrics.
    ``head``: the ``modules_to_save`` tensors the merge carries (its streams run with them)."""
    return _Alignment(base, adapters, calibration, options, progress, head).run()
