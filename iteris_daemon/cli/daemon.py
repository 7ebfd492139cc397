"""``iteris-daemon run``, ``status`` and ``merge-now``."""

from __future__ import annotations

import argparse
import json
import math
import time

from sqlalchemy import func, select

from ..errors import ConfigError
from ..paths import user_path
from .catalog import DB_ENV

REFUSED = 3  # merge-now --wait: the run was refused by a publish gate, or skipped on a refusal; nothing was published
MERGE_NOW_EPILOG = f"""\
exit status:
  0  requested; with --wait: the run succeeded, or was skipped (its inputs already published, or
     not ready)
  1  with --wait: the run failed or was cancelled, or none finished within SECONDS
  2  bad input (e.g. no such group)
  {REFUSED}  with --wait: a publish gate refused the run, or it was skipped because a gate
     refused these same inputs before (--force publishes past the quality gate); nothing
     was published"""


def positive_seconds(text: str) -> float:
    """argparse type: a finite number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def register(commands) -> None:
    run = commands.add_parser(
        "run", help="run the daemon in the foreground (what the systemd unit starts)",
        description="Watch sources, re-merge groups on schedule and on change, publish. Stops cleanly on "
                    "SIGTERM/SIGINT: a running merge's worker gets SIGTERM at once, stops at its next batch, and is "
                    "killed if it has not stopped after grace_seconds (the run is recorded cancelled; publishing is "
                    "never interrupted). SIGHUP reloads the config.",
    )
    run.add_argument("--config", required=True, type=user_path, metavar="FILE",
                     help=f"daemon configuration (TOML); its catalog unless ${DB_ENV} names one, as for every command")
    run.add_argument("--check", action="store_true",
                     help="check the configuration as a start reads it (its fields, the plugins and their "
                          "parameters, token and secret files, the merge devices on this host) and exit: 0 when it "
                          "passes, 2 with the error; nothing is started: the state folder, its lock, the catalog and "
                          "the ports are not checked")
    run.set_defaults(handler=_run)

    def config_options(groups: str) -> argparse.ArgumentParser:
        """``--config`` and ``--db``; ``groups``: what the config's groups are to the command."""
        options = argparse.ArgumentParser(add_help=False)
        options.add_argument("--config", type=user_path, metavar="FILE",
                             help=f"the daemon's config: the catalog it names, and its groups ({groups})")
        options.add_argument("--db", metavar="URL",
                             help=f"catalog database URL (default: ${DB_ENV}, else --config's, else the state directory's)")
        return options

    status = commands.add_parser(
        "status", parents=[config_options("those are detailed; the catalog's others are named apart")],
        help="sources, groups (last run, what is published, quality, waiting adapters) and daemons, from the catalog",
        description="What the daemons sharing this catalog are doing, read from the catalog (the daemon need not "
                    "run): each source's health and last poll; each group's last run (the last skipped one too "
                    "when newer: a stalled group shows), next run, what each destination serves, the quality of "
                    "the last published merge (fidelity gaps), the adapters held back with the reason, those not "
                    "merged yet, and those of another base model; and the daemons seen in the last day, with any "
                    "settings that differ between them. With --config only its groups are detailed; the "
                    "catalog's other groups, and its own that no daemon has loaded yet, are named apart.")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(handler=_status)

    now = commands.add_parser("merge-now", parents=[config_options("only those may be asked for")], help="ask the running daemon to merge a group now",
                              description="Ask the running daemon to merge a group now.", epilog=MERGE_NOW_EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    now.add_argument("group", help="a merge group's name, from the daemon's config")
    now.add_argument("--wait", type=positive_seconds, metavar="SECONDS",
                     help="wait up to SECONDS for the run to finish and show it; the exit status says how it ended")
    now.add_argument("--force", action="store_true",
                     help="merge even if the inputs are unchanged, and publish even if the result is worse than the "
                          "published merge (the quality gate); the NaN/Inf and fidelity-gap checks still apply")
    now.set_defaults(handler=_merge_now)


def _run(args) -> int:
    from ..daemon import Daemon, checked_config
    from .catalog import named_catalog

    if args.check:  # before a restart or reload: `sources scan --config` and `status --config` check less
        from ..logs import counted

        config = checked_config(args.config)
        print(f"{args.config}: ok ({counted(len(config.sources), 'source')}, {counted(len(config.groups), 'group')})")
        return 0
    return Daemon(args.config, database=named_catalog(args)).run()


def _catalog(args):
    from ..catalog import Catalog
    from .catalog import catalog_url

    return Catalog(catalog_url(args), create=False)  # these commands read what the daemon made


def _config(args):
    """``--config``, loaded, if given (its plugins not checked: these commands run none)."""
    if args.config is None:
        return None
    from ..config import load_config

    return load_config(args.config, check_plugins=False)


def _configured_groups(config) -> list[str] | None:
    """The groups of the config, if given: a group dropped from the config stays in the
    catalog, but no daemon runs it."""
    return None if config is None else [group.name for group in config.groups]


def _status(args) -> int:
    from ..status import collect, render

    config = _config(args)
    report = collect(_catalog(args), _configured_groups(config),
                     None if config is None else config.daemon.claim_ttl_seconds)
    print(json.dumps(report, indent=2, default=str) if args.json else render(report))
    return 0


def _merge_now(args) -> int:
    from ..catalog.models import DaemonPresence, MergeGroup, MergeRun, RunStatus, iso_utc, utcnow
    from ..peers import GONE_AFTER, GROUPS

    configured = _configured_groups(_config(args))
    if configured is not None and args.group not in configured:
        raise ConfigError(f"no merge group named {args.group!r} in {args.config} (its groups: "
                          f"{', '.join(configured) or 'none'})")
    catalog = _catalog(args)
    with catalog.session() as session:
        group = session.scalar(select(MergeGroup).where(MergeGroup.name == args.group))
        if group is None and configured is not None:  # in the config, not yet loaded by a daemon
            raise ConfigError(f"group {args.group!r} is in {args.config}, but no daemon has loaded it yet "
                              "(start the daemon, or send it SIGHUP after editing the config)")
        if group is None:
            raise ConfigError(f"no merge group named {args.group!r} (groups come from the daemon's config)")
        now = catalog.now(session)  # the clock the daemons' rows were written by (a server's)
        live = session.scalars(select(DaemonPresence).where(DaemonPresence.seen_at >= now - GONE_AFTER)).all()
        if live and not any(args.group in (d.settings or {}).get(GROUPS, [args.group]) for d in live):
            # Recorded, the request waited for the group's return, weeks later maybe, and a forced one then
            # ran past the gates at once.
            fix = ("reload the daemon (SIGHUP): it has not loaded this config's group yet, or runs another config"
                   if configured is not None else "add it back and reload the daemon")
            raise ConfigError(f"group {args.group!r} is in the catalog, but no running daemon has it in its config "
                              f"({', '.join(d.holder for d in live)}): {fix}; nothing was requested")
        group.requested_at = utcnow()
        group.force_requested = group.force_requested or args.force
        last = session.scalar(select(MergeRun.id).where(MergeRun.group_id == group.id).order_by(MergeRun.id.desc()).limit(1)) or 0
        group_id = group.id
        # A daemon removes its row as it stops, and refreshes it at each catalog check (30 s by
        # default), at least every minute; a killed one leaves it behind.
        seen = session.scalar(select(func.max(DaemonPresence.seen_at)))
    if seen is None:
        where = "no daemon is using this catalog now: the run starts when one starts"
    elif now - seen > GONE_AFTER:
        where = f"no daemon has been seen on this catalog since {iso_utc(seen)}: the run starts when one runs"
    else:
        where = "the running daemon starts it within seconds"
    print(f"requested a{' forced' if args.force else ''} run of {args.group}; {where}")
    if args.wait is None:
        return 0
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        with catalog.session(write=False) as session:
            run = session.scalar(select(MergeRun).where(MergeRun.group_id == group_id, MergeRun.id > last,
                                                        MergeRun.status != RunStatus.running).order_by(MergeRun.id).limit(1))
            if run is not None:
                print(f"run {run.id}: {run.status.value}" + (f" ({run.error})" if run.error else ""))
                if run.status is RunStatus.refused or (run.status is RunStatus.skipped
                                                       and _stands_refused(session, run)):
                    return REFUSED
                return 0 if run.status in (RunStatus.succeeded, RunStatus.skipped) else 1
        time.sleep(1)
    print(f"no finished run after {args.wait:.0f}s (is the daemon running?)")
    return 1


def _stands_refused(session, run) -> bool:
    """Whether skipped ``run`` was skipped on a refusal: the group's last run before it that
    published or was refused refused these same inputs (nothing published them; a script
    running ``merge-now --wait && deploy`` must not go on)."""
    from ..catalog.models import MergeRun, RunStatus

    decided = session.scalar(select(MergeRun).where(
        MergeRun.group_id == run.group_id, MergeRun.id < run.id,
        MergeRun.status.in_([RunStatus.succeeded, RunStatus.refused])).order_by(MergeRun.id.desc()).limit(1))
    return (decided is not None and decided.status is RunStatus.refused
            and decided.input_fingerprint == run.input_fingerprint)
