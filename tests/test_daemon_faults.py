"""Faults of the real daemon process: SIGKILL mid-merge and mid-publish, two daemons
sharing one catalog, and SIGHUP with a broken config.

- **SIGKILL**, repeated 7 times (``ITERIS_FAULT_KILLS``), each at a known place: the
  daemon (a real ``python -m iteris_daemon run``, started through
  ``tests/faultpoints.py``) holds still at a pause point and is killed there: at a
  seeded random step of a merge, after a run succeeded, and at each of the four steps
  of a folder publish (a partial copy in ``versions/.staging-*``; the copy renamed
  into ``versions/``; the new ``current`` link made under a temporary name; ``current``
  swapped, the run not yet recorded). After every kill the test checks that the
  daemon was where it was meant to be (the run's row, the destination's files), that
  ``current`` is a complete version loadable by PEFT and that the SQLite catalog
  passes ``PRAGMA integrity_check``. The group's parameters or adapters change before
  every restart, so each start has a new merge to do. A last start, not killed,
  finishes: interrupted runs are marked failed and ``current`` is the merge of the
  final inputs.
- **Two daemons** on one catalog (SQLite, and PostgreSQL where
  ``ITERIS_TEST_POSTGRES_URL`` is set), same folder, same destination, each with its
  own state directory. Held at pause points, the first to merge is kept publishing
  until the other has been refused the claim, and then kept from starting another run
  while the other merges new inputs; then both run freely through one more change.
  Both daemons merged, at least one claim was refused, no two runs overlap in time.
- **Claims**, lower level: of two concurrent ``Claim.acquire`` calls exactly one wins;
  a stale claim is taken over after ``claim_ttl``; a claim held by a dead process of
  this host is taken at once, one held by a live one is not.
- **SIGHUP with a broken config** (invalid TOML, then a valid file naming an unknown
  strategy): the reload fails with an error in the log naming the problem, the daemon
  says READY again, and its next merge uses the running configuration (its
  parameters, its destination); a valid config then takes effect.

The daemon's signals come from its log lines on stderr and the datagrams it sends to
``NOTIFY_SOCKET`` (``STATUS=run N publishing``, ``READY=1``), which the test receives
on a socket of its own. Deadlines only bound waits; nothing asserts on speed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from sqlalchemy import select, update

import polling
from builders import build_adapter, build_tiny_model
from iteris_daemon.catalog import Catalog
from iteris_daemon.catalog.models import (Adapter, AdapterStatus, MergeGroup, MergeRun, MergeRunInput, RunStatus,
                                           Source, SourceKind, utcnow)
from iteris_daemon.adapter_config import sha256_file
from iteris_daemon.cli import main
from iteris_daemon.runner import CLAIMED_ELSEWHERE, Claim, RunOutcome, worker_id

pytestmark = pytest.mark.timeout(600)

# Where each SIGKILL lands: a pause point of tests/faultpoints.py (see its docstring).
# More kills for a longer fault run: ITERIS_FAULT_KILLS=40 (see RELIABILITY.md); another seed: ITERIS_FAULT_SEED.
CYCLE = ("merge:step", "run:succeeded", "publish:copied-one", "publish:renamed", "merge:step", "publish:link",
         "publish:swapped")
KILLS = int(os.environ.get("ITERIS_FAULT_KILLS", str(len(CYCLE))))
PHASES = tuple(CYCLE[i % len(CYCLE)] for i in range(KILLS))
# The daemon asks whether to stop every 0.2 s while a merge's worker runs (its start takes
# seconds): a merge of these parameters is asked at least this often (19 seen on idle cores).
MERGE_STEPS = 10
TESTS = Path(__file__).resolve().parent
SEED = int(os.environ.get("ITERIS_FAULT_SEED", "20250101"))
GROUP = "unified"
START_TIMEOUT = 180.0  # a bound for waits, generous for a loaded 2-core machine


# ----------------------------------------------------------------------------- helpers


# This file's default deadline for polling.wait_for.
wait_for = partial(polling.wait_for, timeout=120.0)


class DaemonProcess:
    """``python -m iteris_daemon run`` with its stderr lines and sd_notify STATUS messages collected."""

    def __init__(self, config: Path, log_path: Path, name: str = "daemon", pause: dict | None = None):
        self.name = name
        self.gates = log_path.parent / f"gates-{uuid.uuid4().hex[:8]}"
        self.gates.mkdir()
        self.events: list[tuple[str, str]] = []  # ("log", line) or ("status", text), in arrival order
        self._changed = threading.Condition()
        self._socket_name = f"iteris-faults-{uuid.uuid4().hex}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind("\0" + self._socket_name)
        self._sock.settimeout(0.2)
        self._log = open(log_path, "a", encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM")}
        env.update(NOTIFY_SOCKET="@" + self._socket_name, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONUNBUFFERED="1",
                   # One thread per merge: two busy cores, and several daemons at once in one test.
                   OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   ITERIS_TEST_FAULTPOINTS=json.dumps({"gates": str(self.gates), "pause": pause or {}}))
        self.proc = subprocess.Popen(
            [sys.executable, str(TESTS / "faultpoints.py"), "--log-format", "text", "run", "--config", str(config)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
            cwd=config.parent, text=True, errors="replace",
        )
        self._closed = threading.Event()
        self._threads = [threading.Thread(target=self._read_log, daemon=True),
                         threading.Thread(target=self._read_status, daemon=True)]
        for thread in self._threads:
            thread.start()

    def _add(self, kind: str, text: str) -> None:
        with self._changed:
            self.events.append((kind, text))
            self._changed.notify_all()

    def _read_log(self) -> None:
        for line in self.proc.stderr:
            self._log.write(line)
            self._log.flush()
            self._add("log", line.rstrip("\n"))
        with self._changed:
            self._changed.notify_all()

    def _read_status(self) -> None:
        while not self._closed.is_set():
            try:
                data = self._sock.recv(65536).decode(errors="replace")
            except TimeoutError:
                continue
            except OSError:
                return
            for line in data.splitlines():
                if line.startswith("STATUS="):
                    self._add("status", line[len("STATUS="):])
                else:
                    self._add("notify", line)

    def wait_event(self, kind: str, pattern: str, timeout: float = START_TIMEOUT, after: int = 0) -> re.Match:
        """The first event of ``kind`` ("log", "status" or "notify") matching ``pattern``,
        among the events from index ``after`` on."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        start = after
        with self._changed:
            while True:
                for found_kind, text in self.events[start:]:
                    if found_kind == kind and (match := regex.search(text)):
                        return match
                start = len(self.events)
                if self.proc.poll() is not None and not self._threads[0].is_alive():
                    raise AssertionError(f"{self.name} exited ({self.proc.returncode}) before {kind} {pattern!r}:\n"
                                         + self.tail())
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{self.name}: timed out waiting for {kind} {pattern!r}:\n" + self.tail())
                self._changed.wait(min(left, 0.5))

    def position(self, kind: str, pattern: str, timeout: float = START_TIMEOUT) -> int:
        """Once it came, the index just past the first event of ``kind`` matching ``pattern``:
        for ``wait_event(after=...)``, what came after that event."""
        self.wait_event(kind, pattern, timeout)
        regex = re.compile(pattern)
        with self._changed:
            return next(i + 1 for i, (k, text) in enumerate(self.events) if k == kind and regex.search(text))

    def mark(self) -> int:
        """An index for ``wait_event(after=...)``: only events from now on."""
        with self._changed:
            return len(self.events)

    def paused(self, point: str, number: int = 1, timeout: float = START_TIMEOUT) -> None:
        """Wait until the daemon holds still at occurrence ``number`` of ``point``."""
        self.wait_event("log", rf"^FAULTPOINT {re.escape(point)} {number} reached$", timeout)

    def release(self, point: str, number: int = 1) -> None:
        (self.gates / f"{point}-{number}").touch()

    def seen(self, kind: str, pattern: str) -> bool:
        regex = re.compile(pattern)
        with self._changed:
            return any(k == kind and regex.search(text) for k, text in self.events)

    def logs(self, pattern: str) -> list[re.Match]:
        regex = re.compile(pattern)
        with self._changed:
            return [m for kind, text in self.events if kind == "log" and (m := regex.search(text))]

    def tail(self) -> str:
        with self._changed:
            return "\n".join(text for kind, text in self.events if kind == "log")[-6000:]

    def kill(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        return self.wait(60)

    def stop(self, timeout: float = 120.0) -> int:
        """SIGTERM, and the exit status (the daemon exits 0 after a clean stop)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self.close()
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._threads[0].join(10)  # every line of the dead process read
        self._closed.set()
        self._sock.close()
        self._log.close()


@pytest.fixture
def daemons():
    """Starts daemons; whatever is still running at teardown is killed."""
    started: list[DaemonProcess] = []

    def start(config: Path, log_path: Path, name: str = "daemon", pause: dict | None = None) -> DaemonProcess:
        daemon = DaemonProcess(config, log_path, name, pause)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        try:
            daemon.close()
        except Exception:  # teardown must reach every process
            pass


def write_config(path: Path, *, state: Path, watched: Path, dest: Path, base: Path, params: dict,
                 database: str | None = None, interval: float | None = None, debounce: float = 0,
                 claim_ttl: float = 120.0, grace: float = 5.0, keep: int = 1, extra: tuple[str, ...] = ()) -> Path:
    q = json.dumps  # a JSON string is a TOML basic string
    params_toml = ", ".join(f"{key} = {json.dumps(value)}" for key, value in params.items())
    lines = [
        "[daemon]",
        *([f"database = {q(database)}"] if database else []),
        f"state_dir = {q(str(state))}",
        f"cache_dir = {q(str(state / 'cache'))}",
        f"grace_seconds = {grace}",
        f"claim_ttl_seconds = {claim_ttl}",
        *extra,
        "",
        "[[sources]]",
        'name = "team"',
        'kind = "local"',
        f"paths = [{q(str(watched))}]",
        f"base_model = {q(str(base))}",
        "settle_seconds = 0.3",
        "",
        "[[groups]]",
        f"name = {q(GROUP)}",
        f"base_model = {q(str(base))}",
        f"params = {{ {params_toml} }}",
        f"debounce_seconds = {debounce}",
        *([f"interval_seconds = {interval}"] if interval else []),
        "",
        "[groups.gates]",  # faults are the subject here; test_gates.py covers the gates
        "max_regression = false",
        "max_fidelity_gap = false",
        "",
        "[[groups.destinations]]",
        'kind = "folder"',
        f"path = {q(str(dest))}",
        f"keep = {keep}",
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def rewrite_weights(folder: Path, original: Path, factor: float) -> None:
    """New weights of the same shapes, swapped in atomically (a new revision of the same adapter)."""
    tensors = load_file(original / "adapter_model.safetensors")
    save_file({k: v * factor for k, v in tensors.items()}, folder / ".new.safetensors")
    os.replace(folder / ".new.safetensors", folder / "adapter_model.safetensors")


VERSION_LINK = re.compile(r"^versions/run-\d+-\d{8}T\d{6}\.\d{6}Z$")


class PublishedChecker:
    """What a consumer of ``<dest>/current`` sees must always be a complete adapter."""

    def __init__(self, dest: Path, base: Path):
        self.dest, self.base = dest, base
        self.loaded: set[str] = set()  # versions already loaded with peft (a version never changes)
        self.ever_published = False

    def check(self) -> str | None:
        link = self.dest / "current"
        if not link.is_symlink():
            assert not link.exists(), f"{link} is not a symlink"
            assert not self.ever_published, "current vanished after a version had been published"
            return None
        self.ever_published = True
        target = os.readlink(link)
        assert VERSION_LINK.match(target), f"current -> {target}: not a published version folder"
        folder = self.dest / target
        assert folder.is_dir(), f"current -> {target}, which does not exist"
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA"
        tensors = load_file(folder / "adapter_model.safetensors")
        assert tensors and all(torch.isfinite(t).all() for t in tensors.values())
        report = json.loads((folder / "merge_report.json").read_text())
        assert report["strategy"] == "iteris"
        name = folder.name
        if name not in self.loaded:
            self._load_with_peft(folder, tensors)
            self.loaded.add(name)
        return name

    def _load_with_peft(self, folder: Path, tensors: dict) -> None:
        from peft import PeftModel, get_peft_model_state_dict
        from transformers import AutoModel

        model = PeftModel.from_pretrained(AutoModel.from_pretrained(self.base), str(folder))
        state = get_peft_model_state_dict(model)
        assert set(state) == set(tensors), f"{folder}: peft did not load every tensor"
        for key, value in tensors.items():
            assert torch.equal(state[key].cpu(), value), key


def sqlite_integrity(db: Path) -> None:
    connection = sqlite3.connect(db)
    try:
        assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert connection.execute("PRAGMA foreign_key_check").fetchall() == []
    finally:
        connection.close()


def group_runs(url: str) -> list[MergeRun]:
    catalog = Catalog(url, migrate=False)
    try:
        with catalog.session() as session:
            return list(session.scalars(select(MergeRun).join(MergeGroup).where(MergeGroup.name == GROUP)
                                        .order_by(MergeRun.id)))
    finally:
        catalog.close()


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny BERT and three adapters (ranks 2, 3, 4) with calibration.jsonl."""
    root = tmp_path_factory.mktemp("faults")
    base = build_tiny_model("bert", root / "base")
    adapters = [build_adapter(base, root / f"lora{i}", seed=i, family="bert", r=2 + i, alpha=4 + i) for i in range(3)]
    return base, adapters


# ----------------------------------------------------------------------------- SIGKILL


@pytest.mark.long
def test_sigkill_during_merge_and_publish_never_breaks_current_or_the_catalog(tmp_path, made, daemons):
    """SIGKILL repeated KILLS times (PHASES), each while the daemon holds still at a pause
    point; what the daemon had done by then is checked for every round. Then one clean
    start must finish the work."""
    base, (lora0, lora1, lora2) = made
    rng = random.Random(SEED)
    watched, dest, state = tmp_path / "watched", tmp_path / "published", tmp_path / "state"
    watched.mkdir()
    shutil.copytree(lora0, watched / "a0")
    shutil.copytree(lora1, watched / "a1")
    config = tmp_path / "daemon.toml"
    # 30 full iterations (tolerance 0): a merge long enough to be hit, short enough to repeat.
    params = {"iterations": 30, "samples_per_task": 8, "tolerance": 0.0}
    checker = PublishedChecker(dest, base)
    db = state / "catalog.db"
    url = f"sqlite:///{db}"
    killed_runs: set[int] = set()
    cut_short: set[int] = set()  # killed before they were recorded succeeded
    landed: list[str] = []

    for round_, phase in enumerate(PHASES):
        # A new merge for every start: other group parameters, and now and then new weights.
        params["a1"] = round(1e-3 * (1 + round_ / 10), 6)
        if round_ % 3 == 1:
            rewrite_weights(watched / "a0", lora0, 1.0 + 0.1 * round_)
        write_config(config, state=state, watched=watched, dest=dest, base=base, params=params)
        before = checker.check()
        step = 1 if round_ == 0 else rng.randint(1, MERGE_STEPS)
        daemon = daemons(config, tmp_path / "daemon.log", f"daemon round {round_}",
                         pause={phase: [step if phase == "merge:step" else 1]})
        daemon.paused(phase, step if phase == "merge:step" else 1)
        assert daemon.kill() == -signal.SIGKILL
        (run_id,) = {int(m[1]) for m in daemon.logs(r"run (\d+) merges")}  # one run per start
        killed_runs.add(run_id)
        if phase != "run:succeeded":
            cut_short.add(run_id)

        # Where the daemon was, by its catalog row and the destination's files.
        status = {r.id: r.status for r in group_runs(url)}[run_id]
        after = checker.check()
        versions = dest / "versions"
        staging = [p for p in versions.glob(".staging-*")] if versions.is_dir() else []
        mine = [p.name for p in versions.glob(f"run-{run_id}-*")] if versions.is_dir() else []
        publishing = daemon.seen("status", rf"run {run_id} publishing")
        if phase == "run:succeeded":
            assert status is RunStatus.succeeded and after == mine[0], (status, after, mine)
        else:
            assert status is RunStatus.running, (phase, status)
        if phase == "merge:step":
            assert not publishing and after == before and not mine
        elif phase == "publish:copied-one":
            assert publishing and after == before and not mine
            assert [len(os.listdir(p)) for p in staging] == [1], [sorted(os.listdir(p)) for p in staging]
        elif phase == "publish:renamed":
            assert publishing and after == before and len(mine) == 1
        elif phase == "publish:link":
            links = [os.readlink(p) for p in dest.glob(".current-*")]
            assert after == before and len(mine) == 1 and links == [f"versions/{mine[0]}"], links
        elif phase == "publish:swapped":
            assert after != before and [after] == mine
        sqlite_integrity(db)
        landed.append(f"{phase}{f' {step}' if phase == 'merge:step' else ''}: run {run_id} {status.value}, "
                      f"{'new current' if after != before else 'same current'}")

    # The final inputs: another adapter, new weights for a0, other parameters.
    shutil.copytree(lora2, watched / "a2")
    rewrite_weights(watched / "a0", lora0, 0.5)
    params["a1"] = 0.005
    write_config(config, state=state, watched=watched, dest=dest, base=base, params=params)
    final_sha = {name: sha256_file(watched / name / "adapter_model.safetensors") for name in ("a0", "a1", "a2")}
    daemon = daemons(config, tmp_path / "daemon.log", "daemon (final)")

    def finished() -> bool:
        report = dest / "current" / "merge_report.json"
        if not report.is_file():
            return False
        data = json.loads(report.read_text())
        if {i["name"]: i["sha256"] for i in data["inputs"]} != final_sha or data["params"]["a1"] != 0.005:
            return False
        runs = [r for r in group_runs(url) if r.status is not RunStatus.skipped]
        return runs[-1].status is RunStatus.succeeded

    wait_for(finished, "the final merge to be published", timeout=START_TIMEOUT, interval=0.5)
    assert daemon.stop() == 0, daemon.tail()
    steps = [int(m[1]) for m in daemon.logs(r"^FAULTPOINT run \d+ succeeded after (\d+) merge steps$")]
    assert steps and min(steps) >= MERGE_STEPS, steps  # every step a merge round may pick was reachable

    assert checker.check() is not None
    sqlite_integrity(db)
    runs = group_runs(url)
    by_id = {run.id: run for run in runs}
    real = [r for r in runs if r.status is not RunStatus.skipped]
    assert real[-1].status is RunStatus.succeeded
    assert not [r.id for r in runs if r.status is RunStatus.running], "a run was left running"
    interrupted = [r for r in runs if r.status is RunStatus.failed]
    assert interrupted, "no kill interrupted a run"  # the first kill lands mid-merge
    assert {run.id for run in interrupted} == cut_short
    for run in interrupted:
        assert "interrupted" in run.error, (run.id, run.error)
    for run_id in killed_runs:
        assert by_id[run_id].status in (RunStatus.succeeded, RunStatus.failed), (run_id, by_id[run_id].status)
        assert by_id[run_id].finished_at is not None

    # The last run used the final revisions, and published exactly them.
    catalog = Catalog(url, migrate=False)
    try:
        with catalog.session() as session:
            inputs = session.scalars(select(MergeRunInput).where(MergeRunInput.run_id == real[-1].id)).all()
            used = {i.revision.adapter.name: i.revision.content_sha256 for i in inputs}
    finally:
        catalog.close()
    assert used == final_sha
    report = json.loads((dest / "current" / "merge_report.json").read_text())
    assert sorted(i["name"] for i in report["inputs"]) == ["a0", "a1", "a2"]
    assert os.readlink(dest / "current").startswith(f"versions/run-{real[-1].id}-")  # new inputs, a new version

    # The final publish cleaned up after the killed ones and kept current + `keep` (1) older versions.
    versions = dest / "versions"
    assert not list(versions.glob(".staging-*")), sorted(p.name for p in versions.iterdir())
    assert not list(dest.glob(".current-*"))
    assert len([p for p in versions.iterdir() if VERSION_LINK.match(f"versions/{p.name}")]) <= 2
    # Merges the kills interrupted left their work folders; the restarts removed them.
    left = sorted(p.name for p in (state / "runs").iterdir())
    # only the last published merge, the quality gate's baseline, and no merge kept to publish again
    assert left == ["published", "unpublished"] and not list((state / "runs" / "unpublished").iterdir()), left
    assert len(landed) == KILLS
    print(f"kills: {'; '.join(landed)}. Runs {len(runs)} ({len(interrupted)} interrupted); "
          f"versions loaded with peft: {len(checker.loaded)}")


# ----------------------------------------------------------------------------- two daemons


@pytest.mark.long
def test_two_daemons_never_merge_the_same_group_at_once(tmp_path, made, daemons, catalog_url):
    """Two daemons, one catalog, one folder, one destination, 2-second schedules (a long
    debounce leaves the merges to the schedules). Both pause at their first publish and
    after their first successful run:

    1. whichever merges first (X) is held inside its publish, its claim held, until the
       other (Y) has been refused the claim;
    2. X then finishes and is held after its run (its one merge worker busy: it starts
       nothing), the inputs change, and Y merges and publishes them;
    3. both run freely through one more change.

    Both daemons merged, at least one claim was refused, no two runs overlap in time,
    and the published merge is the merge of the final inputs."""
    base, (lora0, lora1, _) = made
    watched, dest = tmp_path / "watched", tmp_path / "published"
    watched.mkdir()
    shutil.copytree(lora0, watched / "a0")
    shutil.copytree(lora1, watched / "a1")
    params = {"iterations": 40, "samples_per_task": 8, "tolerance": 0.0}
    configs = [
        write_config(tmp_path / f"daemon-{name}.toml", state=tmp_path / f"state-{name}", watched=watched, dest=dest,
                     base=base, params=params, database=catalog_url, interval=2, debounce=600, grace=2)
        for name in ("a", "b")
    ]
    pause = {"publish:copied-one": [1], "run:succeeded": [1]}
    # The first daemon creates the catalog (two first-time migrations at once collide) and
    # writes the configured source into it before the second starts.
    first = daemons(configs[0], tmp_path / "daemon-a.log", "daemon a", pause)
    first.wait_event("log", r"daemon \S+ running")
    second = daemons(configs[1], tmp_path / "daemon-b.log", "daemon b", pause)
    second.wait_event("log", r"daemon \S+ running")

    def successes() -> list[MergeRun]:
        return [r for r in group_runs(catalog_url) if r.status is RunStatus.succeeded]

    # 1. X publishes (claim held) until Y is refused.
    x = wait_for(lambda: next((d for d in (first, second) if d.seen("log", "^FAULTPOINT publish:copied-one 1 reached")),
                              None), "a daemon to publish its first merge", timeout=START_TIMEOUT, interval=0.2)
    y = second if x is first else first
    y.wait_event("log", r"group unified: another daemon is merging it; skipped")
    x.release("publish:copied-one")
    # 2. X holds still after its run; new inputs are Y's to merge.
    x.paused("run:succeeded")
    assert len(successes()) == 1
    rewrite_weights(watched / "a0", lora0, 1.5)
    y.paused("publish:copied-one")
    y.release("publish:copied-one")
    y.paused("run:succeeded")
    assert len(successes()) == 2
    # 3. Free for all: one more change, merged by whichever daemon gets there first.
    for daemon in (x, y):
        daemon.release("run:succeeded")
    rewrite_weights(watched / "a0", lora0, 0.5)
    final_sha = {name: sha256_file(watched / name / "adapter_model.safetensors") for name in ("a0", "a1")}

    def published_final() -> bool:
        report = dest / "current" / "merge_report.json"
        return report.is_file() and {i["name"]: i["sha256"] for i in json.loads(report.read_text())["inputs"]} == final_sha

    wait_for(published_final, "the merge of the last change to be published", timeout=START_TIMEOUT, interval=0.5)
    assert first.stop() == 0, first.tail()
    assert second.stop() == 0, second.tail()

    runs = group_runs(catalog_url)
    real = sorted((r for r in runs if r.status is not RunStatus.skipped), key=lambda r: r.started_at)
    assert not [r.id for r in real if r.status is RunStatus.running or r.finished_at is None]
    assert len([r for r in real if r.status is RunStatus.succeeded]) >= 3
    for earlier, later in zip(real, real[1:]):
        assert earlier.finished_at <= later.started_at, (
            f"runs {earlier.id} ({earlier.started_at}..{earlier.finished_at}) and "
            f"{later.id} ({later.started_at}..{later.finished_at}) overlap")
    # Whichever daemon published last, consumers see the merge of the final weights.
    assert PublishedChecker(dest, base).check() is not None
    # Runs skipped for unchanged inputs are made under the claim too: none falls inside a merge.
    for run in runs:
        if run.status is RunStatus.skipped:
            assert not [r.id for r in real if r.started_at < run.started_at < r.finished_at], run.id
    merged_by = {d.name: [int(m[1]) for m in d.logs(r"run (\d+) merges")] for d in (first, second)}
    turned_away = {d.name: len(d.logs(r"another daemon is merging it")) for d in (first, second)}
    assert all(merged_by.values()), merged_by  # both daemons merged
    assert not set(merged_by[first.name]) & set(merged_by[second.name])  # no run merged twice
    assert sorted(sum(merged_by.values(), [])) == sorted(r.id for r in real)  # every run is one of theirs
    assert turned_away[y.name] >= 1 and sum(turned_away.values()) >= 1
    print(f"merges by daemon: {merged_by}; claims refused: {turned_away}")


@pytest.mark.long
def test_sighup_with_a_broken_config_keeps_the_running_one(tmp_path, made, daemons):
    """Invalid TOML, then a valid file naming an unknown strategy (and other parameters
    and another destination): each reload fails with an ERROR naming the problem, READY
    follows, and the next merge still uses the running parameters and destination. A
    valid file then takes effect at the next SIGHUP."""
    base, (lora0, lora1, _) = made
    watched, dest, other_dest = tmp_path / "watched", tmp_path / "published", tmp_path / "elsewhere"
    watched.mkdir()
    shutil.copytree(lora0, watched / "a0")
    shutil.copytree(lora1, watched / "a1")
    config = tmp_path / "daemon.toml"
    running = {"iterations": 2, "samples_per_task": 8, "a1": 0.001}
    write_config(config, state=tmp_path / "state", watched=watched, dest=dest, base=base, params=running)
    daemon = daemons(config, tmp_path / "daemon.log")
    daemon.wait_event("log", r"group unified: run \d+ succeeded")

    def published_params() -> dict:
        return json.loads((dest / "current" / "merge_report.json").read_text())["params"]

    assert published_params()["a1"] == 0.001
    broken_toml = "[daemon]\nstate_dir = \"unterminated\n"
    unknown_strategy = write_config(tmp_path / "other.toml", state=tmp_path / "state", watched=watched,
                                    dest=other_dest, base=base, params={"iterations": 2, "a1": 0.009}).read_text()
    unknown_strategy = unknown_strategy.replace('params = {', 'strategy = "no-such-strategy"\nparams = {')
    for text, problem in ((broken_toml, "invalid TOML"), (unknown_strategy, "no-such-strategy")):
        config.write_text(text)
        mark = daemon.mark()
        daemon.proc.send_signal(signal.SIGHUP)
        error = daemon.wait_event("log", r" ERROR iteris_daemon\.daemon: reload failed, keeping the running "
                                         r"configuration: (.*)", after=mark)
        assert problem in error[1] and str(config) in error[1], error[1]
        daemon.wait_event("notify", r"^RELOADING=1$", after=mark)
        daemon.wait_event("notify", r"^READY=1$", after=mark)
        # The running configuration still merges: a change, merged with its parameters, to its destination.
        rewrite_weights(watched / "a0", lora0, 1.1 if problem == "invalid TOML" else 1.2)
        run = daemon.wait_event("log", r"group unified: run (\d+) succeeded", after=mark)
        assert os.readlink(dest / "current").startswith(f"versions/run-{run[1]}-")
        assert published_params()["a1"] == 0.001 and not other_dest.exists()
    # A valid file takes effect.
    write_config(config, state=tmp_path / "state", watched=watched, dest=dest, base=base,
                 params={**running, "a1": 0.002})
    mark = daemon.mark()
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_event("log", r"configuration reloaded", after=mark)
    run = daemon.wait_event("log", r"group unified: run (\d+) succeeded", after=mark)  # new parameters: a new merge
    assert os.readlink(dest / "current").startswith(f"versions/run-{run[1]}-") and published_params()["a1"] == 0.002
    assert daemon.stop() == 0, daemon.tail()
    assert not daemon.logs(r"Traceback")


# ----------------------------------------------------------------------------- claims


@pytest.fixture
def claim_catalog(catalog_url):
    catalog = Catalog(catalog_url)
    with catalog.session() as session:
        session.add(MergeGroup(name=GROUP, base_model="base", strategy="iteris"))
    yield catalog
    catalog.close()


def claim_row(catalog: Catalog) -> tuple[str | None, object]:
    with catalog.session() as session:
        row = session.scalar(select(MergeGroup).where(MergeGroup.name == GROUP))
        return row.claimed_by, row.claimed_at


def set_claim(catalog: Catalog, holder: str | None, age: float = 0.0) -> None:
    with catalog.session() as session:
        session.execute(update(MergeGroup).where(MergeGroup.name == GROUP)
                        .values(claimed_by=holder, claimed_at=utcnow() - timedelta(seconds=age) if holder else None))


def test_concurrent_claims_have_exactly_one_winner(claim_catalog, catalog_url):
    """Two catalogs (engines), two threads, one barrier: repeated 15 times."""
    other = Catalog(catalog_url, migrate=False)
    try:
        for attempt in range(15):
            barrier = threading.Barrier(2)
            claims = [Claim(c, GROUP, f"host-{i}:{1000 + i}:{attempt:08x}", ttl=60.0)
                      for i, c in enumerate((claim_catalog, other))]
            results: list[bool | BaseException] = [False, False]

            def contend(i: int) -> None:
                barrier.wait()
                try:
                    results[i] = claims[i].acquire()
                except BaseException as exc:  # reported below, not lost in the thread
                    results[i] = exc

            threads = [threading.Thread(target=contend, args=(i,)) for i in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            assert sorted(map(repr, results)) == ["False", "True"], results
            winner = claims[results.index(True)]
            assert claim_row(claim_catalog)[0] == winner.holder
            winner.release()
            assert claim_row(claim_catalog) == (None, None)
    finally:
        other.close()


def test_claim_is_refreshed_and_a_stale_one_is_taken_over(claim_catalog):
    holder = Claim(claim_catalog, GROUP, "elsewhere:4242:aaaaaaaa", ttl=0.4)
    assert holder.acquire()
    _, first = claim_row(claim_catalog)
    wait_for(lambda: claim_row(claim_catalog)[1] > first, "the claim to be refreshed", timeout=30)
    holder._stop.set()  # the holder (another host) dies: nobody refreshes the claim any more
    holder._thread.join()
    rival = Claim(claim_catalog, GROUP, "here:1:bbbbbbbb", ttl=3600)
    assert not rival.acquire()  # not stale for a one-hour TTL
    wait_for(lambda: (utcnow() - claim_row(claim_catalog)[1]).total_seconds() > 0.5, "the claim to age", timeout=30)
    late = Claim(claim_catalog, GROUP, "here:1:cccccccc", ttl=0.4)
    assert late.acquire()  # stale after claim_ttl: taken over
    assert claim_row(claim_catalog)[0] == late.holder
    holder.release()  # the old holder coming back must not drop the new claim
    assert claim_row(claim_catalog)[0] == late.holder
    late.release()
    assert claim_row(claim_catalog) == (None, None)


def test_claims_are_judged_on_the_catalog_servers_clock(claim_catalog, host_clock_ahead):
    """A daemon whose host clock runs an hour ahead must not take a claim another host holds
    and refreshes (on its own clock every claim would look an hour old), and a stale claim is
    still taken over."""
    with claim_catalog.session() as session:
        now = claim_catalog.now(session)
    assert abs(now - host_clock_ahead.server_time()).total_seconds() < 60  # the server's time, not this host's
    holder = Claim(claim_catalog, GROUP, "elsewhere:4242:aaaaaaaa", ttl=600)
    assert holder.acquire()
    assert abs(claim_row(claim_catalog)[1] - now).total_seconds() < 60
    rival = Claim(claim_catalog, GROUP, "here:1:bbbbbbbb", ttl=600)
    assert not rival.acquire()
    with claim_catalog.session() as session:  # the holder stopped refreshing 20 minutes ago
        session.execute(update(MergeGroup).where(MergeGroup.name == GROUP)
                        .values(claimed_at=claim_catalog.now(session) - timedelta(minutes=20)))
    assert rival.acquire()
    holder._stop.set()
    rival.release()


def test_status_judges_a_claims_age_on_the_catalog_servers_clock(claim_catalog, host_clock_ahead):
    """`status` called a live claim stale on a host whose clock ran past ``claim_ttl_seconds``
    ahead of the server's, which the daemons write claims with; and a stale one is still shown so."""
    from iteris_daemon.status import collect

    holder = Claim(claim_catalog, GROUP, "elsewhere:4242:aaaaaaaa", ttl=600)
    assert holder.acquire()
    (group,) = collect(claim_catalog, claim_ttl_seconds=600)["groups"]
    assert group["merging_now"] == "elsewhere:4242:aaaaaaaa" and group["claim_stale"] is False
    with claim_catalog.session() as session:  # the holder stopped refreshing 20 minutes ago
        session.execute(update(MergeGroup).where(MergeGroup.name == GROUP)
                        .values(claimed_at=claim_catalog.now(session) - timedelta(minutes=20)))
    (group,) = collect(claim_catalog, claim_ttl_seconds=600)["groups"]
    assert group["claim_stale"] is True
    holder._stop.set()


def test_taking_over_a_claim_fails_the_run_its_holder_left_running(claim_catalog):
    """A daemon on another host died mid-merge: once its claim is stale, the next claim
    takes the group and marks that run failed (no run stays ``running`` for ever)."""
    with claim_catalog.session() as session:
        group_id = session.scalar(select(MergeGroup.id).where(MergeGroup.name == GROUP))
        session.add(MergeRun(group_id=group_id, status=RunStatus.running, input_fingerprint="0" * 64))
    set_claim(claim_catalog, "elsewhere:4242:aaaaaaaa", age=10)
    claim = Claim(claim_catalog, GROUP, worker_id(), ttl=5)
    assert claim.acquire()
    claim.release()
    with claim_catalog.session() as session:
        (run,) = session.scalars(select(MergeRun))
        assert run.status is RunStatus.failed and "elsewhere:4242:aaaaaaaa" in run.error and run.finished_at


@pytest.mark.long
def test_a_group_claimed_elsewhere_is_asked_again_until_the_claim_frees(tmp_path, made, daemons):
    """A daemon on another host holds the group, then dies mid-merge. This daemon's runs
    (at start, on registering the adapters) find the group claimed; with no schedule and no
    further change, it still merges once the claim goes stale, and marks the dead one's run
    failed: a claimed group is asked again every ``claim_ttl_seconds / 2``."""
    base, (lora0, lora1, _) = made
    watched, dest = tmp_path / "watched", tmp_path / "published"
    watched.mkdir()
    shutil.copytree(lora0, watched / "a0")
    shutil.copytree(lora1, watched / "a1")
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    catalog = Catalog(url)
    with catalog.session() as session:
        group = MergeGroup(name=GROUP, base_model=str(base), strategy="iteris")
        session.add(group)
        session.flush()
        group_id = group.id
    elsewhere = Claim(catalog, GROUP, "elsewhere:4242:aaaaaaaa", ttl=4.0)  # refreshed every second while alive
    assert elsewhere.acquire()
    with catalog.session() as session:  # its run, recorded once it holds the claim (as a daemon does)
        session.add(MergeRun(group_id=group_id, status=RunStatus.running, input_fingerprint="0" * 64))
    config = write_config(tmp_path / "daemon.toml", state=tmp_path / "state", watched=watched, dest=dest, base=base,
                          params={"samples_per_task": 8}, database=url, claim_ttl=4.0)
    daemon = daemons(config, tmp_path / "daemon.log")
    try:
        def registered() -> int:
            with catalog.session() as session:
                return len(session.scalars(select(Adapter).where(Adapter.status == AdapterStatus.registered)).all())

        wait_for(lambda: registered() == 2, "both adapters to be registered", timeout=START_TIMEOUT, interval=0.5)
        daemon.wait_event("log", r"group unified: another daemon is merging it; skipped")
        # The run the registrations trigger (or, at the latest, the next ask) finds the group claimed too.
        scanned = daemon.position("log", r"source team: scan: 2 registered")
        daemon.wait_event("log", r"group unified: another daemon is merging it; skipped", after=scanned)
        assert not [r for r in group_runs(url) if r.status is RunStatus.succeeded]
        elsewhere._stop.set()  # the other daemon dies: its claim is no longer refreshed
        elsewhere._thread.join()
        wait_for(lambda: any(r.status is RunStatus.succeeded for r in group_runs(url)), "the group to merge",
                 timeout=START_TIMEOUT, interval=0.5)
        interrupted = group_runs(url)[0]
        assert interrupted.status is RunStatus.failed and "elsewhere:4242" in interrupted.error
        assert daemon.stop() == 0, daemon.tail()
    finally:
        catalog.close()


def test_claim_of_a_dead_local_process_is_taken_at_once(claim_catalog):
    host = socket.gethostname()
    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                            check=True)
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        wait_for(lambda: Path(f"/proc/{zombie.pid}/stat").read_text().split(") ")[1].startswith("Z"),
                 "the child to exit (a zombie until reaped)", timeout=60)
        cases = [
            (f"{host}:{int(exited.stdout)}:deadbeef", True),  # gone
            (f"{host}:{zombie.pid}:deadbeef", True),  # exited, not yet reaped
            (f"{host}:{sleeper.pid}:deadbeef", False),  # alive
            (worker_id(), False),  # this process, another daemon instance
            (f"{host}:{os.getpid()}:deadbeef", True),  # an earlier process with this pid (a container's pid 1)
            (f"elsewhere-{uuid.uuid4().hex[:6]}:{int(exited.stdout)}:deadbeef", False),  # cannot tell: wait for the TTL
        ]
        for holder, taken in cases:
            set_claim(claim_catalog, holder)  # claimed just now: never stale for a one-hour TTL
            claim = Claim(claim_catalog, GROUP, f"{host}:{os.getpid()}:{uuid.uuid4().hex[:8]}", ttl=3600)
            assert claim.acquire() is taken, holder
            assert claim_row(claim_catalog)[0] == (claim.holder if taken else holder)
            if taken:
                claim.release()
    finally:
        sleeper.kill()
        sleeper.wait()
        zombie.wait()


# ----------------------------------------------------------------------------- stopping


@pytest.mark.timeout(120)
def test_a_group_a_reload_drops_shows_no_next_run(tmp_path, monkeypatch, caplog):
    """``status`` reads each group's next run from the catalog: a group a reload (SIGHUP)
    dropped kept the time it had for ever, though nothing would run it, and its pending
    trigger stayed in the scheduler. Now the reload clears both, the groups still
    configured keep theirs, and a stop clears those. Merges are a stand-in (``run_group``
    returning a skip): only the schedule is under test."""
    import iteris_daemon.daemon as daemon_module
    from iteris_daemon.catalog.models import RunStatus

    monkeypatch.setattr(daemon_module, "run_group", lambda *a, **k: RunOutcome(RunStatus.skipped, None, "stand-in"))
    config = tmp_path / "daemon.toml"
    head = (f"[daemon]\nstate_dir = {json.dumps(str(tmp_path / 'state'))}\n"
            f"cache_dir = {json.dumps(str(tmp_path / 'cache'))}\ngrace_seconds = 1\n")
    groups = {name: (f'[[groups]]\nname = "{name}"\nbase_model = "org/base"\ninterval_seconds = 3600\n'
                     f'[[groups.destinations]]\nkind = "folder"\npath = {json.dumps(str(tmp_path / name))}\n')
              for name in ("g", "h")}
    config.write_text(head + groups["g"] + groups["h"])
    daemon = daemon_module.Daemon(config)
    seen: dict[str, object] = {}

    def next_runs() -> dict[str, object]:
        with daemon.catalog.session(write=False) as session:
            return {row.name: row.next_run_at for row in session.scalars(select(MergeGroup))}

    def probe() -> None:
        polling.wait_for(lambda: daemon.scheduler is not None and all(next_runs().get(n) for n in "gh"),
                         "both groups' next runs")
        daemon.trigger("h", delay=600)  # a change of h's adapters, debounced
        config.write_text(head + groups["g"])
        os.kill(os.getpid(), signal.SIGHUP)
        polling.wait_for(lambda: "configuration reloaded" in caplog.text, "the reload")
        seen["reloaded"] = next_runs()
        seen["h's trigger"] = daemon.scheduler.get_job("trigger:h")
        os.kill(os.getpid(), signal.SIGTERM)

    with caplog.at_level(logging.INFO, logger="iteris_daemon"):
        assert polling.run_here(daemon, probe) == 0
    assert seen["reloaded"]["h"] is None and seen["reloaded"]["g"] is not None and seen["h's trigger"] is None
    daemon.catalog = Catalog(f"sqlite:///{tmp_path / 'state' / 'catalog.db'}")
    assert next_runs() == {"g": None, "h": None}
    daemon.catalog.close()


@pytest.mark.timeout(120)
def test_daemons_sharing_a_catalog_keep_the_soonest_next_run_not_each_their_own(tmp_path, monkeypatch):
    """Each daemon on a catalog wrote its own next run time of a group at every tick, so two
    rewrote the row every second and `status` flipped between their times (QA PG). With
    another daemon live, one leaves a sooner time (the other's) as it is, and writes its own
    over a later one."""
    import iteris_daemon.daemon as daemon_module
    from iteris_daemon.catalog.models import DaemonPresence, RunStatus

    monkeypatch.setattr(daemon_module, "run_group", lambda *a, **k: RunOutcome(RunStatus.skipped, None, "stand-in"))
    config = tmp_path / "daemon.toml"
    config.write_text(f"[daemon]\nstate_dir = {json.dumps(str(tmp_path / 'state'))}\n"
                      f"cache_dir = {json.dumps(str(tmp_path / 'cache'))}\ngrace_seconds = 1\n"
                      '[[groups]]\nname = "g"\nbase_model = "org/base"\ninterval_seconds = 3600\n'
                      f'[[groups.destinations]]\nkind = "folder"\npath = {json.dumps(str(tmp_path / "out"))}\n')
    other = Catalog(f"sqlite:///{tmp_path / 'state' / 'catalog.db'}")
    with other.session() as session:  # the other daemon, seen now
        session.add(DaemonPresence(holder="elsewhere:1:daemon", settings={}))
    daemon = daemon_module.Daemon(config)
    seen = {}

    def recorded() -> datetime | None:
        with other.session(write=False) as session:
            return session.scalar(select(MergeGroup.next_run_at))

    def record(when: datetime) -> None:
        with other.session() as session:
            session.scalar(select(MergeGroup)).next_run_at = when

    def probe() -> None:
        polling.wait_for(lambda: daemon._shared and recorded() is not None, "the shared catalog and g's next run")
        own, now = recorded(), datetime.now(timezone.utc).replace(tzinfo=None)
        record(now + timedelta(minutes=10))  # the other daemon's run comes first
        time.sleep(3 * daemon_module.TICK_SECONDS)
        seen["sooner kept"] = recorded() == now + timedelta(minutes=10)
        record(now + timedelta(hours=3))  # the other's comes later: this one's is written
        polling.wait_for(lambda: recorded() == own, "this daemon's sooner time")
        os.kill(os.getpid(), signal.SIGTERM)

    assert polling.run_here(daemon, probe) == 0
    other.close()
    assert seen["sooner kept"]


@pytest.mark.long
@pytest.mark.timeout(120)
def test_merge_now_of_a_group_another_daemon_merges_asks_as_the_claim_says(tmp_path, caplog):
    """``merge-now g`` while another daemon on the catalog holds g's claim (a merge of hours,
    say): this daemon found the group claimed, and its 2 s tick asked for the request again
    at once, every tick, for as long as the other merged: a write transaction and an INFO
    line every 2 s. Now it asks again ``claim_ttl_seconds / 2`` later, as for any run that
    found the claim taken (the holder serves the request). The other daemon is its claim in
    the catalog, refreshed as a live holder would."""
    from iteris_daemon.catalog.models import utcnow
    from iteris_daemon.daemon import Daemon

    config = tmp_path / "daemon.toml"
    config.write_text(f"[daemon]\nstate_dir = {json.dumps(str(tmp_path / 'state'))}\n"
                      f"cache_dir = {json.dumps(str(tmp_path / 'cache'))}\ngrace_seconds = 1\n"
                      '[[groups]]\nname = "g"\nbase_model = "org/base"\n'
                      f'[[groups.destinations]]\nkind = "folder"\npath = {json.dumps(str(tmp_path / "out"))}\n')
    daemon = Daemon(config)
    seen: dict[str, object] = {}

    def claimed_elsewhere(**values) -> None:
        with daemon.catalog.session() as session:
            session.execute(update(MergeGroup).where(MergeGroup.name == "g")
                            .values(claimed_by="otherhost:4242:abcd", claimed_at=utcnow(), **values))

    def attempts() -> int:
        return sum("another daemon is merging it" in r.getMessage() for r in caplog.records)

    def probe() -> None:
        polling.wait_for(lambda: "group g: skipped" in caplog.text, "the start's run")
        claimed_elsewhere(requested_at=utcnow())  # `iteris-daemon merge-now g`
        polling.wait_for(attempts, "the first attempt")
        for _ in range(4):  # four ticks
            time.sleep(2)
            claimed_elsewhere()
        seen["attempts"] = attempts()
        seen["next try"] = daemon.scheduler.get_job("trigger:g").next_run_time - datetime.now(timezone.utc)
        # A trigger further off than the claim's wait (a retry's backoff, 15 minutes) is brought
        # forward by a request: nobody may be serving it (QA RV8).
        daemon.trigger("g", delay=900)
        claimed_elsewhere(requested_at=utcnow())
        polling.wait_for(lambda: attempts() == 2, "the request's attempt", timeout=30)
        os.kill(os.getpid(), signal.SIGTERM)

    with caplog.at_level(logging.INFO, logger="iteris_daemon"):
        assert polling.run_here(daemon, probe) == 0
    assert seen["attempts"] == 1, seen
    assert timedelta(seconds=40) < seen["next try"] <= timedelta(seconds=60)  # claim_ttl_seconds / 2 after it


def test_a_wall_clock_step_back_moves_the_pending_jobs_with_it(tmp_path, caplog):
    """NTP stepping back a clock that ran ahead (or a VM restored from a snapshot): APScheduler
    3 waits for each job's wall-clock time, so every job (the tick that picks up `merge-now`,
    the catalog check, polls, a debounced run) stood still for as long as the step, the daemon
    saying it was healthy (QA TS: 0 ticks for a 60 s step). The daemon's main loop tells the
    step against the monotonic clock (here both clocks are given) and moves each pending
    job's time back by it; a cron job's next time, a time of day, is found anew."""
    from iteris_daemon.crontab import CrontabTrigger
    from iteris_daemon.daemon import CLOCK_STEP_SECONDS, Daemon, WallClock, new_scheduler

    start = datetime(2026, 12, 7, 6, 0, tzinfo=timezone.utc)
    times = iter([(start, 100.0), (start + timedelta(seconds=0.5), 100.5),  # in step
                  (start - timedelta(seconds=599), 101.0),  # back 600 s
                  (start - timedelta(seconds=598 + CLOCK_STEP_SECONDS - 1), 102.0),  # back less than the jitter
                  (start + timedelta(hours=1), 103.0)])  # forward: jobs run early, none stands still
    now = [next(times)]
    clock = WallClock(wall=lambda: now[0][0], monotonic=lambda: now[0][1])
    steps = []
    for point in times:
        now[0] = point
        steps.append(clock.stepped_back())
    assert steps == [0.0, 600.0, 0.0, 0.0]

    config = tmp_path / "daemon.toml"
    config.write_text(f"[daemon]\nstate_dir = {json.dumps(str(tmp_path / 'state'))}\n")
    daemon = Daemon(config)
    daemon.scheduler = new_scheduler(daemon.config.daemon)
    daemon.scheduler.start(paused=True)
    try:
        soon = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(hours=1)
        daemon.scheduler.add_job(print, "date", run_date=soon + timedelta(seconds=630), id="trigger:g")
        daemon.scheduler.add_job(print, "interval", seconds=2, id="tick", next_run_time=soon + timedelta(seconds=602))
        trigger = CrontabTrigger("0 3 * * *")
        cron_time = trigger.get_next_fire_time(None, datetime.now(timezone.utc))
        # found on a clock two days ahead: (QA RV8) it stood still for the two days
        daemon.scheduler.add_job(print, trigger, id="schedule:h", next_run_time=cron_time + timedelta(days=2))
        with caplog.at_level(logging.WARNING, logger="iteris_daemon"):
            daemon.clock_stepped_back(600.0)
        moved = {job.id: job.next_run_time for job in daemon.scheduler.get_jobs()}
        assert moved == {"trigger:g": soon + timedelta(seconds=30), "tick": soon + timedelta(seconds=2),
                         "schedule:h": cron_time}
        assert ("the wall clock went back 600 s (NTP stepping it, or a VM restored?): pending jobs were moved back "
                "with it, cron schedules to their next time on the corrected clock") in caplog.messages
    finally:
        daemon.scheduler.shutdown(wait=False)


@pytest.mark.timeout(120)
def test_a_daemon_refreshes_its_presence_at_least_every_minute(tmp_path):
    """`merge-now` calls a daemon not seen for 10 minutes gone; the daemon refreshed its row
    at each catalog check only, so with ``catalog_check_seconds = 900`` a live daemon was
    said gone for part of every period (QA TS). Its presence job now runs at least every
    ``PRESENCE_SECONDS``; the catalog check keeps its period."""
    from iteris_daemon.daemon import PRESENCE_SECONDS, Daemon

    config = tmp_path / "daemon.toml"
    config.write_text(f"[daemon]\nstate_dir = {json.dumps(str(tmp_path / 'state'))}\n"
                      f"cache_dir = {json.dumps(str(tmp_path / 'cache'))}\ngrace_seconds = 1\n"
                      "catalog_check_seconds = 900\n")
    daemon = Daemon(config)
    periods: dict[str, timedelta] = {}

    def probe() -> None:
        polling.wait_for(lambda: daemon.scheduler is not None and daemon.scheduler.get_job("peers"), "the jobs")
        periods.update({job: daemon.scheduler.get_job(job).trigger.interval for job in ("peers", "catalog-check")})
        os.kill(os.getpid(), signal.SIGTERM)

    assert polling.run_here(daemon, probe) == 0
    assert PRESENCE_SECONDS == 60 and periods == {"peers": timedelta(seconds=60), "catalog-check": timedelta(seconds=900)}


def _daemon_on_a_fake_clock(tmp_path: Path, daemon_settings: str = ""):
    """A daemon (not started) with a paused scheduler and a SQLite catalog, whose catalog
    health reads the clock ``now[0]``: (daemon, now)."""
    import iteris_daemon.daemon as daemon_module
    from apscheduler.schedulers.background import BackgroundScheduler

    config = tmp_path / "daemon.toml"
    config.write_text(f"[daemon]\nstate_dir = {json.dumps(str(tmp_path / 'state'))}\n{daemon_settings}")
    daemon = daemon_module.Daemon(config)
    daemon.scheduler = BackgroundScheduler()
    daemon.scheduler.start(paused=True)
    daemon.catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    now = [1000.0]
    daemon.catalog_health = daemon_module.CatalogHealth(lambda: daemon.catalog.safe_url, clock=lambda: now[0])
    return daemon, now


def test_a_failing_catalog_is_unhealthy_within_minutes_whatever_the_catalog_check_period(tmp_path, monkeypatch):
    """/healthz reports a job the catalog keeps failing after 3 checks' time: with
    ``catalog_check_seconds = 86400`` that was 3 days of a dead catalog said healthy (QA TS).
    The time is now 3 of the presence job's periods at most (60 s each). The tick fails every
    2 s on a stand-in outage (the session raising what a lost server raises), on a fake clock."""
    from sqlalchemy.exc import OperationalError

    daemon, now = _daemon_on_a_fake_clock(tmp_path, "catalog_check_seconds = 86400\n")

    def lost(*args, **kwargs):
        raise OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))

    monkeypatch.setattr(daemon.catalog, "session", lost)
    try:
        problems = {}
        for second in range(0, 200, 2):
            now[0] = 1000.0 + second
            daemon._tick()
            problems[second] = daemon.health_problem()
        assert problems[170] is None and problems[180].startswith("the catalog ") and "has failed job tick for 180 s" \
            in problems[180], problems[180]
    finally:
        daemon.scheduler.shutdown(wait=False)


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_sqlite_catalog_deleted_under_the_daemon_makes_it_unhealthy(tmp_path, how):
    """The catalog file deleted (or another put in its place) under a running daemon: it went
    on registering and publishing into the deleted file, /healthz 200, `status` finding no
    catalog, and a restart lost that history (QA OPS). Each catalog check now fails on it, so
    /healthz says so at the 4th (3 failures over 3 checks' time), naming the file; the real
    file, really deleted."""
    daemon, now = _daemon_on_a_fake_clock(tmp_path, "catalog_check_seconds = 30\n")
    try:
        for second in (0, 30):
            now[0] = 1000.0 + second
            daemon._catch_up()
        assert daemon.health_problem() is None
        path = tmp_path / "catalog.db"
        if how == "deleted":
            path.unlink()
        else:
            path.rename(tmp_path / "old.db")
            Catalog(f"sqlite:///{path}").close()  # a new, empty catalog in its place
        for second in (60, 90, 120):
            now[0] = 1000.0 + second
            daemon._catch_up()
        assert daemon.health_problem() is None  # 3 failures, 60 s since the first: not yet
        now[0] = 1150.0
        daemon._catch_up()
        problem = daemon.health_problem()
        assert problem is not None and "has failed job catalog-check" in problem, problem
        assert f"the catalog file {path} was deleted or replaced while this process had it open" in problem, problem
    finally:
        daemon.scheduler.shutdown(wait=False)
        daemon.catalog.close()


