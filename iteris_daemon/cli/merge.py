"""``iteris-daemon merge`` (one merge, no daemon) and ``iteris-daemon plugins``; the options
that name a base model and its adapters (``compare`` takes them too)."""

from __future__ import annotations

import argparse
import json
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from ..paths import user_path
from ..strategy import DEFAULT_STRATEGY

MERGE_EPILOG = """\
examples:
  iteris-daemon merge --base-model ./minilm --adapter loras/sst2 --adapter loras/news=news.jsonl --out merged
  iteris-daemon merge --base-model gpt2 --adapter a --adapter b --strategy ties --param density=0.3 --out m

calibration data (JSON Lines, one {"text": ...} object per line, optional "text_pair" for
sentence-pair tasks and "target" for encoder-decoder models, or a conversation
{"messages": [{"role": ..., "content": ...}, ...]}
rendered with the tokenizer's chat template) comes from DIR=FILE when given, else
DIR/calibration.jsonl.
Strategy parameters: `iteris-daemon plugins --params STRATEGY`.
The merged adapter is a standard PEFT LoRA folder (load it with PeftModel.from_pretrained);
merge_report.json beside it records inputs, parameters, timings and per-task quality, and
README.md is its model card (base model, inputs, figures) for the Hub."""


def _adapter_spec(value: str):
    from ..merge import AdapterSpec

    # Path("") is the current folder: an unset variable (--adapter "$DIR") or =FILE merged it, as a task named ""
    if not value:
        raise argparse.ArgumentTypeError("no folder given (an empty value: an unset shell variable?); the current "
                                         "folder is .")
    if value.startswith("=") and not user_path(value).is_dir():
        raise argparse.ArgumentTypeError(f"{value}: no folder before '=' (DIR=CALIBRATION.jsonl; the current folder "
                                         "is .)")
    if user_path(value).is_dir():  # a folder whose name holds "=" (a sweep's "lr=1e-4")
        return AdapterSpec(user_path(value))
    for at in (i for i, char in enumerate(value) if char == "="):  # the "=" after a folder that exists
        if at + 1 < len(value) and user_path(value[:at]).is_dir():
            return AdapterSpec(user_path(value[:at]), user_path(value[at + 1:]))
    path, sep, calibration = value.rpartition("=")  # neither exists: the errors name these
    if sep and path and calibration:
        return AdapterSpec(user_path(path), user_path(calibration))
    return AdapterSpec(user_path(value))


