"""``iteris-daemon compare``: several strategies on the same adapters, each scored on held-out
calibration samples. The figures are checked against plain ``transformers`` models with the
weights written in by hand (no PEFT, none of the engine), on the held-out texts the report
names, for merges made by ``iteris-daemon merge`` from the other samples only."""

from __future__ import annotations

import json
import shutil
import math

import pytest
import torch
from transformers import AutoModel

from builders import apply_by_hand, cli_merge, tokenizer
import iteris_daemon.compare as compare
from iteris_daemon.calibration import read_jsonl
from iteris_daemon.cli import main
from iteris_daemon.lora import load_adapter
from registered import registered
from group_runs import Setup

CONTENDERS = {  # label: (strategy, --param values for `merge`)
    "iteris": ("iteris", []),
    "task_arithmetic": ("task_arithmetic", []),
    "knots:alpha=0.5:density=0.5": ("knots", ["alpha=0.5", "density=0.5"]),
}


def _compare(base_dir, adapters, *extra) -> int:
    args = ["compare", "--base-model", str(base_dir), "-q"]
    for adapter in adapters:
        args += ["--adapter", str(adapter)]
    return main([*args, *extra])


def _gap_by_hand(base_dir, adapter_dir, merged_dir, texts: list[str]) -> float:
    """sqrt(sum ||y_merged - y_task||^2 / sum ||y_base - y_task||^2) of the last hidden states,
    one text at a time (no padding)."""
    tok = tokenizer()
    base = AutoModel.from_pretrained(base_dir).eval()
    own = apply_by_hand(AutoModel.from_pretrained(base_dir), adapter_dir).eval()
    merged = apply_by_hand(AutoModel.from_pretrained(base_dir), merged_dir).eval()
    num = den = 0.0
    with torch.no_grad():
        for text in texts:
            ids = tok(text, return_tensors="pt")
            want = own(**ids)[0].double()
            num += float((merged(**ids)[0].double() - want).pow(2).sum())
            den += float((base(**ids)[0].double() - want).pow(2).sum())
    return math.sqrt(num / den)


def test_each_strategy_is_scored_on_samples_it_did_not_merge_from(tiny, tmp_path, capsys):
    base_dir, adapter_dirs = tiny["bert"]
    specs = [arg for label in CONTENDERS for arg in ("--strategy", label)]
    assert _compare(base_dir, adapter_dirs, *specs, "--json", str(tmp_path / "c.json")) == 0
    table = capsys.readouterr().out
    report = json.loads((tmp_path / "c.json").read_text())
    rows = {row["strategy"]: row for row in report["strategies"]}
    assert set(rows) == set(CONTENDERS)
    means = [row["mean_fidelity_gap"] for row in report["strategies"]]
    assert means == sorted(means)  # best first, in the table too
    assert [line.split()[0] for line in table.splitlines()[2:]] == [row["strategy"] for row in report["strategies"]]

    names = [load_adapter(d).name for d in adapter_dirs]
    kept_files, held = [], []
    for k, (adapter_dir, task) in enumerate(zip(adapter_dirs, report["tasks"])):
        samples = [s.text for s in read_jsonl(adapter_dir / "calibration.jsonl").samples]
        held_out = task["held_out"]
        assert task["name"] == names[k] and len(held_out) == round(0.2 * len(samples)) == 2
        assert set(held_out) <= set(samples) and task["merged_from"] == len(samples) - 2
        kept = [s for s in samples if s not in held_out]
        kept_files.append(tmp_path / f"kept-{k}.jsonl")
        kept_files[-1].write_text("".join(json.dumps({"text": s}) + "\n" for s in kept))
        held.append(held_out)

    for label, (strategy, params) in CONTENDERS.items():
        out = tmp_path / strategy
        extra = ["--strategy", strategy, *[arg for p in params for arg in ("--param", p)]]
        assert cli_merge(base_dir, [f"{d}={f}" for d, f in zip(adapter_dirs, kept_files)], out, *extra) == 0
        row = rows[label]
        for k, (name, adapter_dir) in enumerate(zip(names, adapter_dirs)):
            want = _gap_by_hand(base_dir, adapter_dir, out, held[k])
            assert row["tasks"][name]["fidelity_gap"] == pytest.approx(want, rel=1e-3), (label, name)
        gaps = {name: row["tasks"][name]["fidelity_gap"] for name in names}
        assert row["mean_fidelity_gap"] == pytest.approx(sum(gaps.values()) / len(gaps))
        assert row["worst_fidelity_gap"] == max(gaps.values()) and gaps[row["worst_task"]] == max(gaps.values())


