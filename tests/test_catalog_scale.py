"""The catalog after months of service: what the daemon and the commands read must not grow
with the run history. Checked on a small catalog through the plans the databases choose
(EXPLAIN), and through the locks the read-only commands take: a catalog of 200,000 runs is
too slow to build in the suite (the measured times are in RELIABILITY.md)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from databases import sqlite_write_locked
from sqlalchemy import Engine, event, insert, select

from iteris_daemon import status
from iteris_daemon.catalog import Catalog
from iteris_daemon.catalog import db as catalog_db
from iteris_daemon.catalog.models import (Adapter, AdapterRevision, AdapterStatus, MergeGroup, MergeRun, MergeRunInput,
                                          RunStatus, Source, SourceKind)
from iteris_daemon.catalog.registry import remove_source
from iteris_daemon.cli import main
from iteris_daemon.config import GroupConfig
from iteris_daemon.endpoints import CatalogCollector
from iteris_daemon.runner import (Inputs, _last_decided, _record_skip, _served_before, gate_baseline, groups_behind,
                                  select_inputs)

GROUPS = ("g0", "g1")
PUBLISHED = {"published": [{"kind": "folder", "location": "/srv/out", "version": "v1", "changed": True}]}
T0 = datetime(2026, 6, 1)


def _group(name: str) -> GroupConfig:
    return GroupConfig(name=name, base_model="/models/base", strategy="task_arithmetic", select={"sources": ["s0"]},
                       destinations=[{"kind": "folder", "path": f"/srv/out/{name}"}])


def _fill(catalog: Catalog) -> None:
    """Two sources (``spare`` never merged), three adapters of two revisions, and for each
    group runs of every status, the groups' runs interleaved as a daemon writes them."""
    statuses = [RunStatus.succeeded, RunStatus.failed, RunStatus.skipped, RunStatus.refused, RunStatus.cancelled,
                RunStatus.failed]
    with catalog.session() as session:
        session.execute(insert(Source), [{"id": 1, "name": "s0", "kind": SourceKind.local, "settings": {}},
                                         {"id": 2, "name": "spare", "kind": SourceKind.local, "settings": {}}])
        session.execute(insert(Adapter), [{"id": a, "source_id": 1 if a < 3 else 2, "locator": f"/srv/a{a}",
                                           "name": f"a{a}", "status": AdapterStatus.registered} for a in (1, 2, 3)])
        session.execute(insert(AdapterRevision), [
            {"id": 2 * a + r, "adapter_id": a, "revision": f"r{a}{r}", "files_path": f"/srv/a{a}",
             "base_model": "/models/base", "status": AdapterStatus.registered} for a in (1, 2, 3) for r in (0, 1)])
        session.execute(insert(MergeGroup), [{"id": g + 1, "name": name, "base_model": "/models/base",
                                              "strategy": "task_arithmetic"} for g, name in enumerate(GROUPS)])
        session.add_all(MergeRun(group_id=g + 1, status=s, input_fingerprint="f" * 64, finished_at=T0 + timedelta(minutes=i),
                                 metrics=PUBLISHED if s is RunStatus.succeeded or i == 5 else {},
                                 inputs=[MergeRunInput(revision_id=revision) for revision in (2, 4)])
                        for i, s in enumerate(statuses) for g in range(len(GROUPS)))


@pytest.fixture
def catalog(catalog_url) -> Iterator[Catalog]:
    catalog = Catalog(catalog_url)
    _fill(catalog)
    yield catalog
    catalog.close()


@contextmanager
def _selects(engine: Engine) -> Iterator[list[tuple[str, Any]]]:
    """The SELECT statements run inside the block, with their parameters."""
    seen: list[tuple[str, Any]] = []

    def before(_connection, _cursor, statement, parameters, _context, _many) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", before)


def _plan(engine: Engine, statement: str, parameters: Any) -> str:
    """The plan the database chooses for ``statement``: on PostgreSQL with sequential scans
    off, as on a large table (on a small one a sequential scan is the cheapest plan)."""
    with engine.connect() as connection:
        if connection.dialect.name == "sqlite":
            rows = connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters).all()
            return "\n".join(row[-1] for row in rows)
        connection.exec_driver_sql("SET enable_seqscan = off")
        return "\n".join(row[0] for row in connection.exec_driver_sql(f"EXPLAIN {statement}", parameters))


# What reads a table in full, or a group's runs through every group's: a scan (SQLite), a
# sequential scan, the primary key walked backwards past other groups' runs, or the
# status index, which holds every group's runs of that status (PostgreSQL and SQLite).
# The /metrics counts read every run, from ix_merge_runs_group_status alone.
WHOLE_HISTORY = re.compile(r"SCAN merge_run(s|_inputs)\b(?! USING COVERING INDEX ix_merge_runs_group_status)"
                           r"|Seq Scan on merge_run|using pk_merge_runs|ix_merge_runs_status|ix_merge_runs_group_id")


