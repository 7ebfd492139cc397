"""Hub source against the Hub-compatible test server, through the real huggingface_hub
client over HTTP: registration by commit sha, adapter files only, fault storms, and
hostile listings. The catalog is a real SQLite file."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from datetime import timedelta
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import HfApi
from hub_server import HubServer, isolate_hub_client
from sqlalchemy import select

from builders import build_adapter, build_tiny_model
from group_runs import record_past_run
from iteris_daemon.catalog import Catalog
from iteris_daemon.catalog.models import Adapter, AdapterRevision, AdapterStatus, Source, SourceKind
from iteris_daemon.catalog.registry import add_source
from iteris_daemon.adapter_config import sha256_file
from iteris_daemon import logs
from iteris_daemon.retry import Interrupted, hub_retrying
import iteris_daemon.sources.hub as hub_module
from iteris_daemon.sources.hub import HubSource, unsafe_path
from iteris_daemon.validation import Limits
from polling import wait_for

pytestmark = pytest.mark.timeout(120)
TOKEN = "hf_secret_source_token"
# The client's read timeout. A stalled download is held until the client gives up, so this
# is no race against the server: generous, so that no other request times out on a loaded machine.
TIMEOUT = 5.0


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub-src")
    base = build_tiny_model("bert", root / "base")
    adapters = [build_adapter(base, root / f"lora{i}", seed=i, family="bert", r=2 + i) for i in range(2)]
    return base, adapters


def adapter_files(folder: Path, extra: dict[str, bytes] | None = None) -> dict[str, bytes]:
    files = {name: (folder / name).read_bytes()
             for name in ("adapter_config.json", "adapter_model.safetensors", "calibration.jsonl")}
    return {**files, "README.md": b"---\nlibrary_name: peft\n---\n# a LoRA\n", **(extra or {})}


@pytest.fixture
def env(monkeypatch, tmp_path, made):
    base, adapters = made
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)  # an open token file is refused, as ssh refuses an open key
    with HubServer(token=TOKEN) as hub:
        isolate_hub_client(monkeypatch, hub.endpoint, tmp_path / "hf-home", timeout=TIMEOUT)
        catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")

        def source(stopping: threading.Event | None = None, **settings) -> HubSource:
            with catalog.session() as session:
                add_source(session, "hub", SourceKind.hub, {
                    "endpoint": hub.endpoint, "token_file": str(token_file), "base_model": str(base),
                    "retry_base_seconds": 0.05, "retry_cap_seconds": 0.5, **settings})
            return HubSource(catalog, "hub", tmp_path / "cache", stopping=stopping)

        yield hub, catalog, source, adapters, tmp_path
        catalog.close()


def _adapters(catalog) -> dict[str, Adapter]:
    with catalog.session() as session:
        rows = session.scalars(select(Adapter)).all()
        for row in rows:
            _ = row.revisions
        return {row.locator: row for row in rows}


def _source_row(catalog) -> Source:
    with catalog.session() as session:
        return session.scalar(select(Source))


def test_new_repo_and_new_commit_are_registered_with_their_sha(env):
    hub, catalog, source, (first, second), tmp = env
    sha1 = hub.create_repo_direct("alice/sentiment", adapter_files(first, {"notes/big.bin": b"x" * 5000}))
    hub.create_repo_direct("alice/not-an-adapter", {"model.safetensors": b"\x00" * 16})
    poller = source(author="alice")
    report = poller.poll()
    assert report.registered == ["alice/sentiment"] and not report.rejected
    revision = _adapters(catalog)["alice/sentiment"].current
    assert revision.revision == sha1 and revision.status is AdapterStatus.registered
    assert revision.rank == 2 and revision.has_calibration
    # Only the adapter's own files were fetched, pinned to the commit.
    fetched = {r.path.rsplit("/", 1)[-1] for r in hub.requests_matching(r"^GET /alice/sentiment/resolve/")}
    assert fetched == {"adapter_config.json", "adapter_model.safetensors", "calibration.jsonl"}
    assert all(f"/resolve/{sha1}/" in r.path for r in hub.requests_matching(r"/resolve/"))
    assert not hub.requests_matching(r"^(GET|HEAD) /alice/not-an-adapter/resolve/")

    assert poller.poll().unchanged == 1  # same head: no download, no new row
    assert len(hub.requests_matching(r"^GET /alice/sentiment/resolve/")) == 3

    # A new commit (someone retrained the LoRA) and a new repo.
    sha2 = hub.commit_direct("alice/sentiment", {"adapter_model.safetensors": (second / "adapter_model.safetensors").read_bytes(),
                                                 "adapter_config.json": (second / "adapter_config.json").read_bytes()})
    hub.create_repo_direct("alice/topic", adapter_files(first))
    report = poller.poll()
    assert sorted(report.registered) == ["alice/sentiment", "alice/topic"]
    adapter = _adapters(catalog)["alice/sentiment"]
    assert [r.revision for r in adapter.revisions] == [sha1, sha2] and adapter.current.rank == 3
    assert _source_row(catalog).healthy
    # The cache keeps the registered commit of each repo, not every commit ever polled.
    assert sorted(p.name for p in (tmp / "cache" / "alice--sentiment").iterdir()) == [sha2]


def test_explicit_repo_list_with_branch_and_removal(env):
    hub, catalog, source, (first, _), tmp = env
    hub.create_repo_direct("bob/a", adapter_files(first))
    dev = hub.create_branch_direct("bob/a", "dev")
    poller = source(repos=["bob/a@dev"])
    assert poller.poll().registered == ["bob/a@dev"]
    assert _adapters(catalog)["bob/a@dev"].current.revision == dev
    hub.commit_direct("bob/a", {}, ["adapter_model.safetensors", "adapter_config.json", "calibration.jsonl"],
                      branch="dev")
    report = poller.poll()
    assert report.rejected == ["bob/a@dev"]
    assert "adapter_config.json" in _adapters(catalog)["bob/a@dev"].current.reason


def test_a_named_repo_whose_adapter_is_in_a_subfolder_is_rejected_naming_the_spec_to_use(env):
    """An adapter in a subfolder (a Trainer's ``checkpoint-500/``) is polled where the settings
    name its folder; a repo named at its top says which name to give (found by QA: it said
    "not a PEFT adapter repo", which was untrue)."""
    hub, catalog, source, (first, _), tmp = env
    hub.create_repo_direct("bob/ckpt", {f"checkpoint-500/{name}": data for name, data in adapter_files(first).items()})
    assert source(repos=["bob/ckpt"]).poll().rejected == ["bob/ckpt"]
    assert _adapters(catalog)["bob/ckpt"].current.reason.endswith(
        "no adapter_config.json at the top of the repo; checkpoint-500/adapter_config.json is an adapter in a "
        "subfolder: name it in the source's repos as bob/ckpt/checkpoint-500")


def _in(folder: str, files: dict[str, bytes]) -> dict[str, bytes]:
    return {f"{folder}/{name}": data for name, data in files.items()}


def test_adapters_in_subfolders_of_one_repo_are_registered_each_under_its_folder(env, made):
    """One repo holding several tasks' LoRAs, each in its folder: each folder the settings
    name is an adapter of its own, registered at the repo's commit with only its files
    fetched, loadable by PEFT from the cache; a commit to one folder leaves the cache holding
    the new commit alone, with both adapters' files; a folder emptied is rejected."""
    from peft import PeftModel
    from transformers import AutoModel

    hub, catalog, source, (first, second), tmp = env
    sha1 = hub.create_repo_direct("bob/tasks", {**_in("sst2", adapter_files(first)),
                                                **_in("news/deep", adapter_files(second)), "README.md": b"# tasks"})
    source(repos=["bob/tasks/sst2", "bob/tasks/news/deep/"])  # a trailing slash names the same folder
    cache = tmp / "cache" / "hub"  # as the daemon's, for `sources remove`
    poller = HubSource(catalog, "hub", cache)
    assert sorted(poller.poll().registered) == ["bob/tasks/news/deep", "bob/tasks/sst2"]
    adapters = _adapters(catalog)
    sst2, news = adapters["bob/tasks/sst2"].current, adapters["bob/tasks/news/deep"].current
    assert (sst2.revision, sst2.rank, news.revision, news.rank) == (sha1, 2, sha1, 3) and sst2.has_calibration
    assert sst2.files_path == str(cache / "bob--tasks" / sha1 / "sst2")
    assert sha256_file(Path(news.files_path) / "adapter_model.safetensors") == sha256_file(second / "adapter_model.safetensors")
    fetched = {r.path.split(f"/resolve/{sha1}/", 1)[1] for r in hub.requests_matching(r"^GET /bob/tasks/resolve/")}
    weights_downloads = lambda folder: len(  # noqa: E731
        hub.requests_matching(rf"^GET /bob/tasks/resolve/\w+/{folder}/adapter_model.safetensors"))
    assert fetched == {f"{folder}/{name}" for folder in ("sst2", "news/deep")
                       for name in ("adapter_config.json", "adapter_model.safetensors", "calibration.jsonl")}
    PeftModel.from_pretrained(AutoModel.from_pretrained(made[0]), news.files_path)
    assert poller.poll().unchanged == 2

    sha2 = hub.commit_direct("bob/tasks", _in("sst2", adapter_files(second)))  # sst2 retrained
    assert sorted(poller.poll().registered) == ["bob/tasks/news/deep", "bob/tasks/sst2"]
    adapters = _adapters(catalog)
    assert adapters["bob/tasks/sst2"].current.rank == 3 and adapters["bob/tasks/news/deep"].current.revision == sha2
    # news/deep's weights are the registered ones (the listing's sha256 says so): linked, not downloaded again
    assert (weights_downloads("sst2"), weights_downloads("news/deep")) == (2, 1)
    assert [p.name for p in (cache / "bob--tasks").iterdir()] == [sha2]
    assert all((cache / "bob--tasks" / sha2 / folder / "adapter_model.safetensors").is_file()
               for folder in ("sst2", "news/deep"))
    with catalog.session() as session:  # what `sources remove` cleans up
        assert hub_module.download_folders(session, "hub") == {cache / "bob--tasks"}

    assert poller.watches("bob/tasks") and poller.poll_repo("bob/tasks").unchanged == 2  # a webhook polls both
    hub.commit_direct("bob/tasks", {}, [f"news/deep/{name}" for name in adapter_files(second) if name != "README.md"])
    assert poller.poll().rejected == ["bob/tasks/news/deep"]
    assert _adapters(catalog)["bob/tasks/news/deep"].current.reason.endswith(
        "no news/deep/adapter_config.json in the repo (not a PEFT adapter's folder)")


def test_an_adapter_in_a_subfolder_whose_files_are_gone_is_fetched_again_alone(env):
    """Files gone from one folder of a commit: that adapter is downloaded again, and the other
    folder's files, which runs may be copying, are left as they are."""
    hub, catalog, source, (first, second), tmp = env
    hub.create_repo_direct("bob/two", {**_in("a", adapter_files(first)), **_in("b", adapter_files(second))})
    poller = source(repos=["bob/two/a", "bob/two/b"])
    poller.poll()
    adapters = _adapters(catalog)
    kept = Path(adapters["bob/two/b"].current.files_path) / "adapter_model.safetensors"
    written = kept.stat().st_mtime_ns
    shutil.rmtree(adapters["bob/two/a"].current.files_path)
    downloads = lambda folder: len(hub.requests_matching(rf"^GET /bob/two/resolve/\w+/{folder}/"))  # noqa: E731
    assert poller.poll().registered == ["bob/two/a"]
    assert (downloads("a"), downloads("b")) == (6, 3) and kept.stat().st_mtime_ns == written
    assert sha256_file(Path(adapters["bob/two/a"].current.files_path) / "adapter_model.safetensors") == \
        adapters["bob/two/a"].current.content_sha256


@pytest.mark.parametrize("registered_copy", ["intact", "damaged at its size", "cut short"])
def test_weights_a_new_commit_keeps_are_linked_only_when_the_registered_copy_is_the_listed_one(env, registered_copy):
    """A commit to another folder of the repo: the folder whose weights it keeps links the
    registered commit's copy, hashed against the listing first, and asks the Hub nothing for
    them (the client, handed a file, may copy one of its own cache into it in place: through
    a link, into the registered copy; QA RV2). A registered copy that is not the listed one
    is not linked: the weights are downloaded, and the registered copy is left as it is."""
    hub, catalog, source, (first, second), tmp = env
    hub.create_repo_direct("liz/two", {**_in("a", adapter_files(first)), **_in("b", adapter_files(second))})
    poller = source(repos=["liz/two/a", "liz/two/b"])
    poller.poll()
    registered = Path(_adapters(catalog)["liz/two/b"].current.files_path) / "adapter_model.safetensors"
    data = registered.read_bytes()
    if registered_copy == "damaged at its size":
        registered.write_bytes(data[:-4] + bytes(4 * [0xFF]))
    elif registered_copy == "cut short":
        registered.write_bytes(data[:-8])
    before = registered.read_bytes()
    witness = tmp / "witness"  # the registered copy, after its commit's folder is dropped
    os.link(registered, witness)
    sha2 = hub.commit_direct("liz/two", _in("a", adapter_files(second)))
    poller.poll()
    now = Path(_adapters(catalog)["liz/two/b"].current.files_path) / "adapter_model.safetensors"
    asked = hub.requests_matching(rf"^(GET|HEAD) /liz/two/resolve/{sha2}/b/adapter_model.safetensors")
    assert now.parent.parent.name == sha2 and now.read_bytes() == data
    assert (len(asked), now.stat().st_ino == witness.stat().st_ino) == (
        (0, True) if registered_copy == "intact" else (2, False))  # the client's HEAD, then its GET
    assert witness.read_bytes() == before  # never written through


def test_one_adapter_named_by_an_author_s_listing_and_by_the_settings_or_two_sources_is_taken_once(env):
    """``author = "bob"`` beside ``repos = ["bob/a@main"]`` registered bob/a twice, and two
    sources naming ``bob/a`` and ``bob/a@main`` gave a group both as inputs: merged twice
    (QA RV2). The settings' spelling names it in one source; a group takes one per location."""
    from iteris_daemon import runner

    hub, catalog, source, (first, _), tmp = env
    hub.create_repo_direct("bob/a", adapter_files(first))
    assert source(author="bob", repos=["bob/a@main"]).poll().registered == ["bob/a@main"]
    settings = {**_source_row(catalog).settings, "author": None, "repos": ["bob/a"]}
    with catalog.session() as session:
        add_source(session, "other", SourceKind.hub, settings)
    assert HubSource(catalog, "other", tmp / "cache").poll().registered == ["bob/a"]
    with catalog.session() as session:
        pairs = runner.merge_candidates(session)
        assert len(pairs) == 2 and [a.locator for a, _ in runner._one_per_location(pairs)] == ["bob/a"]  # the newer


def test_an_adapter_at_the_top_whose_files_are_gone_leaves_its_subfolders_adapters_alone(env):
    """A repo with an adapter at its top and one in a subfolder (a Trainer's checkpoint):
    files gone from the top one deleted the whole commit folder, the checkpoint's registered
    files with it (QA SF); now only the top adapter's own files are fetched again."""
    hub, catalog, source, (first, second), tmp = env
    hub.create_repo_direct("bob/top", {**adapter_files(first), **_in("checkpoint-500", adapter_files(second))})
    poller = source(repos=["bob/top", "bob/top/checkpoint-500"])
    assert sorted(poller.poll().registered) == ["bob/top", "bob/top/checkpoint-500"]
    adapters = _adapters(catalog)
    kept = Path(adapters["bob/top/checkpoint-500"].current.files_path) / "adapter_model.safetensors"
    written = kept.stat().st_mtime_ns
    (Path(adapters["bob/top"].current.files_path) / "adapter_model.safetensors").unlink()
    assert poller.poll().registered == ["bob/top"]
    assert kept.stat().st_mtime_ns == written
    assert len(hub.requests_matching(r"^GET /bob/top/resolve/\w+/checkpoint-500/")) == 3


def test_two_spellings_of_a_repo_s_case_keep_their_cache_folders_apart(env):
    """The Hub ignores case; SQLite's LIKE too: the cache folder ``Acme--Tasks`` got the paths
    of ``acme--tasks``, and dropping its unused commits raised (QA SF: the poll failed, a
    removal lost the poll's report, `sources remove` exited with a traceback). The test Hub
    minds case, so it serves the repo under both spellings."""
    hub, catalog, source, (first, second), tmp = env
    files = {**_in("sst2", adapter_files(first)), **_in("news", adapter_files(second))}
    for spelling in ("acme/tasks", "Acme/Tasks"):
        hub.create_repo_direct(spelling, files)
    poller = source(repos=["acme/tasks/sst2", "Acme/Tasks/news"])
    assert sorted(poller.poll().registered) == ["Acme/Tasks/news", "acme/tasks/sst2"]
    assert _source_row(catalog).healthy and poller.poll().unchanged == 2
    assert poller.watches("ACME/TASKS")  # a webhook's spelling finds the repo, as the settings' check does


def test_an_adapter_in_a_folder_whose_name_holds_an_at_sign_is_not_given_a_spec_that_names_a_branch(env):
    hub, catalog, source, (first, _), tmp = env
    hub.create_repo_direct("bob/sweep", _in("lora@r16", adapter_files(first)))
    assert source(repos=["bob/sweep"]).poll().rejected == ["bob/sweep"]
    assert _adapters(catalog)["bob/sweep"].current.reason.endswith(
        "lora@r16/adapter_config.json is an adapter in a subfolder whose name holds '@', which a source's repos "
        "cannot name")


@pytest.mark.parametrize("specs", [["acme/x/s", "acme/x/s/"], ["acme/x@dev", "Acme/X@dev"], ["acme/x", "acme/x@main"]])
def test_one_adapter_named_twice_is_refused(specs):
    """Named twice, it was registered twice and merged twice (QA SF). Folders and branches
    mind case, as git does."""
    from pydantic import ValidationError

    from iteris_daemon.sources.hub import HubSettings

    with pytest.raises(ValidationError, match=re.escape(f"{specs[1]!r} names the adapter {specs[0]!r} names too")):
        HubSettings(repos=specs)
    assert HubSettings(repos=["acme/x/s", "acme/x/S", "acme/x@Dev", "acme/x@dev"]).repos[1] == "acme/x/S"


def test_the_commit_folder_of_an_adapter_is_the_outermost_one_under_the_repo_s():
    from iteris_daemon.sources.hub import _commit_folder

    commit = Path("/cache/hub/acme--x") / ("a" * 40)
    assert _commit_folder(commit / "hub" / "exp1" / ("b" * 40)) == commit  # subfolders named like the cache's
    assert _commit_folder(commit) == commit and _commit_folder(Path("/srv/loras") / ("a" * 40)) is None


@pytest.mark.parametrize("spec, parsed, locator", [
    ("acme/x", ("acme/x", None, None), "acme/x"),
    ("acme/x@dev", ("acme/x", None, "dev"), "acme/x@dev"),
    ("acme/x/checkpoint-500", ("acme/x", "checkpoint-500", None), "acme/x/checkpoint-500"),
    ("acme/x/tasks/news/@feature/y", ("acme/x", "tasks/news", "feature/y"), "acme/x/tasks/news@feature/y"),
    ("acme/x/", ("acme/x", None, None), "acme/x"),
])
def test_repo_specs_name_a_folder_and_a_branch(spec, parsed, locator):
    from types import SimpleNamespace

    from iteris_daemon.catalog.models import SourceKind
    from iteris_daemon.runner import origin
    from iteris_daemon.sources.hub import HubSettings
    from iteris_daemon.sources.repo_spec import RepoSpec

    assert tuple(RepoSpec.parse(spec)) == parsed and RepoSpec.parse(spec).locator == locator
    assert HubSettings(repos=[spec]).repos == [locator]
    hub_adapter = SimpleNamespace(source=SimpleNamespace(kind=SourceKind.hub), locator=locator)
    assert origin(hub_adapter, SimpleNamespace(revision="f" * 40)) == (
        f"hf://acme/x@{'f' * 40}" + (f"/{parsed[1]}" if parsed[1] else ""))  # as HfFileSystem names it


@pytest.mark.parametrize("spec", ["acme/x/../y", "acme/x//y", "acme/x/./y", "acme/x/a\\b", "acme/x/y@", "acme"])
def test_a_repo_spec_naming_no_folder_a_repo_can_hold_is_refused(spec):
    from pydantic import ValidationError

    from iteris_daemon.sources.hub import HubSettings

    with pytest.raises(ValidationError, match=re.escape(repr(spec))):
        HubSettings(repos=[spec])


def _naming_base(folder: Path, base: str) -> dict[str, bytes]:
    """The adapter's files, its config naming ``base`` as its base model."""
    config = json.loads((folder / "adapter_config.json").read_text())
    return adapter_files(folder, {"adapter_config.json": json.dumps({**config, "base_model_name_or_path": base}).encode()})


def test_an_authors_adapters_are_judged_against_the_sources_base_whatever_base_they_name(env, caplog):
    """An author's listing: the source's base model decides, as for a named repo, so an
    adapter naming the base by its Hub id (the source names a local copy) registers with a
    WARNING naming both; a new commit spelling the base otherwise stays registered; one of
    another model is rejected with the reason, its files not kept. Before the fix those
    were skipped at DEBUG: never registered, a registered one marked ``removed``, and each
    commit of another model's adapter left its folder in the cache (found by QA)."""
    hub, catalog, source, (first, second), tmp = env
    hub.create_repo_direct("acme/task0", _naming_base(first, "acme/tiny-bert"))
    hub.create_repo_direct("acme/task1", adapter_files(second))
    gpt2 = build_tiny_model("gpt2", tmp / "gpt2")
    hub.create_repo_direct("acme/gpt2-lora", adapter_files(build_adapter(gpt2, tmp / "gpt2-lora", seed=0, family="gpt2")))
    poller = source(author="acme")
    with caplog.at_level("WARNING", logger="iteris_daemon"):
        report = poller.poll()
    assert sorted(report.registered) == ["acme/task0", "acme/task1"] and report.rejected == ["acme/gpt2-lora"]
    assert "names base model 'acme/tiny-bert', not the source's" in caplog.text
    assert "GPT2Model is for gpt2 models, the base model is bert" in _adapters(catalog)["acme/gpt2-lora"].current.reason
    assert not (tmp / "cache" / "acme--gpt2-lora").exists()
    hub.commit_direct("acme/task1", _naming_base(second, "Acme/Tiny-Bert"))
    report = poller.poll()
    assert report.registered == ["acme/task1"] and not report.removed
    assert {a.locator: a.status for a in _adapters(catalog).values()} == {
        "acme/task0": AdapterStatus.registered, "acme/task1": AdapterStatus.registered,
        "acme/gpt2-lora": AdapterStatus.rejected}


def test_an_authors_adapter_of_another_hub_model_is_rejected_without_its_weights(env):
    """Where the source's base model and the one an adapter names are both Hub ids and
    differ, the adapter is of another model: rejected from its config alone, its weights never
    downloaded (an organisation's adapters of other models each cost a weights download once
    every base was judged on its shapes)."""
    hub, catalog, source, (first, _), tmp = env
    hub.create_repo_direct("acme/gpt2-lora", _naming_base(first, "openai-community/gpt2"))
    report = source(author="acme", base_model="acme/tiny-bert").poll()
    assert report.rejected == ["acme/gpt2-lora"] and not report.registered
    assert _adapters(catalog)["acme/gpt2-lora"].current.reason.endswith(
        "an adapter of openai-community/gpt2, not of this source's base model acme/tiny-bert")
    assert not hub.requests_matching(r"acme/gpt2-lora/resolve/.*adapter_model\.safetensors")
    assert hub.requests_matching(r"acme/gpt2-lora/resolve/.*adapter_config\.json")


def test_an_unchanged_authors_repos_cost_one_listing_a_poll(env):
    """The listing gives each repo's head: a head whose verdict stands needs no request more.
    Each poll asked every repo's model_info, N + 1 requests a poll for an organisation of N
    unchanged adapters (about 11,500 a day for 40 at the default interval: found by QA)."""
    hub, catalog, source, (first, second), tmp = env
    for n, adapter in enumerate((first, second, first)):
        hub.create_repo_direct(f"acme/task{n}", adapter_files(adapter))
    poller = source(author="acme")
    assert sorted(poller.poll().registered) == ["acme/task0", "acme/task1", "acme/task2"]

    def infos() -> int:
        return len(hub.requests_matching(r"^GET /api/models/acme/"))

    before = infos()
    report = poller.poll()
    assert report.unchanged == 3 and not report.changed and infos() == before
    hub.commit_direct("acme/task1", adapter_files(first))  # a new head: read as before
    report = poller.poll()
    assert report.registered == ["acme/task1"] and report.unchanged == 2 and infos() == before + 1


def test_a_repo_the_settings_name_is_judged_as_named_when_the_source_has_an_author_too(env):
    """``repos`` and ``author`` together: a named repo that holds no adapter is rejected with
    that reason, as without an author. Before, every repo was taken as found in the
    author's listing and skipped silently, then reported "no such repo or branch, or this
    source's token cannot read it" (found by QA); an author's repo without one is still
    skipped without a word."""
    hub, catalog, source, (first, _), tmp = env
    hub.create_repo_direct("partner/notes", {"README.md": b"# notes\n"})
    hub.create_repo_direct("alice/a", adapter_files(first))
    report = source(author="alice", repos=["partner/notes"]).poll()
    assert report.registered == ["alice/a"] and report.rejected == ["partner/notes"]
    assert "no adapter_config.json" in _adapters(catalog)["partner/notes"].current.reason
    assert _source_row(catalog).healthy


def test_a_429_and_500_storm_is_survived_with_backoff(env, monkeypatch):
    hub, catalog, source, (first, _), tmp = env
    sha = hub.create_repo_direct("carol/lora", adapter_files(first))
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)  # record the back-off instead of waiting
    hub.inject(r"^GET /api/models/carol/lora", ("status", 429, {"Retry-After": "0.3"}), times=2)
    hub.inject(r"^GET /api/models/carol/lora", ("status", 500), times=2)
    hub.inject(r"^GET /carol/lora/resolve/", ("status", 503), times=2)
    hub.inject(r"^HEAD /carol/lora/resolve/", ("drop",), times=1)
    poller = source(repos=["carol/lora"])
    report = poller.poll()
    assert report.registered == ["carol/lora"]
    assert _adapters(catalog)["carol/lora"].current.revision == sha
    assert 0.3 in slept  # Retry-After honoured
    assert len(hub.requests_matching(r"^GET /api/models/carol/lora")) == 5  # 4 faults, then success
    assert _source_row(catalog).healthy


