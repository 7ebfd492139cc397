"""Local folder source on a real SQLite file with real filesystem events (inotify, and
the polling fallback): debounced registration, rejection reasons, revisions, removal,
and the rescan at start."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from sqlalchemy import select

from polling import wait_for
from builders import build_adapter, build_tiny_model
from mounts import tmpfs
from iteris_daemon.catalog import Catalog
from iteris_daemon.catalog.models import Adapter, AdapterRevision, AdapterStatus, Source, SourceKind
from iteris_daemon.catalog.registry import add_source
from iteris_daemon.adapter_config import sha256_file
from iteris_daemon.sources.local import LocalFolderSource

SETTLE = 0.5


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("local-src")
    base = build_tiny_model("bert", root / "base")
    adapters = [build_adapter(base, root / f"lora{i}", seed=i, family="bert", r=2 + i, alpha=4 + i) for i in range(2)]
    return base, adapters


@pytest.fixture
def setup(tmp_path, made):
    base, adapters = made
    watched = tmp_path / "watched"
    watched.mkdir()
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    yield catalog, watched, base, adapters
    catalog.close()


@contextmanager
def _registered_and_watched(catalog, watched, base, lora, name: str):
    """``lora`` copied in as ``name`` and registered by a started source, whose reports
    to the groups are collected: (source, reports). The source stops after the block."""
    shutil.copytree(lora, watched / name)
    source = _source(catalog, watched, base)
    reports = []
    source.on_change = reports.append
    source.start()
    try:
        wait_for(lambda: name in _adapters(catalog), "registration")
        yield source, reports
    finally:
        source.stop()


def _source(catalog, watched, base, polling=False, settle: float = SETTLE) -> LocalFolderSource:
    with catalog.session() as session:
        add_source(session, "team", SourceKind.local, {
            "paths": [str(watched)], "base_model": str(base), "settle_seconds": settle,
            "polling": polling, "poll_interval_seconds": 0.2,
        })
    return LocalFolderSource(catalog, "team")


def _adapters(catalog) -> dict[str, Adapter]:
    with catalog.session() as session:
        rows = session.scalars(select(Adapter)).all()
        for row in rows:
            _ = row.revisions  # load while the session is open
        return {row.name: row for row in rows}


class SettleClock:
    """The source's clock for settling (``time.monotonic`` as ``sources.local`` sees it),
    moved only by the test: "no event for ``settle_seconds``" then means the test said so,
    however slowly a loaded machine runs the writer. Everything else is real time."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name):
        return getattr(time, name)


def _weights_seen(source: LocalFolderSource, folder: Path, size: int) -> bool:
    """The source has an event for ``folder`` since its weights reached ``size`` bytes."""
    with source._dirty_lock:
        entry = source._dirty.get(folder)
    files = {name: length for name, length, *_ in (entry[1] or ())} if entry else {}
    return files.get("adapter_model.safetensors") == size


def _slow_copy(src: Path, dst: Path, source: LocalFolderSource, clock: SettleClock, chunks: int = 5) -> None:
    """Config first, weights last and slowly, as a network copy would: after each chunk the
    source has seen the write, and less than the settle time passes (on its clock)."""
    dst.mkdir()
    shutil.copy(src / "adapter_config.json", dst / "adapter_config.json")
    shutil.copy(src / "calibration.jsonl", dst / "calibration.jsonl")
    data = (src / "adapter_model.safetensors").read_bytes()
    step = len(data) // chunks + 1
    with open(dst / "adapter_model.safetensors", "wb") as handle:
        for start in range(0, len(data), step):
            handle.write(data[start:start + step])
            handle.flush()
            os.fsync(handle.fileno())
            size = min(start + step, len(data))
            wait_for(lambda: _weights_seen(source, dst, size), f"the source to see {size} bytes of weights")
            clock.now += 0.4 * SETTLE
            assert not _adapters(source.catalog), "registered while still being written"


def _count_looks(source: LocalFolderSource) -> list[int]:
    """Counts the worker's looks at what is due (one per loop of its thread)."""
    looks = [0]
    take_due = source._take_due

    def counted():
        looks[0] += 1
        return take_due()

    source._take_due = counted
    return looks


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
def test_slow_copy_is_registered_once_with_its_metadata(setup, polling, monkeypatch):
    """Waits on events, not on time: the source's settle clock moves only when the test
    moves it (0.4 x the settle time per chunk written, then the settle time per look once
    done)."""
    catalog, watched, base, (lora, _) = setup
    clock = SettleClock()
    monkeypatch.setattr("iteris_daemon.sources.local.time", clock)
    source = _source(catalog, watched, base, polling)
    looks = _count_looks(source)
    source.start()
    try:
        _slow_copy(lora, watched / "sentiment", source, clock)

        def quiet_then_registered():  # each look: the settle time passes (also after a late event, e.g. the close)
            clock.now += SETTLE
            return _adapters(catalog).get("sentiment")

        wait_for(quiet_then_registered, "registration")
        seen = looks[0]
        clock.now += 10 * SETTLE
        wait_for(lambda: looks[0] >= seen + 3, "three more looks by the source")  # nothing else may arrive for it
    finally:
        source.stop()
    adapters = _adapters(catalog)
    assert list(adapters) == ["sentiment"]
    adapter = adapters["sentiment"]
    assert adapter.status is AdapterStatus.registered
    (revision,) = adapter.revisions
    assert revision.content_sha256 == sha256_file(lora / "adapter_model.safetensors")
    assert (revision.rank, revision.alpha, revision.base_model) == (2, 4.0, str(base))
    assert revision.target_modules == ["dense", "query", "value"]
    assert revision.has_calibration and revision.files_path == str(watched / "sentiment")
    assert revision.size_bytes == (lora / "adapter_model.safetensors").stat().st_size


