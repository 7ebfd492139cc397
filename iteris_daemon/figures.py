"""One merge's per-task figures summed up: the mean and worst fidelity gap, and for a
language model what the merge adds to the tasks' next-token loss. Torch-free: ``status``,
the gates and ``compare`` all read the figures a merge report holds
(:mod:`iteris_daemon.evaluation` measures them)."""

from __future__ import annotations

from typing import Any


def added_losses(tasks: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Per task with a next-token loss: the merge's minus the task adapter's (nats per token)."""
    return {name: figures["next_token_loss"]["merged"] - figures["next_token_loss"]["task"]
            for name, figures in tasks.items() if "next_token_loss" in figures}


def summary(tasks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``mean_fidelity_gap``, ``worst_task`` and ``worst_fidelity_gap``; ``mean_added_loss``
    too when every task has a next-token loss. Empty when no task has figures."""
    gaps = {name: figures["fidelity_gap"] for name, figures in tasks.items() if "fidelity_gap" in figures}
    if not gaps:
        return {}
    worst = max(gaps, key=gaps.__getitem__)
    found = {"mean_fidelity_gap": sum(gaps.values()) / len(gaps), "worst_task": worst,
             "worst_fidelity_gap": gaps[worst]}
    added = added_losses(tasks)
    if added and len(added) == len(tasks):
        found["mean_added_loss"] = sum(added.values()) / len(added)
    return found
