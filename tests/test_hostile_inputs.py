"""Hostile adapters and listings that the fuzzers of ``test_fuzz_validation.py`` do not
reach: files that escape the watched folder, names that are not UTF-8 or climb out of
the download folder, a base model that would run its own code, files past the limits.
Each ends in a rejection recorded in the real SQLite catalog (or, for remote code,
in code that never runs), never in an exception that stops a scan.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from safetensors.torch import load_file, save_file
from hypothesis import strategies as st
from sqlalchemy import select

from builders import build_adapter, build_tiny_model
from iteris_daemon.catalog import Catalog
from iteris_daemon.catalog.models import Adapter, AdapterStatus, SourceKind
from iteris_daemon.catalog.registry import add_source
from iteris_daemon.config import AdapterLimits
from iteris_daemon.errors import AdapterError
from iteris_daemon.sources.hub import unsafe_path
from iteris_daemon.sources.local import LocalFolderSource
from iteris_daemon.validation import Limits, validate_adapter


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    base = build_tiny_model("bert", root / "base")
    return base, build_adapter(base, root / "lora", seed=0, family="bert")


@pytest.fixture
def scan(tmp_path, made):
    """A watched folder and a function that scans it and returns the catalog's adapters."""
    base, _ = made
    watched = tmp_path / "watched"
    watched.mkdir()
    catalog = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    with catalog.session() as session:
        add_source(session, "team", SourceKind.local, {"paths": [str(watched)], "base_model": str(base)})

    def run(limits: Limits = Limits()) -> dict[str, Adapter]:
        LocalFolderSource(catalog, "team", limits=limits).scan()
        with catalog.session() as session:
            rows = session.scalars(select(Adapter)).all()
            return {row.name: (row.status, row.current.reason if row.current else None) for row in rows}

    yield watched, run
    catalog.close()


def test_files_symlinked_outside_the_watched_folder_are_rejected(scan, made, tmp_path):
    watched, run = scan
    _, lora = made
    secret = tmp_path / "outside" / "secret.bin"
    secret.parent.mkdir()
    secret.write_bytes(b"not for the daemon")
    for name, target in (("weights-escape", secret), ("config-escape", lora / "adapter_config.json")):
        folder = shutil.copytree(lora, watched / name)
        linked = folder / ("adapter_model.safetensors" if name == "weights-escape" else "adapter_config.json")
        linked.unlink()
        linked.symlink_to(target)
    (watched / "folder-link").symlink_to(lora, target_is_directory=True)  # not followed: recorded as rejected
    shutil.copytree(lora, watched / "good")
    found = run()
    assert found["good"] == (AdapterStatus.registered, None)
    for name in ("weights-escape", "config-escape"):
        status, reason = found[name]
        assert status is AdapterStatus.rejected and "symlink pointing outside the watched folder" in reason
    status, reason = found["folder-link"]
    assert status is AdapterStatus.rejected and "symlinked folders are not followed" in reason


def test_a_folder_name_that_is_not_utf8_is_rejected_and_the_scan_goes_on(scan, made, caplog):
    """The catalog stores paths as text; a Latin-1 folder name is recorded (escaped) as a
    rejection with the reason, every other folder is still registered, and rescans agree.
    The log names it escaped too: a raw surrogate breaks any UTF-8 log handler."""
    watched, run = scan
    _, lora = made
    shutil.copytree(lora, watched / os.fsdecode(b"caf\xe9-\xff"))  # Latin-1 bytes on disk: not UTF-8
    shutil.copytree(lora, watched / "caf\u00e9")  # the same name in UTF-8 is fine
    for _ in range(2):
        found = run()
        assert found["caf\u00e9"] == (AdapterStatus.registered, None)
        status, reason = found["caf\\xe9-\\xff"]
        assert status is AdapterStatus.rejected and "not valid UTF-8; rename the folder" in reason
        assert len(found) == 2
    messages = [record.getMessage() for record in caplog.records]
    assert any("rejected" in m and "caf\\xe9-\\xff" in m for m in messages), messages
    for message in messages:
        message.encode("utf-8")  # raises on a surrogate


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_rejected(scan, made, value):
    watched, run = scan
    _, lora = made
    folder = shutil.copytree(lora, watched / "poisoned")
    tensors = load_file(folder / "adapter_model.safetensors")
    name = sorted(k for k in tensors if "lora_B" in k)[-1]
    tensors[name][0, 0] = value
    save_file(tensors, folder / "adapter_model.safetensors")
    status, reason = run()["poisoned"]
    assert status is AdapterStatus.rejected and "finite" in reason


