"""Folder publisher: versioned copies of the merged adapter and a ``current`` symlink.

Layout under the destination ``path``::

    versions/run-7-20250101T120000.000000Z/   a complete PEFT folder per published version
    current -> versions/run-7-...             what consumers load, resolved first:
                                              PeftModel.from_pretrained(os.path.realpath("<path>/current"))

(PEFT opens the config and the weights one after the other: through the link, a swap
between the two reads would pair one version's config with the next one's weights. The
version a resolved path names stays whole until ``keep`` newer ones have been published.)

A version is copied into ``versions/.staging-*`` and flushed to disk, renamed into place,
and only then is ``current`` swapped, by renaming a fresh symlink over it (one atomic
``rename``). Whenever the process dies, ``current`` points at a complete version: the old
one or the new one. Leftovers of a crashed publish (staging folders, temporary links)
are removed by the next publish.

A full disk (``ENOSPC``, or ``EDQUOT`` past a quota) anywhere in that sequence raises
:class:`DestinationFullError`, a destination the daemon's user may not write (read-only,
permissions, a systemd sandbox without ``ReadWritePaths=``: EROFS, EACCES) :class:`DestinationError`; each
names the destination and what to do, ``current`` is untouched and a partial copy stays
hidden in ``versions/.staging-*``, removed at once (it held the space a full disk's other
users need; kept, it stayed until the next publish) or, if that fails too, by the next publish.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import shutil
from datetime import datetime, timezone
from pathlib import Path

from pydantic import Field

from iteris_daemon import hookimpl
from iteris_daemon.adapter_config import CONFIG_NAME, WEIGHTS_NAME, sha256_file
from iteris_daemon.errors import AdapterError, IterisError, OutputExistsError
from iteris_daemon.config import STRICT, PathSetting
from iteris_daemon.publish import PublisherSettings, PublishRequest, PublishResult

log = logging.getLogger(__name__)

CURRENT = "current"
VERSIONS = "versions"
_STAGING = ".staging-"
_TEMP_LINK = ".current-"
_STAMP = "%Y%m%dT%H%M%S.%fZ"
_VERSION = re.compile(r"^run-\d+-(?P<stamp>\d{8}T\d{6}\.\d{6}Z)$")
#: The files that make two adapters the same adapter (a new report alone is not a new version).
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME)


_FULL = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES)  # not EPERM: a file system without symlinks (vfat) says that too


class DestinationError(IterisError, OSError):
    """The destination's filesystem refused the publish: the daemon's user may not write there.

    An ``IterisError`` so that the run records, and the CLI prints, one line naming the
    destination and what to do instead of a bare ``[Errno 30]``; still an ``OSError`` (with
    ``errno``) for callers that handle OS errors."""

    def __init__(self, root: Path, cause: OSError, current: str | None):
        still = f"`current` still points at {current}" if current else "nothing was published"
        why, fix = (("the disk is full", "free space") if cause.errno in _FULL else
                    ("the daemon's user may not write there", "make it writable to that user (under the systemd "
                     "unit, whose sandbox makes the rest read-only, a ReadWritePaths= line naming it)"))
        super().__init__(cause.errno, f"cannot publish to {root}: {os.strerror(cause.errno)} ({why}); {still}; "
                                      f"{fix} and the next run publishes again")
        self.path = str(root)

    def __str__(self) -> str:
        return self.strerror


class DestinationFullError(DestinationError):
    """The destination's filesystem is full (or its quota exceeded) mid-publish."""


class FolderPublishSettings(PublisherSettings):
    model_config = STRICT

    path: PathSetting = Field(description="destination folder; consumers load the version <path>/current points at")
    keep: int = Field(3, ge=0, description="how many previous versions to keep besides the current one")


