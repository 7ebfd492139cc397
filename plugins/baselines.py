"""Data-free baselines that sit beside IterIS: task arithmetic, TIES and DARE.

Task arithmetic is exact as a concatenated LoRA. TIES and DARE act element-wise on
each task's dense delta, so their result is full rank; it is written back as the
best rank-``target_rank`` LoRA (Eckart-Young; default rank = sum of input ranks)
and the truncation error is reported.

This module only declares the strategies: their tensor math is in
:mod:`iteris_daemon.plugins.baselines_math`, imported by ``merge()``, so that loading
the plugin does not import torch.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from iteris_daemon import hookimpl
from iteris_daemon.strategy import (SEED_BOUNDS, MergedAdapter, MergeInputs, Progress, StrategyParams, per_adapter,
                                    refuse_all_zero, task_arithmetic_factors)


class WeightedParams(StrategyParams):
    weights: list[float] | None = Field(None, json_schema_extra=per_adapter(1.0),
                                        description="per-adapter weights, in --adapter order")
    scale: float = Field(1.0, gt=0, description="global multiplier lambda on the merged delta")

    @model_validator(mode="after")
    def _weights_not_all_zero(self):
        refuse_all_zero("weights", self.weights)
        return self


def _weights(inputs: MergeInputs, params: WeightedParams) -> list[float]:
    if params.weights is None:
        return [params.scale] * len(inputs.adapters)
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


class TiesParams(DenseParams):
    density: float = Field(0.2, gt=0, le=1, description="fraction of each delta's largest-magnitude entries kept")


class Ties:
    name = "ties"
    description = "TIES-merging: trim to top-density entries, elect signs, disjoint mean"
    Params = TiesParams
    needs_calibration = False

    def merge(self, inputs: MergeInputs, params: TiesParams, progress: Progress) -> MergedAdapter:
        from iteris_daemon.plugins.baselines_math import ties_merge

        return ties_merge(inputs, _weights(inputs, params), params, progress)


class DareParams(DenseParams):
    drop_rate: float = Field(0.5, ge=0, lt=1, description="probability of dropping each delta entry")
    seed: int = Field(0, **SEED_BOUNDS, description="random seed of the drop masks (fixed: merges are reproducible)")


class Dare:
    name = "dare"
    description = "DARE: drop delta entries at random, rescale by 1/(1-p), then task arithmetic"
    Params = DareParams
    needs_calibration = False

    def merge(self, inputs: MergeInputs, params: DareParams, progress: Progress) -> MergedAdapter:
        from iteris_daemon.plugins.baselines_math import dare_merge

        return dare_merge(inputs, _weights(inputs, params), params, progress)


@hookimpl
def register_strategies(register):
    register(TaskArithmetic())
    register(Ties())
    register(Dare())