def test_a_catalog_that_stops_answering_is_unhealthy_within_minutes(tmp_path, monkeypatch):
    """A lock held on the catalog's tables, or a server that stops answering without closing
    the connection: no error ever comes, the tick waits for ever, and /healthz said ok for
    as long while `job tick skipped` was logged every 2 s (QA PG). A tick under way as long
    as failures take to count is now the problem /healthz names; answered, it is none."""
    import iteris_daemon.daemon as daemon_module

    daemon, now = _daemon_on_a_fake_clock(tmp_path)
    entered, answer = threading.Event(), threading.Event()
    real_session = daemon.catalog.session

    @contextmanager
    def blocked(*args, **kwargs):
        entered.set()
        assert answer.wait(60)
        with real_session(*args, **kwargs) as session:
            yield session

    monkeypatch.setattr(daemon.catalog, "session", blocked)
    tick = threading.Thread(target=daemon._tick, daemon=True)
    try:
        tick.start()
        assert entered.wait(30)
        after = max(daemon_module.UNHEALTHY_AFTER_CHECKS * min(daemon.config.daemon.catalog_check_seconds,
                                                               daemon_module.PRESENCE_SECONDS),
                    daemon_module.STUCK_AFTER_SECONDS)
        now[0] += after - 1
        assert daemon.health_problem() is None
        now[0] += 1
        assert daemon.health_problem().startswith(f"job tick has waited {after:.0f} s on the catalog sqlite:///")
        answer.set()
        tick.join(30)
        assert not tick.is_alive() and daemon.health_problem() is None
    finally:
        answer.set()
        daemon.scheduler.shutdown(wait=False)