def test_files_past_the_limits_are_rejected_without_being_read(scan, made):
    watched, run = scan
    _, lora = made
    big = shutil.copytree(lora, watched / "huge")
    with open(big / "adapter_model.safetensors", "r+b") as handle:  # sparse: 3 GiB on paper, nothing on disk
        handle.truncate(3 << 30)
    shutil.copytree(lora, watched / "ok")
    limits = AdapterLimits.model_validate({"max_weights_bytes": 1 << 20}).limits()  # as in [daemon.limits]
    found = run(limits)
    status, reason = found["huge"]
    assert status is AdapterStatus.rejected and f"{3 << 30} bytes, above the limit of {1 << 20}" in reason
    assert found["ok"] == (AdapterStatus.registered, None)


def test_a_header_claiming_a_huge_length_is_rejected_without_allocating(scan, made):
    watched, run = scan
    _, lora = made
    folder = shutil.copytree(lora, watched / "liar")
    weights = folder / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(struct.pack("<Q", 1 << 62) + data[8:])
    status, reason = run()["liar"]
    assert status is AdapterStatus.rejected and "header" in reason


REMOTE_CODE = '''
import os, pathlib
pathlib.Path(os.environ["ITERIS_REMOTE_CODE_MARKER"]).write_text("ran")
from transformers import BertConfig

class EvilConfig(BertConfig):
    pass
'''


def test_a_base_model_runs_its_own_code_only_when_named_in_trust_remote_code(made, tmp_path, monkeypatch):
    """The adapter names a base model whose config asks to run Python shipped beside it.
    Named by the adapter alone (a local path) it is not even read; named by the source but
    untrusted (the default), transformers' built-in BERT code is used and the shipped
    code never runs; it runs only when trust_remote_code names that very base model."""
    base, lora = made
    marker = tmp_path / "marker"
    monkeypatch.setenv("ITERIS_REMOTE_CODE_MARKER", str(marker))
    evil = shutil.copytree(base, tmp_path / "evil-base")
    (evil / "evil_config.py").write_text(REMOTE_CODE)
    config = json.loads((evil / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil_config.EvilConfig"}
    (evil / "config.json").write_text(json.dumps(config))
    adapter = shutil.copytree(lora, tmp_path / "adapter")
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(evil)
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_config))

    with pytest.raises(AdapterError, match="is a local path"):  # named by the adapter alone: not even read
        validate_adapter(adapter, None, Limits(), trusted_models=[str(base), "some/other-model"])
    assert not marker.exists()
    info = validate_adapter(adapter, str(evil), Limits(), trusted_models=[str(base), "some/other-model"])  # the source's
    assert info.base_model == str(evil) and not marker.exists()
    # Trusted: the code runs. Its config subclasses BertConfig and the checkpoint records
    # BertModel, so the adapter is checked against that class and accepted.
    info = validate_adapter(adapter, None, Limits(), trusted_models=[str(evil)])
    assert info.base_model == str(evil)
    assert marker.read_text() == "ran"


NAME_EXAMPLES = int(os.environ.get("ITERIS_FUZZ_EXAMPLES", "300"))  # 300 in CI; the long run: 1000


def test_a_remote_name_that_passes_the_guard_stays_inside_the_download_folder():
    """Hub listings are hostile input: any name ``unsafe_path`` lets through must resolve
    to a path strictly inside the download folder, and be encodable as a file name.
    ``ITERIS_FUZZ_EXAMPLES`` names (300 by default); the counts are printed."""
    root = Path("/srv/cache/snapshot")
    outcomes = {"refused": 0, "admitted, inside": 0}

    @settings(max_examples=NAME_EXAMPLES, deadline=None, derandomize=True, database=None)
    @given(name=st.text(alphabet=st.characters(codec=None), max_size=40)
           | st.lists(st.sampled_from(["..", ".", "", "a", "b.json", "\\", "C:", "\x00", "\udcff", "/"]), max_size=6)
           .map("/".join))
    def case(name):
        if unsafe_path(name):
            outcomes["refused"] += 1
            return
        target = Path(os.path.normpath(root / name))
        assert target != root and root in target.parents
        os.fsencode(name)
        outcomes["admitted, inside"] += 1

    case()
    print(f"\nfuzz remote names: {sum(outcomes.values())} cases: {outcomes}")
    assert sum(outcomes.values()) >= NAME_EXAMPLES and all(outcomes.values()), outcomes
