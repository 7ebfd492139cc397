"""Low-rank algebra shared by the strategies: solving for the merged ``A`` factor, and
re-factoring ``B @ A`` to a smaller rank without ever forming the dense matrix."""

from __future__ import annotations

import torch


def solve_spd(M: torch.Tensor, rhs: torch.Tensor, precision: torch.dtype = torch.float64) -> torch.Tensor:
    """Return ``rhs @ M^-1`` for a symmetric positive (semi-)definite ``M`` (float64).

    Cholesky when ``M`` is positive definite (the regularisers make it so); the
    minimum-norm least-squares answer, through the symmetric pseudo-inverse, when it is
    singular (no regularisation and fewer tokens than input features). ``precision`` is
    the dtype ``M``'s Gram matrices were accumulated in: eigenvalues below its rounding
    (``n * eps`` of the largest, NumPy's cutoff) are the null space, not directions to
    invert. Both paths run on CPU and CUDA (``lstsq``'s ``gelsd`` driver is CPU-only).
    """
    M = M.double()
    rhs = rhs.to(M.device, torch.float64)
    factor, info = torch.linalg.cholesky_ex(M)
    if int(info) == 0:
        return torch.cholesky_solve(rhs.T.contiguous(), factor).T
    return rhs @ torch.linalg.pinv(M, hermitian=True, rtol=M.shape[0] * torch.finfo(precision).eps)


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
    """Best rank-``rank`` factors of a dense delta (truncated SVD) and the relative error."""
    U, S, Vh = torch.linalg.svd(D.double(), full_matrices=False)
    keep = max(1, min(rank, int((S > (S[0] if S.numel() else 0) * 1e-12).sum()) or 1))
    root = S[:keep].sqrt()
    total = float(S.pow(2).sum())
    error = (float(S[keep:].pow(2).sum()) / total) ** 0.5 if total > 0 else 0.0
    return (U[:, :keep] * root).float(), (root[:, None] * Vh[:keep]).float(), error
