"""Strategy-independent quality figures for a merged adapter, per task:

- *alignment loss*: ``sum_layers ||Xt_i D^T - X_i D_i^T||^2 / sum_layers ||X_i D_i^T||^2``,
  the IterIS objective (unweighted, unregularised) of the merge D on task i's data;
- *fidelity gap*: ``||y_merged - y_i|| / ||y_i - y_base||`` of the model's final
  outputs on task i's calibration inputs (0: behaves like the task's own adapter,
  1: no better than the base model, read out through its own head, or the merge's where
  its checkpoint has none; null, as is the alignment loss, when the task's adapter does not change the
  outputs at all). A span head's outputs are its start and end logits;
- *next-token loss*, for language models that generate (causal or encoder-decoder): the
  mean cross-entropy, in nats per token, of each real token of a sample given those before
  it (for an encoder-decoder, every token of the target, as transformers' seq2seq loss counts
  them), under the base model, the task's own adapter and the merge: what a merge costs a
  task in the terms its adapter was trained in.

Given a *reference* (the merge published before), its fidelity gap is measured
on the same batches too (``reference_fidelity_gap``): the daemon's quality gate
compares the two on identical data.

Each batch runs three times (base, task, merge; four with a reference) on the
same token sequence. Per-token features never outlive their unit: only the streams'
hidden states travel from one unit to the next.
"""

from __future__ import annotations

import logging
import math

import torch

from .alignment import ACCUMULATE, TaskLayer, UnitPass, alignment_terms, loss_ratio
from .calibration import CalibrationSet
from .errors import MergeError
from .execution import prepare
from .lora import LoraAdapter
from .model import IGNORE, BaseModel, Delta, adapter_deltas, factor_deltas, row_mask
from .strategy import Progress

log = logging.getLogger(__name__)


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
    blockwise: bool = True,
) -> dict[str, dict[str, float]]:
    """Per task: alignment loss, fidelity gap (and the reference's fidelity gap).

    Runs unit by unit like the merge (see :mod:`iteris_daemon.execution`): each task's
    streams (base, task, merge, reference) pass through a unit before the next is loaded.
    """
    reference_paths = set(reference.modules) if reference is not None else set()
    paths = sorted(set(factors) | {p for a in adapters for p in a.modules} | reference_paths)
    dtype = ACCUMULATE[accumulate_dtype]
    merged_deltas = factor_deltas(factors)
    B64, A64 = {}, {}
    for p in paths:
        d_out, d_in = base.weight(p).shape
        B, A = factors.get(p, (torch.zeros(d_out, 1), torch.zeros(1, d_in)))
        B64[p], A64[p] = B.double(), A.double()
    # The base model reads out through its own head, or where its checkpoint has none (heads
    # usually travel with the adapters) and the loader made one at random, through the merge's.
    base_head = {key: tensor for key, tensor in merged_head.items() if key in base.initialised}
    streams: dict[str, tuple[dict[str, Delta], dict[str, torch.Tensor]] | None] = {
        "base": ({}, base_head), "merged": (merged_deltas, merged_head)}
    if reference is not None:
        streams["reference"] = (adapter_deltas(reference), reference.modules_to_save)
    batches = [base.batches(data, batch_size, max_length) for data in calibration]
    executor, starts = prepare(base, paths, batches, blockwise)
    states = [{name: list(start) for name in [*streams, "task"]} for start in starts]
    sums = [{"num": 0.0, "den": 0.0, "gap_num": 0.0, "gap_den": 0.0, "reference_num": 0.0, "tokens": 0,
             "loss": {name: 0.0 for name in ["task", *streams]}} for _ in adapters]
    by_layer: list[dict[str, float | None]] = [{} for _ in adapters]  # where a task's alignment loss sits
    bar = progress(total=len(executor.units) * sum(len(b) for b in batches), desc="evaluate", leave=False)
    base.attach(paths)
    try:
        for unit in executor.units:
            with executor.loaded(unit):
                for i, adapter in enumerate(adapters):
                    layers = {p: TaskLayer(adapter.modules.get(p)) for p in unit.paths}
                    for info in layers.values():
                        if info.module is not None:
                            info.A = info.module.A.to(base.device, dtype)
                    recorders = {"task": UnitPass(layers, dtype, {}, own=True, gram=False),
                                 "merged": UnitPass(layers, dtype, {}, own=False, gram=True, release=True)}
                    plan = {"task": (adapter_deltas(adapter), adapter.modules_to_save), **streams}
                    installed = {}
                    for name, (deltas, _head) in plan.items():  # on the device once per unit
                        base.set_deltas({p: d for p, d in deltas.items() if p in unit.paths})
                        installed[name] = base.deltas
                    # Batch by batch, so a tail's outputs (logits, maybe) are compared and dropped
                    # at once; the task's pass first in each batch: the merge's Q needs it.
                    for b in range(len(batches[i])):
                        outputs = {}
                        for name in ("task", *streams):
                            base.set_deltas(installed[name])
                            if unit.stack is None:
                                base.set_head(plan[name][1])
                            recorder = base.recorder = recorders.get(name)
                            if recorder is not None:
                                recorder.new_batch()
                            try:
                                state = executor.run(unit, states[i][name][b])
                            finally:
                                base.recorder = None
                            if unit.stack is None:
                                outputs[name] = state.output
                            else:
                                states[i][name][b] = state
                        if outputs:
                            _output_gaps(base, states[i]["task"][b].context.batch, outputs, sums[i])
                    merge_pass = recorders["merged"]
                    for p in unit.paths:
                        n, d = alignment_terms(layers[p], merge_pass.gram_of(p), merge_pass.Q.get(p), B64[p], A64[p])
                        sums[i]["num"] += n
                        sums[i]["den"] += d
                        # Where the task's own delta is zero, a misfit relative to it is undefined
                        # (null), not perfect: the merge may still move the task's outputs there;
                        # so where the layer saw no input (a vision tower, fed text).
                        seen = merge_pass.gram_of(p) is not None
                        by_layer[i][p] = n / d if d > 0 else (0.0 if n == 0 and seen else None)
                    bar.update(len(batches[i]))
    finally:
        bar.close()
        base.detach()
        base.set_deltas({})
        base.set_head({})
    results: dict[str, dict[str, float]] = {}
    for adapter, total, layers in zip(adapters, sums, by_layer):
        results[adapter.name] = {
            "alignment_loss": loss_ratio(total["num"], total["den"]),
            "fidelity_gap": _gap(total["gap_num"], total["gap_den"]),
            "alignment_loss_by_layer": layers,
        }
        if reference is not None:
            results[adapter.name]["reference_fidelity_gap"] = _gap(total["reference_num"], total["gap_den"])
        if results[adapter.name]["fidelity_gap"] is None:
            log.warning("adapter %s does not change the model's outputs on its calibration inputs (a zero delta?): "
                        "its fidelity gap and alignment loss are undefined, reported null", adapter.name)
        if total["tokens"]:
            results[adapter.name]["next_token_loss"] = {name: loss / total["tokens"] for name, loss in total["loss"].items()}
    broken = [name for name, figures in results.items() if not math.isfinite(figures["fidelity_gap"] or 0.0)]
    if broken:  # finite factors whose product overflows, or a float16 pass that overflowed
        compute = str(base.dtype).removeprefix("torch.")
        hint = "; float16 overflowed: merge with --dtype bfloat16 or float32" if base.dtype == torch.float16 else ""
        raise MergeError(f"the outputs on {', '.join(broken)} are not finite (NaN/Inf) in the {compute} forward pass"
                         f"{hint}; nothing was written")
    return results


