"""Resident memory of this process, for merge reports and benchmarks.

A merge's process peak is usually the model load, which hides what the merge
itself needs. On Linux the peak (VmHWM) can be reset before the merge starts
(``/proc/self/clear_refs``), so the peak read afterwards is the merge's own.
Elsewhere the figures fall back to ``getrusage`` and the merge peak is None.

The process peak is not ``getrusage``'s ``ru_maxrss`` on Linux: the reset clears
it too, and after ``exec`` it starts at the parent's peak, so a merge launched
by a large process would report the parent's memory as its own.
"""

from __future__ import annotations

import resource
from pathlib import Path

_STATUS = Path("/proc/self/status")
# The largest VmHWM that reset_peak() cleared: the process peak must survive the resets.
_cleared_peak_mb = 0.0


def _status_mb(field: str) -> float | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def current_rss_mb() -> float | None:
    return _status_mb("VmRSS")


def process_peak_mb() -> float:
    """This process's own peak RSS since it started, across :func:`reset_peak` calls.

    Falls back to ``ru_maxrss`` without /proc (there a parent's peak may show through).
    """
    window = window_peak_mb()
    if window is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return max(window, _cleared_peak_mb)


def reset_peak() -> bool:
    """Make the next :func:`window_peak_mb` measure from now; False where unsupported."""
    global _cleared_peak_mb
    before = window_peak_mb()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    _cleared_peak_mb = max(_cleared_peak_mb, before or 0.0)
    return True


def window_peak_mb() -> float | None:
    """Peak RSS since the last :func:`reset_peak` (Linux VmHWM)."""
    return _status_mb("VmHWM")


def reset_device_peak(device) -> None:
    """Start a new peak-allocation window on a CUDA device (no-op elsewhere)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def device_peak_mb(device) -> float | None:
    """Peak memory allocated by torch on a CUDA device since the last reset; None elsewhere."""
    import torch

    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20
