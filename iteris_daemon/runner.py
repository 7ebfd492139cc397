"""One run of one merge group: claim, select, calibrate, merge, publish, record.

- **Claim.** A run first claims its group with one conditional ``UPDATE`` on
  ``merge_groups`` (free, stale, or already ours), so two daemons sharing a
  catalog (SQLite or PostgreSQL) never merge the same group at once. The claim
  is refreshed while the run lasts and released at the end; a claim whose
  holder died goes stale after ``claim_ttl_seconds`` (at once, when the holder
  was a process on this host and in this pid namespace that no longer exists),
  on the catalog's clock: hosts whose clocks disagree agree on the server's. A
  holder that stalls past the ttl (a stopped process, a suspended VM, a catalog
  outage) and finds the claim taken when it refreshes it, or just before
  publishing (that check renews the claim for another ttl), stops: its run, which
  the taker marked failed, stays so and its merge is not published. What remains:
  a holder stalled for over the ttl while its publishers run may still publish
  after the taker (a publish is not part of a catalog transaction); it then logs
  an error and records nothing.
- **Skip.** The input fingerprint covers the adapters' contents (config, weights,
  calibration file: not their revision names), the calibration data used,
  strategy and parameters; equal to the last published (or refused) run's means
  nothing to do, unless forced.
- **Gate.** The finished merge is judged (:mod:`iteris_daemon.gates`) against the
  adapter this group last published, kept in ``<work>/published/group-<id>``; a
  refused merge is recorded ``refused`` with the reason and published nowhere.
- **Publish.** Only after the merge is complete and passed the gates, to every
  destination; a run is ``succeeded`` only if every destination published. A run
  that failed after some destinations published records which; the destinations
  then disagree, so the next run publishes to all of them, whatever its inputs.
  A merge whose publishing failed is kept in ``<work>/unpublished/group-<id>``: the
  next run with the same inputs publishes it again instead of merging anew, and the
  outcome asks the daemon to try that run again (``RunOutcome.retry_publish``).
- Every run is a ``merge_runs`` row: running, then succeeded/failed/refused/cancelled/skipped.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field, fields, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from . import safe_json
from .calibration import (CALIBRATION_NAME, CalibrationOptions, CalibrationSet, Sample, ask, held_after_release,
                          releasing)
from .catalog import Catalog
from .catalog.db import DATABASE_FAILURES
from .catalog.models import (Adapter, AdapterRevision, AdapterStatus, MergeGroup, MergeRun, MergeRunInput, RunStatus,
                             SourceKind, utcnow)
from .catalog.registry import list_current
from .config import GroupConfig, Selection
from .errors import AdapterError, CalibrationUnavailable, IterisError, MergeCancelled, PluginError, first_line
from .gates import judge
from .logs import counted, redact
from .sources.repo_spec import RepoSpec
from .adapter_config import CONFIG_NAME, REPORT_NAME, WEIGHTS_NAME, sha256_file
from .paths import leftover_copies, replace_folder
from .plugin_manager import calibration_sources, get_publisher, get_strategy
from .publish import PublishedInput, PublishRequest, PublishResult
from .strategy import MergeStrategy, by_adapter_name, engine_int, parse_params, per_adapter_fields
from .supervisor import WorkerFailed, WorkerOptions, run_in_worker
from .validation import AdapterLayout, Limits, copy_adapter_file, folder_fingerprint, read_layout

log = logging.getLogger(__name__)
INPUTS_PREFIX = ".inputs-"  # a run's snapshot of its inputs, in the work folder
CLAIMED_ELSEWHERE = "claimed by another daemon"  # a run's outcome when another holder has the group


_OUR_HOLDERS: set[str] = set()  # the holders made in this process (one per daemon instance)


def worker_id() -> str:
    """Who holds a claim: host, pid, a random part (pids are reused) and, where it can be
    read, the pid namespace (:func:`pid_space`)."""
    space = pid_space()
    holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}" + (f":{space}" if space else "")
    _OUR_HOLDERS.add(holder)
    return holder


@functools.cache
def pid_space() -> str | None:
    """This process's pid namespace, as a digest of the boot id and the namespace's inode;
    None where ``/proc`` does not tell. Two containers with the host's network share its
    host name, each with its own pids (both daemons pid 1): a pid means nothing across them,
    nor across hosts of one name, nor across boots."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return hashlib.sha256(f"{boot}/{namespace}".encode()).hexdigest()[:12]


def holder_is_dead(holder: str | None) -> bool:
    """A claim by a process of this host and pid namespace that no longer exists can be
    taken at once; any other waits for the claim's ttl.

    A holder with this process's pid that this process did not make is an earlier
    process of this namespace that had the same pid. A container restarted is in a new
    namespace: its earlier incarnation's claim waits for the ttl, as a live container's
    beside it must. A holder that names no pid namespace (written by an older version, or
    where ``/proc`` did not tell) is judged by host name alone, as before."""
    if not holder:
        return True
    parts = holder.split(":")
    host, pid = parts[0], parts[1] if len(parts) > 1 else ""
    space = parts[3] if len(parts) > 3 else None  # None: a holder that names none
    if host != socket.gethostname() or not pid.isdigit() or space not in (None, pid_space()):
        return False
    if int(pid) == os.getpid():
        return holder not in _OUR_HOLDERS
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return _is_zombie(int(pid))


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except (OSError, IndexError):
        return False


def sync_group(catalog: Catalog, group: GroupConfig) -> None:
    """Write a configured group into the catalog (the config wins)."""
    values = {
        "base_model": group.base_model, "strategy": group.strategy, "params": group.params,
        "selection": group.select.model_dump(mode="json"), "destinations": group.destinations,
        "calibration": group.calibration.model_dump(mode="json"),
        "schedule": {"interval_seconds": group.interval_seconds, "cron": group.cron,
                     "debounce_seconds": group.debounce_seconds, "min_adapters": group.min_adapters},
    }
    def upsert(session) -> None:
        row = session.scalar(select(MergeGroup).where(MergeGroup.name == group.name))
        if row is None:
            session.add(MergeGroup(name=group.name, **values))
        else:
            for key, value in values.items():
                setattr(row, key, value)

    catalog.write_retrying_conflict(upsert)


class ClaimLost(MergeCancelled):
    """Another daemon took the group's claim while this run held it: this one stalled (a
    stopped process, a suspended VM) or could not refresh it (a catalog outage) for over
    ``claim_ttl_seconds``. That daemon marked the run failed and runs the group itself;
    publishing this older merge would replace its newer one."""


