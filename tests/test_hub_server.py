"""The test Hub (hub_server.HubServer) against the real huggingface_hub client, over HTTP.

What these tests pin down about the client (huggingface_hub 2.4, transport httpx2), and so what code that
talks to the Hub must expect:

* ``HfApi.model_info``/``repo_info``/``create_commit``/``list_repo_refs`` make ONE request: a 429 or a 5xx
  raises ``HfHubHTTPError`` (status in ``e.response.status_code``, ``Retry-After`` in ``e.response.headers``),
  and a dropped or truncated response raises the transport's ``httpx2.RemoteProtocolError``. The caller retries.
* Paginated listings (``list_models``, ``list_repo_tree``/``list_repo_files``) and the preupload step of a
  commit go through ``http_backoff``: up to 5 retries on 408/429/500/502/503/504 and on transport errors,
  sleeping ``Retry-After + 1`` seconds on a 429 that carries it, else 1, 2, 4, 8 s.
* ``hf_hub_download`` (and each file of ``snapshot_download``): the metadata ``HEAD`` is not retried at first;
  after a 429/5xx or a timeout it is tried again at once, with back-off (``Retry-After + 1``, else 1, 2, 4... s).
  A connection dropped during the HEAD is NOT retried: ``httpx2.RemoteProtocolError`` escapes. The ``GET``
  of the file is resumed after a dropped connection, a truncated body or a read timeout, 5 times, 1 s apart
  (with ``Range: bytes=N-`` once a chunk got through), then the transport error escapes.
* A file is identified by ``X-Repo-Commit`` (the commit sha) and ``ETag`` (its git blob sha1); both are
  required on the HEAD. The client's timeouts are read once, at import: patch ``huggingface_hub.constants``
  (``isolate_hub_client`` does), environment variables set later do nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from hub_server import HubServer, git_blob_sha1, isolate_hub_client
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    RepoFile,
    RepoFolder,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session

pytestmark = pytest.mark.timeout(60)

TOKEN = "hf_test_token"
CARD = b"---\nlibrary_name: peft\ntags:\n- iteris\n---\n# Merged adapter\n"
ADAPTER = {
    "adapter_config.json": b'{"r": 8}',
    "adapter_model.safetensors": b"\x00" * 2048,
    "calibration/task_a.jsonl": b'{"text": "a"}\n',
    "calibration/nested/task_b.jsonl": b'{"text": "b"}\n',
}


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[HubServer]:
    with HubServer(token=TOKEN) as server:
        isolate_hub_client(monkeypatch, server.endpoint, tmp_path / "hf-home", timeout=1.0)
        yield server


@pytest.fixture
def api(hub: HubServer) -> HfApi:
    return HfApi(endpoint=hub.endpoint, token=TOKEN)


@pytest.fixture
def client_sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The client's back-off sleeps, recorded instead of slept (the server waits on an Event, unaffected)."""
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    return slept


def download(hub: HubServer, cache: Path, filename: str, repo_id: str = "alice/lora", **kwargs: object) -> bytes:
    path = hf_hub_download(repo_id, filename, endpoint=hub.endpoint, cache_dir=cache, token=TOKEN, **kwargs)
    return Path(path).read_bytes()


# ----------------------------------------------------------------------------------------------- repos, commits


def test_create_repo_commit_and_model_info_sha(hub: HubServer, api: HfApi) -> None:
    url = api.create_repo("lora-a")  # no namespace: the token's user
    assert url.repo_id == "test-user/lora-a"
    assert api.model_info("test-user/lora-a").siblings[0].rfilename == ".gitattributes"  # like the Hub

    files = {**ADAPTER, "README.md": CARD}
    info = api.create_commit(  # README.md makes the client validate its metadata first (/api/validate-yaml)
        "test-user/lora-a",
        [CommitOperationAdd(path, content) for path, content in files.items()],
        commit_message="Add adapter",
    )

    model = api.model_info("test-user/lora-a", files_metadata=True)
    assert model.sha == info.oid == hub.head("test-user/lora-a")
    assert {s.rfilename: s.size for s in model.siblings} == {
        ".gitattributes": len(hub.files("test-user/lora-a")[".gitattributes"]),
        **{path: len(content) for path, content in files.items()},
    }
    assert model.library_name == "peft" and model.tags == ["peft", "iteris"] and model.card_data.tags == ["iteris"]
    assert hub.files("test-user/lora-a", info.oid)["calibration/nested/task_b.jsonl"] == b'{"text": "b"}\n'
    assert model.author == "test-user" and model.private is False and model.last_modified is not None
    assert [c.title for c in api.list_repo_commits("test-user/lora-a")] == ["Add adapter", "initial commit"]
    brief = api.model_info("test-user/lora-a", expand=["sha", "lastModified"])
    assert brief.sha == info.oid and brief.last_modified == model.last_modified and brief.siblings is None

    # An unchanged file is skipped client-side (preupload returns its git oid): nothing to commit, same sha.
    unchanged = CommitOperationAdd("adapter_config.json", b'{"r": 8}')
    again = api.create_commit("test-user/lora-a", [unchanged], commit_message="noop")
    assert again.oid == info.oid

    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo("test-user/lora-a")
    assert conflict.value.response.status_code == 409
    assert api.create_repo("test-user/lora-a", exist_ok=True).repo_id == "test-user/lora-a"


