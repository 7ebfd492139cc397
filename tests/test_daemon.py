"""The real daemon, end to end: ``python -m iteris_daemon run`` as a subprocess on a TOML
config with a SQLite catalog, a watched local folder and the Hub test server as sources, and a
folder and a Hub repo (the same server) as destinations; systemd's notify socket is a datagram
socket bound here.

One daemon process serves every step, in order: it starts and says READY=1; the first merge
of what is already there; a new adapter dropped into the folder gives exactly one new run and
one new published version (a folder version with ``current`` switched, one Hub commit with a
model card); the same for a new commit pushed to a Hub source repo; ``merge-now`` on unchanged
inputs records a ``skipped`` run and publishes nothing; a config reload makes the merge slow and
SIGTERM during it exits 0, records the run ``cancelled`` and leaves the last published version
as it was. Then ``status`` shows the run, and the Hub token (given only as ``HF_TOKEN``) is
nowhere in the log, the catalog or what was published.

Waits have deadlines so a broken daemon fails instead of hanging, but nothing asserts on speed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest
import yaml
from hub_server import HubServer
from sqlalchemy import func, select

import polling
from builders import build_adapter, build_tiny_model
from iteris_daemon.catalog import Catalog
from iteris_daemon.catalog.models import MergeGroup, MergeRun, MergeRunInput, RunStatus
from iteris_daemon.status import collect

pytestmark = pytest.mark.timeout(400)

# Deliberately not shaped like a real token (hf_ + 8 or more letters and digits), so the log
# redaction (a safety net) cannot hide a leak: the check below tests that it is never written.
TOKEN = "hf_e2e-daemon-Secret-7f3a9c"
GROUP = "news"
DEST_REPO = "team/merged-news"
SOURCE_REPO = "alice/lora-hub"
COMMITS = rf"^POST /api/models/{DEST_REPO}/commit/"
DEADLINE = 120.0
FAST = "{ iterations = 2, samples_per_task = 8 }"
# Slow enough that SIGTERM lands mid-merge: one cancellation point per sample, never converging.
SLOW = "{ iterations = 1000, tolerance = 0.0, samples_per_task = 12, batch_size = 1 }"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "calibration.jsonl")


# This file's default deadline for polling.wait_for.
wait_for = partial(polling.wait_for, timeout=DEADLINE)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny BERT and four real PEFT adapters of it, each with its calibration.jsonl."""
    root = tmp_path_factory.mktemp("daemon-e2e")
    base = build_tiny_model("bert", root / "base")
    adapters = [build_adapter(base, root / f"lora{i}", seed=10 + i, family="bert", r=2 + i % 2) for i in range(4)]
    return base, adapters


