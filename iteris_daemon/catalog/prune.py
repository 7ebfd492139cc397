"""``iteris-daemon db prune``: deleting the history a long-running daemon no longer reads.

The catalog keeps every merge run (with its inputs), every adapter revision seen, and
the presence rows of daemons gone; run for months, it grows without bound. A prune
deletes what is older than a cutoff and that no code reads, beside a running daemon, in
transactions of bounded size (each decides anew what is unread; on SQLite each holds the
write lock a moment, as any writer does); a dry run counts in one, rolled back.

What the code reads of a group's runs, and so is never deleted (each query over
``MergeRun`` / ``MergeRunInput`` in the package, by reader):

1. A group's :data:`RECENT_RUNS` newest runs (and ``--keep-runs`` more if asked):
   ``status`` shows its last run, last skipped run, the adapters held back and the run
   skipped on the served inputs from its ``RUNS_SHOWN`` (50) newest runs;
   ``runner.groups_behind`` finds the run a daemon compares its selection with among the
   ``RUNS_LOOKED_AT`` (20) newest;
   ``runner._record_skip`` counts a repeated skip into the newest run; ``merge-now
   --wait`` reads the runs after the newest. Runs are only deleted, never added, so these
   windows hold the same runs after a prune.
2. Its newest succeeded run: the quality gate's baseline (``runner.gate_baseline``), the
   merge served after a refusal (``runner._served_before``), what ``status`` and /metrics
   say is published, with the inputs it merged (``status.merged_inputs``).
3. Its newest succeeded-or-refused run (``runner._last_decided``): the inputs a run is
   skipped on as unchanged; ``merge-now --wait`` reads it for a skip on a refusal.
4. Its failed runs after that one: the merge a daemon kept to publish again names its run
   in the daemon's state folder (``runner._unpublished_merge``), which the catalog cannot
   see; and a failed run that published to some destinations decides that nothing is
   skipped (``_last_decided``).
5. Its failed runs that may have published (``MergeRun.may_have_published``) after its
   newest success: what the destinations serve now (``status.serving``, /metrics).
6. Running runs (a daemon finishes or fails them), and the newest run of the catalog: it
   holds the largest id, which SQLite would give the next run again (a kept merge's run
   file, ``republished_from`` and ``merge-now --wait`` name runs by id).

Nothing else reads past runs: ``merge-now`` requests (forced or not) are the group's row;
the daemon counts failed calibration workers and publish retries in memory, from each
run's outcome; ``gates``, ``peers`` and the sources read no runs.

Adapter revisions go once no remaining run merged them, when they are not their
adapter's current one (``Adapter.current``: a revision seen after them was seen before the
cutoff, so they have not been current since) or their adapter was removed (its location
gone) before the cutoff, which then goes too when none of its revisions is left. A
revision or adapter holding its table's largest id stays (SQLite reuses it). Daemon
presence rows go when not seen for longer than the cutoff; revisions superseded and
daemons seen within :data:`LIVE` never (a running daemon may be merging the one, and is
the other).

Files are left alone: a superseded Hub revision's commit folder in the daemon's cache is
deleted by the daemon's own polls (``sources.hub.drop_unused_commits``), under a lock of
the daemon's process that this one cannot hold. The /metrics counter
``iteris_merge_runs_total`` counts the runs' rows: the runs a pass deletes are counted (their
repeats, per group and status) into ``pruned_runs`` in its transaction, and /metrics adds
those counts, so the counter reads the same after a prune (a drop would be a counter reset
to Prometheus, and ``increase()`` would count the kept runs again); a dry run counts none.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import astuple, dataclass, fields
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, delete, exists, func, insert, not_, or_, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, aliased

from ..peers import FORGET_AFTER
from ..runner import RUNS_LOOKED_AT
from ..status import RUNS_SHOWN
from .db import Catalog, CatalogLockedError, is_sqlite_busy
from .models import (Adapter, AdapterRevision, AdapterStatus, DaemonPresence, MergeGroup, MergeRun, MergeRunInput,
                     PrunedRuns, RunStatus)

log = logging.getLogger(__name__)

RECENT_RUNS = max(RUNS_SHOWN, RUNS_LOOKED_AT)  # the most of a group's newest runs the code reads
LIVE = FORGET_AFTER  # a daemon seen since may be running (its peers forget it after that)
BATCH = 500  # ids deleted per statement (SQLite allows 32766 parameters)
PASS = 1000  # runs, revisions, adapters deleted at most per transaction: SQLite's write lock is held for one


@dataclass(frozen=True)
class Pruned:
    """What a prune deleted (or, dry, would delete)."""

    runs: int = 0
    run_inputs: int = 0
    revisions: int = 0
    adapters: int = 0
    daemons: int = 0

    def __add__(self, other: Pruned) -> Pruned:
        return Pruned(*(a + b for a, b in zip(astuple(self), astuple(other))))

    def lines(self) -> list[str]:
        labels = {"runs": "merge runs", "run_inputs": "run inputs", "revisions": "adapter revisions",
                  "adapters": "adapters", "daemons": "daemon rows"}
        return [f"  {labels[f.name]:18} {getattr(self, f.name):>8}" for f in fields(self)]


class _DryRun(Exception):
    """Rolls a dry run's transaction back, carrying what it deleted."""

    def __init__(self, pruned: Pruned):
        self.pruned = pruned


