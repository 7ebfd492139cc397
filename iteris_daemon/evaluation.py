"""Strategy-independent quality figures for a merged adapter, per task:

- *alignment loss*: ``sum_layers ||Xt_i D^T - X_i D_i^T||^2 / sum_layers ||X_i D_i^T||^2``,
  the IterIS objective (unweighted, unregularised) of the merge D on task i's data;
- *fidelity gap*: ``||y_merged - y_i|| / ||y_i - y_base||`` of the model's final
  outputs on task i's calibration inputs (0: behaves like the task's own adapter,
  1: no better than the base model).

Given a *reference* (the merge published before), its fidelity gap is measured
on the same batches too (``reference_fidelity_gap``): the daemon's quality gate
compares the two on identical data.

Each batch runs three times (base, task, merge; four with a reference) on the
same token sequence, so no per-token features outlive their batch.
"""

from __future__ import annotations

import torch

from .alignment import ACCUMULATE, GramPass, TaskLayer, alignment_terms
from .calibration import CalibrationSet
from .lora import LoraAdapter
from .model import BaseModel, Delta, token_rows
from .strategy import Progress


def evaluate(
    base: BaseModel,
    adapters: list[LoraAdapter],
    calibration: list[CalibrationSet],
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    merged_head: dict[str, torch.Tensor],
    batch_size: int,
    max_length: int,
    progress: Progress,
    accumulate_dtype: str = "float32",
    reference: LoraAdapter | None = None,
) -> dict[str, dict[str, float]]:
    reference_paths = set(reference.modules) if reference is not None else set()
    paths = sorted(set(factors) | {p for a in adapters for p in a.modules} | reference_paths)
    reference_deltas = {p: Delta(m.A, m.B, m.scaling) for p, m in reference.modules.items()} if reference else {}
    dtype = ACCUMULATE[accumulate_dtype]
    biases = {p: getattr(base.layer(p), "bias", None) for p in paths}
    merged_deltas = {p: Delta(A, B) for p, (B, A) in factors.items()}
    zero = {p: (torch.zeros(base.weight(p).shape[0], 1), torch.zeros(1, base.weight(p).shape[1])) for p in paths}
    B64 = {p: factors.get(p, zero[p])[0].double() for p in paths}
    A64 = {p: factors.get(p, zero[p])[1].double() for p in paths}
    results: dict[str, dict[str, float]] = {}
    base.attach(paths)
    try:
        for i, (adapter, data) in enumerate(zip(adapters, calibration)):
            layers = {p: {i: TaskLayer(module=adapter.modules.get(p))} for p in paths}
            task_pass = GramPass(layers, i, True, dtype, biases, gram=False)
            merge_pass = GramPass(layers, i, False, dtype, biases, release=True)
            task_deltas = {p: Delta(m.A, m.B, m.scaling) for p, m in adapter.modules.items()}
            gap_num = gap_den = reference_num = 0.0
            batches = base.batches(data, batch_size, max_length)
            for batch in progress(batches, desc=f"evaluate {adapter.name}", leave=False):
                mask = base.output_mask(batch)
                base.set_deltas({})
                base.set_head({})
                y_base = _rows(next(base.run([batch])), mask)
                base.set_deltas(task_deltas)
                base.set_head(adapter.modules_to_save)
                y_task = _rows(next(base.run([batch], task_pass)), mask)
                base.set_deltas(merged_deltas)
                base.set_head(merged_head)
                y_merged = _rows(next(base.run([batch], merge_pass)), mask)
                gap_num += float((y_merged - y_task).pow(2).sum())
                gap_den += float((y_task - y_base).pow(2).sum())
                if reference is not None:
                    base.set_deltas(reference_deltas)
                    base.set_head(reference.modules_to_save)
                    y_reference = _rows(next(base.run([batch])), mask)
                    reference_num += float((y_reference - y_task).pow(2).sum())
            num = den = 0.0
            for p in paths:
                n, d = alignment_terms(layers[p][i], merge_pass, p, B64[p], A64[p])
                num, den = num + n, den + d
            results[adapter.name] = {
                "alignment_loss": num / den if den > 0 else 0.0,
                "fidelity_gap": _gap(gap_num, gap_den),
            }
            if reference is not None:
                results[adapter.name]["reference_fidelity_gap"] = _gap(reference_num, gap_den)
    finally:
        base.detach()
        base.set_deltas({})
        base.set_head({})
    return results


def _gap(num: float, den: float) -> float:
    return (num / den) ** 0.5 if den > 0 else 0.0


def _rows(y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return token_rows(y.double(), mask.to(y.device) if mask is not None else None)
