"""The daemon's opt-in HTTP endpoints: Prometheus metrics, a health check, and a
Hugging Face Hub webhook that polls a watched repo as soon as it changes.

Two small WSGI apps, each served by :class:`HttpServer` (the standard library's
``wsgiref`` with a thread per request; no HTTP parsing of our own):

- :func:`metrics_app`: ``GET /metrics`` (Prometheus text format) and ``GET /healthz``
  (200 ``ok``, or 503 with the reason the daemon is unhealthy); HEAD answers as GET
  without the body;
- :func:`webhook_app`: ``POST <path>`` (default ``/webhooks/hub``). The Hub sends the
  webhook's secret in ``X-Webhook-Secret``; a request without the right one triggers
  nothing (401). The body is read only when its ``Content-Length`` is within
  ``max_body_bytes``. A model repo's ``repo`` or ``repo.*`` event asks the daemon to poll
  that repo now (202 ``{"triggered": true}``) when a source watches it; anything else is
  answered 200 ``{"triggered": false}``, so the Hub does not retry it.

Metrics. Read from the catalog at every scrape, so they hold for every daemon
sharing it and survive restarts; the groups are the daemon's configured ones (a group
dropped from the config stays in the catalog, and its last publish would never move):

- ``iteris_catalog_up``: 1, or 0 when the catalog could not be read (then only the
  in-process metrics follow);
- ``iteris_adapters{source,status}``: adapters per source and status;
- ``iteris_merge_runs_total{group,status}``: merge runs recorded (a skipped run that
  repeats the last one shares its row, and counts), those ``db prune`` deleted included:
  a prune keeps their counts (``pruned_runs``), so it does not lower the counter;
- ``iteris_last_publish_timestamp_seconds{group,destination}``: per destination
  (``kind:location``), when the run that published what it serves finished: the group's
  last successful run, or a later one that failed after publishing there;
- ``iteris_fidelity_gap{group,task}``: each task's fidelity gap in the last published
  merge, the newest any destination serves (0: as the task's own adapter, 1: no better
  than the base model);
- ``iteris_added_next_token_loss{group,task}``: for a language model that generates, what
  that run's merge adds to each task's next-token loss over the task's own adapter (nats
  per token);
- ``iteris_source_up{source}``: 1 when an enabled source's last scan or poll went
  through, else 0 (``iteris-daemon sources list`` shows the error);
- ``iteris_source_last_poll_timestamp_seconds{source}``: when it was last scanned or
  polled, successfully or not.

Counted in this process (they restart at 0 with it):

- ``iteris_merge_duration_seconds{group}``: histogram of merge durations, 1 s to 4 h;
- ``iteris_worker_failures_total{group,reason}``: merge and calibration workers lost, by
  ``reason``: the ``kind`` of the supervisor's ``WorkerFailed`` (``WORKER_FAILURE_REASONS``;
  anything else would count as ``other``); a calibration worker whose source answered out
  of memory counts once as ``memory``;
- ``iteris_runs_not_carried_out_total{group}``: runs that ended without a record;
- ``iteris_webhook_requests_total{outcome}``: webhook requests by outcome
  (``WEBHOOK_OUTCOMES``); only where the webhook is configured (:func:`webhook_app` adds it).

The counters are at 0 from the start, so rate() sees the first increment: the failures and
runs not carried out for each of the daemon's groups (and each reason), the webhook's for
each outcome.

Nothing here imports torch: the daemon process does not load it.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import socket
import socketserver
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable, Iterable, Iterator
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from typing import Any, NamedTuple
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Select, and_, func, or_, select
from sqlalchemy.orm import Session

from . import safe_json
from .catalog import Catalog
from .catalog.models import Adapter, AdapterStatus, MergeGroup, MergeRun, PrunedRuns, RunStatus, Source
from .config import WebhookSettings
from .errors import ConfigError
from .figures import added_losses, fidelity_gaps, task_figures
from .status import newest_served, serving

log = logging.getLogger(__name__)

MERGE_DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)
# the kinds supervisor.run_in_worker raises WorkerFailed with: a signal, an exit without a result,
# out of memory, an error the worker reported
WORKER_FAILURE_REASONS = ("signal", "exit", "memory", "error")
WEBHOOK_OUTCOMES = ("triggered", "ignored", "unauthorized", "bad_request", "length_required", "too_large",
                    "method_not_allowed", "not_found", "error")
REQUEST_TIMEOUT_SECONDS = 10.0  # between two reads of a request
REQUEST_DEADLINE_SECONDS = 30.0  # a whole request, however slowly its bytes come
MAX_CONNECTIONS = 32  # served at once; past it a connection is closed at once
# Hub repo ids: "owner/name", or a bare name for the oldest models.
_REPO_NAME = re.compile(r"(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}", re.ASCII)


class _Once:
    """Remembers the last ``size`` keys, so a repeated event is logged once, in bounded memory."""

    def __init__(self, size: int = 1024):
        self._size = size
        self._seen: OrderedDict[Hashable, None] = OrderedDict()
        self._lock = threading.Lock()

    def first(self, key: Hashable) -> bool:
        with self._lock:
            if key in self._seen:
                self._seen.move_to_end(key)
                return False
            self._seen[key] = None
            if len(self._seen) > self._size:
                self._seen.popitem(last=False)
            return True


@contextmanager
def _reading(catalog: Catalog) -> Iterator[Session]:
    """A read-only transaction: one snapshot for all of a scrape's queries. Not
    ``catalog.session()``, whose SQLite ``BEGIN IMMEDIATE`` takes the write lock and
    would hold a scrape for up to the busy timeout (30 s) behind any writer; a deferred
    ``BEGIN`` in WAL mode reads without waiting. Closing the session rolls it back."""
    with Session(catalog.engine) as session:
        connection = session.connection()
        if connection.dialect.name == "sqlite":
            connection.exec_driver_sql("BEGIN")  # pysqlite would open none before a SELECT
        yield session


def _unix(when: datetime) -> float:
    """Catalog times are naive UTC."""
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()


def _catalog_families() -> dict[str, Metric]:
    return {
        "adapters": GaugeMetricFamily("iteris_adapters", "Adapters in the catalog, by source and status.",
                                      labels=["source", "status"]),
        "runs": CounterMetricFamily("iteris_merge_runs", "Finished merge runs recorded in the catalog, by group and "
                                    "status.", labels=["group", "status"]),
        # Not a counter status: a running run becomes a finished one, and a counter never goes down.
        "running": GaugeMetricFamily("iteris_merge_runs_running", "Merge runs under way, by group.", labels=["group"]),
        "published": GaugeMetricFamily(
            "iteris_last_publish_timestamp_seconds",
            "When the run that published what the destination (kind:location) serves finished.",
            labels=["group", "destination"]),
        "fidelity": GaugeMetricFamily(
            "iteris_fidelity_gap",
            "Per task, the fidelity gap of the group's last successful run (0: as the task's adapter, 1: as the base).",
            labels=["group", "task"]),
        "added_loss": GaugeMetricFamily(
            "iteris_added_next_token_loss",
            "Per task, the next-token loss the group's last successful merge adds over the task's own adapter "
            "(nats per token; language models that generate).",
            labels=["group", "task"]),
        "source_up": GaugeMetricFamily("iteris_source_up",
                                       "1 when the enabled source's last scan or poll went through, else 0.",
                                       labels=["source"]),
        "last_poll": GaugeMetricFamily("iteris_source_last_poll_timestamp_seconds",
                                       "When the enabled source was last scanned or polled, successfully or not.",
                                       labels=["source"]),
    }


def _catalog_up(value: int) -> GaugeMetricFamily:
    return GaugeMetricFamily("iteris_catalog_up", "1 when this scrape could read the catalog, else 0.", value=value)


def _served_candidates(group_id: int) -> Select:
    """The group's last success, and the failed runs since that may have published to some
    destinations, newest first (what :func:`status.serving` reads). Per group: the runs read
    are those since its last success, found at the end of ix_merge_runs_group_status; joined
    over every group, SQLite read every group's successful and failed runs, and the scrape's
    time grew with the history (611 ms at 200,000 runs)."""
    last_success = (select(func.max(MergeRun.id))
                    .where(MergeRun.group_id == group_id, MergeRun.status == RunStatus.succeeded).scalar_subquery())
    return (select(MergeRun.id, MergeRun.status, MergeRun.finished_at, MergeRun.metrics)
            .where(MergeRun.group_id == group_id, MergeRun.id >= func.coalesce(last_success, 0),
                   or_(MergeRun.status == RunStatus.succeeded,
                       and_(MergeRun.status == RunStatus.failed, MergeRun.may_have_published())))
            .order_by(MergeRun.id.desc()))


class CatalogCollector(Collector):
    """Reads the catalog at every scrape; a database that fails makes ``iteris_catalog_up 0``,
    logged once per outage, and the scrape still answers."""

    def __init__(self, catalog: Catalog, configured: Callable[[], Collection[str]] | None = None):
        """``configured``: the names of the daemon's groups now (a reload changes them); the
        catalog's other groups are not exported. None: every group of the catalog."""
        self.catalog = catalog
        self.configured = configured
        self._down = False
        self._lock = threading.Lock()

    def describe(self) -> Iterable[Metric]:
        """The families without samples: the registry checks their names for collisions
        without querying the catalog."""
        return [_catalog_up(1), *_catalog_families().values()]

    def collect(self) -> Iterable[Metric]:
        try:
            families = self._read()
        except Exception as exc:  # whatever the database raises, the other metrics are still served
            with self._lock:
                first, self._down = not self._down, True
            if first:
                reason = (str(exc).splitlines() or [""])[0]
                log.warning("metrics: cannot read the catalog (%s: %s); iteris_catalog_up is 0 until it can",
                            type(exc).__name__, reason)
            return [_catalog_up(0)]
        with self._lock:
            recovered, self._down = self._down, False
        if recovered:
            log.info("metrics: the catalog can be read again")
        return [_catalog_up(1), *families]

    def _read(self) -> list[Metric]:
        with _reading(self.catalog) as session:
            sources = session.execute(select(Source.name, Source.enabled, Source.healthy, Source.last_poll_at)
                                      .order_by(Source.name)).all()
            adapters = session.execute(select(Source.name, Adapter.status, func.count()).join(Adapter.source)
                                       .group_by(Source.name, Adapter.status)).all()
            names = dict(session.execute(select(MergeGroup.id, MergeGroup.name).order_by(MergeGroup.name)).all())
            # by group id: in ix_merge_runs_group_status's order, read from the index alone
            runs = session.execute(select(MergeRun.group_id, MergeRun.status, func.sum(MergeRun.repeats))
                                   .group_by(MergeRun.group_id, MergeRun.status)).all()
            pruned = session.execute(select(PrunedRuns.group_id, PrunedRuns.status, PrunedRuns.runs)).all()
            if self.configured is not None:  # a group dropped from the config stays in the catalog: no daemon runs it
                configured = set(self.configured())
                names = {group_id: name for group_id, name in names.items() if name in configured}
            recent = {name: session.execute(_served_candidates(group_id)).all() for group_id, name in names.items()}
        families = _catalog_families()
        adapter_counts = {(source, status): count for source, status, count in adapters}
        run_counts: dict[tuple[int, RunStatus], int] = {}
        for group_id, status, count in [*runs, *pruned]:  # the runs' rows, and those `db prune` deleted
            run_counts[group_id, status] = run_counts.get((group_id, status), 0) + count
        for source in sources:
            for status in AdapterStatus:  # zeros too: a series that appears only when non-zero breaks rate() and alerts
                count = adapter_counts.get((source.name, status), 0)
                families["adapters"].add_metric([source.name, status.value], count)
            if source.enabled:
                families["source_up"].add_metric([source.name], int(source.healthy))
                if source.last_poll_at is not None:
                    families["last_poll"].add_metric([source.name], _unix(source.last_poll_at))
        for group_id, group in names.items():
            for status in RunStatus:
                family, labels = ((families["running"], [group]) if status is RunStatus.running
                                  else (families["runs"], [group, status.value]))
                family.add_metric(labels, run_counts.get((group_id, status), 0))
        for group, rows in recent.items():
            served = serving(rows)
            published = {f"{entry.get('kind')}:{entry.get('location')}": run.finished_at for entry, run in served}
            for destination, finished_at in sorted(published.items()):
                if finished_at is not None:
                    families["published"].add_metric([group, destination], _unix(finished_at))
            latest = newest_served(served)
            tasks = task_figures(latest.metrics.get("tasks")) if latest and isinstance(latest.metrics, dict) else {}
            for task, gap in sorted(fidelity_gaps(tasks).items()):
                families["fidelity"].add_metric([group, task], float(gap))
            for task, added in sorted(added_losses(tasks).items()):
                families["added_loss"].add_metric([group, task], float(added))
        return list(families.values())


