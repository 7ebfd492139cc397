"""``iteris-daemon db prune`` (``catalog.prune``): a history built by real runs on the real
folder source, catalog and folder publisher (``group_runs``), pruned, reads the same to
every reader the daemon, ``status`` and /metrics have (the runs counter included: the runs
deleted are counted into ``pruned_runs``); on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sqlite3
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from safetensors.torch import load_file, save_file
from sqlalchemy import delete, func, select

import polling
from group_runs import Setup
from iteris_daemon.catalog import Catalog
from iteris_daemon.catalog.db import CatalogLockedError
from iteris_daemon.catalog.models import (Adapter, AdapterRevision, AdapterStatus, DaemonPresence, MergeGroup,
                                          MergeRun, MergeRunInput, PrunedRuns, RunStatus, Source, SourceKind)
from iteris_daemon.catalog import prune as prune_module
from iteris_daemon.catalog.prune import RECENT_RUNS, Pruned, prune, vacuum
from iteris_daemon.catalog.registry import add_source
from iteris_daemon.cli import main
from iteris_daemon.config import GroupConfig
from iteris_daemon.endpoints import DaemonMetrics
from iteris_daemon.peers import Peers
from iteris_daemon.runner import (Inputs, _last_decided, _record_skip, _record_start, _served_before, _unpublished_merge,
                                  gate_baseline, groups_behind, merge_candidates, published_copy, select_inputs,
                                  sync_group, unpublished_copy)
from iteris_daemon.sources.local import LocalFolderSource
from iteris_daemon.status import collect

pytestmark = pytest.mark.timeout(600)
PAST = timedelta(days=200)
TABLES = (MergeRun, MergeRunInput, AdapterRevision, Adapter, DaemonPresence)


class CatalogSetup(Setup):
    """``group_runs.Setup`` on the catalog at ``url`` (a SQLite file or the PostgreSQL test server),
    with two more adapters: ``extra`` (removed from its folder) and ``spare`` (never selected)."""

    def __init__(self, tmp_path: Path, base: Path, adapters: list[Path], url: str):
        self.base, self.work, self.published = base, tmp_path / "work", tmp_path / "published"
        self.catalog = Catalog(url)
        self.watched = tmp_path / "watched"
        self.watched.mkdir()
        for adapter in adapters:
            shutil.copytree(adapter, self.watched / adapter.name)
        with self.catalog.session() as session:
            add_source(session, "team", SourceKind.local, {"paths": [str(self.watched)], "base_model": str(base)})
        self.scan()
        for name in ("extra", "spare"):  # a location of its own: adapters 3 and 4
            shutil.copytree(adapters[1], self.watched / name)
            self.scan()
        shutil.rmtree(self.watched / "extra")
        self.scan()

    def scan(self) -> None:
        LocalFolderSource(self.catalog, "team").scan()

    def edit(self, name: str, factor: float) -> None:
        """A new revision of adapter ``name``: its weights scaled."""
        weights = self.watched / name / "adapter_model.safetensors"
        save_file({key: value * factor for key, value in load_file(weights).items()}, weights)
        self.scan()

    def config(self, *names: str, to: tuple[Path, ...] = (), **fields) -> GroupConfig:
        """The group ``unified`` merging ``names``, published to ``to`` (default: ``published``)."""
        config = GroupConfig(name="unified", base_model=str(self.base), strategy="task_arithmetic",
                             select={"names": list(names)},
                             destinations=[{"kind": "folder", "path": str(path)} for path in to or (self.published,)],
                             **fields)
        sync_group(self.catalog, config)
        return config

    def group_id(self) -> int:
        with self.catalog.session() as session:
            return session.scalar(select(MergeGroup.id).where(MergeGroup.name == "unified"))


@pytest.fixture
def history(tmp_path, runner_adapters, catalog_url):
    """A group's runs of every kind over three revisions of task0, all 200 days old:

    1 succeeded (task0@A), 2 skipped (unchanged), 3 succeeded (task0@B), 4 failed (task0@C
    and task1, published to the first destination, not the second), 5 refused (run 4's merge,
    published again: a quality gate), 6 failed (forced, to the broken destination only: its
    merge kept to be published again), 7 failed (that merge published again), 8-67 skipped
    (too few adapters, two reasons in turn); and two daemons, one seen now, one 200 days ago."""
    s = CatalogSetup(tmp_path, *runner_adapters, catalog_url)
    no_gates = {"max_fidelity_gap": None, "max_regression": None}
    both, broken = ("task0", "task1"), s.published.parent / "second"
    outcomes = [s.run(s.config("task0", gates=no_gates)), s.run(s.config("task0", gates=no_gates))]
    s.edit("task0", 1.5)
    outcomes.append(s.run(s.config("task0", gates=no_gates)))
    s.edit("task0", 0.5)
    broken.write_text("not a folder")  # a destination that fails
    outcomes.append(s.run(s.config(*both, to=(s.published, broken), gates=no_gates)))
    outcomes.append(s.run(s.config(*both, to=(s.published, broken), gates={"max_fidelity_gap": 1e-9,
                                                                           "max_regression": None})))
    outcomes.append(s.run(s.config(*both, to=(broken,), gates=no_gates), force=True))
    outcomes.append(s.run(s.config(*both, to=(broken,), gates=no_gates)))
    for i in range(60):
        outcomes.append(s.run(s.config(*both, to=(broken,), gates=no_gates, min_adapters=3 + i % 2)))
    assert [o.status for o in outcomes[:7]] == [RunStatus.succeeded, RunStatus.skipped, RunStatus.succeeded,
                                                 RunStatus.failed, RunStatus.refused, RunStatus.failed,
                                                 RunStatus.failed]
    assert {o.status for o in outcomes[7:]} == {RunStatus.skipped} and outcomes[-1].run_id == 67
    Peers(s.catalog, "host:1:live").announce({})
    Peers(s.catalog, "host:2:gone").announce({})
    _move_back(s.catalog, PAST, MergeRun.started_at, MergeRun.finished_at, AdapterRevision.last_seen_at,
               Adapter.updated_at)
    _move_back(s.catalog, PAST, DaemonPresence.seen_at, where=DaemonPresence.holder == "host:2:gone")
    yield s
    s.catalog.close()


def _move_back(catalog: Catalog, by: timedelta, *columns, where=None) -> None:
    """Move the times in ``columns`` of every row (``where``) back by ``by``: row by row, as
    SQLite has no date arithmetic on its text times."""
    with catalog.session() as session:
        for column in columns:
            query = select(column.class_) if where is None else select(column.class_).where(where)
            for row in session.scalars(query):
                if getattr(row, column.key) is not None:
                    setattr(row, column.key, getattr(row, column.key) - by)


def _old_skips(catalog: Catalog, count: int) -> int:
    """A group ``g`` with ``count`` skipped runs (two reasons in turn, so none folds into
    another), moved 200 days back; its id."""
    with catalog.session() as session:
        group = MergeGroup(name="g", base_model="base", strategy="task_arithmetic")
        session.add(group)
        session.flush()
        group_id = group.id
    for i in range(count):
        _record_skip(catalog, group_id, "f" * 64, Inputs(), f"reason {i % 2}")
    _move_back(catalog, PAST, MergeRun.started_at, MergeRun.finished_at)
    return group_id


def _counts(catalog: Catalog) -> dict[str, int]:
    with catalog.session(write=False) as session:
        return {t.__tablename__: session.scalar(select(func.count()).select_from(t)) for t in TABLES}


def _pruned_runs(catalog: Catalog) -> dict[tuple[int, RunStatus], int]:
    with catalog.session(write=False) as session:
        return {(row.group_id, row.status): row.runs for row in session.scalars(select(PrunedRuns))}


def _read(s: CatalogSetup) -> dict:
    """What the daemon's next decisions, ``status`` and /metrics read."""
    group_id = s.group_id()
    config = s.config("task0", "task1", gates={"max_fidelity_gap": None, "max_regression": None})
    last = _last_decided(s.catalog, group_id)
    served = _served_before(s.catalog, last)
    with s.catalog.session(write=False) as session:
        newest = session.scalar(select(MergeRun).where(MergeRun.group_id == group_id).order_by(MergeRun.id.desc()))
        candidates = [(a.id, r.id) for a, r in merge_candidates(session)]
    kept = _unpublished_merge(s.catalog, group_id, unpublished_copy(s.work, group_id), newest.input_fingerprint, last)
    report = collect(s.catalog)
    metrics = [line for line in generate_latest(DaemonMetrics(s.catalog).registry).decode().splitlines()
               if line.startswith("iteris_") and not line.startswith("iteris_adapters{")]
    return {
        "status": json.dumps({k: v for k, v in report.items() if k != "daemons"}, sort_keys=True, default=str),
        "last_decided": last and last.id, "served_before_refusal": served and served.id,
        "gate_baseline": gate_baseline(s.catalog, group_id, published_copy(s.work, group_id)),
        "kept_merge": kept and (kept[0], kept[2]), "behind": groups_behind(s.catalog, [config]),
        "candidates": candidates, "inputs": [(a.id, r.id) for a, r in select_inputs(s.catalog, config)],
        "metrics": metrics,
    }