def prune(catalog: Catalog, older_than: timedelta, keep_runs: int = RECENT_RUNS, dry_run: bool = False,
          stop: threading.Event | None = None) -> Pruned:
    """Delete what is older than ``older_than`` and no code reads (the module docstring),
    keeping each group's ``keep_runs`` newest runs (at least :data:`RECENT_RUNS`), in
    transactions of at most :data:`PASS` runs, revisions and adapters each: a first prune of
    months of runs held SQLite's write lock for seconds per 100,000 runs, and a daemon's
    write waits for it no longer than its busy timeout. Each pass decides anew, in its own
    transaction; what one finds unread stays unread, as runs are only added after the
    newest. ``dry_run``: one pass over everything, rolled back. ``stop`` set (the daemon
    stopping): no pass starts after the one under way; the next prune goes on from there."""
    keep = max(keep_runs, RECENT_RUNS)
    with catalog.session(write=False) as session:
        now = catalog.now(session)
    cutoffs = (now - older_than, min(now - older_than, now - LIVE))
    pruned, stopped = Pruned(), False
    if dry_run:
        try:
            with catalog.session() as session:
                raise _DryRun(_pass(session, *cutoffs, keep, limit=None))
        except _DryRun as done:
            pruned = done.pruned
    else:
        while True:
            with catalog.session() as session:
                step = _pass(session, *cutoffs, keep, limit=PASS)
            pruned += step
            if step == Pruned():
                break
            if stop is not None and stop.is_set():
                stopped = True
                break
    log.info("catalog prune%s: %s", " (dry run, nothing deleted)" if dry_run else " (stopped early)" if stopped else "",
             ", ".join(f"{f.name} {value}" for f, value in zip(fields(pruned), astuple(pruned))))
    return pruned


def _pass(session: Session, cutoff: datetime, live_cutoff: datetime, keep_runs: int, limit: int | None) -> Pruned:
    """Delete (at most ``limit`` each) the runs, then revisions and adapters, and the daemon
    rows that are older than the cutoffs and unread now."""
    run_ids: list[int] = []
    for group_id in session.scalars(select(MergeGroup.id).order_by(MergeGroup.id)):
        if limit is not None and len(run_ids) >= limit:
            break
        run_ids += _prunable_runs(session, group_id, cutoff, keep_runs, None if limit is None else limit - len(run_ids))
    _fold(session, _run_counts(session, run_ids))
    inputs = _delete_by_id(session, MergeRunInput.run_id, run_ids)
    runs = _delete_by_id(session, MergeRun.id, run_ids)
    revisions, budget = 0, limit
    # superseded revisions, then removed adapters' histories (an adapter goes in the pass
    # that deletes its last revision), ``limit`` revisions in all a pass
    for going in ((_unused_revision(), _superseded(live_cutoff)),
                  (_unused_revision(), AdapterRevision.adapter_id.in_(_removed_adapters(live_cutoff)))):
        revision_ids = list(session.scalars(select(AdapterRevision.id).where(*going).limit(budget)))
        revisions += _delete_by_id(session, AdapterRevision.id, revision_ids, *going)
        budget = None if budget is None else budget - len(revision_ids)
    adapter_ids = list(session.scalars(_removed_adapters(live_cutoff).where(
        not_(exists().where(AdapterRevision.adapter_id == Adapter.id))).limit(limit)))
    adapters = _delete_by_id(session, Adapter.id, adapter_ids, Adapter.status == AdapterStatus.removed,
                             not_(exists().where(AdapterRevision.adapter_id == Adapter.id)))
    daemons = session.execute(delete(DaemonPresence).where(DaemonPresence.seen_at < live_cutoff)).rowcount
    return Pruned(runs, inputs, revisions, adapters, daemons)