class _AtZero(Collector):
    """A counter whose series exist at 0 for each of the daemon's groups (now: a reload
    changes them) and each ``values``: a series that appears only at its first increment
    breaks rate() and alerts."""

    def __init__(self, counter: Counter, configured: Callable[[], Collection[str]] | None,
                 values: Iterable[tuple[str, ...]] = ((),)):
        self.counter, self.configured, self.values = counter, configured, tuple(values)

    def describe(self) -> Iterable[Metric]:
        return self.counter.describe()

    def collect(self) -> Iterable[Metric]:
        for group in self.configured() if self.configured is not None else ():
            for values in self.values:
                self.counter.labels(group, *values)
        return self.counter.collect()


class DaemonMetrics:
    """Everything ``/metrics`` shows, in a registry of its own: never prometheus_client's
    global one, so two daemons in one process (or tests) do not share counters."""

    def __init__(self, catalog: Catalog, configured: Callable[[], Collection[str]] | None = None):
        self.registry = CollectorRegistry()
        self.registry.register(CatalogCollector(catalog, configured))
        self._merge_duration = Histogram(
            "iteris_merge_duration_seconds", "How long merges took (this process).", ["group"],
            buckets=MERGE_DURATION_BUCKETS, registry=self.registry)
        self._worker_failures = Counter(
            "iteris_worker_failures", "Merge workers lost (this process), by reason.", ["group", "reason"],
            registry=None)
        self.registry.register(_AtZero(self._worker_failures, configured,
                                       [(reason,) for reason in WORKER_FAILURE_REASONS]))
        self._webhook_requests: Counter | None = None  # see webhook_requests()
        self._runs_not_carried_out = Counter(
            "iteris_runs_not_carried_out", "Runs that ended without a record (this process): the catalog locked "
            "or unreachable; each is tried again (retry_seconds).", ["group"], registry=None)
        self.registry.register(_AtZero(self._runs_not_carried_out, configured))
        self._reload_refused = Gauge(
            "iteris_reload_refused", "1 while this daemon's last reload was refused: it runs the configuration before "
            "it, and its next start reads the refused file.", registry=self.registry)

    def observe_merge(self, group: str, seconds: float) -> None:
        self._merge_duration.labels(group).observe(seconds)

    def worker_failed(self, group: str, reason: str) -> None:
        """``reason``: one of ``WORKER_FAILURE_REASONS``; anything else counts as ``other``
        (a label value per distinct message would grow without bound)."""
        self._worker_failures.labels(group, reason if reason in WORKER_FAILURE_REASONS else "other").inc()

    def webhook_requests(self) -> Counter:
        """The webhook's request counter, registered on first use: a daemon without a
        webhook exports none (a series stuck at 0 would read as "no webhook came")."""
        if self._webhook_requests is None:
            self._webhook_requests = Counter(
                "iteris_webhook_requests", "Hub webhook requests (this process), by outcome.", ["outcome"],
                registry=self.registry)
            for outcome in WEBHOOK_OUTCOMES:  # present at 0 from the start, so rate() sees the first one
                self._webhook_requests.labels(outcome)
        return self._webhook_requests

    def reload_refused(self, refused: bool) -> None:
        self._reload_refused.set(int(refused))

    def run_not_carried_out(self, group: str) -> None:
        self._runs_not_carried_out.labels(group).inc()

    def forget_group(self, group: str) -> None:
        """Drop the series of a group this daemon no longer runs (a reload dropped or renamed
        it): kept, every name a group had had stayed in each scrape until a restart."""
        for metric, labels in ((self._merge_duration, [(group,)]), (self._runs_not_carried_out, [(group,)]),
                               (self._worker_failures, [(group, reason) for reason in (*WORKER_FAILURE_REASONS, "other")])):
            for values in labels:
                with suppress(KeyError):  # never observed
                    metric.remove(*values)


