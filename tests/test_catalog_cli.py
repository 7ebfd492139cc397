"""``iteris-daemon db|sources|adapters`` and ``merge-now`` end to end on a real SQLite file;
the command line's help and global options."""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from sqlalchemy import select
from sqlalchemy.engine import make_url
from transformers import AutoModel

import iteris_daemon.cli as cli
from polling import wait_for
from builders import build_adapter, build_tiny_model, tiny_config
from iteris_daemon.catalog import Catalog
from iteris_daemon.catalog.db import mask_password
from iteris_daemon.catalog.models import BaseModelShapes, DaemonPresence, MergeGroup, MergeRun, RunStatus
from iteris_daemon.cli import build_parser, main
from iteris_daemon.sources.stat_cache import stat_cache_file
from iteris_daemon.validation import Limits


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-src")
    base = build_tiny_model("bert", root / "base")
    return base, build_adapter(base, root / "lora", seed=0, family="bert")


@pytest.fixture(autouse=True)
def cache_directory(tmp_path, monkeypatch):
    """The commands' default cache directory, in the test's folder (not the user's)."""
    cache = tmp_path / "default-cache"
    monkeypatch.setenv("CACHE_DIRECTORY", str(cache))
    return cache


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_sources_and_adapters_commands(made, tmp_path, capsys):
    base, lora = made
    db = ["--db", f"sqlite:///{tmp_path / 'catalog.db'}"]
    watched = tmp_path / "watched"
    watched.mkdir()
    shutil.copytree(lora, watched / "good")
    shutil.copytree(lora, watched / "bad")
    (watched / "bad" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 0, "lora_alpha": 8}')

    assert run(capsys, "db", "upgrade", *db)[1].startswith("catalog sqlite:///")
    assert run(capsys, "sources", "add", "team", "--folder", str(watched), "--base-model", str(base), *db)[0] == 0
    code, out, _ = run(capsys, "sources", "scan", *db)
    assert code == 0 and "1 registered, 1 rejected" in out
    sources = json.loads(run(capsys, "sources", "list", "--json", *db)[1])
    assert [(s["name"], s["kind"], s["healthy"]) for s in sources] == [("team", "local", True)]
    # Catalog times are naive UTC: without the zone a reader would take them for local time.
    assert datetime.fromisoformat(sources[0]["last_poll_at"]).utcoffset() == timedelta(0)

    rows = {r["name"]: r for r in json.loads(run(capsys, "adapters", "list", "--json", *db)[1])}
    assert rows["good"]["status"] == "registered" and rows["good"]["rank"] == 4
    assert datetime.fromisoformat(rows["good"]["updated_at"]).utcoffset() == timedelta(0)
    assert rows["bad"]["status"] == "rejected" and "r must be a positive number" in rows["bad"]["reason"]
    only = json.loads(run(capsys, "adapters", "list", "--json", "--status", "rejected", *db)[1])
    assert [r["name"] for r in only] == ["bad"]
    shown = json.loads(run(capsys, "adapters", "show", str(rows["good"]["id"]), "--json", *db)[1])
    assert shown["revisions"][0]["target_modules"] == ["dense", "query", "value"]
    assert datetime.fromisoformat(shown["revisions"][0]["discovered_at"]).utcoffset() == timedelta(0)
    table = run(capsys, "adapters", "list", *db)[1]
    assert "registered" in table and "rejected" in table

    assert run(capsys, "sources", "remove", "team", *db)[0] == 0
    assert run(capsys, "adapters", "list", "--json", *db)[1].strip() == "[]"


def test_names_others_wrote_reach_the_terminal_escaped(made, tmp_path, capsys):
    """A folder named with an escape sequence and a line break (clear the screen, retitle the
    window, forge a line): the log escaped it, `status`, `sources list`, `adapters list` and
    `adapters show` wrote it to the admin's terminal as it was (QA SEC)."""
    base, lora = made
    db = ["--db", f"sqlite:///{tmp_path / 'catalog.db'}"]
    watched = tmp_path / "watched\x1b]0;title\x07"
    watched.mkdir()
    evil = "evil\x1b[2J\nFAKE: line"
    shutil.copytree(lora, watched / evil)
    assert run(capsys, "sources", "add", "team", "--folder", str(watched), "--base-model", str(base), *db)[0] == 0
    assert run(capsys, "sources", "scan", *db)[0] == 0
    [row] = json.loads(run(capsys, "adapters", "list", "--json", *db)[1])
    assert row["name"] == evil  # JSON keeps the name as it is (escaped by JSON itself)
    for argv in (["status"], ["sources", "list"], ["adapters", "list"], ["adapters", "show", str(row["id"])]):
        code, out, _ = run(capsys, *argv, *db)
        assert code == 0 and "\x1b" not in out and "\x07" not in out, (argv, out)
        assert "\nFAKE" not in out, (argv, out)
    assert "evil\\x1b[2J\\nFAKE: line" in run(capsys, "adapters", "list", *db)[1]


def test_a_scan_keeps_a_base_models_shapes_in_the_catalog_for_every_later_scan(made, tmp_path, capsys, monkeypatch):
    """`sources scan` stores the layer shapes it computed in the catalog, where the daemon keeps
    them, and reads them there: a later scan (the daemon's too) checks another adapter of that
    base model without building its skeleton (torch and transformers imported: seconds a scan)."""
    import iteris_daemon.model as model
    import iteris_daemon.validation as validation

    base, lora = made
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    watched = tmp_path / "watched"
    watched.mkdir()
    shutil.copytree(lora, watched / "one")
    assert run(capsys, "sources", "add", "team", "--folder", str(watched), "--base-model", str(base), "--db", url)[0] == 0
    assert "1 registered" in run(capsys, "sources", "scan", "--db", url)[1]
    with Catalog(url).session() as session:
        assert [row.base_model for row in session.scalars(select(BaseModelShapes))] == [str(base)]

    def no_skeleton(*_args, **_kwargs):
        raise AssertionError("a skeleton was built")

    monkeypatch.setattr(validation, "_SKELETONS", {})  # as a new process: nothing built in this one yet
    monkeypatch.setattr(model, "load_skeleton", no_skeleton)
    shutil.copytree(lora, watched / "two")
    code, out, _ = run(capsys, "sources", "scan", "--db", url)
    assert code == 0 and "1 registered," in out and "1 unchanged" in out, out


def test_a_base_model_that_cannot_be_read_is_asked_once_a_minute_not_per_adapter(made, tmp_path):
    """Shapes that could not be computed were asked again for every adapter: with the Hub
    unreachable each one cost a worker start and a 30 s timeout, 11 minutes for a scan of
    20 adapters, at every scan (QA LEAK). Now one failure answers every adapter of that
    base model for a minute (each waits, saying why); after it the base model is asked again."""
    from iteris_daemon.catalog.models import SourceKind
    from iteris_daemon.catalog.registry import add_source, get_source
    from iteris_daemon.catalog.shapes import FAILED_RETRY_SECONDS, CatalogShapes
    from iteris_daemon.errors import BaseModelError
    from iteris_daemon.sources.local import LocalFolderSource

    _, lora = made
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    watched = tmp_path / "watched"
    watched.mkdir()
    for name in ("a", "b", "c"):
        shutil.copytree(lora, watched / name)
    catalog = Catalog(url)
    asked, now = [], [1000.0]

    def unreachable(base, layout, trust_remote_code):
        asked.append(layout.path.name)
        raise BaseModelError(f"{base}: cannot reach the Hub")

    try:
        with catalog.session() as session:
            add_source(session, "team", SourceKind.local, {"paths": [str(watched)], "base_model": "acme/base"})
        shapes = CatalogShapes(catalog, unreachable, clock=lambda: now[0])
        source = LocalFolderSource(catalog, "team", shapes=shapes)
        report = source.scan()
        assert len(asked) == 1 and len(report.waiting) == 3, (asked, report)
        with catalog.session() as session:
            assert "cannot reach the Hub" in get_source(session, "team").last_error
        now[0] += FAILED_RETRY_SECONDS / 2
        source.scan()
        assert len(asked) == 1
        now[0] += FAILED_RETRY_SECONDS
        source.scan()
        assert len(asked) == 2
    finally:
        catalog.close()


def test_a_base_model_replaced_in_its_folder_is_measured_again(tmp_path, capsys):
    """The stored shapes are those of the base model's config: a wider model saved to the same
    folder (an updated checkpoint) is measured again, and its adapter registered. Its stored
    shapes, keyed by the path alone, had the scan (and the daemon) refuse it for good."""
    base = tmp_path / "base"
    watched = tmp_path / "watched"
    watched.mkdir()
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    build_adapter(build_tiny_model("llama", base), watched / "old", seed=0, family="llama")
    assert run(capsys, "sources", "add", "team", "--folder", str(watched), "--base-model", str(base), "--db", url)[0] == 0
    assert "1 registered" in run(capsys, "sources", "scan", "--db", url)[1]

    shutil.rmtree(base)
    wider = tiny_config("llama")
    wider.hidden_size, wider.head_dim = 48, 16
    torch.manual_seed(0)
    AutoModel.from_config(wider).save_pretrained(base)
    build_adapter(base, watched / "new", seed=1, family="llama")
    code, out, _ = run(capsys, "sources", "scan", "--db", url)
    assert code == 0 and "1 registered," in out, out
    rows = {r["name"]: r for r in json.loads(run(capsys, "adapters", "list", "--json", "--db", url)[1])}
    assert rows["new"]["status"] == "registered", rows["new"]