def test_private_flag_datasets_and_delete_repo(hub: HubServer, api: HfApi, tmp_path: Path) -> None:
    api.create_repo("alice/calib", repo_type="dataset", private=True)
    api.upload_file(path_or_fileobj=b"x,y\n", path_in_repo="data.csv", repo_id="alice/calib", repo_type="dataset")

    assert api.dataset_info("alice/calib").private is True
    assert download(hub, tmp_path, "data.csv", "alice/calib", repo_type="dataset") == b"x,y\n"
    assert hub.requests_matching(r"^GET /datasets/alice/calib/resolve/main/data.csv$")

    api.delete_repo("alice/calib", repo_type="dataset")
    with pytest.raises(RepositoryNotFoundError):
        api.dataset_info("alice/calib")


def test_parent_commit_mismatch_raises_412(hub: HubServer, api: HfApi) -> None:
    base = hub.create_repo_direct("alice/lora", ADAPTER)
    hub.commit_direct("alice/lora", {"README.md": b"someone else"})  # the branch head moves

    with pytest.raises(HfHubHTTPError) as stale:
        api.create_commit(
            "alice/lora",
            [CommitOperationAdd("merged.safetensors", b"1")],
            commit_message="merge",
            parent_commit=base,
        )
    assert stale.value.response.status_code == 412
    assert "merged.safetensors" not in hub.files("alice/lora")

    fresh = api.create_commit(
        "alice/lora",
        [CommitOperationAdd("merged.safetensors", b"1")],
        commit_message="merge",
        parent_commit=hub.head("alice/lora"),
    )
    assert hub.head("alice/lora") == fresh.oid


def test_deletions(hub: HubServer, api: HfApi) -> None:
    hub.create_repo_direct("alice/lora", ADAPTER)

    api.create_commit(
        "alice/lora",
        [CommitOperationDelete("adapter_config.json"), CommitOperationDelete("calibration/")],
        commit_message="prune",
    )
    assert set(hub.files("alice/lora")) == {"adapter_model.safetensors"}

    with pytest.raises(RemoteEntryNotFoundError):
        api.create_commit("alice/lora", [CommitOperationDelete("nope.txt")], commit_message="prune again")


def test_branches_and_tags(hub: HubServer, api: HfApi) -> None:
    first = hub.create_repo_direct("alice/lora", ADAPTER)
    api.create_branch("alice/lora", branch="candidate")
    api.create_tag("alice/lora", tag="v1")
    second = api.create_commit(
        "alice/lora", [CommitOperationAdd("x.bin", b"x")], commit_message="on candidate", revision="candidate"
    ).oid

    refs = api.list_repo_refs("alice/lora")
    assert {b.name: b.target_commit for b in refs.branches} == {"main": first, "candidate": second}
    assert [(t.name, t.ref, t.target_commit) for t in refs.tags] == [("v1", "refs/tags/v1", first)]
    assert api.model_info("alice/lora", revision="candidate").sha == second
    assert api.model_info("alice/lora", revision="v1").sha == first

    with pytest.raises(HfHubHTTPError) as exists:
        api.create_tag("alice/lora", tag="v1")
    assert exists.value.response.status_code == 409
    with pytest.raises(RevisionNotFoundError):
        api.create_branch("alice/lora", branch="other", revision="no-such-rev")

    api.delete_tag("alice/lora", tag="v1")
    api.delete_branch("alice/lora", branch="candidate")
    refs = api.list_repo_refs("alice/lora")
    assert [b.name for b in refs.branches] == ["main"] and refs.tags == []

    hub.create_branch_direct("alice/lora", "pushed-elsewhere", revision=first)  # as another client would
    hub.create_tag_direct("alice/lora", "v2", revision="pushed-elsewhere")
    assert api.model_info("alice/lora", revision="v2").sha == first


# ------------------------------------------------------------------------------------------------------ reading