def _respond(start_response: StartResponse, status: str, body: bytes, content_type: str = "text/plain; charset=utf-8",
             headers: Iterable[tuple[str, str]] = (), exc_info: Any = None) -> list[bytes]:
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body))), *headers], exc_info)
    return [body]


def _head_as_get(app: WSGIApplication) -> WSGIApplication:
    """``app`` answering HEAD as GET without the body: the same status and headers, and
    the Content-Length the GET has (wsgiref counts it for a body of one block; it would
    say 0). Monitoring probes use HEAD; wsgiref would send whatever body an app returns,
    and prometheus_client answers HEAD 405."""

    def head_as_get(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") != "HEAD":
            return app(environ, start_response)
        answer: list[tuple[str, list[tuple[str, str]]]] = []

        def keep(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], object]:
            answer.append((status, list(headers)))
            return lambda data: None

        body = app({**environ, "REQUEST_METHOD": "GET"}, keep)
        try:
            length = sum(len(block) for block in body)  # an app may call start_response only as its body is read
        finally:
            if hasattr(body, "close"):
                body.close()
        status, headers = answer[-1]
        if not any(name.lower() == "content-length" for name, _ in headers):
            headers.append(("Content-Length", str(length)))
        start_response(status, headers)
        return []

    return head_as_get


