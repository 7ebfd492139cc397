"""IterIS as the reference code structures it: every token's layer inputs are kept
(X_i and Xt_i for every task and layer) and the Gram matrices formed at the end of
each pass. Used only to measure what that costs in memory next to the streaming
implementation; it solves the same equations (dense, float64; task weights left at 1)."""

from __future__ import annotations

import time

import torch

from iteris_daemon import memory
from iteris_daemon.calibration import read_jsonl
from iteris_daemon.lora import load_adapter
from iteris_daemon.model import BaseModel, Delta, row_mask


def real_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The rows of ``x`` that are real tokens (padding dropped), as a float32 copy."""
    rows = x.reshape(-1, x.shape[-1]).float()
    column = row_mask(x, mask)
    return rows.clone() if column is None else rows[column.reshape(-1).bool()]


def main(model: str, specs: list[str], iterations: int, a: float = 1e-3) -> dict:
    started = time.perf_counter()
    adapters = [load_adapter(spec.split("=")[0]) for spec in specs]
    data = [read_jsonl(spec.split("=")[1]) for spec in specs]
    base = BaseModel(model, adapters, offload="none")  # the whole model in memory, as the reference code has it
    window = memory.reset_peak()  # measure the merge, not the model load
    paths = sorted({p for ad in adapters for p in ad.modules})
    batches = [base.batches(d, 16, 128) for d in data]
    base.attach(paths)

    def capture(task: int, deltas) -> dict[str, torch.Tensor]:
        rows: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
        base.set_deltas(deltas)
        for _ in base.run(batches[task], lambda p, x, _y, mask: rows[p].append(real_rows(x, mask))):
            pass
        return {p: torch.cat(r) for p, r in rows.items()}

    X = [capture(i, {p: Delta(m.A, m.B, m.scaling) for p, m in ad.modules.items()}) for i, ad in enumerate(adapters)]
    Xt = X
    for _ in range(iterations):
        merged = {}
        for p in paths:
            numerator, denominator = 0, 0
            for i, adapter in enumerate(adapters):
                G = (Xt[i][p].T @ Xt[i][p]).double()
                C = (X[i][p].T @ Xt[i][p]).double()
                lam = a * float(torch.linalg.matrix_norm(G))
                eye = torch.eye(G.shape[0], dtype=torch.float64)
                D = adapter.modules[p].delta() if p in adapter.modules else 0
                numerator = numerator + (D @ (C + lam * eye) if p in adapter.modules else 0)
                denominator = denominator + G + lam * eye
            merged[p] = torch.linalg.solve(denominator.T, numerator.T).T
        deltas = {p: Delta(torch.eye(D.shape[1]), D.float()) for p, D in merged.items()}
        Xt = [capture(i, deltas) for i in range(len(adapters))]
    base.detach()
    return {"peak_rss_mb": memory.process_peak_mb(), "merge_peak_mb": memory.window_peak_mb() if window else None,
            "seconds": time.perf_counter() - started}