class Claim:
    """The group's claim row, refreshed by a background thread while held."""

    def __init__(self, catalog: Catalog, group: str, holder: str, ttl: float):
        self.catalog, self.group, self.holder, self.ttl = catalog, group, holder, ttl
        self.lost: ClaimLost | None = None  # set once a refresh finds the claim another's (the run says why)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> bool:
        with self.catalog.session() as session:
            now = self.catalog.now(session)  # claims written by other hosts: their times are the catalog's
            current = session.scalar(select(MergeGroup.claimed_by).where(MergeGroup.name == self.group))
            free = [MergeGroup.claimed_by.is_(None), MergeGroup.claimed_by == self.holder,
                    MergeGroup.claimed_at < now - timedelta(seconds=self.ttl)]
            if current and holder_is_dead(current):
                free.append(MergeGroup.claimed_by == current)
            taken = session.execute(
                update(MergeGroup).where(MergeGroup.name == self.group, or_(*free))
                .values(claimed_by=self.holder, claimed_at=now)
            ).rowcount
            if taken == 1:  # holding the claim, no other run of the group can be live
                _fail_interrupted(session, self.group, (
                    f"interrupted: its daemon ({current}) stopped or stopped refreshing the claim; the group runs again"
                    if current not in (None, self.holder) else
                    "its end was never recorded (the catalog refused the write); it may have published; "
                    "the group runs again"))
        if taken != 1:
            return False
        self._thread = threading.Thread(target=self._refresh, name=f"claim-{self.group}", daemon=True)
        self._thread.start()
        return True

    def renew(self) -> None:
        """Refresh the claim (another daemon may take it ``ttl`` from now, not before), or
        raise :class:`ClaimLost` (kept in ``lost``) where another daemon holds it, or held
        it and let go."""
        if self.lost is not None:
            raise self.lost
        with self.catalog.session() as session:
            kept = session.execute(update(MergeGroup).where(MergeGroup.name == self.group,
                                                            MergeGroup.claimed_by == self.holder)
                                   .values(claimed_at=self.catalog.now(session))).rowcount == 1
            taker = None if kept else session.scalar(select(MergeGroup.claimed_by).where(MergeGroup.name == self.group))
        if not kept:
            self.lost = ClaimLost(
                f"claim lost: another daemon ({taker or 'which has let it go since'}) took the group while this one "
                "stalled or could not refresh its claim for over claim_ttl_seconds, and failed this run; its merge is "
                "not published")
            raise self.lost

    def _refresh(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self.renew()
            except ClaimLost:  # the run sees it (should_stop, and before publishing)
                return
            except DATABASE_FAILURES as exc:  # the catalog down: one line, as the daemon's jobs say it
                log.warning("group %s: refreshing the claim failed (tried again in %.0f s): %s: %s", self.group,
                            self.ttl / 4, type(exc).__name__, first_line(exc))
                log.debug("group %s: refreshing the claim failed", self.group, exc_info=exc)
            except Exception:  # the next refresh retries; a stale claim only lets another daemon in
                log.exception("group %s: refreshing the claim failed", self.group)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self.catalog.session() as session:
            session.execute(update(MergeGroup).where(MergeGroup.name == self.group, MergeGroup.claimed_by == self.holder)
                            .values(claimed_by=None, claimed_at=None))


@dataclass
class Inputs:
    """The adapters a run merges, with their calibration; and those held back, with why."""

    revisions: list[tuple[Adapter, AdapterRevision]] = field(default_factory=list)
    calibration: list[CalibrationSet | None] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)  # the run's own copies of the revisions
    contents: list[str] = field(default_factory=list)  # their folder fingerprints (config, weights, calibration)
    held_back: dict[str, str] = field(default_factory=dict)
    # Their [revision id, locator, revision]: SQLite may give a deleted revision's id to a new one.
    held_back_revisions: list[list] = field(default_factory=list)
    # Held back for a while: a folder source's files changed (or went) since registration (the
    # source reports them again: new revision or removal), or a calibration source could not
    # be reached or its worker died (a later run asks again). The group waits rather than
    # merge without them.
    changing: list[str] = field(default_factory=list)
    unreachable: bool = False  # one of them for its calibration source (or its worker): a later run asks again
    worker_failed: bool = False  # a calibration worker failed for some of them

    selection: str | None = None  # selection_key of the group's definition

    def recorded(self) -> dict[str, Any]:
        """What a run's row keeps of its inputs beyond the merged revisions (``metrics``)."""
        return {"held_back": self.held_back, "held_back_revisions": self.held_back_revisions,
                "selection": self.selection}

    def names(self) -> list[str]:
        """Each merged adapter's name in the run (its report, model card, per-adapter tables):
        its catalog name, or ``SOURCE/NAME`` where two sources give the run one name. Two
        teams' ``sentiment`` were told apart by the run's temporary copies' paths, a new name
        at every run, and a table's ``sentiment`` weighed both."""
        counts = Counter(adapter.name for adapter, _ in self.revisions)
        return [f"{adapter.source.name}/{adapter.name}" if counts[adapter.name] > 1 else adapter.name
                for adapter, _ in self.revisions]

    def hold_back(self, adapter: Adapter, revision: AdapterRevision, reason: str) -> None:
        self.held_back[adapter.name] = reason
        self.held_back_revisions.append([revision.id, adapter.locator, revision.revision])

    def fingerprint(self, strategy: str, params: dict[str, Any], precision: dict[str, str] | None = None) -> str:
        """What the merge depends on: each input's content, not its revision name (a Hub
        commit that only edits the README is a new revision of the same adapter), and the
        group's dtypes where set (:meth:`GroupConfig.precision`)."""
        payload = {
            "strategy": strategy, "params": params, **(precision or {}),
            "inputs": sorted(
                [a.locator, content, c.fingerprint() if c else None]
                for (a, _), content, c in zip(self.revisions, self.contents, self.calibration)
            ),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def select_inputs(catalog: Catalog, group: GroupConfig) -> list[tuple[Adapter, AdapterRevision]]:
    """Read without the write lock: listing thousands of adapters takes a while."""
    with catalog.session(write=False) as session:
        matching = _matching(merge_candidates(session), group.base_model, group.select)
        selected = _one_per_location(matching)
        kept = {location(adapter): adapter for adapter, _ in selected}
        for adapter, _ in matching:
            other = kept[location(adapter)]
            if other.id != adapter.id:
                log.warning("group %s: adapter %s of source %s is where adapter %s of source %s is; merged once",
                            group.name, adapter.name, adapter.source.name, other.name, other.source.name)
        return selected


def merge_candidates(session: Session) -> list[tuple[Adapter, AdapterRevision]]:
    """The :func:`mergeable` pairs of the sources not removed: `sources remove` under a running
    daemon left its watcher registering adapters, and every group went on merging them."""
    return mergeable(list_current(session, [AdapterStatus.registered], enabled_sources=True))


def mergeable(adapters: list[tuple[Adapter, AdapterRevision | None]]) -> list[tuple[Adapter, AdapterRevision]]:
    """The ``(adapter, current revision)`` pairs whose revision is registered and has files."""
    return [(adapter, current) for adapter, current in adapters
            if current is not None and current.status is AdapterStatus.registered and current.files_path is not None]


def _matching(pairs: list[tuple[Adapter, AdapterRevision]], base_model: str,
              selection: Selection) -> list[tuple[Adapter, AdapterRevision]]:
    """The pairs that a group's base model and ``select`` take."""
    return [(adapter, revision) for adapter, revision in pairs
            if revision.base_model in (None, base_model)
            and selection.matches(adapter.source.name, adapter.name, adapter.id)]


def of_other_base_models(pairs: list[tuple[Adapter, AdapterRevision]], base_model: str, selection: Selection) -> str:
    """The pairs (of :func:`mergeable`) that ``selection`` takes but whose base model is not
    ``base_model``, counted by base model; "" if none. A group whose base model is spelled
    otherwise than its sources' (the Hub id of their local copy, a typo) merged nothing, and
    said only that no adapter was ready."""
    others: dict[str, int] = {}
    for adapter, revision in pairs:
        if revision.base_model not in (None, base_model) and selection.matches(adapter.source.name, adapter.name,
                                                                                adapter.id):
            others[revision.base_model] = others.get(revision.base_model, 0) + 1
    return "; ".join(f"{counted(n, 'registered adapter')} its select takes {'is' if n == 1 else 'are'} of base model "
                     f"{other}, not {base_model}" for other, n in sorted(others.items()))


def selected(pairs: list[tuple[Adapter, AdapterRevision]], base_model: str,
             selection: Selection) -> list[tuple[Adapter, AdapterRevision]]:
    """The ``(adapter, current revision)`` pairs (of :func:`mergeable`) that a group of
    ``base_model`` and ``selection`` merges."""
    return _one_per_location(_matching(pairs, base_model, selection))


def _one_per_location(matching: list[tuple[Adapter, AdapterRevision]]) -> list[tuple[Adapter, AdapterRevision]]:
    """One pair per folder or repo. Two sources may watch one (one renamed in the config
    while the catalog keeps the old, or one added with `sources add`); merged twice, that
    adapter would count double. Of such pairs the newest revision is kept."""
    newest: dict[tuple, int] = {}  # location -> revision id kept
    for adapter, revision in matching:
        key = location(adapter)
        newest[key] = max(newest.get(key, revision.id), revision.id)
    return [(a, r) for a, r in matching if newest[location(a)] == r.id]


def location(adapter: Adapter) -> tuple:
    """Where ``adapter`` lies, one key however a source spells it: a folder, or a Hub repo's
    folder and branch (``acme/x`` and ``Acme/X@main`` are one)."""
    if adapter.source.kind is SourceKind.hub:
        return adapter.source.kind, RepoSpec.parse(adapter.locator).key
    return adapter.source.kind, adapter.locator


def unmerged(taken: list[tuple[Adapter, AdapterRevision]],
             merged: list[tuple[Adapter, AdapterRevision]]) -> list[tuple[Adapter, AdapterRevision]]:
    """The pairs of ``taken`` (:func:`selected`) that a run merging ``merged`` did not merge,
    told by location and revision (a folder's content fingerprint, a Hub commit), not by
    revision id: two sources watching one folder register its content twice, and where
    :func:`_one_per_location` keeps the other source's revision, a run merges the same
    adapter (skipped, its inputs unchanged)."""
    done = {(location(adapter), revision.revision) for adapter, revision in merged}
    return [(adapter, revision) for adapter, revision in taken if (location(adapter), revision.revision) not in done]


def selection_key(group: GroupConfig) -> str:
    """A digest of what decides ``group``'s selection (its base model and ``select``).
    Runs record it: a daemon compares its group only with runs of the same definition,
    as another daemon on the catalog may define the group otherwise (mid-way through a
    config change, say) and their checks would trigger each other's runs."""
    definition = {"base_model": group.base_model, "select": group.select.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).hexdigest()[:16]


RUNS_LOOKED_AT = 20  # a group's latest runs searched for the last one of a definition


def groups_behind(catalog: Catalog, groups: Collection[GroupConfig]) -> dict[str, frozenset[int]]:
    """The groups whose selection (revision ids) differs from what the last run of their
    definition (``selection_key``) considered, merged or held back, with that selection.
    Groups without such a run are left out (after a start or reload its first run is
    due anyway). Runs recorded before definitions were count as the group's own. Read
    in one view without the write lock."""
    if not groups:
        return {}
    with catalog.session(write=False) as session:
        pairs = merge_candidates(session)
        last_runs: dict[str, tuple[int, dict[str, Any]]] = {}
        for group in groups:
            key = selection_key(group)
            # the group's id first: joined by name, PostgreSQL walked every group's newer runs
            group_id = select(MergeGroup.id).where(MergeGroup.name == group.name).scalar_subquery()
            recent = session.execute(select(MergeRun.id, MergeRun.metrics).where(MergeRun.group_id == group_id)
                                     .order_by(MergeRun.id.desc()).limit(RUNS_LOOKED_AT)).all()
            own = next(((i, m or {}) for i, m in recent if (m or {}).get("selection", key) == key), None)
            if own is not None:
                last_runs[group.name] = own
        merged: dict[int, set[int]] = {run_id: set() for run_id, _ in last_runs.values()}
        for run_id, revision_id in session.execute(select(MergeRunInput.run_id, MergeRunInput.revision_id)
                                                   .where(MergeRunInput.run_id.in_(list(merged)))):
            merged[run_id].add(revision_id)
    behind = {}
    for group in groups:
        if group.name not in last_runs:
            continue
        run_id, run_metrics = last_runs[group.name]
        taken = selected(pairs, group.base_model, group.select)
        selection = {revision.id: adapter.name for adapter, revision in taken}
        considered = merged[run_id]
        if "held_back_revisions" in run_metrics:
            current = {revision.id: [adapter.locator, revision.revision] for adapter, revision in taken}
            considered = considered | {entry[0] for entry in run_metrics["held_back_revisions"]
                                       if current.get(entry[0], entry[1:]) == entry[1:]}
        else:
            selection = {r: name for r, name in selection.items() if name not in run_metrics.get("held_back", {})}
        if set(selection) != considered:
            behind[group.name] = frozenset(selection)
    return behind


class RefusedInput(AdapterError):
    """The content the catalog registered is refused under this run's limits: it was
    registered under other settings (a ``sources scan`` without the daemon's config, or
    limits lowered since). Held back without waiting: unlike a changing folder, nothing
    will report it again."""


class CopyFailed(AdapterError):
    """An input could not be copied into the run's folder (the state folder full or not
    writable): the run waits, whatever the source (a Hub adapter was held back, and the merge
    of the others published)."""


_COPY_SIDE = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)  # what writing a copy meets, never reading


