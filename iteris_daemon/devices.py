"""What a merge device may be called: one definition, for the config (read by the daemon,
which never imports torch) and for the engine (which then checks the device exists).
:func:`unavailable` asks, at the daemon's start, whether the devices exist here."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Collection

CUDA_PROBE = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
PROBE_TIMEOUT_SECONDS = 120.0  # importing torch and counting the devices; seconds as a rule


def check_device(name: str) -> str:
    """``name`` if it is a device the README documents (cpu, cuda, cuda:N), else ValueError:
    a typo in the config is found when it is read, not when every merge fails. N as torch
    writes it: torch refuses a leading zero (``cuda:01``), which passed here and then failed
    every merge in its worker."""
    if not re.fullmatch(r"cpu|cuda(:(0|[1-9][0-9]*))?", name):
        raise ValueError(f"unknown device {name!r} (use cpu, cuda or cuda:N)")
    return name


def cuda_device_count() -> int:
    """How many CUDA devices a merge worker sees here, asked of a fresh interpreter as a
    worker is started (same environment, ``CUDA_VISIBLE_DEVICES`` too): the daemon never
    imports torch. ValueError when that interpreter cannot tell."""
    try:
        done = subprocess.run([sys.executable, "-c", CUDA_PROBE], capture_output=True, text=True,
                              timeout=PROBE_TIMEOUT_SECONDS, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ValueError(f"cannot ask torch for the CUDA devices here ({exc})") from None
    if done.returncode != 0 or not done.stdout.strip().isdigit():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ValueError(f"cannot ask torch for the CUDA devices here ({last})")
    return int(done.stdout)


def unavailable(names: Collection[str]) -> str | None:
    """Why some of ``names`` (checked device names) cannot run a merge here, naming the
    devices there are; None when all can (torch is not asked when all are cpu). Every run
    on a missing device failed seconds into its worker, in an error naming no setting."""
    cuda = [name for name in dict.fromkeys(names) if name != "cpu"]
    if not cuda:
        return None
    try:
        count = cuda_device_count()
    except ValueError as exc:
        return f"{', '.join(map(repr, cuda))}: {exc}"
    missing = [name for name in cuda if int(name.partition(":")[2] or 0) >= count]
    if not missing:
        return None
    there = ", ".join(["cpu", *(f"cuda:{index}" for index in range(count))])
    return (f"{', '.join(map(repr, missing))} {'is' if len(missing) == 1 else 'are'} not available here: torch sees "
            f"{count} CUDA device{'' if count == 1 else 's'} (available: {there})")
