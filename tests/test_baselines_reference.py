"""TIES and DARE (plugins/baselines_math.py) against references written here.

TIES (Yadav et al., NeurIPS 2023) in numpy float64, from the paper's three steps on each
module's dense deltas: keep each task's top-``density`` entries by magnitude, elect each
entry's sign from the (weighted) sum, average the entries that agree with it. DARE (Yu et
al., ICML 2024) drops entries at random, so it is checked by what must hold whatever the
draw: no drop is task arithmetic; with one task every entry is 0 or the task's entry
scaled by 1/(1-p), and about 1-p of them are kept; a seed gives one merge.

``target_rank`` is set past every module's size, so the written LoRA is the dense result
itself; one test keeps the default (the sum of the input ranks) and checks the written
LoRA against the best approximation of that rank (Eckart-Young, from numpy's SVD) and the
reported truncation error against its residual.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import iteris_daemon.plugins.baselines_math as baselines_math
from iteris_daemon.lora import LoraAdapter
from test_lora_2025 import MODULES, _adapters, _deltas, _merge

FULL = 64  # past min(d_out, d_in) of every module in MODULES: no truncation


def reference_ties(deltas: list[np.ndarray], weights: list[float], density: float) -> np.ndarray:
    trimmed = []
    for D in deltas:
        k = max(1, int(round(density * D.size)))
        if k >= D.size:
            trimmed.append(D)
            continue
        threshold = np.sort(np.abs(D), axis=None)[D.size - k]  # the k-th largest magnitude
        trimmed.append(np.where(np.abs(D) >= threshold, D, 0.0))
    T = np.stack(trimmed) * np.asarray(weights)[:, None, None]
    elected = np.sign(T.sum(axis=0))
    agree = (np.sign(T) == elected) & (T != 0)
    return (T * agree).sum(axis=0) / np.maximum(agree.sum(axis=0), 1)


def _weights_of(adapters, path, weights):
    return [w for a, w in zip(adapters, weights) if path in a.modules]


def _relative(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("density, weights", [(0.2, [1.0, 1.0, 1.0, 1.0]), (0.5, [1.0, 0.5, 2.0, 0.3]),
                                              (1.0, [0.7, 0.7, 0.7, 0.7]), (0.01, [1.0, 1.0, 1.0, 1.0])])
@pytest.mark.parametrize("band", [None, 1, 7, 29])  # entries per band (None: the shipped size, one band here)
def test_ties_matches_the_dense_reference(seed, density, weights, band, monkeypatch):
    """Bands of one row, of a few rows with a short last band, and of one row and a bit
    (29 > d_in for two modules) give the same merge as one band."""
    if band is not None:
        monkeypatch.setattr(baselines_math, "CHUNK_ENTRIES", band)
    adapters = _adapters(seed)
    result = _merge("ties", adapters, density=density, weights=weights, target_rank=FULL)
    assert set(result.modules) == set(MODULES)
    for path, (B, A) in result.modules.items():
        deltas = [d.numpy() for d in _deltas(adapters, path)]
        expected = reference_ties(deltas, _weights_of(adapters, path, weights), density)
        assert _relative((B.double() @ A.double()).numpy(), expected) < 1e-6, path


@pytest.mark.parametrize("band", [None, 7])
def test_dare_without_drops_is_task_arithmetic(band, monkeypatch):
    if band is not None:
        monkeypatch.setattr(baselines_math, "CHUNK_ENTRIES", band)
    adapters = _adapters(2)
    weights = [1.0, 0.5, 2.0, 0.3]
    result = _merge("dare", adapters, drop_rate=0.0, weights=weights, target_rank=FULL)
    for path, (B, A) in result.modules.items():
        expected = sum(w * d for w, d in zip(_weights_of(adapters, path, weights), _deltas(adapters, path)))
        assert _relative((B.double() @ A.double()).numpy(), expected.numpy()) < 1e-6, path


@pytest.mark.parametrize("drop_rate", [0.3, 0.9])
@pytest.mark.parametrize("band", [None, 7])
def test_dare_keeps_about_1_minus_p_of_the_entries_rescaled(drop_rate, band, monkeypatch):
    if band is not None:
        monkeypatch.setattr(baselines_math, "CHUNK_ENTRIES", band)
    adapters = _adapters(3)[:1]
    result = _merge("dare", adapters, drop_rate=drop_rate, weights=[2.0], target_rank=FULL)
    kept = total = 0
    for path, (B, A) in result.modules.items():
        merged = (B.double() @ A.double()).numpy()
        (delta,) = [d.numpy() for d in _deltas(adapters, path)]
        rescaled = 2.0 * delta / (1 - drop_rate)
        is_kept = np.abs(merged - rescaled) <= 1e-5 * np.abs(rescaled).max()
        is_dropped = np.abs(merged) <= 1e-5 * np.abs(rescaled).max()
        assert (is_kept | is_dropped).all(), path  # every entry is one or the other
        kept, total = kept + int(is_kept.sum()), total + merged.size
    # 1,212 entries: the kept fraction is within 5 standard deviations of 1 - p
    assert abs(kept / total - (1 - drop_rate)) < 5 * (drop_rate * (1 - drop_rate) / total) ** 0.5


@pytest.mark.parametrize("band", [None, 7])
def test_dare_draws_each_task_its_own_mask(band, monkeypatch):
    """Two tasks with the same delta and opposite weights: equal masks would cancel out."""
    if band is not None:
        monkeypatch.setattr(baselines_math, "CHUNK_ENTRIES", band)
    (first,) = _adapters(6)[:1]
    twin = LoraAdapter(name="twin", path=first.path, config={}, modules=dict(first.modules))
    result = _merge("dare", [first, twin], drop_rate=0.5, weights=[1.0, -1.0], target_rank=FULL)
    for path, (B, A) in result.modules.items():
        merged = (B.double() @ A.double()).numpy()
        delta = first.modules[path].delta().numpy()
        nonzero = np.abs(merged) > 1e-5 * np.abs(delta).max()
        assert 0.25 < nonzero.mean() < 0.75, path  # kept by exactly one of the two: half the entries


def test_dare_is_reproducible_by_seed():
    adapters = _adapters(4)
    runs = [_merge("dare", adapters, seed=seed, target_rank=FULL) for seed in (7, 7, 8)]
    for path in MODULES:
        first, again, other = (r.modules[path][0] @ r.modules[path][1] for r in runs)
        assert torch.equal(first, again) and not torch.allclose(first, other)


@pytest.mark.parametrize("strategy, weights", [("dare", [1.0, 0.5, 2.0, 0.3]), ("knots", None)])
def test_a_drop_does_not_follow_the_order_of_the_adapters(strategy, weights):
    """One generator drawn over the adapters in turn gave each adapter's mask by its place: the
    same adapters and seed, listed in another order, merged ~100% apart (QA). Now each mask is
    drawn from the seed, the adapter's name and the layer; another seed still draws others."""
    adapters = _adapters(5)
    orders = [[0, 1, 2, 3], [3, 1, 0, 2], [2, 3, 1, 0]]
    runs = [_merge(strategy, [adapters[i] for i in order], seed=3, drop_rate=0.5, target_rank=FULL,
                   **({"weights": [weights[i] for i in order]} if weights else {})) for order in orders]
    other = _merge(strategy, adapters, seed=4, drop_rate=0.5, target_rank=FULL, **({"weights": weights} if weights else {}))
    for path in MODULES:
        first, *rest = ((r.modules[path][0] @ r.modules[path][1]).numpy() for r in runs)
        assert all(_relative(again, first) < 1e-10 for again in rest), path
        assert _relative((other.modules[path][0] @ other.modules[path][1]).numpy(), first) > 0.05, path