def _output_gaps(base: BaseModel, batch: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor], sums: dict) -> None:
    """Add one batch's final-output distances (merge, base, reference vs task) to ``sums``, and
    for a language model each stream's next-token losses."""
    mask = base.output_mask(batch)
    y_task = outputs["task"].float()
    column = row_mask(y_task, mask.to(y_task.device) if mask is not None else None)

    def distance(other: torch.Tensor) -> float:
        diff = (other.float() - y_task).reshape(-1, y_task.shape[-1])
        if column is not None:
            diff = diff * column.to(diff.dtype)
        return float(torch.linalg.vector_norm(diff, dim=-1).double().pow(2).sum())  # no squared copy

    sums["gap_num"] += distance(outputs["merged"])
    sums["gap_den"] += distance(outputs["base"])
    if "reference" in outputs:
        sums["reference_num"] += distance(outputs["reference"])
    targets = base.next_tokens(batch)
    if targets is not None:
        _add_next_token_losses(targets.to(y_task.device), outputs, sums)


def _add_next_token_losses(targets: torch.Tensor, outputs: dict[str, torch.Tensor], sums: dict) -> None:
    """Add each stream's summed cross-entropy over the tokens the batch's positions predict
    (``targets``, :data:`~iteris_daemon.model.IGNORE` where none), a row at a time: a row's
    logits over a large vocabulary are the biggest tensor here."""
    sums["tokens"] += int((targets != IGNORE).sum())
    for name, logits in outputs.items():
        for row in range(targets.shape[0]):
            losses = torch.nn.functional.cross_entropy(logits[row].float(), targets[row], ignore_index=IGNORE,
                                                       reduction="none")  # 0 where ignored
            sums["loss"][name] += float(losses.double().sum())


def _gap(num: float, den: float) -> float | None:
    """sqrt(num / den); None when the task's adapter does not move the outputs (den 0):
    relative to no change, any change is undefined (it was reported 0, "behaves like the
    task's adapter", also where the merge moved them). NaN where some outputs are not finite
    (a float16 forward pass that overflowed): a NaN ``den`` read as "no change" let such a
    merge through, with its figures null."""
    if not (math.isfinite(num) and math.isfinite(den)):
        return math.nan
    ratio = loss_ratio(num, den)
    return None if ratio is None else ratio ** 0.5