class NotifyListener:
    """A bound AF_UNIX datagram socket standing in for systemd; collects every message."""

    def __init__(self, path: Path):
        self.path = path
        self.messages: list[dict[str, str]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._read, name="notify-listener", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._done.is_set():
            try:
                data = self._sock.recv(65536).decode()
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append(dict(line.split("=", 1) for line in data.splitlines() if "=" in line))

    def statuses(self) -> list[str]:
        return [m["STATUS"] for m in list(self.messages) if "STATUS" in m]

    def count(self, key: str, value: str = "1") -> int:
        return sum(m.get(key) == value for m in list(self.messages))

    def seen(self, key: str, value: str = "1") -> bool:
        return self.count(key, value) > 0

    def close(self) -> None:
        self._done.set()
        self._thread.join()
        self._sock.close()


def config_text(tmp: Path, base: Path, endpoint: str, params: str) -> str:
    q = json.dumps  # a JSON string is a valid TOML basic string for these paths and URLs
    return f"""
[daemon]
state_dir = {q(str(tmp / "state"))}
cache_dir = {q(str(tmp / "cache"))}
grace_seconds = 0

[[sources]]
name = "team"
kind = "local"
paths = [{q(str(tmp / "watched"))}]
base_model = {q(str(base))}
settle_seconds = 0.3

[[sources]]
name = "hub"
kind = "hub"
repos = [{q(SOURCE_REPO)}]
base_model = {q(str(base))}
endpoint = {q(endpoint)}
interval_seconds = 1
retry_base_seconds = 0.05
retry_cap_seconds = 0.5

[[groups]]
name = {q(GROUP)}
base_model = {q(str(base))}
debounce_seconds = 1
params = {params}
destinations = [
  {{ kind = "folder", path = {q(str(tmp / "dest"))}, keep = 10 }},
  {{ kind = "hub", repo_id = {q(DEST_REPO)}, endpoint = {q(endpoint)}, retry_base_seconds = 0.05 }},
]
"""


@dataclass
class Env:
    tmp: Path
    base: Path
    hub: HubServer
    proc: subprocess.Popen
    notify: NotifyListener
    config: Path
    log: Path
    url: str
    _catalog: Catalog | None = field(default=None)
    children: list[subprocess.Popen] = field(default_factory=list)

    @property
    def dest(self) -> Path:
        return self.tmp / "dest"

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:  # opened once the daemon has migrated it (after READY=1)
            self._catalog = Catalog(self.url, migrate=False)
        return self._catalog

    # ----------------------------------------------------------------- catalog
    def runs(self) -> list[tuple[int, RunStatus, int]]:
        """(id, status, number of inputs) of every run of the group, oldest first."""
        with self.catalog.session() as session:
            group_id = session.scalar(select(MergeGroup.id).where(MergeGroup.name == GROUP))
            counts = (select(MergeRunInput.run_id, func.count().label("n"))
                      .group_by(MergeRunInput.run_id).subquery())
            rows = session.execute(
                select(MergeRun.id, MergeRun.status, func.coalesce(counts.c.n, 0))
                .outerjoin(counts, counts.c.run_id == MergeRun.id)
                .where(MergeRun.group_id == group_id).order_by(MergeRun.id)
            ).all()
        return [tuple(row) for row in rows]

    def run(self, run_id: int) -> MergeRun:
        with self.catalog.session() as session:
            return session.get(MergeRun, run_id)

    def last_id(self) -> int:
        runs = self.runs()
        return runs[-1][0] if runs else 0

    def finished_after(self, after: int) -> tuple | None:
        """The first run after ``after`` that did something (not skipped) and has finished."""
        for run in self.runs():
            if run[0] > after and run[1] is not RunStatus.skipped:
                return run if run[1] is not RunStatus.running else None
        return None

    # ----------------------------------------------------------------- published state
    def versions(self) -> set[str]:
        folder = self.dest / "versions"
        return {p.name for p in folder.iterdir() if not p.name.startswith(".")} if folder.is_dir() else set()

    def current(self) -> str | None:
        link = self.dest / "current"
        return Path(os.readlink(link)).name if link.is_symlink() else None

    def commits(self) -> int:
        return sum(r.status == 200 for r in self.hub.requests_matching(COMMITS))

    def hub_head(self) -> str | None:
        try:
            return self.hub.head(DEST_REPO)
        except KeyError:
            return None

    def snapshot(self) -> dict:
        return {"last_run": self.last_id(), "versions": self.versions(), "current": self.current(),
                "commits": self.commits(), "head": self.hub_head()}

    # ----------------------------------------------------------------- CLI
    def cli(self, *args: str, timeout: float = DEADLINE) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "iteris_daemon", *args, "--db", self.url],
                              capture_output=True, text=True, timeout=timeout, env=_cli_env())

    def cli_start(self, *args: str) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-m", "iteris_daemon", *args, "--db", self.url],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_cli_env())
        self.children.append(process)
        return process

    def merge_now_skipped(self, refused: bool = False) -> int:
        """``merge-now`` on inputs that did not change: the run is skipped; its id. Also a barrier:
        the merge queue has one worker, so anything triggered before has run by then. Skipped on
        inputs a gate ``refused``, it exits 3 (nothing published), else 0."""
        before = self.last_id()
        result = self.cli("merge-now", GROUP, "--wait", str(DEADLINE))
        assert result.returncode == (3 if refused else 0), result.stdout + result.stderr
        assert "skipped" in result.stdout and "unchanged" in result.stdout, result.stdout
        skipped = [r for r in self.runs() if r[0] > before]
        assert skipped and all(r[1] is RunStatus.skipped for r in skipped), skipped
        return skipped[-1][0]


