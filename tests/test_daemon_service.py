"""The daemon as an operator runs it on a multi-device host: merges in parallel on two
(CPU) devices, Prometheus metrics and a health endpoint, and Hub webhooks.

One real daemon (``python -m iteris_daemon run``) with a SQLite catalog, a watched local
folder, a Hub source on the Hub test server polled only once an hour, two groups, and
``devices = ["cpu", "cpu"]``. The merges come from the test-only ``faulty`` strategy
(``tests/fault_plugin``) in its ``slow`` mode: a real merge that takes a few seconds, so
that runs overlap when they can. Checked: the two groups' first runs overlap in time; two
runs of one group never do; a webhook with a wrong secret is refused and polls nothing,
one with the right secret registers the pushed commit within seconds (the poll interval
is an hour); ``/metrics`` parses with prometheus_client's own parser and agrees with the
catalog; ``/healthz`` answers 200; a third group whose calibration comes from the
``generate`` source (it loads the model) gets its samples from a worker; and the daemon
process never mapped libtorch (adapters were validated against shapes a worker computed
once, calibration was generated and merges ran in workers).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from functools import partial
from pathlib import Path

import pytest
from hub_server import HubServer
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

import polling
from builders import build_adapter, build_tiny_model
from iteris_daemon.catalog import Catalog
from iteris_daemon.catalog.models import (Adapter, AdapterStatus, BaseModelShapes, DaemonPresence, MergeGroup, MergeRun,
                                          MergeRunInput, RunStatus, Source)

pytestmark = pytest.mark.timeout(400)
PLUGIN = Path(__file__).parent / "fault_plugin"
HUB_REPO = "alice/lora-webhook"
SECRET = "webhook-Secret-5d1e"
# Two seconds of merging on top of the worker's start (seconds of imports): runs that can overlap do,
# and a run forced while another of its group merges queues behind it.
SLOW = '{ mode = "slow", seconds = 2 }'
wait_for = partial(polling.wait_for, timeout=180)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("service")
    base = build_tiny_model("bert", root / "base")
    return base, [build_adapter(base, root / f"lora{i}", seed=20 + i, family="bert", r=2) for i in range(3)]


def _files(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}


def _config(tmp: Path, base: Path, endpoint: str) -> str:
    q = json.dumps
    groups = "".join(f"""
[[groups]]
name = "{name}"
base_model = {q(str(base))}
strategy = "faulty"
params = {SLOW}
debounce_seconds = 0
select = {{ names = ["{name}"] }}
gates = {{ max_regression = false }}
destinations = [{{ kind = "folder", path = {q(str(tmp / "dest" / name))} }}]
""" for name in ("left", "right"))
    # Calibration made up by `generate` (it loads the model): the daemon asks a worker for it.
    groups += f"""
[[groups]]
name = "generated"
base_model = {q(str(base))}
strategy = "task_arithmetic"
debounce_seconds = 0
select = {{ names = ["late"] }}
calibration = {{ order = ["generate"], generate = {{ samples = 4 }} }}
gates = {{ max_regression = false }}
destinations = [{{ kind = "folder", path = {q(str(tmp / "dest" / "generated"))} }}]
"""
    return f"""
[daemon]
state_dir = {q(str(tmp / "state"))}
cache_dir = {q(str(tmp / "cache"))}
grace_seconds = 2
devices = ["cpu", "cpu"]
metrics = {{ listen = "127.0.0.1:0" }}
webhooks = {{ listen = "127.0.0.1:0", secret_file = {q(str(tmp / "secret"))} }}

[[sources]]
name = "team"
kind = "local"
paths = [{q(str(tmp / "watched"))}]
base_model = {q(str(base))}
settle_seconds = 0.3

