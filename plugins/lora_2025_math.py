"""The linear algebra of the 2025 strategies declared in :mod:`iteris_daemon.plugins.lora_2025`
(imported by their ``merge()`` only: this module imports torch).

How they are computed (Core Space's construction, used by all four). Every ``D_i`` lies in
``span[B_1 .. B_N] x span[A_1^T .. A_N^T]``. Take orthonormal bases ``U`` (d_out x p) of the
first and ``V`` (d_in x q) of the second -- QR of the stacked factors, then an SVD of the
small triangular factor, which drops numerically dependent directions (singular values below
``RTOL`` times the largest), so p, q <= R = sum_i r_i -- and the cores

    M_i = U^T D_i V = (U^T B_i) s_i (A_i V)        (p x q)

so that ``D_i = U M_i V^T`` exactly. Each rule below is built from SVDs, polar factors
(``polar(X) = W Z^T`` for ``X = W S Z^T``), projections and sums, all of which commute with
the isometries ``U`` and ``V`` (the SVD of ``U M V^T`` is ``(U P) S (V Q)^T``,
``polar(U X) = U polar(X)``), so applying a rule to the cores and mapping back
``D = U M V^T`` gives exactly what the rule gives on the dense d_out x d_in deltas, at
O((d_out + d_in) R^2 + R^3) per layer; no d_out x d_in matrix is ever formed. The result is
written as ``B = U P S^1/2``, ``A = S^1/2 Q^T V^T`` (rank <= min(p, q)), or capped at
``target_rank`` (best rank-k, its relative error reported as ``truncation_error``; for the
flat spectra of Iso-C and Iso-CTS, the k directions the spectrum before flattening ranks first:
:class:`Isotropic`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from iteris_daemon.lora import LoraModule
from iteris_daemon.plugins.baselines_math import drop_generator, top_threshold
from iteris_daemon.lowrank import dense_to_lowrank
from iteris_daemon.plugins.lora_2025 import KnotsParams, WudiParams, _Params
from iteris_daemon.strategy import MergedAdapter, MergeInputs, Progress

RTOL = 1e-10
"""Singular values below ``RTOL`` x the largest count as zero (rank decisions, in float64)."""

FLAT_RTOL = 1e-6
"""An isotropic merge's non-zero singular values within ``FLAT_RTOL`` of each other are flat
(equal up to the rounding of its polar factors): :func:`_isotropic_factors`."""

INPUT_ULPS = 8
"""KnOTS' aligned entries below ``INPUT_ULPS`` float32 epsilons x the largest singular value
are the inputs' rounding, not a task's contribution (:func:`_round_off`)."""


# ---------------------------------------------------------------------------------------------
# Linear algebra on the cores (float64)


def _rank(S: torch.Tensor, scale: float | None = None) -> int:
    """Singular values above round-off: relative to ``scale`` (default: the largest of ``S``)."""
    top = float(S[0]) if S.numel() else 0.0
    scale = top if scale is None else scale
    if top <= 0 or scale <= 0:
        return 0
    return int((S > scale * RTOL).sum())


def _svd(M: torch.Tensor, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD without the zero singular values (zero relative to ``scale``, default the
    largest): P (p x k), S (k), Q (q x k)."""
    P, S, Qh = torch.linalg.svd(M, full_matrices=False)
    k = _rank(S, scale)
    return P[:, :k], S[:k], Qh[:k].T


