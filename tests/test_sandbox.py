"""The daemon under its service unit's sandbox, without systemd.

systemd is not PID 1 here (a container), so ``systemd-run`` cannot apply the unit. Instead
``tests/sandbox.py`` applies the equivalent of the settings of
``config/iteris-daemon.service``, read from the unit itself: a mount namespace with the
file system read-only except the state, cache and destination folders, private /tmp
and /dev, /proc with ``hidepid=invisible``, a UTS namespace, an unprivileged uid in a
user namespace mapping only itself, no capabilities, no_new_privs, and seccomp filters
for ``SystemCallFilter=`` (the unit's groups, expanded by ``systemd-analyze
syscall-filter``; other calls fail with EPERM), ``RestrictAddressFamilies=``,
``RestrictNamespaces=`` and ``RestrictRealtime=``. Its docstring lists what is not
applied.

- The probe checks that each setting is in force inside (uid, capabilities, seccomp,
  read-only and writable paths, /dev, /proc, hostname, refused calls and families), and
  that PyTorch picks the same CPU kernels inside as outside.
- The daemon, started there as the unit starts it (``iteris-daemon run``), rejects an
  adapter whose weights it may not read (0600, as safetensors writes them) once, with
  the reason, registers it when made readable, merges it with a second one, publishes
  a version that PEFT loads, and exits 0 on SIGTERM; the catalog is its own and private,
  the published version readable by other users (UMask=0022: the inference server). Before the fix the unreadable adapter was "looked at again" every
  0.15 s, forever.

Needs root (to make the namespaces and mounts), unshare, libseccomp and systemd-analyze;
skipped otherwise.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import polling
from builders import build_adapter, build_tiny_model
from test_systemd import UNIT, parse_unit

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = Path(__file__).resolve().parent / "sandbox.py"
UID = 61234  # an unused uid, as DynamicUser= picks one

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="making namespaces and mounts needs root"),
    pytest.mark.skipif(not (shutil.which("unshare") and shutil.which("mount")), reason="util-linux is missing"),
    pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"),
    pytest.mark.skipif(ctypes.util.find_library("seccomp") is None and not Path("/usr/lib/x86_64-linux-gnu/libseccomp.so.2").exists(),
                       reason="libseccomp is not installed"),
    pytest.mark.timeout(300),
]


def _syscall_groups() -> dict[str, list[str]]:
    out = subprocess.run(["systemd-analyze", "syscall-filter", "--no-pager"], capture_output=True, text=True,
                         check=True).stdout
    groups: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if not line.startswith(" "):
            current = groups.setdefault(text, []) if text.startswith("@") else None
        elif current is not None:
            current.append(text)
    return groups


def _expand(item: str, groups: dict[str, list[str]]) -> set[str]:
    if not item.startswith("@"):
        return {item}
    return set().union(*(_expand(member, groups) for member in groups[item]))


def _exposed(paths: list[Path]) -> tuple[list[str], list[str]]:
    """(folders to replace by a tmpfs, paths to bind back read-only) so that the
    unprivileged uid can reach ``paths`` (the interpreter under a 0700 /root, a checkout
    under the private /tmp): what BindReadOnlyPaths= would do for a real deployment."""
    tmpfs, keep = set(), []
    for path in paths:
        for hidden in ("/root", "/tmp", "/var/tmp"):
            if path.is_relative_to(hidden):
                if hidden == "/root":
                    tmpfs.add(hidden)
                keep.append(str(path))
    return sorted(tmpfs), keep


def sandbox_spec(work: Path, writable: list[Path]) -> dict:
    """The sandbox of the unit's [Service] settings, for tests/sandbox.py."""
    service = parse_unit(UNIT.read_text())["Service"]
    setting = {key: values[-1] for key, values in service.items()}
    assert setting["ProtectSystem"] == "strict" and setting["PrivateTmp"] == setting["PrivateDevices"] == "yes"
    assert setting["PrivateUsers"] == setting["ProtectHostname"] == setting["PrivateMounts"] == "yes"
    assert setting["ProtectProc"] == "invisible"
    assert setting["CapabilityBoundingSet"] == "" and setting["NoNewPrivileges"] == "yes"
    groups = _syscall_groups()
    allow, deny = set(), set()
    for value in service["SystemCallFilter"]:
        names = value.lstrip("~").split()
        (deny if value.startswith("~") else allow).update(*(_expand(n, groups) for n in names))
    tmpfs, keep = _exposed([work, Path(sys.base_prefix), Path(sys.prefix), ROOT])
    return {"uid": UID, "writable": [str(p) for p in writable], "tmpfs": tmpfs, "keep": keep,
            "allow": sorted(allow), "deny": sorted(deny), "families": setting["RestrictAddressFamilies"].split(),
            "errno": setting["SystemCallErrorNumber"], "protect_proc": setting["ProtectProc"],
            "proc_subset": setting.get("ProcSubset", "all")}


def sandboxed(spec_path: Path, *command: str) -> list[str]:
    return ["unshare", "--mount", "--uts", "--ipc", "--propagation", "private",
            sys.executable, str(LAUNCHER), str(spec_path), "--", *command]


