"""A verdict holds only under the settings it was reached under.

The catalog stores, with each revision's verdict, a digest of the settings behind it
(``validation.validation_context``: limits, the source's base model, trusted models,
the rules' version). Before, a verdict was final for a revision: a Hub adapter refused
as too big stayed refused after the limit was raised (its commit, the revision, is the
same), an adapter refused for its rank stayed refused after ``max_rank`` was raised, and
one registered under looser settings (a ``sources scan`` without the daemon's config)
made every run of its group wait for a change that would never come. Real catalog
(SQLite file), real folder source, real HTTP to the Hub-compatible test server.
"""

from __future__ import annotations

import shutil
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from hub_server import HubServer, isolate_hub_client
from sqlalchemy import select, update
from transformers import AutoModel

import iteris_daemon.sources.local as local
from builders import build_adapter, build_tiny_model, tiny_config
from iteris_daemon.catalog import Catalog
from iteris_daemon.catalog.models import Adapter, AdapterRevision, AdapterStatus, MergeRun, RunStatus, SourceKind
from iteris_daemon.catalog.registry import add_source
from iteris_daemon.config import GroupConfig
from iteris_daemon.errors import AdapterError
from iteris_daemon.runner import RefusedInput, run_group, snapshot_input, sync_group
from iteris_daemon.sources.hub import HubSource
from iteris_daemon.sources.local import LocalFolderSource
from iteris_daemon import validation
from iteris_daemon.validation import Limits, validation_context

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("verdicts")
    base = build_tiny_model("bert", root / "base")
    adapters = [build_adapter(base, root / f"task{i}", seed=20 + i, family="bert", r=2 + i) for i in range(2)]
    return base, adapters  # ranks 2 and 3


@pytest.fixture
def team(tmp_path, made):
    """A catalog with a folder source "team" watching copies of both adapters."""
    base, adapters = made
    watched = tmp_path / "watched"
    for adapter in adapters:
        shutil.copytree(adapter, watched / adapter.name)
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    with catalog.session() as session:
        add_source(session, "team", SourceKind.local, {"paths": [str(watched)], "base_model": str(base),
                                                       "settle_seconds": 0.2})
    yield catalog, watched, base
    catalog.close()


def _revisions(catalog) -> dict[str, AdapterRevision]:
    with catalog.session() as session:
        return {a.name: a.current for a in session.scalars(select(Adapter)) if a.current is not None}


def _statuses(catalog) -> dict[str, AdapterStatus]:
    """Each adapter's status, checked against its current revision's."""
    with catalog.session() as session:
        adapters = list(session.scalars(select(Adapter)))
        assert all(a.status is a.current.status for a in adapters if a.current is not None)
        return {a.name: a.status for a in adapters}


@pytest.fixture
def validations(monkeypatch):
    """The folders ``validate_adapter`` was called on, by the folder source."""
    seen = []
    real = local.validate_adapter

    def counting(folder, *args, **kwargs):
        seen.append(folder.name)
        return real(folder, *args, **kwargs)

    monkeypatch.setattr(local, "validate_adapter", counting)
    return seen


def test_the_context_changes_with_every_setting_a_verdict_depends_on(monkeypatch):
    plain = validation_context(Limits(), None, [])
    for limit in fields(Limits):
        changed = Limits(**{limit.name: getattr(Limits(), limit.name) + 1})
        assert validation_context(changed, None, []) != plain, limit.name
    assert validation_context(Limits(), "org/base", []) != plain
    assert validation_context(Limits(), None, ["org/base"]) != plain
    assert validation_context(Limits(), None, ["b", "a"]) == validation_context(Limits(), None, ["a", "b"])
    assert validation_context(Limits(), None, []) == plain  # stable: no time, no randomness
    monkeypatch.setattr(validation, "VALIDATION_RULES", validation.VALIDATION_RULES + 1)  # a release's new rules
    assert validation_context(Limits(), None, []) != plain


def test_each_source_judges_under_its_own_settings(team, hub, tmp_path):
    catalog, _, base = team
    limits, trusted = Limits(max_rank=7), ["org/trusted"]
    assert LocalFolderSource(catalog, "team", limits=limits, trusted_models=trusted).context == \
        validation_context(limits, str(base), trusted)
    _, hub_catalog, _, _, _ = hub
    assert HubSource(hub_catalog, "hub", tmp_path / "cache", limits=limits, trusted_models=trusted).context == \
        validation_context(limits, str(base), trusted)


