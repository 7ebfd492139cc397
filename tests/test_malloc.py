"""The daemon's glibc malloc settings (:mod:`iteris_daemon.malloc`), observed through
glibc's own reports in fresh processes: settings, once applied, last for the process."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")

MALLINFO = r"""
import ctypes, json, os, sys, tempfile, threading

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
"""  # glibc's own count of the process's heap (mallinfo2), for the probes below

PROBE = MALLINFO + r"""
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = (ctypes.c_char_p, ctypes.c_char_p)
libc.malloc_info.argtypes = (ctypes.c_int, ctypes.c_void_p)
libc.fclose.argtypes = (ctypes.c_void_p,)
applied = {}
if sys.argv[1] == "tuned":
    from iteris_daemon.malloc import tune
    applied = tune()

# A 1 MiB block freed, then another: glibc's dynamic threshold serves the second from an arena.
first = bytearray(1 << 20)
del first
before = libc.mallinfo2().hblkhd
second = bytearray(1 << 20)
mapped = libc.mallinfo2().hblkhd - before

# Eight threads alive at once, each allocating: how many arenas serve them.
barrier = threading.Barrier(8)
held = []
def allocate():
    barrier.wait()
    held.append(bytearray(4096))  # above pymalloc's 512 bytes: glibc's malloc
    barrier.wait()
threads = [threading.Thread(target=allocate) for _ in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
descriptor, path = tempfile.mkstemp()
os.close(descriptor)
handle = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, handle)
libc.fclose(handle)
arenas = open(path).read().count("<heap nr=")
os.unlink(path)
print(json.dumps({"applied": applied, "mapped": mapped, "arenas": arenas}))
"""


def _run(script: str, mode: str, **env: str) -> dict:
    """``script``'s JSON line, from a fresh interpreter without the caller's malloc settings."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    result = subprocess.run([sys.executable, "-c", script, mode], env={**clean, **env}, capture_output=True,
                            text=True, check=True, timeout=60)
    return json.loads(result.stdout)


def test_glibc_defaults_unmapped_large_blocks_and_one_arena_per_thread():
    """The control: what the settings change is there without them."""
    default = _run(PROBE, "untouched")
    assert default["mapped"] == 0  # the 1 MiB block came from an arena
    # The main arena and one per thread, up to glibc's limit of 8 per core.
    assert default["arenas"] >= min(9, 8 * (os.cpu_count() or 1))


def test_tune_caps_the_arenas_and_maps_every_large_block():
    tuned = _run(PROBE, "tuned")
    assert tuned["applied"] == {"MALLOC_ARENA_MAX": 2, "MALLOC_MMAP_THRESHOLD_": 128 * 1024}
    assert tuned["mapped"] >= 1 << 20  # mapped, so freeing it returns it to the system
    assert tuned["arenas"] <= 2


def test_a_setting_the_environment_gives_is_left_to_it():
    chosen = _run(PROBE, "tuned", MALLOC_ARENA_MAX="4")
    assert chosen["applied"] == {"MALLOC_MMAP_THRESHOLD_": 128 * 1024}
    assert 2 < chosen["arenas"] <= 4
    tunable = _run(PROBE, "tuned", GLIBC_TUNABLES="glibc.malloc.mmap_threshold=262144")
    assert tunable["applied"] == {"MALLOC_ARENA_MAX": 2}
    assert tunable["mapped"] >= 1 << 20  # 1 MiB is above the environment's 256 KiB threshold too


FRAGMENTED = r"""
import json, sys
from iteris_daemon.malloc import release_free_heap

def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096

blocks = [bytearray(4000) for _ in range(12_000)]  # about 48 MB from the C heap, 4 KB at a time
kept = blocks[9::10]  # every tenth stays: no freed run reaches the top of the heap
del blocks
before = rss()
if sys.argv[1] == "trim":
    release_free_heap()
print(json.dumps({"released": before - rss()}))
"""


@pytest.mark.parametrize("trim", [False, True])
def test_release_free_heap_returns_freed_pages_that_free_keeps(trim: bool):
    released = _run(FRAGMENTED, "trim" if trim else "keep")["released"]
    if trim:
        assert released > 30 << 20  # most of the 43 MB freed between the kept blocks
    else:
        assert released < 4 << 20  # the control: free() alone keeps them resident


SERVED = MALLINFO + r"""
from iteris_daemon.malloc import keep_large_blocks_in_mmap, serve_large_blocks_from_heap

keep_large_blocks_in_mmap()
served = serve_large_blocks_from_heap() if sys.argv[1] == "served" else None
before = libc.mallinfo2().hblkhd
block = bytearray(1 << 20)
print(json.dumps({"served": served, "mapped": libc.mallinfo2().hblkhd - before}))
"""


@pytest.mark.parametrize("served", [False, True])
def test_a_model_that_does_not_stream_gets_the_heap_back(served: bool):
    """The streaming load maps every large block before it knows the model streams; a model
    its checks send to a whole load has large blocks served from the heap again (its passes
    in CPU memory ran ~40% slower with every large tensor mapped)."""
    result = _run(SERVED, "served" if served else "kept")
    if served:
        assert result == {"served": True, "mapped": 0}  # 1 MiB from the heap, under the 32 MiB threshold
    else:
        assert result["mapped"] >= 1 << 20  # the control: mapped under the fixed 64 KiB threshold
