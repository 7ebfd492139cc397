"""Hub publisher: one commit per new merged adapter on a branch of a Hub model repo.

Each publish is a single ``create_commit`` holding every file of the adapter folder and
a generated model card, made against the branch head read just before
(``parent_commit``), so a commit is never duplicated nor silently stacked on someone
else's push. After a failed attempt the head is read again: if it already holds our
adapter files, the attempt landed and only its answer was lost; if someone else pushed,
the commit is made again on top of their head (a bounded number of times). When the
branch already holds the same adapter files, nothing is committed; when it holds another
adapter that no commit of this publisher made (someone else's repo), the publish is
refused. Each new version's commit regenerates the model card (``README.md``): edits
made on the Hub are replaced. The card and the commit's ``merge_report.json`` name a local
base model, input folder, calibration file or reference by its last name alone
(``local:NAME``): a home folder or a user name in a path stays on this machine, where the
merge's own report keeps the paths. Every Hub call is
retried on rate limits, server errors and dropped connections
(:mod:`iteris_daemon.retry`). The token comes from :mod:`iteris_daemon.tokens` and is
never logged nor put in an error message.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from pathlib import Path

import httpx2
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError
from huggingface_hub.hf_api import ModelInfo
from pydantic import Field, field_validator
from tenacity import Retrying, retry_if_exception

from iteris_daemon import hookimpl, safe_json
from iteris_daemon.logs import counted
from iteris_daemon.adapter_config import CARD_NAME, CONFIG_NAME, REPORT_NAME, WEIGHTS_NAME
from iteris_daemon.config import STRICT, HubEndpoint, HubRetrySettings, PathSetting
from iteris_daemon.errors import AdapterError, OutputExistsError
from iteris_daemon.hub_files import FileDigest, content_digest, file_digest, holds
from iteris_daemon.model_card import render_model_card
from iteris_daemon.paths import RepoId
from iteris_daemon.publish import PublisherSettings, PublishRequest, PublishResult, local_name
from iteris_daemon.retry import Interrupted, hub_retrying, is_transient
from iteris_daemon.tokens import hub_token, plain

log = logging.getLogger(__name__)

#: The files that make two adapters the same adapter (a new report or card alone is not a new version).
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME)
#: The description of each commit of this publisher: how it tells its branches from someone else's.
PUBLISHED_BY = "Published by iteris-daemon."


class HubPublishSettings(PublisherSettings, HubRetrySettings):
    model_config = STRICT

    repo_id: RepoId = Field(description="target model repo, OWNER/NAME (created if missing)")
    branch: str = Field("main", min_length=1, description="branch to commit to (created from main if missing)")
    private: bool = Field(True, description="visibility of the repo when this publisher creates it")
    endpoint: HubEndpoint | None = Field(None, description="Hub URL (default: huggingface_hub's)")
    token_file: PathSetting | None = Field(
        None, description="file holding a write token (default: the hf-token credential, else $HF_TOKEN)"
    )
    tag_runs: bool = Field(True, description="tag each new commit <group>-run-<run id>")
    retry_attempts: int = Field(
        6, ge=1, description="tries per Hub call (for the commit, including tries after the branch moved)"
    )

    @field_validator("branch")
    @classmethod
    def _branch_name(cls, branch: str) -> str:
        """A blank branch failed every publish, hours later."""
        if not branch.strip():
            raise ValueError("a branch name, not blank")
        return branch




class HubPublisher:
    kind = "hub"
    description = "One commit per new adapter on a Hub model repo branch, with a model card and a run tag"
    Settings = HubPublishSettings

    def publish(self, request: PublishRequest, settings: HubPublishSettings) -> PublishResult:
        where = f"{settings.repo_id}@{settings.branch}"
        files = _adapter_files(request.adapter_dir)
        config = _hub_config(files[CONFIG_NAME])
        local = {CONFIG_NAME: content_digest(config), WEIGHTS_NAME: file_digest(files[WEIGHTS_NAME])}
        uploads: dict[str, Path | bytes] = {**files, CONFIG_NAME: config, CARD_NAME: render_model_card(request).encode()}
        if REPORT_NAME in files:
            uploads[REPORT_NAME] = _hub_report(files[REPORT_NAME])
        api = _api(settings)

        stopping = request.stopping
        _retrying(settings, f"create repo {settings.repo_id}", stopping)(
            api.create_repo, settings.repo_id, private=settings.private, exist_ok=True
        )
        head = _branch_head(api, settings, stopping)
        if settings.private and head.private is False:
            log.warning("hub %s: the repo is public; private=true only applies when the repo is created", where)
        if _holds(head, local):
            log.info("hub %s: adapter unchanged, still %s", where, head.sha)
            return PublishResult(where, head.sha, changed=False)
        _refuse_foreign(api, settings, head, stopping)

        def operations() -> list[CommitOperationAdd]:  # fresh objects per attempt: the client mutates them
            return [CommitOperationAdd(name, content) for name, content in sorted(uploads.items())]

        title = f"{request.group}: run {request.run_id} ({request.strategy} merge of {counted(len(request.inputs), 'adapter')})"
        sha = _commit(api, settings, operations, title, head.sha, local, stopping)
        log.info("hub %s: published run %d as %s", where, request.run_id, sha)
        if settings.tag_runs:
            tag = f"{request.group}-run-{request.run_id}"
            try:
                _tag(api, settings, tag, sha, stopping)
            except (HfHubHTTPError, httpx2.TransportError, Interrupted) as exc:
                # Not raised: the adapter is published, and a failed run would be retried only
                # to find it unchanged and leave it untagged anyway.
                log.warning("hub %s: %s is published but could not be tagged %s: %s", where, sha, tag, _reason(exc))
        return PublishResult(where, sha, changed=True)


def _api(settings: HubPublishSettings) -> HfApi:
    """A client with exactly the configured token (``False``: never a token saved on the machine)."""
    return HfApi(endpoint=settings.endpoint, token=plain(hub_token(settings.token_file)))


def _retrying(settings: HubPublishSettings, what: str, stopping: threading.Event | None = None) -> Retrying:
    """The configured retries; given the daemon's stop event, they end when it stops
    (a 429's Retry-After would otherwise outlast systemd's stop timeout)."""
    return hub_retrying(
        f"publish: {what}", settings.retry_attempts, settings.retry_base_seconds, settings.retry_cap_seconds,
        stopping=stopping,
    )


def _read_head(api: HfApi, settings: HubPublishSettings, stopping: threading.Event | None = None) -> ModelInfo:
    """The branch head with its files' blob ids (and LFS sha256s)."""
    return _retrying(settings, f"model_info {settings.repo_id}@{settings.branch}", stopping)(
        api.model_info, settings.repo_id, revision=settings.branch, files_metadata=True
    )


