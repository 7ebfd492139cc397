"""Hostile inputs of the second review (issue 14), each a regression test that failed on
the code before its fix: a symlinked folder arriving through a watcher event, a
calibration file swapped for a symlink after registration, JSON nested deep enough to
exhaust the recursion limit, regular expressions in ``rank_pattern`` keys. Each ends in
a rejection whose reason is recorded in the real SQLite catalog (or an adapter held
back from a run, with the reason in the run's record), never in an exception that stops
the scan of the other folders.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path

import pytest
from sqlalchemy import select

from builders import build_adapter, build_tiny_model
from polling import wait_for
from iteris_daemon.calibration import read_jsonl
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


# ----------------------------------------------------------------------------- 2: calibration files


def _swap_calibration(folder: Path, how: str, outside: Path) -> None:
    calibration = folder / "calibration.jsonl"
    calibration.unlink()
    if how == "link-outside":
        outside.write_text('{"text": "root:x:0:0:root:/root:/bin/bash"}\n')
        calibration.symlink_to(outside)
    elif how == "link-dev-zero":
        calibration.symlink_to("/dev/zero")
    elif how == "link-inside":  # a link within the watched folder is no better: not a file of this folder
        (folder / "other.jsonl").write_text('{"text": "hello"}\n')
        calibration.symlink_to(folder / "other.jsonl")
    elif how == "fifo":
        os.mkfifo(calibration)


@pytest.mark.parametrize("how", ["link-outside", "link-dev-zero", "link-inside", "fifo"])
def test_a_calibration_file_swapped_after_registration_is_seen_and_rejected(watched, made, tmp_path, how):
    """``calibration.jsonl`` is part of the folder's fingerprint and must be a regular file
    (no symlink, no device or FIFO) in the adapter folder. Before the fix it was not in the
    fingerprint: swapping it for a link to a file outside (or to /dev/zero) after
    registration left the folder "unchanged" and registered."""
    _, lora = made
    shutil.copytree(lora, watched.folder / "task")
    shutil.copytree(lora, watched.folder / "zz-after")
    watched.scan()
    assert watched.found()["task"] == (AdapterStatus.registered, None)
    _swap_calibration(watched.folder / "task", how, tmp_path / "passwd")
    report = watched.scan()
    found = watched.found()
    _rejected(found, "task", "calibration.jsonl", "symlink" if how.startswith("link") else "not a regular file")
    assert found["zz-after"] == (AdapterStatus.registered, None) and report.unchanged == 1


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json"])
def test_a_fifo_swapped_in_after_the_file_was_seen_is_refused_not_waited_on(made, tmp_path, monkeypatch, name):
    """The weights and the config were checked by name (is_file) and then opened: a FIFO
    renamed over one in between (a race QA won in 1-2 s) held the scan, and the daemon's stop,
    until something wrote to it. What is opened is checked now."""
    import threading

    from iteris_daemon.adapter_config import read_adapter_config
    from iteris_daemon.errors import AdapterError
    from iteris_daemon.validation import read_weights

    folder = shutil.copytree(made[1], tmp_path / "task")
    (folder / name).unlink()
    os.mkfifo(folder / name)
    monkeypatch.setattr(Path, "is_file", lambda self: True)  # as it was when seen, before the swap
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            read_weights(folder / name, Limits()) if name.endswith(".safetensors") else read_adapter_config(folder)
        except BaseException as exc:  # noqa: BLE001 - the outcome is the assertion's
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=30)
    if reader.is_alive():  # blocked in open(): a writer lets it go, and the test fails
        with open(folder / name, "wb"):
            pass
        reader.join(timeout=30)
        pytest.fail(f"reading {name} waited on the FIFO")
    assert len(outcome) == 1 and isinstance(outcome[0], AdapterError), outcome
    assert str(outcome[0]).endswith("is not a regular file"), outcome


def test_a_calibration_file_past_the_limit_is_rejected_without_being_read(watched, made):
    _, lora = made
    folder = shutil.copytree(lora, watched.folder / "big")
    with open(folder / "calibration.jsonl", "r+b") as handle:  # sparse: 3 GiB on paper
        handle.truncate(3 << 30)
    watched.scan(Limits(max_calibration_bytes=1 << 20))
    _rejected(watched.found(), "big", f"{3 << 30} bytes, above the limit of {1 << 20}")


@pytest.fixture
def runner_inputs(watched, made, tmp_path):
    """Two registered adapters and a function gathering a run's inputs (snapshots and
    calibration) the way the runner does."""
    import iteris_daemon.runner as runner
    from iteris_daemon.config import GroupConfig

    base, lora = made
    for name in ("task0", "task1"):
        shutil.copytree(lora, watched.folder / name)
    watched.scan()
    group = GroupConfig(name="unified", base_model=str(base), strategy="task_arithmetic",
                        select={"names": ["task0", "task1"]}, destinations=[{"kind": "folder", "path": "/nowhere"}])

    def gather(attempt: int = 0, samples: int | None = None):
        return runner.gather_inputs(watched.catalog, group, True, samples, tmp_path / f"inputs{attempt}")

    return gather


@pytest.fixture
def file_size_limit():
    """Writes past 64 MiB fail (EFBIG) instead of filling the disk, should a copy ever
    follow a link to /dev/zero again."""
    import resource
    import signal

    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 20, old_limit[1]))
    yield
    resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
    signal.signal(signal.SIGXFSZ, old_handler)


def test_a_run_never_copies_a_calibration_link_swapped_in_after_registration(runner_inputs, watched, file_size_limit):
    """The swap lands after registration and before any rescan: the run's own copy of the
    inputs must refuse the link (before the fix ``shutil.copyfile`` followed it and copied
    /dev/zero without end); that adapter is held back with the reason, the other merged."""
    (watched.folder / "task0" / "calibration.jsonl").unlink()
    (watched.folder / "task0" / "calibration.jsonl").symlink_to("/dev/zero")
    inputs = runner_inputs()
    assert [a.name for a, _ in inputs.revisions] == ["task1"]
    assert "calibration.jsonl: is a symlink" in inputs.held_back["task0"]


@pytest.mark.parametrize("what", ["calibration.jsonl", "adapter_config.json"])
def test_a_run_holds_back_an_input_whose_calibration_or_config_changed_since_registration(runner_inputs, watched,
                                                                                            what):
    """Before the fix only the weights were re-checked at merge time: a run merged an
    adapter under the catalog's revision with a config or calibration that had changed."""
    path = watched.folder / "task0" / what
    if what == "calibration.jsonl":
        path.write_text('{"text": "something else entirely"}\n')
    else:
        path.write_text(path.read_text().replace('"lora_alpha": 8', '"lora_alpha": 80'))
    inputs = runner_inputs()
    assert [a.name for a, _ in inputs.revisions] == ["task1"]
    assert "changed since it was registered" in inputs.held_back["task0"]


