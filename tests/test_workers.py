"""Merge workers: a merge that crashes, is killed, runs out of memory or hangs costs one
run, never the process that started it.

The runner is driven directly on a real SQLite catalog filled by the real folder source,
with a tiny BERT, real PEFT adapters and the folder publisher; every merge runs in a real
worker process. The misbehaviour comes from a strategy plugin that exists only for these
tests (``tests/fault_plugin``: on PYTHONPATH, so each worker loads it through its entry
point like any installed plugin); the crashes are real (SIGKILL, ``os._exit``, a 64 GiB
allocation under ``RLIMIT_AS``, a loop that ignores SIGTERM).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import polling
from builders import build_adapter, build_tiny_model
from iteris_daemon.catalog import Catalog
from iteris_daemon.catalog.models import MergeRun, RunStatus, SourceKind
from iteris_daemon.catalog.registry import add_source
from iteris_daemon.config import GroupConfig
from iteris_daemon.adapter_config import sha256_file
from iteris_daemon.plugin_manager import get_plugin_manager
from iteris_daemon.runner import gather_inputs, run_group, sync_group
from iteris_daemon.sources.local import LocalFolderSource
from iteris_daemon.errors import MergeCancelled
from iteris_daemon.oom import OomWatch
from iteris_daemon.supervisor import RESULT_NAME, WorkerFailed, WorkerOptions, _outcome, run_in_worker

pytestmark = pytest.mark.timeout(300)
PLUGIN = Path(__file__).parent / "fault_plugin"
MEMORY_LIMIT_MB = 8192  # far above what a tiny merge needs, far below the 64 GiB the plugin asks for


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("workers")
    base = build_tiny_model("bert", root / "base")
    return base, build_adapter(base, root / "task0", seed=3, family="bert", r=2)


@pytest.fixture
def faulty(monkeypatch):
    """The faulty strategy, registered here and in every worker."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(PLUGIN), os.environ.get("PYTHONPATH")])))
    monkeypatch.syspath_prepend(str(PLUGIN))
    import faulty_strategy

    manager = get_plugin_manager()
    added = not manager.is_registered(faulty_strategy)  # a manager built now found its entry point
    if added:
        manager.register(faulty_strategy)
    yield
    if added:
        manager.unregister(faulty_strategy)


class Setup:
    def __init__(self, tmp_path: Path, base: Path, adapter: Path):
        self.base, self.work, self.published = base, tmp_path / "work", tmp_path / "published"
        self.catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
        watched = self.watched = tmp_path / "watched"
        shutil.copytree(adapter, watched / adapter.name)
        with self.catalog.session() as session:
            add_source(session, "team", SourceKind.local, {"paths": [str(watched)], "base_model": str(base)})
        LocalFolderSource(self.catalog, "team").scan()
        self.failures: list[str] = []

    def run(self, mode: str = "ok", scale: float = 1.0, should_stop=lambda: False, seconds: float | None = None,
            **options):
        params = {"mode": mode, "scale": scale, **({"seconds": seconds} if seconds is not None else {})}
        group = GroupConfig(name="unified", base_model=str(self.base), strategy="faulty",
                            params=params, gates={"max_regression": False},
                            destinations=[{"kind": "folder", "path": str(self.published)}])
        sync_group(self.catalog, group)
        return run_group(self.catalog, group, self.work, "tester", should_stop=should_stop,
                         worker=WorkerOptions(**options), on_worker_failure=self.failures.append)

    def current(self) -> str:
        return sha256_file(self.published / "current" / "adapter_model.safetensors")

    def row(self, run_id: int) -> MergeRun:
        with self.catalog.session() as session:
            return session.get(MergeRun, run_id)


@pytest.fixture
def setup(tmp_path, made, faulty):
    return Setup(tmp_path, *made)


