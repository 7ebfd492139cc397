"""Faults of the local machine, produced for real and survived by the real components
(real SQLite files, real inotify/polling watches, the real folder publisher, real
processes and signals). Deadlines only bound waits; nothing asserts on speed.

- **Full disk during a publish**: the folder publisher runs out of space in the middle
  of copying a new version's weights. On a real 512 KiB tmpfs, filled up first, when
  this process may mount one (root with CAP_SYS_ADMIN, as in the CI container; skipped
  otherwise); and always by an injected ``ENOSPC`` (after 8 KiB of the weights were
  really written, or when the ``current`` link is made), so that it is covered without
  that right. The publish raises ``DestinationFullError`` (an ``IterisError`` and an
  ``OSError``, naming the destination and saying the disk is full); ``current`` is
  byte-identical and loads; every visible version is complete, and the partial copy (in a
  hidden ``.staging-*`` folder) is removed at once, giving its space back; with space
  again, the next publish works.
- **Catalog locked by another process**: a real ``python`` subprocess holds the SQLite
  catalog with ``BEGIN EXCLUSIVE`` and writes a row of its own. A registration (a scan)
  and a run write wait (busy timeout) and succeed once it commits; if the lock outlives
  the timeout (0.3 s here, ``Catalog(busy_timeout=...)``) they fail with a one-line
  ``CatalogLockedError`` naming the database. Either way ``PRAGMA integrity_check`` is
  ok and nothing already in the catalog, nor the other process's row, is lost.
- **The watched folder disappears** (``rm -rf`` of the root under a running source,
  inotify and polling; and deleted then re-created at once): the source keeps running
  without spinning or flooding the log, reports itself unhealthy naming the folder,
  marks the vanished adapters ``removed`` (rows and revisions kept); when the folder is
  back it is watched again (a later arrival is registered from its events) and healthy.
- **SIGKILL during registration**: ``iteris-daemon sources scan`` over 160 adapter
  folders, each run in a real child process, is SIGKILLed 5 times at seeded random
  moments (while it opens the catalog, or after a random number of registrations); the
  folders change between rounds (new weights, a deleted folder). After every kill the
  catalog passes ``integrity_check``/``foreign_key_check`` and every adapter row has
  revisions, the current one agreeing with the row; a last, unkilled scan registers
  every folder exactly once at its present content. A deterministic test pins the
  defect the kills found: a registration is one transaction.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from sqlalchemy import select
from sqlalchemy.orm import selectinload

import polling
from builders import build_adapter, build_tiny_model
from mounts import tmpfs
from iteris_daemon.catalog import Catalog, CatalogError
from iteris_daemon.catalog.models import Adapter, AdapterStatus, MergeGroup, MergeRun, RunStatus, Source, SourceKind
from iteris_daemon.catalog.registry import add_source
from iteris_daemon.errors import IterisError
from iteris_daemon.plugin_manager import get_publisher
from iteris_daemon.publish import PublishRequest
from iteris_daemon.sources.local import ROOT_CHECK_SECONDS, LocalFolderSource
from iteris_daemon.validation import folder_fingerprint

pytestmark = pytest.mark.timeout(300)
wait_for = partial(polling.wait_for, timeout=60.0)  # a bound for waits on a loaded 2-core machine
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
SEED = int(os.environ.get("ITERIS_FAULT_SEED", "20250611"))


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny BERT and two rank-8 adapters (~29 KB of weights each), with a merge report
    so that they also stand for merged outputs."""
    root = tmp_path_factory.mktemp("faults")
    base = build_tiny_model("bert", root / "base")
    adapters = []
    for seed in (0, 1):
        folder = build_adapter(base, root / f"lora{seed}", seed=seed, family="bert", r=8, alpha=16)
        (folder / "merge_report.json").write_text(json.dumps({"strategy": "iteris", "seed": seed}))
        adapters.append(folder)
    return base, adapters


def _source(catalog: Catalog, watched: Path, base: Path, name: str = "team", **settings) -> LocalFolderSource:
    with catalog.session() as session:
        add_source(session, name, SourceKind.local,
                   {"paths": [str(watched)], "base_model": str(base), "settle_seconds": 0.3, **settings})
    return LocalFolderSource(catalog, name)


def _adapters(catalog: Catalog) -> dict[str, Adapter]:
    return {a.name: a for a in _list(catalog)}


def _integrity(db: Path) -> None:
    with sqlite3.connect(db) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert connection.execute("PRAGMA foreign_key_check").fetchall() == []
    connection.close()


# ------------------------------------------------------------------------------------ 1. full disk


