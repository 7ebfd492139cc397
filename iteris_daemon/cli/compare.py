"""``iteris-daemon compare``: several strategies on the same adapters, scored on held-out
calibration samples (:mod:`iteris_daemon.compare`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

from ..errors import OutputError
from ..paths import overlap, real, user_path
from .catalog import DB_ENV, named_catalog
from .merge import add_input_arguments, calibration_options, sigterm_interrupts

log = logging.getLogger(__name__)

COMPARE_EPILOG = """\
examples:
  iteris-daemon compare --base-model ./minilm --adapter loras/sst2 --adapter loras/news
  iteris-daemon compare --group unified --config /etc/iteris-daemon/config.toml --strategy ties --strategy knots
  iteris-daemon compare --base-model gpt2 --adapter a --adapter b --strategy iteris --strategy regmean \\
      --strategy knots:alpha=0.5 --strategy ties:density=0.3 --json comparison.json

Every adapter needs calibration data (as for `merge`). Strategies that read calibration data
merge from the samples that are not held out; every merge is scored on the held-out ones, on
identical batches. Fidelity gap: ||y_merged - y_task|| / ||y_base - y_task|| of the model's
outputs on a task's held-out samples (0: the task's own adapter; 1: no better than the base
model); lower is better. For a language model that generates, +loss is what each merge adds
to the tasks' next-token loss (nats per token). A strategy that cannot merge the adapters,
or fails, is listed with its error; the exit status is 1 only when none could."""


_GROUP_OPTIONS = ("dtype", "offload", "modules_to_save_rule")  # a group's merge options that a comparison uses


def register(commands) -> None:
    compare = commands.add_parser(
        "compare",
        help="merge the same adapters with several strategies and score each on held-out samples",
        description="Merge the same adapters with several strategies and score every merge, without labels, on "
                    "calibration samples that no strategy merged from: a seeded fraction of each task's samples "
                    "is held out. Writes no adapter.",
        epilog=COMPARE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_input_arguments(compare, required=False)
    compare.add_argument("--group", metavar="NAME",
                         help="compare on a daemon group's current inputs instead of --base-model/--adapter: the "
                              "adapters it would merge now, with the calibration data its sources give (not "
                              "--calibration-order); its own strategy and parameters are one more contender, "
                              "the row 'STRATEGY (group NAME)' (needs --config)")
    compare.add_argument("--config", type=user_path, metavar="FILE", help="the daemon's config, for --group")
    compare.add_argument("--db", metavar="URL", default=os.environ.get(DB_ENV),
                         help=f"the catalog --group reads (SQLAlchemy URL; default: ${DB_ENV}, else --config's)")
    compare.add_argument(
        "--strategy", action="append", default=[], metavar="NAME[:KEY=VALUE...]", dest="strategies",
        help="a strategy to compare, with parameters after colons (knots:alpha=0.5:density=0.2); repeat; "
             "default: every strategy `plugins` lists",
    )
    compare.add_argument("--holdout", type=float, default=0.2,
                         help="fraction of each task's calibration samples held out for scoring (default: 0.2)")
    compare.add_argument("--seed", type=int, default=0, help="which samples are held out (default: 0)")
    compare.add_argument("--max-samples", type=int, default=1000, metavar="N",
                         help="read the first N calibration samples of each task, held out and merged from "
                              "(default: 1000; 0: all)")
    compare.add_argument("--json", type=user_path, metavar="FILE", help="also write the full comparison here")
    # None: not given (a --group's own values apply), told apart from a default given explicitly
    compare.set_defaults(handler=_compare, option_defaults={option: compare.get_default(option)
                                                            for option in _GROUP_OPTIONS},
                         **{option: None for option in _GROUP_OPTIONS})


def _compare(args) -> int:
    from transformers.utils import logging as hf_logging

    from .. import safe_json
    from ..compare import CompareRequest, render, run_compare
    from ..config import load_config
    from ..errors import ConfigError
    from ..merge import local_inputs

    hf_logging.disable_progress_bar()
    if args.json:
        _check_json_path(args.json, local_inputs(args.base_model, args.adapter or []))
    if args.max_samples < 0:
        raise ConfigError(f"--max-samples must be 0 (all) or more, got {args.max_samples}")
    given = {option: getattr(args, option) for option in _GROUP_OPTIONS if getattr(args, option) is not None}
    for option, default in args.option_defaults.items():
        setattr(args, option, given.get(option, default))
    options = dict(strategies=args.strategies, holdout=args.holdout, seed=args.seed, device=args.device,
                   dtype=args.dtype, offload=args.offload, modules_to_save_rule=args.modules_to_save_rule,
                   max_samples=args.max_samples or None, quiet=args.quiet)
    if args.group is None:
        if args.base_model is None or not args.adapter:
            raise ConfigError("give --base-model and --adapter, or --group with --config")
        with sigterm_interrupts():
            report = run_compare(CompareRequest(base_model=args.base_model, adapters=args.adapter,
                                                trust_remote_code=args.trust_remote_code,
                                                calibration=calibration_options(args), **options))
    else:
        if args.base_model is not None or args.adapter:
            raise ConfigError("--group takes the base model and adapters from the daemon's catalog (with --config): "
                              "drop --base-model and --adapter")
        if args.config is None:
            raise ConfigError("--group needs --config, the daemon's config (its catalog and the group's settings)")
        if args.trust_remote_code:
            options["trust_remote_code"] = True
        with sigterm_interrupts(), tempfile.TemporaryDirectory(prefix="iteris-compare-") as into:
            report = run_compare(_group_request(load_config(args.config), args.group, Path(into),
                                                named_catalog(args), given, **options))
    print(render(report))
    if args.json:
        try:
            args.json.write_text(safe_json.dumps(report, indent=2) + "\n")
        except OSError as exc:
            raise OutputError(f"{args.json}: cannot write the JSON report: {exc.strerror or exc}") from None
    if stopped := report.get("interrupted"):
        print(f"iteris-daemon: interrupted while merging with {stopped['at']}: the table holds the strategies "
              f"finished before it{'; not run: ' + ', '.join(stopped['not_run']) if stopped['not_run'] else ''}",
              file=sys.stderr)
        return 130
    return 0 if any("error" not in row for row in report["strategies"]) else 1




def _group_request(config, name: str, into: Path, catalog_url: str | None, given: dict[str, str], **options):
    """A comparison of a daemon group's current inputs: the adapters it would merge now, copied
    into ``into`` as a run copies them, with the calibration its sources give; the group's own
    strategy and parameters come first, at the group's ``dtype``, ``offload`` and
    ``modules_to_save_rule`` (as the daemon merges it: a bfloat16 group was loaded in
    float32, twice its memory, and scored at another precision). ``given``: those options
    set on the command line, refused where they differ from the group's. ``catalog_url``: the
    catalog named outside the config (``--db``, ``$ITERIS_DAEMON_DB``), as every command finds
    it; None: the config's. ``options``: the other ``CompareRequest`` fields."""
    from ..catalog import Catalog
    from ..compare import CompareRequest, Contender
    from ..errors import ConfigError
    from ..merge import AdapterSpec
    from ..plugin_manager import get_strategy
    from ..runner import gather_inputs, run_params
    from ..strategy import parse_params

    group = next((g for g in config.groups if g.name == name), None)
    if group is None:
        defined = ", ".join(g.name for g in config.groups) or "none"
        raise ConfigError(f"no merge group named {name!r} in the config (its groups: {defined})")
    for option, value in given.items():
        if value != getattr(group, option):
            flag = "--" + option.replace("_", "-")
            raise ConfigError(f"{flag} {value}: --group compares at the group's {option} ({getattr(group, option)}), "
                              f"as the daemon merges it; drop {flag} (or change the group's {option})")
    options.update({option: getattr(group, option) for option in _GROUP_OPTIONS})
    catalog = Catalog(catalog_url or config.daemon.catalog_url(), create=False)
    try:
        inputs = gather_inputs(catalog, group, needs_calibration=True, samples=None, into=into,
                               limits=config.daemon.limits.limits(),
                               read_limit=options.get("max_samples", CompareRequest.max_samples))
    finally:
        catalog.close()
    for adapter, reason in inputs.held_back.items():
        log.warning("group %s: adapter %s left out: %s", group.name, adapter, reason)
    if not inputs.revisions:
        raise ConfigError(f"group {group.name}: no adapter with calibration data to compare on (see `status`)")
    strategy = get_strategy(group.strategy)
    params = run_params(group, strategy, inputs.names())
    own = Contender(f"{group.strategy} (group {group.name})", strategy, parse_params(strategy, params))
    adapters = [AdapterSpec(folder, name=name, origin=revision.files_path)
                for (_, revision), folder, name in zip(inputs.revisions, inputs.folders, inputs.names())]
    options.setdefault("trust_remote_code", group.base_model in config.daemon.trust_remote_code)
    return CompareRequest(base_model=group.base_model, adapters=adapters, calibration_sets=inputs.calibration,
                          contenders=[own], base_checked=True, **options)


def _check_json_path(path: Path, inputs: list[Path]) -> None:
    """Before any merge: ``--json`` must not be, hold or lie inside an input, which it would
    overwrite, and its folder must exist (the comparison was lost to a traceback after
    every merge had run)."""
    where = real(path)
    for given in inputs:
        if overlap(where, real(given)):
            raise OutputError(f"--json {path}: it would overwrite or write into {given}, which the comparison reads")
    if not where.parent.is_dir() or not os.access(where.parent, os.W_OK):
        raise OutputError(f"--json {path}: {where.parent} is not a folder this user can write in")
    if where.is_dir():
        raise OutputError(f"--json {path}: is a folder")