def test_a_folder_adapter_is_judged_again_when_the_limits_change(team, validations):
    """max_rank does not enter the folder fingerprint (the size limits do), so before the
    fix the rank-3 adapter stayed rejected after the limit was raised."""
    catalog, watched, _ = team
    report = LocalFolderSource(catalog, "team", limits=Limits(max_rank=2)).scan()
    assert report.registered == [str(watched / "task0")] and report.rejected == [str(watched / "task1")]
    assert _revisions(catalog)["task1"].reason.endswith("r=3 is above the limit of 2 ([daemon.limits] max_rank)")

    validations.clear()
    report = LocalFolderSource(catalog, "team", limits=Limits(max_rank=2)).scan()  # same settings: nothing read
    assert report.unchanged == 2 and validations == []

    report = LocalFolderSource(catalog, "team").scan()  # the limit raised
    assert report.registered == [str(watched / "task1")] and report.unchanged == 1 and report.changed
    assert sorted(validations) == ["task0", "task1"]
    revision = _revisions(catalog)["task1"]
    assert revision.status is AdapterStatus.registered and revision.reason is None and revision.rank == 3
    assert len(_revisions(catalog)) == 2  # the same revision rows, judged again
    with catalog.session() as session:
        assert session.query(AdapterRevision).count() == 2

    report = LocalFolderSource(catalog, "team", limits=Limits(max_rank=2)).scan()  # lowered again: withdrawn
    assert report.withdrawn == [str(watched / "task1")] and report.rejected == report.withdrawn and report.changed
    assert "1 rejected (1 withdrawn)" in str(report)
    assert _statuses(catalog) == {"task0": AdapterStatus.registered, "task1": AdapterStatus.rejected}

    report = LocalFolderSource(catalog, "team", limits=Limits(max_rank=1)).scan()  # only a registered one is withdrawn
    assert sorted(report.rejected) == [str(watched / "task0"), str(watched / "task1")]
    assert report.withdrawn == [str(watched / "task0")]

    assert len(LocalFolderSource(catalog, "team").scan().registered) == 2
    size = (watched / "task1" / "adapter_model.safetensors").stat().st_size
    report = LocalFolderSource(catalog, "team", limits=Limits(max_weights_bytes=size - 1)).scan()
    # A weights file past its limit is described, not hashed: a new revision, rejected, and withdrawn all the same.
    assert report.withdrawn == [str(watched / "task1")] and report.changed
    assert _statuses(catalog) == {"task0": AdapterStatus.registered, "task1": AdapterStatus.rejected}
    with catalog.session() as session:
        assert session.query(AdapterRevision).count() == 3


def test_the_adapters_of_a_base_model_replaced_in_its_folder_are_judged_again(tmp_path):
    """A local base model's ``config.json`` is part of the context: a wider model saved to the
    same folder (an updated checkpoint) has the next start of the source judge its adapters
    again, and one that no longer fits is withdrawn. Before, it stayed registered and failed
    every merge of its group with a shape error."""
    base, watched = tmp_path / "base", tmp_path / "watched"
    build_adapter(build_tiny_model("bert", base), watched / "task0", seed=0, family="bert")
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    with catalog.session() as session:
        add_source(session, "team", SourceKind.local, {"paths": [str(watched)], "base_model": str(base)})
    assert LocalFolderSource(catalog, "team").scan().registered == [str(watched / "task0")]
    unchanged = validation_context(Limits(), str(base), [])
    assert LocalFolderSource(catalog, "team").context == unchanged  # the same config: the same context

    shutil.rmtree(base)
    wider = tiny_config("bert")
    wider.hidden_size *= 2
    torch.manual_seed(0)
    AutoModel.from_config(wider).save_pretrained(base)
    source = LocalFolderSource(catalog, "team")
    assert source.context != unchanged
    report = source.scan()
    assert report.withdrawn == report.rejected == [str(watched / "task0")] and report.changed
    assert "but the base layer is 64x64" in _revisions(catalog)["task0"].reason, _revisions(catalog)["task0"].reason
    catalog.close()


def test_a_registered_folder_replaced_by_a_symlink_is_withdrawn(team, tmp_path):
    """A symlinked folder is rejected without being read; if the folder was registered,
    its groups must hear of it like any other withdrawal (before, only ``rejected``)."""
    catalog, watched, _ = team
    source = LocalFolderSource(catalog, "team")
    assert len(source.scan().registered) == 2
    (watched / "task1").rename(tmp_path / "task1")
    (watched / "task1").symlink_to(tmp_path / "task1", target_is_directory=True)
    report = source.scan()
    assert report.rejected == report.withdrawn == [str(watched / "task1")] and report.changed
    assert "symlinked folder" in _revisions(catalog)["task1"].reason
    report = source.scan()  # still a symlink: nothing new to tell
    assert report.rejected == [str(watched / "task1")] and report.withdrawn == [] and not report.changed