def _whole_history_reads(catalog: Catalog, work: Callable[[], Any]) -> list[str]:
    with _selects(catalog.engine) as statements:
        work()
    assert any("merge_run" in statement for statement, _ in statements)
    return [f"{statement}\n{plan}" for statement, parameters in statements
            if WHOLE_HISTORY.search(plan := _plan(catalog.engine, statement, parameters))]


def test_the_runner_reads_a_groups_newest_runs_from_its_own_index(catalog, tmp_path):
    """PostgreSQL walked pk_merge_runs backwards for "the newest run of group X", past every
    other group's newer runs (190,000 rows, 270 ms per query after 200,000 runs); SQLite took
    ix_merge_runs_status for a group's failed runs since its last success, every group's."""
    group_id = 1
    with catalog.session() as session:
        refused = session.scalar(select(MergeRun).where(MergeRun.group_id == group_id,
                                                        MergeRun.status == RunStatus.refused))
    operations = {
        "_last_decided": lambda: _last_decided(catalog, group_id),
        "gate_baseline": lambda: gate_baseline(catalog, group_id, tmp_path / "copy"),
        "_served_before": lambda: _served_before(catalog, refused),
        "groups_behind": lambda: groups_behind(catalog, [_group(name) for name in GROUPS]),
        "_record_skip": lambda: _record_skip(catalog, group_id, "f" * 64, Inputs(), "unchanged"),
    }
    for name, work in operations.items():
        assert _whole_history_reads(catalog, work) == [], name


def test_status_and_metrics_read_only_each_groups_recent_runs(catalog):
    """``status`` took 4.8 s on PostgreSQL after 200,000 runs, and the /metrics scrape grew with
    the history (611 ms on SQLite): its "recent" query read every group's succeeded and failed
    runs, its counts every run's row."""
    assert _whole_history_reads(catalog, lambda: status.collect(catalog)) == []
    assert _whole_history_reads(catalog, lambda: CatalogCollector(catalog)._read()) == []


def test_metrics_show_what_each_group_serves(catalog):
    """Read per group since its last success: the run counts are the whole history's, and a
    failed run since the success that published (the sixth) is what the destination serves."""
    families = {family.name: family for family in CatalogCollector(catalog)._read()}
    counts = {(s.labels["group"], s.labels["status"]): s.value for s in families["iteris_merge_runs"].samples}
    assert counts[("g0", "failed")] == 2 and counts[("g1", "succeeded")] == 1 and counts[("g1", "skipped")] == 1
    served = {(s.labels["group"], s.labels["destination"]): s.value
              for s in families["iteris_last_publish_timestamp_seconds"].samples}
    sixth = (T0 + timedelta(minutes=5)).replace(tzinfo=timezone.utc).timestamp()
    assert served == {("g0", "folder:/srv/out"): sixth, ("g1", "folder:/srv/out"): sixth}


def test_removing_a_source_finds_run_inputs_by_revision(catalog):
    """`sources remove` of a source of 2,500 revisions took 244 s on SQLite (60 s on PostgreSQL)
    after 2 M run inputs, holding the write lock: each deleted revision's foreign key check, and
    the check whether a run used one, read every run's inputs (the primary key starts with
    run_id)."""
    probe = "SELECT 1 FROM merge_run_inputs WHERE revision_id = 6"  # how the foreign key check looks
    plan = _plan(catalog.engine, probe, ())
    assert "ix_merge_run_inputs_revision_id" in plan, plan

    def remove() -> None:
        with catalog.session() as session:
            remove_source(session, "spare")

    assert _whole_history_reads(catalog, remove) == []
    with catalog.session() as session:
        assert session.scalar(select(Source.id).where(Source.name == "spare")) is None
        assert session.scalar(select(AdapterRevision.id).where(AdapterRevision.id == 6)) is None


def test_read_only_commands_do_not_wait_for_the_write_lock(tmp_path, monkeypatch, capsys):
    """``status`` and the list commands took the write lock (``BEGIN IMMEDIATE``) for their
    whole read: two `watch status` loops on a large catalog held the daemon's claim writes back
    7.8 s (median), one past the busy timeout. Nor does the runner hold it while it lists the
    adapters (``select_inputs``). Here a writer holds the lock while they read."""
    database = tmp_path / "catalog.db"
    catalog = Catalog(f"sqlite:///{database}")
    _fill(catalog)
    catalog.close()
    monkeypatch.setattr(catalog_db, "SQLITE_BUSY_TIMEOUT_MS", 200)  # a wait for the lock fails at once
    db = ["--db", f"sqlite:///{database}"]
    with sqlite_write_locked(database, "UPDATE merge_groups SET requested_at = NULL"):
        for argv in (["status"], ["status", "--json"], ["sources", "list"], ["adapters", "list"], ["adapters", "show", "1"]):
            assert main([*argv, *db]) == 0, (argv, capsys.readouterr().err)
        catalog = Catalog(f"sqlite:///{database}")
        assert [a.name for a, _ in select_inputs(catalog, _group("g0"))] == ["a1", "a2"]
        catalog.close()
    assert "g0" in capsys.readouterr().out