[[sources]]
name = "hub"
kind = "hub"
repos = ["{HUB_REPO}"]
base_model = {q(str(base))}
endpoint = {q(endpoint)}
interval_seconds = 3600
{groups}"""


def _port(log: Path, name: str) -> int | None:
    found = re.search(rf"{name}: listening on 127\.0\.0\.1 port (\d+)", log.read_text(errors="replace"))
    return int(found.group(1)) if found else None


def _post(port: int, secret: str | None, payload: dict) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/webhooks/hub", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json",
                                              **({"X-Webhook-Secret": secret} if secret else {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _runs(catalog: Catalog) -> dict[str, list[MergeRun]]:
    with catalog.session() as session:
        rows = session.execute(select(MergeGroup.name, MergeRun).join(MergeRun, MergeRun.group_id == MergeGroup.id)
                               .order_by(MergeRun.id)).all()
    found: dict[str, list[MergeRun]] = {}
    for name, run in rows:
        found.setdefault(name, []).append(run)
    return found


def _merged(runs: list[MergeRun]) -> list[MergeRun]:
    return [r for r in runs if r.status is not RunStatus.skipped]


def _revision(catalog: Catalog) -> str | None:
    with catalog.session() as session:
        adapter = session.scalar(select(Adapter).where(Adapter.locator == HUB_REPO))
        return adapter.current.revision if adapter is not None and adapter.current is not None else None


@pytest.mark.long
def test_parallel_merges_metrics_and_webhooks(tmp_path, made):
    base, adapters = made
    (tmp_path / "secret").write_text(SECRET + "\n")
    (tmp_path / "secret").chmod(0o600)  # a secret file open to others is refused
    watched = tmp_path / "watched"
    watched.mkdir()
    for name, adapter in zip(("left", "right"), adapters):
        shutil.copytree(adapter, watched / name)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "NOTIFY_SOCKET", "CREDENTIALS_DIRECTORY", "MALLOC_", "GLIBC_TUNABLES"))}
    env |= {"PYTHONPATH": os.pathsep.join(filter(None, [str(PLUGIN), env.get("PYTHONPATH")])),
            "OMP_NUM_THREADS": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    log = tmp_path / "daemon.log"
    with HubServer() as hub:
        first = hub.create_repo_direct(HUB_REPO, _files(adapters[2]))
        config = tmp_path / "daemon.toml"
        config.write_text(_config(tmp_path, base, hub.endpoint))
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "iteris_daemon", "run", "--config", str(config)],
                                    stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        try:
            metrics_port = wait_for(lambda: _port(log, "metrics"), what="the metrics endpoint", proc=proc)
            if platform.libc_ver()[0] == "glibc":  # iteris_daemon.malloc, applied before the threads start
                assert "glibc allocator set for a long-running process: MALLOC_ARENA_MAX=2, " \
                       "MALLOC_MMAP_THRESHOLD_=131072" in log.read_text()
            webhook_port = wait_for(lambda: _port(log, "webhooks"), what="the webhook endpoint", proc=proc)
            catalog = Catalog(f"sqlite:///{tmp_path / 'state' / 'catalog.db'}", migrate=False)
            assert wait_for(lambda: _revision(catalog), what="the hub adapter's first poll", proc=proc) == first

            # Both groups merge at once, one per device.
            def both_done():
                runs = _runs(catalog)
                done = [_merged(runs.get(g, [])) for g in ("left", "right")]
                return all(d and d[0].finished_at for d in done) and done

            left, right = (d[0] for d in wait_for(both_done, what="the first run of both groups", proc=proc))
            assert left.status is RunStatus.succeeded and right.status is RunStatus.succeeded, (left.error, right.error)
            assert left.started_at < right.finished_at and right.started_at < left.finished_at  # they overlapped

            # One group asked twice while it merges: its runs queue, never overlap.
            for _ in range(2):
                result = subprocess.run([sys.executable, "-m", "iteris_daemon", "merge-now", "left", "--force",
                                         "--config", str(config)], capture_output=True, text=True, env=env)
                assert result.returncode == 0, result.stderr
                wait_for(lambda: any(r.status is RunStatus.running for r in _runs(catalog)["left"]),
                         what="a running merge of left", proc=proc)

            # Webhooks: a wrong secret polls nothing; the right one registers the new commit at once.
            pushed = hub.commit_direct(HUB_REPO, _files(adapters[0]))
            event = {"event": {"action": "update", "scope": "repo.content"}, "repo": {"type": "model", "name": HUB_REPO}}
            assert _post(webhook_port, "wrong", event) == 401
            assert _post(webhook_port, None, event) == 401
            assert _revision(catalog) == first
            assert _post(webhook_port, SECRET, event) == 202
            assert wait_for(lambda: _revision(catalog) == pushed, timeout=60, what="the pushed commit", proc=proc)
            polls = lambda: log.read_text(errors="replace").count(f"source hub: poll of {HUB_REPO}:")  # noqa: E731
            wait_for(polls, what="the webhook poll's summary line", proc=proc)  # logged just after the commit lands
            assert polls() == 1  # the 401s polled nothing

            wait_for(lambda: all(r.finished_at for r in _runs(catalog)["left"]) and len(_merged(_runs(catalog)["left"])) >= 2,
                     what="left's queued runs", proc=proc)
            merged_left = _merged(_runs(catalog)["left"])
            for earlier, later in zip(merged_left, merged_left[1:]):
                assert earlier.finished_at <= later.started_at, "two runs of one group overlapped"

            # An adapter for the group whose calibration is generated: the samples come from a worker.
            shutil.copytree(adapters[1], watched / "late")
            generated = wait_for(lambda: [r for r in _merged(_runs(catalog).get("generated", [])) if r.finished_at],
                                 what="the generated group's run", proc=proc)[0]
            assert generated.status is RunStatus.succeeded, generated.error
            with catalog.session() as session:
                sources = session.scalars(select(MergeRunInput.calibration_source)
                                          .where(MergeRunInput.run_id == generated.id)).all()
            assert sources == ["generated by generate from late (random vocabulary words, seed 0, samples 4)"]
            assert "calibration source generate for late: worker" in log.read_text(errors="replace")

            # /metrics agrees with the catalog once every triggered run is recorded; /healthz is 200.
            def agreeing():
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
                    families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
                runs_by = {(s.labels["group"], s.labels["status"]): s.value for s in families["iteris_merge_runs"].samples
                           if s.name == "iteris_merge_runs_total"}
                with catalog.session() as session:
                    counted = dict(((g, s.value), n) for g, s, n in session.execute(
                        select(MergeGroup.name, MergeRun.status, func.sum(MergeRun.repeats)).join(MergeRun)
                        .group_by(MergeGroup.name, MergeRun.status)))
                settled = all(status != "running" for _, status in counted)  # a running one is not timed yet
                # A run is timed just after the catalog records its end: every recorded merge, once, eventually.
                timed = sum(s.value for s in families["iteris_merge_duration_seconds"].samples if s.name.endswith("_count"))
                merges = sum(n for (_, status), n in counted.items() if status != "skipped")
                return (settled and {k: v for k, v in runs_by.items() if v} == counted and timed == merges
                        and (families, counted))

            families, counted = wait_for(agreeing, what="/metrics' run counts and merge timings to match the catalog's",
                                         proc=proc)
            with catalog.session() as session:
                registered = session.scalar(select(func.count()).select_from(Adapter).where(Adapter.status == AdapterStatus.registered))
            assert sum(s.value for s in families["iteris_adapters"].samples if s.labels["status"] == "registered") == registered == 4
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/healthz", timeout=10) as response:
                assert response.status == 200

            # Registering adapters (shapes from a worker, cached), generating calibration and merging never loaded torch here.
            mapped = Path(f"/proc/{proc.pid}/maps").read_text()
            assert "libtorch" not in mapped and "torch/_C" not in mapped
            with catalog.session() as session:
                assert session.scalar(select(func.count()).select_from(BaseModelShapes)) == 1
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
            print(log.read_text(errors="replace")[-20000:])
    assert proc.returncode == 0


def test_a_start_that_fails_starts_nothing(tmp_path):
    """A busy metrics port failed the start only after the sources, the jobs and the start-up
    merge had begun: the merge could publish, APScheduler printed tracebacks, the daemon's row
    stayed in the catalog, and then it exited 2. Now nothing has started when it exits."""
    q = json.dumps
    config = tmp_path / "daemon.toml"
    (tmp_path / "watched").mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config.write_text(f"""