def test_prune_keeps_what_is_read_and_deletes_the_rest(history, monkeypatch):
    s = history
    before, counts = _read(s), _counts(s.catalog)
    # what the history's readers see: run 5's refusal decided last, run 3 is served behind it (and
    # the gate's baseline), run 6's merge is kept to be published again, run 4's merge is what
    # the first destination serves
    assert (before["last_decided"], before["served_before_refusal"], before["kept_merge"]) == (5, 3, (6, True))
    assert before["gate_baseline"][0] is not None
    assert [p["run_id"] for p in json.loads(before["status"])["groups"][0]["published"]] == [4]

    dry = prune(s.catalog, timedelta(days=90), dry_run=True)
    assert _counts(s.catalog) == counts and _pruned_runs(s.catalog) == {}  # rolled back, its counts with it
    monkeypatch.setattr(prune_module, "PASS", 5)  # several transactions, each deciding anew
    pruned = prune(s.catalog, timedelta(days=90))
    assert _read(s) == before  # /metrics's iteris_merge_runs_total too: the runs deleted are counted in pruned_runs
    assert _pruned_runs(s.catalog) == {(s.group_id(), RunStatus.succeeded): 1, (s.group_id(), RunStatus.skipped): 11}
    # runs 1, 2 and 8-17 (past the 50 newest); their inputs (1 + 1 + 10 x 2); task0@A (only
    # runs 1 and 2 merged it); the removed `extra` with its revision; the daemon gone
    assert pruned == dry == Pruned(runs=12, run_inputs=22, revisions=2, adapters=1, daemons=1)
    assert _counts(s.catalog) == {name: count - deleted for (name, count), deleted in
                                  zip(counts.items(), (12, 22, 2, 1, 1))}
    assert vacuum(s.catalog).startswith("VACUUM") and _read(s) == before  # outside a transaction, as both need
    with s.catalog.session(write=False) as session:
        runs = set(session.scalars(select(MergeRun.id)))
        revisions = {r.revision for r in session.scalars(select(AdapterRevision).join(Adapter)
                                                         .where(Adapter.name == "task0"))}
        daemons = list(session.scalars(select(DaemonPresence.holder)))
    assert runs == {3, 4, 5, 6, 7, *range(18, 68)}
    assert len(revisions) == 2  # task0@B (run 3 merged it, no longer current) and task0@C
    assert daemons == ["host:1:live"]
    assert prune(s.catalog, timedelta(days=90)) == Pruned()  # nothing more
    with s.catalog.session() as session:
        session.execute(delete(MergeGroup))
    assert _pruned_runs(s.catalog) == {}  # a group's counts go with it, as its runs do


