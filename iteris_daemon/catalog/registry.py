"""Catalog operations the sources, the CLI and the scheduler share.

Registration is idempotent: a location's content is identified by its revision
(the Hub commit sha, or a local content fingerprint), and recording a revision
that is already there changes nothing. Two daemons racing to record the same
revision meet the unique constraint; the loser reads the winner's row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from ..errors import IterisError
from ..logs import redact
from .models import Adapter, AdapterRevision, AdapterStatus, Source, SourceKind, utcnow

if TYPE_CHECKING:  # validation pulls in torch; listing the catalog should not
    from ..validation import AdapterInfo

log = logging.getLogger(__name__)


class NotFoundError(IterisError):
    """A source or adapter named on the command line is not in the catalog."""


class DuplicateError(IterisError):
    """A source with that name already exists."""


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


def add_source(session: Session, name: str, kind: SourceKind, settings: dict[str, Any]) -> Source:
    if session.scalar(select(Source).where(Source.name == name)) is not None:
        raise DuplicateError(f"a source named {name!r} already exists")
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
        .where(Adapter.source_id == source.id).where(AdapterRevision.id.in_(_used_revision_ids()))
    )
    if used:
        # Keep the history merge runs point at; just stop watching.
        source.enabled = False
        for adapter in source.adapters:
            adapter.status = AdapterStatus.removed
        log.info("source %s disabled (its adapters are inputs of past merge runs)", name)
        return
    session.delete(source)


def _used_revision_ids():
    from .models import MergeRunInput

    return select(MergeRunInput.revision_id)


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


def record(session: Session, source_id: int, seen: Observation) -> tuple[AdapterRevision, bool]:
    """Record what a source saw; return the revision row and whether it is new."""
    adapter = _adapter_row(session, source_id, seen)
    existing = session.scalar(
        select(AdapterRevision).where(AdapterRevision.adapter_id == adapter.id, AdapterRevision.revision == seen.revision)
    )
    if existing is not None:
        if adapter.status is AdapterStatus.removed or adapter.current is not existing:
            existing.last_seen_at = utcnow()  # it came back, or an older content was restored
            existing.files_path = seen.files_path or existing.files_path
            adapter.status = existing.status
        return existing, False
    info = seen.info
    revision = AdapterRevision(
        adapter_id=adapter.id,
        revision=seen.revision,
        files_path=seen.files_path,
        status=AdapterStatus.registered if info else AdapterStatus.rejected,
        reason=seen.reason,
        has_calibration=seen.has_calibration,
        validated_at=utcnow(),
        **({} if info is None else {
            "content_sha256": info.content_sha256, "base_model": info.base_model, "task_type": info.task_type,
            "rank": info.rank, "alpha": info.alpha, "target_modules": info.target_modules, "size_bytes": info.size_bytes,
        }),
    )
    try:
        with session.begin_nested():
            session.add(revision)
    except IntegrityError:  # another process recorded it first
        existing = session.scalar(
            select(AdapterRevision).where(AdapterRevision.adapter_id == adapter.id, AdapterRevision.revision == seen.revision)
        )
        return existing, False
    adapter.status = revision.status
    adapter.name = seen.name
    return revision, True


def list_adapters(session: Session, statuses: list[AdapterStatus] | None = None, source: str | None = None) -> list[Adapter]:
    """Adapters with their source and revisions loaded (two extra queries, not one per row)."""
    query = select(Adapter).options(selectinload(Adapter.revisions), selectinload(Adapter.source)).order_by(Adapter.id)
    if statuses:
        query = query.where(Adapter.status.in_(statuses))
    if source:
        query = query.join(Source).where(Source.name == source)
    return list(session.scalars(query))


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
    """After a scan or poll: healthy when it went through, else the (token-free) error."""
    source = session.get(Source, source_id)
    source.healthy = error is None
    source.last_error = None if error is None else redact(error)  # an error may quote a request's headers
    source.last_poll_at = utcnow()