[daemon]
state_dir = {q(str(tmp_path / "state"))}
cache_dir = {q(str(tmp_path / "cache"))}
metrics = {{ listen = "127.0.0.1:{port}" }}
[[sources]]
name = "team"
kind = "local"
paths = [{q(str(tmp_path / "watched"))}]
[[groups]]
name = "g"
base_model = "org/base"
destinations = [{{ kind = "folder", path = {q(str(tmp_path / "dest"))} }}]
""")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_SOCKET", "ITERIS_DAEMON_DB"))}
        done = subprocess.run([sys.executable, "-m", "iteris_daemon", "run", "--config", str(config)],
                              capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.endswith(f"iteris-daemon: error: metrics: cannot listen on 127.0.0.1:{port}: "
                                "Address already in use\n"), done.stderr
    catalog = Catalog(f"sqlite:///{tmp_path / 'state' / 'catalog.db'}")
    with catalog.session() as session:
        assert [session.scalar(select(func.count()).select_from(table)) for table in (Source, MergeGroup, DaemonPresence)] \
            == [0, 0, 0]
    catalog.close()


def test_a_reload_says_which_settings_wait_for_the_next_start(tmp_path):
    """SIGHUP after changing state_dir, cache_dir or the devices logged "configuration
    reloaded" and kept the old ones without a word."""
    q = json.dumps
    config, log = tmp_path / "daemon.toml", tmp_path / "daemon.log"

    def write(state: str, devices: str) -> None:
        config.write_text(f"[daemon]\nstate_dir = {q(str(tmp_path / state))}\ncache_dir = {q(str(tmp_path / 'cache'))}\n"
                          f"devices = {devices}\nrescan_seconds = 5\n")

    write("state", '["cpu"]')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_SOCKET", "ITERIS_DAEMON_DB"))}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "iteris_daemon", "--log-format", "text", "run", "--config",
                                 str(config)], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for(lambda: " running: " in log.read_text(), what="the daemon to start", proc=proc)
        write("moved", '["cpu", "cpu"]')
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in log.read_text(), what="the reload", proc=proc)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    warnings = [line.split("WARNING ", 1)[-1] for line in log.read_text().splitlines() if "takes effect" in line]
    assert sorted(w.split(" ", 1)[-1] for w in warnings) == [
        "daemon.devices changed: takes effect at the next start; still using cpu",
        f"daemon.state_dir changed: takes effect at the next start; still using {tmp_path / 'state'}"], warnings
    assert proc.returncode == 0 and not (tmp_path / "moved").exists()