def test_two_prunes_at_once_count_each_run_once(catalog_url):
    """A second prune that found the same runs while the first had not committed: it waits for
    the first (PostgreSQL: the runs locked as they are counted; SQLite: the write lock), then
    finds them gone. Without the lock it counted them again, or failed inserting their row."""
    catalog = Catalog(catalog_url)
    group_id = _old_skips(catalog, RECENT_RUNS + 10)
    with catalog.session(write=False) as session:
        now = catalog.now(session)
    second: list[Pruned] = []

    def prune_beside() -> None:
        with catalog.session() as session:
            second.append(prune_module._pass(session, now, now, RECENT_RUNS, limit=None))

    with catalog.session() as session:
        first = prune_module._pass(session, now, now, RECENT_RUNS, limit=None)
        beside = threading.Thread(target=prune_beside)
        beside.start()
        time.sleep(1)  # the second prune finds the runs, and waits
    beside.join()
    assert (first.runs, second) == (10, [Pruned()])
    assert _pruned_runs(catalog) == {(group_id, RunStatus.skipped): 10}
    catalog.close()


def test_a_running_run_and_a_live_daemon_stay(tmp_path, runner_adapters):
    """A run still running (its daemon finishes it) however old and deep, a daemon seen a
    minute ago with --older-than 0, and the newest runs."""
    s = CatalogSetup(tmp_path, *runner_adapters, f"sqlite:///{tmp_path / 'catalog.db'}")
    s.config("task0")
    group_id = s.group_id()
    running = _record_start(s.catalog, group_id, "f" * 64, Inputs())
    for i in range(RECENT_RUNS + 5):
        _record_skip(s.catalog, group_id, "f" * 64, Inputs(), f"reason {i % 2}")
    Peers(s.catalog, "host:1:live").announce({})
    _move_back(s.catalog, PAST, MergeRun.started_at, MergeRun.finished_at)
    _move_back(s.catalog, timedelta(minutes=1), DaemonPresence.seen_at)
    assert prune(s.catalog, timedelta(0)) == Pruned(runs=5, daemons=0)
    with s.catalog.session(write=False) as session:
        assert session.get(MergeRun, running).status is RunStatus.running
        assert session.scalar(select(func.count()).select_from(MergeRun)) == RECENT_RUNS + 1
        assert session.scalar(select(func.count()).select_from(DaemonPresence)) == 1
    s.catalog.close()


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_prune_command(tmp_path, capsys):
    db = ["--db", f"sqlite:///{tmp_path / 'catalog.db'}"]
    with pytest.raises(SystemExit) as exit_:
        main(["db", "prune", "--help"])
    assert exit_.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert "--older-than DAYS" in shown and "--keep-runs N" in shown and "--dry-run" in shown and "--vacuum" in shown
    assert f"default and least: the {RECENT_RUNS} that `status` reads" in shown
    assert "iteris_merge_runs_total (their counts are kept in the catalog), so it does not drop" in shown
    for option, value, why in (("--older-than", "-1", "0 or more"), ("--older-than", "nan", "0 or more"),
                               ("--keep-runs", str(RECENT_RUNS - 1), f"at least {RECENT_RUNS}"),
                               ("--dry-run", "--vacuum", "not allowed with argument")):  # vacuum was not run, silently
        with pytest.raises(SystemExit) as exit_:
            main(["db", "prune", *db, option, value])
        assert exit_.value.code == 2 and why in capsys.readouterr().err
    code, _, err = run(capsys, "db", "prune", *db)
    assert code == 2 and "no catalog at" in err  # prune creates none

    catalog = Catalog(db[1])
    _old_skips(catalog, RECENT_RUNS + 3)
    catalog.close()
    table = ["  merge runs                3", "  run inputs                0", "  adapter revisions         0",
             "  adapters                  0", "  daemon rows               0"]
    code, out, _ = run(capsys, "db", "prune", *db, "--dry-run", "--older-than", "30")
    assert code == 0 and out.splitlines() == [
        f"catalog {db[1]}: would delete what is older than 30 days and not read (each group's {RECENT_RUNS} newest "
        "runs kept):", *table, "dry run: nothing was deleted"]
    code, out, _ = run(capsys, "db", "prune", *db, "--vacuum")
    assert code == 0 and out.splitlines() == [
        f"catalog {db[1]}: deleted what is older than 90 days and not read (each group's {RECENT_RUNS} newest "
        "runs kept):", *table, "VACUUM: the catalog rewritten without the free pages; the file shrunk"]
    code, out, _ = run(capsys, "db", "prune", *db, "--keep-runs", "60")
    assert code == 0 and "  merge runs                0" in out.splitlines()