@pytest.mark.parametrize("fault", [("stall",), ("truncate", 100), ("drop",)], ids=["timeout", "truncated", "dropped"])
def test_a_broken_weights_download_is_retried_never_recorded_as_a_bad_adapter(env, fault):
    """The weights' download stalls until the client's read timeout ends it (the server
    holds it until the client closes the connection), stops after 100 bytes, or loses
    its connection, once. The retry fetches the whole file: the revision is registered
    with the right content, not rejected as truncated; exactly one retry."""
    hub, catalog, source, (first, _), tmp = env
    sha = hub.create_repo_direct("dave/lora", adapter_files(first))
    hub.inject(r"^GET /dave/lora/resolve/[0-9a-f]+/adapter_model\.safetensors", fault, times=1)
    report = source(repos=["dave/lora"]).poll()
    assert report.registered == ["dave/lora"] and not report.rejected
    current = _adapters(catalog)["dave/lora"].current
    assert current.revision == sha and current.content_sha256 == sha256_file(first / "adapter_model.safetensors")
    weights = hub.requests_matching(r"^GET /dave/lora/resolve/[0-9a-f]+/adapter_model")
    assert len(weights) == 2 and weights[1].status == 200, weights
    if fault[0] in ("stall", "drop"):
        assert weights[0].status is None


