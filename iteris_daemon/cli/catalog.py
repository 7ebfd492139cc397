"""``iteris-daemon db``, ``sources`` and ``adapters``: the catalog from the command line."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from ..errors import ConfigError
from ..logs import escape_controls
from ..paths import cache_dir, private_dir, user_path

DB_ENV = "ITERIS_DAEMON_DB"
# Flags of one source kind; given for the other kind they would be silently ignored.
FOLDER_FLAGS = ("--settle", "--polling")
HUB_FLAGS = ("--endpoint", "--token-file", "--interval")


def _db_options(config_help: str = "the daemon's config: the catalog it names (unless --db)") -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--db", metavar="URL", default=os.environ.get(DB_ENV),
        help=f"catalog database (SQLAlchemy URL; default: ${DB_ENV}, else --config's, else a SQLite file in the "
             "state directory)",
    )
    parent.add_argument("--config", type=user_path, metavar="FILE", help=config_help)
    return parent


def named_catalog(args) -> str | None:
    """The catalog named outside any config: ``--db`` (``run`` has none), else $ITERIS_DAEMON_DB;
    empty, as unset (``run`` read an empty variable so, `status` as the default catalog)."""
    return getattr(args, "db", None) or os.environ.get(DB_ENV) or None


def catalog_url(args, *, check_sources: bool = False) -> str | None:
    """The catalog a command opens, ``run`` included: :func:`named_catalog`, else the one the
    daemon's ``--config`` names; None: the default, in the state directory. ``check_sources``:
    the config's sources must be valid too (see :func:`load_config`)."""
    url = named_catalog(args)
    if args.config is not None and (url is None or check_sources):  # checked even where --db names the catalog
        from ..config import load_config

        configured = load_config(args.config, check_plugins=False, check_sources=check_sources).daemon.catalog_url()
        url = url or configured
    return url