@pytest.mark.parametrize("before, after, warned", [
    ({"device": "cpu"}, {"devices": ["cpu"]}, []),  # the same one slot, written another way
    ({"devices": ["cpu"]}, {"devices": ["cpu", "cpu"]}, ["devices"]),
    ({"devices": ["cpu", "cpu"], "max_concurrent_merges": 1}, {"devices": ["cpu", "cpu"]}, ["max_concurrent_merges"]),
    ({"webhooks": {"listen": "127.0.0.1:1"}}, {"webhooks": {"listen": "127.0.0.1:1", "path": "/hook"}}, []),
    ({"webhooks": {"listen": "127.0.0.1:1"}}, {"webhooks": {"listen": "127.0.0.1:2"}}, ["webhooks"]),
    ({"metrics": {"listen": "127.0.0.1:1"}}, {}, ["metrics"]),
    ({}, {"database": "sqlite:////elsewhere.db"}, ["database"]),
    ({"state_dir": "/a"}, {"state_dir": "/b"}, ["state_dir"]),
])
def test_which_reloaded_settings_wait_for_the_next_start(before, after, warned, caplog):
    """The settings only the start reads are warned about where what the start read of them
    changes: a webhook's path, secret and body limit apply at a reload, its address does not."""
    from types import SimpleNamespace

    from iteris_daemon.config import DaemonSettings
    from iteris_daemon.daemon import Daemon

    started = DaemonSettings(**before)
    running = SimpleNamespace(_started_with=started, database=None, _slots=started.slot_devices(), state=Path("/a"),
                              cache=Path("/c"), catalog=SimpleNamespace(safe_url="sqlite:////here.db"))
    with caplog.at_level("WARNING", logger="iteris_daemon.daemon"):
        Daemon._warn_start_only(running, DaemonSettings(**after))
    assert [r.getMessage().split(" ", 1)[0] for r in caplog.records] == [f"daemon.{name}" for name in warned]


def test_a_catalog_named_by_the_environment_is_no_start_only_setting(caplog):
    """With $ITERIS_DAEMON_DB naming the catalog, `database` in the file changes nothing."""
    from types import SimpleNamespace

    from iteris_daemon.config import DaemonSettings
    from iteris_daemon.daemon import Daemon

    running = SimpleNamespace(_started_with=DaemonSettings(), database="sqlite:////env.db", _slots=["cpu"],
                              state=Path("/a"), cache=Path("/c"), catalog=SimpleNamespace(safe_url="sqlite:////env.db"))
    with caplog.at_level("WARNING", logger="iteris_daemon.daemon"):
        Daemon._warn_start_only(running, DaemonSettings(database="sqlite:////elsewhere.db"))
    assert caplog.records == []
