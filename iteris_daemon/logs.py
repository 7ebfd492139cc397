"""Logging for a long-running service: one handler on stderr whose format suits where
stderr goes (the journal, a terminal, a log shipper), and which never writes a Hub
token, whatever a caller or a library puts in a message."""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import sys
from typing import TextIO

FORMATS = ("auto", "journal", "text", "json")

NOISY = ("transformers", "httpx", "httpx2", "urllib3", "huggingface_hub", "alembic", "watchdog", "apscheduler")

TOKEN = re.compile(r"hf_[A-Za-z0-9]{8,}")


def redact(text: str) -> str:
    """``text`` with every Hugging Face token replaced by ``hf_***``."""
    return TOKEN.sub("hf_***", text)


class RedactTokens(logging.Filter):
    """Defense in depth: renders the message, traceback and stack of each record and
    redacts tokens in them before any formatter sees them, so an f-string, a
    ``%s`` argument or an exception that embeds a token is written as ``hf_***``."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
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


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers: newlines inside stay escaped."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
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
    return logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")


def setup_logging(verbose: bool = False, fmt: str = "auto", *, stream: TextIO | None = None) -> None:
    """Configure the root logger to write to ``stream`` (stderr) in format ``fmt``
    (one of :data:`FORMATS`). Calling it again replaces the handler it installed
    before instead of adding a second one; handlers others installed are kept."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; expected one of {', '.join(FORMATS)}")
    stream = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_formatter(fmt, stream))
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
