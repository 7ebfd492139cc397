"""Telling a worker killed by the kernel's OOM killer from one killed by another SIGKILL.

Both end the same way (SIGKILL), so the exit status cannot say which. The memory
cgroup the worker runs in can: the kernel counts its OOM kills (cgroup v2:
``oom_kill`` in ``memory.events``, which includes the cgroup's descendants; v1:
``oom_kill`` in ``memory.oom_control``). Under systemd the daemon and its workers
share the service's cgroup, so a unit's ``MemoryMax=`` shows up here. Where no
memory controller can be read (no cgroups, a container hiding them) nothing is
claimed and the reason stays "killed by SIGKILL". A worker that is refused memory
rather than killed says so in words (:func:`says_out_of_memory`).
"""

from __future__ import annotations

from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
# What running out of memory under an address-space limit (RLIMIT_AS) says, besides
# Python's MemoryError: torch's allocator ("DefaultCPUAllocator: can't allocate memory"),
# a failed mmap ("... Cannot allocate memory", errno 12), the dynamic loader importing a
# library ("failed to map segment from shared object"), CUDA ("CUDA out of memory").
_NO_MEMORY = ("can't allocate memory", "cannot allocate memory", "failed to map segment", "out of memory")


def says_out_of_memory(text: str) -> bool:
    """Whether an error message says memory ran out."""
    return any(phrase in text.lower() for phrase in _NO_MEMORY)


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
    """Follows a running process's memory cgroups and says whether the kernel's OOM killer
    killed anything in one of them since the process was first seen there.

    The process may be moved while it runs, so every cgroup it is seen in stays watched:
    on cgroup v1 a process the OOM killer is ending already shows the root cgroup while
    its parent still sees it running, so the last cgroup seen need not be the one it was
    killed in."""

    def __init__(self, pid: int):
        self.pid = pid
        self.seen: dict[Path, int] = {}  # counter file -> its count when the process was first seen there
        self.refresh()

    def refresh(self) -> None:
        """Look again at the process's cgroup; call while it is alive."""
        file = counter_file(self.pid)
        if file is not None and file not in self.seen:
            start = read_kills(file)
            if start is not None:
                self.seen[file] = start

    def _killed_in(self) -> Path | None:
        for file, start in self.seen.items():
            now = read_kills(file)
            if now is not None and now > start:
                return file
        return None

    def killed(self) -> bool:
        """Whether an OOM-kill count rose in a cgroup the process was seen in."""
        return self._killed_in() is not None

    def describe(self) -> str:
        """The cgroup of the kill (else the last one seen)."""
        file = self._killed_in() or next(reversed(self.seen), None)
        return str(file.parent) if file is not None else "?"
