"""A deliberately naive IterIS, independent of the package's runtime, for tests.

It merges each delta into a copy of the weights (no hooks applying LoRA), runs
one sample at a time (so there is no padding to mask), stores every token's
features in float64, and solves each layer's regularised least-squares problem
with ``torch.linalg.lstsq`` on the stacked system::

    min_D  sum_i c_i ( ||Xt_i D^T - X_i D_i^T||^2 + l_i ||D - D_i||^2 )

which is the IterIS objective when a1 = a2 (l_i = a ||Xt_i^T Xt_i||_F).
``reference_sequential`` solves the same problems block by block, Gauss-Seidel order.
"""

from __future__ import annotations

import copy

import torch
from transformers.pytorch_utils import Conv1D

from iteris_daemon.calibration import read_jsonl
from iteris_daemon.lora import load_adapter


def _set_delta(model, base_state, deltas: dict[str, torch.Tensor]) -> None:
    model.load_state_dict(base_state)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for path, delta in deltas.items():
            layer = modules[path]
            layer.weight += (delta.T if isinstance(layer, Conv1D) else delta).to(layer.weight.dtype)


def capture(model, tokenizer, texts, targets, paths) -> dict[str, torch.Tensor]:
    """Every token's input to each layer in ``paths``, one unpadded sample at a time."""
    modules = dict(model.named_modules())
    rows: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
    hooks = [
        modules[p].register_forward_pre_hook(lambda _m, args, p=p: rows[p].append(args[0].reshape(-1, args[0].shape[-1]).double()))
        for p in paths
    ]
    try:
        with torch.no_grad():
            for text, target in zip(texts, targets):
                enc = tokenizer(text, return_tensors="pt", truncation=True, max_length=128)
                inputs = {"input_ids": enc["input_ids"]}
                if getattr(model.config, "type_vocab_size", 0):
                    inputs["token_type_ids"] = enc["token_type_ids"]
                if model.config.is_encoder_decoder:
                    labels = tokenizer(target, return_tensors="pt")["input_ids"]
                    inputs["decoder_input_ids"] = model._shift_right(labels)
                model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return {p: torch.cat(r) for p, r in rows.items()}


class _Problem:
    """What both references start from: a private copy of the model, the tasks' data,
    dense deltas, and every task's own-adapter features X_i with adaptive weights c_i."""

    def __init__(self, model, tokenizer, adapter_dirs, samples: int | None = None):
        self.model = copy.deepcopy(model).eval()
        self.tokenizer = tokenizer
        self.base_state = copy.deepcopy(self.model.state_dict())
        adapters = [load_adapter(d) for d in adapter_dirs]
        data = [read_jsonl(d / "calibration.jsonl").samples[:samples] for d in adapter_dirs]
        self.texts = [[s.text for s in d] for d in data]
        self.targets = [[s.target or "" for s in d] for d in data]
        self.n = len(adapters)
        self.paths = paths = sorted({p for ad in adapters for p in ad.modules})
        self.deltas = [{p: m.delta() for p, m in ad.modules.items()} for ad in adapters]
        modules = dict(self.model.named_modules())
        self.W0 = {p: (modules[p].weight.T if isinstance(modules[p], Conv1D) else modules[p].weight).detach().double()
                   for p in paths}
        self.X = [self.features(i, self.deltas[i], paths) for i in range(self.n)]
        self.c = []
        for i in range(self.n):
            weights = {}
            for p in paths:
                W = self.W0[p] + self.delta(i, p)
                weights[p] = float(W.pow(2).sum() / (self.X[i][p] @ W.T).pow(2).sum())
            self.c.append(weights)

    def delta(self, i: int, p: str) -> torch.Tensor:
        return self.deltas[i].get(p, torch.zeros_like(self.W0[p]))

    def features(self, i: int, installed: dict[str, torch.Tensor], paths) -> dict[str, torch.Tensor]:
        """Task i's inputs to ``paths`` with the dense deltas ``installed`` merged in."""
        _set_delta(self.model, self.base_state, installed)
        return capture(self.model, self.tokenizer, self.texts[i], self.targets[i], paths)

    def solve(self, p: str, Xt: list[torch.Tensor], a: float, factors: list[float] | None = None) -> torch.Tensor:
        """min_D sum_i f_i c_i (||Xt_i D^T - X_i D_i^T||^2 + l_i ||D - D_i||^2) by lstsq (f_i: 1 unless given)."""
        lhs, rhs = [], []
        for i in range(self.n):
            lam = a * float(torch.linalg.matrix_norm(Xt[i].T @ Xt[i]))
            w = (self.c[i][p] * (factors[i] if factors else 1.0)) ** 0.5
            lhs.append(w * Xt[i])
            rhs.append(w * (self.X[i][p] @ self.delta(i, p).T))
            if lam > 0:
                lhs.append(w * lam**0.5 * torch.eye(self.W0[p].shape[1], dtype=torch.float64))
                rhs.append(w * lam**0.5 * self.delta(i, p).T)
        return torch.linalg.lstsq(torch.cat(lhs), torch.cat(rhs), driver="gelsd").solution.T


