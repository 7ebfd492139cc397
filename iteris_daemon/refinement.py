"""Block-wise distillation of a merge towards the task models: a label-free refinement.

The closed-form solve aligns each linear layer's *output* with the task's, one layer at
a time; what the tasks' heads read is the blocks' output, after attention's softmax,
the MLP's activation and the norms, which no per-layer least squares sees. The
refinement takes the solved merge and, one block at a time, takes gradient steps on the
block's merged factors ``B`` and ``A`` (so the rank stays ``sum r_i``) so that the block's
output on the merged stream matches what task i's own model produces there, on task i's
calibration inputs:

    min_{B,A}  mean_i ||block(Xt_i; B A) - block_i(X_i)||^2 / ||block_i(X_i)||^2   (padding excluded)

Block k is refined on inputs produced by the blocks before it as already refined
(progressive layer-wise distillation, as in ProDistill: Xu et al., ICML 2025), so a block
corrects what the ones before it left. Steps are Adam's on a relative scale: each
factor moves by about ``lr`` times its own RMS per step, whatever the model's scale.

How far to go is chosen without labels too. With ``holdout > 0`` that fraction of each
task's calibration samples takes no steps; the objective on them is measured every
``steps / CHECKS`` steps, the block keeps the iterate that scored best there (the solve
itself included), and stops after ``PATIENCE`` checks without a better one: the steps
fit the samples they see, and a block's held-out samples say when that stops carrying
over. With ``holdout = 0`` every sample takes steps, and a block whose objective over
all its calibration tokens did not go down keeps the solve.
Like the solve, it needs no labels: the targets are the task models' hidden states.
Blocks only: layers outside them (a pooler, a head) keep the solve, and a model the
engine cannot run block by block is not refined (logged).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import torch

from .calibration import CalibrationSet
from .execution import State, Unit, prepare
from .lora import LoraAdapter
from .model import BaseModel, Delta, adapter_deltas, factor_deltas, masked_rows
from .strategy import Progress

log = logging.getLogger(__name__)


@dataclass
class RefineOptions:
    steps: int  # Adam steps per block, each over one calibration batch of every task
    lr: float = 3e-2  # per step, relative to each factor's RMS
    batch_size: int = 16
    max_length: int = 128
    blockwise: bool = True
    seed: int = 0  # which samples are held out, which batch each step draws
    holdout: float = 0.2  # fraction of each task's samples that choose the step count instead of taking steps


CHECKS = 10  # held-out measurements per block, evenly spaced over its steps
PATIENCE = 3  # checks without a better held-out objective before a block stops


def block_terms(out: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(||out - target||^2, ||target||^2)`` over the tokens that are not padding."""
    diff, ref = (masked_rows(x, mask, torch.float32) for x in (out - target, target))
    return diff.pow(2).sum(), ref.pow(2).sum()


def _ratio(num, den):
    return num / max(float(den), torch.finfo(torch.float32).tiny)