class _Payload:
    """Unpickling this would create a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _broken_copies(lora: Path, watched: Path, marker: Path) -> dict[str, str]:
    """Four broken adapters; returns name -> a word their rejection reason must contain."""
    def copy(name):
        shutil.copytree(lora, watched / f".{name}")  # staged hidden, then renamed into place
        return watched / f".{name}"

    weights = "adapter_model.safetensors"
    corrupted = copy("corrupted")
    data = bytearray((corrupted / weights).read_bytes())
    data[8:20] = b"\xff" * 12
    (corrupted / weights).write_bytes(bytes(data))
    truncated = copy("truncated")
    (truncated / weights).write_bytes((lora / weights).read_bytes()[:-100])
    pickled = copy("pickled")
    (pickled / weights).unlink()
    (pickled / "adapter_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    mismatched = copy("mismatched")
    tensors = load_file(mismatched / weights)
    key = next(k for k in tensors if k.endswith("query.lora_A.weight"))
    tensors[key] = torch_cat_column(tensors[key])
    save_file(tensors, mismatched / weights)
    for name in ("corrupted", "truncated", "pickled", "mismatched"):
        os.rename(watched / f".{name}", watched / name)
    return {"corrupted": "header", "truncated": "truncated", "pickled": "pickled", "mismatched": "base layer"}


def torch_cat_column(tensor):
    import torch

    return torch.cat([tensor, tensor[:, :1]], 1)


def test_broken_adapters_are_rejected_with_their_reason(setup, tmp_path):
    catalog, watched, base, (lora, _) = setup
    source = _source(catalog, watched, base)
    source.start()
    try:
        marker = tmp_path / "unpickled"
        expected = _broken_copies(lora, watched, marker)
        wait_for(lambda: len(_adapters(catalog)) == 4, "four rejections")
    finally:
        source.stop()
    adapters = _adapters(catalog)
    for name, word in expected.items():
        assert adapters[name].status is AdapterStatus.rejected
        (revision,) = adapters[name].revisions
        assert word in revision.reason, (name, revision.reason)
        assert revision.content_sha256 is None
    assert not marker.exists()


def test_changed_weights_make_a_new_revision_and_a_deleted_folder_is_removed(setup):
    catalog, watched, base, (first, second) = setup
    shutil.copytree(first, watched / "task")
    source = _source(catalog, watched, base)
    source.start()
    try:
        wait_for(lambda: "task" in _adapters(catalog), "registration")
        # New weights of the same shapes (rank 3 LoRA of the second adapter would not fit r=2):
        tensors = load_file(first / "adapter_model.safetensors")
        save_file({k: v * 2 for k, v in tensors.items()}, watched / "task" / ".new.safetensors")
        os.replace(watched / "task" / ".new.safetensors", watched / "task" / "adapter_model.safetensors")
        wait_for(lambda: len(_adapters(catalog)["task"].revisions) == 2, "a second revision")
        shutil.rmtree(watched / "task")
        wait_for(lambda: _adapters(catalog)["task"].status is AdapterStatus.removed, "removal")
    finally:
        source.stop()
    adapter = _adapters(catalog)["task"]
    assert [r.status for r in adapter.revisions] == [AdapterStatus.registered] * 2
    assert adapter.revisions[1].content_sha256 != adapter.revisions[0].content_sha256


def test_new_weights_seen_after_the_clock_stepped_back_are_current(setup):
    """The clock ran an hour ahead when a folder was registered, then NTP stepped it back:
    new weights written there were recorded as history (seen "before" the old ones) and
    runs merged the old weights for that hour."""
    catalog, watched, base, (first, _) = setup
    shutil.copytree(first, watched / "task")
    source = _source(catalog, watched, base)
    assert len(source.scan().registered) == 1
    with catalog.session() as session:
        for row in session.scalars(select(AdapterRevision)):
            row.last_seen_at += timedelta(hours=1)
    tensors = load_file(first / "adapter_model.safetensors")
    save_file({k: v * 2 for k, v in tensors.items()}, watched / "task" / "adapter_model.safetensors")
    time.sleep(SETTLE * 2)  # not "recently written" for the scan
    assert len(source.scan().registered) == 1
    adapter = _adapters(catalog)["task"]
    assert len(adapter.revisions) == 2 and adapter.current is adapter.revisions[1]
    assert adapter.current.content_sha256 == sha256_file(watched / "task" / "adapter_model.safetensors")


def test_an_adapter_whose_weights_are_deleted_is_removed_until_they_are_back(setup):
    """Its weights deleted, its config left: once the folder settles the adapter is
    ``removed`` (its groups merge without it), and weights put back register it again; a
    restart's scan finds the same. Before the fix the folder was taken for one whose
    weights were still to come: the adapter stayed registered, and every run of its
    groups was skipped waiting for it to be registered again, for ever (found by QA)."""
    catalog, watched, base, (lora, _) = setup
    weights, locator = watched / "task" / "adapter_model.safetensors", str(watched / "task")
    with _registered_and_watched(catalog, watched, base, lora, "task") as (source, reports):
        weights.unlink()
        wait_for(lambda: _adapters(catalog)["task"].status is AdapterStatus.removed, "removal")
        wait_for(lambda: reports[-1].removed == [locator], "the report, handed on after its commit")
        rescan = source.scan()
        assert rescan.waiting == [locator] and not rescan.changed  # still without weights: nothing new
        shutil.copy(lora / "adapter_model.safetensors", weights)
        wait_for(lambda: _adapters(catalog)["task"].status is AdapterStatus.registered, "registration again")
        wait_for(lambda: reports[-1].registered == [locator], "the report, handed on after its commit")
    assert len(_adapters(catalog)["task"].revisions) == 1  # the same content: the same revision

    weights.unlink()  # while the daemon is stopped
    assert LocalFolderSource(catalog, "team").scan().removed == [locator]
    assert _adapters(catalog)["task"].status is AdapterStatus.removed


def test_changes_while_stopped_are_found_at_start(setup):
    catalog, watched, base, (first, second) = setup
    shutil.copytree(first, watched / "old")
    source = _source(catalog, watched, base)
    report = source.scan()
    assert len(report.registered) == 1
    assert source.scan().unchanged == 1  # a second scan changes nothing
    # The daemon is down: one adapter arrives, one goes.
    shutil.copytree(second, watched / "nested" / "new")
    shutil.rmtree(watched / "old")
    (watched / "half").mkdir()
    (watched / "half" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))  # weights yet to come
    restarted = LocalFolderSource(catalog, "team")
    restarted.start()
    try:
        wait_for(lambda: "nested/new" in _adapters(catalog), "the new adapter")
        wait_for(lambda: _adapters(catalog)["old"].status is AdapterStatus.removed, "the removal")
    finally:
        restarted.stop()
    adapters = _adapters(catalog)
    assert adapters["nested/new"].status is AdapterStatus.registered
    assert adapters["nested/new"].current.rank == 3
    assert "half" not in adapters  # incomplete folders wait, they are not rejected


def test_a_stop_ends_a_scan_at_the_next_folder_and_removes_nothing(setup, monkeypatch):
    """SIGTERM did not stop a scan: the daemon went on registering every folder (each can
    take seconds) before it stopped. A stopped scan leaves the folders it did not reach as
    the catalog had them: not removed, and found by the next start's scan."""
    catalog, watched, base, (first, second) = setup
    for name in ("a", "b", "c"):
        shutil.copytree(first, watched / name)
    source = _source(catalog, watched, base)
    assert len(source.scan().registered) == 3
    shutil.rmtree(watched / "c")
    for name in ("d", "e"):
        shutil.copytree(second, watched / name)
    real = source._examine
    examined = []

    def examine_then_stop(folder, report):
        examined.append(folder.name)
        real(folder, report)
        source._stop.set()  # SIGTERM, during the first folder

    monkeypatch.setattr(source, "_examine", examine_then_stop)
    report = source.scan()
    assert examined == ["a"] and report.registered == [] and report.removed == []
    adapters = _adapters(catalog)
    assert set(adapters) == {"a", "b", "c"} and adapters["c"].status is AdapterStatus.registered
    monkeypatch.undo()
    source._stop.clear()  # the next start
    report = source.scan()
    assert sorted(Path(p).name for p in report.registered) == ["d", "e"] and report.removed == [str(watched / "c")]