@pytest.mark.timeout(120)
def test_the_main_loop_moves_the_jobs_when_the_wall_clock_steps_back(tmp_path, monkeypatch, caplog):
    """The wiring of the test above: the running daemon's main loop asks its ``WallClock``
    twice a second and moves the jobs on a step. The clock is a stand-in that tells one
    step of 600 s (the daemon's scheduler and threads run on the real clocks)."""
    import iteris_daemon.daemon as daemon_module

    armed, told = threading.Event(), threading.Event()

    class OneStep:
        def stepped_back(self) -> float:
            if armed.is_set() and not told.is_set():
                told.set()
                return 600.0
            return 0.0

    monkeypatch.setattr(daemon_module, "WallClock", OneStep)
    config = tmp_path / "daemon.toml"
    config.write_text(f"[daemon]\nstate_dir = {json.dumps(str(tmp_path / 'state'))}\n"
                      f"cache_dir = {json.dumps(str(tmp_path / 'cache'))}\ngrace_seconds = 1\n")
    daemon = daemon_module.Daemon(config)
    seen = {}

    def probe() -> None:
        polling.wait_for(lambda: daemon.scheduler is not None and daemon.scheduler.running, "the scheduler")
        daemon.scheduler.add_job(print, "date", run_date=datetime.now(timezone.utc) + timedelta(hours=1), id="later")
        planned = daemon.scheduler.get_job("later").next_run_time
        armed.set()
        polling.wait_for(lambda: "the wall clock went back 600 s" in caplog.text, "the step")
        seen["moved by"] = planned - daemon.scheduler.get_job("later").next_run_time
        os.kill(os.getpid(), signal.SIGTERM)

    with caplog.at_level(logging.WARNING, logger="iteris_daemon"):
        assert polling.run_here(daemon, probe) == 0
    assert seen["moved by"] == timedelta(seconds=600)


