"""Publish gates: a merge that is not finite, fails a task, or is worse than the published
one never reaches a destination; the run says why, and ``--force`` passes only the
quality gate.

The runner is driven directly (``run_group``) on a real SQLite catalog filled by the
real folder source, a tiny BERT and real PEFT adapters, with the folder publisher as
the destination. Regressions are made with task arithmetic's ``scale`` on a group of
one adapter: at scale 1 the merge *is* the adapter (fidelity gap 0), at scale 3 it
overshoots (a gap of about 0.1 here; LayerNorm damps it), whatever the random weights.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from sqlalchemy import select

from iteris_daemon.catalog.models import MergeGroup, RunStatus
from iteris_daemon.config import Gates, GroupConfig
from iteris_daemon import runner
from iteris_daemon.gates import judge
from iteris_daemon.adapter_config import sha256_file
from iteris_daemon.lora import load_adapter
from iteris_daemon.runner import published_copy, run_group, sync_group
from registered import registered

pytestmark = pytest.mark.timeout(300)


# ----------------------------------------------------------------------------- judge


def _report(gaps: dict[str, float], references: dict[str, float] | None = None) -> dict:
    tasks = {name: {"alignment_loss": [0.1], "fidelity_gap": gap} for name, gap in gaps.items()}
    for name, value in (references or {}).items():
        tasks[name]["reference_fidelity_gap"] = value
    return {"tasks": tasks}


def test_judge_passes_a_good_merge_and_says_what_it_did_not_check():
    verdict = judge(_report({"a": 0.3, "b": 0.5}), Gates())
    assert verdict.refused is None and "no comparison" in verdict.notes[0]
    assert judge(_report({"a": 0.3}, {"a": 0.29}), Gates()).refused is None
    assert "gates not applied" in judge({"tasks": {}}, Gates()).notes[0]


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_judge_refuses_non_finite_figures(bad):
    assert "fidelity_gap is not finite" in judge(_report({"a": 0.2, "b": bad}), Gates(max_fidelity_gap=None)).refused
    report = _report({"a": 0.2})
    report["tasks"]["a"]["alignment_loss"] = [0.5, bad]
    assert "task a: alignment_loss is not finite" == judge(report, Gates()).refused


def test_judge_refuses_a_task_beyond_the_fidelity_limit_even_when_forced():
    verdict = judge(_report({"a": 0.2, "b": 1.4}), Gates(max_fidelity_gap=1.0), forced=True)
    assert verdict.refused.startswith("task b: fidelity gap 1.400 exceeds max_fidelity_gap 1.0")
    assert judge(_report({"a": 0.2, "b": 1.4}), Gates(max_fidelity_gap=None)).refused is None


def test_judge_names_every_task_beyond_the_fidelity_limit():
    refused = judge(_report({"a": 0.05, "b": 0.5, "c": 1.033}), Gates(max_fidelity_gap=0.1)).refused
    assert refused.startswith("task c: fidelity gap 1.033, task b: fidelity gap 0.500 exceed max_fidelity_gap 0.1")


def _with_losses(report: dict, losses: dict[str, tuple[float, float]]) -> dict:
    for name, (task, merged) in losses.items():
        report["tasks"][name]["next_token_loss"] = {"base": 9.0, "task": task, "merged": merged}
    return report


def test_judge_refuses_tasks_whose_next_token_loss_the_merge_raises_too_far():
    report = _with_losses(_report({"a": 0.2, "b": 0.3, "c": 0.3}), {"a": (2.0, 2.1), "b": (1.5, 2.3), "c": (3.0, 3.6)})
    assert judge(report, Gates()).refused is None  # off by default
    assert judge(report, Gates(max_added_loss=1.0)).refused is None
    refused = judge(report, Gates(max_added_loss=0.5), forced=True).refused
    assert refused == ("task b: added next-token loss 0.800, task c: added next-token loss 0.600 exceed "
                       "max_added_loss 0.5 (nats per token over the task's own adapter)")
    plain = judge(_report({"a": 0.2}), Gates(max_added_loss=0.5, max_regression=None))
    assert plain.refused is None and plain.notes == [
        "max_added_loss: not applied (the model is not a language model that generates)"]
    assert Gates.model_validate({"max_added_loss": False}).max_added_loss is None


def test_judge_refuses_a_non_finite_next_token_loss():
    report = _with_losses(_report({"a": 0.2}), {"a": (2.0, math.nan)})
    assert judge(report, Gates()).refused == "task a: next_token_loss is not finite"


def test_judge_refuses_a_regression_unless_forced():
    report = _report({"a": 0.40, "b": 0.40}, {"a": 0.30, "b": 0.30})
    refused = judge(report, Gates(max_regression=0.05)).refused
    assert "mean fidelity gap 0.400 is worse than the published merge's 0.300" in refused and "--force" in refused
    forced = judge(report, Gates(max_regression=0.05), forced=True)
    assert forced.refused is None and forced.notes[0].startswith("forced past the quality gate")
    assert judge(report, Gates(max_regression=0.2)).refused is None
    assert judge(report, Gates(max_regression=None)).refused is None


def test_judge_holds_the_tasks_evaluated_without_calibration_data_for_another():
    """A merge a data-free strategy made with an adapter that had no calibration data was
    judged "not evaluated: gates not applied", every other task with it; the gates now hold
    the tasks evaluated (the quality gate's mean over them alone), and a note names the rest."""
    missing = {"not_evaluated": {"c": "no calibration data"}}
    note = "no gate applied to the tasks not evaluated (task c: no calibration data)"
    verdict = judge({**_report({"a": 0.2, "b": 1.4}), **missing}, Gates(max_fidelity_gap=1.0))
    assert verdict.refused.startswith("task b: fidelity gap 1.400 exceeds max_fidelity_gap 1.0")
    assert verdict.notes == [note]
    worse = judge({**_report({"a": 0.4}, {"a": 0.3}), **missing}, Gates(max_regression=0.05)).refused
    assert "mean fidelity gap 0.400 is worse than the published merge's 0.300" in worse
    passed = judge({**_report({"a": 0.3}, {"a": 0.3}), **missing}, Gates())
    assert passed.refused is None and passed.notes == [note]
    none = judge({"tasks": {}, "not_evaluated": {"a": "no calibration data", "c": "no calibration data"}}, Gates())
    assert none.refused is None and none.notes == [
        "no task evaluated (task a: no calibration data; task c: no calibration data): gates not applied"]


def test_gate_messages_show_why_and_the_threshold_is_the_same_everywhere():
    """Three decimals read "0.300 is worse than 0.300" and "1.500 exceeds 1.5"; a regression
    of exactly max_regression passed from 0.20 to 0.25 and was refused from 0.60 to 0.65 (the
    subtraction's rounding)."""
    close = judge(_report({"a": 0.3003}, {"a": 0.3}), Gates(max_regression=0.0001)).refused
    assert "mean fidelity gap 0.3003 is worse than the published merge's 0.3000" in close
    over = judge(_report({"a": 1.5004}), Gates(max_fidelity_gap=1.5)).refused
    assert over.startswith("task a: fidelity gap 1.5004 exceeds max_fidelity_gap 1.5")
    for old, new in ((0.20, 0.25), (0.60, 0.65)):
        assert judge(_report({"a": new}, {"a": old}), Gates(max_regression=0.05)).refused is None


# ----------------------------------------------------------------------------- runner


def test_a_regression_is_refused_kept_out_of_every_destination_and_published_when_forced(setup):
    first = setup.run(setup.group(params={"scale": 1.0}))
    assert first.status is RunStatus.succeeded
    published = setup.current()
    baseline = published_copy(setup.work, 1)
    assert sha256_file(baseline / "adapter_model.safetensors") == published

    worse = setup.group(params={"scale": 3.0}, gates={"max_fidelity_gap": None, "max_regression": 0.01})
    refused = setup.run(worse)
    row = setup.run_row(refused.run_id)
    assert refused.status is RunStatus.refused and row.status is RunStatus.refused
    assert row.error.startswith("not published: quality gate: mean fidelity gap")
    figures = row.metrics["tasks"]["task0"]
    assert figures["reference_fidelity_gap"] < 1e-3 and figures["fidelity_gap"] > 0.01
    assert setup.current() == published  # nothing reached the destination
    assert [p.name.split("-")[:2] for p in (setup.published / "versions").iterdir()] == [["run", "1"]]
    assert not (setup.work / f"run-{refused.run_id}").exists()

    again = setup.run(worse)  # the same inputs are not merged again just to be refused again
    assert again.status is RunStatus.skipped and f"since run {refused.run_id}, which was refused" in again.detail
    assert again.detail.endswith("merge-now --force judges them again, under the gates now loaded")
    # The published merge's own inputs again (an adapter added, refused, removed): it is still served.
    back = setup.run(setup.group(params={"scale": 1.0}))
    assert back.status is RunStatus.skipped, back.detail
    assert f"since run {first.run_id}, whose merge is published (run {refused.run_id}'s was refused)" in back.detail

    forced = setup.run(worse, force=True)
    assert forced.status is RunStatus.succeeded and setup.current() != published
    assert any(n.startswith("forced past the quality gate") for n in setup.run_row(forced.run_id).metrics["gate_notes"])
    assert sha256_file(baseline / "adapter_model.safetensors") == setup.current()


def test_a_forced_merge_whose_publishing_failed_is_published_by_the_next_run(setup, monkeypatch):
    """QA: merge-now --force past the quality gate, the destination failing: the daemon's
    retry (not forced) was skipped as "inputs unchanged since run N, which was refused",
    and the forced merge was never published. The kept merge is published, as forced."""
    assert setup.run(setup.group(params={"scale": 1.0})).status is RunStatus.succeeded
    published = setup.current()
    worse = setup.group(params={"scale": 3.0}, gates={"max_fidelity_gap": None, "max_regression": 0.01})
    assert setup.run(worse).status is RunStatus.refused
    publish_all = runner.publish_all

    def destination_down(*args, **kwargs):
        raise runner.PublishFailed("destination down")

    monkeypatch.setattr(runner, "publish_all", destination_down)
    forced = setup.run(worse, force=True)
    assert forced.status is RunStatus.failed and forced.retry_publish and forced.merged and setup.current() == published
    monkeypatch.setattr(runner, "publish_all", publish_all)
    monkeypatch.setattr(runner, "merge_in_worker", lambda *a, **k: pytest.fail("merged again"))
    retry = setup.run(worse)
    assert retry.status is RunStatus.succeeded and not retry.merged, retry.detail  # not timed as a merge
    row = setup.run_row(retry.run_id)
    assert row.metrics["republished_from"] == forced.run_id and setup.current() != published
    assert any(note.startswith("forced past the quality gate") for note in row.metrics["gate_notes"])
    assert setup.run(worse).status is RunStatus.skipped  # published now: nothing kept, nothing to do


@pytest.mark.long
def test_the_baseline_is_the_last_published_merge_not_this_daemons_last(setup, tmp_path):
    """Each daemon keeps its baseline in its own state folder. When another daemon on the
    catalog published since, this one compared the next merge with its own older publish
    (or, with no copy, said "nothing published yet"). Now a copy counts only while it is
    the catalog's last published run; otherwise the run says why it has no comparison."""
    gated = {"max_fidelity_gap": None, "max_regression": 0.01}
    assert setup.run(setup.group(params={"scale": 1.0}, gates=gated)).status is RunStatus.succeeded  # run 1, ours
    other = run_group(setup.catalog, setup.group(params={"scale": 1.5}, gates=gated), tmp_path / "other-work", "other",
                      force=True)  # another daemon publishes run 2 (forced past the gate against run 1)
    assert other.status is RunStatus.succeeded and setup.run_row(other.run_id).metrics["gate_notes"]
    # Ours still holds run 1's merge: a worse merge was refused against it, before.
    worse = setup.run(setup.group(params={"scale": 2.0}, gates=gated))
    assert worse.status is RunStatus.succeeded, worse.detail
    assert setup.run_row(worse.run_id).metrics["gate_notes"] == [
        f"quality gate: no comparison (the last published merge, run {other.run_id}, is not in this daemon's state "
        "folder (another daemon on the catalog published it, or the state folder was lost))"]
    # Having published it, ours holds the last published merge: the gate compares again.
    assert setup.run(setup.group(params={"scale": 3.0}, gates=gated)).status is RunStatus.refused


@pytest.mark.long
def test_a_groups_dtypes_and_offload_reach_its_merge_and_a_change_of_dtype_merges_again(setup):
    """Every daemon merge ran in float32 with offload auto, whatever the group needed (a
    GPU merge in bfloat16 takes half the memory); the config refused the settings. They
    are the group's now; a changed dtype changes the merge, so it is not skipped as unchanged."""
    assert setup.run(setup.group()).status is RunStatus.succeeded
    report = json.loads((setup.published / "current" / "merge_report.json").read_text())
    assert (report["dtype"], report["output_dtype"], report["placement"]) == ("float32", "float32", "disk")
    group = setup.group(dtype="bfloat16", output_dtype="float16", offload="none")
    assert group.precision() == {"dtype": "bfloat16", "output_dtype": "float16"}
    assert setup.run(group).status is RunStatus.succeeded
    report = json.loads((setup.published / "current" / "merge_report.json").read_text())
    assert (report["dtype"], report["output_dtype"], report["placement"]) == ("bfloat16", "float16", "resident")
    assert setup.run(setup.group(offload="cpu", dtype="bfloat16", output_dtype="float16")).status is RunStatus.skipped
    # exact_ranks writes other files where the layers' ranks differ: a change merges again too.
    exact = setup.group(dtype="bfloat16", output_dtype="float16", exact_ranks=True)
    assert exact.precision() == {"dtype": "bfloat16", "output_dtype": "float16", "exact_ranks": True}
    assert setup.run(exact).status is RunStatus.succeeded


def test_a_group_merges_adapters_with_their_own_heads_by_its_modules_to_save_rule(tmp_path):
    """Classifier LoRAs (SEQ_CLS: PEFT saves each one's head in modules_to_save) failed every
    run of their group, "choose a rule with --modules-to-save-rule", a flag the daemon has
    not (QA MIX). The group's ``modules_to_save_rule`` now reaches the merge: ``average``
    publishes the mean of the heads, an adapter's name its own; a change of rule merges again."""
    import torch
    from safetensors.torch import load_file

    from builders import build_adapter, build_tiny_model
    from group_runs import Setup

    base = build_tiny_model("bert", tmp_path / "cls-base", "SEQ_CLS")
    adapters = [build_adapter(base, tmp_path / "made" / f"cls{seed}", seed=seed, family="bert", task_type="SEQ_CLS",
                              targets=["query"]) for seed in (0, 1)]
    heads = [load_file(a / "adapter_model.safetensors") for a in adapters]
    setup = Setup(tmp_path, base, adapters)
    try:
        names = ("cls0", "cls1")
        refused = setup.run(setup.group(names=names))
        assert refused.status is RunStatus.failed and ("--modules-to-save-rule (a daemon group's modules_to_save_rule) "
                                                       "average|ADAPTER_NAME") in refused.detail, refused.detail
        for rule in ("average", "cls1"):
            group = setup.group(names=names, modules_to_save_rule=rule)
            assert group.precision() == {"modules_to_save_rule": rule}
            outcome = setup.run(group)
            assert outcome.status is RunStatus.succeeded, outcome.detail
            published = load_file(setup.published / "current" / "adapter_model.safetensors")
            saved = [key for key in published if "classifier" in key]
            assert saved and all(key in heads[0] for key in saved), saved
            for key in saved:
                want = (heads[0][key] + heads[1][key]) / 2 if rule == "average" else heads[1][key]
                torch.testing.assert_close(published[key], want)
    finally:
        setup.catalog.close()


def test_an_adapter_of_another_task_type_or_base_revision_is_held_back_not_failing_the_group(
        tmp_path, runner_adapters):
    """One adapter of another task type (an untyped one beside typed ones, say) or trained
    on another revision of the base model was registered, then failed every run of its
    group, "adapters have different task types", until someone removed it (QA MIX). The
    one that differs from what most of the group's adapters share is held back now, saying
    why, and the others merge; without a strict majority the run still fails, naming each.
    Adapters of another task arriving in numbers are held back against what the group
    published, not made the group's (review RV14: they replaced what its destination served)."""
    from group_runs import Setup

    from iteris_daemon.sources.local import LocalFolderSource

    base, (task0, task1) = runner_adapters
    made = tmp_path / "made"

    def variant(source: Path, name: str, **config) -> Path:
        shutil.copytree(source, made / name)
        path = made / name / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
        return made / name

    adapters = [variant(task0, "a", revision="v1"), variant(task1, "b", revision="v1"),
                variant(task0, "typed", task_type="FEATURE_EXTRACTION"), variant(task1, "old", revision="v0")]
    setup = Setup(tmp_path, base, adapters)
    try:
        tie = setup.run(setup.group(names=("a", "typed")))  # no majority, nothing published: no vote
        assert tie.status is RunStatus.failed and "adapters have different task types" in tie.detail, tie.detail
        outcome = setup.run(setup.group(names=("a", "b", "typed", "old")))
        assert outcome.status is RunStatus.succeeded, outcome.detail
        held = setup.run_row(outcome.run_id).metrics["held_back"]
        assert held == {
            "typed": "its task type (FEATURE_EXTRACTION) is not the one most of the group's adapters share (none): "
                     "one merge has one",
            "old": "its base model revision (v0) is not the one most of the group's adapters share (v1): one merge "
                   "has one"}, held
        report = json.loads((setup.published / "current" / "merge_report.json").read_text())
        assert sorted(entry["name"] for entry in report["inputs"]) == ["a", "b"]
        for name in ("f1", "f2", "f3"):
            shutil.copytree(made / "typed", tmp_path / "watched" / name)
        LocalFolderSource(setup.catalog, "team").scan()
        crowd = setup.run(setup.group(names=("a", "b", "f1", "f2", "f3")))  # a and b still merged alone
        assert crowd.status is RunStatus.skipped, crowd.detail
        assert setup.run_row(crowd.run_id).metrics["held_back"] == {
            name: "its task type (FEATURE_EXTRACTION) is not the published merge's (none): one merge has one"
            for name in ("f1", "f2", "f3")}
    finally:
        setup.catalog.close()


def test_a_stop_while_gathering_inputs_ends_the_run_before_the_next_adapter(setup):
    """A stop (SIGTERM) waited for every adapter's calibration file to be read, then started
    a merge worker only to cancel it; with dozens of large files longer than systemd waits.
    Now the gather ends at the next adapter, with nothing recorded or started."""
    asked: list[int] = []

    def should_stop() -> bool:  # the stop arrives after the first adapter's calibration was read
        asked.append(1)
        return len(asked) > 3  # two snapshots, one calibration

    outcome = run_group(setup.catalog, setup.group(names=("task0", "task1")), setup.work, "tester",
                        should_stop=should_stop)
    assert (outcome.status, outcome.run_id, outcome.detail) == (RunStatus.cancelled, None,
                                                                "stopped while gathering the inputs")
    assert len(asked) == 4 and setup.current() is None


class _Recording:
    """A publisher plugin for these tests: records each request, answers ``location``."""

    description = "records each request (a test plugin)"

    def __init__(self, kind: str, location):
        from iteris_daemon.publish import PublisherSettings

        self.kind, self.location, self.requests, self.Settings = kind, location, [], PublisherSettings

    def publish(self, request, settings):
        from iteris_daemon.publish import PublishResult

        self.requests.append(request)
        return PublishResult(location=self.location, version="v1", changed=True)


def test_publishers_are_told_the_base_model_the_merged_config_names(tmp_path):
    """A group merging on a local copy of a Hub model whose inputs all name its Hub id: the
    merged config names the id (merge.merged_base), and the Hub card linked no base (it
    was given the group's local folder)."""
    from iteris_daemon.adapter_config import CONFIG_NAME
    from iteris_daemon.runner import Inputs, publish_all

    folder = tmp_path / "run-1"
    folder.mkdir()
    (folder / CONFIG_NAME).write_text(json.dumps({"base_model_name_or_path": "acme/tiny-llama"}))
    group = GroupConfig(name="g", base_model=str(tmp_path / "local-copy"), destinations=[{"kind": "recorder"}])
    recorder = _Recording("recorder", "somewhere")
    with registered("register_publishers", recorder):
        publish_all(group, 1, folder, {"tasks": {}}, Inputs())
    assert [request.base_model for request in recorder.requests] == ["acme/tiny-llama"]


def test_a_publisher_plugin_answering_no_publish_result_fails_the_run_with_one_line(setup, tmp_path):
    """A publisher that answered ``location=Path(...)`` had published, then the run's record
    failed (not JSON): the run "could not be carried out", was retried, and each retry
    published another version. Now the run fails naming the publisher, and is recorded."""
    sloppy = _Recording("sloppy", tmp_path / "somewhere")  # a Path, not a string
    with registered("register_publishers", sloppy):
        group = GroupConfig(name="unified", base_model=str(setup.base), strategy="task_arithmetic",
                            select={"names": ["task0"]}, destinations=[{"kind": "sloppy"}])
        sync_group(setup.catalog, group)
        outcome = setup.run(group)
    assert outcome.status is RunStatus.failed and len(sloppy.requests) == 1
    assert setup.run_row(outcome.run_id).error.startswith(
        f"publisher sloppy answered PublishResult(location={tmp_path / 'somewhere'!r}, version='v1', changed=True), "
        "not a PublishResult of strings (location, version) and a bool (changed)")


def test_an_input_that_spells_its_base_model_otherwise_does_not_stop_the_group(tmp_path, runner_adapters):
    """The source names the base (a local copy) and one adapter's config names the Hub id
    of the same model: the source registered it against the copy, and every run failed
    with "adapters were trained on different base models", for ever, publishing nothing."""
    from group_runs import Setup

    base, (first, second) = runner_adapters
    other = tmp_path / "spelled" / second.name
    shutil.copytree(second, other)
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "acme/tiny-bert"}))
    setup = Setup(tmp_path, base, [first, other])
    try:
        outcome = setup.run(setup.group(names=("task0", "task1")))
        assert outcome.status is RunStatus.succeeded, outcome.detail
        assert set(setup.run_row(outcome.run_id).metrics["tasks"]) == {"task0", "task1"}
    finally:
        setup.catalog.close()