def register(commands) -> None:
    db_options = _db_options()

    db = commands.add_parser("db", help="catalog database maintenance")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    upgrade = db_commands.add_parser(
        "upgrade", parents=[db_options], help="create or migrate the catalog to the current schema",
        description="Create the catalog the options name if there is none, or migrate it to this iteris-daemon's "
                    "schema (the daemon does so itself as it starts; the commands that only read refuse an older "
                    "schema). Prints the revision it is at.")
    upgrade.set_defaults(handler=_db_upgrade)
    prune = db_commands.add_parser(
        "prune", parents=[db_options], help="delete old merge runs, adapter revisions and daemon rows",
        description="Delete the history older than --older-than days that nothing reads, beside a running daemon "
                    "or not, in transactions of at most 1,000 runs and 1,000 revisions (a dry run counts in one): "
                    "finished merge runs (with their inputs), except each group's --keep-runs newest, its newest "
                    "succeeded run, its newest succeeded or refused run, the failed "
                    "runs since then and those that published since its newest success (what the destinations "
                    "serve, what the next run is skipped on, a merge kept to be published again); adapter "
                    "revisions no remaining run merged that stopped being current before the cutoff (and removed "
                    "adapters whose whole history goes); rows of daemons not seen since the cutoff. Daemons seen, "
                    "and revisions current, in the last day are never deleted. Files are left alone: the daemon's "
                    "Hub polls delete the cached commits no adapter uses. The runs deleted are still counted by "
                    "the /metrics counter iteris_merge_runs_total (their counts are kept in the catalog), so it "
                    "does not drop, which Prometheus would take for a counter reset. Prints what it deleted.")
    prune.add_argument("--older-than", type=_days, default=90, metavar="DAYS",
                       help="delete only what is older than DAYS days (default 90; 0: whatever nothing reads)")
    prune.add_argument("--keep-runs", type=_keep_runs, metavar="N",
                       help="keep each group's N newest runs (default and least: the 50 that `status` reads)")
    dry_or_vacuum = prune.add_mutually_exclusive_group()  # --vacuum on a dry run was silently not run
    dry_or_vacuum.add_argument("--dry-run", action="store_true", help="count what would be deleted, delete nothing")
    dry_or_vacuum.add_argument("--vacuum", action="store_true",
                               help="then give the space back (not on a dry run): SQLite's VACUUM rewrites the file "
                                    "(daemons' writes wait while it runs), PostgreSQL's makes it reusable")
    prune.set_defaults(handler=_db_prune)

    sources = commands.add_parser("sources", help="where adapters come from: local folders, Hub repos")
    source_commands = sources.add_subparsers(dest="sources_command", required=True, metavar="ACTION")
    add = source_commands.add_parser(
        "add", parents=[db_options], help="add a local folder or Hub source",
        description="Add a source. Exactly one of --folder, --hub-repo, --hub-author.",
        epilog="examples:\n  iteris-daemon sources add team-loras --folder /srv/loras --base-model ./minilm\n"
               "  iteris-daemon sources add acme --hub-author acme --base-model acme/base --interval 600\n"
               "  iteris-daemon sources add two --hub-repo acme/sst2-lora --hub-repo acme/news-lora@v2\n"
               "  iteris-daemon sources add tasks --hub-repo acme/task-loras/sst2 --hub-repo acme/task-loras/news",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add.add_argument("name", type=_source_name, help="a unique name for the source")
    kind = add.add_mutually_exclusive_group(required=True)
    kind.add_argument("--folder", action="append", type=user_path, metavar="DIR", help="watch DIR recursively (repeatable)")
    kind.add_argument("--hub-repo", action="append", metavar="REPO[/SUBFOLDER][@BRANCH]",
                      help="poll this Hub repo's adapter, at its top or in SUBFOLDER (repeatable)")
    kind.add_argument("--hub-author", metavar="USER_OR_ORG", help="poll every adapter repo of this user or organisation")
    add.add_argument("--base-model", metavar="PATH_OR_ID",
                     help="check adapters against this base model, which decides over the one an adapter names (a "
                          "different name is logged as a WARNING); --hub-author: only its adapters that name it")
    add.add_argument("--settle", type=float, metavar="SECONDS", help="folder: quiet time before a changed adapter is examined (default 2)")
    add.add_argument("--polling", action="store_true", default=None, help="folder: poll instead of inotify (network filesystems)")
    add.add_argument("--endpoint", metavar="URL", help="hub: Hub URL (default: huggingface_hub's)")
    add.add_argument("--token-file", type=user_path, metavar="FILE", help="hub: file holding the token (default: the systemd credential hf-token, else $HF_TOKEN)")
    add.add_argument("--interval", type=float, metavar="SECONDS", help="hub: poll period (default 300)")
    add.set_defaults(handler=_sources_add)

    listing = source_commands.add_parser(
        "list", parents=[db_options], help="list sources and their health",
        description="Each source in the catalog: its name, kind (local or hub), whether it is enabled (a source "
                    "removed while past merge runs used its adapters stays, disabled), its health (the error of "
                    "its last scan or poll when that failed) and what it watches (folders, Hub repos or author). "
                    "--json adds when it was last scanned or polled and its settings.")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(handler=_sources_list)

    remove = source_commands.add_parser(
        "remove", parents=[db_options], help="remove a source and its adapters",
        description="Remove a source at once (no confirmation); a running daemon stops watching it and merges "
                    "its groups without its adapters at its next catalog check. A source whose adapters no run "
                    "merged is deleted with them; one whose adapters past runs merged is disabled, its adapters "
                    "marked removed, kept for that history, and `sources add` with its settings adds it again. A "
                    "Hub source's downloads no other adapter uses are deleted. A source of --config's is refused: "
                    "the daemon's config owns it.")
    remove.add_argument("name", help="the source's name (`sources list` shows them)")
    remove.set_defaults(handler=_sources_remove)

    scan_options = _db_options("the daemon's config: scan its sources (added to the catalog or updated first) with "
                               "its catalog (unless --db), cache directory, adapter limits and trusted models, as the "
                               "daemon would")
    scan = source_commands.add_parser(
        "scan", parents=[scan_options], help="rescan folders / poll Hub repos once, now",
        description="Rescan local folders and poll Hub sources once (the daemon does this on its own). "
                    "Give the daemon's --config: its sources are added or updated first, as the daemon does at "
                    "start, and adapters are judged by its limits and trusted models, and "
                    "a verdict recorded under other settings is judged again, as the daemon does. Without it the "
                    "default limits judge new content only (the daemon's next rescan judges it again under its own). "
                    "The catalog must exist (the daemon's start or `db upgrade` creates it; a scan does not). "
                    "A running daemon merges what this registers or removes at its next catalog check "
                    "([daemon] catalog_check_seconds). Exit status 1 when a source is left unhealthy by its scan (the error is printed), "
                    "or, with --config, is not scanned because the daemon refuses to start it: it watches a destination "
                    "of the config's groups or the daemon's own folders (its health says so).",
    )
    scan.add_argument("names", nargs="*", metavar="NAME", help="sources to scan (default: all enabled)")
    scan.add_argument("--cache-dir", type=user_path, default=None, metavar="DIR",
                      help="the cache directory: Hub downloads go to DIR/hub; folder fingerprints are kept in "
                           "DIR/folder-stat, shared with a daemon using DIR and the same limits, so unchanged "
                           "adapters are not read again (default: the config's cache_dir with --config, else "
                           "$CACHE_DIRECTORY, else $XDG_CACHE_HOME/iteris-daemon or ~/.cache/iteris-daemon)")
    scan.set_defaults(handler=_sources_scan)

    adapters = commands.add_parser("adapters", help="adapters in the catalog")
    adapter_commands = adapters.add_subparsers(dest="adapters_command", required=True, metavar="ACTION")
    listing = adapter_commands.add_parser(
        "list", parents=[db_options], help="list adapters",
        description="Each adapter in the catalog with its current revision (the one seen most recently): catalog "
                    "id, status (registered: groups may merge it; rejected: never merged; removed: gone from its "
                    "source, or its source removed), source, name, rank, revision, and its base model or the "
                    "rejection reason. --json adds its location and when it last changed "
                    "(updated_at: a new current revision or status). `adapters show ID` lists every revision seen.")
    listing.add_argument("--status", action="append", choices=["registered", "rejected", "removed"],
                         help="only these statuses (repeatable)")
    listing.add_argument("--source", metavar="NAME", help="only this source's adapters")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(handler=_adapters_list)
    show = adapter_commands.add_parser("show", parents=[db_options], help="one adapter with every revision seen")
    show.add_argument("id", type=_catalog_id, metavar="ID", help="the adapter's catalog id, as `adapters list` shows it")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(handler=_adapters_show)


def _source_name(text: str) -> str:
    """As the config takes it (:func:`~iteris_daemon.config.printable_name`)."""
    from ..config import printable_name

    try:
        return printable_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _in_range(text: str, cast: type, low: float, high: float, what: str):
    """``text`` as ``cast`` in ``[low, high)`` (NaN and inf are not), or an argparse error saying ``what``."""
    try:
        value = cast(text)
    except ValueError:
        value = low - 1
    if not low <= value < high:
        raise argparse.ArgumentTypeError(f"{what}, not {text!r}")
    return value


def _catalog_id(text: str) -> int:
    """A row id as the databases store it (a 64-bit integer: a longer one overflowed SQLite)."""
    return _in_range(text, int, 1, 2**63, "an id is a whole number from 1 to 2^63 - 1")


def _days(text: str) -> float:
    """A number of days, 0 or more (below 100,000: a cutoff before year 1 is no date)."""
    return _in_range(text, float, 0, 100_000, "a number of days, 0 or more")


def _keep_runs(text: str) -> int:
    """How many of a group's newest runs to keep: at least those the code reads."""
    from ..catalog.prune import RECENT_RUNS

    return _in_range(text, int, RECENT_RUNS, 2**63, f"a whole number, at least {RECENT_RUNS} (the runs `status` reads)")


def _open(args, create: bool = False):
    """The catalog the command names (:func:`catalog_url`); only ``db upgrade`` and
    ``sources add`` create one."""
    from ..catalog import Catalog

    return Catalog(catalog_url(args, check_sources=True), create=create)


def _db_upgrade(args) -> int:
    from ..catalog.db import current_revision

    catalog = _open(args, create=True)
    print(f"catalog {catalog.safe_url} is at revision {current_revision(catalog.engine)}")
    return 0


def _db_prune(args) -> int:
    from datetime import timedelta

    from ..catalog.prune import RECENT_RUNS, prune, vacuum

    catalog = _open(args)
    keep = args.keep_runs or RECENT_RUNS
    pruned = prune(catalog, timedelta(days=args.older_than), keep, dry_run=args.dry_run)
    print(f"catalog {catalog.safe_url}: {'would delete' if args.dry_run else 'deleted'} what is older than "
          f"{args.older_than:g} days and not read (each group's {keep} newest runs kept):")
    print("\n".join(pruned.lines()))
    if args.dry_run:
        print("dry run: nothing was deleted")
    elif args.vacuum:
        print(vacuum(catalog))
    return 0


def _settings(model: type[BaseModel], values: dict[str, Any], where: str) -> dict[str, Any]:
    """Validate, then keep only what was given (later defaults apply to stored sources)."""
    try:
        settings = model.model_validate({k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError.from_validation(where, exc) from None
    return settings.model_dump(mode="json", exclude_unset=True)


def _sources_add(args) -> int:
    from ..catalog.models import SourceKind
    from ..catalog.registry import add_source, list_sources
    from ..config import config_destinations, load_config, watched_destination
    from ..sources.hub import HubSettings
    from ..sources.local import LocalSettings
    from ..tokens import check_token_file, hub_token

    foreign = [f for f in (HUB_FLAGS if args.folder else FOLDER_FLAGS)
               if getattr(args, f[2:].replace("-", "_")) is not None]
    if foreign:
        raise ConfigError(f"{', '.join(foreign)}: only for {'Hub' if args.folder else 'folder'} sources")
    if (args.base_model and (args.base_model.startswith(("~", ".", "/")) or args.base_model.count("/") > 1)
            and not user_path(args.base_model).is_dir()):  # a local folder by its spelling: every adapter waited on it
        raise ConfigError(f"--base-model {args.base_model}: no such directory (a Hub id is written OWNER/NAME)")
    if args.folder:
        missing = [str(f) for f in args.folder if not f.is_dir()]
        if missing:
            raise ConfigError(f"--folder {missing[0]}: no such directory")
        kind = SourceKind.local
        settings = _settings(LocalSettings, {"paths": args.folder, "base_model": args.base_model,
                                             "settle_seconds": args.settle, "polling": args.polling},
                             f"source {args.name}")
    else:
        if args.token_file is not None:
            check_token_file(args.token_file, "--token-file")
            hub_token(args.token_file)  # readable, and by its owner only: refused now, not at the first poll
        kind = SourceKind.hub
        settings = _settings(HubSettings, {
            "repos": args.hub_repo, "author": args.hub_author, "base_model": args.base_model,
            "endpoint": args.endpoint, "token_file": args.token_file.resolve() if args.token_file else None,
            "interval_seconds": args.interval,
        }, f"source {args.name}")
    validated = (LocalSettings if args.folder else HubSettings).model_validate(settings)
    config = load_config(args.config, check_plugins=False, check_sources=True) if args.config else None
    _check_not_configured(args, config)
    if config is not None and (why := watched_destination(validated, config_destinations(config, args.config))):
        raise ConfigError(f"source {args.name}: {why}; the daemon would register its own merges as adapters")
    catalog = _open(args, create=True)
    with catalog.session() as session:
        _check_folders_free(args.name, validated, config, list_sources(session))
        add_source(session, args.name, kind, settings)
    print(f"added {kind.value} source {args.name}; a running daemon starts {'watching' if args.folder else 'polling'} "
          f"it at its next catalog check ([daemon] catalog_check_seconds); "
          f"`{shlex.join(['iteris-daemon', 'sources', 'scan', args.name, *_catalog_options(args)])}` "
          "registers what it holds now")
    return 0


def _check_folders_free(name: str, settings: BaseModel, config, sources) -> None:
    """A new source's folders must not overlap a folder another source watches (the config's,
    the catalog's enabled ``sources``): the config refuses that for its [[sources]]."""
    from ..config import watched_elsewhere

    watched = [(s.name, Path(folder)) for s in sources if s.enabled and s.name != name
               for folder in s.settings.get("paths", [])]
    watched += [(s.name, folder) for s in (config.sources if config else ()) if s.name != name
                for folder in getattr(s.validated(), "paths", [])]
    for folder in getattr(settings, "paths", []):
        if (why := watched_elsewhere(folder, watched)) is not None:
            raise ConfigError(f"source {name}: {why}")


def _catalog_options(args) -> list[str]:
    """The options that named the catalog, to repeat in a command suggested to the user (a
    --db URL's password masked); none for $ITERIS_DAEMON_DB, which that command reads too."""
    from ..catalog.db import mask_password

    given = args.db if args.db is not None and args.db != os.environ.get(DB_ENV) else None
    return [*(["--db", mask_password(given)] if given else []), *(["--config", str(args.config)] if args.config else [])]


def _source_row(source) -> dict[str, Any]:
    from ..catalog.models import iso_utc

    return {
        "name": source.name, "kind": source.kind.value, "enabled": source.enabled, "healthy": source.healthy,
        "last_poll_at": iso_utc(source.last_poll_at),
        "last_error": source.last_error, "settings": source.settings,
    }


def say(line: str) -> None:
    """Print a line of what the catalog holds as others wrote it (a folder's name, a Hub repo's,
    their errors): control characters escaped, never an escape sequence that clears or retitles
    the terminal, nor a line break that forges a line."""
    print(escape_controls(line))


def _sources_list(args) -> int:
    from ..catalog.registry import list_sources

    with _open(args).session(write=False) as session:
        rows = [_source_row(s) for s in list_sources(session)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no sources; add one with `iteris-daemon sources add`")
    for row in rows:
        health = "ok" if row["healthy"] else f"UNHEALTHY: {row['last_error']}"
        where = row["settings"].get("paths") or row["settings"].get("repos") or row["settings"].get("author")
        say(f"{row['name']:20} {row['kind']:6} {'enabled' if row['enabled'] else 'disabled':9} {health:12} {where}")
    return 0


def _sources_remove(args) -> int:
    from ..catalog.registry import remove_source
    from ..logs import counted
    from ..sources.hub import download_folders, drop_unused_commits

    _check_not_configured(args)
    catalog = _open(args)
    with catalog.session() as session:
        folders = download_folders(session, args.name)
        remove_source(session, args.name)
    # A Hub source's downloads, which no poll visits again; the commits a registered adapter
    # (of another source) uses stay. No poll of this process holds a folder's lock.
    dropped, kept = 0, []
    for folder in sorted(folders):
        try:
            dropped += drop_unused_commits(catalog, folder)
        except OSError as exc:
            kept.append(f"{folder} ({exc.strerror})")
    print(f"removed source {args.name}" + (f"; deleted {counted(dropped, 'download')} from the cache" if dropped else "")
          + "; a running daemon stops watching it at its next catalog check ([daemon] catalog_check_seconds)")
    if kept:
        print(f"iteris-daemon: warning: could not delete the downloads in {', '.join(kept)}", file=sys.stderr)
    return 0


def _check_not_configured(args, config=None) -> None:
    """Refuse to remove, or add again, a source that ``--config`` (read as ``config`` where
    given) declares: the daemon's next reload or start would undo it. A removed one's
    adapters were marked removed until then; one added again watched its new folder until
    then, and the next scan put the config's back."""
    if args.config is None:
        return
    from ..config import load_config

    config = config or load_config(args.config, check_plugins=False)
    if any(source.name == args.name for source in config.sources):
        change = "remove it there" if args.sources_command == "remove" else "change it there"
        raise ConfigError(f"source {args.name} is declared in {args.config}: {change} and reload the daemon "
                          f"(SIGHUP); `sources {args.sources_command}` would be undone at the daemon's next reload or start")


def _sources_scan(args) -> int:
    from ..catalog import Catalog
    from ..catalog.models import SourceKind
    from ..catalog.registry import get_source, list_sources
    from ..catalog.shapes import CatalogShapes
    from ..config import load_config
    from ..sources.hub import CACHE_FOLDER, HubSource
    from ..sources.local import LocalFolderSource
    from ..sources.stat_cache import stat_cache_file
    from ..validation import Limits, skeleton_shapes

    config = load_config(args.config, check_plugins=False, check_sources=True) if args.config else None
    settings = config.daemon if config else None
    # Never created here: run as another user (root, the daemon's state directory unset), a scan
    # filled a catalog of its own that no daemon read.
    catalog = Catalog(named_catalog(args) or (settings.catalog_url() if settings else None), create=False)
    published = None
    if config is not None:  # its sources as the daemon would have them, added or updated first
        from ..config import config_destinations, watched_destination
        from ..daemon import sync_sources

        published = config_destinations(config, args.config)
        for source in config.sources:  # the daemon refuses such a config whole (its plugins' check)
            if (why := watched_destination(source.validated(), published)) is not None:
                raise ConfigError(f"{args.config}: source {source.name}: {why}; the daemon refuses this config")
        sync_sources(catalog, config)
    # Without the daemon's settings its recorded verdicts are left alone: only new content is judged.
    guarded = {"limits": settings.limits.limits() if settings else Limits(),
               "trusted_models": settings.trust_remote_code if settings else (), "rejudge": settings is not None,
               # the shapes a daemon (or an earlier scan) stored; else computed here and stored for the next
               "shapes": CatalogShapes(catalog, skeleton_shapes)}
    with catalog.session() as session:
        sources = [get_source(session, n) for n in args.names] if args.names else [s for s in list_sources(session) if s.enabled]
        targets = [(s.name, s.kind, s.settings) for s in sources]
    cache, unusable = _scan_cache(args.cache_dir or (settings.cache_path() if settings else cache_dir())) if targets else (None, None)
    if unusable:
        print(f"iteris-daemon: warning: {unusable}; folders are hashed in full and Hub sources cannot download",
              file=sys.stderr)
    if any(kind is not SourceKind.local for _, kind, _ in targets):  # the daemon's Hub client: timeouts, 429s
        from ..config import DaemonSettings
        from ..retry import bound_requests

        bound_requests((settings or DaemonSettings()).hub_timeout_seconds)
    code = 0
    for name, kind, source_settings in targets:
        if published is not None and (why := _refused(catalog, name, kind, source_settings, published)) is not None:
            print(f"iteris-daemon: error: source {name} not scanned: {why}", file=sys.stderr)
            code = 1
            continue
        if kind is not SourceKind.local and cache is None:
            print(f"iteris-daemon: error: source {name}: no cache directory to download into", file=sys.stderr)
            code = 1
            continue
        try:
            if kind is SourceKind.local:
                stat_cache = stat_cache_file(cache, name, guarded["limits"]) if cache else None
                report = LocalFolderSource(catalog, name, stat_cache=stat_cache, **guarded).scan()
            else:
                report = HubSource(catalog, name, cache / CACHE_FOLDER, **guarded).poll()
        except ValidationError as exc:
            raise ConfigError.from_validation(f"source {name} settings", exc) from None
        print(f"{name}: {report}")
        with catalog.session() as session:
            source = get_source(session, name)
            if not source.healthy:  # the scan failed (unreachable Hub, folder gone): the others still run
                print(f"iteris-daemon: error: source {name}: {source.last_error}", file=sys.stderr)
                code = 1
    return code


def _refused(catalog, name: str, kind, settings: dict[str, Any], published) -> str | None:
    """Why the daemon refuses to start source ``name`` beside the config's destinations (it
    watches one, or the daemon's own folders), recorded in its health as the daemon records
    it; None when it starts. A scan of it registered the daemon's merges as adapters, which
    the next run merged again, and marked it healthy."""
    from ..daemon import check_not_publishing_into, record_not_started

    try:
        check_not_publishing_into(name, kind, settings, published)
    except ValidationError as exc:
        raise ConfigError.from_validation(f"source {name} settings", exc) from None
    except ConfigError as exc:
        record_not_started(catalog, name, str(exc))
        return str(exc)
    return None


def _scan_cache(path: Path) -> tuple[Path | None, str | None]:
    """The cache directory for a scan, created if need be; or None and why it cannot be
    used. One that belongs to another user (the daemon's, and this is root) is left
    alone: files made in it would be this user's, and the daemon could not rewrite them."""
    try:
        owner = path.stat().st_uid
    except FileNotFoundError:
        owner = os.geteuid()
    except OSError as exc:
        return None, f"cannot use the cache directory {path}: {exc.strerror}"
    if owner != os.geteuid():
        return None, (f"the cache directory {path} belongs to uid {owner}, not this user: not used "
                      "(run the scan as its owner, e.g. sudo -u)")
    try:
        return private_dir(path), None
    except OSError as exc:
        return None, f"cannot use the cache directory {path}: {exc.strerror}"


def _adapter_row(adapter, current) -> dict[str, Any]:
    from ..catalog.models import iso_utc

    return {
        "id": adapter.id, "name": adapter.name, "status": adapter.status.value, "source": adapter.source.name,
        "locator": adapter.locator, "revision": current.revision if current else None,
        "base_model": current.base_model if current else None, "rank": current.rank if current else None,
        "reason": current.reason if current else None,
        "updated_at": iso_utc(adapter.updated_at),
    }


def _revision_row(revision) -> dict[str, Any]:
    from ..catalog.models import iso_utc

    fields = ("revision", "status", "reason", "content_sha256", "files_path", "base_model", "task_type", "rank",
              "alpha", "target_modules", "size_bytes", "has_calibration")
    row = {f: getattr(revision, f) for f in fields}
    row["status"] = revision.status.value
    row["discovered_at"] = iso_utc(revision.discovered_at)
    return row


def _adapters_list(args) -> int:
    from ..catalog.models import AdapterStatus
    from ..catalog.registry import get_source, list_current

    statuses = [AdapterStatus(s) for s in args.status] if args.status else None
    with _open(args).session(write=False) as session:
        if args.source is not None:
            get_source(session, args.source)  # an unknown source is a mistake, not an empty listing
        rows = [_adapter_row(a, current) for a, current in list_current(session, statuses, args.source)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no adapters")
        return 0
    say(f"{'ID':>5} {'STATUS':10} {'SOURCE':14} {'NAME':32} {'RANK':>4} {'REVISION':12} NOTE")
    for row in rows:
        note = row["reason"] if row["status"] == "rejected" else (row["base_model"] or "")
        say(f"{row['id']:>5} {row['status']:10} {row['source'][:14]:14} {row['name'][:32]:32} "
              f"{row['rank'] or '-':>4} {(row['revision'] or '')[:12]:12} {note}")
    return 0


def _adapters_show(args) -> int:
    from ..catalog.registry import get_adapter

    with _open(args).session(write=False) as session:
        adapter = get_adapter(session, args.id)
        row = _adapter_row(adapter, adapter.current)
        row["revisions"] = [_revision_row(r) for r in adapter.revisions]
    if args.json:
        print(json.dumps(row, indent=2))
        return 0
    say(f"adapter {row['id']}: {row['name']} ({row['status']}) from source {row['source']}")
    say(f"  location: {row['locator']}")
    for revision in row["revisions"]:
        current = " (current)" if revision["revision"] == row["revision"] else ""
        say(f"  revision {revision['revision'][:12]}{current}: {revision['status']}, seen {revision['discovered_at']}")
        if revision["reason"]:
            say(f"    reason: {revision['reason']}")
        else:
            say(f"    base {revision['base_model']}, rank {revision['rank']}, alpha {revision['alpha']}, "
                  f"targets {revision['target_modules']}, {revision['size_bytes']} bytes, "
                  f"sha256 {revision['content_sha256']}, calibration {'yes' if revision['has_calibration'] else 'no'}")
    return 0