def test_list_models_by_author_search_filter_with_pagination(hub: HubServer, api: HfApi) -> None:
    hub.page_size = 2  # the client must follow the Link header
    for name in ("lora-a", "lora-b", "other"):
        hub.create_repo_direct(f"alice/{name}", ADAPTER, tags=["lora"] if name != "other" else [])
    hub.create_repo_direct("alice/secret-lora", ADAPTER, private=True, tags=["lora"])
    hub.create_repo_direct("bob/lora-c", ADAPTER, tags=["lora"])
    hub.commit_direct("alice/other", {"README.md": CARD})

    full = list(api.list_models(author="alice", full=True))
    assert [m.id for m in full] == ["alice/lora-a", "alice/lora-b", "alice/other", "alice/secret-lora"]
    assert all(m.sha == hub.head(m.id) and m.siblings for m in full)
    assert len(hub.requests_matching(r"^GET /api/models$")) == 2  # two pages

    assert [m.id for m in api.list_models(author="alice", filter="lora")] == [
        "alice/lora-a",
        "alice/lora-b",
        "alice/secret-lora",
    ]
    assert [m.id for m in api.list_models(search="lora-")] == ["alice/lora-a", "alice/lora-b", "bob/lora-c"]
    assert [m.id for m in api.list_models(filter=["peft", "iteris"])] == ["alice/other"]
    assert [m.id for m in api.list_models(author="alice", sort="last_modified", limit=2)] == [
        "alice/other",
        "alice/secret-lora",
    ]
    brief = next(iter(api.list_models(author="bob")))
    assert brief.tags == ["lora"] and brief.sha is None and brief.siblings is None  # the Hub's, without full=True
    anonymous = HfApi(endpoint=hub.endpoint, token=False)
    assert [m.id for m in anonymous.list_models(author="alice", filter="lora")] == ["alice/lora-a", "alice/lora-b"]


def test_list_repo_tree_is_recursive_with_subfolders(hub: HubServer, api: HfApi) -> None:
    hub.create_repo_direct("alice/lora", ADAPTER)

    assert sorted(api.list_repo_files("alice/lora")) == sorted(ADAPTER)
    top = {entry.path: entry for entry in api.list_repo_tree("alice/lora")}
    assert set(top) == {"adapter_config.json", "adapter_model.safetensors", "calibration"}
    assert isinstance(top["calibration"], RepoFolder)
    config = top["adapter_config.json"]
    assert isinstance(config, RepoFile) and config.size == 8 and config.blob_id == git_blob_sha1(b'{"r": 8}')
    assert [e.path for e in api.list_repo_tree("alice/lora", path_in_repo="calibration")] == [
        "calibration/nested",
        "calibration/task_a.jsonl",
    ]
    with pytest.raises(RemoteEntryNotFoundError):
        list(api.list_repo_tree("alice/lora", path_in_repo="nope"))


def test_snapshot_download_allow_patterns_fetches_only_matching_files(hub: HubServer, tmp_path: Path) -> None:
    sha = hub.create_repo_direct("alice/lora", ADAPTER)

    folder = Path(
        snapshot_download(
            "alice/lora",
            allow_patterns=["*.json", "calibration/*"],
            endpoint=hub.endpoint,
            cache_dir=tmp_path,
            token=TOKEN,
        )
    )

    wanted = {"adapter_config.json", "calibration/task_a.jsonl", "calibration/nested/task_b.jsonl"}
    assert folder.name == sha
    assert {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} == wanted
    assert (folder / "calibration/nested/task_b.jsonl").read_bytes() == ADAPTER["calibration/nested/task_b.jsonl"]
    fetched = hub.requests_matching(r"^GET /alice/lora/resolve/")
    assert {r.path.removeprefix(f"/alice/lora/resolve/{sha}/") for r in fetched} == wanted


def test_download_pinned_to_an_older_commit_gets_the_old_content(hub: HubServer, tmp_path: Path) -> None:
    old = hub.create_repo_direct("alice/lora", ADAPTER)
    assert download(hub, tmp_path, "adapter_config.json") == b'{"r": 8}'

    new_config = b'{"r": 16}'
    new = hub.commit_direct("alice/lora", {"adapter_config.json": new_config})

    assert download(hub, tmp_path, "adapter_config.json") == new_config
    assert download(hub, tmp_path, "adapter_config.json", revision=old) == b'{"r": 8}'
    head = get_session().head(f"{hub.endpoint}/alice/lora/resolve/main/adapter_config.json")
    assert head.headers["X-Repo-Commit"] == new
    assert head.headers["ETag"] == f'"{git_blob_sha1(new_config)}"'
    assert head.headers["Content-Length"] == str(len(new_config))