def test_a_hub_failing_a_files_head_is_reported_as_the_hubs_failure(env, bounded):
    """The Hub fails a file's HEAD (here 429s) past the retries: the client raises
    LocalEntryNotFoundError, a FileNotFoundError, which the source reported as "its
    folder was removed while being fetched or checked" (found by QA). It is the HTTP
    failure, retried as such, and the next poll registers the repo."""
    hub, catalog, source, (first, _), tmp = env
    bounded(TIMEOUT)  # the daemon's client: the source's retries are the only ones
    hub.create_repo_direct("erin/a", adapter_files(first))
    # the client asks a failed HEAD once more itself, at once: 2 per attempt
    hub.inject(r"^HEAD /erin/a/resolve/", ("status", 429, {"Retry-After": "0"}), times=6)
    poller = source(repos=["erin/a"], retry_attempts=3)
    report = poller.poll()
    assert not report.registered and not report.rejected
    error = _source_row(catalog).last_error
    assert error.startswith("erin/a: HTTP 429 (gave up after retries)") and "removed" not in error, error
    assert len(hub.requests_matching(r"^HEAD /erin/a/resolve/")) == 6
    assert poller.poll().registered == ["erin/a"]


def test_a_repo_gated_for_the_sources_token_is_a_failure_not_a_removal(env):
    """The Hub answered one poll's model_info with 403 GatedRepo (access not granted, or
    taken away): the client's GatedRepoError is a RepositoryNotFoundError, so the adapter was
    marked removed and its groups published a merge without it, then merged it back at the
    next good poll: two published versions, one missing a task (QA HUB)."""
    hub, catalog, source, (first, _), tmp = env
    sha = hub.create_repo_direct("erin/g", adapter_files(first))
    poller = source(repos=["erin/g"])
    assert poller.poll().registered == ["erin/g"]
    hub.inject(r"^GET /api/models/erin/g", ("status", 403, {"X-Error-Code": "GatedRepo"}), times=1)
    report = poller.poll()
    assert not report.removed and not report.changed
    adapter = _adapters(catalog)["erin/g"]
    assert adapter.status is AdapterStatus.registered and adapter.current.revision == sha
    assert _source_row(catalog).last_error.startswith("erin/g: HTTP 403")
    assert poller.poll().unchanged == 1 and _source_row(catalog).healthy