def test_a_restart_hashes_only_what_changed_while_stopped(setup, tmp_path, monkeypatch, hashed):
    """The files' stat and fingerprints are kept in a file (the daemon's cache folder): a
    source started again (a daemon restart, a SIGHUP) reads no unchanged adapter. Before,
    every start hashed every adapter's weights. One changed while the source was stopped
    (same size, same mtime, new ctime) is hashed and registered; an unreadable cache file
    costs one rehash, then is written again."""
    import iteris_daemon.sources.local as local

    catalog, watched, base, (first, second) = setup
    shutil.copytree(first, watched / "one")
    shutil.copytree(second, watched / "two")
    monkeypatch.setattr(local, "RACY_NS", 0)  # the copies are not racy: trust their times at once
    _source(catalog, watched, base)
    cache = tmp_path / "cache" / "folder-stat" / "team.json"
    assert len(LocalFolderSource(catalog, "team", stat_cache=cache).scan().registered) == 2
    assert cache.is_file()
    hashed.clear()
    assert LocalFolderSource(catalog, "team", stat_cache=cache).scan().unchanged == 2 and hashed == []

    calibration = watched / "one" / "calibration.jsonl"
    old = calibration.stat()
    text = calibration.read_text()
    calibration.write_text(text.replace("a", "b", 1) if "a" in text else text.replace("e", "f", 1))
    os.utime(calibration, ns=(old.st_atime_ns, old.st_mtime_ns))  # same size, same mtime
    time.sleep(SETTLE * 2)  # not "recently written" for the scan
    report = LocalFolderSource(catalog, "team", stat_cache=cache).scan()
    assert report.registered == [local.as_text(watched / "one")] and report.unchanged == 1
    assert watched / "one" in hashed and watched / "two" not in hashed

    cache.write_text("{not json")
    hashed.clear()
    assert LocalFolderSource(catalog, "team", stat_cache=cache).scan().unchanged == 2
    assert sorted(hashed) == [watched / "one", watched / "two"]
    hashed.clear()
    assert LocalFolderSource(catalog, "team", stat_cache=cache).scan().unchanged == 2 and hashed == []


