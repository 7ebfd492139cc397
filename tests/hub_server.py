"""A small Hugging Face Hub look-alike served over HTTP on 127.0.0.1, for tests.

The real ``huggingface_hub`` client talks to it exactly as it talks to huggingface.co:
``HfApi(endpoint=server.endpoint)``, ``hf_hub_download(..., endpoint=server.endpoint)``,
``snapshot_download(..., endpoint=server.endpoint)``. Repos live in memory; every repo has
branches, git tags and a linear history of commits per branch, each commit a full snapshot of
the files (bytes) under a 40-hex sha.

Typical use, in a pytest fixture::

    with HubServer(token="hf_test") as hub:
        isolate_hub_client(monkeypatch, hub.endpoint, tmp_path / "hf-home")
        sha = hub.create_repo_direct("alice/lora-a", {"adapter_config.json": b"{}"})
        hub.inject(r"^GET /api/models/alice/lora-a$", ("status", 503))  # the next model_info gets a 503
        ...  # HfApi(endpoint=hub.endpoint, token="hf_test").model_info("alice/lora-a") raises, then returns sha

What is served (the routes huggingface_hub 2.4 uses; models and datasets):

* ``GET /api/{models,datasets}`` (``author``, ``search``, ``filter``, ``sort``, ``limit``, ``full``,
  ``expand``), paginated with a ``Link: rel="next"`` header like the Hub;
* ``GET /api/{type}s/{repo}[/revision/{rev}]`` (repo info, ``blobs`` adds sizes), ``/refs``,
  ``/tree/{rev}[/{path}]`` (``recursive``), ``/commits/{rev}``;
* ``POST .../preupload/{rev}`` (always answers upload mode "regular", so file contents arrive inline
  in the commit), ``POST .../commit/{rev}`` (inline files, file and folder deletions, ``parentCommit``),
  ``POST|DELETE .../branch/{name}``, ``POST .../tag/{rev}``, ``DELETE .../tag/{name}``;
* ``POST /api/repos/create``, ``DELETE /api/repos/delete``, ``GET /api/whoami-v2``,
  ``POST /api/validate-yaml``;
* ``HEAD|GET /[datasets/]{repo}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag`` (the git blob
  sha1, as the Hub sends for non-LFS files; an LFS file's sha256 in ``X-Linked-Etag`` too, with
  ``X-Linked-Size``), ``Content-Length`` and ``Range`` support (the client resumes interrupted downloads
  with ``Range: bytes=N-``).

Not served: LFS/Xet uploads, pull requests, Spaces, gated repos.

Errors carry the Hub's status codes and ``X-Error-Code``/``X-Error-Message`` headers, so the client raises
its typed errors (``RepositoryNotFoundError``, ``RevisionNotFoundError``, ``RemoteEntryNotFoundError``,
``HfHubHTTPError``). Auth follows the Hub: with ``token`` set, a wrong ``Authorization: Bearer`` gets 401
"Invalid credentials in Authorization header" on every route; an anonymous request gets 401 with
``X-Error-Code: RepoNotFound`` on a private or missing repo (so a private repo cannot be told from a missing
one) and on any write to a repo; an authenticated request for a missing repo gets 404 ``RepoNotFound``.
With ``token=None`` every request is authenticated.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import itertools
import json
import math
import re
import select
import socket
import threading
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, NamedTuple
from urllib.parse import parse_qs, unquote, urlencode

import yaml
from huggingface_hub import constants, hf_api

if TYPE_CHECKING:
    import pytest

#: What ``create_repo`` over HTTP puts in the initial commit, like the Hub does (shortened list).
DEFAULT_GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pt filter=lfs diff=lfs merge=lfs -text\n"
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
)

#: Fields of a repo that ``/api/models`` lists without ``full`` (the Hub's default set).
_LIST_FIELDS = frozenset(
    {"_id", "id", "modelId", "private", "downloads", "likes", "tags", "pipeline_tag", "library_name", "createdAt"}
)

_REPO_TYPES = {"models": "model", "datasets": "dataset"}
_REPO = r"(?P<type>models|datasets)/(?P<repo>[^/]+/[^/]+)"
_RESOLVE = r"(?:/(?P<type>datasets))?/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)"

Fault = tuple[Any, ...]
"""``("status", code[, headers])``, ``("delay", seconds)``, ``("stall",)``, ``("drop",)``, ``("truncate", nbytes)``
or ``("corrupt",)``."""


class LoggedRequest(NamedTuple):
    """One answered (or dropped) request. ``path`` is percent-decoded and has no query string;
    ``status`` is None for a dropped connection."""

    method: str
    path: str
    status: int | None


@dataclass(frozen=True)
class _Commit:
    """One commit: a full snapshot of the files, not a diff."""

    oid: str
    parent: str | None
    files: Mapping[str, bytes]  # the full snapshot after this commit
    title: str
    message: str
    author: str
    date: datetime


@dataclass
class _Repo:
    """A repo: its commits, the refs pointing into them, and the metadata the Hub lists."""

    repo_id: str
    repo_type: str  # "model" or "dataset"
    private: bool
    created_at: datetime
    extra_tags: list[str] = field(default_factory=list)
    library_name: str | None = None
    pipeline_tag: str | None = None
    commits: dict[str, _Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit oid
    tags: dict[str, str] = field(default_factory=dict)  # git tag name -> commit oid

    def resolve(self, revision: str) -> _Commit | None:
        """The commit a branch, a git tag or a full commit sha points at."""
        oid = self.branches.get(revision) or self.tags.get(revision) or revision
        return self.commits.get(oid)

    @property
    def url_prefix(self) -> str:
        return "" if self.repo_type == "model" else f"{self.repo_type}s/"


class HubError(Exception):
    """An error answered the Hub's way: status, ``X-Error-Code``, ``X-Error-Message`` and a JSON body.

    The direct helpers raise it too, e.g. for an unknown revision or a file to delete that does not exist.
    """

    def __init__(
        self, status: int, message: str, code: str | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, dict(headers or {})


@dataclass
class _Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


_Route = Callable[..., _Response]  # an unbound HubServer method: (self, request, **path_groups)


@dataclass
class _Request:
    method: str
    raw_path: str  # as sent, still percent-encoded
    query: dict[str, list[str]]
    headers: Mapping[str, str]
    body: bytes
    auth: Literal["ok", "anonymous"]  # a wrong token never gets this far

    def arg(self, name: str, default: str | None = None) -> str | None:
        return self.query.get(name, [default])[-1]

    def flag(self, name: str) -> bool:
        return (self.arg(name) or "").lower() in ("1", "true")

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except json.JSONDecodeError as e:
            raise HubError(400, f"Invalid JSON body: {e}") from e


@dataclass
class _FaultRule:
    pattern: re.Pattern[str]
    fault: Fault
    remaining: int


def git_blob_sha1(content: bytes) -> str:
    """The git object id of a file: what the Hub sends as ``ETag`` and as the tree ``oid``."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