def test_a_poll_that_finds_nothing_new_says_so_at_debug(env, caplog):
    """An INFO line per source and scheduled poll, every 5 minutes for months, said "0
    registered ... 1 unchanged" (QA HUB); what a poll registered, rejected or failed, and
    every webhook poll, is still INFO."""
    hub, catalog, source, (first, _), tmp = env
    hub.create_repo_direct("erin/q", adapter_files(first))
    poller = source(repos=["erin/q"])
    with caplog.at_level("DEBUG", logger="iteris_daemon.sources.hub"):
        poller.poll()
        poller.poll()
    said = [(r.levelno, r.getMessage()) for r in caplog.records if r.getMessage().startswith("source hub: poll: ")]
    assert said == [(logging.INFO, "source hub: poll: 1 registered, 0 rejected, 0 removed, 0 unchanged, 0 waiting"),
                    (logging.DEBUG, "source hub: poll: 0 registered, 0 rejected, 0 removed, 1 unchanged, 0 waiting")]


def test_a_rate_limit_inside_a_download_waits_as_the_source_says(env, bounded, caplog):
    """The Hub answers a download's HEAD and GET with 429 and an hour's Retry-After (or its
    ``RateLimit: "api";r=0;t=N`` header). huggingface_hub's client retried those itself,
    sleeping Retry-After + 1 s up to 5 times where no stop reached it and the source's
    ``retry_cap_seconds`` did not apply: a daemon told to stop went on for hours (QA HUB).
    The daemon's client answers them at once, the source's retries wait at most
    ``retry_cap_seconds``."""
    hub, catalog, source, (first, _), tmp = env
    bounded(TIMEOUT)
    hub.create_repo_direct("erin/r", adapter_files(first))
    hub.inject(r"^HEAD /erin/r/resolve/", ("status", 429, {"Retry-After": "3600"}), times=2)  # the client asks twice
    hub.inject(r"^GET /erin/r/resolve/[0-9a-f]+/adapter_model", ("status", 429, {"RateLimit": '"api";r=0;t=3600'}),
               times=1)
    with caplog.at_level("INFO"):
        assert source(repos=["erin/r"]).poll().registered == ["erin/r"]
    assert "Rate limited" not in caplog.text  # the client's own wait
    assert caplog.text.count("HTTP 429, retry 1 in 0.5s") == 2, caplog.text  # the source's, capped