def test_a_scan_reads_only_what_changed_since_the_last_scan(made, tmp_path, capsys, monkeypatch, cache_directory,
                                                             hashed):
    """`sources scan` keeps the folder fingerprints where the daemon keeps them (its cache
    directory, by source): a second scan of unchanged adapters hashes none of them, and
    one with new weights is hashed and registered again."""
    import iteris_daemon.sources.local as local

    base, lora = made
    db = ["--db", f"sqlite:///{tmp_path / 'catalog.db'}"]
    watched = tmp_path / "watched"
    watched.mkdir()
    for name in ("one", "two"):
        shutil.copytree(lora, watched / name)
    monkeypatch.setattr(local, "RACY_NS", 0)  # the copies are not racy: trust their times at once
    assert run(capsys, "sources", "add", "team", "--folder", str(watched), "--base-model", str(base), *db)[0] == 0

    assert "2 registered" in run(capsys, "sources", "scan", *db)[1]
    assert stat_cache_file(cache_directory, "team", Limits()).is_file()
    hashed.clear()
    assert "2 unchanged" in run(capsys, "sources", "scan", *db)[1] and hashed == []

    weights = watched / "two" / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v * 2 for k, v in tensors.items()}, weights)
    code, out, _ = run(capsys, "sources", "scan", *db)
    assert code == 0 and "1 registered," in out and "1 unchanged" in out and hashed == [watched / "two"]

    elsewhere = tmp_path / "elsewhere"  # --cache-dir: another cache, hashed afresh
    hashed.clear()
    assert "2 unchanged" in run(capsys, "sources", "scan", "--cache-dir", str(elsewhere), *db)[1]
    assert sorted(hashed) == [watched / "one", watched / "two"] and stat_cache_file(elsewhere, "team", Limits()).is_file()


def test_a_scan_with_the_daemons_config_uses_its_catalog_cache_and_limits(made, tmp_path, capsys, monkeypatch,
                                                                           cache_directory, hashed):
    """`sources scan --config` scans as the daemon would: its catalog, its cache directory
    and its limits, so it keeps the fingerprints in the daemon's file. A scan under other
    limits (no --config) keeps a file of its own and leaves the daemon's as it was."""
    import iteris_daemon.sources.local as local

    base, lora = made
    watched, cache = tmp_path / "watched", tmp_path / "daemon-cache"
    shutil.copytree(lora, watched / "one")
    monkeypatch.setattr(local, "RACY_NS", 0)
    db = f"sqlite:///{tmp_path / 'daemon.db'}"
    config = tmp_path / "daemon.toml"
    config.write_text(f"[daemon]\ndatabase = {json.dumps(db)}\ncache_dir = {json.dumps(str(cache))}\n"
                      "[daemon.limits]\nmax_weights_bytes = 1000000000\nmax_rank = 2\n")
    daemons = Limits(max_weights_bytes=1_000_000_000, max_rank=2)
    assert run(capsys, "sources", "add", "team", "--folder", str(watched), "--base-model", str(base), "--db", db)[0] == 0

    code, out, _ = run(capsys, "sources", "scan", "--config", str(config))
    assert code == 0 and "1 rejected" in out  # rank 4 past the daemon's max_rank
    rows = json.loads(run(capsys, "adapters", "list", "--json", "--db", db)[1])
    assert "r=4 is above the limit of 2" in rows[0]["reason"]
    daemon_file = stat_cache_file(cache, "team", daemons)
    assert daemon_file.is_file() and not (cache_directory / "folder-stat").exists()
    hashed.clear()
    assert "1 unchanged" in run(capsys, "sources", "scan", "--config", str(config))[1] and hashed == []

    kept = daemon_file.read_bytes()
    code, out, _ = run(capsys, "sources", "scan", "--db", db, "--cache-dir", str(cache))  # the default limits
    assert code == 0 and "1 unchanged" in out and hashed == [watched / "one"]  # its own file: read again
    assert daemon_file.read_bytes() == kept and stat_cache_file(cache, "team", Limits()).is_file()
    # The daemon's verdict is left alone: without its settings nothing is judged again.
    assert json.loads(run(capsys, "adapters", "list", "--json", "--db", db)[1])[0]["status"] == "rejected"


def test_a_scan_with_the_daemons_config_scans_the_configs_sources(made, tmp_path, capsys):
    """The config's [[sources]] were ignored: on a catalog the daemon had not started on,
    `sources scan --config` scanned nothing and exited 0, and a source changed in the file
    was scanned with the catalog's old settings."""
    base, lora = made
    first, second = tmp_path / "first", tmp_path / "second"
    shutil.copytree(lora, first / "one")
    shutil.copytree(lora, second / "two")
    config = tmp_path / "daemon.toml"
    source = '[[sources]]\nname = "team"\nkind = "local"\nbase_model = {base}\npaths = [{paths}]\n'
    head = f"[daemon]\nstate_dir = {json.dumps(str(tmp_path / 'state'))}\n"
    config.write_text(head + source.format(base=json.dumps(str(base)), paths=json.dumps(str(first))))
    assert run(capsys, "db", "upgrade", "--config", str(config))[0] == 0  # as the daemon's start would
    code, out, _ = run(capsys, "sources", "scan", "--config", str(config))
    assert code == 0 and "1 registered" in out
    config.write_text(head + source.format(base=json.dumps(str(base)),
                                           paths=f"{json.dumps(str(first))}, {json.dumps(str(second))}"))
    code, out, _ = run(capsys, "sources", "scan", "--config", str(config))
    assert code == 0 and "1 registered" in out and "1 unchanged" in out


def test_every_catalog_command_opens_the_catalog_the_daemons_config_names(made, tmp_path, capsys, monkeypatch):
    """`sources scan --config` worked on the daemon's catalog, but `sources add|list|remove`,
    `adapters list|show` and `db upgrade` took --db alone: with a config naming another state
    directory they opened (or created) the default catalog, and the "no catalog" error told the
    user that --config names one. Each now takes --config; --db still wins."""
    base, lora = made
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "default-state"))  # where a command without either looks
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.delenv("ITERIS_DAEMON_DB", raising=False)
    watched = tmp_path / "watched"
    shutil.copytree(lora, watched / "one")
    config = tmp_path / "daemon.toml"
    config.write_text(f"[daemon]\nstate_dir = {json.dumps(str(tmp_path / 'state'))}\n")
    cfg = ["--config", str(config)]

    code, out, _ = run(capsys, "db", "upgrade", *cfg)
    assert code == 0 and str(tmp_path / "state") in out
    assert run(capsys, "sources", "add", "team", "--folder", str(watched), "--base-model", str(base), *cfg)[0] == 0
    assert "1 registered" in run(capsys, "sources", "scan", *cfg)[1]
    assert [s["name"] for s in json.loads(run(capsys, "sources", "list", "--json", *cfg)[1])] == ["team"]
    [adapter] = json.loads(run(capsys, "adapters", "list", "--json", *cfg)[1])
    assert json.loads(run(capsys, "adapters", "show", str(adapter["id"]), "--json", *cfg)[1])["name"] == "one"
    assert not (tmp_path / "default-state").exists()  # nothing opened or created the default catalog
    other = f"sqlite:///{tmp_path / 'other.db'}"
    assert run(capsys, "db", "upgrade", "--db", other, *cfg)[0] == 0  # --db wins
    assert json.loads(run(capsys, "sources", "list", "--json", "--db", other, *cfg)[1]) == []
    assert run(capsys, "sources", "remove", "team", *cfg)[0] == 0
    assert json.loads(run(capsys, "sources", "list", "--json", *cfg)[1]) == []


TOKEN = "hf_" + "Q" * 34


