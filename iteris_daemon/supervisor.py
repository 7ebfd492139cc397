"""Starting and watching merge workers (:mod:`iteris_daemon.worker`) from the daemon.

Each merge runs in its own child process. The supervisor writes the job file,
relays the worker's log lines (JSON on its stderr) to the daemon's log with the
run's label, keeps the last lines for the failure reason, and turns how the
worker ended into an outcome:

- ``result.json`` with ``ok``: the report, returned;
- cancelled (``should_stop`` became true): SIGTERM, which the worker turns into a
  stop at the merge's next safe point; SIGKILL after ``grace_seconds``;
  :class:`~iteris_daemon.errors.MergeCancelled` either way;
- an error the worker reported, a non-zero exit, or death by a signal (a
  segfault, the OOM killer's SIGKILL, told apart by its cgroup's OOM-kill count,
  :mod:`iteris_daemon.oom`): :class:`WorkerFailed` with the reason and the last
  log lines.

Nothing here imports torch: the daemon process never does.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .errors import IterisError, MergeCancelled
from .oom import OomWatch, says_out_of_memory

log = logging.getLogger("iteris_daemon.worker")
JOB_NAME = "job.json"
RESULT_NAME = "result.json"  # iteris_daemon.worker.RESULT_NAME (not imported: it is the child's module)
TAIL_LINES = 20


class WorkerFailed(IterisError):
    """The worker failed or died; ``kind`` is a short label for metrics, ``error_type``
    the name of the error the worker reported (None when it died)."""

    def __init__(self, message: str, kind: str, error_type: str | None = None):
        self.kind, self.error_type = kind, error_type
        super().__init__(message)


@dataclass(frozen=True)
class WorkerOptions:
    """How merge workers run (``[daemon]`` settings)."""

    grace_seconds: float = 60.0  # after SIGTERM, before SIGKILL
    memory_limit_mb: int | None = None  # RLIMIT_AS of the worker; None: no limit
    poll_seconds: float = 0.2  # how often ``should_stop`` is asked


def run_in_worker(job: dict[str, Any], folder: Path, label: str, should_stop: Callable[[], bool] = lambda: False,
                  options: WorkerOptions = WorkerOptions()) -> dict[str, Any]:
    """Run ``job`` in a worker whose files live in ``folder``; return its report."""
    folder.mkdir(parents=True, exist_ok=True)
    job_path = folder / JOB_NAME
    job_path.write_text(json.dumps({**job, "parent_pid": os.getpid(), "memory_limit_mb": options.memory_limit_mb},
                                   default=str), encoding="utf-8")
    (folder / RESULT_NAME).unlink(missing_ok=True)
    process = subprocess.Popen(
        [sys.executable, "-m", "iteris_daemon.worker", str(job_path)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,  # a Ctrl-C meant for the daemon reaches the worker only through us
    )
    log.info("%s: worker %d started", label, process.pid)
    oom = OomWatch(process.pid)
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    relay = threading.Thread(target=_relay, args=(process.stdout, label, tail), name=f"worker-log-{process.pid}",
                             daemon=True)
    relay.start()
    stopped_at = None
    killed = False
    try:
        while process.poll() is None:
            if stopped_at is None and should_stop():
                log.info("%s: asking worker %d to stop", label, process.pid)
                process.send_signal(signal.SIGTERM)
                stopped_at = time.monotonic()
            elif stopped_at is not None and not killed and time.monotonic() - stopped_at > options.grace_seconds:
                log.warning("%s: worker %d did not stop within %.0f s: killed", label, process.pid,
                            options.grace_seconds)
                process.kill()
                killed = True
            try:
                process.wait(options.poll_seconds)
            except subprocess.TimeoutExpired:
                oom.refresh()
    except BaseException:  # the daemon itself is going down: never leave a worker behind
        process.kill()
        process.wait()
        raise
    finally:
        relay.join(timeout=10)
        process.stdout.close()
    return _outcome(process.returncode, folder / RESULT_NAME, list(tail), cancelled=stopped_at is not None,
                    killed=killed, options=options, oom=oom)


def _outcome(code: int, result_path: Path, tail: list[str], cancelled: bool, killed: bool,
             options: WorkerOptions, oom: OomWatch) -> dict[str, Any]:
    result = None
    if result_path.is_file():
        try:
            result = json.loads(result_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            result = None
    if killed:
        raise MergeCancelled(f"merge cancelled: the worker did not stop within {options.grace_seconds:g} s and was killed")
    if result is not None and result.get("status") == "ok" and code == 0:
        return result["report"]
    if result is not None and result.get("status") == "cancelled":
        raise MergeCancelled(result.get("error") or "merge cancelled")
    if cancelled and code == -signal.SIGTERM:
        raise MergeCancelled(_ended_on_sigterm(result))
    last = f"; last output: {' | '.join(tail[-5:])}" if tail else ""
    if result is not None and result.get("status") == "error":
        kind = "memory" if says_out_of_memory(result.get("error", "")) else "error"
        raise WorkerFailed(str(result.get("error")), kind, result.get("error_type"))
    if code == -signal.SIGKILL and oom.killed():
        raise WorkerFailed(f"the worker was killed by the kernel's OOM killer (the memory limit of cgroup "
                           f"{oom.describe()}){last}", "memory")
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
        hint = " (the kernel's OOM killer sends SIGKILL)" if code == -signal.SIGKILL else ""
        raise WorkerFailed(f"the worker was killed by {name}{hint}{last}", "signal")
    if any(says_out_of_memory(line) for line in tail):  # e.g. torch could not be loaded under the limit
        raise WorkerFailed(f"out of memory: the worker exited with status {code} without a result{last}", "memory")
    raise WorkerFailed(f"the worker exited with status {code} without a result{last}", "exit")


def _ended_on_sigterm(result: dict[str, Any] | None) -> str:
    """Why a cancelled worker ended on SIGTERM instead of stopping at a safe point, by what
    it had reported: with no result, SIGTERM came before it set its handler (it was
    starting); with one, after its job was done, as it exited (Python restores SIGTERM's
    default as it shuts down). It said "before the merge started" for a finished merge."""
    if result is None:
        return "merge cancelled: the worker ended on SIGTERM while starting, before it could stop at a safe point"
    done = "finished" if result.get("status") == "ok" else f"failed ({result.get('error')})"
    return f"merge cancelled: the worker had {done} and was exiting when SIGTERM ended it; its result is discarded"


def _relay(stream: IO[bytes], label: str, tail: collections.deque[str]) -> None:
    """Log each line the worker writes, at its level, prefixed with ``label``."""
    for raw in stream:
        line = raw.decode("utf-8", "replace").rstrip("\n")
        if not line:
            continue
        try:
            entry = json.loads(line)
            level = logging.getLevelName(entry["level"])
            message = entry["message"] + (f"\n{entry['exception']}" if entry.get("exception") else "")
        except (ValueError, KeyError, TypeError):  # not our JSON: a crash dump, a library's print
            level, message = logging.WARNING, line
        if not isinstance(level, int):
            level = logging.INFO
        tail.append(message.splitlines()[0] if message else "")
        log.log(level, "%s: %s", label, message)
