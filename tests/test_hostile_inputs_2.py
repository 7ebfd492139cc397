"""Hostile inputs of the second review (issue 14), each a regression test that failed on
the code before its fix: a symlinked folder arriving through a watcher event, a
calibration file swapped for a symlink after registration, JSON nested deep enough to
exhaust the recursion limit, regular expressions in ``rank_pattern`` keys. Each ends in
a rejection whose reason is recorded in the real SQLite catalog (or an adapter held
back from a run, with the reason in the run's record), never in an exception that stops
the scan of the other folders.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from sqlalchemy import select

from builders import build_adapter, build_tiny_model
from polling import wait_for
from iteris_daemon.catalog import Catalog
from iteris_daemon.catalog.models import Adapter, AdapterStatus, SourceKind
from iteris_daemon.catalog.registry import add_source
from iteris_daemon.sources.local import LocalFolderSource
from iteris_daemon.validation import Limits

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile2")
    base = build_tiny_model("bert", root / "base")
    return base, build_adapter(base, root / "lora", seed=0, family="bert")


class Watched:
    """A watched folder, its local source on a real SQLite catalog, and the catalog's view."""

    def __init__(self, tmp_path: Path, base: Path, **settings):
        self.folder = tmp_path / "watched"
        self.folder.mkdir()
        self.catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
        with self.catalog.session() as session:
            add_source(session, "team", SourceKind.local,
                       {"paths": [str(self.folder)], "base_model": str(base), **settings})

    def source(self, limits: Limits = Limits()) -> LocalFolderSource:
        return LocalFolderSource(self.catalog, "team", limits=limits)

    def scan(self, limits: Limits = Limits()):
        return self.source(limits).scan()

    def found(self) -> dict[str, tuple[AdapterStatus, str | None]]:
        """adapter name -> (status, the reason its current revision was rejected)."""
        with self.catalog.session() as session:
            rows = session.scalars(select(Adapter)).all()
            return {row.name: (row.status, row.current.reason if row.current else None) for row in rows}


@pytest.fixture
def watched(tmp_path, made):
    w = Watched(tmp_path, made[0], settle_seconds=0.5)
    yield w
    w.catalog.close()


def _rejected(found, name: str, *words: str) -> None:
    status, reason = found[name]
    assert status is AdapterStatus.rejected, (name, status, reason)
    for word in words:
        assert word in reason, (name, reason)


# ----------------------------------------------------------------------------- 1: symlinked folders


def test_a_symlinked_folder_moved_in_with_its_parent_is_rejected_not_followed(watched, made, tmp_path):
    """A folder moved into the watched root holds a real adapter and a symlink to an
    adapter folder outside the root. The watcher's event examines the moved folder's
    subfolders: before the fix the link was followed and registered with files from
    outside (and the next full rescan marked it removed). Now it is recorded rejected
    with the reason, the real one registered, and a full rescan agrees."""
    _, lora = made
    source = watched.source()
    source.start()
    try:
        wait_for(lambda: source._watching(), "the source to start")
        staging = tmp_path / "staging"
        staging.mkdir()
        shutil.copytree(lora, staging / "real")
        (staging / "linked").symlink_to(lora, target_is_directory=True)
        os.rename(staging, watched.folder / "incoming")
        found = wait_for(lambda: (f := watched.found()).keys() >= {"incoming/real", "incoming/linked"} and f,
                         "both folders examined")
        assert found["incoming/real"] == (AdapterStatus.registered, None)
        _rejected(found, "incoming/linked", "symlinked folder", "not followed")
    finally:
        source.stop()
    report = watched.scan()
    assert not report.removed and not report.registered
    assert watched.found() == found
