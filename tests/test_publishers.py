"""The built-in publishers on real PEFT adapter folders: the folder publisher on the local
disk (versions, atomic ``current`` swap, pruning, crashes, refusals) and the Hub publisher
against the Hub-compatible test server through the real huggingface_hub client (one commit
per new adapter, model card, run tags, faults, lost answers, concurrent pushes, secrecy)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from hub_server import HubServer, isolate_hub_client
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError
from pydantic import ValidationError

from builders import build_adapter, build_tiny_model
from iteris_daemon.errors import ConfigError, OutputExistsError
from iteris_daemon.merge import AdapterSpec, MergeRequest, run_merge
from iteris_daemon.model_card import render_model_card
from iteris_daemon.plugin_manager import get_publisher
from iteris_daemon.publish import PublishedInput, Publisher, PublishRequest

pytestmark = pytest.mark.timeout(120)
TOKEN = "hf_publisher_secret_token_123"
REPO = "team/merged-news"
COMMITS = r"^POST /api/models/team/merged-news/commit/"


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny BERT and two merged-adapter folders as the merge leaves them (PEFT files plus a report)."""
    root = tmp_path_factory.mktemp("publish")
    base = build_tiny_model("bert", root / "base")
    merged = []
    for seed in (0, 1):
        folder = build_adapter(base, root / f"merged{seed}", seed=seed, family="bert", r=2 + seed)
        (folder / "calibration.jsonl").unlink()
        (folder / "merge_report.json").write_text(json.dumps({"strategy": "iteris", "seed": seed}))
        merged.append(folder)
    return base, merged[0], merged[1]


def request(adapter_dir: Path, base: Path, run_id: int = 1, group: str = "news") -> PublishRequest:
    return PublishRequest(
        adapter_dir=adapter_dir,
        group=group,
        run_id=run_id,
        base_model=str(base),
        strategy="iteris",
        params={"alpha": 0.5, "max_iterations": 3},
        inputs=[
            PublishedInput("sentiment", "hub", "alice/sentiment", "a" * 40),
            PublishedInput("topic", "local", "/data/topic|v2", "b" * 40),
        ],
        metrics={
            "sentiment": {"alignment_loss": [0.5, 0.125], "fidelity_gap": 0.0312},
            "topic": {"alignment_loss": [0.25], "fidelity_gap": 0.01},
        },
        dtype="bfloat16",
    )


def tree(root: Path) -> dict[str, tuple[int, int | str]]:
    """Every entry under ``root`` with its modification time and size or link target: any write shows."""
    found = {}
    for path in sorted(root.rglob("*")):
        stat = path.lstat()
        detail = os.readlink(path) if path.is_symlink() else stat.st_size
        found[str(path.relative_to(root))] = (stat.st_mtime_ns, detail)
    return found


# --------------------------------------------------------------------------------------------------- folder


def served(root: Path) -> str | None:
    """The version a folder destination serves: the folder ``current`` points at."""
    link = root / "current"
    return Path(os.readlink(link)).name if link.is_symlink() else None


@pytest.fixture
def folder() -> Publisher:
    return get_publisher("folder")


def test_both_publishers_are_registered_plugins():
    for kind in ("folder", "hub"):
        publisher = get_publisher(kind)
        assert isinstance(publisher, Publisher) and publisher.kind == kind and publisher.description
        assert publisher.Settings.model_config["extra"] == "forbid"
        assert all(f.description for f in publisher.Settings.model_fields.values())


def test_folder_settings_are_validated(folder, tmp_path):
    with pytest.raises(ValidationError):
        folder.Settings.model_validate({"path": str(tmp_path), "keep": -1})
    with pytest.raises(ValidationError):
        folder.Settings.model_validate({"path": str(tmp_path), "kept": 2})
    assert folder.Settings.model_validate({"path": str(tmp_path)}).keep == 3


