"""Hub source: polls repos (an explicit list, or every adapter repo of a user/org)
through ``huggingface_hub``, and registers each new head commit.

Per repo and poll: one ``model_info`` (the head sha and the file listing). An
unchanged sha whose files are still in the cache costs nothing more (a stat each;
files gone, say an emptied cache, are downloaded again). For a new sha only the adapter files
(config, safetensors weights, and ``calibration.jsonl`` when present) are
downloaded, pinned to that sha, into the daemon's own cache, each stopped once past its
limit in ``[daemon.limits]`` whatever size the Hub claims, and checked against the
listing's hash (:mod:`iteris_daemon.hub_files`); then validated and
recorded like a local adapter, with the commit sha as its revision. A listing
that names a file outside the repo (``../``, absolute paths) is refused before
anything is downloaded. Transient failures are retried with backoff (see
:mod:`iteris_daemon.retry`); a repo that still fails marks the source unhealthy
and the rest of the poll goes on. Every request has a timeout (``timeout_seconds``, or the
client's ``HF_HUB_DOWNLOAD_TIMEOUT`` for a download where shorter), none is sent once the daemon
stops (:func:`iteris_daemon.retry.requests_bounded`), and the listing and ``model_info`` are
retried by the daemon alone, not by the client as well.

Polls of one repo take turns within a process (scheduled, a webhook's); the cache keeps
the commits registered adapters use now (each branch its own): a replaced or rejected
commit's files are deleted once recorded (a rejected verdict stands without them), and a
removed repo's once it is marked removed. Polls of other processes
take no turns: a poll whose files they removed mid-check retries at the next poll, and
a head read before theirs stays history (see ``Observation.seen_at``).

Stopping (the daemon's stop event): no request starts once it is set, a backoff
wait ends at once, and the poll ends where it is; it is recorded as interrupted
(the source's health), and nothing is marked removed or rejected for it.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
from contextlib import contextmanager, suppress
from pathlib import Path
from collections.abc import Callable, Collection, Iterator

from huggingface_hub import HfApi, ModelInfo, hf_hub_download
from huggingface_hub.hf_api import RepoSibling
from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError,
                                   RepositoryNotFoundError, RevisionNotFoundError)
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status, validate_repo_id
from pydantic import Field, SecretStr, field_validator, model_validator
from sqlalchemy import select

from ..catalog import Catalog
from ..catalog.db import DATABASE_FAILURES
from ..catalog.models import Adapter, AdapterRevision, AdapterStatus, Source, SourceKind, utcnow
from ..catalog.registry import (Observation, Prior, current_files_paths, current_revision, get_source, mark_removed,
                                prior, record, set_health)
from ..errors import AdapterError, ConfigError, first_line
from ..logs import Repeated
from ..hub_files import TooBig, bounded_progress, listed_hash, mismatch
from ..config import MAX_SECONDS, MIN_PERIOD, HubEndpoint, HubRetrySettings, ModelSetting, PathSetting
from ..adapter_config import CONFIG_NAME, PICKLED_NAMES, WEIGHTS_NAME, read_adapter_config
from ..retry import Interrupted, hub_failure, hub_retrying, is_transient, requests_bounded
from ..tokens import hub_token, plain
from ..validation import Limits, ShapeSource, validate_adapter, validation_context
from .local import CALIBRATION_NAME, ScanReport, catalog_refusal
from .repo_spec import RepoSpec

log = logging.getLogger(__name__)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
CACHE_FOLDER = "hub"  # Hub sources download under this folder of the daemon's cache directory
ERRORS_REPEATED_EVERY = 3600.0  # a failure each poll finds again is said again this often (with a count)
_repo_locks: dict[Path, threading.Lock] = {}
_repo_locks_guard = threading.Lock()


def repo_lock(folder: Path) -> threading.Lock:
    """The lock of one repo's cache folder, the same for every :class:`HubSource` of this
    process: a scheduled poll, a webhook's, a source's after a reload, another source of
    the same repo. Each drops commit folders it finds unused, and another poll may be
    downloading into one of them (``hub_dataset`` takes it for a dataset's folder too)."""
    with _repo_locks_guard:
        return _repo_locks.setdefault(folder, threading.Lock())


def checked_commit_sha(sha: object, where: str) -> str:
    """``sha``, a commit the Hub answered for ``where``, once it is 40 hex digits: it becomes
    a path component (a commit's cache folder; ``huggingface_hub``'s ``refs/<revision>``
    file when passed as a revision), and ``../`` or an absolute path wrote outside the cache."""
    if not isinstance(sha, str) or not _COMMIT_SHA.fullmatch(sha):
        raise HubAnswerError(f"{where}: the Hub answered a commit sha {str(sha)[:60]!r}, not 40 hex digits; "
                             "nothing downloaded")
    return sha


def bad_repo_id(repo_id: object) -> str | None:
    """Why ``repo_id`` (from the settings, or a Hub listing: untrusted) is not an
    ``OWNER/NAME`` the Hub accepts, or None. It becomes part of a cache path."""
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id):
        return "is not OWNER/NAME"
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        return str(exc).split(":")[0].lower()
    return None