def snapshot_input(adapter: Adapter, revision: AdapterRevision, into: Path,
                   limits: Limits = Limits()) -> tuple[AdapterLayout, str]:
    """Copy a selected revision's files into the run's own folder and check they are what
    the catalog recorded. The merge, its calibration and the run's record then agree even
    when the source folder changes or vanishes mid-run (the soak test caught both).

    Only regular files within the limits are copied, the calibration file never through
    a symlink (one to /dev/zero was copied without end). A folder source's revision is
    the fingerprint of config, weights and calibration, so all three are checked; for
    a Hub revision (a commit of files in the daemon's own cache) the weights' hash is.
    Returns the copy's layout and its folder fingerprint (a folder source's revision).
    Raises :class:`RefusedInput` when the registered content itself fails ``limits``."""
    source = Path(revision.files_path)
    into.mkdir(parents=True)
    for name in (CONFIG_NAME, WEIGHTS_NAME, CALIBRATION_NAME):
        try:
            copy_adapter_file(source / name, into / name, limits, follow=name != CALIBRATION_NAME)
        except FileNotFoundError:
            if name != CALIBRATION_NAME:
                raise AdapterError(source / name, "vanished since it was registered") from None
        except OSError as exc:
            if exc.errno in _COPY_SIDE or Path(exc.filename or source).is_relative_to(into):  # not the adapter's
                raise CopyFailed(source / name, f"cannot be copied into this run's folder {into}: {exc.strerror} "
                                                "(the daemon's state folder, [daemon] state_dir)") from None
            raise AdapterError(source / name, f"cannot read: {exc.strerror}") from None
        except AdapterError as exc:
            if _source_holds_revision(adapter, revision, limits):
                raise RefusedInput(exc.path, f"{exc.reason}, under this daemon's limits") from None
            raise
    changed = AdapterError(source, "changed since it was registered; the next run merges the new revision")
    try:
        loaded = read_layout(into, limits, adapter.name)
    except AdapterError as exc:
        if _holds_revision(adapter, revision, into, limits):
            where = source / Path(exc.path).relative_to(into) if Path(exc.path).is_relative_to(into) else exc.path
            raise RefusedInput(where, f"{exc.reason}, under this daemon's limits") from None
        raise changed from None
    if revision.content_sha256 and loaded.content_sha256 != revision.content_sha256:
        raise changed
    # The weights were hashed by read_layout from the bytes it checked: not read a third time.
    content = folder_fingerprint(into, limits, pickled_from=source, weights_sha256=loaded.content_sha256)
    if adapter.source.kind is SourceKind.local and content != revision.revision:
        raise changed
    return loaded, content


def _source_holds_revision(adapter: Adapter, revision: AdapterRevision, limits: Limits) -> bool:
    """Whether the source still holds the registered content, one of whose files ``limits``
    refused: its fingerprint is the revision under limits raised to the defaults (a scan
    without the daemon's config registers under those). A Hub revision is a commit's files
    in the daemon's own cache: it does."""
    if adapter.source.kind is not SourceKind.local:
        return True
    raised = Limits(**{f.name: max(getattr(limits, f.name), getattr(Limits(), f.name)) for f in fields(Limits)})
    try:
        return folder_fingerprint(Path(revision.files_path), raised) == revision.revision
    except OSError:
        return False


def _holds_revision(adapter: Adapter, revision: AdapterRevision, copy: Path, limits: Limits) -> bool:
    """Whether the run's ``copy`` is the registered content (the weights' hash, and for a
    folder source the whole fingerprint), read without checking it."""
    weights = sha256_file(copy / WEIGHTS_NAME)
    if revision.content_sha256 is not None and weights != revision.content_sha256:
        return False
    if adapter.source.kind is SourceKind.local:
        fingerprint = folder_fingerprint(copy, limits, pickled_from=Path(revision.files_path),
                                         weights_sha256=weights)
        return fingerprint == revision.revision
    return True


CalibrationAnswer = CalibrationSet | IterisError | None  # None: this source has no data for the adapter


class InWorkerCalibration:
    """A calibration source that needs torch (``runs_in_worker``), as the daemon calls it:
    one worker process (``in_worker(job, label)`` returns its report) answers for every
    adapter of a run at once, on the run's snapshots, and the samples come back as JSON.
    One worker per run, not per adapter: each start costs seconds of imports."""

    def __init__(self, source, in_worker: Callable[[dict[str, Any], str], Any]):
        self.name, self.description = source.name, getattr(source, "description", "")
        self._in_worker = in_worker

    def load_many(self, adapters: list[AdapterLayout], options: CalibrationOptions) -> list[CalibrationAnswer]:
        job = {"kind": "calibration", "source": self.name,
               "adapters": [{"path": str(a.path), "name": a.name} for a in adapters],
               "options": {"order": list(options.order), "files": {k: str(v) for k, v in options.files.items()},
                           "base_model": options.base_model, "samples": options.samples, "limit": options.limit,
                           "settings": options.settings,  # downloads and generate's offload folder go here
                           "cache_dir": None if options.cache_dir is None else str(options.cache_dir)}}
        names = ", ".join(a.name for a in adapters) if len(adapters) <= 3 else f"{len(adapters)} adapters"
        answers = self._in_worker(job, f"calibration source {self.name} for {names}")  # prefixes each log line
        return [_answer(answer) for answer in answers]


