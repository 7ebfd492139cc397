"""The catalog at scale: 1,000 adapters through the local folder source.

Measured in one process, on a real SQLite file with real inotify events:

1. *arrival*: the source is watching an empty folder; 1,000 PEFT LoRA folders are
   moved in (staged elsewhere, as a copy tool would); time until every one is registered;
2. *restart*: a fresh source rescans the 1,000 unchanged folders (what a daemon
   restart costs), without the folder stat cache file (every folder hashed), then with it;
3. *query*: ``adapters list`` (the CLI's query and row building), median of 5; and the
   daemon's catalog check (``runner.groups_behind``) of one group that selects all of
   them and whose last run merged them all, median of 5;
4. *idle*: CPU (process time / wall time) and resident memory while watching,
   nothing changing, for ``--idle-seconds``, with inotify and with the polling fallback.

Then the real daemon (``python -m iteris_daemon run``, a fresh catalog) on the same folder:

5. *daemon*: time until it registered the 1,000 adapters, then its resident memory, CPU and
   threads while idle for ``--idle-seconds``, and whether libtorch is mapped into it;
6. *status*: wall time of ``iteris-daemon status --config ...`` on that catalog, median of 5;
7. *Hub*: adapters pushed to a Hub-compatible server (the test suite's, on 127.0.0.1: the
   real Hub is out of reach here) that the daemon watches; time from push to registered,
   for a repo announced by a webhook (polled every hour) and for one polled every
   ``--poll-seconds`` (pushed at a random moment of the period), ``--pushes`` each.

Run: ``python -m benchmarks.catalog [--adapters 1000] [--workdir bench-out]`` (writes catalog.json).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch
from safetensors.torch import save_file
from sqlalchemy import func, select

from iteris_daemon.catalog import Catalog
from iteris_daemon.catalog.db import at_head
from iteris_daemon.catalog.models import Adapter, AdapterStatus, MergeGroup, MergeRun, MergeRunInput, RunStatus, SourceKind
from iteris_daemon.catalog.registry import add_source, list_current
from iteris_daemon.cli.catalog import _adapter_row
from iteris_daemon.config import GroupConfig
from iteris_daemon.runner import groups_behind, sync_group
from iteris_daemon.sources.local import LocalFolderSource

from .soak import proc_figures

SECRET = "catalog-benchmark-secret"
WEBHOOK_REPO, POLLED_REPO = "bench/lora-webhook", "bench/lora-polled"

HIDDEN, LAYERS, RANK = 64, 2, 4


def make_base(folder: Path) -> Path:
    """A small BERT config: shape checks read only the config."""
    from transformers import BertConfig

    BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
               intermediate_size=2 * HIDDEN).save_pretrained(folder)
    return folder


def make_adapter(folder: Path, base: Path, seed: int) -> None:
    """A PEFT-format LoRA folder (query/value of every layer), written directly."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(LAYERS):
        for module in ("query", "value"):
            key = f"base_model.model.encoder.layer.{layer}.attention.self.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, HIDDEN, generator=generator)
            tensors[f"{key}.lora_B.weight"] = torch.randn(HIDDEN, RANK, generator=generator)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "target_modules": ["query", "value"],
        "base_model_name_or_path": str(base), "task_type": None,
    }))


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _wait_registered(catalog: Catalog, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with catalog.session() as session:
            done = session.scalar(select(func.count()).select_from(Adapter).where(Adapter.status == AdapterStatus.registered))
        if done >= count:
            return
        time.sleep(0.2)
    raise RuntimeError(f"only {done} of {count} adapters registered after {timeout}s")


def _idle(source: LocalFolderSource, seconds: float) -> dict:
    source.start()
    time.sleep(min(5.0, seconds))  # let the start-up rescan finish
    cpu, wall = _cpu_seconds(), time.monotonic()
    time.sleep(seconds)
    used = (_cpu_seconds() - cpu) / (time.monotonic() - wall)
    source.stop()
    return {"cpu_percent": round(100 * used, 2)}  # memory: the daemon's (item 5); this process holds torch


def run(workdir: Path, n: int = 1000, idle_seconds: float = 30.0, pushes: int = 5, poll_seconds: float = 10.0) -> dict:
    root = (workdir / "catalog-bench").resolve()  # the daemon runs with its own working directory
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(mode=0o700, parents=True)  # the daemon's state goes in here: private
    base = make_base(root / "base")
    staged, watched = root / "staged", root / "watched"
    for index in range(n):
        make_adapter(staged / f"task-{index:04d}", base, index)
    watched.mkdir()
    catalog = Catalog(f"sqlite:///{root / 'catalog.db'}")
    with catalog.session() as session:
        add_source(session, "bench", SourceKind.local,
                   {"paths": [str(watched)], "base_model": str(base), "settle_seconds": 1.0})
        add_source(session, "bench-polling", SourceKind.local,
                   {"paths": [str(watched)], "base_model": str(base), "settle_seconds": 1.0, "polling": True,
                    "poll_interval_seconds": 5.0})

    source = LocalFolderSource(catalog, "bench")
    source.start()
    started = time.monotonic()
    for folder in sorted(staged.iterdir()):
        os.rename(folder, watched / folder.name)
    _wait_registered(catalog, n, timeout=60 + n)
    arrival = time.monotonic() - started
    source.stop()

    rescans = []  # first without the stat cache file (it is written then), then with it
    stat_cache = root / "folder-stat.json"
    for _ in range(2):
        restarted = LocalFolderSource(catalog, "bench", stat_cache=stat_cache)
        started = time.monotonic()
        report = restarted.scan()
        rescans.append(time.monotonic() - started)
        assert report.unchanged == n, report

    timings = []
    for _ in range(5):
        started = time.perf_counter()
        with catalog.session() as session:
            rows = [_adapter_row(a, current) for a, current in list_current(session)]
        timings.append(time.perf_counter() - started)
    assert len(rows) == n
    check_ms = _catalog_check_ms(catalog, base, n)

    results = {
        "adapters": n,
        "arrival_seconds": round(arrival, 2),
        "arrival_per_second": round(n / arrival, 1),
        "restart_rescan_seconds": round(rescans[1], 2),
        "restart_rescan_cold_seconds": round(rescans[0], 2),
        "list_query_ms": round(1000 * statistics.median(timings), 1),
        "catalog_check_ms": check_ms,
        "idle_inotify": _idle(LocalFolderSource(catalog, "bench"), idle_seconds),
        "idle_polling": _idle(LocalFolderSource(catalog, "bench-polling"), idle_seconds),
        "catalog_bytes": sum(p.stat().st_size for p in root.glob("catalog.db*")),
    }
    catalog.close()
    results["daemon"] = daemon_run(root, watched, base, n, idle_seconds, pushes, poll_seconds)
    return results


def _catalog_check_ms(catalog: Catalog, base: Path, n: int) -> float:
    """Median ms of ``groups_behind`` for one group over the ``n`` adapters, its last run
    (recorded here directly, nothing merged) having merged every one of them."""
    group = GroupConfig(name="all", base_model=str(base), strategy="task_arithmetic",
                        destinations=[{"kind": "folder", "path": str(base.parent / "unused")}])
    sync_group(catalog, group)
    with catalog.session() as session:
        group_id = session.scalar(select(MergeGroup.id).where(MergeGroup.name == "all"))
        run = MergeRun(group_id=group_id, status=RunStatus.succeeded, input_fingerprint="0" * 64)
        session.add(run)
        session.flush()
        session.add_all(MergeRunInput(run_id=run.id, revision_id=current.id) for _, current in list_current(session))
    timings = []
    for _ in range(5):
        started = time.perf_counter()
        behind = groups_behind(catalog, [group])
        timings.append(time.perf_counter() - started)
        assert behind == {}, "the group merged every adapter: it is not behind"
    return round(1000 * statistics.median(timings), 1)


def _daemon_config(root: Path, watched: Path, base: Path, endpoint: str, poll_seconds: float) -> str:
    q = json.dumps
    hub = "".join(f"""
[[sources]]
name = "{name}"
kind = "hub"
repos = ["{repo}"]
base_model = {q(str(base))}
endpoint = {q(endpoint)}
interval_seconds = {interval}
""" for name, repo, interval in (("hub-webhook", WEBHOOK_REPO, 3600), ("hub-polled", POLLED_REPO, poll_seconds)))
    return f"""
[daemon]
state_dir = {q(str(root / "daemon-state"))}
cache_dir = {q(str(root / "daemon-cache"))}
webhooks = {{ listen = "127.0.0.1:0", secret_file = {q(str(root / "secret"))} }}

[[sources]]
name = "folder"
kind = "local"
paths = [{q(str(watched))}]
base_model = {q(str(base))}
settle_seconds = 1.0
{hub}"""


def _registered(catalog: Catalog) -> int:
    with catalog.session() as session:
        return session.scalar(select(func.count()).select_from(Adapter).where(Adapter.status == AdapterStatus.registered))


def _revision(catalog: Catalog, repo: str) -> str | None:
    with catalog.session() as session:
        adapter = session.scalar(select(Adapter).where(Adapter.locator == repo))
        return adapter.current.revision if adapter is not None and adapter.current is not None else None


def _until(condition, what: str, timeout: float, proc: subprocess.Popen, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        if proc.poll() is not None:
            raise RuntimeError(f"the daemon exited ({proc.returncode}) while waiting for {what}")
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _adapter_files(root: Path, base: Path, seed: int) -> dict[str, bytes]:
    folder = root / f"push-{seed}"
    make_adapter(folder, base, seed)
    return {name: (folder / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}


def _webhook(port: int, repo: str) -> None:
    event = {"event": {"action": "update", "scope": "repo.content"}, "repo": {"type": "model", "name": repo}}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/webhooks/hub", data=json.dumps(event).encode(),
                                     headers={"Content-Type": "application/json", "X-Webhook-Secret": SECRET})
    with urllib.request.urlopen(request, timeout=10) as response:
        if response.status != 202:
            raise RuntimeError(f"the webhook was answered {response.status}")


def daemon_run(root: Path, watched: Path, base: Path, n: int, idle_seconds: float, pushes: int,
               poll_seconds: float) -> dict:
    """Items 5-7 of the module docstring, on one daemon process."""
    from tests.hub_server import HubServer  # stdlib only; the Hub-compatible server the tests use

    (root / "secret").write_text(SECRET + "\n")
    (root / "secret").chmod(0o600)  # the daemon refuses a secret file others may read
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "NOTIFY_SOCKET", "CREDENTIALS_DIRECTORY"))}
    log = root / "daemon.log"
    config = root / "daemon.toml"
    rng = random.Random(0)
    with HubServer() as hub:
        hub.create_repo_direct(WEBHOOK_REPO, _adapter_files(root, base, 10_000))
        hub.create_repo_direct(POLLED_REPO, _adapter_files(root, base, 20_000))
        config.write_text(_daemon_config(root, watched, base, hub.endpoint, poll_seconds))
        started = time.monotonic()
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "iteris_daemon", "run", "--config", str(config)],
                                    stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root)
        try:
            database = root / "daemon-state" / "catalog.db"
            _until(lambda: database.exists(), "the catalog", 120, proc, 0.2)
            catalog = Catalog(f"sqlite:///{database}", migrate=False)
            _until(lambda: at_head(catalog.engine), "the daemon to migrate the catalog", 120, proc, 0.2)
            _until(lambda: _registered(catalog) >= n + 2, f"{n + 2} registered adapters", 60 + n, proc, 0.2)
            registered = time.monotonic() - started
            time.sleep(min(5.0, idle_seconds))  # the start-up scans' garbage, collected
            ticks, wall = _cpu_ticks(proc.pid), time.monotonic()
            time.sleep(idle_seconds)
            cpu = (_cpu_ticks(proc.pid) - ticks) / os.sysconf("SC_CLK_TCK") / (time.monotonic() - wall)
            idle = proc_figures(proc.pid)
            maps = Path(f"/proc/{proc.pid}/maps").read_text()

            status = []
            for _ in range(5):
                begin = time.perf_counter()
                subprocess.run([sys.executable, "-m", "iteris_daemon", "status", "--config", str(config)],
                               check=True, capture_output=True, env=env, cwd=root)
                status.append(time.perf_counter() - begin)

            port = int(_until(lambda: re.search(r"webhooks: listening on 127\.0\.0\.1 port (\d+)",
                                                                log.read_text(errors="replace")), "the webhook endpoint",
                              60, proc)[1])
            webhook, polled = [], []
            for push in range(pushes):
                sha = hub.commit_direct(WEBHOOK_REPO, _adapter_files(root, base, 10_001 + push))
                begin = time.monotonic()
                _webhook(port, WEBHOOK_REPO)
                _until(lambda: _revision(catalog, WEBHOOK_REPO) == sha, "the webhook's commit", 60, proc)
                webhook.append(time.monotonic() - begin)
            for push in range(pushes):
                time.sleep(rng.uniform(0, poll_seconds))  # a random moment of the polling period
                sha = hub.commit_direct(POLLED_REPO, _adapter_files(root, base, 20_001 + push))
                begin = time.monotonic()
                _until(lambda: _revision(catalog, POLLED_REPO) == sha, "the polled commit", 3 * poll_seconds + 60, proc)
                polled.append(time.monotonic() - begin)
            after = proc_figures(proc.pid)
            catalog.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=120)
    if code != 0:
        raise RuntimeError(f"the daemon exited {code} on SIGTERM; see {log}")
    return {
        "registered_seconds": round(registered, 1),
        "idle_rss_mb": round(idle["VmRSS"], 1), "idle_peak_rss_mb": round(idle["VmHWM"], 1),
        "idle_cpu_percent": round(100 * cpu, 2), "idle_threads": idle["Threads"],
        "libtorch_mapped": "libtorch" in maps, "rss_mb_after_pushes": round(after["VmRSS"], 1),
        "status_seconds": round(statistics.median(status), 3), "status_seconds_all": [round(t, 3) for t in status],
        "webhook_seconds": [round(t, 3) for t in webhook], "polled_seconds": [round(t, 2) for t in polled],
        "poll_interval_seconds": poll_seconds,
    }