def _env(work: Path) -> dict[str, str]:
    keep = ("PATH", "LANG", "LC_ALL", "VIRTUAL_ENV")
    return {**{k: v for k, v in os.environ.items() if k in keep}, "HOME": str(work / "state"),
            "HF_HOME": str(work / "cache" / "huggingface"), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def work(tmp_path_factory) -> Path:
    """A work folder the sandbox's uid owns (as StateDirectory= is), its parents passable."""
    work = tmp_path_factory.mktemp("sandbox")
    work.chmod(0o755)  # pytest makes it 0700; the uid must pass through it, as through /var/lib
    for folder in ("state", "cache", "published"):
        (work / folder).mkdir()
    yield work
    subprocess.run(["chown", "-R", f"{os.geteuid()}:{os.getegid()}", str(work)], check=False)


PROBE = r"""
import errno, json, os, socket, subprocess, sys, time
out = {}
def tried(name, call):
    try:
        call()
        out[name] = "ok"
    except OSError as exc:
        out[name] = errno.errorcode.get(exc.errno, str(exc.errno))
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
out.update(uid=os.getuid(), gid=os.getgid(), groups=os.getgroups(), hostname=socket.gethostname(),
           status={k: status[k].strip() for k in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")},
           uid_map=open("/proc/self/uid_map").read().split(), dev=sorted(os.listdir("/dev")),
           tmp=sorted(os.listdir("/tmp")), pid1_visible=os.path.exists("/proc/1"), umask=os.umask(0o022))
work = sys.argv[1]
tried("write_state", lambda: open(os.path.join(work, "state", "probe"), "w").close())
tried("write_work", lambda: open(os.path.join(work, "probe"), "w").close())
tried("write_usr", lambda: open("/usr/probe", "w").close())
tried("write_etc", lambda: open("/etc/probe", "w").close())
tried("chown", lambda: os.chown(os.path.join(work, "state", "probe"), os.getuid(), os.getgid()))
tried("setuid_0", lambda: os.setuid(0))
tried("sethostname", lambda: socket.sethostname("elsewhere"))
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
def via_libc(result):
    if result != 0:
        raise OSError(ctypes.get_errno(), "")
tried("unshare_mount", lambda: via_libc(libc.unshare(0x00020000)))
tried("mount", lambda: via_libc(libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)))
tried("settimeofday", lambda: via_libc(libc.syscall(164, None, None)))  # x86_64 SYS_settimeofday
tried("sched_fifo", lambda: os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1)))
tried("socket_packet", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW).close())
tried("socket_bluetooth", lambda: socket.socket(31, socket.SOCK_STREAM).close())
tried("socket_inet", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close())
tried("socket_unix", lambda: socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).close())
tried("mknod", lambda: os.mknod(os.path.join(work, "state", "node"), 0o600 | 0o020000, os.makedev(1, 3)))
tried("thread", lambda: __import__("threading").Thread(target=lambda: None).start())
tried("subprocess", lambda: subprocess.run(["true"], check=True))
import torch
out["torch_cpu"] = torch.backends.cpu.get_cpu_capability()
out["torch_sum"] = float(torch.ones(4).sum())
print("PROBE " + json.dumps(out))
"""


def test_each_setting_is_in_force_inside_the_sandbox(work):
    spec = work / "spec.json"
    spec.write_text(json.dumps(sandbox_spec(work, [work / "state"])))
    subprocess.run(["chown", "-R", f"{UID}:{UID}", str(work / "state")], check=True)
    result = subprocess.run(sandboxed(spec, sys.executable, "-c", PROBE, str(work)), capture_output=True, text=True,
                            timeout=240, env=_env(work), cwd="/")
    lines = [line for line in result.stdout.splitlines() if line.startswith("PROBE ")]
    assert result.returncode == 0 and lines, result.stdout + result.stderr
    inside = json.loads(lines[0][len("PROBE "):])
    assert (inside["uid"], inside["gid"], inside["groups"]) == (UID, UID, [])  # DynamicUser=
    assert inside["uid_map"] == [str(UID), str(UID), "1"]  # PrivateUsers=: only itself mapped
    status = inside["status"]
    assert status["CapEff"] == status["CapPrm"] == status["CapBnd"] == status["CapAmb"] == "0000000000000000"
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
    assert inside["hostname"] == "iteris-sandbox"  # ProtectHostname=: its own UTS namespace
    assert inside["dev"] == sorted(["null", "zero", "full", "random", "urandom", "tty", "shm", "pts", "ptmx",
                                    "fd", "stdin", "stdout", "stderr"])  # PrivateDevices=
    # PrivateTmp=: /tmp holds only what was bound back into it (the work folder, and the
    # checkout and its venv when they live under /tmp, as a CI clone may)
    kept = json.loads(spec.read_text())["keep"]
    bound = {Path(k).relative_to("/tmp").parts[0] for k in kept if Path(k).is_relative_to("/tmp")}
    assert work.is_relative_to("/tmp") and inside["tmp"] == sorted(bound)
    assert not inside["pid1_visible"]  # ProtectProc=invisible
    assert inside["umask"] == 0o022  # UMask=
    expected = {
        "write_state": "ok",  # StateDirectory=
        "write_work": "EROFS", "write_usr": "EROFS", "write_etc": "EROFS",  # ProtectSystem=strict
        "chown": "EPERM",  # ~@privileged
        "setuid_0": "EPERM", "sethostname": "EPERM", "mount": "EPERM", "settimeofday": "EPERM",
        "unshare_mount": "EPERM",  # RestrictNamespaces=
        "sched_fifo": "EPERM",  # RestrictRealtime=
        "socket_packet": "EAFNOSUPPORT", "socket_bluetooth": "EAFNOSUPPORT",  # RestrictAddressFamilies=
        "socket_inet": "ok", "socket_unix": "ok",
        "mknod": "EPERM",  # no CAP_MKNOD
        "thread": "ok", "subprocess": "ok",
    }
    assert {k: inside[k] for k in expected} == expected
    import torch

    assert inside["torch_cpu"] == torch.backends.cpu.get_cpu_capability()  # /proc/cpuinfo readable
    assert inside["torch_sum"] == 4.0


def test_the_daemon_merges_and_publishes_inside_the_sandbox(work):
    base = build_tiny_model("bert", work / "base")
    watched = work / "watched"
    watched.mkdir()
    for seed in (1, 2):
        build_adapter(base, watched / f"task{seed}", seed=seed, family="bert", r=2 + seed)
    # safetensors writes 0600 files: what the daemon's user is to read must be readable by it.
    # task1's weights stay unreadable at first.
    for path in [*base.iterdir(), *(watched / "task2").iterdir()]:
        path.chmod(0o644)
    unreadable = watched / "task1" / "adapter_model.safetensors"
    assert unreadable.stat().st_mode & 0o777 == 0o600
    q = json.dumps
    config = work / "config.toml"
    config.write_text(f"""
[daemon]
state_dir = {q(str(work / "state"))}
cache_dir = {q(str(work / "cache"))}
grace_seconds = 5

[[sources]]
name = "team"
kind = "local"
paths = [{q(str(watched))}]
base_model = {q(str(base))}
settle_seconds = 0.3

[[groups]]
name = "sandboxed"
base_model = {q(str(base))}
params = {{ iterations = 2, samples_per_task = 8 }}
debounce_seconds = 0
min_adapters = 2

[groups.gates]  # the sandbox is the subject here; tests/test_gates.py covers the gates
max_regression = false
max_fidelity_gap = false

[[groups.destinations]]
kind = "folder"
path = {q(str(work / "published"))}
""")
    writable = [work / "state", work / "cache", work / "published"]
    spec = work / "spec.json"
    spec.write_text(json.dumps(sandbox_spec(work, writable)))
    for folder in writable:
        subprocess.run(["chown", "-R", f"{UID}:{UID}", str(folder)], check=True)
    for folder in writable:
        folder.chmod(0o700)
    log = work / "daemon.log"
    with open(log, "wb") as out:
        daemon = subprocess.Popen(sandboxed(spec, sys.executable, "-m", "iteris_daemon", "--log-format", "text", "run",
                                            "--config", str(config)),
                                  stdout=out, stderr=subprocess.STDOUT, env=_env(work), cwd="/")
    try:
        report = work / "published" / "current" / "merge_report.json"
        rejected = f"rejected {watched / 'task1'}: {unreadable}: cannot read: Permission denied"
        polling.wait_for(lambda: rejected in log.read_text(errors="replace"), "task1 rejected as unreadable",
                         timeout=240, proc=daemon)
        unreadable.chmod(0o644)  # the owner fixes it: the source sees the change and registers it

        def published() -> bool:
            if not report.is_file():
                return False
            return sorted(i["name"] for i in json.loads(report.read_text())["inputs"]) == ["task1", "task2"]

        polling.wait_for(published, "a merge published from inside the sandbox", timeout=240, proc=daemon)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(120) == 0, log.read_text(errors="replace")[-5000:]
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    text = log.read_text(errors="replace")
    assert " ERROR " not in text and "Traceback" not in text, text[-5000:]
    # Rejected once, not looked at again and again (before the fix: every 0.15 s, forever).
    assert text.count(rejected) == 1 and text.count("looking again") <= 2, text[-5000:]
    from peft import PeftModel
    from transformers import AutoModel

    model = PeftModel.from_pretrained(AutoModel.from_pretrained(base), str(work / "published" / "current"))
    assert sum("lora_" in name for name, _ in model.named_parameters()) > 0
    # Its files are its own; the catalog private, the published version readable by others
    # (UMask=0022: under 0077 the inference server that loads it could not).
    catalog = work / "state" / "catalog.db"
    version = (work / "published" / "current").resolve()
    for path, others in ((catalog, 0), (version, 0o055), (version / "adapter_model.safetensors", 0o044)):
        info = path.stat()
        assert (info.st_uid, info.st_mode & 0o077) == (UID, others), (path, info.st_uid, oct(info.st_mode))
