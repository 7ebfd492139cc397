"""Daemons sharing one catalog: each says it is there, and with which shared settings.

Adapter verdicts record the settings they were made under (``[daemon.limits]``,
``trust_remote_code``), and a source judges a revision again when its own settings
differ. Two daemons on one catalog with different settings therefore judge each other's
verdicts again at every look, and an adapter that one accepts and the other refuses
flips between registered and rejected, each flip triggering its groups. Neither config
can see the other, so each daemon writes its shared settings to the catalog (the
``daemons`` table) every ``catalog_check_seconds`` and warns, once per peer and
settings, about a live peer whose settings differ. A daemon removes its row when it stops; the rows of daemons not seen
for :data:`FORGET_AFTER` (killed ones) are removed by the others.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select

from .catalog import Catalog
from .catalog.models import DaemonPresence
from .config import DaemonSettings
from .logs import counted, redact
from .runner import holder_is_dead, pid_space

log = logging.getLogger(__name__)
FORGET_AFTER = timedelta(days=1)
GONE_AFTER = timedelta(minutes=10)  # a daemon refreshes its row at least every minute: not seen for this long, gone


GROUPS = "groups"  # a daemon's row also names the groups it runs, which daemons need not share
RELOAD_REFUSED = "reload_refused"  # ... and, while its last reload was refused, why (for ``status``)
_OWN = (GROUPS, RELOAD_REFUSED)


def shared_settings(settings: DaemonSettings) -> dict[str, Any]:
    """The ``[daemon]`` settings every daemon on one catalog must agree on."""
    return {"limits": settings.limits.model_dump(), "trust_remote_code": sorted(settings.trust_remote_code)}


def presence(settings: DaemonSettings, groups: Iterable[str], reload_refused: str | None = None) -> dict[str, Any]:
    """What a daemon's row holds: the shared settings, the groups it runs (``merge-now``
    tells a group no running daemon has from one that waits for a daemon to start) and why
    its last reload was refused, if it was: a config the next start refuses, otherwise seen
    only in the journal and ``systemctl status``."""
    row = {**shared_settings(settings), GROUPS: sorted(groups)}
    return row if reload_refused is None else {**row, RELOAD_REFUSED: redact(reload_refused)}


def shared_part(row: dict[str, Any]) -> dict[str, Any]:
    """A daemon row's shared settings: not its groups or its refused reload."""
    return {key: value for key, value in row.items() if key not in _OWN}


def differences(mine: dict[str, Any], theirs: dict[str, Any], labels: tuple[str, str] = ("here", "there")) -> list[str]:
    """``"limits.max_rank: 4096 here, 64 there"`` for each shared setting that differs."""
    def walk(ours: dict[str, Any], others: dict[str, Any], prefix: str) -> list[str]:
        found = []
        for key in sorted(set(ours) | set(others)):
            here, there = ours.get(key), others.get(key)
            if isinstance(here, dict) and isinstance(there, dict):
                found += walk(here, there, f"{prefix}{key}.")
            elif here != there:
                found.append(f"{prefix}{key}: {here!r} {labels[0]}, {there!r} {labels[1]}")
        return found
    return walk(shared_part(mine), shared_part(theirs), "")


def _gone(holder: str) -> bool:
    """Whether ``holder`` names this host's pid namespace and its process is gone. One that
    names none (an older version's, a host where ``/proc`` does not tell) is judged by its
    host name alone for claims, which must be taken over; its row is not deleted on that:
    two containers of one host name, each at pid 1, would delete each other's."""
    parts = holder.split(":")
    return len(parts) > 3 and parts[3] == pid_space() and holder_is_dead(holder)


@dataclass(frozen=True)
class Peer:
    holder: str
    seen_at: datetime
    settings: dict[str, Any]


class Peers:
    """This daemon's row in ``daemons``, and the other daemons seen there."""

    def __init__(self, catalog: Catalog, holder: str):
        self.catalog, self.holder = catalog, holder
        self._warned: set[tuple[str, str]] = set()  # (peer, its settings) already warned about

    def announce(self, settings: dict[str, Any]) -> None:
        """Write (or refresh) this daemon's row; forget daemons not seen for :data:`FORGET_AFTER`,
        and at once those of this host that are no longer running (a daemon killed, restarted
        by its unit: each crash left a row that ``status`` listed for a day, and that the next
        daemon took for a live peer, keeping the run times the dead one wrote)."""
        with self.catalog.session() as session:
            now = self.catalog.now(session)
            row = session.get(DaemonPresence, self.holder)
            if row is None:
                session.add(DaemonPresence(holder=self.holder, settings=settings, started_at=now, seen_at=now))
            else:
                row.settings, row.seen_at = settings, now
            session.execute(delete(DaemonPresence).where(DaemonPresence.seen_at < now - FORGET_AFTER))
            dead = [holder for holder in session.scalars(select(DaemonPresence.holder))
                    if holder != self.holder and _gone(holder)]
            if dead:
                session.execute(delete(DaemonPresence).where(DaemonPresence.holder.in_(dead)))
                log.info("forgot %s of this host, no longer running: %s", counted(len(dead), "daemon"), ", ".join(dead))

    def others(self, within: float) -> list[Peer]:
        """The other daemons seen in the last ``within`` seconds."""
        with self.catalog.session(write=False) as session:
            since = self.catalog.now(session) - timedelta(seconds=within)
            rows = session.scalars(select(DaemonPresence).where(DaemonPresence.holder != self.holder,
                                                                DaemonPresence.seen_at >= since)
                                   .order_by(DaemonPresence.holder))
            return [Peer(row.holder, row.seen_at, row.settings) for row in rows]

    def disagreements(self, settings: dict[str, Any], within: float) -> list[tuple[Peer, list[str]]]:
        """Announce ``settings``; return each live peer whose settings differ and that was not
        reported with these settings before, with what differs."""
        self.announce(settings)
        found = []
        for peer in self.others(within):
            differ = differences(settings, peer.settings)
            key = (peer.holder, repr(sorted(shared_part(peer.settings).items())))
            if differ and key not in self._warned:
                self._warned.add(key)
                found.append((peer, differ))
        return found

    def settings_changed(self) -> None:
        """This daemon's settings changed (a reload): report every disagreement afresh."""
        self._warned.clear()

    def depart(self) -> None:
        with self.catalog.session() as session:
            session.execute(delete(DaemonPresence).where(DaemonPresence.holder == self.holder))
