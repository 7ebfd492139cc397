"""Catalog operations the sources, the CLI and the scheduler share.

Registration is idempotent: a location's content is identified by its revision
(the Hub commit sha, or a local content fingerprint), and recording a revision
that is already there changes nothing. Two daemons racing to record the same
revision meet the unique constraint; the loser reads the winner's row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Callable

from sqlalchemy import Exists, exists, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from ..errors import IterisError
from ..logs import redact
from .models import Adapter, AdapterRevision, AdapterStatus, MergeRunInput, Source, SourceKind, utcnow

if TYPE_CHECKING:  # validation pulls in torch; listing the catalog should not
    from ..validation import AdapterInfo

log = logging.getLogger(__name__)


class NotFoundError(IterisError):
    """A source or adapter named on the command line is not in the catalog."""


class DuplicateError(IterisError):
    """A source with that name already exists."""


class SourceGoneError(IterisError):
    """A source recording what it saw was removed from the catalog (`sources remove`) meanwhile."""


@dataclass(frozen=True)
class Observation:
    """What a source found at one location: a valid adapter (``info``) or a ``reason`` to reject it."""

    locator: str
    name: str
    revision: str
    files_path: str | None
    info: AdapterInfo | None = None
    reason: str | None = None
    has_calibration: bool = False
    # validation.validation_context of the settings behind the verdict (None: it depends on none)
    context: str | None = None
    # When the source saw ``revision`` at the location (a Hub poll: when it asked for the head).
    # The revision seen last is the current one, so a poll that read the head before another
    # poll read a newer one cannot make its older commit current by recording it later.
    seen_at: datetime = field(default_factory=utcnow)
    # ``Prior.current_id`` as the source began to look. If that revision is current still,
    # nobody recorded meanwhile and what the source saw is news, whatever the clock says: a
    # clock stepped back (NTP, a VM restored) made a new checkpoint history. None: the times decide.
    looked_over: int | None = None


def add_source(session: Session, name: str, kind: SourceKind, settings: dict[str, Any]) -> Source:
    """A new source; or the one of that name :func:`remove_source` disabled (its adapters fed
    past runs), enabled again with these settings, as a config that declares it does."""
    source = session.scalar(select(Source).where(Source.name == name))
    if source is not None and source.enabled:
        raise DuplicateError(f"a source named {name!r} already exists")
    if source is not None:
        source.kind, source.settings, source.enabled = kind, settings, True
        log.info("source %s, removed before, enabled again", name)
        return source
    source = Source(name=name, kind=kind, settings=settings)
    session.add(source)
    session.flush()
    return source


def get_source(session: Session, name: str) -> Source:
    source = session.scalar(select(Source).where(Source.name == name))
    if source is None:
        raise NotFoundError(f"no source named {name!r} (see `iteris-daemon sources list`)")
    return source


def list_sources(session: Session) -> list[Source]:
    return list(session.scalars(select(Source).order_by(Source.name)))


def remove_source(session: Session, name: str) -> None:
    """Forget a source and its adapters (revisions used by past merge runs are kept)."""
    source = get_source(session, name)
    used = session.scalar(
        select(func.count()).select_from(AdapterRevision).join(Adapter)
        .where(Adapter.source_id == source.id).where(_used_by_a_run())
    )
    if used:
        # Keep the history merge runs point at; just stop watching.
        source.enabled = False
        for adapter in source.adapters:
            adapter.status = AdapterStatus.removed
        log.info("source %s disabled (its adapters are inputs of past merge runs)", name)
        return
    session.delete(source)


def _used_by_a_run() -> Exists:
    """SQL: some merge run's input is the revision. EXISTS, looked up in ix_merge_run_inputs_revision_id
    for each revision: SQLite ran ``IN (SELECT revision_id ...)`` by reading every run's inputs."""
    return exists().where(MergeRunInput.revision_id == AdapterRevision.id)


def _adapter_row(session: Session, source_id: int, seen: Observation) -> Adapter:
    """The location's row, created if new (another daemon may create it at the same moment)."""
    query = select(Adapter).where(Adapter.source_id == source_id, Adapter.locator == seen.locator)
    adapter = session.scalar(query)
    if adapter is None:
        try:
            with session.begin_nested():
                adapter = Adapter(source_id=source_id, locator=seen.locator, name=seen.name, status=AdapterStatus.rejected)
                session.add(adapter)
        except IntegrityError:
            adapter = session.scalar(query)
    return adapter


@dataclass(frozen=True)
class Prior:
    """What the catalog held for a location before a source looked at it again."""

    stands: bool = False  # the same revision, with a verdict that holds: nothing to do
    same_revision: bool = False  # the same revision (of a location not removed)
    registered: bool = False  # the adapter was registered: rejecting it now withdraws it
    files_missing: bool = False  # registered, but its files are not (all) where it says: fetch them again
    content_sha256: str | None = None  # of the current revision's weights, as registered
    files_path: str | None = None  # of the current revision
    # of the current revision if registered, whatever revision the source sees now: a new
    # commit may hold the same weights (a README edited), which need not be fetched again
    registered_files_path: str | None = None
    registered_content_sha256: str | None = None
    current_id: int | None = None  # the current revision's row: an Observation's ``looked_over``