def _branch_head(api: HfApi, settings: HubPublishSettings, stopping: threading.Event | None) -> ModelInfo:
    """The branch head, after creating the branch (from main) if the repo does not have it yet."""
    try:
        return _read_head(api, settings, stopping)
    except RevisionNotFoundError:
        log.info("hub %s: creating branch %s", settings.repo_id, settings.branch)
        _retrying(settings, f"create branch {settings.repo_id}@{settings.branch}", stopping)(
            api.create_branch, settings.repo_id, branch=settings.branch, exist_ok=True
        )
        return _read_head(api, settings, stopping)


# What marks a branch as someone's model, besides an adapter's files: its config or weights.
MODEL_FILES = re.compile(r"(.*/)?(config\.json|[^/]*\.(safetensors|bin|gguf|pt|pth|ckpt|h5|onnx|msgpack))")


def _refuse_foreign(api: HfApi, settings: HubPublishSettings, head: ModelInfo, stopping: threading.Event | None) -> None:
    """Refuse a branch holding an adapter or a model that no commit of this publisher put
    there (someone else's repo, named by mistake): its config, weights and card would be
    replaced, or the merge put beside a full model and its card replaced (found by QA)."""
    names = [sibling.rfilename for sibling in head.siblings or []]
    held = [name for name in ADAPTER_FILES if name in names]
    held += [name for name in names if name not in held and MODEL_FILES.fullmatch(name)]
    if not held:
        return
    where = f"{settings.repo_id}@{settings.branch}"
    commits = _retrying(settings, f"commits of {where}", stopping)(
        api.list_repo_commits, settings.repo_id, revision=settings.branch)
    if any(PUBLISHED_BY in (commit.message or "") for commit in commits):
        return
    raise OutputExistsError(
        f"hub {where} holds an adapter or model ({', '.join(held[:4])}{', ...' if len(held) > 4 else ''}, "
        f"{counted(len(names) - len(held), 'other file')}) that no "
        "commit of iteris-daemon made; refusing to publish over it (name another repo or branch)")


