"""Waiting on real events (filesystem, subprocesses) in tests."""

from __future__ import annotations

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
