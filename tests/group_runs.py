"""A group run end to end on real parts: a SQLite catalog filled by the real folder source
from a tiny BERT and real PEFT adapters, ``run_group`` publishing to the folder publisher.
The fixtures ``runner_adapters`` and ``setup`` (``conftest.py``) build it for a test;
``test_gates``, ``test_status`` and ``test_run_inputs`` share them."""

from __future__ import annotations

import shutil
from pathlib import Path

from builders import build_adapter, build_tiny_model
from iteris_daemon.adapter_config import sha256_file
from iteris_daemon.catalog import Catalog
from iteris_daemon.catalog.models import MergeGroup, MergeRun, MergeRunInput, RunStatus, SourceKind
from iteris_daemon.catalog.registry import add_source
from iteris_daemon.config import GroupConfig
from iteris_daemon.runner import run_group, sync_group
from iteris_daemon.sources.local import LocalFolderSource


def build_runner_adapters(root: Path) -> tuple[Path, list[Path]]:
    """A tiny BERT and two adapters of ranks 2 and 3 on it."""
    base = build_tiny_model("bert", root / "base")
    adapters = [build_adapter(base, root / f"task{i}", seed=10 + i, family="bert", r=2 + i) for i in range(2)]
    return base, adapters


def record_past_run(session, revision_id: int, calibration_source: str | None = None) -> MergeRun:
    """A succeeded run of a group ``g`` that merged revision ``revision_id``: the history that
    ``sources remove`` keeps (it then disables the source instead of deleting it)."""
    group = MergeGroup(name="g", base_model="base", strategy="iteris")
    session.add(group)
    session.flush()
    run = MergeRun(group_id=group.id, status=RunStatus.succeeded, input_fingerprint="f" * 64)
    session.add(run)
    session.flush()
    session.add(MergeRunInput(run_id=run.id, revision_id=revision_id, calibration_source=calibration_source))
    return run


class Setup:
    """The catalog and folders of one test, and shorthands for a group's runs on them."""

    def __init__(self, tmp_path: Path, base: Path, adapters: list[Path]):
        self.base = base
        self.work = tmp_path / "work"
        self.published = tmp_path / "published"
        self.catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
        watched = tmp_path / "watched"
        watched.mkdir()
        for adapter in adapters:
            shutil.copytree(adapter, watched / adapter.name)
        with self.catalog.session() as session:
            add_source(session, "team", SourceKind.local, {"paths": [str(watched)], "base_model": str(base)})
        LocalFolderSource(self.catalog, "team").scan()

    def group(self, strategy: str = "task_arithmetic", names: tuple[str, ...] = ("task0",), **fields) -> GroupConfig:
        group = GroupConfig(name="unified", base_model=str(self.base), strategy=strategy, select={"names": list(names)},
                            destinations=[{"kind": "folder", "path": str(self.published)}], **fields)
        sync_group(self.catalog, group)
        return group

    def run(self, group: GroupConfig, force: bool = False):
        return run_group(self.catalog, group, self.work, "tester", force=force)

    def current(self) -> str | None:
        current = self.published / "current"
        return sha256_file(current / "adapter_model.safetensors") if current.exists() else None

    def run_row(self, run_id: int) -> MergeRun:
        with self.catalog.session() as session:
            return session.get(MergeRun, run_id)