def test_a_group_merged_without_calibration_data_for_one_adapter_is_judged_on_the_others(tmp_path, runner_adapters,
                                                                                          caplog):
    """Under a data-free strategy an adapter without calibration data is merged; the merge was
    then not evaluated and published past every gate with a WARNING "gates not applied". Now
    the other task is evaluated and gated, and the WARNING names the task that was not."""
    from group_runs import Setup

    base, (first, second) = runner_adapters
    bare = tmp_path / "bare" / second.name
    shutil.copytree(second, bare)
    (bare / "calibration.jsonl").unlink()
    setup = Setup(tmp_path, base, [first, bare])
    note = "no gate applied to the tasks not evaluated (task task1: no calibration data)"
    try:
        both = ("task0", "task1")
        refused = setup.run(setup.group(names=both, params={"scale": 3.0}, gates={"max_fidelity_gap": 0.01}))
        assert refused.status is RunStatus.refused, refused.detail
        assert refused.detail.startswith("task task0: fidelity gap") and "max_fidelity_gap 0.01" in refused.detail
        assert setup.current() is None
        passed = setup.run(setup.group(names=both))
        assert passed.status is RunStatus.succeeded, passed.detail
        metrics = setup.run_row(passed.run_id).metrics
        assert set(metrics["tasks"]) == {"task0"} and metrics["gate_notes"] == [
            note, "quality gate: no comparison (nothing published yet)"]
        assert f"group unified: run {passed.run_id}: {note}" in caplog.messages
        report = json.loads((setup.published / "current" / "merge_report.json").read_text())
        assert report["not_evaluated"] == {"task1": "no calibration data"}
    finally:
        setup.catalog.close()


