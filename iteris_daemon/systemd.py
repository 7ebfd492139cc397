"""The sd_notify protocol in pure Python, so the daemon can tell systemd when it is
ready, what it is doing and that it is still alive without a C library or the
``python-systemd`` package (neither installs cleanly into a venv everywhere).

systemd passes ``NOTIFY_SOCKET`` (an AF_UNIX datagram socket; a leading ``@`` means
the abstract namespace) and, with ``WatchdogSec=``, ``WATCHDOG_USEC``/``WATCHDOG_PID``.
Each message is one datagram of ``KEY=VALUE`` lines. Outside systemd every method
is a no-op, so the daemon calls them unconditionally."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)


def _address(value: str | None) -> str | None:
    """The socket address for ``NOTIFY_SOCKET``: a path, or ``@name`` in the abstract
    namespace (a leading NUL for the kernel). Other kinds (``vsock:``) are not ours."""
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    log.debug("NOTIFY_SOCKET %r is neither a path nor abstract; not notifying", value)
    return None


def _watchdog_usec(environ: Mapping[str, str]) -> int | None:
    """``WATCHDOG_USEC`` when the watchdog is meant for this process: systemd sets
    ``WATCHDOG_PID`` to the main PID, and a child that inherited the environment
    must not keep its parent alive."""
    pid = environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec if usec > 0 else None


class Notifier:
    """Talks to systemd's notification socket; harmless when there is none."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self._address = address
        self._watchdog_usec = watchdog_usec if address else None
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """The notifier systemd's environment describes (``os.environ`` by default)."""
        environ = os.environ if environ is None else environ
        return cls(_address(environ.get("NOTIFY_SOCKET")), _watchdog_usec(environ))

    @property
    def enabled(self) -> bool:
        """Whether there is a socket to notify, i.e. we run under ``Type=notify``."""
        return self._address is not None

    def notify(self, text: str | None = None, **fields: object) -> bool:
        """Send one datagram: ``text`` as is (``"READY=1\\nSTATUS=..."``) and/or
        ``KEY=value`` lines from ``fields``. Returns whether it was sent; a vanished
        socket is logged at debug level only, since losing a status update must never
        take the daemon down."""
        if self._address is None:
            return False
        lines = [text.rstrip("\n")] if text else []
        # A newline inside a value would start a bogus assignment.
        lines += [f"{key}={str(value).replace(chr(10), ' ')}" for key, value in fields.items()]
        if not lines:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(("\n".join(lines) + "\n").encode(), self._address)
        except OSError as exc:
            log.debug("sd_notify to %r failed: %s", self._address, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Startup (or a reload) is complete: systemd starts units ordered after us,
        and ``systemctl start``/``reload`` return."""
        return self.notify(READY=1, **({"STATUS": status} if status is not None else {}))

    def status(self, text: str) -> bool:
        """A one-line status that ``systemctl status`` shows."""
        return self.notify(STATUS=text)

    def reloading(self) -> bool:
        """A reload began; call :meth:`ready` when it is done. ``MONOTONIC_USEC`` lets
        systemd (``Type=notify-reload``) tell this reload from an earlier one."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(RELOADING=1, MONOTONIC_USEC=usec)

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown began, so systemd does not mistake the slow exit for a hang."""
        return self.notify(STOPPING=1, **({"STATUS": status} if status is not None else {}))

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings: half the timeout, as systemd advises,
        so one late ping is not fatal. None when no watchdog applies to us."""
        return None if self._watchdog_usec is None else self._watchdog_usec / 2e6

    def start_watchdog(self, healthy: Callable[[], bool]) -> None:
        """Ping the watchdog from a daemon thread while ``healthy()`` is true. When it
        is false (or raises, or hangs) the pings stop and systemd restarts the service
        at the timeout, which is the point: a wedged daemon gets replaced."""
        interval = self.watchdog_interval
        if interval is None:
            return
        self.stop()
        self._stop_event = threading.Event()
        self._thread = threading.Thread(
            target=self._ping, args=(healthy, interval, self._stop_event), name="sd-watchdog", daemon=True
        )
        self._thread.start()

    def _ping(self, healthy: Callable[[], bool], interval: float, done: threading.Event) -> None:
        warned = False
        while not done.is_set():
            error: Exception | None = None
            try:
                ok = bool(healthy())
            except Exception as exc:  # a broken check is an unhealthy daemon, not a dead thread
                ok, error = False, exc
            if ok:
                if warned:
                    log.info("healthy again: watchdog pings resumed")
                    warned = False
                self.notify(WATCHDOG=1)
            elif not warned:
                log.warning("unhealthy: withholding watchdog pings, systemd will restart the service",
                            exc_info=error)
                warned = True
            done.wait(interval)

    def stop(self) -> None:
        """End the watchdog thread (before a clean exit; systemd stops expecting
        pings once the process is gone)."""
        self._stop_event.set()
        if self._thread is not None:
            # Bounded: a health check that hangs must not hang shutdown too.
            self._thread.join(timeout=5)
            self._thread = None
