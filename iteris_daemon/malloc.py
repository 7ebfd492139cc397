"""glibc's allocator controls (``mallopt``, ``malloc_trim``): the daemon's settings for a
process that runs for months, and what a merge does for its resident peak.

With glibc's defaults the daemon's memory grew for as long as it ran, and what grew
was free memory, not live memory: in a 150-cycle soak, glibc's own count
(``mallinfo2``) showed the bytes in use flat (24.7-25.6 MB) while its free bytes grew
5.4 -> 7.3 MB, in the per-thread arenas. Two defaults let that happen in a process
whose short-lived threads (scheduler jobs, claim refreshers, worker log relays, HTTP
requests) read files in 1 MiB blocks:

- glibc gives threads up to 8 arenas per core, and free memory in one arena serves
  only the threads that use it;
- once a large block (a 1 MiB read buffer) is freed, glibc raises its mmap threshold
  to that size, so later large blocks come from the arenas instead of being mapped
  and unmapped, and what they leave free there stays resident.

With both set (:func:`tune`: 2 arenas, the threshold fixed at 128 KiB) the same soak
grew 1.03 instead of 2.42 MB per 100 cycles. :func:`release_free_heap` returns the
free pages that remain between live blocks. A setting the environment already gives
(``MALLOC_ARENA_MAX``, ``MALLOC_MMAP_THRESHOLD_``, or ``GLIBC_TUNABLES``) is left to
it; where the C library is not glibc nothing changes. The merge workers, short-lived,
keep glibc's defaults.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os

log = logging.getLogger(__name__)

# mallopt parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

ARENA_MAX = 2
MMAP_THRESHOLD = 128 * 1024  # glibc's initial value; fixing it turns off the dynamic raise
# The largest threshold glibc's dynamic raise reaches (DEFAULT_MMAP_THRESHOLD_MAX: 4 MiB x sizeof(long)).
DYNAMIC_THRESHOLD_MAX = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)

_SETTINGS = (  # (mallopt parameter, value, environment variable, GLIBC_TUNABLES name)
    (M_ARENA_MAX, ARENA_MAX, "MALLOC_ARENA_MAX", "glibc.malloc.arena_max"),
    (M_MMAP_THRESHOLD, MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold"),
)


def tune() -> dict[str, int]:
    """Apply the daemon's malloc settings; return those applied (name -> value).

    Call it before the process starts its threads: an arena, once made, stays.
    """
    libc = _glibc()
    if libc is None:
        log.debug("the C library is not glibc: its allocator is left as it is")
        return {}
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    applied = {}
    for parameter, value, env, tunable in _SETTINGS:
        if env in os.environ or f"{tunable}=" in tunables:
            log.info("glibc allocator: %s left to the environment", env)
        elif libc.mallopt(parameter, value) == 1:
            applied[env] = value
        else:
            log.warning("glibc allocator: mallopt refused %s=%d", env, value)
    if applied:
        settings = ", ".join(f"{name}={value}" for name, value in applied.items())
        log.info("glibc allocator set for a long-running process: %s", settings)
    return applied


def release_free_heap() -> bool:
    """Give the free pages inside glibc's arenas back to the system (``malloc_trim``);
    False where the C library is not glibc.

    ``free`` returns memory only from the top of an arena; a long-lived block above
    a freed region keeps that region resident. The daemon calls this after each run,
    where most of its short-lived memory is freed (it took 8 ms, median, on a heap of
    240 MB of fragmented blocks). A merge calls it once per sweep: glibc serves
    tensor-sized blocks from its heap once large blocks have been freed, and
    long-lived tensors (the hidden states kept between blocks) pin the heap. Measured
    on the MiniLM merge of 4 tasks: peak 870 -> 709 MB at 100 samples per task, 1381
    -> 1064 MB at 300, for about 5% of the time. Trimming once per block saved no more
    and cost 15%; a fixed 64 KiB mmap threshold (every block its own mapping) kept the
    peak lowest (615 / 799 MB) but made every forward pass ~40% slower.
    """
    libc = _glibc()
    return libc is not None and bool(libc.malloc_trim(0))


def keep_large_blocks_in_mmap(threshold: int = 64 * 1024) -> bool:
    """Serve every block of ``threshold`` bytes or more from its own mapping, from now on.

    For merges that stream block weights from disk: each block's weights are fresh
    allocations, freed between long-lived small ones, and glibc's heap then fragments
    so that the resident peak grows with depth (measured on the 8- and 32-layer
    Llama shapes of ``benchmarks.scale``: +75% of the added weights with glibc's
    defaults and a trim per sweep, +33% with a trim per block, +23% with this). The
    price is paid in page faults: on the CPU, forward passes ~40% slower; on a GPU
    the activations live in CUDA memory and do not pay it. Process-wide and permanent
    (glibc stops adapting its threshold). Returns False where the C library is not
    glibc.
    """
    libc = _glibc()
    return libc is not None and libc.mallopt(M_MMAP_THRESHOLD, threshold) == 1


def serve_large_blocks_from_heap() -> bool:
    """Undo :func:`keep_large_blocks_in_mmap` as far as glibc allows (its dynamic
    threshold cannot be turned on again): blocks up to the largest threshold the dynamic
    raise reaches come from the heap, which keeps twice that free at its top, as in a
    process that freed such a block. For a model that turned out not to stream: its
    forward passes, in CPU memory, run ~40% slower with every large tensor mapped.
    Returns False where the C library is not glibc.
    """
    libc = _glibc()
    return libc is not None and libc.mallopt(M_MMAP_THRESHOLD, DYNAMIC_THRESHOLD_MAX) == 1 and \
        libc.mallopt(M_TRIM_THRESHOLD, 2 * DYNAMIC_THRESHOLD_MAX) == 1


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (musl has a ``mallopt`` that does nothing)."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = (ctypes.c_size_t,), ctypes.c_int
    return libc