def test_vacuum_waits_for_no_reader_and_names_a_lock_it_could_not_take(tmp_path):
    """Beside a reader (a backup, a slow `status`) the VACUUM runs and the checkpoint after it
    is tried once, not waited for with the write lock held: the daemons' writes went on
    failing behind it for the whole busy timeout (QA RV7: a 10 s write failed, the prune said
    the file was rewritten). Behind another process's write lock it says so in one line."""
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    catalog = Catalog(url, busy_timeout=0.5)
    with catalog.session() as session:
        session.add(MergeGroup(name="g", base_model="m", strategy="iteris"))
    reader = sqlite3.connect(tmp_path / "catalog.db")
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM merge_groups").fetchall()  # a read transaction on the old pages
    writer = Catalog(url, busy_timeout=10)
    assert vacuum(catalog).endswith("the file shrinks at a later checkpoint, once the readers open now are done")
    with writer.session() as session:  # the lock was given back at once
        session.add(MergeGroup(name="h", base_model="m", strategy="iteris"))
    reader.rollback()
    assert vacuum(catalog).endswith("the file shrunk")
    locker = sqlite3.connect(tmp_path / "catalog.db")
    locker.execute("BEGIN IMMEDIATE")  # another process holding the write lock
    with pytest.raises(CatalogLockedError, match="is locked by another process .* pruned, but not vacuumed"):
        vacuum(catalog)
    locker.rollback()
    for connection in (reader, locker):
        connection.close()
    for opened in (catalog, writer):
        opened.close()


