"""What ``iteris-daemon status`` shows, read from the catalog (so it works whether or
not the daemon runs, and on any host sharing the catalog).

Groups stay in the catalog when a config drops them (their runs are history). Given the
config's groups, the report details only those and names the others apart: a group
dropped by a reload was listed with its last run and next run time for ever."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, joinedload

from .catalog import Catalog
from .catalog.models import (Adapter, AdapterRevision, DaemonPresence, MergeGroup, MergeRun, MergeRunInput, RunStatus,
                             iso_utc)
from .catalog.registry import list_sources
from .config import DaemonSettings, Selection
from .logs import escape_controls
from .figures import summary, task_figures
from .peers import FORGET_AFTER, GONE_AFTER, RELOAD_REFUSED, differences
from .runner import location, merge_candidates, of_other_base_models, selected, unmerged

CLAIM_TTL = DaemonSettings.model_fields["claim_ttl_seconds"].default  # without a config: the default
RUNS_SHOWN = 50  # a group's newest runs read for its last run, skips and held-back adapters (db prune keeps them)


def serving(runs: Iterable[Any]) -> list[tuple[dict[str, Any], Any]]:
    """What each destination serves now, as ``(its publish record, the run)``, from a group's
    runs newest first (rows with ``id``, ``status``, ``finished_at``, ``metrics``). The last
    run that succeeded published to every destination; a run that failed since may have
    published to the first ones (``runner.PartlyPublished``), which serve its merge now."""
    recent = []
    for run in runs:
        if run.status in (RunStatus.succeeded, RunStatus.failed):
            recent.append(run)
        if run.status is RunStatus.succeeded:
            break
    served: dict[tuple[Any, Any], tuple[dict[str, Any], Any]] = {}
    for run in reversed(recent):  # a later run's record replaces the earlier one's, in its place
        metrics = run.metrics if isinstance(run.metrics, dict) else {}
        for entry in metrics.get("published") or []:
            if isinstance(entry, dict):
                served[(entry.get("kind"), entry.get("location"))] = (entry, run)
    return list(served.values())


def newest_served(served: list[tuple[dict[str, Any], Any]]) -> Any | None:
    """Of what :func:`serving` found, the newest run: the last merge a destination serves,
    whose inputs and figures ``status`` and ``/metrics`` show."""
    return max((run for _entry, run in served), key=lambda run: run.id, default=None)


def merged_inputs(session: Session, run_id: int) -> list[tuple[Adapter, AdapterRevision]]:
    """The ``(adapter, revision)`` pairs run ``run_id`` merged, their sources loaded."""
    revisions = session.scalars(
        select(AdapterRevision).join(MergeRunInput, MergeRunInput.revision_id == AdapterRevision.id)
        .where(MergeRunInput.run_id == run_id).options(joinedload(AdapterRevision.adapter).joinedload(Adapter.source)))
    return [(revision.adapter, revision) for revision in revisions]


def _left_out(session: Session, group_id: int, latest: MergeRun,
              merged: list[tuple[Adapter, AdapterRevision]]) -> list[dict[str, Any]]:
    """The adapters the succeeded run before ``latest`` merged and ``latest`` (``merged``:
    its inputs) does not, each with its status now and, where rejected, the reason."""
    before = session.scalar(select(MergeRun).where(MergeRun.group_id == group_id, MergeRun.id < latest.id,
                                                   MergeRun.status == RunStatus.succeeded)
                            .order_by(MergeRun.id.desc()).limit(1))
    kept = {location(adapter) for adapter, _ in merged}  # by location: two sources may name one folder
    left = {location(adapter): adapter for adapter, _ in (merged_inputs(session, before.id) if before else [])
            if location(adapter) not in kept}
    return [{"name": adapter.name, "status": adapter.status.value, "run_id": latest.id,
             "reason": adapter.current.reason if adapter.current is not None else None}
            for adapter in sorted(left.values(), key=lambda a: a.name)]


def shown_run(run: MergeRun) -> dict[str, Any]:
    """A run as ``status`` shows it."""
    return {"id": run.id, "status": run.status.value, "started_at": iso_utc(run.started_at),
            "finished_at": iso_utc(run.finished_at), "error": run.error, "repeats": run.repeats}


def collect(catalog: Catalog, configured: Collection[str] | None = None,
            claim_ttl_seconds: float | None = None) -> dict[str, Any]:
    """The report; with ``configured`` (a config's group names) ``groups`` holds only those,
    ``not_configured`` the names of the catalog's other groups, and ``not_loaded`` those of
    the config that no daemon has written into the catalog yet (not started, or no SIGHUP)."""
    with catalog.session(write=False) as session:  # not the write lock: the daemon writes meanwhile
        now = catalog.now(session)  # the clock the daemons write claims with (a server's), not this host's
        sources = [{"name": s.name, "kind": s.kind.value, "enabled": s.enabled, "healthy": s.healthy,
                    "last_poll_at": iso_utc(s.last_poll_at), "last_error": s.last_error} for s in list_sources(session)]
        candidates = merge_candidates(session)  # the runner's: a removed source's adapters are no input
        groups, not_configured = [], []
        for group in session.scalars(select(MergeGroup).order_by(MergeGroup.name)):
            if configured is not None and group.name not in configured:
                not_configured.append(group.name)
                continue
            runs = session.scalars(select(MergeRun).where(MergeRun.group_id == group.id).order_by(MergeRun.id.desc())
                                   .limit(RUNS_SHOWN)).all()
            last = next((r for r in runs if r.status is not RunStatus.skipped), runs[0] if runs else None)
            # skipped runs newer than the last decided one: a group stalled (its source gone, too few
            # adapters ready) showed only its last success
            skipped = next((r for r in runs if r.status is RunStatus.skipped and r.id > last.id), None)
            # past the RUNS_SHOWN newest runs too: a publish failing for a day leaves more behind the last success
            success = session.scalar(select(MergeRun).where(MergeRun.group_id == group.id,
                                                            MergeRun.status == RunStatus.succeeded)
                                     .order_by(MergeRun.id.desc()).limit(1))
            partly = session.scalars(select(MergeRun).where(
                MergeRun.group_id == group.id, MergeRun.status == RunStatus.failed, MergeRun.may_have_published(),
                MergeRun.id > (success.id if success else 0)).order_by(MergeRun.id.desc())).all()
            served = serving([*partly, *filter(None, [success])])
            latest = newest_served(served)  # a partly published run's, where one published since the success
            merged = merged_inputs(session, latest.id) if latest else []
            # A run skipped since on the same inputs names the revisions it found them in (a Hub
            # commit that only edits the README is a new revision of content already merged).
            unchanged = next((r for r in runs if latest and r.id > latest.id and r.status is RunStatus.skipped
                              and r.input_fingerprint == latest.input_fingerprint), None)
            merged += merged_inputs(session, unchanged.id) if unchanged else []
            held_back = (runs[0].metrics or {}).get("held_back", {}) if runs else {}
            dropped = [entry for entry in (_left_out(session, group.id, latest, merged) if latest else [])
                       if entry["name"] not in held_back]  # those say why they wait
            # the runner's own rule: the adapters its select never takes are no group's "not yet merged"
            selection = Selection.model_validate(group.selection or {})
            taken = selected(candidates, group.base_model, selection)
            new = sorted(a.name for a, _ in unmerged(taken, merged) if a.name not in held_back)
            groups.append({
                "name": group.name, "strategy": group.strategy, "base_model": group.base_model,
                "last_run": None if last is None else shown_run(last),
                "last_skipped": None if skipped is None else shown_run(skipped),
                "next_run_at": iso_utc(group.next_run_at),
                "merging_now": group.claimed_by,
                "claimed_at": iso_utc(group.claimed_at),
                # a claim its daemon stopped refreshing (killed mid-merge): the next daemon takes it over
                "claim_stale": group.claimed_by is not None and group.claimed_at is not None
                and now - group.claimed_at.replace(tzinfo=None) > timedelta(seconds=claim_ttl_seconds or CLAIM_TTL),
                "published": [{**entry, "run_id": run.id} for entry, run in served],
                # what the last published merge scored on its calibration data (iteris_daemon.figures)
                "quality": summary(task_figures((latest.metrics or {}).get("tasks"))) if latest else {},
                # what the merge before the last published merged and it does not, with why: a
                # rejected commit withdrew an adapter, and the smaller merge looked healthy
                "left_out": dropped,
                "waiting": {"held_back": held_back, "not_yet_merged": new,
                            "other_base_model": of_other_base_models(candidates, group.base_model, selection)},
            })
        # A killed daemon's row stays until another daemon forgets it (a day): with none alive,
        # rows of any age were listed as "seen in the last day"; one not seen lately is marked.
        daemons = [{"holder": d.holder, "started_at": iso_utc(d.started_at), "seen_at": iso_utc(d.seen_at),
                    "settings": d.settings, "reload_refused": d.settings.get(RELOAD_REFUSED),
                    "live": now - d.seen_at.replace(tzinfo=None) <= GONE_AFTER}
                   for d in session.scalars(select(DaemonPresence).where(DaemonPresence.seen_at >= now - FORGET_AFTER)
                                            .order_by(DaemonPresence.seen_at.desc()))]
    report = {"sources": sources, "groups": groups, "daemons": daemons}
    if configured is not None:
        report["not_configured"] = not_configured
        report["not_loaded"] = [name for name in configured if name not in {g["name"] for g in groups}]
    return report


def render(report: dict[str, Any]) -> str:
    lines = ["sources:"]
    if not report["sources"]:
        lines.append("  (none)")
    for s in report["sources"]:
        health = ("removed (disabled: kept for the runs that merged its adapters)" if not s["enabled"]
                  else "ok" if s["healthy"] else f"UNHEALTHY ({s['last_error']})")
        lines.append(f"  {s['name']:20} {s['kind']:6} {health}  last poll {s['last_poll_at'] or '-'}")
    lines.append("groups:")
    if not report["groups"] and not report.get("not_loaded"):
        lines.append("  (none)")
    for g in report["groups"]:
        last = g["last_run"]
        lines.append(f"  {g['name']} ({g['strategy']}, base {g['base_model']})")
        lines.append("    last run: " + ("-" if last is None else
                     f"#{last['id']} {last['status']} at {last['finished_at'] or last['started_at']}"
                     + (f" ({last['repeats']} times since {last['started_at']})" if last["repeats"] > 1 else "")
                     + (f": {last['error']}" if last["error"] else "")))
        skipped = g["last_skipped"]
        if skipped:
            lines.append(f"    last skipped: #{skipped['id']} at {skipped['finished_at'] or skipped['started_at']} ({skipped['error']}"
                         + (f"; {skipped['repeats']} times since {skipped['started_at']}" if skipped["repeats"] > 1 else "")
                         + ")")
        lines.append(f"    next run: {g['next_run_at'] or '-'}" + (
            "" if not g["merging_now"] else f"; merging now ({g['merging_now']})" if not g["claim_stale"]
            else f"; claimed by {g['merging_now']}, not refreshed since {g['claimed_at']}: stale (that daemon "
                 "stopped mid-run; the next daemon to look takes the group over and fails the run)"))
        for p in g["published"]:
            lines.append(f"    published: {p['kind']} {p['location']} @ {p['version']}")
        quality = g["quality"]
        if quality:
            lines.append(f"    quality: mean fidelity gap {quality['mean_fidelity_gap']:.3f}, worst "
                         f"{quality['worst_task']} {quality['worst_fidelity_gap']:.3f}"
                         + (f"; adds {quality['mean_added_loss']:.3f} nats/token to the tasks' next-token loss"
                            if "mean_added_loss" in quality else ""))
        for left in g["left_out"]:
            why = f": {left['reason']}" if left["reason"] else ""
            lines.append(f"    left out by run #{left['run_id']}, merged before: {left['name']} ({left['status']}{why})")
        for name, reason in g["waiting"]["held_back"].items():
            lines.append(f"    waiting: {name}: {reason}")
        if g["waiting"]["not_yet_merged"]:
            lines.append(f"    not yet merged: {', '.join(g['waiting']['not_yet_merged'])}")
        if g["waiting"]["other_base_model"]:
            lines.append(f"    never merged: {g['waiting']['other_base_model']}")
    if report.get("not_loaded"):
        lines.append(f"  in the config, not loaded by a daemon yet (start it, or send it SIGHUP after editing the "
                     f"config): {', '.join(report['not_loaded'])}")
    if report.get("not_configured"):
        lines.append(f"  not in the config, not merged (their runs stay in the catalog): "
                     f"{', '.join(report['not_configured'])}")
    lines.append("daemons (seen in the last day):")
    if not report["daemons"]:
        lines.append("  (none)")
    first = report["daemons"][0] if report["daemons"] else None
    for d in report["daemons"]:
        differ = differences(d["settings"], first["settings"], ("here", f"on {first['holder']}")) if d is not first else []
        lines.append(f"  {d['holder']}  started {d['started_at']}, last seen {d['seen_at']}"
                     + ("" if d["live"] else " (not seen for over 10 minutes: stopped or killed?)")
                     + (f"; OTHER SETTINGS: {'; '.join(differ)}" if differ else ""))
        if d["reload_refused"]:
            lines.append(f"    its last reload was refused, it runs the configuration before it (its next start "
                         f"reads the refused file): {d['reload_refused']}")
    return "\n".join(map(escape_controls, lines))  # names and errors as others wrote them: no escape sequences