def _prunable_runs(session: Session, group_id: int, cutoff: datetime, keep_runs: int, limit: int | None) -> list[int]:
    """The ids of ``group_id``'s runs (its oldest ``limit``) that finished before ``cutoff``
    and that no code reads."""
    of_group = MergeRun.group_id == group_id
    oldest_kept = session.scalar(select(MergeRun.id).where(of_group).order_by(MergeRun.id.desc())
                                 .offset(keep_runs - 1).limit(1))
    if oldest_kept is None:  # no more runs than are kept
        return []
    success = _newest(session, group_id, [RunStatus.succeeded])
    decided = _newest(session, group_id, [RunStatus.succeeded, RunStatus.refused])
    failed = MergeRun.status == RunStatus.failed
    read = or_(MergeRun.id.in_([success, decided]),
               and_(failed, MergeRun.id > decided),
               and_(failed, MergeRun.id > success, MergeRun.may_have_published()))
    return list(session.scalars(select(MergeRun.id).where(
        of_group, MergeRun.id < oldest_kept, MergeRun.status != RunStatus.running,
        func.coalesce(MergeRun.finished_at, MergeRun.started_at) < cutoff, not_(read))
        .order_by(MergeRun.id).limit(limit)))


def _run_counts(session: Session, run_ids: list[int]) -> Counter[tuple[int, RunStatus]]:
    """The runs' counts (their repeats, as /metrics counts them) per group and status, the
    runs locked as they are read (PostgreSQL): a prune beside this one that found them too
    waits for this one's commit, then finds them gone, and neither counts nor deletes them."""
    counts: Counter[tuple[int, RunStatus]] = Counter()
    for start in range(0, len(run_ids), BATCH):
        rows = session.execute(select(MergeRun.group_id, MergeRun.status, MergeRun.repeats)
                               .where(MergeRun.id.in_(run_ids[start:start + BATCH])).with_for_update())
        for group_id, status, repeats in rows:
            counts[group_id, status] += repeats
    return counts


def _fold(session: Session, counts: Counter[tuple[int, RunStatus]]) -> None:
    """Add ``counts`` to ``pruned_runs`` in the transaction that deletes their runs: /metrics
    adds these to the runs' rows, so ``iteris_merge_runs_total`` does not drop (Prometheus
    would take a drop for a counter reset). A dry run's are rolled back with it."""
    for (group_id, status), runs in counts.items():
        row = and_(PrunedRuns.group_id == group_id, PrunedRuns.status == status)
        if not session.execute(update(PrunedRuns).where(row).values(runs=PrunedRuns.runs + runs)).rowcount:
            session.execute(insert(PrunedRuns).values(group_id=group_id, status=status, runs=runs))


def _newest(session: Session, group_id: int, statuses: list[RunStatus]) -> int:
    """The id of the group's newest run of one of ``statuses``; 0 when it has none."""
    return session.scalar(select(func.max(MergeRun.id)).where(MergeRun.group_id == group_id,
                                                              MergeRun.status.in_(statuses))) or 0