class HubSettings(HubRetrySettings):
    """Settings of a Hub source (stored in the catalog as JSON; never the token itself)."""

    repos: list[str] = Field(default_factory=list, description="repos, OWNER/NAME[/SUBFOLDER][@BRANCH]; SUBFOLDER: "
                                                               "the adapter's folder, if not at the repo's top")
    author: str | None = Field(None, description="poll every adapter repo of this user or organisation")
    base_model: ModelSetting | None = Field(None, description="check adapters against this base model, which decides over "
                                             "the one an adapter names (an adapter of another model is rejected)")
    endpoint: HubEndpoint | None = Field(None, description="Hub URL (default: huggingface_hub's)")
    token_file: PathSetting | None = Field(None, description="file holding the token (default: the hf-token credential, else $HF_TOKEN)")
    interval_seconds: float = Field(300.0, ge=MIN_PERIOD, le=MAX_SECONDS, description="poll period")
    timeout_seconds: float = Field(
        20.0, gt=0, le=MAX_SECONDS, description="each Hub request (connect, and each read) is given up after this "
                                                "long; bounds how long a stop waits for a hanging request")

    @field_validator("repos")
    @classmethod
    def _repo_ids(cls, repos: list[str]) -> list[str]:
        named: dict[tuple, str] = {}
        for spec in repos:
            parsed = RepoSpec.parse(spec)  # "acme/x/ckpt/" is "acme/x/ckpt"
            problem = parsed.problem()
            if problem:
                raise ValueError(f"{spec!r} {problem}")
            if parsed.key in named:  # merged twice, it would count double
                raise ValueError(f"{spec!r} names the adapter {named[parsed.key]!r} names too")
            named[parsed.key] = spec
        return [RepoSpec.parse(spec).locator for spec in repos]

    @field_validator("author")
    @classmethod
    def _author_name(cls, author: str | None) -> str | None:
        """A user or organisation name: anything else listed nothing, for ever."""
        if author is not None and ("/" in author or bad_repo_id(f"{author}/x")):
            raise ValueError(f"{author!r} is not a Hub user or organisation name")
        return author

    @model_validator(mode="after")
    def _something_to_poll(self) -> HubSettings:
        if not self.repos and not self.author:
            raise ValueError("give repos or an author to poll")
        return self

    def token(self) -> SecretStr | None:
        return hub_token(self.token_file)

    def watches(self, endpoint: str | None, repo_id: str, branch: str) -> bool:
        """Whether this source's polls see commits to ``repo_id``'s ``branch`` on ``endpoint``:
        the repo (or a subfolder of it) is listed at that branch (main when none is given), or belongs to the
        author, whose repos are polled on their main branch. Repo ids ignore case, as the Hub does."""
        if _endpoint(self.endpoint) != _endpoint(endpoint):
            return False
        target = (repo_id.casefold(), branch)
        listed = {(spec.repo_id.casefold(), spec.branch or "main") for spec in map(RepoSpec.parse, self.repos)}
        owner = repo_id.partition("/")[0].casefold()
        return target in listed or (self.author is not None and owner == self.author.casefold() and branch == "main")


def _endpoint(endpoint: str | None) -> str:
    """One spelling of a Hub URL: the client's default when none is given, no trailing slash."""
    from huggingface_hub import constants

    return (endpoint or constants.ENDPOINT).rstrip("/")


def same_branch(a: tuple[str | None, str, str], b: tuple[str | None, str, str]) -> bool:
    """Whether two (endpoint, repo id, branch) name one branch: the default endpoint spelled
    out or not, repo ids in any case (the Hub ignores it)."""
    return _endpoint(a[0]) == _endpoint(b[0]) and a[1].casefold() == b[1].casefold() and a[2] == b[2]


def unsafe_path(name: str) -> bool:
    """A repo file name that could land outside the download folder, or that no repo can hold."""
    if not name or name.startswith(("/", "\\")) or "\\" in name or re.match(r"^[A-Za-z]:", name):
        return True
    if any(ord(c) < 32 for c in name):
        return True
    try:
        name.encode("utf-8")  # a lone surrogate (JSON may escape one) names no file a repo holds
    except UnicodeEncodeError:
        return True
    return any(part in ("", ".", "..") for part in name.split("/"))


