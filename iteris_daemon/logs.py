"""Logging for a long-running service: one handler on stderr whose format suits where
stderr goes (the journal, a terminal, a log shipper), and which never writes a Hub
token, whatever a caller or a library puts in a message, nor a control character
that a logged value (a folder name, a reason, an exception's message) brought in."""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable, Collection
from typing import Any, TextIO

FORMATS = ("auto", "journal", "text", "json")

NOISY = ("transformers", "httpx", "httpx2", "urllib3", "huggingface_hub", "alembic", "watchdog", "apscheduler")

# A Hugging Face token: a user's (hf_), an OAuth app's (hf_oauth_), an organization's (api_org_)
TOKEN = re.compile(r"(hf_(?:oauth_)?|api_org_)[A-Za-z0-9]{8,}")


def counted(count: int, noun: str) -> str:
    """``1 adapter``, ``2 adapters``, ``3 entries``: a count as messages say it (regular
    plurals only)."""
    if count == 1:
        return f"{count} {noun}"
    return f"{count} {noun[:-1]}ies" if noun.endswith("y") and noun[-2:-1] not in "aeiou" else f"{count} {noun}s"


class Repeated:
    """Says each distinct message once, then while it keeps coming at most once every
    ``period`` seconds with how often it came in between (at DEBUG meanwhile): a failure a
    periodic job finds at every look (a Hub repo deleted, the Hub down for a week) said it
    at every look, thousands of lines a day. :meth:`keep_only` forgets the messages that
    stopped coming, so that one coming back is said at once."""

    def __init__(self, logger: logging.Logger, period: float = 3600.0, clock: Callable[[], float] = time.monotonic):
        self._logger, self._period, self._clock = logger, period, clock
        self._lock = threading.Lock()
        self._said: dict[str, tuple[float, int]] = {}  # message -> (when said, times come since)

    def say(self, level: int, message: str) -> None:
        now = self._clock()
        with self._lock:
            said = self._said.get(message)
            due = said is None or now - said[0] >= self._period
            self._said[message] = (now, 0) if due else (said[0], said[1] + 1)
        if due:
            again = f" (again {counted(said[1], 'time')} since it was last said)" if said and said[1] else ""
            self._logger.log(level, "%s%s", message, again)
        else:
            self._logger.debug("%s (said before)", message)

    def keep_only(self, messages: Collection[str]) -> None:
        with self._lock:
            self._said = {message: said for message, said in self._said.items() if message in messages}


def redact(text: str) -> str:
    """``text`` with every Hugging Face token replaced by its prefix and ``***`` (``hf_***``)."""
    return TOKEN.sub(r"\1***", text)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\udc80-\udcff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_one(match: re.Match) -> str:
    char = match.group()
    code = ord(char)
    if char in _NAMED:
        return _NAMED[char]
    if 0xDC80 <= code <= 0xDCFF:  # a byte of a non-UTF-8 file name (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """``text`` with every control character (newlines, escape sequences, C1, line
    separators) and undecodable file-name byte written as a backslash escape."""
    return _CONTROL.sub(_escape_one, text)


def _escaped(value: Any) -> Any:
    """A log argument as it may be written: text (names, paths, exception messages) escaped."""
    if isinstance(value, str):
        return escape_controls(value)
    if isinstance(value, (os.PathLike, BaseException)):
        return escape_controls(str(value))
    return value


def format_exception(exc_info) -> str:
    """A traceback like ``Formatter.formatException``'s, with each exception's message
    (which may carry a file name) escaped; the traceback's own lines stay lines."""
    exc = exc_info[1]
    if exc is None:
        return logging.Formatter().formatException(exc_info)
    rendered = traceback.TracebackException(type(exc), exc, exc_info[2])
    pending, seen = [rendered], set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(getattr(current, "_str", None), str):
            current._str = escape_controls(current._str)
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
        pending.extend(getattr(current, "exceptions", None) or [])
    return "".join(rendered.format()).removesuffix("\n")


