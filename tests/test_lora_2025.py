"""Core Space, TSV-M, Iso-C, Iso-CTS, KnOTS and WUDI (plugins/lora_2025.py) against dense references.

The references below are written independently of the plugin, in float64, on the full
d_out x d_in deltas, following the papers' equations (and their reference code) literally:
full SVDs of the dense deltas, concatenation, whitening by the SVD polar factor. The only
LoRA-specific choices, stated in the plugin's docstring, are made here the same way from
the dense matrices: "top k" is capped at a delta's numerical rank, and the papers'
min(d_out, d_in) (the dimension of a full-rank delta) is Core Space's core size, the summed
ranks, at most min(d_out, d_in) (``_core_dim``; the random problems' ranks are their deltas'
numerical ranks).
"""

import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from peft import PeftModel

from iteris_daemon.lora import LoraAdapter, LoraModule, load_adapter
from iteris_daemon.merge import AdapterSpec, MergeRequest, run_merge
from iteris_daemon.plugin_manager import get_strategy
from iteris_daemon.strategy import MergeInputs, parse_params


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---------------------------------------------------------------------------------------------
# Dense references (float64, full matrices)


def _rank(M: torch.Tensor) -> int:
    return int(torch.linalg.matrix_rank(M))


def _core_dim(deltas: list[torch.Tensor]) -> int:
    return min(sum(_rank(D) for D in deltas), *deltas[0].shape)


def _orthogonalise(X: torch.Tensor) -> torch.Tensor:
    """u, s, v = svd(X); return u @ v (TSV / Iso-CTS reference code)."""
    u, _, v = torch.linalg.svd(X, full_matrices=False)
    return u @ v


def reference_task_arithmetic(deltas, alpha=1.0):
    return alpha * sum(deltas)


def reference_iso_c(deltas, alpha=1.0):
    U, S, Vh = torch.linalg.svd(sum(deltas), full_matrices=False)
    r = _rank(sum(deltas))
    return alpha * S[:r].mean() * U[:, :r] @ Vh[:r]


def reference_tsv(deltas, keep, alpha=1.0):
    """TSV-M: top keep[i] singular components of each task, concatenated, whitened."""
    us, ss, vs = [], [], []
    for D, k in zip(deltas, keep):
        u, s, v = torch.linalg.svd(D, full_matrices=False)
        k = min(k, _rank(D))
        us.append(u[:, :k]), ss.append(s[:k]), vs.append(v[:k, :])
    sum_u, sum_s, sum_v = torch.cat(us, dim=1), torch.cat(ss), torch.cat(vs, dim=0)
    return alpha * torch.linalg.multi_dot((_orthogonalise(sum_u), torch.diag(sum_s), _orthogonalise(sum_v)))


def reference_iso_cts(deltas, common_space_fraction=0.8, alpha=1.0):
    u, s, v = _iso_cts_whitened(deltas, common_space_fraction)
    iso = torch.ones_like(s) * s.mean()
    return alpha * torch.linalg.multi_dot((u, torch.diag(iso), v))