@pytest.mark.timeout(120)
def test_what_a_reload_drops_leaves_no_trace(tmp_path, monkeypatch, caplog):
    """A group or source the config drops (renamed, removed) left, for ever (QA OPS): the whole
    merged adapter kept as its quality baseline or to be published again, in the state folder
    (one per name a group ever had); its series in /metrics; and a rescan job's catalog
    failures, which kept /healthz unhealthy though the job was gone. Now the start removes the
    copies of groups the config has lacked for a week (99 and 98, whose ``.dropped`` marks are
    8 days old), and a reload marks those of the groups it drops (kept a week: QA CFG), with
    their series and the dropped source's failures gone at once. Kept copies are stand-ins
    (folders as the runner writes them); the rescan's failures are recorded as its job records them."""
    from prometheus_client import generate_latest
    from sqlalchemy.exc import OperationalError

    import iteris_daemon.daemon as daemon_module

    state = tmp_path / "state"
    runs = state / "runs"
    for copy in (runs / "published" / "group-1", runs / "published" / "group-99", runs / "unpublished" / "group-98"):
        copy.mkdir(parents=True)
        (copy / "adapter_model.safetensors").write_bytes(b"weights")
        copy.with_name(f"{copy.name}.run").write_text("7\n")
        if copy.name != "group-1":
            dropped = copy.with_name(f"{copy.name}.dropped")
            dropped.touch()
            os.utime(dropped, (time.time() - 8 * 86400,) * 2)
    (tmp_path / "watched").mkdir()
    config = tmp_path / "daemon.toml"
    head = (f"[daemon]\nstate_dir = {json.dumps(str(state))}\ncache_dir = {json.dumps(str(tmp_path / 'cache'))}\n"
            "grace_seconds = 1\n")
    source = f'[[sources]]\nname = "team"\nkind = "local"\npaths = [{json.dumps(str(tmp_path / "watched"))}]\n'
    group = ('[[groups]]\nname = "g"\nbase_model = "org/base"\n[[groups.destinations]]\nkind = "folder"\n'
             f'path = {json.dumps(str(tmp_path / "out"))}\n')
    config.write_text(head + source + group)
    state.mkdir(mode=0o700, exist_ok=True)
    state.chmod(0o700)
    monkeypatch.setattr(daemon_module, "run_group", lambda *a, **k: RunOutcome(RunStatus.skipped, None, "stand-in"))
    daemon = daemon_module.Daemon(config)
    seen = {}

    def probe() -> None:
        polling.wait_for(lambda: "removed the merges kept for group id 99, which the config has not had for 7 days"
                         in caplog.text
                         and daemon.scheduler.get_job("rescan:team"), "the start")
        seen["after start"] = sorted(str(p.relative_to(runs)) for p in runs.glob("*published/*"))
        daemon.metrics.observe_merge("g", 12.0)
        daemon.metrics.worker_failed("g", "memory")
        for _ in range(3):
            with contextlib.suppress(OperationalError), daemon.catalog_health.watching("rescan:team"):
                raise OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))
        seen["unhealthy"] = daemon.catalog_health.problem(after=0)
        config.write_text(head)
        os.kill(os.getpid(), signal.SIGHUP)
        polling.wait_for(lambda: "configuration reloaded" in caplog.text, "the reload")
        seen["after reload"] = sorted(str(p.relative_to(runs)) for p in runs.glob("*published/*"))
        seen["health"] = daemon.catalog_health.problem(after=0)
        seen["series"] = [line for line in generate_latest(daemon.metrics.registry).decode().splitlines()
                          if 'group="g"' in line and not line.startswith("iteris_merge_runs")]
        os.kill(os.getpid(), signal.SIGTERM)

    with caplog.at_level(logging.INFO, logger="iteris_daemon"):
        assert polling.run_here(daemon, probe) == 0
    assert seen["after start"] == ["published/group-1", "published/group-1.run"], seen
    assert seen["unhealthy"] is not None and "rescan:team" in seen["unhealthy"]
    assert seen["after reload"] == ["published/group-1", "published/group-1.dropped", "published/group-1.run"], seen
    assert seen["health"] is None and seen["series"] == [], seen
    assert "removed the merges kept for group id 99, which the config has not had for 7 days" in caplog.messages
    assert "group id 1," not in caplog.text


def test_a_group_back_within_a_week_finds_its_kept_merges(tmp_path):
    """A group commented out for one reload (or a config caught empty mid-save) lost its quality
    baseline and its merge waiting to be published again: back, the gate let a worse merge
    through (QA CFG). Its copies are kept a week after it went, and back, it finds them."""
    from iteris_daemon.runner import KEEP_DROPPED_SECONDS, discard_copies, published_copy, unpublished_copy

    work = tmp_path / "runs"
    copies = [published_copy(work, 5), unpublished_copy(work, 5), published_copy(work, 6)]
    for copy in copies:
        copy.mkdir(parents=True)
        (copy / "adapter_model.safetensors").write_bytes(b"weights")
        copy.with_name(f"{copy.name}.run").write_text("3\n")
    start = time.time()
    assert discard_copies(work, keep={6}, now=start) == []  # 5 went: marked, kept
    assert all(c.is_dir() for c in copies) and published_copy(work, 5).with_name("group-5.dropped").exists()
    assert discard_copies(work, keep={5, 6}, now=start + KEEP_DROPPED_SECONDS + 1) == []  # back within the week
    assert not list(work.glob("*/group-5.dropped")) and all(c.is_dir() for c in copies)
    assert discard_copies(work, keep={6}, now=time.time() + KEEP_DROPPED_SECONDS - 60) == []  # gone again: a new week
    assert discard_copies(work, keep={6}, now=time.time() + KEEP_DROPPED_SECONDS + 1) == [5]
    assert sorted(p.name for p in work.glob("*/*")) == ["group-6", "group-6.run"]


def test_jobs_that_start_hours_late_still_run_once(caplog):
    """The daemon's scheduler (``new_scheduler``): a group's run that waited two hours for the
    merge slot (the merge before it took that long), and a daily cron run due while the host
    slept three hours, run once when they can. APScheduler dropped both: its
    ``misfire_grace_time`` (3600 s here) is checked when a pool thread takes the job up, and a
    dropped run was said only by its WARNING ("Run time of job ... was missed by 2:00:00"),
    naming no group. The lateness is given as the jobs' run times in the past: the scheduler
    sees what it would see after such a wait."""
    from iteris_daemon.config import DaemonSettings
    from iteris_daemon.crontab import CrontabTrigger
    from iteris_daemon.daemon import new_scheduler

    scheduler = new_scheduler(DaemonSettings())
    ran: list[str] = []
    now = datetime.now(timezone.utc)
    daily = f"{(now - timedelta(hours=3)).minute} {(now - timedelta(hours=3)).hour} * * *"
    scheduler.start()
    try:
        scheduler.add_job(ran.append, "date", run_date=now - timedelta(hours=2), args=["queued run"],
                          executor="merge", id="trigger:g")
        cron = scheduler.add_job(ran.append, CrontabTrigger(daily), args=["cron run"], id="schedule:h",
                                 next_run_time=now - timedelta(hours=3))
        polling.wait_for(lambda: len(ran) >= 2, "the late jobs", timeout=30)
        time.sleep(0.5)  # nothing more comes: the cron run is not repeated for the hours missed
        assert sorted(ran) == ["cron run", "queued run"]
        next_time = scheduler.get_job(cron.id).next_run_time
        assert timedelta(hours=20) < next_time - now < timedelta(hours=21, minutes=1)  # tomorrow's, as cron says
    finally:
        scheduler.shutdown(wait=False)
    assert "was missed by" not in caplog.text