def test_the_stat_cache_is_not_trusted_past_what_it_saw(setup, tmp_path, monkeypatch, hashed):
    """What the stat cache file must not hide: weights reached through a symlink whose
    target was rewritten (the link's own stat is unchanged); a fingerprint taken under
    other size limits (a file past its limit is not read, so the fingerprint depends on
    them: a raised limit must re-examine an adapter it rejected); and a file whose entries
    are not well formed (a fingerprint of ``None``)."""
    import iteris_daemon.sources.local as local
    from iteris_daemon.validation import Limits

    catalog, watched, base, (first, second) = setup
    monkeypatch.setattr(local, "RACY_NS", 0)
    shared = watched / "shared"
    shared.mkdir()
    shutil.copy(first / "adapter_model.safetensors", shared / "weights.bin")  # not an adapter folder itself
    shutil.copytree(first, watched / "linked")
    (watched / "linked" / "adapter_model.safetensors").unlink()
    (watched / "linked" / "adapter_model.safetensors").symlink_to(shared / "weights.bin")
    _source(catalog, watched, base)
    cache = tmp_path / "cache" / "team.json"
    assert LocalFolderSource(catalog, "team", stat_cache=cache).scan().registered == [local.as_text(watched / "linked")]

    save_file({k: v * 2 for k, v in load_file(shared / "weights.bin").items()}, shared / ".new")
    os.replace(shared / ".new", shared / "weights.bin")  # the link is untouched
    time.sleep(SETTLE * 2)
    assert LocalFolderSource(catalog, "team", stat_cache=cache).scan().registered == [local.as_text(watched / "linked")]
    assert len(_adapters(catalog)["linked"].revisions) == 2

    size = (shared / "weights.bin").stat().st_size
    small = Limits(max_weights_bytes=size - 1)
    assert LocalFolderSource(catalog, "team", limits=small, stat_cache=cache).scan().rejected
    assert _adapters(catalog)["linked"].status is AdapterStatus.rejected
    assert LocalFolderSource(catalog, "team", stat_cache=cache).scan().registered  # limit back: examined again
    assert _adapters(catalog)["linked"].status is AdapterStatus.registered

    entries = json.loads(cache.read_text())
    (locator,) = entries["entries"]
    entries["entries"][locator][1] = None
    cache.write_text(json.dumps(entries))
    hashed.clear()
    assert LocalFolderSource(catalog, "team", stat_cache=cache).scan().unchanged == 1 and hashed


def test_a_rescan_hashes_only_what_changed(setup, monkeypatch, hashed):
    """A rescan of unchanged adapters reads no files (its files' stat is what was hashed);
    a change that keeps size and mtime still moves the ctime, and is hashed and registered.
    Files changed within ``RACY_NS`` of a look are hashed again at the next one (a write in
    the same clock tick could leave every time as it was)."""
    import iteris_daemon.sources.local as local

    catalog, watched, base, (first, second) = setup
    shutil.copytree(first, watched / "one")
    shutil.copytree(second, watched / "two")
    monkeypatch.setattr(local, "RACY_NS", 0)  # the copies are not racy: trust their times at once
    source = _source(catalog, watched, base)
    assert len(source.scan().registered) == 2
    hashed.clear()
    assert source.scan().unchanged == 2 and hashed == []

    calibration = watched / "one" / "calibration.jsonl"
    old = calibration.stat()
    text = calibration.read_text()
    calibration.write_text(text.replace("a", "b", 1) if "a" in text else text.replace("e", "f", 1))
    os.utime(calibration, ns=(old.st_atime_ns, old.st_mtime_ns))  # same size, same mtime
    time.sleep(SETTLE * 2)  # not "recently written" for the scan
    monkeypatch.setattr(local, "RACY_NS", 10**12)  # from now on every file counts as "just written"
    report = source.scan()
    assert report.registered == [local.as_text(watched / "one")] and report.unchanged == 1
    assert watched / "one" in hashed and watched / "two" not in hashed
    assert len(_adapters(catalog)["one"].revisions) == 2
    hashed.clear()
    assert source.scan().unchanged == 2 and watched / "one" in hashed  # hashed racily: hashed again
    assert watched / "two" not in hashed  # hashed in a calm moment: trusted


def test_an_unreadable_adapter_is_rejected_once_not_looked_at_forever(setup, monkeypatch, caplog):
    """Weights the daemon's user may not read (safetensors writes 0600 files; the tests run
    as root, so the denial is injected where the validator opens the file): a rejection
    with the reason, recorded once; readable again, the next scan registers it. Before the
    fix the PermissionError counted as "changed while being examined": looked at again
    every settle period, forever (found running the daemon as another user,
    tests/test_sandbox.py)."""
    import builtins

    from iteris_daemon import paths, validation

    catalog, watched, base, (lora, _) = setup
    shutil.copytree(lora, watched / "locked")
    weights = watched / "locked" / "adapter_model.safetensors"
    real_open = builtins.open

    def denying_open(path, *args, **kwargs):
        if Path(path) == weights:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    class DenyingOs:  # the validator's os module, as far as opening the weights goes
        def open(self, path, *args, **kwargs):
            if Path(path) == weights:
                raise PermissionError(13, "Permission denied", str(path))
            return os.open(path, *args, **kwargs)

        def __getattr__(self, name):
            return getattr(os, name)

    monkeypatch.setattr(validation, "open", denying_open, raising=False)
    monkeypatch.setattr(validation, "os", DenyingOs())
    monkeypatch.setattr(paths, "os", DenyingOs())  # where the weights are opened (open_checked)
    source = _source(catalog, watched, base)
    report = source.scan()
    assert report.rejected == [str(watched / "locked")] and not report.waiting
    adapter = _adapters(catalog)["locked"]
    assert adapter.status is AdapterStatus.rejected
    assert adapter.current.reason == (f"{weights}: cannot read: Permission denied; the daemon's user needs read "
                                      "access to the adapter's files")
    assert source.scan().unchanged == 1  # the same files: nothing new to say, nothing retried
    monkeypatch.undo()
    weights.chmod(0o644)  # its owner makes it readable (which moves its ctime): now hashed, a new revision
    assert source.scan().registered == [str(watched / "locked")]
    assert _adapters(catalog)["locked"].status is AdapterStatus.registered