def test_a_removed_adapters_long_history_goes_a_pass_at_a_time(tmp_path, runner_adapters, monkeypatch):
    """Every transaction deletes at most PASS revisions, a removed adapter's history too: its
    5,000 revisions went in one, holding SQLite's write lock throughout (QA RV7)."""
    s = CatalogSetup(tmp_path, *runner_adapters, f"sqlite:///{tmp_path / 'catalog.db'}")
    with s.catalog.session() as session:
        source = session.scalar(select(Source))
        gone = Adapter(source_id=source.id, locator=str(tmp_path / "gone"), name="gone", status=AdapterStatus.removed)
        session.add(gone)
        session.flush()
        for i in range(12):
            session.add(AdapterRevision(adapter_id=gone.id, revision=f"{i:064x}", status=AdapterStatus.registered))
        last = Adapter(source_id=source.id, locator=str(tmp_path / "last"), name="last",
                       status=AdapterStatus.registered)
        session.add(last)
        session.flush()  # `last` and its revision hold the largest ids, which stay
        session.add(AdapterRevision(adapter_id=last.id, revision="f" * 64, status=AdapterStatus.registered))
    _move_back(s.catalog, PAST, AdapterRevision.last_seen_at, Adapter.updated_at)
    monkeypatch.setattr(prune_module, "PASS", 5)
    passes = []
    real_pass = prune_module._pass
    monkeypatch.setattr(prune_module, "_pass", lambda *a, **k: passes.append(real_pass(*a, **k)) or passes[-1])
    # gone's 12 and the fixture's removed `extra` with its one
    assert prune(s.catalog, timedelta(days=90)) == Pruned(revisions=13, adapters=2)
    assert [p.revisions for p in passes] == [5, 5, 3, 0] and passes[2].adapters >= 1
    s.catalog.close()


def test_a_stopping_daemon_ends_its_prune_after_the_pass_under_way(tmp_path, caplog, monkeypatch):
    """``stop`` set (the daemon stopping): the pass under way finishes, none starts after it,
    and the next prune goes on from there; without it a first prune of months of runs held
    the daemon's stop for as long as all its passes took."""
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    _old_skips(catalog, RECENT_RUNS + 5)
    monkeypatch.setattr(prune_module, "PASS", 2)
    stop = threading.Event()
    stop.set()
    with caplog.at_level("INFO", logger="iteris_daemon"):
        assert prune(catalog, timedelta(days=90), stop=stop) == Pruned(runs=2)
        assert "catalog prune (stopped early): runs 2," in caplog.text
        assert prune(catalog, timedelta(days=90)) == Pruned(runs=3)
    assert _counts(catalog)["merge_runs"] == RECENT_RUNS
    catalog.close()