def test_merge_now_force_is_read_once_from_the_catalog(setup):
    group = setup.group(params={"scale": 1.0})
    assert setup.run(group).status is RunStatus.succeeded
    with setup.catalog.session() as session:
        session.scalar(select(MergeGroup)).force_requested = True
    assert setup.run(group).status is RunStatus.succeeded  # forced: unchanged inputs merged again
    with setup.catalog.session() as session:
        assert session.scalar(select(MergeGroup)).force_requested is False
    assert setup.run(group).status is RunStatus.skipped


def test_a_task_beyond_the_fidelity_limit_is_refused_even_when_forced(setup):
    group = setup.group(params={"scale": 3.0}, gates={"max_fidelity_gap": 0.01})
    outcome = setup.run(group, force=True)
    assert outcome.status is RunStatus.refused and "exceeds max_fidelity_gap 0.01" in outcome.detail
    assert setup.current() is None and not published_copy(setup.work, 1).exists()


def test_non_finite_weights_and_non_finite_outputs_are_never_published(setup):
    assert setup.run(setup.group(params={"scale": 1.0})).status is RunStatus.succeeded
    published = setup.current()
    # 1e39 overflows float32: the merged weights hold Inf, the merge refuses to write them.
    overflow = setup.run(setup.group(params={"scale": 1e39}), force=True)
    assert overflow.status is RunStatus.failed and "NaN/Inf" in setup.run_row(overflow.run_id).error
    # 1e30 fits float32 but the model's outputs overflow: the merge fails before it is written.
    huge = setup.run(setup.group(params={"scale": 1e30}, gates={"max_fidelity_gap": None}), force=True)
    assert huge.status is RunStatus.failed and "outputs on task0 are not finite" in huge.detail
    assert setup.current() == published
    load_adapter(setup.published / "current")  # still a complete, loadable adapter