@pytest.mark.parametrize("argv", [["sources", "scan"], ["sources", "list"], ["adapters", "list"], ["db", "upgrade"]])
@pytest.mark.parametrize("table,message", [
    (f'kind = "hub"\nrepos = ["acme/x"]\ntoken = "{TOKEN}"', "sources.0 (s): token: Extra inputs are not permitted"),
    ('kind = "local"\npaths = ["/srv"]\nsettle_secnds = 3', "sources.0 (s): settle_secnds: Extra inputs"),
    ('kind = "local"\npaths = ["/srv"]\nsettle_seconds = -1', "sources.0 (s): settle_seconds: Input should be greater"),
    # A token pasted as the file's path was stored in the catalog and printed by `sources list --json`.
    (f'kind = "hub"\nrepos = ["acme/x"]\ntoken_file = "{TOKEN}"',
     "sources.0 (s): token_file: no such file (is it the token itself? give the path of a file holding it)"),
])
def test_a_bad_source_in_the_config_is_one_line_before_any_catalog(tmp_path, capsys, argv, table, message):
    """`sources scan --config` checked a source's settings only while writing them into the
    catalog, after creating it: a pydantic traceback that printed the value (a token pasted
    inline). Every catalog command given --config refuses it as `run` does, and creates nothing."""
    config = tmp_path / "daemon.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n[[sources]]\nname = "s"\n{table}\n')
    code, out, err = run(capsys, *argv, "--config", str(config))
    assert code == 2 and f"{config}: {message}" in err and err.count("\n") == 1 and TOKEN not in out + err
    assert not (tmp_path / "state").exists()
    # The same where --db names the catalog: the config was then not read at all.
    code, out, err = run(capsys, *argv, "--config", str(config), "--db", f"sqlite:///{tmp_path / 'named.db'}")
    assert code == 2 and f"{config}: {message}" in err and not (tmp_path / "named.db").exists()


def test_a_scan_without_a_usable_cache_directory_still_scans_folders(made, tmp_path, capsys):
    """A cache directory that cannot be made, or that belongs to another user (root
    scanning with the daemon's), is not used: folders are hashed in full, with a warning;
    nothing is written into another user's directory."""
    base, lora = made
    db = ["--db", f"sqlite:///{tmp_path / 'catalog.db'}"]
    watched = tmp_path / "watched"
    shutil.copytree(lora, watched / "one")
    assert run(capsys, "sources", "add", "team", "--folder", str(watched), "--base-model", str(base), *db)[0] == 0
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    code, out, err = run(capsys, "sources", "scan", "--cache-dir", str(not_a_folder / "cache"), *db)
    assert code == 0 and "1 registered" in out
    assert f"cannot use the cache directory {not_a_folder / 'cache'}: Not a directory" in err

    if os.geteuid() != 0:
        return  # the rest needs to give a folder away
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    code, out, err = run(capsys, "sources", "scan", "--cache-dir", str(theirs), *db)
    assert code == 0 and "1 unchanged" in out and "belongs to uid 65534, not this user" in err
    assert list(theirs.iterdir()) == []


@pytest.mark.parametrize("argv,message", [
    (["sources", "add", "x", "--folder", "/no/such/dir"], "--folder /no/such/dir: no such directory"),
    # By its spelling a local folder: every adapter waited on it, the source unhealthy (QA NU).
    (["sources", "add", "x", "--folder", ".", "--base-model", "./nobert"], "--base-model ./nobert: no such directory"),
    (["sources", "add", "x", "--hub-author", "acme", "--base-model", "~/nobert"], "--base-model ~/nobert: no such"),
    (["sources", "add", "x", "--folder", ".", "--base-model", "models/nobert/7b"], "--base-model models/nobert/7b: no"),
    (["sources", "add", "x", "--hub-repo", "not a repo"], "is not a repo id"),
    (["sources", "add", "x", "--hub-author", "acme", "--interval", "-5"], "interval_seconds: Input should be greater than or equal to 0.1"),
    # nan passed as "less than or equal to 315360000"; inf is past every date the scheduler knows.
    (["sources", "add", "x", "--hub-author", "acme", "--interval", "nan"], "interval_seconds: Input should be a finite number"),
    (["sources", "add", "x", "--folder", ".", "--settle", "inf"], "settle_seconds: Input should be a finite number"),
    (["sources", "remove", "ghost"], "no source named 'ghost'"),
    (["adapters", "show", "42"], "no adapter with id 42"),
    (["adapters", "list", "--db", "nosuchdialect://x"], "cannot use database URL"),
    (["adapters", "list", "--db", "cat.db"], "a SQLite file is written sqlite:////abs/path.db"),
    (["adapters", "list", "--source", "nosuch"], "no source named 'nosuch'"),
    (["sources", "add", "x", "--folder", ".", "--interval", "10"], "--interval: only for Hub sources"),
    (["sources", "add", "x", "--folder", ".", "--token-file", "t", "--endpoint", "e"],
     "--endpoint, --token-file: only for Hub sources"),
    (["sources", "add", "x", "--hub-author", "acme", "--settle", "0"], "--settle: only for folder sources"),
    (["sources", "add", "x", "--hub-repo", "acme/x", "--settle", "5", "--polling"],
     "--settle, --polling: only for folder sources"),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, argv, message):
    db = [] if "--db" in argv else ["--db", f"sqlite:///{tmp_path / 'catalog.db'}"]
    if db:
        Catalog(db[1]).close()
    code, out, err = run(capsys, *argv, *db)
    assert code == 2 and message in err and err.count("\n") == 1


@pytest.mark.parametrize("argv", [["status"], ["merge-now", "g"], ["adapters", "list"], ["adapters", "show", "1"],
                                  ["sources", "list"], ["sources", "remove", "x"], ["sources", "scan"]])
def test_commands_that_read_the_catalog_do_not_create_one(tmp_path, capsys, argv):
    """A mistyped --db used to create an empty catalog (and its folder) and report it as
    healthy and empty; only the daemon, `sources add` and `db upgrade` create one."""
    missing = tmp_path / "typo" / "catalog.db"
    code, out, err = run(capsys, *argv, "--db", f"sqlite:///{missing}")
    assert code == 2 and f"no catalog at {missing}" in err and err.count("\n") == 1
    assert not missing.parent.exists()


def test_a_scan_with_the_daemons_config_does_not_create_its_catalog(tmp_path, capsys, monkeypatch):
    """The README's `sudo iteris-daemon sources scan --config /etc/iteris-daemon/config.toml`,
    with the unit's state directory known only to the unit, created a catalog under root's
    home and registered the adapters there, where no daemon looked; exit 0."""
    monkeypatch.delenv("ITERIS_DAEMON_DB", raising=False)
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "admin-state"))
    (tmp_path / "watched").mkdir()
    config = tmp_path / "daemon.toml"
    config.write_text(f'[[sources]]\nname = "team"\nkind = "local"\npaths = [{json.dumps(str(tmp_path / "watched"))}]\n')
    code, out, err = run(capsys, "sources", "scan", "--config", str(config))
    missing = tmp_path / "admin-state" / "iteris-daemon" / "catalog.db"
    assert code == 2 and err.startswith(f"iteris-daemon: error: no catalog at {missing} (the daemon") \
        and err.count("\n") == 1, err
    assert not missing.parent.exists()


def test_commands_that_read_the_catalog_do_not_migrate_it(tmp_path, capsys):
    """`status` (any command that does not create a catalog) silently migrated an older
    catalog under its daemon; a newer one (written by a newer iteris-daemon) ended in Alembic's
    "Can't locate revision". Both are one line saying what to do, and the schema stays."""
    from sqlalchemy import text

    from iteris_daemon.catalog import db as catalog_db

    path = tmp_path / "catalog.db"
    url = f"sqlite:///{path}"
    engine = catalog_db.make_engine(url)
    catalog_db.upgrade(engine, "0007")
    for argv in (["status"], ["adapters", "list"], ["sources", "list"], ["merge-now", "g"]):
        code, out, err = run(capsys, *argv, "--db", url)
        assert code == 2 and err == (f"iteris-daemon: error: the catalog at sqlite:///{path} is at schema revision "
                                     "0007, older than this iteris-daemon's 0012: run `iteris-daemon db upgrade` with "
                                     "this command's --db or --config, if it had one (or start the daemon, which "
                                     "migrates it)\n"), err
    assert catalog_db.current_revision(engine) == "0007"
    assert run(capsys, "db", "upgrade", "--db", url)[0] == 0 and catalog_db.current_revision(engine) == "0012"
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '0042'"))
    for argv in (["status"], ["db", "upgrade"], ["sources", "add", "x", "--folder", str(tmp_path)]):
        code, out, err = run(capsys, *argv, "--db", url)
        assert code == 2 and err == (f"iteris-daemon: error: the catalog at sqlite:///{path} is at schema revision "
                                     "0042, newer than this iteris-daemon knows (its latest is 0012): upgrade "
                                     "iteris-daemon, or use the version that wrote it\n"), err
    with engine.begin() as connection:  # another application's Alembic revision: it was "newer" (QA PG)
        connection.execute(text("UPDATE alembic_version SET version_num = 'ae1027a6acf'"))
    code, out, err = run(capsys, "status", "--db", url)
    assert code == 2 and err.endswith("is at schema revision ae1027a6acf, which is not one of iteris-daemon's (0001 "
                                      "to 0012): it is another application's database; give the catalog a database "
                                      "of its own\n"), err
    engine.dispose()


