"""systemd integration: sd_notify over real AF_UNIX datagram sockets, the watchdog
thread, the log formats journald and log shippers read, and the service unit."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from iteris_daemon.logs import FORMATS, NOISY, setup_logging
from iteris_daemon.systemd import Notifier

UNIT = Path(__file__).resolve().parents[1] / "config" / "iteris-daemon.service"
TOKEN = "hf_" + "AbCdEf0123456789" * 2


# --------------------------------------------------------------------- sd_notify


@pytest.fixture
def listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound datagram socket standing in for systemd, named in NOTIFY_SOCKET."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        yield sock


def receive(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    assert data.endswith("\n")
    return dict(line.split("=", 1) for line in data.splitlines())


def drain(sock: socket.socket) -> list[dict[str, str]]:
    """Every datagram already queued, without waiting."""
    sock.setblocking(False)
    messages = []
    try:
        while True:
            messages.append(receive(sock))
    except BlockingIOError:
        return messages
    finally:
        sock.settimeout(2)


def test_ready_status_stopping_reloading(listener: socket.socket) -> None:
    notifier = Notifier.from_env()
    assert notifier.enabled
    assert notifier.ready("catalog migrated")
    assert receive(listener) == {"READY": "1", "STATUS": "catalog migrated"}
    assert notifier.ready()
    assert receive(listener) == {"READY": "1"}
    notifier.status("merging 3 adapters")
    assert receive(listener) == {"STATUS": "merging 3 adapters"}
    notifier.stopping()
    assert receive(listener) == {"STOPPING": "1"}
    notifier.stopping("waiting for the merge")
    assert receive(listener) == {"STOPPING": "1", "STATUS": "waiting for the merge"}

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    message = receive(listener)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert message.keys() == {"RELOADING", "MONOTONIC_USEC"} and message["RELOADING"] == "1"
    assert before <= int(message["MONOTONIC_USEC"]) <= after


def test_notify_text_and_fields_in_one_datagram(listener: socket.socket) -> None:
    notifier = Notifier.from_env()
    assert notifier.notify("READY=1\nSTATUS=raw", MAINPID=os.getpid())
    assert listener.recv(4096).decode() == f"READY=1\nSTATUS=raw\nMAINPID={os.getpid()}\n"
    notifier.status("two\nlines")
    assert receive(listener) == {"STATUS": "two lines"}


def test_abstract_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"iteris-daemon-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert Notifier.from_env().ready("abstract")
        assert receive(sock) == {"READY": "1", "STATUS": "abstract"}


def test_noop_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    notifier = Notifier.from_env()
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert not notifier.ready("x") and not notifier.status("x") and not notifier.reloading()
    assert not notifier.stopping() and not notifier.notify(WATCHDOG=1)
    calls = []
    notifier.start_watchdog(lambda: calls.append(1) or True)
    time.sleep(0.1)
    notifier.stop()
    assert calls == []


def test_vanished_socket_does_not_raise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "gone"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))  # bound, then closed: connection refused
    notifier = Notifier.from_env()
    assert not notifier.ready()
    path.unlink()  # and now not even the file
    assert not notifier.status("still alive")
    assert not notifier.stopping()


@pytest.mark.parametrize("pid", [None, "self"])
def test_watchdog_interval(listener: socket.socket, monkeypatch: pytest.MonkeyPatch, pid: str | None) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    if pid:
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert Notifier.from_env().watchdog_interval == pytest.approx(0.05)


class HealthProbe:
    """A health check that counts its calls: the watchdog thread's own clock, so a test
    waits for checks to happen instead of for time to pass."""

    def __init__(self, healthy: bool = True, error: Exception | None = None):
        self.healthy, self.error = healthy, error
        self.calls = 0
        self._changed = threading.Condition()

    def __call__(self) -> bool:
        with self._changed:
            self.calls += 1
            self._changed.notify_all()
        if self.error is not None:
            raise self.error
        return self.healthy

    def wait_calls(self, count: int) -> None:
        """Until the check has been called ``count`` times in all (or 60 s, a broken thread)."""
        with self._changed:
            assert self._changed.wait_for(lambda: self.calls >= count, timeout=60), (self.calls, count)


def test_watchdog_for_another_pid_is_ignored(listener: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    notifier = Notifier.from_env()
    assert notifier.enabled and notifier.watchdog_interval is None
    probe = HealthProbe()
    notifier.start_watchdog(probe)
    assert notifier._thread is None and probe.calls == 0  # no thread, nothing checked, nothing sent
    notifier.stop()
    assert drain(listener) == []


def test_watchdog_pings_only_while_healthy(
    listener: socket.socket, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Counted in health checks, not in seconds: every healthy check sends one ping; once
    unhealthy, three checks in a row send none (and warn once); healthy again, pings
    resume; stopped, the thread is gone."""
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    probe = HealthProbe()
    notifier = Notifier.from_env()
    caplog.set_level(logging.INFO, logger="iteris_daemon.systemd")
    notifier.start_watchdog(probe)
    thread = notifier._thread
    try:
        for _ in range(3):
            assert receive(listener) == {"WATCHDOG": "1"}  # blocks until the ping arrives
        assert probe.calls >= 3

        probe.healthy = False
        switched = probe.calls
        # The check in progress may have said healthy; its ping is sent before the next check.
        probe.wait_calls(switched + 2)
        drain(listener)
        probe.wait_calls(switched + 5)  # three more checks, each one unhealthy
        assert drain(listener) == []
        warnings = [r for r in caplog.records if r.name == "iteris_daemon.systemd" and r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "watchdog" in warnings[0].getMessage()

        probe.healthy = True
        assert receive(listener) == {"WATCHDOG": "1"}
    finally:
        notifier.stop()
    assert not thread.is_alive()  # joined: nothing can be sent any more
    drain(listener)


def test_watchdog_check_that_raises_is_unhealthy(listener: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    probe = HealthProbe(error=RuntimeError("database gone"))
    notifier = Notifier.from_env()
    notifier.start_watchdog(probe)
    probe.wait_calls(3)  # three checks, each raising: no ping
    notifier.stop()
    assert drain(listener) == []


# ----------------------------------------------------------------------- logging


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """setup_logging changes process-wide state; put it back for the other tests."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    noisy = {name: logging.getLogger(name).level for name in NOISY}
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    for name, noisy_level in noisy.items():
        logging.getLogger(name).setLevel(noisy_level)


def emit(fmt: str, verbose: bool = False) -> str:
    """What a few records look like in ``fmt``."""
    stream = io.StringIO()
    setup_logging(verbose, fmt, stream=stream)
    log = logging.getLogger("iteris_daemon.test")
    log.debug("details")
    log.info("merged %d adapters", 3)
    log.warning("slow\nsecond line")
    try:
        1 / 0
    except ZeroDivisionError:
        log.exception("merge failed")
    return stream.getvalue()


def test_text_format() -> None:
    lines = emit("text").splitlines()
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00"
    assert re.fullmatch(stamp + r" INFO iteris_daemon\.test: merged 3 adapters", lines[0])
    assert re.fullmatch(stamp + r" WARNING iteris_daemon\.test: slow", lines[1]) and lines[2] == "second line"
    assert re.fullmatch(stamp + r" ERROR iteris_daemon\.test: merge failed", lines[3])
    assert lines[4] == "Traceback (most recent call last):" and lines[-1].startswith("ZeroDivisionError")
    assert "details" not in "\n".join(lines)


def test_text_format_times_are_utc_with_their_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The text log wrote local time without a zone (04:01:28 under America/New_York) where
    ``status`` and the JSON log said 09:01:28+00:00."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        line = emit("text").splitlines()[0]
    finally:
        monkeypatch.undo()
        time.tzset()
    stamp = datetime.fromisoformat(line.split(" ", 1)[0])
    assert stamp.utcoffset() == timezone.utc.utcoffset(None)
    assert abs((datetime.now(timezone.utc) - stamp).total_seconds()) < 60


def test_journal_format_prefixes_every_line() -> None:
    lines = emit("journal", verbose=True).splitlines()
    assert lines[:4] == [
        "<7>iteris_daemon.test: details",
        "<6>iteris_daemon.test: merged 3 adapters",
        "<4>iteris_daemon.test: slow",
        "<4>second line",
    ]
    assert lines[4] == "<3>iteris_daemon.test: merge failed"
    assert lines[5] == "<3>Traceback (most recent call last):" and lines[-1].startswith("<3>ZeroDivisionError")
    assert all(re.match(r"<[3467]>", line) for line in lines)

    stream = io.StringIO()
    setup_logging(fmt="journal", stream=stream)
    logging.getLogger("x").critical("down")
    assert stream.getvalue() == "<3>x: down\n"


def test_json_format() -> None:
    records = [json.loads(line) for line in emit("json").splitlines()]
    assert [r["level"] for r in records] == ["INFO", "WARNING", "ERROR"]
    info, warning, error = records
    assert info.keys() == {"time", "level", "logger", "message"}
    assert info["logger"] == "iteris_daemon.test" and info["message"] == "merged 3 adapters"
    stamp = datetime.fromisoformat(info["time"])
    assert stamp.utcoffset() == timezone.utc.utcoffset(None)
    assert abs((datetime.now(timezone.utc) - stamp).total_seconds()) < 60
    assert warning["message"] == "slow\nsecond line"
    assert error["exception"].startswith("Traceback") and "ZeroDivisionError" in error["exception"]


def test_auto_is_text_off_the_journal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    assert emit("auto").startswith(tuple("0123456789"))


def test_auto_detects_journal_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open(tmp_path / "stderr", "w") as stream, open(tmp_path / "other", "w") as other:
        stat = os.fstat(other.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino}")
        setup_logging(stream=stream)  # stderr redirected elsewhere: not the journal
        logging.getLogger("a").info("one")
        stat = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino}")
        setup_logging(stream=stream)
        logging.getLogger("a").info("two")
    first, second = (tmp_path / "stderr").read_text().splitlines()
    assert first.endswith(" INFO a: one") and second == "<6>a: two"


def test_auto_detects_journal_on_stderr(capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    stat = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino}")
    setup_logging()
    logging.getLogger("iteris_daemon").warning("on the journal")
    assert "<4>iteris_daemon: on the journal\n" in capfd.readouterr().err


@pytest.mark.parametrize("fmt", ["journal", "text", "json"])
def test_tokens_are_redacted(fmt: str) -> None:
    stream = io.StringIO()
    setup_logging(fmt=fmt, stream=stream)
    log = logging.getLogger("iteris_daemon.hub")
    log.info("argument %s", TOKEN)
    log.info(f"f-string Authorization: Bearer {TOKEN}")
    log.info("in a mapping %(token)s", {"token": TOKEN})
    try:
        raise PermissionError(f"401 for token {TOKEN}")
    except PermissionError:
        log.exception("upload failed")
    log.info("too short to be a token: hf_abc")
    out = stream.getvalue()
    assert TOKEN not in out and TOKEN[3:] not in out
    assert out.count("hf_***") == 4
    assert "hf_abc" in out


@pytest.mark.parametrize("token, shown", [("hf_oauth_AbCdEf0123456789", "hf_oauth_***"),
                                          ("api_org_AbCdEf0123456789", "api_org_***"),
                                          ("hf_oauthAbCdEf0123456789", "hf_***")])
def test_oauth_and_organization_tokens_are_redacted(token: str, shown: str) -> None:
    """The pattern took only hf_ followed by letters and digits: an OAuth token's hf_oauth_
    and an organization's api_org_ were written as they are."""
    stream = io.StringIO()
    setup_logging(fmt="text", stream=stream)
    logging.getLogger("iteris_daemon.hub").warning("Illegal header value b'Bearer %s'", token)
    out = stream.getvalue()
    assert token not in out and f"b'Bearer {shown}'" in out, out


def test_huggingface_hub_records_are_written_once_and_redacted() -> None:
    """huggingface_hub's own stderr handler printed each of its records a second time,
    without the redaction. A fresh process: the handler is added when the library's
    logging module is first imported (here after the set-up, as in the CLI)."""
    code = ("import logging; from iteris_daemon.logs import setup_logging; setup_logging(fmt='text'); "
            f"import huggingface_hub.file_download; logging.getLogger('huggingface_hub.file_download').warning('retrying %s', {TOKEN!r})")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert err.count("retrying") == 1 and TOKEN not in err and "hf_***" in err, err


def test_transformers_records_go_through_our_handler() -> None:
    """transformers gives its logger a stderr handler and stops it propagating: its records
    (with -v, most of a merge's log) were raw multi-line text in a ``--log-format json``
    stream. A fresh process, transformers imported after the set-up as in the CLI."""
    code = ("import logging; from iteris_daemon.logs import setup_logging; setup_logging(fmt='json'); "
            "from transformers.utils import logging as hf; hf.get_logger('transformers.x').warning('two\\nlines')")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    lines = err.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["message"] == "two\nlines", err


def test_setup_logging_is_idempotent() -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging(fmt="text", stream=first)
    setup_logging(fmt="journal", stream=second)
    setup_logging(fmt="journal", stream=second)
    ours = [h for h in logging.getLogger().handlers if h.get_name() == "iteris-daemon"]
    assert len(ours) == 1
    logging.getLogger("iteris_daemon").info("once")
    assert first.getvalue() == "" and second.getvalue() == "<6>iteris_daemon: once\n"


def test_levels_and_noisy_loggers() -> None:
    setup_logging(stream=io.StringIO())
    assert logging.getLogger().level == logging.INFO
    assert {logging.getLogger(name).level for name in NOISY} == {logging.WARNING}
    assert {"transformers", "httpx", "urllib3", "huggingface_hub", "apscheduler"} <= set(NOISY)
    setup_logging(verbose=True, stream=io.StringIO())
    assert logging.getLogger().level == logging.DEBUG
    assert {logging.getLogger(name).getEffectiveLevel() for name in NOISY} == {logging.DEBUG}


def test_unknown_format() -> None:
    assert FORMATS == ("auto", "journal", "text", "json")
    with pytest.raises(ValueError, match="syslog"):
        setup_logging(fmt="syslog")


# ------------------------------------------------------------------ service unit


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections of ``KEY=VALUE`` lines; a key may repeat (Environment=)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, value = line.split("=", 1)
            current.setdefault(key.strip(), []).append(value.strip())
    return sections


GPU_DROP_IN = UNIT.parent / "iteris-daemon.service.d" / "gpu.conf"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")
MAX_EXPOSURE = 2.0  # systemd-analyze security's score: 0 (locked down) to 10 (UNSAFE)


def test_service_unit_directives() -> None:
    unit = parse_unit(UNIT.read_text())
    service = {key: values[-1] for key, values in unit["Service"].items()}
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert service["ExecStart"].endswith("iteris-daemon run --config /etc/iteris-daemon/config.toml")
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert int(service["WatchdogSec"]) > 0
    assert service["Restart"] == "on-failure" and "RestartSec" in service
    # An OOM-killed worker fails its run; the default policy (stop) ended the service (QA OPS).
    assert service["OOMPolicy"] == "continue"
    assert int(service["TimeoutStopSec"]) > 60  # the daemon's default grace period
    assert service["DynamicUser"] == "yes"
    for directory in ("StateDirectory", "CacheDirectory", "ConfigurationDirectory"):
        assert service[directory] == "iteris-daemon"
    assert service["LoadCredential"] == "hf-token:/etc/iteris-daemon/hf-token"
    assert "HF_HUB_DISABLE_TELEMETRY=1" in unit["Service"]["Environment"]
    assert service["RestrictAddressFamilies"].split() == ["AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"]
    assert service["ProtectSystem"] == "strict" and service["ProtectHome"] == "read-only"
    assert service["UMask"] == "0022"  # published merges are read by other users
    # The CPU unit's sandbox; the GPU drop-in relaxes what CUDA needs.
    for hardening in ("NoNewPrivileges", "PrivateTmp", "PrivateDevices", "PrivateMounts", "PrivateUsers",
                      "ProtectHostname", "ProtectClock", "ProtectKernelTunables", "ProtectKernelModules",
                      "ProtectKernelLogs", "ProtectControlGroups", "RestrictNamespaces", "RestrictRealtime",
                      "RestrictSUIDSGID", "LockPersonality", "RemoveIPC"):
        assert service[hardening] == "yes", hardening
    assert service["CapabilityBoundingSet"] == "" and service["AmbientCapabilities"] == ""
    # Not ProcSubset=pid: PyTorch picks its CPU kernels from /proc/cpuinfo (tests/test_sandbox.py).
    assert service["ProtectProc"] == "invisible" and "ProcSubset" not in service
    assert unit["Service"]["SystemCallFilter"] == ["@system-service", "~@privileged"]
    assert service["SystemCallErrorNumber"] == "EPERM" and service["SystemCallArchitectures"] == "native"
    # PyTorch's JIT kernels (oneDNN, on CPU too) need memory that becomes executable.
    assert "MemoryDenyWriteExecute" not in service
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_gpu_drop_in_relaxes_only_what_cuda_needs() -> None:
    """The GPU drop-in: the host's /dev, but device access an allow-list of NVIDIA's
    nodes. Nothing else of the sandbox changes."""
    drop_in = parse_unit(GPU_DROP_IN.read_text())
    assert set(drop_in) == {"Service"}
    assert drop_in["Service"] == {
        "PrivateDevices": ["no"],
        "DevicePolicy": ["closed"],
        "DeviceAllow": ["char-nvidia-frontend rw", "char-nvidia-uvm rw", "char-nvidia-caps r"],
    }


def _unit_copy(folder: Path, drop_in: bool) -> Path:
    """The unit (ExecStart= an executable that exists, as verify insists) and maybe the GPU drop-in."""
    text = UNIT.read_text().replace("/usr/local/bin/iteris-daemon", sys.executable)
    assert text != UNIT.read_text()
    folder.mkdir()
    (folder / UNIT.name).write_text(text)
    if drop_in:
        (folder / f"{UNIT.name}.d").mkdir()
        shutil.copy(GPU_DROP_IN, folder / f"{UNIT.name}.d" / GPU_DROP_IN.name)
    return folder / UNIT.name


def _analyze(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, timeout=120, cwd="/")


@needs_analyze
@pytest.mark.parametrize("drop_in", [False, True], ids=["cpu", "gpu"])
def test_service_unit_verifies(tmp_path: Path, drop_in: bool) -> None:
    unit = _unit_copy(tmp_path / "units", drop_in)
    if drop_in:  # verify reads the drop-in beside the unit: a bad line in it is reported
        bad = unit.parent / f"{UNIT.name}.d" / "zz-probe.conf"
        bad.write_text("[Service]\nNoSuchSetting=1\n")
        probe = _analyze("verify", "--man=no", str(unit))
        assert "zz-probe.conf" in probe.stdout + probe.stderr, probe.stdout + probe.stderr
        bad.unlink()
    result = _analyze("verify", "--man=no", str(unit))
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if UNIT.name in line or GPU_DROP_IN.name in line]
    assert result.returncode == 0 and complaints == [], result.stdout + result.stderr


@needs_analyze
@pytest.mark.parametrize("drop_in", [False, True], ids=["cpu", "gpu"])
def test_service_unit_exposure_score(tmp_path: Path, drop_in: bool) -> None:
    """``systemd-analyze security --offline=true``: at most 2.0 for the unit, and with the GPU
    drop-in (it was 6.0 MEDIUM before the sandbox settings)."""
    unit = _unit_copy(tmp_path / "units", drop_in)
    result = _analyze("security", "--offline=true", "--no-pager", str(unit))
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout)
    assert found, result.stdout + result.stderr
    score = float(found[1])
    print(f"exposure ({'with' if drop_in else 'without'} the GPU drop-in): {score} {found[2]}")
    assert score <= MAX_EXPOSURE, result.stdout