def metrics_app(metrics: DaemonMetrics, health: Callable[[], str | None]) -> WSGIApplication:
    """``/metrics`` and ``/healthz`` (GET, or HEAD). ``health()`` returns None when healthy, else why not."""
    exposition = make_wsgi_app(metrics.registry)

    @_head_as_get
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return exposition(environ, start_response)
        if path == "/healthz":
            try:
                reason = health()
            except Exception as exc:  # a broken check is an unhealthy daemon, not a 500
                log.exception("healthz: the health check failed")
                reason = f"the health check failed: {type(exc).__name__}"
            if reason is None:
                return _respond(start_response, "200 OK", b"ok\n")
            return _respond(start_response, "503 Service Unavailable", f"{reason}\n".encode())
        return _respond(start_response, "404 Not Found", b"not found\n")

    return app


class _Reply(NamedTuple):
    outcome: str
    status: str
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


def _answer(triggered: bool, reason: str | None = None) -> _Reply:
    body = {"triggered": triggered} if reason is None else {"triggered": triggered, "reason": reason}
    return _Reply("triggered" if triggered else "ignored", "202 Accepted" if triggered else "200 OK",
                  json.dumps(body).encode(), "application/json")


class WebhookOptions(NamedTuple):
    """What the webhook checks a request against; a reload replaces them all at once."""

    path: str
    max_body_bytes: int
    secret: bytes

    @classmethod
    def of(cls, settings: WebhookSettings) -> "WebhookOptions":
        """Reads the secret file: a missing or open one is a :class:`ConfigError`."""
        return cls(settings.path, settings.max_body_bytes, settings.secret())