# ----------------------------------------------------------------------------- 3: nesting bombs

BOMB = "[" * 100_000 + "]" * 100_000  # past the recursion limit of json.loads
DEEP = "[" * 100 + "]" * 100  # within it, past the limit of 64 levels


def _config_with(folder: Path, extra: str) -> None:
    text = (folder / "adapter_config.json").read_text()
    (folder / "adapter_config.json").write_text(text[:text.rindex("}")] + f', "x": {extra}}}')


def _header_with(folder: Path, entry: str) -> None:
    weights = folder / "adapter_model.safetensors"
    data = weights.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = data[8:8 + length].decode()
    header = '{"x": ' + entry + ", " + header[1:]
    weights.write_bytes(struct.pack("<Q", len(header)) + header.encode() + data[8 + length:])


HOSTILE_JSON = {
    "config-bomb": lambda f: _config_with(f, BOMB),
    "config-deep": lambda f: _config_with(f, DEEP),
    "config-long-number": lambda f: _config_with(f, "1" * 5000),
    "header-bomb": lambda f: _header_with(f, BOMB),
    "header-deep": lambda f: _header_with(f, DEEP),
    "config-symlink-loop": lambda f: ((f / "adapter_config.json").unlink(),
                                      (f / "adapter_config.json").symlink_to(f / "loop"),
                                      (f / "loop").symlink_to(f / "adapter_config.json")),
}
REASONS = {"config-bomb": "nested deeper than 64 levels", "config-deep": "nested deeper than 64 levels",
           "config-long-number": "number", "header-bomb": "nested deeper than 64 levels",
           "header-deep": "nested deeper than 64 levels", "config-symlink-loop": "adapter_config.json"}


def test_json_nesting_bombs_are_rejected_and_the_scan_goes_on(watched, made):
    """Before the fix a deeply nested ``adapter_config.json`` or safetensors header (and a
    config that is a symlink loop, a number of 5000 digits) raised RecursionError,
    RuntimeError or ValueError out of the scan: the folders after it were never
    registered, and the folder was tried again at every settle period."""
    _, lora = made
    for name, spoil in HOSTILE_JSON.items():
        spoil(shutil.copytree(lora, watched.folder / name))
    shutil.copytree(lora, watched.folder / "zz-good")
    for _ in range(2):  # the second scan finds each rejection recorded: nothing changes
        report = watched.scan()
        found = watched.found()
        assert found["zz-good"] == (AdapterStatus.registered, None)
        for name, words in REASONS.items():
            _rejected(found, name, words)
    assert report.unchanged == len(HOSTILE_JSON) + 1


def test_a_calibration_line_nested_too_deep_holds_back_that_adapter_only(runner_inputs, watched):
    """Before the fix the RecursionError escaped ``gather_inputs`` and failed the whole run."""
    with open(watched.folder / "task0" / "calibration.jsonl", "a") as handle:
        handle.write('{"text": "ok", "extra": ' + BOMB + "}\n")
    watched.scan()  # the new calibration is a new revision (still registered: its content is read at merge time)
    inputs = runner_inputs()
    assert [a.name for a, _ in inputs.revisions] == ["task1"]
    assert "calibration.jsonl:13: not valid JSON (nested deeper than 64 levels)" in inputs.held_back["task0"]


def test_a_run_reads_calibration_no_further_than_its_samples(runner_inputs, watched):
    """A run takes the first ``samples_per_task`` samples; it read the whole file first, so a
    line past them nested too deep held the adapter back (and a huge file sat in memory)."""
    path = watched.folder / "task0" / "calibration.jsonl"
    samples = read_jsonl(path).samples
    with open(path, "a") as handle:
        handle.write('{"text": "ok", "extra": ' + BOMB + "}\n")
    watched.scan()
    inputs = runner_inputs(samples=len(samples))
    assert [a.name for a, _ in inputs.revisions] == ["task0", "task1"]
    assert inputs.calibration[0].samples == samples


def test_a_failure_no_check_foresaw_is_a_recorded_rejection_not_a_stopped_scan(watched, made, monkeypatch, caplog):
    """The safety net under every check: any other exception while validating one folder
    (here injected into the header check) rejects that folder, with the exception's type
    and not its text in the catalog, and the traceback in the log."""
    import iteris_daemon.validation as validation

    _, lora = made
    for name in ("a-odd", "b-fine"):
        shutil.copytree(lora, watched.folder / name)
    real = validation.check_safetensors_header

    def header_check(path, limits, data=None):
        if path.parent.name == "a-odd":
            raise ZeroDivisionError("secret-looking text")
        return real(path, limits, data)

    monkeypatch.setattr(validation, "check_safetensors_header", header_check)
    watched.scan()
    found = watched.found()
    _rejected(found, "a-odd", "could not be validated (ZeroDivisionError)")
    assert "secret-looking" not in found["a-odd"][1] and "secret-looking text" in caplog.text
    assert found["b-fine"] == (AdapterStatus.registered, None)


# ----------------------------------------------------------------------------- 4: rank_pattern keys


def _set_config(folder: Path, **fields) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(fields)
    (folder / "adapter_config.json").write_text(json.dumps(config))