def test_a_stop_ends_a_rate_limit_wait_inside_a_download(env, bounded):
    """The other half of the test above: with an hour's ``retry_cap_seconds``, a stop ends
    the wait for a rate-limited download's HEAD (the client's own wait ignored it)."""
    hub, catalog, source, (first, _), tmp = env
    bounded(TIMEOUT)
    hub.create_repo_direct("erin/s", adapter_files(first))
    hub.inject(r"^HEAD /erin/s/resolve/", ("status", 429, {"Retry-After": "3600"}), times=100)
    stop, reports = threading.Event(), []
    polling = threading.Thread(target=lambda: reports.append(
        source(stopping=stop, repos=["erin/s"], retry_cap_seconds=3600.0).poll()), daemon=True)
    polling.start()
    while not hub.requests_matching(r"^HEAD /erin/s/resolve/") and polling.is_alive():
        time.sleep(0.05)
    stop.set()
    polling.join(30)  # a guard against waiting out the hour, not a timing
    assert not polling.is_alive(), "still waiting out Retry-After after the stop"
    # The client asks a failed HEAD once more at once, itself: sent where it goes before the stop, refused
    # after it (no request is sent once the daemon stops, retry.requests_bounded)
    assert len(hub.requests_matching(r"^HEAD /erin/s/resolve/")) in (1, 2) and not reports[0].registered


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json"], ids=["lfs-sha256", "git-sha1"])
def test_a_download_other_than_the_listing_says_is_removed_and_fetched_again(env, name):
    """The server (or a proxy on the way) answers a file's download with other bytes of the
    same size, once; the client checks only sizes. The source checks each download against
    the listing's hash (the weights: their LFS sha256; the config: its git blob sha1): the
    file is removed, the repo neither registered nor rejected (no verdict on bytes the Hub
    did not list), the source unhealthy with the reason. The next poll fetches it again
    and registers the listed content. Without the check the weights were registered with
    the wrong content, and the config's revision rejected as unreadable JSON."""
    hub, catalog, source, (first, _), tmp = env
    sha = hub.create_repo_direct("dave/lora", adapter_files(first))
    hub.inject(rf"^GET /dave/lora/resolve/[0-9a-f]+/{re.escape(name)}$", ("corrupt",), times=1)
    poller = source(repos=["dave/lora"])
    report = poller.poll()
    assert not report.registered and not report.rejected and not _adapters(catalog)
    row = _source_row(catalog)
    assert not row.healthy and f"{name} as downloaded has" in row.last_error, row.last_error
    assert "where the listing says" in row.last_error
    assert not (tmp / "cache" / "dave--lora" / sha / name).exists()

    assert poller.poll().registered == ["dave/lora"]
    current = _adapters(catalog)["dave/lora"].current
    assert current.revision == sha and current.content_sha256 == sha256_file(first / "adapter_model.safetensors")
    assert _source_row(catalog).healthy
    assert len(hub.requests_matching(rf"^GET /dave/lora/resolve/[0-9a-f]+/{re.escape(name)}$")) == 2


def test_a_source_that_keeps_failing_is_unhealthy_then_recovers(env, monkeypatch):
    hub, catalog, source, (first, _), tmp = env
    hub.create_repo_direct("dave/lora", adapter_files(first))
    monkeypatch.setattr(time, "sleep", lambda s: None)
    poller = source(repos=["dave/lora"], retry_attempts=3)
    hub.inject(r"^GET /api/models/dave/lora", ("status", 503), times=3)
    report = poller.poll()
    assert not report.registered
    row = _source_row(catalog)
    assert not row.healthy and "503" in row.last_error and TOKEN not in row.last_error
    assert not _adapters(catalog)  # a failing repo is neither registered nor removed
    assert poller.poll().registered == ["dave/lora"]
    assert _source_row(catalog).healthy and _source_row(catalog).last_error is None


def test_a_catalog_that_refuses_a_registration_makes_the_source_unhealthy_naming_it(env, monkeypatch):
    """The catalog refusing to record a polled adapter (a full disk under SQLite; the error is
    injected into the write, the poll is real HTTP): the source's health names the catalog
    and the cause in the folder source's words, not a Hub failure of the repo
    ("dave/lora: OperationalError"); the next poll that goes through registers it."""
    from sqlalchemy.exc import OperationalError
    from iteris_daemon.sources import hub as hub_source

    hub, catalog, source, (first, _), tmp = env
    hub.create_repo_direct("dave/lora", adapter_files(first))
    poller = source(repos=["dave/lora"])

    def refused(*args, **kwargs):
        raise OperationalError("INSERT INTO adapter_revisions", {}, OSError("database or disk is full"))

    with monkeypatch.context() as patch:  # not monkeypatch.undo(): it would undo the fixture's Hub client setup too
        patch.setattr(hub_source, "record", refused)
        assert not poller.poll().registered
    row = _source_row(catalog)
    assert not row.healthy and row.last_error == (f"cannot register adapters in the catalog {catalog.safe_url}: "
                                                  "(builtins.OSError) database or disk is full")
    assert poller.poll().registered == ["dave/lora"]
    assert _source_row(catalog).healthy


def test_a_malicious_path_in_a_listing_is_refused(env):
    hub, catalog, source, (first, _), tmp = env
    hub.create_repo_direct("eve/lora", adapter_files(first, {"../../escape.txt": b"pwned"}))
    poller = source(repos=["eve/lora"])
    report = poller.poll()
    assert report.rejected == ["eve/lora"]
    assert "unsafe file path" in _adapters(catalog)["eve/lora"].current.reason
    assert not hub.requests_matching(r"/resolve/")  # nothing was downloaded
    assert not list(tmp.rglob("escape.txt"))


def test_pickled_only_repo_is_rejected_without_download(env):
    hub, catalog, source, (first, _), tmp = env
    files = adapter_files(first)
    files["adapter_model.bin"] = files.pop("adapter_model.safetensors")
    hub.create_repo_direct("mallory/lora", files)
    report = source(repos=["mallory/lora"]).poll()
    assert report.rejected == ["mallory/lora"]
    assert "pickled" in _adapters(catalog)["mallory/lora"].current.reason
    assert not hub.requests_matching(r"adapter_model\.bin")


@pytest.mark.parametrize("name,unsafe", [
    ("adapter_config.json", False), ("sub/dir/file.json", False), ("../x", True), ("/etc/passwd", True),
    ("a/../../b", True), ("a\\b", True), ("C:/x", True), ("a//b", True), ("ok\x00", True), ("", True),
    ("\ud800", True), ("a/\udcff.json", True), ("données/é.json", False),
])
def test_unsafe_path(name, unsafe):
    assert unsafe_path(name) is unsafe


def test_token_never_reaches_logs_or_catalog(env, caplog, monkeypatch):
    hub, catalog, source, (first, _), tmp = env
    monkeypatch.setattr(time, "sleep", lambda s: None)
    hub.create_repo_direct("frank/lora", adapter_files(first))
    hub.inject(r"^GET /api/models/frank/lora", ("status", 500), times=10)
    with caplog.at_level("DEBUG"):
        poller = source(repos=["frank/lora"], retry_attempts=2)
        poller.poll()
        poller.poll()
    assert TOKEN not in caplog.text
    for path in tmp.glob("catalog.db*"):  # the database and its WAL
        assert TOKEN not in path.read_bytes().decode("latin-1")
    assert json.dumps(_source_row(catalog).settings).find(TOKEN) == -1


@pytest.mark.parametrize("content", [TOKEN + "\n# rotated by ops\n", TOKEN + "\x00", "Bearer " + TOKEN])
def test_a_token_file_holding_more_than_a_token_is_refused_without_quoting_it(env, content):
    """A second line or a control character made an HTTP header the client refused with an
    error quoting the header, token included, which went into the source's health and a
    run's error (retried six times as a transport error; found in review)."""
    hub, catalog, source, (first, _), tmp = env
    hub.create_repo_direct("frank/lora", adapter_files(first))
    (tmp / "token").write_text(content)
    source(repos=["frank/lora"], retry_attempts=2).poll()
    row = _source_row(catalog)
    assert not row.healthy and "holds more than a token" in row.last_error
    for path in tmp.glob("catalog.db*"):
        assert TOKEN not in path.read_bytes().decode("latin-1")


def test_errors_are_stored_with_tokens_redacted(env):
    """Whatever quotes a token on its way into the catalog (which `status` prints) is redacted there."""
    from iteris_daemon.catalog.registry import set_health

    _, catalog, source, _, _ = env
    source(repos=["frank/lora"])
    source_id = _source_row(catalog).id
    token = "hf_AbCdEf0123456789AbCdEf0123456789"  # the Hub's token format, which the redaction knows
    with catalog.session() as session:
        set_health(session, source_id, f"LocalProtocolError: Illegal header value b'Bearer {token}'")
    assert token not in _source_row(catalog).last_error and "hf_***" in _source_row(catalog).last_error