def _answer(answer: dict[str, Any] | None) -> CalibrationAnswer:
    """One adapter's answer from a calibration worker (see ``worker._calibration``)."""
    if answer is None:
        return None
    if "error" in answer:  # out of memory: as if the worker had died of it (the host short of memory a while)
        return WorkerFailed(answer["error"], "memory") if answer.get("out_of_memory") else IterisError(answer["error"])
    return CalibrationSet(tuple(Sample.from_json(s) for s in answer["samples"]), answer["source"],
                          answer["generated"])


def calibrate_all(adapters: list[AdapterLayout], options: CalibrationOptions,
                  sources: dict[str, Any], should_stop: Callable[[], bool] = lambda: False) -> list[CalibrationAnswer]:
    """Each adapter's calibration: the first answer of the sources in ``options.order``,
    as :func:`~iteris_daemon.calibration.first_calibration` gives it, or the error that
    holds the adapter back. Each source is asked about every adapter still unanswered
    in turn, so a source in a worker is asked about all of them in one worker, and an
    in-process source is released once it has answered for all of them (or failed). A stop
    request ends it before the next adapter (reading dozens of large files took as
    long as systemd waits for a stop)."""
    answers: list[CalibrationAnswer] = [None] * len(adapters)
    for name in options.order:
        pending = [i for i, answer in enumerate(answers) if answer is None]
        if not pending:
            break
        source = sources[name]
        if isinstance(source, InWorkerCalibration):
            try:
                found = source.load_many([adapters[i] for i in pending], options)
            except WorkerFailed as exc:  # not the adapters' fault: they wait for a later run (gather_inputs)
                found = [WorkerFailed(f"calibration source {name}: {exc}", exc.kind, exc.error_type)] * len(pending)
        else:
            found = []
            try:
                with releasing({name: source}):
                    for i in pending:
                        _check_stop(should_stop)
                        found.append(_ask(name, source, adapters[i], options))
            except MergeCancelled:
                raise
            except IterisError as exc:  # its release failed (the run was left unrecorded, tried again for ever)
                found = held_after_release(found, len(pending), exc)
        for i, answer in zip(pending, found):
            answers[i] = answer
    return answers


def _check_stop(should_stop: Callable[[], bool]) -> None:
    """Raise :class:`MergeCancelled` when a stop was requested."""
    if should_stop():
        raise MergeCancelled("stopped while gathering the inputs")


def _ask(name: str, source, adapter: AdapterLayout, options: CalibrationOptions) -> CalibrationAnswer:
    try:
        return ask(name, source, adapter, options)
    except MergeCancelled:
        raise
    except IterisError as exc:
        return exc


def gather_inputs(catalog: Catalog, group: GroupConfig, needs_calibration: bool, samples: int | None,
                  into: Path, limits: Limits = Limits(),
                  in_worker: Callable[[dict[str, Any], str], Any] | None = None,
                  should_stop: Callable[[], bool] = lambda: False, read_limit: int | None = None,
                  cache_dir: Path | None = None, wait_for_dead_workers: bool = True,
                  published: Path | None = None) -> Inputs:
    """Snapshot each selected adapter into ``into`` and load its calibration (its first
    ``samples``; sources read no further than that, or than ``read_limit`` where
    ``samples`` is None); an adapter that
    cannot be read as registered, or has no calibration data, is held back, not fatal (one
    of a folder source that changed since registration, or whose calibration source could
    not be reached, makes the run wait, see ``changing``; so does one whose calibration
    worker failed, unless not ``wait_for_dead_workers``).
    With ``in_worker`` (the daemon), sources that need torch are called through it; sources
    that download keep their files under ``cache_dir`` (the daemon's). ``published``: the
    group's last published adapter (its kept copy), whose task type and base revision the
    adapters that differ are held back against (:func:`_outvoted`)."""
    sources = calibration_sources()
    if in_worker is not None:  # the group's own sources: another installed one is never asked
        sources = {name: InWorkerCalibration(source, in_worker) if getattr(source, "runs_in_worker", False) else source
                   for name, source in sources.items() if name in group.calibration.order}
    options = CalibrationOptions(
        order=tuple(group.calibration.order), files=dict(group.calibration.files), base_model=group.base_model,
        samples=samples or 50, limit=samples or read_limit, settings=group.calibration.source_settings(),
        max_download_bytes=limits.max_calibration_bytes, cache_dir=cache_dir, should_stop=should_stop,
    )
    inputs = Inputs(selection=selection_key(group))
    snapshots: list[tuple[Adapter, AdapterRevision, AdapterLayout, str]] = []
    for index, (adapter, revision) in enumerate(select_inputs(catalog, group)):
        _check_stop(should_stop)
        try:
            snapshots.append((adapter, revision, *snapshot_input(adapter, revision, into / str(index), limits)))
        except IterisError as exc:
            inputs.hold_back(adapter, revision, str(exc))
            if (adapter.source.kind is SourceKind.local or isinstance(exc, CopyFailed)) and not isinstance(
                    exc, RefusedInput):
                inputs.changing.append(adapter.name)
    outvoted = _outvoted([loaded.config for _, _, loaded, _ in snapshots], _published_config(published))
    for index, reason in outvoted.items():
        inputs.hold_back(snapshots[index][0], snapshots[index][1], reason)
    snapshots = [snapshot for index, snapshot in enumerate(snapshots) if index not in outvoted]
    absent = sorted(set(options.files) - {loaded.name for _, _, loaded, _ in snapshots})
    if absent and "files" in options.order:  # a typo in the mapping: its adapter read another source's data
        log.info("group %s: calibration.files names %s, not in this run", group.name, ", ".join(absent))
    # Data-free strategies do not need it, but their merge is evaluated (and gated) on it.
    answers = calibrate_all([loaded for _, _, loaded, _ in snapshots], options, sources, should_stop)
    _check_stop(should_stop)  # a worker that failed as it was stopped: the run is cancelled, not waiting
    for (adapter, revision, loaded, content), data in zip(snapshots, answers):
        def original(text: str) -> str:  # the snapshot's path named as the adapter's own (the snapshot goes)
            return text.replace(str(loaded.path), revision.files_path)

        if isinstance(data, IterisError):
            inputs.hold_back(adapter, revision, original(str(data)))
            inputs.worker_failed |= isinstance(data, WorkerFailed)
            if isinstance(data, (CalibrationUnavailable, WorkerFailed)):
                inputs.unreachable = True  # a later run asks again
                if wait_for_dead_workers or isinstance(data, CalibrationUnavailable):
                    inputs.changing.append(adapter.name)  # and this one waits for it
            continue
        if data is None and needs_calibration:
            inputs.hold_back(adapter, revision, f"no calibration data (asked: {', '.join(options.order)})")
            continue
        if data is not None:
            data = data.head(samples)
            data = replace(data, source=original(data.source))
        inputs.revisions.append((adapter, revision))
        inputs.calibration.append(data)
        inputs.folders.append(loaded.path)
        inputs.contents.append(content)
    return inputs


# What one merge's adapters must share (``merge.load_adapters`` refuses the rest), read from
# their configs; None: not said (an adapter without a base revision goes with any).
_SHARED = {"task type": lambda config: config.get("task_type") or "none",
           "base model revision": lambda config: config.get("revision")}


def _published_config(published: Path | None) -> dict[str, Any] | None:
    """The config of a group's kept published adapter (written by this daemon), if any."""
    try:
        return json.loads((published / CONFIG_NAME).read_text(encoding="utf-8")) if published else None
    except (OSError, ValueError):
        return None


def _outvoted(configs: list[dict[str, Any]], published: dict[str, Any] | None = None) -> dict[int, str]:
    """The adapters (index: why) whose task type or base model revision differs from the
    group's: held back, so that one adapter trained for another task (or an untyped one)
    does not fail every run of its group. The group's is the published merge's where an
    adapter still has it (adapters of another task arriving in numbers must not replace what
    its destinations serve), else the one more than half of them share; without such a
    majority, none is held back: the merge then refuses them, naming each."""
    outvoted: dict[int, str] = {}
    for what, read in _SHARED.items():
        said = {index: read(config) for index, config in enumerate(configs)
                if index not in outvoted and read(config) is not None}
        served = read(published) if published is not None else None
        counts = Counter(said.values()).most_common()
        if served in said.values():
            kept, whose = served, "the published merge's"
        elif len(counts) > 1 and counts[0][1] * 2 > len(said):
            kept, whose = counts[0][0], "the one most of the group's adapters share"
        else:
            continue
        for index, value in said.items():
            if value != kept:
                outvoted[index] = f"its {what} ({value}) is not {whose} ({kept}): one merge has one"
    return outvoted


