"""OomWatch on fake counter files: which cgroup's OOM-kill count says a worker was OOM-killed.

The real kill in a real cgroup is ``test_workers.py -k oom_killer``; this pins the case
that test hit only now and then: on cgroup v1 a process being OOM-killed already shows
the root cgroup while its parent still sees it running, so the watch's last look lands
on a cgroup where nothing was killed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from iteris_daemon import oom


def _counter(folder: Path, kills: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / "memory.oom_control"
    file.write_text(f"oom_kill_disable 0\nunder_oom 0\noom_kill {kills}\n")
    return file


@pytest.fixture
def cgroups(tmp_path, monkeypatch):
    """Three cgroups (the service's, the limited one, the root) and where the process is now."""
    files = {name: _counter(tmp_path / name, 0) for name in ("service", "limited", "root")}
    where = {"now": "service"}
    monkeypatch.setattr(oom, "counter_file", lambda pid: files[where["now"]])
    return files, where


def test_a_kill_in_a_cgroup_the_process_has_left_for_the_root_is_still_seen(cgroups):
    files, where = cgroups
    watch = oom.OomWatch(1234)
    where["now"] = "limited"
    watch.refresh()
    _counter(files["limited"].parent, 1)  # the OOM killer ends it there...
    where["now"] = "root"
    watch.refresh()  # ...and the parent's last look, as it exits, shows the root
    assert watch.killed()
    assert watch.describe() == str(files["limited"].parent)


def test_no_kill_anywhere_is_not_an_oom_kill(cgroups):
    files, where = cgroups
    watch = oom.OomWatch(1234)
    _counter(files["root"].parent, 3)  # kills before the process was seen there do not count
    where["now"] = "root"
    watch.refresh()
    assert not watch.killed()
    assert watch.describe() == str(files["root"].parent)


def test_no_readable_cgroup_claims_nothing(monkeypatch):
    monkeypatch.setattr(oom, "counter_file", lambda pid: None)
    watch = oom.OomWatch(1234)
    assert not watch.killed() and watch.describe() == "?"


@pytest.mark.parametrize("message", [
    "RuntimeError: [enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: you tried to "
    "allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)",
    "RuntimeError: unable to mmap 1048576 bytes from file </tmp/x.safetensors>: Cannot allocate memory (12)",
    "ImportError: libtorch_cpu.so: failed to map segment from shared object",
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
])
def test_what_a_worker_refused_memory_says_is_read_as_out_of_memory(message):
    """Under a worker's address-space limit these were failures of kind "error" (or "exit"),
    not "memory", as the README's process model says they are."""
    assert oom.says_out_of_memory(message)


def test_an_unrelated_error_is_not_out_of_memory():
    assert not oom.says_out_of_memory("ValueError: rank 9 above the limit of 8")


def test_a_worker_that_could_not_start_under_its_limit_failed_for_memory(tmp_path):
    """Below the memory torch needs to load, the worker dies importing it, without a result:
    the last lines it printed say why."""
    from iteris_daemon.supervisor import WorkerFailed, WorkerOptions, _outcome

    tail = ["Traceback (most recent call last):", "ImportError: libc10.so: failed to map segment from shared object"]
    with pytest.raises(WorkerFailed) as failed:
        _outcome(1, tmp_path / "no-result.json", tail, cancelled=False, killed=False, options=WorkerOptions(),
                 oom=oom.OomWatch(-1))
    assert failed.value.kind == "memory" and str(failed.value).startswith("out of memory: the worker exited with status 1")