def _deny_looking_into(monkeypatch, folder: Path) -> None:
    """Make ``folder`` what a ``chmod 000`` folder is to a user other than its owner (the
    tests run as root, whom no mode stops): listing it, and looking at anything in it
    (``Path.exists`` too), raise PermissionError; the folder itself can be looked at."""
    def guarded(name: str, real):
        def call(path=".", *args, **kwargs):
            if isinstance(path, (str, bytes, os.PathLike)):
                target = Path(os.fsdecode(path))
                if folder in target.parents or (name == "scandir" and target == folder):
                    raise PermissionError(13, "Permission denied", str(target))
            return real(path, *args, **kwargs)
        return call

    for name in ("scandir", "stat", "lstat"):
        monkeypatch.setattr(os, name, guarded(name, getattr(os, name)))


def _health(catalog) -> tuple[bool, str | None]:
    with catalog.session() as session:
        source = session.scalar(select(Source).where(Source.name == "team"))
        return source.healthy, source.last_error


def test_a_folder_that_may_not_be_looked_into_is_rejected_once_not_removed(setup, monkeypatch, caplog):
    """A registered adapter's folder the daemon's user may not enter (``chmod 000`` by
    its owner; the denial is injected, the event is real): rejected once with the reason,
    its groups told (withdrawn), and a rescan keeps it so, saying in the source's health
    why it cannot look; its rights back, it is registered again. Before the fix
    ``Path.exists`` raised in the event's look, logged with a traceback and tried again
    every settle period, for ever; the rescan skipped the folder, marked the adapter
    removed at INFO with the source healthy, and then raised before telling the groups
    (found by QA, running the daemon as nobody)."""
    catalog, watched, base, (lora, _) = setup
    locked = watched / "locked"
    with _registered_and_watched(catalog, watched, base, lora, "locked") as (source, reports):
        _deny_looking_into(monkeypatch, locked)
        locked.chmod(0o000)  # the event (as root, reading it is still allowed: the denial is the monkeypatch's)
        wait_for(lambda: _adapters(catalog)["locked"].status is AdapterStatus.rejected, "the rejection")
        assert _adapters(catalog)["locked"].current.reason == (
            f"{locked}: cannot read: Permission denied; the daemon's user needs read access to the adapter's folder")
        wait_for(lambda: reports[-1].withdrawn == [str(locked)], "the report, handed on after its commit")
        rescan = source.scan()  # the periodic one
        assert not rescan.changed and rescan.unchanged == 1
        assert _adapters(catalog)["locked"].status is AdapterStatus.rejected
        assert _health(catalog) == (False, f"cannot read folder {locked}: Permission denied")
        monkeypatch.undo()
        locked.chmod(0o755)
        wait_for(lambda: _adapters(catalog)["locked"].status is AdapterStatus.registered, "registration again")
        wait_for(lambda: reports[-1].registered == [str(locked)], "the report, handed on after its commit")
        source.scan()
        assert _health(catalog) == (True, None)
    assert [r.levelname for r in caplog.records if "locked" in r.getMessage() and r.levelname != "INFO"] == ["WARNING"]
    assert not any(r.exc_info for r in caplog.records)


def test_a_rescan_rejects_the_adapters_under_a_folder_it_may_not_list_and_tells_the_groups(setup, monkeypatch):
    """The periodic rescan, with a folder above a registered adapter the daemon's user may
    not list: the adapter is rejected, not removed, and the groups are told even though
    looking again at it fails. Before the fix it was marked removed, with the source
    healthy, and the scan then raised before it told the groups (found by QA)."""
    catalog, watched, base, (lora, _) = setup
    team = watched / "team"
    shutil.copytree(lora, team / "a")
    source = _source(catalog, watched, base)
    reports = []
    source.on_change = reports.append
    source.start()
    try:
        wait_for(lambda: getattr(_adapters(catalog).get("team/a"), "status", None) is AdapterStatus.registered,
                 "registration")
        _deny_looking_into(monkeypatch, team)
        report = source.scan()
        assert report.withdrawn == [str(team / "a")] and not report.removed
        assert reports[-1] is report
    finally:
        source.stop()
    assert _adapters(catalog)["team/a"].status is AdapterStatus.rejected
    assert _health(catalog) == (False, f"cannot read folder {team}: Permission denied")


def test_lost_and_found_at_the_top_of_a_mounted_root_is_not_looked_into(setup, tmp_path, monkeypatch):
    """A watched root that is a mounted volume (a real tmpfs) holds fsck's ``lost+found``,
    which only root may list (the denial is injected: the tests run as root). It is not
    looked into, so the source stays healthy and registers the volume's adapters. Before
    the fix every scan marked the source unhealthy, for ever. A ``lost+found`` deeper
    down is an ordinary folder: not listable, it still says so."""
    catalog, _, base, (lora, _) = setup
    with tmpfs(tmp_path / "volume", 64 << 20) as volume:
        for locked in (volume / "lost+found", volume / "team" / "lost+found"):
            locked.mkdir(parents=True)
            _deny_looking_into(monkeypatch, locked)
        shutil.copytree(lora, volume / "a")
        source = _source(catalog, volume, base)
        report = source.scan()
        assert report.registered == [str(volume / "a")]
        assert _health(catalog) == (False, f"cannot read folder {volume / 'team' / 'lost+found'}: Permission denied")
        (volume / "team" / "lost+found").rmdir()
        source.scan()
        assert _health(catalog) == (True, None)


