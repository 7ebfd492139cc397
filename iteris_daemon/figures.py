"""One merge's per-task figures summed up: the mean and worst fidelity gap, and for a
language model what the merge adds to the tasks' next-token loss. Torch-free: ``status``,
the gates and ``compare`` all read the figures a merge report holds
(:mod:`iteris_daemon.evaluation` measures them)."""

from __future__ import annotations

from typing import Any


def number(value: Any) -> bool:
    """A figure that is a real number (read back from JSON: not a bool, not missing)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def whole_number(value: Any) -> bool:
    """An int that is not a bool (``True`` is an int to Python, and JSON's ``true`` reads as one)."""
    return isinstance(value, int) and not isinstance(value, bool)


def task_figures(tasks: Any) -> dict[str, dict[str, Any]]:
    """A report's (or a recorded run's) ``tasks``, keeping the entries that are figures (dicts)."""
    return {name: figures for name, figures in tasks.items() if isinstance(figures, dict)} if isinstance(tasks, dict) else {}


def fidelity_gaps(tasks: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Per task with a fidelity gap that is a number (null: its adapter moves no output)."""
    return {name: figures["fidelity_gap"] for name, figures in tasks.items() if number(figures.get("fidelity_gap"))}


def added_losses(tasks: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Per task with a next-token loss: the merge's minus the task adapter's (nats per token)."""
    losses = {name: figures.get("next_token_loss") for name, figures in tasks.items()}
    return {name: loss["merged"] - loss["task"] for name, loss in losses.items()
            if isinstance(loss, dict) and number(loss.get("merged")) and number(loss.get("task"))}


def summary(tasks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``mean_fidelity_gap``, ``worst_task`` and ``worst_fidelity_gap``; ``mean_added_loss``
    too when every task has a next-token loss. Empty when no task has figures."""
    gaps = fidelity_gaps(tasks)
    if not gaps:
        return {}
    worst = max(gaps, key=gaps.__getitem__)
    found = {"mean_fidelity_gap": sum(gaps.values()) / len(gaps), "worst_task": worst,
             "worst_fidelity_gap": gaps[worst]}
    added = added_losses(tasks)
    if added and len(added) == len(tasks):
        found["mean_added_loss"] = sum(added.values()) / len(added)
    return found


def text(value: Any) -> str:
    """A figure to 4 decimals for tables; "-" where it is undefined (null: a task whose
    adapter does not move the outputs) or missing."""
    return f"{value:.4f}" if number(value) else "-"