class HubSource:
    """Keeps the catalog in step with the head commits of the source's Hub repos."""

    def __init__(self, catalog: Catalog, source_name: str, cache_dir: Path, limits: Limits = Limits(),
                 on_change: Callable[[ScanReport], None] | None = None, trusted_models: Collection[str] = (),
                 shapes: ShapeSource | None = None, stopping: threading.Event | None = None, rejudge: bool = True):
        self.catalog = catalog
        self.on_change = on_change  # called after a poll that registered or removed something
        self.name = source_name
        with catalog.session() as session:
            source = get_source(session, source_name)
            self.source_id, self.settings = source.id, HubSettings.model_validate(source.settings)
        self.specs = [RepoSpec.parse(spec) for spec in self.settings.repos]  # what the settings name, parsed once
        self.cache_dir = Path(cache_dir).resolve()
        self.limits = limits
        self.trusted_models = frozenset(trusted_models)  # base models whose own code may run (config: daemon.trust_remote_code)
        self.shapes = shapes  # the base model's layer shapes (default: computed in this process)
        self.context = validation_context(limits, self.settings.base_model, self.trusted_models)
        self.rejudge = rejudge  # judge recorded verdicts again if reached under other settings (the daemon's own)
        self.stopping = stopping  # the daemon's stop event: set, a poll ends where it is
        self._polls = 0  # polls under way (a scheduled one and a webhook's may overlap)
        self._polls_lock = threading.Lock()
        self._errors = Repeated(log, ERRORS_REPEATED_EVERY)  # a repo failing at every poll: said once an hour

    @property
    def busy(self) -> bool:
        """A poll is under way: the catalog may hold part of it."""
        return self._polls > 0

    def _stopping(self) -> bool:
        return self.stopping is not None and self.stopping.is_set()

    def _retrying(self, what: str):
        s = self.settings
        return hub_retrying(f"source {self.name}: {what}", s.retry_attempts, s.retry_base_seconds, s.retry_cap_seconds,
                            stopping=self.stopping)

    def poll(self) -> ScanReport:
        """One pass over the repos; the source's health records how it went."""
        return self._poll(self._targets, only=None)

    def watches(self, repo_id: str) -> bool:
        """Whether ``repo_id`` is one of this source's repos (listed, or of its author)."""
        return (any(spec.repo_id.casefold() == repo_id.casefold() for spec in self.specs)  # the Hub ignores case
                or self._authors(repo_id))

    def poll_repo(self, repo_id: str) -> ScanReport:
        """Poll one repo now (a webhook said it changed): each of its branches and subfolders
        the settings name; the other repos wait for the next poll."""
        targets = [(spec, False, None) for spec in self.specs if spec.repo_id.casefold() == repo_id.casefold()]
        if self._authors(repo_id) and RepoSpec(repo_id).key not in {spec.key for spec in self.specs}:
            targets.append((RepoSpec(repo_id), True, None))  # its main branch too, as the author's
        return self._poll(lambda api, errors: targets, only={spec.locator for spec, *_ in targets})

    def _authors(self, repo_id: str) -> bool:
        """Whether ``repo_id`` is of the source's author, as the Hub spells it (the listing's
        spelling names the adapter: another would record it twice)."""
        return self.settings.author is not None and repo_id.partition("/")[0] == self.settings.author

    def _poll(self, find_targets, only: set[str] | None) -> ScanReport:
        """Poll what ``find_targets`` names; only the locators in ``only`` (None: all) may be
        marked removed, and a partial poll sets the source's health only when it fails."""
        with self._polls_lock:
            self._polls += 1
        try:
            with requests_bounded(self.settings.timeout_seconds, self._stopping):
                return self._poll_counted(find_targets, only)
        finally:
            with self._polls_lock:
                self._polls -= 1

    def _poll_counted(self, find_targets, only: set[str] | None) -> ScanReport:
        report = ScanReport()
        try:
            token = self.settings.token()
        except ConfigError as exc:  # unreadable, or open to other users: no poll, and the source says why
            self._set_health(str(exc))
            self._error(str(exc))
            return report
        api = HfApi(endpoint=self.settings.endpoint, token=plain(token))
        errors: list[str] = []
        what = "poll" if only is None else f"poll of {', '.join(sorted(only))}"
        try:
            targets = find_targets(api, errors)
        except Exception as exc:  # the listing itself failed: nothing else to do this round
            if self._stopping():
                return self._interrupted(what, report, errors)
            self._set_health(describe_hub_error(exc, "listing repos"))
            self._error(describe_hub_error(exc, "listing repos"))
            return report
        seen: set[str] = set()
        for spec, listed, head in targets:
            if self._stopping():
                return self._interrupted(what, report, errors)
            locator = spec.locator
            try:
                if self._poll_repo(api, token, spec, listed, head, report):
                    seen.add(locator)
                elif locator in self.settings.repos:  # named in the config, so expected to be there
                    errors.append(f"{locator}: no such repo or branch, or this source's token cannot read it")
                    self._error(errors[-1])
            except Exception as exc:
                if self._stopping():  # given up because the daemon stops: no verdict on this repo
                    return self._interrupted(what, report, errors)
                message = (catalog_refusal(self.catalog, exc) if isinstance(exc, DATABASE_FAILURES)
                           else describe_hub_error(exc, locator))
                errors.append(message)
                seen.add(locator)  # a failing repo is not a removed one
                self._error(message)
        self._mark_removed(seen, report, only)
        if only is None:  # a failure this whole poll did not find again is said at once when it comes back
            self._errors.keep_only({self._said(message) for message in errors})
        if only is None or errors:
            self._set_health(errors[0] if errors else None)
        # a scheduled poll that found nothing new at DEBUG: every 5 minutes, per source, for months
        quiet = only is None and not (report.registered or report.rejected or report.removed or report.waiting or errors)
        log.log(logging.DEBUG if quiet else logging.INFO, "source %s: %s: %s%s", self.name, what, report,
                f", {len(errors)} failed" if errors else "")
        if self.on_change and report.changed:
            self.on_change(report)
        return report

    def _said(self, message: str) -> str:
        return f"source {self.name}: {message}"

    def _error(self, message: str) -> None:
        """An ERROR, said once an hour while each poll finds it (see :class:`~iteris_daemon.logs.Repeated`);
        the source's health, in `status` and /metrics, says it all along."""
        self._errors.say(logging.ERROR, self._said(message))

    def _interrupted(self, what: str, report: ScanReport, errors: list[str]) -> ScanReport:
        """The daemon stops mid-poll: the repos not polled are not removed, and the source
        records that its poll did not finish (with the first error, if any)."""
        message = f"{what} interrupted: the daemon is stopping" + (f" (before that, {errors[0]})" if errors else "")
        self._set_health(message[:500])
        log.warning("source %s: %s; so far %s", self.name, message, report)
        return report

    def _list_models(self, api: HfApi) -> list[ModelInfo]:
        """The author's repos with their file listings and head shas, as ``api.list_models(author=...,
        expand=["siblings", "sha"])``
        lists them, but with a timeout on each page and no retries of the client's own (it
        retries listings itself, with waits no stop can end): the caller's policy retries."""
        url: str | None = f"{api.endpoint}/api/models"
        params: dict | None = {"author": self.settings.author, "expand": ["siblings", "sha"]}
        headers = build_hf_headers(token=api.token)
        models = []
        while url is not None:
            if self._stopping():
                raise Interrupted(f"listing {self.settings.author}: the daemon is stopping")
            response = get_session().get(url, params=params, headers=headers, timeout=self.settings.timeout_seconds)
            hf_raise_for_status(response)
            models += [ModelInfo(**{"siblings": None, **item}) for item in response.json()]
            url, params = response.links.get("next", {}).get("url"), None  # the next link holds the query
        return models

    def _targets(self, api: HfApi, errors: list[str]) -> list[tuple[RepoSpec, bool, str | None]]:
        """(spec, listed, head) tuples, ``listed`` for a repo only the author's listing
        names, not the settings (it is skipped silently if it holds no adapter after all; a
        listed name that is no repo id is skipped with an error in ``errors``), ``head`` the
        listing's sha of its main branch (None: not listed). The listing's repos are read at
        their top only: an adapter in a subfolder is polled when the settings name it."""
        targets = [(spec, False, None) for spec in self.specs]
        if not self.settings.author:
            return targets
        named = {spec.key for spec in self.specs}  # a listed repo the settings name is polled as named
        models = self._retrying(f"list {self.settings.author}")(self._list_models, api)
        for model in models:
            names = {s.rfilename for s in model.siblings or []}
            if CONFIG_NAME in names and RepoSpec(model.id).key not in named:
                problem = bad_repo_id(model.id)
                if problem:
                    errors.append(f"the listing of {self.settings.author} names {str(model.id)[:100]!r}, which {problem}; skipped")
                    log.error("source %s: %s", self.name, errors[-1])
                    continue
                targets.append((RepoSpec(model.id), True, model.sha))
        return targets

    def _poll_repo(self, api, token, spec: RepoSpec, listed, head, report) -> bool:
        """Register the repo's head if new; False when the repo is gone (or not an adapter).
        Polls of one repo take turns (see :func:`repo_lock`): the later one reads the head
        after the earlier one has recorded what it saw."""
        folder = self._repo_folder(spec.repo_id)
        with repo_lock(folder):
            return self._poll_repo_locked(api, token, spec, listed, head, report, folder)

    def _poll_repo_locked(self, api, token, spec: RepoSpec, listed, head, report, folder: Path) -> bool:
        """``head``: the sha the author's listing gave; a head whose verdict stands costs no
        request more (one ``model_info`` per repo and poll made an unchanged organisation of
        N adapters N + 1 requests a poll)."""
        asked_at = utcnow()  # the head read below is at least this recent
        locator = spec.locator
        listed_sha = head if isinstance(head, str) and _COMMIT_SHA.fullmatch(head) else None
        with self.catalog.session() as session:  # also what was current before the head is read
            looked = prior(session, self.source_id, locator, listed_sha, self.context if self.rejudge else None,
                           _files_present)
        if looked.stands:
            report.unchanged += 1
            return True
        try:
            info = self._retrying(f"model_info {locator}")(api.model_info, spec.repo_id, revision=spec.branch,
                                                           files_metadata=True, timeout=self.settings.timeout_seconds)
        except GatedRepoError:  # there, but this source's token may not read it (yet): a failure, not a removal
            raise
        except (RepositoryNotFoundError, RevisionNotFoundError):
            return False
        sha = checked_commit_sha(info.sha, locator)  # it names the cache folder
        with self.catalog.session() as session:
            before = prior(session, self.source_id, locator, sha, self.context if self.rejudge else None, _files_present)
        if before.stands:
            report.unchanged += 1
            return True
        siblings = {s.rfilename: s for s in info.siblings or []}
        snapshot = folder / sha  # the commit's files, each adapter's in its own subfolder
        files = spec.files_in(snapshot)
        if self.cache_dir not in Path(os.path.realpath(files)).parents:  # cannot happen with all checked: a guard
            raise HubAnswerError(f"the cache folder of {locator} would lie outside the cache; nothing downloaded")
        if before.files_missing and before.files_path == str(files):  # what is left here may be stale: fetch anew
            _forget(snapshot, spec)
        reason_now, adapter_info = None, None
        try:
            adapter_info = self._fetch_and_validate(api, token, spec, sha, siblings, snapshot, listed, before)
        except _NotForUs as skip:
            log.debug("source %s: %s skipped: %s", self.name, locator, skip)
            return False
        except AdapterError as exc:
            reason_now = str(exc)
        if adapter_info and before.content_sha256 not in (None, adapter_info.content_sha256):
            raise HubAnswerError(f"{locator}@{sha[:12]}: downloaded again, its weights differ from those registered; "
                                 f"not recorded")
        seen = Observation(
            locator=locator, name=locator, revision=sha, files_path=str(files) if adapter_info else None,
            info=adapter_info, reason=reason_now, has_calibration=(files / CALIBRATION_NAME).is_file(),
            context=self.context, seen_at=asked_at, looked_over=looked.current_id,
        )
        with self.catalog.session() as session:
            revision, new = record(session, self.source_id, seen, rejudge=self.rejudge)
            status, reason = revision.status, revision.reason
            outdated = current_revision(session, revision.adapter) is not revision
        if outdated:  # another process polled the repo later and recorded a newer head meanwhile
            report.unchanged += 1
            log.info("source %s: %s@%s kept as history: a newer head was recorded meanwhile", self.name, locator, sha[:12])
            return True
        if before.files_missing and status is AdapterStatus.registered and not adapter_info:
            raise HubAnswerError(f"{locator}@{sha[:12]}: its files were gone; downloaded again, they fail: {reason_now}")
        drop_unused_commits(self.catalog, folder)
        if status is AdapterStatus.rejected:
            report.rejected.append(locator)
            if before.registered:
                report.withdrawn.append(locator)
            log.warning("source %s: rejected %s@%s: %s", self.name, locator, sha[:12], reason)
            return True
        if new:
            report.registered.append(locator)
            log.info("source %s: registered %s@%s (rank %d)", self.name, locator, sha[:12], revision.rank)
        elif before.files_missing:  # runs held it back meanwhile: they may take it again
            report.registered.append(locator)
            log.info("source %s: %s@%s downloaded again: its files were gone", self.name, locator, sha[:12])
        elif before.same_revision:  # judged again under other settings, and still valid
            report.unchanged += 1
            log.info("source %s: %s@%s is still valid under the current settings", self.name, locator, sha[:12])
        else:  # back after its removal, or an older commit restored
            report.registered.append(locator)
            log.info("source %s: %s is at %s again, already in the catalog", self.name, locator, sha[:12])
        return True

    def _fetch_and_validate(self, api, token, spec: RepoSpec, sha: str, siblings: dict[str, RepoSibling],
                            snapshot: Path, listed: bool, before: Prior):
        where = f"{spec.repo_id}@{sha[:12]}"
        bad = sorted(n for n in siblings if unsafe_path(n))
        if bad:
            raise AdapterError(where, f"the repo listing holds an unsafe file path {bad[0]!r}; nothing was downloaded")
        if spec.file(CONFIG_NAME) not in siblings:
            if listed:
                raise _NotForUs("no adapter_config.json")
            raise AdapterError(where, _no_config(spec, siblings))
        if spec.file(WEIGHTS_NAME) not in siblings:
            pickled = [spec.file(n) for n in PICKLED_NAMES if spec.file(n) in siblings]
            raise AdapterError(where, f"pickled weights ({pickled[0]}) are refused, never downloaded" if pickled
                               else f"no {spec.file(WEIGHTS_NAME)}")
        wanted_files = [CONFIG_NAME, WEIGHTS_NAME] + ([CALIBRATION_NAME] if spec.file(CALIBRATION_NAME) in siblings else [])
        for name in wanted_files:  # the listing's sizes are a first check only: each download is bounded too
            size, limit = siblings[spec.file(name)].size, self.limits.file_limit(name)
            if size is not None and size > limit:
                raise AdapterError(where, f"{spec.file(name)} is {size} bytes, {self.limits.file_above(name)}")
        files = spec.files_in(snapshot)
        fetched: list[str] = []
        with _own_files(files, fetched, where):
            self._download(token, spec.repo_id, sha, siblings[spec.file(CONFIG_NAME)], snapshot)
            fetched.append(CONFIG_NAME)
            config = read_adapter_config(files, self.limits.max_config_bytes)  # refused: no weights downloaded
            named, wanted = config.get("base_model_name_or_path"), self.settings.base_model
            if listed and _other_hub_model(named, wanted):  # no weights downloaded for an author's other models
                raise AdapterError(where, f"an adapter of {named}, not of this source's base model {wanted}")
            for name in wanted_files[1:]:
                sibling = siblings[spec.file(name)]
                if not (name == WEIGHTS_NAME and self._link_registered(before, sibling, files / name)):
                    self._download(token, spec.repo_id, sha, sibling, snapshot)
                fetched.append(name)
            # The source's base model decides, whatever base the adapter names (often a Hub id
            # for the source's local copy), as for a repo the settings name: one of another model is rejected.
            return validate_adapter(files, self.settings.base_model, self.limits, self.trusted_models, self.shapes)

    def _download(self, token, repo_id: str, sha: str, sibling: RepoSibling, snapshot: Path) -> Path:
        """One file, pinned to ``sha``, into the daemon's folder for that commit (written
        complete or not at all: the client downloads to a temporary file, then renames).
        The download stops once it passes the file's limit, whatever size the listing
        and the response headers claimed. Its content must be what the listing's hash
        says (the client checks only the size): a file that is not is removed, and the
        repo is tried again at the next poll, not judged on bytes the Hub did not list."""
        filename = sibling.rfilename
        where, limit = f"{repo_id}@{sha[:12]}", self.limits.file_limit(Path(filename).name)
        snapshot.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            path = self._retrying(f"download {repo_id}/{filename}")(
                hf_hub_download, repo_id, filename, revision=sha, local_dir=snapshot,
                endpoint=self.settings.endpoint, token=plain(token), tqdm_class=bounded_progress(limit),
                etag_timeout=self.settings.timeout_seconds,
            )
        except TooBig as exc:
            for partial in (snapshot / ".cache").rglob(f"{Path(filename).name}*.incomplete"):
                partial.unlink(missing_ok=True)
            raise AdapterError(where, f"{filename} is {exc.size}{'+' if exc.stopped else ''} bytes, "
                                      f"{self.limits.file_above(Path(filename).name)}"
                                      f"{'; the download was stopped' if exc.stopped else ''}") from None
        resolved = Path(path).resolve()
        if resolved != snapshot.resolve() / filename:
            raise AdapterError(where, f"download of {filename!r} landed outside its folder")
        size = resolved.stat().st_size  # e.g. already there from a poll under a higher limit
        if size > limit:
            raise AdapterError(where, f"{filename} is {size} bytes, {self.limits.file_above(Path(filename).name)}")
        problem = mismatch(sibling, resolved)
        if problem:
            resolved.unlink()
            raise HubAnswerError(f"{where}: {filename} as downloaded {problem}; removed, downloaded again at the next poll")
        return resolved

    def _link_registered(self, before: Prior, sibling: RepoSibling, target: Path) -> bool:
        """Hard-link the registered revision's weights to ``target`` instead of downloading
        them, where the listing says the new commit holds the same bytes (its LFS sha256 is the
        registered content's): a commit to another folder of the repo, or to its README. The
        registered file is hashed against the listing first, and only one in this source's
        cache is taken. Linked under a temporary name and renamed into place, never handed to
        the client, which may copy a file of its own cache into an existing one in place:
        through a link, into the registered commit's copy. False: download it."""
        listed = listed_hash(sibling)
        if before.registered_files_path is None or listed != ("sha256", before.registered_content_sha256):
            return False
        registered = Path(before.registered_files_path) / target.name
        with suppress(OSError):
            if (self.cache_dir in Path(os.path.realpath(registered)).parents and not os.path.lexists(target)
                    and registered.stat().st_size == sibling.size and mismatch(sibling, registered) is None):
                target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                partial = target.with_name(f".{target.name}.linking")
                partial.unlink(missing_ok=True)
                os.link(registered, partial)
                os.replace(partial, target)
                return True
        return False

    def _repo_folder(self, repo_id: str) -> Path:
        return self.cache_dir / repo_id.replace("/", "--")

    def _mark_removed(self, seen: set[str], report: ScanReport, only: set[str] | None = None) -> None:
        gone = lambda locator: locator not in seen and (only is None or locator in only)  # noqa: E731
        with self.catalog.session() as session:
            removed = [adapter.locator for adapter in mark_removed(session, self.source_id, gone)]
        for locator in removed:
            report.removed.append(locator)
            log.info("source %s: %s removed", self.name, locator)
        for repo_id in {RepoSpec.parse(locator).repo_id for locator in removed}:
            if bad_repo_id(repo_id):  # read from the catalog: never a path outside the cache
                continue
            folder = self._repo_folder(repo_id)
            with repo_lock(folder):
                drop_unused_commits(self.catalog, folder)

    def _set_health(self, error: str | None) -> None:
        with self.catalog.session() as session:
            set_health(session, self.source_id, error)