def _rename_module(folder: Path, old_suffix: str, new_module: str) -> None:
    """Give the LoRA pair of the module ending in ``old_suffix`` the name ``new_module``."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "adapter_model.safetensors")
    renamed = {}
    for key, tensor in tensors.items():
        module, _, part = key.removeprefix("base_model.model.").rpartition(".lora_")
        if module.endswith(old_suffix):
            key = f"base_model.model.{new_module}.lora_{part}"
        renamed[key] = tensor
    save_file(renamed, folder / "adapter_model.safetensors")


EVIL_KEYS = {  # key -> the reason its folder is rejected with
    "(": "rank_pattern key '(' is not a regular expression PEFT can use",
    "a[": "rank_pattern key 'a[' is not a regular expression PEFT can use",
    "x" * 300: "longer than 256 characters",
    "(a|a)+": "rank_pattern key '(a|a)+' takes over 1 s to match",  # exponential in re (timed there, PEFT's engine)
    "(a+)+": "rank_pattern key '(a+)+' takes over 1 s to match",  # in re; the regex engine answers it at once
}


@pytest.mark.timeout(120)  # before the fix the last two keys ran for hours
def test_rank_pattern_keys_that_break_or_stall_the_regex_engine_are_rejected(watched, made):
    """PEFT matches ``rank_pattern``/``alpha_pattern`` keys as regular expressions
    (``(.*\\.)?(KEY)$``). From an untrusted file, before the fix: ``(`` raised ``re.error``
    out of the scan; ``(a+)+`` against a module named ``aaa…a!`` (from the attacker's own
    tensor keys) backtracked for hours. Now each folder is rejected with a reason, the
    scan goes on, and plain keys still work as in PEFT."""
    _, lora = made
    for number, key in enumerate(EVIL_KEYS):
        folder = shutil.copytree(lora, watched.folder / f"evil{number}")
        _set_config(folder, rank_pattern={key: 4})
        _rename_module(folder, "layer.1.output.dense", "a" * 40 + "!")
    alpha = shutil.copytree(lora, watched.folder / "evil-alpha")
    _set_config(alpha, alpha_pattern={"(": 2.0})
    plain = shutil.copytree(lora, watched.folder / "zz-plain")  # PEFT's own kind of key: a module path
    _set_config(plain, rank_pattern={"layer.0.attention.self.query": 4, "value": 4}, alpha_pattern={"query": 16})
    watched.scan()
    found = watched.found()
    for number, reason in enumerate(EVIL_KEYS.values()):
        _rejected(found, f"evil{number}", reason)
    _rejected(found, "evil-alpha", "alpha_pattern key '('")
    assert found["zz-plain"] == (AdapterStatus.registered, None)


EVIL_MODULE_REGEXES = {  # (field, value) -> the reason its folder is rejected with
    ("target_modules", "(.*)*(query|value)"): "target_modules '(.*)*(query|value)' takes over 1 s to match",
    ("target_modules", "(.|.)*(query|value)"): "takes over 1 s to match the adapter's module names",
    ("target_modules", "(query"): "target_modules '(query' is not a regular expression PEFT can use",
    ("exclude_modules", "(.*)*pooler"): "exclude_modules '(.*)*pooler' takes over 1 s to match",
}


@pytest.mark.timeout(120)
def test_a_module_regex_that_backtracks_is_refused_by_the_daemon_and_by_merge(watched, made):
    """A string ``target_modules`` (or ``exclude_modules``) is a regular expression PEFT
    ``re.fullmatch``-es against every module name of the base model. ``(.*)*(query|value)``
    passed validation and then hung any ``peft_*`` merge or the ``generate`` source in
    PEFT for hours (found by QA; the ``regex`` engine answers it at once, so it is timed
    in ``re`` itself). Now the daemon rejects it with the field and the reason, and
    ``merge`` and ``compare`` (:func:`load_adapter`) refuse it; a regex that is quick passes."""
    from iteris_daemon.errors import AdapterError
    from iteris_daemon.lora import load_adapter

    _, lora = made
    for number, (field, value) in enumerate(EVIL_MODULE_REGEXES):
        _set_config(shutil.copytree(lora, watched.folder / f"evil{number}"), **{field: value})
    quick = shutil.copytree(lora, watched.folder / "zz-quick")
    _set_config(quick, target_modules=r".*\.(query|key|value|dense)", exclude_modules=r".*classifier.*")
    watched.scan()
    found = watched.found()
    for number, reason in enumerate(EVIL_MODULE_REGEXES.values()):
        _rejected(found, f"evil{number}", reason, "list the module names instead")
    assert found["zz-quick"] == (AdapterStatus.registered, None)
    with pytest.raises(AdapterError, match=r"adapter_config\.json: target_modules '\(\.\*\)\*\(query\|value\)' takes "):
        load_adapter(watched.folder / "evil0")
    assert load_adapter(quick).modules


EVIL_PEFT_REGEXES = {  # name -> (config fields, the reason its folder is rejected with)
    "rank": ({"rank_pattern": {"(.*)*x": 4}}, "rank_pattern key '(.*)*x' takes over 1 s to match"),
    "alpha": ({"alpha_pattern": {"(.|.)*query": 16.0}}, "alpha_pattern key '(.|.)*query' takes over 1 s to match"),
    "saved": ({"modules_to_save": ["(.*)*pooler"]}, "modules_to_save entry '(.*)*pooler' takes over 1 s to match"),
    "saved-broken": ({"modules_to_save": ["pooler("]},
                     "modules_to_save entry 'pooler(' is not a regular expression PEFT can use"),
    "layers": ({"layers_to_transform": [0, 1], "layers_pattern": "(.*)*layer"},
               "layers_pattern '(.*)*layer' takes over 1 s to match"),
    "tied": ({"ensure_weight_tying": True, "target_modules": ["query", "key", "value", "dense", "(.*)*embeddings"]},
             "target_modules entry '(.*)*embeddings' takes over 1 s to match"),
}


@pytest.mark.timeout(120)
def test_pattern_keys_and_module_entries_that_backtrack_in_re_are_refused(watched, made):
    """PEFT builds a regular expression from each ``rank_pattern``/``alpha_pattern`` key
    (``(.*\\.)?(KEY)$``), each ``modules_to_save`` entry (``(^|.*\\.)ENTRY($|\\..*)``, checked
    against every module of the base), ``layers_pattern``, and with ``ensure_weight_tying``
    each ``target_modules`` entry, and runs it with ``re``. Keys were timed in the ``regex``
    engine, which answers ``(.*)*x`` at once, and entries not at all: such an adapter passed
    validation and then hung a ``peft_*`` merge or the ``generate`` source for hours. Now all
    are timed in ``re`` in one child process: the daemon rejects the adapter naming the field
    and the key, ``merge``/``compare`` (:func:`load_adapter`) refuse it; quick ones pass."""
    from iteris_daemon.errors import AdapterError
    from iteris_daemon.lora import load_adapter

    _, lora = made
    for name, (fields, _) in EVIL_PEFT_REGEXES.items():
        _set_config(shutil.copytree(lora, watched.folder / f"evil-{name}"), **fields)
    quick = shutil.copytree(lora, watched.folder / "zz-quick")
    _set_config(quick, alpha_pattern={r"layer\.\d+\.attention\.self\.(query|value)": 8.0},
                modules_to_save=["classifi(er)?"], layers_to_transform=[0, 1], layers_pattern="lay(er)?")
    from safetensors.torch import load_file, save_file

    weights = quick / "adapter_model.safetensors"  # the pooler's LoRA: no layer of those PEFT would adapt
    save_file({k: v for k, v in load_file(weights).items() if ".pooler." not in k}, weights)
    watched.scan()
    found = watched.found()
    for name, (_, reason) in EVIL_PEFT_REGEXES.items():
        _rejected(found, f"evil-{name}", reason)
    _rejected(found, "evil-rank", "use module paths as keys")
    _rejected(found, "evil-saved", "list the module names instead")
    assert found["zz-quick"] == (AdapterStatus.registered, None)
    with pytest.raises(AdapterError, match=r"adapter_config\.json: modules_to_save entry '\(\.\*\)\*pooler' takes "):
        load_adapter(watched.folder / "evil-saved")
    assert load_adapter(quick).modules


@pytest.mark.parametrize("key, module, matches", [
    ("query", "encoder.layer.0.attention.self.query", True),
    ("self.query", "encoder.layer.0.attention.self.query", True),
    ("elf.query", "encoder.layer.0.attention.self.query", False),  # whole '.'-separated names only
    ("layer.0.attention.self.query", "encoder.layer.0.attention.self.query", True),
    ("layer.1.attention.self.query", "encoder.layer.0.attention.self.query", False),
    ("layer.0.attention", "encoder.layer.0.attention.self.query", False),  # a suffix, not a prefix
    ("layer\\.[0-3]\\.attention\\.self\\.(query|key)", "encoder.layer.2.attention.self.key", True),
    ("layer\\.[0-3]\\.attention\\.self\\.(query|key)", "encoder.layer.4.attention.self.key", False),
    ("^encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.query", True),
    (".*query", "encoder.layer.0.attention.self.query", True),
    ("", "anything.at.all", False),  # an empty key matches no module name
    ("layer\\.0\\.attention\\.self\\.query", "encoder.layer.0.attention.self.query", True),  # as merges write them
    ("layer\\.0\\.attention\\.self\\.query", "encoder.layer.0.attention.selfxquery", False),
])
def test_pattern_keys_match_as_peft_matches_them(key, module, matches):
    from peft.utils.other import get_pattern_key

    from iteris_daemon.adapter_config import _pattern_value

    assert (get_pattern_key([key], module) == key) is matches  # what PEFT does
    assert _pattern_value({key: 7}, module, 1) == (7 if matches else 1)


def test_a_deep_merges_own_patterns_read_back_exactly():
    """The merged adapter of an 80-layer model whose inputs differed in targets and ranks
    names hundreds of layers in ``rank_pattern`` and ``alpha_pattern``, with escaped dots
    (``model\\.layers\\.0\\.self_attn\\.q_proj``). Those keys took the regular-expression
    path meant for hostile keys, and its CPU budget ran out: the daemon could not read its
    own merge back (re-merging failed; its quality gate skipped the comparison with the
    published merge). 1,120 layers here, each key matched as PEFT matches it."""
    from peft.utils.other import get_pattern_key

    from iteris_daemon.adapter_config import module_scaling
    from iteris_daemon.merge import _escape

    modules = [f"model.layers.{layer}.{part}" for layer in range(80) for part in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
        "mlp.down_proj", "mlp.extra_proj", "mlp.more_proj", "mlp.last_proj", "a.b", "a.c", "a.d", "a.e")]
    ranks = {m: 1 + i % 7 for i, m in enumerate(modules)}
    config = {"r": 8, "lora_alpha": 8, "rank_pattern": {_escape(m): r for m, r in ranks.items()},
              "alpha_pattern": {_escape(m): float(r) for m, r in ranks.items()}}
    for module in modules[::37]:  # PEFT finds the module's own key
        assert get_pattern_key(list(config["rank_pattern"]), module) == _escape(module)
    assert all(module_scaling(config, m) == (ranks[m], 1.0) for m in modules)


# ----------------------------------------------------------------------------- 5: size limits


def test_max_rank_holds_for_a_rank_pattern_rank_too(watched, made):
    """``[daemon.limits] max_rank`` was checked against the config's ``r`` only: an adapter
    of r=2 giving ``query`` rank 6 through ``rank_pattern`` (PEFT's own writer) registered
    past a limit of 5 (found by QA). The largest rank a module has is checked now."""
    base, _ = made
    build_adapter(base, watched.folder / "patterned", seed=1, family="bert", r=2, rank_pattern={"query": 6})
    watched.scan(Limits(max_rank=5))
    _rejected(watched.found(), "patterned",
              "adapter_config.json: rank_pattern['query']=6 is above the limit of 5 ([daemon.limits] max_rank)")
    watched.scan(Limits(max_rank=6))
    assert watched.found()["patterned"] == (AdapterStatus.registered, None)


def test_an_adapter_config_past_its_limit_is_rejected_without_being_read_whole(watched, made):
    """A 2 MiB ``adapter_config.json`` (valid JSON, padded) is past the default limit of
    1 MiB, and past a configured 4 KiB a small one is too; before the fix there was no
    limit and the whole file was read into memory."""
    _, lora = made
    big = shutil.copytree(lora, watched.folder / "big")
    text = (big / "adapter_config.json").read_text()
    (big / "adapter_config.json").write_text(text + " " * (2 << 20))
    shutil.copytree(lora, watched.folder / "small")
    watched.scan()
    found = watched.found()
    _rejected(found, "big", "adapter_config.json", f"bytes, above the limit of {1 << 20}")
    assert found["small"] == (AdapterStatus.registered, None)
    from iteris_daemon.config import AdapterLimits

    watched.scan(AdapterLimits.model_validate({"max_config_bytes": 100}).limits())  # as in [daemon.limits]
    _rejected(watched.found(), "small", "adapter_config.json", "bytes, above the limit of 100")


@pytest.fixture
def hub(monkeypatch, tmp_path, made):
    """The Hub-compatible test server, reached by the real client, and a poll of a Hub
    source of one repo under given limits."""
    from hub_server import HubServer, isolate_hub_client

    from iteris_daemon.sources.hub import HubSource

    base, _ = made
    with HubServer() as server:
        isolate_hub_client(monkeypatch, server.endpoint, tmp_path / "hf-home", timeout=5.0)
        catalog = Catalog(f"sqlite:///{tmp_path / 'hub-catalog.db'}")

        def poll(repo: str, limits: Limits):
            name = repo.replace("/", "-")
            with catalog.session() as session:
                add_source(session, name, SourceKind.hub, {
                    "endpoint": server.endpoint, "repos": [repo], "base_model": str(base),
                    "retry_attempts": 2, "retry_base_seconds": 0.05, "retry_cap_seconds": 0.1})
            HubSource(catalog, name, tmp_path / "cache", limits=limits).poll()
            with catalog.session() as session:
                row = session.scalar(select(Adapter).where(Adapter.locator == repo))
                return row.status, row.current.reason

        poll.catalog = catalog
        yield server, poll, tmp_path / "cache"
        catalog.close()


def _repo_files(lora: Path, **replace: bytes) -> dict[str, bytes]:
    files = {n: (lora / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors", "calibration.jsonl")}
    return {**files, **replace}


def _lie_about_sizes(monkeypatch, server, repo: str, name: str, listed: int | None, head: bool = False,
                     no_length: bool = False) -> None:
    """Make the listing give ``name`` of ``repo`` the size ``listed`` (None: no size); with
    ``head``, the HEAD request's Content-Length (and X-Linked-Size) claim 100 bytes; with ``no_length``, the
    download come without a Content-Length (the body ends when the connection closes)."""
    from hub_server import HubServer, LoggedRequest, _Response

    real_info, real_send = HubServer._info, HubServer._send

    def info(self, found, commit, *, blobs):
        answer = real_info(self, found, commit, blobs=blobs)
        if found.repo_id == repo:
            for sibling in answer["siblings"]:
                if sibling["rfilename"] == name:
                    sibling.pop("size", None)
                    if listed is not None:
                        sibling["size"] = listed
        return answer

    def send(self, handler, response, method, path, truncate_to=None):
        ours = path.startswith(f"/{repo}/resolve/") and path.endswith("/" + name)
        if ours and head and method == "HEAD":  # an LFS file's X-Linked-Size, which the client prefers, lies too
            lying = {**response.headers, **({"X-Linked-Size": "100"} if "X-Linked-Size" in response.headers else {})}
            response = _Response(response.status, response.body[:100], lying)
        if not (ours and no_length and method == "GET"):
            return real_send(self, handler, response, method, path, truncate_to)
        self.requests.append(LoggedRequest(method, path, response.status))
        handler.close_connection = True
        handler.send_response(response.status)
        for header, value in response.headers.items():
            handler.send_header(header, value)
        handler.end_headers()
        try:
            handler.wfile.write(response.body)
        except (BrokenPipeError, ConnectionResetError):  # the client stopped reading: what we want
            pass

    monkeypatch.setattr(HubServer, "_info", info)
    monkeypatch.setattr(HubServer, "_send", send)


HUGE = b"\0" * (40 << 20)  # 40 MiB: more than one 10 MiB chunk of the client's downloads
WEIGHTS_LIMIT = Limits(max_weights_bytes=64 << 10)


@pytest.mark.parametrize("listed, head, no_length", [(None, False, False), (100, False, False), (100, True, True)],
                         ids=["no-size", "false-size", "false-size-head-and-no-length"])
def test_a_hub_weights_file_past_the_limit_is_never_downloaded_whole(hub, made, monkeypatch, listed, head, no_length):
    """The weights limit used to trust the listing's size: with no size, or a false one,
    the whole 40 MiB file was downloaded (and only then rejected). Now a size the server
    claims past the limit (HEAD, or the download's Content-Length) ends the download
    before its body is read, and a body that runs past the limit whatever was claimed
    is stopped after one chunk of the client (10 MiB); nothing past the limit is kept."""
    server, poll, cache = hub
    _, lora = made
    sha = server.create_repo_direct("eve/huge", _repo_files(lora, **{"adapter_model.safetensors": HUGE}))
    _lie_about_sizes(monkeypatch, server, "eve/huge", "adapter_model.safetensors", listed, head, no_length)
    status, reason = poll("eve/huge", WEIGHTS_LIMIT)
    assert status is AdapterStatus.rejected and f"above the limit of {64 << 10}" in reason
    if no_length:
        assert "adapter_model.safetensors is 10485760+ bytes" in reason and "the download was stopped" in reason
    else:
        assert f"adapter_model.safetensors is {len(HUGE)} bytes" in reason and "stopped" not in reason
    snapshot = cache / "eve--huge" / sha
    assert not (snapshot / "adapter_model.safetensors").exists()
    assert not [p for p in snapshot.rglob("*") if p.is_file() and p.stat().st_size > 64 << 10]


def test_a_stopped_download_leaves_no_partial_file_in_a_commit_another_adapter_uses(hub, made, monkeypatch):
    """A rejected commit's folder is deleted whole, partial downloads with it; an adapter in a
    subfolder of a commit that another adapter uses leaves the folder in place, so a download
    stopped past the limit must leave no partial file (10 MiB) there (QA SF suspected one
    would stay: the client removes its own)."""
    server, poll, cache = hub
    _, lora = made
    sha = server.create_repo_direct("eve/mixed", {**_repo_files(lora), **{f"big/{name}": data for name, data in
                                                   _repo_files(lora, **{"adapter_model.safetensors": HUGE}).items()}})
    assert poll("eve/mixed", WEIGHTS_LIMIT) == (AdapterStatus.registered, None)
    _lie_about_sizes(monkeypatch, server, "eve/mixed", "big/adapter_model.safetensors", 100, head=True, no_length=True)
    status, reason = poll("eve/mixed/big", WEIGHTS_LIMIT)
    assert status is AdapterStatus.rejected and "the download was stopped" in reason
    assert not [p for p in (cache / "eve--mixed" / sha).rglob("*") if p.is_file() and p.stat().st_size > 64 << 10]


@pytest.mark.parametrize("name", ["adapter_config.json", "calibration.jsonl"])
def test_a_hub_config_or_calibration_past_its_limit_is_rejected(hub, made, monkeypatch, name):
    """Before the fix neither had a limit; now both are bounded like the weights, here with
    the listing's size missing, so the download itself is what stops them."""
    server, poll, cache = hub
    _, lora = made
    padded = (lora / name).read_bytes() + b" " * (8 << 10)
    server.create_repo_direct("eve/padded", _repo_files(lora, **{name: padded}))
    _lie_about_sizes(monkeypatch, server, "eve/padded", name, None, head=True)
    status, reason = poll("eve/padded", Limits(max_config_bytes=4096, max_calibration_bytes=4096))
    assert status is AdapterStatus.rejected and f"{name} is " in reason and "above the limit of 4096" in reason
    server.create_repo_direct("eve/fine", _repo_files(lora))
    assert poll("eve/fine", Limits(max_config_bytes=4096, max_calibration_bytes=4096)) == (AdapterStatus.registered, None)


# ----------------------------------------------------------------------------- 6: the base model an adapter names


@pytest.mark.parametrize("named, reason", [
    ("/etc", "is a local path"),
    ("../base", "is a local path"),
    ("~/models/base", "is a local path"),
    ("{base}", "is a local path"),  # a real model folder, but one the config does not name
    ("not a repo id!", "is not a Hub repo id"),
    ("someorg/some-model", "cannot be read (not on the Hub, or offline); the daemon's log has the details"),
])
def test_a_base_model_an_adapter_names_is_looked_up_on_the_hub_only(tmp_path, made, named, reason):
    """With no ``base_model`` on the source, the adapter's own ``base_model_name_or_path``
    was resolved as given: any folder the daemon can read (``/etc``: "does not appear to
    have a file named config.json", stored in the catalog) or a Hub download. Now a local
    path is refused unless the config names it, and the reason never carries the
    loader's own message (paths, URLs)."""
    base, lora = made
    watched = Watched(tmp_path, base, base_model=None)
    folder = shutil.copytree(lora, watched.folder / "task")
    _set_config(folder, base_model_name_or_path=named.format(base=base))
    configured = shutil.copytree(base, tmp_path / "configured-base")  # a local model the config names
    _set_config(shutil.copytree(lora, watched.folder / "zz-configured"), base_model_name_or_path=str(configured))
    LocalFolderSource(watched.catalog, "team", trusted_models=[str(configured)]).scan()
    found = watched.found()
    _rejected(found, "task", f"base_model_name_or_path {named.format(base=base)[:60]!r}", reason)
    said = found["task"][1].split("adapter_config.json: ", 1)[1]
    assert "config.json" not in said and "huggingface.co" not in said and "Unrecognized" not in said
    assert found["zz-configured"] == (AdapterStatus.registered, None)
    watched.catalog.close()


# ----------------------------------------------------------------------------- 7: names from the Hub in cache paths


def _patch_info(monkeypatch, repo: str, **fields) -> None:
    """Make the test Hub answer ``fields`` (e.g. a hostile ``sha`` or ``id``) for ``repo``, in
    its repo info and its listing entries."""
    from hub_server import HubServer

    real_info = HubServer._info

    def info(self, found, commit, *, blobs):
        answer = real_info(self, found, commit, blobs=blobs)
        return {**answer, **fields} if found.repo_id == repo else answer

    monkeypatch.setattr(HubServer, "_info", info)


def _source_health(catalog) -> str | None:
    from iteris_daemon.catalog.models import Source

    with catalog.session() as session:
        return session.scalar(select(Source.last_error).where(Source.name == "eve-fine"))


@pytest.mark.parametrize("sha", ["../../escaped", "0" * 39, "G" * 40, "a" * 64])
def test_a_commit_sha_that_is_not_40_hex_digits_never_names_a_folder(hub, made, monkeypatch, tmp_path, sha):
    """The commit sha the Hub answers names the repo's cache folder. Before the fix it was
    used as given: ``../../escaped`` made a folder outside the cache (and downloads were
    aimed into it). Now the repo fails with the reason in the source's health, nothing
    is created or downloaded, and the other repos of the poll are registered."""
    server, poll, cache = hub
    _, lora = made
    server.create_repo_direct("eve/fine", _repo_files(lora))
    server.create_repo_direct("eve/sha", _repo_files(lora))
    _patch_info(monkeypatch, "eve/sha", sha=sha)
    from iteris_daemon.sources.hub import HubSource

    catalog = poll.catalog
    with catalog.session() as session:
        add_source(session, "eve-fine", SourceKind.hub, {
            "endpoint": server.endpoint, "repos": ["eve/sha", "eve/fine"], "base_model": str(made[0]),
            "retry_attempts": 1})
    report = HubSource(catalog, "eve-fine", cache).poll()
    assert report.registered == ["eve/fine"] and not report.rejected
    assert "not 40 hex digits; nothing downloaded" in _source_health(catalog)
    assert not (tmp_path / "escaped").exists() and not (cache / "eve--sha").exists()
    assert not server.requests_matching(r"^(GET|HEAD) /eve/sha/resolve/")


@pytest.mark.parametrize("listed_id", ["eve/../../escaped", "..", "eve/x\nINJECTED", "eve/a/b", "eve--x/y"])
def test_a_listed_name_that_is_not_a_repo_id_is_skipped_with_the_reason(hub, made, monkeypatch, tmp_path, listed_id):
    """Repo ids from an author listing name cache folders too. huggingface_hub's own
    argument check already stopped these at ``model_info`` (before the fix: an error,
    source unhealthy); now they are refused before any request, the reason (escaped) in
    the source's health, and the poll goes on."""
    server, poll, cache = hub
    _, lora = made
    server.create_repo_direct("eve/fine", _repo_files(lora))
    server.create_repo_direct("eve/evil", _repo_files(lora))
    _patch_info(monkeypatch, "eve/evil", id=listed_id)
    from iteris_daemon.sources.hub import HubSource

    catalog = poll.catalog
    with catalog.session() as session:
        add_source(session, "eve-fine", SourceKind.hub, {"endpoint": server.endpoint, "author": "eve",
                                                         "base_model": str(made[0]), "retry_attempts": 1})
    report = HubSource(catalog, "eve-fine", cache).poll()
    assert report.registered == ["eve/fine"]
    health = _source_health(catalog)
    assert f"names {listed_id!r}, which " in health and "skipped" in health and "\n" not in health
    assert not (tmp_path / "escaped").exists() and sorted(p.name for p in cache.iterdir()) == ["eve--fine"]
    assert not server.requests_matching(r"^GET /api/models/eve/(evil|\.\.|x)")


def test_repo_settings_must_be_repo_ids():
    from pydantic import ValidationError

    from iteris_daemon.sources.hub import HubSettings

    for spec in ("eve/..", "eve/a--b", "eve/.hidden", "eve/x.git@main", "eve/x@", "eve/x@ "):
        with pytest.raises(ValidationError, match="is not a repo id"):
            HubSettings(repos=[spec])
    assert HubSettings(repos=["eve/fine@dev"]).repos == ["eve/fine@dev"]
    for endpoint in ("not a url", "ftp://hub.example", "http://"):  # every poll failed
        with pytest.raises(ValidationError, match="is not an http"):
            HubSettings(repos=["eve/fine"], endpoint=endpoint)
    assert HubSettings(repos=["eve/fine"], endpoint="http://127.0.0.1:8080").endpoint == "http://127.0.0.1:8080"


# ----------------------------------------------------------------------------- 8: names in the log

FORGED = "2026-01-01 00:00:00,000 INFO iteris_daemon: forged"


@pytest.fixture
def daemon_log():
    """The daemon's own log setup, writing to a string, per format; logging put back after."""
    import io
    import logging

    from iteris_daemon.logs import NOISY, setup_logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    noisy = {name: logging.getLogger(name).level for name in NOISY}

    def start(fmt: str) -> io.StringIO:
        stream = io.StringIO()
        setup_logging(fmt=fmt, stream=stream)
        return stream

    yield start
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    for name, noisy_level in noisy.items():
        logging.getLogger(name).setLevel(noisy_level)


@pytest.mark.parametrize("fmt", ["text", "journal"])
def test_a_folder_name_with_newlines_cannot_forge_log_entries(watched, made, daemon_log, fmt):
    """A folder name is data: before the fix its newline went to the log raw, so the name
    ``bad⏎<timestamp> INFO …: forged`` wrote a line (a journal entry) of its own. Now
    control characters in logged values (and in a logged exception's message) are
    escaped; a newline the message itself has is kept."""
    import logging

    _, lora = made
    bad = shutil.copytree(lora, watched.folder / f"bad\n{FORGED}\r\x1b[2K")
    (bad / "adapter_config.json").write_text("{not json")  # rejected: its name is logged with the reason
    stream = daemon_log(fmt)
    watched.scan()
    try:
        raise ValueError(f"examining {bad} failed")
    except ValueError:
        logging.getLogger("iteris_daemon.test").exception("a failure naming %s", "it")
    logging.getLogger("iteris_daemon.test").warning("two lines\nof the message itself")
    lines = stream.getvalue().splitlines()
    prefix = r"<\d>" if fmt == "journal" else r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00 [A-Z]+ "
    if fmt == "text":  # a traceback's own lines have no prefix: from its first line to the exception's
        first = lines.index("Traceback (most recent call last):")
        last = next(i for i, line in enumerate(lines) if line.startswith("ValueError: "))
        lines = lines[:first] + lines[last + 1:] + [lines[last]]
    own = [line for line in lines if not re.match(prefix, line) and not line.startswith("ValueError: ")]
    assert own == (["of the message itself"] if fmt == "text" else []), own
    rejected = [line for line in lines if "rejected /" in line]
    assert rejected and all("bad\\n2026-01-01" in line and "\\r\\x1b[2K" in line for line in rejected)
    assert not any(line.startswith(FORGED) or line.startswith("<6>" + FORGED) for line in lines)
    assert any(line.endswith(f"ValueError: examining {watched.folder}/bad\\n{FORGED}\\r\\x1b[2K failed")
               for line in lines)


# ----------------------------------------------------------------------------- 9: token file, database URL


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606], ids=oct)
def test_a_token_file_others_can_read_or_write_is_refused(tmp_path, mode):
    """As ssh does with a private key: a token file open to the group or to others is not
    used (before the fix its mode was never looked at); owner-only modes are."""
    from iteris_daemon.errors import ConfigError
    from iteris_daemon.tokens import hub_token

    token_file = tmp_path / "token"
    token_file.write_text("hf_ownerOnly1234\n")
    token_file.chmod(mode)
    with pytest.raises(ConfigError, match=rf"token file {token_file} is open to other users \(mode 0?{mode:o}\).*chmod 600"):
        hub_token(token_file)
    for fine in (0o600, 0o400):
        token_file.chmod(fine)
        assert hub_token(token_file).get_secret_value() == "hf_ownerOnly1234"


_AS_ANOTHER_USER = """
import os, sys
from pathlib import Path
from iteris_daemon.config import WebhookSettings
from iteris_daemon.errors import ConfigError
from iteris_daemon.tokens import check_token_file, hub_token
os.setresgid(65534, 65534, 65534)
os.setresuid(65534, 65534, 65534)  # nobody: the unit's dynamic user reading a root-owned file
path = Path(sys.argv[1])
for read in (lambda: hub_token(path), lambda: check_token_file(path, "destinations.0.token_file"),
             lambda: WebhookSettings(listen="127.0.0.1:0", secret_file=path).secret()):
    try:
        read()
        print("read")
    except ConfigError as exc:
        print(exc)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="reads the file as another user: needs root")
def test_a_secret_file_the_services_user_cannot_read_says_how_a_service_gets_one(tmp_path):
    """Under the unit, the dynamic user owns no file in /etc: a root-owned 0600 token file or
    webhook secret said only "cannot read it (Permission denied)" and the service restarted
    on it every 10 s (QA OPS). Under systemd ($INVOCATION_ID and $NOTIFY_SOCKET, as the unit's
    Type=notify gives) the error says what works. The file's folders are open to all: it is
    the file's own mode that refuses it (pytest's folders are the owner's alone)."""
    import subprocess
    import sys
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="iteris-secret-"))
    try:
        folder.chmod(0o755)
        secret = folder / "hf-write-token"
        secret.write_text("hf_rootOwned1234\n")
        secret.chmod(0o600)
        said = {}
        for under_systemd in (False, True):
            env = {k: v for k, v in os.environ.items() if k not in ("INVOCATION_ID", "NOTIFY_SOCKET")}
            if under_systemd:
                env.update(INVOCATION_ID="0123456789abcdef0123456789abcdef", NOTIFY_SOCKET="/run/systemd/notify")
            done = subprocess.run([sys.executable, "-c", _AS_ANOTHER_USER, str(secret)], env=env, capture_output=True,
                                  text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            said[under_systemd] = done.stdout.splitlines()
        secret.chmod(0o644)  # readable now: read, and refused for its mode, by the checks that look at it
        opened = subprocess.run([sys.executable, "-c", _AS_ANOTHER_USER, str(secret)], capture_output=True, text=True,
                                timeout=120).stdout.splitlines()
    finally:
        shutil.rmtree(folder)
    assert all("is open to other users (mode 644)" in line for line in opened), opened
    hint = "a systemd service's user reads a secret as a credential: LoadCredential=NAME:PATH"
    assert len(said[True]) == 3 and all("cannot read it (Permission denied)" in line and hint in line
                                        for line in said[True]), said[True]
    assert said[True][0].startswith(f"the token file {secret}: ")
    assert said[True][1].startswith("destinations.0.token_file: ")
    assert said[True][2].startswith(f"daemon.webhooks.secret_file {secret}: ")
    assert all(line.endswith("(Permission denied)") for line in said[False]), said[False]
    assert "hf_rootOwned" not in "".join(said[True] + said[False])


_CREDENTIAL_ACL = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, uid) for tag, perm, uid in (
    (0x01, 4, 0xFFFFFFFF), (0x02, 4, 65534), (0x04, 0, 0xFFFFFFFF), (0x10, 4, 0xFFFFFFFF), (0x20, 0, 0xFFFFFFFF)))
