"""The catalog on real databases: migrations, model/migration agreement, registration."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import zipfile
from datetime import datetime
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import func, inspect, select

from iteris_daemon.catalog import Catalog
from iteris_daemon.catalog import db as catalog_db
from iteris_daemon.catalog.models import Adapter, AdapterRevision, AdapterStatus, Base, MergeRunInput, Source, SourceKind
from iteris_daemon.catalog.registry import (DuplicateError, Observation, SourceGoneError, add_source, get_source,
                                            list_current, record, remove_source, set_health)
from iteris_daemon.validation import AdapterInfo

from databases import rows_loaded
from group_runs import record_past_run

ROOT = Path(__file__).resolve().parents[1]


def _diff(engine) -> list:
    with engine.connect() as connection:
        return compare_metadata(MigrationContext.configure(connection), Base.metadata)


def _revisions() -> list[str]:
    script = ScriptDirectory.from_config(catalog_db._alembic_config(None))
    return [r.revision for r in reversed(list(script.walk_revisions()))]


def test_migrations_from_empty_match_the_models(catalog_url):
    engine = catalog_db.make_engine(catalog_url)
    assert inspect(engine).get_table_names() == []
    catalog_db.upgrade(engine)
    assert catalog_db.current_revision(engine) == catalog_db.head_revision()
    assert set(inspect(engine).get_table_names()) >= {"sources", "adapters", "adapter_revisions", "merge_runs"}
    assert _diff(engine) == []
    engine.dispose()


def test_the_fast_open_knows_the_newest_migration(catalog_url):
    """A catalog at SCHEMA_HEAD opens without Alembic, so the constant must name the head;
    one revision behind, opening it migrates."""
    assert catalog_db.SCHEMA_HEAD == catalog_db.head_revision()
    engine = catalog_db.make_engine(catalog_url)
    assert not catalog_db.at_head(engine)  # empty: no version table
    catalog_db.upgrade(engine, _revisions()[-2])
    assert not catalog_db.at_head(engine)
    Catalog(catalog_url).close()
    assert catalog_db.at_head(engine) and _diff(engine) == []
    engine.dispose()


@pytest.mark.parametrize("start", _revisions())
def test_upgrade_from_every_earlier_revision(catalog_url, start):
    engine = catalog_db.make_engine(catalog_url)
    catalog_db.upgrade(engine, start)
    assert catalog_db.current_revision(engine) == start
    catalog_db.upgrade(engine)
    assert _diff(engine) == []
    catalog_db.downgrade(engine, "base")  # and back down cleanly
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    engine.dispose()


def test_the_wheel_ships_every_module_and_the_migrations(tmp_path):
    """A plain (not editable) install, as the systemd setup does it: the wheel lacked
    ``iteris_daemon/cli/``, so the ``iteris-daemon`` command failed to import."""
    source = tmp_path / "src"  # a copy, so no build/ folder lands in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "iteris_daemon", "plugins", "migrations"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(source)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("iteris_daemon-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for revision in (ROOT / "migrations" / "versions").glob("*.py"):
        assert f"iteris_daemon/migrations/versions/{revision.name}" in names
    modules = {f"iteris_daemon/{path.relative_to(ROOT / 'iteris_daemon').as_posix()}"
               for path in (ROOT / "iteris_daemon").rglob("*.py") if "__pycache__" not in path.parts
               and path.relative_to(ROOT / "iteris_daemon").parts[0] not in ("plugins", "migrations")}
    modules |= {f"iteris_daemon/plugins/{path.name}" for path in (ROOT / "plugins").glob("*.py")}
    assert "iteris_daemon/cli/__init__.py" in modules and modules - names == set()
    assert {"iteris_daemon/migrations/env.py", "iteris_daemon/migrations/script.py.mako"} <= names


def _info(sha: str) -> AdapterInfo:
    return AdapterInfo(base_model="base", task_type=None, rank=4, alpha=8.0, target_modules=["query"],
                       size_bytes=10, content_sha256=sha)


def test_registration_is_idempotent_and_tracks_revisions(catalog_url):
    catalog = Catalog(catalog_url)
    with catalog.session() as session:
        source = add_source(session, "team", SourceKind.local, {"paths": ["/x"]})
        first, new = record(session, source.id, Observation("/x/a", "a", "r1", "/x/a", info=_info("s1")))
        assert new
        again, new = record(session, source.id, Observation("/x/a", "a", "r1", "/x/a", info=_info("s1")))
        assert not new and again.id == first.id
        second, new = record(session, source.id, Observation("/x/a", "a", "r2", "/x/a", reason="bad header"))
        assert new
    with catalog.session() as session:
        adapter = session.scalar(select(Adapter))
        assert [r.revision for r in adapter.revisions] == ["r1", "r2"]
        assert adapter.status is AdapterStatus.rejected and adapter.current.reason == "bad header"
        # Reverting to the earlier content makes it current again, without a new row.
        back, new = record(session, adapter.source_id, Observation("/x/a", "a", "r1", "/x/a", info=_info("s1")))
        assert not new and back.id == first.id
    with catalog.session() as session:
        adapter = session.scalar(select(Adapter))
        assert adapter.status is AdapterStatus.registered and adapter.current.revision == "r1"
        assert session.query(AdapterRevision).count() == 2
    with catalog.session() as session, pytest.raises(DuplicateError):
        add_source(session, "team", SourceKind.local, {})
    with catalog.session() as session:
        remove_source(session, "team")
    with catalog.session() as session:
        assert session.query(Adapter).count() == 0 and session.query(AdapterRevision).count() == 0
    catalog.close()


def test_a_source_removed_after_its_adapters_fed_a_run_can_be_added_again(catalog_url):
    """``sources remove`` only disables a source whose adapters fed past runs (the history
    stays); ``sources add`` of that name then said "already exists", and no command could
    enable it again. Adding it enables the row with the new settings."""
    catalog = Catalog(catalog_url)
    with catalog.session() as session:
        source = add_source(session, "team", SourceKind.local, {"paths": ["/x"]})
        revision, _ = record(session, source.id, Observation("/x/a", "a", "r1", "/x/a", info=_info("s1")))
        record_past_run(session, revision.id)
    with catalog.session() as session:
        remove_source(session, "team")
    with catalog.session() as session:
        assert not get_source(session, "team").enabled
        assert session.scalar(select(Adapter)).status is AdapterStatus.removed
        again = add_source(session, "team", SourceKind.local, {"paths": ["/y"]})
    with catalog.session() as session:
        source = get_source(session, "team")
        assert source.id == again.id and source.enabled and source.settings == {"paths": ["/y"]}
        assert session.query(Source).count() == 1 and session.query(AdapterRevision).count() == 1  # history kept
        with pytest.raises(DuplicateError):
            add_source(session, "team", SourceKind.local, {})
    catalog.close()


def test_a_removed_source_records_nothing_and_its_adapters_are_merged_by_no_group(catalog_url):
    """`sources remove` under a running daemon: its watcher went on registering adapters
    under the disabled source, and every group merged them; with the row deleted (no run
    had used its adapters) each look failed on it for ever (AttributeError). Recording is
    refused, a health is written nowhere, and no merge takes a disabled source's adapters."""
    from iteris_daemon import runner
    from iteris_daemon.config import GroupConfig

    catalog = Catalog(catalog_url)
    with catalog.session() as session:
        used = add_source(session, "used", SourceKind.local, {"paths": ["/u"]})
        revision, _ = record(session, used.id, Observation("/u/a", "a", "r1", "/u/a", info=_info("s1")))
        record_past_run(session, revision.id)
        unused = add_source(session, "unused", SourceKind.local, {"paths": ["/x"]})
        record(session, unused.id, Observation("/x/b", "b", "r1", "/x/b", info=_info("s2")))
        used_id, unused_id = used.id, unused.id
    group = GroupConfig(name="g", base_model="base", destinations=[{"kind": "folder", "path": "/out"}])
    assert [a.name for a, _ in runner.select_inputs(catalog, group)] == ["a", "b"]
    with catalog.session() as session:
        remove_source(session, "used")  # disabled: its adapter fed a run
        remove_source(session, "unused")  # deleted
    for source_id, name in ((used_id, "source used"), (unused_id, f"source id {unused_id}")):
        with pytest.raises(SourceGoneError, match=f"^{name} was removed from the catalog"), catalog.session() as session:
            record(session, source_id, Observation("/u/c", "c", "r9", "/u/c", info=_info("s9")))
        with catalog.session() as session:
            set_health(session, source_id, "a look failed")
    with catalog.session() as session:
        assert session.scalar(select(func.count()).select_from(Adapter)) == 1  # nothing recorded
        session.scalar(select(Adapter)).status = AdapterStatus.registered  # as a watcher recorded it before the fix
    assert runner.select_inputs(catalog, group) == []
    assert runner.groups_behind(catalog, [group]) == {"g": frozenset()}  # its run merged a: merged again, without
    with catalog.session() as session:
        assert [a.name for a, _ in list_current(session, [AdapterStatus.registered])] == ["a"]  # `adapters list`
        assert list_current(session, [AdapterStatus.registered], enabled_sources=True) == []
    catalog.close()