@pytest.mark.timeout(180)
def test_the_daemon_prunes_on_its_schedule(tmp_path, caplog, monkeypatch):
    """``[daemon.prune]``: a job on its cron (Mondays 03:00 here, run at once by the test) prunes
    as ``db prune`` would, beside the running daemon; a catalog failure is one WARNING and
    leaves /healthz healthy (a daily job failing would otherwise stay unhealthy for days);
    a reload without the table removes the job. ``Daemon.run`` runs in this process's main
    thread, as the CLI runs it; the failure is a stand-in (``prune`` raising the error a
    lost server gives)."""
    import iteris_daemon.daemon as daemon_module
    from sqlalchemy.exc import OperationalError

    config = tmp_path / "daemon.toml"
    running = (f"[daemon]\nstate_dir = {json.dumps(str(tmp_path / 'state'))}\n"
               f"cache_dir = {json.dumps(str(tmp_path / 'cache'))}\ngrace_seconds = 1\n")
    config.write_text(running + '[daemon.prune]\nolder_than_days = 30\ncron = "0 3 * * 1"\n')
    daemon = daemon_module.Daemon(config)
    seen: dict[str, object] = {}

    def run_now() -> None:
        daemon.scheduler.get_job(daemon_module.PRUNE_JOB).modify(next_run_time=datetime.now(timezone.utc))

    def probe() -> None:
        job = polling.wait_for(lambda: daemon.scheduler is not None and daemon.scheduler.get_job(daemon_module.PRUNE_JOB),
                               "the prune's job")
        seen["next"] = (job.next_run_time.weekday(), job.next_run_time.hour, job.next_run_time.minute)
        _old_skips(daemon.catalog, RECENT_RUNS + 3)
        run_now()
        polling.wait_for(lambda: "catalog prune: runs 3," in caplog.text, "the scheduled prune")
        seen["runs"] = _counts(daemon.catalog)["merge_runs"]

        def unreachable(*args, **kwargs):
            raise OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))

        monkeypatch.setattr(daemon_module, "prune", unreachable)
        for failures in range(1, 4):  # /healthz counts a job's catalog failures from 3 in a row
            run_now()
            polling.wait_for(lambda: caplog.text.count("catalog prune failed") == failures, "the failed prune's warning")
        seen["health"] = daemon.catalog_health.problem(after=0)
        config.write_text(running)
        os.kill(os.getpid(), signal.SIGHUP)
        polling.wait_for(lambda: "configuration reloaded" in caplog.text, "the reload")
        seen["after reload"] = daemon.scheduler.get_job(daemon_module.PRUNE_JOB)
        os.kill(os.getpid(), signal.SIGTERM)

    with caplog.at_level("INFO", logger="iteris_daemon"):
        assert polling.run_here(daemon, probe) == 0
    assert seen["next"] == (0, 3, 0) and seen["runs"] == RECENT_RUNS
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == 3 * [
        "catalog prune failed (tried again at the next time of cron '0 3 * * 1'): OperationalError: "
        "(builtins.ConnectionRefusedError) connection refused"]
    assert seen["health"] is None and seen["after reload"] is None
    assert "catalog prune of what is older than 30 days on cron '0 3 * * 1' (UTC); next at 20" in caplog.text


@pytest.mark.timeout(180)
def test_a_daemon_stopping_ends_its_prune_after_the_pass_under_way(tmp_path, caplog, monkeypatch):
    """SIGTERM while the daemon's scheduled prune runs (passes of 2 over 20 old runs, the
    first pass held until the signal is sent): the daemon stops after that pass, logging
    the prune "stopped early", and the next prune (here ``db prune``) deletes the rest."""
    import iteris_daemon.daemon as daemon_module

    monkeypatch.setattr(prune_module, "PASS", 2)
    in_pass, real_pass = threading.Event(), prune_module._pass

    def held_pass(*args, **kwargs):
        in_pass.set()
        time.sleep(1.0)  # the signal arrives during the first pass
        return real_pass(*args, **kwargs)

    monkeypatch.setattr(prune_module, "_pass", held_pass)
    config = tmp_path / "daemon.toml"
    config.write_text(f"[daemon]\nstate_dir = {json.dumps(str(tmp_path / 'state'))}\n"
                      f"cache_dir = {json.dumps(str(tmp_path / 'cache'))}\ngrace_seconds = 1\n[daemon.prune]\n")
    daemon = daemon_module.Daemon(config)

    def probe() -> None:
        polling.wait_for(lambda: daemon.scheduler is not None and daemon.scheduler.get_job(daemon_module.PRUNE_JOB),
                         "the prune's job")
        _old_skips(daemon.catalog, RECENT_RUNS + 20)
        daemon.scheduler.get_job(daemon_module.PRUNE_JOB).modify(next_run_time=datetime.now(timezone.utc))
        assert in_pass.wait(30)
        os.kill(os.getpid(), signal.SIGTERM)

    with caplog.at_level(logging.INFO, logger="iteris_daemon"):
        assert polling.run_here(daemon, probe) == 0
    assert "catalog prune (stopped early): runs 2," in caplog.text, caplog.text
    catalog = Catalog(f"sqlite:///{tmp_path / 'state' / 'catalog.db'}")
    assert _counts(catalog)["merge_runs"] == RECENT_RUNS + 18
    monkeypatch.setattr(prune_module, "_pass", real_pass)
    assert prune(catalog, timedelta(days=90)) == Pruned(runs=18)
    catalog.close()
