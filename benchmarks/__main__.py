"""``python -m benchmarks [--workdir bench-out]``: every table and plot of the README's
Benchmarks section, offline, from a clean checkout (quality first, then speed)."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

from . import quality, speed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("bench-out"), help="outputs and caches (default: bench-out)")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = {"machine": platform.platform(), "quality": quality.run(args.workdir), "speed": speed.run(args.workdir)}
    (args.workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(quality.table(results["quality"]))
    for path in quality.plot(results["quality"], args.workdir):
        print(f"wrote {path}")
    print(speed.tables(results["speed"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
