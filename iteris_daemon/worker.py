"""The worker: one child process per merge, started by the daemon
(:mod:`iteris_daemon.supervisor`), so a crash, an out-of-memory kill or a hung
CUDA call costs one run, never the daemon, and the GPU memory and heap a merge
used go back to the system when it exits. Everything that needs torch runs here:
merges, a base model's layer shapes for validation (job kind ``shapes``) and
calibration data from a source that needs torch (``calibration``).

``python -m iteris_daemon.worker JOB.json``: the job (written by the supervisor)
names the merge request and its calibration samples (or the base model and an
adapter, for ``shapes``); the result is written beside it.
The worker

- dies with the daemon (``PR_SET_PDEATHSIG``), so a killed daemon leaves no merge running;
- caps its own address space first when the job sets ``memory_limit_mb`` (``RLIMIT_AS``) and
  runs on the CPU (not a CUDA merge: CUDA reserves far more address space than it uses);
- turns SIGTERM into a cancellation at the merge's next safe point;
- logs one JSON object per line on stderr (tokens redacted), which the supervisor relays
  with the run id;
- writes ``result.json`` atomically and last: ``{"status": "ok", "report": ...}``,
  ``{"status": "cancelled" | "error", "error": "...", "error_type": "BaseModelError"}``. No result file (a signal, a
  segfault) tells the supervisor the worker died.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import resource
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from .logs import setup_logging
from .oom import says_out_of_memory

OUT_OF_MEMORY = "out of memory (the worker's memory limit, or the host's)"
# Why a CUDA worker runs without its memory limit: under RLIMIT_AS every GPU merge failed as CUDA
# started ("CUDA error: out of memory"), reported as the host's memory.
CUDA_UNLIMITED = ("CUDA reserves far more address space than it uses and cannot start under that limit "
                  "(RLIMIT_AS); limit a GPU worker's host memory through the unit's MemoryMax (a cgroup) instead")

RESULT_NAME = "result.json"
EXIT_ERROR = 1  # the merge failed; result.json says why
EXIT_CANCELLED = 3


def _die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this process when the daemon dies (elsewhere: a no-op)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the daemon died before prctl took effect
        os._exit(EXIT_CANCELLED)


def _device(job: dict[str, Any]) -> str:
    """Where ``job`` runs: a merge on its request's device; shapes and calibration jobs on the CPU."""
    return job["request"]["device"] if "request" in job else "cpu"


def _limit_memory(megabytes: int | None) -> None:
    if megabytes:
        limit = megabytes << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _write_result(folder: Path, payload: dict[str, Any]) -> None:
    partial = folder / (RESULT_NAME + ".partial")
    partial.write_text(json.dumps(payload, default=str), encoding="utf-8")
    os.replace(partial, folder / RESULT_NAME)


def run_job(job: dict[str, Any], stop: threading.Event) -> dict[str, Any]:
    """Carry out one job; return the result payload (never raises for a failed job)."""
    from .errors import IterisError, MergeCancelled, first_line

    try:
        work = {"shapes": _shapes, "calibration": _calibration}.get(job.get("kind"), _merge)
        return {"status": "ok", "report": work(job, stop)}
    except IterisError as exc:
        name = "cancelled" if isinstance(exc, MergeCancelled) else "error"
        return {"status": name, "error": str(exc), "error_type": type(exc).__name__}
    except MemoryError:
        return {"status": "error", "error": OUT_OF_MEMORY}
    except Exception as exc:
        logging.getLogger(__name__).exception("the job failed")
        if says_out_of_memory(str(exc)):  # torch's allocator raises RuntimeError
            return {"status": "error", "error": f"{OUT_OF_MEMORY}: {type(exc).__name__}: {first_line(exc)}"}
        return {"status": "error", "error": f"{type(exc).__name__}: {exc}"}


def _shapes(job: dict[str, Any], stop: threading.Event) -> dict[str, Any]:
    """A base model's layer shapes from its skeleton, for the adapter in ``job["adapter"]``."""
    from .lora import load_adapter
    from .model import base_shapes, load_skeleton

    adapter = load_adapter(Path(job["adapter"]))
    return base_shapes(load_skeleton(job["base_model"], adapter, job["trust_remote_code"]))