def test_a_strategy_that_cannot_merge_is_listed_with_its_error(tiny, capsys):
    base_dir, adapter_dirs = tiny["bert"]
    failing = "peft_svd:svd_rank=1000"  # more than the layers hold: refused when the merge starts
    assert _compare(base_dir, adapter_dirs, "--strategy", failing, "--strategy", "ties") == 0
    table = capsys.readouterr().out.splitlines()
    assert table[2].split()[0] == "ties"
    assert table[3].startswith(f"{failing}  error: svd_rank 1000 is more than layer ")
    assert _compare(base_dir, adapter_dirs, "--strategy", failing) == 1  # none could merge


def test_per_adapter_values_of_another_count_are_refused_before_anything_runs(tiny, capsys, monkeypatch):
    """One weight for three adapters was an error row after the base model loaded and the other
    contenders merged (the README says every spec is checked first): now one line, exit 2."""
    import iteris_daemon.merge as merge

    base_dir, adapter_dirs = tiny["bert"]
    monkeypatch.setattr(merge, "load_base", lambda *args: pytest.fail("the base model was loaded"))
    assert _compare(base_dir, adapter_dirs, "--strategy", "ties", "--strategy", "iteris:task_weights=[1]") == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "iteris-daemon: error: strategy 'iteris': task_weights has 1 entry for 3 adapters")


def test_a_strategy_that_crashes_does_not_lose_the_other_rows(tiny, monkeypatch, capsys):
    import iteris_daemon.compare as compare
    from iteris_daemon.plugin_manager import get_strategy

    class Broken:
        name, description, needs_calibration = "broken", "raises", False
        Params = get_strategy("ties").Params

        def merge(self, inputs, params, progress):
            raise RuntimeError("a bug in a plugin")

    monkeypatch.setattr(compare, "get_strategy", lambda name: Broken() if name == "broken" else get_strategy(name))
    base_dir, adapter_dirs = tiny["bert"]
    assert _compare(base_dir, adapter_dirs, "--strategy", "broken", "--strategy", "ties") == 0
    captured = capsys.readouterr()
    table = captured.out.splitlines()
    assert table[2].split()[0] == "ties"
    assert table[3].split(None, 1) == ["broken", "error: strategy broken failed: RuntimeError: a bug in a plugin"]
    assert "Traceback" not in captured.err  # one line, as `merge` says it; -v shows the traceback
    assert _compare(base_dir, adapter_dirs, "--strategy", "broken", "--strategy", "ties", "-v") == 0
    assert "Traceback" in capsys.readouterr().err