def _cli_env() -> dict[str, str]:
    """The test's environment minus anything Hub-, systemd- or catalog-related of the machine."""
    drop = ("HF_", "HUGGING_FACE", "TRANSFORMERS_OFFLINE", "NOTIFY_SOCKET", "WATCHDOG_", "CREDENTIALS_DIRECTORY",
            "JOURNAL_STREAM", "ITERIS_DAEMON_DB", "STATE_DIRECTORY", "CACHE_DIRECTORY")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


@pytest.fixture
def env(tmp_path, made) -> Iterator[Env]:
    base, _ = made
    (tmp_path / "watched").mkdir()
    # AF_UNIX socket paths are short (108 bytes) and tmp_path can be long.
    sock_dir = Path(tempfile.mkdtemp(prefix="iteris-notify-"))
    notify = NotifyListener(sock_dir / "notify")
    with HubServer(token=TOKEN) as hub:
        config = tmp_path / "iteris-daemon.toml"
        config.write_text(config_text(tmp_path, base, hub.endpoint, FAST))
        log = tmp_path / "daemon.log"
        daemon_env = _cli_env() | {
            "HF_TOKEN": TOKEN, "HF_HOME": str(tmp_path / "hf-home"), "HF_ENDPOINT": hub.endpoint,
            "HF_HUB_DISABLE_TELEMETRY": "1", "NOTIFY_SOCKET": str(notify.path), "TOKENIZERS_PARALLELISM": "false",
            # Tiny matrices: one thread is faster, and two spinning OpenMP threads on a busy
            # 2-core machine make every merge several times slower.
            "OMP_NUM_THREADS": "1",
        }
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "iteris_daemon", "run", "--config", str(config)],
                                    stdout=out, stderr=subprocess.STDOUT, env=daemon_env, cwd=tmp_path)
        e = Env(tmp_path, base, hub, proc, notify, config, log, f"sqlite:///{tmp_path / 'state' / 'catalog.db'}")
        try:
            yield e
        finally:
            for process in (proc, *e.children):
                if process.poll() is None:
                    process.kill()
                process.wait(timeout=30)
            if e._catalog is not None:
                e._catalog.close()
            notify.close()
            shutil.rmtree(sock_dir, ignore_errors=True)
            print(log.read_text(errors="replace")[-20000:])  # pytest shows it when the test failed


def _hub_files(folder: Path) -> dict[str, bytes]:
    files = {name: (folder / name).read_bytes() for name in ADAPTER_FILES}
    return {**files, "README.md": b"---\nlibrary_name: peft\n---\n# a LoRA\n"}


def _drop(adapter: Path, watched: Path, name: str) -> None:
    """Copy an adapter in under a hidden name (ignored), then rename it into place: it appears whole."""
    staging = watched / f".incoming-{name}"
    shutil.copytree(adapter, staging)
    os.rename(staging, watched / name)