def test_dare_takes_every_seed_torch_takes_and_refuses_the_rest_naming_it():
    """2**64 passed validation, then failed inside torch after the base model loaded, naming
    no parameter ("Overflow when unpacking long long")."""
    from iteris_daemon.errors import ParameterError
    from iteris_daemon.plugin_manager import get_strategy
    from iteris_daemon.strategy import parse_params

    adapters = _adapters(4)
    for seed in (-(2**63), 2**64 - 1):
        assert _merge("dare", adapters, seed=seed).modules
    for seed in (-(2**63) - 1, 2**64):
        with pytest.raises(ParameterError, match="seed: Input should be"):
            parse_params(get_strategy("dare"), {"seed": seed})


def test_the_dense_result_is_written_as_its_best_low_rank_approximation():
    adapters = _adapters(5)
    result = _merge("ties", adapters, density=0.3)  # target rank: the sum of the ranks present
    worst = 0.0
    for path, (B, A) in result.modules.items():
        deltas = [d.numpy() for d in _deltas(adapters, path)]
        dense = reference_ties(deltas, [1.0] * len(deltas), 0.3)
        rank = sum(a.modules[path].rank for a in adapters if path in a.modules)
        U, S, Vh = np.linalg.svd(dense, full_matrices=False)
        best = (U[:, :rank] * S[:rank]) @ Vh[:rank]
        assert A.shape[0] == min(rank, *dense.shape)
        assert _relative((B.double() @ A.double()).numpy(), best) < 1e-6, path
        worst = max(worst, float(np.sqrt((S[rank:] ** 2).sum() / (S ** 2).sum())))
    assert worst > 0.01  # the modules' TIES results are of higher rank than the sum: truncated
    assert result.metrics["truncation_error"]["max"] == pytest.approx(worst, rel=1e-9)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("strategy, raw", [("ties", {"density": 0.3}), ("dare", {"seed": 3})])
def test_on_cuda_the_merge_is_the_cpus(strategy, raw):
    """The merged matrix and its low-rank factors are computed on the merge device, and
    the factors come back to the CPU."""
    from iteris_daemon.plugin_manager import get_strategy
    from iteris_daemon.strategy import MergeInputs, parse_params

    adapters = _adapters(5)
    chosen = get_strategy(strategy)

    def merge(device: str):
        inputs = MergeInputs(base=None, adapters=adapters, calibration=[None] * len(adapters), device=device)
        return chosen.merge(inputs, parse_params(chosen, raw), lambda items, **_: items)

    cpu = merge("cpu")
    torch.cuda.reset_peak_memory_stats()
    cuda = merge("cuda")
    largest = max(B.shape[0] * A.shape[1] for B, A in cpu.modules.values())
    assert torch.cuda.max_memory_allocated() >= largest * 8  # a float64 merged matrix was on the GPU
    for path, (B, A) in cpu.modules.items():
        B_cuda, A_cuda = cuda.modules[path]
        assert B_cuda.device.type == A_cuda.device.type == "cpu"
        assert _relative((B_cuda.double() @ A_cuda.double()).numpy(), (B.double() @ A.double()).numpy()) < 1e-5, path
    assert cuda.metrics["truncation_error"]["max"] == pytest.approx(cpu.metrics["truncation_error"]["max"], rel=1e-6)