@pytest.mark.parametrize("mode, reason, kind", [
    ("sigkill", "the worker was killed by SIGKILL", "signal"),
    ("sigkill-saving", "the worker was killed by SIGKILL", "signal"),  # its staging copy was left for ever
    ("exit", "the worker exited with status 7 without a result", "exit"),
    ("allocate", "out of memory", "memory"),
    ("tensor", "out of memory", "memory"),  # torch's "can't allocate memory" was an error of kind "error"
])
def test_a_worker_that_dies_fails_its_run_and_the_next_run_succeeds(setup, mode, reason, kind):
    first = setup.run()
    assert first.status is RunStatus.succeeded
    published = setup.current()

    died = setup.run(mode, memory_limit_mb=MEMORY_LIMIT_MB)
    assert died.status is RunStatus.failed and reason in died.detail
    row = setup.row(died.run_id)
    assert row.status is RunStatus.failed and reason in row.error and row.finished_at is not None
    assert setup.current() == published  # the last published version is untouched
    assert setup.failures == [kind]
    assert not list(setup.work.glob("run-*")) and not list(setup.work.glob(".run-*"))  # its partial output is gone

    after = setup.run(scale=2.0)
    assert after.status is RunStatus.succeeded and setup.current() != published


def _cancel_when_merging(caplog) -> threading.Event:
    """An event set once a worker logged that its merge began."""
    stop = threading.Event()

    class Watch(logging.Handler):
        def emit(self, record):
            if "merging 1 adapter with faulty" in record.getMessage():
                stop.set()

    logging.getLogger("iteris_daemon.worker").addHandler(Watch())
    caplog.set_level(logging.INFO, logger="iteris_daemon.worker")
    return stop


@pytest.mark.parametrize("mode", ["slow", "stubborn"])
def test_cancelling_ends_the_worker_within_the_grace_period(setup, caplog, mode):
    assert setup.run().status is RunStatus.succeeded
    published = setup.current()
    merging = _cancel_when_merging(caplog)
    grace = 2.0
    asked: list[float] = []

    def should_stop() -> bool:
        if merging.is_set() and not asked:
            asked.append(time.monotonic())
        return bool(asked)

    outcome = setup.run(mode, should_stop=should_stop, grace_seconds=grace)
    ended = time.monotonic()
    assert outcome.status is RunStatus.cancelled, outcome.detail
    assert asked and ended - asked[0] < grace + 5
    if mode == "stubborn":
        assert "did not stop within 2 s and was killed" in outcome.detail
    assert setup.current() == published and setup.failures == []


def test_a_worker_asked_to_stop_as_it_starts_says_so(tmp_path):
    """SIGTERM before the worker set its handler (asked to stop at once) ends it: the
    run says it was starting, not that a merge was under way."""
    job = {"kind": "shapes", "base_model": str(tmp_path / "none"), "adapter": str(tmp_path / "none"),
           "trust_remote_code": False}
    with pytest.raises(MergeCancelled, match="the worker ended on SIGTERM while starting, before it could stop"):
        run_in_worker(job, tmp_path / "worker", "starting", should_stop=lambda: True)


@pytest.mark.parametrize("result, reason", [
    ({"status": "ok", "report": {}}, "the worker had finished and was exiting when SIGTERM ended it"),
    ({"status": "error", "error": "bad base"}, "the worker had failed (bad base) and was exiting when SIGTERM ended it"),
])
def test_a_worker_ended_by_sigterm_as_it_exits_is_not_said_to_have_not_started(tmp_path, result, reason):
    """QA: SIGTERM 0.1 s after "merging 3 adapters" recorded "the worker ended on SIGTERM
    before the merge started": the tiny merge was done, its result written, and Python had
    restored SIGTERM's default as the worker shut down. The reason now follows the result."""
    (tmp_path / RESULT_NAME).write_text(json.dumps(result))
    with pytest.raises(MergeCancelled) as cancelled:
        _outcome(-signal.SIGTERM, tmp_path / RESULT_NAME, ["merging 3 adapters with iteris"], cancelled=True,
                 killed=False, options=WorkerOptions(), oom=OomWatch(os.getpid()))
    assert str(cancelled.value) == f"merge cancelled: {reason}; its result is discarded"