class EscapeValues(logging.Filter):
    """Values logged with ``%s`` come from outside (a folder name may hold a newline): with
    their control characters escaped, one can never start a line (a journal entry) of
    its own. Newlines in the message's format string, which the code wrote, are kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, dict):
            record.args = {key: _escaped(value) for key, value in record.args.items()}
        elif isinstance(record.args, tuple):
            record.args = tuple(_escaped(value) for value in record.args)
        if record.exc_info:  # also when another handler already rendered it, unescaped
            record.exc_text = format_exception(record.exc_info)
        return True


class RedactTokens(logging.Filter):
    """Defense in depth: renders the message, traceback and stack of each record and
    redacts tokens in them before any formatter sees them, so an f-string, a
    ``%s`` argument or an exception that embeds a token is written as ``hf_***``."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        if record.exc_info and not record.exc_text:
            record.exc_text = format_exception(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def _priority(levelno: int) -> int:
    """The syslog priority journald reads from a ``<N>`` line prefix."""
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class JournalFormatter(logging.Formatter):
    """``<N>name: message`` with no timestamp (journald stamps each line). Every line
    of a multi-line message or traceback gets the prefix, since journald splits the
    stream at newlines and would log the continuation lines at the default level."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def utc_time(record: logging.LogRecord) -> str:
    """When ``record`` was made, ISO 8601 in UTC with its zone (``+00:00``), as ``status``
    prints catalog times: a local time without a zone did not match them."""
    return datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds")


class TextFormatter(logging.Formatter):
    """``TIME LEVEL name: message``, the time as :func:`utc_time` writes it."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return utc_time(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers: newlines inside stay escaped."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": utc_time(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False)


def journal_stream(stream: TextIO) -> bool:
    """Whether ``stream`` is connected to the journal: systemd sets ``JOURNAL_STREAM``
    to ``DEVICE:INODE`` of the socket it gave us as stdout/stderr. Comparing with the
    stream's own fstat tells a redirected stderr (``2>file``) apart."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in value.split(":"))
        stat = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (stat.st_dev, stat.st_ino) == (device, inode)


def _formatter(fmt: str, stream: TextIO) -> logging.Formatter:
    if fmt == "auto":
        fmt = "journal" if journal_stream(stream) else "text"
    if fmt == "journal":
        return JournalFormatter()
    if fmt == "json":
        return JsonFormatter()
    return TextFormatter()


def say_fatal(logger: logging.Logger, message: str, stream: TextIO | None = None) -> None:
    """The error a command ends on: a record in the log's format where a machine reads it
    (the journal, whose ``journalctl -p err`` missed a plain line, and JSON, whose shipper
    got one line that was no JSON), else ``iteris-daemon: error: ...`` for a person."""
    handler = next((h for h in logging.getLogger().handlers if h.get_name() == "iteris-daemon"), None)
    if handler is not None and isinstance(handler.formatter, (JournalFormatter, JsonFormatter)):
        logger.error("%s", message)
    else:
        print(f"iteris-daemon: error: {message}", file=stream or sys.stderr)


def setup_logging(verbose: bool = False, fmt: str = "auto", *, stream: TextIO | None = None) -> None:
    """Configure the root logger to write to ``stream`` (stderr) in format ``fmt``
    (one of :data:`FORMATS`). Calling it again replaces the handler it installed
    before instead of adding a second one; handlers others installed are kept."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; expected one of {', '.join(FORMATS)}")
    stream = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_formatter(fmt, stream))
    handler.addFilter(EscapeValues())  # first: it sees the arguments before they are rendered
    handler.addFilter(RedactTokens())
    handler.set_name("iteris-daemon")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "iteris-daemon"]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)
    for name in ("huggingface_hub", "transformers"):
        _without_own_handlers(name)


class _HandlerlessLogger(logging.Logger):
    """A library's logger that takes no handlers and always propagates: its records reach
    the root's handler (ours)."""

    def addHandler(self, hdlr: logging.Handler) -> None:
        pass

    @property
    def propagate(self) -> bool:  # type: ignore[override]
        return True

    @propagate.setter
    def propagate(self, value: bool) -> None:
        pass


def _without_own_handlers(name: str) -> None:
    """huggingface_hub and transformers give their loggers a stderr handler when their
    logging modules are first imported: huggingface_hub's records were printed twice, once
    past the token redaction; transformers', which it stops from propagating, only raw
    (multi-line text in a ``--log-format json`` stream). Their handlers go, now or when
    they are imported (which ``status`` never does)."""
    logger = logging.getLogger(name)
    for own in list(logger.handlers):
        logger.removeHandler(own)
    logger.__class__ = _HandlerlessLogger