def _poll_while_stopping(poller: HubSource, stop_after: float):
    """Poll in a thread, set the source's stop event ``stop_after`` s in (as SIGTERM
    does in the daemon); the report, and the seconds the poll went on after the stop."""
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(report=poller.poll()), daemon=True)
    thread.start()
    time.sleep(stop_after)
    poller.stopping.set()
    stopped = time.monotonic()
    thread.join(timeout=30)  # it went on for minutes before (retries within retries, no timeout)
    assert not thread.is_alive(), "the poll did not end after the stop"
    return outcome["report"], time.monotonic() - stopped


def test_a_stop_ends_a_poll_whose_listing_keeps_failing_at_once(env):
    """SIGTERM while every listing answers 500 (an unreachable Hub): no retry after the stop,
    no retries of the client's own inside the daemon's (they made it 36 requests and
    169 s of waits), and the adapters already registered stay registered."""
    hub, catalog, source, (first, _), tmp = env
    hub.create_repo_direct("acme/lora", adapter_files(first))
    poller = source(author="acme", stopping=threading.Event(), retry_base_seconds=1.0, retry_cap_seconds=60.0)
    assert poller.poll().registered == ["acme/lora"]
    hub.inject(r"^GET /api/models$", ("status", 500), times=1000)
    listed = len(hub.requests_matching(r"^GET /api/models$"))
    report, after_stop = _poll_while_stopping(poller, stop_after=1.5)
    assert not (report.registered or report.rejected or report.removed)
    # 1.5 s hold the first attempt and (unless slow) the one after a 1 s wait; none after the stop.
    assert 1 <= len(hub.requests_matching(r"^GET /api/models$")) - listed <= 2
    assert after_stop < 10  # about 0: the backoff wait (2 s) is cut short
    assert _adapters(catalog)["acme/lora"].status is AdapterStatus.registered
    row = _source_row(catalog)
    assert not row.healthy and "interrupted" in row.last_error


def test_a_stop_during_a_hanging_request_ends_the_poll_after_the_request_timeout(env):
    """A request the Hub never answers is given up after ``timeout_seconds`` (it had no
    timeout: a stop waited for it forever); the repos the poll did not reach are not removed."""
    hub, catalog, source, (first, _), tmp = env
    hub.create_repo_direct("acme/a", adapter_files(first))
    hub.create_repo_direct("acme/b", adapter_files(first))
    poller = source(repos=["acme/a", "acme/b"], stopping=threading.Event(), timeout_seconds=1.0)
    assert sorted(poller.poll().registered) == ["acme/a", "acme/b"]
    hub.inject(r"^GET /api/models/acme/a", ("stall",), times=1000)
    report, after_stop = _poll_while_stopping(poller, stop_after=0.5)
    assert not (report.registered or report.rejected or report.removed)
    # The first poll's, and the stalled one (logged once the server sees the client hang up).
    assert len(hub.requests_matching(r"^GET /api/models/acme/a")) <= 2
    assert not hub.requests_matching(r"^GET /api/models/acme/b")[1:]  # not polled after the stop
    assert after_stop < 10
    adapters = _adapters(catalog)
    assert {adapters[name].status for name in ("acme/a", "acme/b")} == {AdapterStatus.registered}
    assert "interrupted" in _source_row(catalog).last_error


def test_a_stop_during_a_stalled_download_sends_no_resume(env, bounded):
    """The weights' GET stalls: the client resumed it 5 times on its own, a minute at its
    10 s timeout, before the daemon's stop was looked at. Now no request is sent once the
    daemon stops: the stalled GET is the only one, and nothing is judged."""
    hub, catalog, source, (first, _), tmp = env
    bounded(TIMEOUT)  # the daemon's client
    hub.create_repo_direct("acme/a", adapter_files(first))
    hub.inject(r"^GET /acme/a/resolve/[0-9a-f]+/adapter_model\.safetensors", ("stall",), times=1000)
    poller = source(repos=["acme/a"], stopping=threading.Event(), timeout_seconds=1.0)
    report, _ = _poll_while_stopping(poller, stop_after=0.5)
    assert not (report.registered or report.rejected or report.removed)
    weights = r"^GET /acme/a/resolve/[0-9a-f]+/adapter_model"
    wait_for(lambda: hub.requests_matching(weights), what="the stalled GET to be logged")
    time.sleep(2)  # a resume would come 1 s after the GET gave up
    assert len(hub.requests_matching(weights)) == 1
    assert not _adapters(catalog) and "interrupted" in _source_row(catalog).last_error


def test_a_downloads_reads_wait_at_most_the_sources_timeout(env, bounded, monkeypatch, caplog):
    """A download's GET took the client's own timeout (HF_HUB_DOWNLOAD_TIMEOUT, here a minute)
    whatever ``timeout_seconds`` said: a Hub answering after 30 s held the poll 30 s. Given up
    after the source's 1 s (the client says so, and resumes), the adapter is registered."""
    from huggingface_hub import constants

    hub, catalog, source, (first, _), tmp = env
    bounded(TIMEOUT)
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 60)
    hub.create_repo_direct("acme/a", adapter_files(first))
    hub.inject(r"^GET /acme/a/resolve/[0-9a-f]+/adapter_model\.safetensors", ("delay", 30), times=1)
    with caplog.at_level(logging.WARNING, logger="huggingface_hub.file_download"):
        assert source(repos=["acme/a"], timeout_seconds=1.0).poll().registered == ["acme/a"]
    given_up = [m for m in caplog.messages if "adapter_model.safetensors: timed out" in m]
    assert len(given_up) == 1 and "Trying to resume download" in given_up[0], caplog.messages


def test_hub_retrying_stops_waiting_and_attempting_once_stopping():
    stopping, calls = threading.Event(), []

    def failing():
        calls.append(time.monotonic())
        raise httpx2.ConnectError("refused")

    threading.Timer(0.2, stopping.set).start()
    started = time.monotonic()
    with pytest.raises(httpx2.ConnectError):  # no second attempt: the failure whose wait the stop ended
        hub_retrying("test", attempts=6, base_seconds=30.0, stopping=stopping)(failing)  # (was Interrupted: a race)
    assert len(calls) == 1 and time.monotonic() - started < 10  # the 30 s wait ended at the stop
    with pytest.raises(Interrupted):  # once stopping, nothing is attempted
        hub_retrying("test", stopping=stopping)(failing)
    assert len(calls) == 1

    stopping, calls = threading.Event(), []

    def failing_while_stopping():
        calls.append(time.monotonic())
        stopping.set()  # the stop came during this attempt
        raise httpx2.ConnectError("refused")

    with pytest.raises(httpx2.ConnectError):  # its failure is the answer, not retried
        hub_retrying("test", attempts=6, base_seconds=30.0, stopping=stopping)(failing_while_stopping)
    assert len(calls) == 1


def test_a_source_is_busy_while_it_polls(env, monkeypatch):
    """``busy`` (the daemon's catalog check waits while a source of its own polls) holds
    during a poll's repos, also when the poll fails, and not after."""
    hub, catalog, source, (first, second), tmp = env
    hub.create_repo_direct("alice/sentiment", adapter_files(first))
    poller = source(author="alice")
    seen = []
    real = poller._poll_repo
    monkeypatch.setattr(poller, "_poll_repo", lambda *args: (seen.append(poller.busy), real(*args))[1])
    assert not poller.busy
    assert poller.poll().registered == ["alice/sentiment"]
    assert seen == [True] and not poller.busy
    monkeypatch.setattr(poller, "_mark_removed", lambda *args: 1 / 0)  # a bug of the poll's own
    with pytest.raises(ZeroDivisionError):
        poller.poll()
    assert not poller.busy


def test_a_listed_repo_or_branch_that_is_not_there_makes_the_source_unhealthy(env):
    """A mistyped repo id or branch in `repos` (or a private repo the token cannot read)
    was polled as "gone": nothing registered, no warning, and the source healthy."""
    hub, catalog, source, (first, _), tmp = env
    hub.create_repo_direct("bob/a", adapter_files(first))
    poller = source(repos=["bob/a", "bob/typo-lora", "bob/a@no-such-branch"])
    report = poller.poll()
    assert report.registered == ["bob/a"]
    row = _source_row(catalog)
    assert not row.healthy
    assert row.last_error == "bob/typo-lora: no such repo or branch, or this source's token cannot read it"
    hub.create_repo_direct("bob/typo-lora", adapter_files(first))
    hub.create_branch_direct("bob/a", "no-such-branch")
    assert sorted(poller.poll().registered) == ["bob/a@no-such-branch", "bob/typo-lora"]
    assert _source_row(catalog).healthy