@pytest.mark.parametrize("argv, message", [
    (["adapters", "show", "99999999999999999999"],  # it overflowed SQLite in a traceback
     "argument ID: an id is a whole number from 1 to 2^63 - 1, not '99999999999999999999'"),
    (["sources", "add", " ", "--folder", "."],  # it was added, and logged as "source  ..."
     "argument name: a name has 1 to 200 printable characters, not only spaces: ' '"),
    (["sources", "add", "team\nINFO forged", "--folder", "."],  # it forged lines in `sources list`, `status`, logs
     "argument name: a name has 1 to 200 printable characters, not only spaces: 'team\\nINFO forged'"),
])
def test_an_id_or_name_out_of_range_is_a_usage_error(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--db", f"sqlite:///{tmp_path / 'catalog.db'}"])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "catalog.db").exists()


def test_a_catalog_or_state_folder_that_cannot_be_written_is_one_line(tmp_path, capsys):
    """A catalog or state folder under a file (or on a read-only file system) ended in an
    OSError traceback."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, out, err = run(capsys, "db", "upgrade", "--db", f"sqlite:///{blocker / 'catalog.db'}")
    assert code == 2 and err == (f"iteris-daemon: error: cannot open the catalog {blocker / 'catalog.db'} for "
                                 f"writing ({blocker}: File exists)\n"), err
    config = tmp_path / "daemon.toml"
    config.write_text(f"[daemon]\nstate_dir = {json.dumps(str(blocker / 'state'))}\n")
    code, out, err = run(capsys, "run", "--config", str(config))
    assert code == 2 and err.endswith(f"iteris-daemon: error: cannot create the daemon's folder {blocker / 'state'} "
                                      "(Not a directory); [daemon] state_dir and cache_dir set where they go\n"), err


def test_a_sqlite_path_with_a_tilde_is_in_the_home_folder(tmp_path, capsys, monkeypatch):
    """``~`` in a SQLite URL was only expanded to create the file, so the catalog itself went
    to a folder literally named ``~`` under the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, "db", "upgrade", "--db", "sqlite:///~/state/catalog.db")
    assert code == 0 and str(tmp_path / "home" / "state" / "catalog.db") in out
    assert (tmp_path / "home" / "state" / "catalog.db").stat().st_mode & 0o777 == 0o600
    assert not (tmp_path / "~").exists()
    code, out, _ = run(capsys, "sources", "list", "--db", "sqlite:///~/state/catalog.db")
    assert code == 0


@pytest.mark.parametrize("mode, message", [(0o644, "is open to other users (mode 644)"),
                                           (None, "--token-file: no such file (is it the token itself?")])
def test_a_token_file_is_checked_when_the_source_is_added(tmp_path, capsys, monkeypatch, mode, message):
    """Refused by `sources add`, as the first poll would refuse it (it was accepted, and
    the source turned unhealthy only once it polled). A missing one is not quoted: it may be
    the token itself."""
    monkeypatch.chdir(tmp_path)
    token = tmp_path / "hf_token_of_this_test"
    if mode is not None:
        token.write_text("hf_token_of_this_test\n")
        token.chmod(mode)
    code, _, err = run(capsys, "sources", "add", "hub", "--hub-repo", "acme/x", "--token-file", token.name,
                       "--db", f"sqlite:///{tmp_path / 'catalog.db'}")
    assert code == 2 and message in err and err.count("\n") == 1
    assert token.name not in err


def test_a_scan_that_leaves_a_source_unhealthy_fails(tmp_path, capsys):
    db = ["--db", f"sqlite:///{tmp_path / 'catalog.db'}"]
    watched = tmp_path / "watched"
    watched.mkdir()
    assert run(capsys, "sources", "add", "team", "--folder", str(watched), *db)[0] == 0
    watched.rmdir()
    code, _, err = run(capsys, "sources", "scan", "team", *db)
    assert code == 1 and err.splitlines()[-1] == f"iteris-daemon: error: source team: watched folder {watched} does not exist"


def _publishing_project(made, root: Path) -> Path:
    """A daemon's config in ``root``: source team over ``loras``, group g publishing into the
    relative folder ``published``, which holds one of the daemon's published versions (an
    adapter's files, as a merge's are). Returns the config's path."""
    base, lora = made
    shutil.copytree(lora, root / "loras" / "one")
    shutil.copytree(lora, root / "published" / "versions" / "run-2-20260101T000000Z")
    config = root / "daemon.toml"
    config.write_text(f'[daemon]\nstate_dir = "var/state"\ncache_dir = "var/cache"\n'
                      f'[[sources]]\nname = "team"\nkind = "local"\npaths = ["loras"]\nbase_model = {json.dumps(str(base))}\n'
                      f'[[groups]]\nname = "g"\nbase_model = {json.dumps(str(base))}\n'
                      '[[groups.destinations]]\nkind = "folder"\npath = "published"\n')
    return config


def test_a_scan_with_the_daemons_config_refuses_a_source_over_a_destination(made, tmp_path, capsys, monkeypatch):
    """A source added without --config over a group's destination is refused by the daemon
    (not started, its health says why), but `sources scan --config` scanned it: the daemon's
    published merges were registered as adapters, the next run merged them again, and the
    source was marked healthy. The scan refuses it as the daemon does; the others are scanned."""
    base, _ = made
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    config = _publishing_project(made, project)
    cfg = ["--config", str(config)]
    assert run(capsys, "db", "upgrade", *cfg)[0] == 0
    db = ["--db", f"sqlite:///{project / 'var' / 'state' / 'catalog.db'}"]  # no --config: the destinations are unknown
    assert run(capsys, "sources", "add", "oops", "--folder", str(project / "published"), "--base-model", str(base),
               *db)[0] == 0
    monkeypatch.chdir(elsewhere)  # the destination is relative to the config's folder

    code, out, err = run(capsys, "sources", "scan", *cfg)
    published = project / "published"
    assert code == 1 and "team: 1 registered" in out and "oops:" not in out
    assert [line for line in err.splitlines() if line.startswith("iteris-daemon:")] == [  # not the log's lines
        f"iteris-daemon: error: source oops not scanned: its folder {published} overlaps the destination {published} "
        "of group 'g'; the daemon would register its own merges as adapters (`iteris-daemon sources remove oops`, "
        "or watch elsewhere)"]
    assert [a["source"] for a in json.loads(run(capsys, "adapters", "list", "--json", *cfg)[1])] == ["team"]
    health = {s["name"]: (s["healthy"], s["last_error"]) for s in json.loads(run(capsys, "sources", "list", "--json", *cfg)[1])}
    assert health["team"] == (True, None)
    assert health["oops"][0] is False and health["oops"][1].startswith(f"not started: its folder {published} overlaps")
    code, out, err = run(capsys, "sources", "scan", "oops", *cfg)
    assert code == 1 and out == "" and "iteris-daemon: error: source oops not scanned: its folder" in err
    # Without the config the destinations are unknown: scanned as before (the daemon refuses it).
    assert "oops: 1 registered" in run(capsys, "sources", "scan", "oops", *db)[1]


@pytest.mark.parametrize("folder,message", [
    ("published", "source oops: its folder {project}/published overlaps the destination {project}/published of "
                  "group 'g'; the daemon would register its own merges as adapters"),
    ("published/versions", "source oops: its folder {project}/published/versions overlaps the destination "
                           "{project}/published of group 'g'"),
    ("var", "source oops: its folder {project}/var holds the daemon's state folder {project}/var/state"),
    ("loras/one", "source oops: {project}/loras/one overlaps the folder {project}/loras that source 'team' watches; "
                  "one folder belongs to one source"),
    ("added", "source oops: {project}/added overlaps the folder {project}/added that source 'extra' watches; "
              "one folder belongs to one source"),
])
def test_sources_add_with_the_daemons_config_refuses_a_folder_the_daemon_refuses(made, tmp_path, capsys, monkeypatch,
                                                                               folder, message):
    """`sources add --config` took a folder the config refuses for its [[sources]], or the
    daemon refuses to start: a group's destination (or a folder in it), one holding the
    daemon's own folders, or one another source watches (in the config or the catalog)."""
    base, lora = made
    config = _publishing_project(made, tmp_path)
    shutil.copytree(lora, tmp_path / "added" / "two")
    cfg = ["--config", str(config)]
    monkeypatch.chdir(tmp_path)
    assert run(capsys, "sources", "add", "extra", "--folder", "added", "--base-model", str(base), *cfg)[0] == 0
    code, out, err = run(capsys, "sources", "add", "oops", "--folder", folder, "--base-model", str(base), *cfg)
    assert code == 2 and message.format(project=tmp_path) in err and err.count("\n") == 1, err
    assert [s["name"] for s in json.loads(run(capsys, "sources", "list", "--json", *cfg)[1])] == ["extra"]


def test_sources_add_with_the_daemons_config_refuses_a_name_it_declares(made, tmp_path, capsys, monkeypatch):
    """`sources add team --config` took another folder for the config's own source team,
    which the next scan or start put back (QA RV6): refused, as `sources remove` is."""
    base, lora = made
    config = _publishing_project(made, tmp_path)
    shutil.copytree(lora, tmp_path / "other" / "two")
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "sources", "add", "team", "--folder", "other", "--base-model", str(base),
                         "--config", str(config))
    assert code == 2 and err == (f"iteris-daemon: error: source team is declared in {config}: change it there and reload "
                                 "the daemon (SIGHUP); `sources add` would be undone at the daemon's next reload or "
                                 "start\n"), err
    assert not (tmp_path / "var").exists()  # refused before the catalog was opened: nothing written