@pytest.mark.parametrize("zone", ["UTC0", "CET-1CEST"])
def test_a_posix_tz_string_does_not_stop_the_daemon(made, tmp_path, daemons, monkeypatch, zone):
    """``TZ=UTC0`` and ``TZ=CET-1CEST`` are valid for libc, not for tzlocal: the daemon's
    interval jobs and the config's cron check asked APScheduler for the local zone, and
    ``run`` and ``status --config`` died with a ZoneInfoNotFoundError traceback. Every
    schedule is UTC, so the local zone is never needed."""
    base = made[0]
    (tmp_path / "watched").mkdir()
    config = tmp_path / "daemon.toml"
    config.write_text(f"""
[daemon]
state_dir = {json.dumps(str(tmp_path / "state"))}
[[sources]]
name = "team"
kind = "local"
paths = [{json.dumps(str(tmp_path / "watched"))}]
[[groups]]
name = "unified"
base_model = {json.dumps(str(base))}
cron = "0 3 * * *"
[[groups.destinations]]
kind = "folder"
path = {json.dumps(str(tmp_path / "published"))}
""")
    monkeypatch.setenv("TZ", zone)
    daemon = daemons(config, tmp_path / "daemon.log")
    daemon.wait_event("notify", r"^READY=1$")
    assert daemon.stop() == 0, daemon.tail()
    assert "Traceback" not in daemon.tail()
    status = subprocess.run([sys.executable, "-m", "iteris_daemon", "status", "--config", str(config)],
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "unified" in status.stdout, status.stderr


def test_a_second_daemon_on_the_same_state_folder_is_refused_and_a_killed_one_leaves_no_lock(tmp_path, daemons):
    """A second daemon on one state folder (`iteris-daemon run` by hand beside the service)
    started, and its start-up cleanup deleted the first's run folders: the first's merge
    failed (FileNotFoundError, found by QA). It is refused at once in one line naming the
    folder and the holder's pid, exit 2, before touching anything there; the lock is an
    flock, so the first killed by SIGKILL leaves none and the next start goes on."""
    (tmp_path / "watched").mkdir()
    config = tmp_path / "daemon.toml"
    state = tmp_path / "state"
    config.write_text(f"[daemon]\nstate_dir = {json.dumps(str(state))}\ngrace_seconds = 1\n"
                      f"cache_dir = {json.dumps(str(tmp_path / 'cache'))}\n[[sources]]\nname = \"team\"\n"
                      f'kind = "local"\npaths = [{json.dumps(str(tmp_path / "watched"))}]\n')
    first = daemons(config, tmp_path / "first.log", "first")
    first.wait_event("notify", r"^READY=1$")
    running = state / "runs" / ".inputs-running"  # a merge of the first daemon's, under way
    running.mkdir()
    second = daemons(config, tmp_path / "second.log", "second")
    assert second.wait(60) == 2
    assert second.tail().splitlines()[-1] == (f"iteris-daemon: error: another daemon (pid {first.proc.pid}) uses the state folder "
                                              f"{state} (it holds {state / 'daemon.lock'}): one daemon per state "
                                              "folder; stop that one, or give this one another [daemon] state_dir")
    assert not second.logs("catalog") and running.is_dir()
    # A run whose end was recorded, killed before its folder went, and a staging copy of its merge (QA OPS).
    ended = [state / "runs" / "run-9", state / "runs" / ".run-9.x1y2"]
    for folder in ended:
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"half")
    assert first.kill() == -signal.SIGKILL
    third = daemons(config, tmp_path / "third.log", "third")
    third.wait_event("notify", r"^READY=1$")
    assert not running.exists() and not any(f.exists() for f in ended)  # its start's cleanup: the killed one's leftovers
    assert (state / "runs").is_dir()
    assert (state / "daemon.lock").read_text() == f"{third.proc.pid}\n"
    assert third.stop() == 0, third.tail()


def test_a_state_folder_on_a_full_disk_stops_the_start_in_one_line(tmp_path, monkeypatch):
    """The lock file opened but its pid not written (a full disk: the file system is mocked
    here, since a full one needs a mount): a raw ``OSError`` traceback ended the start (QA
    MIG). Now a ConfigError naming the file and the setting, and the descriptor is closed."""
    import errno

    from iteris_daemon import daemon
    from iteris_daemon.errors import ConfigError

    opened: list[int] = []
    real_open = os.open

    def tracked(*args, **kwargs) -> int:
        opened.append(real_open(*args, **kwargs))
        return opened[-1]

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(daemon.os, "open", tracked)
    monkeypatch.setattr(daemon.os, "write", full)
    with pytest.raises(ConfigError, match=r"cannot write the lock file .*daemon\.lock \(No space left on device\); "
                                          r"\[daemon\] state_dir sets its folder"):
        daemon.lock_state(tmp_path)
    monkeypatch.undo()
    with pytest.raises(OSError):
        os.fstat(opened[0])  # closed


@pytest.mark.timeout(120)
def test_stopping_never_deadlocks_with_a_job_that_uses_the_scheduler(tmp_path):
    """A job still running when SIGTERM arrives (a tick, a source reporting a change) may
    call the scheduler; stopping must wait for it, not deadlock on the scheduler's lock
    (APScheduler's shutdown(wait=True) holds it while waiting). Runs ``Daemon.run`` in
    this process's main thread, as the CLI does; a deadlock trips the test's timeout."""
    from iteris_daemon.daemon import Daemon

    config = tmp_path / "daemon.toml"
    config.write_text(f"[daemon]\nstate_dir = {json.dumps(str(tmp_path / 'state'))}\n"
                      f"cache_dir = {json.dumps(str(tmp_path / 'cache'))}\ngrace_seconds = 1\n")
    daemon = Daemon(config)
    finished: list[str] = []

    def probe() -> None:
        wait_for(lambda: daemon.scheduler is not None and daemon.scheduler.running, "the scheduler")
        entered = threading.Event()

        def job() -> None:
            entered.set()
            time.sleep(1.0)  # the daemon starts stopping meanwhile
            daemon.scheduler.get_job("tick")
            finished.append("job")

        daemon.scheduler.add_job(job, id="probe")
        entered.wait(30)
        os.kill(os.getpid(), signal.SIGTERM)

    assert polling.run_here(daemon, probe) == 0
    assert finished == ["job"]  # it was waited for, and it completed


@pytest.mark.timeout(120)
def test_a_reload_the_catalog_fails_keeps_the_running_sources(tmp_path, monkeypatch, caplog):
    """SIGHUP while the catalog is unreachable (its PostgreSQL restarting, say) ended the
    daemon with an OperationalError traceback, after its folder watchers had been stopped.
    Now the reload fails with an ERROR, and the running sources and jobs stay as they were.
    The outage is a stand-in (``sync_sources`` raising the error a lost server gives)."""
    import iteris_daemon.daemon as daemon_module
    from sqlalchemy.exc import OperationalError

    watched = tmp_path / "watched"
    watched.mkdir()
    config = tmp_path / "daemon.toml"
    config.write_text(f"[daemon]\nstate_dir = {json.dumps(str(tmp_path / 'state'))}\n"
                      f"cache_dir = {json.dumps(str(tmp_path / 'cache'))}\ngrace_seconds = 1\n"
                      f'[[sources]]\nname = "team"\nkind = "local"\npaths = [{json.dumps(str(watched))}]\n')
    daemon = daemon_module.Daemon(config)
    seen: dict[str, object] = {}

    def unreachable(catalog, config):
        raise OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))

    def probe() -> None:
        wait_for(lambda: daemon.scheduler is not None and daemon.scheduler.running and "team" in daemon._local,
                 "the daemon watching its folder")
        seen["before"] = daemon._local["team"]
        monkeypatch.setattr(daemon_module, "sync_sources", unreachable)
        os.kill(os.getpid(), signal.SIGHUP)
        wait_for(lambda: any("reload failed" in r.getMessage() for r in caplog.records), "the reload's error")
        seen["after"] = daemon._local.get("team")
        seen["jobs"] = {job.id for job in daemon.scheduler.get_jobs()}
        os.kill(os.getpid(), signal.SIGTERM)

    assert polling.run_here(daemon, probe) == 0
    error = next(r.getMessage() for r in caplog.records if "reload failed" in r.getMessage())
    assert error == ("reload failed, keeping the running configuration: OperationalError: "
                     "(builtins.ConnectionRefusedError) connection refused"), error
    assert seen["after"] is seen["before"] and "rescan:team" in seen["jobs"]


@pytest.mark.timeout(120)
def test_a_reload_to_a_merge_device_not_on_this_host_is_refused(tmp_path, monkeypatch, caplog):
    """SIGHUP with ``[daemon] device = "cuda"`` on a host without CUDA (``CUDA_VISIBLE_DEVICES=""``
    hides any GPU here): refused like a broken config, naming the field, so that the next
    start does not fail on it; the running configuration stays."""
    from iteris_daemon.daemon import Daemon

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    config = tmp_path / "daemon.toml"
    running = (f"[daemon]\nstate_dir = {json.dumps(str(tmp_path / 'state'))}\n"
               f"cache_dir = {json.dumps(str(tmp_path / 'cache'))}\ngrace_seconds = 1\n")
    config.write_text(running)
    daemon = Daemon(config)

    def probe() -> None:
        wait_for(lambda: daemon.scheduler is not None and daemon.scheduler.running, "the scheduler")
        config.write_text(running + 'device = "cuda:0"\n')
        os.kill(os.getpid(), signal.SIGHUP)
        wait_for(lambda: any("reload failed" in r.getMessage() for r in caplog.records), "the reload's error")
        os.kill(os.getpid(), signal.SIGTERM)

    assert polling.run_here(daemon, probe) == 0
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        f"reload failed, keeping the running configuration: {config}: [daemon] device: 'cuda:0' is not available "
        "here: torch sees 0 CUDA devices (available: cpu)"]
    assert daemon.config.daemon.device == "cpu"


@pytest.mark.timeout(120)
def test_a_reload_renews_the_webhook_secret_and_a_refused_one_stays_in_the_status(tmp_path, caplog):
    """A rotated webhook secret and SIGHUP: "configuration reloaded", yet the secret read at
    start stayed in force (the new one got 401); and a refused reload left no sign but an ERROR
    line, systemd's status unchanged, until the next start failed on the config (QA CFG). Now
    the reload takes the new secret (and path), and the status (READY's STATUS, what `systemctl
    status` shows) says the reload was refused until one goes through; so do `iteris-daemon
    status` (from the daemon's catalog row, in the text and ``--json``) and ``/metrics``
    (``iteris_reload_refused``), which said nothing of it. Real HTTP to the webhook and metrics."""
    import urllib.error
    import urllib.request

    from iteris_daemon.daemon import Daemon
    from iteris_daemon.status import collect, render

    secret = tmp_path / "secret"
    secret.write_text("old-secret\n")
    secret.chmod(0o600)
    config = tmp_path / "daemon.toml"
    head = (f"[daemon]\nstate_dir = {json.dumps(str(tmp_path / 'state'))}\n"
            f"cache_dir = {json.dumps(str(tmp_path / 'cache'))}\ngrace_seconds = 1\n"
            '[daemon.metrics]\nlisten = "127.0.0.1:0"\n')
    hooks = '[daemon.webhooks]\nlisten = "127.0.0.1:0"\nsecret_file = "secret"\npath = "{}"\n'
    config.write_text(head + hooks.format("/webhooks/hub"))
    daemon = Daemon(config)
    statuses: list[str] = []
    seen: dict[str, object] = {}

    def answer(path: str, given: str) -> int:
        port = next(server.port for server in daemon._servers if server.name == "webhooks")
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b"{}", method="POST",
                                         headers={"X-Webhook-Secret": given, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    def refused_metric() -> str:
        port = next(server.port for server in daemon._servers if server.name == "metrics")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
            return next(line for line in response.read().decode().splitlines()
                        if line.startswith("iteris_reload_refused "))

    def shown() -> tuple[str | None, str]:
        """What ``status`` shows of this daemon, once its row is written (the peers job)."""
        report = collect(daemon.catalog)
        (row,) = report["daemons"] or [{"reload_refused": "(no row yet)"}]
        return row["reload_refused"], render(report)

    def reload_and_wait(said: str) -> None:
        before = caplog.text.count(said)
        os.kill(os.getpid(), signal.SIGHUP)
        wait_for(lambda: caplog.text.count(said) > before, said)

    def probe() -> None:
        wait_for(lambda: daemon.scheduler is not None and daemon.scheduler.running, "the scheduler")
        daemon.notifier.ready = lambda status=None: statuses.append(status) or True
        seen["at start"] = answer("/webhooks/hub", "old-secret"), answer("/webhooks/hub", "new-secret")
        wait_for(lambda: shown()[0] is None, "the daemon's row")
        seen["metric at start"] = refused_metric()
        secret.write_text("new-secret\n")
        config.write_text(head + hooks.format("/hooks/hub"))
        reload_and_wait("configuration reloaded")
        seen["rotated"] = (answer("/hooks/hub", "old-secret"), answer("/hooks/hub", "new-secret"),
                           answer("/webhooks/hub", "new-secret"))
        config.write_text(head + hooks.format("/hooks/hub") + "typo = 1\n")
        reload_and_wait("reload failed")
        seen["refused"] = statuses[-1]
        wait_for(lambda: shown()[0] is not None, "the refusal in the daemon's row")
        seen["status refused"], seen["metric refused"] = shown(), refused_metric()
        config.write_text(head + hooks.format("/hooks/hub"))
        reload_and_wait("configuration reloaded")
        seen["mended"] = statuses[-1]
        wait_for(lambda: shown()[0] is None, "the refusal gone from the daemon's row")
        seen["status mended"], seen["metric mended"] = shown(), refused_metric()
        os.kill(os.getpid(), signal.SIGTERM)

    with caplog.at_level(logging.INFO, logger="iteris_daemon"):
        assert polling.run_here(daemon, probe) == 0
    assert seen["at start"] == (400, 401), seen  # past the right secret, a body that is no Hub event: 400
    assert seen["rotated"] == (401, 400, 404), seen
    assert seen["refused"].startswith("watching 0 folder and 0 hub sources, 0 merge groups; the last reload was "
                                      f"refused, running the configuration before it: {config}: "), seen
    assert "typo" in seen["refused"] and "\n" not in seen["refused"]
    assert seen["mended"] == "watching 0 folder and 0 hub sources, 0 merge groups", seen
    reason, text = seen["status refused"]
    assert reason.startswith(f"{config}: ") and "typo" in reason, reason
    assert (f"\n    its last reload was refused, it runs the configuration before it (its next start reads the "
            f"refused file): {reason}") in text, text
    assert "OTHER SETTINGS" not in text  # the refusal is this daemon's own, not a setting daemons share
    assert seen["status mended"][0] is None and "reload was refused" not in seen["status mended"][1]
    assert (seen["metric at start"], seen["metric refused"], seen["metric mended"]) == (
        "iteris_reload_refused 0.0", "iteris_reload_refused 1.0", "iteris_reload_refused 0.0"), seen
    assert "daemon.webhooks changed" not in caplog.text


@pytest.mark.timeout(120)
@pytest.mark.parametrize("started, reloaded, warned", [
    ('["cpu", "cuda:1"]', '["cpu", "cuda:1"]', "cuda:1"),
    ('["cpu"]', '["cpu"]', None),
    ('["cpu", "cuda:1"]', '["cpu"]', "cuda:1"),  # the devices change at the next start: cuda:1 still runs merges
    ('["cpu"]', '["cpu", "cuda:1"]', None),  # ... and cuda:1 runs none before it
])
def test_a_reload_that_sets_a_memory_limit_warns_of_cuda_merges(tmp_path, monkeypatch, caplog, started, reloaded,
                                                                  warned):
    """SIGHUP setting ``worker_memory_limit_mb`` while merges run on CUDA (the worker leaves
    the limit off there: CUDA cannot start under ``RLIMIT_AS``) says so once, as the start
    does, naming the devices the running merge slots use: the start's, not the reloaded
    file's. CPU slots only: not a word. (Two GPUs faked: the devices check passes.)"""
    from iteris_daemon.daemon import Daemon
    from iteris_daemon.worker import CUDA_UNLIMITED

    monkeypatch.setattr("iteris_daemon.devices.cuda_device_count", lambda: 2)
    config = tmp_path / "daemon.toml"
    running = (f"[daemon]\nstate_dir = {json.dumps(str(tmp_path / 'state'))}\n"
               f"cache_dir = {json.dumps(str(tmp_path / 'cache'))}\ngrace_seconds = 1\n")
    config.write_text(f"{running}devices = {started}\n")
    daemon = Daemon(config)

    def probe() -> None:
        wait_for(lambda: daemon.scheduler is not None and daemon.scheduler.running, "the scheduler")
        config.write_text(f"{running}devices = {reloaded}\nworker_memory_limit_mb = 4096\n")
        os.kill(os.getpid(), signal.SIGHUP)
        wait_for(lambda: any("configuration reloaded" in r.getMessage() for r in caplog.records), "the reload")
        os.kill(os.getpid(), signal.SIGTERM)

    with caplog.at_level(logging.INFO, logger="iteris_daemon"):
        assert polling.run_here(daemon, probe) == 0
    said = [r for r in caplog.records if "worker_memory_limit_mb" in r.getMessage()]
    assert [(r.levelno, r.getMessage()) for r in said] == ([(
        logging.WARNING, f"[daemon] worker_memory_limit_mb = 4096 is not applied to the merges on {warned}: "
                         f"{CUDA_UNLIMITED}")] if warned else [])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["folder", "hub", "state"])