def test_worker_logs_reach_the_daemon_log_with_the_run(setup, caplog):
    caplog.set_level(logging.INFO, logger="iteris_daemon.worker")
    outcome = setup.run()
    relayed = [r.getMessage() for r in caplog.records if r.name == "iteris_daemon.worker"]
    label = f"group unified run {outcome.run_id}: "
    assert any(m.startswith(label + "merging 1 adapter with faulty") for m in relayed)
    assert any(m.startswith(label + "worker ") and m.endswith(" started") for m in relayed)


def test_the_worker_is_killed_with_the_process_that_started_it(tmp_path, made, faulty):
    """A daemon killed mid-merge leaves no worker behind (PR_SET_PDEATHSIG)."""
    job_folder = tmp_path / "job"
    parent = subprocess.Popen([sys.executable, "-c", (
        "import sys, json\n"
        "from pathlib import Path\n"
        "from iteris_daemon.supervisor import run_in_worker\n"
        f"base, adapter = {str(made[0])!r}, {str(made[1])!r}\n"
        "job = {'request': {'base_model': base, 'strategy': 'faulty', 'params': {'mode': 'stubborn'},\n"
        f"       'out': {str(tmp_path / 'out')!r}, 'device': 'cpu', 'trust_remote_code': False,\n"
        "       'adapters': [{'path': adapter, 'name': 'task0'}]}, 'calibration': [None]}\n"
        f"run_in_worker(job, Path({str(job_folder)!r}), 'orphan test')\n")],
        stderr=subprocess.PIPE, text=True)
    worker = polling.wait_for(lambda: _child_of(parent.pid), timeout=60, what="the worker process")
    parent.kill()
    parent.wait()
    polling.wait_for(lambda: not _alive(worker), timeout=30, what="the orphaned worker to die")