def test_a_scan_refuses_a_config_whose_own_source_watches_a_destination(made, tmp_path, capsys, monkeypatch):
    """The daemon refuses a config whose [[sources]] watch a group's destination, but
    `sources scan --config` (which reads it without plugins) synced and scanned it, then
    told the user to `sources remove` a source the config declares (QA RV6): the config
    is refused in one line, nothing scanned or added."""
    config = _publishing_project(made, tmp_path)
    config.write_text(config.read_text().replace('paths = ["loras"]', 'paths = ["published"]'))
    monkeypatch.chdir(tmp_path)
    assert run(capsys, "db", "upgrade", "--config", str(config))[0] == 0
    code, out, err = run(capsys, "sources", "scan", "--config", str(config))
    assert code == 2 and err == (f"iteris-daemon: error: {config}: source team: its folder {tmp_path}/published overlaps "
                                 f"the destination {tmp_path}/published of group 'g'; the daemon refuses this config\n"), err
    assert json.loads(run(capsys, "sources", "list", "--json", "--config", str(config))[1]) == []


def test_sources_add_hints_the_scan_of_the_catalog_it_wrote(made, tmp_path, capsys, monkeypatch):
    """The hint `iteris-daemon sources scan NAME` left out the --config or --db given: run as
    printed, it opened the default catalog ("no catalog"). It repeats them, a password masked."""
    base, lora = made
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "default-state"))
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.delenv("ITERIS_DAEMON_DB", raising=False)
    shutil.copytree(lora, tmp_path / "extra" / "one")
    shutil.copytree(lora, tmp_path / "other" / "two")
    config = tmp_path / "daemon.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n')
    for name, options in (("extra", ["--config", str(config)]), ("other", ["--db", f"sqlite:///{tmp_path / 'x.db'}"])):
        code, out, _ = run(capsys, "sources", "add", name, "--folder", str(tmp_path / name), "--base-model", str(base),
                           *options)
        hint = out.split("`")[1]
        assert code == 0 and hint == shlex.join(["iteris-daemon", "sources", "scan", name, *options])
        code, out, _ = run(capsys, *shlex.split(hint)[1:])  # run as printed
        assert code == 0 and f"{name}: 1 registered" in out
    assert not (tmp_path / "default-state").exists()


def test_sources_add_hints_a_db_url_without_its_password(made, tmp_path, capsys):
    from databases import postgres_database

    base, lora = made
    shutil.copytree(lora, tmp_path / "extra" / "one")
    with postgres_database() as url:
        password = make_url(url).password
        code, out, err = run(capsys, "sources", "add", "extra", "--folder", str(tmp_path / "extra"), "--db", url)
        assert code == 0 and password and f":{password}@" not in out + err  # it may also be the user's name
        assert f"`iteris-daemon sources scan extra --db {shlex.quote(mask_password(url))}`" in out


def test_a_password_in_the_query_or_holding_an_at_sign_is_never_shown(capsys):
    """libpq takes the password as a query parameter too (``?password=``): it was shown in
    the daemon's start line, `db upgrade`'s output, every "cannot open" error and the
    unauthenticated /healthz reason. An unencoded '@' in the password split it: the part
    after it was shown as the host name, masked URL and psycopg's error alike (QA PG)."""
    from databases import postgres_database

    with postgres_database() as url:
        parsed = make_url(url)
        in_query = parsed.set(password=None).update_query_dict({"password": parsed.password})
        code, out, err = run(capsys, "db", "upgrade", "--db", in_query.render_as_string(hide_password=False))
        assert code == 0 and f"password={parsed.password}" not in out + err and "?password=***" in out, out + err
        wrong = in_query.update_query_dict({"password": "Wrong-Secret-42"}).render_as_string(hide_password=False)
        code, out, err = run(capsys, "status", "--db", wrong)
        assert code == 2 and "Wrong-Secret-42" not in out + err, err
    code, out, err = run(capsys, "status", "--db", "postgresql+psycopg://postgres:Top@Secret42@127.0.0.1:5432/x")
    assert code == 2 and "Secret42" not in out + err and "a '@' in the password is written %40" in err, err
    # A URL that does not parse (a port that is no number) is shown masked too (found in review)
    code, out, err = run(capsys, "status", "--db", "postgresql://u@db.example:54x2/iteris?sslpassword=K3y&password=S3cret")
    assert code == 2 and "S3cret" not in out + err and "K3y" not in out + err and "password=***" in err, err


def test_a_full_or_read_only_catalog_gets_one_line_from_commands_that_write(catalog_url, made, tmp_path, capsys,
                                                                           monkeypatch):
    """A SQLite catalog on a full disk (here its page limit reached), and a PostgreSQL server
    that takes no writes (a hot standby; here default_transaction_read_only): `sources add`,
    `sources remove` (and `merge-now`, `db prune`: the same session) ended in 55-100-line
    tracebacks, and the daemon's start in 70-220 (QA MIG). Now one line naming the catalog
    and the cause, exit 2; ``status`` still reads it. The daemon's jobs take it as a catalog
    failure, tried again later (``DATABASE_FAILURES``)."""
    import sqlite3

    from sqlalchemy import create_engine, text

    from iteris_daemon.catalog import db

    base, _ = made
    assert db.CatalogWriteRefused in db.DATABASE_FAILURES
    (tmp_path / "team").mkdir()
    assert run(capsys, "sources", "add", "team", "--folder", str(tmp_path / "team"), "--base-model", str(base),
               "--db", catalog_url)[0] == 0
    if catalog_url.startswith("sqlite"):
        with sqlite3.connect(make_url(catalog_url).database) as connection:
            connection.execute("VACUUM")  # no free pages left to write into
        pragmas = db._sqlite_pragmas

        def full(dbapi_connection, *args, **kwargs) -> None:
            pragmas(dbapi_connection, *args, **kwargs)
            pages = dbapi_connection.execute("PRAGMA page_count").fetchone()[0]
            dbapi_connection.execute(f"PRAGMA max_page_count={pages}")

        monkeypatch.setattr(db, "_sqlite_pragmas", full)
        said = "its disk is full (database or disk is full); nothing was written"
        folder = tmp_path.joinpath("other", *[chr(97 + i) * 250 for i in range(16)])  # a row bigger than the pages left
        folder.mkdir(parents=True)
    else:
        owner = create_engine(catalog_url, isolation_level="AUTOCOMMIT")
        with owner.connect() as connection:
            connection.execute(text(f'ALTER DATABASE "{make_url(catalog_url).database}" '
                                    "SET default_transaction_read_only = on"))
        owner.dispose()
        said = "in a read-only transaction: a hot standby, a demoted primary, or default_transaction_read_only)"
        folder = tmp_path / "other"
        folder.mkdir()
    writes = [["sources", "add", "other", "--folder", str(folder), "--base-model", str(base)]]
    if not catalog_url.startswith("sqlite"):  # a delete needs no new page
        writes.append(["sources", "remove", "team"])
    for command in writes:
        code, out, err = run(capsys, *command, "--db", catalog_url)
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, (command, err)
        assert said in err, (command, err)
    assert run(capsys, "status", "--db", catalog_url)[0] == 0