def drop_unused_commits(catalog: Catalog, folder: Path) -> int:
    """Keep the commits of a repo that runs may copy from: those a registered adapter's
    current revision names, at the top or in a subfolder (each branch of the repo has its
    own, another source of the repo its own too). A commit polled again is downloaded
    again. The repo's folder goes when no commit is left in it. Call it holding the
    folder's :func:`repo_lock`. Returns how many commit folders it deleted."""
    with catalog.session(write=False) as session:
        used = {folder / Path(path).relative_to(folder).parts[0]
                for path in current_files_paths(session, f"{folder}{os.sep}")
                if Path(path).is_relative_to(folder)}  # SQLite's LIKE ignores case: Acme--x's paths come too
    dropped = 0
    for other in folder.iterdir() if folder.is_dir() else ():
        if _COMMIT_SHA.fullmatch(other.name) and other not in used and other.is_dir() and not other.is_symlink():
            shutil.rmtree(other, ignore_errors=True)
            dropped += not os.path.lexists(other)
    with suppress(OSError):  # not empty (commits in use), or not there
        folder.rmdir()
    return dropped


def download_folders(session, source_name: str) -> set[Path]:
    """The cache folders of the repos Hub source ``source_name`` downloaded into (its
    revisions' files lie in ``<cache>/hub/<repo>/<commit>``): what ``sources remove`` hands
    to :func:`drop_unused_commits` once the source is gone, as no poll visits them again."""
    query = (select(AdapterRevision.files_path).join(Adapter).join(Source)
             .where(Source.name == source_name, Source.kind == SourceKind.hub, AdapterRevision.files_path.is_not(None)))
    commits = [_commit_folder(Path(path)) for path in session.scalars(query)]
    return {commit.parent for commit in commits if commit is not None}


