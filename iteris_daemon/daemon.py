"""``iteris-daemon run``: sources, scheduler and merge runs in one long-lived process.

Threads: watchdog observers (local folders), APScheduler's pools ("default" for
polls and housekeeping, "merge" with one thread per merge slot), and the main
thread, which only waits for signals and reloads. Jobs have fixed ids and are
added with ``replace_existing``, so a reload (SIGHUP) replaces them instead of
adding copies; the job store is in memory (APScheduler's SQL store would pickle
jobs into the catalog).

Merges run in worker processes (:mod:`iteris_daemon.supervisor`), one per run, each
on a device of ``[daemon] devices`` that no other running merge holds; a run waits
for a free device, and a group never merges twice at once (a lock per group here,
the group's claim in the catalog across daemons).

Stopping (SIGTERM/SIGINT): sources and schedules stop at once (a Hub poll ends at its
next request or backoff wait, each request bounded by the source's timeout); a running merge's
worker is asked to stop (SIGTERM; it stops at its next batch, recorded
``cancelled``) and killed if it has not after ``grace_seconds``. Publishing happens
in this process after the worker finished and is never interrupted: a destination
always holds a complete version. The process exits 0.
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import os
import queue
import shutil
import signal
import threading
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import partial
from operator import attrgetter
from pathlib import Path
from typing import Any, Callable, Collection, Iterator

from apscheduler.events import EVENT_JOB_MAX_INSTANCES, JobSubmissionEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger
from pydantic import ValidationError
from sqlalchemy import select

from . import malloc
from .catalog import Catalog
from .catalog.db import CATALOG_FAILURES
from .catalog.models import Adapter, MergeGroup, RunStatus, Source, SourceKind
from .catalog.prune import RECENT_RUNS, prune
from .catalog.registry import add_source, get_source, set_health
from .catalog.shapes import SHAPES_PREFIX, CatalogShapes, in_worker
from .config import (DaemonConfig, DaemonSettings, Destinations, GroupConfig, MetricsSettings, PruneSettings,
                     WebhookSettings, destinations, load_config, watched_destination)
from .crontab import CrontabTrigger
from .endpoints import DaemonMetrics, HttpServer, Webhook, WebhookOptions, metrics_app, webhook_app
from .devices import unavailable
from .errors import ConfigError, IterisError, first_line
from .logs import Repeated, counted
from .paths import private_dir, state_dir
from .peers import Peers, presence
from .retry import bound_requests
from .runner import (CLAIMED_ELSEWHERE, INPUTS_PREFIX, KEEP_DROPPED_SECONDS, discard_copies, groups_behind,
                     recover_interrupted, run_group, sync_group, worker_id)
from .sources.hub import CACHE_FOLDER, HubSource
from .sources.local import LocalFolderSource, ScanReport
from .sources.stat_cache import stat_cache_file
from .supervisor import WorkerOptions
from .systemd import Notifier
from .worker import CUDA_UNLIMITED

log = logging.getLogger(__name__)
TICK_SECONDS = 2.0  # how often merge-now requests and next-run times are looked at
BUSY_GROUP_RETRY_SECONDS = 1.0  # a run asked for while its group merges is asked again this much later
FIRST_SCAN_WAIT_SECONDS = 300.0  # the longest a run waits for a folder source's first scan (start, reload)
MAX_DEBOUNCE_WAITS = 4  # a changed group runs at most this many debounce_seconds after the first change it waits for
CATALOG_WARNING_SECONDS = 60.0  # a job the catalog keeps failing says so at most this often
UNHEALTHY_AFTER_CHECKS = 3  # a job the catalog failed this often in a row, for as many catalog checks, is a problem
CATALOG_ONLY_JOBS = ("tick", "peers")  # jobs that do nothing but short catalog transactions
# The least time one of them may be under way before it counts as waiting on the catalog: a
# SQLite lock held a while (a prune's VACUUM) makes it wait up to the busy timeout (30 s), then fail.
STUCK_AFTER_SECONDS = 90.0
# Runs in a row a group waits for an adapter whose calibration worker failed (the host short
# of memory for a while), retried with backoff; then the adapter is held back and the rest merges.
CALIBRATION_WORKER_WAITS = 3
PRUNE_JOB = "prune"  # the scheduled catalog prune ([daemon.prune])
PRESENCE_SECONDS = 60.0  # this daemon's row in the catalog is refreshed at least this often (merge-now reads it)
CLOCK_STEP_SECONDS = 5.0  # the wall clock going back further than this against the monotonic one is a step
STATE_LOCK = "daemon.lock"  # in the state folder: held by the daemon that uses it, holds its pid


def sync_sources(catalog: Catalog, config: DaemonConfig) -> None:
    """Configured sources are written into the catalog (the config wins, saying what it changed:
    a source of `sources add` that a config's of its name took over lost its adapters without a
    word); others stay, said in the log, as are groups that select sources the catalog does not have."""
    for source in config.sources:
        def upsert(session, source=source) -> None:
            row = session.scalar(select(Source).where(Source.name == source.name))
            if row is None:
                add_source(session, source.name, SourceKind(source.kind), source.settings())
            else:
                if (row.kind.value, row.settings, row.enabled) != (source.kind, source.settings(), True):
                    log.info("source %s: the catalog's %s source%s, %s, takes the config's settings", source.name,
                             row.kind.value, "" if row.enabled else " (removed, enabled again)", row.settings)
                row.kind, row.settings, row.enabled = SourceKind(source.kind), source.settings(), True

        catalog.write_retrying_conflict(upsert)
    configured = {source.name for source in config.sources}
    with catalog.session(write=False) as session:
        enabled = [row.name for row in session.scalars(select(Source).where(Source.enabled))]
    for group in config.groups:
        unknown = sorted(set(group.select.sources or ()) - set(enabled))
        if unknown:  # a typo, or a source not added yet: the group merges none of its adapters
            log.warning("group %s selects the adapters of source %s, which is not in the catalog (or disabled)",
                        group.name, ", ".join(unknown))
    others = [name for name in enabled if name not in configured]
    if others:  # e.g. a source renamed in the config: the old one still watches its folders
        log.warning("also watching source%s %s from the catalog, not in the config (added with `sources add`, or "
                    "renamed or removed in the config since); `iteris-daemon sources remove NAME` stops that",
                    "s" if len(others) > 1 else "", ", ".join(others))


def lock_state(state: Path) -> int:
    """Lock ``state`` for this process (the lock file's descriptor, to keep open while it
    runs), or a ConfigError naming the daemon that holds it. A second daemon on the same
    folder (`iteris-daemon run` by hand beside the service) deleted the first's run
    folders in its start-up cleanup, failing its merge. An flock, not a pid file: the
    kernel frees it when its holder dies, even by SIGKILL, so no stale lock stops a start."""
    path = state / STATE_LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot open the lock file {path} ({exc.strerror}); [daemon] state_dir sets its folder") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode("ascii", "replace").strip()
        os.close(fd)
        raise ConfigError(f"another daemon{f' (pid {holder})' if holder.isdigit() else ''} uses the state folder "
                          f"{state} (it holds {path}): one daemon per state folder; stop that one, or give this one "
                          "another [daemon] state_dir") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError as exc:  # a full disk: one line, not a traceback
        os.close(fd)
        raise ConfigError(f"cannot write the lock file {path} ({exc.strerror}); [daemon] state_dir sets its "
                          "folder") from None
    return fd


def check_devices_here(settings: DaemonSettings, config_path: Path) -> None:
    """A ConfigError naming ``[daemon] device`` (or ``devices``) when a merge device is not
    on this host (``cuda`` without a GPU): the daemon started, and every run failed seconds
    into its worker, in an error that named no setting."""
    problem = unavailable(settings.merge_devices())
    if problem is not None:
        raise ConfigError(f"{config_path}: [daemon] {'devices' if settings.devices else 'device'}: {problem}")


def warn_unlimited_cuda_workers(memory_limit_mb: int | None, devices: Collection[str]) -> None:
    """A WARNING when ``[daemon] worker_memory_limit_mb`` is set and merges run on CUDA: the
    worker leaves that limit off (CUDA failed to start under it), so it holds the CPU merges only."""
    cuda = [name for name in dict.fromkeys(devices) if name != "cpu"]
    if memory_limit_mb and cuda:
        log.warning("[daemon] worker_memory_limit_mb = %d is not applied to the merges on %s: %s",
                    memory_limit_mb, ", ".join(cuda), CUDA_UNLIMITED)


def check_not_publishing_into(name: str, kind: SourceKind, settings: dict[str, Any], published: Destinations) -> None:
    """A catalog source (``sources add``; the config's are checked when it is read) must not
    watch a group's destination folder or Hub branch: each merge would come back as an
    adapter, merged into the next, without end. Checked before the daemon starts a source
    and before `sources scan --config` scans one."""
    from .sources.hub import HubSettings
    from .sources.local import LocalSettings

    why = watched_destination((LocalSettings if kind is SourceKind.local else HubSettings).model_validate(settings),
                              published)
    if why is not None:
        raise ConfigError(f"{why}; the daemon would register its own merges as adapters (`iteris-daemon sources "
                          f"remove {name}`, or watch elsewhere)")


def record_not_started(catalog: Catalog, name: str, why: str) -> None:
    """Source ``name``'s health: not started, and why (`status`, `sources list` and the
    metrics show it down, as the daemon leaves it)."""
    with catalog.session() as session:
        set_health(session, get_source(session, name).id, f"not started: {why}")


class _NoMaxInstancesWarning(logging.Filter):
    """Drops APScheduler's warning for a job skipped at its ``max_instances``:
    :func:`_log_skipped` says it instead, at the level it deserves."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and "maximum number of running instances" in record.msg)


