"""The catalog check against revision history: A adapters with K revisions each.

The catalog keeps every revision it has seen, and a daemon that runs for months sees
each adapter change many times (a Hub repo that takes a commit a day holds 365 after a
year). This measures what the daemon's catalog check (``runner.groups_behind``, every
``catalog_check_seconds``) and ``iteris-daemon status`` (``status.collect``) cost as
that history grows: wall time (median of 5) and the peak of Python's traced memory
during one call.

The catalogs are synthetic: rows bulk-inserted into a real SQLite file at the current
schema (no adapter files), one group selecting every adapter, and its last run having
merged each adapter's current revision, so the check finds nothing behind (asserted).

Run: ``python -m benchmarks.history [--adapters 1000] [--revisions 1 10 100] [--workdir bench-out]``
(writes history.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import tracemalloc
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable

from sqlalchemy import insert, select

from iteris_daemon import status
from iteris_daemon.catalog import Catalog
from iteris_daemon.catalog.models import (Adapter, AdapterRevision, AdapterStatus, MergeGroup, MergeRun, MergeRunInput,
                                          RunStatus, Source, SourceKind)
from iteris_daemon.config import GroupConfig
from iteris_daemon.runner import groups_behind, sync_group

BASE_MODEL = "/models/base"
FIRST_SEEN = datetime(2026, 1, 1)


def build(path: Path, adapters: int, revisions: int) -> tuple[Catalog, GroupConfig]:
    """A catalog of ``adapters`` registered adapters with ``revisions`` each, the newest
    current, and one group whose last run merged every current revision."""
    for stale in path.parent.glob(path.name + "*"):
        stale.unlink()
    catalog = Catalog(f"sqlite:///{path}")
    with catalog.session() as session:
        session.add(Source(id=1, name="bench", kind=SourceKind.local, settings={"paths": ["/adapters"]}))
        session.execute(insert(Adapter), [
            {"id": a, "source_id": 1, "locator": f"/adapters/a{a}", "name": f"a{a}", "status": AdapterStatus.registered}
            for a in range(1, adapters + 1)])
        session.execute(insert(AdapterRevision), [
            {"adapter_id": a, "revision": f"r{k}", "status": AdapterStatus.registered, "files_path": f"/adapters/a{a}",
             "base_model": BASE_MODEL, "rank": 8, "alpha": 16.0, "target_modules": ["q_proj", "v_proj"],
             "content_sha256": f"{a:032x}{k:032x}", "last_seen_at": FIRST_SEEN + timedelta(days=k)}
            for a in range(1, adapters + 1) for k in range(revisions)])
    group = GroupConfig(name="all", base_model=BASE_MODEL, strategy="task_arithmetic",
                        destinations=[{"kind": "folder", "path": str(path.parent / "published")}])
    sync_group(catalog, group)
    with catalog.session() as session:
        group_id = session.scalar(select(MergeGroup.id).where(MergeGroup.name == group.name))
        run = MergeRun(group_id=group_id, status=RunStatus.succeeded, input_fingerprint="0" * 64)
        session.add(run)
        session.flush()
        newest = select(AdapterRevision.id).where(AdapterRevision.revision == f"r{revisions - 1}")
        session.execute(insert(MergeRunInput), [{"run_id": run.id, "revision_id": r} for r in session.scalars(newest)])
    return catalog, group


def measure(call: Callable[[], Any]) -> dict[str, float]:
    """Median wall time of 5 calls (after one to warm caches), and one call's traced peak."""
    call()
    times = []
    for _ in range(5):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    tracemalloc.start()
    try:
        call()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return {"ms": round(1000 * statistics.median(times), 1), "peak_mb": round(peak / 2**20, 2)}


def run(workdir: Path, adapters: int, revisions: list[int]) -> list[dict[str, Any]]:
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o700)  # a catalog's folder is private (the catalog warns otherwise)
    rows = []
    for k in revisions:
        catalog, group = build(workdir / "history.db", adapters, k)
        try:
            assert groups_behind(catalog, [group]) == {}, "the last run merged every current revision"
            rows.append({"adapters": adapters, "revisions_each": k,
                         "catalog_check": measure(lambda: groups_behind(catalog, [group])),
                         "status": measure(lambda: status.collect(catalog))})
        finally:
            catalog.close()
        print(f"{adapters} adapters x {k:4d} revisions: catalog check {rows[-1]['catalog_check']['ms']:8.1f} ms "
              f"(peak {rows[-1]['catalog_check']['peak_mb']:6.2f} MB), status {rows[-1]['status']['ms']:8.1f} ms "
              f"(peak {rows[-1]['status']['peak_mb']:6.2f} MB)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.history", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--adapters", type=int, default=1000, help="registered adapters in the catalog")
    parser.add_argument("--revisions", type=int, nargs="+", default=[1, 10, 100], help="revisions per adapter")
    parser.add_argument("--workdir", type=Path, default=Path("bench-out"), help="where the catalog and history.json go")
    args = parser.parse_args(argv)
    if args.adapters < 1 or min(args.revisions) < 1:
        parser.error("--adapters and --revisions must be at least 1")
    rows = run(args.workdir / "history", args.adapters, args.revisions)
    (args.workdir / "history.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