def _publish_request(adapter_dir: Path, base: Path, run_id: int) -> PublishRequest:
    return PublishRequest(adapter_dir=adapter_dir, group="news", run_id=run_id, base_model=str(base),
                          strategy="iteris", params={}, inputs=[])


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _fill(disk: Path, leave: int) -> Path:
    """Write a filler file until the filesystem is full, then free ``leave`` bytes of it."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    os.truncate(filler, filler.stat().st_size - leave)
    return filler


def _assert_disk_full_survived(error, dest: Path, old_version: str, before: dict[str, bytes], adapters) -> None:
    """What a failed publish must leave: a clear error, ``current`` untouched and loadable,
    no incomplete version anyone could load."""
    assert isinstance(error, IterisError) and type(error).__name__ == "DestinationFullError", type(error)
    assert str(dest) in str(error) and "No space left" in str(error) and "disk is full" in str(error)
    assert "\n" not in str(error), str(error)  # one line
    assert os.readlink(dest / "current") == f"versions/{old_version}"
    assert _files(dest / "current") == before
    assert load_file(dest / "current" / "adapter_model.safetensors")  # loadable, not just equal
    assert json.loads((dest / "current" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert not list(dest.glob(".current-*"))
    complete = [{n: (a / n).read_bytes() for n in ADAPTER_FILES} for a in adapters]
    for entry in (dest / "versions").iterdir():
        if not entry.name.startswith("."):  # hidden staging folders are the publisher's scratch space
            assert {n: (entry / n).read_bytes() for n in ADAPTER_FILES} in complete, f"{entry.name} is incomplete"


def _published_once(disk: Path, base: Path, adapter: Path):
    """The folder publisher with a destination in ``disk`` that serves ``adapter`` (run 1):
    (publisher, destination, settings, the version published)."""
    folder = get_publisher("folder")
    dest = disk / "news"
    settings = folder.Settings(path=dest)
    return folder, dest, settings, folder.publish(_publish_request(adapter, base, 1), settings).version


def test_a_full_tmpfs_fails_the_publish_cleanly_and_keeps_current(made, tmp_path):
    """A real full disk: the destination is a 512 KiB tmpfs, filled up to leave less room
    than the new version's weights. The copy really fails with ENOSPC from the kernel."""
    base, (first, second) = made
    # skipped where no tmpfs can be mounted: the injected variant below runs instead
    with tmpfs(tmp_path / "disk", 512 << 10) as disk:
        folder, dest, settings, old = _published_once(disk, base, first)
        before = _files(dest / "current")

        weights = (second / "adapter_model.safetensors").stat().st_size
        before_weights = [p for p in sorted(second.iterdir()) if p.name < "adapter_model.safetensors"]
        room = sum(-(-p.stat().st_size // 4096) * 4096 for p in before_weights) + 2 * 4096
        filler = _fill(disk, leave=room)  # room for the files copied first and 8 KiB of the weights
        free = shutil.disk_usage(disk).free
        assert weights > 2 * 4096
        with pytest.raises(OSError) as raised:
            folder.publish(_publish_request(second, base, 2), settings)
        assert raised.value.errno == errno.ENOSPC
        # the partial copy removed at once: it held the space the disk's other users need (QA LEAK)
        assert not list((dest / "versions").glob(".staging-*")) and shutil.disk_usage(disk).free >= free
        _assert_disk_full_survived(raised.value, dest, old, before, (first, second))

        filler.unlink()  # space again
        new = folder.publish(_publish_request(second, base, 3), settings)
        assert new.changed and os.readlink(dest / "current") == f"versions/{new.version}"
        assert _files(dest / "current") == _files(second)
        assert not list((dest / "versions").glob(".staging-*"))


def test_a_read_only_destination_fails_the_publish_in_one_line_saying_what_to_do(made, tmp_path):
    """A destination remounted read-only (as the systemd unit's sandbox leaves a folder not
    in ReadWritePaths=): the publish failed with a bare "OSError: [Errno 30] Read-only file
    system" after the whole merge, at every retry (QA OPS). Now one line naming the folder and
    ReadWritePaths=; ``current`` stays, and once writable again the next publish goes through."""
    import subprocess

    base, (first, second) = made
    with tmpfs(tmp_path / "disk", 4 << 20) as disk:
        folder, dest, settings, old = _published_once(disk, base, first)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        try:
            with pytest.raises(OSError) as raised:
                folder.publish(_publish_request(second, base, 2), settings)
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
        error = raised.value
        assert isinstance(error, IterisError) and type(error).__name__ == "DestinationError" and error.errno == errno.EROFS
        assert str(error) == (f"cannot publish to {dest}: Read-only file system (the daemon's user may not write there); "
                              f"`current` still points at {old}; make it writable to that user (under the systemd unit, "
                              "whose sandbox makes the rest read-only, a ReadWritePaths= line naming it) and the next "
                              "run publishes again")
        assert os.readlink(dest / "current") == f"versions/{old}" and _files(dest / "current") == _files(first)
        new = folder.publish(_publish_request(second, base, 3), settings)
        assert new.changed and _files(dest / "current") == _files(second)


@pytest.mark.parametrize("where", ["copy", "link"])
def test_an_injected_enospc_fails_the_publish_cleanly_and_keeps_current(made, tmp_path, monkeypatch, where):
    """ENOSPC injected (so that it runs without the right to mount a small filesystem):
    ``copy``: the weights copy writes its first 8 KiB for real, then fails as a full disk
    does; ``link``: making the temporary ``current`` link fails (a full inode table)."""
    base, (first, second) = made
    folder = get_publisher("folder")
    dest = tmp_path / "news"
    settings = folder.Settings(path=dest)
    old = folder.publish(_publish_request(first, base, 1), settings).version
    before = _files(dest / "current")

    def copy_until_full(src, dst, *args, **kwargs):
        with open(src, "rb") as source, open(dst, "wb") as target:
            data = source.read()
            if len(data) > 8192:
                target.write(data[:8192])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            target.write(data)
        return dst

    def no_inode(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        if where == "copy":
            patch.setattr(shutil, "copyfile", copy_until_full)
        else:
            patch.setattr(os, "symlink", no_inode)
        with pytest.raises(OSError) as raised:
            folder.publish(_publish_request(second, base, 2), settings)
    assert raised.value.errno == errno.ENOSPC
    _assert_disk_full_survived(raised.value, dest, old, before, (first, second))
    assert not list((dest / "versions").glob(".staging-*"))

    new = folder.publish(_publish_request(second, base, 3), settings)
    assert new.changed and _files(dest / "current") == _files(second)
    assert not list((dest / "versions").glob(".staging-*"))


# ----------------------------------------------------------------------------- 2. locked database

# Another process (a backup script, a sqlite3 shell, another tool) takes the write lock
# and writes a row of its own; it commits when the test writes a line to its stdin.
LOCK_HOLDER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
db.execute("INSERT INTO sources (name, kind, settings, enabled, healthy, created_at) "
           "VALUES ('other-process', 'local', '{\\"paths\\": [\\"/nowhere\\"]}', 0, 1, '2025-01-01 00:00:00')")
print("locked", flush=True)
sys.stdin.readline()
db.execute("COMMIT")
print("committed", flush=True)
"""


class LockHolder:
    def __init__(self, db: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(db)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "locked"

    def release(self) -> None:
        self.proc.stdin.write("\n")
        self.proc.stdin.close()
        assert self.proc.stdout.readline().strip() == "committed"
        assert self.proc.wait(timeout=60) == 0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _write_run(catalog: Catalog, group: str) -> int:
    """What the runner writes when a run starts: the group (first time) and a run row."""
    with catalog.session() as session:
        row = session.scalar(select(MergeGroup).where(MergeGroup.name == group))
        if row is None:
            row = MergeGroup(name=group, base_model="base", strategy="iteris")
            session.add(row)
            session.flush()
        run = MergeRun(group_id=row.id, status=RunStatus.running, input_fingerprint="f" * 64)
        session.add(run)
        session.flush()
        return run.id


def test_writes_wait_for_a_lock_held_by_another_process_then_succeed(made, tmp_path):
    """Default busy timeout (30 s): the lock is released long before it; both writes wait, then land."""
    base, (first, second) = made
    db, watched = tmp_path / "catalog.db", tmp_path / "watched"
    shutil.copytree(first, watched / "before")
    catalog = Catalog(f"sqlite:///{db}")
    source = _source(catalog, watched, base)
    assert len(source.scan().registered) == 1
    shutil.copytree(second, watched / "during")

    holder = LockHolder(db)
    outcome: dict[str, object] = {}

    def write():
        try:
            outcome["report"] = source.scan()
            outcome["run"] = _write_run(catalog, "news")
        except BaseException as exc:  # reported below, not lost in the thread
            outcome["error"] = exc

    writer = threading.Thread(target=write)
    try:
        writer.start()
        writer.join(0.5)
        assert writer.is_alive() and not outcome, f"wrote through another process's exclusive lock: {outcome}"
        holder.release()
        writer.join(60)
    finally:
        holder.kill()
    assert not writer.is_alive() and "error" not in outcome, outcome.get("error")
    assert outcome["report"].registered == [str(watched / "during")]
    _integrity(db)
    adapters = _adapters(catalog)
    assert {n: a.status for n, a in adapters.items()} == {"before": AdapterStatus.registered,
                                                          "during": AdapterStatus.registered}
    with catalog.session() as session:
        assert session.scalar(select(Source).where(Source.name == "other-process")) is not None
        assert session.get(MergeRun, outcome["run"]).status is RunStatus.running
    catalog.close()


def test_a_lock_outliving_the_busy_timeout_fails_clearly_and_loses_nothing(made, tmp_path):
    """Busy timeout 0.3 s, lock held until the test lets go: the writes fail with a
    CatalogError naming the database; nothing is half-written; afterwards all works."""
    base, (first, second) = made
    db, watched = tmp_path / "catalog.db", tmp_path / "watched"
    shutil.copytree(first, watched / "before")
    catalog = Catalog(f"sqlite:///{db}", busy_timeout=0.3)
    source = _source(catalog, watched, base)
    source.scan()
    first_run = _write_run(catalog, "news")
    before = {n: (a.status, [r.revision for r in a.revisions]) for n, a in _adapters(catalog).items()}
    shutil.copytree(second, watched / "during")

    holder = LockHolder(db)
    try:
        with pytest.raises(CatalogError) as registering:
            source.scan()
        with pytest.raises(CatalogError) as running:
            _write_run(catalog, "news")
        holder.release()
    finally:
        holder.kill()
    for error in (registering.value, running.value):
        assert str(db) in str(error) and "locked" in str(error), str(error)
        assert "\n" not in str(error)  # one line, not a SQL dump

    _integrity(db)
    assert {n: (a.status, [r.revision for r in a.revisions]) for n, a in _adapters(catalog).items()} == before
    with catalog.session() as session:
        assert [r.id for r in session.scalars(select(MergeRun))] == [first_run]
        assert session.scalar(select(Source).where(Source.name == "other-process")) is not None
    assert source.scan().registered == [str(watched / "during")]
    assert _write_run(catalog, "news") > first_run
    catalog.close()


# --------------------------------------------------------------------- 3. the watched folder goes


def _put(adapter: Path, target: Path) -> None:
    """Copy an adapter in under a hidden name, then rename it into place: it appears whole."""
    staging = target.with_name(f".incoming-{target.name}")
    shutil.copytree(adapter, staging)
    os.rename(staging, target)


def _count_calls(source, method: str) -> list[int]:
    """Counts calls of ``source.<method>`` from now on (the worker looks methods up on the instance)."""
    calls = [0]
    original = getattr(source, method)

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    setattr(source, method, counted)
    return calls


def _thread_cpu(thread: threading.Thread) -> float:
    """CPU seconds (user + system) ``thread`` has used, from /proc."""
    fields = Path(f"/proc/self/task/{thread.native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("polling_mode", [False, True], ids=["inotify", "polling"])
def test_a_deleted_watched_folder_is_survived_and_recovered(made, tmp_path, caplog, polling_mode):
    """``rm -rf`` of the watched root under a running source, then the root is re-created
    with the old adapter and a new one, and later one more arrives (seen only if the
    re-created root is watched again). Adapters arrive whole (staged under a hidden name,
    then renamed in, as the README asks writers to do): a copy that a loaded machine
    pauses for longer than the settle time would otherwise be registered half done,
    which is not what this test is about."""
    base, (first, second) = made
    watched = tmp_path / "watched"
    watched.mkdir()
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    source = _source(catalog, watched, base, polling=polling_mode, poll_interval_seconds=0.2)
    caplog.set_level(logging.INFO, logger="iteris_daemon.sources.local")

    def health():
        with catalog.session() as session:
            row = session.scalar(select(Source).where(Source.name == "team"))
            return row.healthy, row.last_error

    source.start()
    try:
        _put(first, watched / "keep")
        wait_for(lambda: getattr(_adapters(catalog).get("keep"), "status", None) is AdapterStatus.registered,
                 "registration")

        shutil.rmtree(watched)
        wait_for(lambda: _adapters(catalog)["keep"].status is AdapterStatus.removed, "the removal")
        wait_for(lambda: not health()[0], "the source to report itself unhealthy")
        assert str(watched) in health()[1]

        # Gone for a while: the source idles (no busy loop, no log flood) and keeps running.
        # Counted in the worker's own steps, not in seconds: over three root checks (each at
        # least ROOT_CHECK_SECONDS apart), its loop may turn only as often as its tick allows,
        # nothing is rescanned, at most 2 lines are logged, and its thread uses little CPU.
        looks, scans = _count_calls(source, "_take_due"), _count_calls(source, "scan")
        checks: list[tuple[int, float]] = []  # (looks so far, the worker's CPU seconds) at each root check
        check_roots = source._check_roots
        source._check_roots = lambda: (checks.append((looks[0], _thread_cpu(source._worker))), check_roots())
        wait_for(lambda: len(checks) >= 1, "a root check")
        records = len(caplog.records)
        wait_for(lambda: len(checks) >= 4, "three more root checks")
        tick = min(0.25, source.settings.settle_seconds / 4)
        (first_looks, first_cpu), (last_looks, last_cpu) = checks[0], checks[3]
        assert last_looks - first_looks <= 3 * (ROOT_CHECK_SECONDS / tick + 1), "the source spins while its folder is gone"
        assert last_cpu - first_cpu < 0.5, "the source's thread burns CPU while its folder is gone"
        assert scans[0] == 0 and len(caplog.records) - records <= 2, [r.getMessage() for r in caplog.records[records:]]
        assert source._watching()

        watched.mkdir()
        _put(first, watched / "keep")
        _put(second, watched / "new")
        wait_for(lambda: getattr(_adapters(catalog).get("new"), "status", None) is AdapterStatus.registered,
                 "the new adapter in the re-created folder")
        wait_for(lambda: _adapters(catalog)["keep"].status is AdapterStatus.registered, "the old adapter back")
        wait_for(lambda: health()[0], "the source to report itself healthy again")
        # Watched again, not just rescanned once: a later arrival is seen through events.
        _put(second, watched / "later")
        wait_for(lambda: getattr(_adapters(catalog).get("later"), "status", None) is AdapterStatus.registered,
                 "an adapter added after the recovery")
    finally:
        source.stop()
    adapters = _adapters(catalog)
    assert sorted(adapters) == ["keep", "later", "new"]
    assert len(adapters["keep"].revisions) == 1  # the revision was kept through the removal, not re-made
    assert adapters["keep"].current.revision == folder_fingerprint(watched / "keep")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(str(watched) in m and "does not exist" in m for m in warnings), warnings
    catalog.close()


@contextlib.contextmanager
def _watching_one_adapter(made, tmp_path):
    """A running source over ``tmp_path/watched`` with one adapter, ``keep``, registered."""
    base, (first, _) = made
    watched = tmp_path / "watched"
    watched.mkdir()
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    source = _source(catalog, watched, base)
    source.start()
    try:
        shutil.copytree(first, watched / "keep")
        _wait_registered(catalog, "keep", "registration")
        yield source, catalog, watched
    finally:
        source.stop()
        catalog.close()


def _wait_registered(catalog: Catalog, name: str, what: str) -> None:
    wait_for(lambda: getattr(_adapters(catalog).get(name), "status", None) is AdapterStatus.registered, what)


def test_a_watched_folder_missing_at_start_is_reported_not_created(made, tmp_path, caplog):
    """A typo, or a mount that is not there yet: the source starts unhealthy with a warning
    naming the folder, and does not create it (an empty folder in its place looked
    healthy, and hid the mistake); once the folder appears it is watched and scanned."""
    base, (first, _) = made
    watched = tmp_path / "mnt" / "loras"
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    source = _source(catalog, watched, base)

    def health() -> tuple[bool, str | None]:
        with catalog.session() as session:
            row = session.scalar(select(Source))
            return row.healthy, row.last_error

    with caplog.at_level(logging.WARNING, logger="iteris_daemon"):
        source.start()
    try:
        assert not watched.exists()
        assert any(str(watched) in r.getMessage() and "does not exist" in r.getMessage() for r in caplog.records)
        healthy, error = health()
        assert not healthy and str(watched) in error
        watched.mkdir(parents=True)
        _put(first, watched / "keep")
        _wait_registered(catalog, "keep", "the adapter in the folder that appeared")
        wait_for(lambda: health()[0], "the source to be healthy again")
    finally:
        source.stop()
        catalog.close()


def test_a_watched_folder_renamed_away_and_back_is_registered_again(made, tmp_path):
    """``mv watched away; mv away watched`` within a second (the soak test's flapping
    source). The events mark its adapters removed while the watch survives (inotify
    follows the folder); the source must notice the folder is back and rescan it. The
    soak caught a timing of this that this test does not force; the next one forces it."""
    first, _ = made[1]
    with _watching_one_adapter(made, tmp_path) as (_, catalog, watched):
        watched.rename(tmp_path / "away")
        time.sleep(0.5)  # events arrive, the folder is not checked yet
        (tmp_path / "away").rename(watched)
        _wait_registered(catalog, "keep", "the adapter back")
        shutil.copytree(first, watched / "later")
        _wait_registered(catalog, "later", "an adapter added afterwards")


def test_a_rescan_that_finds_the_folder_gone_rescans_it_once_it_is_back(made, tmp_path):
    """The timing the soak caught: the folder is away just while a full scan runs (a
    reload's or the periodic rescan's), and back before the next root check. The scan
    marks its adapters removed; the watch never died (inotify follows the folder), so
    only the scan can tell the source to look again once the folder is back."""
    with _watching_one_adapter(made, tmp_path) as (source, catalog, watched):
        watched.rename(tmp_path / "away")
        source.scan()
        assert _adapters(catalog)["keep"].status is AdapterStatus.removed
        (tmp_path / "away").rename(watched)
        _wait_registered(catalog, "keep", "the adapter back")


def _away_during(method, watched: Path):
    """Wrap ``method`` so that its first call runs with ``watched`` renamed away, and the
    folder is back the moment it returns (sooner than any root check looks)."""
    calls = []

    def wrapped(*args, **kwargs):
        if calls:
            return method(*args, **kwargs)
        calls.append(True)
        watched.rename(watched.with_name("away"))
        try:
            return method(*args, **kwargs)
        finally:
            watched.with_name("away").rename(watched)
    return wrapped, calls


@pytest.mark.parametrize("look", ["scan", "settle"])
def test_a_folder_away_only_while_the_source_looks_is_registered_again(made, tmp_path, look):
    """The folder is away just while a scan lists the folders, or while an event's settle
    marks what is gone, and back before that look ends. The look marks the adapter
    removed; the root check never saw the folder away and its watch lives on, so the
    source must look again at what it just removed (the rare flake of the test above)."""
    with _watching_one_adapter(made, tmp_path) as (source, catalog, watched):
        if look == "scan":
            source.adapter_folders, calls = _away_during(source.adapter_folders, watched)
            source.scan()
        else:
            source._mark_removed, calls = _away_during(source._mark_removed, watched)
            (watched / "keep" / "notes.txt").write_text("an event for the folder\n")
            wait_for(lambda: calls, "a settle that marks what is gone")
        assert watched.is_dir()
        _wait_registered(catalog, "keep", "the adapter back")


def test_an_adapter_behind_a_folder_turned_symlink_stays_removed(made, tmp_path):
    """Looking again at what a scan removed must agree with the scan's listing: an
    adapter whose parent folder became a symlink is not listed (symlinked folders are
    not followed), so it stays removed instead of coming back as rejected and flipping
    at every rescan."""
    first, _ = made[1]
    with _watching_one_adapter(made, tmp_path) as (source, catalog, watched):
        shutil.copytree(first, watched / "team" / "a")
        _wait_registered(catalog, "team/a", "the nested adapter")
        (watched / "team").rename(tmp_path / "elsewhere")
        (watched / "team").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
        source.scan()
        assert _adapters(catalog)["team/a"].status is AdapterStatus.removed
        time.sleep(10 * 0.3)  # ten settle periods: anything queued has been examined by now
        assert _adapters(catalog)["team/a"].status is AdapterStatus.removed


def test_events_queued_before_a_folder_turned_symlink_agree_with_the_listing(made, tmp_path, monkeypatch):
    """The race behind the rare failure of the test above, made deterministic: events for
    the adapter's folder, queued before its parent became a symlink, settle afterwards.
    Before the fix the settle examined the folder through the link and recorded it
    rejected (the listing never reaches it: removed); a settle of the parent alone left
    it registered. Both now say removed, as a scan does, without reading a file."""
    import iteris_daemon.sources.local as local

    read = []
    for name in ("validate_adapter", "folder_fingerprint"):
        monkeypatch.setattr(local, name, partial(lambda real, folder, *a, **k: read.append(folder) or real(folder, *a, **k),
                                                 getattr(local, name)))
    base, (first, _) = made
    watched = tmp_path / "watched"
    shutil.copytree(first, watched / "team" / "a")
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    _source(catalog, watched, base)
    for settled in ([(watched / "team" / "a", True)], [(watched / "team", True)], [(watched, True)]):
        source = LocalFolderSource(catalog, "team")
        assert len(source.scan().registered) == 1
        (watched / "team").rename(tmp_path / "elsewhere")
        (watched / "team").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
        read.clear()
        source._settle(settled)
        assert _adapters(catalog)["team/a"].status is AdapterStatus.removed, settled
        assert read == [], settled
        (watched / "team").unlink()
        (tmp_path / "elsewhere").rename(watched / "team")
    catalog.close()


def test_a_root_reached_through_a_symlink_later_keeps_its_adapters(made, tmp_path):
    """Roots are resolved when the source is made. Storage moved afterwards, with a
    symlink left where it was (above the root), is still the root: only symlinks below
    it count. Before, scans rejected its adapters as reached through a symlinked folder
    while events marked them removed, flipping at every look."""
    base, (first, _) = made
    storage = tmp_path / "storage"
    shutil.copytree(first, storage / "watched" / "a")
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    source = _source(catalog, storage / "watched", base)
    assert len(source.scan().registered) == 1
    storage.rename(tmp_path / "moved")
    storage.symlink_to(tmp_path / "moved", target_is_directory=True)
    _assert_registered_at_every_look(catalog, source, storage / "watched" / "a")
    catalog.close()


def test_a_watched_folder_swapped_for_another_is_watched_there(made, tmp_path):
    """The watched folder replaced by another under its path at once (a release moved
    into place: ``mv loras loras.old && mv v2 loras``): the old release's adapters are
    removed, the new one's registered, and what arrives in it later is seen. The watch
    follows the old folder, which lives on under its new name: before, nothing changed
    until the periodic rescan, 10 minutes later, nor was a later arrival seen."""
    base, (first, second) = made
    shutil.copytree(second, tmp_path / "v2" / "new")
    with _watching_one_adapter(made, tmp_path) as (_, catalog, watched):
        watched.rename(tmp_path / "loras.old")
        (tmp_path / "v2").rename(watched)
        _wait_registered(catalog, "new", "the second release's adapter")
        wait_for(lambda: _adapters(catalog)["keep"].status is AdapterStatus.removed, "the first release's removal")
        _put(first, watched / "later")
        _wait_registered(catalog, "later", "an adapter added to the second release")


def test_lost_events_make_the_source_look_at_the_whole_root_again(made, tmp_path, monkeypatch, caplog):
    """An inotify queue overflow (the daemon not reading its events for a while: stopped,
    swapped out) loses events; watchdog then gives each watch an ``EventsLostEvent`` for its
    root. Taken as a change of the root alone, an adapter that arrived meanwhile in a
    folder of its own waited for the periodic rescan, 10 minutes (found by QA, with a
    SIGSTOPped daemon and 20,000 files touched). The overflow itself is not provoked here:
    it takes filling the kernel's queue (``fs.inotify.max_queued_events``, a host-wide
    setting, 16,384 by default) while this process does not read it, which a test cannot
    arrange quickly nor without changing the host. The handler is made deaf instead, every
    event lost as in an overflow, and given the notice watchdog sends after one."""
    from watchdog.events import EventsLostEvent
    from iteris_daemon.sources import local

    class Deaf(local._Handler):
        def dispatch(self, event):  # the kernel's queue overflowed: no event reaches the source
            pass

    monkeypatch.setattr(local, "_Handler", Deaf)
    base, (first, second) = made
    watched = tmp_path / "watched"
    shutil.copytree(first, watched / "keep")
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    source = _source(catalog, watched, base)
    settled, settle = [], source._settle
    monkeypatch.setattr(source, "_settle", lambda paths: (settle(paths), settled.extend(paths)))
    source.start()
    try:
        _wait_registered(catalog, "keep", "the scan at start")
        (watched / "team").mkdir()
        _put(second, watched / "team" / "new")  # no event announces it
        shutil.rmtree(watched / "keep")
        local._Handler.on_any_event(source._handler, EventsLostEvent(str(watched), is_directory=True))
        wait_for(lambda: any(path == watched for path, _ in settled), "the look at the root")
        adapters = _adapters(catalog)
        assert adapters["team/new"].status is AdapterStatus.registered
        assert adapters["keep"].status is AdapterStatus.removed
    finally:
        source.stop()
        catalog.close()
    assert any("were lost" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def _assert_registered_at_every_look(catalog: Catalog, source: LocalFolderSource, folder: Path) -> None:
    """Twice: a scan, a settle of ``folder``, a deep settle of its root; each leaves its
    adapter (named ``folder``'s name) registered."""
    looks = {"scan": source.scan, "settle of the folder": lambda: source._settle([(folder, False)]),
             "settle of the root": lambda: source._settle([(folder.parent, True)])}
    for _ in range(2):
        for name, look in looks.items():
            look()
            assert _adapters(catalog)[folder.name].status is AdapterStatus.registered, name


def test_nested_roots_judge_a_folder_by_its_deepest_root(made, tmp_path):
    """Roots may nest; the inner one later swapped for a symlink (its storage moved) is
    still a root, walked as such: its adapter stays registered at every look. Judged
    by the outer root it was rejected by scans and removed by events, in turn. Its
    weights, a symlink into the outer root, are inside a watched folder all along."""
    base, (first, _) = made
    outer = tmp_path / "outer"
    inner = outer / "inner"
    shutil.copytree(first, inner / "a")
    (outer / "shared").mkdir()  # the weights live in the outer root: still inside a watched folder
    (inner / "a" / "adapter_model.safetensors").rename(outer / "shared" / "weights.safetensors")
    (inner / "a" / "adapter_model.safetensors").symlink_to(outer / "shared" / "weights.safetensors")
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    source = _source(catalog, outer, base, paths=[str(outer), str(inner)])
    assert source.scan().registered == [str(inner / "a")]
    inner.rename(outer / "moved")
    inner.symlink_to(outer / "moved", target_is_directory=True)
    _assert_registered_at_every_look(catalog, source, inner / "a")
    catalog.close()


def test_a_moved_root_keeps_weights_symlinked_inside_it(made, tmp_path):
    """A weights file that is a symlink to a file inside the root stays inside it after
    the root's storage moved under a symlink: containment is checked against where the
    root really is now, not the path it was resolved to at start."""
    base, (first, _) = made
    storage = tmp_path / "storage"
    watched = storage / "watched"
    shutil.copytree(first, watched / "a")
    (watched / "shared").mkdir()
    tensors = load_file(watched / "a" / "adapter_model.safetensors")
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    source = _source(catalog, watched, base)
    assert source.scan().registered == [str(watched / "a")]
    storage.rename(tmp_path / "moved")
    storage.symlink_to(tmp_path / "moved", target_is_directory=True)
    save_file({k: 2 * v for k, v in tensors.items()}, watched / "shared" / "retrained.safetensors")
    (watched / "a" / "adapter_model.safetensors").unlink()
    (watched / "a" / "adapter_model.safetensors").symlink_to("../shared/retrained.safetensors")
    report = source.scan()  # a new revision, examined
    assert report.registered == [str(watched / "a")] and not report.rejected, _adapters(catalog)["a"].current.reason
    catalog.close()


def test_a_watched_folder_deleted_and_at_once_recreated_is_watched_again(made, tmp_path):
    """The same fault, faster than the source looks: the root is re-created right after
    the ``rm -rf``. Its watch died all the same (inotify saw the old folder go)."""
    first, second = made[1]
    with _watching_one_adapter(made, tmp_path) as (_, catalog, watched):
        shutil.rmtree(watched)
        shutil.copytree(second, watched / "quick")
        _wait_registered(catalog, "quick", "the adapter of the re-created folder")
        wait_for(lambda: _adapters(catalog)["keep"].status is AdapterStatus.removed, "the removal")
        shutil.copytree(first, watched / "later")
        _wait_registered(catalog, "later", "an adapter added after the recovery")


# ----------------------------------------------------------------- 4. SIGKILL during registration


def test_a_registration_is_one_transaction(made, tmp_path):
    """The defect the kills found, shown deterministically: a registration that fails
    after ``record`` (the process dies, an error) must leave no adapter row behind. On
    SQLite the savepoints in ``record`` used to commit the row on their own."""
    from iteris_daemon.catalog.registry import Observation, record
    from iteris_daemon.validation import validate_adapter

    base, (first, _) = made
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    with catalog.session() as session:
        source_id = add_source(session, "team", SourceKind.local, {"paths": [str(first.parent)]}).id
    seen = Observation(locator=str(first), name="lora0", revision=folder_fingerprint(first), files_path=str(first),
                       info=validate_adapter(first, str(base)))
    with pytest.raises(RuntimeError):
        with catalog.session() as session:
            record(session, source_id, seen)
            raise RuntimeError("dies before the commit")
    assert _adapters(catalog) == {}
    with catalog.session() as session:
        record(session, source_id, seen)
    (adapter,) = _adapters(catalog).values()
    assert adapter.status is AdapterStatus.registered and len(adapter.revisions) == 1
    catalog.close()

# A parent that has already imported torch/transformers and read the base model's config,
# and forks one child per scan: the child runs ``python -m iteris_daemon ARGS`` (runpy,
# the same entry point) without paying ~10 s of imports on every one of the rounds.
# Protocol: one JSON line [log_path, *args] in; "pid N" and then "exit N STATUS" out.
ZYGOTE = """
import json, os, runpy, sys
from pathlib import Path
import alembic.command, iteris_daemon.cli, iteris_daemon.sources.local
from iteris_daemon.validation import validate_adapter
validate_adapter(Path(sys.argv[1]), sys.argv[2])
print("ready", flush=True)
for line in sys.stdin:
    log_path, *args = json.loads(line)
    pid = os.fork()
    if pid == 0:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.argv = ["iteris-daemon", *args]
        code = 1
        try:
            runpy.run_module("iteris_daemon", run_name="__main__", alter_sys=True)
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print("pid", pid, flush=True)
    print("exit", pid, os.waitpid(pid, 0)[1], flush=True)
"""
KILLS = int(os.environ.get("ITERIS_FAULT_KILLS", "5"))  # more for a longer fault run (RELIABILITY.md)
# Enough unregistered folders that every round has registrations to interrupt: a round
# registers its `after` (at most 8) plus what lands in the 0-20 ms before the kill, at about
# 100 registrations a second.
FOLDERS = 32 * KILLS


def _revisions(db: Path) -> int:
    connection = sqlite3.connect(db)
    try:
        return connection.execute("SELECT count(*) FROM adapter_revisions").fetchone()[0]
    except sqlite3.OperationalError:  # a writer is checkpointing: ask again
        return -1
    finally:
        connection.close()


def _check_consistent(url: str, db: Path) -> dict[str, Adapter]:
    """After a kill: a sound database; every adapter row has revisions, and the current one
    agrees with the row (its status, its folder)."""
    _integrity(db)
    catalog = Catalog(url, migrate=False)
    try:
        adapters = {a.locator: a for a in _list(catalog)}
    finally:
        catalog.close()
    for locator, adapter in adapters.items():
        assert adapter.revisions, f"{locator}: adapter row without a revision"
        assert len({r.revision for r in adapter.revisions}) == len(adapter.revisions)
        current = adapter.current
        assert current.files_path == locator
        if adapter.status is not AdapterStatus.removed:
            assert adapter.status is current.status, (locator, adapter.status, current.status)
    return adapters


def _list(catalog: Catalog) -> list[Adapter]:
    """Every adapter with its source and whole history, usable after the session."""
    with catalog.session() as session:
        return list(session.scalars(select(Adapter).options(selectinload(Adapter.revisions),
                                                            selectinload(Adapter.source)).order_by(Adapter.id)))


def _new_weights(folder: Path, factor: float) -> None:
    """Different weights of the same shapes, written beside and renamed in (as a trainer would)."""
    tensors = load_file(folder / "adapter_model.safetensors")
    save_file({k: v * factor for k, v in tensors.items()}, folder / ".new.safetensors")
    os.replace(folder / ".new.safetensors", folder / "adapter_model.safetensors")


def test_sigkill_during_registration_never_corrupts_the_catalog(made, tmp_path):
    base, (first, _) = made
    rng = random.Random(SEED)
    db, watched = tmp_path / "catalog.db", tmp_path / "watched"
    url = f"sqlite:///{db}"
    for i in range(FOLDERS):
        shutil.copytree(first, watched / f"task{i:02d}")
    catalog = Catalog(url)
    with catalog.session() as session:
        add_source(session, "team", SourceKind.local,
                   {"paths": [str(watched)], "base_model": str(base), "settle_seconds": 0.05})
    catalog.close()
    history: dict[str, set[str]] = {str(f): {folder_fingerprint(f)} for f in watched.iterdir()}

    zygote = subprocess.Popen([sys.executable, "-c", ZYGOTE, str(first), str(base)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert zygote.stdout.readline().strip() == "ready"

        def scan(log: Path) -> int:
            zygote.stdin.write(json.dumps([str(log), "sources", "scan", "team", "--db", url,
                                                "--cache-dir", str(tmp_path / "cache")]) + "\n")
            zygote.stdin.flush()
            word, pid = zygote.stdout.readline().split()
            assert word == "pid"
            return int(pid)

        def reaped(pid: int) -> int:
            word, child, status = zygote.stdout.readline().split()
            assert (word, int(child)) == ("exit", pid)
            return int(status)

        killed = 0
        for round_ in range(KILLS):
            # The moment: 0 -> 0-100 ms after the fork (opening the catalog); k -> once k new
            # revisions are committed, plus 0-20 ms (in the middle of the next ones).
            after = rng.randint(0, 8)
            start = _revisions(db)
            pid = scan(tmp_path / f"scan{round_}.log")
            if after == 0:
                time.sleep(rng.uniform(0, 0.1))
            else:
                wait_for(lambda: _revisions(db) >= start + after or not _alive(pid), f"{after} registrations",
                         interval=0.002)  # registrations now come about every 10 ms: look often
                time.sleep(rng.uniform(0, 0.02))
            assert _alive(pid), f"round {round_}: the scan finished before the kill: " + \
                (tmp_path / f"scan{round_}.log").read_text()[-2000:]
            os.kill(pid, signal.SIGKILL)
            status = reaped(pid)
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            killed += 1
            _check_consistent(url, db)

            # Between rounds the folders change: two get new weights, one is deleted.
            for folder in rng.sample(sorted(watched.iterdir()), 2):
                _new_weights(folder, 2 + round_)
                history[str(folder)].add(folder_fingerprint(folder))
            gone = rng.choice(sorted(watched.iterdir()))
            shutil.rmtree(gone)

        pid = scan(tmp_path / "final.log")
        assert reaped(pid) == 0, (tmp_path / "final.log").read_text()[-2000:]
    finally:
        zygote.stdin.close()
        zygote.kill()
        zygote.wait()
    assert killed == KILLS

    adapters = _check_consistent(url, db)
    present = {str(f): folder_fingerprint(f) for f in watched.iterdir()}
    # One row per folder: every present one; a deleted one only if a scan saw it before it went.
    assert set(present) <= set(adapters) <= set(history)
    for locator, adapter in adapters.items():
        assert {r.revision for r in adapter.revisions} <= history[locator]
        if locator in present:
            assert adapter.status is AdapterStatus.registered
            assert adapter.current.revision == present[locator]
        else:
            assert adapter.status is AdapterStatus.removed and adapter.revisions  # history kept
    with sqlite3.connect(db) as connection:
        assert connection.execute("SELECT count(*) FROM adapters").fetchone()[0] == len(adapters)
        assert connection.execute("SELECT count(*) FROM adapter_revisions").fetchone()[0] == \
            sum(len(a.revisions) for a in adapters.values())
    connection.close()


def _alive(pid: int) -> bool:
    """The child has not exited (a zombie until the parent reaps it counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