def _iso_cts_whitened(deltas, common_space_fraction):
    """Iso-CTS before the flattening: the orthogonalised common and task-specific singular
    vectors and their singular values."""
    N, d = len(deltas), _core_dim(deltas)
    common = int(d * common_space_fraction)
    per_task = min(round((d - common) / N), d // N)  # the reference code's rounding, never past d
    common = d - per_task * N
    combined = sum(deltas)
    u, s, v = torch.linalg.svd(combined, full_matrices=False)
    common = min(common, _rank(combined))
    u_c, s_c, v_c = u[:, :common], s[:common], v[:common, :]
    us, ss, vs = [], [], []
    for D in deltas:
        w_ts = D - u_c @ u_c.T @ D
        u_ts, s_ts, v_ts = torch.linalg.svd(w_ts, full_matrices=False)
        # The residual's rank relative to D: a delta inside the common space leaves round-off only.
        k = min(per_task, int(torch.linalg.matrix_rank(w_ts, atol=1e-10 * float(torch.linalg.matrix_norm(D, 2)), rtol=0)))
        us.append(u_ts[:, :k]), ss.append(s_ts[:k]), vs.append(v_ts[:k, :])
    sum_u = torch.cat([*us, u_c], dim=1)
    sum_s = torch.cat([*ss, s_c])
    sum_v = torch.cat([*vs, v_c], dim=0)
    return _orthogonalise(sum_u), sum_s, _orthogonalise(sum_v)


def reference_capped_isotropic(deltas, method, rank, alpha=1.0, common_space_fraction=0.8):
    """Iso-C / Iso-CTS capped at ``rank``: the top ``rank`` singular directions of the merge
    before its spectrum is flattened (Delta_TA for Iso-C; ``U_perp diag(S) V_perp^T`` for
    Iso-CTS), each at the uncapped merge's isotropic value (the mean of Delta_TA's non-zero
    singular values; of all of Iso-CTS' kept S)."""
    if method == "iso_c":
        before = sum(deltas)
        value = torch.linalg.svdvals(before)[:_rank(before)].mean()
    else:
        u, s, v = _iso_cts_whitened(deltas, common_space_fraction)
        before, value = torch.linalg.multi_dot((u, torch.diag(s), v)), s.mean()
    U, _, Vh = torch.linalg.svd(before, full_matrices=False)
    return alpha * value * U[:, :rank] @ Vh[:rank]


def reference_tsv_m(deltas, fraction=None, alpha=1.0):
    """TSV-M's share: ``fraction`` (1/N) of the matrix dimension per task, the core's (see
    ``_core_dim``) for LoRA deltas; reference_tsv caps it at each task's rank."""
    fraction = 1 / len(deltas) if fraction is None else fraction
    per_task = max(1, int(fraction * _core_dim(deltas) + 1e-9))
    return reference_tsv(deltas, [per_task] * len(deltas), alpha)


def reference_core_space(deltas, method="tsv", alpha=1.0, common_space_fraction=0.8):
    """Core Space is lossless: the rule applied in the core equals the rule on the dense
    deltas, with the core's 1/N share of components for TSV."""
    if method == "ta":
        return reference_task_arithmetic(deltas, alpha)
    if method == "iso_c":
        return reference_iso_c(deltas, alpha)
    if method == "iso_cts":
        return reference_iso_cts(deltas, common_space_fraction, alpha)
    per_task = max(1, _core_dim(deltas) // len(deltas))
    return reference_tsv(deltas, [per_task] * len(deltas), alpha)


def reference_knots(deltas, density=1.0, alpha=1.0, drops=None, round_off=0.0):
    """KnOTS-TIES (Stoica et al., ICLR 2025): SVD of the concatenated deltas
    ``[D_1 .. D_N] = U S [V_1^T .. V_N^T]`` (non-zero singular values), tasks ``S V_i^T``
    (entries at most ``round_off`` x the largest singular value zero: the inputs' rounding);
    ``drops`` (DARE, optional): each task's keep mask and the drop rate; TIES: each task's
    ``round(density * size)`` largest magnitudes (the paper's top-k%; the reference code's
    ``kthvalue`` keeps one more), signs elected by the sum of values, disjoint mean;
    ``alpha U merged``."""
    d_in = deltas[0].shape[1]
    U, S, Vh = torch.linalg.svd(torch.cat(deltas, dim=1), full_matrices=False)
    k = int((S > 1e-10 * S[0]).sum())
    U, S, Vh = U[:, :k], S[:k], Vh[:k]
    tasks = [S[:, None] * Vh[:, i * d_in:(i + 1) * d_in] for i in range(len(deltas))]
    tasks = [torch.where(T.abs() > round_off * S[0], T, 0.0) for T in tasks]
    if drops is not None:
        masks, rate = drops
        tasks = [T * m / (1 - rate) for T, m in zip(tasks, masks)]
    kept = []
    for T in tasks:
        n = T.numel()
        keep = max(1, round(density * n))
        mask = torch.ones_like(T, dtype=torch.bool)
        if keep < n:
            smallest = torch.sort(T.abs().flatten()).values[n - keep]  # the smallest magnitude kept
            mask = T.abs() >= smallest
        kept.append(T * mask)
    stacked = torch.stack(kept)
    elected = torch.sign(stacked.sum(0))
    elected[elected == 0] = torch.sign(elected.sum())
    agree = (torch.sign(stacked) == elected) & (stacked != 0)
    merged = (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)
    return alpha * U @ merged


def wudi_objective(W, deltas):
    """WUDI's merging loss (Cheng et al., ICML 2025): sum_i ||(W - D_i) D_i^T||_F^2 / ||D_i||_F^2."""
    return sum(((W - D) @ D.T).pow(2).sum() / D.pow(2).sum() for D in deltas)


def reference_wudi(deltas, alpha=1.0):
    """The loss's minimum-norm minimiser from ``torch.linalg.lstsq`` on the dense, stacked
    system ``[D_i / ||D_i||] W^T = [D_i D_i^T / ||D_i||]^T`` (gelsd: minimum norm)."""
    lhs = torch.cat([D / D.norm() for D in deltas], dim=0)
    rhs = torch.cat([D @ D.T / D.norm() for D in deltas], dim=1).T
    return alpha * torch.linalg.lstsq(lhs, rhs, rcond=1e-10, driver="gelsd").solution.T


# ---------------------------------------------------------------------------------------------
# Random LoRA problems

# (d_out, d_in, adapters that adapt the module): d_out != d_in; one module only some adapters
# touch; one whose summed rank (14) exceeds d_out, so the span is all of R^d_out; one where
# it exceeds d_in, so the tasks' input spans overlap (there WUDI's weights matter).
MODULES = {"wide": (24, 20, (0, 1, 2, 3)), "partial": (16, 30, (0, 2, 3)), "narrow": (9, 28, (0, 1, 2, 3)),
           "short": (12, 8, (0, 1, 2, 3))}
RANKS = (2, 3, 4, 5)


def _adapters(seed: int) -> list[LoraAdapter]:
    g = torch.Generator().manual_seed(seed)
    adapters = []
    for i, r in enumerate(RANKS):
        modules = {}
        for path, (d_out, d_in, users) in MODULES.items():
            if i in users:
                modules[path] = LoraModule(
                    A=torch.randn(r, d_in, generator=g, dtype=torch.float64) / d_in**0.5,
                    B=torch.randn(d_out, r, generator=g, dtype=torch.float64) * (0.5 + i),  # tasks differ in size
                    scaling=[2.0, 0.5, 16 / r**0.5, 1.0][i],
                )
        adapters.append(LoraAdapter(name=f"t{i}", path=Path(f"t{i}"), config={}, modules=modules))
    return adapters


def _merge(strategy: str, adapters, **raw):
    chosen = get_strategy(strategy)
    params = parse_params(chosen, raw)
    inputs = MergeInputs(base=None, adapters=adapters, calibration=[None] * len(adapters))
    return chosen.merge(inputs, params, lambda items, **_: items)


def _deltas(adapters, path):
    return [a.modules[path].delta() for a in adapters if path in a.modules]


CASES = [
    ("core_space", {}, lambda D: reference_core_space(D, "tsv")),
    ("core_space", {"method": "ta", "alpha": 0.7}, lambda D: reference_core_space(D, "ta", 0.7)),
    ("core_space", {"method": "tsv", "alpha": 0.5}, lambda D: reference_core_space(D, "tsv", 0.5)),
    ("core_space", {"method": "iso_c"}, lambda D: reference_core_space(D, "iso_c")),
    ("core_space", {"method": "iso_cts", "common_space_fraction": 0.6},
     lambda D: reference_core_space(D, "iso_cts", common_space_fraction=0.6)),
    ("tsv", {}, lambda D: reference_tsv_m(D)),
    ("tsv", {"fraction": 0.5, "alpha": 1.3}, lambda D: reference_tsv_m(D, 0.5, 1.3)),
    ("tsv", {"fraction": 1.0}, lambda D: reference_tsv_m(D, 1.0)),
    ("tsv", {"fraction": 0.15}, lambda D: reference_tsv_m(D, 0.15)),  # 2 per task on "wide": truncates ranks 3-5
    ("iso_c", {}, lambda D: reference_iso_c(D)),
    ("iso_c", {"alpha": 1.5}, lambda D: reference_iso_c(D, 1.5)),
    ("iso_cts", {}, lambda D: reference_iso_cts(D)),
    ("iso_cts", {"common_space_fraction": 0.5, "alpha": 0.8}, lambda D: reference_iso_cts(D, 0.5, 0.8)),
    ("knots", {}, lambda D: reference_knots(D)),
    ("knots", {"density": 0.2, "alpha": 0.6}, lambda D: reference_knots(D, 0.2, 0.6)),  # the ViT-B config's
    ("knots", {"density": 0.5}, lambda D: reference_knots(D, 0.5)),
    ("wudi", {}, lambda D: reference_wudi(D)),
    ("wudi", {"alpha": 0.8}, lambda D: reference_wudi(D, 0.8)),
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("strategy, raw, reference", CASES, ids=[f"{s}-{i}" for i, (s, _, _) in enumerate(CASES)])
def test_matches_dense_reference(strategy, raw, reference, seed):
    adapters = _adapters(seed)
    result = _merge(strategy, adapters, **raw)
    assert set(result.modules) == set(MODULES)
    assert result.metrics["truncation_error"]["max"] == 0.0
    for path, (B, A) in result.modules.items():
        expected = reference(_deltas(adapters, path))
        assert _relative(B @ A, expected) < 1e-8, path
        d_out, d_in, users = MODULES[path]
        assert B.shape[0] == d_out and A.shape[1] == d_in
        assert A.shape[0] <= min(sum(RANKS[i] for i in users), d_out, d_in)


def test_reference_sizes_are_the_interesting_ones():
    """The problems exercise what they are meant to: TSV's per-task counts differ from the
    ranks and are capped (core_space keeps 14 // 4 = 3 > rank 2 of the first task), Iso-CTS
    has task-specific directions, and one span is all of R^d_out (summed rank 14 > 9)."""
    adapters = _adapters(0)
    wide = _deltas(adapters, "wide")
    assert [_rank(D) for D in wide] == list(RANKS) and _core_dim(wide) == 14
    assert _core_dim(wide) // 4 == 3 > _rank(wide[0])  # TSV's 1/N share, capped for task 0
    assert int(0.5 * _core_dim(wide)) == 7 > max(RANKS)  # tsv with fraction 0.5 keeps every component
    common = int(14 * 0.8)
    assert 14 - round((14 - common) / 4) * 4 == 10  # Iso-CTS: 10 common + 1 per task
    narrow = _deltas(adapters, "narrow")
    assert _core_dim(narrow) == 9 == narrow[0].shape[0] < sum(RANKS)
    assert len(_deltas(adapters, "partial")) == 3


@pytest.mark.parametrize("seed", [0, 1])
def test_tsv_at_its_defaults_is_core_spaces_tsv_merge(seed):
    """Both follow the paper's 1/N of the matrix dimension. Before the fix ``tsv`` kept 1/N
    of each task's rank (one component of eight at N = 8), far fewer than the paper."""
    adapters = _adapters(seed)
    tsv, core = _merge("tsv", adapters).modules, _merge("core_space", adapters).modules
    assert tsv.keys() == core.keys()
    for path in tsv:
        assert _relative(tsv[path][0] @ tsv[path][1], core[path][0] @ core[path][1]) < 1e-12, path


def test_the_rules_are_not_task_arithmetic():
    """Guard against a reference and a strategy that agree because both do nothing."""
    adapters = _adapters(0)
    deltas = _deltas(adapters, "wide")
    ta = reference_task_arithmetic(deltas)
    for reference in (reference_iso_c, reference_tsv_m, reference_iso_cts, reference_core_space, reference_knots,
                      lambda D: reference_knots(D, 0.2), reference_wudi):
        assert _relative(reference(deltas), ta) > 0.05, reference.__name__
    S = torch.linalg.svdvals(reference_iso_c(deltas))[:14]
    assert float(S.max() - S.min()) < 1e-9 * float(S.max())  # isotropic


@pytest.mark.parametrize("strategy", ["core_space", "tsv", "iso_c", "iso_cts", "knots", "wudi"])
def test_single_adapter(strategy):
    """One adapter: TSV keeps all of it (fraction 1/1) and returns it, as KnOTS does (no
    trim at its default density: every sign agrees with itself) and WUDI (no interference
    to remove); Iso-C returns its singular vectors with a flat spectrum."""
    adapter = _adapters(3)[0]
    result = _merge(strategy, [adapter])
    for path, (B, A) in result.modules.items():
        D = adapter.modules[path].delta()
        expected = reference_iso_c([D]) if strategy.startswith("iso") else D
        assert _relative(B @ A, expected) < 1e-9, path


@pytest.mark.parametrize("strategy, raw", [("core_space", {"method": "ta"}), ("knots", {"density": 0.5})])
def test_target_rank_caps_and_reports_the_error(strategy, raw):
    adapters = _adapters(2)
    exact = _merge(strategy, adapters, **raw)
    capped = _merge(strategy, adapters, target_rank=3, **raw)
    errors = []
    for path, (B, A) in capped.modules.items():
        assert A.shape[0] == 3
        D = exact.modules[path][0] @ exact.modules[path][1]
        S = torch.linalg.svdvals(D)
        best = float(S[3:].pow(2).sum().sqrt() / S.pow(2).sum().sqrt())  # Eckart-Young
        assert abs(_relative(B @ A, D) - best) < 1e-10
        errors.append(best)
    assert abs(capped.metrics["truncation_error"]["max"] - max(errors)) < 1e-10
    assert capped.metrics["truncation_error"]["layers"] == len(MODULES)


@pytest.mark.parametrize("strategy, raw", [("iso_c", {}), ("iso_cts", {}), ("core_space", {"method": "iso_c"}),
                                           ("core_space", {"method": "iso_cts", "common_space_fraction": 0.6})])
@pytest.mark.parametrize("seed", [0, 1])
def test_isotropic_target_rank_keeps_the_top_directions_in_any_adapter_order(strategy, raw, seed):
    """Iso-C and Iso-CTS flatten the spectrum, so every k of its directions is a best rank-k:
    the cap took those an SVD of the flat matrix happened to put first, and the merge changed
    by more than 100 % with the adapters' order (QA). Now the cap keeps the k directions with
    the largest singular values before the flattening (Delta_TA's; Iso-CTS' whitened sum), at
    the uncapped value, in either order, as the dense reference does; the error reported is
    that of what is written against the uncapped merge."""
    adapters = _adapters(seed)
    method = raw.get("method", strategy)
    fraction = raw.get("common_space_fraction", 0.8)
    params = {"target_rank": 3, "alpha": 0.7, **raw}
    forward, backward = _merge(strategy, adapters, **params), _merge(strategy, adapters[::-1], **params)
    errors = []
    for path in sorted(MODULES):
        deltas = _deltas(adapters, path)
        expected = reference_capped_isotropic(deltas, method, 3, 0.7, fraction)
        for result in (forward, backward):
            B, A = result.modules[path]
            assert A.shape[0] == 3 and _relative(B @ A, expected) < 1e-9, path
        errors.append(_relative(expected, reference_core_space(deltas, method, 0.7, fraction)))
    for result in (forward, backward):
        assert abs(result.metrics["truncation_error"]["max"] - max(errors)) < 1e-9


@pytest.mark.parametrize("fraction, rank", [(0.1, 2), (0.1, 4), (0.3, 2), (0.3, 4)])
def test_iso_cts_target_rank_on_spans_that_overlap_whole_is_the_best_rank_k(fraction, rank):
    """Tasks whose spans all lie in one 6-dimensional pair: Iso-CTS's polar factors lose rank
    and its merge is not flat (548, 491, ..., 0.29), so the top directions of the spectrum
    before flattening were not the merge's, and the cap wrote twice the error of the best
    rank-k (review RV15). Where the merge is not flat, the cap is its best rank-k (the dense
    reference's truncated SVD), with that error reported."""
    g = torch.Generator().manual_seed(1)
    shared_B, shared_A = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((100, 6), (6, 100)))
    adapters = [LoraAdapter(name=f"t{i}", path=Path(f"t{i}"), config={}, modules={"layer": LoraModule(
        B=shared_B @ torch.randn(6, 4, generator=g, dtype=torch.float64),
        A=torch.randn(4, 6, generator=g, dtype=torch.float64) @ shared_A, scaling=1.0)}) for i in range(3)]
    whole = _merge("iso_cts", adapters, common_space_fraction=fraction).modules["layer"]
    uncapped = whole[0] @ whole[1]
    P, S, Qh = torch.linalg.svd(uncapped)
    assert float(S[0] - S[_rank(uncapped) - 1]) > 1e-3 * float(S[0])  # not flat: the case at hand
    best = (P[:, :rank] * S[:rank]) @ Qh[:rank]
    capped = _merge("iso_cts", adapters, common_space_fraction=fraction, target_rank=rank)
    B, A = capped.modules["layer"]
    assert _relative(B @ A, best) < 1e-9
    assert abs(capped.metrics["truncation_error"]["max"] - _relative(best, uncapped)) < 1e-9


@pytest.mark.parametrize("factor", ["B", "A"])
def test_zero_adapters_give_a_zero_merge(factor):
    """Every adapter zero at a layer (B = 0 is PEFT's initialisation: an untrained layer):
    one zero direction, not rank 0, which neither PEFT nor the loader accepts (found in review)."""
    adapters = _adapters(0)
    for adapter in adapters:
        for module in adapter.modules.values():
            setattr(module, factor, torch.zeros_like(getattr(module, factor)))
    for strategy in ("core_space", "tsv", "iso_c", "iso_cts", "knots", "wudi"):
        for path, (B, A) in _merge(strategy, adapters).modules.items():
            assert B.shape == (MODULES[path][0], 1) and A.shape == (1, MODULES[path][1]), (strategy, path)
            assert torch.isfinite(B).all() and torch.isfinite(A).all() and float((B @ A).abs().max()) == 0.0


@pytest.mark.parametrize("dim, tasks, fraction", [(7, 4, 0.1), (3, 4, 0.2), (5, 3, 0.1), (14, 4, 0.8), (2, 2, 0.0)])
def test_iso_cts_sizes_never_pass_the_dimension(dim, tasks, fraction):
    """The reference code's rounding of the task share could make k negative on a core of a
    few LoRA ranks (7, 4 tasks, f = 0.1: k = -1, which sliced all but one column; found in review)."""
    from plugins.lora_2025_math import iso_cts_sizes

    common, per_task = iso_cts_sizes(dim, tasks, fraction)
    assert common >= 0 and per_task >= 0 and common + per_task * tasks == dim
    assert per_task == min(round((dim - int(dim * fraction)) / tasks), dim // tasks)


def test_iso_cts_ignores_a_residual_that_is_round_off():
    """A task whose delta lies inside the common space leaves a residual of round-off; its
    rank is judged against the task's delta, so it adds no direction (the polar factor made
    full directions of it; found in review). Two tasks on orthogonal spans, f = 0.5: the
    common space is task 0's two directions, task 1 adds its top one."""
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    modules = [LoraModule(B=U[:, 0:2] * torch.tensor([10.0, 8.0], dtype=torch.float64), A=V[:, 0:2].T.clone(), scaling=1.0),
               LoraModule(B=U[:, 2:4] * torch.tensor([1.0, 0.5], dtype=torch.float64), A=V[:, 2:4].T.clone(), scaling=1.0)]
    adapters = [LoraAdapter(name=f"t{i}", path=Path(f"t{i}"), config={}, modules={"L": m}) for i, m in enumerate(modules)]
    expected = (10 + 8 + 1) / 3 * (U[:, [0, 1, 2]] @ V[:, [0, 1, 2]].T)
    assert _relative(reference_iso_cts([m.delta() for m in modules], 0.5), expected) < 1e-10
    for strategy, raw in (("iso_cts", {}), ("core_space", {"method": "iso_cts"})):
        B, A = _merge(strategy, adapters, common_space_fraction=0.5, **raw).modules["L"]
        assert A.shape[0] == 3 and _relative(B @ A, expected) < 1e-10, strategy


@pytest.mark.parametrize("seed", [0, 1])
def test_knots_dare_matches_the_reference_with_the_same_masks(seed):
    """KnOTS-DARE-TIES: each task's ``k x d_in`` drop mask is drawn by its own generator, seeded
    from the seed, the task's name and the layer (``drop_generator``); the reference draws the
    same masks and applies the paper's steps to the dense deltas. A drop rate of 0 is KnOTS-TIES."""
    from iteris_daemon.plugins.baselines_math import drop_generator

    adapters = _adapters(seed)
    rate = 0.8  # the Llama-3-8B KnOTS-DARE-TIES config's
    result = _merge("knots", adapters, drop_rate=rate, seed=7)
    for path in sorted(MODULES):
        deltas = _deltas(adapters, path)
        k = int(torch.linalg.matrix_rank(torch.cat(deltas, dim=1)))
        masks = [torch.rand(k, deltas[0].shape[1], generator=drop_generator(7, a.name, path), dtype=torch.float64)
                 >= rate for a in adapters if path in a.modules]
        B, A = result.modules[path]
        expected = reference_knots(deltas, drops=(masks, rate))
        assert _relative(B @ A, expected) < 1e-8, path
        assert _relative(expected, reference_knots(deltas)) > 0.05, path  # the drop did something
    undropped = _merge("knots", adapters, drop_rate=0.0, seed=7)
    for path, (B, A) in undropped.modules.items():
        assert _relative(B @ A, reference_knots(_deltas(adapters, path))) < 1e-8, path


def test_knots_takes_every_seed_torch_takes_and_refuses_the_rest_naming_it():
    """2**64 passed validation, then failed inside torch after the base model loaded, naming
    no parameter ("Overflow when unpacking long long")."""
    from iteris_daemon.errors import ParameterError

    adapters = _adapters(3)
    for seed in (-(2**63), 2**64 - 1):
        assert _merge("knots", adapters, drop_rate=0.5, seed=seed).modules
    for seed in (-(2**63) - 1, 2**64):
        with pytest.raises(ParameterError, match="seed: Input should be"):
            parse_params(get_strategy("knots"), {"seed": seed})


def test_knots_of_equal_tasks_is_the_task():
    """N copies of one delta: every component agrees, the disjoint mean is the delta itself
    (task arithmetic would give N times it)."""
    adapter = _adapters(4)[1]
    copies = [LoraAdapter(name=f"c{i}", path=Path(f"c{i}"), config={}, modules=adapter.modules) for i in range(3)]
    for path, (B, A) in _merge("knots", copies).modules.items():
        assert _relative(B @ A, adapter.modules[path].delta()) < 1e-9, path


@pytest.mark.parametrize("strategy, raw", [("tsv", {}), ("core_space", {}), ("core_space", {"method": "iso_cts"})])
def test_copies_of_one_adapter_merge_to_it_under_tsv(strategy, raw):
    """TSV-M of N copies of D: polar([U .. U]) diag([S .. S]) polar([V .. V])^T = U S V^T = D,
    when each copy keeps its whole rank. The share was 1/N of the span, which copies do not
    grow: three rank-5 copies kept one component each (rank 1, most of D lost). Iso-CTS of
    copies is their Iso-C (the common space holds all of them)."""
    adapter = _adapters(5)[3]  # rank 5
    copies = [LoraAdapter(name=f"c{i}", path=Path(f"c{i}"), config={}, modules=adapter.modules) for i in range(3)]
    for path, (B, A) in _merge(strategy, copies, **raw).modules.items():
        D = adapter.modules[path].delta()
        expected = reference_iso_c([D, D, D]) if raw else D
        keep = min(3 * 5, *D.shape) // 3  # "narrow" (d_out 9) and "short" (d_in 8) < 3 x 5: D's top 3 or 2
        if keep < 5 and not raw:
            U, S, Vh = torch.linalg.svd(D, full_matrices=False)
            expected = U[:, :keep] @ torch.diag(S[:keep]) @ Vh[:keep]
        assert _relative(B @ A, expected) < 1e-9, path


@pytest.mark.parametrize("seed", [0, 1])
def test_wudi_minimises_its_loss(seed):
    """Checked on the loss itself, apart from lstsq: its gradient (autograd, dense) vanishes
    at the merge, which beats task arithmetic and every small random step away from it."""
    adapters = _adapters(seed)
    g = torch.Generator().manual_seed(seed)
    for path, (B, A) in _merge("wudi", adapters).modules.items():
        deltas = _deltas(adapters, path)
        W = (B @ A).requires_grad_(True)
        loss = wudi_objective(W, deltas)
        (grad,) = torch.autograd.grad(loss, W)
        scale = max(float(wudi_objective(torch.zeros_like(W), deltas)), 1e-300) / float(W.norm())
        assert float(grad.norm()) < 1e-8 * scale, path
        assert float(loss) < float(wudi_objective(sum(deltas), deltas)), path
        for _ in range(5):
            step = torch.randn(W.shape, generator=g, dtype=W.dtype) * 1e-3 * float(W.norm()) / W.numel() ** 0.5
            assert float(wudi_objective(W.detach() + step, deltas)) > float(loss), path


def test_wudi_is_where_gradient_descent_from_task_arithmetic_ends():
    """The docstring's claim: the loss is quadratic with Hessian ``2 G``, ``G = sum_i D_i^T
    D_i / ||D_i||^2``, so gradient descent from the reference code's start (the sum) ends at
    the minimum-norm minimiser plus the start's part in G's null space; that part is zero."""
    adapters = _adapters(4)
    merged = _merge("wudi", adapters).modules
    for path in MODULES:
        deltas = _deltas(adapters, path)
        G = sum(D.T @ D / D.pow(2).sum() for D in deltas)
        P = G @ torch.linalg.pinv(G, hermitian=True, rtol=1e-10)  # projector onto G's range
        start = sum(deltas)
        assert float((start - start @ P).norm()) < 1e-10 * float(start.norm()), path
        W = merged[path][0] @ merged[path][1]
        assert float((W - W @ P).norm()) < 1e-10 * float(W.norm()), path  # and the merge has no such part


def reference_wudi_adam(deltas, steps, lr):
    """The reference code's loop, literally: a parameter started at the sum of the task
    vectors, Adam (lr, no weight decay) on sum(square((m - tau_i) tau_i^T) / ||tau_i||^2)
    through autograd; here in float64 on the dense deltas."""
    vectors = torch.stack(deltas)
    merging = torch.nn.Parameter(vectors.sum(0))
    optimiser = torch.optim.Adam([merging], lr=lr, weight_decay=0)
    norms = vectors.reshape(len(deltas), -1).norm(dim=-1).square()
    for _ in range(steps):
        inner = (merging.unsqueeze(0) - vectors) @ vectors.transpose(1, 2)
        loss = (inner.square() / norms[:, None, None]).sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return merging.detach()


def test_wudi_steps_follow_the_reference_codes_adam():
    """``steps`` > 0: the reference's Adam loop (float32 here, float64 in the reference), at a
    learning rate large enough on these problems to move far from the sum; written at full
    rank (``target_rank`` = min(d_out, d_in)) to compare the optimiser alone."""
    adapters = _adapters(6)
    for path, (d_out, d_in, _) in MODULES.items():
        result = _merge("wudi", adapters, steps=40, lr=5e-2, target_rank=min(d_out, d_in)).modules[path]
        deltas = _deltas(adapters, path)
        expected = reference_wudi_adam(deltas, 40, 5e-2)
        assert _relative(expected, sum(deltas)) > 0.05, path  # the steps moved it
        assert _relative(result[0] @ result[1], expected) < 1e-4, path


def test_wudi_steps_write_the_capped_rank_and_report_its_error():
    """Adam's per-entry steps leave the factors' spans: the result is full-rank, written at
    the summed ranks by default with the cap's error reported."""
    adapters = _adapters(6)
    result = _merge("wudi", adapters, steps=20, lr=1e-2)
    errors = []
    for path, (B, A) in result.modules.items():
        d_out, d_in, users = MODULES[path]
        dense = reference_wudi_adam(_deltas(adapters, path), 20, 1e-2)
        S = torch.linalg.svdvals(dense)
        rank = min(sum(RANKS[i] for i in users), d_out, d_in)
        assert A.shape[0] == rank and _rank(dense) == min(d_out, d_in), path
        best = float(S[rank:].pow(2).sum().sqrt() / S.pow(2).sum().sqrt())  # Eckart-Young
        assert abs(_relative(B @ A, dense) - best) < 1e-4, path
        errors.append(best)
    assert abs(result.metrics["truncation_error"]["max"] - max(errors)) < 1e-4 and max(errors) > 0


@pytest.mark.parametrize("strategy, reference", [("tsv", reference_tsv_m), ("core_space", reference_core_space),
                                                 ("wudi", reference_wudi)])
def test_a_task_far_smaller_than_another_keeps_its_directions(strategy, reference):
    """The factors' spans are taken per factor, not against the largest one: a task 1e-10 the
    size of another lost directions below the cutoff (QA RV7)."""
    adapters = _adapters(7)
    for path, module in adapters[0].modules.items():
        adapters[0].modules[path] = LoraModule(A=module.A, B=module.B * 1e-6, scaling=module.scaling)
    for path, module in adapters[1].modules.items():
        adapters[1].modules[path] = LoraModule(A=module.A, B=module.B * 1e4, scaling=module.scaling)
    for path, (B, A) in _merge(strategy, adapters).modules.items():
        assert _relative(B @ A, reference(_deltas(adapters, path))) < 1e-8, path


def test_wudi_steps_leave_a_layer_every_adapter_left_zero_at_zero():
    """A layer no loss reached (PEFT's B = 0 in every adapter, e.g. BERT's pooler under a
    target "dense"): one zero direction, as the exact merge gives; it raised a TypeError (QA RV7)."""
    adapters = _adapters(0)
    for adapter in adapters:
        module = adapter.modules["wide"]
        adapter.modules["wide"] = LoraModule(A=module.A, B=torch.zeros_like(module.B), scaling=module.scaling)
    B, A = _merge("wudi", adapters, steps=5, lr=1e-2).modules["wide"]
    assert float((B @ A).abs().max()) == 0.0 and torch.isfinite(B).all() and torch.isfinite(A).all()


def test_copies_of_one_adapter_merge_to_it_under_wudi():
    adapter = _adapters(5)[3]
    copies = [LoraAdapter(name=f"c{i}", path=Path(f"c{i}"), config={}, modules=adapter.modules) for i in range(3)]
    for path, (B, A) in _merge("wudi", copies).modules.items():
        assert _relative(B @ A, adapter.modules[path].delta()) < 1e-9, path


def _module(d_out: int, d_in: int, rank: int, rows: slice | None, seed: int) -> LoraModule:
    """A random rank-``rank`` module; with ``rows``, B is zero outside those output rows."""
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(d_out, rank, generator=g, dtype=torch.float64)
    if rows is not None:
        B[:rows.start] = 0
        B[rows.stop:] = 0
    return LoraModule(A=torch.randn(rank, d_in, generator=g, dtype=torch.float64), B=B, scaling=0.5)


def test_knots_counts_no_task_where_its_delta_is_zero():
    """TIES' disjoint mean averages the tasks with a non-zero entry. Round-off (1e-16) in
    the aligned components of a zero adapter, or of a task whose output rows the other does
    not touch, counted those tasks, halving about half the entries, in one adapter order
    only: KnOTS of {0, D} was 39% off D. Known answers: {D, 0} is D, and two tasks on
    disjoint output rows are D_1 + D_2, in either order."""
    D = _module(12, 10, 3, None, 0)
    zero = LoraModule(A=_module(12, 10, 2, None, 1).A, B=torch.zeros(12, 2, dtype=torch.float64), scaling=1.0)
    top, bottom = _module(12, 10, 3, slice(0, 5), 2), _module(12, 10, 2, slice(5, 12), 3)
    cases = [([D, zero], D.delta()), ([zero, D], D.delta()),
             ([top, bottom], top.delta() + bottom.delta()), ([bottom, top], top.delta() + bottom.delta())]
    for modules, expected in cases:
        adapters = [LoraAdapter(name=f"t{i}", path=Path(f"t{i}"), config={}, modules={"m": m})
                    for i, m in enumerate(modules)]
        B, A = _merge("knots", adapters).modules["m"]
        assert _relative(B @ A, expected) < 1e-9


def _orthogonal_float32_pair(seed: int) -> tuple[LoraModule, LoraModule, LoraModule, LoraModule]:
    """Two rank-4 tasks whose output and input spans are orthogonal in float64, and the same
    two stored in float32 (as adapters are loaded), where the rounding makes them overlap."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(24, 8, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(40, 8, generator=g, dtype=torch.float64))
    exact = [LoraModule(B=U[:, cols] @ torch.randn(4, 4, generator=g, dtype=torch.float64),
                        A=torch.randn(4, 4, generator=g, dtype=torch.float64) @ V[:, cols].T, scaling=scaling)
             for cols, scaling in ((slice(0, 4), 2.0), (slice(4, 8), 0.5))]
    stored = [LoraModule(B=m.B.float(), A=m.A.float(), scaling=m.scaling) for m in exact]
    return (*exact, *stored)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_knots_of_float32_tasks_on_orthogonal_spans_is_their_sum(seed):
    """Tasks on orthogonal spans have disjoint aligned components, so KnOTS gives their sum
    (the dense float64 reference says so for the exact factors). Stored in float32, the spans
    overlap by their rounding (~1e-8 of the largest entry), which passed the round-off floor
    of the float64 computation (1e-10): TIES counted both tasks at every entry and halved
    them, 27-36 % off the sum (QA). The floor is now the inputs' precision: the sum, to float32's."""
    first, second, *stored = _orthogonal_float32_pair(seed)
    U, S, Vh = torch.linalg.svd(torch.cat([first.delta(), second.delta()], dim=1), full_matrices=False)
    aligned = S[:8, None] * Vh[:8]  # each task's S V_i^T: at each entry, at most one is above round-off
    assert float(torch.minimum(aligned[:, :40].abs(), aligned[:, 40:].abs()).max()) < 1e-12 * float(S[0])
    expected = stored[0].delta().double() + stored[1].delta().double()
    for modules in (stored, stored[::-1]):
        adapters = [LoraAdapter(name=f"t{i}", path=Path(f"t{i}"), config={}, modules={"m": m})
                    for i, m in enumerate(modules)]
        B, A = _merge("knots", adapters).modules["m"]
        assert _relative(B @ A, expected) < 1e-6


@pytest.mark.parametrize("bad", [{"method": "ties"}, {"alpha": 0}, {"fraction": 0.5}, {"common_space_fraction": 1.5}])
def test_parameters_are_validated(bad):
    from iteris_daemon.errors import ParameterError

    with pytest.raises(ParameterError):
        parse_params(get_strategy("core_space"), bad)


def test_wudi_refuses_a_learning_rate_without_steps():
    from iteris_daemon.errors import ParameterError

    with pytest.raises(ParameterError, match="lr is read only with steps > 0"):
        parse_params(get_strategy("wudi"), {"lr": 1e-3})
    assert parse_params(get_strategy("wudi"), {"steps": 300}).lr == 1e-5


def test_common_space_fraction_is_refused_with_a_method_that_does_not_read_it():
    """core_space read it only with method iso_cts: with another it was recorded and changed nothing."""
    from iteris_daemon.errors import ParameterError

    for method in ("ta", "tsv", "iso_c", None):
        raw = {"common_space_fraction": 0.3} | ({"method": method} if method else {})
        with pytest.raises(ParameterError, match=f"common_space_fraction is read only by method iso_cts, not "
                                                 f"'{method or 'tsv'}'"):
            parse_params(get_strategy("core_space"), raw)
    read = parse_params(get_strategy("core_space"), {"method": "iso_cts", "common_space_fraction": 0.3})
    assert read.common_space_fraction == 0.3


# ---------------------------------------------------------------------------------------------
# End to end on the tiny BERT: written, loadable by PEFT, equal to the references


# KnOTS' aligned entries of float32 factors below 8 float32 epsilons of the largest singular
# value are their rounding (the plugin's documented floor): one on the tiny BERT's adapters is.
FLOAT32_ROUND_OFF = 8 * torch.finfo(torch.float32).eps

REFERENCES = {
    "core_space": reference_core_space,
    "tsv": reference_tsv_m,
    "iso_c": reference_iso_c,
    "iso_cts": reference_iso_cts,
    "knots": lambda deltas: reference_knots(deltas, round_off=FLOAT32_ROUND_OFF),
    "wudi": reference_wudi,
}


@pytest.mark.parametrize("strategy", list(REFERENCES))
def test_run_merge_writes_what_peft_loads(bert, strategy, tmp_path):
    base_dir, adapter_dirs = bert
    out = tmp_path / strategy
    report = run_merge(MergeRequest(base_model=str(base_dir), adapters=[AdapterSpec(d) for d in adapter_dirs],
                                    out=out, strategy=strategy, quiet=True, evaluate=(strategy == "core_space"),
                                    eval_samples=4))
    assert report["strategy"] == strategy and report["metrics"]["truncation_error"]["max"] == 0.0
    assert json.loads((out / "merge_report.json").read_text())["strategy"] == strategy

    inputs = [load_adapter(d) for d in adapter_dirs]
    merged = load_adapter(out)
    assert set(merged.modules) == {p for a in inputs for p in a.modules}
    for path, module in merged.modules.items():
        expected = REFERENCES[strategy](_deltas(inputs, path))
        assert _relative(module.delta(), expected) < 1e-5, path  # written in float32

    model = PeftModel.from_pretrained(tf.AutoModel.from_pretrained(base_dir), out).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(base_dir)
    with torch.no_grad():
        output = model(**tokenizer(["the market fell late", "a bright film"], padding=True, return_tensors="pt"))[0]
    assert torch.isfinite(output).all()

