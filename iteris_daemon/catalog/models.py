"""The catalog's tables (SQLAlchemy 2). Alembic migrations in ``migrations/`` create
them; a test checks that the two agree.

- ``sources``: where adapters come from (local folders, Hub users/orgs or repo lists)
  and whether polling them currently works.
- ``adapters``: one row per adapter location (a folder, a Hub repo); its ``status``
  follows its newest revision, or is ``removed`` once the location is gone.
- ``adapter_revisions``: every distinct content seen at that location, with what
  validation found, or why it was rejected, and under which settings.
- ``merge_groups`` / ``merge_runs`` / ``merge_run_inputs``: what the daemon merges,
  and every run with the exact revisions it used.
- ``pruned_runs``: how many runs ``db prune`` deleted, per group and status.
- ``base_model_shapes``: a base model's layer shapes, computed once by a worker, for
  validating adapters without torch in the daemon.
- ``daemons``: the daemons using the catalog, and the settings they must share
  (:mod:`iteris_daemon.peers`).
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (JSON, BigInteger, ColumnElement, Enum, ForeignKey, Index, Integer, MetaData, String, Text,
                        UniqueConstraint, cast, false)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Stable constraint names, so migrations can alter them on every backend
# (SQLite's batch mode needs names to drop or recreate a constraint).
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def iso_utc(value: datetime | None) -> str | None:
    """ISO 8601 with the zone: catalog times are naive UTC, and a time without a zone
    reads as local time."""
    return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).isoformat(timespec="seconds") if value else None


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class SourceKind(str, enum.Enum):
    local = "local"
    hub = "hub"


class AdapterStatus(str, enum.Enum):
    registered = "registered"
    rejected = "rejected"
    removed = "removed"


class RunStatus(str, enum.Enum):
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    skipped = "skipped"  # inputs unchanged since the last success, or nothing to merge
    cancelled = "cancelled"  # the daemon was asked to stop mid-merge
    refused = "refused"  # merged, but a publish gate said no (the run's error says why)


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # Stored as plain strings with a CHECK, so adding a value later is a simple migration.
    return Enum(cls, name=name, native_enum=False, create_constraint=True, length=16)


class Source(Base):
    __tablename__ = "sources"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[SourceKind] = mapped_column(_enum(SourceKind, "source_kind"))
    # Kind-specific settings (folders, repo ids, endpoint, interval, ...): see sources/.
    settings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    enabled: Mapped[bool] = mapped_column(default=True)
    healthy: Mapped[bool] = mapped_column(default=True)
    last_poll_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    adapters: Mapped[list[Adapter]] = relationship(back_populates="source", cascade="all, delete-orphan")


class Adapter(Base):
    __tablename__ = "adapters"
    __table_args__ = (UniqueConstraint("source_id", "locator"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    source_id: Mapped[int] = mapped_column(ForeignKey("sources.id", ondelete="CASCADE"), index=True)
    # Absolute folder path (local) or repo id, plus "@branch" when not the default (hub).
    # Unbounded, as paths are (migration 0009): PostgreSQL refused a longer one, ending the scan.
    locator: Mapped[str] = mapped_column(Text)
    name: Mapped[str] = mapped_column(Text)
    status: Mapped[AdapterStatus] = mapped_column(_enum(AdapterStatus, "adapter_status"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    source: Mapped[Source] = relationship(back_populates="adapters")
    revisions: Mapped[list[AdapterRevision]] = relationship(
        back_populates="adapter", cascade="all, delete-orphan", order_by="AdapterRevision.id"
    )

    @property
    def current(self) -> AdapterRevision | None:
        """The revision the location holds now: the one seen most recently."""
        return max(self.revisions, key=lambda r: (r.last_seen_at, r.id), default=None)


class AdapterRevision(Base):
    __tablename__ = "adapter_revisions"
    __table_args__ = (
        UniqueConstraint("adapter_id", "revision"),
        # Finds an adapter's current revision (registry.current_revision) at the index's end.
        Index("ix_adapter_revisions_current", "adapter_id", "last_seen_at", "id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"), index=True)
    # Hub: the commit sha. Local: the content fingerprint (config + weights).
    revision: Mapped[str] = mapped_column(String(64))
    content_sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    # Where the files of this revision are (the folder, or the daemon's Hub cache).
    files_path: Mapped[str | None] = mapped_column(Text)
    base_model: Mapped[str | None] = mapped_column(Text, index=True)  # as the source or the adapter's config says
    task_type: Mapped[str | None] = mapped_column(String(32))
    rank: Mapped[int | None] = mapped_column(Integer)
    alpha: Mapped[float | None]
    target_modules: Mapped[list[str] | None] = mapped_column(JSON)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    has_calibration: Mapped[bool] = mapped_column(default=False)
    status: Mapped[AdapterStatus] = mapped_column(_enum(AdapterStatus, "revision_status"))
    reason: Mapped[str | None] = mapped_column(Text)
    discovered_at: Mapped[datetime] = mapped_column(default=utcnow)
    validated_at: Mapped[datetime | None]
    # validation.validation_context of the settings the verdict was reached under (None:
    # recorded before contexts were); a source judges the revision again under others.
    validation_context: Mapped[str | None] = mapped_column(String(64))
    # Updated only when the location switches back to this content (a revert).
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)

    adapter: Mapped[Adapter] = relationship(back_populates="revisions")


class MergeGroup(Base):
    __tablename__ = "merge_groups"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    base_model: Mapped[str] = mapped_column(Text)
    selection: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    strategy: Mapped[str] = mapped_column(String(100))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    destinations: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    calibration: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    schedule: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # `iteris-daemon merge-now` sets this; the running daemon picks it up.
    requested_at: Mapped[datetime | None]
    # `merge-now --force`: the requested run merges even unchanged inputs and passes the quality gate.
    force_requested: Mapped[bool] = mapped_column(default=False, server_default=false())
    next_run_at: Mapped[datetime | None]  # written by the scheduler, read by `status`
    # A daemon that is merging this group holds the claim; others skip it (multi-daemon safety).
    claimed_by: Mapped[str | None] = mapped_column(String(200))
    claimed_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    runs: Mapped[list[MergeRun]] = relationship(back_populates="group", cascade="all, delete-orphan")


class MergeRun(Base):
    __tablename__ = "merge_runs"
    __table_args__ = (
        # A group's newest runs (of a status), read from the index's end (migration 0010): on
        # group_id alone PostgreSQL walked the primary key backwards past every other group's runs.
        Index("ix_merge_runs_group", "group_id", "id"),
        # repeats last: the /metrics run counts are read from this index alone, not from the rows.
        Index("ix_merge_runs_group_status", "group_id", "status", "id", "repeats"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    group_id: Mapped[int] = mapped_column(ForeignKey("merge_groups.id", ondelete="CASCADE"))
    status: Mapped[RunStatus] = mapped_column(_enum(RunStatus, "run_status"), index=True)
    input_fingerprint: Mapped[str] = mapped_column(String(64), index=True)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    timings: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    output_location: Mapped[str | None] = mapped_column(Text)
    output_commit: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    # Skipped runs that repeat the group's last one (same inputs, same reason) are one row:
    # on an interval schedule they would otherwise add a row and its inputs every period.
    repeats: Mapped[int] = mapped_column(default=1, server_default="1")

    group: Mapped[MergeGroup] = relationship(back_populates="runs")
    inputs: Mapped[list[MergeRunInput]] = relationship(back_populates="run", cascade="all, delete-orphan")

    @classmethod
    def may_have_published(cls) -> ColumnElement[bool]:
        """SQL: the run's metrics name a ``published`` list (every run that succeeded, and a
        failed one that published to some destinations first). A text match, so that the
        failed runs since a group's last success (thousands after months of failing) are
        not each read to find the few that did."""
        return cast(cls.metrics, Text).like('%"published"%')


class PrunedRuns(Base):
    """How many of a group's runs of a status ``db prune`` deleted (migration 0011): /metrics
    adds them to the remaining runs' counts, so that ``iteris_merge_runs_total`` does not drop
    after a prune (Prometheus takes a drop for a counter reset)."""

    __tablename__ = "pruned_runs"

    group_id: Mapped[int] = mapped_column(ForeignKey("merge_groups.id", ondelete="CASCADE"), primary_key=True)
    status: Mapped[RunStatus] = mapped_column(_enum(RunStatus, "run_status"), primary_key=True)
    runs: Mapped[int]  # the sum of their repeats, as /metrics counts them


class MergeRunInput(Base):
    __tablename__ = "merge_run_inputs"

    run_id: Mapped[int] = mapped_column(ForeignKey("merge_runs.id", ondelete="CASCADE"), primary_key=True)
    # Indexed (migration 0010): deleting a revision checks this key; the primary key, run_id
    # first, cannot find a revision's rows, so each deleted revision read the whole table.
    revision_id: Mapped[int] = mapped_column(ForeignKey("adapter_revisions.id", ondelete="RESTRICT"), primary_key=True,
                                             index=True)
    calibration_source: Mapped[str | None] = mapped_column(Text)
    calibration_sha256: Mapped[str | None] = mapped_column(String(64))

    run: Mapped[MergeRun] = relationship(back_populates="inputs")
    revision: Mapped[AdapterRevision] = relationship()


class BaseModelShapes(Base):
    """A base model's layer shapes for one kind of adapter (see :mod:`iteris_daemon.shapes`),
    computed once by a worker process, so the daemon validates adapters without torch."""

    __tablename__ = "base_model_shapes"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)  # shapes.skeleton_key
    base_model: Mapped[str] = mapped_column(Text)
    shapes: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class DaemonPresence(Base):
    """A daemon using this catalog, last seen when, with the settings that adapter verdicts
    and merges depend on: daemons sharing a catalog must agree on them (:mod:`iteris_daemon.peers`)."""

    __tablename__ = "daemons"

    holder: Mapped[str] = mapped_column(String(200), primary_key=True)  # runner.worker_id(): host:pid:tag[:pidns]
    settings: Mapped[dict[str, Any]] = mapped_column(JSON)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    seen_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