class Webhook:
    """The Hub webhook (see the module docstring); ``on_repo_event(repo)`` only schedules a
    poll and says whether a source watches ``repo``. A reload hands it new ``options`` (a
    rotated secret went on being checked against the one read at start)."""

    def __init__(self, settings: WebhookSettings, on_repo_event: Callable[[str], bool], metrics: DaemonMetrics):
        self.options = WebhookOptions.of(settings)
        self.on_repo_event = on_repo_event
        self.requests = metrics.webhook_requests()
        self._once = _Once()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        reply = self._handle(environ)
        self.requests.labels(reply.outcome).inc()
        return _respond(start_response, reply.status, reply.body, reply.content_type, reply.headers)

    def _handle(self, environ: WSGIEnvironment) -> _Reply:
        options = self.options  # one request, one set of options, whatever a reload does meanwhile
        if environ.get("PATH_INFO") != options.path:
            return _Reply("not_found", "404 Not Found", b"not found\n")
        if environ["REQUEST_METHOD"] != "POST":
            return _Reply("method_not_allowed", "405 Method Not Allowed", b"POST only\n", headers=(("Allow", "POST"),))
        # WSGI hands headers over as latin-1 text: encoding back gives the bytes the Hub sent.
        given = environ.get("HTTP_X_WEBHOOK_SECRET", "").encode("latin-1")
        if not hmac.compare_digest(given, options.secret):
            client = environ.get("REMOTE_ADDR", "?")
            if self._once.first(("unauthorized", client)):
                log.warning("webhook: a request from %s had a wrong or no X-Webhook-Secret; nothing triggered", client)
            return _Reply("unauthorized", "401 Unauthorized", b"wrong or missing X-Webhook-Secret\n")
        length = environ.get("CONTENT_LENGTH", "")
        if not length:
            return _Reply("length_required", "411 Length Required", b"Content-Length required\n")
        if not (length.isascii() and length.isdigit()):
            return _Reply("bad_request", "400 Bad Request", b"invalid Content-Length\n")
        # More digits than the limit has is larger than it: int() of over 4300 digits raised (a 500, a traceback).
        if len(length) > len(str(options.max_body_bytes)) or int(length) > options.max_body_bytes:
            return _Reply("too_large", "413 Content Too Large", f"larger than {options.max_body_bytes} bytes\n".encode())
        size = int(length)
        try:
            body = environ["wsgi.input"].read(size)
        except OSError:  # the client stopped sending (REQUEST_TIMEOUT_SECONDS) or went away
            body = b""
        if len(body) < size:
            return _Reply("bad_request", "400 Bad Request", b"the body is shorter than its Content-Length\n")
        try:
            payload = safe_json.loads(body)
        except ValueError:  # also UnicodeDecodeError, and safe_json's limits
            return _Reply("bad_request", "400 Bad Request", b"the body is not JSON\n")
        event = _repo_event(payload)
        if event is None:
            return _Reply("bad_request", "400 Bad Request", b"not a Hub webhook payload\n")
        repo_type, scope, repo = event
        if repo_type != "model":
            return self._ignored(repo, f"a {repo_type} repo")
        if scope != "repo" and not scope.startswith("repo."):
            return self._ignored(repo, f"scope {scope}")
        try:
            triggered = self.on_repo_event(repo)
        except Exception:  # the daemon's bug; the Hub retries a 5xx
            log.exception("webhook: scheduling a poll of %s failed", repo)
            return _Reply("error", "500 Internal Server Error", b"internal error\n")
        if not triggered:
            return self._ignored(repo, "no source watches it")
        log.debug("webhook: %s changed (%s); poll scheduled", repo, scope)
        return _answer(True)

    def _ignored(self, repo: str, reason: str) -> _Reply:
        if self._once.first((repo, reason)):
            log.info("webhook: event for %s ignored: %s", repo, reason)
        return _answer(False, reason)


