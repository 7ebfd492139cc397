"""Daemons sharing a catalog (iteris_daemon/peers.py): each writes its shared settings
there and warns about a live peer whose settings differ. Real catalogs (SQLite, and
PostgreSQL when the suite has one); the daemon's warning from a real daemon process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from iteris_daemon.catalog import Catalog
from iteris_daemon.catalog.models import DaemonPresence, utcnow
from iteris_daemon.config import DaemonSettings
from iteris_daemon.peers import FORGET_AFTER, Peers, differences, presence, shared_settings
from iteris_daemon.status import collect, render

DEFAULTS = shared_settings(DaemonSettings())
LOWER_RANK = shared_settings(DaemonSettings(limits={"max_rank": 64}))
TRUSTING = shared_settings(DaemonSettings(trust_remote_code=["acme/base"]))


def _holders(catalog: Catalog) -> list[str]:
    with catalog.session() as session:
        return list(session.scalars(select(DaemonPresence.holder).order_by(DaemonPresence.holder)))


def test_a_live_peer_with_other_settings_is_reported_once_per_settings(catalog_url):
    catalog = Catalog(catalog_url)
    try:
        a, b = Peers(catalog, "host-a:1:aaaa"), Peers(catalog, "host-b:2:bbbb")
        a.announce(DEFAULTS)
        assert b.disagreements(DEFAULTS, within=60) == []  # the same settings: nothing to say
        a.announce(LOWER_RANK)
        (peer, differ), = b.disagreements(DEFAULTS, within=60)
        assert peer.holder == "host-a:1:aaaa" and differ == ["limits.max_rank: 4096 here, 64 there"]
        assert b.disagreements(DEFAULTS, within=60) == []  # once per peer and settings
        a.announce({**LOWER_RANK, "groups": ["reloaded"]})  # its groups are not settings: not said again
        assert b.disagreements(DEFAULTS, within=60) == []
        a.announce(TRUSTING)
        (peer, differ), = b.disagreements(DEFAULTS, within=60)
        assert differ == ["trust_remote_code: [] here, ['acme/base'] there"]
        b.settings_changed()  # a reload: everything is reported afresh
        assert len(b.disagreements(DEFAULTS, within=60)) == 1
        assert _holders(catalog) == ["host-a:1:aaaa", "host-b:2:bbbb"]
        b.depart()
        assert _holders(catalog) == ["host-a:1:aaaa"]
    finally:
        catalog.close()


def test_a_daemon_of_this_host_that_no_longer_runs_is_forgotten_at_the_next_announce(catalog_url):
    """A daemon killed (a crash loop under Restart=) left its row: `status` listed each for a
    day, and the next daemon took them for live peers for two minutes, keeping the run times
    a dead one wrote (QA LEAK). Rows of this host and pid namespace whose process is gone
    are deleted at the next announce; a live process's, another host's and one naming no
    pid namespace (two containers of one host name, each at pid 1: RV14) stay."""
    import socket
    import subprocess

    from iteris_daemon.runner import pid_space, worker_id

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    space = pid_space()
    if space is None:
        pytest.skip("/proc does not tell this process's pid namespace")
    dead = f"{socket.gethostname()}:{gone.pid}:dead0000:{space}"
    alive = f"{socket.gethostname()}:{os.getppid()}:live0000:{space}"
    unnamed = f"{socket.gethostname()}:{gone.pid}:oldv0000"  # an older version's: no namespace named
    catalog = Catalog(catalog_url)
    try:
        with catalog.session() as session:
            now = catalog.now(session)
            for holder in (dead, alive, unnamed, "elsewhere:1:x"):  # as each wrote its row
                session.add(DaemonPresence(holder=holder, settings=DEFAULTS, started_at=now, seen_at=now))
        me = worker_id()
        Peers(catalog, me).announce(DEFAULTS)
        assert _holders(catalog) == sorted([alive, unnamed, "elsewhere:1:x", me])
    finally:
        catalog.close()


def test_peers_not_seen_lately_are_ignored_then_forgotten(catalog_url):
    catalog = Catalog(catalog_url)
    try:
        a, b, c = (Peers(catalog, f"host-{n}:1:x") for n in "abc")
        a.announce(LOWER_RANK)
        c.announce(LOWER_RANK)
        with catalog.session() as session:
            session.execute(update(DaemonPresence).where(DaemonPresence.holder == "host-a:1:x")
                            .values(seen_at=utcnow() - timedelta(seconds=600)))  # stopped without leaving
            session.execute(update(DaemonPresence).where(DaemonPresence.holder == "host-c:1:x")
                            .values(seen_at=utcnow() - FORGET_AFTER - timedelta(minutes=1)))  # killed long ago
        assert [p.holder for p, _ in b.disagreements(DEFAULTS, within=120)] == []
        assert _holders(catalog) == ["host-a:1:x", "host-b:1:x"]  # c forgotten by b's announcement
        assert [p.holder for p, _ in b.disagreements(DEFAULTS, within=900)] == ["host-a:1:x"]
    finally:
        catalog.close()


def test_liveness_is_judged_on_the_catalog_servers_clock(catalog_url, host_clock_ahead):
    """A daemon whose host clock runs an hour ahead still sees a peer that announced a moment
    ago (on its own clock the peer's row would be an hour old)."""
    catalog = Catalog(catalog_url)
    try:
        Peers(catalog, "host-a:1:x").announce(LOWER_RANK)
        (peer, _), = Peers(catalog, "host-b:1:x").disagreements(DEFAULTS, within=60)
        assert peer.holder == "host-a:1:x"
        assert abs(peer.seen_at - host_clock_ahead.server_time()).total_seconds() < 60
    finally:
        catalog.close()


def test_differences_name_each_setting():
    assert differences({"limits": {"max_rank": 8, "max_tensors": 1}, "trust_remote_code": []},
                       {"limits": {"max_rank": 8, "max_tensors": 2}, "trust_remote_code": ["x"]},
                       ("here", "on b")) == ["limits.max_tensors: 1 here, 2 on b", "trust_remote_code: [] here, ['x'] on b"]
    assert differences(DEFAULTS, DEFAULTS) == []
    # The groups a daemon runs are in its row (for merge-now) and are its own: not a difference.
    assert differences({**DEFAULTS, "groups": ["a"]}, {**DEFAULTS, "groups": ["b", "c"]}) == []
    # So is why its last reload was refused (for `status`), which it writes redacted.
    refused = presence(DaemonSettings(), ["a"], "x.toml: token = hf_" + "a" * 34)
    assert refused["reload_refused"] == "x.toml: token = hf_***" and differences(refused, DEFAULTS) == []
    assert "reload_refused" not in presence(DaemonSettings(), ["a"])


def test_status_lists_the_daemons_and_their_differences(tmp_path):
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    try:
        Peers(catalog, "host-a:1:aaaa").announce(DEFAULTS)
        Peers(catalog, "host-b:2:bbbb").announce(LOWER_RANK)
        text = render(collect(catalog))
    finally:
        catalog.close()
    lines = text.split("daemons (seen in the last day):\n", 1)[1].splitlines()
    assert len(lines) == 2 and all(line.startswith("  host-") for line in lines)
    (other,) = [line for line in lines if "OTHER SETTINGS" in line]
    assert "limits.max_rank:" in other and "4096" in other and "64" in other


def test_status_lists_only_daemons_seen_in_the_last_day_and_marks_those_gone(tmp_path):
    """With no daemon alive to forget them, rows of any age were listed "seen in the last day"
    (a killed daemon's, 200 days old), and one killed a minute ago read like a live one (QA STAT)."""
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    try:
        with catalog.session() as session:
            now = catalog.now(session)
            for holder, age in (("live:1:a", timedelta(seconds=30)), ("killed:2:b", timedelta(minutes=11)),
                                ("ancient:3:c", timedelta(days=200))):
                session.add(DaemonPresence(holder=holder, settings=DEFAULTS, started_at=now - age, seen_at=now - age))
        report = collect(catalog)
        text = render(report)
    finally:
        catalog.close()
    assert [(d["holder"], d["live"]) for d in report["daemons"]] == [("live:1:a", True), ("killed:2:b", False)]
    lines = text.split("daemons (seen in the last day):\n", 1)[1].splitlines()
    assert len(lines) == 2 and lines[0].startswith("  live:1:a ") and "not seen" not in lines[0], lines
    assert lines[1].startswith("  killed:2:b ") and lines[1].endswith("(not seen for over 10 minutes: stopped or killed?)")


def test_a_running_daemon_warns_about_a_peer_and_leaves_the_catalog_when_it_stops(tmp_path):
    """A real daemon: another daemon (a row written as a daemon writes it, seen just now)
    uses a lower max_rank. The daemon logs a warning naming the setting, keeps its own row
    fresh, and removes it when it stops."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    catalog = Catalog(f"sqlite:///{state / 'catalog.db'}")
    try:
        Peers(catalog, "elsewhere:4242:cafe").announce({**LOWER_RANK, "groups": ["theirs"]})
        config = tmp_path / "daemon.toml"
        config.write_text(f"[daemon]\nstate_dir = {json.dumps(str(state))}\n"
                          f"cache_dir = {json.dumps(str(tmp_path / 'cache'))}\ncatalog_check_seconds = 0.5\n"
                          '[[groups]]\nname = "unified"\nbase_model = "org/base"\nmin_adapters = 2\n'
                          f'[[groups.destinations]]\nkind = "folder"\npath = {json.dumps(str(tmp_path / "out"))}\n')
        proc = subprocess.Popen([sys.executable, "-m", "iteris_daemon", "--log-format", "text", "run", "--config",
                                 str(config)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        log = []
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                line = proc.stderr.readline()
                log.append(line)
                if "also on this catalog, has other settings" in line or not line:
                    break
            assert "daemon elsewhere:4242:cafe, also on this catalog, has other settings: limits.max_rank: 4096 " \
                   "here, 64 there" in log[-1], "".join(log)
            assert len(_holders(catalog)) == 2
            with catalog.session() as session:  # its row names the groups it runs (for merge-now)
                own = [row.settings for row in session.scalars(select(DaemonPresence)) if row.holder != "elsewhere:4242:cafe"]
            assert [settings.get("groups") for settings in own] == [["unified"]], own
        finally:
            proc.terminate()
            rest = proc.communicate(timeout=60)[1]
        assert proc.returncode == 0, "".join(log) + rest
        assert _holders(catalog) == ["elsewhere:4242:cafe"]
        assert rest.count("has other settings") == 0  # warned once, though checked every 0.5 s
    finally:
        catalog.close()