def test_an_adapter_with_a_long_path_name_or_base_model_is_recorded(catalog_url):
    """PostgreSQL held locators and paths to 1024 characters, names and base models to 512
    (SQLite never did): one adapter in a deep folder ended the whole scan with
    StringDataRightTruncation. Unbounded since 0009. Random letters: PostgreSQL would
    compress a repeated one in its index."""
    rng = random.Random(0)
    locator = "/srv/" + "/".join("".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=200)) for _ in range(10))
    name, base_model = locator[5:], locator[-600:]
    catalog = Catalog(catalog_url)
    with catalog.session() as session:
        source = add_source(session, "team", SourceKind.local, {"paths": ["/srv"]})
        info = AdapterInfo(base_model=base_model, task_type=None, rank=4, alpha=8.0, target_modules=["query"],
                           size_bytes=10, content_sha256="s1")
        revision, _ = record(session, source.id, Observation(locator, name, "r1", locator, info=info))
        record_past_run(session, revision.id, calibration_source=locator + "/c")
    with catalog.session() as session:
        [(adapter, current)] = list_current(session)
        assert (adapter.locator, adapter.name, current.files_path, current.base_model) == (locator, name, locator,
                                                                                            base_model)
        assert session.scalar(select(MergeRunInput.calibration_source)) == locator + "/c"
    catalog.close()


