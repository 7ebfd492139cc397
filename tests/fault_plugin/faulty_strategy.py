"""A merge strategy that misbehaves on request, for the merge-worker tests
(tests/test_workers.py). Installed only for them: this folder goes on PYTHONPATH, and
its dist-info's entry point registers the plugin in every worker process."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from iteris_daemon import hookimpl
from iteris_daemon.strategy import MergedAdapter, MergeInputs, Progress, StrategyParams, task_arithmetic_factors


class FaultyParams(StrategyParams):
    mode: Literal["ok", "sigkill", "sigkill-saving", "exit", "allocate", "tensor", "hog", "slow", "stubborn"] = "ok"
    scale: float = Field(1.0, gt=0)
    seconds: float = Field(3600.0, ge=0, description="how long 'slow' takes; how long 'hog' waits once moved")


class Faulty:
    name = "faulty"
    description = "test only: merges like task arithmetic, or crashes, allocates, or hangs as asked"
    Params = FaultyParams
    needs_calibration = False

    def merge(self, inputs: MergeInputs, params: FaultyParams, progress: Progress) -> MergedAdapter:
        if params.mode == "sigkill":  # what the OOM killer does
            os.kill(os.getpid(), signal.SIGKILL)
        if params.mode == "sigkill-saving":  # killed once the merge's files are half written
            import iteris_daemon.merge as merge

            def save_then_die(folder, *args, **kwargs):
                (Path(folder) / "adapter_model.safetensors").write_bytes(b"half")
                os.kill(os.getpid(), signal.SIGKILL)

            merge.save_adapter = save_then_die
        if params.mode == "exit":  # a library that calls exit()
            os._exit(7)
        if params.mode == "allocate":  # 64 GiB, far past any test's RLIMIT_AS
            bytearray(64 << 30)
        if params.mode == "tensor":  # the same through torch, which raises RuntimeError, not MemoryError
            import torch  # here: the daemon loads this plugin too, and stays torch-free

            torch.empty(64 << 30, dtype=torch.uint8)
        if params.mode == "hog":  # touches memory until something stops it (a cgroup's limit: the OOM killer)
            _wait_to_be_moved()  # into the test's memory cgroup, then long enough for the supervisor to notice
            time.sleep(params.seconds)
            held = []
            while True:
                held.append(b"\x01" * (64 << 20))  # every page written
        if params.mode == "slow":  # cooperative: checks for a stop request every step
            for _ in progress(range(int(params.seconds / 0.05)), desc="slow"):
                time.sleep(0.05)
        if params.mode == "stubborn":  # a hung call that never reaches a safe point
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            while True:
                time.sleep(1)
        return MergedAdapter(task_arithmetic_factors(inputs.adapters, [params.scale] * len(inputs.adapters)))


def _wait_to_be_moved(timeout: float = 120.0) -> None:
    """Until this process's cgroup changes (a loaded machine may take seconds to move it)."""
    start, deadline = Path("/proc/self/cgroup").read_text(), time.monotonic() + timeout
    while Path("/proc/self/cgroup").read_text() == start and time.monotonic() < deadline:
        time.sleep(0.05)


@hookimpl
def register_strategies(register):
    register(Faulty())
