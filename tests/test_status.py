"""``iteris-daemon status`` (text and ``--json``) and the metrics collector after real runs
on the real folder source, catalog and folder publisher (the ``setup`` fixture of ``group_runs``)."""

from __future__ import annotations

import json
import re
import os
from datetime import datetime, timezone

import pytest
from prometheus_client import generate_latest
from safetensors.torch import load_file, save_file
from sqlalchemy import select

from iteris_daemon.catalog.models import MergeRun, RunStatus, Source, SourceKind
from iteris_daemon.catalog.registry import add_source
from iteris_daemon.cli import main
from iteris_daemon.config import GroupConfig
from iteris_daemon.endpoints import DaemonMetrics
from iteris_daemon.runner import groups_behind, select_inputs, sync_group
from iteris_daemon.sources.local import LocalFolderSource
from databases import rows_loaded

pytestmark = pytest.mark.timeout(300)


def status(capsys, setup, *options) -> str:
    assert main(["status", "--db", str(setup.catalog.engine.url), *options]) == 0
    return capsys.readouterr().out


def test_not_yet_merged_names_only_what_the_groups_select_takes(setup, capsys):
    """An adapter the group's ``select`` never takes was listed as "not yet merged" for ever."""
    assert setup.run(setup.group(names=("task0",))).status is RunStatus.succeeded
    assert "not yet merged" not in status(capsys, setup)
    assert json.loads(status(capsys, setup, "--json"))["groups"][0]["waiting"]["not_yet_merged"] == []
    setup.group(names=("task*",))  # the config now takes task1 too: it waits for the next run
    assert "    not yet merged: task1\n" in status(capsys, setup)