def _commit_folder(files: Path) -> Path | None:
    """The commit folder (``<cache>/hub/<repo>/<commit>``) that holds an adapter's files,
    at its top or in a subfolder; None for a folder the catalog names elsewhere (never
    one outside a cache: `sources remove` deletes what this names)."""
    for folder in reversed((files, *files.parents)):  # from the top: a subfolder may be named like a commit
        if _COMMIT_SHA.fullmatch(folder.name) and folder.parent.parent.name == CACHE_FOLDER:
            return folder
    return None


def _forget(snapshot: Path, spec: RepoSpec) -> None:
    """Delete one adapter's files from a commit's folder, with the client's record of each
    download (it takes a file it recorded as current whatever its bytes), so that the next
    download fetches them anew. The other adapters of the commit, in its subfolders or
    above, keep theirs: runs may be copying them."""
    for name in (CONFIG_NAME, WEIGHTS_NAME, CALIBRATION_NAME):
        path = spec.file(name)
        (snapshot / path).unlink(missing_ok=True)
        (snapshot / ".cache" / "huggingface" / "download" / f"{path}.metadata").unlink(missing_ok=True)


def _no_config(spec: RepoSpec, siblings: Collection[str]) -> str:
    """Why a repo the settings name holds no adapter where they say, and where adapters are."""
    wanted = spec.file(CONFIG_NAME)
    if spec.subfolder:
        return f"no {wanted} in the repo (not a PEFT adapter's folder)"
    nested = sorted(n for n in siblings if n.endswith(f"/{CONFIG_NAME}"))
    if not nested:
        return f"no {CONFIG_NAME} at the top of the repo (not a PEFT adapter repo)"
    folder = nested[0].removesuffix(f"/{CONFIG_NAME}")
    if "@" in folder:  # the spec's "@" starts its branch
        return (f"no {CONFIG_NAME} at the top of the repo; {nested[0]} is an adapter in a subfolder whose name "
                "holds '@', which a source's repos cannot name")
    return (f"no {CONFIG_NAME} at the top of the repo; {nested[0]} is an adapter in a subfolder: name it in the "
            f"source's repos as {RepoSpec(spec.repo_id, folder, spec.branch).locator}")


