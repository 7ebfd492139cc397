"""Folder fingerprints remembered by their files' stat, across restarts and reloads.

A folder source hashes an adapter folder only when its files' names, sizes, mtimes or
ctimes moved since it was last hashed (see ``LocalFolderSource._fingerprint``). Kept in
memory only, that knowledge was lost at every restart and SIGHUP, and the start-up
rescan read every adapter's weights again: hundreds of GB for a thousand LLM adapters.
This keeps it in a JSON file in the daemon's cache folder. Losing or corrupting the file
costs one rehash, never a wrong answer that the in-memory cache would not give: an
entry is used only when the stat it was taken with is the folder's stat now, and a file
written under another ``context`` (the size limits, which a fingerprint depends on) or
holding anything but well-formed entries is ignored whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..validation import Limits

log = logging.getLogger(__name__)
FORMAT = 1
FINGERPRINT = re.compile(r"[0-9a-f]{64}")
Snapshot = tuple[tuple[str, int, int, int], ...]  # (name, size, mtime_ns, ctime_ns) per file


def stat_context(limits: Limits) -> dict[str, int]:
    """What a folder fingerprint depends on besides the files: the size limits (a file
    past its limit is not read)."""
    return {"config": limits.max_config_bytes, "weights": limits.max_weights_bytes,
            "calibration": limits.max_calibration_bytes}


def stat_cache_file(cache: Path, source: str, limits: Limits) -> Path:
    """Where folder source ``source``, scanning under ``limits``, keeps its stat cache in
    the cache directory ``cache`` (the daemon and ``sources scan`` share it). Named by a
    hash of both: source names are free text, and a scan under other limits (``sources
    scan`` without the daemon's config) keeps a file of its own instead of replacing the
    daemon's."""
    key = json.dumps([source, stat_context(limits)], sort_keys=True)
    return cache / "folder-stat" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


class StatCache:
    """locator -> (the folder's stat snapshot, its fingerprint); ``path`` None: memory only.
    ``context``: what the fingerprints also depend on; a file made under another is ignored."""

    def __init__(self, path: Path | None = None, context: dict[str, Any] | None = None):
        self.path, self.context = path, context or {}
        self._entries: dict[str, tuple[Snapshot, str]] = {}
        self._changed = False
        if path is not None:
            self._entries = _load(path, self.context)

    def get(self, locator: str, snapshot: Snapshot | None) -> str | None:
        """The fingerprint hashed when the folder had exactly this ``snapshot``, if any."""
        known = self._entries.get(locator)
        return known[1] if known is not None and snapshot is not None and known[0] == snapshot else None

    def put(self, locator: str, snapshot: Snapshot, fingerprint: str) -> None:
        if self._entries.get(locator) != (snapshot, fingerprint):
            self._entries[locator] = (snapshot, fingerprint)
            self._changed = True

    def keep_only(self, locators: set[str]) -> None:
        """Forget folders that are gone (a full scan knows every folder there is)."""
        for locator in set(self._entries) - locators:
            del self._entries[locator]
            self._changed = True

    def save(self) -> None:
        """Write the file if anything changed (atomically; a failure only costs a rehash later)."""
        if self.path is None or not self._changed:
            return
        entries = {locator: [[list(f) for f in snapshot], fingerprint]
                   for locator, (snapshot, fingerprint) in self._entries.items()}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w") as out:
                    json.dump({"format": FORMAT, "context": self.context, "entries": entries}, out)
                os.replace(temporary, self.path)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise
        except OSError as exc:
            log.warning("cannot save the folder stat cache %s (%s); the next start hashes the adapters again",
                        self.path, exc.strerror)
            return
        self._changed = False


def _load(path: Path, context: dict[str, Any]) -> dict[str, tuple[Snapshot, str]]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError) as exc:
        log.warning("ignoring the folder stat cache %s (%s); adapters are hashed again", path, exc)
        return {}
    try:
        if data["format"] != FORMAT:
            raise ValueError(f"format {data['format']!r}")
        if data["context"] != context:
            log.info("folder stat cache %s was made under other limits; adapters are hashed again", path)
            return {}
        return {locator: (tuple(_file(f) for f in snapshot), _fingerprint(fingerprint))
                for locator, (snapshot, fingerprint) in _items(data["entries"])}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        log.warning("ignoring the folder stat cache %s (unexpected content: %s); adapters are hashed again", path, exc)
        return {}


def _items(entries: Any) -> list[tuple[str, tuple[Any, Any]]]:
    if not isinstance(entries, dict) or not all(isinstance(k, str) and isinstance(v, list) and len(v) == 2
                                                 for k, v in entries.items()):
        raise ValueError("entries")
    return list(entries.items())


def _file(entry: Any) -> tuple[str, int, int, int]:
    name, *numbers = entry
    if not isinstance(name, str) or len(numbers) != 3 or not all(type(n) is int for n in numbers):
        raise ValueError(f"file entry {entry!r}")
    return (name, *numbers)


def _fingerprint(value: Any) -> str:
    if not isinstance(value, str) or not FINGERPRINT.fullmatch(value):
        raise ValueError(f"fingerprint {value!r}")
    return value
