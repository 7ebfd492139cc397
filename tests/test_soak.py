"""A short soak: ``benchmarks/soak.py`` for 8 cycles, as a test.

One real daemon, 8 merge cycles over a changing set of adapters (add, remove, new
revision), with a disturbance on every cycle (an adapter dropped and deleted before it
settles, a subfolder and the flaky source's folder renamed away or deleted and put
back) and a SIGHUP with new parameters every 4 cycles; with its seed, the second
reload and a folder flap fall in the same cycle (the timing that once lost an adapter:
a reload's scan saw the folder away). Asserted from the soak's own report
(``soak.json``): 8 cycles ran, each converged; zero errors (no ERROR line or traceback
in the daemon's log, no problem found by the driver, e.g. a published version whose
provenance is wrong or a folder change the catalog never showed); no failed or
cancelled run; every version published was checked; both reloads and every kind of
disturbance happened; the daemon exited 0 on SIGTERM; no merge worker process left
(alive or zombie) once a cycle caught up. Memory, fd and thread growth are what the
long soak (``python -m benchmarks.soak``, RELIABILITY.md row 25) measures: 4 cycles
after warm-up say nothing about them, so their limits are lifted here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CYCLES = 8
RELOAD_EVERY = 4


@pytest.mark.long
@pytest.mark.timeout(900)
def test_a_short_soak_has_no_errors(tmp_path):
    work = tmp_path / "soak"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", "--cycles", str(CYCLES), "--workdir", str(work),
         "--warmup", "4", "--disturb", "1.0", "--reload-every", str(RELOAD_EVERY),
         "--max-rss-growth-mb", "100000", "--max-rss-growth-pct", "100000",
         "--max-fd-growth", "100000", "--max-thread-growth", "100000"],
        cwd=ROOT, capture_output=True, text=True, timeout=840,
    )
    output = result.stdout[-6000:] + result.stderr[-6000:]
    report = json.loads((work / "soak.json").read_text())
    figures = report["figures"]
    assert result.returncode == 0 and report["failed_checks"] == [], output
    assert report["problems"] == [] and report["log_errors"] == [] and figures["errors"] == 0, output
    assert figures["cycles"] == CYCLES and len(report["samples"]) == CYCLES
    assert figures["runs_failed"] == 0 and figures["runs_cancelled"] == 0
    assert figures["runs_succeeded"] >= CYCLES  # one merge per cycle at least
    assert figures["published_versions_checked"] >= CYCLES
    assert figures["daemon_exit"] == 0
    assert figures["samples_with_children"] == 0 and figures["zombies_max"] == 0  # every merge worker gone and reaped
    ops = [op for sample in report["samples"] for op in sample["ops"]]
    assert sum(op.startswith("reload") for op in ops) == CYCLES // RELOAD_EVERY, ops
    for kind in ("transient", "flap-subfolder", "flap-root"):
        assert any(op.startswith(kind) for op in ops), (kind, ops)
    assert any("reload" in s["ops"] and any(op.startswith("flap-root") for op in s["ops"]) for s in report["samples"])
    print(f"soak: {CYCLES} cycles in {figures['wall_s']} s, {figures['runs_succeeded']} runs succeeded, "
          f"{figures['published_versions_checked']} versions checked, "
          f"{sum(not op.startswith(('add', 'remove', 'replace')) for op in ops)} disturbances and reloads, 0 errors")


def test_the_soak_sees_live_and_unreaped_children():
    """The leak check counts what it must: a live child, then the same child exited and
    not yet reaped (a zombie), then nothing once it is reaped."""
    import os
    import time

    from benchmarks.soak import children

    before = children(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        assert children(os.getpid()) == (before[0] + 1, before[1])
        child.stdin.close()  # it exits; Popen reaps it only when asked
        deadline = time.monotonic() + 30
        while children(os.getpid())[1] == before[1] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert children(os.getpid()) == (before[0] + 1, before[1] + 1)
    finally:
        child.wait()
    assert children(os.getpid()) == before


def test_the_soak_splits_resident_memory_by_region():
    """The regions add up to the process's RSS, and 32 MiB written into a new buffer
    show up as anonymous memory, not as files."""
    import os

    from benchmarks.soak import memory_regions, proc_figures

    def anonymous(regions):
        return regions["heap"] + regions["thread_arenas"] + regions["other_anonymous"]

    before = memory_regions(os.getpid())
    assert set(before) == {"heap", "thread_arenas", "other_anonymous", "files", "other"}
    assert abs(sum(before.values()) - proc_figures(os.getpid())["VmRSS"]) < 0.05 * sum(before.values()) + 2
    buffer = bytearray(32 << 20)
    buffer[::4096] = b"x" * len(buffer[::4096])  # touch every page
    after = memory_regions(os.getpid())
    assert anonymous(after) - anonymous(before) > 30 and abs(after["files"] - before["files"]) < 8
    del buffer
