"""RegMean against its dense closed form with ``alpha != 1``.

RegMean (Jin et al., ICLR 2023) merges linear layers as

    W* = (sum_i D_i G~_i) (sum_i G~_i)^-1,   G~ = alpha G + (1 - alpha) diag(G),   G_i = X_i^T X_i

so the off-diagonal scaling enters *both* factors. The bug this file pins down scaled
the system ``sum_i G~_i`` but formed the right-hand side from the unscaled ``Q = A G``;
with one adapter and correlated features that returned the adapter with a large error
instead of exactly. ``test_old_formula_is_caught`` recomputes that old formula to show
the references here tell the two apart.
"""

import pytest
import torch

from iteris_daemon.alignment import fold
from iteris_daemon.lora import LoraModule, load_adapter
from iteris_daemon.lowrank import solve_spd
from iteris_daemon.merge import AdapterSpec, MergeRequest, run_merge


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _correlated_features(g: torch.Generator, n: int, d_in: int, scale: float) -> torch.Tensor:
    """Rows with strongly correlated coordinates (a random mixing of independent ones)."""
    Z = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    mixing = torch.eye(d_in, dtype=torch.float64) + 0.8 * torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    return scale * Z @ mixing


def _problem(seed: int, ranks=(2, 3, 4), tokens=(50, 60, 70), d_in=18, d_out=13):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (r, n) in enumerate(zip(ranks, tokens)):
        X = _correlated_features(g, n, d_in, scale=10.0 ** (i - 1))  # tasks differ in feature scale
        module = LoraModule(
            A=torch.randn(r, d_in, generator=g, dtype=torch.float64),
            B=torch.randn(d_out, r, generator=g, dtype=torch.float64),
            scaling=0.5 + i,
        )
        out.append((X, module))
    return out


def _scaled(G: torch.Tensor, alpha: float) -> torch.Tensor:
    return alpha * G + (1 - alpha) * torch.diag(torch.diagonal(G))


def _dense_regmean(problem, alpha: float) -> torch.Tensor:
    """The closed form, written out with dense matrices and a plain solve."""
    numerator, denominator = 0, 0
    for X, module in problem:
        Gt = _scaled(X.T @ X, alpha)
        numerator = numerator + module.delta() @ Gt
        denominator = denominator + Gt
    return torch.linalg.solve(denominator.T, numerator.T).T


def _engine(problem, alpha: float, old_bug: bool = False) -> torch.Tensor:
    """The engine's low-rank RegMean: ``fold`` with Q=None (it forms Q = A G~ itself).

    ``old_bug``: pass the unscaled ``Q = A G`` explicitly, which is what the engine
    used to do (only the system M was scaled).
    """
    M, rhs = None, []
    for X, module in problem:
        G = X.T @ X
        Q = module.A @ G if old_bug else None
        M = fold(M, rhs, G, Q, module, 1.0, 0.0, 0.0, offdiag_scale=alpha)
    A = solve_spd(M, torch.cat(rhs))
    B = torch.cat([module.B for _, module in problem], dim=1)
    return B @ A


@pytest.mark.parametrize("alpha", [0.5, 0.9])
@pytest.mark.parametrize("seed", [0, 1])
def test_lowrank_matches_dense_closed_form(seed, alpha):
    problem = _problem(seed)
    expected = _dense_regmean(problem, alpha)
    assert _relative(_engine(problem, alpha), expected) < 1e-9


def test_alpha_one_is_plain_regmean():
    problem = _problem(2)
    numerator = sum(m.delta() @ (X.T @ X) for X, m in problem)
    denominator = sum(X.T @ X for X, _ in problem)
    expected = torch.linalg.solve(denominator.T, numerator.T).T
    assert _relative(_engine(problem, 1.0), expected) < 1e-9


@pytest.mark.parametrize("seed", [0, 3])
def test_single_adapter_is_a_fixed_point(seed):
    """One adapter: W* = D G~ G~^-1 = D whatever alpha, when features are correlated."""
    problem = _problem(seed)[:1]
    X, module = problem[0]
    G = X.T @ X
    off = G - torch.diag(torch.diagonal(G))
    assert float(off.norm() / G.norm()) > 0.3  # the features really are correlated
    assert _relative(_engine(problem, 0.9), module.delta()) < 1e-9


@pytest.mark.parametrize("alpha", [0.5, 0.9])
def test_old_formula_is_caught(alpha):
    """The old right-hand side (Q = A G, unscaled) is far from the reference: these
    tests fail on it, both with one adapter and with several."""
    single = _problem(0)[:1]
    assert _relative(_engine(single, alpha, old_bug=True), single[0][1].delta()) > 1e-3
    several = _problem(1)
    assert _relative(_engine(several, alpha, old_bug=True), _dense_regmean(several, alpha)) > 1e-3


@pytest.mark.parametrize("accumulate, tolerance", [("float64", 1e-6), ("float32", 1e-4)])
def test_regmean_merge_of_one_adapter_returns_it(bert, tmp_path, accumulate, tolerance):
    """End to end (default alpha = 0.9, real forward passes): RegMean of one adapter is
    that adapter, up to float32 forward-pass rounding (and float32 Gram accumulation)."""
    base_dir, adapter_dirs = bert
    out = tmp_path / "regmean"
    report = run_merge(MergeRequest(
        base_model=str(base_dir), adapters=[AdapterSpec(adapter_dirs[0])], out=out, strategy="regmean",
        params={"accumulate_dtype": accumulate}, quiet=True,
    ))
    assert report["strategy"] == "regmean" and report["params"]["alpha"] == 0.9
    original, merged = load_adapter(adapter_dirs[0]), load_adapter(out)
    assert set(original.modules) == set(merged.modules)
    for path, module in original.modules.items():
        assert _relative(merged.modules[path].delta(), module.delta()) < tolerance, path