def _unused_revision():
    """SQL: no run merged the revision, and it does not hold the table's largest id."""
    return and_(not_(exists().where(MergeRunInput.revision_id == AdapterRevision.id)),
                AdapterRevision.id < _largest_id(AdapterRevision))


def _largest_id(entity: type[AdapterRevision] | type[Adapter]):
    """SQL: the largest id of ``entity``'s table (over an alias, never correlated with the query's rows)."""
    table = aliased(entity)
    return select(func.max(table.id)).scalar_subquery()


def _superseded(before: datetime):
    """SQL: a revision of the same adapter was seen after this one, and before ``before``:
    this one has not been its adapter's current revision since."""
    later = aliased(AdapterRevision)
    return exists().where(later.adapter_id == AdapterRevision.adapter_id,
                          later.last_seen_at > AdapterRevision.last_seen_at, later.last_seen_at < before)


def _removed_adapters(before: datetime):
    """SQL: the ids of adapters removed before ``before`` whose whole history goes: every
    revision last seen before it and unused (:func:`_unused_revision`); never the adapter
    holding the table's largest id."""
    kept = exists().where(AdapterRevision.adapter_id == Adapter.id,
                          or_(AdapterRevision.last_seen_at >= before, not_(_unused_revision())))
    return select(Adapter.id).where(Adapter.status == AdapterStatus.removed, Adapter.updated_at < before,
                                    not_(kept), Adapter.id < _largest_id(Adapter))


def _delete_by_id(session: Session, column, ids: Iterable[int], *still: ColumnElement[bool]) -> int:
    """Delete the rows whose ``column`` is one of ``ids`` and that ``still`` match (checked
    again as they are deleted: on PostgreSQL another transaction may have changed them since
    they were found), in batches; how many went."""
    ids, deleted = list(ids), 0
    for start in range(0, len(ids), BATCH):
        chunk = delete(column.class_).where(column.in_(ids[start:start + BATCH]), *still)
        deleted += session.execute(chunk.execution_options(synchronize_session=False)).rowcount
    return deleted


def vacuum(catalog: Catalog) -> str:
    """Give the space freed back: SQLite's ``VACUUM`` (it waits for the write lock up to the
    busy timeout and holds it while it runs; readers go on), PostgreSQL's (space reused, not
    returned to the system; it blocks no reads or writes). Outside a transaction, as both
    require. Returns what was done, in words."""
    tables = ", ".join(t.__tablename__ for t in (MergeRun, MergeRunInput, AdapterRevision, Adapter, DaemonPresence))
    backend = catalog.engine.url.get_backend_name()
    with catalog.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        if backend == "sqlite":
            try:
                connection.exec_driver_sql("VACUUM")
            except OperationalError as exc:
                if not is_sqlite_busy(exc):
                    raise
                raise CatalogLockedError(
                    f"the catalog {catalog.safe_url} is locked by another process (still locked after waiting "
                    f"{catalog.busy_timeout:g} s): pruned, but not vacuumed; run `db prune --vacuum` again later"
                ) from exc
            return "VACUUM: the catalog rewritten without the free pages; " + _shrink(connection, catalog)
        if backend == "postgresql":
            connection.exec_driver_sql(f"VACUUM (ANALYZE) {tables}")
            return f"VACUUM (ANALYZE) {tables}: the space is reused by new rows"
    return f"no VACUUM on {backend}: left to the database"


def _shrink(connection, catalog: Catalog) -> str:
    """Move the rewritten pages from the WAL into the file and truncate both, without waiting:
    a TRUNCATE checkpoint waits for every reader (a backup, a slow ``status``) while holding
    the write lock, and the daemons' writes would wait behind it. Tried once, with no busy
    timeout; with readers still on the old pages the daemons' own checkpoints finish it."""
    connection.exec_driver_sql("PRAGMA busy_timeout=0")
    try:
        busy, _, _ = connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").one()
    finally:
        connection.exec_driver_sql(f"PRAGMA busy_timeout={int(catalog.busy_timeout * 1000)}")
    if busy:
        return "the file shrinks at a later checkpoint, once the readers open now are done"
    return "the file shrunk"