def _repo_event(payload: Any) -> tuple[str, str, str] | None:
    """``(repo type, event scope, repo name)`` of a Hub webhook payload, or None if it is not one."""
    if not isinstance(payload, dict):
        return None
    event, repo = payload.get("event"), payload.get("repo")
    if not isinstance(event, dict) or not isinstance(repo, dict):
        return None
    scope, repo_type, name = event.get("scope"), repo.get("type"), repo.get("name")
    if not all(isinstance(v, str) for v in (scope, repo_type, name)) or len(scope) > 100 or len(repo_type) > 100:
        return None
    if not _REPO_NAME.fullmatch(name):
        return None
    return repo_type, scope, name


def webhook_app(settings: WebhookSettings, on_repo_event: Callable[[str], bool],
                metrics: DaemonMetrics) -> Webhook:
    """The Hub webhook at ``settings.path``. Reads the secret now: a missing one is a
    :class:`ConfigError` at start, not a 401 for every event."""
    return Webhook(settings, on_repo_event, metrics)


class _RequestHandler(WSGIRequestHandler):
    # A client that stops sending mid-request gives its thread back after this; one that
    # sends a byte now and then, after the deadline (its socket is shut, the read ends).
    timeout = REQUEST_TIMEOUT_SECONDS

    def setup(self) -> None:
        super().setup()
        self._deadline = threading.Timer(REQUEST_DEADLINE_SECONDS, self._cut)
        self._deadline.daemon = True
        self._deadline.start()

    def _cut(self) -> None:
        with suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        self._deadline.cancel()
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """Request lines and errors, to logging (http.server writes them to stderr). No headers."""
        log.debug("http %s: " + format, self.address_string(), *args)


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a stuck request never keeps the daemon from exiting
    # Connections the kernel holds until accepted: socketserver's 5 reset a burst of 20
    # clients (a webhook storm, scrapers) before any of the MAX_CONNECTIONS slots was taken.
    request_queue_size = 128

    def __init__(self, host: str, port: int):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)  # unauthenticated clients cannot take every thread
        super().__init__((host, port), _RequestHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.debug("http: %d connections open; closing one from %s", MAX_CONNECTIONS, client_address[0])
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def server_bind(self) -> None:
        # HTTPServer's looks up the host's FQDN (DNS, which can hang) only to name itself in
        # the WSGI environ; the address does as well.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]
        self.setup_environ()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("http: a connection from %s failed", client_address[0], exc_info=True)


def _guarded(app: WSGIApplication) -> WSGIApplication:
    """``app``, answering 500 and logging when it raises (wsgiref would print to stderr)."""

    def guarded(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        try:
            return app(environ, start_response)
        except Exception:
            log.exception("http: %s %s failed", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"))
            return _respond(start_response, "500 Internal Server Error", b"internal error\n", exc_info=sys.exc_info())

    return guarded


class HttpServer:
    """Serves one WSGI app on ``host:port`` from a daemon thread, a thread per request.
    Binds at once, so a taken port fails at start; port 0 picks a free one (see ``port``)."""

    def __init__(self, host: str, port: int, app: WSGIApplication, *, name: str = "http"):
        self.name = name
        try:
            self._server = _Server(host, port)
        except OSError as exc:
            raise ConfigError(f"{name}: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self._server.set_app(_guarded(app))
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, name=self.name, daemon=True)
        self._thread.start()
        log.info("%s: listening on %s port %d", self.name, self._server.server_address[0], self.port)

    def stop(self) -> None:
        """Stop serving and close the socket (requests in progress finish on their own threads)."""
        if self._thread is not None:
            self._server.shutdown()  # waits for serve_forever, which only a started thread runs
            self._thread.join()
            self._thread = None
        self._server.server_close()