def test_a_dead_input_feature_leaves_the_live_ones_exact_and_takes_the_mean_delta():
    """A feature no input reaches (a dead ReLU/GELU unit: zero in every X) made RegMean's
    system singular, though its shrunk off-diagonals make it definite otherwise: the
    pseudo-inverse's float32 cutoff then dropped the live features of little energy too
    (QA NS: 58 % of a lone adapter's delta lost). Now the live features are solved apart,
    as the dense closed form on them says, and the dead one takes the fill (the engine
    hands the tasks' weighted mean delta)."""
    problem = _problem(4)
    for X, _ in problem:
        X[:, 5] = 0.0  # dead in every task
        X[:, :4] *= 1e-4  # live, but far below float32's cutoff of the largest eigenvalue
    live = [j for j in range(18) if j != 5]
    alpha = 0.9
    M, rhs = None, []
    for X, module in problem:
        M = fold(M, rhs, X.T @ X, None, module, 1.0, 0.0, 0.0, offdiag_scale=alpha)
    fill = torch.randn(9, 18, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    A = solve_spd(M, torch.cat(rhs), torch.float32, definite=True, fill=fill)
    B = torch.cat([module.B for _, module in problem], dim=1)
    reduced = [(X[:, live], module) for X, module in problem]
    numerator = sum(m.delta()[:, live] @ _scaled(X.T @ X, alpha) for X, m in reduced)
    denominator = sum(_scaled(X.T @ X, alpha) for X, _ in reduced)
    expected = torch.linalg.solve(denominator.T, numerator.T).T
    assert _relative((B @ A)[:, live], expected) < 1e-9
    assert torch.equal(A[:, 5], fill[:, 5])


@pytest.mark.parametrize("copies", [1, 2])
def test_regmean_gives_back_an_adapter_whose_layer_reads_a_dead_unit(bert, tmp_path, copies):
    """End to end, an FFN unit whose GELU is exactly 0 on every token (its bias -1e4): the
    output projection reading it came back 9 % (here) to 58 % (QA NS) off a lone adapter, or two
    copies of it. Now every layer is the adapter's, to float32 rounding."""
    import transformers as tf

    from builders import build_adapter

    base_dir = tmp_path / "base"
    model = tf.AutoModel.from_pretrained(bert[0])
    with torch.no_grad():
        model.encoder.layer[1].intermediate.dense.bias[7] = -1e4
    model.save_pretrained(base_dir)
    tf.AutoTokenizer.from_pretrained(bert[0]).save_pretrained(base_dir)
    adapter = build_adapter(base_dir, tmp_path / "adapter", seed=3, family="bert", r=4,
                            targets=["query", "value", "output.dense"])
    out = tmp_path / "merged"
    run_merge(MergeRequest(base_model=str(base_dir), adapters=[AdapterSpec(adapter)] * copies, out=out,
                           strategy="regmean", quiet=True))
    original, merged = load_adapter(adapter), load_adapter(out)
    assert "encoder.layer.1.output.dense" in original.modules
    for path, module in original.modules.items():
        assert _relative(merged.modules[path].delta(), module.delta()) < 1e-4, path


def test_a_singular_system_takes_the_fill_along_its_null_space():
    """Fewer tokens than features (no ridge, RegMean at alpha = 1): the answer solves the
    system and differs from the fill only where the Grams resolve anything; it was the
    minimum-norm answer, zero along the null space, which lost a lone adapter's delta
    there. Checked by the two properties, with the null space from X's own SVD."""
    g = torch.Generator().manual_seed(7)
    X = torch.randn(10, 18, generator=g, dtype=torch.float64)  # rank 10 of 18
    D = torch.randn(5, 10, generator=g, dtype=torch.float64) @ X  # a delta in X's row space
    M = X.T @ X
    fill = torch.randn(5, 18, generator=g, dtype=torch.float64)
    answer = solve_spd(M, D @ M, fill=fill)
    null = torch.linalg.svd(X).Vh[10:].T  # 18 x 8
    assert _relative(answer @ M, D @ M) < 1e-9
    assert float(((answer - fill) @ null).norm()) < 1e-9 * float(fill.norm())
    assert float((solve_spd(M, D @ M) @ null).norm()) < 1e-9  # no fill: the minimum-norm answer


def test_regmean_without_shrinkage_gives_back_a_lone_adapter_from_two_samples(bert, tmp_path):
    """RegMean at alpha = 1 on two samples per task: fewer tokens than input features, so
    every system is singular. A lone adapter came back 13-59 % off (QA RU, on a ReLU OPT;
    0.13-0.21 with float64 Grams too): zero along the null space. Now it is the adapter."""
    from iteris_daemon.calibration import CalibrationSet, Sample

    adapter = bert[1][0]
    out = tmp_path / "merged"
    run_merge(MergeRequest(base_model=str(bert[0]), adapters=[AdapterSpec(adapter)], out=out, strategy="regmean",
                           params={"alpha": 1.0}, quiet=True,
                           calibration_sets=[CalibrationSet((Sample("a short one"), Sample("and another")), "two")]))
    original, merged = load_adapter(adapter), load_adapter(out)
    for path, module in original.modules.items():
        assert _relative(merged.modules[path].delta(), module.delta()) < 1e-4, path