class HubAnswerError(Exception):
    """The Hub answered something no real Hub sends (e.g. a commit sha that is not 40 hex digits)."""


class SnapshotVanished(Exception):
    """Files this poll downloaded were removed while it checked them (by a poll of another
    process): no verdict on the commit, which the next poll fetches again."""


def _other_hub_model(named: object, wanted: str | None) -> bool:
    """Whether an adapter naming ``named`` is plainly of another model than ``wanted``: both
    Hub ids (a local path, stored absolute, is no Hub id) that differ, case aside as on the
    Hub. Another spelling of the same model (a Hub id for a local copy) is judged on its
    shapes instead, which needs its weights."""
    return (isinstance(named, str) and isinstance(wanted, str) and not named.startswith(("/", "."))
            and not wanted.startswith("/") and named.lower() != wanted.lower())


class _NotForUs(Exception):
    """A repo of the author's listing that holds no adapter after all."""


def describe_hub_error(exc: BaseException, what: str) -> str:
    """One line for logs and the catalog; built from status codes, never from headers (tokens)."""
    exc = hub_failure(exc)
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        detail = f"HTTP {exc.response.status_code}"
    else:
        detail = type(exc).__name__
    transient = " (gave up after retries)" if is_transient(exc) else ""
    text = first_line(exc)
    return f"{what}: {detail}{transient}{': ' + text if text and detail not in text else ''}"[:500]