def test_a_catalog_source_watching_a_destination_is_not_started(tmp_path, caplog, monkeypatch, kind):
    """A source added with ``sources add`` on a group's destination folder, polling the Hub
    branch a group publishes to, or watching a folder that holds the daemon's state folder
    (its runs: merges, published and kept copies) (the config refuses these for its own
    sources, but never saw this one) registered each merge as an adapter and merged it
    again, rank growing, without end. Now the daemon does not start that source, with an
    ERROR saying why; the config's own sources run. (The daemon also gives its Hub requests
    the configured timeout.)"""
    import iteris_daemon.daemon as daemon_module

    bounds: list[float] = []
    monkeypatch.setattr(daemon_module, "bound_requests", bounds.append)
    watched, published = tmp_path / "watched", tmp_path / "published"
    watched.mkdir()
    published.mkdir()
    db = f"sqlite:///{tmp_path / 'catalog.db'}"
    sneaky, destination, job, why = {
        "folder": (["--folder", str(published)], f"kind = \"folder\"\npath = {json.dumps(str(published / 'unified'))}\n",
                   "rescan:sneaky", f"its folder {published} overlaps the destination {published / 'unified'} of group 'g'"),
        "hub": (["--hub-author", "acme"], 'kind = "hub"\nrepo_id = "acme/unified"\n', "poll:sneaky",
                "it polls acme/unified@main, where group 'g' publishes"),
        "state": (["--folder", str(tmp_path / "state")], f"kind = \"folder\"\npath = {json.dumps(str(published))}\n",
                  "rescan:sneaky", f"its folder {tmp_path / 'state'} holds the daemon's state folder {tmp_path / 'state'}"),
    }[kind]
    (tmp_path / "state").mkdir()
    assert main(["sources", "add", "sneaky", *sneaky, "--db", db]) == 0
    config = tmp_path / "daemon.toml"
    config.write_text(f"[daemon]\ndatabase = {json.dumps(db)}\nstate_dir = {json.dumps(str(tmp_path / 'state'))}\n"
                      f"cache_dir = {json.dumps(str(tmp_path / 'cache'))}\ngrace_seconds = 1\nhub_timeout_seconds = 7\n"
                      f'[[sources]]\nname = "team"\nkind = "local"\npaths = [{json.dumps(str(watched))}]\n'
                      f'[[groups]]\nname = "g"\nbase_model = "b"\n[[groups.destinations]]\n{destination}')
    daemon = daemon_module.Daemon(config)
    seen: dict[str, object] = {}

    def probe() -> None:
        wait_for(lambda: daemon.scheduler is not None and daemon.scheduler.running and "team" in daemon._local,
                 "the daemon watching its folder")
        seen["sources"] = {*daemon._local, *daemon._hub}
        seen["jobs"] = {job.id for job in daemon.scheduler.get_jobs()}
        os.kill(os.getpid(), signal.SIGTERM)

    assert polling.run_here(daemon, probe) == 0
    assert seen["sources"] == {"team"} and job not in seen["jobs"] and bounds == [7.0]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [f"source sneaky not started: {why}; the daemon would register its own merges as adapters "
                      "(`iteris-daemon sources remove sneaky`, or watch elsewhere)"], errors
    catalog = Catalog(db)
    with catalog.session() as session:
        sneaky = session.scalar(select(Source).where(Source.name == "sneaky"))
        assert (sneaky.healthy, sneaky.last_error) == (False, f"not started: {errors[0].split(': ', 1)[1]}")
    catalog.close()


@pytest.mark.timeout(120)
def test_a_catalog_source_whose_stored_settings_this_release_refuses_is_down_saying_how_to_mend_it(
        tmp_path, caplog, capsys):
    """A source `sources add` stored under an earlier release, whose settings this one refuses
    (one Hub adapter named twice: merged twice before): the daemon logged a pydantic dump
    on one line and never polled it, while `status`, `sources list` and the metrics called
    it healthy, and groups kept merging its last revisions (QA UP). Now it is down, saying
    why and how to mend it; the config's sources run."""
    from prometheus_client import generate_latest

    import iteris_daemon.daemon as daemon_module
    from iteris_daemon.catalog.registry import add_source
    from iteris_daemon.endpoints import DaemonMetrics

    watched = tmp_path / "watched"
    watched.mkdir()
    db = f"sqlite:///{tmp_path / 'catalog.db'}"
    assert main(["db", "upgrade", "--db", db]) == 0
    catalog = Catalog(db)
    with catalog.session() as session:  # as 0a59bf3's `sources add` stored it
        add_source(session, "dup", SourceKind.hub, {"repos": ["acme/b", "acme/b@main"]})
    config = tmp_path / "daemon.toml"
    config.write_text(f"[daemon]\ndatabase = {json.dumps(db)}\nstate_dir = {json.dumps(str(tmp_path / 'state'))}\n"
                      f"cache_dir = {json.dumps(str(tmp_path / 'cache'))}\n"
                      f'[[sources]]\nname = "team"\nkind = "local"\npaths = [{json.dumps(str(watched))}]\n')
    daemon = daemon_module.Daemon(config)
    listed: dict[str, str] = {}

    def sources_list() -> str:
        capsys.readouterr()
        assert main(["sources", "list", "--db", db]) == 0
        return capsys.readouterr().out

    def mend(**changes) -> None:
        with catalog.session() as session:
            row = session.scalar(select(Source).where(Source.name == "dup"))
            for key, value in changes.items():
                setattr(row, key, value)

    def probe() -> None:
        wait_for(lambda: daemon.scheduler is not None and daemon.scheduler.running and "team" in daemon._local,
                 "the daemon watching its folder")
        listed["down"] = sources_list()
        assert main(["status", "--db", db]) == 0
        listed["status"] = capsys.readouterr().out
        listed["metrics"] = generate_latest(DaemonMetrics(catalog).registry).decode()
        # Mended as the line says: `sources remove` (the row disabled, as for a source of past
        # runs), a catalog check, `sources add` (the same row enabled with new settings), a check.
        mend(enabled=False)
        daemon._follow_catalog_sources()
        mend(enabled=True, settings={"repos": ["acme/b"], "endpoint": "http://127.0.0.1:9", "retry_attempts": 1})
        daemon._follow_catalog_sources()
        listed["polled"] = str("dup" in daemon._hub)
        os.kill(os.getpid(), signal.SIGTERM)

    assert polling.run_here(daemon, probe) == 0
    catalog.close()
    why = ("its settings: repos: 'acme/b@main' names the adapter 'acme/b' names too; `iteris-daemon sources remove "
           "dup`, then add it again with settings that pass (a source of the config file: mend it there)")
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors[0] == f"source dup not started: {why}"
    assert re.search(r"dup +hub +enabled +(?!ok)", listed["down"]) and f"not started: {why}" in listed["down"]
    assert re.search(r"\n  dup +hub +UNHEALTHY \(not started: ", listed["status"]) and why in listed["status"]
    assert 'iteris_source_up{source="dup"} 0.0' in listed["metrics"] and 'source_up{source="team"} 1.0' in listed["metrics"]
    assert listed["polled"] == "True"  # before, a source mended so was shown ok and never polled until a restart


def test_the_catalog_check_triggers_a_group_once_per_selection(tmp_path, monkeypatch):
    """``Daemon._catch_up``'s rules, with ``groups_behind`` (tested on a real catalog in
    test_run_inputs.py) replaced by a stand-in: a group behind is triggered once per
    selection (a run that fails before it is recorded must not be retried every check),
    never while a trigger is pending (it would push a debounced run back, for ever) or
    while the group's run is under way (that run gathers its inputs anew)."""
    import iteris_daemon.daemon as daemon_module
    from apscheduler.schedulers.background import BackgroundScheduler

    config = tmp_path / "daemon.toml"
    config.write_text(f"[daemon]\nstate_dir = {json.dumps(str(tmp_path / 'state'))}\n")
    daemon = daemon_module.Daemon(config)
    daemon.scheduler = BackgroundScheduler()  # not started: jobs are only recorded
    daemon._groups = {"g": SimpleNamespace(name="g", debounce_seconds=5.0)}
    behind: dict[str, frozenset[int]] = {}
    monkeypatch.setattr(daemon_module, "groups_behind", lambda catalog, groups: dict(behind))
    triggered = []
    monkeypatch.setattr(daemon, "trigger", lambda name, delay: triggered.append((name, delay)))
    monkeypatch.setattr(daemon, "_follow_catalog_sources", lambda: None)  # the stand-in sources are in no catalog
    daemon.catalog = SimpleNamespace(check_file=lambda: None)  # nor is there one: groups_behind is a stand-in

    daemon._catch_up()
    assert triggered == []  # not behind
    behind["g"] = frozenset({1, 2})
    daemon._catch_up()
    daemon._catch_up()  # the same selection again (its run failed unrecorded, say): not again
    assert triggered == [("g", 5.0)]
    behind["g"] = frozenset({1, 3})
    daemon._catch_up()
    assert triggered == [("g", 5.0)] * 2

    behind["g"] = frozenset({4})
    daemon.scheduler.add_job(print, "date", id="trigger:g")  # a run is due
    daemon._catch_up()
    daemon.scheduler.remove_job("trigger:g")
    daemon._group_locks["g"] = threading.Lock()
    daemon._group_locks["g"].acquire()  # a run is under way
    daemon._catch_up()
    assert len(triggered) == 2
    daemon._group_locks["g"].release()
    daemon._catch_up()  # neither: the selection was not taken as asked for
    assert triggered == [("g", 5.0)] * 3

    del behind["g"]
    daemon._catch_up()  # caught up (its run merged {4})...
    behind["g"] = frozenset({4})
    daemon._catch_up()  # ... so {4} again later is a change again (an adapter removed twice, say)
    assert triggered == [("g", 5.0)] * 4

    behind["g"] = frozenset({5})
    daemon._local = {"folder": SimpleNamespace(name="folder", busy=True)}  # half through a scan
    daemon._hub = {"hub": SimpleNamespace(name="hub", busy=False)}
    daemon._catch_up()
    assert len(triggered) == 4  # the scan reports its change when done
    daemon._local["folder"].busy = False
    daemon._hub["hub"].busy = True
    daemon._catch_up()
    assert len(triggered) == 4
    daemon._hub["hub"].busy = False
    daemon._catch_up()
    assert triggered == [("g", 5.0)] * 5


def _daemon_with_paused_jobs(tmp_path: Path, names: tuple[str, ...]):
    """A Daemon on a SQLite catalog whose scheduler keeps jobs and runs none, a folder per
    name (the config declares the first as a folder source): (daemon, folders, config, url)."""
    import iteris_daemon.daemon as daemon_module
    from apscheduler.schedulers.background import BackgroundScheduler

    folders = {name: tmp_path / name for name in names}
    for folder in folders.values():
        folder.mkdir()
    config = tmp_path / "daemon.toml"
    config.write_text(f"[daemon]\nstate_dir = {json.dumps(str(tmp_path / 'state'))}\n[[sources]]\nname = "
                      f'{json.dumps(names[0])}\nkind = "local"\npaths = [{json.dumps(str(folders[names[0]]))}]\n')
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    daemon = daemon_module.Daemon(config)
    daemon.scheduler = BackgroundScheduler()
    daemon.scheduler.start(paused=True)  # keeps jobs, runs none
    daemon.catalog = Catalog(url)
    daemon.work = tmp_path / "state" / "runs"
    return daemon, folders, config, url


def test_a_source_removed_from_the_catalog_stops_at_the_next_catalog_check(tmp_path, capsys, caplog):
    """`sources remove` under a running daemon printed "removed source", but the daemon kept
    watching the folder and registering its adapters, which its groups merged, even after a
    reload; a source whose row was deleted failed at every look, for ever. The catalog check
    stops each source removed (disabled or deleted), saying so once; `sources remove` refuses
    a source the config declares (the daemon would add it again)."""
    import iteris_daemon.daemon as daemon_module
    from iteris_daemon.catalog.models import SourceKind
    from iteris_daemon.catalog.registry import add_source
    from iteris_daemon.sources.local import LocalFolderSource

    daemon, folders, config, url = _daemon_with_paused_jobs(tmp_path, ("team", "extra", "kept"))
    daemon_module.sync_sources(daemon.catalog, daemon.config)
    with daemon.catalog.session() as session:
        for name in ("extra", "kept"):
            add_source(session, name, SourceKind.local, {"paths": [str(folders[name])]})
    for name in folders:
        daemon._local[name] = LocalFolderSource(daemon.catalog, name)
        daemon._local[name].start()
        daemon.scheduler.add_job(print, "interval", seconds=600, id=f"rescan:{name}")
    watching = dict(daemon._local)
    try:
        daemon._catch_up()
        assert set(daemon._local) == set(folders)
        code = main(["sources", "remove", "team", "--config", str(config), "--db", url])
        assert code == 2 and capsys.readouterr().err.endswith(  # after the watchers' log lines
            f"iteris-daemon: error: source team is declared in {config}: remove it there and reload the daemon "
            "(SIGHUP); `sources remove` would be undone at the daemon's next reload or start\n")
        for name in ("extra", "team"):  # team: without --config, the command cannot know
            assert main(["sources", "remove", name, "--db", url]) == 0
            assert capsys.readouterr().out == (f"removed source {name}; a running daemon stops watching it at its "
                                               "next catalog check ([daemon] catalog_check_seconds)\n")
        caplog.clear()
        daemon._catch_up()
        daemon._catch_up()
        assert set(daemon._local) == {"kept"} and daemon._local["kept"]._watching()
        assert not watching["extra"]._watching() and not watching["team"]._watching()
        assert [job.id for job in daemon.scheduler.get_jobs()] == ["rescan:kept"]
        assert sorted(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING) == [
            "source extra was removed from the catalog (`iteris-daemon sources remove`): no longer watched",
            "source team was removed from the catalog (`iteris-daemon sources remove`): no longer watched, until a "
            "reload or restart adds it again: the config declares it; remove it there"]
    finally:
        for source in watching.values():
            source.stop()
        daemon.scheduler.shutdown(wait=False)
        daemon.catalog.close()


