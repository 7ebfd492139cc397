"""The README.md model card of a merged adapter: the merge writes one into its folder (what
``merge --out`` and the folder publisher's versions hold, and what a hand upload takes);
the Hub publisher commits one rendered from its request, which also names the group, the
run and each input's source and revision. One renderer makes both.

The YAML front matter is what the Hub indexes (``base_model_relation: merge`` puts the
adapter in the base model's "merges" tree; ``library_name: peft`` gives it the PEFT
loading snippet); the body tells a reader what went in and how well it merged. Only
what the merge report or the publish request holds is shown: names, locators, revisions,
parameters and figures, never settings of the destination (tokens, endpoints). The card
beside the merge names local folders and files by their paths (it stays on this machine);
the Hub publisher's names them by their last name alone (:func:`~.publish.local_name`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from huggingface_hub import ModelCardData

from .figures import number, task_figures
from .logs import counted
from .publish import PublishRequest, local_name

_REVISION_CHARS = 12


def render_model_card(request: PublishRequest) -> str:
    """README.md text for ``request``'s merged adapter, as the Hub publisher commits it: a local
    base model or input by its name, not its path."""
    return _card(
        heading=f"`{_code(request.group)}`: merged LoRA adapter", base_model=request.base_model,
        named=local_name, strategy=request.strategy,
        origin=f" (group `{_code(request.group)}`, run {request.run_id})",
        columns=["name", "source", "locator", "revision"],
        inputs=[[_literal(i.name), _literal(i.source), _literal(local_name(i.locator)),
                 _literal(i.revision[:_REVISION_CHARS])] for i in request.inputs],
        params=request.params, tasks=request.metrics, not_evaluated=request.not_evaluated, dtype=request.dtype)


def merge_card(config: dict[str, Any], report: dict[str, Any]) -> str:
    """README.md text written beside a merged adapter, from its ``adapter_config.json`` (the base
    model as the adapter names it) and its ``merge_report.json``."""
    return _card(
        heading="Merged LoRA adapter", base_model=config["base_model_name_or_path"], named=str,
        strategy=report["strategy"], origin="", columns=["name", "path", "sha256"],
        inputs=[[_literal(i["name"]), _literal(i["path"]), _literal((i.get("sha256") or "")[:_REVISION_CHARS])]
                for i in report["inputs"]],
        params=report["params"], tasks=report["tasks"], not_evaluated=report.get("not_evaluated") or {},
        dtype=report.get("dtype"))


def _card(heading: str, base_model: str, named: Callable[[str], str], strategy: str, origin: str,
          columns: list[str], inputs: list[list[str]], params: dict[str, Any], tasks: dict[str, Any],
          not_evaluated: dict[str, str], dtype: str | None) -> str:
    """YAML front matter, then Markdown: a heading, what was merged (the base model as ``named``
    shows it), a row per input, the parameters and each task's figures, with the compute dtype
    they were measured in (a bfloat16 pass moves them by more than the merge's own error can),
    and the tasks without figures, with why (a reader took a missing row for a complete table)."""
    data = ModelCardData(
        # The Hub takes a repo id there; a local folder (made absolute by the config) is none.
        base_model=None if base_model.startswith("/") else base_model,
        library_name="peft",
        tags=["iteris-daemon", "lora", "merge", strategy],
        base_model_relation="merge",
    )
    sections = [
        f"# {heading}",
        f"Merged by iteris-daemon with the `{_code(strategy)}` strategy from "
        f"{counted(len(inputs), 'LoRA adapter')} of `{_code(named(base_model))}`{origin}.",
        "## Input adapters\n\n" + _table(columns, inputs),
        "## Strategy parameters\n\n```json\n" + json.dumps(params, indent=2, sort_keys=True, default=str) + "\n```",
    ]
    header, metrics = _metrics_rows(tasks)
    if metrics:
        measured = f"Measured with the base model in `{_code(dtype)}`.\n\n" if dtype else ""
        sections.append("## Per-task metrics\n\n" + measured + _table(header, metrics))
    if not_evaluated:
        sections.append("Not evaluated: " + "; ".join(f"{_literal(name)} ({why})" for name, why in not_evaluated.items())
                        + ".")
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"


def _metrics_rows(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The header, and one row per task that has figures; the alignment loss is a per-iteration
    history, show its end. A language model's next-token losses get two columns more."""
    tasks = task_figures(metrics)
    language_model = bool(tasks) and all(isinstance(f.get("next_token_loss"), dict) for f in tasks.values())
    header = ["task", "alignment loss (last)", "fidelity gap"]
    if language_model:
        header += ["next-token loss, task adapter", "next-token loss, merge"]
    rows = []
    for task, figures in tasks.items():
        loss = figures.get("alignment_loss")
        if isinstance(loss, list):
            loss = loss[-1] if loss else None
        row = [_literal(task), _number(loss), _number(figures.get("fidelity_gap"))]
        if language_model:
            row += [_number(figures["next_token_loss"].get(key)) for key in ("task", "merged")]
        rows.append(row)
    return header, rows


def _number(value: Any) -> str:
    return f"{value:.4g}" if number(value) else "n/a"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: str) -> str:
    """A table cell cannot hold a pipe or a line break."""
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _code(value: str) -> str:
    """Inline code cannot hold a backtick or a line break."""
    return str(value).replace("`", "'").replace("\n", " ")


def _literal(value: str) -> str:
    """A name as inline code: a folder named ``*x*`` or ``[l](http://e)`` is no emphasis or link."""
    return f"`{_code(value)}`"
