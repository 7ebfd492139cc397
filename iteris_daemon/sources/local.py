"""Local folder source: watchdog events, debounced, plus a full rescan at start.

An adapter folder is any non-hidden folder under a watched root holding an
``adapter_config.json`` or weights. Writers are not atomic (config first, weights
later, slow copies), so an event only marks a folder *dirty*; it is examined once
no event has touched it for ``settle_seconds`` and two looks at its files (names,
sizes, mtimes) agree. A settled folder without weights waits for them, unless it held
an adapter: that one is ``removed`` until weights are back. Folders whose name starts with "." are ignored, so a writer
can stage an adapter in ``.tmp-x/`` and rename it into place; so is ``lost+found`` at the
top of a file system, and a trainer's ``checkpoint-STEP`` folders (its progress, not an
adapter of its own: each was merged as one more task).

A watched root that is deleted, or not there at start (a typo, a mount not yet up:
it is not created), makes the source unhealthy and its adapters ``removed`` (rows and
revisions kept); once the root is there it is watched and rescanned.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

from pydantic import BaseModel, Field
from sqlalchemy.exc import DataError, IntegrityError
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from ..catalog import Catalog
from ..catalog.db import DATABASE_FAILURES
from ..catalog.models import AdapterStatus, Source, utcnow
from ..catalog.registry import Observation, SourceGoneError, get_source, list_current, mark_removed, prior, record, set_health
from ..errors import AdapterError, BaseModelError, first_line
from ..adapter_config import CONFIG_NAME, PICKLED_NAMES, WEIGHTS_NAME
from ..config import MAX_SECONDS, STRICT, ModelSetting, PathSetting
from ..validation import Limits, ShapeSource, folder_fingerprint, validate_adapter, validation_context
from .stat_cache import StatCache, stat_context

log = logging.getLogger(__name__)
# The catalog refusing one folder's row (a value too long for its column, a duplicate), as
# opposed to the catalog failing (DATABASE_FAILURES: its server down, a full disk).
ROW_REFUSALS = (DataError, IntegrityError)
ROOT_CHECK_SECONDS = 1.0  # how often a running source checks that its roots still exist
FAILED_RETRY_MAX_SECONDS = 600.0  # the longest wait before a folder whose examination raised is looked at again
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, *PICKLED_NAMES)
CALIBRATION_NAME = "calibration.jsonl"
TRAINER_CHECKPOINT = re.compile(r"checkpoint-\d+")  # transformers' Trainer saves its progress in output_dir/checkpoint-STEP


class LocalSettings(BaseModel):
    """Settings of a local folder source (stored in the catalog as JSON)."""

    model_config = STRICT

    paths: list[PathSetting] = Field(min_length=1, description="folders to watch, recursively")
    base_model: ModelSetting | None = Field(None, description="check shapes against this base model, which decides over the one an adapter names (a different name is logged; default: the adapter's own, from the Hub only)")
    settle_seconds: float = Field(
        2.0, gt=0, le=MAX_SECONDS, description="quiet time before a changed folder is examined")
    polling: bool = Field(False, description="poll instead of inotify (network filesystems)")
    poll_interval_seconds: float = Field(5.0, gt=0, le=MAX_SECONDS, description="polling period when polling=true")


@dataclass
class ScanReport:
    """What one scan did, by locator (the folder's path as text, as the catalog stores it)."""

    registered: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: int = 0
    waiting: list[str] = field(default_factory=list)  # incomplete, or the base model is unreadable
    withdrawn: list[str] = field(default_factory=list)  # registered, rejected now under other settings (also in rejected)

    @property
    def changed(self) -> bool:
        """Something a merge group could care about happened."""
        return bool(self.registered or self.removed or self.withdrawn)

    def __str__(self) -> str:
        withdrawn = f" ({len(self.withdrawn)} withdrawn)" if self.withdrawn else ""
        return (f"{len(self.registered)} registered, {len(self.rejected)} rejected{withdrawn}, {len(self.removed)} removed, "
                f"{self.unchanged} unchanged, {len(self.waiting)} waiting")


RACY_NS = 2_000_000_000  # file times this close to a look may hide a change (coarse clocks, NFS)


def _snapshot(folder: Path) -> tuple | None:
    """(name, size, mtime, ctime) of the folder's files. The ctime too: copies keep the
    source's mtime (``cp -p``, ``rsync -t``, ``shutil.copytree``), but setting it moves
    the ctime, which nothing can set back. A symlink counts twice, itself and what it
    leads to (``NAME ->``): the fingerprint reads the target, which can change alone."""
    try:
        stats = []
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.is_file(follow_symlinks=False) or entry.is_symlink():
                stats.append((entry.name, entry.stat(follow_symlinks=False)))
            if entry.is_symlink():
                with contextlib.suppress(OSError):  # dangling or looping: the link's own stat says it all
                    stats.append((f"{entry.name} ->", os.stat(entry.path)))
        return tuple((name, info.st_size, info.st_mtime_ns, info.st_ctime_ns) for name, info in stats)
    except OSError:
        return None


def _identity(folder: Path) -> tuple[int, int] | None:
    """(device, inode) of the folder ``folder`` leads to now, links followed; None if none."""
    try:
        info = os.stat(folder)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _under(locator: str, prefix: str) -> bool:
    """``locator`` is the folder ``prefix`` or lies inside it."""
    return locator == prefix or locator.startswith(prefix + os.sep)


def _has_any(folder: Path, names: Collection[str]) -> bool:
    """Whether ``folder`` has a file of one of ``names`` in it now. One the daemon's user
    may not look into may have (``Path.exists`` raises then): ``_examine`` says why not."""
    try:
        return any((folder / name).exists() for name in names)
    except PermissionError:
        return True


def _holds_adapter(folder: Path) -> bool:
    """Whether ``folder`` has any adapter file (config or weights) in it now."""
    return _has_any(folder, ADAPTER_FILES)


def _has_weights(folder: Path) -> bool:
    """Whether ``folder`` has weights (safetensors, or pickled ones to reject) in it now:
    without them it holds no adapter, only perhaps a config whose weights are to come."""
    return _has_any(folder, (WEIGHTS_NAME, *PICKLED_NAMES))


def _unreadable(folder: Path) -> PermissionError | None:
    """Why the daemon's user may not list ``folder`` or look at its files (its owner's
    ``chmod 700``, say), or None (also when it is gone: that is no question of rights)."""
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                entry.stat(follow_symlinks=False)
    except PermissionError as exc:
        return exc
    except OSError:
        pass
    return None


def _note_unlisted(unlisted: list[OSError], error: OSError) -> None:
    """``os.walk``'s ``onerror``: a folder it could not list, unless it went meanwhile."""
    if not isinstance(error, (FileNotFoundError, NotADirectoryError)):
        unlisted.append(error)


def _first_symlink(root: Path, folder: Path) -> Path | None:
    """The first symlink on the way from ``root`` (not itself: the listing walks a root
    whatever leads to it) down to ``folder`` (included), or None."""
    path = root
    for name in folder.relative_to(root).parts:
        path = path / name
        if os.path.islink(path):  # False where a folder above may not be looked into (Path.is_symlink raises)
            return path
    return None


def _ignored(path: Path, root: Path) -> bool:
    """``path`` lies where a walk does not look (:meth:`LocalFolderSource._looked_into`): in a hidden folder,
    or in ``lost+found`` at the top of a file system."""
    parts = path.relative_to(root).parts
    return any(part.startswith(".") or (part == "lost+found" and os.path.ismount(root.joinpath(*parts[:i])))
               for i, part in enumerate(parts))


def _checkpoint_in(path: Path, root: Path) -> Path | None:
    """The trainer's checkpoint folder (``checkpoint-STEP``) under ``root`` that ``path`` is
    or lies in, or None. A trainer saves its progress there, beside or before its adapter,
    in ``output_dir``: each was registered as an adapter of its own and merged as one more
    task. Not looked into, as the Hub source reads no adapter in a repo's subfolder."""
    parts = path.relative_to(root).parts
    return next((root.joinpath(*parts[:i + 1]) for i, part in enumerate(parts) if TRAINER_CHECKPOINT.fullmatch(part)),
                None)


def catalog_refusal(catalog: Catalog, exc: Exception) -> str:
    """A source's health when the catalog failed to record what it found (a full disk, its
    server down): the catalog and the cause, the same words for every kind of source."""
    return f"cannot register adapters in the catalog {catalog.safe_url}: {first_line(exc)}"


def as_text(path: Path | str) -> str:
    """``path`` as text any database can store: undecodable bytes of a non-UTF-8 name
    become ``\\xNN`` escapes (equal to ``str(path)`` for every UTF-8 path)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


class LocalFolderSource:
    """Keeps the catalog in step with adapter folders under the source's paths."""

    def __init__(self, catalog: Catalog, source_name: str, limits: Limits = Limits(),
                 on_change: Callable[[ScanReport], None] | None = None, trusted_models: Collection[str] = (),
                 shapes: ShapeSource | None = None, stat_cache: Path | None = None, rejudge: bool = True):
        self.catalog = catalog
        self.on_change = on_change  # called after a scan or event that registered or removed something
        self.name = source_name
        with catalog.session() as session:
            source = get_source(session, source_name)
            self.source_id, self.settings = source.id, LocalSettings.model_validate(source.settings)
        self.limits = limits
        self.trusted_models = frozenset(trusted_models)  # base models whose own code may run (config: daemon.trust_remote_code)
        self.shapes = shapes  # the base model's layer shapes (default: computed in this process)
        self.context = validation_context(limits, self.settings.base_model, self.trusted_models)
        self.rejudge = rejudge  # judge recorded verdicts again if reached under other settings (the daemon's own)
        self._lock = threading.Lock()  # one examination at a time (scan, events)
        # path -> (time of the last event, snapshot of its files then, examine subfolders too)
        self._dirty: dict[Path, tuple[float, tuple | None, bool]] = {}
        self._dirty_lock = threading.Lock()
        self._stop = threading.Event()
        self._observer = None
        self._handler: _Handler | None = None
        self._watches: dict[Path, object] = {}  # root -> its watchdog ObservedWatch
        self._watched: dict[Path, tuple[int, int] | None] = {}  # root -> the folder its watch is on (_identity)
        self._missing: set[Path] = set()  # roots found deleted while watching
        # Folder fingerprints by their files' stat (in a file: across restarts). The limits
        # are part of a fingerprint (a file past its limit is not read), so a cache made
        # under other limits is not used.
        self._hashed = StatCache(stat_cache, context=stat_context(limits))
        self._worker: threading.Thread | None = None
        self._scanned = threading.Event()  # cleared by start() until its scan is done (see busy)
        self._scanned.set()
        self._failures: dict[Path, int] = {}  # path -> examinations in a row that raised
        self._checkpoints: set[Path] = set()  # trainer's checkpoint folders the log named as not looked into
        self._base_model_problem: str | None = None  # why adapters of the scan under way wait on the base model

    # ------------------------------------------------------------------ discovery
    def _roots_of(self, path: Path) -> list[Path]:
        """The roots ``path`` is in (roots may nest: the listing walks each)."""
        return [root for root in self.settings.paths if path == root or root in path.parents]

    def _root_of(self, path: Path) -> Path | None:
        """The deepest root ``path`` is in."""
        return max(self._roots_of(path), key=lambda root: len(root.parts), default=None)

    def _behind_symlinked_folder(self, folder: Path) -> bool:
        """Whether ``folder`` lies inside a symlinked folder under its root: the listing
        (which does not follow symlinked folders) never reaches it, so events must not either."""
        root = self._root_of(folder)
        return root is not None and folder != root and _first_symlink(root, folder.parent) is not None

    def _symlinked(self, folder: Path) -> bool:
        """Whether ``folder`` is, or lies inside, a symlinked folder under its root."""
        root = self._root_of(folder)
        return root is not None and _first_symlink(root, folder) is not None

    def adapter_folders(self, unlisted: list[OSError]) -> list[Path]:
        """Every candidate adapter folder under the roots. Symlinked folders are not followed;
        one that leads to adapter files is listed, to be recorded as rejected. Why each
        folder that could not be listed could not goes into ``unlisted`` (os.walk skips
        it silently: its adapters were taken for deleted)."""
        found = []
        for root in self.settings.paths:
            if not root.is_dir():
                log.warning("source %s: folder %s does not exist (yet)", self.name, root)
                continue
            for folder, dirs, files in os.walk(root, onerror=partial(_note_unlisted, unlisted)):
                dirs[:] = self._looked_into(folder, dirs)
                if any(name in files for name in ADAPTER_FILES):
                    found.append(Path(folder))
                found.extend(link for link in (Path(folder) / d for d in dirs)
                             if link.is_symlink() and _holds_adapter(link))
        return found

    def _looked_into(self, folder: str, dirs: list[str]) -> list[str]:
        """The subfolders of ``folder`` a walk goes into, sorted: not hidden ones, nor a
        trainer's checkpoints (:func:`_checkpoint_in`; the log names them), nor fsck's
        ``lost+found`` at the top of a file system (root's, unreadable to the daemon's user:
        a volume mounted as a watched root would keep its source unhealthy for ever)."""
        at_mount = "lost+found" in dirs and os.path.ismount(folder)
        kept = []
        for name in dirs:
            if TRAINER_CHECKPOINT.fullmatch(name):
                self._not_looked_into(Path(folder) / name)
            elif not name.startswith(".") and not (at_mount and name == "lost+found"):
                kept.append(name)
        return sorted(kept)

    def _not_looked_into(self, checkpoint: Path) -> None:
        """Say once that the trainer's ``checkpoint`` folder is not looked into."""
        if checkpoint not in self._checkpoints:
            self._checkpoints.add(checkpoint)
            log.info("source %s: %s is a trainer's checkpoint (checkpoint-STEP), not an adapter of its own: not looked "
                     "into", self.name, checkpoint)

    def _name(self, folder: Path) -> str:
        root = self._root_of(folder) or folder.parent
        relative = folder.relative_to(root).as_posix()
        return folder.name if relative == "." else relative

    # ------------------------------------------------------------------ examination
    def scan(self) -> ScanReport:
        """Full rescan: register what is new or changed, mark vanished folders removed. The
        catalog failing it is raised, and said in the source's health (:meth:`_catalog_failed`)."""
        try:
            return self._scan()
        except DATABASE_FAILURES as exc:
            self._catalog_failed(exc)
            raise

    def _scan(self) -> ScanReport:
        report = ScanReport()
        with self._lock:
            self._base_model_problem = None
            unlisted: list[OSError] = []
            folders = self.adapter_folders(unlisted)
            recent = []
            for folder in folders:
                if self._stop.is_set():
                    return self._stopped(report)
                if self._recently_written(folder):  # maybe mid-copy: examine once it settles
                    recent.append((folder, _snapshot(folder)))
                else:
                    self._examine(folder, report)
            if recent and self._watching():
                for folder, _ in recent:
                    self._mark_dirty(folder)
                    report.waiting.append(as_text(folder))
            elif recent:  # a one-shot scan: wait one settle period, then look again
                time.sleep(self.settings.settle_seconds)
                for folder, before in recent:
                    if self._stop.is_set():
                        return self._stopped(report)
                    if _snapshot(folder) == before:
                        self._examine(folder, report)
                    else:
                        report.waiting.append(as_text(folder))
            present = {as_text(f) for f in folders}
            unseen = [as_text(error.filename) for error in unlisted]  # what is in them is not known
            self._mark_removed(lambda locator: locator not in present and not any(_under(locator, u) for u in unseen),
                               report)
            self._hashed.keep_only(present)
            self._hashed.save()
            for error in unlisted:
                self._cannot_look_into(Path(error.filename), error, report)
            # Healthy only if every root is there: a deleted root is an error, not an empty folder.
            missing = [root for root in self.settings.paths if not root.is_dir()]
            # The next root check that finds one back re-watches and rescans it: its watch
            # may have survived (renamed away and back), so no event would say so.
            self._missing.update(missing)
            # A base model that cannot be read keeps the source unhealthy until a scan reads it:
            # the end of the scan that met it said "ok" while all its adapters waited.
            problem = (f"watched folder {missing[0]} does not exist" if missing
                       else f"cannot read folder {unlisted[0].filename}: {unlisted[0].strerror}" if unlisted
                       else self._base_model_problem)
            self._set_health(problem)
        log.info("source %s: scan: %s", self.name, report)
        self._report_changes(report)
        return report

    @property
    def busy(self) -> bool:
        """A scan or an event's examination is under way, or the scan a start asks for is yet to
        come: the catalog may hold part of it."""
        return self._lock.locked() or self.starting

    @property
    def starting(self) -> bool:
        """The scan a start (or a reload's restart) asks for is not done yet."""
        return not self._scanned.is_set()

    def _stopped(self, report: ScanReport) -> ScanReport:
        """The daemon stops mid-scan: what was not reached waits for the next start's scan
        (nothing is marked removed, and the source's health is left as it was)."""
        self._hashed.save()
        log.info("source %s: scan stopped (the daemon is stopping); so far %s", self.name, report)
        return report

    def _watching(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def _recently_written(self, folder: Path) -> bool:
        """A file of ``folder``, or the folder itself (a file deleted or renamed away moves
        only the folder's times), changed within the settle time."""
        times = [max(mtime, ctime) for _, _, mtime, ctime in _snapshot(folder) or ()]
        with contextlib.suppress(OSError):
            info = folder.stat()
            times.append(max(info.st_mtime_ns, info.st_ctime_ns))
        return time.time() - max(times, default=0) / 1e9 < self.settings.settle_seconds

    def _examine(self, folder: Path, report: ScanReport) -> None:
        """Judge ``folder``. The catalog refusing its row alone (a name longer than its
        column) rejects it in ``report``, saying why, and the other folders go on: it ended
        the whole scan, and nothing after it registered. The catalog failing still ends it."""
        try:
            self._judge(folder, report)
        except ROW_REFUSALS as exc:
            report.rejected.append(as_text(folder))
            log.warning("source %s: rejected %s: the catalog refuses its record (%s); looked at again at the next "
                        "scan or change", self.name, as_text(folder), first_line(exc))

    def _judge(self, folder: Path, report: ScanReport) -> None:
        if self._symlinked(folder):  # the folder or one above it (under the root) is a symlink
            self._reject_symlinked(folder, report)
            return
        if (denied := _unreadable(folder)) is not None:
            self._cannot_look_into(folder, denied, report)
            return
        if not _has_weights(folder):
            self._without_weights(folder, report)
            return
        locator = as_text(folder)
        try:
            fingerprint = self._fingerprint(folder, locator)
        except OSError:  # a file vanished between listing and hashing: the folder is changing
            self._look_again(folder, report)
            return
        with self.catalog.session() as session:
            before = prior(session, self.source_id, locator, fingerprint, self.context if self.rejudge else None)
        if before.stands:
            report.unchanged += 1
            return
        reason, info = None, None
        try:
            if locator != str(folder):
                raise AdapterError(locator, "the path is not valid UTF-8; rename the folder (the catalog stores paths as text)")
            self._check_containment(folder)
            info = validate_adapter(folder, self.settings.base_model, self.limits, self.trusted_models, self.shapes)
        except AdapterError as exc:
            reason = str(exc)
        except BaseModelError as exc:
            log.warning("source %s: %s waits: %s", self.name, locator, exc)
            self._base_model_problem = str(exc)
            self._set_health(self._base_model_problem)
            report.waiting.append(locator)
            return
        except PermissionError as exc:  # the daemon's user may not read it: looking again changes nothing
            reason = (f"{exc.filename or folder}: cannot read: {exc.strerror}; the daemon's user needs read access "
                      "to the adapter's files")
        except OSError as exc:  # a file vanished mid-examination (deleted or replaced): not a verdict
            log.info("source %s: %s changed while being examined (%s); looking again", self.name, locator, exc.strerror)
            self._look_again(folder, report)
            return
        if not self._same_fingerprint(folder, locator, fingerprint):  # written to meanwhile: look again
            self._look_again(folder, report)
            return
        seen = Observation(
            locator=locator, name=as_text(self._name(folder)), revision=fingerprint,
            files_path=str(folder) if info is not None else None,
            info=info, reason=reason, has_calibration=(folder / CALIBRATION_NAME).is_file(), context=self.context,
            looked_over=before.current_id,  # the fingerprint was checked again after: the content is this recent
        )
        with self.catalog.session() as session:
            revision, new = record(session, self.source_id, seen, rejudge=self.rejudge)
            status, reason = revision.status, revision.reason
        if status is AdapterStatus.rejected:
            report.rejected.append(locator)
            if before.registered:
                report.withdrawn.append(locator)
            log.warning("source %s: rejected %s: %s", self.name, locator, reason)
        elif new:
            report.registered.append(locator)
            log.info("source %s: registered %s (revision %s, rank %d, base %s)",
                     self.name, seen.name, fingerprint[:12], info.rank, info.base_model)
        elif before.same_revision:  # judged again under other settings, and still valid
            report.unchanged += 1
            log.info("source %s: %s is still valid under the current settings", self.name, seen.name)
        else:  # back after its removal, or an older content restored
            report.registered.append(locator)
            log.info("source %s: %s is at revision %s, already in the catalog", self.name, seen.name, fingerprint[:12])

    def _without_weights(self, folder: Path, report: ScanReport) -> None:
        """``folder``, settled, has no weights. A new folder waits for them (config first,
        weights later); but an adapter recorded there lost them, and is ``removed``: kept
        registered, every run of its groups waited for it to be registered again, for
        ever. Weights that come back register it again."""
        locator = as_text(folder)
        self._mark_removed(lambda seen: seen == locator, report)
        if locator in report.removed:
            log.info("source %s: %s has no %s any more: removed until it has", self.name, locator, WEIGHTS_NAME)
        else:
            report.waiting.append(locator)

    def _fingerprint(self, folder: Path, locator: str) -> str:
        """``folder_fingerprint`` of ``folder``, hashed only when its files' stat (names,
        sizes, mtimes, ctimes) differs from when it was last hashed: a rescan of unchanged
        adapters reads no weights (hundreds of GB for a thousand LLM adapters). Any write
        moves a file's ctime, which nothing can set back; but file times are coarse, so a
        hash is remembered only for files last changed well before it began (git's "racy"
        rule): a write in the same tick as the look could leave every time unchanged."""
        started = time.time_ns()
        before = _snapshot(folder)
        known = self._hashed.get(locator, before)
        if known is not None:
            return known
        fingerprint = folder_fingerprint(folder, self.limits)
        settled = before is not None and all(max(mtime, ctime) < started - RACY_NS for _, _, mtime, ctime in before)
        if settled and _snapshot(folder) == before:  # and not written to while it was read
            self._hashed.put(locator, before, fingerprint)
        return fingerprint

    def _same_fingerprint(self, folder: Path, locator: str, fingerprint: str) -> bool:
        """The folder still has ``fingerprint`` (hashed again only if its stat moved)."""
        try:
            return self._fingerprint(folder, locator) == fingerprint
        except OSError:
            return False

    def _reject_symlinked(self, folder: Path, report: ScanReport) -> None:
        """Record ``folder``, reached through a symlinked folder, as rejected without reading
        its files (the link may lead anywhere; its target is the revision)."""
        target = os.path.realpath(folder)
        reason = f"{as_text(folder)}: is reached through a symlinked folder (to {as_text(target)}); symlinked folders are not followed"
        seen = Observation(locator=as_text(folder), name=as_text(self._name(folder)), files_path=None, reason=reason,
                           revision=hashlib.sha256(os.fsencode("symlinked folder\0" + target)).hexdigest())
        with self.catalog.session() as session:
            before = prior(session, self.source_id, seen.locator, seen.revision, None)
            _, new = record(session, self.source_id, replace(seen, looked_over=before.current_id))
        report.rejected.append(as_text(folder))
        if before.registered:  # a registered folder replaced by a symlink: its groups merge without it
            report.withdrawn.append(seen.locator)
        if new:
            log.warning("source %s: rejected %s", self.name, reason)

    def _cannot_look_into(self, folder: Path, error: OSError, report: ScanReport) -> None:
        """``folder`` cannot be looked into. For want of rights, the adapters recorded in and
        under it are rejected, saying why, as for unreadable files (left registered, their
        groups' runs waited for them; removed, they looked deleted); its rights back, the
        next look registers them again. Other errors (I/O) leave them as they are. What is
        new there is not seen: the log says so, and a scan's health."""
        prefix = as_text(folder)
        with self.catalog.session() as session:
            recorded = [(adapter.locator, adapter.name) for adapter, _ in list_current(session, source=self.name)
                        if adapter.status is not AdapterStatus.removed and _under(adapter.locator, prefix)]
        if not isinstance(error, PermissionError) or not recorded:
            log.warning("source %s: cannot read folder %s (%s); adapters in it are not seen", self.name, prefix,
                        error.strerror)
            return
        reason = (f"{prefix}: cannot read: {error.strerror}; the daemon's user needs read access to the adapter's "
                  "folder")
        for locator, name in recorded:
            seen = Observation(locator=locator, name=name, files_path=None, reason=reason,
                               revision=hashlib.sha256(os.fsencode("unreadable folder\0" + prefix)).hexdigest())
            with self.catalog.session() as session:
                before = prior(session, self.source_id, locator, seen.revision, None)
                if before.stands:  # rejected so already
                    report.unchanged += 1
                    continue
                record(session, self.source_id, replace(seen, looked_over=before.current_id))
            report.rejected.append(locator)
            if before.registered:
                report.withdrawn.append(locator)
            log.warning("source %s: rejected %s: %s", self.name, locator, reason)

    def _look_again(self, folder: Path, report: ScanReport) -> None:
        """``folder`` changed while it was examined: no verdict now, another look once it settles."""
        report.waiting.append(as_text(folder))
        self._mark_dirty(folder)

    def _check_containment(self, folder: Path) -> None:
        """Adapter files must be files inside the watched root (no symlink escapes; the
        calibration file may not be a symlink at all: see ``check_calibration_file``)."""
        # Where each root holding the folder really is now (its storage may have moved under a link).
        real_roots = [Path(os.path.realpath(root)) for root in self._roots_of(folder)]
        for name in ADAPTER_FILES:
            path = folder / name
            if path.is_symlink():
                target = Path(os.path.realpath(path))  # Path.resolve raises on a link loop
                if not any(target == root or root in target.parents for root in real_roots):
                    raise AdapterError(path, "is a symlink pointing outside the watched folder")

    def _mark_removed(self, gone, report: ScanReport) -> None:
        with self.catalog.session() as session:
            for adapter in mark_removed(session, self.source_id, gone):
                report.removed.append(adapter.locator)
                log.info("source %s: %s removed", self.name, adapter.name)

    def _report_changes(self, report: ScanReport) -> None:
        """Look again at what was just marked removed (it may be back already), then tell
        the groups what changed, whatever happens looking again."""
        try:
            self._look_again_at_removed(report.removed)
        finally:
            if self.on_change and report.changed:
                self.on_change(report)

    def _look_again_at_removed(self, locators: list[str]) -> None:
        """Folders just marked removed may be back already: a root renamed away and back
        while a scan or settle looked (its watch survives, so no event tells). Each
        is examined again if its files are there (and not behind a symlinked folder,
        which the listing skips too), and a root still away is recorded as gone (the
        root check rescans it once it is back). The root is looked at first, so a miss
        takes two flaps between these two looks."""
        if not self._watching():  # a one-shot scan: nothing would look again
            return
        for locator in locators:
            folder = Path(locator)
            root = self._root_of(folder)
            if root is not None and not root.is_dir():
                self._root_gone(root)
            elif not self._symlinked(folder) and _has_weights(folder):
                log.info("source %s: %s is back just after it was marked removed; looking again", self.name, folder)
                self._mark_dirty(folder)

    def _looked(self) -> None:
        """An event's look recorded something: it is the source's last look (``last_poll_at``,
        what ``status`` and the metrics show), which moved only at a full scan, every
        ``rescan_seconds``. Its health stays as the last scan left it."""
        with self.catalog.session() as session:
            source = session.get(Source, self.source_id)
            if source is not None:  # `sources remove` deleted it meanwhile
                source.last_poll_at = utcnow()

    def _set_health(self, error: str | None) -> None:
        with self.catalog.session() as session:
            set_health(session, self.source_id, error)

    def _catalog_failed(self, exc: Exception) -> None:
        """The catalog failed a look (a full disk refusing a new revision, its server down):
        the source is unhealthy, naming the catalog and why, as for a scan's other
        problems, until a scan goes through. Before, only the log said so, and ``status``
        showed the source ok while nothing it found was registered. As far as the catalog
        takes that write: where it does not, the daemon's /healthz says the catalog fails."""
        try:
            self._set_health(catalog_refusal(self.catalog, exc))
        except DATABASE_FAILURES as again:
            log.debug("source %s: cannot record its health either (%s)", self.name, first_line(again))


    # ------------------------------------------------------------------ watching
    def start(self) -> None:
        """Watch the roots, then rescan (events during the scan are not lost: they queue)."""
        observer_class = PollingObserver if self.settings.polling else Observer
        self._observer = (observer_class(timeout=self.settings.poll_interval_seconds)
                          if self.settings.polling else observer_class())
        self._handler = _Handler(self._mark_dirty)
        self._missing.clear()
        for root in self.settings.paths:
            if root.is_dir():
                self._watch(root)
            else:  # a typo, or a mount not there yet: said, not created; watched once it appears
                self._root_gone(root)
        self._observer.start()
        self._stop.clear()
        self._scanned.clear()
        self._worker = threading.Thread(target=self._run, name=f"source-{self.name}", daemon=True)
        self._worker.start()

    def stop(self) -> None:
        self._stop.set()
        if self._worker is not None:  # first: it may be re-watching a root
            self._worker.join()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join()

    def _watch(self, root: Path) -> None:
        """(Re)start the watch of ``root``: a dead watch of the same path must go first,
        or watchdog just adds the handler to it again."""
        old = self._watches.pop(root, None)
        if old is not None:
            with contextlib.suppress(KeyError):
                self._observer.unschedule(old)
        self._watched[root] = _identity(root)  # before: a link re-pointed meanwhile is seen at the next check
        self._watches[root] = self._observer.schedule(self._handler, str(root), recursive=True)

    def _watch_alive(self, root: Path) -> bool:
        watch = self._watches.get(root)
        return any(emitter.watch == watch and emitter.is_alive() for emitter in list(self._observer.emitters))

    def _check_roots(self) -> None:
        """Notice a deleted root, and watch it again once it is back; notice another
        folder in a root's place, and watch that one.

        watchdog ends the watch of a root that is deleted (the inotify emitter stops on
        IN_DELETE_SELF, the polling one when it cannot list the root) and never resumes
        it: without this, a re-created folder went unwatched until the daemon restarted,
        and the source still said it was healthy. While a root is gone the source is
        unhealthy and the adapters under it are ``removed``; when it is there again (even
        re-created between two checks, which the dead watch shows) it is re-watched and
        rescanned. A root replaced by another folder under its path (a release moved into
        place) kept its watch on the old one, which lives on under another name: the
        catalog kept the old adapters and missed the new ones until the periodic rescan.
        (A root configured as a symlink is resolved when the settings are read, so
        re-pointing that link is not seen: the source watches where it led then.)"""
        for root in self.settings.paths:
            if not root.is_dir():
                self._root_gone(root)
            elif root in self._missing or not self._watch_alive(root):
                self._missing.discard(root)
                log.info("source %s: watched folder %s is back; watching it again", self.name, root)
                self._watch(root)
                self.scan()
            elif _identity(root) != self._watched.get(root):
                log.info("source %s: watched folder %s is another folder now; watching it", self.name, root)
                self._watch(root)
                self.scan()

    def _root_gone(self, root: Path) -> None:
        """A watched root is not there: unhealthy, its adapters ``removed``, and the next
        root check that finds it again re-watches and rescans it (also when it was only
        renamed away and back, which its still-living watch would not tell)."""
        if root in self._missing:
            return
        self._missing.add(root)
        log.warning("source %s: watched folder %s does not exist; its adapters are marked removed until it is there",
                    self.name, root)
        report = ScanReport()
        prefix = as_text(root)  # as the locators under it are stored
        with self._lock:
            self._mark_removed(lambda loc: _under(loc, prefix), report)
            self._set_health(f"watched folder {root} does not exist")
        if self.on_change and report.changed:
            self.on_change(report)

    def _mark_dirty(self, path: Path, deep: bool = False, delay: float = 0.0) -> None:
        """An event touched ``path``; ``deep`` when a whole folder arrived (copied or moved in).
        ``delay``: it settles that much later than it would."""
        root = self._root_of(path)
        if root is None or _ignored(path, root):
            return
        if (checkpoint := _checkpoint_in(path, root)) is not None:
            self._not_looked_into(checkpoint)
            return
        with self._dirty_lock:
            deep = deep or self._dirty.get(path, (0, None, False))[2]
            self._dirty[path] = (time.monotonic() + delay, _snapshot(path) if os.path.isdir(path) else None, deep)

    def _run(self) -> None:
        try:
            self.scan()
        except Exception:  # keep watching; the next event or restart retries
            log.exception("source %s: initial scan failed", self.name)
        finally:
            self._scanned.set()
        tick = min(0.25, self.settings.settle_seconds / 4)
        next_root_check = time.monotonic() + ROOT_CHECK_SECONDS
        while not self._stop.wait(tick):
            if time.monotonic() >= next_root_check:
                next_root_check = time.monotonic() + ROOT_CHECK_SECONDS
                try:
                    self._check_roots()
                except Exception:
                    log.exception("source %s: checking the watched folders failed", self.name)
            for path, deep in self._take_due():  # one at a time: a failure costs only that path
                try:
                    self._settle([(path, deep)])
                except Exception as exc:
                    self._failed(path, deep, exc)
                else:
                    self._failures.pop(path, None)

    def _failed(self, path: Path, deep: bool, exc: Exception) -> None:
        """Examining ``path`` raised: it is looked at again, each time twice as late up to
        ``FAILED_RETRY_MAX_SECONDS`` (an event brings the next look forward), and the
        traceback is logged the first time only: a fault that lasts filled the log with
        one every settle period, for ever."""
        failures = self._failures[path] = self._failures.get(path, 0) + 1
        delay = min(self.settings.settle_seconds * (2 ** failures - 1), FAILED_RETRY_MAX_SECONDS)
        if isinstance(exc, SourceGoneError):  # no fault to trace: the daemon stops this source at its next check
            log.warning("source %s: %s not examined: %s", self.name, path, exc)
        elif failures == 1:
            log.exception("source %s: examining %s failed; it is looked at again", self.name, path)
        else:
            log.warning("source %s: examining %s failed again (%d times in a row: %s: %s); next look in %.0f s",
                        self.name, path, failures, type(exc).__name__, first_line(exc),
                        delay + self.settings.settle_seconds)
        if isinstance(exc, DATABASE_FAILURES):
            self._catalog_failed(exc)
        self._mark_dirty(path, deep, delay=delay)

    def _take_due(self) -> list[tuple[Path, bool]]:
        now = time.monotonic()
        with self._dirty_lock:
            due = [p for p, (t, _, _) in self._dirty.items() if now - t >= self.settings.settle_seconds]
            ready = []
            for path in due:
                _, seen, deep = self._dirty.pop(path)
                current = _snapshot(path) if os.path.isdir(path) else None
                if current != seen:  # still changing without telling us: look again later
                    self._dirty[path] = (now, current, deep)
                else:
                    ready.append((path, deep))
            return ready

    def _settle(self, paths: list[tuple[Path, bool]]) -> None:
        for root in {self._root_of(p) for p, _ in paths} - {None}:  # events from inside a root that left
            if not root.is_dir():
                self._root_gone(root)
        report = ScanReport()
        with self._lock:
            for path, deep in paths:
                if os.path.isdir(path):  # False also inside a folder that may not be looked into
                    for folder in [path, *(self._subfolders(path) if deep else [])]:
                        if _holds_adapter(folder) and not self._behind_symlinked_folder(folder):
                            self._examine(folder, report)
                prefix = str(path)

                def gone(locator: str, prefix=prefix) -> bool:
                    folder = Path(locator)
                    return _under(locator, prefix) and (self._behind_symlinked_folder(folder) or not _holds_adapter(folder))

                self._mark_removed(gone, report)
            self._hashed.save()
        if report.registered or report.rejected or report.removed:
            log.debug("source %s: events: %s", self.name, report)
            self._looked()
        self._report_changes(report)

    def _subfolders(self, path: Path) -> list[Path]:
        found = []
        for folder, dirs, _ in os.walk(path):
            dirs[:] = self._looked_into(folder, dirs)
            found.extend(Path(folder) / d for d in dirs)
        return found


class _Handler(FileSystemEventHandler):
    """Turns every event into "this folder may have changed"."""

    def __init__(self, mark):
        self.mark = mark

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        if event.event_type == "events_lost":  # EventsLostEvent (watchdog >= 7.1.1; older ones send none)
            self._lost(Path(os.fsdecode(event.src_path)))
            return
        for raw in (event.src_path, getattr(event, "dest_path", "")):
            if not raw:
                continue
            path = Path(os.fsdecode(raw))
            if not event.is_directory:
                self.mark(path.parent)
            elif event.event_type in ("deleted", "moved") and raw == event.src_path:
                self.mark(path)  # gone: its adapters are marked removed
                self.mark(path.parent)
            else:
                self.mark(path, deep=event.event_type in ("created", "moved"))

    def _lost(self, root: Path) -> None:
        """Events under the watched ``root`` were lost (the kernel's queue overflowed while
        the daemon did not read it): the whole root is looked at again once it settles, as
        a folder moved in is. Taken as a change of the root alone, the adapters that came
        meanwhile waited for the periodic rescan (10 minutes)."""
        log.warning("events under %s were lost (the inotify queue overflowed); looking at all of it again", root)
        self.mark(root, deep=True)