class PartlyPublished(IterisError):
    """A destination failed after the ones before it had published the merge."""

    def __init__(self, published: list[dict], kind: str, cause: BaseException):
        self.published = published
        done = ", ".join(f"{p['kind']} {p['location']}" for p in published)
        reason = str(cause) if isinstance(cause, IterisError) else f"{type(cause).__name__}: {first_line(cause)}"
        super().__init__(f"publishing to {kind} failed after {done} published this merge: {reason} "
                         "(the next run publishes to every destination again)")


class PublishFailed(IterisError):
    """A publisher's failure that trying again may not meet (a destination down, a full disk)."""


@dataclass
class RunOutcome:
    status: RunStatus
    run_id: int | None
    detail: str = ""
    # The merge is kept and only its publishing failed (a destination down, a full disk):
    # trying again later may go through. Not for a publisher's plugin error (it needs a fix).
    retry_publish: bool = False
    # An adapter waited for, or held back, because its calibration source could not be reached
    # or its calibration worker failed: a later run may reach it (nothing else would trigger one).
    retry_inputs: bool = False
    # A calibration worker failed in this run (the daemon counts such runs in a row, see
    # ``run_group``'s ``wait_for_calibration_workers``).
    calibration_worker_failed: bool = False
    # The run merged (its merge worker ran), whatever came of it: not a kept merge published
    # again, nor a run that ended before merging. Only these are timed as merges.
    merged: bool = False


def destinations_key(group: GroupConfig) -> str:
    """What a succeeded run records of the destinations it published to: a destination added
    or moved since then must get the merge (a run of unchanged inputs skipped it for ever)."""
    return hashlib.sha256(json.dumps(group.destinations, sort_keys=True, default=str).encode()).hexdigest()


def _last_decided(catalog: Catalog, group_id: int) -> MergeRun | None:
    """The last run that published, or was refused: its inputs need no new merge. None when
    a failed run since then published to some destinations (:class:`PartlyPublished`):
    they hold its merge and the others the one before, so nothing may be skipped."""
    with catalog.session(write=False) as session:
        last = session.scalar(select(MergeRun).where(MergeRun.group_id == group_id,
                                                     MergeRun.status.in_([RunStatus.succeeded, RunStatus.refused]))
                              .order_by(MergeRun.id.desc()).limit(1))
        failed = session.scalars(select(MergeRun.metrics).where(
            MergeRun.group_id == group_id, MergeRun.status == RunStatus.failed, MergeRun.may_have_published(),
            MergeRun.id > (last.id if last is not None else 0))).all()
        return None if any((metrics or {}).get("published") for metrics in failed) else last


def published_copy(work_dir: Path, group_id: int) -> Path:
    """Where a group's last published adapter is kept, as the quality gate's baseline."""
    return work_dir / "published" / f"group-{group_id}"


def unpublished_copy(work_dir: Path, group_id: int) -> Path:
    """Where a group's last merge is kept when its publishing failed, to be published again."""
    return work_dir / "unpublished" / f"group-{group_id}"


# How long the kept copies of a group outlive its absence from the config.
KEEP_DROPPED_SECONDS = 7 * 86400


def discard_copies(work_dir: Path, keep: Collection[int], now: float | None = None) -> list[int]:
    """Remove the kept copies (published baselines, unpublished merges, with their files
    beside them) of every group but those of ``keep`` once it has been gone for
    ``KEEP_DROPPED_SECONDS``, and return those groups' ids: a group renamed or dropped from the
    config kept a whole merged adapter in the state folder for ever. Not at once: a group
    commented out for one reload (or a config caught empty mid-save) came back without its
    baseline, and the quality gate let a worse merge through."""
    now = time.time() if now is None else now
    gone: set[int] = set()
    for copy_of in (published_copy, unpublished_copy):
        folder = copy_of(work_dir, 0).parent
        names = [item.name for item in folder.iterdir()] if folder.is_dir() else []
        ids = {int(match[1]) for name in names if (match := re.fullmatch(r"group-(\d+)(?:\.\w+)?", name))}
        for group_id in ids:  # a copy and the files beside it, once
            copy = copy_of(work_dir, group_id)
            if group_id in keep:
                _copy_dropped(copy).unlink(missing_ok=True)
            elif not _copy_dropped(copy).exists():
                _copy_dropped(copy).touch()
            elif now - _copy_dropped(copy).stat().st_mtime >= KEEP_DROPPED_SECONDS:
                _discard(copy)
                gone.add(group_id)
    return sorted(gone)


def _copy_run(copy: Path) -> Path:
    """The file beside a kept copy naming the run it is."""
    return copy.with_name(f"{copy.name}.run")


def _copy_files(copy: Path) -> Path:
    """The file beside a kept unpublished merge recording its files' sha256s."""
    return copy.with_name(f"{copy.name}.sha256")


def _copy_dropped(copy: Path) -> Path:
    """The file beside a kept copy of a group the config no longer has, made when it went."""
    return copy.with_name(f"{copy.name}.dropped")


def _copy_forced(copy: Path) -> Path:
    """The file beside a kept unpublished merge saying it was forced past the quality gate:
    the run that publishes it again judges it as forced too (else it refuses it again)."""
    return copy.with_name(f"{copy.name}.forced")


def _file_hashes(folder: Path) -> dict[str, str]:
    """The sha256 of each file in ``folder`` by its path there (a merge's folder is flat; what
    a publisher might add under it is not)."""
    return {item.relative_to(folder).as_posix(): sha256_file(item) for item in sorted(folder.rglob("*"))
            if item.is_file()}


def _keep_published(folder: Path, target: Path, run_id: int) -> None:
    """Keep ``folder`` at ``target`` (the group's baseline, or its unpublished merge), as
    ``run_id``'s; an interrupted swap only loses the copy (the run file, written after,
    then names the copy before)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    replace_folder(folder, target)
    _copy_run(target).write_text(f"{run_id}\n")


def _discard(copy: Path) -> None:
    """Remove a kept copy, its run file and its files' hashes."""
    _forget(copy)  # first: a run file never names a half-deleted copy
    shutil.rmtree(copy, ignore_errors=True)


def _forget(copy: Path) -> None:
    """Remove the run file and the files' hashes beside a kept copy: it is kept no more."""
    _copy_run(copy).unlink(missing_ok=True)
    _copy_files(copy).unlink(missing_ok=True)
    _copy_forced(copy).unlink(missing_ok=True)
    _copy_dropped(copy).unlink(missing_ok=True)


def _unpublished_merge(catalog: Catalog, group_id: int, copy: Path, fingerprint: str,
                       last: MergeRun | None) -> tuple[int, dict[str, Any], bool] | None:
    """The kept merge whose publishing failed, as (its run, its report, whether it was forced
    past the quality gate), when it is the
    merge of these inputs (``fingerprint``) and no run was decided since (``last``: one
    that published or was refused); else None, and the group merges anew. A copy whose
    files are not those kept (a file damaged, deleted or added since) is discarded: it
    would publish a broken adapter, or fail to publish for ever."""
    try:
        kept = int(_copy_run(copy).read_text())
        report = safe_json.loads((copy / REPORT_NAME).read_bytes())
    except (OSError, ValueError):  # none kept (FileNotFoundError), or a copy cut short
        return None
    with catalog.session(write=False) as session:
        run = session.get(MergeRun, kept)
        usable = (run is not None and run.group_id == group_id and run.status is RunStatus.failed
                  and run.input_fingerprint == fingerprint and (last is None or last.id < kept))
    if not (usable and isinstance(report, dict)):
        return None
    try:
        intact = safe_json.loads(_copy_files(copy).read_bytes()) == _file_hashes(copy)
    except (OSError, ValueError):  # no hashes kept (an older version's copy), or unreadable
        intact = False
    if not intact:
        log.warning("the merge of run %d kept in %s to be published again is not as it was kept (a file damaged, "
                    "missing or added); discarded, the group merges anew", kept, copy)
        _discard(copy)
        return None
    return kept, report, _copy_forced(copy).exists()


def _keep_unpublished(group: str, merged: Path, unpublished: Path, run_id: int, forced: bool) -> Path:
    """Keep a merge before publishing it, with its files' hashes and whether it was forced,
    and return where it is now: when its publishing fails, or the daemon is killed meanwhile
    (the run then marked failed at the next start or claim), the next run publishes it
    instead of merging again."""
    try:
        unpublished.parent.mkdir(parents=True, exist_ok=True)
        _copy_files(unpublished).write_text(json.dumps(_file_hashes(merged)))
        if forced:
            _copy_forced(unpublished).write_text(f"{run_id}\n")
        replace_folder(merged, unpublished)
        _copy_run(unpublished).write_text(f"{run_id}\n")
    except OSError as exc:  # e.g. the state disk full: a failed publish merges again
        log.warning("group %s: run %d: cannot keep the merge to publish it again (%s); if publishing fails the "
                    "next run merges again", group, run_id, exc)
        where = merged if merged.exists() else unpublished
        _forget(unpublished)
        return where
    return unpublished


