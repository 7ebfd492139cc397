"""Telling a worker killed by the kernel's OOM killer from one killed by another SIGKILL.

Both end the same way (SIGKILL), so the exit status cannot say which. The memory
cgroup the worker runs in can: the kernel counts its OOM kills (cgroup v2:
``oom_kill`` in ``memory.events``, which includes the cgroup's descendants; v1:
``oom_kill`` in ``memory.oom_control``). Under systemd the daemon and its workers
share the service's cgroup, so a unit's ``MemoryMax=`` shows up here. Where no
memory controller can be read (no cgroups, a container hiding them) nothing is
claimed and the reason stays "killed by SIGKILL".
"""

from __future__ import annotations

from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def counter_file(pid: int) -> Path | None:
    """The file holding the OOM-kill count of ``pid``'s memory cgroup, or None."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:  # the process is gone, or no /proc
        return None
    candidates = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # the v2 unified hierarchy
            candidates.append(CGROUP_ROOT / path.lstrip("/") / "memory.events")
        elif "memory" in controllers.split(","):
            candidates.append(CGROUP_ROOT / "memory" / path.lstrip("/") / "memory.oom_control")
    return next((file for file in candidates if read_kills(file) is not None), None)


def read_kills(file: Path) -> int | None:
    """The ``oom_kill`` count in ``file`` (None: unreadable, or a kernel too old to count)."""
    try:
        text = file.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill" and value.strip().isdigit():
            return int(value)
    return None


class OomWatch:
    """Follows a running process's memory cgroup (it may be moved while it runs) and says
    whether the kernel's OOM killer killed anything there since the watch began on it."""

    def __init__(self, pid: int):
        self.pid = pid
        self.file: Path | None = None
        self.start: int | None = None
        self.refresh()

    def refresh(self) -> None:
        """Look again at the process's cgroup; call while it is alive."""
        file = counter_file(self.pid)
        if file is not None and file != self.file:
            self.file, self.start = file, read_kills(file)

    def killed(self) -> bool:
        """Whether the cgroup's OOM-kill count rose since the watch began on it."""
        if self.file is None or self.start is None:
            return False
        now = read_kills(self.file)
        return now is not None and now > self.start

    def describe(self) -> str:
        return str(self.file.parent) if self.file is not None else "?"