_NO_MAX_INSTANCES_WARNING = _NoMaxInstancesWarning()


def _sooner(own: datetime | None, recorded: datetime | None) -> bool:
    """Whether a daemon sharing the catalog writes its next run time ``own`` of a group over
    the ``recorded`` one (naive UTC): where none is recorded, where that time has passed, or
    where its own comes first. Each wrote its own at every tick, so two daemons rewrote the
    row every second and `status` flipped between their times (QA PG); now it shows the
    soonest run any of them will start."""
    if recorded is None or recorded <= datetime.now(timezone.utc).replace(tzinfo=None):
        return True
    return own is not None and own < recorded


def _log_skipped(said: Repeated, event: JobSubmissionEvent) -> None:
    """A job due while ``max_instances`` of it are under way or waiting is skipped. A
    group's run (``trigger:`` and ``schedule:`` jobs, 2 instances) is skipped only while
    one of its runs waits for a merge thread, and that one reads the inputs when it
    starts: nothing is lost (with one merge slot this came with every trigger during a
    merge, as a WARNING). Any other job (a poll longer than its interval) loses that turn,
    said at most once an hour (a tick stuck on a blocked catalog said it every 2 s)."""
    kind, _, name = event.job_id.partition(":")
    if kind in ("trigger", "schedule"):
        log.debug("group %s: a run was due while another waited to start; that one reads the inputs anew", name)
    else:
        said.say(logging.INFO, f"job {event.job_id} skipped: its previous run is still under way")


def _every(seconds: float) -> IntervalTrigger:
    """A period in UTC, like every schedule here: without a zone APScheduler asks tzlocal,
    which refuses a POSIX ``TZ`` (``UTC0``)."""
    return IntervalTrigger(seconds=seconds, timezone=timezone.utc)


def new_scheduler(settings: DaemonSettings) -> BackgroundScheduler:
    """The daemon's scheduler: "default" pool for polls and housekeeping, "merge" with one
    thread per merge slot; a job missed while the host slept runs once when it wakes,
    however long it slept, and a run that waited for a merge slot runs once it gets one,
    however long the merge before it took. (APScheduler drops a job that starts later than
    its ``misfire_grace_time``, checked when a pool thread takes it up: at 3600 s a group's
    run queued behind a two-hour merge was dropped, said only by an APScheduler WARNING
    that did not name the group, and a run asked for once, as the catalog check asks for
    a group behind, was not asked for again.)"""
    scheduler = BackgroundScheduler(
        executors={"default": ThreadPoolExecutor(4), "merge": ThreadPoolExecutor(settings.merge_slots())},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        timezone=timezone.utc,
    )
    logging.getLogger("apscheduler.scheduler").addFilter(_NO_MAX_INSTANCES_WARNING)  # once: the same filter
    scheduler.add_listener(partial(_log_skipped, Repeated(log)), EVENT_JOB_MAX_INSTANCES)
    return scheduler


class WallClock:
    """Tells when the wall clock steps back against the monotonic one: NTP correcting a clock
    that ran ahead, a VM restored from a snapshot. APScheduler 3 waits for each job's wall-clock
    time, so every job (the tick that picks up `merge-now`, the catalog check, polls, pending
    runs) stood still for as long as the step, hours maybe, while the daemon said it was healthy."""

    def __init__(self, wall: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
                 monotonic: Callable[[], float] = time.monotonic):
        self._wall, self._monotonic = wall, monotonic
        self._last = (wall(), monotonic())

    def stepped_back(self) -> float:
        """Seconds the wall clock went back since the last call beyond ``CLOCK_STEP_SECONDS``
        (time the two clocks disagree on), else 0."""
        (wall, monotonic), self._last = self._last, (self._wall(), self._monotonic())
        behind = (self._last[1] - monotonic) - (self._last[0] - wall).total_seconds()
        return behind if behind > CLOCK_STEP_SECONDS else 0.0


@dataclass
class _Failing:
    """A job the catalog has failed every time since ``since`` (monotonic)."""

    since: float
    cause: str = ""
    failures: int = 0
    said_at: float | None = None  # the last WARNING
    unsaid: int = 0  # failures since that WARNING