class FolderPublisher:
    kind = "folder"
    description = "Versioned copies in a local folder, with an atomically swapped 'current' symlink"
    Settings = FolderPublishSettings

    def publish(self, request: PublishRequest, settings: FolderPublishSettings) -> PublishResult:
        root = settings.path
        _check_adapter(request.adapter_dir)
        _check_destination(root)
        versions = root / VERSIONS
        current = _current_name(root)
        if current is not None and _same_adapter(request.adapter_dir, versions / current):
            log.info("folder %s: adapter unchanged, still %s", root, current)
            return PublishResult(str(root), current, changed=False)

        version = f"run-{request.run_id}-{datetime.now(timezone.utc).strftime(_STAMP)}"
        staging = versions / f"{_STAGING}{secrets.token_hex(4)}"
        try:
            versions.mkdir(parents=True, exist_ok=True)
            _remove_leftovers(root)
            staging.mkdir()
            _copy_flushed(request.adapter_dir, staging)
            os.rename(staging, versions / version)
            _fsync_dir(versions)
            _point_current(root, version)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)  # a partial copy (renamed already: a complete version)
            if exc.errno not in _FULL + _NOT_WRITABLE:
                raise
            raise (DestinationFullError if exc.errno in _FULL else DestinationError)(root, exc, current) from exc
        log.info("folder %s: current -> %s", root, version)
        try:
            _prune(versions, version, current, settings.keep)
        except OSError as exc:  # published already (consumers load it): the next publish prunes again
            log.warning("folder %s: could not prune old versions (%s); the next publish tries again", root, exc)
        return PublishResult(str(root), version, changed=True)

    def serves(self, settings: FolderPublishSettings, version: str) -> bool:
        """Whether ``current`` still points at a version that is there: ``version``, or one
        an operator rolled back to by hand, which a merge must not undo."""
        current = _current_name(settings.path)
        return current is not None and (settings.path / VERSIONS / current).is_dir()


def _check_adapter(folder: Path) -> None:
    missing = [name for name in ADAPTER_FILES if not (folder / name).is_file()]
    if missing:
        raise AdapterError(folder, f"no {missing[0]}: not a complete adapter, nothing was published")


def _check_destination(root: Path) -> None:
    """Refuse to publish over anything this publisher did not make."""
    if root.exists() and not root.is_dir():
        raise OutputExistsError(f"publish destination {root} exists and is not a folder; refusing to replace it")
    link = root / CURRENT
    if link.exists() and not link.is_symlink():
        raise OutputExistsError(
            f"{link} exists and is not a symlink (not made by iteris-daemon); refusing to replace it"
        )


def _current_name(root: Path) -> str | None:
    """The version folder name ``current`` points at, or None before the first publish."""
    link = root / CURRENT
    return Path(os.readlink(link)).name if link.is_symlink() else None


def _same_adapter(new: Path, published: Path) -> bool:
    """Compare contents, not dates or names: a re-run that merges to the same bytes is not a new version."""
    def sha256(path: Path) -> str | None:
        return sha256_file(path) if path.is_file() else None

    return all(sha256(published / name) == sha256(new / name) for name in ADAPTER_FILES)


def _copy_flushed(source: Path, target: Path) -> None:
    """Copy the folder ``source`` into the existing ``target``, every file and folder on disk before returning."""
    folders = [target]
    for item in sorted(source.rglob("*")):
        destination = target / item.relative_to(source)
        if item.is_dir():
            destination.mkdir()
            folders.append(destination)
        elif item.is_file():
            shutil.copyfile(item, destination)
            with open(destination, "rb+") as handle:
                os.fsync(handle.fileno())
    for folder in reversed(folders):
        _fsync_dir(folder)


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (a renamed file is not, until its folder is flushed)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _point_current(root: Path, version: str) -> None:
    """Swap ``current`` to ``versions/<version>`` in one rename: readers see the old or the new target, never none."""
    temp = root / f"{_TEMP_LINK}{secrets.token_hex(4)}"
    os.symlink(f"{VERSIONS}/{version}", temp)
    try:
        os.replace(temp, root / CURRENT)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_dir(root)


def _remove_leftovers(root: Path) -> None:
    """Staging folders and temporary links of a publish that crashed (never complete, never current)."""
    for link in root.glob(f"{_TEMP_LINK}*"):
        if link.is_symlink():
            link.unlink()
    for staging in (root / VERSIONS).glob(f"{_STAGING}*"):
        if staging.is_dir() and not staging.is_symlink():
            log.info("folder %s: removing %s left by an interrupted publish", root, staging.name)
            shutil.rmtree(staging)


def _prune(versions: Path, current: str, replaced: str | None, keep: int) -> None:
    """Delete versions beyond ``keep`` besides ``current``. The one it ``replaced`` (a
    consumer may still be loading it) is kept first, then the most recently published, by
    the stamp in their names: not by run id, which starts again from 1 with a new catalog
    (the old catalog's versions were kept for ever, each new one pruned once replaced). A
    version that was never current (left by a publish that failed before its swap) or
    stamped by a clock that was ahead must not push the replaced one out. Folders not
    named like a version are not ours, left alone."""
    previous = [
        (entry.name == replaced, match["stamp"], entry.name)
        for entry in versions.iterdir()
        if entry.name != current and (match := _VERSION.match(entry.name)) and entry.is_dir() and not entry.is_symlink()
    ]
    for *_, name in sorted(previous, reverse=True)[keep:]:
        log.info("folder %s: pruning old version %s", versions.parent, name)
        shutil.rmtree(versions / name)


@hookimpl
def register_publishers(register):
    register(FolderPublisher())