class _Refinement:
    """One refinement: two sets of streams (the task models', the merge's) moved block by
    block; each block with targeted layers is refined before the merge's streams move on."""

    def __init__(self, base: BaseModel, adapters: list[LoraAdapter], calibration: list[CalibrationSet],
                 factors: dict[str, tuple[torch.Tensor, torch.Tensor]], options: RefineOptions, progress: Progress):
        self.base, self.adapters, self.options, self.progress = base, adapters, options, progress
        self.factors = dict(factors)
        self.rng = random.Random(options.seed)
        # Per task: the batches that take steps, then those held out (none with holdout 0);
        # the streams keep that order, so ``self.steps[i]`` counts task i's stepping batches.
        splits = [c.split(options.holdout, self.rng, "refine_holdout") if options.holdout else (c, None)
                  for c in calibration]
        batches = [[base.batches(part, options.batch_size, options.max_length) for part in split if part is not None]
                   for split in splits]
        self.steps = [len(parts[0]) for parts in batches]
        self.executor, self.starts = prepare(base, sorted(factors), [sum(parts, []) for parts in batches],
                                             options.blockwise)

    def _run(self, unit: Unit, states: list[State], deltas: dict[str, Delta]) -> list[State]:
        self.base.set_deltas(deltas)
        return [self.executor.run(unit, state) for state in states]

    def _mask(self, state: State) -> torch.Tensor | None:
        return state.context.masks.get("decoder" if state.stack > 0 else "encoder")

    def _loss(self, unit: Unit, merged: list[list[State]], targets: list[list[State]], factors, batches) -> torch.Tensor:
        """The mean over tasks of the relative block loss on batch ``batches[i]`` of task i."""
        self.base.set_deltas(factor_deltas(factors))
        total = torch.zeros((), device=self.base.device)
        for i, b in enumerate(batches):
            target = targets[i][b]
            out = self.executor.run(unit, merged[i][b], grad=True)
            total = total + _ratio(*block_terms(out.hidden, target.hidden, self._mask(target))) / len(batches)
        return total

    def _objective(self, unit: Unit, merged, targets, factors, held_out: bool = False
                   ) -> tuple[list[float], list[list[State]]]:
        """Per task, the relative block loss over all its calibration tokens (the report's
        figure), or over its held-out ones only, and the merge's streams moved through the
        unit with ``factors`` (all of them; the held-out part when ``held_out``)."""
        self.base.set_deltas(factor_deltas(factors))
        losses, moved = [], []
        with torch.no_grad():
            for i, (states, wanted) in enumerate(zip(merged, targets)):
                first = self.steps[i] if held_out else 0
                outs = [self.executor.run(unit, s) for s in states[first:]]
                terms = [block_terms(o.hidden, t.hidden, self._mask(t)) for o, t in zip(outs, wanted[first:])]
                losses.append(_ratio(float(sum(n for n, _ in terms)), sum(d for _, d in terms)))
                moved.append(outs)
        return losses, moved

    def _descend(self, unit: Unit, merged, targets, start) -> tuple[dict, int, int, list[float] | None, list[float] | None]:
        """Adam on the unit's B and A from ``start``; each moves in units of its own RMS
        (``lr`` is relative). Returns ``(factors, step kept, steps taken, held-out losses
        at the start, held-out losses kept)``: with a held-out part, the best checked
        iterate (the start included); without one, the last (held-out losses None)."""
        options = self.options
        scales = {p: tuple(float(t.pow(2).mean().sqrt()) or 1.0 for t in pair) for p, pair in start.items()}
        moves = {p: tuple(torch.zeros_like(t, requires_grad=True) for t in pair) for p, pair in start.items()}
        optimizer = torch.optim.Adam([t for pair in moves.values() for t in pair], lr=options.lr)

        def current() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
            return {p: tuple(t + s * m for t, s, m in zip(start[p], scales[p], moves[p])) for p in unit.paths}

        def held_out(factors) -> list[float]:
            return self._objective(unit, merged, targets, factors, held_out=True)[0]

        every = max(1, options.steps // CHECKS)
        best, kept, taken = start, 0, 0
        held_start = best_held = held_out(start) if options.holdout else None
        for taken in range(1, options.steps + 1):
            optimizer.zero_grad(set_to_none=True)
            batches = [self.rng.randrange(n) for n in self.steps]
            self._loss(unit, merged, targets, current(), batches).backward()
            optimizer.step()
            self.bar.update(1)
            if options.holdout and taken % every == 0:
                with torch.no_grad():
                    candidate = current()
                score = held_out(candidate)
                if sum(score) < sum(best_held):
                    best, kept, best_held = candidate, taken, score
                elif taken - kept >= PATIENCE * every:
                    break
        self.bar.update(options.steps - taken)
        if not options.holdout:
            with torch.no_grad():
                best, kept = current(), taken
        return best, kept, taken, held_start, best_held

    def _refine_unit(self, unit: Unit, merged, targets) -> tuple[dict[str, Any], list[list[State]]]:
        """Refine one unit's factors; return the block's report and the merge's streams
        moved through it as installed."""
        start = {p: tuple(t.to(self.base.device, torch.float32) for t in self.factors[p]) for p in unit.paths}
        before, _ = self._objective(unit, merged, targets, start)
        best, kept, taken, held_before, held_after = self._descend(unit, merged, targets, start)
        after, moved = self._objective(unit, merged, targets, best)
        if held_after is None and sum(after) > sum(before):  # worse over all the data: keep the solve
            best, kept = start, 0
            after, moved = self._objective(unit, merged, targets, start)
        for p in unit.paths:
            self.factors[p] = tuple(t.cpu() for t in best[p])
        names = [a.name for a in self.adapters]
        report = {"block": unit.name, "refined": kept > 0, "steps_kept": kept, "steps_taken": taken,
                  "loss_before": dict(zip(names, before)), "loss_after": dict(zip(names, after))}
        if held_after is not None:  # the same figure over the held-out samples only
            report.update(heldout_before=dict(zip(names, held_before)), heldout_after=dict(zip(names, held_after)))
        return report, moved

    def run(self) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
        started = time.perf_counter()
        units = [u for u in self.executor.units if u.stack is not None]
        if not self.executor.blockwise:
            log.warning("refinement skipped: it needs block-by-block execution, which %s does not allow",
                        self.base.name_or_path)
            return self.factors, {"refined_blocks": 0, "skipped": "no blocks"}
        merged = [list(s) for s in self.starts]
        own = [list(s) for s in self.starts]
        report = []
        self.bar = self.progress(total=self.options.steps * sum(bool(u.paths) for u in units), desc="refinement")
        self.base.attach(sorted(self.factors))
        try:
            for unit in units:
                with self.executor.loaded(unit):
                    own = [self._run(unit, states, adapter_deltas(adapter, unit.paths))
                           for states, adapter in zip(own, self.adapters)]
                    if unit.paths:
                        entry, merged = self._refine_unit(unit, merged, own)
                        report.append(entry)
                    else:
                        merged = [self._run(unit, states, {}) for states in merged]
        finally:
            self.bar.close()
            self.base.detach()
            self.base.set_deltas({})
        metrics = {"refined_blocks": sum(r["refined"] for r in report), "blocks": report,
                   "refine_s": time.perf_counter() - started}
        return self.factors, metrics


def refine(
    base: BaseModel,
    adapters: list[LoraAdapter],
    calibration: list[CalibrationSet],
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    options: RefineOptions,
    progress: Progress,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
    """Refine a merge's ``(B, A)`` factors block by block; return them and a report."""
    return _Refinement(base, adapters, calibration, factors, options, progress).run()