def test_events_in_lost_and_found_at_the_top_of_a_mounted_root_are_not_looked_at(setup, tmp_path, monkeypatch,
                                                                                  caplog):
    """Events there (fsck's, a ``chown -R`` of the volume) made the source look into it: a
    WARNING, "cannot read folder", per event."""
    catalog, _, base, (lora, _) = setup
    with tmpfs(tmp_path / "volume", 64 << 20) as volume:
        (volume / "lost+found").mkdir()
        source = _source(catalog, volume, base)
        reports = []
        source.on_change = reports.append
        source.start()
        try:
            (volume / "lost+found" / "#1234").write_bytes(b"recovered")  # the event
            _deny_looking_into(monkeypatch, volume / "lost+found")
            shutil.copytree(lora, volume / "b")  # settles after it
            wait_for(lambda: "b" in _adapters(catalog), "the adapter copied in after it")
        finally:
            source.stop()
    assert not [r for r in caplog.records if "lost+found" in r.getMessage() and r.levelno >= logging.WARNING]


def test_a_folder_whose_examination_raises_is_looked_at_again_ever_later(setup, monkeypatch, caplog):
    """A look that raises (a bug, a fault that lasts) is tried again, each time twice as
    late, with one traceback in the log, not one per settle period for ever."""
    from iteris_daemon.sources import local

    catalog, watched, base, _ = setup
    clock = SettleClock()
    monkeypatch.setattr(local, "time", clock)
    source = _source(catalog, watched, base)
    looks, failed, settle = _count_looks(source), [], source._settle

    def broken(paths):
        if paths[0][0] != watched / "x":  # the root's own event
            return settle(paths)
        failed.append(clock.now)
        raise RuntimeError("a bug")

    monkeypatch.setattr(source, "_settle", broken)
    source.start()
    try:
        (watched / "x").mkdir()
        wait_for(lambda: watched / "x" in source._dirty, "the event")
        for done, wait in enumerate((1, 2, 4, 8)):  # settle periods from one look to the next
            clock.now += (wait - 0.5) * SETTLE
            seen = looks[0]
            wait_for(lambda: looks[0] >= seen + 2, "two looks at what is due")
            assert len(failed) == done  # not yet
            clock.now += 0.5 * SETTLE
            wait_for(lambda: len(failed) == done + 1, "the next look")
    finally:
        source.stop()
    errors = [r for r in caplog.records if "examining" in r.getMessage()]
    assert [bool(r.exc_info) for r in errors] == [True, False, False, False]


def test_a_base_model_that_cannot_be_read_keeps_the_source_unhealthy_until_a_scan_reads_it(tmp_path, setup):
    """Adapters waiting on a base model that cannot be read (a Hub id offline, the shapes
    worker out of memory; here a folder not there yet) made the source unhealthy, and the
    end of the same scan said "ok" again: `sources list` and `status` showed a healthy
    source that registered nothing (found by QA). It stays unhealthy, with the reason,
    until a scan reads the base model."""
    catalog, watched, built_base, (lora, _) = setup
    shutil.copytree(lora, watched / "a")
    base = tmp_path / "base-later"
    source = _source(catalog, watched, base)
    for _ in range(2):  # the next scan, too
        report = source.scan()
        assert report.waiting == [str(watched / "a")] and not report.registered
        healthy, error = _health(catalog)
        assert (healthy, error) == (False, f"base model folder {base} does not exist")
    shutil.copytree(built_base, base)
    assert source.scan().registered == [str(watched / "a")]
    assert _health(catalog) == (True, None)


def test_a_catalog_that_refuses_a_registration_makes_the_source_unhealthy(setup, monkeypatch):
    """The catalog refusing to record an adapter (a full disk under SQLite; the error is
    injected into the write, the event is real): the source is unhealthy, naming the
    catalog and the cause, in ``status`` too, whether an event's look or a rescan met
    it; the next scan that goes through registers the adapter and makes it healthy.
    Before the fix only the log said so, every attempt, while ``status`` showed the
    source ok (found by QA)."""
    from sqlalchemy.exc import OperationalError
    from iteris_daemon.sources import local
    from iteris_daemon.status import collect, render

    catalog, watched, base, (lora, _) = setup
    full = OperationalError("INSERT INTO adapter_revisions", {}, OSError("database or disk is full"))

    def refused(*args, **kwargs):
        raise full

    monkeypatch.setattr(local, "record", refused)
    source = _source(catalog, watched, base)
    unhealthy = (False, f"cannot register adapters in the catalog {catalog.safe_url}: (builtins.OSError) database "
                        "or disk is full")
    source.start()
    try:
        shutil.copytree(lora, watched / "a")  # the event
        wait_for(lambda: _health(catalog) == unhealthy, "the source unhealthy")
        assert "UNHEALTHY (cannot register adapters in the catalog" in render(collect(catalog))
    finally:
        source.stop()
    rescanning = LocalFolderSource(catalog, "team")  # not stopped
    rescanning._set_health(None)
    with pytest.raises(OperationalError):
        rescanning.scan()
    assert _health(catalog) == unhealthy
    monkeypatch.undo()
    assert rescanning.scan().registered == [str(watched / "a")]
    assert _health(catalog) == (True, None)