def test_a_failure_each_poll_finds_again_is_said_once_an_hour(env, caplog):
    """A repo named in the settings that is gone, and one whose Hub answers 503 past the
    retries: each poll said each again, an ERROR per repo and poll (288 a day at the default
    interval), after five WARNINGs of retries for the 503 (QA OPS). Now each is one ERROR, said
    again an hour later with how often it came back, and at once when it comes back after a
    poll without it; the retries are INFO; the source's health says it all along. The hour
    passes on a stand-in clock."""
    import logging

    hub, catalog, source, (first, _), tmp = env
    hub.create_repo_direct("bob/a", adapter_files(first))
    poller = source(repos=["bob/a", "bob/gone"], retry_attempts=2)
    now = [0.0]
    poller._errors = logs.Repeated(logging.getLogger("iteris_daemon.sources.hub"), hub_module.ERRORS_REPEATED_EVERY,
                                   clock=lambda: now[0])

    def said(level: int = logging.WARNING) -> list[str]:
        found = [r.getMessage() for r in caplog.records if r.levelno >= level]
        return found

    gone = "source hub: bob/gone: no such repo or branch, or this source's token cannot read it"
    with caplog.at_level(logging.DEBUG, logger="iteris_daemon"):
        for poll in range(4):
            now[0] = poll * 600.0
            caplog.clear()
            poller.poll()
            assert said() == ([gone] if poll == 0 else []), poll
            assert _source_row(catalog).last_error == gone.removeprefix("source hub: ")
        now[0] = 3600.0
        caplog.clear()
        poller.poll()
        assert said() == [f"{gone} (again 3 times since it was last said)"]
        hub.create_repo_direct("bob/gone", adapter_files(first))
        caplog.clear()
        poller.poll()  # back: forgotten, and said at once if it fails again
        assert said() == [] and _source_row(catalog).healthy
        hub.inject(r"^GET /api/models/bob/gone", ("status", 503), times=2)  # both attempts of the next poll
        caplog.clear()
        poller.poll()
        errors = said()
        assert len(errors) == 1 and errors[0].startswith("source hub: bob/gone: ") and "503" in errors[0], errors
        retries = [r for r in caplog.records if "retry 1 in" in r.getMessage()]
        assert [r.levelno for r in retries] == [logging.INFO], caplog.text


def test_a_webhook_polls_the_authors_repo_and_its_listed_branch(env):
    """With ``author = "dave"`` and ``repos = ["dave/x@dev"]``, a webhook for dave/x polled
    only the dev branch: a push to main waited for the next full poll."""
    hub, catalog, source, (first, second), tmp = env
    hub.create_repo_direct("dave/x", adapter_files(first))
    hub.create_branch_direct("dave/x", "dev")
    poller = source(author="dave", repos=["dave/x@dev"])
    assert sorted(poller.poll().registered) == ["dave/x", "dave/x@dev"]
    main = hub.commit_direct("dave/x", {"adapter_model.safetensors": (first / "adapter_model.safetensors").read_bytes()
                                        [:-4] + b"\x00\x00\x80\x3f"})
    report = poller.poll_repo("dave/x")
    assert report.registered == ["dave/x"] and report.unchanged == 1
    assert _adapters(catalog)["dave/x"].current.revision == main


def _hold_validation(monkeypatch, sha: str, meanwhile) -> None:
    """Run ``meanwhile(snapshot)`` once when a poll is about to validate commit ``sha``,
    with its files downloaded: another poll's turn, at the worst moment."""
    validate = hub_module.validate_adapter

    def held(snapshot, *args, **kwargs):
        if snapshot.name == sha and not held.done:
            held.done = True
            meanwhile(snapshot)
        return validate(snapshot, *args, **kwargs)

    held.done = False
    monkeypatch.setattr(hub_module, "validate_adapter", held)


def test_a_webhook_poll_waits_for_the_scheduled_poll_of_the_same_repo(env, monkeypatch):
    """A scheduled poll validating one push, and a webhook poll of the next push (another
    HubSource, as after a reload): the webhook's poll dropped the first poll's folder
    mid-validation, and the valid commit was rejected and the adapter withdrawn."""
    hub, catalog, source, (first, second), tmp = env
    hub.create_repo_direct("erin/a", adapter_files(first))
    scheduled = source(repos=["erin/a"])
    scheduled.poll()
    webhook = HubSource(catalog, "hub", tmp / "cache")
    sha1 = hub.commit_direct("erin/a", adapter_files(second))
    webhook_turn = threading.Event()  # the webhook's poll ended, or waits for the repo
    lock_of = hub_module.repo_lock

    def noting(folder: Path) -> threading.Lock:
        lock = lock_of(folder)
        if threading.current_thread().name == "webhook" and lock.locked():
            webhook_turn.set()
        return lock

    monkeypatch.setattr(hub_module, "repo_lock", noting)
    reports = {}

    def webhook_poll() -> None:
        reports["webhook"] = webhook.poll_repo("erin/a")
        webhook_turn.set()

    def push_and_webhook(snapshot: Path) -> None:
        reports["sha2"] = hub.commit_direct("erin/a", adapter_files(first, {"notes.md": b"v3"}))
        thread = threading.Thread(target=webhook_poll, name="webhook")
        thread.start()
        reports["thread"] = thread
        assert webhook_turn.wait(60)

    _hold_validation(monkeypatch, sha1, push_and_webhook)
    reports["scheduled"] = scheduled.poll()
    reports["thread"].join(60)
    assert reports["scheduled"].registered == ["erin/a"] and reports["webhook"].registered == ["erin/a"]
    assert not reports["scheduled"].rejected and not reports["webhook"].rejected
    adapter = _adapters(catalog)["erin/a"]
    assert adapter.status is AdapterStatus.registered and adapter.current.revision == reports["sha2"]
    assert [r.status for r in adapter.revisions] == [AdapterStatus.registered] * 3
    assert Path(adapter.current.files_path).is_dir() and _source_row(catalog).healthy


def test_a_poll_that_read_an_older_head_does_not_make_it_current(env, monkeypatch):
    """Two processes (or hosts) polling one repo into caches of their own take no turns:
    the one that read the older head and recorded it last made it current again."""
    hub, catalog, source, (first, second), tmp = env
    hub.create_repo_direct("erin/b", adapter_files(first))
    here = source(repos=["erin/b"])
    there = HubSource(catalog, "hub", tmp / "cache-elsewhere")
    sha1 = hub.commit_direct("erin/b", adapter_files(second))
    later = {}

    def newer_push_polled_there(snapshot: Path) -> None:
        later["sha2"] = hub.commit_direct("erin/b", adapter_files(first, {"notes.md": b"v3"}))
        later["report"] = there.poll()

    _hold_validation(monkeypatch, sha1, newer_push_polled_there)
    report = here.poll()
    assert later["report"].registered == ["erin/b"] and not report.registered and report.unchanged == 1
    adapter = _adapters(catalog)["erin/b"]
    assert adapter.current.revision == later["sha2"] and adapter.status is AdapterStatus.registered
    assert sha1 in [r.revision for r in adapter.revisions]  # recorded, as history
    assert here.poll().unchanged == 1  # and the head stays where it is


def test_a_commit_polled_after_the_clock_stepped_back_is_current(env):
    """The clock ran an hour ahead when a repo's head was registered, then NTP stepped it
    back: the next commit, polled "before" the old one, was recorded as history and runs
    merged the old weights for that hour."""
    hub, catalog, source, (first, second), tmp = env
    hub.create_repo_direct("erin/e", adapter_files(first))
    poller = source(repos=["erin/e"])
    assert poller.poll().registered == ["erin/e"]
    with catalog.session() as session:
        for row in session.scalars(select(AdapterRevision)):
            row.last_seen_at += timedelta(hours=1)
    sha = hub.commit_direct("erin/e", adapter_files(second))
    assert poller.poll().registered == ["erin/e"]
    assert _adapters(catalog)["erin/e"].current.revision == sha
    assert poller.poll().unchanged == 1


