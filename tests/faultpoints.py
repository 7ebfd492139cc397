"""Run the real daemon (``python tests/faultpoints.py <iteris-daemon args>``) with pause
points, so that a test can kill or hold it at a known place instead of after a guessed delay.

``ITERIS_TEST_FAULTPOINTS`` (JSON) names the points and which occurrences pause, and a
folder for the gates: ``{"gates": "/tmp/x", "pause": {"publish:copied-one": [1], "merge:step": [7]}}``.
When occurrence ``n`` of ``point`` is reached, the thread that reached it writes the line
``FAULTPOINT <point> <n> reached`` to stderr and waits until the file ``<gates>/<point>-<n>``
exists (a test that kills the daemon there never creates it). Other occurrences pass.

The points (nothing in the daemon changes; these wrap functions it calls):

- ``merge:step``: the daemon asks whether to stop a running merge (every 0.2 s while its
  merge worker runs; the asks while the run gathers its inputs are not counted): mid-merge.
- ``publish:copied-one``: the folder publisher copied its first file into
  ``versions/.staging-*`` (a partial copy, ``current`` untouched).
- ``publish:renamed``: the complete copy is renamed to ``versions/run-N-*``; ``current``
  still points at the previous version.
- ``publish:link``: the new ``current`` link exists under its temporary name, about to
  be renamed over ``current``.
- ``publish:swapped``: ``current`` points at the new version; the run is not yet
  recorded as succeeded, old versions not yet pruned.
- ``run:succeeded``: a run succeeded and released its claim (the merge worker is held,
  so this daemon starts no other run meanwhile).
- ``run:record-failed``: the catalog refused the write that records a run's end (locked
  past its busy timeout, say); the run still holds its claim, and the error goes on once
  released.

After every run that merged, ``FAULTPOINT run <id> <status> after <n> merge steps`` is
written too (a test choosing a step to pause at can check that merges get that far).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path

SPEC = json.loads(os.environ.get("ITERIS_TEST_FAULTPOINTS") or "{}")
GATES = Path(SPEC.get("gates", "."))
PAUSE = {point: set(numbers) for point, numbers in SPEC.get("pause", {}).items()}
_seen: Counter = Counter()
_lock = threading.Lock()


def reached(point: str) -> None:
    with _lock:
        _seen[point] += 1
        number = _seen[point]
    if number not in PAUSE.get(point, ()):
        return
    sys.stderr.write(f"FAULTPOINT {point} {number} reached\n")
    sys.stderr.flush()
    gate = GATES / f"{point}-{number}"
    while not gate.exists():
        time.sleep(0.05)
    sys.stderr.write(f"FAULTPOINT {point} {number} released\n")
    sys.stderr.flush()


class _Proxy:
    """A module (``os``, ``shutil``) as one module sees it, with some functions wrapped."""

    def __init__(self, module, **wrapped):
        self._module, self._wrapped = module, wrapped

    def __getattr__(self, name):
        return self._wrapped.get(name) or getattr(self._module, name)


def install() -> None:
    import shutil

    from iteris_daemon import daemon, runner
    from iteris_daemon.plugins import publish_folder
    from iteris_daemon.runner import RunStatus

    copied = threading.local()

    def copyfile(src, dst, *args, **kwargs):
        result = shutil.copyfile(src, dst, *args, **kwargs)
        if ".staging-" in str(dst) and not getattr(copied, "one", False):
            copied.one = True
            reached("publish:copied-one")
        return result

    def copy_flushed(source, target):
        copied.one = False
        return original_copy_flushed(source, target)

    def rename(src, dst, *args, **kwargs):
        os.rename(src, dst, *args, **kwargs)
        reached("publish:renamed")

    def replace(src, dst, *args, **kwargs):
        linking = Path(dst).name == publish_folder.CURRENT
        if linking:
            reached("publish:link")
        os.replace(src, dst, *args, **kwargs)
        if linking:
            reached("publish:swapped")

    original_copy_flushed = publish_folder._copy_flushed
    publish_folder._copy_flushed = copy_flushed
    publish_folder.shutil = _Proxy(shutil, copyfile=copyfile)
    publish_folder.os = _Proxy(os, rename=rename, replace=replace)

    merging = threading.local()  # the run's thread is in its merge worker (not gathering inputs)
    original_merge_in_worker = runner.merge_in_worker

    def merge_in_worker(*args, **kwargs):
        merging.now = True
        try:
            return original_merge_in_worker(*args, **kwargs)
        finally:
            merging.now = False

    runner.merge_in_worker = merge_in_worker
    original_run_group = daemon.run_group

    def run_group(*args, should_stop=lambda: False, **kwargs):
        steps = 0

        def stop() -> bool:
            nonlocal steps
            if getattr(merging, "now", False):  # also asked while inputs are gathered: not a merge step
                steps += 1
                reached("merge:step")
            return should_stop()

        outcome = original_run_group(*args, should_stop=stop, **kwargs)
        if steps:
            sys.stderr.write(f"FAULTPOINT run {outcome.run_id} {outcome.status.value} after {steps} merge steps\n")
            sys.stderr.flush()
        if outcome.status is RunStatus.succeeded:
            reached("run:succeeded")
        return outcome

    daemon.run_group = run_group

    original_finish = runner._finish

    def finish(*args, **kwargs):
        try:
            return original_finish(*args, **kwargs)
        except Exception:
            reached("run:record-failed")
            raise

    runner._finish = finish


if __name__ == "__main__":
    sys.path.pop(0)  # this folder: its modules must not shadow the daemon's imports
    install()
    from iteris_daemon.cli import main

    sys.exit(main(sys.argv[1:]))
