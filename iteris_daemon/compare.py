"""Several strategies on the same adapters, scored on calibration samples none of them merged from.

A merge report's per-task figures are measured on the samples the merge used, and a
strategy that reads calibration data (IterIS, RegMean) fits those samples, so comparing
reports favours it. ``compare`` holds out a seeded fraction of each task's samples, lets
every strategy merge from the rest, and scores every merge on the held-out samples with the
label-free figures of :mod:`iteris_daemon.evaluation` (fidelity gap: 0 behaves like the
task's own adapter, 1 no better than the base model), all on identical batches. The base
model is loaded once; a strategy that cannot merge these adapters gets its error in its
row and the others go on.
"""

from __future__ import annotations

import logging
import random
import re
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from tqdm.auto import tqdm

from .calibration import CalibrationOptions, CalibrationSet, Sample
from .errors import InputsChangedError, IterisError, ParameterError
from .evaluation import evaluate
from .figures import summary, text
from .merge import (AdapterSpec, base_and_head, calibration_for, evaluation_settings, load_adapters, merged_head,
                    run_strategy)
from .plugin_manager import get_strategy, strategies
from .strategy import (MergeInputs, MergeStrategy, StrategyParams, check_per_adapter, engine_int, parse_param,
                       parse_params, unique_params)

log = logging.getLogger(__name__)


@dataclass
class Contender:
    """One strategy with its parameters, named as the user wrote it (``knots:alpha=0.5``)."""

    label: str
    strategy: MergeStrategy
    params: StrategyParams


def parse_contender(spec: str) -> Contender:
    """``NAME`` or ``NAME:KEY=VALUE[:KEY=VALUE...]``, checked against the strategy's parameters.
    A ``:`` starts the next assignment only before ``KEY=``: a value may hold one (``label="a:b"``)."""
    name, colon, rest = spec.partition(":")
    assignments = re.split(r":(?=\s*[A-Za-z_]\w*\s*=)", rest) if colon else []
    strategy = get_strategy(name.strip())
    if any(not a.strip() for a in assignments):
        raise ParameterError(f"strategy {spec!r}: expected NAME:KEY=VALUE[:KEY=VALUE...]")
    pairs = unique_params([parse_param(a) for a in assignments], f"strategy {spec!r}: ")
    return Contender(spec, strategy, parse_params(strategy, pairs))


@dataclass
class CompareRequest:
    base_model: str
    adapters: list[AdapterSpec]
    strategies: list[str] = field(default_factory=list)  # contender specs; empty: every registered strategy
    holdout: float = 0.2  # fraction of each task's calibration samples held out for scoring
    max_samples: int | None = 1000  # the first samples of each task's calibration read (None: all)
    seed: int = 0  # which samples are held out
    device: str = "cpu"
    dtype: str = "float32"
    offload: str = "auto"
    trust_remote_code: bool = False
    modules_to_save_rule: str = "agree"
    calibration: CalibrationOptions | None = None
    calibration_sets: list[CalibrationSet] | None = None  # already gathered (a daemon group's: `compare --group`)
    base_checked: bool = False  # a daemon group's: registered against base_model (see MergeRequest)
    contenders: list[Contender] = field(default_factory=list)  # compared first, before ``strategies``
    batch_size: int = 16  # scoring batches, the same for every strategy
    max_length: int = 128
    quiet: bool = False


def _runnable() -> list[str]:
    """Every registered strategy that merges at its defaults: one with a required parameter
    (a plugin's) is left out with a warning, not the whole comparison refused."""
    names = []
    for name in strategies():
        try:
            parse_contender(name)
        except ParameterError as exc:
            log.warning("compare: strategy %s left out: %s (name it with --strategy %s:KEY=VALUE)", name, exc, name)
            continue
        names.append(name)
    return names


def _merge_of(contender: Contender) -> tuple[str, str]:
    """What a contender merges: its strategy and parameters (two labels may name one merge)."""
    return contender.strategy.name, contender.params.model_dump_json()