def gate_baseline(catalog: Catalog, group_id: int, copy: Path) -> tuple[Path | None, str | None]:
    """The quality gate's baseline: this daemon's copy of the group's last merge published
    everywhere, when it is that merge; else None and why. Another daemon on the catalog
    may have published since (its copy is in its own state folder), or the state was lost:
    a copy of an older merge is no baseline (the gate would compare with the wrong merge).
    A copy kept before copies named their run (an upgrade) is taken as it was."""
    with catalog.session(write=False) as session:
        last = session.scalar(select(MergeRun.id).where(MergeRun.group_id == group_id,
                                                        MergeRun.status == RunStatus.succeeded)
                              .order_by(MergeRun.id.desc()).limit(1))
    if last is None:
        return None, None
    try:
        kept = int(_copy_run(copy).read_text())
    except FileNotFoundError:
        kept = last  # kept by an older version
    except (OSError, ValueError):
        kept = None
    if kept == last and copy.is_dir():
        return copy, None
    return None, (f"the last published merge, run {last}, is not in this daemon's state folder (another daemon on "
                  "the catalog published it, or the state folder was lost)")


def run_group(
    catalog: Catalog,
    group: GroupConfig,
    work_dir: Path,
    holder: str,
    claim_ttl: float = 120.0,
    should_stop: Callable[[], bool] = lambda: False,
    force: bool = False,
    device: str = "cpu",
    trust_remote_code: bool = False,
    on_status: Callable[[str], None] = lambda text: None,
    limits: Limits = Limits(),
    worker: WorkerOptions = WorkerOptions(),
    on_worker_failure: Callable[[str], None] = lambda kind: None,
    stopping: threading.Event | None = None,
    cache_dir: Path | None = None,
    wait_for_calibration_workers: bool = True,
) -> RunOutcome:
    """Run ``group`` once (see the module docstring). Never raises for a failed merge or
    publish: the outcome and the run row say what happened. ``stopping`` (the daemon's
    stop event) is handed to publishers, whose retry waits end when it is set;
    ``cache_dir`` (the daemon's) to calibration sources that download. An adapter whose
    calibration worker failed makes the run wait for it (the host short of memory for a
    while, say) unless not ``wait_for_calibration_workers`` (the daemon, after such runs in
    a row) or the run is forced: then it is held back and the others merge."""
    claim = Claim(catalog, group.name, holder, claim_ttl)
    if not claim.acquire():
        log.info("group %s: another daemon is merging it; skipped", group.name)
        return RunOutcome(RunStatus.skipped, None, CLAIMED_ELSEWHERE)
    work_dir.mkdir(parents=True, exist_ok=True)
    snapshots = Path(tempfile.mkdtemp(prefix=INPUTS_PREFIX, dir=work_dir))

    def stop() -> bool:  # a run whose claim another daemon took stops: it would only publish an older merge
        return should_stop() or claim.lost is not None

    try:
        return _run_claimed(catalog, group, claim, work_dir, snapshots, stop, force, device, trust_remote_code,
                            on_status, limits, worker, on_worker_failure, stopping, cache_dir,
                            wait_for_calibration_workers)
    finally:
        shutil.rmtree(snapshots, ignore_errors=True)
        claim.release()


def _run_claimed(catalog: Catalog, group: GroupConfig, claim: Claim, work_dir: Path, snapshots: Path,
                 should_stop: Callable[[], bool], force: bool, device: str, trust_remote_code: bool,
                 on_status: Callable[[str], None], limits: Limits, worker: WorkerOptions,
                 on_worker_failure: Callable[[str], None], stopping: threading.Event | None,
                 cache_dir: Path | None, wait_for_calibration_workers: bool) -> RunOutcome:
    """The run itself, once ``run_group`` holds the group's ``claim``: gather the inputs into
    ``snapshots``, skip or merge (or reuse a kept merge), judge, publish, record; ``claim.lost``
    names why a run stopped when another daemon took the claim."""
    with catalog.session() as session:
        group_row = session.scalar(select(MergeGroup).where(MergeGroup.name == group.name))
        group_id = group_row.id
        force = force or group_row.force_requested
        group_row.requested_at, group_row.force_requested = None, False
    strategy = get_strategy(group.strategy)
    samples = engine_int(parse_params(strategy, by_adapter_name(strategy, group.params, None)), "samples_per_task")
    on_status(f"group {group.name}: gathering inputs")

    def in_worker(job: dict[str, Any], label: str) -> Any:
        try:
            answers = run_in_worker(job, snapshots / "calibration-worker", f"group {group.name}: {label}",
                                    should_stop, worker)
        except WorkerFailed as exc:  # counted like a merge worker's death; the adapters wait for the next run
            on_worker_failure(exc.kind)
            raise
        if any(answer and answer.get("out_of_memory") for answer in answers):  # as if it had died of it (_answer)
            on_worker_failure("memory")
        return answers

    try:
        inputs = gather_inputs(catalog, group, strategy.needs_calibration, samples, snapshots, limits, in_worker,
                               should_stop, cache_dir=cache_dir,
                               wait_for_dead_workers=wait_for_calibration_workers and not force,
                               published=published_copy(work_dir, group_id))
    except MergeCancelled as exc:
        reason = str(claim.lost or exc)
        log.warning("group %s: cancelled while gathering inputs: %s", group.name, reason)
        return RunOutcome(RunStatus.cancelled, None, reason)

    def outcome(status: RunStatus, run_id: int | None, detail: str = "", **more) -> RunOutcome:
        return RunOutcome(status, run_id, detail, retry_inputs=inputs.unreachable,
                          calibration_worker_failed=inputs.worker_failed, **more)

    params = run_params(group, strategy, inputs.names())
    fingerprint = inputs.fingerprint(group.strategy, params, group.precision())
    for name, reason in inputs.held_back.items():
        log.warning("group %s: adapter %s held back: %s", group.name, name, reason)
    last = _last_decided(catalog, group_id)
    unpublished = unpublished_copy(work_dir, group_id)
    kept = None if force else _unpublished_merge(catalog, group_id, unpublished, fingerprint, last)
    # A kept merge of these inputs is published, even when they were refused before (it was forced past)
    skip = _skip_reason(catalog, group, inputs, fingerprint, last, _served_before(catalog, last),
                        force or kept is not None)
    if skip:
        log.info("group %s: skipped: %s", group.name, skip)
        run_id = _record_skip(catalog, group_id, fingerprint, inputs, skip)
        return outcome(RunStatus.skipped, run_id, skip)

    run_id = _record_start(catalog, group_id, fingerprint, inputs)
    out = work_dir / f"run-{run_id}"
    merged = out if kept is None else unpublished
    if kept is None:
        merging = counted(len(inputs.revisions), "adapter")
        log.info("group %s: run %d merges %s with %s", group.name, run_id, merging, group.strategy)
        on_status(f"group {group.name}: run {run_id} merging {merging}")
    else:
        log.info("group %s: run %d publishes the merge of run %d again (its publishing failed; the inputs are the "
                 "same)", group.name, run_id, kept[0])
    copy = published_copy(work_dir, group_id)
    baseline, no_baseline = gate_baseline(catalog, group_id, copy) if group.gates.max_regression is not None else (None, None)
    started = time.perf_counter()
    publish_failed = False
    try:
        if kept is None:
            _discard(unpublished)  # an older merge, of other inputs: this one supersedes it
            report = merge_in_worker(group, params, inputs, out, baseline, snapshots / "worker",
                                     f"group {group.name} run {run_id}", should_stop, device, trust_remote_code, worker)
        else:
            report = kept[1]
        merged_at = time.perf_counter()
        verdict = judge(report, group.gates, forced=force or (kept is not None and kept[2]), no_baseline=no_baseline)
        for note in verdict.notes:
            log.warning("group %s: run %d: %s", group.name, run_id, note)
        if verdict.refused:
            _finish(catalog, run_id, RunStatus.refused, error=f"not published: {verdict.refused}",
                    metrics={"tasks": report.get("tasks", {}), **inputs.recorded()})
            log.warning("group %s: run %d not published: %s", group.name, run_id, verdict.refused)
            return outcome(RunStatus.refused, run_id, verdict.refused, merged=kept is None)
        on_status(f"group {group.name}: run {run_id} publishing")
        if kept is None:  # else it stays kept, as the merge of the run that made it
            merged = _keep_unpublished(group.name, merged, unpublished, run_id, force)
        claim.renew()  # a daemon that stalled past claim_ttl_seconds until here publishes nothing (ClaimLost)
        try:
            published = publish_all(group, run_id, merged, report, inputs, stopping)
        except Exception:
            publish_failed = True
            raise
        _keep_published(merged, copy, run_id)
        _discard(unpublished)  # its run file, when it was published again
    except MergeCancelled as exc:
        reason = str(claim.lost or exc)
        _finish(catalog, run_id, RunStatus.cancelled, error=reason)
        log.warning("group %s: run %d cancelled: %s", group.name, run_id, reason)
        return outcome(RunStatus.cancelled, run_id, reason, merged=kept is None)
    except Exception as exc:  # a failed run is recorded, never fatal to the daemon
        message = f"{type(exc).__name__}: {first_line(exc)}" if not isinstance(exc, IterisError) else str(exc)
        if isinstance(exc, WorkerFailed):
            on_worker_failure(exc.kind)
        partly = {}  # where it did publish (the gate's baseline stays the last run that published everywhere)
        if isinstance(exc, PartlyPublished):
            partly = {"metrics": {"tasks": report.get("tasks", {}), **inputs.recorded(), "published": exc.published}}
        _finish(catalog, run_id, RunStatus.failed, error=message[:2000], **partly)
        log.error("group %s: run %d failed: %s", group.name, run_id, message)
        cause = exc.__cause__ if isinstance(exc, PartlyPublished) else exc
        return outcome(RunStatus.failed, run_id, message,
                          retry_publish=publish_failed and not isinstance(cause, PluginError), merged=kept is None)
    finally:  # a worker killed while it wrote the merge leaves its staging copy too
        for leftover in (out, *leftover_copies(out)):
            shutil.rmtree(leftover, ignore_errors=True)
    timings = {"merge_s": round(merged_at - started, 3), "publish_s": round(time.perf_counter() - merged_at, 3),
               **{k: v for k, v in report.get("metrics", {}).get("timings", {}).items()}}
    metrics = {"tasks": report.get("tasks", {}), "iterations_run": report.get("iterations_run"), **inputs.recorded(),
               "published": published, "destinations": destinations_key(group), "gate_notes": verdict.notes,
               **({"republished_from": kept[0]} if kept is not None else {})}
    first = published[0] if published else {}
    if not _finish(catalog, run_id, RunStatus.succeeded, timings=timings, metrics=metrics, output_location=first.get(
            "location"), output_commit=next((p["version"] for p in published if p["kind"] == "hub"), None)):
        lost = ("published while another daemon held the group (this one stalled for over claim_ttl_seconds while "
                "publishing): the destinations may serve this merge rather than that daemon's newer one, whose run the "
                "catalog records; `merge-now --force` the group publishes the newest merge again")
        log.error("group %s: run %d %s", group.name, run_id, lost)
        return outcome(RunStatus.failed, run_id, lost, merged=kept is None)
    log.info("group %s: run %d succeeded: %s", group.name, run_id,
             ", ".join(f"{p['kind']} {p['location']} {'-> ' + str(p['version']) if p['changed'] else 'unchanged'}" for p in published))
    return outcome(RunStatus.succeeded, run_id, merged=kept is None)


