"""The closed-form solve and the low-rank algebra on random problems, against
independent float64 references (lstsq, dense formulas, autograd)."""

import numpy as np
import pytest
import torch

from iteris_daemon.alignment import fold
from iteris_daemon.lora import LoraModule
from iteris_daemon.lowrank import dense_to_lowrank, refactor, solve_spd


def _problem(seed: int, tasks=3, d_in=24, d_out=16, ranks=(2, 3, 4), tokens=(40, 7, 60)):
    """Random features; the second task has fewer tokens than d_in (rank-deficient Gram)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(tasks):
        r, n = ranks[i], tokens[i]
        scale = 10.0 ** (i - 1)  # tasks whose features differ in scale by 100x
        X = torch.randn(n, d_in, generator=g, dtype=torch.float64) * scale
        Xt = X + 0.1 * scale * torch.randn(n, d_in, generator=g, dtype=torch.float64)
        module = LoraModule(
            A=torch.randn(r, d_in, generator=g, dtype=torch.float64),
            B=torch.randn(d_out, r, generator=g, dtype=torch.float64),
            scaling=0.5 + i,
        )
        c = float(torch.rand(1, generator=g, dtype=torch.float64)) + 0.5
        out.append((X, Xt, module, c))
    return out


def _lowrank_solution(problem, a1, a2):
    M, rhs = None, []
    for X, Xt, module, c in problem:
        G = Xt.T @ Xt
        Q = (X @ module.A.T).T @ Xt
        M = fold(M, rhs, G, Q, module, c, a1, a2)
    A = solve_spd(M, torch.cat(rhs))
    B = torch.cat([module.B for _, _, module, _ in problem], dim=1)
    return B, A


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_lstsq_when_a1_equals_a2(seed):
    problem = _problem(seed)
    a = 1e-3
    B, A = _lowrank_solution(problem, a, a)
    lhs, rhs = [], []
    for X, Xt, module, c in problem:
        D = module.delta()
        lam = a * float(torch.linalg.matrix_norm(Xt.T @ Xt))
        lhs += [c**0.5 * Xt, (c * lam) ** 0.5 * torch.eye(X.shape[1], dtype=torch.float64)]
        rhs += [c**0.5 * X @ D.T, (c * lam) ** 0.5 * D.T]
    expected = torch.linalg.lstsq(torch.cat(lhs), torch.cat(rhs), driver="gelsd").solution.T
    assert float((B @ A - expected).norm() / expected.norm()) < 1e-9


@pytest.mark.parametrize("seed", [0, 3])
def test_lowrank_equals_dense_formula_and_is_stationary(seed):
    """a1 != a2: the exact low-rank form equals the dense closed form, and the
    gradient of the brute-force objective vanishes there."""
    problem = _problem(seed)
    a1, a2 = 2e-3, 5e-3
    B, A = _lowrank_solution(problem, a1, a2)
    d_in = problem[0][0].shape[1]
    eye = torch.eye(d_in, dtype=torch.float64)
    numerator = 0
    denominator = 0
    for X, Xt, module, c in problem:
        G = Xt.T @ Xt
        norm = float(torch.linalg.matrix_norm(G))
        numerator = numerator + c * module.delta() @ (X.T @ Xt + a1 * norm * eye)
        denominator = denominator + c * (G + a2 * norm * eye)
    dense = torch.linalg.solve(denominator.T, numerator.T).T
    assert float((B @ A - dense).norm() / dense.norm()) < 1e-6

    D = (B @ A).clone().requires_grad_(True)
    objective = 0
    for X, Xt, module, c in problem:
        norm = float(torch.linalg.matrix_norm(Xt.T @ Xt))
        Di = module.delta()
        objective = objective + c * (
            (Xt @ D.T - X @ Di.T).pow(2).sum() + a2 * norm * D.pow(2).sum() - 2 * a1 * norm * (D * Di).sum()
        )
    objective.backward()
    scale = max(float(objective.detach().abs()), 1.0)
    assert float(D.grad.norm()) / scale < 1e-9


def test_singular_system_falls_back_to_minimum_norm():
    """No regularisation and fewer tokens than features: still a finite least-squares answer."""
    g = torch.Generator().manual_seed(5)
    X = torch.randn(5, 12, generator=g, dtype=torch.float64)
    M = X.T @ X
    rhs = torch.randn(3, 12, generator=g, dtype=torch.float64) @ M  # consistent right-hand side
    solution = solve_spd(M, rhs)
    assert torch.isfinite(solution).all()
    assert torch.allclose(solution @ M, rhs, atol=1e-8)


def test_singular_float32_grams_give_the_minimum_norm_answer():
    """Grams accumulated in float32 (the default) with no regularisation and fewer tokens
    than features: the float32 rounding in the null space is cut off, not inverted, so
    the answer is the stacked problem's minimum-norm least-squares solution (``gelsd``)."""
    g = torch.Generator().manual_seed(7)
    d, r, tokens = 96, 3, 30
    Xs = [torch.randn(tokens, d, generator=g, dtype=torch.float64) * 3 for _ in range(2)]
    As = [torch.randn(r, d, generator=g, dtype=torch.float64) for _ in range(2)]
    grams = [(X.float().T @ X.float()).double() for X in Xs]
    solution = solve_spd(grams[0] + grams[1], torch.cat([A @ G for A, G in zip(As, grams)]), torch.float32)
    # Reference: task i's rows of A_merged solve [X_1; X_2] a^T = [X_1 A_1^T; 0] (or [0; X_2 A_2^T]).
    zeros = torch.zeros(tokens, r, dtype=torch.float64)
    targets = [torch.cat([Xs[0] @ As[0].T, zeros]), torch.cat([zeros, Xs[1] @ As[1].T])]
    expected = torch.cat([torch.linalg.lstsq(torch.cat(Xs), t, driver="gelsd").solution.T for t in targets])
    assert float((solution - expected).norm() / expected.norm()) < 1e-3