class CatalogHealth:
    """The catalog as the daemon's periodic jobs (tick, catalog check, peers, rescans) find it.

    A job the catalog fails (its server down, locked past the busy timeout, a full disk)
    says so in one WARNING naming the catalog and the cause, then at most once every
    ``CATALOG_WARNING_SECONDS`` while that lasts, counting the failures in between, and
    in an INFO line once the catalog answers it again; tracebacks go to DEBUG. Before,
    every failure reached APScheduler, whose ERROR held a 110-line SQLAlchemy traceback:
    6,000 lines for a minute of PostgreSQL down, from the 2 s tick alone. Any other
    exception (a bug) still reaches APScheduler, traceback and all."""

    def __init__(self, url: Callable[[], str], clock: Callable[[], float] = time.monotonic):
        """``url``: the catalog's URL without its password, asked when said."""
        self._url = url
        self._clock = clock
        self._lock = threading.Lock()
        self._failing: dict[str, _Failing] = {}
        self._under_way: dict[str, float] = {}  # job -> when its block began (monotonic)

    @contextmanager
    def watching(self, job: str) -> Iterator[None]:
        """Run the block as ``job``'s use of the catalog: a catalog failure is said and
        swallowed (the job runs again at its next time), an end without one ends a failure."""
        with self._lock:
            self._under_way[job] = self._clock()
        try:
            yield
        except CATALOG_FAILURES as exc:
            self._failed(job, exc)
        else:
            self._answered(job)
        finally:
            with self._lock:
                self._under_way.pop(job, None)

    def _failed(self, job: str, exc: BaseException) -> None:
        now = self._clock()
        with self._lock:
            failing = self._failing.setdefault(job, _Failing(since=now))
            failing.failures += 1
            failing.cause = f"{type(exc).__name__}: {first_line(exc)}"
            first, due = failing.failures == 1, failing.said_at is None or now - failing.said_at >= CATALOG_WARNING_SECONDS
            unsaid, failing.unsaid = (failing.unsaid, 0) if due else (0, failing.unsaid + 1)
            if due:
                failing.said_at = now
        log.debug("job %s: the catalog failed", job, exc_info=exc)
        if due:
            log.warning("job %s: the catalog %s failed: %s%s", job, self._url(), failing.cause,
                        "" if first else f" (failing for {now - failing.since:.0f} s; "
                                         f"{counted(unsaid, 'more failure')} since the last warning)")

    def forget(self, job: str) -> None:
        """``job`` runs no more (its source removed): its failures are no problem any more."""
        with self._lock:
            self._failing.pop(job, None)

    def _answered(self, job: str) -> None:
        with self._lock:
            failing = self._failing.pop(job, None)
        if failing is not None:
            log.info("job %s: the catalog %s answers again (it failed %s in %.0f s)", job, self._url(),
                     counted(failing.failures, "time"), self._clock() - failing.since)

    def problem(self, after: float) -> str | None:
        """The catalog's failure that makes the daemon unhealthy, or None: a job it failed
        ``UNHEALTHY_AFTER_CHECKS`` times in a row, for ``after`` s at least. Not at once: a
        lock held a while, a server restarted, a single failure must not flip health."""
        now = self._clock()
        with self._lock:
            lasting = [(job, failing) for job, failing in self._failing.items()
                       if failing.failures >= UNHEALTHY_AFTER_CHECKS and now - failing.since >= after]
            # A job that only uses the catalog, under way that long: a lock held, or a server that
            # stopped answering without closing the connection (no error comes; /healthz said ok).
            stuck = [(job, began) for job, began in self._under_way.items()
                     if job in CATALOG_ONLY_JOBS and now - began >= max(after, STUCK_AFTER_SECONDS)]
        if stuck:
            job, began = min(stuck, key=lambda item: item[1])
            return (f"job {job} has waited {now - began:.0f} s on the catalog {self._url()} (a lock held, or its "
                    "server not answering)")
        if not lasting:
            return None
        job, failing = min(lasting, key=lambda item: item[1].since)
        return (f"the catalog {self._url()} has failed job {job} for {now - failing.since:.0f} s "
                f"({counted(failing.failures, 'time')} in a row): {failing.cause}")


class RepoPolls:
    """Webhook polls, at most one per repo at a time. A webhook for a repo whose poll has
    not started yet adds nothing (that poll sees the push); one that comes while the poll
    runs makes it poll once more when done: two pushes seconds apart, the first poll may
    have read the head before the second landed. A flood of replays costs one extra poll."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: set[tuple[str, str]] = set()  # a poll is scheduled or running
        self._again: set[tuple[str, str]] = set()  # asked for after the running poll started

    def request(self, key: tuple[str, str]) -> bool:
        """Note a webhook for ``key``; True when the caller must schedule :meth:`drain`."""
        with self._lock:
            if key in self._active:
                self._again.add(key)
                return False
            self._active.add(key)
            return True

    def cancel(self, key: tuple[str, str]) -> None:
        """The drain asked for could not be scheduled."""
        with self._lock:
            self._active.discard(key)
            self._again.discard(key)

    def drain(self, key: tuple[str, str], poll: Callable[[], object]) -> None:
        """Poll until no webhook came for ``key`` while polling."""
        while True:
            with self._lock:
                self._again.discard(key)  # what came before this poll starts, it sees
            try:
                poll()
            except Exception:  # the source's own bug: logged, and the next webhook polls again
                log.exception("webhook: polling %s (source %s) failed", key[1], key[0])
            with self._lock:
                if key not in self._again:
                    self._active.discard(key)
                    return


def checked_config(path: Path) -> DaemonConfig:
    """The config at ``path`` as a start takes it, or the :class:`ConfigError` that stops one:
    its fields, the plugins and their parameters, token files (at loading), the merge devices
    on this host and the webhook's secret (the ports are bound at the start only)."""
    config = load_config(path)
    check_devices_here(config.daemon, path)
    if config.daemon.webhooks is not None:
        WebhookOptions.of(config.daemon.webhooks)
    return config