def _served_before(catalog: Catalog, last: MergeRun | None) -> MergeRun | None:
    """Where the last decided run was refused, the run whose merge the destinations still serve
    (the last that published before it)."""
    if last is None or last.status is not RunStatus.refused:
        return None
    with catalog.session(write=False) as session:
        return session.scalar(select(MergeRun).where(MergeRun.group_id == last.group_id, MergeRun.id < last.id,
                                                     MergeRun.status == RunStatus.succeeded)
                              .order_by(MergeRun.id.desc()).limit(1))


def _skip_reason(catalog: Catalog, group: GroupConfig, inputs: Inputs, fingerprint: str, last: MergeRun | None,
                 served: MergeRun | None, force: bool) -> str | None:
    """Why this run merges nothing, or None: inputs a source is still registering again, or
    whose calibration source could not be reached (publishing now would drop them from the
    merge), too few adapters, or, unless ``force`` (a forced run, or one publishing a kept
    merge of these inputs), the inputs of the
    last decided run (published or refused), or of the merge still served after a refusal
    (``served``: an adapter added, refused, then removed again), again."""
    if inputs.changing:
        return f"waiting for {', '.join(inputs.changing)}: {inputs.held_back[inputs.changing[0]]}"
    if len(inputs.revisions) < group.min_adapters:
        with catalog.session(write=False) as session:
            others = of_other_base_models(merge_candidates(session), group.base_model, group.select)
        return (f"{counted(len(inputs.revisions), 'adapter')} ready, the group needs {group.min_adapters}"
                + (f" ({others})" if others else ""))
    if not force and last is not None and last.input_fingerprint == fingerprint:
        if last.status is RunStatus.refused:
            return (f"inputs unchanged since run {last.id}, which was refused ({last.error}); merge-now --force "
                    "judges them again, under the gates now loaded")
        if (last.metrics or {}).get("destinations", destinations_key(group)) != destinations_key(group):
            log.info("group %s: its destinations changed since run %d: merging to publish to every one", group.name,
                     last.id)
        elif _still_served(group, last):
            return "inputs unchanged since the last successful run"
    if not force and served is not None and served.input_fingerprint == fingerprint and _still_served(group, served):
        return f"inputs unchanged since run {served.id}, whose merge is published (run {last.id}'s was refused)"
    return None


def _still_served(group: GroupConfig, run: MergeRun) -> bool:
    """Whether every destination still serves what ``run`` published to it (its destinations
    are the group's, in order), as the publishers that can tell say; a WARNING names those that
    no longer do, whose merge is then published again."""
    gone = []
    for destination, entry in zip(group.destinations, (run.metrics or {}).get("published") or []):
        publisher = get_publisher(destination["kind"])
        if not callable(getattr(publisher, "serves", None)) or not isinstance(entry, dict):
            continue
        try:
            if not publisher.serves(destination_settings(destination)[1], entry.get("version")):
                gone.append(f"{publisher.kind} {entry.get('location')}")
        except Exception as exc:  # a plugin's bug: the record of the last publish is trusted
            log.warning("publisher %s: serves() failed (%s); taking run %d's record of its publish", publisher.kind,
                        first_line(exc), run.id)
    if gone:
        log.warning("group %s: %s no longer serve%s what run %d published (removed by hand?): merging to publish it "
                    "again", group.name, ", ".join(gone), "s" if len(gone) == 1 else "", run.id)
    return not gone


def destination_settings(destination: dict[str, Any]) -> tuple[Any, Any]:
    """A group's destination table as its publisher and that publisher's validated settings."""
    publisher = get_publisher(destination["kind"])
    return publisher, publisher.Settings.model_validate({k: v for k, v in destination.items() if k != "kind"})


def origin(adapter: Adapter, revision: AdapterRevision) -> str | None:
    """Where an input came from, as its merge report names it: a folder source's folder; a Hub
    source's repo at the commit (``hf://REPO@SHA[/SUBFOLDER]``), not the daemon's cache folder
    of it, which the Hub's copy of the report could only name by the commit (``local:SHA``)."""
    if adapter.source.kind is SourceKind.hub:
        return RepoSpec.parse(adapter.locator).url(revision.revision)
    return revision.files_path


def merge_in_worker(group: GroupConfig, params: dict[str, Any], inputs: Inputs, out: Path, reference: Path | None,
                    folder: Path, label: str, should_stop: Callable[[], bool], device: str, trust_remote_code: bool,
                    options: WorkerOptions) -> dict[str, Any]:
    """Merge ``inputs`` into ``out`` with ``params`` (:func:`run_params`) in a worker process
    (see :mod:`iteris_daemon.supervisor`)."""
    job = {
        "request": {
            "base_model": group.base_model, "strategy": group.strategy, "params": params, "out": str(out),
            "device": device, "dtype": group.dtype, "output_dtype": group.output_dtype, "offload": group.offload,
            "exact_ranks": group.exact_ranks, "modules_to_save_rule": group.modules_to_save_rule,
            "trust_remote_code": trust_remote_code, "reference": str(reference) if reference else None,
            "adapters": [{"path": str(path), "name": name, "origin": origin(adapter, r)}
                         for (adapter, r), path, name in zip(inputs.revisions, inputs.folders, inputs.names())],
        },
        "calibration": [None if c is None else {"samples": [s.to_json() for s in c.samples], "source": c.source,
                                                "generated": c.generated} for c in inputs.calibration],
    }
    return run_in_worker(job, folder, label, should_stop, options)


