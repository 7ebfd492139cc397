"""``iteris-daemon db|sources|adapters`` end to end on a real SQLite file."""

from __future__ import annotations

import json
import shutil

import pytest

from builders import build_adapter, build_tiny_model
from iteris_daemon.cli import main


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-src")
    base = build_tiny_model("bert", root / "base")
    return base, build_adapter(base, root / "lora", seed=0, family="bert")


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

    rows = {r["name"]: r for r in json.loads(run(capsys, "adapters", "list", "--json", *db)[1])}
    assert rows["good"]["status"] == "registered" and rows["good"]["rank"] == 4
    assert rows["bad"]["status"] == "rejected" and "r must be a positive number" in rows["bad"]["reason"]
    only = json.loads(run(capsys, "adapters", "list", "--json", "--status", "rejected", *db)[1])
    assert [r["name"] for r in only] == ["bad"]
    shown = json.loads(run(capsys, "adapters", "show", str(rows["good"]["id"]), "--json", *db)[1])
    assert shown["revisions"][0]["target_modules"] == ["dense", "query", "value"]
    table = run(capsys, "adapters", "list", *db)[1]
    assert "registered" in table and "rejected" in table

    assert run(capsys, "sources", "remove", "team", *db)[0] == 0
    assert run(capsys, "adapters", "list", "--json", *db)[1].strip() == "[]"


@pytest.mark.parametrize("argv,message", [
    (["sources", "add", "x", "--folder", "/no/such/dir"], "--folder /no/such/dir: no such directory"),
    (["sources", "add", "x", "--hub-repo", "not a repo"], "is not a repo id"),
    (["sources", "add", "x", "--hub-author", "acme", "--interval", "-5"], "interval_seconds: Input should be greater than 0"),
    (["sources", "remove", "ghost"], "no source named 'ghost'"),
    (["adapters", "show", "42"], "no adapter with id 42"),
    (["adapters", "list", "--db", "nosuchdialect://x"], "cannot use database URL"),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, argv, message):
    db = [] if "--db" in argv else ["--db", f"sqlite:///{tmp_path / 'catalog.db'}"]
    code, out, err = run(capsys, *argv, *db)
    assert code == 2 and message in err and err.count("\n") == 1
