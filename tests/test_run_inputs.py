"""A run reads each input once: the revisions it records, the weights it merges and the
calibration it uses are the same bytes, whatever happens to the source folders meanwhile.

The soak test (``benchmarks/soak.py``) found runs that recorded one revision and merged
the next (an adapter replaced between selection and merge), and runs that failed when
an input vanished mid-run. Here both are made to happen deterministically, on the real
folder source, catalog and folder publisher (the ``setup`` fixture of ``group_runs``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from sqlalchemy import delete, select

import iteris_daemon.runner as runner
from iteris_daemon.catalog.db import CatalogLockedError
from iteris_daemon.catalog import Catalog
from iteris_daemon.catalog.models import (Adapter, AdapterRevision, AdapterStatus, MergeGroup, MergeRun, MergeRunInput,
                                          RunStatus, SourceKind)
from iteris_daemon.catalog.registry import add_source, remove_source
from iteris_daemon.adapter_config import sha256_file
from iteris_daemon.config import GroupConfig
from iteris_daemon.runner import sync_group
from iteris_daemon.sources.local import LocalFolderSource
from databases import rows_loaded

pytestmark = pytest.mark.timeout(300)


def _replace_weights(folder, factor: float) -> None:
    tensors = load_file(folder / "adapter_model.safetensors")
    save_file({k: v * factor for k, v in tensors.items()}, folder / ".new")
    (folder / ".new").replace(folder / "adapter_model.safetensors")


def _recorded(setup, run_id: int) -> dict[str, str]:
    """adapter name -> content sha256 of the revision the run records."""
    with setup.catalog.session() as session:
        rows = session.scalars(select(AdapterRevision).join(MergeRunInput, MergeRunInput.revision_id == AdapterRevision.id)
                               .where(MergeRunInput.run_id == run_id)).all()
        return {r.adapter.name: r.content_sha256 for r in rows}


def _published(setup) -> dict[str, str]:
    report = json.loads((setup.published / "current" / "merge_report.json").read_text())
    return {i["name"]: i["sha256"] for i in report["inputs"]}


def test_an_input_replaced_during_the_merge_does_not_change_what_is_merged(setup, monkeypatch):
    watched = setup.published.parent / "watched"
    real_merge = runner.merge_in_worker

    def merge_after_a_replacement(*args):
        _replace_weights(watched / "task0", 2.0)  # a trainer drops new weights mid-run
        return real_merge(*args)

    monkeypatch.setattr(runner, "merge_in_worker", merge_after_a_replacement)
    outcome = setup.run(setup.group(names=("task0", "task1")))
    assert outcome.status is RunStatus.succeeded
    recorded = _recorded(setup, outcome.run_id)
    assert set(recorded) == {"task0", "task1"} and _published(setup) == recorded
    assert recorded["task0"] != sha256_file(watched / "task0" / "adapter_model.safetensors")


@pytest.mark.long
def test_a_run_waits_for_inputs_changed_or_gone_since_registration(setup):
    """An adapter whose folder changed (or went) after it was registered, not yet seen by
    the source: the run does not publish a merge without it over one that has it (found in
    review: the published merge lost a task until the next run); it is skipped, saying
    why, and the run after the source has seen the change merges the new revision."""
    watched = setup.published.parent / "watched"
    group = setup.group(names=("task0", "task1"))
    first = setup.run(group)
    assert first.status is RunStatus.succeeded and set(_published(setup)) == {"task0", "task1"}
    published = setup.current()

    _replace_weights(watched / "task0", 2.0)  # not yet seen by the source
    outcome = setup.run(group)
    assert outcome.status is RunStatus.skipped and "waiting for task0" in outcome.detail
    assert "changed since it was registered" in setup.run_row(outcome.run_id).metrics["held_back"]["task0"]
    assert setup.current() == published  # the merge with both tasks stays
    LocalFolderSource(setup.catalog, "team").scan()  # the source sees the change
    outcome = setup.run(group)
    assert outcome.status is RunStatus.succeeded
    assert _recorded(setup, outcome.run_id)["task0"] == sha256_file(watched / "task0" / "adapter_model.safetensors")

    shutil.rmtree(watched / "task1")  # deleted, not yet seen by the source
    outcome = setup.run(group)
    assert outcome.status is RunStatus.skipped and "waiting for task1" in outcome.detail
    assert "vanished since it was registered" in setup.run_row(outcome.run_id).metrics["held_back"]["task1"]
    LocalFolderSource(setup.catalog, "team").scan()  # marked removed: the rest merges
    outcome = setup.run(group)
    assert outcome.status is RunStatus.succeeded and set(_published(setup)) == {"task0"}
    assert not list(setup.work.glob(f"{runner.INPUTS_PREFIX}*"))  # every run's snapshot is cleaned up


@pytest.mark.long
def test_a_group_merges_without_an_adapter_whose_weights_went_and_with_it_once_they_are_back(setup):
    """Weights deleted, the config left: once the source has seen it the group merges the
    rest, and once they are back it merges them again. Before the fix the source left the
    adapter registered, so every run (one for a new adapter too) was skipped, waiting
    for it to be registered again, for ever (found by QA)."""
    watched = setup.published.parent / "watched"
    # Not compared with the merge of one task it replaces, which fits that task better.
    group = setup.group(names=("task0", "task1"), gates={"max_regression": None})
    assert setup.run(group).status is RunStatus.succeeded and set(_published(setup)) == {"task0", "task1"}
    weights = watched / "task1" / "adapter_model.safetensors"
    saved = weights.read_bytes()
    weights.unlink()
    assert LocalFolderSource(setup.catalog, "team").scan().removed == [str(watched / "task1")]
    outcome = setup.run(group)
    assert outcome.status is RunStatus.succeeded and set(_published(setup)) == {"task0"}
    weights.write_bytes(saved)
    assert LocalFolderSource(setup.catalog, "team").scan().registered == [str(watched / "task1")]
    outcome = setup.run(group)
    assert outcome.status is RunStatus.succeeded and set(_published(setup)) == {"task0", "task1"}


def test_a_run_waits_for_an_adapter_whose_hub_calibration_file_the_hub_failed_to_serve(setup, tmp_path, monkeypatch,
                                                                                       bounded):
    """The Hub fails the HEAD of one adapter's ``hub_dataset`` file (here 429s, the retries
    spent): the run is skipped, waiting for that adapter with the Hub's error,
    asks to be tried again, and publishes nothing; once the Hub answers, both are merged.
    Before the fix the failure read as "no file here": the merge went out without that
    adapter (or with the next source's data) and the run was ``succeeded`` (found by QA).
    The files are downloaded into the daemon's cache folder, which the run is given."""
    from hub_server import HubServer, isolate_hub_client

    files = {f"{name}.jsonl": b'{"text": "curated sample of ' + name.encode() + b'"}\n' for name in ("task0", "task1")}
    with HubServer(token="hf_calibration") as hub:
        isolate_hub_client(monkeypatch, hub.endpoint, tmp_path / "hf-home")
        bounded(5.0)  # the daemon's client: the source's retries are the only ones
        hub.create_repo_direct("acme/calib", files, repo_type="dataset")
        group = setup.group(names=("task0", "task1"), calibration={
            "order": ["hub_dataset", "adapter"], "hub_dataset": {
                "repo_id": "acme/calib", "endpoint": hub.endpoint, "retry_attempts": 3, "retry_base_seconds": 0.01}})
        # the client asks a failed HEAD once more itself, at once: 2 per attempt
        hub.inject(r"^HEAD /datasets/acme/calib/resolve/[0-9a-f]+/task1\.jsonl$", ("status", 429, {"Retry-After": "0"}),
                   times=6)
        cache = tmp_path / "daemon-cache"
        outcome = runner.run_group(setup.catalog, group, setup.work, "tester", cache_dir=cache)
        assert outcome.status is RunStatus.skipped and outcome.retry_inputs, outcome
        assert outcome.detail.startswith("waiting for task1: hub_dataset: acme/calib/task1.jsonl: HTTP 429"), outcome.detail
        assert setup.current() is None
        outcome = runner.run_group(setup.catalog, group, setup.work, "tester", cache_dir=cache)
        assert list((cache / "calibration").glob("datasets--acme--calib/snapshots/*/task1.jsonl"))
        assert outcome.status is RunStatus.succeeded and not outcome.retry_inputs
        assert set(_published(setup)) == {"task0", "task1"}
        report = json.loads((setup.published / "current" / "merge_report.json").read_text())
        assert {i["calibration"]["source"] for i in report["inputs"]} == {
            "hf://datasets/acme/calib/task0.jsonl", "hf://datasets/acme/calib/task1.jsonl"}


def test_hub_errors_reach_held_back_reasons_and_run_errors_as_one_line(setup, tmp_path, monkeypatch):
    """huggingface_hub's errors run to several lines (the URL, "Please make sure ...", a docs
    link), and a gated repo's says so on its second: a calibration dataset that is gated (the
    run waits for it), and a publish whose commit the Hub refuses (403), are one line each in
    the run's record, the gated one saying "Cannot access gated repo". Before the fix both
    were stored with every line, or (the Hub source's way) cut to the status heading (found by QA)."""
    from hub_server import HubServer, isolate_hub_client

    token_file = tmp_path / "token"
    token_file.write_text("hf_one_line\n")
    token_file.chmod(0o600)
    files = {f"{name}.jsonl": b'{"text": "a sample"}\n' for name in ("task0", "task1")}
    with HubServer(token="hf_one_line") as hub:
        isolate_hub_client(monkeypatch, hub.endpoint, tmp_path / "hf-home")
        hub.create_repo_direct("acme/calib", files, repo_type="dataset")
        group = GroupConfig(
            name="unified", base_model=str(setup.base), strategy="task_arithmetic", select={"names": ["task0", "task1"]},
            calibration={"order": ["hub_dataset"], "hub_dataset": {
                "repo_id": "acme/calib", "endpoint": hub.endpoint, "token_file": str(token_file),
                "cache_dir": str(tmp_path / "c")}},
            destinations=[{"kind": "hub", "repo_id": "acme/merged", "endpoint": hub.endpoint,
                           "token_file": str(token_file), "retry_base_seconds": 0.01}])
        sync_group(setup.catalog, group)
        hub.inject(r"^GET /api/datasets/acme/calib", ("status", 403, {
            "X-Error-Code": "GatedRepo", "X-Error-Message": "Access to dataset acme/calib is restricted."}))
        waiting = setup.run(group)
        hub.inject(r"^POST /api/models/acme/merged/commit/", ("status", 403, {"X-Error-Message": "read-only token"}))
        outcome = setup.run(group)
    assert waiting.status is RunStatus.skipped and waiting.retry_inputs
    assert "\n" not in waiting.detail and "HTTP 403: Cannot access gated repo for url" in waiting.detail, waiting.detail
    assert outcome.status is RunStatus.failed
    assert outcome.detail.startswith("publisher hub (destination 1 of 1) failed: HfHubHTTPError: 403 Forbidden: "
                                     "read-only token.") and "\n" not in outcome.detail


@contextmanager
def _hub_source(tmp_path: Path, monkeypatch, base: Path, repos: list[str]):
    """A Hub-compatible server, a catalog with a Hub source of ``repos`` on it, and its poller."""
    from hub_server import HubServer, isolate_hub_client
    from iteris_daemon.sources.hub import HubSource

    token_file = tmp_path / "token"
    token_file.write_text("hf_token_for_this_test\n")
    token_file.chmod(0o600)
    with HubServer(token="hf_token_for_this_test") as hub:
        isolate_hub_client(monkeypatch, hub.endpoint, tmp_path / "hf-home")
        catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
        with catalog.session() as session:
            add_source(session, "hub", SourceKind.hub, {"endpoint": hub.endpoint, "token_file": str(token_file),
                                                        "repos": repos, "base_model": str(base)})
        try:
            yield hub, catalog, HubSource(catalog, "hub", tmp_path / "cache")
        finally:
            catalog.close()


def _hub_files(lora: Path) -> dict[str, bytes]:
    return {n: (lora / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors", "calibration.jsonl")}


def test_the_run_fingerprint_follows_content_not_hub_commits(runner_adapters, tmp_path, monkeypatch):
    """A Hub commit that only edits the README is a new revision of the same adapter: the
    run's input fingerprint is unchanged, so the group is not merged again (a 70B merge
    for a model card edit; found in review). A commit that changes the config changes it."""
    base, (lora, _) = runner_adapters
    files = _hub_files(lora)
    group = GroupConfig(name="g", base_model=str(base), destinations=[{"kind": "folder", "path": str(tmp_path)}])
    with _hub_source(tmp_path, monkeypatch, base, ["alice/task"]) as (hub, catalog, poller):
        runs = iter(range(3))

        def fingerprint() -> str:
            assert poller.poll().registered == ["alice/task"]  # a new revision each time
            inputs = runner.gather_inputs(catalog, group, True, None, tmp_path / f"inputs-{next(runs)}")
            assert len(inputs.revisions) == 1
            return inputs.fingerprint("iteris", {})

        hub.create_repo_direct("alice/task", {**files, "README.md": b"# a LoRA\n"})
        first = fingerprint()
        hub.commit_direct("alice/task", {"README.md": b"# a LoRA, better described\n"})
        assert fingerprint() == first
        config = json.loads(files["adapter_config.json"])
        hub.commit_direct("alice/task", {"adapter_config.json": json.dumps({**config, "lora_alpha": 80}).encode()})
        assert fingerprint() != first


def test_status_does_not_show_a_hub_adapter_waiting_after_a_readme_commit(runner_adapters, tmp_path, monkeypatch):
    """After a Hub commit that only edits the README, the run is skipped (its inputs are
    unchanged), but `status` listed the adapter as "not yet merged" until its weights
    changed (QA RV6): it compared commits. A run skipped on the served merge's inputs now
    counts as merging what it names; a commit that changes the config is still listed."""
    from iteris_daemon.status import collect

    base, (lora, _) = runner_adapters
    files = _hub_files(lora)
    group = GroupConfig(name="g", base_model=str(base), strategy="task_arithmetic",
                        destinations=[{"kind": "folder", "path": str(tmp_path / "published")}])

    def waiting() -> list[str]:
        return collect(catalog)["groups"][0]["waiting"]["not_yet_merged"]

    with _hub_source(tmp_path, monkeypatch, base, ["alice/task"]) as (hub, catalog, poller):
        hub.create_repo_direct("alice/task", {**files, "README.md": b"# a LoRA\n"})
        assert poller.poll().registered == ["alice/task"]
        sync_group(catalog, group)
        assert runner.run_group(catalog, group, tmp_path / "work", "tester").status is RunStatus.succeeded
        assert waiting() == []
        hub.commit_direct("alice/task", {"README.md": b"# a LoRA, better described\n"})
        assert poller.poll().registered == ["alice/task"]
        assert waiting() == ["alice/task"]  # not looked at yet: the next run says
        skipped = runner.run_group(catalog, group, tmp_path / "work", "tester")
        assert skipped.status is RunStatus.skipped and skipped.detail.startswith("inputs unchanged"), skipped
        assert waiting() == []
        config = json.loads(files["adapter_config.json"])
        hub.commit_direct("alice/task", {"adapter_config.json": json.dumps({**config, "lora_alpha": 80}).encode()})
        assert poller.poll().registered == ["alice/task"]
        assert waiting() == ["alice/task"]


def test_a_hub_input_is_named_by_its_repo_and_commit_in_the_merge_report(runner_adapters, tmp_path, monkeypatch):
    """The report named a Hub source's input by the daemon's cache folder of its commit, which
    the Hub's copy of the report can only show as ``local:SHA``: it is ``hf://REPO@SHA``,
    a branch's commit included; a folder source's input keeps its folder."""
    from iteris_daemon.publish import local_name

    base, (first, second) = runner_adapters
    published = tmp_path / "published"
    group = GroupConfig(name="g", base_model=str(base), strategy="task_arithmetic",
                        destinations=[{"kind": "folder", "path": str(published)}])
    with _hub_source(tmp_path, monkeypatch, base, ["alice/task", "bob/topic@dev"]) as (hub, catalog, poller):
        shas = {"alice/task": hub.create_repo_direct("alice/task", _hub_files(first)),
                "bob/topic": hub.create_repo_direct("bob/topic", {"README.md": b"# topics\n"})}
        hub.create_branch_direct("bob/topic", "dev")
        shas["bob/topic"] = hub.commit_direct("bob/topic", _hub_files(second), branch="dev")
        assert sorted(poller.poll().registered) == ["alice/task", "bob/topic@dev"]
        sync_group(catalog, group)
        assert runner.run_group(catalog, group, tmp_path / "work", "tester").status is RunStatus.succeeded
    report = json.loads((published / "current" / "merge_report.json").read_text())
    paths = sorted(entry["path"] for entry in report["inputs"])
    assert paths == sorted(f"hf://{repo}@{sha}" for repo, sha in shas.items())
    assert all(local_name(path) == path for path in paths)  # the Hub's copy names them so too


def test_a_run_error_is_stored_with_tokens_redacted(setup):
    """A failed run's error may quote a request's headers; `status` prints it from the catalog."""
    token = "hf_AbCdEf0123456789AbCdEf0123456789"
    outcome = setup.run(setup.group(names=("task0",)))
    with setup.catalog.session() as session:  # as the run was before it ended (only a running run is ended)
        session.get(MergeRun, outcome.run_id).status = RunStatus.running
    assert runner._finish(setup.catalog, outcome.run_id, RunStatus.failed, error=f"LocalProtocolError: b'Bearer {token}'")
    assert setup.run_row(outcome.run_id).error == "LocalProtocolError: b'Bearer hf_***'"


def test_a_run_whose_end_was_never_recorded_is_failed_by_the_next_run(setup, monkeypatch):
    """The catalog refused the write that records a published run ``succeeded`` (locked past
    its timeout): the run stayed ``running`` until the daemon restarted. The next run of
    the group, holding its claim, marks it failed and merges again."""
    real_finish = runner._finish

    def locked_when_succeeding(catalog, run_id, status, **values):
        if status is RunStatus.succeeded:
            raise CatalogLockedError("database is locked (test)")
        return real_finish(catalog, run_id, status, **values)

    monkeypatch.setattr(runner, "_finish", locked_when_succeeding)
    group = setup.group(names=("task0",))
    with pytest.raises(CatalogLockedError):
        setup.run(group)
    with setup.catalog.session() as session:
        (lost,) = session.scalars(select(MergeRun)).all()
    assert lost.status is RunStatus.running  # published, but its end is not recorded
    monkeypatch.setattr(runner, "_finish", real_finish)

    again = setup.run(group)
    assert again.status is RunStatus.succeeded
    lost = setup.run_row(lost.id)
    assert lost.status is RunStatus.failed and lost.finished_at and "never recorded" in lost.error


def test_a_skipped_run_does_not_end_before_it_started(setup, monkeypatch):
    """QA: a skipped row's ``finished_at`` was set before the column's default filled
    ``started_at`` at the flush, so it ended before it started. Both come from one clock
    reading now (the runner's clock set back an hour shows it whatever the resolution)."""
    behind = datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(hours=1)
    monkeypatch.setattr(runner, "utcnow", lambda: behind)
    skipped = setup.run(setup.group(names=("task0",), min_adapters=2))
    assert skipped.status is RunStatus.skipped
    row = setup.run_row(skipped.run_id)
    assert row.started_at == row.finished_at == behind


def test_repeated_skips_share_one_row_and_still_count(setup):
    """On an interval schedule with nothing new, every period records a skipped run: one
    row and its input rows each time, for months. A skip that repeats the last run (same
    inputs, same reason) replaces it: the catalog keeps one row that counts them all, the
    metrics count every run, and each skip still gets a new id (``merge-now --wait``)."""
    from iteris_daemon.endpoints import DaemonMetrics
    from iteris_daemon.status import collect, render

    assert setup.run(setup.group(names=("task0",), min_adapters=2)).detail == "1 adapter ready, the group needs 2"
    waiting = setup.group(names=("task0", "task1"), min_adapters=3)
    assert [setup.run(waiting).status for _ in range(2)] == [RunStatus.skipped] * 2
    assert "skipped" in render(collect(setup.catalog)) and "(2 times since" in render(collect(setup.catalog))
    with setup.catalog.session() as session:
        session.execute(delete(MergeRun))

    group = setup.group(names=("task0", "task1"))
    assert setup.run(group).status is RunStatus.succeeded
    ids = [setup.run(group) for _ in range(3)]
    assert [o.status for o in ids] == [RunStatus.skipped] * 3 and ids[0].run_id < ids[1].run_id < ids[2].run_id
    with setup.catalog.session() as session:
        runs = session.scalars(select(MergeRun).order_by(MergeRun.id)).all()
        assert [(r.status, r.repeats) for r in runs] == [(RunStatus.succeeded, 1), (RunStatus.skipped, 3)]
        assert runs[1].id == ids[2].run_id and runs[1].started_at < runs[1].finished_at
        assert len(session.scalars(select(MergeRunInput)).all()) == 4  # two per row, not two per run
    families = {f.name: f for f in DaemonMetrics(setup.catalog).registry.collect()}
    counted = {s.labels["status"]: s.value for s in families["iteris_merge_runs"].samples
               if s.name == "iteris_merge_runs_total" and s.value}
    assert counted == {"succeeded": 1, "skipped": 3}

    # Another reason is another row: a forced run publishes, a skip after it starts a new count.
    assert setup.run(group, force=True).status is RunStatus.succeeded
    assert setup.run(group).status is RunStatus.skipped
    with setup.catalog.session() as session:
        assert [(r.status, r.repeats) for r in session.scalars(select(MergeRun).order_by(MergeRun.id))] == [
            (RunStatus.succeeded, 1), (RunStatus.skipped, 3), (RunStatus.succeeded, 1), (RunStatus.skipped, 1)]


def _current_revision_ids(setup, names) -> frozenset[int]:
    with setup.catalog.session() as session:
        return frozenset(a.current.id for a in session.scalars(select(Adapter)) if a.name in names)


def test_the_catalog_check_loads_current_revisions_not_the_history(setup):
    """The catalog check and each run's selection run every few seconds for months: they
    load each adapter's current revision, not its history. They once loaded all of it,
    and the soak's daemon grew with the catalog."""
    group = setup.group(names=("task0", "task1"))
    assert setup.run(group).status is RunStatus.succeeded
    with setup.catalog.session() as session:
        adapter = session.scalar(select(Adapter).where(Adapter.name == "task0"))
        session.add_all(AdapterRevision(adapter_id=adapter.id, revision=f"old{k}", status=adapter.status,
                                        files_path="/gone", last_seen_at=datetime(2020, 1, 1 + k)) for k in range(25))
    current = _current_revision_ids(setup, {"task0", "task1"})
    with rows_loaded(AdapterRevision) as loaded:
        assert runner.groups_behind(setup.catalog, [group]) == {}
        assert {revision.id for _, revision in runner.select_inputs(setup.catalog, group)} == current
    with setup.catalog.session() as session:
        adapters = session.scalars(select(Adapter).where(Adapter.status == AdapterStatus.registered))
        registered = [adapter.current.id for adapter in adapters]
    assert sorted(loaded) == sorted(registered * 2)  # one row per registered adapter and call


@pytest.mark.long
def test_a_group_is_behind_when_its_selection_differs_from_what_its_last_run_considered(setup):
    """What the daemon's catalog check (``Daemon._catch_up``) triggers on. An adapter the
    last run held back counts as considered: only its source's report of a change (a new
    revision) puts the group behind, else a waiting group would be triggered forever."""
    watched = setup.published.parent / "watched"
    group = setup.group(names=("task0", "task1"))
    source = LocalFolderSource(setup.catalog, "team")
    assert runner.groups_behind(setup.catalog, [group]) == {}  # never ran: its first run is due anyway
    assert setup.run(group).status is RunStatus.succeeded
    assert runner.groups_behind(setup.catalog, [group]) == {}

    shutil.rmtree(watched / "task1")
    assert source.scan().removed == [str(watched / "task1")]
    assert runner.groups_behind(setup.catalog, [group]) == {"unified": _current_revision_ids(setup, {"task0"})}
    assert setup.run(group).status is RunStatus.succeeded
    assert runner.groups_behind(setup.catalog, [group]) == {}

    _replace_weights(watched / "task0", 2.0)  # changed since registration: the run holds it back and waits
    waiting = setup.run(group)
    assert waiting.status is RunStatus.skipped and "waiting for task0" in waiting.detail
    assert runner.groups_behind(setup.catalog, [group]) == {}
    assert source.scan().registered == [str(watched / "task0")]  # the new revision
    assert runner.groups_behind(setup.catalog, [group]) == {"unified": _current_revision_ids(setup, {"task0"})}
    other = GroupConfig(**{**group.model_dump(), "name": "other", "select": {"names": ["task1"]}})
    sync_group(setup.catalog, other)  # a group whose selection is empty, as was its last run's
    assert setup.run(other).status is RunStatus.skipped
    assert set(runner.groups_behind(setup.catalog, [group, other])) == {"unified"}
    assert setup.run(group).status is RunStatus.succeeded
    assert runner.groups_behind(setup.catalog, [group, other]) == {}

    with setup.catalog.session() as session:  # `sources remove`: the adapters of past runs are marked removed
        remove_source(session, "team")
    assert runner.groups_behind(setup.catalog, [group, other]) == {"unified": frozenset()}


def test_held_back_adapters_of_the_same_name_in_two_sources_are_both_considered(setup, tmp_path):
    """Held-back revisions are recorded by id: by name, one of two adapters called
    ``task0`` (in two sources) was lost and the group stayed behind for ever."""
    watched = setup.published.parent / "watched"
    second = tmp_path / "second"
    shutil.copytree(watched / "task0", second / "task0")
    with setup.catalog.session() as session:
        add_source(session, "second", SourceKind.local, {"paths": [str(second)], "base_model": str(setup.base)})
    LocalFolderSource(setup.catalog, "second").scan()
    group = setup.group(names=("task0",))
    _replace_weights(watched / "task0", 2.0)  # both changed since registration: both held back
    _replace_weights(second / "task0", 3.0)
    waiting = setup.run(group)
    assert waiting.status is RunStatus.skipped and len(setup.run_row(waiting.run_id).metrics["held_back_revisions"]) == 2
    assert runner.groups_behind(setup.catalog, [group]) == {}


def test_an_adapter_two_sources_watch_is_merged_once(setup, caplog):
    """A source renamed in the config stays in the catalog, so two sources watched one folder:
    each adapter was registered twice and merged twice (counted double in the merge).
    Now a group takes one per location: the merge is the one of the folder's adapters."""
    watched = setup.published.parent / "watched"
    group = setup.group(names=("task0", "task1"))
    assert setup.run(group).status is RunStatus.succeeded
    once = setup.current()
    with setup.catalog.session() as session:
        add_source(session, "renamed", SourceKind.local, {"paths": [str(watched)], "base_model": str(setup.base)})
    assert len(LocalFolderSource(setup.catalog, "renamed").scan().registered) == 2
    with setup.catalog.session() as session:
        assert len(session.scalars(select(Adapter).where(Adapter.status == AdapterStatus.registered)).all()) == 4
    selected = runner.select_inputs(setup.catalog, group)
    assert sorted(a.name for a, _ in selected) == ["task0", "task1"]
    assert {a.source.name for a, _ in selected} == {"renamed"}  # the newer revisions
    assert caplog.text.count("of source team is where adapter task") == 2 and "of source renamed is; merged once" in caplog.text
    assert runner.groups_behind(setup.catalog, [group]) == {"unified": frozenset(r.id for _, r in selected)}
    outcome = setup.run(group, force=True)
    assert outcome.status is RunStatus.succeeded and len(_recorded(setup, outcome.run_id)) == 2
    assert setup.current() == once  # the same merge: nothing counted twice
    assert runner.groups_behind(setup.catalog, [group]) == {}


def test_a_hub_adapter_one_source_names_twice_is_merged_once_naming_both(setup, caplog):
    """A Hub source stored under an earlier release with one adapter named twice (``acme/b``,
    ``acme/b@main``): its two registrations are one location, merged once, and the warning
    names both names and their source (it said "of another source" of one source's names)."""
    from iteris_daemon.catalog.registry import Observation, record
    from iteris_daemon.validation import AdapterInfo

    info = AdapterInfo(base_model=str(setup.base), task_type=None, rank=4, alpha=8.0, target_modules=["query"],
                       size_bytes=10, content_sha256="a" * 64)
    with setup.catalog.session() as session:
        source = add_source(session, "dup", SourceKind.hub, {"repos": ["acme/b", "acme/b@main"]})
        for name in ("acme/b", "acme/b@main"):
            record(session, source.id, Observation(name, name, "c" * 40, f"/cache/{name}", info=info))
    selected = runner.select_inputs(setup.catalog, setup.group(names=("acme/*",)))
    assert len(selected) == 1
    (said,) = [r.getMessage() for r in caplog.records if "merged once" in r.getMessage()]
    kept = selected[0][0].name
    other = ({"acme/b", "acme/b@main"} - {kept}).pop()
    assert said == f"group unified: adapter {other} of source dup is where adapter {kept} of source dup is; merged once"


def test_a_held_back_adapter_is_named_by_its_own_files_not_the_runs_copy(setup):
    """The reason an adapter is held back named the run's copy of its files, a folder that
    is deleted when the run ends (and another at every run): `status` showed a path no one
    could open."""
    watched = setup.published.parent / "watched"
    (watched / "task1" / "calibration.jsonl").write_text('{"txt": "no text field"}\n')
    LocalFolderSource(setup.catalog, "team").scan()  # registered with this calibration file
    outcome = setup.run(setup.group(strategy="iteris", names=("task0", "task1")))
    reason = setup.run_row(outcome.run_id).metrics["held_back"]["task1"]
    assert reason.startswith(f"{watched / 'task1' / 'calibration.jsonl'}:1: "), reason
    assert str(setup.work) not in reason


@pytest.mark.long
def test_after_a_run_that_published_only_partly_nothing_is_skipped(setup):
    """Destinations: a folder, then one that fails (here a second folder whose path is a
    file). The failed run had published to the first; the inputs then went back to what
    the last successful run merged, and the next run was skipped as unchanged: the first
    destination kept serving a merge of inputs no one had any more."""
    watched = setup.published.parent / "watched"
    second = setup.published.parent / "second"
    group = GroupConfig(name="unified", base_model=str(setup.base), strategy="task_arithmetic",
                        select={"names": ["task0", "task1"]},
                        destinations=[{"kind": "folder", "path": str(setup.published)},
                                      {"kind": "folder", "path": str(second)}])
    sync_group(setup.catalog, group)
    source = LocalFolderSource(setup.catalog, "team")
    assert setup.run(group).status is RunStatus.succeeded
    first = setup.current()
    original = (watched / "task0" / "adapter_model.safetensors").read_bytes()
    _replace_weights(watched / "task0", 2.0)
    source.scan()
    shutil.rmtree(second)
    second.write_text("not a folder")
    failed = setup.run(group)
    assert failed.status is RunStatus.failed and "published this merge" in failed.detail
    assert f"folder {setup.published}" in failed.detail
    assert setup.current() != first  # the first destination holds the failed run's merge
    row = setup.run_row(failed.run_id)
    assert [p["location"] for p in row.metrics["published"]] == [str(setup.published)]

    (watched / "task0" / "adapter_model.safetensors").write_bytes(original)  # back to the first run's inputs
    source.scan()
    second.unlink()
    again = setup.run(group)
    assert again.status is RunStatus.succeeded  # not "skipped: inputs unchanged"
    assert setup.current() == first
    assert sha256_file(second / "current" / "adapter_model.safetensors") == first
    assert setup.run(group).status is RunStatus.skipped  # all destinations agree again


@pytest.mark.long
def test_a_merge_whose_publishing_failed_is_published_again_not_merged_again(setup, tmp_path, monkeypatch):
    """Destinations: a folder, then the test Hub, whose commit fails past the publisher's
    retries. The run fails having published to the folder, keeps its merge and asks to be
    tried again; the next run with the same inputs publishes that merge (the folder has it
    already, the Hub gets it) without merging. Inputs that changed meanwhile, or a forced
    run, merge anew; a publisher's plugin error is not tried again."""
    from hub_server import HubServer, isolate_hub_client

    merges = []
    real_merge = runner.merge_in_worker
    monkeypatch.setattr(runner, "merge_in_worker", lambda *a, **k: merges.append(1) or real_merge(*a, **k))
    commits = r"^POST /api/models/team/merged/commit/"
    with HubServer() as hub:
        isolate_hub_client(monkeypatch, hub.endpoint, tmp_path / "hf-home")

        def group(scale: float) -> GroupConfig:
            group = GroupConfig(name="unified", base_model=str(setup.base), strategy="task_arithmetic",
                                params={"scale": scale}, select={"names": ["task0"]},
                                gates={"max_regression": False, "max_fidelity_gap": False},  # test_gates.py's subject
                                destinations=[{"kind": "folder", "path": str(setup.published)},
                                              {"kind": "hub", "repo_id": "team/merged", "endpoint": hub.endpoint,
                                               "retry_attempts": 2, "retry_base_seconds": 0}])
            sync_group(setup.catalog, group)
            return group

        hub.inject(commits, ("status", 503), times=2)
        failed = setup.run(group(1.0))
        assert failed.status is RunStatus.failed and failed.retry_publish and "published this merge" in failed.detail
        merged = setup.current()
        kept = runner.unpublished_copy(setup.work, 1)
        assert sha256_file(kept / "adapter_model.safetensors") == merged and len(merges) == 1
        hub.inject(commits, ("status", 503), times=2)
        still = setup.run(group(1.0))  # the Hub still down: published again, failed again, still kept
        assert still.status is RunStatus.failed and still.retry_publish and len(merges) == 1 and kept.is_dir()

        again = setup.run(group(1.0))
        assert again.status is RunStatus.succeeded and len(merges) == 1  # published, not merged again
        row = setup.run_row(again.run_id)
        assert row.metrics["republished_from"] == failed.run_id and row.output_commit == hub.head("team/merged")
        assert [(p["kind"], p["changed"]) for p in row.metrics["published"]] == [("folder", False), ("hub", True)]
        assert hashlib.sha256(hub.files("team/merged")["adapter_model.safetensors"]).hexdigest() == merged
        assert not kept.exists() and (runner.published_copy(setup.work, 1) / "adapter_model.safetensors").is_file()
        assert setup.run(group(1.0)).status is RunStatus.skipped  # every destination holds it

        hub.inject(commits, ("status", 503), times=2)
        assert setup.run(group(2.0)).retry_publish and len(merges) == 2
        hub.inject(commits, ("status", 503), times=2)
        other = setup.run(group(3.0))  # changed inputs while a merge waits: merged anew, and that one kept
        assert other.retry_publish and len(merges) == 3
        assert setup.run(group(3.0), force=True).status is RunStatus.succeeded and len(merges) == 4


def test_a_destination_added_or_moved_gets_the_merge_of_unchanged_inputs(setup, tmp_path, caplog):
    """A second folder destination added by a reload, or one moved: every run after was "skipped:
    inputs unchanged" (the fingerprint leaves destinations out), so the new folder stayed empty
    until a `merge-now --force` (QA CFG). The next run now merges and publishes to all of them;
    the one that had it says unchanged; the run after is skipped again."""
    first, second, moved = (tmp_path / name for name in ("first", "second", "moved"))

    def group(*folders: Path) -> GroupConfig:
        group = GroupConfig(name="unified", base_model=str(setup.base), strategy="task_arithmetic",
                            select={"names": ["task0"]}, destinations=[{"kind": "folder", "path": str(f)} for f in folders])
        sync_group(setup.catalog, group)
        return group

    assert setup.run(group(first)).status is RunStatus.succeeded
    assert setup.run(group(first)).status is RunStatus.skipped
    with caplog.at_level(logging.INFO, logger="iteris_daemon"):
        added = setup.run(group(first, second))
    assert added.status is RunStatus.succeeded, added.detail
    assert [(Path(p["location"]).name, p["changed"]) for p in setup.run_row(added.run_id).metrics["published"]] == [
        ("first", False), ("second", True)]
    assert "its destinations changed since run 1: merging to publish to every one" in caplog.text
    served = sha256_file(first / "current" / "adapter_model.safetensors")
    assert sha256_file(second / "current" / "adapter_model.safetensors") == served
    assert setup.run(group(first, second)).status is RunStatus.skipped
    assert setup.run(group(first, moved)).status is RunStatus.succeeded
    assert sha256_file(moved / "current" / "adapter_model.safetensors") == served
    assert setup.run(group(first, moved)).status is RunStatus.skipped


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_a_kept_merge_damaged_since_is_discarded_and_merged_anew(setup, monkeypatch, caplog, damage):
    """A kept merge whose weights were cut short (a disk error) or deleted (space freed under
    runs/) is not published again: it would publish a broken adapter recorded as a success,
    or fail to publish at every retry. It is discarded with a warning and the group merges."""
    merges = []
    real_merge = runner.merge_in_worker
    monkeypatch.setattr(runner, "merge_in_worker", lambda *a, **k: merges.append(1) or real_merge(*a, **k))
    group = setup.group(gates={"max_regression": False, "max_fidelity_gap": False})
    setup.published.write_text("a file where the folder goes")  # the destination fails
    assert setup.run(group).retry_publish
    weights = runner.unpublished_copy(setup.work, 1) / "adapter_model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        weights.unlink()
    setup.published.unlink()
    with caplog.at_level("WARNING", logger="iteris_daemon.runner"):
        again = setup.run(group)
    assert again.status is RunStatus.succeeded and len(merges) == 2, again
    assert "not as it was kept" in caplog.text and "republished_from" not in setup.run_row(again.run_id).metrics
    load_file(setup.published / "current" / "adapter_model.safetensors")  # complete


def _killed_while_publishing(url: str, group: GroupConfig, work: Path) -> None:
    """Run ``group`` in this (forked) process, which SIGKILLs itself once publishing starts."""
    import os
    import signal

    runner.publish_all = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
    runner.run_group(Catalog(url), group, work, runner.worker_id())


def test_a_merge_is_kept_before_publishing_so_a_kill_meanwhile_does_not_lose_it(setup, monkeypatch):
    """A daemon killed while publishing (systemd's stop timeout, the OOM killer) loses no
    merge: it was kept before publishing, and the run, marked failed at the next start,
    has it published by the next run instead of merged again (hours for a large model)."""
    import multiprocessing

    group = setup.group(gates={"max_regression": False, "max_fidelity_gap": False})
    child = multiprocessing.get_context("fork").Process(
        target=_killed_while_publishing, args=(f"sqlite:///{setup.work.parent / 'catalog.db'}", group, setup.work))
    child.start()
    child.join(300)
    assert child.exitcode == -9 and setup.current() is None
    assert runner.recover_interrupted(setup.catalog) == [1]
    monkeypatch.setattr(runner, "merge_in_worker", lambda *a, **k: pytest.fail("merged again"))
    again = setup.run(group)
    assert again.status is RunStatus.succeeded, again
    assert setup.run_row(again.run_id).metrics["republished_from"] == 1 and setup.current() is not None


def test_a_publishers_plugin_error_is_not_tried_again(setup, tmp_path):
    """A publisher that answered what no publisher may (it did publish): trying again
    would publish again, every time, until a fix; the run says not to."""
    from iteris_daemon.publish import PublisherSettings, PublishResult
    from registered import registered

    class Sloppy:
        kind = "sloppy"
        description = "answers a Path (a test plugin)"
        Settings = PublisherSettings

        def publish(self, request, settings):
            return PublishResult(location=tmp_path / "somewhere", version="v1", changed=True)

    with registered("register_publishers", Sloppy()):
        group = GroupConfig(name="unified", base_model=str(setup.base), strategy="task_arithmetic",
                            select={"names": ["task0"]},
                            destinations=[{"kind": "folder", "path": str(setup.published)}, {"kind": "sloppy"}])
        sync_group(setup.catalog, group)
        outcome = setup.run(group)
    assert outcome.status is RunStatus.failed and "publisher sloppy answered" in outcome.detail
    assert not outcome.retry_publish


@pytest.mark.parametrize("written, changed", [("adapter_model.safetensors", "adapter_model.safetensors"),
                                              ("notes/card.md", "notes/card.md")])
def test_a_publisher_that_changes_the_folder_it_is_handed_fails_the_run(setup, tmp_path, written, changed):
    """Every publisher is handed the merge's one folder. One that wrote into it (its own
    card over the weights, say) had the destinations after it publish what it left there:
    a broken adapter behind a run recorded as succeeded, and kept as the gate's baseline.
    A file added in a subfolder counts too: the Hub publisher uploads the folder's tree."""
    from iteris_daemon.publish import PublisherSettings, PublishResult
    from registered import registered

    class Scribbler:
        kind = "scribbler"
        description = "writes into the folder it is handed (a test plugin)"
        Settings = PublisherSettings

        def publish(self, request, settings):
            (request.adapter_dir / written).parent.mkdir(exist_ok=True)
            (request.adapter_dir / written).write_bytes(b"garbage")
            return PublishResult(location="scribbled", version="v1", changed=True)

    with registered("register_publishers", Scribbler()):
        group = GroupConfig(name="unified", base_model=str(setup.base), strategy="task_arithmetic",
                            select={"names": ["task0"]}, gates={"max_regression": False, "max_fidelity_gap": False},
                            destinations=[{"kind": "scribbler"}, {"kind": "folder", "path": str(setup.published)}])
        sync_group(setup.catalog, group)
        outcome = setup.run(group)
    assert outcome.status is RunStatus.failed and not outcome.retry_publish
    assert ("publisher scribbler (destination 1 of 2) changed the merged adapter's folder it was handed "
            f"({changed})") in outcome.detail
    assert setup.current() is None  # the folder destination published nothing
    assert not runner.published_copy(setup.work, 1).exists()  # nor is it the gate's baseline


@pytest.mark.parametrize("raised, retried", [(KeyError("bucket"), False), (SystemExit(3), False),
                                             (ConnectionError("store.example: refused"), True)])
def test_a_publisher_that_raises_is_named_and_only_a_destination_that_failed_is_tried_again(setup, raised, retried):
    """A publisher plugin's bug failed the run with "KeyError: 'bucket'", naming neither the
    publisher nor the destination, and was tried again as if the destination were down; a
    SystemExit escaped run_group, the run left ``running``."""
    from iteris_daemon.publish import PublisherSettings
    from registered import registered

    class Raising:
        kind = "bucket"
        description = "raises (a test plugin)"
        Settings = PublisherSettings

        def publish(self, request, settings):
            raise raised

    with registered("register_publishers", Raising()):
        group = GroupConfig(name="unified", base_model=str(setup.base), strategy="task_arithmetic",
                            select={"names": ["task0"]}, gates={"max_regression": False, "max_fidelity_gap": False},
                            destinations=[{"kind": "folder", "path": str(setup.published)}, {"kind": "bucket"}])
        sync_group(setup.catalog, group)
        outcome = setup.run(group)
    name = type(raised).__name__
    assert outcome.status is RunStatus.failed and outcome.retry_publish is retried
    assert f"published this merge: publisher bucket (destination 2 of 2) failed: {name}: " in outcome.detail
    assert ("a bug in the plugin" in outcome.detail) is not retried
    assert setup.run_row(outcome.run_id).status is RunStatus.failed


def _catalog_with_one_adapter(tmp_path, name: str = "team", locator: str = "/team/a", revision: str = "r1"):
    """A catalog with one registered adapter, recorded directly (no files are read here)."""
    from iteris_daemon.catalog.registry import Observation, record
    from iteris_daemon.validation import AdapterInfo

    catalog = Catalog(f"sqlite:///{tmp_path / 'behind.db'}")
    info = AdapterInfo(base_model="base", task_type=None, rank=4, alpha=8, target_modules=["q"], size_bytes=1,
                       content_sha256="0" * 64)

    def register(source: str, locator: str, revision: str) -> None:
        with catalog.session() as session:
            source_id = add_source(session, source, SourceKind.local, {"paths": [f"/{source}"]}).id
            record(session, source_id, Observation(locator=locator, name=Path(locator).name, revision=revision,
                                                   files_path=locator, info=info))

    register(name, locator, revision)
    return catalog, register


def _held_back_run(catalog, group) -> None:
    """Record a run of ``group`` that held back every adapter it selected."""
    inputs = runner.Inputs(selection=runner.selection_key(group))
    for adapter, revision in runner.select_inputs(catalog, group):
        inputs.hold_back(adapter, revision, "no calibration data")
    with catalog.session() as session:
        group_id = session.scalar(select(MergeGroup.id).where(MergeGroup.name == group.name))
        runner._add_run(session, group_id, RunStatus.skipped, "0" * 64, inputs, "0 adapters ready", True)


def test_a_revision_id_sqlite_gave_again_is_not_taken_for_the_held_back_one(tmp_path):
    """SQLite hands the id of a deleted row to the next one: a held-back revision deleted by
    `sources remove` (no run merged it) and a new adapter registered within one check got
    its id, and the group looked caught up. Held-back revisions are recorded with their
    location and revision too."""
    catalog, register = _catalog_with_one_adapter(tmp_path)
    group = GroupConfig(name="g", base_model="base", destinations=[{"kind": "folder", "path": str(tmp_path / "out")}])
    sync_group(catalog, group)
    _held_back_run(catalog, group)
    (held,) = runner.select_inputs(catalog, group)
    assert runner.groups_behind(catalog, [group]) == {}
    with catalog.session() as session:
        remove_source(session, "team")
    register("other", "/other/b", "r2")
    (new,) = runner.select_inputs(catalog, group)
    assert new[1].id == held[1].id  # the id came back
    assert runner.groups_behind(catalog, [group]) == {"g": frozenset({new[1].id})}
    catalog.close()


def test_each_definition_of_a_group_is_compared_with_its_own_runs(tmp_path):
    """Two daemons on one catalog defining the group differently (one reloaded, the other
    not yet): compared with each other's last run, each check found the group behind
    and the two daemons triggered each other's runs, every check."""
    catalog, register = _catalog_with_one_adapter(tmp_path)
    register("more", "/more/b", "r2")
    destinations = [{"kind": "folder", "path": str(tmp_path / "out")}]
    both = GroupConfig(name="g", base_model="base", destinations=destinations)
    only_a = GroupConfig(name="g", base_model="base", destinations=destinations, select={"names": ["a"]})
    assert runner.selection_key(both) != runner.selection_key(only_a)
    sync_group(catalog, both)
    _held_back_run(catalog, both)
    sync_group(catalog, only_a)
    _held_back_run(catalog, only_a)  # the other daemon's run: last
    assert runner.groups_behind(catalog, [both]) == {}
    assert runner.groups_behind(catalog, [only_a]) == {}
    renamed = GroupConfig(name="g", base_model="base", destinations=destinations, select={"names": ["b"]})
    assert runner.groups_behind(catalog, [renamed]) == {}  # no run of this definition yet: its first is due anyway
    catalog.close()


def test_status_shows_what_the_published_merge_scored(setup):
    """``status`` sums up the per-task figures of the group's last successful run, as the
    published report holds them."""
    from iteris_daemon.status import collect, render

    group = setup.group(names=("task0", "task1"))
    assert setup.run(group).status is RunStatus.succeeded
    tasks = json.loads((setup.published / "current" / "merge_report.json").read_text())["tasks"]
    gaps = {name: figures["fidelity_gap"] for name, figures in tasks.items()}
    (shown,) = [g for g in collect(setup.catalog)["groups"] if g["name"] == group.name]
    worst = max(gaps, key=gaps.get)
    assert shown["quality"] == pytest.approx({"mean_fidelity_gap": sum(gaps.values()) / 2, "worst_task": worst,
                                              "worst_fidelity_gap": gaps[worst]})
    assert f"quality: mean fidelity gap {sum(gaps.values()) / 2:.3f}, worst {worst} {gaps[worst]:.3f}" in render(
        collect(setup.catalog))


def _dense(folder: Path) -> dict[str, torch.Tensor]:
    """Each layer's delta ``scaling * B @ A`` in float64."""
    from iteris_daemon.lora import load_adapter

    return {p: m.scaling * m.B.double() @ m.A.double() for p, m in load_adapter(folder).modules.items()}


def test_a_groups_weights_follow_the_adapters_by_name_as_the_group_changes(setup, caplog):
    """A group's ``weights`` were a list taken by position: once an adapter went (or one came
    before it) its weight went to whichever took its place, exit 0. They are a table by adapter
    name now (an adapter not named weighs 1); the published delta is checked against the float64
    sum of the named weights times each adapter's own delta, before and after one is removed."""
    watched = setup.published.parent / "watched"
    group = setup.group(names=("task0", "task1"), params={"weights": {"task1": 3.0, "gone": 5.0}},
                        gates={"max_regression": None})
    own = {name: _dense(watched / name) for name in ("task0", "task1")}
    caplog.set_level("INFO", logger="iteris_daemon.runner")
    for expected in ({"task0": 1.0, "task1": 3.0}, {"task1": 3.0}):
        assert setup.run(group).status is RunStatus.succeeded and set(_published(setup)) == set(expected)
        merged = _dense(setup.published / "current")
        for path, delta in merged.items():
            want = sum(w * own[name][path] for name, w in expected.items())
            assert torch.allclose(delta, want, rtol=1e-5, atol=1e-7), path
        (watched / "task0" / "adapter_model.safetensors").unlink(missing_ok=True)
        LocalFolderSource(setup.catalog, "team").scan()
    assert "group unified: weights names gone, not in this run" in caplog.messages


def test_adapters_of_one_name_from_two_sources_are_named_by_their_source(setup, caplog):
    """Two teams' folders each hold ``task0``: the run named them by its temporary copies'
    paths (``…/.inputs-x/0``, a new name at every run) in the report, the model card and
    ``status``, and a table's ``task0`` weighed both. They are ``SOURCE/NAME`` now, and a
    table gives each its weight by that name (found by QA)."""
    watched = setup.published.parent / "watched"
    theirs = setup.published.parent / "theirs"
    shutil.copytree(watched / "task1", theirs / "task0")  # another adapter under the same name
    with setup.catalog.session() as session:
        add_source(session, "other", SourceKind.local, {"paths": [str(theirs)], "base_model": str(setup.base)})
    LocalFolderSource(setup.catalog, "other").scan()
    group = setup.group(names=("task0",), params={"weights": {"other/task0": 2.0}}, gates={"max_regression": None})
    caplog.set_level("INFO", logger="iteris_daemon.runner")
    assert setup.run(group).status is RunStatus.succeeded
    report = json.loads((setup.published / "current" / "merge_report.json").read_text())
    assert sorted(i["name"] for i in report["inputs"]) == ["other/task0", "team/task0"]
    assert sorted(report["tasks"]) == ["other/task0", "team/task0"]
    mine, other = _dense(watched / "task0"), _dense(theirs / "task0")
    for path, delta in _dense(setup.published / "current").items():
        assert torch.allclose(delta, mine[path] + 2.0 * other[path], rtol=1e-5, atol=1e-7), path


@pytest.mark.long
def test_a_run_waits_for_a_mapped_calibration_file_that_is_not_there(setup, tmp_path, caplog):
    """``[groups.calibration] files`` naming a file that is not there (a typo), or a link into
    a mount not up yet (QA RV8): the run is skipped, waiting for that adapter, asks to be tried again, and publishes
    nothing; once the file is there, both are merged with it. Before, the adapter was held
    back and the merge of the rest replaced the one served (QA NU). A name in the mapping
    that no adapter of the run has (a typo the other way) is logged."""
    files = {name: tmp_path / f"{name}.jsonl" for name in ("task0", "task1")}
    files["task0"].write_text('{"text": "curated sample of task0"}\n')
    group = setup.group(names=("task0", "task1"), calibration={
        "order": ["files", "adapter"], "files": {**files, "tsak1": tmp_path / "typo.jsonl"}})
    with caplog.at_level("INFO", logger="iteris_daemon"):
        outcome = runner.run_group(setup.catalog, group, setup.work, "tester")
    assert outcome.status is RunStatus.skipped and outcome.retry_inputs, outcome
    assert outcome.detail.startswith(f"waiting for task1: {files['task1']}: calibration file does not exist (mapped "
                                     "to adapter task1)"), outcome.detail
    assert setup.current() is None
    assert "group unified: calibration.files names tsak1, not in this run" in caplog.messages
    files["task1"].symlink_to(tmp_path / "mount" / "task1.jsonl")  # a link into a mount not up yet
    outcome = runner.run_group(setup.catalog, group, setup.work, "tester")
    assert outcome.status is RunStatus.skipped and outcome.retry_inputs, outcome
    assert f"{files['task1']}: calibration file is a symlink to nothing (or a loop)" in outcome.detail, outcome.detail
    (tmp_path / "mount").mkdir()
    (tmp_path / "mount" / "task1.jsonl").write_text('{"text": "curated sample of task1"}\n')
    outcome = runner.run_group(setup.catalog, group, setup.work, "tester")
    assert outcome.status is RunStatus.succeeded and not outcome.retry_inputs, outcome
    report = json.loads((setup.published / "current" / "merge_report.json").read_text())
    assert {i["name"]: i["calibration"]["source"] for i in report["inputs"]} == {
        name: str(path) for name, path in files.items()}