def test_an_adapter_the_last_merge_left_out_is_shown_with_why(setup, capsys):
    """A commit that broke an adapter's weights withdrew it: the group merged and published
    the others, and `status` showed a healthy source and a succeeded run, nothing of the task
    the published merge had lost (QA HUB)."""
    group = setup.group(names=("task0", "task1"))
    assert setup.run(group).status is RunStatus.succeeded
    (setup.published.parent / "watched" / "task1" / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    LocalFolderSource(setup.catalog, "team").scan()
    assert setup.run(group).status is RunStatus.succeeded
    [left] = json.loads(status(capsys, setup, "--json"))["groups"][0]["left_out"]
    assert (left["name"], left["status"], left["run_id"]) == ("task1", "rejected", 2) and left["reason"]
    assert f"    left out by run #2, merged before: task1 (rejected: {left['reason']})\n" in status(capsys, setup)
    assert setup.run(group, force=True).status is RunStatus.succeeded  # the same inputs published again
    assert json.loads(status(capsys, setup, "--json"))["groups"][0]["left_out"] == []


@pytest.mark.parametrize("removed", ["destination", "current link"])
def test_a_destination_removed_by_hand_is_published_to_again(setup, capsys, caplog, removed):
    """The destination folder (or its `current` link) deleted by hand: every later run was
    skipped, "inputs unchanged since the last successful run", a restart too, and `status`
    named the version as served; consumers had nothing to load until an input changed (QA OPS2).
    The folder publisher says whether it still serves what it published: the run publishes."""
    import shutil

    group = setup.group(names=("task0",))
    assert setup.run(group).status is RunStatus.succeeded
    assert setup.run(group).status is RunStatus.skipped  # unchanged, still served: nothing to do
    if removed == "destination":
        shutil.rmtree(setup.published)
    else:
        (setup.published / "current").unlink()
    with caplog.at_level("WARNING", logger="iteris_daemon.runner"):
        assert setup.run(group).status is RunStatus.succeeded
    assert (setup.published / "current" / "adapter_model.safetensors").is_file()
    assert any(f"folder {setup.published} no longer serves what run 1 published" in m for m in caplog.messages)
    assert setup.run(group).status is RunStatus.skipped


def test_a_rollback_by_hand_is_not_undone(setup):
    """`current` pointed back at the version before by hand (the publisher keeps some for it):
    a run of unchanged inputs leaves it there (review RV13: the check first took any other
    version for a destination that no longer serves)."""
    assert setup.run(setup.group(names=("task0",))).status is RunStatus.succeeded
    group = setup.group(names=("task0", "task1"), gates={"max_regression": None})
    assert setup.run(group).status is RunStatus.succeeded
    versions = sorted(p.name for p in (setup.published / "versions").iterdir())
    assert len(versions) == 2
    (setup.published / "current").unlink()
    (setup.published / "current").symlink_to(f"versions/{versions[0]}")  # as the publisher writes it
    assert setup.run(group).status is RunStatus.skipped
    assert os.readlink(setup.published / "current").endswith(versions[0])


def test_times_carry_their_zone(setup, capsys):
    """Catalog times are UTC; printed without a zone they read as local time."""
    assert setup.run(setup.group()).status is RunStatus.succeeded
    report = json.loads(status(capsys, setup, "--json"))
    finished = report["groups"][0]["last_run"]["finished_at"]
    assert finished.endswith("+00:00") and datetime.fromisoformat(finished).tzinfo == timezone.utc
    assert report["sources"][0]["last_poll_at"].endswith("+00:00")
    assert f"    last run: #1 succeeded at {finished}\n" in status(capsys, setup)


def test_a_partly_published_run_shows_what_each_destination_serves(setup, capsys):
    """A run that failed after publishing to the first destination: status and the metrics
    named the run before for it, which that destination no longer serves."""
    second = setup.published.parent / "second"
    destinations = [{"kind": "folder", "path": str(setup.published)}, {"kind": "folder", "path": str(second)}]

    def group(*names: str) -> GroupConfig:
        config = GroupConfig(name="unified", base_model=str(setup.base), strategy="task_arithmetic",
                             select={"names": list(names)}, destinations=destinations, gates={"max_regression": None})
        sync_group(setup.catalog, config)
        return config

    assert setup.run(group("task0")).status is RunStatus.succeeded
    second.rename(second.with_name("second-away"))
    second.write_text("not a folder")  # the second destination breaks
    assert setup.run(group("task0", "task1")).status is RunStatus.failed
    first_run, partial = setup.run_row(1), setup.run_row(2)
    serves = os.path.basename(os.readlink(setup.published / "current"))
    assert serves == partial.metrics["published"][0]["version"]

    published = json.loads(status(capsys, setup, "--json"))["groups"][0]["published"]
    assert [(p["location"], p["version"], p["run_id"]) for p in published] == [
        (str(setup.published), serves, 2), (str(second), first_run.metrics["published"][1]["version"], 1)]
    assert f"    published: folder {setup.published} @ {serves}\n" in status(capsys, setup)
    # The last merge is the partly published one: its inputs are merged, its figures the quality shown
    # (task1 was "not yet merged", and the quality run 1's).
    report = json.loads(status(capsys, setup, "--json"))["groups"][0]
    assert report["waiting"]["not_yet_merged"] == [] and "not yet merged" not in status(capsys, setup)
    assert report["quality"]["worst_task"] in ("task0", "task1") and set(partial.metrics["tasks"]) == {"task0", "task1"}
    assert report["quality"]["mean_fidelity_gap"] == pytest.approx(
        sum(t["fidelity_gap"] for t in partial.metrics["tasks"].values()) / 2)

    registry = DaemonMetrics(setup.catalog).registry
    assert registry.get_sample_value("iteris_fidelity_gap", {"group": "unified", "task": "task1"}) == pytest.approx(
        partial.metrics["tasks"]["task1"]["fidelity_gap"])
    for destination, run in ((setup.published, partial), (second, first_run)):
        shown = registry.get_sample_value("iteris_last_publish_timestamp_seconds",
                                          {"group": "unified", "destination": f"folder:{destination}"})
        assert shown == run.finished_at.replace(tzinfo=timezone.utc).timestamp()


def test_what_is_published_survives_many_failed_runs_since(setup, capsys):
    """``status`` read the group's 50 newest runs: a publish failing for half a day (a retry
    every 15 minutes adds a failed run each time) and it said nothing was published, showed
    no quality and every adapter "not yet merged". The last success is found however many
    runs follow it, and the failed runs are not each read to find those that published."""
    from iteris_daemon.runner import _last_decided

    group = setup.group()
    assert setup.run(group).status is RunStatus.succeeded
    before = json.loads(status(capsys, setup, "--json"))["groups"][0]
    assert before["published"] and before["quality"] and before["waiting"]["not_yet_merged"] == []
    with setup.catalog.session() as session:
        success = session.get(MergeRun, 1)
        for _ in range(60):  # as the runner records a failed publish
            session.add(MergeRun(group_id=success.group_id, status=RunStatus.failed,
                                 input_fingerprint=success.input_fingerprint, finished_at=success.finished_at,
                                 error="publishing to hub failed: 503",
                                 metrics={"held_back": {}, "held_back_revisions": [], "selection": None}))
    after = json.loads(status(capsys, setup, "--json"))["groups"][0]
    assert after["last_run"]["id"] == 61 and after["last_run"]["status"] == "failed"
    assert {k: after[k] for k in ("published", "quality", "waiting")} == {
        k: before[k] for k in ("published", "quality", "waiting")}
    assert _last_decided(setup.catalog, success.group_id).id == 1  # the same inputs need no new merge
    with rows_loaded(MergeRun) as loaded:
        status(capsys, setup, "--json")
    assert 1 in loaded and len(loaded) <= 51  # the 50 newest (for `last run`), and the success
    shown = DaemonMetrics(setup.catalog).registry.get_sample_value(
        "iteris_last_publish_timestamp_seconds", {"group": "unified", "destination": f"folder:{setup.published}"})
    assert shown == success.finished_at.replace(tzinfo=timezone.utc).timestamp()


def test_metrics_export_only_the_daemons_groups(setup):
    """A group dropped from the config stays in the catalog; its last publish time, exported
    for ever, fired staleness alerts for ever."""
    assert setup.run(setup.group()).status is RunStatus.succeeded
    groups = ["unified"]
    text = lambda: generate_latest(DaemonMetrics(setup.catalog, lambda: groups).registry).decode()  # noqa: E731
    assert 'iteris_last_publish_timestamp_seconds{destination="folder:' in text()
    groups = ["other"]  # a reload dropped it
    assert 'group="unified"' not in text()
    assert 'group="unified"' in generate_latest(DaemonMetrics(setup.catalog).registry).decode()  # no config: all


def test_adapters_of_another_base_model_are_named(setup, capsys, tmp_path):
    """A group whose base model is spelled otherwise than its sources' (the Hub id of their
    local copy, a typo) never merged, each run skipped with "0 adapters ready, the group
    needs 1" and `status` saying no more."""
    group = GroupConfig(name="unified", base_model="org/base", select={"names": ["task0"]},
                        destinations=[{"kind": "folder", "path": str(tmp_path / "published")}])
    sync_group(setup.catalog, group)
    outcome = setup.run(group)
    why = f"1 registered adapter its select takes is of base model {setup.base}, not org/base"
    assert outcome.status is RunStatus.skipped and outcome.detail == f"0 adapters ready, the group needs 1 ({why})"
    assert f"    never merged: {why}\n" in status(capsys, setup)
    assert json.loads(status(capsys, setup, "--json"))["groups"][0]["waiting"]["other_base_model"] == why


def test_skipped_runs_since_the_last_decided_one_are_shown(setup, capsys):
    """``last run`` is the last decided run: with the watched folder gone, each run was
    skipped ("0 adapters ready") and status still said "last run: #1 succeeded", nothing
    telling the group had stalled."""
    assert setup.run(setup.group()).status is RunStatus.succeeded
    assert json.loads(status(capsys, setup, "--json"))["groups"][0]["last_skipped"] is None
    stalled = setup.group(min_adapters=3)
    for _ in range(2):
        outcome = setup.run(stalled)
        assert outcome.status is RunStatus.skipped
    report = json.loads(status(capsys, setup, "--json"))["groups"][0]
    skipped = report["last_skipped"]
    assert report["last_run"]["id"] == 1 and report["last_run"]["status"] == "succeeded"
    assert skipped["id"] == 3 and skipped["status"] == "skipped" and skipped["repeats"] == 2
    assert skipped["error"] == outcome.detail
    assert (f"    last skipped: #3 at {skipped['finished_at']} ({outcome.detail}; 2 times since "
            f"{skipped['started_at']})\n") in status(capsys, setup)


def test_a_disabled_sources_adapters_wait_for_no_merge(setup, capsys):
    """Adapters a removed (disabled) source had registered, as catalogs written before ``record``
    refused them hold: ``status`` listed them as "not yet merged" though no run takes them."""
    assert setup.run(setup.group(names=("task0",))).status is RunStatus.succeeded
    setup.group(names=("task*",))
    assert "    not yet merged: task1\n" in status(capsys, setup)
    with setup.catalog.session() as session:
        session.scalar(select(Source).where(Source.name == "team")).enabled = False
    assert json.loads(status(capsys, setup, "--json"))["groups"][0]["waiting"]["not_yet_merged"] == []
    text = status(capsys, setup)
    assert "not yet merged" not in text
    # ... and the source itself read "ok", as a watched one does (QA STAT)
    assert re.search(r"^  team +local  removed \(disabled: kept for the runs that merged its adapters\)", text, re.M), text


def test_an_adapter_two_sources_watch_is_merged_once_and_not_shown_waiting(setup, capsys):
    """A second source over a folder another watches (`sources add`): runs merge the folder's
    adapter once, and skip as its inputs are unchanged, but status listed it as "not yet
    merged" for ever: the runner keeps the newer source's revision, which no run recorded
    as merged (QA NU2). It is the merged content, until that folder changes."""
    watched = setup.published.parent / "watched"
    group = setup.group(names=("task0", "task1"))
    assert setup.run(group).status is RunStatus.succeeded
    with setup.catalog.session() as session:
        add_source(session, "over", SourceKind.local, {"paths": [str(watched / "task0")], "base_model": str(setup.base)})
    assert len(LocalFolderSource(setup.catalog, "over").scan().registered) == 1
    assert [a.source.name for a, _ in select_inputs(setup.catalog, group) if a.name == "task0"] == ["over"]
    assert json.loads(status(capsys, setup, "--json"))["groups"][0]["waiting"]["not_yet_merged"] == []
    skipped = setup.run(group)
    assert (skipped.status, skipped.detail) == (RunStatus.skipped, "inputs unchanged since the last successful run")
    assert groups_behind(setup.catalog, [group]) == {}  # nor does the catalog check trigger runs
    assert "not yet merged" not in status(capsys, setup)
    tensors = load_file(watched / "task0" / "adapter_model.safetensors")  # the folder changes: it waits
    save_file({k: v * 2 for k, v in tensors.items()}, watched / "task0" / "adapter_model.safetensors")
    assert len(LocalFolderSource(setup.catalog, "over").scan().registered) == 1
    assert "    not yet merged: task0\n" in status(capsys, setup)


def test_a_claim_its_daemon_stopped_refreshing_is_shown_stale(setup, capsys, tmp_path):
    """A daemon killed mid-merge left its claim: status said "merging now" for ever (QA ST2).
    Past `claim_ttl_seconds` (the default without a config, the config's with one) it says
    the claim is stale, and since when."""
    from datetime import timedelta

    from iteris_daemon.catalog.models import MergeGroup, utcnow

    assert setup.run(setup.group()).status is RunStatus.succeeded
    for age in (10, 600):
        with setup.catalog.session() as session:
            group = session.scalar(select(MergeGroup))
            group.claimed_by, group.claimed_at = "host:1:dead", utcnow() - timedelta(seconds=age)
        report = json.loads(status(capsys, setup, "--json"))["groups"][0]
        assert report["claim_stale"] is (age == 600)
        shown = ("merging now (host:1:dead)" if age == 10 else
                 f"claimed by host:1:dead, not refreshed since {report['claimed_at']}: stale (that daemon stopped mid-run")
        assert shown in status(capsys, setup)
    config = tmp_path / "daemon.toml"  # claim_ttl_seconds = 5: the 10 s old claim is stale
    config.write_text(f"[daemon]\ndatabase = {json.dumps(str(setup.catalog.engine.url))}\nclaim_ttl_seconds = 5\n"
                      f"[[groups]]\nname = \"unified\"\nbase_model = {json.dumps(str(setup.base))}\n"
                      f"[[groups.destinations]]\nkind = \"folder\"\npath = {json.dumps(str(setup.published))}\n")
    with setup.catalog.session() as session:
        session.scalar(select(MergeGroup)).claimed_at = utcnow() - timedelta(seconds=10)
    assert main(["status", "--json", "--config", str(config)]) == 0
    assert json.loads(capsys.readouterr().out)["groups"][0]["claim_stale"] is True
