"""Built-in calibration source ``hub_dataset``: one JSON Lines file per adapter in a Hub
dataset repo, e.g. ``acme/calibration`` holding ``sentiment.jsonl``.

Settings (``CalibrationOptions.settings["hub_dataset"]``): ``repo_id``, ``filename``
(a template, default ``"{name}.jsonl"``; ``{name}`` is the adapter's catalog name),
``revision``, ``endpoint``, ``token_file``, ``cache_dir``. A missing file (not in the
listing, or a 404) means "no data here" (the next source answers); any other failure is an
error of the adapter, and one the Hub may not have next time (5xx, 429, a timeout, a dropped
connection, once retried) makes the run wait for it (:class:`CalibrationUnavailable`): the next
source does not answer in its place, and no merge goes out without the adapter. The file is
downloaded at the commit the listing names, and must be what the listing's hash says
(:mod:`iteris_daemon.hub_files`; ``huggingface_hub`` checks only sizes): other bytes are
removed from the cache and the adapter gets an error, so the next run downloads again.
Files are kept in ``cache_dir``, else in ``calibration/`` of the daemon's cache folder
(``[daemon] cache_dir``; outside the daemon the default one), at the commit each revision
(``main`` where none is set) was read at last; a commit that no revision read in 30 days
is at has its files deleted at the next load (:func:`_keep_only`).
In the daemon the download stops past ``[daemon.limits] max_calibration_bytes``, as an
adapter's own ``calibration.jsonl`` would be refused past it.
"""

from __future__ import annotations

import string
import time
from collections.abc import Callable
from functools import partial
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote

from pydantic import Field, field_validator

from iteris_daemon import hookimpl
from iteris_daemon.calibration import CalibrationOptions, CalibrationSet, CalibrationSettings, read_jsonl, source_settings
from iteris_daemon.errors import CalibrationError, CalibrationUnavailable, MergeCancelled
from iteris_daemon.config import STRICT, HubEndpoint, HubRetrySettings, PathSetting
from iteris_daemon.paths import RepoId, cache_dir
from iteris_daemon.retry import Interrupted, hub_failure, hub_retrying, is_transient
from iteris_daemon.tokens import hub_token, plain


class HubDatasetSettings(CalibrationSettings, HubRetrySettings):
    model_config = STRICT

    repo_id: RepoId = Field(description="the Hub dataset repo, OWNER/NAME")
    filename: str = Field("{name}.jsonl", description="file per adapter; {name} is the adapter's catalog name")
    revision: str | None = Field(None, description="branch, tag or commit (default: main)")
    endpoint: HubEndpoint | None = Field(None, description="Hub URL (default: huggingface_hub's)")
    token_file: PathSetting | None = Field(None, description="file holding a read token (default: the hf-token "
                                                             "credential, else $HF_TOKEN)")
    cache_dir: PathSetting | None = Field(None, description="where downloads are kept (default: calibration/ in the "
                                                            "daemon's cache folder)")

    @field_validator("filename")
    @classmethod
    def _filename(cls, filename: str) -> str:
        """A template whose only field is ``{name}``: anything else failed each adapter at run time."""
        try:
            fields = {field for _, field, _, _ in string.Formatter().parse(filename) if field is not None}
        except ValueError as exc:
            raise ValueError(f"{filename!r} is not a template ({exc})") from None
        if fields - {"name"}:
            raise ValueError(f"{filename!r} names {', '.join(sorted(fields - {'name'}))}; only {{name}} is filled in")
        return filename