def test_range_requests_are_honoured_and_bodies_need_a_length(hub: HubServer) -> None:
    hub.create_repo_direct("alice/lora", {"w.bin": bytes(range(10))})
    url = f"{hub.endpoint}/alice/lora/resolve/main/w.bin"

    partial = get_session().get(url, headers={"Range": "bytes=4-"})

    assert partial.status_code == 206 and partial.content == bytes(range(4, 10))
    assert partial.headers["Content-Range"] == "bytes 4-9/10"
    assert get_session().get(url, headers={"Range": "bytes=20-"}).status_code == 416
    chunked = get_session().post(f"{hub.endpoint}/api/validate-yaml", content=iter([b"{}"]))
    assert chunked.status_code == 411


def test_typed_errors_for_missing_repo_revision_and_file(hub: HubServer, api: HfApi, tmp_path: Path) -> None:
    hub.create_repo_direct("alice/lora", ADAPTER)

    with pytest.raises(RepositoryNotFoundError):
        api.model_info("alice/nope")
    with pytest.raises(RepositoryNotFoundError):
        download(hub, tmp_path, "adapter_config.json", "alice/nope")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("alice/lora", revision="nope")
    with pytest.raises(RevisionNotFoundError):
        download(hub, tmp_path, "adapter_config.json", revision="nope")
    with pytest.raises(RemoteEntryNotFoundError):
        download(hub, tmp_path, "nope.json")
    assert api.repo_exists("alice/lora") and not api.repo_exists("alice/nope")
    assert api.file_exists("alice/lora", "calibration/task_a.jsonl") and not api.file_exists("alice/lora", "x")
    assert not api.revision_exists("alice/lora", "nope")


def test_private_repo_is_invisible_without_the_token(hub: HubServer, tmp_path: Path) -> None:
    hub.create_repo_direct("alice/secret", ADAPTER, private=True)
    anonymous = HfApi(endpoint=hub.endpoint, token=False)

    with pytest.raises(RepositoryNotFoundError) as hidden:  # 401, just like a repo that does not exist
        anonymous.model_info("alice/secret")
    assert hidden.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(
            "alice/secret", "adapter_config.json", endpoint=hub.endpoint, cache_dir=tmp_path, token=False
        )
    assert list(anonymous.list_models(author="alice")) == []

    with pytest.raises(HfHubHTTPError) as wrong:  # a bad token is refused outright, even on public repos
        HfApi(endpoint=hub.endpoint, token="hf_wrong").model_info("alice/secret")
    assert wrong.value.response.status_code == 401 and not isinstance(wrong.value, RepositoryNotFoundError)

    with pytest.raises(HfHubHTTPError) as write:
        anonymous.create_repo("alice/new")
    assert write.value.response.status_code == 401
    assert HfApi(endpoint=hub.endpoint, token=TOKEN).model_info("alice/secret").private is True
    assert HfApi(endpoint=hub.endpoint, token=TOKEN).whoami()["name"] == "test-user"


# --------------------------------------------------------------------------------------------------------- faults


def test_429_with_retry_after_is_survived_by_a_caller_that_retries(hub: HubServer, api: HfApi) -> None:
    sha = hub.create_repo_direct("alice/lora", ADAPTER)
    hub.inject(r"^GET /api/models/alice/lora$", ("status", 429, {"Retry-After": "1"}))

    waits: list[int] = []
    for _ in range(3):  # model_info makes a single request: retrying is the caller's job
        try:
            info = api.model_info("alice/lora")
            break
        except HfHubHTTPError as e:
            assert e.response.status_code == 429
            waits.append(int(e.response.headers["Retry-After"]))
            time.sleep(waits[-1])

    assert info.sha == sha and waits == [1]
    assert [r.status for r in hub.requests_matching(r"^GET /api/models/alice/lora$")] == [429, 200]


def test_client_retries_listings_and_downloads_itself(
    hub: HubServer, api: HfApi, tmp_path: Path, client_sleeps: list[float]
) -> None:
    hub.create_repo_direct("alice/lora", ADAPTER)

    hub.inject(r"^GET /api/models$", ("status", 429, {"Retry-After": "1"}))
    assert [m.id for m in api.list_models(author="alice")] == ["alice/lora"]
    assert client_sleeps == [2]  # Retry-After + 1

    client_sleeps.clear()
    hub.inject(r"^HEAD /alice/lora/resolve/", ("status", 503), times=2)
    assert download(hub, tmp_path, "adapter_config.json") == b'{"r": 8}'
    assert client_sleeps == [1]  # 1st 503: retried at once; 2nd: back-off 1 s
    assert [r.status for r in hub.requests_matching(r"^HEAD ")] == [503, 503, 200]


