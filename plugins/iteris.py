"""IterIS (Chen et al., CVPR 2025), the default strategy, and RegMean, its first step
without iteration, task weights or regularisation."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from iteris_daemon import hookimpl
from iteris_daemon.strategy import MergedAdapter, MergeInputs, Progress, StrategyParams, per_adapter, refuse_all_zero


class FeatureParams(StrategyParams):
    """How calibration text becomes layer inputs (shared by the data-driven strategies)."""

    samples_per_task: int | None = Field(50, ge=1, description="calibration samples used per task (None: all)")
    max_length: int = Field(128, ge=1, le=8192, description="tokens per sample (truncated beyond)")
    batch_size: int = Field(16, ge=1, description="samples per forward pass")
    accumulate_dtype: Literal["float32", "float64"] = Field(
        "float32", description="precision of the per-batch Gram products (the solve is always float64)"
    )
    blockwise: bool = Field(
        True, description="run the model block by block (only one block resident); false: whole-model passes"
    )

    def feature_options(self) -> dict:
        """The settings that ``AlignmentOptions`` takes from these (the sample count is
        applied when the calibration data is read)."""
        return self.model_dump(include={"batch_size", "max_length", "accumulate_dtype", "blockwise"})


class IterISParams(FeatureParams):
    iterations: int = Field(8, ge=1, le=1000, description="maximum number of inference-solve iterations")
    tolerance: float = Field(
        1.0, ge=0, description="the stopping rule's threshold (relative); the default, chosen on public validation "
        "data, in effect stops after the second solve, which gave what further solves gave there"
    )
    stop: Literal["change", "objective"] = Field(
        "change", description="change: stop when the merged delta changes by less than tolerance; objective: "
        "when the mean alignment loss improves by less than tolerance, returning the better merge"
    )
    a1: float = Field(1e-3, ge=0, description="weight of the proximal term towards each task's delta (x ||G_i||_F)")
    a2: float = Field(1e-3, ge=0, description="ridge weight (x ||G_i||_F)")
    adaptive_weights: bool = Field(True, description="balance tasks by c_i = ||W_i||^2 / ||X_i W_i^T||^2")
    task_weights: list[float] | None = Field(
        None, json_schema_extra=per_adapter(1.0),
        description="manual per-task multipliers, in --adapter order")
    loss_weighting: float = Field(
        0.0, ge=0, le=4, description="gamma: from the second solve on, weight each task at each layer by its relative "
        "alignment loss under the previous merge to the power gamma, so the worst-served tasks count more (0: off)"
    )
    target_rank: int | None = Field(None, ge=1, description="truncate the exact rank-sum result to this rank (SVD)")
    refine_steps: int = Field(
        0, ge=0, le=100_000, description="after the solves, Adam steps per block of label-free distillation of the "
        "block outputs towards each task's own model on its calibration inputs, B and A both (0: off; see "
        "iteris_daemon.refinement)"
    )
    refine_lr: float = Field(3e-2, gt=0, le=1, description="refinement step size, relative to each factor's RMS")
    refine_holdout: float = Field(
        0.2, ge=0, lt=1, description="fraction of each task's calibration samples that take no refinement steps and "
        "choose, per block, the iterate to keep (the solve included) and when to stop; 0: every sample takes steps"
    )
    schedule: Literal["joint", "sequential"] = Field(
        "joint", description="joint: every block fed by the previous iteration's merge (the paper); sequential: "
        "by the blocks already merged in this sweep (Gauss-Seidel)"
    )

    @model_validator(mode="after")
    def _weights_non_negative(self):
        if self.task_weights is not None and any(w < 0 for w in self.task_weights):
            raise ValueError("task_weights must be non-negative")
        refuse_all_zero("task_weights", self.task_weights)
        return self

    @model_validator(mode="after")
    def _refinement_runs_by_block(self):
        """Refinement distils block outputs: with whole-model passes it was skipped, with a
        WARNING that blamed the model."""
        if self.refine_steps and not self.blockwise:
            raise ValueError("refine_steps needs blockwise = true (refinement works block by block)")
        return self


class IterIS:
    name = "iteris"
    description = "IterIS: iterative inference-solving alignment with adaptive weights and regularisation (default)"
    Params = IterISParams
    needs_calibration = True

    def merge(self, inputs: MergeInputs, params: IterISParams, progress: Progress) -> MergedAdapter:
        from iteris_daemon.alignment import AlignmentOptions, align

        options = AlignmentOptions(
            iterations=params.iterations,
            tolerance=params.tolerance,
            stop=params.stop,
            a1=params.a1,
            a2=params.a2,
            adaptive_weights=params.adaptive_weights,
            task_weights=params.task_weights,
            loss_weighting=params.loss_weighting,
            schedule=params.schedule,
            **params.feature_options(),
        )
        factors, metrics = align(inputs.base, inputs.adapters, inputs.calibration, options, progress, inputs.head)
        if params.refine_steps:
            from iteris_daemon.refinement import RefineOptions, refine

            refine_options = RefineOptions(steps=params.refine_steps, lr=params.refine_lr, holdout=params.refine_holdout,
                                           batch_size=params.batch_size, max_length=params.max_length,
                                           blockwise=params.blockwise)
            factors, metrics["refinement"] = refine(inputs.base, inputs.adapters, inputs.calibration, factors,
                                                    refine_options, progress)
        return _truncate(factors, metrics, params.target_rank)


class RegMeanParams(FeatureParams):
    alpha: float = Field(
        0.9, gt=0, le=1, description="scale of the Gram matrices' off-diagonal entries (RegMean's own regulariser)"
    )


class RegMean:
    name = "regmean"
    description = "RegMean: one closed-form solve on the tasks' own features, no iteration or task weights"
    Params = RegMeanParams
    needs_calibration = True

    def merge(self, inputs: MergeInputs, params: RegMeanParams, progress: Progress) -> MergedAdapter:
        from iteris_daemon.alignment import AlignmentOptions, align

        options = AlignmentOptions(iterations=1, offdiag_scale=params.alpha, **params.feature_options())
        factors, metrics = align(inputs.base, inputs.adapters, inputs.calibration, options, progress, inputs.head)
        return MergedAdapter(factors, metrics)


def _truncate(factors, metrics, rank: int | None) -> MergedAdapter:
    if rank is None:
        return MergedAdapter(factors, metrics)
    from iteris_daemon.lowrank import refactor

    errors = {}
    out = {}
    for path, (B, A) in factors.items():
        if A.shape[0] > rank:
            B, A, errors[path] = refactor(B, A, rank)
        out[path] = (B, A)
    metrics["truncation_error"] = {"max": max(errors.values(), default=0.0), "layers": len(errors)}
    return MergedAdapter(out, metrics)


@hookimpl
def register_strategies(register):
    register(IterIS())
    register(RegMean())