def test_a_copy_that_keeps_old_mtimes_is_not_examined_half_done(setup):
    """``shutil.copytree`` (like ``cp -p`` or ``rsync -t``) gives each copied file its
    source's old mtime. A rescan in the middle of such a copy (config and weights there,
    calibration still to come) must wait for the folder to settle, not register the half:
    the ctime says the files were written just now. Before the fix the mtimes alone made
    the folder look settled, and it got a revision without its calibration, then another
    (found as a flaky second revision in tests/test_local_faults.py). A settle time of
    5 s: the rescan must come within it of the last write, which 0.5 s did not leave on
    a loaded machine (the watcher settled the half copy first, 2026-12-05)."""
    catalog, watched, base, (lora, _) = setup
    source = _source(catalog, watched, base, settle=5.0)
    source.start()
    try:
        wait_for(lambda: source._watching(), "the source to watch")
        folder = watched / "copied"
        folder.mkdir()
        an_hour_ago = time.time() - 3600
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy(lora / name, folder / name)
            os.utime(folder / name, (an_hour_ago, an_hour_ago))  # the source's old mtime, as the copy keeps it
        report = source.scan()  # the periodic rescan, in the middle of the copy
        assert report.waiting == [str(folder)] and not report.registered, report
        shutil.copy2(lora / "calibration.jsonl", folder / "calibration.jsonl")
        wait_for(lambda: getattr(_adapters(catalog).get("copied"), "status", None) is AdapterStatus.registered,
                 "registration of the whole copy")
    finally:
        source.stop()
    (revision,) = _adapters(catalog)["copied"].revisions
    assert revision.has_calibration


def test_a_source_is_busy_while_it_examines(setup, monkeypatch):
    """``busy`` (the daemon's catalog check waits while a source of its own scans) holds
    during a scan's examinations and not after."""
    catalog, watched, base, (first, second) = setup
    shutil.copytree(first, watched / "a")
    source = _source(catalog, watched, base)
    seen = []
    real = source._examine
    monkeypatch.setattr(source, "_examine", lambda folder, report: (seen.append(source.busy), real(folder, report)))
    assert not source.busy
    assert len(source.scan().registered) == 1
    assert seen == [True] and not source.busy


def test_a_started_source_is_busy_until_its_first_scan_is_done(setup, monkeypatch):
    """A start's (and a reload's) scan runs in the source's thread: before it took its lock the
    source was not busy, and the daemon's run at the start merged what the scan had not yet
    registered again (a reload fixing a watched path published part of the adapters, QA OPS2)."""
    import threading

    catalog, watched, base, _ = setup
    source = _source(catalog, watched, base)
    go = threading.Event()
    real = source.scan
    monkeypatch.setattr(source, "scan", lambda: (go.wait(30), real())[1])
    assert not source.busy  # never started: nothing under way
    source.start()
    try:
        assert source.busy
        go.set()
        wait_for(lambda: not source.busy, what="the first scan to end")
    finally:
        source.stop()


def test_a_daemons_run_waits_for_a_folder_sources_first_scan_for_a_while(monkeypatch, caplog):
    """The run asks again a second later (the stand-in has nothing a run would use), not while a
    source merely examines an event (every group waited on any source's lock, review RV13), and
    not past FIRST_SCAN_WAIT_SECONDS: a scan stuck on a stale mount held every run for ever."""
    from types import SimpleNamespace

    import iteris_daemon.daemon as daemon_module
    from iteris_daemon.daemon import BUSY_GROUP_RETRY_SECONDS, FIRST_SCAN_WAIT_SECONDS, Daemon

    asked, now = [], [100.0]
    monkeypatch.setattr(daemon_module.time, "monotonic", lambda: now[0])
    scanning = SimpleNamespace(name="team", starting=True, busy=True)
    stand_in = SimpleNamespace(_local={"team": scanning}, _waiting_for_scans={},
                               scheduler=SimpleNamespace(get_job=lambda job_id: None),
                               trigger=lambda name, delay: asked.append((name, delay)))
    stand_in._wait_for_first_scans = lambda name: Daemon._wait_for_first_scans(stand_in, name)
    Daemon._run(stand_in, "g")
    assert asked == [("g", BUSY_GROUP_RETRY_SECONDS)]
    assert Daemon._wait_for_first_scans(stand_in, "h") is True and asked[-1] == ("h", BUSY_GROUP_RETRY_SECONDS)
    now[0] += FIRST_SCAN_WAIT_SECONDS + 1
    with caplog.at_level("WARNING", logger="iteris_daemon.daemon"):
        assert Daemon._wait_for_first_scans(stand_in, "g") is False  # stuck: the run goes ahead, said
    assert any("group g: source team is still at its first scan" in m for m in caplog.messages)
    scanning.starting = False  # an event examined (busy) after the first scan: no wait
    assert Daemon._wait_for_first_scans(stand_in, "g") is False