@pytest.mark.parametrize("accumulate", [torch.float64, torch.float32])
def test_a_singular_system_cholesky_passes_on_rounding_gives_the_minimum_norm_answer(accumulate):
    """More tokens than features, but features that sum to zero (a LayerNorm without bias):
    G has a null vector, and rounding lets Cholesky pass. Its answer grew along the null
    direction (1.6e1 here where the minimum norm is 1.2e1; 1.4e7 for a real RegMean merge).
    Reference: the minimum-norm least-squares solution of the token problem (``gelsd``)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 32, generator=g, dtype=torch.float64)
    X -= X.mean(1, keepdim=True)
    A = torch.randn(4, 32, generator=g, dtype=torch.float64)
    G = (X.to(accumulate).T @ X.to(accumulate)).double()
    assert int(torch.linalg.cholesky_ex(G).info) == 0 and int(torch.linalg.matrix_rank(X)) == 31  # the trap
    solution = solve_spd(G, A @ G, accumulate)
    expected = torch.linalg.lstsq(X, X @ A.T, driver="gelsd").solution.T
    assert float((solution - expected).norm() / expected.norm()) < 1e-6
    # With a ridge the system is definite by construction: Cholesky's answer, unchecked.
    ridged = G + 1e-3 * float(torch.linalg.matrix_norm(G)) * torch.eye(32, dtype=torch.float64)
    torch.testing.assert_close(solve_spd(ridged, A @ G, accumulate, definite=True),
                               torch.linalg.solve(ridged, (A @ G).T).T, rtol=1e-9, atol=1e-9)


def test_alignment_terms_equal_the_dense_norms():
    """The alignment loss from Gram sums equals ``||Xt D^T - X D_i^T||^2`` and
    ``||X D_i^T||^2`` computed densely, for a layer wider out than in (an LM head). The
    sums stay r x r: an intermediate d_out x d_out product made a two-adapter merge of a
    tiny GPT-2 with LoRA on its 30,522-word head peak at 7.5 GB RSS in 10.5 s (497 MB and
    2.2 s without it); a 128k-word head's would be 131 GB."""
    from iteris_daemon.alignment import TaskLayer, alignment_terms
    from iteris_daemon.lora import LoraModule

    g = torch.Generator().manual_seed(3)
    n, d_in, d_out, r, R = 40, 12, 300, 3, 5
    X, Xt = (torch.randn(n, d_in, generator=g, dtype=torch.float64) for _ in range(2))
    module = LoraModule(A=torch.randn(r, d_in, generator=g, dtype=torch.float64),
                        B=torch.randn(d_out, r, generator=g, dtype=torch.float64), scaling=0.7)
    B, A = torch.randn(d_out, R, generator=g, dtype=torch.float64), torch.randn(R, d_in, generator=g, dtype=torch.float64)
    P = X @ module.A.T
    layer = TaskLayer(module, PtP=P.T @ P)
    fit, target = alignment_terms(layer, Xt.T @ Xt, P.T @ Xt, B, A)
    D_i = module.scaling * module.B @ module.A
    assert target == pytest.approx(float((X @ D_i.T).pow(2).sum()), rel=1e-10)
    assert fit == pytest.approx(float((Xt @ (B @ A).T - X @ D_i.T).pow(2).sum()), rel=1e-10)