class HubDataset:
    name = "hub_dataset"
    description = "a JSON Lines file per adapter in a Hub dataset repo"
    Settings = HubDatasetSettings

    def load(self, adapter, options: CalibrationOptions) -> CalibrationSet | None:
        raw = options.settings.get(self.name)
        if not raw:
            return None
        settings = source_settings(self, raw)
        from huggingface_hub.file_download import repo_folder_name

        from iteris_daemon.sources.hub import repo_lock, unsafe_path

        filename = settings.filename.format(name=adapter.name)
        if unsafe_path(filename):
            raise CalibrationError(filename, f"unsafe calibration file name for adapter {adapter.name}")
        cache = Path(settings.cache_dir or (options.cache_dir or cache_dir()) / "calibration")
        # Loads of one dataset take turns in this process: each drops the commits the others might be reading.
        with repo_lock(cache / repo_folder_name(repo_id=settings.repo_id, repo_type="dataset")):
            found = self._download(settings, filename, cache, options.max_download_bytes, options.should_stop)
            if found is None:
                return None
            path, commit = found
            data = read_jsonl(path, options.limit)
            _keep_only(cache, settings.repo_id, settings.revision or "main", commit)
        return CalibrationSet(data.samples, source=f"hf://datasets/{settings.repo_id}/{filename}")

    def _download(self, settings: HubDatasetSettings, filename: str, cache: Path, limit: int | None,
                  should_stop: Callable[[], bool]) -> tuple[Path, str] | None:
        """The file at the dataset's current commit, and that commit; None when it has no such file.
        What another run may find otherwise (the Hub failing, bytes other than listed, the token
        refused) makes the run wait, rather than merge and publish without the adapters it holds."""
        from huggingface_hub import HfApi, hf_hub_download
        from huggingface_hub.errors import RemoteEntryNotFoundError

        from iteris_daemon.hub_files import TooBig, bounded_progress, mismatch
        from iteris_daemon.sources.hub import HubAnswerError, checked_commit_sha, describe_hub_error

        token = plain(hub_token(settings.token_file))
        where = f"{settings.repo_id}/{filename}"
        try:
            retrying = partial(hub_retrying, attempts=settings.retry_attempts, base_seconds=settings.retry_base_seconds,
                               cap_seconds=settings.retry_cap_seconds, stopping=should_stop)
            info = retrying(f"dataset_info {settings.repo_id}")(
                HfApi(endpoint=settings.endpoint, token=token).dataset_info, settings.repo_id,
                revision=settings.revision, files_metadata=True)
            commit = checked_commit_sha(info.sha, f"dataset {settings.repo_id}")  # hf_hub_download writes refs/<it>
            sibling = next((s for s in info.siblings or [] if s.rfilename == filename), None)
            if sibling is None:
                return None
            if limit is not None and sibling.size is not None and sibling.size > limit:  # as listed: not downloaded
                raise TooBig(sibling.size, stopped=False)
            path = Path(retrying(f"calibration {where}")(
                hf_hub_download, settings.repo_id, filename, repo_type="dataset", revision=commit,
                endpoint=settings.endpoint, token=token, cache_dir=cache,
                tqdm_class=bounded_progress(limit) if limit is not None else None,
            ))
        except RemoteEntryNotFoundError:  # a 404 of the file itself: no data here
            return None
        except Interrupted:
            raise MergeCancelled(f"cancelled while downloading {where}") from None
        except HubAnswerError as exc:
            raise CalibrationError(self.name, str(exc)) from None
        except TooBig as exc:
            raise CalibrationError(where, f"is {exc.size}{'+' if exc.stopped else ''} bytes, above the limit of {limit} "
                                          "([daemon.limits] max_calibration_bytes)") from None
        except Exception as exc:  # the Hub failed: the file may well be there
            if is_transient(exc) or _refused(exc):  # a failed HEAD too; a token refused may be put right
                raise CalibrationUnavailable(self.name, describe_hub_error(exc, where)) from exc
            raise CalibrationError(self.name, describe_hub_error(exc, where)) from exc
        problem = mismatch(sibling, path)
        if problem:
            path.resolve().unlink()  # the cached blob, then the snapshot's link to it
            path.unlink(missing_ok=True)
            raise CalibrationUnavailable(where, f"as downloaded it {problem}; removed, downloaded again at the next "
                                                "run")
        return path, commit


def _refused(exc: BaseException) -> bool:
    """The Hub refused this source's token (401, 403: gated, or rights taken away)."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

    exc = hub_failure(exc)
    return isinstance(exc, GatedRepoError) or (
        isinstance(exc, HfHubHTTPError) and exc.response is not None and exc.response.status_code in (401, 403))


# A revision no load has read for this long has its files deleted at the next load of the dataset.
REVISION_KEPT = timedelta(days=30)


def _keep_only(cache: Path, repo_id: str, revision: str, commit: str) -> None:
    """Record that ``revision`` of dataset ``repo_id`` is at ``commit``, and delete the cached
    commits that no revision read in the last :data:`REVISION_KEPT` is at: each refresh of
    the dataset left a copy of its files in the cache for ever, and keeping only the commit
    read last made two groups reading the dataset at two revisions download it at every run.
    The record is a ref file in ``huggingface_hub``'s cache layout (``refs/<revision>``,
    the revision quoted into one file name); its time is when a load last read it."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.file_download import repo_folder_name

    refs = cache / repo_folder_name(repo_id=repo_id, repo_type="dataset") / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    (refs / quote(revision, safe="")).write_text(commit, encoding="utf-8")
    oldest = time.time() - REVISION_KEPT.total_seconds()
    kept = set()
    for ref in refs.rglob("*"):
        if ref.is_file() and ref.stat().st_mtime >= oldest:
            kept.add(ref.read_text(encoding="utf-8").strip())
        elif ref.is_file():
            ref.unlink()
    scanned = scan_cache_dir(cache)
    stale = [revision.commit_hash for repo in scanned.repos if repo.repo_type == "dataset" and repo.repo_id == repo_id
             for revision in repo.revisions if revision.commit_hash not in kept]
    if stale:
        scanned.delete_revisions(*stale).execute()


@hookimpl
def register_calibration_sources(register) -> None:
    register(HubDataset())