def _card(hub: HubServer, revision: str) -> dict:
    text = hub.files(DEST_REPO, revision)["README.md"].decode()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def assert_one_new_publish(e: Env, before: dict, run: tuple) -> None:
    """Exactly one run did something since ``before`` (``run``), and it published exactly once, everywhere."""
    run_id, status, _ = run
    assert status is RunStatus.succeeded, (e.run(run_id).error, e.log.read_text(errors="replace")[-5000:])
    new_runs = [r for r in e.runs() if r[0] > before["last_run"] and r[1] is not RunStatus.skipped]
    assert [r[0] for r in new_runs] == [run_id]
    added = e.versions() - before["versions"]
    assert len(added) == 1 and before["versions"] <= e.versions()
    (version,) = added
    assert version.startswith(f"run-{run_id}-") and e.current() == version
    assert e.commits() == before["commits"] + 1
    head = e.hub_head()
    assert head != before["head"]
    record = e.run(run_id)
    assert record.output_commit == head and record.output_location == str(e.dest)
    card = _card(e.hub, head)
    assert card["base_model_relation"] == "merge" and card["library_name"] == "peft"
    assert "base_model" not in card  # the base is a local folder, no Hub repo id
    assert "Measured with the base model in `float32`." in e.hub.files(DEST_REPO, head)["README.md"].decode()
    published = e.hub.files(DEST_REPO, head)
    # The same adapter in both places; the Hub's config names the local base folder by its name alone.
    assert published["adapter_model.safetensors"] == (e.dest / "current" / "adapter_model.safetensors").read_bytes()
    config = json.loads((e.dest / "current" / "adapter_config.json").read_text())
    assert json.loads(published["adapter_config.json"]) == {
        **config, "base_model_name_or_path": f"local:{Path(config['base_model_name_or_path']).name}"}
    assert e.hub.files(DEST_REPO, f"{GROUP}-run-{run_id}") == published  # the run's tag