def prior(session: Session, source_id: int, locator: str, revision: str | None, context: str | None,
          present: Callable[[AdapterRevision], bool] | None = None) -> Prior:
    """What the catalog holds for ``locator`` against the ``revision`` a source sees now
    (None: not read yet, so nothing stands). ``context``: the source's settings, under which a verdict must have been reached to
    stand; None takes every recorded verdict as it is. ``present``: whether a registered
    revision's files are still there (a cache is emptied, or another host registered it);
    one whose files are not does not stand."""
    adapter = session.scalar(select(Adapter).where(Adapter.source_id == source_id, Adapter.locator == locator))
    if adapter is None:
        return Prior()
    current = current_revision(session, adapter)
    same = adapter.status is not AdapterStatus.removed and current is not None and current.revision == revision
    missing = (same and present is not None and current.status is AdapterStatus.registered
               and not present(current))
    registered = current is not None and current.status is AdapterStatus.registered
    return Prior(stands=same and not missing and (context is None or verdict_stands(current, context)),
                 same_revision=same, registered=adapter.status is AdapterStatus.registered, files_missing=missing,
                 content_sha256=current.content_sha256 if same else None,
                 files_path=current.files_path if same else None,
                 registered_files_path=current.files_path if registered else None,
                 registered_content_sha256=current.content_sha256 if registered else None,
                 current_id=current.id if current is not None else None)


def verdict_stands(revision: AdapterRevision, context: str) -> bool:
    """Whether ``revision``'s verdict holds under the settings of ``context``: it was
    reached under them. One from before contexts were recorded counts as the daemon's
    own if registered (and is stamped with ``context``); a rejected one is judged again."""
    if revision.validation_context is None and revision.status is AdapterStatus.registered:
        revision.validation_context = context
    return revision.validation_context == context


def _watching(session: Session, source_id: int) -> Source:
    """The source, if it may still record: `sources remove` disabled or deleted it under a
    running daemon, whose watcher went on registering adapters that its groups merged (or,
    the row deleted, failed on it for ever); the daemon stops it at its next catalog check."""
    source = session.get(Source, source_id)
    if source is None or not source.enabled:
        raise SourceGoneError(f"source {source.name if source else f'id {source_id}'} was removed from the catalog "
                              "(`iteris-daemon sources remove`): nothing is recorded under it")
    return source


def record(session: Session, source_id: int, seen: Observation, rejudge: bool = True) -> tuple[AdapterRevision, bool]:
    """Record what a source saw; return the revision row and whether it is news: a new
    revision, or (``rejudge``) a known one whose verdict changed under other settings
    (``seen.context``). The adapter's ``updated_at`` moves when its current revision
    changes. A source removed meanwhile raises :class:`SourceGoneError`."""
    _watching(session, source_id)
    adapter = _adapter_row(session, source_id, seen)
    current = current_revision(session, adapter)
    outdated = _outdated(current, seen)
    existing = session.scalar(
        select(AdapterRevision).where(AdapterRevision.adapter_id == adapter.id, AdapterRevision.revision == seen.revision)
    )
    if existing is not None:
        changed = False
        if rejudge and seen.context is not None and existing.validation_context != seen.context:
            changed = existing.status is not _status(seen)
            _judge(existing, seen)
        existing.files_path = seen.files_path or existing.files_path  # e.g. downloaded again into an emptied cache
        if outdated:
            return existing, False
        if adapter.status is AdapterStatus.removed or current is not existing:
            existing.last_seen_at = _after(current, seen)  # it came back, or an older content was restored
            adapter.updated_at = utcnow()
        adapter.status = existing.status
        return existing, changed
    revision = AdapterRevision(adapter_id=adapter.id, revision=seen.revision,
                               last_seen_at=seen.seen_at if outdated else _after(current, seen))
    _judge(revision, seen)
    try:
        with session.begin_nested():
            session.add(revision)
    except IntegrityError:  # another process recorded it first
        existing = session.scalar(
            select(AdapterRevision).where(AdapterRevision.adapter_id == adapter.id, AdapterRevision.revision == seen.revision)
        )
        return existing, False
    if not outdated:
        # set here: the row's own columns may not change (same status, same name), so onupdate would not
        adapter.status, adapter.name, adapter.updated_at = revision.status, seen.name, utcnow()
    return revision, True


def _outdated(current: AdapterRevision | None, seen: Observation) -> bool:
    """Another source (a second process, or host) recorded a newer sighting of the location
    after this one began to look: what it saw stays history."""
    if current is None or current.revision == seen.revision or current.id == seen.looked_over:
        return False
    return current.last_seen_at > seen.seen_at