def test_folder_publish_creates_a_version_and_current_that_peft_loads(folder, made, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    base, first, _ = made
    dest = tmp_path / "out" / "news"
    settings = folder.Settings(path=dest)
    assert served(settings.path) is None

    result = folder.publish(request(first, base, run_id=7), settings)

    assert result.changed and result.location == str(dest) and result.version.startswith("run-7-")
    assert os.readlink(dest / "current") == f"versions/{result.version}"  # relative: the folder can move
    assert sorted(p.name for p in (dest / "versions").iterdir()) == [result.version]
    published = dest / "versions" / result.version
    assert {p.name for p in published.iterdir()} == {p.name for p in first.iterdir()}
    for name in ("adapter_config.json", "adapter_model.safetensors", "merge_report.json"):
        assert (published / name).read_bytes() == (first / name).read_bytes()
    assert served(settings.path) == result.version

    model = PeftModel.from_pretrained(AutoModel.from_pretrained(base), str(dest / "current"))
    expected = PeftModel.from_pretrained(AutoModel.from_pretrained(base), str(first))
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert loaded and all(torch.equal(v, expected.state_dict()[k]) for k, v in loaded.items())


def test_identical_adapter_writes_nothing_and_a_new_one_moves_current(folder, made, tmp_path):
    base, first, second = made
    settings = folder.Settings(path=tmp_path / "dest")
    v1 = folder.publish(request(first, base, run_id=1), settings).version
    before = tree(tmp_path / "dest")

    again = folder.publish(request(first, base, run_id=2), settings)  # a new run, the same adapter
    assert not again.changed and again.version == v1
    assert tree(tmp_path / "dest") == before

    v3 = folder.publish(request(second, base, run_id=3), settings)
    assert v3.changed and v3.version.startswith("run-3-")
    assert served(settings.path) == v3.version
    current = tmp_path / "dest" / "current"
    assert (current / "adapter_model.safetensors").read_bytes() == (second / "adapter_model.safetensors").read_bytes()
    assert (tmp_path / "dest" / "versions" / v1).is_dir()  # the previous version is kept (keep=3)


def test_keep_prunes_the_oldest_versions_never_the_current_one(folder, made, tmp_path):
    base, first, second = made
    dest = tmp_path / "dest"
    settings = folder.Settings(path=dest, keep=1)
    versions = [folder.publish(request(adapter, base, run_id=run), settings).version
                for run, adapter in enumerate([first, second, first, second], start=1)]
    assert len(set(versions)) == 4
    assert sorted(p.name for p in (dest / "versions").iterdir()) == versions[2:]
    (dest / "versions" / "notes").mkdir()  # not named like a version: not ours to prune

    settings = folder.Settings(path=dest, keep=0)
    last = folder.publish(request(first, base, run_id=5), settings).version
    assert sorted(p.name for p in (dest / "versions").iterdir()) == ["notes", last]


def test_a_prune_that_fails_does_not_fail_the_publish(folder, made, tmp_path, monkeypatch, caplog):
    """An old version that cannot be deleted (an immutable file, say) raised after
    ``current`` had moved: the daemon recorded the run failed while consumers loaded its
    merge. The publish stands, with a warning, and the next publish prunes."""
    import iteris_daemon.plugins.publish_folder as publish_folder

    base, first, second = made
    dest = tmp_path / "dest"
    settings = folder.Settings(path=dest, keep=0)
    old = folder.publish(request(first, base, run_id=1), settings).version

    def refused(path, *args, **kwargs):
        raise PermissionError(1, "Operation not permitted", str(path))

    with monkeypatch.context() as patch:
        patch.setattr(publish_folder.shutil, "rmtree", refused)
        new = folder.publish(request(second, base, run_id=2), settings)
    assert new.changed and served(settings.path) == new.version
    assert (dest / "versions" / old).is_dir()
    assert any(r.levelname == "WARNING" and "could not prune old versions" in r.getMessage() for r in caplog.records)
    last = folder.publish(request(first, base, run_id=3), settings).version
    assert sorted(p.name for p in (dest / "versions").iterdir()) == [last]


def test_pruning_keeps_the_version_current_replaced(folder, made, tmp_path):
    """A version that was never current (a publish that failed after its copy, before its
    swap) is newer than the current one; the next publish with keep=1 must keep the version
    it replaces, which a consumer may still be loading, and prune the other (it pruned the
    replaced one; found in review)."""
    base, first, second = made
    dest = tmp_path / "dest"
    settings = folder.Settings(path=dest, keep=1)
    v1 = folder.publish(request(first, base, run_id=1), settings).version
    orphan = "run-2-29991231T000000.000000Z"  # and its clock ahead
    shutil.copytree(dest / "versions" / v1, dest / "versions" / orphan)
    v3 = folder.publish(request(second, base, run_id=3), settings).version
    assert sorted(p.name for p in (dest / "versions").iterdir()) == sorted([v1, v3])


def test_pruning_keeps_the_latest_versions_when_run_ids_start_again(folder, made, tmp_path):
    """A new catalog (its state folder lost, a move to PostgreSQL) numbers runs from 1
    again: pruning by run id kept the old catalog's versions for ever and deleted each new
    version as soon as it was replaced."""
    base, first, second = made
    dest = tmp_path / "dest"
    settings = folder.Settings(path=dest, keep=2)
    versions = [folder.publish(request((first, second)[index % 2], base, run_id=run), settings).version
                for index, run in enumerate([500, 501, 502, 1, 2, 3])]
    assert sorted(p.name for p in (dest / "versions").iterdir()) == sorted(versions[-3:])


def test_a_crash_leaves_current_on_the_old_complete_version(folder, made, tmp_path, monkeypatch):
    base, first, second = made
    dest = tmp_path / "dest"
    settings = folder.Settings(path=dest)
    old = folder.publish(request(first, base, run_id=1), settings).version

    # The disk full while copying: the partial copy is removed at once (it held the space the
    # disk's other users need, until a next publish: QA LEAK).
    real_copy = shutil.copyfile
    copied: list[str] = []

    def copy_then_die(src, dst, *args, **kwargs):
        if copied:
            raise OSError(28, "No space left on device")
        copied.append(str(src))
        return real_copy(src, dst, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(shutil, "copyfile", copy_then_die)
        with pytest.raises(OSError, match="No space left"):
            folder.publish(request(second, base, run_id=2), settings)
    assert not list((dest / "versions").glob(".staging-*"))
    # Killed while copying: the partial staging folder stays behind, for the next publish.
    (dest / "versions" / ".staging-0badc0de").mkdir()
    (dest / "versions" / ".staging-0badc0de" / "adapter_model.safetensors").write_bytes(b"cut short")

    # Killed at the swap: the new version is complete but `current` never moved.
    def no_replace(src, dst):
        raise OSError(5, "Input/output error")

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", no_replace)
        with pytest.raises(OSError, match="Input/output"):
            folder.publish(request(second, base, run_id=3), settings)

    assert served(settings.path) == old
    current = dest / "current"
    assert (current / "adapter_model.safetensors").read_bytes() == (first / "adapter_model.safetensors").read_bytes()
    assert not list(dest.glob(".current-*"))

    new = folder.publish(request(second, base, run_id=4), settings)
    assert new.changed and served(settings.path) == new.version
    assert not list((dest / "versions").glob(".staging-*"))
    assert (current / "adapter_model.safetensors").read_bytes() == (second / "adapter_model.safetensors").read_bytes()


def test_foreign_destinations_are_refused_untouched(folder, made, tmp_path):
    base, first, _ = made
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    with pytest.raises(OutputExistsError, match="notes.txt"):
        folder.publish(request(first, base), folder.Settings(path=a_file))
    assert a_file.read_text() == "mine"

    user_dir = tmp_path / "user"
    (user_dir / "current").mkdir(parents=True)
    (user_dir / "current" / "weights.bin").write_bytes(b"precious")
    before = tree(user_dir)
    with pytest.raises(OutputExistsError, match=r"user/current"):
        folder.publish(request(first, base), folder.Settings(path=user_dir))
    assert tree(user_dir) == before


# ------------------------------------------------------------------------------------------------------ hub


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with HubServer(token=TOKEN) as server:
        isolate_hub_client(monkeypatch, server.endpoint, tmp_path / "hf-home", timeout=2.0)
        yield server


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """Back-off sleeps, recorded instead of slept."""
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    return slept


@pytest.fixture
def hub_settings(hub, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)  # an open token file is refused, as ssh refuses an open key

    def make(**overrides):
        values = {"repo_id": REPO, "endpoint": hub.endpoint, "token_file": str(token_file),
                  "retry_base_seconds": 0.01, "retry_cap_seconds": 10.0, **overrides}
        return get_publisher("hub").Settings.model_validate(values)

    return make


def api(hub: HubServer) -> HfApi:
    return HfApi(endpoint=hub.endpoint, token=TOKEN)


def successful_commits(hub: HubServer) -> int:
    return sum(r.status == 200 for r in hub.requests_matching(COMMITS))


def history(hub: HubServer, branch: str = "main") -> list[str]:
    return [c.title for c in api(hub).list_repo_commits(REPO, revision=branch)]


def test_hub_settings_are_validated(hub_settings):
    with pytest.raises(ValidationError, match="OWNER/NAME"):
        hub_settings(repo_id="no-namespace")
    with pytest.raises(ValidationError):
        hub_settings(token="hf_inline")  # tokens live in a file or $HF_TOKEN, never in the config
    settings = hub_settings()
    assert settings.branch == "main" and settings.private and settings.tag_runs


def test_hub_publish_is_one_commit_with_card_and_run_tag(hub, hub_settings, made):
    base, first, _ = made
    publisher, settings = get_publisher("hub"), hub_settings()
    with pytest.raises(KeyError):  # no repo yet
        hub.head(REPO)

    result = publisher.publish(request(first, base, run_id=7), settings)

    assert result.changed and result.location == f"{REPO}@main" and result.version == hub.head(REPO)
    assert api(hub).model_info(REPO).private  # private unless asked otherwise
    assert successful_commits(hub) == 1 and len(hub.requests_matching(COMMITS)) == 1
    files = hub.files(REPO)
    assert files["adapter_model.safetensors"] == (first / "adapter_model.safetensors").read_bytes()
    own = json.loads((first / "adapter_config.json").read_text())  # it names the local base folder: by name
    assert json.loads(files["adapter_config.json"]) == {**own, "base_model_name_or_path": "local:base"}
    assert json.loads(files["merge_report.json"]) == json.loads((first / "merge_report.json").read_text())
    card = ModelCard(files["README.md"].decode())  # ours, not the README PEFT wrote
    assert card.data.base_model_relation == "merge" and card.data.library_name == "peft"
    assert card.data.base_model is None  # a local folder is no Hub repo id
    assert {"iteris-daemon", "lora", "merge", "iteris"} <= set(card.data.tags)
    refs = api(hub).list_repo_refs(REPO)
    assert {t.name: t.target_commit for t in refs.tags} == {"news-run-7": result.version}


def test_hub_publish_names_local_things_without_their_paths(hub, hub_settings, tmp_path):
    """A merge of local adapters, with their calibration files and a reference, on a local base:
    the Hub gets their names alone (a home folder or a user name in a path stays on this
    machine), the folder destination the merge's report with every path."""
    base = build_tiny_model("bert", tmp_path / "base")
    folders = [build_adapter(base, tmp_path / name, seed=seed, family="bert")
               for seed, name in enumerate(("sentiment", "topic", "before"))]
    merged = tmp_path / "merged"  # its config names the local base folder, as every input does
    report = run_merge(MergeRequest(base_model=str(base), adapters=[AdapterSpec(f) for f in folders[:2]], out=merged,
                                    strategy="task_arithmetic", reference=folders[2], quiet=True))
    assert str(tmp_path) in json.dumps(report)  # the merge's own report keeps the paths
    published = PublishRequest(  # the base by its folder, as the daemon's when the inputs name that folder
        adapter_dir=merged, group="news", run_id=1, base_model=str(base), strategy="task_arithmetic",
        params=report["params"], metrics=report["tasks"], dtype=report["dtype"],
        inputs=[PublishedInput(f.name, "local", str(f), "c" * 40) for f in folders[:2]])

    get_publisher("hub").publish(published, hub_settings())
    files = hub.files(REPO)
    assert {"README.md", "merge_report.json", "adapter_config.json"} <= set(files)
    assert not [name for name, data in files.items() if str(tmp_path).encode() in data]
    hub_report = json.loads(files["merge_report.json"])
    assert hub_report["base_model"] == "local:base" and hub_report["reference"]["path"] == "local:before"
    assert [(i["name"], i["path"], i["calibration"]["source"]) for i in hub_report["inputs"]] == [
        ("sentiment", "local:sentiment", "local:calibration.jsonl"),
        ("topic", "local:topic", "local:calibration.jsonl")]
    assert {k: v for k, v in hub_report.items() if k not in ("base_model", "inputs", "reference")} == {
        k: v for k, v in report.items() if k not in ("base_model", "inputs", "reference")}
    card = files["README.md"].decode()
    assert "| `sentiment` | `local` | `local:sentiment` | `cccccccccccc` |" in card and "of `local:base`" in card
    hub_config, own = json.loads(files["adapter_config.json"]), json.loads((merged / "adapter_config.json").read_text())
    assert own["base_model_name_or_path"] == str(base) and hub_config == {**own, "base_model_name_or_path": "local:base"}
    assert not get_publisher("hub").publish(published, hub_settings()).changed  # told unchanged by the copy's bytes
    assert len(hub.requests_matching(COMMITS)) == 1

    dest = tmp_path / "published"
    result = get_publisher("folder").publish(published, get_publisher("folder").Settings(path=dest))
    version = dest / "versions" / result.version
    assert (version / "merge_report.json").read_bytes() == (merged / "merge_report.json").read_bytes()
    assert str(folders[0] / "calibration.jsonl") in (version / "merge_report.json").read_text()


def test_same_adapter_is_not_committed_again_a_new_one_is(hub, hub_settings, made):
    base, first, second = made
    publisher, settings = get_publisher("hub"), hub_settings()
    v1 = publisher.publish(request(first, base, run_id=1), settings)

    again = publisher.publish(request(first, base, run_id=2), settings)
    assert not again.changed and again.version == v1.version
    assert len(hub.requests_matching(COMMITS)) == 1
    assert [t.name for t in api(hub).list_repo_refs(REPO).tags] == ["news-run-1"]

    one = dataclasses.replace(request(second, base, run_id=3), inputs=request(second, base).inputs[:1])
    v3 = publisher.publish(one, settings)
    assert v3.changed and v3.version == hub.head(REPO) != v1.version
    assert history(hub)[:2] == ["news: run 3 (iteris merge of 1 adapter)", "news: run 1 (iteris merge of 2 adapters)"]
    assert hub.files(REPO)["adapter_model.safetensors"] == (second / "adapter_model.safetensors").read_bytes()
    assert successful_commits(hub) == 2


def test_a_branch_holding_someone_elses_adapter_is_refused_untouched(hub, hub_settings, made):
    """A destination repo that already holds an adapter, or a model, no commit of iteris-daemon
    made (another team's, named by mistake): the publish is refused in one line naming the repo,
    the branch and what it holds, and nothing is committed. Before, its config, weights and
    README were replaced and its other files left beside the merge (found by QA). Our own
    branch with a commit of someone else on top (a card edited on the Hub) still publishes,
    the card regenerated."""
    base, first, second = made
    publisher = get_publisher("hub")
    theirs = {name: (second / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}
    hub.create_repo_direct("bob/sentiment", {**theirs, "README.md": b"# Bob's LoRA\n", "tokenizer.json": b"{}"})
    before = hub.files("bob/sentiment")
    with pytest.raises(OutputExistsError, match=r"^hub bob/sentiment@main holds an adapter or model \(adapter_config"
                                                r".json, adapter_model.safetensors, 2 other files\) that no commit of "):
        publisher.publish(request(first, base), hub_settings(repo_id="bob/sentiment"))
    assert hub.files("bob/sentiment") == before and not hub.requests_matching(r"^POST /api/models/bob/sentiment/commit/")
    # A full model's repo (QA HUB: the merge was put beside it, and its card replaced)
    hub.create_repo_direct("bob/model", {"config.json": b"{}", "model.safetensors": b"\0" * 16,
                                         "README.md": b"# DO NOT TOUCH\n"})
    with pytest.raises(OutputExistsError, match=r"^hub bob/model@main holds an adapter or model \(config.json, "
                                                r"model.safetensors, 1 other file\)"):
        publisher.publish(request(first, base), hub_settings(repo_id="bob/model"))
    assert not hub.requests_matching(r"^POST /api/models/bob/model/commit/")

    settings = hub_settings()
    publisher.publish(request(first, base, run_id=1), settings)
    hub.commit_direct(REPO, {"README.md": hub.files(REPO)["README.md"] + b"\n## Known limits, by hand\n"})
    assert publisher.publish(request(second, base, run_id=2), settings).changed
    assert b"by hand" not in hub.files(REPO)["README.md"]


def test_a_missing_branch_is_created_and_main_left_alone(hub, hub_settings, made):
    base, first, _ = made
    publisher, settings = get_publisher("hub"), hub_settings(branch="merged", tag_runs=False)
    result = publisher.publish(request(first, base), settings)
    assert result.location == f"{REPO}@merged" and result.version == hub.head(REPO, "merged")
    assert set(hub.files(REPO, "main")) == {".gitattributes"}
    assert not api(hub).list_repo_refs(REPO).tags


def test_token_comes_from_the_environment_by_default(hub, hub_settings, made, monkeypatch, tmp_path):
    base, first, _ = made
    publisher = get_publisher("hub")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    settings = hub_settings(token_file=None)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert publisher.publish(request(first, base), settings).version == hub.head(REPO)

    missing = tmp_path / "no-such-token"
    with pytest.raises(ConfigError, match="no-such-token") as unreadable:
        publisher.publish(request(first, base), hub_settings(token_file=str(missing)))
    assert TOKEN not in str(unreadable.value)


def test_rate_limit_and_server_error_on_the_commit_are_survived(hub, hub_settings, made, sleeps):
    base, first, _ = made
    hub.create_repo_direct(REPO, {"notes.md": b"existing"}, private=True)
    hub.inject(COMMITS, ("status", 429, {"Retry-After": "3"}))
    hub.inject(COMMITS, ("status", 500))

    result = get_publisher("hub").publish(request(first, base), hub_settings())

    assert [r.status for r in hub.requests_matching(COMMITS)] == [429, 500, 200]
    assert 3.0 in sleeps  # Retry-After honoured
    assert result.version == hub.head(REPO) and len(history(hub)) == 2
    assert hub.files(REPO)["notes.md"] == b"existing"


def test_a_rate_limited_commit_stops_waiting_when_the_daemon_stops(hub, hub_settings, made):
    """The Hub answers 429 with an hour's Retry-After: a publish given the daemon's stop event
    gives up its wait once the event is set, within systemd's stop timeout (90 s), instead
    of waiting out the hour; the rate limit is the error, and nothing was committed."""
    import threading

    base, first, _ = made
    hub.create_repo_direct(REPO, {"notes.md": b"existing"}, private=True)
    hub.inject(COMMITS, ("status", 429, {"Retry-After": "3600"}), times=100)
    stop, raised = threading.Event(), []

    def publish() -> None:
        try:
            get_publisher("hub").publish(dataclasses.replace(request(first, base), stopping=stop),
                                         hub_settings(retry_cap_seconds=3600.0))
        except Exception as exc:
            raised.append(exc)

    publishing = threading.Thread(target=publish, daemon=True)
    publishing.start()
    while not hub.requests_matching(COMMITS):
        time.sleep(0.05)
    stop.set()
    publishing.join(20)
    assert not publishing.is_alive(), "still waiting out Retry-After after the stop"
    assert isinstance(raised[0], HfHubHTTPError) and raised[0].response.status_code == 429
    assert [r.status for r in hub.requests_matching(COMMITS)] == [429] and successful_commits(hub) == 0


def test_a_commit_that_times_out_but_lands_later_is_not_duplicated(hub, hub_settings, made, bounded):
    """The client gives up after 2 s; the server commits at 3 s, while the publisher retries.
    Its retry carries the head it saw as parent, so the server refuses it or finds nothing new:
    the adapter is committed once and the result names that commit."""
    base, first, _ = made
    bounded(2.0)
    hub.inject(COMMITS, ("delay", 3.0), times=1)

    result = get_publisher("hub").publish(request(first, base, run_id=5), hub_settings())

    assert len(history(hub)) == 2, history(hub)  # create_repo's initial commit and ours, once
    assert result.version == hub.head(REPO)
    assert hub.files(REPO)["adapter_model.safetensors"] == (first / "adapter_model.safetensors").read_bytes()


def test_a_hub_that_stops_answering_does_not_hold_the_publish_for_ever(hub, hub_settings, made, bounded, sleeps):
    """huggingface_hub's client has no timeout, and a commit takes none: a commit the Hub
    never answered held the publish, the run, the group's claim and the daemon's stop for
    ever. With the daemon's ``hub_timeout_seconds`` the request gives up and is retried."""
    base, first, _ = made
    bounded(1.0)
    hub.inject(COMMITS, ("stall",), times=1)

    result = get_publisher("hub").publish(request(first, base, run_id=6), hub_settings())

    assert len(hub.requests_matching(COMMITS)) == 2 and len(history(hub)) == 2  # stalled once, committed once
    assert result.changed and result.version == hub.head(REPO)


def test_a_lost_commit_answer_does_not_duplicate_the_commit(hub, hub_settings, made, sleeps):
    base, first, _ = made
    hub.inject(COMMITS, ("truncate", 0))  # the server commits, the client sees a broken answer

    result = get_publisher("hub").publish(request(first, base, run_id=4), hub_settings())

    # The head, read again, showed the commit landed: nothing was sent again.
    assert len(hub.requests_matching(COMMITS)) == 1 and len(hub.requests_matching(r"^POST .*/preupload/")) == 1
    assert len(history(hub)) == 2  # create_repo's initial commit and ours, once
    assert result.changed and result.version == hub.head(REPO)
    assert {t.name: t.target_commit for t in api(hub).list_repo_refs(REPO).tags} == {"news-run-4": result.version}


def test_a_concurrent_push_is_kept_and_the_commit_made_on_top(hub, hub_settings, made, monkeypatch):
    base, first, _ = made
    publisher, settings = get_publisher("hub"), hub_settings()
    real_commit = HfApi.create_commit
    pushed: list[str] = []

    def someone_pushes_first(self, *args, **kwargs):
        if not pushed:  # between our head read and our commit
            pushed.append(hub.commit_direct(REPO, {"notes.md": b"pushed by a colleague"}, message="colleague"))
        return real_commit(self, *args, **kwargs)

    monkeypatch.setattr(HfApi, "create_commit", someone_pushes_first)
    result = publisher.publish(request(first, base), settings)

    assert [r.status for r in hub.requests_matching(COMMITS)] == [412, 200]
    assert result.version == hub.head(REPO) and len(history(hub)) == 3
    assert history(hub)[1] == "colleague"  # newest first: ours, then theirs
    files = hub.files(REPO)
    assert files["notes.md"] == b"pushed by a colleague" and "merge_report.json" in files


def test_a_branch_that_never_stops_moving_is_given_up(hub, hub_settings, made, monkeypatch):
    base, first, _ = made
    real_commit = HfApi.create_commit
    count = iter(range(100))

    def always_someone_first(self, *args, **kwargs):
        hub.commit_direct(REPO, {"notes.md": f"push {next(count)}".encode()})
        return real_commit(self, *args, **kwargs)

    monkeypatch.setattr(HfApi, "create_commit", always_someone_first)
    with pytest.raises(RuntimeError, match=f"{REPO}@main.*kept moving"):
        get_publisher("hub").publish(request(first, base), hub_settings(retry_attempts=2))
    assert successful_commits(hub) == 0


def test_tag_troubles_never_fail_a_published_commit(hub, hub_settings, made, sleeps, caplog):
    base, first, second = made
    publisher, settings = get_publisher("hub"), hub_settings()
    tags = r"^POST /api/models/team/merged-news/tag/"
    hub.inject(tags, ("truncate", 0))  # the tag is made, its answer lost: the retry finds it there
    v1 = publisher.publish(request(first, base, run_id=1), settings).version
    assert {t.name: t.target_commit for t in api(hub).list_repo_refs(REPO).tags} == {"news-run-1": v1}
    assert "already points at" not in caplog.text and "could not be tagged" not in caplog.text

    hub.create_tag_direct(REPO, "news-run-2", v1)  # e.g. run ids reused after a catalog reset
    v2 = publisher.publish(request(second, base, run_id=2), settings)
    assert v2.changed and hub.head(REPO) == v2.version
    tagged = {t.name: t.target_commit for t in api(hub).list_repo_refs(REPO).tags}
    assert tagged["news-run-2"] == v1  # someone else's tag is left alone
    assert "news-run-2 already points at" in caplog.text

    hub.inject(tags, ("status", 403))
    v3 = publisher.publish(request(first, base, run_id=3), settings)
    assert v3.changed and hub.head(REPO) == v3.version
    assert "could not be tagged news-run-3: HTTP 403" in caplog.text


def test_the_token_never_leaks(hub, hub_settings, made, sleeps, caplog):
    base, first, _ = made
    caplog.set_level(logging.DEBUG)
    publisher = get_publisher("hub")
    hub.inject(COMMITS, ("status", 503))
    publisher.publish(request(first, base), hub_settings())
    card = hub.files(REPO)["README.md"].decode()
    assert TOKEN not in card

    raised = []
    hub.inject(r"^GET /api/models/team/merged-news/revision/", ("status", 500), times=2)
    with pytest.raises(HfHubHTTPError) as gave_up:
        publisher.publish(request(made[2], base, run_id=2), hub_settings(retry_attempts=2))
    raised.append(gave_up.value)
    hub.inject(COMMITS, ("status", 403))
    with pytest.raises(HfHubHTTPError) as forbidden:
        publisher.publish(request(made[2], base, run_id=3), hub_settings())
    raised.append(forbidden.value)

    for exc in raised:
        chain = exc
        while chain is not None:
            assert TOKEN not in str(chain) and TOKEN not in repr(chain)
            chain = chain.__cause__ or chain.__context__
    assert "retry" in caplog.text and TOKEN not in caplog.text


def test_model_card_lists_inputs_parameters_and_metrics(made):
    base, first, _ = made
    text = render_model_card(request(first, base, run_id=9))
    data = ModelCard(text).data
    # A local base model is no Hub repo id, which the Hub's metadata check wants: not in the front matter.
    assert data.base_model is None and data.base_model_relation == "merge" and data.library_name == "peft"
    hub_base = dataclasses.replace(request(first, base), base_model="acme/minilm")
    assert ModelCard(render_model_card(hub_base)).data.base_model == "acme/minilm"
    assert data.tags == ["iteris-daemon", "lora", "merge", "iteris"]
    body = text.split("\n---\n", 1)[1]
    assert "run 9" in body and "`news`" in body and "iteris" in body
    assert "| `sentiment` | `hub` | `alice/sentiment` | `aaaaaaaaaaaa` |" in body and "a" * 13 not in body
    assert r"`local:topic\|v2`" in body and "/data" not in body  # by its name; a pipe cannot break the table
    assert f"of `local:{base.name}`" in body and str(base) not in body
    assert '"max_iterations": 3' in body
    assert "| `sentiment` | 0.125 | 0.0312 |" in body and "| `topic` | 0.25 | 0.01 |" in body
    assert "next-token" not in body  # not a language model's figures
    assert "## Per-task metrics\n\nMeasured with the base model in `bfloat16`.\n\n| task |" in body
    language_model = dataclasses.replace(request(first, base), metrics={
        "sentiment": {"alignment_loss": [0.125], "fidelity_gap": 0.0312,
                      "next_token_loss": {"base": 3.5, "task": 2.25, "merged": 2.375}}})
    body = render_model_card(language_model).split("\n---\n", 1)[1]
    assert "| task | alignment loss (last) | fidelity gap | next-token loss, task adapter | next-token loss, merge |" in body
    assert "| `sentiment` | 0.125 | 0.0312 | 2.25 | 2.375 |" in body
    no_metrics = dataclasses.replace(request(first, base), metrics={})
    assert "metrics" not in render_model_card(no_metrics).split("\n---\n", 1)[1].lower()
    assert "not evaluated" not in text.lower()
    # A task the merge could not evaluate (a data-free merge, no calibration data) is named, not left out unsaid.
    partly = dataclasses.replace(request(first, base), not_evaluated={"*c*": "no calibration data"})
    assert "| `topic` | 0.25 | 0.01 |\n\nNot evaluated: `*c*` (no calibration data).\n" in render_model_card(partly)
    # Names are shown as written, never as Markdown: no emphasis, link or HTML from a folder name.
    hostile = dataclasses.replace(request(first, base, group="*g*"), inputs=[
        PublishedInput("*x*", "local", "[l](http://e)", "c" * 40), PublishedInput("<b>y</b>", "local", "/y`z", "d" * 40)])
    body = render_model_card(hostile).split("\n---\n", 1)[1]
    assert body.lstrip().startswith("# `*g*`: merged LoRA adapter")
    assert "| `*x*` | `local` | `[l](http://e)` |" in body and "| `<b>y</b>` | `local` | `local:y'z` |" in body


def test_an_lfs_upload_failure_is_retried_as_the_hub_failure_behind_it(bounded):
    """huggingface_hub reports a failed LFS part upload as a RuntimeError raised from the HTTP
    error. In the daemon its client answers a 503 at once (no retries inside it), so the
    publisher's retries must see the 503 behind the RuntimeError (found in review); and a
    reload that sets the timeout again adds the daemon's response hook once, not once more."""
    import httpx2
    from huggingface_hub.utils import get_session

    from iteris_daemon.retry import _answer_retryable_at_once, is_transient

    def raised_from(status: int) -> RuntimeError:
        response = httpx2.Response(status, request=httpx2.Request("PUT", "https://s3.example/part-1"))
        try:
            try:
                raise HfHubHTTPError(f"{status} error", response=response)
            except HfHubHTTPError as cause:
                raise RuntimeError("Error while uploading 'adapter_model.safetensors' to the Hub.") from cause
        except RuntimeError as exc:
            return exc

    assert is_transient(raised_from(503)) and is_transient(raised_from(429)) and not is_transient(raised_from(403))
    bounded(5.0)
    bounded(7.0)
    assert get_session().event_hooks["response"].count(_answer_retryable_at_once) == 1