def test_verdicts_from_before_contexts_were_recorded(team, validations):
    """After the upgrade (migration 0006) every verdict has no context: a registered one is
    taken as the source's own and stamped, without reading the adapter again; a rejected
    one is judged again, once."""
    catalog, watched, _ = team
    LocalFolderSource(catalog, "team", limits=Limits(max_rank=2)).scan()
    with catalog.session() as session:
        session.execute(update(AdapterRevision).values(validation_context=None))
    validations.clear()
    source = LocalFolderSource(catalog, "team", limits=Limits(max_rank=2))
    report = source.scan()
    assert validations == ["task1"] and report.unchanged == 1 and report.rejected == [str(watched / "task1")]
    assert {r.validation_context for r in _revisions(catalog).values()} == {source.context}
    validations.clear()
    assert source.scan().unchanged == 2 and validations == []


@pytest.fixture
def hub(monkeypatch, tmp_path, made):
    base, adapters = made
    with HubServer() as server:
        isolate_hub_client(monkeypatch, server.endpoint, tmp_path / "hf-home")
        catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
        with catalog.session() as session:
            add_source(session, "hub", SourceKind.hub, {"endpoint": server.endpoint, "repos": ["alice/big"],
                                                        "base_model": str(base), "retry_base_seconds": 0.05})
        files = {name: (adapters[1] / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}
        sha = server.create_repo_direct("alice/big", files)

        def poll(limits: Limits = Limits()):
            return HubSource(catalog, "hub", tmp_path / "cache", limits=limits).poll()

        yield server, catalog, poll, sha, len(files["adapter_model.safetensors"])
        catalog.close()


def test_a_hub_adapter_refused_as_too_big_is_registered_once_the_limit_is_raised(hub):
    server, catalog, poll, sha, size = hub
    report = poll(Limits(max_weights_bytes=size - 1))
    assert report.rejected == ["alice/big"] and "above the limit" in _revisions(catalog)["alice/big"].reason
    assert report.withdrawn == []  # refused at first sight: nothing to withdraw
    assert poll(Limits(max_weights_bytes=size - 1)).unchanged == 1  # same settings: no download
    assert not server.requests_matching(r"^GET /alice/big/resolve/.*safetensors")

    report = poll()  # before the fix: "unchanged", refused for good
    assert report.registered == ["alice/big"]
    revision = _revisions(catalog)["alice/big"]
    assert revision.status is AdapterStatus.registered and revision.revision == sha and revision.files_path
    assert poll().unchanged == 1

    report = poll(Limits(max_tensors=19_999))  # other settings, the same verdict: no news
    assert report.unchanged == 1 and not report.registered and not report.withdrawn and not report.changed

    report = poll(Limits(max_rank=2))
    assert report.withdrawn == ["alice/big"] and _statuses(catalog) == {"alice/big": AdapterStatus.rejected}


def test_without_the_daemons_settings_a_hub_verdict_is_taken_as_recorded(hub, tmp_path):
    """``sources scan`` without ``--config`` (``rejudge=False``) does not know the
    daemon's limits: it must neither re-judge the daemon's refusal nor download the
    weights the daemon refused to."""
    server, catalog, poll, sha, size = hub
    assert poll(Limits(max_weights_bytes=size - 1)).rejected == ["alice/big"]
    _, hub_catalog, _, _, _ = hub
    report = HubSource(hub_catalog, "hub", tmp_path / "cache", rejudge=False).poll()
    assert report.unchanged == 1 and not report.registered and not report.rejected and not report.changed
    assert _statuses(catalog) == {"alice/big": AdapterStatus.rejected}
    assert not server.requests_matching(r"^GET /alice/big/resolve/.*safetensors")


def test_a_hub_repo_reset_to_a_registered_commit_is_news(hub, made):
    """Before, a Hub adapter back at a commit the catalog already held (a branch reset, a
    repo back after its removal) was recorded without a word: no group was told."""
    server, catalog, poll, sha, _ = hub
    assert poll().registered == ["alice/big"]
    other = made[1][0]
    newer = server.commit_direct("alice/big", {n: (other / n).read_bytes()
                                               for n in ("adapter_config.json", "adapter_model.safetensors")})
    assert poll().registered == ["alice/big"] and _revisions(catalog)["alice/big"].revision == newer
    server.create_branch_direct("alice/big", "main", sha)  # a force-push back to the first commit
    report = poll()
    assert report.registered == ["alice/big"] and report.changed
    revision = _revisions(catalog)["alice/big"]
    assert revision.revision == sha and revision.status is AdapterStatus.registered
    assert (Path(revision.files_path) / "adapter_model.safetensors").is_file()


def _group(catalog, base, published) -> GroupConfig:
    group = GroupConfig(name="unified", base_model=str(base), strategy="task_arithmetic",
                        select={"names": ["task0", "task1"]}, destinations=[{"kind": "folder", "path": str(published)}])
    sync_group(catalog, group)
    return group


def _pad(folder) -> None:
    """Make task1's config and calibration files longer than task0's (still valid)."""
    config = folder / "adapter_config.json"
    config.write_text(config.read_text() + " " * 4096)
    calibration = folder / "calibration.jsonl"
    calibration.write_text(calibration.read_text() * 3)


@pytest.mark.parametrize("limit", ["max_rank", "max_weights_bytes", "max_config_bytes", "max_calibration_bytes"])
def test_a_run_holds_back_what_its_limits_refuse_and_merges_the_rest(team, tmp_path, limit):
    """An adapter registered under looser settings than the daemon's: the run used to
    count it as "changing" and wait for the source to report it again, which never
    happens (its content is the same): every run of the group was skipped. It is held
    back, saying why, and the rest is merged. The limit is set just below task1's file
    (its rank for max_rank), above task0's."""
    catalog, watched, base = team
    _pad(watched / "task1")
    LocalFolderSource(catalog, "team").scan()  # e.g. `sources scan` without the daemon's --config
    name = {"max_weights_bytes": "adapter_model.safetensors", "max_config_bytes": "adapter_config.json",
            "max_calibration_bytes": "calibration.jsonl"}.get(limit)
    value = 2 if name is None else (watched / "task1" / name).stat().st_size - 1
    assert name is None or (watched / "task0" / name).stat().st_size <= value
    outcome = run_group(catalog, _group(catalog, base, tmp_path / "published"), tmp_path / "work", "tester",
                        limits=Limits(**{limit: value}))
    assert outcome.status is RunStatus.succeeded, outcome.detail
    with catalog.session() as session:
        row = session.get(MergeRun, outcome.run_id)
        held_back = row.metrics["held_back"]
        merged = sorted(i.revision.adapter.name for i in row.inputs)
    assert merged == ["task0"] and list(held_back) == ["task1"]
    assert held_back["task1"].endswith(f"above the limit of {value} ([daemon.limits] {limit}), under this daemon's limits")
    assert held_back["task1"].startswith(str(watched / "task1" / (name or "adapter_config.json")))


def test_a_full_state_folder_is_named_not_the_adapter(team, tmp_path, monkeypatch):
    """ENOSPC copying an input into the run's folder read "watched/a0/adapter_model.safetensors:
    cannot read: No space left on device", pointing at the watched folder (QA OPS2)."""
    import errno as errors

    import iteris_daemon.runner as runner

    catalog, watched, base = team
    LocalFolderSource(catalog, "team").scan()

    def full(source, target, *args, **kwargs):
        raise OSError(errors.ENOSPC, "No space left on device")

    monkeypatch.setattr(runner, "copy_adapter_file", full)
    with catalog.session() as session:
        adapter = session.scalar(select(Adapter).where(Adapter.name == "task1"))
        _ = adapter.source
        with pytest.raises(runner.CopyFailed, match=f"cannot be copied into this run's folder {tmp_path / 'a'}: No "
                                                    r"space left on device \(the daemon's state folder"):
            snapshot_input(adapter, adapter.current, tmp_path / "a")  # a run waits on it, of any source


def test_a_refusal_is_told_from_a_change(team, tmp_path):
    """The same limit failures on content that is no longer the registered one are a
    change: the run waits for the source to report it (and publishes nothing meanwhile)."""
    catalog, watched, base = team
    LocalFolderSource(catalog, "team").scan()
    config = watched / "task1" / "adapter_config.json"
    tight = Limits(max_rank=2, max_config_bytes=config.stat().st_size + 100)
    with catalog.session() as session:
        adapter = session.scalar(select(Adapter).where(Adapter.name == "task1"))
        revision = adapter.current
        _ = adapter.source
        with pytest.raises(RefusedInput, match=f"^{config}: r=3 is above the limit of 2"):
            snapshot_input(adapter, revision, tmp_path / "a", tight)
        config.write_text(config.read_text().replace("{", '{"note": "retrained", ', 1))  # a new revision
        with pytest.raises(AdapterError, match="changed since it was registered") as caught:
            snapshot_input(adapter, revision, tmp_path / "b", tight)
        assert not isinstance(caught.value, RefusedInput)
        config.write_text(config.read_text() + " " * 200)  # now past max_config_bytes as well
        with pytest.raises(AdapterError, match="above the limit") as caught:
            snapshot_input(adapter, revision, tmp_path / "c", tight)
        assert not isinstance(caught.value, RefusedInput)
    outcome = run_group(catalog, _group(catalog, base, tmp_path / "published"), tmp_path / "work", "tester",
                        limits=tight)
    assert outcome.status is RunStatus.skipped and "waiting for task1" in outcome.detail
    assert not (tmp_path / "published").exists()
