"""The catalog at scale: 1,000 adapters through the local folder source.

Measured in one process, on a real SQLite file with real inotify events:

1. *arrival*: the source is watching an empty folder; 1,000 PEFT LoRA folders are
   moved in (staged elsewhere, as a copy tool would); time until every one is registered;
2. *restart*: a fresh source rescans the 1,000 unchanged folders (what a daemon
   restart costs);
3. *query*: ``adapters list`` (the CLI's query and row building), median of 5;
4. *idle*: CPU (process time / wall time) and resident memory while watching,
   nothing changing, for ``--idle-seconds``, with inotify and with the polling fallback.

Run: ``python -m benchmarks.catalog [--adapters 1000] [--workdir bench-out]`` (writes catalog.json).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from sqlalchemy import func, select

from iteris_daemon.catalog import Catalog
from iteris_daemon.catalog.models import Adapter, AdapterStatus, SourceKind
from iteris_daemon.catalog.registry import add_source, list_adapters
from iteris_daemon.cli.catalog import _adapter_row
from iteris_daemon.memory import current_rss_mb
from iteris_daemon.sources.local import LocalFolderSource

HIDDEN, LAYERS, RANK = 64, 2, 4


def make_base(folder: Path) -> Path:
    """A small BERT config: shape checks read only the config."""
    from transformers import BertConfig

    BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
               intermediate_size=2 * HIDDEN).save_pretrained(folder)
    return folder


def make_adapter(folder: Path, base: Path, seed: int) -> None:
    """A PEFT-format LoRA folder (query/value of every layer), written directly."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(LAYERS):
        for module in ("query", "value"):
            key = f"base_model.model.encoder.layer.{layer}.attention.self.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, HIDDEN, generator=generator)
            tensors[f"{key}.lora_B.weight"] = torch.randn(HIDDEN, RANK, generator=generator)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "target_modules": ["query", "value"],
        "base_model_name_or_path": str(base), "task_type": None,
    }))


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _wait_registered(catalog: Catalog, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with catalog.session() as session:
            done = session.scalar(select(func.count()).select_from(Adapter).where(Adapter.status == AdapterStatus.registered))
        if done >= count:
            return
        time.sleep(0.2)
    raise RuntimeError(f"only {done} of {count} adapters registered after {timeout}s")


def _idle(source: LocalFolderSource, seconds: float) -> dict:
    source.start()
    time.sleep(min(5.0, seconds))  # let the start-up rescan finish
    cpu, wall = _cpu_seconds(), time.monotonic()
    time.sleep(seconds)
    used = (_cpu_seconds() - cpu) / (time.monotonic() - wall)
    rss = current_rss_mb()
    source.stop()
    return {"cpu_percent": round(100 * used, 2), "rss_mb": round(rss, 1) if rss else None}


def run(workdir: Path, n: int = 1000, idle_seconds: float = 30.0) -> dict:
    root = workdir / "catalog-bench"
    shutil.rmtree(root, ignore_errors=True)
    base = make_base(root / "base")
    staged, watched = root / "staged", root / "watched"
    for index in range(n):
        make_adapter(staged / f"task-{index:04d}", base, index)
    watched.mkdir()
    catalog = Catalog(f"sqlite:///{root / 'catalog.db'}")
    with catalog.session() as session:
        add_source(session, "bench", SourceKind.local, {"paths": [str(watched)], "settle_seconds": 1.0})
        add_source(session, "bench-polling", SourceKind.local,
                   {"paths": [str(watched)], "settle_seconds": 1.0, "polling": True, "poll_interval_seconds": 5.0})

    source = LocalFolderSource(catalog, "bench")
    source.start()
    started = time.monotonic()
    for folder in sorted(staged.iterdir()):
        os.rename(folder, watched / folder.name)
    _wait_registered(catalog, n, timeout=60 + n)
    arrival = time.monotonic() - started
    source.stop()

    restarted = LocalFolderSource(catalog, "bench")
    started = time.monotonic()
    report = restarted.scan()
    rescan = time.monotonic() - started
    assert report.unchanged == n, report

    timings = []
    for _ in range(5):
        started = time.perf_counter()
        with catalog.session() as session:
            rows = [_adapter_row(a) for a in list_adapters(session)]
        timings.append(time.perf_counter() - started)
    assert len(rows) == n

    results = {
        "adapters": n,
        "arrival_seconds": round(arrival, 2),
        "arrival_per_second": round(n / arrival, 1),
        "restart_rescan_seconds": round(rescan, 2),
        "list_query_ms": round(1000 * statistics.median(timings), 1),
        "idle_inotify": _idle(LocalFolderSource(catalog, "bench"), idle_seconds),
        "idle_polling": _idle(LocalFolderSource(catalog, "bench-polling"), idle_seconds),
        "catalog_bytes": sum(p.stat().st_size for p in root.glob("catalog.db*")),
    }
    catalog.close()
    return results


def table(results: dict) -> str:
    n = results["adapters"]
    return "\n".join([
        "| measure | value |", "|---|---|",
        f"| {n} adapters moved into a watched folder: all registered after | {results['arrival_seconds']:.1f} s "
        f"({results['arrival_per_second']:.0f} adapters/s) |",
        f"| restart: rescan of {n} unchanged adapters | {results['restart_rescan_seconds']:.1f} s |",
        f"| `adapters list` query ({n} rows, median of 5) | {results['list_query_ms']:.0f} ms |",
        f"| idle while watching (inotify): CPU / RSS | {results['idle_inotify']['cpu_percent']:.2f} % / "
        f"{results['idle_inotify']['rss_mb']:.0f} MB |",
        f"| idle while watching (polling every 5 s): CPU / RSS | {results['idle_polling']['cpu_percent']:.2f} % / "
        f"{results['idle_polling']['rss_mb']:.0f} MB |",
        f"| catalog size | {results['catalog_bytes'] / 1e6:.1f} MB |",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.catalog", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("bench-out"))
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    results = run(args.workdir, args.adapters, args.idle_seconds)
    args.workdir.mkdir(parents=True, exist_ok=True)
    (args.workdir / "catalog.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