class Daemon:
    def __init__(self, config_path: Path, database: str | None = None):
        """``database``: the catalog, when named outside the config (as every command takes it:
        ``cli.catalog.catalog_url``); else the config's."""
        self.config_path = Path(config_path)
        self.database = database
        self.config = load_config(self.config_path)
        self.notifier = Notifier.from_env()
        self.holder = worker_id()
        self._stopping = threading.Event()  # no new work
        self._cancel = threading.Event()  # running merges' workers are asked to stop
        self._free_devices: queue.Queue[str] = queue.Queue()
        self._slots: list[str] = []  # the devices merges run on, one merge each at a time
        self._group_locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._reload = threading.Event()
        self._beat = time.monotonic()
        self._local: dict[str, LocalFolderSource] = {}
        self._sources_guard = threading.Lock()  # the catalog check starts and stops sources, a reload all of them
        # the catalog's sources this daemon started, or tried to: id -> (kind, settings) tried
        self._known_sources: dict[int, tuple[SourceKind, dict[str, Any]]] = {}
        self._polled: list[str] = []  # hub sources
        self._groups: dict[str, GroupConfig] = {}
        self._caught_up: dict[str, frozenset[int]] = {}  # group -> the selection _catch_up last triggered it for
        self._unmerged_since: dict[str, datetime] = {}  # group -> the first change to its inputs no run has begun since
        self._failed_attempts: dict[str, int] = {}  # group -> runs in a row not carried out or not published
        self._calibration_worker_failures: dict[str, int] = {}  # group -> runs in a row with one
        self._claimed_elsewhere: set[str] = set()  # groups whose last run found another daemon merging them
        self._waiting_for_scans: dict[str, float] = {}  # group -> since when its run waits (monotonic)
        self._shared = False  # other daemons were live on the catalog at the presence job's last look
        self._started_with = self.config.daemon  # what run() read once; a reload does not change it
        self.catalog: Catalog | None = None
        self.scheduler: BackgroundScheduler | None = None
        self.metrics: DaemonMetrics | None = None
        self._servers: list[HttpServer] = []
        self._webhook: Webhook | None = None  # the webhook's app, whose settings a reload renews
        self._reload_refused: str | None = None  # why the last reload kept the running configuration
        self._hub: dict[str, HubSource] = {}
        self._repo_polls = RepoPolls()
        self._webhook_jobs = itertools.count()
        self.catalog_health = CatalogHealth(lambda: self.catalog.safe_url)

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> int:
        settings = self.config.daemon
        check_devices_here(settings, self.config_path)  # a config error: before anything starts
        warn_unlimited_cuda_workers(settings.worker_memory_limit_mb, settings.slot_devices())
        malloc.tune()  # before any thread starts
        self._install_signals()
        try:
            self.state = private_dir(settings.state_dir or state_dir())
            self.cache = private_dir(settings.cache_path())
            self.work = private_dir(self.state / "runs")
        except OSError as exc:  # a read-only file system, a file in the way, no permission
            raise ConfigError(f"cannot create the daemon's folder {exc.filename} ({exc.strerror}); [daemon] "
                              "state_dir and cache_dir set where they go") from None
        lock = lock_state(self.state)  # before anything in it is touched: another daemon's runs may be there
        try:
            return self._serve(settings)
        finally:
            os.close(lock)

    def _serve(self, settings: DaemonSettings) -> int:
        """:meth:`run`, once this process holds its state folder: until stopped."""
        self.notifier.status("migrating the catalog")
        self.catalog = Catalog(self.database or settings.catalog_url())
        log.info("catalog %s ready%s", self.catalog.safe_url, " (named by $ITERIS_DAEMON_DB)" if self.database else "")
        self.shapes = CatalogShapes(self.catalog, in_worker(self.work, self._worker_options))
        self.peers = Peers(self.catalog, self.holder)
        try:
            self._start(settings)
        except BaseException:  # a busy port, say: nothing started goes on, no row is left in the catalog
            self._shutdown()
            raise
        self.notifier.ready(self._summary())
        self.notifier.start_watchdog(self.healthy)
        log.info("daemon %s running: %s", self.holder, self._summary())
        clock = WallClock()
        while not self._stopping.wait(0.5):
            self._beat = time.monotonic()
            if back := clock.stepped_back():
                self.clock_stepped_back(back)
            if self._reload.is_set():
                self._reload.clear()
                self.reload()
        self._shutdown()
        return 0

    def clock_stepped_back(self, seconds: float) -> None:
        """Move every pending job's time back by the wall clock's step, so that each waits
        what it was to wait; a cron job's next time, a time of day, is found anew on the
        corrected clock (found on the clock that ran ahead, it was that far off too)."""
        now = datetime.now(timezone.utc)
        for job in self.scheduler.get_jobs():
            if job.next_run_time is None:
                continue
            moved = (job.trigger.get_next_fire_time(None, now) if isinstance(job.trigger, CrontabTrigger)
                     else job.next_run_time - timedelta(seconds=seconds))
            with suppress(JobLookupError):  # it ran, or went, meanwhile
                job.modify(next_run_time=moved)
        log.warning("the wall clock went back %.0f s (NTP stepping it, or a VM restored?): pending jobs were moved "
                    "back with it, cron schedules to their next time on the corrected clock", seconds)

    def _start(self, settings: DaemonSettings) -> None:
        """Everything that may fail at start (a listening socket, the webhook secret) first,
        before any source, job or merge: a start that fails has started nothing."""
        self._bind_http(settings)
        for run_id in recover_interrupted(self.catalog):
            log.warning("run %d was interrupted when the daemon stopped; its group runs again", run_id)
        # Killed runs' and workers' files: every run's folder (this daemon holds the state
        # folder's lock; a kill after a run's end was recorded, before its folder went, left
        # it), its half-written copies, gathered inputs and shape jobs' folders.
        for pattern in ("run-*", ".run-*", f"{INPUTS_PREFIX}*", f"{SHAPES_PREFIX}*"):
            for leftover in self.work.glob(pattern):
                shutil.rmtree(leftover, ignore_errors=True)
        self.scheduler = new_scheduler(settings)
        self._slots = settings.slot_devices()
        for device in self._slots:
            self._free_devices.put(device)
        self.scheduler.start()
        self._apply(self.config)
        self.scheduler.add_job(self._tick, _every(TICK_SECONDS), id="tick", replace_existing=True)
        for server in self._servers:
            server.start()

    def _worker_options(self) -> WorkerOptions:
        settings = self.config.daemon
        return WorkerOptions(grace_seconds=settings.grace_seconds, memory_limit_mb=settings.worker_memory_limit_mb)

    def _bind_http(self, settings: DaemonSettings) -> None:
        """The opt-in endpoints: /metrics and /healthz, and the Hub webhook, bound (served
        once the sources and jobs run); a missing secret or a busy port stops the start."""
        self.metrics = DaemonMetrics(self.catalog, lambda: self._groups)
        if settings.metrics is not None:
            self._servers.append(HttpServer(*settings.metrics.address(), metrics_app(self.metrics, self.health_problem),
                                            name="metrics"))
        if settings.webhooks is not None:
            self._webhook = webhook_app(settings.webhooks, self.repo_changed, self.metrics)
            self._servers.append(HttpServer(*settings.webhooks.address(), self._webhook, name="webhooks"))

    def _install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, lambda *_: self._reload.set())

    def _on_stop(self, signum, _frame) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        self._stopping.set()
        self._cancel.set()

    def _shutdown(self) -> None:
        self.notifier.stopping("stopping: finishing or cancelling the running merge")
        with self._sources_guard:  # a catalog check under way starts none after this
            for source in self._local.values():
                source.stop()
        scheduling = self.scheduler is not None and self.scheduler.running  # not yet, when the start failed early
        for job in self.scheduler.get_jobs() if scheduling else ():  # pending work is dropped; a running merge continues
            job.remove()
        self._clear_next_runs(self._groups)
        running = len(self._slots) - self._free_devices.qsize()
        if running:
            log.info("cancelling %s (workers are killed after %.0fs)", counted(running, "running merge"),
                     self.config.daemon.grace_seconds)
        # Not scheduler.shutdown(wait=True): it waits for running jobs while holding the job
        # store lock, and a job that still calls get_job/add_job (a tick, a source reporting a
        # change) would wait for it forever. Paused, nothing new is submitted; each executor
        # is then drained on its own, and only then is the scheduler stopped.
        if scheduling:
            self.scheduler.pause()
            for executor in ("default", "merge"):
                self.scheduler.remove_executor(executor, shutdown=True)
            self.scheduler.shutdown(wait=False)
        for server in self._servers:
            server.stop()
        self.notifier.stop()
        try:
            self.peers.depart()
        except Exception:  # e.g. the catalog locked: the row is forgotten by the others in a day
            log.exception("could not remove this daemon's row from the catalog")
        self.catalog.close()
        log.info("stopped")

    def healthy(self) -> bool:
        """For the systemd watchdog: the main loop and the scheduler are alive. Not the
        catalog (which /healthz does judge): a restart mends no full disk nor a database
        server that is down, it would only fail to open the catalog and restart again, in
        a loop; alive, the daemon says what fails and goes on once the catalog answers."""
        return self._liveness_problem() is None

    def health_problem(self) -> str | None:
        """Why the daemon is unhealthy, for /healthz, or None: it is not alive (see
        :meth:`healthy`), or its catalog has failed one of its jobs (reads or writes)
        ``UNHEALTHY_AFTER_CHECKS`` times in a row, for as many catalog checks: merges,
        registrations and ``status`` are then stale however alive the process is."""
        problem = self._liveness_problem()
        if problem is not None:
            return problem
        # As many checks as the peers job makes (at least every minute): a long catalog_check_seconds
        # (a day) left a failing catalog unreported for days.
        return self.catalog_health.problem(UNHEALTHY_AFTER_CHECKS * min(self.config.daemon.catalog_check_seconds,
                                                                        PRESENCE_SECONDS))

    def _liveness_problem(self) -> str | None:
        """Why the daemon is not alive (stopping, its main loop or scheduler stuck), or None."""
        if self._stopping.is_set():
            return "stopping"
        if time.monotonic() - self._beat >= 30:
            return "the main loop has not run for 30 s"
        if self.scheduler is None or not self.scheduler.running:
            return "the scheduler is not running"
        return None

    def repo_changed(self, repo_id: str) -> bool:
        """A webhook said ``repo_id`` changed: poll it now in every source that watches it."""
        watching = [hub for hub in list(self._hub.values()) if hub.watches(repo_id)]
        for hub in watching:
            key = (hub.name, repo_id)
            if not self._repo_polls.request(key):
                continue  # the poll under way polls again when done
            try:  # a job of its own: the last drain of this repo may still count as running in APScheduler
                self.scheduler.add_job(self._repo_polls.drain, args=[key, partial(hub.poll_repo, repo_id)],
                                       id=f"webhook:{hub.name}:{repo_id}:{next(self._webhook_jobs)}")
            except Exception:
                self._repo_polls.cancel(key)
                raise
        return bool(watching)

    def reload(self) -> None:
        """SIGHUP: re-read the config; a broken file keeps the running one."""
        self.notifier.reloading()
        webhooks = config = None
        try:
            config = load_config(self.config_path)
            if config.daemon.merge_devices() != self._started_with.merge_devices():  # the start checked those
                check_devices_here(config.daemon, self.config_path)
            if self._webhook is not None and config.daemon.webhooks is not None:  # a secret rotated, say
                webhooks = WebhookOptions.of(config.daemon.webhooks)
        except IterisError as exc:
            self._refused_reload(str(exc))
        else:
            try:
                self._apply(config)
            except Exception as exc:  # the catalog unreachable, say: nothing running was changed
                self._refused_reload(f"{type(exc).__name__}: {first_line(exc)}")  # SQLAlchemy's add the SQL and a link
            else:
                if webhooks is not None:
                    self._webhook.options = webhooks
                self._reload_refused = None
                self.metrics.reload_refused(False)
                self._warn_start_only(config.daemon)
                warn_unlimited_cuda_workers(config.daemon.worker_memory_limit_mb, self._slots)  # the start's devices
                log.info("configuration reloaded: %s", self._summary())
        self.notifier.ready(self._summary())

    def _refused_reload(self, reason: str) -> None:
        """A reload that kept the running configuration: said in the log, and in the status
        systemd shows (`systemctl status`) and ``iteris-daemon``'s summary until a reload goes
        through (and in ``status`` and ``/metrics``): a config that the next start refuses went
        unnoticed for weeks."""
        self._reload_refused = reason
        log.error("reload failed, keeping the running configuration: %s", reason)
        self.metrics.reload_refused(True)
        with suppress(JobLookupError):  # ``status`` shows it from this daemon's row, written now
            self.scheduler.modify_job("peers", next_run_time=datetime.now(timezone.utc))

    def _warn_start_only(self, settings: DaemonSettings) -> None:
        """A WARNING for each setting that ``settings`` changes where only the start reads it:
        a reload that kept the old catalog, folders or devices said nothing of it."""
        started = self._started_with

        def listen(endpoint: MetricsSettings | WebhookSettings | None) -> str:
            return endpoint.listen if endpoint else "none"

        # setting: (what the start read of it, what is in use)
        slots = (DaemonSettings.slot_devices, lambda: ", ".join(self._slots))  # `device` under `devices` is no change
        read_at_start = {
            "database": (lambda s: None if self.database else s.database,  # $ITERIS_DAEMON_DB names it, start or not
                         lambda: self.catalog.safe_url),
            "state_dir": (attrgetter("state_dir"), lambda: self.state),
            "cache_dir": (attrgetter("cache_dir"), lambda: self.cache),
            "device": slots, "devices": slots,
            "max_concurrent_merges": (DaemonSettings.slot_devices, lambda: len(self._slots)),
            "metrics": (attrgetter("metrics"), lambda: listen(started.metrics)),
            "webhooks": (lambda s: listen(s.webhooks), lambda: listen(started.webhooks)),  # path, secret, limit apply
        }
        for name, (read, in_use) in read_at_start.items():
            if getattr(settings, name) != getattr(started, name) and read(settings) != read(started):
                log.warning("daemon.%s changed: takes effect at the next start; still using %s", name, in_use())

    # ------------------------------------------------------------------ wiring
    def _apply(self, config: DaemonConfig) -> None:
        """Bring sources, groups and jobs in line with ``config`` (start, or reload). The
        catalog's part comes first: when it fails, the running sources and jobs are as they were."""
        sync_sources(self.catalog, config)
        for group in config.groups:
            sync_group(self.catalog, group)
        dropped = set(self._groups) - {group.name for group in config.groups}
        self._clear_next_runs(dropped)
        with self.catalog.session(write=False) as session:  # whose merges the state folder keeps
            configured_ids = set(session.scalars(select(MergeGroup.id).where(
                MergeGroup.name.in_([group.name for group in config.groups]))))
        bound_requests(config.daemon.hub_timeout_seconds)
        sources = self._enabled_sources()
        with self._sources_guard:
            self.config = config
            for name in self._local:
                self.catalog_health.forget(f"rescan:{name}")  # restarted below, or gone (its job with it)
            for source in self._local.values():
                source.stop()
            self._local.clear()
            self._polled.clear()
            self._hub.clear()
            dropped_triggers = {f"trigger:{name}" for name in dropped}
            for job in self.scheduler.get_jobs():
                if job.id.startswith(("poll:", "rescan:", "schedule:")) or job.id in dropped_triggers:
                    job.remove()
            self._known_sources = {source_id: (kind, settings) for source_id, (_, kind, settings) in sources.items()}
            for source_id, (name, kind, settings) in sources.items():
                self._start_source(name, kind, settings)
        self._groups = {group.name: group for group in config.groups}
        # The merges kept for groups the config has not had for a week (renamed, dropped; the
        # state folder is this daemon's alone): a whole adapter each, kept for ever before.
        for group_id in discard_copies(self.work, configured_ids):
            log.info("removed the merges kept for group id %d, which the config has not had for %d days", group_id,
                     KEEP_DROPPED_SECONDS // 86400)
        for name in dropped:  # a group may come back under the name: it starts afresh
            self._failed_attempts.pop(name, None)
            self._claimed_elsewhere.discard(name)
            self.metrics.forget_group(name)
        self._caught_up.clear()
        self._unmerged_since.clear()  # every group runs now (below)
        self._calibration_worker_failures.clear()  # a group of another definition may come under a name
        self.scheduler.add_job(self._catch_up, _every(config.daemon.catalog_check_seconds),
                               id="catalog-check", replace_existing=True)
        self.peers.settings_changed()
        self.scheduler.add_job(self._check_peers, _every(min(config.daemon.catalog_check_seconds, PRESENCE_SECONDS)),
                               id="peers", replace_existing=True, next_run_time=datetime.now(timezone.utc))
        self._schedule_prune(config.daemon.prune)
        for group in config.groups:
            self._schedule(group)
            self.trigger(group.name, delay=0)  # catch up with whatever changed while stopped

    def _clear_next_runs(self, names: Collection[str]) -> None:
        """No next run for groups this daemon no longer schedules (it stops, or a reload
        dropped them): `status` showed the last time they had, for ever."""
        if names:
            with self.catalog.session() as session:
                for row in session.scalars(select(MergeGroup).where(MergeGroup.name.in_(list(names)))):
                    row.next_run_at = None

    def _enabled_sources(self) -> dict[int, tuple[str, SourceKind, dict[str, Any]]]:
        """The catalog's enabled sources: id -> (name, kind, settings)."""
        with self.catalog.session(write=False) as session:
            return {s.id: (s.name, s.kind, s.settings) for s in session.scalars(select(Source).where(Source.enabled))}

    def _start_source(self, name: str, kind: SourceKind, settings: dict[str, Any]) -> bool:
        """Watch (a folder source) or poll (a Hub one) source ``name``; False, said in an
        ERROR, when it cannot start: one broken source must not stop the others."""
        try:
            check_not_publishing_into(name, kind, settings, destinations(self.config))
            guarded = {"limits": self.config.daemon.limits.limits(), "trusted_models": self.config.daemon.trust_remote_code,
                       "on_change": partial(self._inputs_changed, name), "shapes": self.shapes}
            if kind is SourceKind.local:
                stat_cache = stat_cache_file(self.cache, name, guarded["limits"])
                source = LocalFolderSource(self.catalog, name, stat_cache=stat_cache, **guarded)
                source.start()
                self._local[name] = source
                self.scheduler.add_job(self._rescan, _every(self.config.daemon.rescan_seconds), args=[source],
                                       id=f"rescan:{name}", replace_existing=True)
            else:
                hub = HubSource(self.catalog, name, self.cache / CACHE_FOLDER, stopping=self._stopping, **guarded)
                self.scheduler.add_job(hub.poll, _every(hub.settings.interval_seconds),
                                       id=f"poll:{name}", replace_existing=True,
                                       next_run_time=datetime.now(timezone.utc))
                self._polled.append(name)
                self._hub[name] = hub
        except Exception as exc:
            self._not_started(name, exc)
            return False
        return True

    def _not_started(self, name: str, exc: Exception) -> None:
        """Say why source ``name`` did not start, in one line and in its health, so that
        `status`, `sources list` and the metrics show it down: it kept its last verdict
        (healthy) and its adapters their last revision, never polled again. Settings stored
        in the catalog that this release refuses (an upgrade) say how to mend them."""
        if isinstance(exc, ValidationError):
            why = (f"{ConfigError.from_validation('its settings', exc)}; `iteris-daemon sources remove {name}`, "
                   "then add it again with settings that pass (a source of the config file: mend it there)")
        else:
            why = first_line(exc) or type(exc).__name__
        log.error("source %s not started: %s", name, why)
        try:
            record_not_started(self.catalog, name, why)
        except Exception as failure:  # the catalog unreachable: the log line above says it
            log.warning("source %s: its health not recorded: %s", name, type(failure).__name__)

    def _rescan(self, source: LocalFolderSource) -> None:
        """The periodic rescan of a local source; the catalog failing it is said as for the
        other jobs (the source's health says so too: see ``LocalFolderSource.scan``)."""
        with self.catalog_health.watching(f"rescan:{source.name}"):
            source.scan()

    def _schedule(self, group: GroupConfig) -> None:
        """Run ``group`` on its ``cron`` or ``interval_seconds``, if it has one. Two instances,
        as for a trigger: a run due while the last scheduled one merges waits for it (with
        one, it was skipped with a WARNING, and no run read the inputs at that time)."""
        trigger = (CrontabTrigger(group.cron) if group.cron
                   else _every(group.interval_seconds) if group.interval_seconds else None)
        if trigger is not None:
            self.scheduler.add_job(self._run, trigger, args=[group.name], id=f"schedule:{group.name}",
                                   executor="merge", replace_existing=True, max_instances=2)

    def _schedule_prune(self, settings: PruneSettings | None) -> None:
        """Prune the catalog on ``[daemon.prune]``'s schedule; a reload without it stops that."""
        if settings is None:
            with suppress(JobLookupError):
                self.scheduler.remove_job(PRUNE_JOB)
            return
        job = self.scheduler.add_job(self._prune, CrontabTrigger(settings.cron), args=[settings], id=PRUNE_JOB,
                                     replace_existing=True)
        log.info("catalog prune of what is older than %g days on cron %r (UTC); next at %s", settings.older_than_days,
                 settings.cron, job.next_run_time.isoformat(timespec="minutes"))

    def _prune(self, settings: PruneSettings) -> None:
        """One scheduled prune, beside this daemon's own writes (``catalog.prune`` logs what
        it deleted). A catalog failure is one WARNING, and the next scheduled time tries
        again; it is not one of the catalog failures that turn /healthz unhealthy: those come
        from jobs run every few seconds, and a daily job's failure would stay for days."""
        try:
            prune(self.catalog, timedelta(days=settings.older_than_days), settings.keep_runs or RECENT_RUNS,
                  stop=self._stopping)
        except CATALOG_FAILURES as exc:
            log.debug("catalog prune failed", exc_info=exc)
            log.warning("catalog prune failed (tried again at the next time of cron %r): %s: %s", settings.cron,
                        type(exc).__name__, first_line(exc))

    def _inputs_changed(self, source: str, report: ScanReport) -> None:
        """Source ``source`` registered, removed or withdrew adapters: the groups whose
        ``select`` takes one of them are debounced. Not every group: a trainer saving
        checkpoints of one adapter put off the merges of all the others for as long as it
        saved. The base model is not compared: a revision on another base model must
        still leave the groups that merged the one before it."""
        locators = {*report.registered, *report.removed, *report.withdrawn}
        groups = list(self._groups.values())  # a reload may replace them meanwhile
        try:
            changed = self._adapters_at(source, locators)
            groups = [group for group in groups
                      if any(group.select.matches(source, name, adapter_id) for adapter_id, name in changed)]
        except Exception as exc:  # the catalog unreachable: better every group than none
            log.warning("source %s changed, but the catalog cannot say which adapters (%s): merging every group",
                        source, type(exc).__name__)
        for group in groups:
            self._debounce(group)

    def _adapters_at(self, source: str, locators: Collection[str]) -> list[tuple[int, str]]:
        """(id, name) of the adapters of ``source`` at ``locators``."""
        with self.catalog.session(write=False) as session:
            return [tuple(row) for row in session.execute(
                select(Adapter.id, Adapter.name).join(Source)
                .where(Source.name == source, Adapter.locator.in_(list(locators))))]

    def _debounce(self, group: GroupConfig) -> None:
        """Run ``group`` ``debounce_seconds`` after this change of its inputs, so that a burst
        of changes makes one run; but no later than ``MAX_DEBOUNCE_WAITS`` debounce periods
        after the first change no run has begun since: changes every few seconds for
        hours (a trainer saving checkpoints) must not put the run off for as long."""
        now = datetime.now(timezone.utc)
        debounce = timedelta(seconds=group.debounce_seconds)
        deadline = self._unmerged_since.setdefault(group.name, now) + MAX_DEBOUNCE_WAITS * debounce
        self._trigger_at(group.name, max(now, min(now + debounce, deadline)))

    def _catch_up(self) -> None:
        """Merge what changed in the catalog without a source of this daemon saying so: an
        adapter registered by `sources scan`, a source removed by `sources remove`, another
        daemon's look on a shared catalog. A group whose selection differs from what its
        last run considered is triggered, once per selection while it stays behind: a run
        that ends without a record (the catalog locked, say) is not asked for again by
        the check but by :meth:`_retry_later`. Skipped while a source of this daemon scans:
        the catalog then holds part of a change the source reports when done (a merge of
        the first adapters of a long scan was published, then the merge of all)."""
        if self._stopping.is_set():
            return
        with self.catalog_health.watching("catalog-check"):
            self.catalog.check_file()
            self._follow_catalog_sources()
            busy = [s.name for s in (*list(self._local.values()), *list(self._hub.values())) if s.busy]
            if busy:  # what it registered so far is half of a change it reports when done
                log.debug("catalog check skipped: source %s is scanning or polling", ", ".join(busy))
                return
            groups = dict(self._groups)  # a reload may replace it meanwhile
            self._trigger_behind(groups, groups_behind(self.catalog, list(groups.values())))

    def _follow_catalog_sources(self) -> None:
        """Stop watching or polling each source of this daemon that `sources remove` took out
        of the catalog since (disabled, or deleted: a source added again under its name is
        another row), and start each one `sources add` put there (or enabled again), saying
        so once. A removed one went on registering adapters, which its groups merged;
        deleted, it failed on the missing row at every look, for ever. An added one was
        not watched until a reload or restart. A source the config declares is added again
        by the next reload or start."""
        enabled = self._enabled_sources()
        with self._sources_guard:
            if self._stopping.is_set():  # the sources are being stopped
                return
            running = {**{name: s.source_id for name, s in list(self._hub.items())},
                       **{name: s.source_id for name, s in list(self._local.items())}}
            configured = {source.name for source in self.config.sources}
            for name, source_id in running.items():
                if source_id not in enabled:
                    self._drop_source(name)
                    self._known_sources.pop(source_id, None)  # enabled again (`sources add`), it starts again
                    log.warning("source %s was removed from the catalog (`iteris-daemon sources remove`): no longer "
                                "watched%s", name, ", until a reload or restart adds it again: the config declares "
                                "it; remove it there" if name in configured else "")
            for source_id, (name, kind, settings) in enabled.items():
                # Tried once per settings: a source that cannot start is said once, and one mended
                # (`sources remove`, then `sources add`: the same row, enabled again) is tried again.
                if source_id in running.values() or self._known_sources.get(source_id) == (kind, settings):
                    continue
                self._known_sources[source_id] = (kind, settings)
                if self._start_source(name, kind, settings):
                    log.info("source %s was added to the catalog (`iteris-daemon sources add`): %s it now", name,
                             "watching" if kind is SourceKind.local else "polling")

    def _drop_source(self, name: str) -> None:
        """Stop source ``name``: its watcher, rescans and polls (a poll under way ends on its own)."""
        local = self._local.pop(name, None)
        if local is not None:
            local.stop()
        self._hub.pop(name, None)
        if name in self._polled:
            self._polled.remove(name)
        for job in (f"rescan:{name}", f"poll:{name}"):
            with suppress(JobLookupError):  # not a local source, or not a Hub one
                self.scheduler.remove_job(job)
        self.catalog_health.forget(f"rescan:{name}")  # its failures would keep /healthz unhealthy for ever

    def _trigger_behind(self, groups: dict[str, GroupConfig], behind: dict[str, frozenset[int]]) -> None:
        """Trigger each group of ``behind`` (name -> its selection now) not asked for yet (see :meth:`_catch_up`)."""
        for name in set(self._caught_up) - set(behind):  # caught up: the same selection may come back
            self._caught_up.pop(name, None)
        for name, selection in behind.items():
            lock = self._group_locks.get(name)
            if (self.scheduler.get_job(f"trigger:{name}") is not None or (lock is not None and lock.locked())
                    or self._caught_up.get(name) == selection):
                continue  # a run is due or under way (it gathers its inputs anew), or this one was asked for
            self._caught_up[name] = selection
            log.info("group %s: its adapters changed in the catalog since its last run, not through this daemon's "
                     "sources; merging", name)
            self.trigger(name, delay=groups[name].debounce_seconds)

    def _check_peers(self) -> None:
        """Say this daemon is here, with its shared settings; warn about live daemons on the
        catalog whose settings differ (see :mod:`iteris_daemon.peers`)."""
        settings = self.config.daemon
        live = max(settings.claim_ttl_seconds, 3 * settings.catalog_check_seconds)
        with self.catalog_health.watching("peers"):
            self._shared = bool(self.peers.others(within=live))
            row = presence(settings, self._groups, self._reload_refused)
            for peer, differ in self.peers.disagreements(row, within=live):
                log.warning("daemon %s, also on this catalog, has other settings: %s. Give every daemon on one catalog "
                            "the same [daemon.limits] and trust_remote_code: under different ones each judges the other's "
                            "adapter verdicts again at every look, and an adapter one accepts and the other refuses flips "
                            "between registered and rejected",
                            peer.holder, "; ".join(differ))

    def trigger(self, group: str, delay: float) -> None:
        """Run ``group`` after ``delay`` s; a newer trigger replaces a pending one."""
        self._trigger_at(group, datetime.now(timezone.utc) + timedelta(seconds=delay))

    def _trigger_at(self, group: str, when: datetime) -> None:
        """Run ``group`` at ``when``, instead of at the time a pending trigger said."""
        if self._stopping.is_set() or group not in self._groups:
            return
        # max_instances=2: a trigger that fires while this group's previous trigger still merges
        # (older inputs) must not be dropped; it comes back once that run is over (see _run).
        self.scheduler.add_job(self._run, "date", run_date=when, args=[group], id=f"trigger:{group}",
                               executor="merge", replace_existing=True, max_instances=2)

    def _wait_for_first_scans(self, name: str) -> bool:
        """Whether group ``name``'s run waits (asked again a second later) for a folder source's
        first scan since its start or a reload, which registers the adapters one by one: a
        reload that fixed a watched path merged and published a part of them. At most
        :data:`FIRST_SCAN_WAIT_SECONDS`: a scan stuck (a stale network mount) holds no run for ever."""
        scanning = sorted(s.name for s in list(self._local.values()) if s.starting)
        since = self._waiting_for_scans.setdefault(name, time.monotonic()) if scanning else None
        if since is None or time.monotonic() - since > FIRST_SCAN_WAIT_SECONDS:
            if since is not None:
                log.warning("group %s: source %s is still at its first scan after %.0f s: running without waiting "
                            "for it", name, ", ".join(scanning), time.monotonic() - since)
            self._waiting_for_scans.pop(name, None)
            return False
        if self.scheduler.get_job(f"trigger:{name}") is None:  # else that pending trigger asks again
            self.trigger(name, delay=BUSY_GROUP_RETRY_SECONDS)
        return True

    def _run(self, name: str) -> None:
        """One run of group ``name`` on a free device. A group already merging is asked
        again a little later: waiting here would hold one of the merge threads (one per
        device), and another group's run, ready for the free device, would wait behind it."""
        if self._wait_for_first_scans(name):
            return
        with self._locks_guard:
            group_lock = self._group_locks.setdefault(name, threading.Lock())
        if not group_lock.acquire(blocking=False):
            if self.scheduler.get_job(f"trigger:{name}") is None:  # else that pending trigger asks again
                self.trigger(name, delay=BUSY_GROUP_RETRY_SECONDS)
            return
        try:
            if self._stopping.is_set():
                return
            device = self._free_devices.get()
            try:
                self._run_on(name, device)
            finally:
                self._free_devices.put(device)
        finally:
            group_lock.release()

    def _run_on(self, name: str, device: str) -> None:
        group = self._groups.get(name)
        if group is None or self._stopping.is_set():
            return
        settings = self.config.daemon
        self._unmerged_since.pop(name, None)  # this run reads every change until now
        self._status(f"merging group {name} on {device}")
        started = time.monotonic()
        try:
            outcome = run_group(
                self.catalog, group, self.work, self.holder, settings.claim_ttl_seconds,
                should_stop=self._cancel.is_set, device=device,
                trust_remote_code=group.base_model in settings.trust_remote_code, on_status=self._status,
                limits=settings.limits.limits(),
                worker=self._worker_options(),
                on_worker_failure=lambda kind: self.metrics.worker_failed(name, kind),
                stopping=self._cancel, cache_dir=self.cache,
                wait_for_calibration_workers=self._calibration_worker_failures.get(name, 0) < CALIBRATION_WORKER_WAITS,
            )
        except Exception as exc:  # e.g. the catalog locked past its timeout, or its server unreachable
            if isinstance(exc, CATALOG_FAILURES):  # one line; the traceback at DEBUG, as the jobs say it
                log.error("group %s: the run could not be carried out: the catalog failed: %s: %s", name,
                          type(exc).__name__, first_line(exc))
                log.debug("group %s: the run could not be carried out", name, exc_info=exc)
            else:
                log.exception("group %s: the run could not be carried out", name)
            self.metrics.run_not_carried_out(name)
            self._retry_later(name)
            return
        finally:
            malloc.release_free_heap()
        if outcome.retry_publish or outcome.retry_inputs:
            self._retry_later(name)
        else:
            self._failed_attempts.pop(name, None)
        if outcome.calibration_worker_failed:
            self._calibration_worker_failures[name] = self._calibration_worker_failures.get(name, 0) + 1
        elif outcome.status is not RunStatus.cancelled and outcome.detail != CLAIMED_ELSEWHERE:
            self._calibration_worker_failures.pop(name, None)  # its workers answered (the others asked none)
        if outcome.detail == CLAIMED_ELSEWHERE:
            self._claimed_elsewhere.add(name)
            if self.scheduler.get_job(f"trigger:{name}") is None:
                # Its holder may have died (the claim goes stale) or merge older inputs: ask again.
                self.trigger(name, delay=settings.claim_ttl_seconds / 2)
        else:
            self._claimed_elsewhere.discard(name)
        if outcome.merged:  # not a kept merge published again (a fraction of a second), nor a skip
            self.metrics.observe_merge(name, time.monotonic() - started)
        self.notifier.status(f"group {name}: last run {outcome.status.value}; {self._summary()}")

    def _retry_later(self, name: str) -> None:
        """Ask again for a run that could not be carried out, whose merge could not be
        published (it is kept: the next run with the same inputs publishes it without
        merging), or that waits for a calibration source it could not reach or whose worker
        failed (or held such an adapter back), ``retry_seconds`` later, doubling after each such failure in a row up to
        ``retry_max_seconds``: a catalog locked for a while, a database server restarting
        or a Hub outage must not leave a group behind until its next schedule (hours,
        maybe), and one that stays down is not hammered. A trigger already pending (a
        newer change) runs anyway and is left as it is; a run that merges other inputs
        anew, is skipped for another reason or succeeds ends the series, and a stopping
        daemon triggers nothing."""
        settings = self.config.daemon
        attempts = self._failed_attempts[name] = self._failed_attempts.get(name, 0) + 1
        if (not settings.retry_seconds or self._stopping.is_set()
                or self.scheduler.get_job(f"trigger:{name}") is not None):
            return
        delay = min(settings.retry_seconds * 2.0 ** min(attempts - 1, 40), settings.retry_max_seconds)
        log.warning("group %s: trying the run again in %g s (%d failed in a row)", name, delay, attempts)
        self.trigger(name, delay=delay)

    def _tick(self) -> None:
        """Pick up `merge-now` requests; record next run times for `status`.

        The scheduler is consulted between two short transactions, never inside one: a
        SQLite transaction holds the catalog's write lock, which other daemons wait for."""
        if self._stopping.is_set():
            return
        with self.catalog_health.watching("tick"):
            with self.catalog.session() as session:
                groups = session.execute(select(MergeGroup.name, MergeGroup.requested_at, MergeGroup.next_run_at)
                                         .where(MergeGroup.name.in_(list(self._groups)))).all()
            changed: dict[str, datetime | None] = {}
            for name, requested_at, next_run_at in groups:
                pending = self.scheduler.get_job(f"trigger:{name}")
                soon = datetime.now(timezone.utc) + timedelta(seconds=TICK_SECONDS)
                # A request of a group another daemon merges is asked again as its claim says
                # (claim_ttl / 2 later), not at every tick: its holder serves the request. A
                # trigger further off than that (a retry's backoff) is brought forward.
                claim_wait = soon + timedelta(seconds=self.config.daemon.claim_ttl_seconds / 2)
                if requested_at is not None and (pending is None or pending.next_run_time > (
                        claim_wait if name in self._claimed_elsewhere else soon)):
                    self.trigger(name, delay=0)
                times = [job.next_run_time for job in (self.scheduler.get_job(f"trigger:{name}"),
                                                       self.scheduler.get_job(f"schedule:{name}")) if job]
                upcoming = min(times).astimezone(timezone.utc).replace(tzinfo=None) if times else None
                if next_run_at != upcoming and (not self._shared or _sooner(upcoming, next_run_at)):
                    changed[name] = upcoming
            if changed:
                with self.catalog.session() as session:
                    for row in session.scalars(select(MergeGroup).where(MergeGroup.name.in_(list(changed)))):
                        row.next_run_at = changed[row.name]

    def _summary(self) -> str:
        return self._with_refusal(f"watching {len(self._local)} folder and {len(self._polled)} hub sources, "
                                  f"{len(self._groups)} merge groups")

    def _status(self, text: str) -> None:
        """systemd's STATUS: what the daemon does, and a refused reload until one goes through."""
        self.notifier.status(self._with_refusal(text))

    def _with_refusal(self, text: str) -> str:
        if self._reload_refused is None:
            return text
        return f"{text}; the last reload was refused, running the configuration before it: {self._reload_refused}"