def _basis(X: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the column span of ``X`` (d x R): QR, then an SVD of the small factor."""
    Q, R = torch.linalg.qr(X)
    P, S, _ = torch.linalg.svd(R, full_matrices=False)
    return Q @ P[:, : _rank(S)]


def _polar(X: torch.Tensor) -> torch.Tensor:
    """Orthonormal factor of ``X`` (p x K): ``W Z^T`` from ``X = W S Z^T`` (TSV's whitening).

    The nearest matrix with orthonormal columns when ``X`` has full column rank; otherwise
    the partial isometry on its non-zero singular directions.
    """
    W, S, Zh = torch.linalg.svd(X, full_matrices=False)
    k = _rank(S)
    return W[:, :k] @ Zh[:k]


@dataclass
class _Layer:
    U: torch.Tensor  # d_out x p, orthonormal basis of span[B_1 .. B_N]
    V: torch.Tensor  # d_in x q, orthonormal basis of span[A_1^T .. A_N^T]
    cores: list[torch.Tensor]  # M_i = U^T D_i V, p x q
    # The dimension the rules share out (the papers' min(d_out, d_in)): Core Space's core
    # size, the summed ranks R = sum_i r_i, at most min(d_out, d_in). Not min(p, q): a
    # repeated or zero adapter adds nothing to the span, yet takes its 1/N share.
    dim: int = 0

    def zeros(self) -> torch.Tensor:
        return torch.zeros(self.U.shape[1], self.V.shape[1], dtype=torch.float64)


def _unit(X: torch.Tensor) -> torch.Tensor:
    """``X`` (float64, CPU) scaled to norm 1 (a zero one as it is): the spans' bases are
    taken from factors of one size, so that the cutoff below which a direction counts as
    round-off is each factor's own, not the largest adapter's (a task 1e-10 the size of
    another kept its directions only in part)."""
    X = X.double().cpu()
    norm = float(X.norm())
    return X / norm if norm > 0 else X


def _layer(modules: list[LoraModule]) -> _Layer:
    U = _basis(torch.cat([_unit(m.B) for m in modules], dim=1))
    V = _basis(torch.cat([_unit(m.A) for m in modules], dim=0).T)
    cores = [((U.T @ m.B.double().cpu()) * m.scaling) @ (m.A.double().cpu() @ V) for m in modules]
    dim = min(sum(m.A.shape[0] for m in modules), U.shape[0], V.shape[0])
    return _Layer(U, V, cores, dim)


def _factors(layer: _Layer, M: torch.Tensor, rank: int | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B, A) with ``B @ A = U M V^T``, capped at ``rank``, and the cap's relative error."""
    P, S, Qh = torch.linalg.svd(M, full_matrices=False)
    keep = _rank(S)
    if keep == 0:  # an all-zero merge (every B or every A zero here: an untrained layer), as one zero direction
        return layer.U.new_zeros(layer.U.shape[0], 1), layer.V.new_zeros(1, layer.V.shape[0]), 0.0
    if rank is not None:
        keep = min(keep, rank)
    total = float(S.pow(2).sum())
    error = (float(S[keep:].pow(2).sum()) / total) ** 0.5 if keep < _rank(S) else 0.0
    root = S[:keep].sqrt()
    B = layer.U @ (P[:, :keep] * root)
    A = (root[:, None] * Qh[:keep]) @ layer.V.T
    return B, A, error


@dataclass
class Isotropic:
    """A merge whose non-zero singular values are all ``value`` (Iso-C, Iso-CTS): the core ``M``
    and ``before``, the core whose spectrum it flattened. Any k directions of a flat spectrum
    are a best rank-k of it, so a cap taken from an SVD of ``M`` kept whichever round-off put
    first (the merge changed by > 100 % with the adapters' order): ``target_rank`` keeps the k
    directions with the largest singular values of ``before``, at ``value``."""

    M: torch.Tensor
    before: torch.Tensor
    value: float


def _isotropic_factors(layer: _Layer, merge: Isotropic, alpha: float, rank: int | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B, A) of ``alpha`` times ``merge``, capped at ``rank``, and the cap's relative error
    against the uncapped merge. The kept directions keep the method's ``value`` (the papers'
    mean over the whole kept spectrum, not over the k written): so the capped merge is a
    truncation of the uncapped one, a best rank-k of it (error sqrt((r - k) / r) for r
    flat directions), and the cap does not rescale what it keeps. Where the spectrum is not
    flat after all (Iso-CTS's polar factors lose rank when the tasks' spans overlap whole),
    the best rank-k of ``M`` itself (review RV15: ``before``'s directions were not ``M``'s)."""
    B, A, _ = _factors(layer, alpha * merge.M, None)
    if rank is None or rank >= A.shape[0]:  # within the cap (or all zero: one zero direction)
        return B, A, 0.0
    spectrum = torch.linalg.svdvals(merge.M)
    spectrum = spectrum[:_rank(spectrum)]
    if float(spectrum[0] - spectrum[-1]) > FLAT_RTOL * float(spectrum[0]):
        return _factors(layer, alpha * merge.M, rank)
    P, S, Qh = torch.linalg.svd(merge.before, full_matrices=False)
    keep = min(rank, _rank(S))
    capped = merge.value * P[:, :keep] @ Qh[:keep]
    error = float((capped - merge.M).norm() / merge.M.norm())
    root = (alpha * merge.value) ** 0.5
    return layer.U @ (P[:, :keep] * root), (root * Qh[:keep]) @ layer.V.T, error


# ---------------------------------------------------------------------------------------------
# The merging rules, on the cores


def task_arithmetic_core(layer: _Layer) -> torch.Tensor:
    """sum_i M_i (Ilharco et al., 2023)."""
    return torch.stack(layer.cores).sum(0)


def iso_c_core(layer: _Layer) -> Isotropic:
    """Iso-C: the task-arithmetic sum with its spectrum made flat at the mean singular value.

    ``Delta_TA = sum_i D_i = P S Q^T``,  ``Delta_Iso-C = mean(S) P Q^T`` (mean over the
    non-zero singular values of Delta_TA, the only ones a LoRA sum has). A rank cap keeps
    Delta_TA's top directions (:class:`Isotropic`).
    """
    total = task_arithmetic_core(layer)
    P, S, Q = _svd(total)
    if S.numel() == 0:
        return Isotropic(layer.zeros(), total, 0.0)
    return Isotropic(S.mean() * P @ Q.T, total, float(S.mean()))


def _whitened_sum(Ps: list[torch.Tensor], Ss: list[torch.Tensor], Qs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate kept singular components and orthogonalise both sides (TSV's step)."""
    P, S, Q = torch.cat(Ps, dim=1), torch.cat(Ss), torch.cat(Qs, dim=1)
    return _polar(P), S, _polar(Q)


def tsv_core(layer: _Layer, keep: list[int]) -> torch.Tensor:
    """TSV-Merge: per task the top ``keep[i]`` singular triplets ``(u, s, v)`` of ``D_i``;
    ``U_cat = [U_1,k .. U_N,k]``, ``V_cat`` likewise, ``S_cat`` their singular values;
    ``U_perp = polar(U_cat)``, ``V_perp = polar(V_cat)``;  ``Delta = U_perp diag(S_cat) V_perp^T``.
    ``keep[i]`` is capped at task i's number of non-zero singular values."""
    Ps, Ss, Qs = [], [], []
    for M, k in zip(layer.cores, keep):
        P, S, Q = _svd(M)
        k = min(k, S.numel())
        Ps.append(P[:, :k]), Ss.append(S[:k]), Qs.append(Q[:, :k])
    if sum(s.numel() for s in Ss) == 0:
        return layer.zeros()
    U, S, V = _whitened_sum(Ps, Ss, Qs)
    return (U * S) @ V.T


def iso_cts_sizes(dim: int, tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """(k common directions, n directions per task), as in the Iso-CTS reference code:
    ``k = int(dim * f)``, then the remainder is rounded to a multiple of N."""
    common = int(dim * common_space_fraction)
    # Rounded up, the task share could pass ``dim`` when dim is a few LoRA ranks (7 = 0 + 2 * 4):
    # at most dim // N per task, so that k is never negative.
    per_task = min(round((dim - common) / tasks), dim // tasks)
    return dim - per_task * tasks, per_task


def iso_cts_core(layer: _Layer, common_space_fraction: float) -> Isotropic:
    """Iso-CTS: common subspace = top-k singular vectors of Delta_TA; each task adds the top n
    singular vectors of its delta with the common subspace projected out,
    ``D_i - U_c U_c^T D_i``; all vectors concatenated and orthogonalised (polar factors),
    every singular value set to the mean of the kept ones:
    ``Delta = mean(S) U_perp V_perp^T``. A rank cap keeps the top directions of
    ``U_perp diag(S) V_perp^T``, the merge before flattening (:class:`Isotropic`)."""
    k, n = iso_cts_sizes(layer.dim, len(layer.cores), common_space_fraction)
    P, S, Q = _svd(task_arithmetic_core(layer))
    k = min(k, S.numel())
    Pc, Sc, Qc = P[:, :k], S[:k], Q[:, :k]
    Ps, Ss, Qs = [], [], []
    for M in layer.cores:
        # Round-off is judged against the task's own delta: its residual may be round-off alone.
        Pi, Si, Qi = _svd(M - Pc @ (Pc.T @ M), scale=float(torch.linalg.matrix_norm(M, ord=2)))
        m = min(n, Si.numel())
        Ps.append(Pi[:, :m]), Ss.append(Si[:m]), Qs.append(Qi[:, :m])
    Ps.append(Pc), Ss.append(Sc), Qs.append(Qc)
    if sum(s.numel() for s in Ss) == 0:
        return Isotropic(layer.zeros(), layer.zeros(), 0.0)
    U, S, V = _whitened_sum(Ps, Ss, Qs)
    return Isotropic(S.mean() * U @ V.T, (U * S) @ V.T, float(S.mean()))


def core_space_core(
    layer: _Layer, method: Literal["ta", "tsv", "iso_c", "iso_cts"], common_space_fraction: float
) -> torch.Tensor | Isotropic:
    """Core Space's rule ``method`` on the cores; its TSV-Merge keeps ``int(R / N)``
    components per task (at least 1; ``R = _Layer.dim``)."""
    if method == "ta":
        return task_arithmetic_core(layer)
    if method == "iso_c":
        return iso_c_core(layer)
    if method == "iso_cts":
        return iso_cts_core(layer, common_space_fraction)
    return tsv_fraction_core(layer, None)


def tsv_fraction_core(layer: _Layer, fraction: float | None) -> torch.Tensor:
    """TSV-M keeping ``max(1, int(fraction * R))`` components per task (``R = _Layer.dim``;
    ``fraction`` 1/N by default, the paper's share of the matrix dimension), each capped at
    the task's rank."""
    if fraction is None:
        fraction = 1 / len(layer.cores)
    per_task = max(1, int(fraction * layer.dim + 1e-9))
    return tsv_core(layer, [per_task] * len(layer.cores))


def wudi_core(layer: _Layer) -> torch.Tensor:
    """WUDI: ``K = argmin sum_i c_i ||(K - M_i) M_i^T||^2``, ``c_i = 1 / ||M_i||_F^2``.

    In the core the objective is the dense one (``U`` and ``V`` are isometries, and the
    minimum-norm dense solution lies in their span). It is one least-squares problem
    ``K X = Y`` with ``X = [sqrt(c_i) M_i^T]_i`` and ``Y = [sqrt(c_i) M_i M_i^T]_i``, solved
    through the SVD of ``X`` (not the squared Gram matrix), minimum norm where ``X`` is
    rank-deficient. A zero delta adds a zero term, whatever its weight, and is left out."""
    tasks = [M for M in layer.cores if float(M.norm()) > 0]
    if not tasks:
        return layer.zeros()
    X = torch.cat([M.T / M.norm() for M in tasks], dim=1)
    Y = torch.cat([M @ M.T / M.norm() for M in tasks], dim=1)
    P, S, Q = _svd(X)
    return (Y @ Q) / S @ P.T


def wudi_adam(modules: list[LoraModule], steps: int, lr: float, device: str = "cpu") -> torch.Tensor:
    """The reference code's WUDI: ``steps`` Adam steps (betas and eps at torch's defaults)
    on the dense merged delta from the task-arithmetic sum, minimising ``sum_i ||(W - D_i)
    D_i^T||^2 / ||D_i||^2``. The gradient ``2 sum_i c_i (W - D_i) A_i^T (s_i^2 B_i^T B_i A_i)``
    is taken through the factors (d_out x d_in x r per task, not d_out x d_in x d_out), float32
    as the reference runs it. A zero delta's term is zero and is left out."""
    tasks = [(m.B.float().to(device) * m.scaling, m.A.float().to(device)) for m in modules]
    W = torch.nn.Parameter(sum(B @ A for B, A in tasks))
    terms = [(B, A, (B.T @ B) @ A / norm2) for B, A in tasks if (norm2 := float((B @ A).pow(2).sum())) > 0]
    if not terms:  # every delta zero here (a layer no loss reached): the loss is zero, the sum stays
        return W.detach()
    optimiser = torch.optim.Adam([W], lr=lr)
    for _ in range(steps):
        with torch.no_grad():
            W.grad = 2 * sum(((W - B @ A) @ A.T) @ BtBA for B, A, BtBA in terms)
        optimiser.step()
    return W.detach()


# ---------------------------------------------------------------------------------------------
# The merge


Owners = tuple[list[str], str]  # the names of the adapters a layer's modules belong to, and the layer's path


def _per_layer(inputs: MergeInputs, progress: Progress,
               write: Callable[[list[LoraModule], Owners], tuple[torch.Tensor, torch.Tensor, float]]) -> MergedAdapter:
    """Per layer, over the adapters that adapt it: ``write(modules, owners)`` gives the merged
    ``(B, A)`` and the relative error of its rank cap, reported as ``truncation_error``."""
    paths = sorted({p for a in inputs.adapters for p in a.modules})
    modules, errors = {}, {}
    for path in progress(paths, desc="layers", leave=False):
        present = [a for a in inputs.adapters if path in a.modules]
        B, A, error = write([a.modules[path] for a in present], ([a.name for a in present], path))
        modules[path] = (B, A)
        if error > 0:
            errors[path] = error
    metrics = {"truncation_error": {"max": max(errors.values(), default=0.0), "layers": len(errors)}}
    return MergedAdapter(modules, metrics)


def merge_layers(
    inputs: MergeInputs, params: _Params, progress: Progress,
    layer_merge: Callable[[list[LoraModule], Owners], tuple[_Layer, torch.Tensor | Isotropic]],
) -> MergedAdapter:
    """Per layer: ``layer_merge(modules, owners)`` gives the bases and the merged core ``M``
    (``Delta = U M V^T``); ``alpha`` times it is written as LoRA factors, capped at
    ``target_rank`` (the cap's relative errors reported)."""

    def write(modules: list[LoraModule], owners: Owners) -> tuple[torch.Tensor, torch.Tensor, float]:
        layer, M = layer_merge(modules, owners)
        if isinstance(M, Isotropic):
            return _isotropic_factors(layer, M, params.alpha, params.target_rank)
        return _factors(layer, params.alpha * M, params.target_rank)

    return _per_layer(inputs, progress, write)


def merge_cores(
    inputs: MergeInputs, params: _Params, progress: Progress, rule: Callable[[_Layer], torch.Tensor | Isotropic]
) -> MergedAdapter:
    """Per layer: ``alpha * rule(cores)`` mapped back to LoRA factors (:func:`merge_layers`)."""

    def core(modules: list[LoraModule], _owners: Owners) -> tuple[_Layer, torch.Tensor | Isotropic]:
        layer = _layer(modules)
        return layer, rule(layer)

    return merge_layers(inputs, params, progress, core)


def wudi_adam_merge(inputs: MergeInputs, params: WudiParams, progress: Progress) -> MergedAdapter:
    """Per layer :func:`wudi_adam`, times ``alpha``, written as its best rank-``target_rank``
    factors (default: the summed ranks), the relative errors reported."""

    def write(modules: list[LoraModule], _owners: Owners) -> tuple[torch.Tensor, torch.Tensor, float]:
        merged = params.alpha * wudi_adam(modules, params.steps, params.lr, inputs.device)
        B, A, error = dense_to_lowrank(merged, params.target_rank or sum(m.rank for m in modules))
        return B.cpu(), A.cpu(), error

    return _per_layer(inputs, progress, write)


# ---------------------------------------------------------------------------------------------
# KnOTS: TIES in the shared basis of the concatenated deltas


def knots_components(modules: list[LoraModule]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``U`` (d_out x k, orthonormal) and each task's aligned components ``S V_i^T``
    (k x d_in) of the thin SVD ``[D_1 .. D_N] = U S [V_1^T .. V_N^T]``, k its non-zero
    singular values.

    From the factors: ``D_i = U_B K_i A_i`` with ``U_B`` a basis of ``[B_1 .. B_N]`` and
    ``K_i = s_i U_B^T B_i``; ``A_i = R_i^T Q_i^T`` (QR of ``A_i^T``). Then
    ``[D_1 .. D_N] = U_B [K_1 R_1^T .. K_N R_N^T] blockdiag(Q_1^T .. Q_N^T)``, whose last
    factor has orthonormal rows, so the SVD of the small middle matrix ``P S Z^T`` gives
    ``U = U_B P`` and ``S V_i^T = S Z_i^T Q_i^T`` (``Z_i``: task i's rows of ``Z``).

    Entries at round-off are made exact zeros: TIES' disjoint mean counts the tasks with a
    non-zero entry, and the round-off of a task that has none there (a zero adapter, spans
    orthogonal to the others') would halve the entry of the task that does. Round-off is
    judged at the inputs' precision (:func:`_round_off`): spans made orthogonal and stored in
    float32 overlap by their rounding, ~1e-8 of the largest entry, and KnOTS of two such
    adapters was 27-36 % off their sum at the float64 computation's ``RTOL``."""
    U_B = _basis(torch.cat([_unit(m.B) for m in modules], dim=1))
    Qs, middle = [], []
    for m in modules:
        Q, R = torch.linalg.qr(m.A.double().cpu().T)
        Qs.append(Q)
        middle.append((U_B.T @ m.B.double().cpu()) * m.scaling @ R.T)
    P, S, Z = _svd(torch.cat(middle, dim=1))
    floor = _round_off(modules) * float(S[0]) if S.numel() else 0.0
    components, start = [], 0
    for Q in Qs:
        rows = Z[start : start + Q.shape[1]]
        start += Q.shape[1]
        C = (S[:, None] * rows.T) @ Q.T
        components.append(torch.where(C.abs() > floor, C, 0.0))
    return U_B @ P, components


def _round_off(modules: list[LoraModule]) -> float:
    """The relative size of the inputs' rounding in KnOTS' aligned entries: ``INPUT_ULPS``
    float32 epsilons (9.5e-7) unless every factor is float64 (``RTOL``, the computation's).
    Each entry is a sum of products of the factors, each known to half an ulp, so its
    rounding is a fraction of an epsilon of the largest singular value, amplified where two
    tasks' singular values nearly coincide (their directions mix by rounding / gap):
    0.02-1.5 epsilons on 40 random float32 pairs with orthogonal spans, 4.7 on QA's pair
    with singular values 0.1 % apart. Real entries can be as small (6 epsilons on the tests'
    tiny BERT adapters), and TIES counts a task at an entry or not, so the floor is kept
    near the rounding: below it a task is not told apart from its rounding. Narrower factors (bfloat16, float16) are judged as float32, the dtype
    loaded adapters come in (:func:`iteris_daemon.lora.load_adapter`): a floor at their own
    precision (~1e-2) would zero real entries."""
    if all(t.dtype == torch.float64 for m in modules for t in (m.A, m.B)):
        return RTOL
    return INPUT_ULPS * torch.finfo(torch.float32).eps


def knots_ties(components: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES on aligned components (as the KnOTS reference code does it): keep each task's
    ``density`` largest magnitudes, elect each entry's sign by the sum of the kept values
    (an entry whose sum is zero takes the layer's majority sign), and average the kept
    values that agree with it (the disjoint mean)."""
    trimmed = []
    for C in components:
        threshold = top_threshold(C.abs(), density)
        trimmed.append(torch.where(C.abs() >= threshold, C, 0.0))
    stacked = torch.stack(trimmed)
    sign = torch.sign(stacked.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    return (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)


def knots_merge(inputs: MergeInputs, params: KnotsParams, progress: Progress) -> MergedAdapter:
    """Per layer, over the adapters that adapt it: ``alpha U knots_ties(S V_i^T)``, with DARE's
    drop first when ``drop_rate`` > 0 (each task's ``k x d_in`` mask drawn by its
    :func:`drop_generator`, from the seed, its name and the layer), capped at ``target_rank``."""

    def aligned(modules: list[LoraModule], owners: Owners) -> tuple[_Layer, torch.Tensor]:
        U, components = knots_components(modules)
        if params.drop_rate > 0:
            names, path = owners
            components = [C * (torch.rand(C.shape, generator=drop_generator(params.seed, name, path), dtype=C.dtype)
                               >= params.drop_rate) / (1 - params.drop_rate) for C, name in zip(components, names)]
        merged = knots_ties(components, params.density)  # k x d_in (k = 0: every delta zero)
        # U merged = U M V^T with V from a QR of merged^T: the core merge_layers writes and caps.
        V, R = torch.linalg.qr(merged.T)
        return _Layer(U, V, []), R.T

    return merge_layers(inputs, params, progress, aligned)