def run_compare(request: CompareRequest) -> dict[str, Any]:
    """Merge with each contender, score each on the held-out samples; best mean first."""
    if not 0 < request.holdout < 1:
        raise ParameterError(f"holdout must be between 0 and 1 (exclusive), got {request.holdout}")
    contenders = [*request.contenders, *(parse_contender(spec) for spec in request.strategies)]
    seen: dict[tuple[str, str], str] = {}
    for contender in contenders:  # one merge twice would be two rows no one can tell apart
        merge = _merge_of(contender)
        if merge in seen:
            raise ParameterError(f"strategy {contender.label!r} merges what {seen[merge]!r} does: give it once")
        seen[merge] = contender.label
        check_per_adapter(contender.strategy, contender.params, len(request.adapters))
    if not request.strategies:  # every strategy at its defaults, but those a group's already merges
        contenders += [c for c in map(parse_contender, _runnable()) if _merge_of(c) not in seen]
    progress = partial(tqdm, disable=request.quiet, dynamic_ncols=True)
    adapters = load_adapters(request.adapters, request.base_checked, request.base_model)
    if request.calibration_sets is not None:
        calibration = list(request.calibration_sets)
    else:  # a training set given as calibration is not read whole: held out, 20% of it was scored per strategy
        options = request.calibration or CalibrationOptions()
        options.limit = request.max_samples
        calibration = calibration_for(adapters, request.adapters, options, request.base_model, required=True)
    # Each task's own seeded draw: which samples it holds out does not depend on the order of
    # the adapters or on the other tasks
    kept, held = zip(*(data.split(request.holdout, random.Random(f"{request.seed}:{adapter.name}"), "holdout")
                       for adapter, data in zip(adapters, calibration)))
    base, head = base_and_head(adapters, request)
    base.require_text()  # every contender is scored on held-out text
    rows, interrupted = [], None
    for number, contender in enumerate(contenders, start=1):
        log.info("merging with %s (%d of %d)", contender.label, number, len(contenders))
        samples = engine_int(contender.params, "samples_per_task") if contender.strategy.needs_calibration else None
        inputs = MergeInputs(base, adapters, [data.head(samples) for data in kept], request.device, head)
        try:
            started = time.perf_counter()
            result = run_strategy(contender.strategy, contender.params, inputs, progress)
            seconds = time.perf_counter() - started
            tasks = evaluate(base, adapters, list(held), result.modules, head, request.batch_size,
                             request.max_length, progress, **evaluation_settings(contender.params))
        except KeyboardInterrupt:  # Ctrl-C an hour in: the rows finished are kept, and said
            if not rows:
                raise
            interrupted = contender.label
            break
        except Exception as exc:  # one contender's failure must not lose the other rows
            rows.append({"strategy": contender.label, "error": _failure(contender.label, exc)})
            if isinstance(exc, InputsChangedError):  # the next contenders get the adapters as they were read
                adapters = load_adapters(request.adapters, request.base_checked)
                head = merged_head(adapters, request.modules_to_save_rule)
            continue
        rows.append(_row(contender.label, seconds, tasks))
    rows.sort(key=lambda row: (row.get("error") is not None, row.get("mean_fidelity_gap", 0.0)))
    return {
        "base_model": request.base_model,
        "holdout": request.holdout,
        "seed": request.seed,
        "dtype": request.dtype,
        "tasks": [{"name": a.name, "calibration": data.source, "merged_from": len(k.samples),
                   "held_out": [_shown(sample) for sample in h.samples]}
                  for a, data, k, h in zip(adapters, calibration, kept, held)],
        "strategies": rows,
        **({"interrupted": {"at": interrupted, "not_run": [c.label for c in contenders[len(rows) + 1:]]}}
           if interrupted else {}),
    }


def _shown(sample: Sample) -> str | list[str]:
    """A held-out sample in the report: its text, or ``[text, text_pair]`` for a sentence pair."""
    return sample.text if sample.text_pair is None else [sample.text, sample.text_pair]


def _failure(label: str, exc: Exception) -> str:
    """A contender's error, logged as ``merge`` says it: one line (these adapters are not for
    that strategy; a plugin's bug, named), its cause's traceback with ``-v``; an error
    outside the strategy's checks (the evaluation's) with its traceback."""
    if not isinstance(exc, IterisError):
        log.error("%s failed", label, exc_info=exc)
        return f"{type(exc).__name__}: {exc}"
    log.warning("%s: %s", label, exc)
    if exc.__cause__ is not None:
        log.debug("caused by", exc_info=exc.__cause__)
    return str(exc)


def _row(label: str, seconds: float, tasks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "strategy": label,
        **summary(tasks),
        "merge_seconds": round(seconds, 3),
        "tasks": {name: {key: figures[key] for key in ("fidelity_gap", "alignment_loss", "next_token_loss")
                         if key in figures}
                  for name, figures in tasks.items()},
    }


def render(report: dict[str, Any]) -> str:
    """The comparison as a table, best mean fidelity gap first."""
    names = [task["name"] for task in report["tasks"]]
    counts = {(len(t["held_out"]), t["merged_from"]) for t in report["tasks"]}
    held = ", ".join(f"{h} of {h + m}" for h, m in sorted(counts))
    lines = [f"fidelity gap on held-out calibration samples ({held} per task, seed {report['seed']}): "
             "0 = the task's own adapter, 1 = no better than the base model"]
    scored = [row for row in report["strategies"] if "error" not in row]
    added = bool(scored) and all("mean_added_loss" in row for row in scored)
    if added:
        lines[0] += ("; +loss: the merge's next-token loss minus the task adapter's, nats per token, "
                     "mean over tasks")
    # Each column as wide as its widest cell: a gap of 10 or more shifted the row's other columns.
    cells = [[text(row.get("mean_fidelity_gap")),
              f"{row['worst_task']} ({row['worst_fidelity_gap']:.4f})" if "worst_task" in row else "-",
              f"{row['merge_seconds']:.2f}", *([f"{row['mean_added_loss']:.4f}"] if added else []),
              *(text(row["tasks"][n]["fidelity_gap"]) for n in names)] for row in scored]
    header = ["mean", "worst task", "merge s", *(["+loss"] if added else []), *names]
    least = [7, max(10, *(len(n) + 9 for n in names)), 8, *([7] if added else []), *(7 for _ in names)]
    widths = [max(low, len(h), *(len(c[k]) for c in cells)) for k, (h, low) in enumerate(zip(header, least))]
    label_width = max(8, *(len(row["strategy"]) for row in report["strategies"]))

    def line(label: str, values: list[str]) -> str:
        # the worst task reads left to right, the figures line up on the right
        return f"{label:{label_width}}  " + "  ".join(
            f"{v:{w}}" if k == 1 else f"{v:>{w}}" for k, (v, w) in enumerate(zip(values, widths)))

    lines.append(line("strategy", header))
    rows = iter(cells)
    for row in report["strategies"]:
        lines.append(f"{row['strategy']:{label_width}}  error: {row['error']}" if "error" in row
                     else line(row["strategy"], next(rows)))
    return "\n".join(lines)