"""systemd's credential ACL (``write_credential``): owner r--, the service's user r--, group ---,
mask r--, other ---: ``stat`` shows the mask as group bits, mode 440."""


def test_a_systemd_credential_named_as_a_token_file_is_taken_whatever_its_acl(tmp_path, monkeypatch):
    """The README advises ``token_file = "/run/credentials/iteris-daemon.service/NAME"``; systemd
    writes a credential 0400 for root with an ACL entry for the service's user, which stat shows
    as mode 440, so the check refused it, at the config's load (review RV10). A file in
    ``$CREDENTIALS_DIRECTORY`` is the service's own; the same file elsewhere is still refused."""
    from iteris_daemon.config import WebhookSettings
    from iteris_daemon.errors import ConfigError
    from iteris_daemon.tokens import check_token_file, hub_token

    credentials = tmp_path / "credentials" / "iteris-daemon.service"
    credentials.mkdir(parents=True)
    token = credentials / "hf-write-token"
    token.write_text("hf_credential1234\n")
    token.chmod(0o400)
    try:
        os.setxattr(token, "system.posix_acl_access", _CREDENTIAL_ACL)
    except OSError as exc:
        pytest.skip(f"no POSIX ACLs on this file system: {exc}")
    assert oct(token.stat().st_mode & 0o777) == "0o440"
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    assert hub_token(token).get_secret_value() == "hf_credential1234"
    check_token_file(token, "destinations.0.token_file")
    assert WebhookSettings(listen="127.0.0.1:0", secret_file=token).secret() == b"hf_credential1234"
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(ConfigError, match=r"is open to other users \(mode 440\)"):
        check_token_file(token, "destinations.0.token_file")