def test_current_revisions_are_picked_by_the_database_without_loading_the_history(catalog_url):
    """The daemon asks for every adapter's current revision every few seconds. The database
    picks it, as ``Adapter.current`` does over the loaded history (ties on ``last_seen_at``
    go to the newer row, a revert makes an old revision current), and no other revision
    row is loaded, however long the history."""
    catalog = Catalog(catalog_url)
    rand = random.Random(20261204)
    with catalog.session() as session:
        sources = [add_source(session, name, SourceKind.local, {"paths": [f"/{name}"]}) for name in ("team", "other")]
        for number in range(8):
            source = rand.choice(sources)
            locator = f"/{source.name}/a{number}"
            for step in range(rand.randint(1, 40)):
                revision = f"r{rand.randint(0, step)}"  # often an earlier one: a revert
                seen = (Observation(locator, f"a{number}", revision, locator, info=_info(revision))
                        if rand.random() < 0.7 else Observation(locator, f"a{number}", revision, locator, reason="bad"))
                record(session, source.id, seen)
        session.add(Adapter(source_id=sources[0].id, locator="/team/empty", name="empty", status=AdapterStatus.rejected))
        session.flush()
        tied = next(a for a in session.scalars(select(Adapter).order_by(Adapter.id)) if len(a.revisions) >= 3)
        for row in tied.revisions:  # all seen at one time: the newest row is current
            row.last_seen_at = tied.revisions[0].last_seen_at
        tied_id, newest_row = tied.id, max(row.id for row in tied.revisions)
    with catalog.session() as session:
        adapters = session.scalars(select(Adapter).order_by(Adapter.id)).all()
        expected = [(adapter.id, adapter.current.id if adapter.current else None) for adapter in adapters]
        by_status = {status: [pair for pair, a in zip(expected, adapters) if a.status is status]
                     for status in (AdapterStatus.registered, AdapterStatus.rejected)}
        other = [pair for pair, a in zip(expected, adapters) if a.source.name == "other"]
    assert (tied_id, newest_row) in expected
    with rows_loaded(AdapterRevision) as loaded, catalog.session(write=False) as session:
        pairs = list_current(session)
        assert [(a.id, r.id if r else None) for a, r in pairs] == expected
        assert sorted(loaded) == sorted(r for _, r in expected if r is not None)
        for status, rows in by_status.items():
            assert [(a.id, r.id if r else None) for a, r in list_current(session, [status])] == rows
        assert [(a.id, r.id) for a, r in list_current(session, source="other")] == other
    histories = [len(a.revisions) for a in adapters]
    assert max(histories) >= 10 and len(expected) == 9  # long histories, and one adapter without any
    catalog.close()