#: Files the Hub keeps in Git LFS (its default ``.gitattributes``, above).
LFS_SUFFIXES = (".bin", ".pt", ".safetensors")


def _file_metadata(path: str, content: bytes) -> dict[str, Any]:
    """A file's ``files_metadata`` entry, as the Hub lists it: for an LFS file git stores a
    pointer, so ``blobId`` is the pointer's and the content's sha256 is under ``lfs``."""
    if not path.endswith(LFS_SUFFIXES):
        return {"size": len(content), "blobId": git_blob_sha1(content)}
    sha256 = hashlib.sha256(content).hexdigest()
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(content)}\n".encode()
    return {"size": len(content), "blobId": git_blob_sha1(pointer),
            "lfs": {"sha256": sha256, "size": len(content), "pointerSize": len(pointer)}}


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _json_response(payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> _Response:
    return _Response(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})


def _front_matter(readme: str) -> str | None:
    """The YAML block between ``---`` lines at the top of a model card."""
    match = re.match(r"---\s*\n(.*?)\n---\s*(?:\n|$)", readme, re.S)
    return match.group(1) if match else None


def _card_data(files: Mapping[str, bytes]) -> dict[str, Any]:
    """The metadata of README.md; empty if there is none or it is not valid YAML (the Hub ignores it then)."""
    block = _front_matter(files.get("README.md", b"").decode("utf-8", "replace"))
    try:
        data = yaml.safe_load(block) if block else None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the Hub: the client pools connections
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.hub._connections.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.hub._connections.discard(self.connection)

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout) or the server stopped
            self.close_connection = True

    def _serve(self) -> None:
        self.server.hub._serve(self)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - BaseHTTPRequestHandler's signature
        """Silent: see ``HubServer.requests``."""


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stop() must not wait for a request held by a "delay" fault
    hub: HubServer