def _commit(
    api: HfApi,
    settings: HubPublishSettings,
    operations: Callable[[], list[CommitOperationAdd]],
    title: str,
    parent: str,
    local: dict[str, FileDigest],
    stopping: threading.Event | None,
) -> str:
    """Commit on top of ``parent``; return the sha of the commit that holds the adapter.

    After a failed attempt the head is read again before anything else: an attempt whose
    answer was lost may have landed (our adapter is there: done, no second commit), or
    someone else pushed (HTTP 412 against ``parent_commit``: commit again on top of theirs).
    ``parent_commit`` also guarantees that no attempt ever lands on a head we did not check.
    """
    where = f"{settings.repo_id}@{settings.branch}"
    failed = False

    def attempt() -> str:
        nonlocal parent, failed
        if failed:
            head = api.model_info(settings.repo_id, revision=settings.branch, files_metadata=True)
            if _holds(head, local):
                log.info("hub %s: %s already holds this adapter (an earlier attempt's commit)", where, head.sha)
                return head.sha
            parent = head.sha
        failed = True
        return api.create_commit(
            settings.repo_id, operations(), commit_message=title, commit_description=PUBLISHED_BY,
            revision=settings.branch, parent_commit=parent,
        ).oid

    retrying = _retrying(settings, f"commit to {where}", stopping).copy(
        retry=retry_if_exception(lambda exc: is_transient(exc) or _status(exc) == 412)
    )
    try:
        return retrying(attempt)
    except HfHubHTTPError as exc:
        if _status(exc) != 412:
            raise
        raise RuntimeError(
            f"hub {where}: the branch kept moving during {settings.retry_attempts} commit attempts; gave up"
        ) from exc


def _adapter_files(folder: Path) -> dict[str, Path]:
    """Every file of the adapter folder by its path in the repo; the card rendered from the request (which
    names the group, the run and the inputs' revisions) replaces the merge's README.md."""
    files = {
        path.relative_to(folder).as_posix(): path
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }
    missing = [name for name in ADAPTER_FILES if name not in files]
    if missing:
        raise AdapterError(folder, f"no {missing[0]}: not a complete adapter, nothing was published")
    files.pop(CARD_NAME, None)
    return files


def _hub_config(path: Path) -> bytes:
    """``adapter_config.json`` as the Hub gets it: a local base model (every input named that
    folder) by its name alone, as the report and the card name it; the file as the merge wrote
    it otherwise, so an unchanged adapter is still told by its bytes."""
    raw = path.read_bytes()
    config = safe_json.loads(raw)
    base = config.get("base_model_name_or_path")
    if not isinstance(base, str) or local_name(base) == base:
        return raw
    return (safe_json.dumps({**config, "base_model_name_or_path": local_name(base)}, indent=2, sort_keys=True)
            + "\n").encode()


def _hub_report(path: Path) -> bytes:
    """``merge_report.json`` as the Hub gets it: each local path the merge recorded (the base model
    when a folder, each input's folder and calibration file, the reference) by its name alone;
    Hub ids, ``hf://`` URLs and everything else as the merge wrote them."""
    report = safe_json.loads(path.read_bytes())
    if "base_model" in report:
        report["base_model"] = local_name(report["base_model"])
    for entry in report.get("inputs") or []:
        entry["path"] = local_name(entry["path"])
        if entry.get("calibration"):
            entry["calibration"]["source"] = local_name(entry["calibration"]["source"])
    if report.get("reference"):
        report["reference"]["path"] = local_name(report["reference"]["path"])
    return (safe_json.dumps(report, indent=2) + "\n").encode()


def _holds(info: ModelInfo, local: dict[str, FileDigest]) -> bool:
    """Whether the commit ``info`` describes has exactly these adapter files."""
    remote = {sibling.rfilename: sibling for sibling in info.siblings or []}
    for name, digest in local.items():
        sibling = remote.get(name)
        if sibling is None:
            return False
        if not holds(sibling, digest):
            return False
    return True


def _tag(api: HfApi, settings: HubPublishSettings, tag: str, sha: str, stopping: threading.Event | None) -> None:
    try:
        _retrying(settings, f"tag {settings.repo_id} {tag}", stopping)(api.create_tag, settings.repo_id, tag=tag, revision=sha)
    except HfHubHTTPError as exc:
        if _status(exc) != 409:
            raise
        # Already there: ours if an earlier attempt's answer was lost, else someone else's, left alone.
        refs = _retrying(settings, f"refs {settings.repo_id}", stopping)(api.list_repo_refs, settings.repo_id)
        target = next((ref.target_commit for ref in refs.tags if ref.name == tag), None)
        if target != sha:
            log.warning("hub %s: tag %s already points at %s, not %s; left as is", settings.repo_id, tag, target, sha)


def _status(exc: BaseException) -> int | None:
    return getattr(getattr(exc, "response", None), "status_code", None)


def _reason(exc: BaseException) -> str:
    """A failure in a few words, from the status code or the error type (never from headers)."""
    status = _status(exc)
    return f"HTTP {status}" if status else type(exc).__name__


@hookimpl
def register_publishers(register):
    register(HubPublisher())