def test_500_surfaces_as_hf_hub_http_error(hub: HubServer, api: HfApi) -> None:
    hub.create_repo_direct("alice/lora", ADAPTER)
    hub.inject(r"^GET /api/models/alice/lora/refs$", ("status", 500))

    with pytest.raises(HfHubHTTPError) as failed:
        api.list_repo_refs("alice/lora")

    assert failed.value.response.status_code == 500
    assert [b.name for b in api.list_repo_refs("alice/lora").branches] == ["main"]  # fault spent


def test_dropped_connection_raises_then_a_retry_succeeds(hub: HubServer, api: HfApi, tmp_path: Path) -> None:
    sha = hub.create_repo_direct("alice/lora", ADAPTER)
    hub.inject(r"^HEAD /alice/lora/resolve/", ("drop",))
    hub.inject(r"^GET /api/models/alice/lora$", ("drop",))

    with pytest.raises(httpx2.RemoteProtocolError):  # not retried, not wrapped by the client
        download(hub, tmp_path, "adapter_config.json")
    with pytest.raises(httpx2.RemoteProtocolError):
        api.model_info("alice/lora")

    assert download(hub, tmp_path, "adapter_config.json") == b'{"r": 8}'
    assert api.model_info("alice/lora").sha == sha
    assert [r.status for r in hub.requests_matching(r"^HEAD ")] == [None, 200]


def test_truncated_download_is_resumed_then_raises_when_it_keeps_failing(
    hub: HubServer, tmp_path: Path, client_sleeps: list[float]
) -> None:
    hub.create_repo_direct("alice/lora", ADAPTER)
    weights = ADAPTER["adapter_model.safetensors"]

    hub.inject(r"^GET /alice/lora/resolve/", ("truncate", 100))
    assert download(hub, tmp_path / "a", "adapter_model.safetensors") == weights  # resumed by the client
    assert client_sleeps == [1]

    hub.inject(r"^GET /alice/lora/resolve/", ("truncate", 100), times=6)
    with pytest.raises(httpx2.RemoteProtocolError):
        download(hub, tmp_path / "b", "adapter_model.safetensors")
    assert client_sleeps == [1] * 6  # 1 + 5 resumes, then it gives up

    assert download(hub, tmp_path / "b", "adapter_model.safetensors") == weights


def test_truncated_commit_response_still_commits(hub: HubServer, api: HfApi) -> None:
    hub.create_repo_direct("alice/lora", ADAPTER)
    before = hub.head("alice/lora")
    hub.inject(r"^POST /api/models/alice/lora/commit/main$", ("truncate", 0))

    with pytest.raises(httpx2.RemoteProtocolError):
        api.create_commit("alice/lora", [CommitOperationAdd("merged.bin", b"m")], commit_message="merge")

    assert hub.head("alice/lora") != before  # the commit happened, only its response was lost
    assert hub.files("alice/lora")["merged.bin"] == b"m"


def test_delay_trips_client_timeouts(hub: HubServer, api: HfApi, tmp_path: Path) -> None:
    hub.create_repo_direct("alice/lora", ADAPTER)

    hub.inject(r"^GET /api/models/alice/lora$", ("delay", 1.0))
    with pytest.raises(httpx2.TimeoutException):
        api.model_info("alice/lora", timeout=0.3)

    hub.inject(r"^HEAD /alice/lora/resolve/", ("delay", 3.0))  # > the 1 s HF_HUB_ETAG_TIMEOUT of the fixture
    started = time.monotonic()
    assert download(hub, tmp_path, "adapter_config.json") == b'{"r": 8}'  # the HEAD timed out, was retried at once
    assert time.monotonic() - started < 2.5
    assert [r.status for r in hub.requests_matching(r"^HEAD ")] == [200]  # the delayed one was never answered


def test_requests_the_server_cannot_handle_fail_the_test(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="KeyError: 'name'"):
        with HubServer() as server:  # no token: every request is authenticated
            isolate_hub_client(monkeypatch, server.endpoint, tmp_path)
            assert HfApi().whoami(token="anything")["name"] == "test-user"  # HfApi() finds the server on its own
            assert get_session().post(f"{server.endpoint}/api/repos/create", json={}).status_code == 500


def test_inject_rejects_unknown_faults(hub: HubServer) -> None:
    with pytest.raises(ValueError):
        hub.inject("GET", ("explode",))
    with pytest.raises(ValueError):
        hub.inject("GET", ("status", "429"))
