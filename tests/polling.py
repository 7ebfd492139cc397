"""Waiting on real events (filesystem, subprocesses, a daemon) in tests."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 60.0, proc=None, interval: float = 0.1):
    """Poll until ``predicate()`` is truthy and return its value. The deadline only keeps a
    broken watcher or daemon from hanging the suite; with ``proc``, fail as soon as it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the daemon exited ({proc.returncode}) while waiting for {what}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def run_here(daemon, probe: Callable[[], None]) -> int:
    """``daemon.run()`` in this process's main thread, as the CLI runs it, with ``probe`` in a
    thread beside it; the process's signal handlers are restored after."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    threading.Thread(target=probe, daemon=True).start()
    try:
        return daemon.run()
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