def test_a_read_only_database_user_gets_one_line_from_commands_that_write(made, tmp_path, capsys):
    """A PostgreSQL role with SELECT rights only (a dashboard's, an auditor's): `status` and
    the listings work; `sources add`, `merge-now` and the daemon ended in 70-260-line
    InsufficientPrivilege tracebacks (QA PG). Now one line, as a read-only SQLite file gets."""
    import uuid

    from sqlalchemy import create_engine, text

    from databases import postgres_database

    base, lora = made
    role = f"reader_{uuid.uuid4().hex[:8]}"
    with postgres_database() as url:
        assert run(capsys, "db", "upgrade", "--db", url)[0] == 0
        owner = create_engine(url, isolation_level="AUTOCOMMIT")
        with owner.connect() as connection:
            connection.execute(text(f"CREATE ROLE {role} LOGIN PASSWORD 'reader-pw'"))
            connection.execute(text(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}"))
        reader = make_url(url).set(username=role, password="reader-pw").render_as_string(hide_password=False)
        try:
            assert run(capsys, "status", "--db", reader)[0] == 0
            code, out, err = run(capsys, "sources", "add", "team", "--folder", str(tmp_path), "--base-model",
                                 str(base), "--db", reader)
            assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
            assert "cannot be written by this database user (permission denied for table sources)" in err, err
        finally:
            with owner.connect() as connection:
                connection.execute(text(f"DROP OWNED BY {role}"))
                connection.execute(text(f"DROP ROLE {role}"))
            owner.dispose()


@pytest.mark.parametrize("status,code", [(RunStatus.succeeded, 0), (RunStatus.skipped, 0), (RunStatus.failed, 1),
                                         (RunStatus.cancelled, 1), (RunStatus.refused, 3)])
def test_merge_now_wait_exit_status(tmp_path, capsys, monkeypatch, status, code):
    """A refused run published nothing: scripts must not read it as success."""
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    catalog = Catalog(url)
    with catalog.session() as session:
        session.add(MergeGroup(name="g", base_model="b", strategy="iteris"))
        session.add(DaemonPresence(holder="host:1:daemon", settings={}))  # a daemon runs on the catalog

    def daemon_finishes_a_run(_seconds):  # instead of waiting: the daemon's run, done
        with catalog.session() as session:
            group = session.scalar(select(MergeGroup))
            session.add(MergeRun(group_id=group.id, status=status, input_fingerprint="f", error="why"))

    monkeypatch.setattr(cli.daemon.time, "sleep", daemon_finishes_a_run)
    assert run(capsys, "merge-now", "g", "--wait", "5", "--db", url)[:2] == (code, f"requested a run of g; the running "
        f"daemon starts it within seconds\nrun 1: {status.value} (why)\n")
    catalog.close()


@pytest.mark.parametrize("decided,code", [(RunStatus.refused, 3), (RunStatus.succeeded, 0)])
def test_merge_now_wait_exits_3_for_a_run_skipped_on_a_refusal(tmp_path, capsys, monkeypatch, decided, code):
    """QA: a run skipped because its unchanged inputs were refused exited 0, and
    ``merge-now --wait && deploy`` went on with nothing published; skipped on inputs that
    were published, it exits 0 still."""
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    catalog = Catalog(url)
    with catalog.session() as session:
        group = MergeGroup(name="g", base_model="b", strategy="iteris")
        session.add(group)
        session.flush()
        session.add(MergeRun(group_id=group.id, status=decided, input_fingerprint="f"))
        session.add(MergeRun(group_id=group.id, status=RunStatus.failed, input_fingerprint="f", error="disk full"))
        session.add(DaemonPresence(holder="host:1:daemon", settings={}))

    def daemon_skips_the_run(_seconds):
        with catalog.session() as session:
            session.add(MergeRun(group_id=session.scalar(select(MergeGroup.id)), status=RunStatus.skipped,
                                 input_fingerprint="f", error="inputs unchanged"))

    monkeypatch.setattr(cli.daemon.time, "sleep", daemon_skips_the_run)
    assert run(capsys, "merge-now", "g", "--wait", "5", "--db", url)[:2] == (code, "requested a run of g; the running "
        "daemon starts it within seconds\nrun 3: skipped (inputs unchanged)\n")
    catalog.close()
    merge_now_help = next(p for p in _parsers(build_parser()) if p.prog == "iteris-daemon merge-now").format_help()
    assert "  0  requested; with --wait: the run succeeded, or was skipped (its inputs already published" in merge_now_help
    assert ("  3  with --wait: a publish gate refused the run, or it was skipped because a gate\n     refused these same "
            "inputs before") in merge_now_help  # --help says which skip exits which


def test_merge_now_says_when_no_daemon_uses_the_catalog(tmp_path, capsys, monkeypatch):
    """It said "the running daemon starts it within seconds" with no daemon running (a
    daemon removes its row from ``daemons`` as it stops)."""
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    catalog = Catalog(url)
    with catalog.session() as session:
        session.add(MergeGroup(name="g", base_model="b", strategy="iteris"))
    assert run(capsys, "merge-now", "g", "--db", url)[:2] == (
        0, "requested a run of g; no daemon is using this catalog now: the run starts when one starts\n")
    with catalog.session() as session:  # a daemon killed 3 hours ago left its row (rows go after a day)
        session.add(DaemonPresence(holder="host:1:daemon", settings={}, seen_at=datetime(2026, 12, 5, 9, 0)))
    monkeypatch.setattr("iteris_daemon.catalog.models.utcnow", lambda: datetime(2026, 12, 5, 12, 0))
    assert run(capsys, "merge-now", "g", "--db", url)[1] == ("requested a run of g; no daemon has been seen on this "
                                                            "catalog since 2026-12-05T09:00:00+00:00: the run starts when one runs\n")
    catalog.close()


def test_merge_now_refuses_a_group_the_config_no_longer_has(tmp_path, capsys):
    """A group renamed in the config stays in the catalog; `merge-now OLD --config` said
    "requested", and no daemon ever ran it. With --config the group must be the config's."""
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    catalog = Catalog(url)
    with catalog.session() as session:
        session.add(MergeGroup(name="old", base_model="b", strategy="iteris"))
    config = tmp_path / "daemon.toml"
    config.write_text(f"[daemon]\ndatabase = {json.dumps(url)}\n[[groups]]\nname = \"new\"\nbase_model = \"b\"\n"
                      "[[groups.destinations]]\nkind = \"folder\"\npath = \"/tmp/x\"\n")
    code, out, err = run(capsys, "merge-now", "old", "--config", str(config))
    assert (code, out) == (2, "") and err == f"iteris-daemon: error: no merge group named 'old' in {config} (its groups: new)\n"
    with catalog.session() as session:
        assert session.scalar(select(MergeGroup.requested_at).where(MergeGroup.name == "old")) is None
    catalog.close()


@pytest.mark.parametrize("forced", [False, True])
def test_merge_now_with_db_refuses_a_group_no_running_daemon_has(tmp_path, capsys, forced):
    """`merge-now OLD --db` for a group the running daemon's config dropped said "the running
    daemon starts it within seconds", and the request (forced, too) waited in the catalog: when
    the group came back, weeks later maybe, a forced run went past the gates at once (QA STAT).
    Daemons' rows now name their groups: refused, nothing requested, while none has it; a
    daemon that has it, or one of a version whose row names none, takes the request."""
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    catalog = Catalog(url)
    with catalog.session() as session:
        session.add(MergeGroup(name="old", base_model="b", strategy="iteris"))
        session.add(DaemonPresence(holder="host:1:daemon", settings={"limits": {}, "groups": ["new"]}))
    flags = ["--force"] if forced else []
    code, out, err = run(capsys, "merge-now", "old", "--db", url, *flags)
    assert (code, out) == (2, "") and err == (
        "iteris-daemon: error: group 'old' is in the catalog, but no running daemon has it in its config "
        "(host:1:daemon): add it back and reload the daemon; nothing was requested\n"), err
    with catalog.session() as session:
        group = session.scalar(select(MergeGroup).where(MergeGroup.name == "old"))
        assert group.requested_at is None and not group.force_requested
    for groups in (["new", "old"], None):
        with catalog.session() as session:
            row = session.get(DaemonPresence, "host:1:daemon")
            row.settings = {"limits": {}, **({"groups": groups} if groups is not None else {})}
        code, out, _ = run(capsys, "merge-now", "old", "--db", url, *flags)
        assert code == 0 and out.endswith("the running daemon starts it within seconds\n"), out
    catalog.close()


def test_status_with_the_config_details_only_its_groups(tmp_path, capsys):
    """A group dropped from the config (a SIGHUP reload) stays in the catalog with its runs;
    `status --config` listed it as if merged, with its last and next run, for ever."""
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    catalog = Catalog(url)
    with catalog.session() as session:
        for name in ("new", "old", "older"):
            session.add(MergeGroup(name=name, base_model="b", strategy="iteris"))
    catalog.close()
    config = tmp_path / "daemon.toml"
    config.write_text(f"[daemon]\ndatabase = {json.dumps(url)}\n[[groups]]\nname = \"new\"\nbase_model = \"b\"\n"
                      "[[groups.destinations]]\nkind = \"folder\"\npath = \"/tmp/x\"\n")
    code, out, _ = run(capsys, "status", "--config", str(config))
    assert code == 0 and "  new (iteris, base b)" in out and "  old (" not in out and "  older (" not in out
    assert "  not in the config, not merged (their runs stay in the catalog): old, older\n" in out
    report = json.loads(run(capsys, "status", "--json", "--config", str(config))[1])
    assert [g["name"] for g in report["groups"]] == ["new"] and report["not_configured"] == ["old", "older"]
    assert report["not_loaded"] == []
    code, out, _ = run(capsys, "status", "--db", url)  # no config: every group of the catalog, as it was
    assert code == 0 and all(f"  {name} (iteris" in out for name in ("new", "old", "older")) and "not in the" not in out

    # A group added to the config that no daemon has loaded yet was not shown at all, and
    # `merge-now` said the config had no such group.
    config.write_text(config.read_text() + '[[groups]]\nname = "added"\nbase_model = "b"\n'
                      '[[groups.destinations]]\nkind = "folder"\npath = "/tmp/y"\n')
    code, out, _ = run(capsys, "status", "--config", str(config))
    assert code == 0 and ("  in the config, not loaded by a daemon yet (start it, or send it SIGHUP after editing "
                          "the config): added\n") in out
    assert json.loads(run(capsys, "status", "--json", "--config", str(config))[1])["not_loaded"] == ["added"]
    code, _, err = run(capsys, "merge-now", "added", "--config", str(config))
    assert code == 2 and f"group 'added' is in {config}, but no daemon has loaded it yet" in err


def test_status_of_an_empty_catalog(tmp_path, capsys):
    """It listed a made-up source, "(none)  ok  last poll -"."""
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    Catalog(url).close()
    code, out, _ = run(capsys, "status", "--db", url)
    assert code == 0 and out == "sources:\n  (none)\ngroups:\n  (none)\ndaemons (seen in the last day):\n  (none)\n"


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    """It printed Python's KeyboardInterrupt traceback."""
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.catalog, "_sources_list", interrupted)
    assert main(["sources", "list"]) == 130
    assert capsys.readouterr().err == "iteris-daemon: interrupted\n"