def test_a_reading_session_sees_one_view_and_does_not_block_writers(catalog_url):
    """``session(write=False)``, the daemon's catalog check: a writer commits while it
    reads, at once (on SQLite a normal session holds the write lock), and the reader
    keeps the view it began with (PostgreSQL's default READ COMMITTED would show the
    new row at the next query)."""
    catalog, writer = Catalog(catalog_url), Catalog(catalog_url, busy_timeout=0.5)
    with catalog.session() as session:
        add_source(session, "first", SourceKind.local, {"paths": ["/x"]})
    with catalog.session(write=False) as session:
        assert session.query(Source).count() == 1
        with writer.session() as other:  # before the fix, on SQLite: CatalogLockedError after the busy timeout
            add_source(other, "second", SourceKind.local, {"paths": ["/y"]})
        assert session.query(Source).count() == 1
    with catalog.session(write=False) as session:
        assert session.query(Source).count() == 2
    writer.close()
    catalog.close()


def test_sqlite_catalog_is_private_and_in_wal_mode(tmp_path):
    catalog = Catalog(f"sqlite:///{tmp_path / 'state' / 'catalog.db'}")
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    with catalog.engine.connect() as connection, catalog.engine.connect() as second:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        for each in (connection, second):  # every pooled connection: its page cache stays small
            assert each.exec_driver_sql("PRAGMA cache_size").scalar() == -catalog_db.SQLITE_CACHE_KIB
        files = sorted((tmp_path / "state").iterdir())
        assert [f.name for f in files] == ["catalog.db", "catalog.db-shm", "catalog.db-wal", "catalog.db.migrate-lock"]
        assert all(f.stat().st_mode & 0o777 == 0o600 for f in files)
    catalog.close()


def test_a_state_folder_open_to_others_is_reported_not_changed(tmp_path, caplog):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    Catalog(f"sqlite:///{shared / 'catalog.db'}").close()
    assert shared.stat().st_mode & 0o777 == 0o755
    assert f"chmod 700 {shared}" in caplog.text


def test_new_statuses_are_accepted_after_upgrade_and_data_survives(catalog_url):
    """Rows written under 0001 survive the upgrades; the status values added later
    (0002 'cancelled', 0003 'refused') are allowed, and old groups are not forced."""
    from sqlalchemy import text

    engine = catalog_db.make_engine(catalog_url)
    catalog_db.upgrade(engine, "0001")
    with engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO merge_groups (id, name, base_model, selection, strategy, params, destinations, created_at) "
            "VALUES (1, 'g', 'b', '{}', 'iteris', '{}', '[]', CURRENT_TIMESTAMP)"))
        connection.execute(text(
            "INSERT INTO merge_runs (group_id, status, input_fingerprint, started_at) "
            "VALUES (1, 'succeeded', 'f', CURRENT_TIMESTAMP)"))
    catalog_db.upgrade(engine)
    with engine.begin() as connection:
        for status in ("cancelled", "refused"):
            connection.execute(text(
                "INSERT INTO merge_runs (group_id, status, input_fingerprint, started_at) "
                f"VALUES (1, '{status}', 'g', CURRENT_TIMESTAMP)"))
        statuses = sorted(connection.execute(text("SELECT status FROM merge_runs")).scalars())
        assert statuses == ["cancelled", "refused", "succeeded"]
        assert connection.execute(text("SELECT force_requested FROM merge_groups")).scalar() in (False, 0)
        with pytest.raises(Exception):  # the CHECK constraint still guards the column
            with connection.begin_nested():
                connection.execute(text(
                    "INSERT INTO merge_runs (group_id, status, input_fingerprint, started_at) "
                    "VALUES (1, 'bogus', 'h', CURRENT_TIMESTAMP)"))
    engine.dispose()