def reference_iteris(model, tokenizer, adapter_dirs, iterations: int, a: float, samples: int | None = None,
                     gamma: float = 0.0, floor: float = 1e-2):
    """Return {path: dense merged delta} after ``iterations`` solves (float64). ``gamma``:
    loss weighting, each solve after the first weighting task i at layer p by
    max(||Xt_i D^T - X_i D_i^T||^2 / ||X_i D_i^T||^2, floor)^gamma for the merge D before
    (1 where the task does not adapt p)."""
    problem = _Problem(model, tokenizer, adapter_dirs, samples)
    Xt = problem.X
    merged = None
    for _ in range(iterations):
        factors = {p: [1.0] * problem.n for p in problem.paths}
        if merged is not None and gamma:
            for p in problem.paths:
                for i in range(problem.n):
                    target = problem.X[i][p] @ problem.delta(i, p).T
                    if float(target.pow(2).sum()) > 0:
                        loss = float((Xt[i][p] @ merged[p].T - target).pow(2).sum() / target.pow(2).sum())
                        factors[p][i] = max(loss, floor) ** gamma
        merged = {p: problem.solve(p, [Xt[i][p] for i in range(problem.n)], a, factors[p]) for p in problem.paths}
        Xt = [problem.features(i, merged, problem.paths) for i in range(problem.n)]
    return merged


def _blocks_in_order(model, paths: list[str]) -> list[list[str]]:
    """``paths`` grouped by transformer block in execution order; paths outside every
    block (a pooler, a head) form the last group. Written for the test models only."""
    import re

    order: dict[str, int] = {}
    for name, _ in model.named_modules():
        match = re.match(r"^(.*)\.(\d+)$", name)
        if match and match[1] not in order and match[1].endswith(("layer", "layers", "block", "h")):
            order[match[1]] = len(order)
    groups: dict[tuple, list[str]] = {}
    for path in paths:
        match = re.match(r"^(.*?(?:layer|layers|block|h))\.(\d+)\.", path)
        key = (order[match[1]], int(match[2])) if match else (len(order), 0)
        groups.setdefault(key, []).append(path)
    return [groups[k] for k in sorted(groups)]


def reference_sequential(model, tokenizer, adapter_dirs, sweeps: int, a: float):
    """Gauss-Seidel IterIS, straight from its definition, with whole-model passes.

    Sweep s solves block k from Xt_i = the inputs block k's layers receive when blocks
    before k carry this sweep's merge and block k itself carries the previous sweep's
    merge (task i's own adapter in sweep 0); the targets X_i come from task i's own
    adapter everywhere. Returns {path: dense merged delta} (float64).
    """
    problem = _Problem(model, tokenizer, adapter_dirs)
    previous = None
    for _ in range(sweeps):
        current: dict[str, torch.Tensor] = {}
        for block in _blocks_in_order(problem.model, problem.paths):
            solved = {}
            for p in block:
                Xt = []
                for i in range(problem.n):
                    installed = dict(problem.deltas[i] if previous is None else previous)
                    installed.update(current)  # blocks solved earlier in this sweep
                    Xt.append(problem.features(i, installed, [p])[p])
                solved[p] = problem.solve(p, Xt, a)
            current.update(solved)
        previous = current
    return previous