@pytest.mark.parametrize("where", ["token_file", "credential"])
def test_an_empty_token_file_is_refused_not_taken_for_anonymous(tmp_path, monkeypatch, where):
    """A token file caught empty (mid-rotation, or a credential written without the token)
    meant "anonymous": an author's listing then lacked the private repos, so the source
    marked every private adapter removed and said it was healthy. ``$HF_TOKEN`` unset or
    empty still means anonymous."""
    from iteris_daemon.errors import ConfigError
    from iteris_daemon.tokens import CREDENTIAL_NAME, hub_token

    monkeypatch.delenv("HF_TOKEN", raising=False)
    empty = tmp_path / (CREDENTIAL_NAME if where == "credential" else "token")
    empty.write_text("\n")
    empty.chmod(0o600)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    with pytest.raises(ConfigError, match=rf"^the token file {empty} is empty; it must hold the token$"):
        hub_token(empty if where == "token_file" else None)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    monkeypatch.setenv("HF_TOKEN", "")
    assert hub_token(None) is None


def test_a_token_with_non_ascii_characters_says_it_is_the_token(monkeypatch):
    """A pasted typographic quote in $HF_TOKEN ended in "'ascii' codec can't encode", with
    no word of the token."""
    from iteris_daemon.errors import ConfigError
    from iteris_daemon.tokens import hub_token

    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_abc\u2019def")
    with pytest.raises(ConfigError) as caught:
        hub_token()
    assert str(caught.value) == ("$HF_TOKEN holds characters other than ASCII, which no token has (a copy-paste of "
                                 "typographic quotes or dashes, say)") and "abc" not in str(caught.value)