def test_a_source_added_to_the_catalog_starts_at_the_next_catalog_check(tmp_path, capsys, caplog):
    """`sources add` under a running daemon: the new source was not watched (nor polled)
    until a SIGHUP or a restart, though the catalog check stopped removed ones (found by
    QA). The check starts each source added, saying so once; one removed and added again
    starts again; `sources add` says when a running daemon picks it up."""
    daemon, folders, config, url = _daemon_with_paused_jobs(tmp_path, ("team", "side"))
    daemon.cache, daemon.shapes, daemon.peers = tmp_path / "cache", None, SimpleNamespace(settings_changed=lambda: None)
    try:
        daemon._apply(daemon.config)
        assert set(daemon._local) == {"team"}
        for name, where in (("side", ["--folder", str(folders["side"])]), ("remote", ["--hub-repo", "alice/lora"])):
            assert main(["sources", "add", name, *where, "--db", url]) == 0
            assert capsys.readouterr().out == (
                f"added {'local' if name == 'side' else 'hub'} source {name}; a running daemon starts "
                f"{'watching' if name == 'side' else 'polling'} it at its next catalog check ([daemon] "
                f"catalog_check_seconds); `iteris-daemon sources scan {name} --db {url}` registers what it holds now\n")
        caplog.clear()
        daemon._catch_up()
        daemon._catch_up()
        assert set(daemon._local) == {"team", "side"} and daemon._local["side"]._watching()
        assert set(daemon._hub) == {"remote"} and daemon._polled == ["remote"]
        assert {job.id for job in daemon.scheduler.get_jobs()} >= {"rescan:team", "rescan:side", "poll:remote"}
        assert sorted(r.getMessage() for r in caplog.records if r.name == "iteris_daemon.daemon") == [
            "source remote was added to the catalog (`iteris-daemon sources add`): polling it now",
            "source side was added to the catalog (`iteris-daemon sources add`): watching it now"]
        assert main(["sources", "remove", "side", "--db", url]) == 0
        daemon._catch_up()
        assert "side" not in daemon._local
        assert main(["sources", "add", "side", "--folder", str(folders["side"]), "--db", url]) == 0
        daemon._catch_up()
        assert daemon._local["side"]._watching()
    finally:
        for source in daemon._local.values():
            source.stop()
        daemon.scheduler.shutdown(wait=False)
        daemon.catalog.close()


@pytest.fixture
def daemon_of_groups(tmp_path):
    """Makes a daemon on a catalog, with a group per name -> ``select`` name patterns,
    each debounced 10 s; its scheduler keeps jobs but is paused (runs nothing)."""
    import iteris_daemon.daemon as daemon_module
    from apscheduler.schedulers.background import BackgroundScheduler
    from iteris_daemon.config import GroupConfig

    made_daemons = []

    def make(catalog: Catalog, base: Path, selects: dict[str, list[str]]):
        config = tmp_path / "daemon.toml"
        config.write_text(f"[daemon]\nstate_dir = {json.dumps(str(tmp_path / 'state'))}\n")
        daemon = daemon_module.Daemon(config)
        daemon.scheduler, daemon.catalog = BackgroundScheduler(timezone="UTC"), catalog
        daemon.scheduler.start(paused=True)
        made_daemons.append(daemon)
        daemon._groups = {name: GroupConfig(name=name, base_model=str(base), select={"names": names},
                                            debounce_seconds=10,
                                            destinations=[{"kind": "folder", "path": str(tmp_path / name)}])
                          for name, names in selects.items()}
        return daemon

    yield make
    for daemon in made_daemons:
        daemon.scheduler.shutdown(wait=False)


@pytest.fixture
def watched_team(tmp_path, made):
    """A catalog with local source "team" over ``watched`` (settling in 0.3 s), and the base model."""
    from iteris_daemon.catalog.models import SourceKind
    from iteris_daemon.catalog.registry import add_source

    base, _ = made
    watched = tmp_path / "watched"
    watched.mkdir()
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    with catalog.session() as session:
        add_source(session, "team", SourceKind.local, {"paths": [str(watched)], "base_model": str(base),
                                                       "settle_seconds": 0.3})
    yield catalog, watched, base
    catalog.close()


def _run_date(daemon, group: str):
    job = daemon.scheduler.get_job(f"trigger:{group}")
    return job and job.next_run_time


def test_a_change_triggers_only_the_groups_that_select_it(made, watched_team, daemon_of_groups):
    """Adapters the folder source registers or removes (real events) trigger the groups
    whose ``select`` takes them, and no other. Before the fix every change triggered
    every group, pushing each one's pending run back: a group with a new adapter was put
    off for as long as an adapter it does not merge kept changing (a trainer saving
    checkpoints; found by QA)."""
    from iteris_daemon.sources.local import LocalFolderSource

    catalog, watched, base = watched_team
    _, (lora0, lora1, _) = made
    daemon = daemon_of_groups(catalog, base, {"letters": ["a*"], "noise": ["n*"]})
    source = LocalFolderSource(catalog, "team", on_change=partial(daemon._inputs_changed, "team"))
    source.start()
    try:
        shutil.copytree(lora0, watched / "noisy")
        wait_for(lambda: _run_date(daemon, "noise"), "the trigger of the group that selects it")
        assert _run_date(daemon, "letters") is None
        shutil.copytree(lora1, watched / "a0")
        wait_for(lambda: _run_date(daemon, "letters"), "the trigger of the group that selects it")
        assert _run_date(daemon, "noise") < _run_date(daemon, "letters")  # not put back by a0
        for group in ("letters", "noise"):  # as if both had run
            daemon.scheduler.remove_job(f"trigger:{group}")
        shutil.rmtree(watched / "a0")
        wait_for(lambda: _run_date(daemon, "letters"), "the trigger of the group that merged it")
        assert _run_date(daemon, "noise") is None
    finally:
        source.stop()


def test_changes_put_a_run_off_no_longer_than_its_maximum_wait(tmp_path, made, watched_team, daemon_of_groups,
                                                               monkeypatch):
    """Each change to a group's inputs puts its pending run off to ``debounce_seconds``
    later, but never past ``MAX_DEBOUNCE_WAITS`` debounce periods after the first change
    no run has begun since; a run that begins starts that count anew. Before the fix a
    change every few seconds put the run off for as long as the changes came."""
    import iteris_daemon.daemon as daemon_module
    from iteris_daemon.catalog.models import RunStatus
    from iteris_daemon.sources.local import LocalFolderSource, ScanReport

    catalog, watched, base = watched_team
    shutil.copytree(made[1][0], watched / "a0")
    (locator,) = LocalFolderSource(catalog, "team").scan().registered
    daemon = daemon_of_groups(catalog, base, {"letters": ["a*"]})
    debounce, longest = timedelta(seconds=10), daemon_module.MAX_DEBOUNCE_WAITS * timedelta(seconds=10)

    daemon._inputs_changed("team", ScanReport(registered=[locator]))
    first = daemon._unmerged_since["letters"]
    assert _run_date(daemon, "letters") == first + debounce
    daemon._unmerged_since["letters"] = first = first - longest + debounce / 2  # changes came all that while
    daemon._inputs_changed("team", ScanReport(registered=[locator]))
    assert _run_date(daemon, "letters") == first + longest  # half a debounce period from now, not a whole one

    monkeypatch.setattr(daemon_module, "run_group", lambda *a, **k: RunOutcome(RunStatus.skipped, 1))
    daemon.work, daemon.cache, daemon.metrics = tmp_path / "work", tmp_path / "cache", SimpleNamespace()
    daemon._run_on("letters", "cpu")  # the run reads every change so far
    daemon._inputs_changed("team", ScanReport(removed=[locator]))
    assert _run_date(daemon, "letters") == daemon._unmerged_since["letters"] + debounce


def test_sources_in_the_catalog_but_not_in_the_config_are_named_at_start(tmp_path, caplog):
    """A source renamed in the config stays in the catalog and keeps watching its folders
    (the config adds and updates sources; `sources add` ones must stay): the log says so."""
    from iteris_daemon.catalog.models import SourceKind
    from iteris_daemon.catalog.registry import add_source
    from iteris_daemon.config import load_config
    from iteris_daemon.daemon import sync_sources

    config = tmp_path / "daemon.toml"
    config.write_text(f'[[sources]]\nname = "team"\nkind = "local"\npaths = [{json.dumps(str(tmp_path))}]\n')
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    sync_sources(catalog, load_config(config))
    assert "also watching" not in caplog.text
    with catalog.session() as session:
        add_source(session, "old-name", SourceKind.local, {"paths": [str(tmp_path)]})
        # a source of `sources add` that the config's of its name takes over: said, not silent (QA CFG)
        add_source(session, "added", SourceKind.local, {"paths": ["/srv/loras"]})
    with caplog.at_level(logging.INFO, logger="iteris_daemon"):
        sync_sources(catalog, load_config(config))  # the config's own source, unchanged: nothing said
        assert "takes the config's settings" not in caplog.text
        elsewhere = tmp_path.with_name(f"{tmp_path.name}-elsewhere")
        elsewhere.mkdir()
        config.write_text(config.read_text() + '[[sources]]\nname = "added"\nkind = "local"\n'
                          f'paths = [{json.dumps(str(elsewhere))}]\n')
        sync_sources(catalog, load_config(config))
    assert "source added: the catalog's local source, {'paths': ['/srv/loras']" in caplog.text
    assert "takes the config's settings" in caplog.text
    sync_sources(catalog, load_config(config))
    assert "also watching source old-name from the catalog, not in the config" in caplog.text
    assert "`iteris-daemon sources remove NAME`" in caplog.text
    assert "selects" not in caplog.text
    with config.open("a") as handle:
        handle.write('[[groups]]\nname = "g"\nbase_model = "b"\n[groups.select]\nsources = ["team", "tema"]\n'
                     '[[groups.destinations]]\nkind = "folder"\npath = "/srv/merged"\n')
    sync_sources(catalog, load_config(config))
    assert "group g selects the adapters of source tema, which is not in the catalog (or disabled)" in caplog.text
    catalog.close()


def test_a_run_that_could_not_be_carried_out_is_tried_again_with_backoff(tmp_path, monkeypatch):
    """``Daemon._run_on`` when ``run_group`` raises (the catalog locked past its timeout, its
    server down): the group is triggered again ``retry_seconds`` later, the wait doubling
    with each failure in a row up to ``retry_max_seconds``, and back to the first wait once
    a run is carried out. A pending trigger (a newer change) is left alone, and
    ``retry_seconds = 0`` leaves retries to the schedule, changes and restarts."""
    import iteris_daemon.daemon as daemon_module
    from apscheduler.schedulers.background import BackgroundScheduler
    from iteris_daemon.catalog.db import CatalogLockedError
    from iteris_daemon.catalog.models import RunStatus

    config = tmp_path / "daemon.toml"
    config.write_text(f"[daemon]\nstate_dir = {json.dumps(str(tmp_path / 'state'))}\n"
                      "retry_seconds = 30\nretry_max_seconds = 100\n")
    daemon = daemon_module.Daemon(config)
    daemon.scheduler = BackgroundScheduler()  # not started: jobs are only recorded
    daemon._groups = {"g": SimpleNamespace(name="g", base_model="base", debounce_seconds=5.0)}
    daemon.catalog, daemon.work, daemon.cache = None, tmp_path / "work", tmp_path / "cache"
    not_carried_out: list[str] = []
    daemon.metrics = SimpleNamespace(observe_merge=lambda *a: None, worker_failed=lambda *a: None,
                                     run_not_carried_out=not_carried_out.append)
    outcomes: list[object] = []

    def run_group(*args, **kwargs):
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(daemon_module, "run_group", run_group)
    triggered: list[float] = []
    monkeypatch.setattr(daemon, "trigger", lambda name, delay: triggered.append(delay))
    locked = CatalogLockedError("database is locked (test)")
    succeeded = RunOutcome(RunStatus.succeeded, 1)

    outcomes[:] = [locked, locked, locked, locked, succeeded, locked]
    for _ in range(6):
        daemon._run_on("g", "cpu")
    assert triggered == [30, 60, 100, 100, 30]  # doubling, capped; after the success the first wait again
    assert outcomes == [] and not_carried_out == ["g"] * 5  # counted for /metrics

    triggered.clear()
    daemon.scheduler.add_job(print, "date", id="trigger:g")  # a newer change is due: it retries anyway
    outcomes[:] = [locked]
    daemon._run_on("g", "cpu")
    assert triggered == []
    daemon.scheduler.remove_job("trigger:g")
    outcomes[:] = [locked]
    daemon._run_on("g", "cpu")
    assert triggered == [100]  # the failure above counted: the third in a row since the success

    daemon.config.daemon.retry_seconds = 0
    outcomes[:] = [locked]
    daemon._run_on("g", "cpu")
    assert triggered == [100]


def test_only_runs_that_merged_are_timed_as_merges(tmp_path, monkeypatch):
    """QA: ``iteris_merge_duration_seconds`` took every run not skipped, a kept merge
    published again too (0.01-0.08 s), dragging the merge times down. A run is timed when
    it merged, whatever came of it; a publish-only run and a skip are not."""
    import iteris_daemon.daemon as daemon_module
    from apscheduler.schedulers.background import BackgroundScheduler

    config = tmp_path / "daemon.toml"
    config.write_text(f"[daemon]\nstate_dir = {json.dumps(str(tmp_path / 'state'))}\nretry_seconds = 0\n")
    daemon = daemon_module.Daemon(config)
    daemon.scheduler = BackgroundScheduler()  # not started: jobs are only recorded
    daemon._groups = {"g": SimpleNamespace(name="g", base_model="base", debounce_seconds=5.0)}
    daemon.catalog, daemon.work, daemon.cache = None, tmp_path / "work", tmp_path / "cache"
    ran: list[RunOutcome] = []
    timed: list[int] = []
    daemon.metrics = SimpleNamespace(observe_merge=lambda group, seconds: timed.append(ran[-1].run_id),
                                     worker_failed=lambda *a: None)
    outcomes = [RunOutcome(RunStatus.failed, 1, "publishing failed", retry_publish=True, merged=True),
                RunOutcome(RunStatus.succeeded, 2),  # run 1's kept merge published again
                RunOutcome(RunStatus.refused, 3, "quality gate", merged=True),
                RunOutcome(RunStatus.skipped, 4, "inputs unchanged"),
                RunOutcome(RunStatus.succeeded, 5, merged=True)]
    monkeypatch.setattr(daemon_module, "run_group", lambda *args, **kwargs: ran.append(outcomes.pop(0)) or ran[-1])
    while outcomes:
        daemon._run_on("g", "cpu")
    assert timed == [1, 3, 5]