def test_two_processes_migrating_a_fresh_catalog_at_once(catalog_url):
    """Daemons started together on a new shared catalog: both migrations succeed (serialized)."""
    code = ("import sys; from iteris_daemon.catalog import Catalog; Catalog(sys.argv[1]).close()")
    processes = [subprocess.Popen([sys.executable, "-c", code, catalog_url], stderr=subprocess.PIPE, text=True)
                 for _ in range(3)]
    for process in processes:
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
    engine = catalog_db.make_engine(catalog_url)
    assert catalog_db.current_revision(engine) == catalog_db.head_revision() and _diff(engine) == []
    engine.dispose()


# Values for the columns reflection cannot tell apart: the status and kind enums.
_ENUMS = {("sources", "kind"): ["local", "hub"], ("adapters", "status"): ["registered", "rejected"],
          ("adapter_revisions", "status"): ["registered", "rejected"], ("merge_runs", "status"): ["succeeded", "failed"],
          ("pruned_runs", "status"): ["succeeded", "failed"]}


def _fill(connection, table, index: int) -> dict:
    """One row of ``table`` with a value in every column (nothing left to a default):
    row ``index`` of it, pointing at row ``index`` of the tables it refers to."""
    import datetime

    import sqlalchemy as sa

    row = {}
    for column in table.columns:
        kind = column.type
        if (table.name, column.name) in _ENUMS:
            value = _ENUMS[table.name, column.name][index - 1]
        elif column.foreign_keys or column.primary_key and isinstance(kind, sa.Integer):
            value = index
        elif isinstance(kind, sa.Boolean):
            value = index % 2 == 0
        elif isinstance(kind, sa.DateTime):
            value = datetime.datetime(2026, 11, index, 12, 30, 15, 123456)
        elif isinstance(kind, (sa.Float, sa.Numeric)):
            value = 0.25 * index
        elif isinstance(kind, sa.Integer):
            value = (1 << 40) + index if isinstance(kind, sa.BigInteger) else 10 + index
        elif isinstance(kind, sa.JSON):
            value = {"row": index, "nested": [1, "two", {"three": None}], "text": "é\u2028"}
        else:  # strings and text, within their length
            value = f"{table.name}.{column.name} #{index} ü"[: getattr(kind, "length", None) or 200]
        row[column.name] = value
    connection.execute(table.insert().values(**row))
    return row


@pytest.mark.parametrize("start", _revisions()[:-1])
def test_upgrades_keep_every_row_of_every_table(catalog_url, start):
    """Two rows in every table of the schema at ``start``, every column set (JSON,
    timestamps with microseconds, non-ASCII text, 2^40 sizes); after upgrading to the head
    every row of every table is there with the same values. Before the fix the 0003
    upgrade on SQLite deleted every merge run (batch mode's table rebuild cascaded)."""
    import sqlalchemy as sa

    engine = catalog_db.make_engine(catalog_url)
    catalog_db.upgrade(engine, start)
    metadata = sa.MetaData()
    metadata.reflect(engine)
    tables = [t for t in metadata.sorted_tables if t.name != "alembic_version"]
    assert {t.name for t in tables} - {"base_model_shapes", "daemons", "pruned_runs"} == {
        "sources", "adapters", "adapter_revisions", "merge_groups", "merge_runs", "merge_run_inputs"}
    with engine.begin() as connection:
        written = {t.name: [_fill(connection, t, i) for i in (1, 2)] for t in tables}
    catalog_db.upgrade(engine)
    assert catalog_db.current_revision(engine) == catalog_db.head_revision()
    with engine.connect() as connection:
        for table in tables:
            columns = [table.c[name] for name in written[table.name][0]]
            rows = [dict(r._mapping) for r in connection.execute(sa.select(*columns).order_by(*table.primary_key))]
            assert rows == written[table.name], table.name
    engine.dispose()


