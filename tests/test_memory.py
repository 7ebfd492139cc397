"""The process peak in merge reports is this process's own, across the merge-window resets.

Both checks run in fresh interpreters: the peaks are per process, and pytest's own would blur them.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")

ROOT = Path(__file__).resolve().parents[1]

TOUCH = """
def touch(mb):
    b = bytearray(mb * 2**20)
    for i in range(0, len(b), 4096):
        b[i] = 1
    return b
"""


def _run(code: str) -> dict:
    """Run ``code`` in a fresh interpreter importing this checkout; it prints one JSON object.

    Through a small launcher: a child's ru_maxrss starts at its parent's peak (pytest's here),
    which would hide the reset that the old process peak suffered.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    launcher = "import subprocess, sys; sys.exit(subprocess.run([sys.executable, '-c', sys.argv[1]]).returncode)"
    out = subprocess.run([sys.executable, "-c", launcher, TOUCH + textwrap.dedent(code)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def test_process_peak_is_not_the_parents():
    # Linux carries ru_maxrss across exec: a merge launched by a large benchmark process
    # reported the parent's peak as its own.
    child = "import json; from iteris_daemon import memory; print(json.dumps(memory.process_peak_mb()))"
    parent = f"""
        import subprocess, sys
        held = touch(600)
        print(subprocess.run([sys.executable, "-c", {child!r}], check=True, capture_output=True,
                             text=True).stdout.strip())
    """
    assert _run(parent) < 300


def test_process_peak_survives_the_window_reset():
    # The merge resets the window peak (clear_refs) after loading the model; that reset
    # cleared ru_maxrss too, so the process peak left the model load out.
    figures = _run("""
        import json
        from iteris_daemon import memory
        b = touch(200)
        del b
        assert memory.reset_peak()
        print(json.dumps({"process": memory.process_peak_mb(), "window": memory.window_peak_mb()}))
    """)
    assert figures["process"] >= 200
    assert figures["window"] < 100