def test_refactor_is_exact_at_full_rank_and_optimal_when_truncated():
    g = torch.Generator().manual_seed(0)
    B = torch.randn(30, 10, generator=g, dtype=torch.float64)
    A = torch.randn(10, 20, generator=g, dtype=torch.float64)
    D = B @ A
    B2, A2, error = refactor(B, A)
    assert error == 0.0 and A2.shape[0] == 10
    assert float((B2 @ A2 - D).norm() / D.norm()) < 1e-12

    B3, A3, error = refactor(B, A, rank=4)
    S = torch.linalg.svdvals(D)
    best = float(S[4:].pow(2).sum().sqrt() / S.pow(2).sum().sqrt())  # Eckart-Young
    assert abs(float((B3 @ A3 - D).norm() / D.norm()) - best) < 1e-10
    assert abs(error - best) < 1e-10

    B4, A4, error = dense_to_lowrank(D, 4)
    assert abs(float((B4.double() @ A4.double() - D).norm() / D.norm()) - best) < 1e-6


def _spectrum(shape, singular_values, seed):
    """A float64 matrix with exactly these singular values (random singular vectors)."""
    g = torch.Generator().manual_seed(seed)
    k = len(singular_values)
    U, _ = torch.linalg.qr(torch.randn(shape[0], k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(shape[1], k, generator=g, dtype=torch.float64))
    return (U * torch.tensor(singular_values, dtype=torch.float64)) @ V.T


@pytest.mark.parametrize("case, D, rank", [
    ("tall", torch.randn(60, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64), 5),
    ("wide", torch.randn(20, 60, generator=torch.Generator().manual_seed(2), dtype=torch.float64), 5),
    ("square, cap past its rank", torch.randn(24, 24, generator=torch.Generator().manual_seed(3), dtype=torch.float64), 40),
    ("exactly rank 3 under a cap of 8", _spectrum((30, 40), [5.0, 2.0, 0.5], 4), 8),
    ("a tail at 1e-3", _spectrum((50, 30), [10.0, 7.0, 3.0] + [1e-3] * 20, 5), 3),
    ("a spectrum over 8 decades", _spectrum((40, 64), [10.0 ** -e for e in range(9)], 6), 6),
    ("a tie across the cap", _spectrum((40, 25), [4.0, 3.0, 3.0, 3.0, 1.0], 7), 2),
])
def test_dense_to_lowrank_is_eckart_young(case, D, rank):
    """Against numpy's float64 SVD: the product is the best rank-``rank`` approximation
    (or, at a tie, one as good), the reported error is its relative residual (exactly 0
    when nothing is dropped), and each singular value is split evenly between B's
    columns and A's rows."""
    B, A, error = dense_to_lowrank(D, rank)
    if rank >= min(D.shape):
        assert error == 0.0, case
    U, S, Vh = np.linalg.svd(D.numpy(), full_matrices=False)
    k = min(rank, int((S > S[0] * 1e-6).sum()))
    best = (U[:, :k] * S[:k]) @ Vh[:k]
    best_error = float(np.sqrt((S[k:] ** 2).sum() / (S ** 2).sum()))
    product = (B.double() @ A.double()).numpy()
    residual = float(np.linalg.norm(product - D.numpy()) / np.linalg.norm(D.numpy()))
    assert A.shape[0] == k and B.shape[1] == k, case
    assert abs(error - best_error) < 1e-7 and abs(residual - best_error) < 1e-6, case
    if case != "a tie across the cap":  # the best approximation is unique
        assert np.linalg.norm(product - best) / np.linalg.norm(best) < 1e-6, case
    assert torch.allclose(B.double().norm(dim=0), A.double().norm(dim=1), rtol=1e-5), case


def test_dense_to_lowrank_of_zero_is_zero():
    B, A, error = dense_to_lowrank(torch.zeros(5, 3), 2)
    assert error == 0.0 and not B.any() and not A.any() and B.shape == (5, 1) and A.shape == (1, 3)


@pytest.mark.parametrize("shape", [(50, 20), (20, 50)])
def test_dense_to_lowrank_decomposes_the_smaller_gram(shape, monkeypatch):
    """The eigendecomposition is of the smaller side's Gram matrix (the point of the
    method: d_in x d_in for an LM head, not vocabulary x vocabulary)."""
    sizes = []
    real = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda G, *a, **k: sizes.append(tuple(G.shape)) or real(G, *a, **k))
    dense_to_lowrank(torch.randn(*shape, dtype=torch.float64), 3)
    assert sizes == [(20, 20)]