@pytest.mark.parametrize("start", _revisions()[:-1])
def test_an_upgrade_stopped_before_its_commit_leaves_the_catalog_as_it_was(catalog_url, start, monkeypatch):
    """An upgrade that fails after its last statement, before the commit (a restart, Ctrl-C,
    a full disk at the end): on SQLite every CREATE/ALTER had committed on its own (pysqlite
    opens no transaction before DDL), and every later upgrade failed on what was left
    ("table _alembic_tmp_merge_groups already exists", "duplicate column name"), so no
    command could open the catalog again (QA MIG). Now nothing of it stays: the schema,
    revision and rows are those before, and the next upgrade goes through."""
    import sqlalchemy as sa
    from alembic import command

    engine = catalog_db.make_engine(catalog_url)
    catalog_db.upgrade(engine, start)
    metadata = sa.MetaData()
    metadata.reflect(engine)
    tables = [t for t in metadata.sorted_tables if t.name != "alembic_version"]
    with engine.begin() as connection:
        written = {t.name: [_fill(connection, t, i) for i in (1, 2)] for t in tables}
    upgrade = command.upgrade

    def stopped(*args, **kwargs):
        upgrade(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "upgrade", stopped)
    with pytest.raises(KeyboardInterrupt):
        catalog_db.upgrade(engine)
    monkeypatch.setattr(command, "upgrade", upgrade)
    engine.dispose()
    assert catalog_db.current_revision(engine) == start
    assert set(sa.inspect(engine).get_table_names()) == {t.name for t in metadata.sorted_tables}
    with engine.connect() as connection:
        for table in tables:
            columns = [table.c[name] for name in written[table.name][0]]
            assert [dict(r._mapping) for r in connection.execute(sa.select(*columns).order_by(*table.primary_key))
                    ] == written[table.name], table.name
    catalog_db.upgrade(engine)
    assert catalog_db.current_revision(engine) == catalog_db.head_revision()
    engine.dispose()


def test_0011_keeps_the_counts_of_pruned_runs_and_goes_back_to_0010(catalog_url):
    """Upgraded from 0010 on a catalog holding runs, ``pruned_runs`` starts empty (the runs'
    rows are the whole count, as before); a prune then counts the runs it deletes there, so
    the /metrics counter reads the same; a downgrade drops the table, the runs staying."""
    from datetime import timedelta

    from sqlalchemy.orm import Session

    from iteris_daemon.catalog.models import MergeGroup, MergeRun, PrunedRuns, RunStatus
    from iteris_daemon.catalog.prune import RECENT_RUNS, prune
    from iteris_daemon.endpoints import CatalogCollector

    def counted(catalog: Catalog) -> dict[tuple[str, str], float]:
        families = {family.name: family for family in CatalogCollector(catalog)._read()}
        return {(s.labels["group"], s.labels["status"]): s.value for s in families["iteris_merge_runs"].samples
                if s.value}

    engine = catalog_db.make_engine(catalog_url)
    catalog_db.upgrade(engine, "0010")
    with Session(engine) as session, session.begin():
        session.add(MergeGroup(id=1, name="g", base_model="base", strategy="iteris"))
        session.add_all(MergeRun(group_id=1, status=RunStatus.skipped, input_fingerprint="f" * 64, repeats=2,
                                 finished_at=datetime(2026, 1, 1)) for _ in range(RECENT_RUNS + 3))
    catalog_db.upgrade(engine)
    assert catalog_db.current_revision(engine) == catalog_db.head_revision()
    catalog = Catalog(catalog_url)
    with catalog.session(write=False) as session:
        assert session.scalar(select(func.count()).select_from(PrunedRuns)) == 0
    assert counted(catalog) == {("g", "skipped"): 2 * (RECENT_RUNS + 3)}
    assert prune(catalog, timedelta(0)).runs == 3
    assert counted(catalog) == {("g", "skipped"): 2 * (RECENT_RUNS + 3)}
    catalog.close()
    catalog_db.downgrade(engine, "0010")
    assert "pruned_runs" not in inspect(engine).get_table_names()
    with engine.connect() as connection:
        assert connection.scalar(select(func.count()).select_from(MergeRun.__table__)) == RECENT_RUNS
    engine.dispose()

def test_updated_at_moves_with_each_new_current_revision(catalog_url):
    """``adapters list --json`` showed ``updated_at`` unchanged when an adapter's weights were
    replaced (a new revision, same status): it moved only on a status change."""
    catalog = Catalog(catalog_url)

    def updated_after(revision: str) -> datetime:
        with catalog.session() as session:
            record(session, session.scalar(select(Source)).id, Observation("/x/a", "a", revision, "/x/a", info=_info(revision)))
        with catalog.session() as session:
            return session.scalar(select(Adapter)).updated_at

    with catalog.session() as session:
        add_source(session, "team", SourceKind.local, {"paths": ["/x"]})
    first = updated_after("r1")
    assert updated_after("r1") == first  # seen again: nothing changed
    second = updated_after("r2")
    assert second > first
    assert updated_after("r1") > second  # the earlier content restored: current again
    catalog.close()


