"""Run a command under the equivalent of the service unit's sandbox, where systemd cannot
run it (no systemd as PID 1, as in a container): ``python tests/sandbox.py SPEC.json -- CMD...``,
as root, inside ``unshare --mount --uts --ipc --propagation private``.

SPEC (JSON, written by tests/test_sandbox.py from config/iteris-daemon.service):
``uid``, ``writable`` (paths: StateDirectory=, CacheDirectory=, ReadWritePaths=),
``tmpfs`` (more folders replaced by an empty tmpfs, TemporaryFileSystem=), ``keep``
(paths under /tmp or those to bind back read-only, BindReadOnlyPaths=: the test's work
folder, the interpreter, the venv or checkout if they live there), ``allow`` and ``deny`` (system call names: the
expansion of ``SystemCallFilter=@system-service`` and ``~@privileged`` by
``systemd-analyze syscall-filter``), ``families`` (``RestrictAddressFamilies=``),
``errno`` (``SystemCallErrorNumber=``), ``protect_proc`` and ``proc_subset``.

Applied, in this order (each line: the unit setting, then how):

- ProtectHostname=: a UTS namespace (``unshare --uts``), hostname ``iteris-sandbox``.
- PrivateMounts=: the mount namespace (``unshare --mount --propagation private``).
- ProtectSystem=strict, ProtectHome=read-only, ProtectKernelTunables=,
  ProtectControlGroups=: every mount read-only, except the ``writable`` paths (bound
  onto themselves first).
- PrivateTmp=: a new tmpfs on /tmp and /var/tmp (``keep`` bound back in).
- PrivateDevices=: a tmpfs /dev with null, zero, full, random, urandom, tty (bound from
  the real ones), /dev/shm, /dev/pts and the /dev/fd links; no other device node.
- ProtectProc=, ProcSubset=: /proc mounted anew with ``hidepid=`` (``protect_proc``)
  and ``subset=pid`` when ``proc_subset`` is ``pid``.
- DynamicUser=: setgroups([]), setresgid/setresuid to ``uid`` (an unused one).
- PrivateUsers=: a user namespace mapping only ``uid`` (and its gid) to itself.
- CapabilityBoundingSet= (empty), AmbientCapabilities=: every capability dropped from
  the bounding set (inside the new namespace, which starts with a full one); a non-root
  uid keeps none through ``execve``.
- NoNewPrivileges=: ``PR_SET_NO_NEW_PRIVS``.
- SystemCallFilter=, SystemCallErrorNumber=, SystemCallArchitectures=native: a seccomp
  allow-list (libseccomp through ctypes; native architecture only), any other call
  fails with ``errno``.
- RestrictAddressFamilies=: ``socket()`` of any other family fails with EAFNOSUPPORT.
- RestrictNamespaces=: ``setns``, and ``unshare``/``clone`` with a namespace flag, fail
  with EPERM; ``clone3`` with ENOSYS (so the C library falls back to ``clone``), as systemd does.
- RestrictRealtime=: ``sched_setscheduler`` to SCHED_FIFO, SCHED_RR or SCHED_DEADLINE fails.
- UMask=0022.

Not applied: LockPersonality=, RestrictSUIDSGID=, MemoryDenyWriteExecute= (not set in the
unit anyway), DevicePolicy= (a cgroup device filter: the private /dev has no device nodes
to filter), RemoveIPC=, KeyringMode=, the credentials and directories systemd creates.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 4, 24, 38
CLONE_NEWS = {"cgroup": 0x02000000, "ipc": 0x08000000, "mnt": 0x00020000, "net": 0x40000000, "pid": 0x20000000,
              "user": 0x10000000, "uts": 0x04000000, "time": 0x00000080}
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_EQ, SCMP_CMP_MASKED_EQ = 4, 7
PSEUDO_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")


def SCMP_ACT_ERRNO(number: int) -> int:  # noqa: N802 - libseccomp's name
    return 0x00050000 | (number & 0xFFFF)


class ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


def libseccomp() -> ctypes.CDLL:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    lib = ctypes.CDLL(name, use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(ArgCmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


class Filter:
    """One seccomp filter (the kernel runs every loaded filter; the strictest answer wins)."""

    def __init__(self, lib: ctypes.CDLL, default: int):
        self.lib, self.ctx = lib, lib.seccomp_init(default)
        if not self.ctx:
            raise OSError("seccomp_init failed")

    def number(self, name: str) -> int | None:
        value = self.lib.seccomp_syscall_resolve_name(name.encode())
        return value if value >= 0 else None  # not a call of this architecture (e.g. the *32 ones)

    def add(self, action: int, name: str, *cmps: tuple[int, int, int, int]) -> None:
        nr = self.number(name)
        if nr is None:
            return
        array = (ArgCmp * len(cmps))(*(ArgCmp(*c) for c in cmps)) if cmps else None
        result = self.lib.seccomp_rule_add_array(self.ctx, action, nr, len(cmps), array)
        if result < 0 and result != -errno.EEXIST:
            raise OSError(-result, f"seccomp_rule_add {name}: {os.strerror(-result)}")

    def load(self) -> None:
        result = self.lib.seccomp_load(self.ctx)
        self.lib.seccomp_release(self.ctx)
        if result < 0:
            raise OSError(-result, f"seccomp_load: {os.strerror(-result)}")


def run(*command: str) -> None:
    subprocess.run(command, check=True)


def bind(source: str | Path, target: str | Path, read_only: bool) -> None:
    """A bind mount, read-only or writable whatever its source mount is."""
    # --no-canonicalize: a source /proc/PID/fd/N must stay the magic link to what the fd
    # holds, not the path it names (which now resolves into the new, empty tmpfs).
    run("mount", "--no-canonicalize", "--bind", str(source), str(target))
    run("mount", "-o", f"remount,bind,{'ro' if read_only else 'rw'}", str(target))


def mounts() -> list[str]:
    return [line.split()[4].replace("\\040", " ") for line in Path("/proc/self/mountinfo").read_text().splitlines()]


def file_system(spec: dict) -> None:
    writable = [Path(p) for p in spec["writable"]]
    keep = [Path(p) for p in spec["keep"]]
    socket.sethostname("iteris-sandbox")
    # What is bound back into the new /tmp and /dev, held open (O_PATH) while they are replaced.
    me = os.getpid()
    held = {path: os.open(path, os.O_PATH) for path in keep}
    devices = {name: os.open(f"/dev/{name}", os.O_PATH) for name in PSEUDO_DEVICES}
    # ProtectSystem=strict (+ ProtectHome=read-only, ProtectKernelTunables=, ProtectControlGroups=).
    for point in sorted(set(mounts()), key=len):
        if not point.startswith(("/proc", "/dev")):
            subprocess.run(["mount", "-o", "remount,bind,ro", point], stderr=subprocess.DEVNULL)
    # PrivateTmp=, and TemporaryFileSystem= for what the test environment needs hidden
    # (e.g. /root, a 0700 folder holding the interpreter: it is bound back read-only).
    for tmp in ("/tmp", "/var/tmp", *spec.get("tmpfs", [])):
        mode = "1777" if tmp in ("/tmp", "/var/tmp") else "0755"
        run("mount", "-t", "tmpfs", "-o", f"mode={mode},nosuid,nodev", "tmpfs", tmp)
    for path, fd in held.items():
        path.mkdir(parents=True, exist_ok=True)
        bind(f"/proc/{me}/fd/{fd}", path, read_only=True)
    # StateDirectory=, CacheDirectory=, ReadWritePaths=: writable again.
    for path in writable:
        bind(path, path, read_only=False)
    # PrivateDevices=
    run("mount", "-t", "tmpfs", "-o", "mode=0755,nosuid,noexec", "tmpfs", "/dev")
    for name, fd in devices.items():
        (Path("/dev") / name).touch()
        run("mount", "--no-canonicalize", "--bind", f"/proc/{me}/fd/{fd}", f"/dev/{name}")
    for folder in ("shm", "pts"):
        (Path("/dev") / folder).mkdir()
    run("mount", "-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "tmpfs", "/dev/shm")
    run("mount", "-t", "devpts", "-o", "newinstance,ptmxmode=0666,mode=620", "devpts", "/dev/pts")
    os.symlink("pts/ptmx", "/dev/ptmx")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"/dev/{name}")
    run("mount", "-o", "remount,bind,ro", "/dev")
    for fd in [*held.values(), *devices.values()]:
        os.close(fd)
    # ProtectProc=, ProcSubset=
    subset = ",subset=pid" if spec["proc_subset"] == "pid" else ""
    run("mount", "-t", "proc", "-o", f"nosuid,nodev,noexec,hidepid={spec['protect_proc']}{subset}", "proc", "/proc")


def drop_privileges(uid: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)  # DynamicUser=: no capabilities are left to a non-root uid
    libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)  # reset by the uid change; /proc/self/*_map stay root's otherwise
    # PrivateUsers=: a user namespace mapping only this uid (and gid) to itself.
    if libc.unshare(CLONE_NEWS["user"]) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER)")
    Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1\n")
    Path("/proc/self/setgroups").write_text("deny\n")
    Path("/proc/self/gid_map").write_text(f"{uid} {uid} 1\n")
    for cap in range(64):  # CapabilityBoundingSet= (empty): the new namespace starts with a full one
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() == errno.EINVAL:
            break  # past the last capability this kernel knows
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:  # NoNewPrivileges=
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")


def seccomp(spec: dict) -> None:
    lib = libseccomp()
    # Loaded first: the allow-list below forbids seccomp() itself, as systemd's does.
    rules = Filter(lib, SCMP_ACT_ALLOW)
    # RestrictAddressFamilies=
    families = {getattr(socket, name) for name in spec["families"]}
    for family in range(64):
        if family not in families:
            rules.add(SCMP_ACT_ERRNO(errno.EAFNOSUPPORT), "socket", (0, SCMP_CMP_EQ, family, 0))
    # RestrictNamespaces=yes
    rules.add(SCMP_ACT_ERRNO(errno.EPERM), "setns")
    for flag in CLONE_NEWS.values():
        for call in ("unshare", "clone"):
            rules.add(SCMP_ACT_ERRNO(errno.EPERM), call, (0, SCMP_CMP_MASKED_EQ, flag, flag))
    rules.add(SCMP_ACT_ERRNO(errno.ENOSYS), "clone3")
    # RestrictRealtime=: SCHED_FIFO, SCHED_RR, SCHED_DEADLINE
    for policy in (1, 2, 6):
        rules.add(SCMP_ACT_ERRNO(errno.EPERM), "sched_setscheduler", (1, SCMP_CMP_EQ, policy, 0))
    rules.load()
    # SystemCallFilter=, SystemCallErrorNumber=, SystemCallArchitectures=native.
    allow = Filter(lib, SCMP_ACT_ERRNO(getattr(errno, spec["errno"])))
    for name in sorted(set(spec["allow"]) - set(spec["deny"])):
        allow.add(SCMP_ACT_ALLOW, name)
    allow.load()


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    command = sys.argv[sys.argv.index("--") + 1:]
    file_system(spec)
    drop_privileges(spec["uid"])
    seccomp(spec)
    os.umask(0o022)  # UMask=0022
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