def test_a_catalog_outage_is_said_rarely_in_one_line_and_makes_healthz_unhealthy(tmp_path, monkeypatch, caplog):
    """The catalog failing the daemon's periodic jobs (its PostgreSQL down, a full disk;
    a stand-in raising the error a lost server gives, on the jobs' own clock): each job
    says so in one WARNING naming the catalog, then once a minute with a count, and in an
    INFO line once it answers; tracebacks only at DEBUG, a bug still raises. /healthz's
    check fails once a job has failed for 3 catalog checks in a row, not at the first
    failure; the watchdog's does not (a restart mends no outage). Before the fix every
    failure reached APScheduler with a 110-line traceback: 6,015 lines for 60 s of
    PostgreSQL down, and /healthz said 200 all along (found by QA)."""
    import iteris_daemon.daemon as daemon_module
    from apscheduler.schedulers.background import BackgroundScheduler
    from sqlalchemy.exc import OperationalError
    from iteris_daemon.peers import Peers

    config = tmp_path / "daemon.toml"
    config.write_text(f"[daemon]\nstate_dir = {json.dumps(str(tmp_path / 'state'))}\ncatalog_check_seconds = 5\n"
                      '[[groups]]\nname = "g"\nbase_model = "b"\n[[groups.destinations]]\nkind = "folder"\n'
                      f'path = {json.dumps(str(tmp_path / "published"))}\n')
    daemon = daemon_module.Daemon(config)
    daemon._groups = {group.name: group for group in daemon.config.groups}
    daemon.scheduler = BackgroundScheduler()
    daemon.scheduler.start(paused=True)  # running (as health asks), no job runs by itself
    daemon.catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    daemon.peers = Peers(daemon.catalog, daemon.holder)
    now = [1000.0]
    daemon.catalog_health = daemon_module.CatalogHealth(lambda: daemon.catalog.safe_url, clock=lambda: now[0])
    session, failure = daemon.catalog.session, [None]

    def failing_session(*args, **kwargs):
        if failure[0] is not None:
            raise failure[0]
        return session(*args, **kwargs)

    monkeypatch.setattr(daemon.catalog, "session", failing_session)
    caplog.set_level(logging.DEBUG, logger="iteris_daemon")
    try:
        failure[0] = OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))
        for second in range(0, 80, 2):  # 80 s of outage: the tick every 2 s, the checks every 5 s (here 6)
            now[0] = 1000.0 + second
            daemon._tick()
            if second % 6 == 0:
                daemon._catch_up()
                daemon._check_peers()
            if second == 10:  # 6 tick failures, 2 checks' in 10 s: too soon
                assert daemon.health_problem() is None
            assert daemon.healthy()  # the watchdog keeps pinging
        problem = daemon.health_problem()
        said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        url = daemon.catalog.safe_url
        cause = "OperationalError: (builtins.ConnectionRefusedError) connection refused"
        assert problem == f"the catalog {url} has failed job tick for 78 s (40 times in a row): {cause}", problem
        assert said == [f"job tick: the catalog {url} failed: {cause}",
                        f"job catalog-check: the catalog {url} failed: {cause}",
                        f"job peers: the catalog {url} failed: {cause}",
                        f"job tick: the catalog {url} failed: {cause} (failing for 60 s; 29 more failures since the last "
                        "warning)",
                        f"job catalog-check: the catalog {url} failed: {cause} (failing for 60 s; 9 more failures since "
                        "the last warning)",
                        f"job peers: the catalog {url} failed: {cause} (failing for 60 s; 9 more failures since the last "
                        "warning)"], said
        assert not any(r.exc_info for r in caplog.records if r.levelno > logging.DEBUG)
        assert sum(bool(r.exc_info) for r in caplog.records) == 40 + 2 * 14  # each failure's traceback, at DEBUG

        caplog.clear()
        failure[0] = None
        now[0] += 2
        daemon._tick()
        daemon._check_peers()
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO] == [
            f"job tick: the catalog {url} answers again (it failed 40 times in 80 s)",
            f"job peers: the catalog {url} answers again (it failed 14 times in 80 s)"]
        assert "job catalog-check" in daemon.health_problem()  # not asked again yet
        daemon._catch_up()
        assert daemon.health_problem() is None

        failure[0] = RuntimeError("a bug")
        with pytest.raises(RuntimeError):
            daemon._tick()
    finally:
        daemon.scheduler.shutdown(wait=False)
        monkeypatch.undo()
        daemon.catalog.close()


def _daemon_of_one_group(tmp_path: Path):
    """A daemon with one group ``g``, a paused scheduler (jobs get their run times, nothing
    runs) and no catalog: for ``_run_on`` with a stand-in ``run_group``."""
    import iteris_daemon.daemon as daemon_module
    from apscheduler.schedulers.background import BackgroundScheduler

    config = tmp_path / "daemon.toml"
    config.write_text(f"[daemon]\nstate_dir = {json.dumps(str(tmp_path / 'state'))}\n"
                      "retry_seconds = 30\nretry_max_seconds = 100\n")
    daemon = daemon_module.Daemon(config)
    daemon.scheduler = BackgroundScheduler(timezone="UTC")
    daemon.scheduler.start(paused=True)
    daemon._groups = {"g": SimpleNamespace(name="g", base_model="base", debounce_seconds=5.0)}
    daemon.catalog, daemon.work, daemon.cache = None, tmp_path / "work", tmp_path / "cache"
    daemon.metrics = SimpleNamespace(observe_merge=lambda *a: None)
    return daemon


def test_a_group_waits_for_a_failed_calibration_worker_three_runs_in_a_row_then_merges_without_it(
        tmp_path, monkeypatch):
    """A calibration worker that fails run after run (a base past the workers' memory, say)
    made the group wait for ever, retried without end. The daemon lets it wait three runs in
    a row (each retried with backoff); the next run holds the adapter back and merges the
    rest, and so do the runs after it while the worker keeps failing. A run without a worker
    failure ends the series: a later failure is waited for again."""
    import iteris_daemon.daemon as daemon_module

    daemon = _daemon_of_one_group(tmp_path)
    asked, failing = [], True

    def run_group(*args, wait_for_calibration_workers, **kwargs) -> RunOutcome:
        asked.append(wait_for_calibration_workers)
        if failing and wait_for_calibration_workers:
            return RunOutcome(RunStatus.skipped, 1, "waiting for t: calibration source generate: killed",
                              retry_inputs=True, calibration_worker_failed=True)
        return RunOutcome(RunStatus.succeeded, 2, calibration_worker_failed=failing)

    monkeypatch.setattr(daemon_module, "run_group", run_group)
    try:
        for _ in range(5):
            daemon._run_on("g", "cpu")
        assert asked == [True, True, True, False, False]
        failing = False
        daemon._run_on("g", "cpu")  # the worker answers again
        failing = True
        daemon._run_on("g", "cpu")
        assert asked[5:] == [False, True]
        # Runs that asked no worker (another daemon merging the group, a run cancelled while
        # gathering) leave the count as it was: each one used to start the three waits anew.
        for other in (RunOutcome(RunStatus.skipped, None, CLAIMED_ELSEWHERE), RunOutcome(RunStatus.cancelled, None)):
            monkeypatch.setattr(daemon_module, "run_group", lambda *a, **k: other)
            daemon._run_on("g", "cpu")
        monkeypatch.setattr(daemon_module, "run_group", run_group)
        for _ in range(3):
            daemon._run_on("g", "cpu")
        assert asked[7:] == [True, True, False]
    finally:
        daemon.scheduler.shutdown(wait=False)


def test_a_run_whose_publishing_failed_is_tried_again_with_backoff(tmp_path, monkeypatch, caplog):
    """``run_group`` says the merge is kept but could not be published (``retry_publish``: a
    Hub down past the publisher's own retries, a full disk): the group is triggered again
    ``retry_seconds`` later, doubling up to ``retry_max_seconds``. Before, it waited for its
    schedule or its next change, hours maybe. A run that is skipped or succeeds (the merge
    went out, or the inputs changed) ends the series; a failure that is not one of
    publishing (a merge error, a publisher's plugin error) is not retried; nor is any run
    once the daemon stops. A run skipped waiting for a calibration source it could not
    reach (``retry_inputs``) is tried again too."""
    import iteris_daemon.daemon as daemon_module

    daemon = _daemon_of_one_group(tmp_path)
    outcome = RunOutcome(RunStatus.failed, 1, "publishing to hub failed", retry_publish=True)
    stop_meanwhile = False

    def run_group(*args, **kwargs) -> RunOutcome:
        if stop_meanwhile:  # SIGTERM while the run published
            daemon._stopping.set()
        return outcome

    monkeypatch.setattr(daemon_module, "run_group", run_group)

    def retried_in() -> float | None:
        """The pending retry's delay, taken off the scheduler as if it ran."""
        job = daemon.scheduler.get_job("trigger:g")
        if job is None:
            return None
        job.remove()
        return round((job.next_run_time - datetime.now(timezone.utc)).total_seconds())

    try:
        waits = []
        for _ in range(4):
            daemon._run_on("g", "cpu")
            waits.append(retried_in())
        assert waits == [30, 60, 100, 100]
        for ending in (RunOutcome(RunStatus.skipped, 2), RunOutcome(RunStatus.succeeded, 3)):
            outcome = ending
            daemon._run_on("g", "cpu")
            assert retried_in() is None
            outcome = RunOutcome(RunStatus.failed, 4, "publishing to hub failed", retry_publish=True)
            daemon._run_on("g", "cpu")
            assert retried_in() == 30  # a new series
        outcome = RunOutcome(RunStatus.failed, 5, "out of memory")  # not publishing: left to the next change
        daemon._run_on("g", "cpu")
        assert retried_in() is None
        outcome = RunOutcome(RunStatus.skipped, 7, "waiting for t: hub_dataset: HTTP 503", retry_inputs=True)
        daemon._run_on("g", "cpu")
        assert retried_in() == 30  # a calibration source it could not reach: nothing else would trigger a run
        outcome, stop_meanwhile = RunOutcome(RunStatus.failed, 6, "publishing to hub failed", retry_publish=True), True
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="iteris_daemon"):
            daemon._run_on("g", "cpu")
        assert daemon._stopping.is_set() and retried_in() is None
        assert "trying the run again" not in caplog.text  # it used to say so while stopping
    finally:
        daemon.scheduler.shutdown(wait=False)


def test_runs_due_while_a_group_merges_wait_quietly_and_other_skips_are_told(tmp_path, monkeypatch, caplog):
    """One merge slot (the default), a long merge, and the group's schedule and triggers
    firing meanwhile: APScheduler logged "maximum number of running instances reached" as
    a WARNING for each (and a scheduled run was dropped). Now a run of the group waits,
    runs once the merge ends, and any further one due meanwhile is noted at DEBUG naming
    the group; a job skipped otherwise (a poll longer than its interval) is told at INFO."""
    import iteris_daemon.daemon as daemon_module
    from iteris_daemon.catalog.models import RunStatus
    from iteris_daemon.config import GroupConfig

    config = tmp_path / "daemon.toml"
    config.write_text(f"[daemon]\nstate_dir = {json.dumps(str(tmp_path / 'state'))}\n")
    daemon = daemon_module.Daemon(config)
    daemon.scheduler = daemon_module.new_scheduler(daemon.config.daemon)
    daemon._free_devices.put("cpu")
    group = GroupConfig(name="g", base_model="base", interval_seconds=0.2,
                        destinations=[{"kind": "folder", "path": str(tmp_path / "out")}])
    daemon._groups = {"g": group}
    daemon.catalog, daemon.work, daemon.cache = None, tmp_path / "work", tmp_path / "cache"
    daemon.metrics = SimpleNamespace(observe_merge=lambda *a: None)
    merging, release, runs = threading.Event(), threading.Event(), []

    def run_group(*args, **kwargs):
        runs.append(time.monotonic())
        merging.set()
        assert release.wait(60)
        return RunOutcome(RunStatus.succeeded, len(runs))

    monkeypatch.setattr(daemon_module, "run_group", run_group)
    polling = threading.Event()
    caplog.set_level(logging.DEBUG)
    daemon.scheduler.start()
    try:
        daemon._schedule(group)
        assert merging.wait(30)
        for _ in range(3):
            daemon.trigger("g", delay=0)
            time.sleep(0.3)
        daemon.scheduler.add_job(lambda: polling.wait(60), "interval", seconds=0.2, id="poll:hub")
        wait_for(lambda: "job poll:hub skipped: its previous run is still under way (said before)" in caplog.text,
                 "the poll's second skip, at DEBUG")
        polling.set()
        daemon.scheduler.remove_job("schedule:g")
        release.set()
        # The merge, then the schedule's waiting run and the two triggers' (the third came while both waited).
        wait_for(lambda: len(runs) == 4 and not daemon._group_locks["g"].locked(), "the waiting runs of the group")
        time.sleep(0.5)
        assert len(runs) == 4
    finally:
        polling.set()
        release.set()
        daemon.scheduler.shutdown()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    # said once an hour while it lasts (a tick stuck on a blocked catalog said it every 2 s: QA PG)
    assert [r.levelno for r in caplog.records if r.getMessage() == "job poll:hub skipped: its previous run is still "
            "under way"] == [logging.INFO]
    quiet = [r for r in caplog.records if "a run was due while another waited to start" in r.getMessage()]
    assert quiet and {r.levelno for r in quiet} == {logging.DEBUG} and "group g:" in quiet[0].getMessage()


def test_a_merge_whose_publishing_failed_is_published_by_a_retry_of_the_daemon(tmp_path, made, daemons):
    """A real daemon whose folder destination fails (a file where its folder goes), with
    nothing else to run the group again (no schedule, no further change, the catalog check
    off): it tries again ``retry_seconds`` later, the wait doubling up to
    ``retry_max_seconds``, each try publishing the kept merge again without merging; once
    the destination works the merge is published and the tries end."""
    base, (lora0, _, _) = made
    watched, dest = tmp_path / "watched", tmp_path / "published"
    watched.mkdir()
    dest.write_text("not a folder")
    config = write_config(tmp_path / "daemon.toml", state=tmp_path / "state", watched=watched, dest=dest, base=base,
                          params={"samples_per_task": 8},
                          extra=("retry_seconds = 0.5", "retry_max_seconds = 1", "catalog_check_seconds = 3600"))
    daemon = daemons(config, tmp_path / "daemon.log")
    daemon.wait_event("notify", r"READY=1")
    shutil.copytree(lora0, watched / "a0")
    merged = daemon.wait_event("log", r"group unified: run (\d+) failed: publish destination .* exists and is not a "
                                      r"folder")
    for wait, tries in ((0.5, 1), (1, 2), (1, 3)):
        daemon.wait_event("log", rf"group unified: trying the run again in {wait} s \({tries} failed in a row\)")
    daemon.wait_event("log", rf"group unified: run \d+ publishes the merge of run {merged[1]} again")
    dest.unlink()
    url = f"sqlite:///{tmp_path / 'state' / 'catalog.db'}"
    published = wait_for(lambda: [r for r in group_runs(url) if r.status is RunStatus.succeeded], "the merge published",
                         timeout=START_TIMEOUT, interval=0.5)[0]
    assert published.metrics["republished_from"] == int(merged[1])
    assert len(daemon.logs(r"group unified: run \d+ merges \d+ adapters?")) == 1  # merged once
    assert (dest / "current" / "adapter_model.safetensors").is_file()
    time.sleep(2)  # twice the longest wait: no more tries
    assert group_runs(url)[-1].id == published.id
    assert daemon.stop() == 0, daemon.tail()


# Takes the SQLite catalog's write lock until a line comes on stdin (a backup script, a sqlite3 shell).
LOCK_HOLDER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
db.execute("COMMIT")
"""


@pytest.mark.long
def test_a_run_whose_end_the_locked_catalog_refused_is_tried_again(tmp_path, made, daemons):
    """Another process holds the SQLite catalog's write lock past the busy timeout (30 s)
    just as a run publishes: the write that records the run's end fails, so the run ends
    without a record. Nothing else would run the group (no schedule, no further change,
    the catalog check off): the daemon tries again ``retry_seconds`` later, marks the
    unrecorded run failed and merges and publishes again."""
    base, (lora0, lora1, _) = made
    watched, dest = tmp_path / "watched", tmp_path / "published"
    watched.mkdir()
    config = write_config(tmp_path / "daemon.toml", state=tmp_path / "state", watched=watched, dest=dest, base=base,
                          params={"samples_per_task": 8}, debounce=2.0,
                          extra=("retry_seconds = 1", "catalog_check_seconds = 3600"))
    daemon = daemons(config, tmp_path / "daemon.log", pause={"publish:swapped": [1], "run:record-failed": [1]})
    daemon.wait_event("notify", r"READY=1")
    shutil.copytree(lora0, watched / "a0")
    shutil.copytree(lora1, watched / "a1")
    daemon.wait_event("log", r"FAULTPOINT publish:swapped 1 reached")
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(tmp_path / "state" / "catalog.db")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        daemon.release("publish:swapped")
        daemon.wait_event("log", r"FAULTPOINT run:record-failed 1 reached", timeout=START_TIMEOUT)
        holder.communicate("\n", timeout=60)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert holder.returncode == 0
    daemon.release("run:record-failed")
    # one line (QA PG: a traceback of 118-344 lines at each retry while the catalog was down)
    daemon.wait_event("log", r"group unified: the run could not be carried out: the catalog failed: CatalogLockedError: ")
    daemon.wait_event("log", r"group unified: trying the run again in 1 s \(1 failed in a row\)")
    assert "Traceback" not in (tmp_path / "daemon.log").read_text()
    url = f"sqlite:///{tmp_path / 'state' / 'catalog.db'}"
    wait_for(lambda: any(r.status is RunStatus.succeeded for r in group_runs(url)), "the group to merge again",
             timeout=START_TIMEOUT, interval=0.5)
    lost, again = [r for r in group_runs(url) if r.status is not RunStatus.skipped]  # skipped: the start's run, with no adapters
    assert lost.status is RunStatus.failed and "never recorded" in lost.error
    assert again.status is RunStatus.succeeded
    # The lost run's version stays current when the retry's merge is the same adapter (the publisher keeps it).
    assert (dest / "current").resolve().name.startswith((f"run-{lost.id}-", f"run-{again.id}-"))
    assert (dest / "current" / "adapter_model.safetensors").is_file()
    assert daemon.stop() == 0, daemon.tail()
