"""A group's claim between daemons sharing a catalog (SQLite and PostgreSQL): a holder that
lost its claim does not publish, nor record its run, over what the daemon that took it did.

QA stopped a daemon (SIGSTOP) mid-merge past ``claim_ttl_seconds``: a peer took the stale
claim, marked the run failed ("interrupted"), merged newer inputs and published; the first
daemon then resumed and published its older merge over the newer one, and recorded its run
``succeeded`` (``status`` named the peer's merge as published). Here the stall is made
deterministic: daemon 1 stops refreshing its claim, and daemon 2's whole run happens at a
point of daemon 1's run, on the real folder source, catalog and folder publisher.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select, update

import iteris_daemon.runner as runner
from iteris_daemon.catalog import Catalog
from iteris_daemon.catalog.models import MergeGroup, MergeRun, RunStatus, SourceKind
from iteris_daemon.catalog.registry import add_source
from iteris_daemon.config import GroupConfig
from iteris_daemon.runner import Claim, ClaimLost, run_group, sync_group
from iteris_daemon.sources.local import LocalFolderSource
from polling import wait_for

pytestmark = pytest.mark.timeout(300)

TTL = 0.5  # seconds: daemon 1's claim is stale soon after it stops refreshing it
STALLED, PEER = "host-1:101:aaaaaaaa", "host-2:202:bbbbbbbb"


@pytest.fixture
def shared(catalog_url, tmp_path, runner_adapters, monkeypatch):
    """A catalog holding the first of the ``runner_adapters`` and a group merging both, published
    to one folder; daemon 1 (``STALLED``) never refreshes its claims, as a stopped process does not."""
    base, adapters = runner_adapters
    watched = tmp_path / "watched"
    shutil.copytree(adapters[0], watched / adapters[0].name)
    catalog = Catalog(catalog_url)
    with catalog.session() as session:
        add_source(session, "team", SourceKind.local, {"paths": [str(watched)], "base_model": str(base)})
    LocalFolderSource(catalog, "team").scan()
    group = GroupConfig(name="unified", base_model=str(base), strategy="task_arithmetic",
                        select={"names": [a.name for a in adapters]},
                        destinations=[{"kind": "folder", "path": str(tmp_path / "published")}])
    sync_group(catalog, group)
    real_refresh = Claim._refresh
    monkeypatch.setattr(Claim, "_refresh", lambda claim: None if claim.holder == STALLED else real_refresh(claim))
    yield catalog, group, tmp_path, lambda: shutil.copytree(adapters[1], watched / adapters[1].name)
    catalog.close()


def _current(published: Path) -> str:
    return os.readlink(published / "current")


def _served(published: Path) -> list[str]:
    return sorted(i["name"] for i in json.loads((published / "current" / "merge_report.json").read_text())["inputs"])


def _row(catalog: Catalog, run_id: int) -> MergeRun:
    with catalog.session() as session:
        return session.get(MergeRun, run_id)


def _peer_runs(catalog: Catalog, group: GroupConfig, root: Path, arrives) -> runner.RunOutcome:
    """Daemon 2's run, once daemon 1's claim is stale and the second adapter arrived: it takes
    the claim and merges both adapters (daemon 1 merges the first only), and publishes."""
    arrives()
    LocalFolderSource(catalog, "team").scan()
    time.sleep(3 * TTL)
    return run_group(catalog, group, root / "state2", PEER, claim_ttl=TTL)


def test_a_holder_that_stalled_past_the_ttl_before_publishing_publishes_nothing(shared, caplog):
    catalog, group, root, arrives = shared
    peer: list[runner.RunOutcome] = []

    def stalls_before_publishing(text: str) -> None:
        if text.endswith("publishing") and not peer:
            peer.append(_peer_runs(catalog, group, root, arrives))

    with caplog.at_level(logging.WARNING, logger="iteris_daemon.runner"):
        mine = run_group(catalog, group, root / "state1", STALLED, claim_ttl=TTL, on_status=stalls_before_publishing)
    (theirs,) = peer
    assert theirs.status is RunStatus.succeeded, theirs
    assert _current(root / "published").startswith(f"versions/run-{theirs.run_id}-")  # not replaced by daemon 1's
    assert _served(root / "published") == ["task0", "task1"]
    assert mine.status is RunStatus.cancelled and mine.detail.startswith("claim lost: another daemon ("), mine
    stalled = _row(catalog, mine.run_id)
    assert stalled.status is RunStatus.failed and stalled.error.startswith("interrupted: its daemon (host-1:101")
    assert _row(catalog, theirs.run_id).status is RunStatus.succeeded
    assert f"run {mine.run_id} cancelled: claim lost" in caplog.text
    with catalog.session() as session:
        assert session.scalar(select(MergeGroup.claimed_by)) is None  # daemon 1 let go of nothing of daemon 2's


def test_a_holder_stalled_while_publishing_says_so_and_records_nothing(shared, monkeypatch, caplog):
    """What remains (a publish is not part of a catalog transaction): daemon 1 stalls past the
    ttl after its last check, inside its publisher. It then publishes after daemon 2; it says
    so in an error and leaves its run as daemon 2 recorded it."""
    catalog, group, root, arrives = shared
    peer: list[runner.RunOutcome] = []
    real_publish = runner.publish_all

    def stalls_in_publishing(group_config, run_id, *args, **kwargs):
        if run_id == 1:  # daemon 1's run (daemon 2's publishes at once)
            peer.append(_peer_runs(catalog, group, root, arrives))
        return real_publish(group_config, run_id, *args, **kwargs)

    monkeypatch.setattr(runner, "publish_all", stalls_in_publishing)
    with caplog.at_level(logging.ERROR, logger="iteris_daemon.runner"):
        mine = run_group(catalog, group, root / "state1", STALLED, claim_ttl=TTL)
    (theirs,) = peer
    assert theirs.status is RunStatus.succeeded and mine.status is RunStatus.failed, (theirs, mine)
    assert f"run {mine.run_id} published while another daemon held the group" in caplog.text
    assert _served(root / "published") == ["task0"]  # what remains: daemon 1's older merge replaced daemon 2's
    stalled = _row(catalog, mine.run_id)
    assert stalled.status is RunStatus.failed and stalled.error.startswith("interrupted: its daemon (host-1:101")


def test_a_refresh_that_finds_the_claim_taken_stops_the_run(shared):
    """The refresher notices a lost claim (its update matched no row), keeps why, and the run's
    ``should_stop`` (a merge worker asks it) says stop; renewing again says it too."""
    catalog, group, _, _ = shared
    holder = Claim(catalog, group.name, "host-3:303:dddddddd", ttl=0.4)
    assert holder.acquire()
    with catalog.session() as session:  # taken over by another daemon
        session.execute(update(MergeGroup).values(claimed_by=PEER, claimed_at=catalog.now(session)))
    wait_for(lambda: holder.lost is not None, "the refresher to notice the claim is lost", timeout=30)
    assert str(holder.lost).startswith(f"claim lost: another daemon ({PEER}) took the group")
    with pytest.raises(ClaimLost):
        holder.renew()
    holder.release()  # lets go of nothing of the other daemon's
    with catalog.session() as session:
        assert session.scalar(select(MergeGroup.claimed_by)) == PEER


# ----------------------------------------------------------------------------- pid namespaces
# Two daemons with the same host name in separate pid namespaces (containers with the host's
# network, both pid 1) took each other's live claims as dead: a pid means nothing across them.

OTHER_SPACE = "0" * 12  # a pid namespace not this process's
UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc"]


def _gone_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                              check=True).stdout)


def test_a_holder_of_another_pid_namespace_is_never_judged_dead_by_its_pid():
    host, gone, ours = socket.gethostname(), _gone_pid(), runner.pid_space()
    assert ours and ours != OTHER_SPACE and runner.worker_id().endswith(f":{ours}")
    cases = [
        (f"{host}:{os.getpid()}:deadbeef:{OTHER_SPACE}", False),  # another container's pid 1, as this one is
        (f"{host}:{gone}:deadbeef:{OTHER_SPACE}", False),  # a pid unknown here, maybe alive in its namespace
        (f"{host}:{os.getpid()}:deadbeef:{ours}", True),  # an earlier process of this namespace with this pid
        (f"{host}:{gone}:deadbeef:{ours}", True),  # gone
        (runner.worker_id(), False),  # this process, another daemon instance
        (f"{host}:{os.getpid()}:deadbeef", True),  # holders written before namespaces: judged as they were
        (f"{host}:{gone}:deadbeef", True),
        (f"elsewhere-{uuid.uuid4().hex[:6]}:{gone}:deadbeef:{ours}", False),  # another host: the ttl
    ]
    assert [runner.holder_is_dead(holder) for holder, _ in cases] == [dead for _, dead in cases], cases


def test_a_claim_and_run_of_another_pid_namespace_wait_for_the_ttl(catalog_url):
    """At a claim and at start (``recover_interrupted``): a live daemon in another namespace
    with this daemon's pid keeps its claim and its running run; a dead one of this namespace
    does not."""
    catalog = Catalog(catalog_url)
    try:
        with catalog.session() as session:
            group = MergeGroup(name="unified", base_model="base", strategy="iteris")
            session.add(group)
            session.flush()
            run = MergeRun(group_id=group.id, status=RunStatus.running, input_fingerprint="0" * 64)
            session.add(run)
            session.flush()
            run_id = run.id
        host = socket.gethostname()
        for holder, dead in [(f"{host}:{os.getpid()}:deadbeef:{OTHER_SPACE}", False),
                             (f"{host}:{_gone_pid()}:deadbeef:{runner.pid_space()}", True)]:
            with catalog.session() as session:
                session.execute(update(MergeGroup).values(claimed_by=holder, claimed_at=catalog.now(session)))
            assert runner.recover_interrupted(catalog) == ([run_id] if dead else []), holder
            claim = Claim(catalog, "unified", runner.worker_id(), ttl=3600)
            assert claim.acquire() is dead, holder
            if dead:
                claim.release()
    finally:
        catalog.close()


def test_a_daemon_in_another_pid_namespace_does_not_judge_this_ones_claim_dead():
    """Really in another pid namespace (``unshare``, as root; QA's repro ran two daemons so):
    this process's holder, and one of this namespace with pid 1 (the probe's own pid there),
    are alive to the probe; one of its own namespace whose process is gone is dead."""
    if shutil.which("unshare") is None or subprocess.run([*UNSHARE, "true"], capture_output=True).returncode:
        pytest.skip("no unshare --pid here (needs root or user namespaces)")
    probe = ("import os, socket, sys; from iteris_daemon.runner import holder_is_dead, pid_space; "
             "print(os.getpid(), [holder_is_dead(h) for h in sys.argv[1:]], "
             "holder_is_dead(f'{socket.gethostname()}:99999:deadbeef:{pid_space()}'))")
    host = socket.gethostname()
    env = {**os.environ, "PYTHONPATH": str(Path(runner.__file__).resolve().parents[1])}
    answer = subprocess.run([*UNSHARE, sys.executable, "-c", probe, runner.worker_id(),
                             f"{host}:1:deadbeef:{runner.pid_space()}"], capture_output=True, text=True, env=env,
                            check=True).stdout.split(maxsplit=1)
    assert answer == ["1", "[False, False] True\n"], answer