@pytest.mark.long
def test_the_daemon_outlives_workers_that_die(tmp_path, made):
    """The same three deaths under a real daemon (``python -m iteris_daemon run``): each
    run is recorded failed with the reason while the daemon keeps running and the
    published version stays as it was; then a run succeeds. The mode changes by SIGHUP
    (new parameters: new inputs, so the group runs again)."""
    import json
    import signal

    from sqlalchemy import select

    from iteris_daemon.catalog.models import MergeGroup

    base, adapter = made
    watched, published = tmp_path / "watched", tmp_path / "published"
    shutil.copytree(adapter, watched / "task0")
    config = tmp_path / "daemon.toml"

    def configure(mode: str, scale: float = 1.0) -> None:
        q = json.dumps
        config.write_text(f"""
[daemon]
state_dir = {q(str(tmp_path / "state"))}
cache_dir = {q(str(tmp_path / "cache"))}
worker_memory_limit_mb = {MEMORY_LIMIT_MB}

[[sources]]
name = "team"
kind = "local"
paths = [{q(str(watched))}]
base_model = {q(str(base))}
settle_seconds = 0.3

[[groups]]
name = "unified"
base_model = {q(str(base))}
strategy = "faulty"
params = {{ mode = "{mode}", scale = {scale} }}
debounce_seconds = 0
gates = {{ max_regression = false }}
destinations = [{{ kind = "folder", path = {q(str(published))} }}]
""")

    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_SOCKET", "CREDENTIALS_DIRECTORY"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PLUGIN), env.get("PYTHONPATH")]))
    configure("ok")
    log = tmp_path / "daemon.log"
    with open(log, "wb") as out:
        daemon = subprocess.Popen([sys.executable, "-m", "iteris_daemon", "run", "--config", str(config)],
                                  stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    catalog = None
    try:
        polling.wait_for(lambda: " running: " in log.read_text(errors="replace"), timeout=120,
                         what="the daemon to start", proc=daemon)
        catalog = Catalog(f"sqlite:///{tmp_path / 'state' / 'catalog.db'}", migrate=False)

        def next_run(after: int) -> MergeRun:
            def finished():
                with catalog.session() as session:
                    return session.scalar(select(MergeRun).join(MergeGroup).where(
                        MergeGroup.name == "unified", MergeRun.id > after, MergeRun.finished_at.is_not(None),
                        MergeRun.status != RunStatus.skipped).order_by(MergeRun.id).limit(1))
            return polling.wait_for(finished, timeout=180, what=f"a run after run {after}", proc=daemon)

        first = next_run(0)
        assert first.status is RunStatus.succeeded, first.error
        current = published / "current" / "adapter_model.safetensors"
        version = sha256_file(current)
        last = first.id
        for mode, reason in (("sigkill", "killed by SIGKILL"), ("exit", "exited with status 7 without a result"),
                             ("allocate", "out of memory")):
            configure(mode)
            daemon.send_signal(signal.SIGHUP)
            died = next_run(last)
            assert died.status is RunStatus.failed and reason in died.error, (mode, died.error)
            assert daemon.poll() is None, log.read_text(errors="replace")[-5000:]
            assert sha256_file(current) == version
            assert not list((tmp_path / "state" / "runs").glob("run-*"))
            last = died.id
        configure("ok", scale=2.0)
        daemon.send_signal(signal.SIGHUP)
        after = next_run(last)
        assert after.status is RunStatus.succeeded, after.error
        assert sha256_file(current) != version
        daemon.terminate()
        assert daemon.wait(timeout=60) == 0
    finally:
        if catalog is not None:
            catalog.close()
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


def _child_of(pid: int) -> int | None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                return int(entry.name)
    return None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_calibration_worker_that_fails_makes_the_group_wait_and_is_counted(setup):
    """The worker that would generate calibration data for one of three adapters cannot load
    torch (a 64 MiB ``RLIMIT_AS``). That is not the adapter's fault: the run is skipped,
    waiting for it with the worker's reason, and asks the daemon to try again later; the
    failure is counted like a merge worker's, and nothing is published. Before, the adapter
    was held back and the other two were merged and published without its task."""
    build_adapter(setup.base, setup.watched / "task1", seed=4, family="bert", r=2)
    (build_adapter(setup.base, setup.watched / "task2", seed=5, family="bert", r=2)
     / "calibration.jsonl").unlink()  # generate's to answer
    LocalFolderSource(setup.catalog, "team").scan()
    group = GroupConfig(name="generated", base_model=str(setup.base), strategy="faulty",
                        calibration={"order": ["adapter", "generate"]}, gates={"max_regression": False},
                        destinations=[{"kind": "folder", "path": str(setup.published)}])
    sync_group(setup.catalog, group)
    outcome = run_group(setup.catalog, group, setup.work, "tester", worker=WorkerOptions(memory_limit_mb=64),
                        on_worker_failure=setup.failures.append)
    assert outcome.status is RunStatus.skipped and outcome.retry_inputs, outcome
    assert outcome.detail.startswith("waiting for task2: calibration source generate: "), outcome.detail
    held = setup.row(outcome.run_id).metrics["held_back"]
    assert list(held) == ["task2"]
    assert held["task2"].removeprefix("calibration source generate: ").startswith(
        ("out of memory", "ImportError", "OSError")), held
    assert len(setup.failures) == 1 and not setup.published.exists()


def _group_with_one_adapter_for_generate(setup) -> GroupConfig:
    """A group of two adapters in ``setup``'s watched folder, registered: task1 brings its
    calibration file, task2 none, so the ``generate`` source (in a calibration worker) is
    asked about task2."""
    build_adapter(setup.base, setup.watched / "task1", seed=4, family="bert", r=2)
    (build_adapter(setup.base, setup.watched / "task2", seed=5, family="bert", r=2)
     / "calibration.jsonl").unlink()
    LocalFolderSource(setup.catalog, "team").scan()
    group = GroupConfig(name="generated", base_model=str(setup.base), strategy="faulty", params={"mode": "ok"},
                        calibration={"order": ["adapter", "generate"]}, gates={"max_regression": False},
                        destinations=[{"kind": "folder", "path": str(setup.published)}])
    sync_group(setup.catalog, group)
    return group


def test_a_group_told_not_to_wait_or_forced_merges_without_the_adapter_whose_calibration_worker_died(
        setup, monkeypatch):
    """After runs in a row waiting for a calibration worker that keeps dying (the daemon
    counts them) or when forced, the run holds that adapter back, with the worker's reason,
    and merges the others (before the daemon counted, a worker that always failed kept the
    group waiting for ever, ``--force`` too). A worker that fails as the run is stopped
    cancels the run (it was recorded ``skipped``, waiting)."""
    import iteris_daemon.runner as runner_module

    real = runner_module.run_in_worker
    stop = threading.Event()

    def dies_for_calibration(job, *args, **kwargs):
        if job.get("kind") == "calibration":
            raise WorkerFailed("the worker was killed by SIGKILL", "signal")
        return real(job, *args, **kwargs)

    monkeypatch.setattr(runner_module, "run_in_worker", dies_for_calibration)
    group = _group_with_one_adapter_for_generate(setup)

    def run(**options):
        return run_group(setup.catalog, group, setup.work, "tester", should_stop=stop.is_set, **options)

    waiting = run()
    assert waiting.status is RunStatus.skipped and waiting.retry_inputs and waiting.calibration_worker_failed
    merged = run(wait_for_calibration_workers=False)
    assert merged.status is RunStatus.succeeded and merged.calibration_worker_failed, merged
    assert merged.retry_inputs  # a later run asks the worker again: nothing else would (it used to stay out)
    assert setup.row(merged.run_id).metrics["held_back"] == {
        "task2": "calibration source generate: the worker was killed by SIGKILL"}
    assert (setup.published / "current" / "adapter_model.safetensors").is_file()
    forced = run(force=True)  # the same inputs: only a forced run merges them again
    assert forced.status is RunStatus.succeeded and forced.run_id > merged.run_id and forced.retry_inputs, forced
    monkeypatch.setattr(runner_module, "run_in_worker", real)  # the worker answers again (random words: an encoder)
    recovered = run(wait_for_calibration_workers=False)
    assert recovered.status is RunStatus.succeeded and not recovered.retry_inputs, recovered
    assert not recovered.calibration_worker_failed and setup.row(recovered.run_id).metrics["held_back"] == {}

    def stopped_as_it_dies(job, *args, **kwargs):
        stop.set()
        return dies_for_calibration(job, *args, **kwargs)

    monkeypatch.setattr(runner_module, "run_in_worker", stopped_as_it_dies)
    cancelled = run()
    assert cancelled.status is RunStatus.cancelled and cancelled.run_id is None, cancelled


def test_a_calibration_source_out_of_memory_in_its_worker_is_counted_as_a_worker_failure(setup, monkeypatch):
    """A source that raises ``MemoryError`` inside the calibration worker answers so for its
    adapter: the run waits for it as for a worker that died of it, but only a death was
    counted in ``iteris_worker_failures_total`` (QA stop 50). Now each worker that answers
    out of memory counts once, as ``memory``; a source's other errors count nothing."""
    import iteris_daemon.runner as runner_module

    real, answer = runner_module.run_in_worker, {}

    def answers_for_calibration(job, *args, **kwargs):
        if job.get("kind") == "calibration":
            return [dict(answer) for _ in job["adapters"]]
        return real(job, *args, **kwargs)

    monkeypatch.setattr(runner_module, "run_in_worker", answers_for_calibration)
    group = _group_with_one_adapter_for_generate(setup)
    answer.update(error="MemoryError: Cannot allocate memory (os error 12)", out_of_memory=True)
    waiting = run_group(setup.catalog, group, setup.work, "tester", on_worker_failure=setup.failures.append)
    assert waiting.status is RunStatus.skipped and waiting.calibration_worker_failed, waiting
    assert setup.failures == ["memory"]
    answer.update(error="ValueError: this adapter's own problem", out_of_memory=False)
    merged = run_group(setup.catalog, group, setup.work, "tester", on_worker_failure=setup.failures.append)
    assert merged.status is RunStatus.succeeded and not merged.calibration_worker_failed, merged
    assert setup.failures == ["memory"]


def test_a_calibration_source_that_needs_torch_runs_in_a_worker(tmp_path, made):
    """The daemon gathers inputs with ``in_worker``: a source marked ``runs_in_worker``
    (``generate``, which loads the model) is called in one worker process for all the
    run's adapters. Its samples equal the same source's called in this process on the
    same adapters (it is seeded)."""
    base, adapter = made
    setup = Setup(tmp_path, base, adapter)
    build_adapter(base, tmp_path / "watched" / "task1", seed=4, family="bert", r=2)
    LocalFolderSource(setup.catalog, "team").scan()
    group = GroupConfig(name="generated", base_model=str(base), strategy="task_arithmetic",
                        calibration={"order": ["generate"], "generate": {"samples": 5}},
                        destinations=[{"kind": "folder", "path": str(setup.published)}])
    sync_group(setup.catalog, group)
    kinds = []

    def in_worker(job, label):
        kinds.append(job["kind"])
        return run_in_worker(job, tmp_path / "calibration-worker", label)

    in_a_worker = gather_inputs(setup.catalog, group, False, None, tmp_path / "inputs-worker", in_worker=in_worker)
    here = gather_inputs(setup.catalog, group, False, None, tmp_path / "inputs-here")
    assert kinds == ["calibration"] and not in_a_worker.held_back
    assert [a.name for a, _ in in_a_worker.revisions] == [a.name for a, _ in here.revisions] == [adapter.name, "task1"]
    for got, expected, (registered, _) in zip(in_a_worker.calibration, here.calibration, here.revisions):
        assert got.generated and got.source == expected.source == (f"generated by generate from {registered.name} "
                                                                   "(random vocabulary words, seed 0, samples 5)")
        assert len(got.samples) == 5 and got.samples == expected.samples


@pytest.mark.parametrize("device", ["cpu", "cuda", None])
def test_the_memory_limit_holds_cpu_workers_only(tmp_path, made, monkeypatch, caplog, device):
    """CUDA reserves a very large address space as it starts: under ``RLIMIT_AS`` every GPU
    merge failed there ("CUDA error: out of memory"), said to be out of host memory (found by
    QA). A CUDA worker leaves the limit off and says so; a CPU worker keeps it, and so does a
    shapes job (``None``: it runs on the CPU, and succeeds without the limit). Under 64 MiB
    torch cannot even be imported; no GPU is seen here, so the CUDA merge, the limit off, gets
    as far as its device."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    caplog.set_level(logging.INFO, logger="iteris_daemon.worker")
    base, adapter = made
    job = {"request": {"base_model": str(base), "strategy": "task_arithmetic", "params": {}, "out": str(tmp_path / "out"),
                       "device": device, "dtype": "float32", "output_dtype": None, "offload": "auto",
                       "trust_remote_code": False, "adapters": [{"path": str(adapter), "name": "task0"}]},
           "calibration": [None]} if device else {"kind": "shapes", "base_model": str(base), "adapter": str(adapter),
                                                  "trust_remote_code": False}
    with pytest.raises(WorkerFailed) as failed:
        run_in_worker(job, tmp_path / "worker", "limited", options=WorkerOptions(memory_limit_mb=64))
    said = [r.getMessage() for r in caplog.records if "is not applied to a CUDA worker" in r.getMessage()]
    if device == "cuda":
        assert str(failed.value) == "device 'cuda' is not available here (0 CUDA devices)"
        assert len(said) == 1 and "(64)" in said[0] and "MemoryMax" in said[0], said
    else:
        assert failed.value.kind == "memory" or str(failed.value).startswith(("ImportError", "OSError")), failed.value
        assert not said


def test_the_shapes_worker_takes_the_options_of_its_start(tmp_path, made):
    """A reload that raised ``worker_memory_limit_mb`` (adapters waiting with "out of memory")
    reached the merge workers but not the shapes worker, built once at the start: the adapters
    waited until a restart (QA CFG). The shapes source asks for the options at each worker."""
    from iteris_daemon.catalog.shapes import in_worker
    from iteris_daemon.validation import read_layout

    base, adapter = made
    options = [WorkerOptions(memory_limit_mb=64)]  # under 64 MiB torch cannot even be imported
    compute = in_worker(tmp_path / "work", lambda: options[-1])
    with pytest.raises(Exception) as failed:
        compute(str(base), read_layout(adapter), False)
    assert "memory" in str(failed.value) or "ImportError" in str(failed.value), failed.value
    options.append(WorkerOptions())  # the reload's: no limit
    shapes = compute(str(base), read_layout(adapter), False)
    assert set(read_layout(adapter).modules) <= set(shapes["layers"]), sorted(shapes["layers"])


def _memory_cgroup(limit: int):
    """A child of this process's memory cgroup limited to ``limit`` bytes, as (its
    cgroup.procs file, its folder); skips where cgroups cannot be made (not root, no
    memory controller, cgroup v2 without it delegated)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            folder = Path("/sys/fs/cgroup/memory") / path.lstrip("/") / f"iteris-oom-{os.getpid()}"
            limits = ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes")  # v1; memsw: no escape to swap
            break
        if controllers == "" and (Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.max").exists():
            folder = Path("/sys/fs/cgroup") / path.lstrip("/") / f"iteris-oom-{os.getpid()}"
            limits = ("memory.max", "memory.swap.max")
            break
    else:
        pytest.skip("no memory cgroup controller here")
    try:
        folder.mkdir()
    except OSError as exc:
        pytest.skip(f"cannot make a memory cgroup: {exc}")
    for name in limits:
        try:
            (folder / name).write_text(str(limit if name != "memory.swap.max" else 0))
        except OSError:
            if name == limits[0]:
                folder.rmdir()
                pytest.skip(f"cannot limit a memory cgroup ({name})")
    return folder / "cgroup.procs", folder


def test_a_worker_killed_by_the_oom_killer_is_reported_as_such(setup, caplog):
    """A real cgroup OOM kill: the worker is moved into a memory cgroup limited to 256 MiB
    once its merge began, then (2 s after it sees the move) writes memory until the kernel kills it. The run fails
    as out of memory (kind ``memory``), not as an unexplained SIGKILL."""
    procs, folder = _memory_cgroup(256 << 20)
    try:
        assert setup.run().status is RunStatus.succeeded
        published = setup.current()
        merging = _cancel_when_merging(caplog)  # set once the worker logged its merge began
        outcome = {}
        runner = threading.Thread(target=lambda: outcome.update(result=setup.run("hog", seconds=2.0)))
        runner.start()
        assert merging.wait(120), "the worker never began its merge"
        workers = [pid for pid in os.listdir("/proc") if pid.isdigit() and _is_worker_of(int(pid), os.getpid())]
        assert len(workers) == 1, workers
        procs.write_text(workers[0])  # the hog starts 2 s after it sees itself moved: 10 of the supervisor's looks
        runner.join(120)
        died = outcome["result"]
        assert died.status is RunStatus.failed, died.detail
        assert "killed by the kernel's OOM killer" in died.detail and str(folder) in died.detail, died.detail
        assert setup.failures == ["memory"] and setup.current() == published
    finally:
        for _ in range(50):  # the cgroup goes once its last process has
            try:
                folder.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def _is_worker_of(pid: int, parent: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return int(stat[stat.rindex(")") + 2:].split()[1]) == parent and b"iteris_daemon.worker" in cmdline
