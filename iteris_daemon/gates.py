"""Publish gates: what a finished merge must show before the daemon publishes it.

Judged on the merge report's per-task figures, which the merge measured on the
calibration data (see :mod:`iteris_daemon.evaluation`):

1. every figure is finite (non-finite *weights* never get this far: the merge refuses them);
2. no task's fidelity gap exceeds ``max_fidelity_gap`` (1.0 = no better than the base model);
3. for a language model that generates, no task's next-token loss under the merge exceeds
   its own adapter's by more than ``max_added_loss`` nats per token (off by default);
4. the mean fidelity gap is not worse than the published merge's, measured on the same
   batches, by more than ``max_regression``; only this one can be forced.

A task the merge could not evaluate (an adapter a data-free strategy merged without
calibration data) is named in a note and held to none of them; the others are, the quality
gate's mean taken over them alone (the reference is scored on the same tasks' batches).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .config import Gates
from .figures import added_losses, fidelity_gaps


@dataclass
class Verdict:
    refused: str | None = None  # why the merge must not be published
    notes: list[str] = field(default_factory=list)  # what was not checked, or was forced past


def judge(report: dict[str, Any], gates: Gates, forced: bool = False, no_baseline: str | None = None) -> Verdict:
    """``no_baseline``: why the run had no published merge to compare with, when one was published."""
    tasks: dict[str, dict[str, Any]] = report.get("tasks") or {}
    unscored = _not_evaluated(report)
    if not tasks:
        return Verdict(notes=[f"no task evaluated{f' ({unscored})' if unscored else ''}: gates not applied"])
    # The gates hold the tasks evaluated (one adapter without data had let every task through unjudged).
    notes = [f"no gate applied to the tasks not evaluated ({unscored})"] if unscored else []
    for name, figures in tasks.items():
        broken = [key for key, value in figures.items() if not _finite(value)]
        if broken:
            return Verdict(f"task {name}: {', '.join(broken)} is not finite", notes)
    gaps = fidelity_gaps(tasks)  # a task whose adapter moves no output has none: nothing to hold it to
    refused = _beyond(gaps, gates.max_fidelity_gap, "fidelity gap", "max_fidelity_gap",
                      "1.0 means no better than the base model")
    if refused:
        return Verdict(refused, notes)
    verdict = Verdict(notes=notes)
    if gates.max_added_loss is not None:
        added = added_losses(tasks)
        refused = _beyond(added, gates.max_added_loss, "added next-token loss", "max_added_loss",
                          "nats per token over the task's own adapter")
        if refused:
            return Verdict(refused, notes)
        if not added:
            verdict.notes.append("max_added_loss: not applied (the model is not a language model that generates)")
    references = [tasks[name].get("reference_fidelity_gap") for name in gaps]
    if gates.max_regression is None:
        return verdict
    if not gaps:
        verdict.notes.append("quality gate: no comparison (no task's adapter changes its outputs)")
        return verdict
    if any(value is None for value in references):
        note = no_baseline or (report.get("reference") or {}).get("note") or "nothing published yet"
        verdict.notes.append(f"quality gate: no comparison ({note})")
        return verdict
    new, old = _mean(gaps.values()), _mean(references)
    if new - old > gates.max_regression + ROUNDING:
        reason = (f"quality gate: mean fidelity gap {_shown(new, old)} is worse than the published merge's "
                  f"{_shown(old, new)} by more than max_regression {gates.max_regression} (both scored on this "
                  "run's tasks and calibration samples)")
        if not forced:
            return Verdict(reason + " (merge-now --force publishes it anyway)")
        verdict.notes.append(f"forced past the {reason}")
    return verdict


ROUNDING = 1e-9  # a regression of exactly max_regression passes, whatever the subtraction rounds to


def _shown(value: float, other: float) -> str:
    """``value`` with 3 decimals, or as many more as it takes not to read as ``other`` (a gap
    of 1.5004 refused at 1.5 read "1.500 exceeds 1.5")."""
    for digits in range(3, 12):
        text = f"{value:.{digits}f}"
        if float(text) != float(f"{other:.{digits}f}"):
            return text
    return repr(value)


def _beyond(values: dict[str, float], limit: float | None, figure: str, setting: str, meaning: str) -> str | None:
    """Why the merge is refused when some task's ``figure`` exceeds ``limit``: every such task,
    worst first (naming only the worst would hide the others); None when none does."""
    beyond = [] if limit is None else sorted((n for n in values if values[n] > limit), key=values.__getitem__,
                                             reverse=True)
    if not beyond:
        return None
    named = ", ".join(f"task {name}: {figure} {_shown(values[name], limit)}" for name in beyond)
    return f"{named} {'exceeds' if len(beyond) == 1 else 'exceed'} {setting} {limit} ({meaning})"


def _not_evaluated(report: dict[str, Any]) -> str:
    """The tasks the merge did not evaluate, each with why (``task c: no calibration data``);
    empty where it evaluated every one it could, or the report predates ``not_evaluated``."""
    unscored = report.get("not_evaluated")
    return "; ".join(f"task {name}: {why}" for name, why in unscored.items()) if isinstance(unscored, dict) else ""


def _finite(value: Any) -> bool:
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)
