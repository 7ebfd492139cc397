"""Low-rank algebra shared by the strategies: solving for the merged ``A`` factor, and
re-factoring ``B @ A`` to a smaller rank without ever forming the dense matrix."""

from __future__ import annotations

import torch


def solve_spd(M: torch.Tensor, rhs: torch.Tensor, precision: torch.dtype = torch.float64,
              definite: bool = False, fill: torch.Tensor | None = None) -> torch.Tensor:
    """Return ``rhs @ M^-1`` for a symmetric positive (semi-)definite ``M`` (float64).

    Cholesky when ``M`` is positive definite; when it is singular (no ridge and fewer
    tokens than input features, or features bound by a constraint, as a LayerNorm without
    bias makes them sum to zero), the least-squares answer on the directions ``M``
    resolves (its symmetric pseudo-inverse) plus, along its null space, ``fill``'s part
    (zero without: the minimum-norm answer). ``precision`` is the dtype ``M``'s Gram matrices were
    accumulated in: eigenvalues below its rounding (``n * eps`` of the largest, NumPy's
    cutoff) are the null space, not directions to invert. Cholesky also passes on such
    a matrix when rounding leaves its null space slightly positive, and inverting that
    blew the answer up along it (by 10^6 and more): so unless ``M`` is ``definite`` by
    construction (IterIS' ridge a2, RegMean's shrunk off-diagonals, alpha < 1) its
    smallest eigenvalue is estimated first. Both paths run on CPU and CUDA (``lstsq``'s
    ``gelsd`` driver is CPU-only).

    A feature no input ever reached (a dead ReLU or GELU unit: its row and column of ``M``
    are zero) is taken out first: its column is ``fill``'s, and the other features are
    solved apart. Left in, it made a ``definite`` matrix singular, and the cutoff then
    dropped live directions of little energy with it (RegMean gave back 42 % of a lone
    adapter's delta), where Cholesky solves them.
    """
    M = M.double()
    rhs = rhs.to(M.device, torch.float64)
    dead = M.diagonal() <= 0
    if bool(dead.any()):
        live = ~dead
        answer = torch.zeros_like(rhs) if fill is None else fill.to(rhs.device, torch.float64, copy=True)
        if bool(live.any()):
            answer[:, live] = solve_spd(M[live][:, live], rhs[:, live], precision, definite,
                                        None if fill is None else answer[:, live])
        return answer
    n = M.shape[0]
    cutoff = n * torch.finfo(precision).eps
    factor, info = torch.linalg.cholesky_ex(M)
    if int(info) == 0 and (definite or _smallest_eigenvalue(factor) > cutoff * float(M.diagonal().max())):
        return torch.cholesky_solve(rhs.T.contiguous(), factor).T
    values, vectors = torch.linalg.eigh(M)
    kept = values.abs() > cutoff * float(values.abs().max())  # pinv's rule: the rest is the null space
    resolved = vectors[:, kept]
    answer = (rhs @ resolved / values[kept]) @ resolved.T
    if fill is not None:  # the directions the Grams do not resolve take fill's part there
        fill = fill.to(M.device, torch.float64)
        answer += fill - (fill @ resolved) @ resolved.T
    return answer


def _smallest_eigenvalue(factor: torch.Tensor, steps: int = 8) -> float:
    """An estimate, from above, of the smallest eigenvalue of ``L L^T`` (``factor`` = L):
    the Rayleigh quotient after ``steps`` of inverse iteration, O(n^2) each, from a fixed
    generic start. A null direction of a singular matrix dominates after one step."""
    start = torch.randn(factor.shape[0], 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    v = start.to(factor.device)
    for _ in range(steps):
        v = torch.cholesky_solve(v, factor)
        v = v / torch.linalg.vector_norm(v)
    return float(torch.linalg.vector_norm(factor.T @ v) ** 2)


def refactor(B: torch.Tensor, A: torch.Tensor, rank: int | None = None, rtol: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Re-factor ``B @ A`` (d_out x R, R x d_in) through QR + a small SVD.

    Keeps at most ``rank`` singular directions (all non-negligible ones when ``None``),
    splitting each singular value evenly between the factors. Returns the new (B, A)
    and the relative Frobenius error of the truncation (0 when nothing was dropped).
    """
    B64, A64 = B.double(), A.double()
    Qb, Rb = torch.linalg.qr(B64)
    Qa, Ra = torch.linalg.qr(A64.T)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T)
    keep = int((S > S[0] * rtol).sum()) if S.numel() and S[0] > 0 else 0
    if rank is not None:
        keep = min(keep, rank)
    keep = max(keep, 1)
    total = float(S.pow(2).sum())
    dropped = float(S[keep:].pow(2).sum())
    root = S[:keep].sqrt()
    new_B = (Qb @ U[:, :keep]) * root
    new_A = root[:, None] * (Vh[:keep] @ Qa.T)
    error = (dropped / total) ** 0.5 if total > 0 else 0.0
    return new_B.to(B.dtype), new_A.to(A.dtype), error


def dense_to_lowrank(D: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` factors ``(B, A)`` of a dense delta and the relative error of ``B @ A``.

    Through the Gram matrix of the smaller side instead of an SVD of ``D``: for a
    d_out x d_in delta with d_out >= d_in, the top eigenvectors ``V`` of ``D^T D``
    span the best rank-``rank`` row space (Eckart-Young), and ``B @ A = D V V^T``
    exactly, because ``V`` is orthonormal whatever the eigenvalues' rounding. That
    is a product, a symmetric eigendecomposition of the small side and another
    product: 2-8 times faster than LAPACK's SVD on LLM shapes, and no d_out x d_in
    singular-vector matrix (``python -m benchmarks.dense_memory``). Squaring ``D``
    makes singular values below about ``sqrt(d * eps)`` of the largest (1e-6 at
    d = 4096) indistinguishable from zero; they are dropped when the cap leaves room
    for them, and the error reported is the residual of what is returned, computed
    from its norm (``|D|^2 - |D V|^2``, to about 1e-8), not from the eigenvalues.
    """
    D = D.double()
    total = float(torch.linalg.vector_norm(D)) ** 2  # not D.pow(2): a copy of D
    d_out, d_in = D.shape
    if total == 0:
        return D.new_zeros(d_out, 1).float(), D.new_zeros(1, d_in).float(), 0.0
    tall = d_out >= d_in
    eigenvalues, vectors = torch.linalg.eigh(D.T @ D if tall else D @ D.T)  # ascending
    eigenvalues, vectors = eigenvalues.flip(0), vectors.flip(1)
    noise = eigenvalues[0] * min(d_out, d_in) * torch.finfo(torch.float64).eps
    keep = max(1, min(rank, int((eigenvalues > noise).sum())))
    basis = vectors[:, :keep]  # orthonormal: the row space (tall) or the column space (wide)
    projected = D @ basis if tall else basis.T @ D  # d_out x keep, or keep x d_in
    strength = projected.pow(2).sum(0 if tall else 1)  # squared singular values of the result
    # What the cap drops, by difference (absolute precision ~1e-8); nothing when every direction is kept.
    error = 0.0 if keep == min(d_out, d_in) else max(0.0, total - float(strength.sum())) / total
    root = strength.sqrt().sqrt().clamp(min=torch.finfo(torch.float64).tiny)  # split each evenly
    if tall:
        B, A = projected / root, root[:, None] * basis.T
    else:
        B, A = basis * root, projected / root[:, None]
    return B.float(), A.float(), error ** 0.5