@contextmanager
def _own_files(snapshot: Path, fetched: list[str], where: str) -> Iterator[None]:
    """Turn a failure to read the files this poll downloaded (``fetched``, as they come)
    into :class:`SnapshotVanished` when one is gone, or the folder went mid-download:
    that says nothing about the adapter."""
    try:
        yield
    except (AdapterError, FileNotFoundError) as exc:
        if isinstance(exc, LocalEntryNotFoundError):  # the Hub failed a file's HEAD: not a vanished file
            raise
        gone = [name for name in fetched if not (snapshot / name).is_file()]
        if isinstance(exc, AdapterError) and not gone:
            raise
        raise SnapshotVanished(f"{where}: {gone[0] if gone else 'its folder'} was removed while being fetched or "
                               f"checked; fetched again at the next poll") from None


def _files_present(revision: AdapterRevision) -> bool:
    """Whether a registered Hub revision's files are still in its folder, at their
    registered size (a stat each, no hashing: a poll asks this of every repo; files
    fetched again are hashed as they are validated)."""
    if not revision.files_path:
        return False
    folder = Path(revision.files_path)
    try:
        weights = (folder / WEIGHTS_NAME).stat().st_size
    except OSError:
        return False
    return ((folder / CONFIG_NAME).is_file() and revision.size_bytes in (None, weights)
            and (not revision.has_calibration or (folder / CALIBRATION_NAME).is_file()))