def test_a_clock_stepped_back_does_not_make_a_new_revision_history(catalog_url):
    """The current revision is the one seen last. After the clock stepped back (NTP
    correcting a clock that ran ahead, a VM restored), a new checkpoint was seen at a time
    before the current revision's sighting and recorded as history: runs merged the old
    weights until the clock passed that time. A source that began to look when the revision
    current now was current (``looked_over``) saw news, whatever the times; one that began
    before another source recorded a newer sighting still keeps what it saw as history."""
    catalog = Catalog(catalog_url)
    ahead = datetime(2030, 1, 1)  # when the clock ran ahead
    seen = lambda revision, **kw: Observation("/x/a", "a", revision, "/x/a", info=_info(revision), **kw)  # noqa: E731
    with catalog.session() as session:
        source_id = add_source(session, "team", SourceKind.local, {"paths": ["/x"]}).id
        r1 = record(session, source_id, seen("r1", seen_at=ahead))[0].id
    with catalog.session() as session:  # the clock back at today's time
        r2, new = record(session, source_id, seen("r2", looked_over=r1))
        assert new and r2.last_seen_at > ahead
        r2 = r2.id
    with catalog.session() as session:
        [(_, current)] = list_current(session)
        assert current.id == r2 and session.scalar(select(Adapter)).current.id == r2
        # r1 restored: current again, though seen today
        assert record(session, source_id, seen("r1", looked_over=r2)) == (session.get(AdapterRevision, r1), False)
    with catalog.session() as session:
        assert list_current(session)[0][1].id == r1
        # A source that looked over r2 and saw r3 before the restore was recorded: history
        stale, new = record(session, source_id, seen("r3", looked_over=r2))
        assert new and stale.last_seen_at < ahead
    with catalog.session() as session:
        assert list_current(session)[0][1].id == r1
        session.scalar(select(Adapter)).status = AdapterStatus.removed
    with catalog.session() as session:  # r1 back after its removal: not behind r2 or r3
        record(session, source_id, seen("r1", looked_over=r1))
    with catalog.session() as session:
        [(adapter, current)] = list_current(session)
        assert current.id == r1 and adapter.status is AdapterStatus.registered
    catalog.close()


def test_a_groups_long_base_model_and_destination_are_recorded(catalog_url):
    """PostgreSQL enforced VARCHAR limits that SQLite never did (found by QA on PostgreSQL):
    a group's base model path over 512 characters stopped the daemon at start, and a
    folder destination over 1024 failed every run after merging and publishing."""
    from iteris_daemon.catalog.models import BaseModelShapes, MergeGroup, MergeRun, RunStatus

    catalog = Catalog(catalog_url)
    deep = "/srv/" + "/".join(["x" * 200] * 10)  # 2,014 characters, as a path may be
    with catalog.session() as session:
        session.add(MergeGroup(id=1, name="g", base_model=deep, strategy="iteris"))
        session.add(MergeRun(group_id=1, status=RunStatus.succeeded, input_fingerprint="f" * 64, output_location=deep))
        session.add(BaseModelShapes(key="k" * 64, base_model=deep, shapes={}))
    with catalog.session(write=False) as session:
        assert session.scalar(select(MergeRun.output_location)) == deep
        assert session.scalar(select(MergeGroup.base_model)) == session.scalar(select(BaseModelShapes.base_model)) == deep
    catalog.close()



def test_a_server_catalog_gives_up_on_a_server_that_stops_answering():
    """libpq waits for ever by default: a server that stopped answering without closing the
    connection held every daemon job and `status` with no word (QA PG). A PostgreSQL catalog
    connects with a connect timeout and TCP keepalives; what the URL gives wins."""
    from databases import postgres_database

    with postgres_database() as catalog_url:
        for url, timeout in ((catalog_url, "10"), (f"{catalog_url}?connect_timeout=3", "3")):
            engine = catalog_db.make_engine(url)
            with engine.connect() as connection:
                dsn = dict(item.split("=", 1) for item in connection.connection.dbapi_connection.info.dsn.split())
            engine.dispose()
            assert dsn["connect_timeout"] == timeout and (dsn["keepalives_idle"], dsn["keepalives_count"]) == ("30", "3")