def test_ctrl_c_keeps_the_rows_finished_before_it(tiny, monkeypatch, capsys, tmp_path):
    """Ctrl-C during the second strategy of an hour-long comparison printed only
    "interrupted", exit 130, the finished rows lost (QA CLI). The table and --json keep them
    and say where it stopped; Ctrl-C during the first is the plain "interrupted". The Ctrl-C
    is a stand-in strategy raising KeyboardInterrupt, as Python's SIGINT handler does."""
    import iteris_daemon.compare as compare
    from iteris_daemon.plugin_manager import get_strategy

    class Interrupted:
        name, description, needs_calibration = "interrupted", "Ctrl-C meanwhile", False
        Params = get_strategy("ties").Params

        def merge(self, inputs, params, progress):
            raise KeyboardInterrupt

    monkeypatch.setattr(compare, "get_strategy", lambda name: Interrupted() if name == "interrupted" else get_strategy(name))
    base_dir, adapter_dirs = tiny["bert"]
    report = tmp_path / "report.json"
    code = _compare(base_dir, adapter_dirs, "--strategy", "ties", "--strategy", "interrupted", "--strategy",
                    "task_arithmetic", "--json", str(report))
    captured = capsys.readouterr()
    assert code == 130 and captured.out.splitlines()[2].split()[0] == "ties", captured.out
    assert captured.err.splitlines()[-1] == ("iteris-daemon: interrupted while merging with interrupted: the table holds "
                                             "the strategies finished before it; not run: task_arithmetic")
    saved = json.loads(report.read_text())
    assert [row["strategy"] for row in saved["strategies"]] == ["ties"]
    assert saved["interrupted"] == {"at": "interrupted", "not_run": ["task_arithmetic"]}
    assert _compare(base_dir, adapter_dirs, "--strategy", "interrupted", "--strategy", "ties") == 130
    assert capsys.readouterr().err.splitlines()[-1] == "iteris-daemon: interrupted"


@pytest.mark.parametrize("extra, message", [
    (["--strategy", "nope"], "unknown strategy 'nope'; available: "),
    (["--strategy", "knots:bogus=1"], "strategy 'knots': bogus: Extra inputs are not permitted"),
    (["--strategy", "knots:"], "strategy 'knots:': expected NAME:KEY=VALUE"),
    (["--strategy", "ties:density=0.3:density=0.5"], "strategy 'ties:density=0.3:density=0.5': density is given twice"),
    (["--strategy", "ties:density=2"], "strategy 'ties': density: "),
    (["--strategy", "ties:density=.5"], "density=.5: not a JSON value (write 0.5)"),  # was "a valid number"
    (["--holdout", "1"], "holdout must be between 0 and 1 (exclusive), got 1.0"),
    (["--strategy", "ties", "--strategy", "ties:density=0.2"], "strategy 'ties:density=0.2' merges what 'ties' does"),
])
def test_bad_requests_are_refused_before_the_model_loads(tiny, tmp_path, capsys, extra, message):
    base_dir, adapter_dirs = tiny["bert"]
    assert _compare(tmp_path / "no-model-here", adapter_dirs, *extra) == 2
    assert message in capsys.readouterr().err


def test_a_json_path_that_would_overwrite_an_input_or_cannot_be_written_is_refused_first(tiny, tmp_path, capsys):
    """``--json`` on an adapter's config replaced it with the comparison (exit 0); under a
    missing folder it was a traceback after every merge had run, the table unprinted."""
    base_dir, adapter_dirs = tiny["bert"]
    config = adapter_dirs[0] / "adapter_config.json"
    before = config.read_bytes()
    for path, says in ((config, f"it would overwrite or write into {adapter_dirs[0]}, which the comparison reads"),
                       (adapter_dirs[0].parent, f"it would overwrite or write into {adapter_dirs[0]}, which the "
                                                "comparison reads"),
                       (tmp_path / "nowhere" / "x.json", f"{tmp_path / 'nowhere'} is not a folder this user can write in")):
        assert _compare(tmp_path / "no-model-here", adapter_dirs, "--json", str(path)) == 2
        assert capsys.readouterr().err.strip().endswith(f"--json {path}: {says}")
    assert config.read_bytes() == before