@pytest.mark.long
def test_daemon_end_to_end(env: Env, made):
    e = env
    base, (first, second, third, fourth) = made
    proc = e.proc

    # ---- start: one adapter in the folder, one on the Hub, both merged and published
    _drop(first, e.tmp / "watched", "topic")
    e.hub.create_repo_direct(SOURCE_REPO, _hub_files(second))
    wait_for(lambda: e.notify.seen("READY"), "READY=1 on the notify socket", proc=proc)
    assert any("watching 1 folder and 1 hub sources, 1 merge groups" in s for s in e.notify.statuses())
    wait_for(lambda: any(r[1] is RunStatus.succeeded and r[2] == 2 for r in e.runs()),
             "a successful run merging both adapters", proc=proc)
    e.merge_now_skipped()  # settles the start-up (a first run may have seen only one adapter)
    assert e.current() is not None and e.hub_head() is not None
    statuses = e.notify.statuses()
    assert f"merging group {GROUP} on cpu" in statuses
    assert any(s.startswith(f"group {GROUP}: last run succeeded") for s in statuses)
    wait_for(lambda: any(s.startswith(f"group {GROUP}: last run skipped") for s in e.notify.statuses()),
             "STATUS: last run skipped", proc=proc)  # sent just after the run is recorded

    # ---- a new adapter dropped into the watched folder: one run, one new version
    before = e.snapshot()
    _drop(third, e.tmp / "watched", "sentiment")
    run = wait_for(lambda: e.finished_after(before["last_run"]), "a run after the folder change", proc=proc)
    e.merge_now_skipped()
    assert_one_new_publish(e, before, run)
    assert run[2] == 3

    # ---- a new commit on a Hub source repo: one run, one new version
    before = e.snapshot()
    e.hub.commit_direct(SOURCE_REPO, {n: (fourth / n).read_bytes() for n in ADAPTER_FILES}, message="retrained")
    run = wait_for(lambda: e.finished_after(before["last_run"]), "a run after the Hub push", proc=proc)
    assert_one_new_publish(e, before, run)
    assert run[2] == 3  # the Hub adapter's new revision replaced its old one

    # ---- unchanged inputs: merge-now records a skipped run and publishes nothing
    unchanged = e.snapshot()
    skipped = e.merge_now_skipped()
    assert "inputs unchanged" in e.run(skipped).error
    after = e.snapshot()
    assert after["last_run"] == skipped
    del after["last_run"], unchanged["last_run"]
    assert after == unchanged
    published_version, published_head, last_skipped = after["current"], after["head"], skipped

    # ---- reload (SIGHUP) with slow parameters: a new merge starts; SIGTERM in the middle of it
    merges = e.log.read_text(errors="replace").count("merging 3 adapters with iteris")
    text = config_text(e.tmp, base, e.hub.endpoint, SLOW)
    e.config.with_suffix(".new").write_text(text)
    os.replace(e.config.with_suffix(".new"), e.config)
    proc.send_signal(signal.SIGHUP)
    wait_for(lambda: e.notify.seen("RELOADING"), "RELOADING=1 after SIGHUP", proc=proc)
    wait_for(lambda: e.notify.count("READY") == 2, "READY=1 again after the reload", proc=proc)
    slow = wait_for(lambda: next((r for r in e.runs() if r[0] > last_skipped and r[1] is RunStatus.running), None),
                    "the slow merge to start", proc=proc)
    wait_for(lambda: any(f"run {slow[0]} merging" in s for s in e.notify.statuses()), "STATUS: merging", proc=proc)
    # ... and past loading the model, into the strategy's batches (the log says when).
    wait_for(lambda: e.log.read_text(errors="replace").count("merging 3 adapters with iteris") == merges + 1,
             "the slow merge to reach the strategy", proc=proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=DEADLINE) == 0
    wait_for(lambda: e.notify.seen("STOPPING"), "STOPPING=1")
    status = e.cli_start("status")  # a few seconds to start: runs while the checks below do

    cancelled = e.run(slow[0])
    assert cancelled.status is RunStatus.cancelled and cancelled.finished_at is not None
    assert "cancelled" in cancelled.error
    assert [r for r in e.runs() if r[0] > slow[0]] == []
    # The last published version is untouched, complete and loadable; the Hub head did not move.
    assert e.current() == published_version and e.versions() == after["versions"]
    assert not list((e.dest / "versions").glob(".staging-*"))
    assert e.hub_head() == published_head and e.commits() == after["commits"]
    from peft import PeftModel
    from transformers import AutoModel

    model = PeftModel.from_pretrained(AutoModel.from_pretrained(base), str(e.dest / "current"))
    assert sum("lora_" in name for name, _ in model.named_parameters()) > 0
    # The cancelled run's work folder is gone; what is left is the last published merge (the quality gate's
    # baseline), and the folder of merges kept to publish again, empty: every merge was published.
    runs = e.tmp / "state" / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["published", "unpublished"]
    assert not list((runs / "unpublished").iterdir())

    # ---- status, from the catalog, with the daemon stopped
    stdout, stderr = status.communicate(timeout=DEADLINE)
    assert status.returncode == 0, stderr
    assert f"last run: #{slow[0]} cancelled" in stdout and f"  {GROUP} (iteris" in stdout
    assert f"published: folder {e.dest} @ {published_version}" in stdout
    (group,) = collect(e.catalog)["groups"]  # what `status --json` prints
    assert group["last_run"]["id"] == slow[0] and group["last_run"]["status"] == "cancelled"
    assert group["merging_now"] is None  # the claim was released
    assert {(p["kind"], p["version"]) for p in group["published"]} == {("folder", published_version),
                                                                        ("hub", published_head)}

    # ---- the token is nowhere: log, catalog, published files (folder and every Hub commit), caches
    log = e.log.read_bytes()
    assert b"Traceback" not in log, log.decode(errors="replace")[-5000:]
    places = [e.log, *(p for d in ("state", "cache", "hf-home", "dest") for p in (e.tmp / d).rglob("*") if p.is_file())]
    assert any(p.name == "catalog.db" for p in places)
    for path in places:
        assert TOKEN.encode() not in path.read_bytes(), path
    with e.catalog.session() as session:
        commits = session.scalars(select(MergeRun.output_commit).where(MergeRun.output_commit.is_not(None))).all()
    assert len(commits) >= 3
    for sha in commits:
        for name, content in e.hub.files(DEST_REPO, sha).items():
            assert TOKEN.encode() not in content, (sha, name)

    # ---- the daemon's own files are private: its folders 0700, the catalog's files 0600
    for folder in ("state", "cache"):
        assert (e.tmp / folder).stat().st_mode & 0o777 == 0o700, folder
    catalog_files = list((e.tmp / "state").glob("catalog.db*"))
    assert catalog_files and all(p.stat().st_mode & 0o777 == 0o600 for p in catalog_files)


