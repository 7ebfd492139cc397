"""Data-free LoRA merging methods of 2025, computed exactly on the LoRA factors.

Strategies (per LoRA-targeted layer, over the adapters that adapt it; ``D_i = s_i B_i A_i``):

* ``core_space`` -- Core Space merging (Panariello, Marczak et al., "Accurate and Efficient
  Low-Rank Model Merging in Core Space", NeurIPS 2025, arXiv:2509.17786).
* ``tsv`` -- TSV-Merge (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference
  in Model Merging", CVPR 2025, arXiv:2412.00081).
* ``iso_c`` and ``iso_cts`` -- Iso-C and Iso-CTS (Marczak et al., "No Task Left Behind:
  Isotropic Model Merging with Common and Task-Specific Subspaces", ICML 2025,
  arXiv:2502.04959).
* ``knots`` -- KnOTS (Stoica, Ramesh et al., "Model merging with SVD to tie the KnOTS",
  ICLR 2025, arXiv:2410.19735): TIES (or DARE-TIES) on the tasks' components in the shared
  basis of one SVD of their concatenated deltas.
* ``wudi`` -- WUDI merging (Cheng et al., "Whoever Started the Interference Should End It:
  Guiding Data-Free Model Merging via Task Vectors", ICML 2025, arXiv:2503.08099): the
  least-squares merge that uses each task's delta as a stand-in for its inputs.

How they are computed -- exactly, in the core space of the adapters' factors, never forming a
d_out x d_in matrix -- is stated in :mod:`iteris_daemon.plugins.lora_2025_math`, which holds
the math and which ``merge()`` imports, so that loading this plugin does not import torch.

LoRA adaptation, stated once: the papers were written for full fine-tuning, where every
delta has full rank. A LoRA delta of rank r has min(d_out, d_in) - r zero singular values
whose singular vectors are arbitrary; wherever a paper keeps "the top k", k is capped at
the number of non-zero singular values. "The dimension of the matrix" that TSV-M and Iso-CTS
share out among the tasks (min(d_out, d_in) in the papers' code) is Core Space's core size,
the summed ranks R = sum_i r_i, at most min(d_out, d_in): on LoRA deltas the layer's own
min(d_out, d_in) would keep every component of every task in TSV-M (it differs from R
where the ranks differ: R / N truncates the larger ranks) and leave Iso-CTS no task-specific
directions. A repeated or zero adapter takes its share of R like any other, so merging
copies of one adapter with TSV-M gives that adapter. ``N`` is the number of adapters that
adapt the layer.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from iteris_daemon import hookimpl
from iteris_daemon.strategy import SEED_BOUNDS, MergedAdapter, MergeInputs, Progress, StrategyParams


class _Params(StrategyParams):
    alpha: float = Field(
        1.0, gt=0, description="global scale of the merged delta (the papers' alpha/lambda; 1.0 is the "
        "TSV-M paper's and the reference implementations' default, the papers tune it on validation data)"
    )
    target_rank: int | None = Field(
        None, ge=1, description="cap on the written rank (best rank-k of the merge, error reported); "
        "default: exact, at most the sum of the input ranks"
    )


class CoreSpaceParams(_Params):
    method: Literal["ta", "tsv", "iso_c", "iso_cts"] = Field(
        "tsv", description="rule applied in the core space: ta (task arithmetic), tsv (TSV-Merge, "
        "int(R / N) components per task, R the summed ranks), iso_c, iso_cts"
    )
    common_space_fraction: float = Field(
        0.8, gt=0, le=1, description="iso_cts only: fraction of the core dimension given to the common subspace"
    )

    @model_validator(mode="after")
    def _fraction_read_by_the_method(self):
        if "common_space_fraction" in self.model_fields_set and self.method != "iso_cts":
            raise ValueError(f"common_space_fraction is read only by method iso_cts, not {self.method!r}")
        return self


class CoreSpace:
    """Core Space merging (Panariello et al., NeurIPS 2025).

    Reference bases from SVDs of the stacked factors, ``U_B`` of ``[B_1 .. B_N]`` and ``V_A``
    of ``[A_1; ..; A_N]``; cores ``M_i = U_B^T (s_i B_i A_i) V_A`` (R x R, R = sum_i r_i);
    ``M = merge(M_1 .. M_N)``; ``Delta = alpha U_B M V_A^T``. Lossless: ``U_B M_i V_A^T = D_i``.
    ``merge`` is the paper's rule in the core: task arithmetic ``sum_i M_i``; TSV-Merge with
    ``int(R / N)`` components per task (the reference code's ``1/N`` of the core's
    singular values; at least 1); Iso-C; Iso-CTS (see ``tsv_core``, ``iso_c_core`` and
    ``iso_cts_core`` in :mod:`iteris_daemon.plugins.lora_2025_math`).
    """

    name = "core_space"
    description = "Core Space merging (NeurIPS 2025): TSV / Iso-C / Iso-CTS / TA on the R x R cores of the LoRAs, exact"
    Params = CoreSpaceParams
    needs_calibration = False

    def merge(self, inputs: MergeInputs, params: CoreSpaceParams, progress: Progress) -> MergedAdapter:
        from iteris_daemon.plugins.lora_2025_math import core_space_core, merge_cores

        return merge_cores(
            inputs, params, progress, lambda layer: core_space_core(layer, params.method, params.common_space_fraction)
        )


class TsvParams(_Params):
    fraction: float | None = Field(
        None, gt=0, le=1, description="share of the matrix dimension kept per task: max(1, int(fraction * "
        "R)) singular components, R the summed ranks, at most the task's rank (default 1/N, the paper's)"
    )


class Tsv:
    """TSV-M (Gargiulo et al., CVPR 2025).

    Per task ``D_i = U_i S_i V_i^T``; keep the top ``k = max(1, int(fraction * R))``,
    at most rank(D_i) (``fraction`` = 1/N by default: the paper's 1/N of the matrix dimension,
    which at the default equals ``core_space``'s TSV-Merge); ``U_cat = [U_1,k .. U_N,k]``,
    ``V_cat``, ``S_cat`` likewise; whitening ``U_perp = P_U Q_U^T`` from
    ``U_cat = P_U Sigma Q_U^T`` (and ``V_perp``); ``Delta = alpha U_perp diag(S_cat) V_perp^T``.
    """

    name = "tsv"
    description = "TSV-Merge (CVPR 2025): each task's top singular vectors (1/N of the dimension), orthogonalised, summed"
    Params = TsvParams
    needs_calibration = False

    def merge(self, inputs: MergeInputs, params: TsvParams, progress: Progress) -> MergedAdapter:
        from iteris_daemon.plugins.lora_2025_math import merge_cores, tsv_fraction_core

        return merge_cores(inputs, params, progress, lambda layer: tsv_fraction_core(layer, params.fraction))


class IsoC:
    """Iso-C (Marczak et al., ICML 2025).

    ``Delta_TA = sum_i D_i = U S V^T``;  ``Delta = alpha mean(S) U V^T`` (isotropic spectrum).
    """

    name = "iso_c"
    description = "Iso-C (ICML 2025): task arithmetic with a flat (isotropic) singular spectrum"
    Params = _Params
    needs_calibration = False

    def merge(self, inputs: MergeInputs, params: _Params, progress: Progress) -> MergedAdapter:
        from iteris_daemon.plugins.lora_2025_math import iso_c_core, merge_cores

        return merge_cores(inputs, params, progress, iso_c_core)


class IsoCtsParams(_Params):
    common_space_fraction: float = Field(
        0.8, gt=0, le=1, description="fraction of the directions given to the common subspace (the paper's 0.8)"
    )


class IsoCts:
    """Iso-CTS (Marczak et al., ICML 2025).

    ``Delta_TA = U S V^T``; common subspace ``U_c = U[:, :k]``, ``V_c``, ``S_c``, with
    ``k = int(d f)`` then ``d - k`` rounded to a multiple of N; per task the top
    ``n = (d - k) / N`` singular triplets of ``D_i - U_c U_c^T D_i``; all concatenated,
    orthogonalised (polar factors) and given the mean singular value:
    ``Delta = alpha mean(S_kept) U_perp V_perp^T``. ``d`` = R, the summed ranks at most
    min(d_out, d_in) (the paper's min(d_out, d_in) for full-rank deltas; see above).
    """

    name = "iso_cts"
    description = "Iso-CTS (ICML 2025): isotropic merge of the common subspace plus task-specific directions"
    Params = IsoCtsParams
    needs_calibration = False

    def merge(self, inputs: MergeInputs, params: IsoCtsParams, progress: Progress) -> MergedAdapter:
        from iteris_daemon.plugins.lora_2025_math import iso_cts_core, merge_cores

        return merge_cores(inputs, params, progress, lambda layer: iso_cts_core(layer, params.common_space_fraction))


class KnotsParams(_Params):
    density: float = Field(
        1.0, gt=0, le=1, description="TIES' trim: fraction of each task's largest-magnitude aligned entries kept, "
        "per layer (the reference's topK; 1.0, no trim, is its Llama-3-8B LoRA setting)"
    )
    drop_rate: float = Field(
        0.0, ge=0, lt=1, description="KnOTS-DARE-TIES: drop each aligned entry with this probability and rescale "
        "by 1/(1-p) before TIES (0: KnOTS-TIES)"
    )
    seed: int = Field(0, **SEED_BOUNDS, description="random seed of the drop masks (fixed: merges are reproducible)")


class Knots:
    """KnOTS (Stoica et al., ICLR 2025).

    One SVD of the concatenated deltas ``[D_1 .. D_N] = U S [V_1^T .. V_N^T]`` puts every
    task in a shared basis ``U``; each task is ``U (S V_i^T)``. TIES (trim to ``density``,
    elect signs by the sum of values, disjoint mean) merges the aligned ``S V_i^T``,
    optionally after DARE's random drop; ``Delta = alpha U merged``. Computed from the LoRA
    factors without forming the d_out x N d_in concatenation
    (:func:`iteris_daemon.plugins.lora_2025_math.knots_components`). The reference code trims
    over all layers of a task at once; here each layer is trimmed on its own (as ``ties``
    and PEFT's TIES do), which is the same at the default ``density`` 1.0.
    """

    name = "knots"
    description = "KnOTS (ICLR 2025): TIES on the tasks' components in the shared SVD basis of their concatenated deltas"
    Params = KnotsParams
    needs_calibration = False

    def merge(self, inputs: MergeInputs, params: KnotsParams, progress: Progress) -> MergedAdapter:
        from iteris_daemon.plugins.lora_2025_math import knots_merge

        return knots_merge(inputs, params, progress)


class WudiParams(_Params):
    steps: int = Field(
        0, ge=0, le=100_000, description="0: the loss's exact minimiser (default); > 0: the reference code's way instead, "
        "that many Adam steps on each dense delta from the task-arithmetic sum (the reference's 300), best "
        "rank-target_rank factors of the result (default: the summed ranks), error reported"
    )
    lr: float = Field(1e-5, gt=0, description="steps > 0 only: Adam's learning rate (the reference's 1e-5)")

    @model_validator(mode="after")
    def _lr_read_by_the_steps(self):
        if "lr" in self.model_fields_set and not self.steps:
            raise ValueError("lr is read only with steps > 0 (the reference code's Adam steps)")
        return self


class Wudi:
    """WUDI merging (Cheng et al., ICML 2025).

    The rows of a task's delta span (approximately) the inputs the task's layer sees, so
    they stand in for calibration data: ``Delta = argmin_W sum_i ||(W - D_i) D_i^T||_F^2 /
    ||D_i||_F^2``, a RegMean-like solve with ``D_i``'s rows as the samples. The reference
    code approaches it with 300 Adam steps (lr 1e-5) from the task-arithmetic sum; here it is
    solved exactly in the core space, the minimum-norm solution, which is also the limit of
    gradient descent from that start (the start lies in the span the objective sees).
    ``steps`` > 0 takes the reference code's road instead: Adam on each dense delta, whose
    per-entry steps leave the factors' spans (so the result is written at a capped rank, its
    error reported) and which after a few hundred steps has not reached the minimiser.
    ``alpha`` scales the result (1.0: the paper uses no scaling coefficient).
    """

    name = "wudi"
    description = "WUDI merging (ICML 2025): least squares with the task deltas' rows standing in for inputs, exact"
    Params = WudiParams
    needs_calibration = False

    def merge(self, inputs: MergeInputs, params: WudiParams, progress: Progress) -> MergedAdapter:
        from iteris_daemon.plugins.lora_2025_math import merge_cores, wudi_adam_merge, wudi_core

        if params.steps:
            return wudi_adam_merge(inputs, params, progress)
        return merge_cores(inputs, params, progress, wudi_core)


@hookimpl
def register_strategies(register):
    register(CoreSpace())
    register(Tsv())
    register(IsoC())
    register(IsoCts())
    register(Knots())
    register(Wudi())
