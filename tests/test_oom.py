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