@pytest.mark.long
def test_changes_in_a_source_added_under_the_daemon_are_merged_without_a_restart(env: Env, made):
    """An adapter registered, then removed, in a source `sources add` put in the catalog after
    the daemon started, with `sources scan` run at once: before the catalog check its groups
    merged such changes only at their next schedule or restart (this group has no schedule:
    never). The check now also starts watching the added source, so the scan or the daemon's
    own watcher registers it, whichever looks first; either way the group merges it, and
    merges again without it once it is gone. A reload sets the check's interval."""
    e = env
    base, (first, second, _, _) = made
    _drop(first, e.tmp / "watched", "topic")
    wait_for(lambda: e.notify.seen("READY"), "READY=1 on the notify socket", proc=e.proc)
    wait_for(lambda: any(r[1] is RunStatus.succeeded and r[2] == 1 for r in e.runs()), "a run merging the folder's adapter",
             proc=e.proc)
    text = config_text(e.tmp, base, e.hub.endpoint, FAST).replace("grace_seconds = 0", "grace_seconds = 0\ncatalog_check_seconds = 0.25")
    e.config.write_text(text)
    e.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: e.notify.count("READY") == 2, "READY=1 again after the reload", proc=e.proc)
    barrier = e.merge_now_skipped()

    other = e.tmp / "other"
    shutil.copytree(second, other / "extra")
    for args in (("sources", "add", "other", "--folder", str(other), "--base-model", str(base)), ("sources", "scan", "other")):
        result = e.cli(*args)
        assert result.returncode == 0, result.stdout + result.stderr
    assert "1 registered" in result.stdout or "1 unchanged" in result.stdout, result.stdout  # the watcher was first
    run = wait_for(lambda: e.finished_after(barrier), "a run after `sources scan` registered an adapter", proc=e.proc)
    assert run[1] in (RunStatus.succeeded, RunStatus.refused) and run[2] == 2  # the gate may refuse it: still merged
    log_text = e.log.read_text(errors="replace")
    assert "source other was added to the catalog (`iteris-daemon sources add`): watching it now" in log_text
    time.sleep(1.0)  # four more checks: the group is caught up, nothing more runs
    assert e.last_id() == run[0]
    barrier = e.merge_now_skipped(refused=run[1] is RunStatus.refused)

    shutil.rmtree(other / "extra")
    result = e.cli("sources", "scan", "other")
    assert result.returncode == 0, result.stdout + result.stderr  # the scan or the watcher marks it removed
    if run[1] is RunStatus.refused:  # the inputs are the published merge's again (run 1's): nothing to merge
        run = wait_for(lambda: next((r for r in e.runs() if r[0] > barrier and r[1] is RunStatus.skipped), None),
                       "a skipped run after `sources scan` removed it", proc=e.proc)
        assert run[2] == 1 and "whose merge is published" in e.log.read_text(errors="replace")
    else:
        run = wait_for(lambda: e.finished_after(barrier), "a run after `sources scan` removed it", proc=e.proc)
        assert run[1] in (RunStatus.succeeded, RunStatus.refused) and run[2] == 1
    time.sleep(1.0)
    assert e.last_id() == run[0]