class HubServer:
    """An in-memory Hub on ``http://127.0.0.1:<free port>``, served from a background thread.

    Start it with ``with HubServer() as hub:`` (or ``start()``/``stop()``). ``token`` switches auth on
    (see the module docstring); ``user`` is the account that token belongs to (``whoami``, the default
    namespace of ``create_repo``); listings are cut into pages of ``page_size`` items.

    Test helpers: ``create_repo_direct``, ``commit_direct``, ``create_branch_direct``, ``create_tag_direct``
    change the state as another party would, ``files``/``head`` read it back; ``requests`` logs every request
    and ``inject`` makes the next matching requests fail.
    """

    def __init__(self, token: str | None = None, *, user: str = "test-user", page_size: int = 1000) -> None:
        self.token = token
        self.user = user
        self.page_size = page_size
        self.requests: list[LoggedRequest] = []
        self.errors: list[str] = []  # tracebacks of server bugs (answered 500); a `with` block raises on them
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._faults: list[_FaultRule] = []
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._oids = itertools.count()
        self._last_moment = datetime.min.replace(tzinfo=timezone.utc)
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------------------------------------- lifecycle

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT``: pass it as ``endpoint=`` to the client."""
        if self._httpd is None:
            raise RuntimeError("HubServer is not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        if self._httpd is not None:
            raise RuntimeError("HubServer is already started")
        self._httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.hub = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close every open connection (requests held by a "delay" fault are abandoned)."""
        if self._httpd is None:
            return
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        for connection in list(self._connections):
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        assert self._thread is not None
        self._thread.join()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        if self.errors and exc_type is None:
            raise AssertionError("HubServer hit errors while serving:\n" + "\n".join(self.errors))

    # ----------------------------------------------------------------------------------------- test helpers

    def inject(self, pattern: str, fault: Fault, times: int = 1) -> None:
        """Make the next ``times`` requests matching ``pattern`` fail with ``fault``.

        ``pattern`` is a regex searched in ``"METHOD /decoded/path"`` (no query string), e.g.
        ``r"^HEAD /alice/lora/resolve/"`` or ``r"^GET /api/models$"``. Faults:

        * ``("status", code)`` or ``("status", code, {"Retry-After": "1"})``: answer that status instead;
        * ``("delay", seconds)``: wait, then answer normally (to trip client timeouts);
        * ``("stall",)``: never answer; hold the connection until the client closes it (its
          read timeout fired, whenever that is on a loaded machine) and log the request with
          status None;
        * ``("drop",)``: close the connection without answering; the request is not processed;
        * ``("truncate", nbytes)``: process the request, send the headers with the full ``Content-Length``
          but only ``nbytes`` of the body, then close. A truncated commit response still creates the
          commit: it simulates a lost response.
        * ``("corrupt",)``: answer normally, with the body's middle byte changed (same length):
          bytes other than those the listing's hashes describe.

        Rules are consumed in the order they were injected; once spent, requests behave normally again.
        """
        match fault:
            case ("status", int()) | ("status", int(), dict()) | ("delay", int() | float()):
                pass
            case ("drop",) | ("stall",) | ("truncate", int()) | ("corrupt",):
                pass
            case _:
                raise ValueError(f"Unknown fault {fault!r}")
        with self._lock:
            self._faults.append(_FaultRule(re.compile(pattern), tuple(fault), times))

    def requests_matching(self, pattern: str) -> list[LoggedRequest]:
        """Logged requests whose ``"METHOD /path"`` matches ``pattern`` (a regex, as for ``inject``)."""
        regex = re.compile(pattern)
        return [r for r in list(self.requests) if regex.search(f"{r.method} {r.path}")]

    def create_repo_direct(
        self,
        repo_id: str,
        files: Mapping[str, bytes] | None = None,
        *,
        repo_type: str = "model",
        private: bool = False,
        tags: Iterable[str] = (),
        library_name: str | None = None,
        pipeline_tag: str | None = None,
    ) -> str:
        """Create a repo whose "main" holds exactly ``files`` (one commit, no ``.gitattributes``); return its sha.

        ``tags`` are Hub tags (what ``list_models(filter=...)`` matches), not git tags: see
        ``create_tag_direct``. Tags, ``library_name`` and ``pipeline_tag`` found in a README.md metadata
        block count too.
        """
        with self._lock:
            repo = self._new_repo(repo_id, repo_type, private)
            repo.extra_tags, repo.library_name, repo.pipeline_tag = list(tags), library_name, pipeline_tag
            return self._commit(repo, "main", dict(files or {}), (), (), "initial commit").oid

    def commit_direct(
        self,
        repo_id: str,
        files: Mapping[str, bytes] | None = None,
        deletions: Iterable[str] = (),
        *,
        branch: str = "main",
        repo_type: str = "model",
        message: str = "Update files",
    ) -> str:
        """Push a commit (as someone else would): add/overwrite ``files``, delete ``deletions``; return its sha."""
        with self._lock:
            repo = self._repo(repo_id, repo_type)
            return self._commit(repo, branch, dict(files or {}), list(deletions), (), message).oid

    def create_branch_direct(
        self, repo_id: str, branch: str, revision: str = "main", *, repo_type: str = "model"
    ) -> str:
        """Create ``branch`` at ``revision``; return the commit sha it points at."""
        with self._lock:
            repo = self._repo(repo_id, repo_type)
            repo.branches[branch] = self._resolve(repo, revision).oid
            return repo.branches[branch]

    def create_tag_direct(
        self, repo_id: str, tag: str, revision: str = "main", *, repo_type: str = "model"
    ) -> str:
        """Create the git tag ``tag`` at ``revision``; return the commit sha it points at."""
        with self._lock:
            repo = self._repo(repo_id, repo_type)
            repo.tags[tag] = self._resolve(repo, revision).oid
            return repo.tags[tag]

    def head(self, repo_id: str, branch: str = "main", *, repo_type: str = "model") -> str:
        """The commit sha ``branch`` points at."""
        with self._lock:
            return self._resolve(self._repo(repo_id, repo_type), branch).oid

    def files(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> dict[str, bytes]:
        """All files at ``revision`` (branch, git tag or commit sha)."""
        with self._lock:
            return dict(self._resolve(self._repo(repo_id, repo_type), revision).files)

    # ------------------------------------------------------------------------------------------------ state

    def _repo(self, repo_id: str, repo_type: str) -> _Repo:
        try:
            return self._repos[(repo_type, repo_id)]
        except KeyError:
            raise KeyError(f"No {repo_type} repo {repo_id!r}") from None

    def _new_repo(self, repo_id: str, repo_type: str, private: bool) -> _Repo:
        if repo_type not in _REPO_TYPES.values():
            raise ValueError(f"Unsupported repo type {repo_type!r}")
        if repo_id.count("/") != 1 or not all(repo_id.split("/")):
            raise ValueError(f"repo_id must be 'namespace/name', got {repo_id!r}")
        if (repo_type, repo_id) in self._repos:
            raise ValueError(f"{repo_type} repo {repo_id!r} already exists")
        repo = _Repo(repo_id, repo_type, private, created_at=self._now())
        self._repos[(repo_type, repo_id)] = repo
        return repo

    def _now(self) -> datetime:
        """The time, at least 1 ms after the previous call: dates order events even at the Hub's ms precision."""
        self._last_moment = max(datetime.now(timezone.utc), self._last_moment + timedelta(milliseconds=1))
        return self._last_moment

    def _resolve(self, repo: _Repo, revision: str) -> _Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _commit(
        self,
        repo: _Repo,
        branch: str,
        additions: Mapping[str, bytes],
        deletions: Iterable[str],
        deleted_folders: Iterable[str],
        title: str,
        message: str = "",
        parent_commit: str | None = None,
    ) -> _Commit:
        """Append a commit to ``branch`` (created if the repo has no commit yet)."""
        head = repo.branches.get(branch)
        if head is None and repo.commits:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        if parent_commit is not None and not (head or "").startswith(parent_commit.lower()):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.commits[head].files) if head else {}
        for path in deletions:
            if files.pop(path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
        for folder in deleted_folders:
            prefix = folder.rstrip("/") + "/"
            doomed = [path for path in files if path.startswith(prefix)]
            if not doomed:
                raise HubError(404, f"A folder with this name doesn't exist: {folder}", "EntryNotFound")
            for path in doomed:
                del files[path]
        files.update(additions)
        seed = f"{repo.repo_type}/{repo.repo_id}\n{head}\n{title}\n{next(self._oids)}\n"
        seed += "".join(f"{path}\0{git_blob_sha1(content)}\n" for path, content in sorted(files.items()))
        commit = _Commit(
            oid=hashlib.sha1(seed.encode()).hexdigest(),
            parent=head,
            files=files,
            title=title,
            message=message,
            author=self.user,
            date=self._now(),
        )
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit

    # ----------------------------------------------------------------------------------------------- serving

    def _serve(self, handler: _Handler) -> None:
        """Answer one request: apply a pending fault, route, log, send."""
        raw_path, _, query_string = handler.path.partition("?")
        path = unquote(raw_path)
        method = handler.command
        if "chunked" in handler.headers.get("Transfer-Encoding", "").lower():
            handler.close_connection = True
            self._send(handler, _json_response({"error": "Send a Content-Length"}, 411), method, path)
            return
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        fault = self._take_fault(f"{method} {path}")
        kind = fault[0] if fault else None

        if kind == "drop":
            self.requests.append(LoggedRequest(method, path, None))
            self._abort(handler)
            return
        if kind == "stall":
            self._until_closed(handler)
            self.requests.append(LoggedRequest(method, path, None))
            handler.close_connection = True
            return
        if kind == "delay" and self._stopping.wait(fault[1]):
            return  # stopped while waiting: nobody gets an answer
        if kind == "status":
            status, headers = fault[1], (fault[2] if len(fault) > 2 else {})
            response = _json_response({"error": f"Injected fault: HTTP {status}"}, status, headers)
        else:
            response = self._dispatch(method, raw_path, parse_qs(query_string), handler.headers, body)
        if kind == "corrupt" and response.body:
            middle = len(response.body) // 2
            changed = bytes([response.body[middle] ^ 0xFF])
            response = dataclasses.replace(response, body=response.body[:middle] + changed + response.body[middle + 1:])
        self._send(handler, response, method, path, truncate_to=fault[1] if kind == "truncate" else None)

    def _take_fault(self, what: str) -> Fault | None:
        with self._lock:
            for rule in self._faults:
                if rule.remaining > 0 and rule.pattern.search(what):
                    rule.remaining -= 1
                    return rule.fault
        return None

    def _send(
        self, handler: _Handler, response: _Response, method: str, path: str, truncate_to: int | None = None
    ) -> None:
        self.requests.append(LoggedRequest(method, path, response.status))
        handler.send_response(response.status)
        for name, value in {**response.headers, "Content-Length": str(len(response.body))}.items():
            handler.send_header(name, value)
        handler.end_headers()
        if method != "HEAD":
            handler.wfile.write(response.body if truncate_to is None else response.body[:truncate_to])
        if truncate_to is not None:
            self._abort(handler)

    def _until_closed(self, handler: _Handler) -> None:
        """Wait until the client closes the connection (or the server stops)."""
        while not self._stopping.is_set():
            try:
                readable, _, _ = select.select([handler.connection], [], [], 0.05)
                if readable and not handler.connection.recv(1, socket.MSG_PEEK):
                    return
            except OSError:
                return

    @staticmethod
    def _abort(handler: _Handler) -> None:
        """Close the connection now, whatever the client still expects."""
        handler.close_connection = True
        handler.wfile.flush()
        try:
            handler.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _dispatch(
        self, method: str, raw_path: str, query: dict[str, list[str]], headers: Mapping[str, str], body: bytes
    ) -> _Response:
        try:
            request = _Request(method, raw_path, query, headers, body, self._authenticate(headers))
            for route_method, pattern, route in self._routes:
                match = pattern.fullmatch(raw_path)
                if match and route_method == method:
                    with self._lock:
                        return route(self, request, **{k: unquote(v) for k, v in match.groupdict().items() if v})
            raise HubError(404, f"Not served by HubServer: {request.method} {unquote(raw_path)}")
        except HubError as e:
            headers = {"X-Error-Message": e.message.encode("ascii", "backslashreplace").decode(), **e.headers}
            if e.code:
                headers["X-Error-Code"] = e.code
            return _json_response({"error": e.message}, e.status, headers)
        except Exception:  # a bug, or a request the real client never sends: fail the test loudly
            self.errors.append(traceback.format_exc())
            return _json_response({"error": "HubServer could not handle this request, see HubServer.errors"}, 500)

    def _authenticate(self, headers: Mapping[str, str]) -> Literal["ok", "anonymous"]:
        if self.token is None:
            return "ok"
        authorization = headers.get("Authorization")
        if authorization is None:
            return "anonymous"
        if authorization != f"Bearer {self.token}":
            raise HubError(401, "Invalid credentials in Authorization header")
        return "ok"

    def _readable(self, request: _Request, type: str, repo: str) -> _Repo:
        """The repo, if this request may see it (a private repo is missing to anonymous callers)."""
        found = self._repos.get((_REPO_TYPES[type], repo))
        if found is None or (found.private and request.auth != "ok"):
            status = 401 if request.auth == "anonymous" else 404
            raise HubError(status, "Repository not found", "RepoNotFound")
        return found

    def _writable(self, request: _Request, type: str, repo: str) -> _Repo:
        if request.auth != "ok":
            raise HubError(401, "You must be authenticated to write to a repository", "RepoNotFound")
        return self._readable(request, type, repo)

    def _page(self, request: _Request, items: list[Any]) -> _Response:
        """One page of ``items`` and, if more follow, a ``Link`` header to the next, like the Hub."""
        start = int(request.arg("cursor") or 0)
        end = start + self.page_size
        headers = {}
        if end < len(items):
            query = {**request.query, "cursor": [str(end)]}
            headers["Link"] = f'<{self.endpoint}{request.raw_path}?{urlencode(query, doseq=True)}>; rel="next"'
        return _json_response(items[start:end], headers=headers)

    # ------------------------------------------------------------------------------------------------ routes

    def _whoami(self, request: _Request) -> _Response:
        if request.auth != "ok":
            raise HubError(401, "Invalid user token")
        return _json_response(
            {
                "type": "user",
                "name": self.user,
                "fullname": self.user,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
            }
        )

    def _create_repo(self, request: _Request) -> _Response:
        if request.auth != "ok":
            raise HubError(401, "Invalid username or password.")
        payload = request.json()
        repo_type = payload.get("type") or "model"
        if repo_type not in _REPO_TYPES.values():
            raise HubError(400, f"HubServer does not serve {repo_type} repos")
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        existing = self._repos.get((repo_type, repo_id))
        if existing is not None:
            url = f"{self.endpoint}/{existing.url_prefix}{repo_id}"
            return _json_response({"error": f"You already created this {repo_type} repo", "url": url}, 409)
        private = payload.get("visibility", "private" if payload.get("private") else "public") == "private"
        repo = self._new_repo(repo_id, repo_type, private)
        self._commit(repo, "main", {".gitattributes": DEFAULT_GITATTRIBUTES}, (), (), "initial commit")
        return _json_response({"url": f"{self.endpoint}/{repo.url_prefix}{repo_id}", "name": repo_id})

    def _delete_repo(self, request: _Request) -> _Response:
        payload = request.json()
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        if repo_type not in _REPO_TYPES.values():
            raise HubError(404, "Repository not found", "RepoNotFound")
        self._writable(request, f"{repo_type}s", repo_id)
        del self._repos[(repo_type, repo_id)]
        return _json_response({})

    def _validate_yaml(self, request: _Request) -> _Response:
        try:
            yaml.safe_load(_front_matter(request.json().get("content", "")) or "")
        except yaml.YAMLError as e:
            return _json_response({"errors": [{"message": str(e)}]}, 400)
        return _json_response({"errors": [], "warnings": []})

    def _list_repos(self, request: _Request, type: str) -> _Response:
        repo_type = _REPO_TYPES[type]
        author, search = request.arg("author"), (request.arg("search") or "").lower()
        wanted_tags = set(request.query.get("filter", []))
        repos = [
            repo
            for (kind, repo_id), repo in self._repos.items()
            if kind == repo_type
            and (request.auth == "ok" or not repo.private)
            and (author is None or repo_id.split("/")[0] == author)
            and search in repo_id.lower()
        ]
        infos = [self._info(repo, repo.resolve("main"), blobs=False) for repo in repos if "main" in repo.branches]
        infos = [info for info in infos if wanted_tags <= set(info["tags"])]
        sort = request.arg("sort")
        if sort in ("lastModified", "createdAt"):
            infos.sort(key=lambda info: info[sort], reverse=True)
        infos = infos[: int(request.arg("limit") or len(infos))]
        expand = request.query.get("expand")
        if expand:
            infos = [{k: v for k, v in info.items() if k in {"_id", "id", *expand}} for info in infos]
        elif not request.flag("full"):
            infos = [{k: v for k, v in info.items() if k in _LIST_FIELDS} for info in infos]
        return self._page(request, infos)

    def _repo_info(self, request: _Request, type: str, repo: str, rev: str = "main") -> _Response:
        found = self._readable(request, type, repo)
        info = self._info(found, self._resolve(found, rev), blobs=request.flag("blobs"))
        expand = request.query.get("expand")
        if expand:
            info = {k: v for k, v in info.items() if k in {"_id", "id", *expand}}
        return _json_response(info)

    def _info(self, repo: _Repo, commit: _Commit, *, blobs: bool) -> dict[str, Any]:
        card = _card_data(commit.files)
        card_tags = card.get("tags") or []
        library_name = card.get("library_name") or repo.library_name
        tags = [*([library_name] if library_name else []), *repo.extra_tags]
        tags += [card_tags] if isinstance(card_tags, str) else card_tags
        tags = list(dict.fromkeys(tags))  # the Hub lists the library among the tags, once
        siblings = [{"rfilename": path, **(_file_metadata(path, content) if blobs else {})}
                    for path, content in sorted(commit.files.items())]
        info: dict[str, Any] = {
            "_id": hashlib.sha1(f"{repo.repo_type}/{repo.repo_id}".encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.oid,
            "lastModified": _iso(commit.date),
            "createdAt": _iso(repo.created_at),
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": tags,
            "siblings": siblings,
        }
        if card:
            info["cardData"] = card
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
            pipeline_tag = card.get("pipeline_tag") or repo.pipeline_tag
            info.update({k: v for k, v in (("library_name", library_name), ("pipeline_tag", pipeline_tag)) if v})
        return info

    def _refs(self, request: _Request, type: str, repo: str) -> _Response:
        found = self._readable(request, type, repo)

        def refs(names: Mapping[str, str], kind: str) -> list[dict[str, str]]:
            return [
                {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": oid}
                for name, oid in sorted(names.items())
            ]

        return _json_response(
            {
                "branches": refs(found.branches, "heads"),
                "tags": refs(found.tags, "tags"),
                "converts": [],
                "pullRequests": [],
            }
        )

    def _tree(self, request: _Request, type: str, repo: str, rev: str, path: str = "") -> _Response:
        files = self._resolve(self._readable(request, type, repo), rev).files
        base = path.strip("/") + "/" if path.strip("/") else ""
        recursive = request.flag("recursive")
        entries: dict[str, dict[str, Any]] = {}
        for file_path, content in files.items():
            if not file_path.startswith(base):
                continue
            parts = file_path[len(base) :].split("/")
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                folder = base + "/".join(parts[:depth])
                entries[folder] = {"type": "directory", "oid": self._folder_oid(files, folder), "path": folder}
            if recursive or len(parts) == 1:
                oid = git_blob_sha1(content)
                entries[file_path] = {"type": "file", "oid": oid, "size": len(content), "path": file_path}
        if base and not entries:
            raise HubError(404, f"{path} does not exist on {rev}", "EntryNotFound")
        return self._page(request, [entries[key] for key in sorted(entries)])

    @staticmethod
    def _folder_oid(files: Mapping[str, bytes], folder: str) -> str:
        inside = sorted((p, git_blob_sha1(c)) for p, c in files.items() if p.startswith(folder + "/"))
        return hashlib.sha1(repr(inside).encode()).hexdigest()

    def _commits(self, request: _Request, type: str, repo: str, rev: str) -> _Response:
        found = self._readable(request, type, repo)
        history: list[dict[str, Any]] = []
        commit: _Commit | None = self._resolve(found, rev)
        while commit is not None:
            history.append(
                {
                    "id": commit.oid,
                    "authors": [{"user": commit.author}],
                    "date": _iso(commit.date),
                    "title": commit.title,
                    "message": commit.message,
                }
            )
            commit = found.commits.get(commit.parent) if commit.parent else None
        return self._page(request, history)

    def _preupload(self, request: _Request, type: str, repo: str, rev: str) -> _Response:
        found = self._writable(request, type, repo)
        if rev not in found.branches:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        current = found.resolve(rev).files
        return _json_response(
            {
                "files": [
                    {
                        "path": file["path"],
                        "uploadMode": "regular",
                        "shouldIgnore": False,
                        "oid": git_blob_sha1(current[file["path"]]) if file["path"] in current else None,
                    }
                    for file in request.json().get("files", [])
                ]
            }
        )

    def _create_commit(self, request: _Request, type: str, repo: str, rev: str) -> _Response:
        found = self._writable(request, type, repo)
        if request.flag("create_pr"):
            raise HubError(400, "HubServer does not support pull requests")
        lines = [json.loads(line) for line in request.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The commit payload must start with a header line")
        header = lines[0]["value"]
        additions: dict[str, bytes] = {}
        deletions: list[str] = []
        deleted_folders: list[str] = []
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            if key == "file":
                encoded = value["content"]
                additions[value["path"]] = (
                    base64.b64decode(encoded) if value.get("encoding") == "base64" else encoded.encode()
                )
            elif key == "deletedFile":
                deletions.append(value["path"])
            elif key == "deletedFolder":
                deleted_folders.append(value["path"])
            else:
                raise HubError(400, f"HubServer accepts inline files and deletions only, not {key!r}")
        if rev not in found.branches:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        commit = self._commit(
            found,
            rev,
            additions,
            deletions,
            deleted_folders,
            header.get("summary", ""),
            header.get("description", ""),
            header.get("parentCommit"),
        )
        return _json_response(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self.endpoint}/{found.url_prefix}{found.repo_id}/commit/{commit.oid}",
                "pullRequestUrl": None,
            }
        )

    def _create_branch(self, request: _Request, type: str, repo: str, ref: str) -> _Response:
        found = self._writable(request, type, repo)
        if ref in found.branches:
            raise HubError(409, f"Reference refs/heads/{ref} already exists")
        found.branches[ref] = self._resolve(found, request.json().get("startingPoint") or "main").oid
        return _json_response({})

    def _delete_branch(self, request: _Request, type: str, repo: str, ref: str) -> _Response:
        found = self._writable(request, type, repo)
        if ref == "main":
            raise HubError(403, "Cannot delete the default branch")
        if found.branches.pop(ref, None) is None:
            raise HubError(404, f"Invalid rev id: {ref}", "RevisionNotFound")
        return _json_response({})

    def _create_tag(self, request: _Request, type: str, repo: str, ref: str) -> _Response:
        found = self._writable(request, type, repo)
        tag = request.json()["tag"]
        if tag in found.tags:
            raise HubError(409, f"Tag {tag} already exists")
        found.tags[tag] = self._resolve(found, ref).oid
        return _json_response({})

    def _delete_tag(self, request: _Request, type: str, repo: str, ref: str) -> _Response:
        found = self._writable(request, type, repo)
        if found.tags.pop(ref, None) is None:
            raise HubError(404, f"Invalid rev id: {ref}", "RevisionNotFound")
        return _json_response({})

    def _resolve_file(self, request: _Request, repo: str, rev: str, path: str, type: str = "models") -> _Response:
        commit = self._resolve(self._readable(request, type, repo), rev)
        content = commit.files.get(path)
        if content is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        headers = {
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{git_blob_sha1(content)}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if path.endswith(LFS_SUFFIXES):  # the Hub names an LFS file by its content's sha256, which the client prefers
            headers |= {"X-Linked-Etag": f'"{hashlib.sha256(content).hexdigest()}"', "X-Linked-Size": str(len(content))}
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", request.headers.get("Range", "").strip())
        if wanted is None:
            return _Response(200, content, headers)
        start, end = int(wanted.group(1)), int(wanted.group(2) or len(content) - 1)
        if start >= len(content) or end < start:
            raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{len(content)}"})
        end = min(end, len(content) - 1)
        headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
        return _Response(206, content[start : end + 1], headers)

    _routes: list[tuple[str, re.Pattern[str], _Route]] = [
        (method, re.compile(pattern), route)
        for method, pattern, route in [
            ("GET", r"/api/whoami-v2", _whoami),
            ("POST", r"/api/repos/create", _create_repo),
            ("DELETE", r"/api/repos/delete", _delete_repo),
            ("POST", r"/api/validate-yaml", _validate_yaml),
            ("GET", r"/api/(?P<type>models|datasets)", _list_repos),
            ("GET", rf"/api/{_REPO}(?:/revision/(?P<rev>[^/]+))?", _repo_info),
            ("GET", rf"/api/{_REPO}/refs", _refs),
            ("GET", rf"/api/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", _tree),
            ("GET", rf"/api/{_REPO}/commits/(?P<rev>[^/]+)", _commits),
            ("POST", rf"/api/{_REPO}/preupload/(?P<rev>[^/]+)", _preupload),
            ("POST", rf"/api/{_REPO}/commit/(?P<rev>[^/]+)", _create_commit),
            ("POST", rf"/api/{_REPO}/branch/(?P<ref>.+)", _create_branch),
            ("DELETE", rf"/api/{_REPO}/branch/(?P<ref>.+)", _delete_branch),
            ("POST", rf"/api/{_REPO}/tag/(?P<ref>.+)", _create_tag),
            ("DELETE", rf"/api/{_REPO}/tag/(?P<ref>.+)", _delete_tag),
            ("GET", _RESOLVE, _resolve_file),
            ("HEAD", _RESOLVE, _resolve_file),
        ]
    ]


def isolate_hub_client(
    monkeypatch: pytest.MonkeyPatch, endpoint: str, home: Path, *, timeout: float = 5.0
) -> None:
    """Point the real ``huggingface_hub`` client at ``endpoint`` alone, with its cache and token under ``home``.

    For a pytest fixture: ``monkeypatch`` undoes it all. The client reads its environment once, at import,
    so its ``constants`` are patched as well as the environment variables: code that builds ``HfApi()`` or
    calls ``hf_hub_download`` without ``endpoint=`` reaches the test server, and no token from the machine
    leaks in. ``timeout`` bounds the metadata (HEAD) and download requests (``HF_HUB_ETAG_TIMEOUT`` and
    ``HF_HUB_DOWNLOAD_TIMEOUT``); ``HfApi`` calls have no timeout unless one is passed.
    """
    # Offline mode, or a token from the machine, would get in the way.
    unwanted = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    for name in unwanted:
        monkeypatch.delenv(name, raising=False)
    whole_seconds = str(math.ceil(timeout))  # the client parses these two with int()
    env = {"HF_ENDPOINT": endpoint, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1"}
    env |= {"HF_HUB_ETAG_TIMEOUT": whole_seconds, "HF_HUB_DOWNLOAD_TIMEOUT": whole_seconds}
    for name, value in env.items():  # for subprocesses: this process has read them already
        monkeypatch.setenv(name, value)
    patched = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_ETAG_TIMEOUT": timeout,
        "HF_HUB_DOWNLOAD_TIMEOUT": timeout,
    }
    for name, value in patched.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)  # the instance behind huggingface_hub.model_info & co