def _param(value: str) -> tuple[str, Any]:
    from ..errors import ParameterError
    from ..strategy import parse_param

    try:
        return parse_param(value)
    except ParameterError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(commands) -> None:

    merge = commands.add_parser(
        "merge",
        help="merge adapters once and write a PEFT adapter folder",
        description="Merge LoRA adapters of one base model into one PEFT LoRA adapter.",
        epilog=MERGE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_input_arguments(merge)
    merge.add_argument("--strategy", action="append", default=[],  # a list, so that a second one is refused
                       help=f"merge strategy (default: {DEFAULT_STRATEGY}; see `plugins`)")
    merge.add_argument(
        "--param", action="append", type=_param, default=[], metavar="KEY=VALUE",
        help="strategy parameter; VALUE is JSON when it parses (3, 0.1, true, [1,2]) else a string (not when "
             "it starts like a number, list or object: .5 is an error)",
    )
    merge.add_argument("--out", required=True, type=user_path, metavar="DIR", help="output adapter folder")
    merge.add_argument("--overwrite", action="store_true", help="replace a non-empty --out holding a previous merge (atomically; a "
                       "folder without merge_report.json is refused; a file is replaced)")
    merge.add_argument("--output-dtype", choices=["float32", "bfloat16", "float16"],
                       help="dtype of the merged adapter's weights (default: the input adapters', the widest when they "
                            "differ)")
    merge.add_argument("--exact-ranks", action="store_true",
                       help="write each layer at its own rank (rank_pattern/alpha_pattern: a smaller file that only "
                            "PEFT >= 0.15 loads) instead of zero-padding every layer to the largest rank (default; one "
                            "r = lora_alpha that llama.cpp, vLLM and TGI read too)")
    merge.add_argument("--no-eval", action="store_true", help="skip the per-task alignment loss / fidelity evaluation")
    merge.set_defaults(handler=_merge)

    plugins = commands.add_parser(
        "plugins", help="list loaded plugins, strategies and their parameters",
        description="List the loaded plugins and what they provide: merge strategies, calibration sources and "
                    "publishers (destination kinds); --params NAME shows a strategy's parameters, or the settings a "
                    "daemon config gives a calibration source or a destination kind.",
    )
    plugins.add_argument("--params", metavar="NAME",
                         help="show the parameters of the strategy NAME, or the settings of the calibration source or "
                              "destination kind NAME (KIND:NAME where two share a name; KIND is strategy, "
                              "calibration or destination)")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.set_defaults(handler=_plugins)


def add_input_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The base model, the adapters and their calibration data, and where the model runs."""
    parser.add_argument("--base-model", required=required, metavar="PATH_OR_ID", help="base model folder or Hub id")
    parser.add_argument(
        "--adapter",
        required=required,
        action="append",
        type=_adapter_spec,
        metavar="DIR[=CALIBRATION.jsonl]",
        help="a PEFT LoRA folder (safetensors), optionally with its calibration file; repeat per adapter",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="the base model's compute dtype (default: float32)")
    parser.add_argument(
        "--offload", default="auto", choices=["auto", "disk", "cpu", "none"],
        help="where block weights wait while another block is computed on: disk (read from the safetensors "
             "files block by block), cpu (CPU memory, blocks visit the device), none (all on the device); "
             "auto: disk when the checkpoint allows it (default)",
    )
    parser.add_argument(
        "--modules-to-save-rule", default="agree", metavar="RULE",
        help="adapters with modules_to_save (heads): 'agree' (must be identical, default), 'average', or an adapter name",
    )
    parser.add_argument(
        "--calibration-order", default="files,adapter", metavar="NAMES",
        help="calibration sources to ask, in order (default: files,adapter; add 'generate' for a data-free "
             "fallback; see `plugins`)",
    )
    parser.add_argument(
        "--calibration-setting", action="append", default=[], metavar="SOURCE.KEY=VALUE",
        help="a setting of a calibration source in --calibration-order, as a daemon config's "
             "[groups.calibration.SOURCE] table gives it (VALUE: JSON, else a string), e.g. "
             "hub_dataset.repo_id=acme/calibration; repeat per setting (`plugins --params SOURCE` lists them; "
             "files and adapter take none)",
    )
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow the base model's own Python code (off by default)"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def calibration_options(args):
    from ..calibration import CalibrationOptions

    order = tuple(name.strip() for name in args.calibration_order.split(",") if name.strip())
    return CalibrationOptions(order=order, settings=_calibration_settings(args.calibration_setting, order),
                              device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)


def _calibration_settings(given: list[str], order: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``--calibration-setting SOURCE.KEY=VALUE`` options as each source's table, checked as a
    daemon config's ``[groups.calibration.SOURCE]`` is, before the base model loads (a source
    without a ``Settings`` model takes none)."""
    from ..calibration import checked_table
    from ..errors import ConfigError, ParameterError
    from ..plugin_manager import calibration_sources
    from ..strategy import parse_param, unique_params

    pairs: dict[str, list[tuple[str, Any]]] = {}
    for text in given:
        head, equals, _ = text.partition("=")
        name, dot, _ = head.rpartition(".")  # a key has no '.', a source's name may (its config table is quoted)
        key, value = parse_param(text[len(name) + 1:]) if dot and equals else ("", None)
        if not name.strip() or not key:
            raise ParameterError(f"--calibration-setting {text}: expected SOURCE.KEY=VALUE")
        if name.strip() not in order:  # its settings would be ignored: the source is never asked
            raise ParameterError(f"--calibration-setting {text}: {name.strip()!r} is not in --calibration-order "
                                 f"({', '.join(order) or 'empty'}); add it there")
        pairs.setdefault(name.strip(), []).append((key, value))
    available = calibration_sources()
    tables = {}
    for name, table in pairs.items():
        tables[name] = unique_params(table, f"--calibration-setting {name}.")
        if name in available:  # an unknown name: refused with the order
            try:
                checked_table(available[name], tables[name])
            except ConfigError as exc:
                raise ParameterError(f"--calibration-setting: {exc}") from None
    return tables


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (``kill``, a scheduler's time limit) stops the command as Ctrl-C does, with a
    KeyboardInterrupt: a merge being written removes its staging folder, compare --group its
    copies of the inputs (SIGTERM's default ended the process at once and left them). The
    previous handler is back afterwards; a thread other than the main one cannot set one."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _merge(args) -> int:
    from transformers.utils import logging as hf_logging

    from ..errors import ConfigError
    from ..merge import MergeRequest, run_merge
    from ..strategy import unique_params

    hf_logging.disable_progress_bar()  # our own bars say what is happening
    if len(args.strategy) > 1:
        raise ConfigError(f"--strategy is given twice ({', '.join(args.strategy)}): merge takes one; compare takes "
                          "several")
    params = unique_params(args.param, "--param ")
    with sigterm_interrupts():
        report = run_merge(
            MergeRequest(
                base_model=args.base_model,
                adapters=args.adapter,
                out=args.out,
                strategy=args.strategy[0] if args.strategy else DEFAULT_STRATEGY,
                params=params,
                device=args.device,
                dtype=args.dtype,
                output_dtype=args.output_dtype,
                exact_ranks=args.exact_ranks,
                offload=args.offload,
                trust_remote_code=args.trust_remote_code,
                modules_to_save_rule=args.modules_to_save_rule,
                overwrite=args.overwrite,
                evaluate=not args.no_eval,
                quiet=args.quiet,
                calibration=calibration_options(args),
            )
        )
    print(summarize(report, args.out))
    return 0


def summarize(report: dict, out: Path) -> str:
    from ..figures import text
    from ..logs import counted

    lines = [
        f"merged {counted(len(report['inputs']), 'adapter')} with {report['strategy']} in {report['merge_seconds']:.1f}s "
        f"({report['iterations_run']} iterations, peak RSS {report['peak_memory_mb']:.0f} MB) -> {out}",
    ]
    if report["tasks"]:
        language_model = all("next_token_loss" in figures for figures in report["tasks"].values())
        lines.append(f"{'task':24} {'alignment loss (first -> last)':>32} {'fidelity gap':>13}"
                     + (f" {'next-token loss (task -> merge)':>32}" if language_model else ""))
        for name, figures in report["tasks"].items():
            loss = [text(value) for value in figures["alignment_loss"]]
            trend = f"{loss[0]} -> {loss[-1]}" if len(loss) > 1 else loss[-1]
            line = f"{name:24} {trend:>32} {text(figures['fidelity_gap']):>13}"
            if language_model:
                tokens = figures["next_token_loss"]
                line += f" {tokens['task']:>22.4f} -> {tokens['merged']:.4f}"
            lines.append(line)
    for name, why in report.get("not_evaluated", {}).items():
        lines.append(f"{name:24} not evaluated: {why}")
    refinement = report.get("metrics", {}).get("refinement")
    if refinement and refinement.get("blocks"):
        last = refinement["blocks"][-1]

        def mean(key: str) -> float:  # over tasks
            return sum(last[key].values()) / len(last[key])

        line = (f"refinement: {refinement['refined_blocks']} of {len(refinement['blocks'])} blocks refined; "
                f"last block's output distance to the task models {mean('loss_before'):.4f} -> "
                f"{mean('loss_after'):.4f} (mean over tasks)")
        if "heldout_after" in last:
            line += f", held-out samples {mean('heldout_before'):.4f} -> {mean('heldout_after'):.4f}"
        lines.append(line)
    return "\n".join(lines)


def _plugins(args) -> int:
    from ..plugin_manager import calibration_sources, plugin_names, publishers, strategies

    if args.params:
        title, model, per_adapter = _settings_of(args.params)
        rows = [
            {"name": n, "type": _type_name(f.annotation), "range": _range(f), "required": f.is_required(),
             "default": _default(f),
             "help": " ".join(filter(None, [f.description, _per_adapter_note(per_adapter[n]) if n in per_adapter else ""])),
             "per_adapter": per_adapter.get(n)}
            for n, f in (model.model_fields.items() if model else ())
        ]
        if args.json:
            print(json.dumps(rows, indent=2, default=str))
        else:
            print(title if rows or model is None else f"{title}\n  (no settings)")
            width = max((len(_kind(row)) for row in rows), default=0)
            for row in rows:
                default = "required" if row["required"] else f"default={row['default']!r}"
                print(f"  {row['name']:20} {_kind(row):{width}} {default:18} {row['help']}")
        return 0
    loaded = plugin_names()
    found = strategies()
    sources = calibration_sources()
    destinations = publishers()
    if args.json:
        print(json.dumps({
            "plugins": [{"name": n, "origin": o} for n, o in loaded],
            "strategies": [{"name": s.name, "description": _description(s), "needs_calibration": s.needs_calibration}
                           for s in found.values()],
            "calibration_sources": [{"name": c.name, "description": _description(c)} for c in sources.values()],
            "publishers": [{"kind": p.kind, "description": _description(p)} for p in destinations.values()],
        }, indent=2))
        return 0
    print("plugins:")
    for name, origin in loaded:
        print(f"  {name:24} {origin}")
    for title, rows in (
        ("strategies", [(s.name, _description(s)) for s in found.values()]),
        ("calibration sources", [(c.name, _description(c)) for c in sources.values()]),
        ("publishers (destination kinds)", [(p.kind, _description(p)) for p in destinations.values()]),
    ):
        print(f"{title}:")
        for name, description in rows:
            print(f"  {name:24} {description}")
    return 0


_PARAMS_KINDS = {"strategy": "strategy", "calibration": "calibration source", "destination": "destination kind"}


def _settings_of(spec: str) -> tuple[str, type | None, dict[str, object]]:
    """``plugins --params NAME``: (title, settings model or None, per-adapter fields) of the
    strategy, calibration source or destination kind ``NAME`` (``KIND:NAME`` where a name
    is taken by two of them). A strategy's model is its parameters; a source's or a
    publisher's, the table a daemon config gives it."""
    from ..calibration import no_settings
    from ..errors import ParameterError
    from ..plugin_manager import calibration_sources, publishers, strategies
    from ..strategy import per_adapter_fields

    kind, _, name = spec.rpartition(":")
    if kind and kind not in _PARAMS_KINDS:
        raise ParameterError(f"--params {spec}: unknown kind {kind!r} (use {', '.join(_PARAMS_KINDS)})")
    found = {
        "strategy": strategies().get(name),
        "calibration": calibration_sources().get(name),
        "destination": publishers().get(name),
    }
    matches = [k for k, plugin in found.items() if plugin is not None and kind in ("", k)]
    if not matches:
        wanted = _PARAMS_KINDS.get(kind, "strategy, calibration source or destination kind")
        raise ParameterError(f"--params {spec}: no {wanted} named {name!r} (`iteris-daemon plugins` lists them)")
    if len(matches) > 1:
        raise ParameterError(f"--params {spec}: {name!r} names a {' and a '.join(matches)}; write "
                             f"{' or '.join(f'{k}:{name}' for k in matches)}")
    plugin = found[matches[0]]
    if matches[0] == "strategy":
        return f"{plugin.name}: {_description(plugin)}", plugin.Params, per_adapter_fields(plugin.Params)
    if matches[0] == "destination":
        where = f'[[groups.destinations]] kind = "{name}"'
        return f"{name}: {_description(plugin)}; the settings of {where}", plugin.Settings, {}
    if getattr(plugin, "Settings", None) is None:  # no table to show: say so, not "the settings of" one
        return f"{name}: {_description(plugin)}; {no_settings(name)}", None, {}
    return (f"{name}: {_description(plugin)}; the settings of [groups.calibration.{name}] (merge, compare: "
            f"--calibration-setting {name}.KEY=VALUE)", plugin.Settings, {})


def _per_adapter_note(unnamed: object) -> str:
    """How a per-adapter parameter is given: a daemon group's adapters change from run to run."""
    return f"(a daemon group gives a table by adapter name; an adapter not named takes {unnamed})"


def _description(plugin) -> str:
    """A plugin object's one-line description; optional for third-party ones."""
    return getattr(plugin, "description", "") or ""


def _default(field) -> object:
    """A parameter's default as a user would write it; None where it has none (``required``
    says so: the string "required" was a default a tool reading the JSON could not tell
    from a real one)."""
    if field.is_required():
        return None
    from pydantic import TypeAdapter
    from pydantic_core import PydanticSerializationError

    default = field.get_default(call_default_factory=True)
    try:  # as a config or --param writes it: a nested model's {"a": 1}, not its repr "a=1"; a path as a string
        return TypeAdapter(field.annotation).dump_python(default, mode="json")
    except (PydanticSerializationError, TypeError, ValueError):  # what pydantic cannot dump: as it is
        return default


def _range(field) -> str | None:
    """A parameter's bounds as its model checks them, e.g. ``>= 1, <= 1000`` (None: unbounded)."""
    bounds = [f"{symbol} {getattr(constraint, name)}" for constraint in field.metadata
              for name, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
              if getattr(constraint, name, None) is not None]
    return ", ".join(bounds) or None


def _kind(row: dict) -> str:
    return row["type"] if row["range"] is None else f"{row['type']} ({row['range']})"


def _type_name(annotation) -> str:
    """A field's type as a user reads it: ``Path | None``, not ``Optional[Annotated[pathlib.Path,
    AfterValidator(...)]]`` (validators are the model's business; the range column shows bounds)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _type_name(args[0])
    if origin in (Union, UnionType):
        return " | ".join(_type_name(arg) for arg in args)
    if origin is Literal:
        return f"Literal[{', '.join(map(repr, args))}]"
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(map(_type_name, args))}]"
    if annotation is type(None):
        return "None"
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")