def test_the_default_contenders_leave_out_a_strategy_with_a_required_parameter(caplog):
    """``compare`` without ``--strategy`` takes every strategy `plugins` lists: one plugin
    strategy with a required parameter refused the whole comparison (exit 2)."""
    from iteris_daemon.compare import _runnable
    from iteris_daemon.plugin_manager import strategies
    from iteris_daemon.strategy import StrategyParams

    class NeedsW:
        name, description, needs_calibration = "needs_w", "a test plugin", False

        class Params(StrategyParams):
            w: float

        def merge(self, inputs, params, progress):
            raise AssertionError("never called")

    with registered("register_strategies", NeedsW()):
        every, runnable = list(strategies()), _runnable()
    assert "needs_w" in every and runnable == [name for name in every if name != "needs_w"]
    assert any("strategy needs_w left out" in r.getMessage() and "--strategy needs_w:KEY=VALUE" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("then", ["returns", "raises", "scales", "reorders"])
def test_a_strategy_that_edits_its_inputs_does_not_change_the_next_contenders_scores(tiny, tmp_path, capsys, then):
    """``compare`` hands every contender the same adapters: a plugin that scaled one in place
    (DARE's drop done on the inputs) was scored, and every later contender merged and was
    compared with the edited adapter. ``merge`` refused it; ``compare`` now does too, and
    reads the adapters again for the contenders after it. A change that touches no tensor (a
    layer's ``scaling``, the adapters' order) went unseen."""
    from iteris_daemon.strategy import MergedAdapter, StrategyParams

    class EditsInputs:
        name, description, needs_calibration = "edits_inputs", "a test plugin", False
        Params = StrategyParams

        def merge(self, inputs, params, progress):
            for module in inputs.adapters[0].modules.values():
                if then == "scales":
                    module.scaling *= 3.0
                elif then != "reorders":
                    module.B.mul_(3.0)
            if then == "reorders":
                inputs.adapters.reverse()
            if then == "raises":  # the edit must be seen on the failure's way out too
                raise ValueError("a bug after the edit")
            return MergedAdapter({path: (m.B, m.A) for path, m in inputs.adapters[0].modules.items()})

    base_dir, adapter_dirs = tiny["bert"]

    def rows(*labels: str) -> dict[str, dict]:
        out = tmp_path / f"{len(labels)}.json"
        assert _compare(base_dir, adapter_dirs, *[a for label in labels for a in ("--strategy", label)],
                        "--json", str(out)) == 0
        return {row["strategy"]: row for row in json.loads(out.read_text())["strategies"]}

    alone = rows("task_arithmetic")
    with registered("register_strategies", EditsInputs()):
        after = rows("edits_inputs", "task_arithmetic")
    assert after["edits_inputs"]["error"].startswith("strategy edits_inputs changed its input")
    assert after["task_arithmetic"] == alone["task_arithmetic"] | {"merge_seconds": after["task_arithmetic"]["merge_seconds"]}
    capsys.readouterr()


def test_a_task_with_one_calibration_sample_cannot_hold_one_out(tiny, tmp_path, capsys):
    base_dir, adapter_dirs = tiny["bert"]
    single = tmp_path / "one.jsonl"
    single.write_text('{"text": "only one sample"}\n')
    assert _compare(base_dir, [f"{adapter_dirs[0]}={single}", adapter_dirs[1]]) == 2
    err = capsys.readouterr().err
    assert "holdout needs at least 2 calibration samples, got 1" in err and str(single) in err


def test_compare_reads_no_further_than_its_max_samples(tiny, tmp_path, capsys):
    """A training set given as calibration was read whole (20% of it scored per strategy); a
    fault past the samples a merge reads failed the comparison. ``--max-samples 12`` reads
    the first 12 lines of each file; 0 reads all, and meets the fault."""
    base_dir, adapter_dirs = tiny["bert"]
    long = tmp_path / "long.jsonl"
    long.write_bytes((adapter_dirs[0] / "calibration.jsonl").read_bytes() + b"not json\n")
    out = tmp_path / "compare.json"
    inputs = [f"{adapter_dirs[0]}={long}", adapter_dirs[1]]
    assert _compare(base_dir, inputs, "--strategy", "task_arithmetic", "--max-samples", "12", "--json", str(out)) == 0
    task = json.loads(out.read_text())["tasks"][0]
    assert len(task["held_out"]) + task["merged_from"] == 12
    assert _compare(base_dir, inputs, "--strategy", "task_arithmetic", "--max-samples", "0") == 2
    assert "long.jsonl:13: not valid JSON" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_one_adapter_is_its_own_merge_in_every_family(tiny, tmp_path, family):
    """With one adapter, task arithmetic and IterIS return that adapter exactly, so both score
    a fidelity gap of 0 on its held-out samples; the adapter at half strength (its parameter
    reaches the merge) is neither the adapter nor further from it than the base model."""
    base_dir, adapter_dirs = tiny[family]
    out = tmp_path / "c.json"
    assert _compare(base_dir, adapter_dirs[:1], "--strategy", "task_arithmetic", "--strategy", "iteris",
                    "--strategy", "task_arithmetic:scale=0.5", "--json", str(out)) == 0
    rows = {row["strategy"]: row for row in json.loads(out.read_text())["strategies"]}
    assert rows["task_arithmetic"]["mean_fidelity_gap"] == pytest.approx(0.0, abs=1e-5)
    assert rows["iteris"]["mean_fidelity_gap"] == pytest.approx(0.0, abs=1e-4)
    assert 0.05 < rows["task_arithmetic:scale=0.5"]["mean_fidelity_gap"] < 1


@pytest.mark.parametrize("folders", ["named apart", "sharing a name"])
def test_the_held_out_samples_of_a_task_do_not_depend_on_the_order_of_the_adapters(tiny, tmp_path, folders):
    """One random draw served every task in turn, so the order of ``--adapter`` flags (and the
    other tasks) chose which of a task's samples were held out, and the figures of one merge
    changed with it. Each task now draws its own, seeded by ``--seed`` and its name. Folders
    that share a name (run1/adapter, run2/adapter) were named by their place (adapter#0),
    and so drew by it: now by their parent folder's name."""
    base, adapters = tiny["bert"]
    if folders == "sharing a name":
        adapters = [shutil.copytree(a, tmp_path / f"run{i}" / "adapter") for i, a in enumerate(adapters[:2])]
    tasks = {}
    for order in (adapters[:2], adapters[1::-1]):
        out = tmp_path / f"{order[0].parent.name}-{order[0].name}.json"
        assert _compare(base, order, "--strategy", "task_arithmetic", "--json", str(out)) == 0
        report = json.loads(out.read_text())
        tasks[out.name] = ({t["name"]: t["held_out"] for t in report["tasks"]},
                                report["strategies"][0]["tasks"])
    (held, figures), (held_reversed, figures_reversed) = tasks.values()
    assert held == held_reversed
    if folders == "sharing a name":
        assert sorted(held) == ["run0/adapter", "run1/adapter"]
    for task, values in figures.items():
        assert figures_reversed[task] == pytest.approx(values, rel=1e-6), task


def _group_config(tmp_path, base, setting: str, *names: str):
    """A daemon config whose task_arithmetic group ``unified`` selects ``names`` (and ``setting``)."""
    config = tmp_path / "daemon.toml"
    config.write_text(f"""
[daemon]
database = "sqlite:///{tmp_path / 'catalog.db'}"
[[groups]]
name = "unified"
base_model = "{base}"
strategy = "task_arithmetic"
{setting}
select = {{names = {json.dumps(list(names))}}}
[[groups.destinations]]
kind = "folder"
path = "{tmp_path / 'published'}"
""")
    return config


def test_a_daemon_group_is_compared_at_its_own_dtype(tiny, tmp_path, capsys, monkeypatch):
    """``compare --group`` merged and scored a bfloat16 group in float32 (twice the memory its
    base needs, at another precision), with nothing saying so (QA DT). It takes the group's
    ``dtype`` (and ``offload``, ``modules_to_save_rule``) now, says the dtype in its report,
    and refuses a command-line value that differs from the group's."""
    base, adapters = tiny["bert"]
    setup = Setup(tmp_path, base, adapters)
    setup.catalog.close()
    config = _group_config(tmp_path, base, 'dtype = "bfloat16"', adapters[0].name, adapters[1].name)
    monkeypatch.setattr(compare, "_runnable", lambda: [])
    assert main(["compare", "-q", "--group", "unified", "--config", str(config), "--json", str(tmp_path / "g.json")]) == 0
    by_group = json.loads((tmp_path / "g.json").read_text())
    watched = [tmp_path / "watched" / adapters[i].name for i in (0, 1)]
    figures = {}
    for dtype in ("float32", "bfloat16"):
        assert _compare(base, watched, "--strategy", "task_arithmetic", "--dtype", dtype,
                        "--json", str(tmp_path / f"{dtype}.json")) == 0
        figures[dtype] = json.loads((tmp_path / f"{dtype}.json").read_text())["strategies"][0]["tasks"]
    (row,) = by_group["strategies"]
    assert by_group["dtype"] == "bfloat16" and row["tasks"] == figures["bfloat16"] != figures["float32"]
    capsys.readouterr()
    for given in ("float16", "float32"):  # float32 given explicitly too, though the option's default (RV14)
        assert main(["compare", "-q", "--group", "unified", "--config", str(config), "--dtype", given]) == 2
        assert (f"--dtype {given}: --group compares at the group's dtype (bfloat16), as the daemon merges it; drop "
                "--dtype" in capsys.readouterr().err)


def test_a_daemon_group_is_compared_on_the_inputs_it_would_merge(tiny, tmp_path, capsys, monkeypatch):
    """``--group``: the adapters the group selects from the catalog (here two of three), with
    their calibration, and the group's own strategy first: the same figures as the same
    folders and specs given by hand."""
    base, adapters = tiny["bert"]
    setup = Setup(tmp_path, base, adapters)  # a catalog whose folder source registered the three adapters
    setup.catalog.close()
    config = _group_config(tmp_path, base, "params = {scale = 0.5}", adapters[0].name, adapters[2].name)
    assert main(["compare", "-q", "--group", "unified", "--config", str(config), "--strategy", "ties",
                 "--json", str(tmp_path / "group.json")]) == 0
    by_group = json.loads((tmp_path / "group.json").read_text())
    assert [t["name"] for t in by_group["tasks"]] == [adapters[0].name, adapters[2].name]
    watched = [tmp_path / "watched" / adapters[i].name for i in (0, 2)]
    assert _compare(base, watched, "--strategy", "task_arithmetic:scale=0.5", "--strategy", "ties",
                    "--json", str(tmp_path / "hand.json")) == 0
    by_hand = {row["strategy"]: row for row in json.loads((tmp_path / "hand.json").read_text())["strategies"]}
    rows = {row["strategy"]: row for row in by_group["strategies"]}
    assert set(rows) == {"task_arithmetic (group unified)", "ties"}
    for label, hand in (("task_arithmetic (group unified)", "task_arithmetic:scale=0.5"), ("ties", "ties")):
        for task, figures in by_hand[hand]["tasks"].items():
            assert rows[label]["tasks"][task] == pytest.approx(figures, rel=1e-6), (label, task)

    # Without --strategy, every strategy at its defaults beside the group's: one the group's
    # already merges (task_arithmetic at its defaults here) runs once, under the group's label
    # (it was refused, "give it once", for any group run at a strategy's defaults).
    at_defaults = tmp_path / "defaults.toml"
    at_defaults.write_text(config.read_text().replace("params = {scale = 0.5}\n", ""))
    monkeypatch.setattr(compare, "_runnable", lambda: ["task_arithmetic", "ties"])
    assert main(["compare", "-q", "--group", "unified", "--config", str(at_defaults),
                 "--json", str(tmp_path / "every.json")]) == 0
    labels = [row["strategy"] for row in json.loads((tmp_path / "every.json").read_text())["strategies"]]
    assert sorted(labels) == ["task_arithmetic (group unified)", "ties"]

    # The group's calibration is read no further than --max-samples, as given by hand: a file
    # longer than that (a training set, here with a fault past 16 lines) was read whole.
    long = tmp_path / "long.jsonl"
    long.write_bytes((adapters[0] / "calibration.jsonl").read_bytes() * 2 + b"not json\n")
    config.write_text(config.read_text().replace(
        "[[groups.destinations]]", f'calibration = {{files = {{"{adapters[0].name}" = "{long}"}}}}\n[[groups.destinations]]'))
    assert main(["compare", "-q", "--group", "unified", "--config", str(config), "--strategy", "ties",
                 "--max-samples", "16", "--json", str(tmp_path / "limited.json")]) == 0
    task = json.loads((tmp_path / "limited.json").read_text())["tasks"][0]
    assert task["calibration"] == str(long) and len(task["held_out"]) + task["merged_from"] == 16
    assert main(["compare", "-q", "--group", "unified", "--config", str(config), "--strategy", "ties",
                 "--max-samples", "0", "--json", str(tmp_path / "whole.json")]) == 0  # reads all: meets the fault
    assert [t["name"] for t in json.loads((tmp_path / "whole.json").read_text())["tasks"]] == [adapters[2].name]
    capsys.readouterr()

    assert main(["compare", "--group", "nope", "--config", str(config)]) == 2
    assert "no merge group named 'nope' in the config (its groups: unified)" in capsys.readouterr().err
    assert main(["compare", "--group", "unified"]) == 2
    assert "--group needs --config, the daemon's config" in capsys.readouterr().err
    assert main(["compare", "--group", "unified", "--config", str(config), "--base-model", str(base)]) == 2
    assert "(with --config): drop --base-model and --adapter" in capsys.readouterr().err
    assert main(["compare", "--strategy", "ties"]) == 2
    assert "give --base-model and --adapter, or --group with --config" in capsys.readouterr().err

    # The catalog named as every command finds it: --db, else $ITERIS_DAEMON_DB, before the config's
    # (it read the config's alone, and its error named the other two).
    elsewhere = tmp_path / "elsewhere.toml"
    elsewhere.write_text(config.read_text().replace(f"database = \"sqlite:///{tmp_path / 'catalog.db'}\"",
                                                    f"state_dir = \"{tmp_path / 'empty-state'}\""))
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    assert main(["compare", "-q", "--group", "unified", "--config", str(elsewhere), "--strategy", "ties"]) == 2
    assert "no catalog at" in capsys.readouterr().err
    assert main(["compare", "-q", "--group", "unified", "--config", str(elsewhere), "--strategy", "ties",
                 "--db", url]) == 0
    monkeypatch.setenv("ITERIS_DAEMON_DB", url)
    assert main(["compare", "-q", "--group", "unified", "--config", str(elsewhere), "--strategy", "ties"]) == 0


def test_the_table_keeps_its_columns_when_a_gap_reaches_10():
    """The columns' widths were fixed: a gap of 10 or more (a merge far from a task the
    adapter hardly moved) shifted the rest of its row."""
    from iteris_daemon.compare import render

    def row(label: str, gaps: dict[str, float]) -> dict:
        worst = max(gaps, key=gaps.get)
        return {"strategy": label, "mean_fidelity_gap": sum(gaps.values()) / len(gaps), "worst_task": worst,
                "worst_fidelity_gap": gaps[worst], "merge_seconds": 1.5,
                "tasks": {name: {"fidelity_gap": gap} for name, gap in gaps.items()}}

    report = {"seed": 0, "tasks": [{"name": n, "held_out": ["x"] * 4, "merged_from": 16} for n in ("polarity", "news")],
              "strategies": [row("iteris", {"polarity": 0.81, "news": 0.44}),
                             row("task_arithmetic", {"polarity": 12.07, "news": 110.9}),
                             {"strategy": "ties", "error": "it failed"}]}
    header, *rows, error = render(report).splitlines()[1:]
    assert len({len(line) for line in (header, *rows)}) == 1  # the last column ends at one place
    for column in ("merge s", "news"):
        end = header.index(column) + len(column)
        assert all(line[end - 1] != " " and line[end:end + 1] in ("", " ") for line in rows), column
    assert error == "ties             error: it failed"