def _after(current: AdapterRevision | None, seen: Observation) -> datetime:
    """The ``last_seen_at`` that makes ``seen`` current: its time, or just after the current
    revision's if the clock says earlier (it stepped back since)."""
    if current is None:
        return seen.seen_at
    if current.revision == seen.revision:  # back after its removal: never behind an older revision
        return max(seen.seen_at, current.last_seen_at)
    return max(seen.seen_at, current.last_seen_at + timedelta(microseconds=1))


def _status(seen: Observation) -> AdapterStatus:
    return AdapterStatus.registered if seen.info else AdapterStatus.rejected


def _judge(revision: AdapterRevision, seen: Observation) -> None:
    """Write the verdict of ``seen`` (and what validation found) into ``revision``."""
    info = seen.info
    revision.status, revision.reason = _status(seen), seen.reason
    revision.files_path = seen.files_path or revision.files_path
    revision.has_calibration = seen.has_calibration
    revision.validated_at, revision.validation_context = utcnow(), seen.context
    if info is not None:
        revision.content_sha256, revision.base_model, revision.task_type = info.content_sha256, info.base_model, info.task_type
        revision.rank, revision.alpha, revision.target_modules = info.rank, info.alpha, info.target_modules
        revision.size_bytes = info.size_bytes


def _latest_first(query):
    """Order revisions as ``Adapter.current`` picks them: the one seen most recently first."""
    return query.order_by(AdapterRevision.last_seen_at.desc(), AdapterRevision.id.desc())


def current_revision(session: Session, adapter: Adapter) -> AdapterRevision | None:
    """``adapter.current``, found by the database: the revision history stays unloaded."""
    return session.scalar(_latest_first(select(AdapterRevision).where(AdapterRevision.adapter_id == adapter.id)).limit(1))


def current_files_paths(session: Session, prefix: str) -> set[str]:
    """The ``files_path`` of each registered adapter's current revision that lies under
    ``prefix``: the folders of a cache that runs may copy from."""
    current_id = (_latest_first(select(AdapterRevision.id).where(AdapterRevision.adapter_id == Adapter.id))
                  .limit(1).correlate(Adapter).scalar_subquery())
    query = (select(AdapterRevision.files_path).join(Adapter, AdapterRevision.id == current_id)
             .where(Adapter.status == AdapterStatus.registered, AdapterRevision.files_path.startswith(prefix, autoescape=True)))
    return set(session.scalars(query))


def list_current(session: Session, statuses: list[AdapterStatus] | None = None, source: str | None = None,
                 enabled_sources: bool = False) -> list[tuple[Adapter, AdapterRevision | None]]:
    """Adapters with their source and current revision. The database picks each current
    revision, so the rows loaded do not grow with the history: the daemon asks this
    every few seconds, and a Hub repo that has taken a commit a day for a year has 365.
    ``enabled_sources``: only those of sources not removed (what merges may take)."""
    current_id = (_latest_first(select(AdapterRevision.id).where(AdapterRevision.adapter_id == Adapter.id))
                  .limit(1).correlate(Adapter).scalar_subquery())
    query = (select(Adapter, AdapterRevision).outerjoin(AdapterRevision, AdapterRevision.id == current_id)
             .options(selectinload(Adapter.source)).order_by(Adapter.id))
    if statuses:
        query = query.where(Adapter.status.in_(statuses))
    if source or enabled_sources:
        query = query.join(Source, Adapter.source_id == Source.id)
    if source:
        query = query.where(Source.name == source)
    if enabled_sources:
        query = query.where(Source.enabled)
    return [(adapter, revision) for adapter, revision in session.execute(query)]


def get_adapter(session: Session, adapter_id: int) -> Adapter:
    adapter = session.get(Adapter, adapter_id, options=[selectinload(Adapter.revisions), selectinload(Adapter.source)])
    if adapter is None:
        raise NotFoundError(f"no adapter with id {adapter_id} (see `iteris-daemon adapters list`)")
    return adapter


def mark_removed(session: Session, source_id: int, gone: Callable[[str], bool]) -> list[Adapter]:
    """Mark the source's adapters whose locator is ``gone`` as removed; return them."""
    removed = []
    for adapter in session.scalars(select(Adapter).where(Adapter.source_id == source_id, Adapter.status != AdapterStatus.removed)):
        if gone(adapter.locator):
            adapter.status = AdapterStatus.removed
            removed.append(adapter)
    return removed


def set_health(session: Session, source_id: int, error: str | None) -> None:
    """After a scan or poll: healthy when it went through, else the (token-free) error.
    Nothing for a source `sources remove` deleted meanwhile (the daemon stops it)."""
    source = session.get(Source, source_id)
    if source is None:
        return
    source.healthy = error is None
    source.last_error = None if error is None else redact(error)  # an error may quote a request's headers
    source.last_poll_at = utcnow()
