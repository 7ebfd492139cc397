"""What a publisher receives and returns. Publishers are plugins, like strategies:
a plugin implements ``register_publishers(register)`` and calls ``register(publisher)``.

The daemon calls ``publish`` once per destination after a successful merge, with a
complete merged PEFT folder. A publisher must leave its destination either at the
previous version or at the new one, complete, whatever happens (crash, full disk,
lost connection), and must not create a new version when the adapter it would
publish equals the one already there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import threading
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable
from urllib.parse import urlsplit

from pydantic import BaseModel

from .strict import PLUGIN_SETTINGS


@dataclass(frozen=True)
class PublishedInput:
    """One input adapter of the merge, as the model card and report list it."""

    name: str
    source: str
    locator: str
    revision: str
    content_sha256: str | None = None


@dataclass(frozen=True)
class PublishRequest:
    adapter_dir: Path  # adapter_config.json, adapter_model.safetensors, merge_report.json
    group: str
    run_id: int
    base_model: str  # as the merged adapter_config.json names it
    strategy: str
    params: dict[str, Any]
    inputs: list[PublishedInput]
    metrics: dict[str, Any] = field(default_factory=dict)  # merge_report.json's per-task figures
    dtype: str | None = None  # the base model's compute dtype, which the figures were measured in
    # merge_report.json's tasks without figures, each with why (a data-free merge of an adapter without calibration data)
    not_evaluated: dict[str, str] = field(default_factory=dict)
    # The daemon's stop event: a publisher may end its retry waits once it is set (a stop
    # must not wait out a rate limit's Retry-After); None outside the daemon.
    stopping: threading.Event | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class PublishResult:
    location: str  # a folder, or REPO@BRANCH
    version: str | None  # the version folder name, or the commit sha
    changed: bool  # False: the same adapter was already published; nothing was written


class PublisherSettings(BaseModel):
    """Base class of a publisher's settings (one ``[[groups.destinations]]`` table), validated
    as :data:`~iteris_daemon.strict.PLUGIN_SETTINGS` says."""

    model_config = PLUGIN_SETTINGS


def local_name(value: str) -> str:
    """``value`` as a file put on the Hub may name it: a local path (or ``file:`` URL) by its last
    name alone, ``local:NAME``, so that no home folder or user name leaves the machine; a Hub id,
    an ``hf://`` URL, a revision or any other text as it is."""
    path = urlsplit(value).path if value.startswith("file:") else value
    return f"local:{Path(path).name}" if Path(path).is_absolute() else value


@runtime_checkable
class Publisher(Protocol):
    kind: ClassVar[str]  # the ``kind`` a destination names in the config, e.g. "folder", "hub"
    description: ClassVar[str]
    Settings: ClassVar[type[PublisherSettings]]

    def publish(self, request: PublishRequest, settings: PublisherSettings) -> PublishResult:
        """Publish ``request.adapter_dir``; raise on failure (the run is then not successful)."""

    # Optional: ``serves(settings, version) -> bool``, whether the destination still serves the
    # ``version`` this publisher reported (or one an operator chose instead: a rollback). False
    # makes a run whose inputs are unchanged publish again (a folder removed by hand was never
    # published to again); without it, or where it raises, the catalog's record is trusted.