def test_the_reference_is_scored_on_the_same_batches_as_the_merge(setup):
    """A consistency check of the baseline evaluation: the published merge, scored as the
    reference by the next run on unchanged data, has the fidelity gaps it had as the merge."""
    both = ("task0", "task1")
    first = setup.run(setup.group(strategy="iteris", names=both, params={"iterations": 1, "samples_per_task": 8}))
    # Forced: on these random adapters the second iteration may well be refused as a regression.
    second = setup.run(setup.group(strategy="iteris", names=both, params={"iterations": 2, "samples_per_task": 8}),
                       force=True)
    assert first.status is second.status is RunStatus.succeeded
    before = setup.run_row(first.run_id).metrics["tasks"]
    after = setup.run_row(second.run_id).metrics["tasks"]
    assert "reference_fidelity_gap" not in next(iter(before.values()))
    for name, figures in after.items():
        assert figures["reference_fidelity_gap"] == pytest.approx(before[name]["fidelity_gap"], rel=1e-4, abs=1e-6)
    report = json.loads((setup.published / "current" / "merge_report.json").read_text())
    run_one = next((setup.published / "versions").glob(f"run-{first.run_id}-*")) / "adapter_model.safetensors"
    assert report["reference"]["sha256"] == sha256_file(run_one)


def test_figures_summary_of_a_language_models_tasks():
    from iteris_daemon.figures import summary

    tasks = _with_losses(_report({"a": 0.2, "b": 0.6}), {"a": (2.0, 2.1), "b": (1.5, 1.8)})["tasks"]
    assert summary(tasks) == pytest.approx({"mean_fidelity_gap": 0.4, "worst_task": "b", "worst_fidelity_gap": 0.6,
                                            "mean_added_loss": 0.2})
    assert "mean_added_loss" not in summary(_report({"a": 0.2})["tasks"])
    assert summary({}) == {}
    # figures read back from a catalog written by anyone: what is not a number is left out
    odd = {"a": {"fidelity_gap": 0.2, "next_token_loss": {"task": 2.0}}, "b": {"fidelity_gap": None},
           "c": {"fidelity_gap": True, "next_token_loss": "2.0"}}
    assert summary(odd) == {"mean_fidelity_gap": 0.2, "worst_task": "a", "worst_fidelity_gap": 0.2}