@pytest.mark.parametrize("wait", ["-3", "0", "nan", "soon"])
def test_merge_now_wait_must_be_positive(capsys, wait):
    with pytest.raises(SystemExit) as exited:
        main(["merge-now", "g", "--wait", wait])
    assert exited.value.code == 2 and "argument --wait: expected a positive number of seconds" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["-v", "--log-format", "json", "plugins"], ["plugins", "-v", "--log-format", "json"],
                                  ["sources", "list", "--log-format", "json", "-v", "--db", "CATALOG"]])
def test_global_options_go_before_or_after_the_command(monkeypatch, capsys, tmp_path, argv):
    seen = []
    monkeypatch.setattr(cli, "setup_logging", lambda verbose, log_format: seen.append((verbose, log_format)))
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    Catalog(url).close()
    assert main([url if arg == "CATALOG" else arg for arg in argv]) == 0 and seen == [(True, "json")]
    main(["plugins"])
    assert seen[1] == (False, "auto")


@pytest.mark.parametrize("log_format", ["journal", "json", "text"])
def test_the_error_a_command_ends_on_is_in_the_log_format(tmp_path, capsys, log_format):
    """A bad config at `run` under the unit (journal format): the one line saying why the
    service died was printed plain, with no ``<3>``, so journald stored it at info and
    ``journalctl -p err`` did not show it; in JSON it was the one line that was no JSON (QA
    CLI2). It is a record in the chosen format now; for a person (text) the plain line."""
    config = tmp_path / "bad.toml"
    config.write_text("[daemon]\nbogus = 1\n")
    code, _, err = run(capsys, "--log-format", log_format, "run", "--config", str(config))
    last = err.splitlines()[-1]
    said = f"{config}: daemon.bogus: Extra inputs are not permitted"
    if log_format == "journal":
        assert last == f"<3>iteris_daemon.cli: {said}", err
    elif log_format == "json":
        record = json.loads(last)
        assert (record["level"], record["message"]) == ("ERROR", said), err
    else:
        assert last == f"iteris-daemon: error: {said}", err
    assert code == 2


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_argument_has_help():
    parsers = {parser.prog: parser for parser in _parsers(build_parser())}
    for parser in parsers.values():
        for action in parser._actions:
            assert action.help or isinstance(action, argparse._SubParsersAction), f"{parser.prog} {action.dest}: no help"
    assert parsers["iteris-daemon plugins"].description
    assert "`adapters list`" in parsers["iteris-daemon adapters show"].format_help()
    run_help = parsers["iteris-daemon run"].format_help()  # as the README's "Signals" says
    assert "SIGTERM at once" in run_help and "grace_seconds" in run_help and "then is cancelled" not in run_help


def test_the_listing_commands_say_what_they_show():
    """``status``, ``adapters list`` and ``sources list`` had no description, and the command
    list said ``status`` shows "sources, groups and waiting adapters" (not what is published,
    the quality nor the daemons)."""
    parsers = {parser.prog: parser for parser in _parsers(build_parser())}
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    one_line = next(c.help for c in commands._choices_actions if c.dest == "status")
    assert all(word in one_line for word in ("published", "quality", "daemons"))
    shown = {"status": ("last run", "skipped", "serves", "quality", "held back", "not merged", "daemons"),
             "adapters list": ("registered", "rejected", "removed", "revision", "updated_at"),
             "sources list": ("health", "enabled", "last scanned or polled")}
    for command, words in shown.items():
        description = parsers[f"iteris-daemon {command}"].description or ""
        assert all(word in description for word in words), (command, description)


def test_version(capsys):
    """``--version`` was "the following arguments are required: COMMAND"."""
    from iteris_daemon import __version__

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out == f"iteris-daemon {__version__}\n"


def test_a_tilde_the_shell_leaves_is_expanded_in_path_options(tmp_path, capsys, monkeypatch):
    """``--folder=~/loras`` (and a quoted ``'~/loras'``) reach the program with the ``~``:
    `sources add` said "no such directory", and the other path options took a folder
    named ``~``."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "loras").mkdir()
    db = ["--db", f"sqlite:///{tmp_path / 'catalog.db'}"]
    assert run(capsys, "sources", "add", "team", "--folder=~/loras", *db)[0] == 0
    assert json.loads(run(capsys, "sources", "list", "--json", *db)[1])[0]["settings"]["paths"] == [str(tmp_path / "loras")]
    args = build_parser().parse_args(["merge", "--base-model", "b", "--adapter=~/loras", "--out=~/merged"])
    assert args.adapter[0].path == tmp_path / "loras" and args.out == tmp_path / "merged"
    args = build_parser().parse_args(["status", "--config=~/daemon.toml"])
    assert args.config == tmp_path / "daemon.toml"
    # ~name of no user: a traceback (RuntimeError: Could not determine home directory); now as written
    code, _, err = run(capsys, "sources", "add", "x", "--folder", "~nosuchuser/loras", *db)
    assert code == 2 and err == "iteris-daemon: error: --folder ~nosuchuser/loras: no such directory\n"


def test_a_local_base_model_is_stored_as_an_absolute_path(tmp_path, capsys, monkeypatch):
    """`sources add --base-model ./base` stored "./base", which the daemon (a service runs in
    /) then could not find: every adapter of the source waited for ever."""
    (tmp_path / "watched").mkdir()
    (tmp_path / "base").mkdir()
    monkeypatch.chdir(tmp_path)
    db = ["--db", f"sqlite:///{tmp_path / 'catalog.db'}"]
    assert run(capsys, "sources", "add", "s", "--folder", "watched", "--base-model", "./base", *db)[0] == 0
    assert run(capsys, "sources", "add", "h", "--hub-repo", "acme/x", "--base-model", "acme/base", *db)[0] == 0
    code, out, _ = run(capsys, "sources", "list", "--json", *db)
    stored = {source["name"]: source["settings"] for source in json.loads(out)}
    assert stored["s"] == {"paths": [str(tmp_path / "watched")], "base_model": str(tmp_path / "base")}
    assert stored["h"]["base_model"] == "acme/base"


def test_run_opens_the_catalog_every_command_opens(tmp_path, capsys, monkeypatch):
    """With $ITERIS_DAEMON_DB exported, `run --config` used the config's catalog while `status
    --config` and `sources scan --config` used the variable's: the scan filled a catalog the
    daemon never read. Every command now takes --db, else $ITERIS_DAEMON_DB, else --config's."""
    named = tmp_path / "named.db"
    monkeypatch.setenv("ITERIS_DAEMON_DB", f"sqlite:///{named}")
    config, log = tmp_path / "daemon.toml", tmp_path / "daemon.log"
    config.write_text(f"[daemon]\nstate_dir = {json.dumps(str(tmp_path / 'state'))}\n"
                      f"cache_dir = {json.dumps(str(tmp_path / 'cache'))}\n")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "iteris_daemon", "--log-format", "text", "run", "--config",
                                 str(config)], stdout=out, stderr=subprocess.STDOUT,
                                env={k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"})
    try:
        wait_for(lambda: " running: " in log.read_text(), what="the daemon to start", proc=proc, timeout=120)
        wait_for(lambda: socket.gethostname() in run(capsys, "status", "--config", str(config))[1],
                 what="`status --config` to list the daemon", proc=proc, timeout=30)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert f"catalog sqlite:///{named} ready (named by $ITERIS_DAEMON_DB)" in log.read_text()
    assert not (tmp_path / "state" / "catalog.db").exists()


def test_an_empty_catalog_variable_is_unset_for_every_command(tmp_path, capsys, monkeypatch):
    """``ITERIS_DAEMON_DB=`` (empty): `run --config` used the config's catalog, `status
    --config` the default one ("no catalog at ~/.local/state/...") (QA MIX). Both take it
    as unset now: the config's catalog."""
    from iteris_daemon.cli.catalog import named_catalog

    monkeypatch.setenv("ITERIS_DAEMON_DB", "")
    config = tmp_path / "daemon.toml"
    config.write_text(f'[daemon]\ndatabase = "sqlite:///{tmp_path / "c.db"}"\n')
    assert run(capsys, "db", "upgrade", "--config", str(config))[0] == 0
    code, out, err = run(capsys, "status", "--config", str(config))
    assert code == 0 and "daemons (seen in the last day)" in out, err
    assert named_catalog(build_parser().parse_args(["run", "--config", str(config)])) is None


def test_relative_paths_in_the_config_are_taken_from_its_folder(made, tmp_path, capsys, monkeypatch):
    """They were taken from the working directory of whoever read the config: the daemon
    (in `/` under systemd) and an admin's `sources scan --config` from another folder had
    two catalogs, and the scan stored another folder for the source. A Hub id stays one."""
    from iteris_daemon.config import load_config

    base, lora = made
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    shutil.copytree(lora, project / "loras" / "one")
    shutil.copytree(base, project / "base")
    elsewhere.mkdir()
    (project / "cal.jsonl").write_text('{"text": "a"}\n')
    (project / "secret").write_text("s3cret\n")
    (project / "secret").chmod(0o600)
    for token in ("token", "hub-token"):  # token files must exist when the config loads
        (project / token).write_text("hf_x\n")
        (project / token).chmod(0o600)
    config = project / "daemon.toml"
    config.write_text("""
[daemon]
state_dir = "state"
cache_dir = "./cache"
trust_remote_code = ["base", "org/remote"]
webhooks = { listen = "127.0.0.1:0", secret_file = "secret" }
[[sources]]
name = "team"
kind = "local"
paths = ["loras"]
base_model = "./base"
[[sources]]
name = "hub"
kind = "hub"
repos = ["org/lora"]
base_model = "org/minilm"
token_file = "token"
[[groups]]
name = "g"
base_model = "base"
calibration = { order = ["files", "hub_dataset"], files = { one = "cal.jsonl" }, hub_dataset = { repo_id = "org/data", cache_dir = "hub-cache" } }
destinations = [{ kind = "folder", path = "out" }, { kind = "hub", repo_id = "org/merged", token_file = "hub-token" }]
[[groups]]
name = "h"
base_model = "org/minilm"
destinations = [{ kind = "folder", path = "/srv/out" }]
""")
    monkeypatch.chdir(elsewhere)
    loaded = load_config(Path("..") / "project" / "daemon.toml")
    settings = loaded.daemon
    assert (settings.state_dir, settings.cache_dir, settings.webhooks.secret_file) == (
        project / "state", project / "cache", project / "secret")
    assert settings.trust_remote_code == [str(project / "base"), "org/remote"]
    assert loaded.sources[0].settings() == {"paths": [str(project / "loras")], "base_model": str(project / "base")}
    assert loaded.sources[1].settings()["base_model"] == "org/minilm"
    assert loaded.sources[1].settings()["token_file"] == str(project / "token")
    [group, hub_group] = loaded.groups
    assert (group.base_model, hub_group.base_model) == (str(project / "base"), "org/minilm")
    assert group.calibration.files == {"one": project / "cal.jsonl"}
    assert group.calibration.source_settings()["hub_dataset"]["cache_dir"] == str(project / "hub-cache")
    assert [d.get("path") or d["token_file"] for d in group.destinations] == [str(project / "out"),
                                                                             str(project / "hub-token")]
    assert hub_group.destinations[0]["path"] == "/srv/out"

    db = f"sqlite:///{project / 'state' / 'catalog.db'}"
    assert run(capsys, "db", "upgrade", "--config", str(config))[1].startswith(f"catalog {db} ")
    code, out, _ = run(capsys, "sources", "scan", "--config", str(config), "team")
    assert code == 0 and "1 registered" in out and list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("argv", [["status"], ["adapters", "list"], ["sources", "list"], ["merge-now", "g"]])
def test_commands_that_read_the_catalog_leave_an_empty_sqlite_file_alone(tmp_path, capsys, argv):
    """A zero-byte file (SQLite's empty database) was migrated by `adapters list` into a
    catalog readable by all (0644), beside a stray .migrate-lock: refused as no catalog."""
    empty = tmp_path / "catalog.db"
    empty.touch(mode=0o644)
    code, out, err = run(capsys, *argv, "--db", f"sqlite:///{empty}")
    assert code == 2 and err == (f"iteris-daemon: error: no catalog at {empty} (the daemon, `sources add` or `db "
                                 "upgrade` creates one; --db, $ITERIS_DAEMON_DB or --config names it)\n"), err
    assert {p.name for p in tmp_path.iterdir()} - {"default-cache"} == {"catalog.db"}  # no -wal, no lock
    assert empty.stat().st_size == 0