def run_params(group: GroupConfig, strategy: MergeStrategy, names: list[str]) -> dict[str, Any]:
    """The group's parameters for a run of the adapters ``names``: each per-adapter table as
    the list in their order (:func:`~iteris_daemon.strategy.by_adapter_name`). A name the table
    gives that the run lacks (an adapter removed, held back, renamed) is logged."""
    params = by_adapter_name(strategy, group.params, names)
    for key in per_adapter_fields(strategy.Params):
        absent = [name for name in group.params.get(key) or {} if name not in names]
        if absent:
            log.info("group %s: %s names %s, not in this run", group.name, key, ", ".join(absent))
    return params


def publish_all(group: GroupConfig, run_id: int, folder: Path, report: dict, inputs: Inputs,
                stopping: threading.Event | None = None) -> list[dict]:
    """Every destination, in order; the first failure fails the run (published ones stay,
    and :class:`PartlyPublished` names them). Each publisher is handed the same folder: one
    that changed it fails the run, or the destinations after it (and the gate's baseline,
    kept from it) got what it left there, not the merge."""
    try:  # recorded when the merge was kept, and checked since: not hashed once more
        merge_files = safe_json.loads(_copy_files(folder).read_bytes())
    except (OSError, ValueError):
        merge_files = _file_hashes(folder)
    # The base model as the merged config names it: the Hub id its inputs share where the
    # group merges on a local copy (merge.merged_base), which the Hub card links to.
    named_base = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8")).get("base_model_name_or_path")
    request = PublishRequest(
        adapter_dir=folder, group=group.name, run_id=run_id, base_model=named_base or group.base_model,
        strategy=group.strategy, params=report.get("params", group.params),
        inputs=[PublishedInput(a.name, a.source.name, a.locator, r.revision, r.content_sha256) for a, r in inputs.revisions],
        metrics=report.get("tasks", {}), not_evaluated=report.get("not_evaluated", {}), dtype=report.get("dtype"),
        stopping=stopping,
    )
    published = []
    for number, destination in enumerate(group.destinations, start=1):
        publisher, settings = destination_settings(destination)
        where = f"publisher {publisher.kind} (destination {number} of {len(group.destinations)})"
        try:
            try:
                answer = publisher.publish(request, settings)
            except IterisError:
                raise
            except (Exception, SystemExit) as exc:
                raise _publish_failure(where, exc) from exc
            result = _checked_result(publisher.kind, answer)
            _check_left_as_handed(where, folder, merge_files)
        except Exception as exc:
            if published:
                raise PartlyPublished(published, publisher.kind, exc) from exc
            raise
        published.append({"kind": publisher.kind, "location": result.location, "version": result.version,
                          "changed": result.changed})
    return published


_PLUGIN_BUGS = (AttributeError, LookupError, NameError, TypeError, ValueError, ArithmeticError, AssertionError,
                ImportError, NotImplementedError, SystemExit)
"""What a mistake in a publisher's code raises (a KeyError, say), unlike a destination that
failed (OSError, HTTP and transport errors, timeouts): trying again would meet it again."""


def _publish_failure(where: str, exc: BaseException) -> IterisError:
    """A publisher's failure, naming it and its destination: a PluginError (not tried again,
    see ``RunOutcome.retry_publish``) where it is a bug, else a PublishFailed."""
    reason = f"{where} failed: {type(exc).__name__}: {first_line(exc)}"
    if isinstance(exc, _PLUGIN_BUGS):
        return PluginError(f"{reason} (a bug in the plugin: left to the group's schedule, not tried again)")
    return PublishFailed(reason)


def _check_left_as_handed(where: str, folder: Path, files: dict[str, str]) -> None:
    """The merge's folder after a publisher: as it was handed to it (``files``, their sha256s)."""
    now = _file_hashes(folder)
    if now != files:
        changed = sorted(name for name in files.keys() | now.keys() if files.get(name) != now.get(name))
        raise PluginError(f"{where} changed the merged adapter's folder it was handed ({', '.join(changed)}): a "
                          "publisher reads it and writes elsewhere; the destinations after it are not published")


def _checked_result(kind: str, result: Any) -> PublishResult:
    """A publisher's answer as the catalog stores it. A plugin that answered a Path, say,
    had published, then the run's record failed, and every retry published again."""
    if not (isinstance(result, PublishResult) and isinstance(result.location, str)
            and isinstance(result.version, (str, type(None))) and isinstance(result.changed, bool)):
        raise PluginError(f"publisher {kind} answered {result!r}, not a PublishResult of strings "
                           "(location, version) and a bool (changed); what it published is not recorded")
    return result


def _record_start(catalog: Catalog, group_id: int, fingerprint: str, inputs: Inputs) -> int:
    """Record a run that starts now (``running``); its outcome is written when it ends."""
    with catalog.session() as session:
        return _add_run(session, group_id, RunStatus.running, fingerprint, inputs, None, False).id


def _record_skip(catalog, group_id: int, fingerprint: str, inputs: Inputs, reason: str) -> int:
    """Record a skipped run. One that repeats the group's last run (skipped, same inputs,
    same reason) replaces it, counting both: ``repeats`` goes up, the catalog does not grow,
    and the new row's id still tells ``merge-now --wait`` that its request was handled."""
    with catalog.session() as session:
        last = session.scalar(select(MergeRun).where(MergeRun.group_id == group_id).order_by(MergeRun.id.desc()).limit(1))
        run = _add_run(session, group_id, RunStatus.skipped, fingerprint, inputs, reason, finished=True)
        if (last is not None and last.status is RunStatus.skipped and last.input_fingerprint == fingerprint
                and last.error == reason):
            run.repeats, run.started_at = last.repeats + 1, last.started_at
            session.delete(last)
        return run.id


def _add_run(session: Session, group_id: int, status: RunStatus, fingerprint: str, inputs: Inputs, error: str | None,
             finished: bool) -> MergeRun:
    """A run row; a ``finished`` one (a skip) starts and ends at one instant (the column's
    default, read at the flush, made a skip end before it started)."""
    now = utcnow()
    run = MergeRun(group_id=group_id, status=status, input_fingerprint=fingerprint, error=error,
                   started_at=now, finished_at=now if finished else None,
                   metrics=inputs.recorded())
    session.add(run)
    session.flush()
    for (adapter, revision), data in zip(inputs.revisions, inputs.calibration):
        session.add(MergeRunInput(run_id=run.id, revision_id=revision.id,
                                  calibration_source=data.source if data else None,
                                  calibration_sha256=data.fingerprint() if data else None))
    return run


def _finish(catalog, run_id: int, status: RunStatus, **values) -> bool:
    """End a run that is still ``running``; whether it was. A daemon that took the group's
    claim from this run's (stalled past ``claim_ttl_seconds``) marked it failed: that stays."""
    if values.get("error"):  # an error may quote a request's headers: the catalog is read by `status`
        values["error"] = redact(values["error"])
    with catalog.session() as session:
        return session.execute(update(MergeRun).where(MergeRun.id == run_id, MergeRun.status == RunStatus.running)
                               .values(status=status, finished_at=utcnow(), **values)).rowcount == 1


def recover_interrupted(catalog: Catalog) -> list[int]:
    """Runs left ``running`` by a daemon that died: mark them failed so the group runs again.
    (A run of a daemon on another host, or in another pid namespace, is marked when its
    stale claim is taken over.)"""
    recovered = []
    with catalog.session() as session:
        for run in session.scalars(select(MergeRun).where(MergeRun.status == RunStatus.running)):
            group = session.get(MergeGroup, run.group_id)
            if group.claimed_by is None or holder_is_dead(group.claimed_by):
                _interrupt(run, "interrupted: the daemon running it stopped; the group runs again")
                recovered.append(run.id)
    return recovered


def _fail_interrupted(session, group: str, reason: str) -> None:
    """Mark ``group``'s running runs failed: the claim was just taken, so none is live (its
    holder died, or the write that would have ended it failed)."""
    group_id = select(MergeGroup.id).where(MergeGroup.name == group).scalar_subquery()
    for run in session.scalars(select(MergeRun).where(MergeRun.group_id == group_id,
                                                      MergeRun.status == RunStatus.running)):
        log.warning("group %s: run %d %s", group, run.id, reason)
        _interrupt(run, reason)


def _interrupt(run: MergeRun, reason: str) -> None:
    run.status, run.finished_at, run.error = RunStatus.failed, utcnow(), reason