def table(results: dict) -> str:
    n = results["adapters"]
    return "\n".join([
        "| measure | value |", "|---|---|",
        f"| {n} adapters moved into a watched folder: all registered after | {results['arrival_seconds']:.1f} s "
        f"({results['arrival_per_second']:.0f} adapters/s) |",
        f"| restart: rescan of {n} unchanged adapters, without / with the folder stat cache file | "
        f"{results['restart_rescan_cold_seconds']:.2f} s / {results['restart_rescan_seconds']:.2f} s |",
        f"| `adapters list` query ({n} rows, median of 5) | {results['list_query_ms']:.0f} ms |",
        f"| the daemon's catalog check, one group over the {n} (median of 5) | {results['catalog_check_ms']:.0f} ms |",
        f"| idle while watching (inotify): CPU | {results['idle_inotify']['cpu_percent']:.2f} % |",
        f"| idle while watching (polling every 5 s): CPU | {results['idle_polling']['cpu_percent']:.2f} % |",
        f"| catalog size | {results['catalog_bytes'] / 1e6:.1f} MB |",
    ] + daemon_rows(results["daemon"], n))


def daemon_rows(d: dict, n: int) -> list[str]:
    webhook, polled = d["webhook_seconds"], d["polled_seconds"]
    return [
        f"| daemon process: {n} adapters (+2 on the Hub) registered after start | {d['registered_seconds']:.1f} s |",
        f"| daemon process idle, watching them: RSS (peak) / CPU / threads | {d['idle_rss_mb']:.0f} MB "
        f"({d['idle_peak_rss_mb']:.0f}) / {d['idle_cpu_percent']:.2f} % / {d['idle_threads']} |",
        f"| libtorch mapped into the daemon | {'yes' if d['libtorch_mapped'] else 'no'} |",
        f"| `iteris-daemon status --config ...` (median of {len(d['status_seconds_all'])}) | "
        f"{d['status_seconds']:.2f} s |",
        f"| Hub push to registered, with a webhook (median / max of {len(webhook)}) | "
        f"{statistics.median(webhook):.2f} s / {max(webhook):.2f} s |",
        f"| Hub push to registered, polled every {d['poll_interval_seconds']:g} s (mean / max of {len(polled)}) | "
        f"{statistics.mean(polled):.1f} s / {max(polled):.1f} s |",
        f"| daemon RSS after the pushes | {d['rss_mb_after_pushes']:.0f} MB |",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.catalog", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--workdir", type=Path, default=Path("bench-out"))
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument("--pushes", type=int, default=5, help="Hub pushes timed, with a webhook and polled")
    parser.add_argument("--poll-seconds", type=float, default=10.0, help="the polled Hub source's interval")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    results = run(args.workdir, args.adapters, args.idle_seconds, args.pushes, args.poll_seconds)
    args.workdir.mkdir(parents=True, exist_ok=True)
    (args.workdir / "catalog.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