def test_a_hub_source_with_an_open_token_file_is_unhealthy_and_sends_no_token(hub, made, tmp_path):
    """The poll does not raise out of the scheduler job: the source says why it is unhealthy."""
    from iteris_daemon.catalog.models import Source
    from iteris_daemon.sources.hub import HubSource

    server, poll, cache = hub
    _, lora = made
    server.create_repo_direct("eve/fine", _repo_files(lora))
    token_file = tmp_path / "open-token"
    token_file.write_text("hf_ownerOnly1234\n")
    token_file.chmod(0o644)
    catalog = poll.catalog
    with catalog.session() as session:
        add_source(session, "eve-fine", SourceKind.hub, {"endpoint": server.endpoint, "repos": ["eve/fine"],
                                                         "token_file": str(token_file), "base_model": str(made[0])})
    report = HubSource(catalog, "eve-fine", cache).poll()
    assert not report.registered and not server.requests
    with catalog.session() as session:
        source = session.scalar(select(Source).where(Source.name == "eve-fine"))
        assert not source.healthy and "is open to other users (mode 644)" in source.last_error
    token_file.chmod(0o600)
    assert HubSource(catalog, "eve-fine", cache).poll().registered == ["eve/fine"]


@pytest.mark.parametrize("url", [
    "postgres ql://alice:s3cret-pw@db/catalog",  # no such scheme: does not parse
    "postgresql://alice:s3cret-pw@db:notaport/catalog",  # a port that is no number
    "postgresql://alice:s3cret-pw@with@at@db:5432:1/catalog",
])
def test_a_database_url_that_does_not_parse_is_echoed_without_its_password(url, tmp_path):
    """Before the fix the first was echoed whole (password included) and the second raised
    a bare ValueError. Checked in the error and in what the command line prints."""
    import subprocess
    import sys

    from iteris_daemon.catalog import CatalogError

    with pytest.raises(CatalogError) as caught:
        Catalog(url)
    assert "s3cret" not in str(caught.value) and "alice:***@" in str(caught.value)
    cli = subprocess.run([sys.executable, "-m", "iteris_daemon", "sources", "list", "--db", url],
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode != 0 and "alice:***@" in cli.stderr
    assert "s3cret" not in cli.stderr + cli.stdout
