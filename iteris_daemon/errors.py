"""Typed errors. Each names the file, adapter or field at fault, so the CLI can print
one clear line and exit non-zero."""

from __future__ import annotations

import re
from pathlib import Path

_STATUS_HEADING = re.compile(r"^\d{3} (Client|Server) Error\b")


class IterisError(Exception):
    """Base class for every error the user can fix by changing their input."""


class AdapterError(IterisError):
    """An adapter folder is missing, unreadable, pickled, or inconsistent."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class CalibrationError(IterisError):
    """Calibration data is missing, malformed or empty."""

    def __init__(self, path: str | Path, reason: str, line: int | None = None):
        self.path = str(path)
        self.line = line
        self.reason = reason
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {reason}")


class CalibrationUnavailable(CalibrationError):
    """A calibration source could not be reached (a Hub outage, a dropped connection): the
    data may well be there. A run waits for it rather than merge without the adapter."""


class IncompatibleAdaptersError(IterisError):
    """Adapters that cannot be merged together (different base models, task types, heads)."""


class ParameterError(IterisError):
    """A strategy parameter is unknown or out of range."""


class UnknownStrategyError(IterisError):
    """No loaded plugin provides the requested strategy."""


class MergeError(IterisError):
    """The merge ran but produced something unusable (e.g. non-finite weights)."""


class InputsChangedError(MergeError):
    """A strategy changed the input adapters it was given (in place, or replaced their tensors)."""


class MergeCancelled(IterisError):
    """A merge was asked to stop (``should_stop``, or its worker's SIGTERM); nothing was written."""


class OutputExistsError(IterisError):
    """The output folder already holds something and overwriting was not asked for."""


class OutputError(IterisError):
    """The output folder cannot be created or written where it was asked for."""


class PluginError(IterisError):
    """An installed plugin (an ``iteris_daemon`` entry point) cannot be loaded."""


class BaseModelError(IterisError):
    """The base model cannot be loaded (missing folder, unknown id, offline)."""


class ConfigError(IterisError):
    """A setting (command line, config file, stored source settings) is invalid."""

    @classmethod
    def from_validation(cls, where: str, error) -> ConfigError:
        """One line per problem from a pydantic ``ValidationError``, naming each field."""
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg'].removeprefix('Value error, ')}"
            for e in error.errors()
        )
        return cls(f"{where}: {problems}")


def first_line(exc: BaseException) -> str:
    """The line of ``exc``'s text that says what happened, for a log line, a held-back reason or
    a run's error. huggingface_hub's errors run to several lines (the URL, "Please make sure
    ...", a docs link), and after a status heading ("403 Client Error. (Request ID: ...)")
    the line that matters ("Cannot access gated repo for url ...") is the next one."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) > 1 and _STATUS_HEADING.match(lines[0]):
        del lines[0]
    return lines[0] if lines else ""
