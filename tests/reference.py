"""A deliberately naive IterIS, independent of the package's runtime, for tests.

It merges each delta into a copy of the weights (no hooks applying LoRA), runs
one sample at a time (so there is no padding to mask), stores every token's
features in float64, and solves each layer's regularised least-squares problem
with ``torch.linalg.lstsq`` on the stacked system::

    min_D  sum_i c_i ( ||Xt_i D^T - X_i D_i^T||^2 + l_i ||D - D_i||^2 )

which is the IterIS objective when a1 = a2 (l_i = a ||Xt_i^T Xt_i||_F).
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


def reference_iteris(model, tokenizer, adapter_dirs, iterations: int, a: float, samples: int | None = None):
    """Return {path: dense merged delta} after ``iterations`` solves (float64)."""
    model = copy.deepcopy(model).eval()
    base_state = copy.deepcopy(model.state_dict())
    adapters = [load_adapter(d) for d in adapter_dirs]
    data = [read_jsonl(d / "calibration.jsonl").samples[:samples] for d in adapter_dirs]
    texts = [[s.text for s in d] for d in data]
    targets = [[s.target or "" for s in d] for d in data]
    paths = sorted({p for ad in adapters for p in ad.modules})
    deltas = [{p: m.delta() for p, m in ad.modules.items()} for ad in adapters]
    modules = dict(model.named_modules())
    W0 = {p: (modules[p].weight.T if isinstance(modules[p], Conv1D) else modules[p].weight).detach().double() for p in paths}

    X, c = [], []
    for i in range(len(adapters)):
        _set_delta(model, base_state, deltas[i])
        X.append(capture(model, tokenizer, texts[i], targets[i], paths))
        weights = {}
        for p in paths:
            W = W0[p] + deltas[i].get(p, torch.zeros_like(W0[p]))
            weights[p] = float(W.pow(2).sum() / (X[i][p] @ W.T).pow(2).sum())
        c.append(weights)

    Xt = X
    merged = None
    for _ in range(iterations):
        merged = {}
        for p in paths:
            lhs, rhs = [], []
            for i in range(len(adapters)):
                Di = deltas[i].get(p, torch.zeros_like(W0[p]))
                G = Xt[i][p].T @ Xt[i][p]
                lam = a * float(torch.linalg.matrix_norm(G))
                w = c[i][p] ** 0.5
                lhs.append(w * Xt[i][p])
                rhs.append(w * (X[i][p] @ Di.T))
                if lam > 0:
                    lhs.append(w * lam**0.5 * torch.eye(W0[p].shape[1], dtype=torch.float64))
                    rhs.append(w * lam**0.5 * Di.T)
            solution = torch.linalg.lstsq(torch.cat(lhs), torch.cat(rhs), driver="gelsd").solution
            merged[p] = solution.T
        Xt = []
        for i in range(len(adapters)):
            _set_delta(model, base_state, merged)
            Xt.append(capture(model, tokenizer, texts[i], targets[i], paths))
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
    model = copy.deepcopy(model).eval()
    base_state = copy.deepcopy(model.state_dict())
    adapters = [load_adapter(d) for d in adapter_dirs]
    data = [read_jsonl(d / "calibration.jsonl").samples for d in adapter_dirs]
    texts = [[s.text for s in d] for d in data]
    targets = [[s.target or "" for s in d] for d in data]
    paths = sorted({p for ad in adapters for p in ad.modules})
    deltas = [{p: m.delta() for p, m in ad.modules.items()} for ad in adapters]
    modules = dict(model.named_modules())
    W0 = {p: (modules[p].weight.T if isinstance(modules[p], Conv1D) else modules[p].weight).detach().double() for p in paths}
    X, c = [], []
    for i in range(len(adapters)):
        _set_delta(model, base_state, deltas[i])
        X.append(capture(model, tokenizer, texts[i], targets[i], paths))
        c.append({p: float((W0[p] + deltas[i].get(p, 0)).pow(2).sum()
                           / (X[i][p] @ (W0[p] + deltas[i].get(p, 0)).T).pow(2).sum()) for p in paths})
    previous = None
    for _ in range(sweeps):
        current: dict[str, torch.Tensor] = {}
        for block in _blocks_in_order(model, paths):
            solved = {}
            for p in block:
                lhs, rhs = [], []
                for i in range(len(adapters)):
                    installed = dict(deltas[i]) if previous is None else dict(previous)
                    installed.update(current)  # blocks solved earlier in this sweep
                    _set_delta(model, base_state, installed)
                    Xt = capture(model, tokenizer, texts[i], targets[i], [p])[p]
                    Di = deltas[i].get(p, torch.zeros_like(W0[p]))
                    lam = a * float(torch.linalg.matrix_norm(Xt.T @ Xt))
                    w = c[i][p] ** 0.5
                    lhs += [w * Xt, w * lam**0.5 * torch.eye(W0[p].shape[1], dtype=torch.float64)]
                    rhs += [w * (X[i][p] @ Di.T), w * lam**0.5 * Di.T]
                solved[p] = torch.linalg.lstsq(torch.cat(lhs), torch.cat(rhs), driver="gelsd").solution.T
            current.update(solved)
        previous = current
    return previous