def _calibration(job: dict[str, Any], stop: threading.Event) -> list[dict[str, Any] | None]:
    """Calibration samples from a source that needs torch, for each adapter in
    ``job["adapters"]``: per adapter the samples, None (no data), or the error that holds
    that adapter back (one bad adapter does not cost the others theirs); then the source
    is released, also on a cancel. A release that fails holds back each adapter the source
    answered with its line (the worker failing, the run was tried again and again, a plugin's
    bug taken for the worker's)."""
    from .calibration import CalibrationOptions, held_after_release
    from .errors import IterisError, MergeCancelled
    from .plugin_manager import calibration_sources

    given = job["options"]
    options = CalibrationOptions(order=tuple(given["order"]), files={k: Path(v) for k, v in given["files"].items()},
                                 base_model=given["base_model"], samples=given["samples"], limit=given["limit"],
                                 settings=given["settings"],
                                 cache_dir=None if given.get("cache_dir") is None else Path(given["cache_dir"]),
                                 should_stop=stop.is_set)
    source = calibration_sources()[job["source"]]
    answers: list[dict[str, Any] | None] = []
    try:
        _answer(job, source, options, stop, answers)
    except MergeCancelled:
        raise
    except IterisError as exc:  # its release failed
        return held_after_release(answers, len(job["adapters"]), {"error": str(exc), "out_of_memory": False})
    return answers


def _answer(job: dict[str, Any], source, options, stop: threading.Event, answers: list[dict[str, Any] | None]) -> None:
    """:func:`_calibration`'s answers, appended to ``answers``; the source released after them."""
    from .calibration import ask, releasing
    from .errors import IterisError, MergeCancelled
    from .validation import read_layout

    with releasing({job["source"]: source}):
        for entry in job["adapters"]:
            if stop.is_set():
                raise MergeCancelled("cancelled while gathering calibration data")
            try:
                data = ask(job["source"], source, read_layout(Path(entry["path"]), name=entry["name"]), options)
            except MergeCancelled:
                raise
            except IterisError as exc:  # out of memory: the worker's lot, not the adapter's (the runner waits)
                answers.append({"error": str(exc), "out_of_memory": says_out_of_memory(str(exc))})
                continue
            answers.append(None if data is None else
                           {"samples": [s.to_json() for s in data.samples], "source": data.source,
                            "generated": data.generated})


def _merge(job: dict[str, Any], stop: threading.Event) -> dict[str, Any]:
    from .calibration import CalibrationSet, Sample
    from .merge import AdapterSpec, MergeRequest, run_merge

    request = job["request"]
    calibration = [None if c is None else CalibrationSet(tuple(Sample.from_json(s) for s in c["samples"]), c["source"],
                                                         c.get("generated", False))
                   for c in job["calibration"]]
    return run_merge(MergeRequest(
        base_model=request["base_model"],
        adapters=[AdapterSpec(Path(a["path"]), name=a["name"], origin=a.get("origin")) for a in request["adapters"]],
        out=Path(request["out"]), strategy=request["strategy"], params=request["params"],
        device=request["device"], dtype=request["dtype"], output_dtype=request["output_dtype"],
        exact_ranks=request.get("exact_ranks", False),  # absent from a daemon started before it existed
        modules_to_save_rule=request.get("modules_to_save_rule", "agree"),
        offload=request["offload"], overwrite=True, quiet=True, trust_remote_code=request["trust_remote_code"],
        calibration_sets=calibration, should_stop=stop.is_set,
        reference=Path(request["reference"]) if request.get("reference") else None,
        base_checked=True,  # the catalog's sources registered each input against the group's base
    ))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m iteris_daemon.worker JOB.json (started by the daemon)", file=sys.stderr)
        return 2
    job_path = Path(argv[0])
    job = json.loads(job_path.read_text(encoding="utf-8"))
    _die_with_parent(job["parent_pid"])
    cuda = _device(job) != "cpu"
    if not cuda:
        _limit_memory(job.get("memory_limit_mb"))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    setup_logging(fmt="json")
    if cuda and job.get("memory_limit_mb"):
        logging.getLogger(__name__).info("worker_memory_limit_mb (%d) is not applied to a CUDA worker: %s",
                                         job["memory_limit_mb"], CUDA_UNLIMITED)
    result = run_job(job, stop)
    _write_result(job_path.parent, result)
    return {"ok": 0, "cancelled": EXIT_CANCELLED}.get(result["status"], EXIT_ERROR)


if __name__ == "__main__":
    sys.exit(main())