def test_a_trainers_checkpoints_are_not_adapters_of_their_own(setup, caplog):
    """A trainer saves its progress in ``output_dir/checkpoint-STEP/``, beside (or before)
    the adapter it saves at the end: each checkpoint was registered as an adapter of its
    own and merged as one more task (found by QA). Neither a scan nor events look into
    one, and the log says so once per checkpoint; a folder merely named like a checkpoint
    but not ``checkpoint-STEP`` is an adapter like any other."""
    catalog, watched, base, (first, second) = setup
    shutil.copytree(first, watched / "run1")
    shutil.copytree(second, watched / "run1" / "checkpoint-500")
    shutil.copytree(second, watched / "checkpoint-best")
    source = _source(catalog, watched, base)
    caplog.set_level(logging.INFO, logger="iteris_daemon.sources.local")
    assert sorted(source.scan().registered) == [str(watched / "checkpoint-best"), str(watched / "run1")]
    source.scan()
    source.start()
    try:
        shutil.copytree(second, watched / "run1" / "checkpoint-1000")  # the events
        shutil.copytree(first, watched / "later")  # settles after them
        wait_for(lambda: "later" in _adapters(catalog), "the adapter copied in after the checkpoint")
    finally:
        source.stop()
    assert sorted(_adapters(catalog)) == ["checkpoint-best", "later", "run1"]
    told = [r.getMessage() for r in caplog.records if "trainer's checkpoint" in r.getMessage()]
    assert sorted(m.split()[2] for m in told) == [str(watched / "run1" / f"checkpoint-{step}") for step in (1000, 500)]


def test_trainers_checkpoints_registered_by_an_earlier_release_are_removed_at_the_next_scan(setup, monkeypatch):
    """A catalog from a release that looked into checkpoints holds one as an adapter: the
    next scan marks it ``removed``, so no group merges it again."""
    import re
    from iteris_daemon.sources import local

    catalog, watched, base, (first, second) = setup
    shutil.copytree(second, watched / "run1" / "checkpoint-500")
    source = _source(catalog, watched, base)
    with monkeypatch.context() as before_the_fix:
        before_the_fix.setattr(local, "TRAINER_CHECKPOINT", re.compile(r"(?!)"))
        assert source.scan().registered == [str(watched / "run1" / "checkpoint-500")]
    source.scan()
    assert _adapters(catalog)["run1/checkpoint-500"].status is AdapterStatus.removed


def test_a_folder_whose_row_the_catalog_refuses_is_rejected_and_the_others_register(setup, monkeypatch, caplog):
    """The catalog refusing one folder's row (PostgreSQL's value too long for its column,
    injected into the write as psycopg raises it): that folder is rejected in the scan's
    report, with a WARNING naming it and the cause, and the others register. Before, it
    ended the whole scan: nothing after it registered (found by QA with a long path). The
    catalog failing (its server down) still ends the scan: see the test above."""
    from psycopg.errors import StringDataRightTruncation
    from sqlalchemy.exc import DataError
    from iteris_daemon.sources import local

    catalog, watched, base, (first, second) = setup
    shutil.copytree(first, watched / "a")
    shutil.copytree(second, watched / "b")
    too_long = DataError("INSERT INTO adapters", {}, StringDataRightTruncation("value too long for type character "
                                                                                "varying(255)"))
    record = local.record
    refused = [True]

    def refusing_a(session, source_id, seen, **kwargs):
        if seen.locator == str(watched / "a") and refused[0]:
            raise too_long
        return record(session, source_id, seen, **kwargs)

    monkeypatch.setattr(local, "record", refusing_a)
    source = _source(catalog, watched, base)
    report = source.scan()
    assert (report.registered, report.rejected) == ([str(watched / "b")], [str(watched / "a")])
    assert set(_adapters(catalog)) == {"b"}
    assert _health(catalog) == (True, None)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(watched / "a") in m and "value too long" in m for m in warnings), warnings
    refused[0] = False  # the next scan looks at the folder again
    assert source.scan().registered == [str(watched / "a")]
    assert set(_adapters(catalog)) == {"a", "b"}


def test_a_registration_on_an_event_moves_the_sources_last_poll(setup):
    """``status`` and ``iteris_source_last_poll_timestamp_seconds`` moved only at a full scan
    (every ``rescan_seconds``): an adapter registered on its event minutes later left "last
    poll" at the scan before it."""
    catalog, watched, base, (first, _second) = setup
    with _registered_and_watched(catalog, watched, base, first, "early"):
        scanned = _last_poll(catalog)
        shutil.copytree(first, watched / "later")
        wait_for(lambda: "later" in _adapters(catalog), "the registration on its event")
        wait_for(lambda: _last_poll(catalog) > scanned, "the last poll to move", timeout=10)
    assert _health(catalog) == (True, None)


def _last_poll(catalog):
    with catalog.session() as session:
        return session.scalar(select(Source.last_poll_at))


def test_a_look_after_sources_remove_deleted_the_source_warns_without_a_traceback(setup, caplog):
    """`sources remove` deleted the source's row while its watcher ran (the daemon stops the
    watcher at its next catalog check): a look in between logged an ERROR with a traceback,
    as for a fault in the code. It is one WARNING saying why, and nothing is recorded."""
    from iteris_daemon.catalog.registry import remove_source

    catalog, watched, base, (lora, _) = setup
    source = _source(catalog, watched, base)
    source.start()
    try:
        with catalog.session() as session:
            remove_source(session, "team")  # no past merges: the row is deleted
        caplog.clear()
        shutil.copytree(lora, watched / "a")
        wait_for(lambda: any("not examined" in r.getMessage() for r in caplog.records), "the look")
    finally:
        source.stop()
    looks = [r for r in caplog.records if str(watched / "a") in r.getMessage()]
    assert looks and all(r.levelno == logging.WARNING and not r.exc_info for r in looks)
    assert looks[0].getMessage() == (f"source team: {watched / 'a'} not examined: source id 1 was removed from the "
                                     "catalog (`iteris-daemon sources remove`): nothing is recorded under it")
    assert not _adapters(catalog)
