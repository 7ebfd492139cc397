"""Every pytest command RELIABILITY.md gives to reproduce a row selects at least one test.

A QA audit found a row whose command, after a test was renamed, selected nothing, and
nobody had noticed: pytest reports "no tests ran" and the row still reads as reproduced.
This test collects the suite's node ids once, with their `long` marks, and evaluates
each command's paths, `-m` and `-k` against them as pytest would.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from _pytest.mark.expression import Expression

ROOT = Path(__file__).resolve().parent.parent


def table_commands(text: str) -> list[tuple[str, str]]:
    """(row number, command) for each pytest selection in the table's last column.

    A command is a backticked span naming pytest, or one that continues the previous
    one's `python -m pytest` (it starts with `-m` or `tests/`); the rest of the column
    (QA scripts, `python -m benchmarks.soak`) is not a selection.
    """
    commands = []
    for line in text.splitlines():
        cells = re.split(r"(?<!\\)\|", line)  # a `\|` inside a cell is not a column break
        if len(cells) < 4 or not re.fullmatch(r"\s*\d+[a-z]?\s*", cells[1]):
            continue
        for span in re.findall(r"`([^`]+)`", cells[-2]):
            if "pytest" in span or span.startswith(("-m ", "tests/")):
                commands.append((cells[1].strip(), span))
    return commands


def selection(command: str) -> tuple[list[str], str | None, str | None]:
    """A command's paths, `-m` and `-k`; as in pytest, a later `-m` or `-k` replaces an earlier one."""
    args = shlex.split(command)
    if "pytest" in args:  # drop `ITERIS_...=N python -m pytest`
        args = args[args.index("pytest") + 1:]
    paths: list[str] = []
    marks = keywords = None
    options = iter(args)
    for arg in options:
        if arg == "-m":
            marks = next(options)
        elif arg == "-k":
            keywords = next(options)
        elif arg == "-n":
            next(options)
        elif not arg.startswith("-"):
            paths.append(arg)
    return paths, marks, keywords


# Run in a fresh interpreter: one collection of the whole suite (`-m ''`) prints each node
# id after "long" or "-", which serves the default run, `-m long` and `-m ''` alike.
COLLECT = """
import sys, pytest
class Print:
    def pytest_collection_finish(self, session):
        for item in session.items:
            print("long" if item.get_closest_marker("long") else "-", item.nodeid)
sys.exit(pytest.main(["--co", "-q", "-m", "", "-n", "0", "-p", "no:cacheprovider"], plugins=[Print()]))
"""


def collect() -> tuple[set[str], set[str]]:
    """Every test's node id, and those of the tests marked long."""
    run = subprocess.run([sys.executable, "-c", COLLECT], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"collecting the suite failed:\n{run.stdout[-3000:]}{run.stderr[-3000:]}"
    marked = [line.split(" ", 1) for line in run.stdout.splitlines() if line.startswith(("long tests/", "- tests/"))]
    return {node for _, node in marked}, {node for mark, node in marked if mark == "long"}


def under(node_id: str, path: str) -> bool:
    """Whether a command's path (a folder, a file, or a file with `::names`) holds the node."""
    return node_id == path or node_id.startswith((path + "::", path + "[", path.rstrip("/") + "/"))


def keyword_match(node_id: str, keywords: str) -> bool:
    """Whether `-k KEYWORDS` selects the node.

    This mirrors pytest's `-k` keyword matching (`_pytest.mark.KeywordMatcher`): a name
    in the expression matches when it is a case-insensitive substring of one of the
    node's names: its folders below the root (`tests`), its file (`test_x.py`), its
    class and its function with its parameters (`test_y[bert]`). pytest also matches
    the names of the node's markers (`parametrize`, `timeout`, `long`...), which no
    row's `-k` relies on (checked when this test was written).
    """
    file, *names = node_id.split("::")
    node_names = [name.lower() for name in [*file.split("/"), *names]]
    return Expression.compile(keywords).evaluate(lambda name: any(name.lower() in n for n in node_names))


def selected(command: str, everything: set[str], long: set[str]) -> list[str]:
    """The node ids the command runs (no path: the testpaths, `tests`)."""
    paths, marks, keywords = selection(command)
    pools = {None: everything - long, "not long": everything - long, "": everything, "long": long}
    assert marks in pools, f"{command!r}: -m {marks!r} is none of the table's ('', 'long', 'not long')"
    return [node for node in pools[marks]
            if any(under(node, path) for path in paths or ["tests"])
            and (keywords is None or keyword_match(node, keywords))]


def empty_commands(text: str, everything: set[str], long: set[str]) -> tuple[int, list[tuple[str, str]]]:
    """How many commands the table gives, and the (row, command) pairs that select no test
    from one of the paths they name (a test renamed in one of three files goes unnoticed
    while the other two still match)."""
    commands = table_commands(text)
    empty = []
    for row, command in commands:
        chosen = selected(command, everything, long)
        empty += [(row, f"{command}  [nothing from {path}]") for path in selection(command)[0] or ["tests"]
                  if not any(under(node, path) for node in chosen)]
    return len(commands), empty


def test_every_reliability_command_selects_a_test_from_each_path():
    everything, long = collect()
    checked, empty = empty_commands((ROOT / "RELIABILITY.md").read_text(encoding="utf-8"), everything, long)
    assert checked >= 200, f"only {checked} commands found in RELIABILITY.md: is the table's parser broken?"
    assert not empty, "RELIABILITY.md rows whose command selects no test from a path it names:\n" + "\n".join(
        f"row {row}: {command}" for row, command in empty)