def test_files_removed_while_validating_are_no_verdict(env, monkeypatch):
    """Another process dropping the folder a poll is checking made the valid commit
    rejected ("no adapter_config.json") and the adapter withdrawn."""
    hub, catalog, source, (first, second), tmp = env
    sha0 = hub.create_repo_direct("erin/c", adapter_files(first))
    poller = source(repos=["erin/c"])
    poller.poll()
    sha1 = hub.commit_direct("erin/c", adapter_files(second))
    _hold_validation(monkeypatch, sha1, lambda snapshot: shutil.rmtree(snapshot))
    report = poller.poll()
    assert not report.rejected and not report.withdrawn and not report.registered
    adapter = _adapters(catalog)["erin/c"]
    assert adapter.status is AdapterStatus.registered and adapter.current.revision == sha0
    assert "removed while being fetched or checked" in _source_row(catalog).last_error
    assert poller.poll().registered == ["erin/c"]  # the next poll fetches it again
    assert _adapters(catalog)["erin/c"].current.revision == sha1 and _source_row(catalog).healthy


def test_two_branches_of_a_repo_keep_their_commits_in_the_cache(env):
    """The main branch (of the author's repos) and a listed branch share the repo's cache
    folder: registering a new main commit deleted the branch's files, and it stayed
    registered with files_path gone, never downloaded again."""
    hub, catalog, source, (first, second), tmp = env
    hub.create_repo_direct("erin/news", adapter_files(first))
    hub.create_branch_direct("erin/news", "v2")
    v2 = hub.commit_direct("erin/news", adapter_files(second), branch="v2")
    poller = source(author="erin", repos=["erin/news@v2"])
    assert sorted(poller.poll().registered) == ["erin/news", "erin/news@v2"]
    main = hub.commit_direct("erin/news", adapter_files(first, {"notes.md": b"retrained"}))
    assert poller.poll().registered == ["erin/news"]
    adapters = _adapters(catalog)
    assert adapters["erin/news"].current.revision == main
    assert adapters["erin/news@v2"].current.files_path == str(tmp / "cache" / "erin--news" / v2)
    # Each branch's commit stays; the old main commit, used by no branch, goes.
    assert sorted(p.name for p in (tmp / "cache" / "erin--news").iterdir()) == sorted([main, v2])
    assert sha256_file(Path(adapters["erin/news@v2"].current.files_path) / "adapter_model.safetensors") == \
        sha256_file(second / "adapter_model.safetensors")


def test_a_registered_commit_whose_files_are_gone_is_downloaded_again(env):
    """An emptied cache (``systemctl clean``, tmpfiles) left the commit registered with no
    files: polls said "unchanged" and every run held the adapter back until a new commit."""
    hub, catalog, source, (first, _), tmp = env
    sha = hub.create_repo_direct("erin/d", adapter_files(first))
    poller = source(repos=["erin/d"])
    poller.poll()
    registered = _adapters(catalog)["erin/d"].current
    downloads = lambda: len(hub.requests_matching(r"^GET /erin/d/resolve/"))  # noqa: E731
    assert downloads() == 3

    shutil.rmtree(tmp / "cache")
    assert poller.poll().registered == ["erin/d"]
    weights = Path(registered.files_path) / "adapter_model.safetensors"
    assert downloads() == 6 and sha256_file(weights) == registered.content_sha256
    assert poller.poll().unchanged == 1 and downloads() == 6  # present: a stat each, no download

    weights.write_bytes(weights.read_bytes()[:-8])  # not the registered size: fetched anew
    assert poller.poll().registered == ["erin/d"] and downloads() == 9
    adapter = _adapters(catalog)["erin/d"]
    assert [r.revision for r in adapter.revisions] == [sha] and adapter.status is AdapterStatus.registered
    assert sha256_file(weights) == registered.content_sha256


def test_a_commit_another_host_registered_is_downloaded_here(env):
    """Two daemons on one catalog: the second never downloaded what the first registered,
    so its runs looked for the files in the first host's cache."""
    hub, catalog, source, (first, _), tmp = env
    hub.create_repo_direct("erin/e", adapter_files(first))
    source(repos=["erin/e"]).poll()
    (tmp / "cache").rename(tmp / "cache-of-the-other-host")  # not on this host's disk
    here = HubSource(catalog, "hub", tmp / "cache-here")
    assert here.poll().registered == ["erin/e"]
    files = Path(_adapters(catalog)["erin/e"].current.files_path)
    assert files.parent.parent == tmp / "cache-here" and (files / "adapter_model.safetensors").is_file()
    assert here.poll().unchanged == 1


def test_the_cache_keeps_no_rejected_commit_nor_a_removed_repo(env):
    """Each commit the source refused stayed in the cache with its weights (a trainer that
    pushes a checkpoint an hour over the rank limit filled the disk), and so did the
    commits of a repo that went away. A commit a registered adapter uses stays."""
    hub, catalog, source, (first, second), tmp = env
    stable = hub.create_repo_direct("frank/t", adapter_files(first))
    hub.create_branch_direct("frank/t", "stable")
    source(repos=["frank/t", "frank/t@stable"])
    poller = HubSource(catalog, "hub", tmp / "cache", limits=Limits(max_rank=2))  # the second adapter is rank 3
    assert sorted(poller.poll().registered) == ["frank/t", "frank/t@stable"]
    folder = tmp / "cache" / "frank--t"
    downloads = lambda: len(hub.requests_matching(r"^GET /frank/t/resolve/"))  # noqa: E731
    for n in range(3):
        hub.commit_direct("frank/t", adapter_files(second, {"README.md": f"checkpoint {n}\n".encode()}))
        report = poller.poll()
        assert report.rejected == ["frank/t"] and "above the limit of 2" in _adapters(catalog)["frank/t"].current.reason
        assert [p.name for p in folder.iterdir()] == [stable]  # the stable branch's, no rejected commit's
    fetched = downloads()
    assert poller.poll().unchanged == 2 and downloads() == fetched  # a rejected verdict stands without its files
    assert _adapters(catalog)["frank/t@stable"].status is AdapterStatus.registered

    HfApi(endpoint=hub.endpoint, token=TOKEN).delete_repo("frank/t")
    assert sorted(poller.poll().removed) == ["frank/t", "frank/t@stable"]
    assert not folder.exists()


@pytest.mark.parametrize("history", [False, True], ids=["deleted", "kept-for-past-runs"])
def test_sources_remove_deletes_the_sources_downloads(env, history, capsys):
    """`sources remove` forgot a Hub source, and no poll visits its repos again: their
    downloads stayed in the daemon's cache for good. It now deletes them, and keeps every
    commit a registered adapter uses (here another source's, of a repo both polled), and a
    file or a symlink named like a commit (not a download)."""
    from iteris_daemon.cli import main

    hub, catalog, source, (first, second), tmp = env
    hub.create_repo_direct("gina/a", adapter_files(first))
    kept = hub.create_repo_direct("hank/b", adapter_files(second))
    cache = tmp / "cache" / "hub"  # as the daemon's: <cache_dir>/hub
    source(repos=["gina/a", "hank/b"])  # source "hub", removed below
    settings = {**_source_row(catalog).settings, "repos": ["hank/b"]}
    with catalog.session() as session:
        add_source(session, "other", SourceKind.hub, settings)
    for name in ("hub", "other"):
        assert HubSource(catalog, name, cache).poll().registered
    stray = cache / "gina--a" / ("0" * 40)
    stray.write_text("not a commit folder")
    (cache / "gina--a" / ("1" * 40)).symlink_to(tmp, target_is_directory=True)
    if history:  # a past merge run used the removed source's adapter: the source is disabled, not deleted
        used = _adapters(catalog)["gina/a"].current.id
        with catalog.session() as session:
            record_past_run(session, used)
    assert main(["sources", "remove", "hub", "--db", catalog.safe_url]) == 0
    assert capsys.readouterr().out == ("removed source hub; deleted 1 download from the cache; a running daemon stops "
                                       "watching it at its next catalog check ([daemon] catalog_check_seconds)\n")
    assert sorted(p.name for p in (cache / "gina--a").iterdir()) == ["0" * 40, "1" * 40]
    assert [p.name for p in (cache / "hank--b").iterdir()] == [kept]  # the other source's adapter uses it