def test_commands_that_read_the_catalog_leave_an_empty_server_database_alone(capsys):
    """`status --db` on an empty PostgreSQL database created every table of the catalog there."""
    from sqlalchemy import create_engine, inspect

    from databases import postgres_database

    with postgres_database() as url:
        for argv in (["status"], ["adapters", "list"], ["sources", "list"]):
            code, out, err = run(capsys, *argv, "--db", url)
            assert code == 2 and "is an empty database, not a catalog (the daemon, `sources add` or `db upgrade` " \
                "creates one" in err and err.count("\n") == 1, err
        engine = create_engine(url)
        assert inspect(engine).get_table_names() == []
        engine.dispose()
        assert run(capsys, "db", "upgrade", "--db", url)[0] == 0


@pytest.mark.parametrize("folder", ["q?mode=ro", "pct%41x", "hash#1", "at@host"])
def test_a_state_folder_with_url_characters_holds_the_catalog(tmp_path, capsys, monkeypatch, folder):
    """The catalog's URL was ``sqlite:///`` and the path, unescaped: a state folder named
    ``q?mode=ro`` put the catalog in ``q``, one named ``pct%41x`` in ``pctAx``."""
    from sqlalchemy.engine import make_url

    from iteris_daemon.catalog.db import default_url
    from iteris_daemon.config import DaemonSettings

    state = tmp_path / folder / "state"
    assert make_url(DaemonSettings(state_dir=state).catalog_url()).database == str(state / "catalog.db")
    monkeypatch.setenv("STATE_DIRECTORY", str(state))
    assert make_url(default_url()).database == str(state / "catalog.db")
    config = tmp_path / "daemon.toml"
    config.write_text(f"[daemon]\nstate_dir = {json.dumps(str(state))}\n")
    monkeypatch.delenv("ITERIS_DAEMON_DB", raising=False)
    assert run(capsys, "db", "upgrade", "--config", str(config))[0] == 0
    assert (state / "catalog.db").stat().st_size > 0
    assert {p.name for p in tmp_path.iterdir()} - {"default-cache"} == {folder, "daemon.toml"}


def test_a_catalog_on_a_read_only_file_system_can_be_read(made, tmp_path, capsys):
    """A catalog on a read-only mount (a backup, a snapshot): `status`, `adapters list|show`
    and `sources list` failed with "cannot open the catalog ... for writing". They read it
    (SQLite cannot make a -shm there: immutable, as there is no -wal); a command that
    writes says it cannot, in one line, and nothing is written."""
    from mounts import tmpfs

    base, lora = made
    shutil.copytree(lora, tmp_path / "watched" / "one")
    with tmpfs(tmp_path / "mount", 8 << 20) as mount:
        db = ["--db", f"sqlite:///{mount / 'catalog.db'}"]
        assert run(capsys, "sources", "add", "team", "--folder", str(tmp_path / "watched"), "--base-model", str(base),
                   *db)[0] == 0
        assert "1 registered" in run(capsys, "sources", "scan", *db)[1]
        gc.collect()  # the commands' catalogs, closed: the -wal and -shm go, as a stopped daemon leaves them
        before = sorted(p.name for p in mount.iterdir())
        assert before == ["catalog.db", "catalog.db.migrate-lock"]
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        code, out, err = run(capsys, "adapters", "list", "--json", *db)
        assert code == 0 and [a["name"] for a in json.loads(out)] == ["one"], err
        [adapter] = json.loads(out)
        assert run(capsys, "adapters", "show", str(adapter["id"]), *db)[0] == 0
        code, out, err = run(capsys, "sources", "list", *db)
        assert code == 0 and out.startswith("team "), err
        code, out, err = run(capsys, "status", *db)
        assert code == 0 and "team" in out, err
        code, out, err = run(capsys, "sources", "remove", "team", *db)
        assert code == 2 and err == (f"iteris-daemon: error: the catalog sqlite:///{mount / 'catalog.db'} cannot be "
                                     "written here (a read-only file system, or another user's): nothing was "
                                     "written\n"), err
        assert sorted(p.name for p in mount.iterdir()) == before


def test_only_commands_that_create_the_catalog_warn_of_its_open_folder(tmp_path, capsys):
    """A catalog in a folder others can read: the commands that create it say so (the daemon's
    state belongs in a private folder), but each command that only reads it said it again, at
    every `status` (QA NU)."""
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    db = ["--db", f"sqlite:///{shared / 'catalog.db'}"]
    code, _, err = run(capsys, "db", "upgrade", *db)
    assert code == 0 and f"{shared} is open to other users (mode 755)" in err
    for command in (["sources", "list"], ["adapters", "list"], ["status"]):
        code, _, err = run(capsys, *command, *db)
        assert code == 0 and "open to other users" not in err, (command, err)
