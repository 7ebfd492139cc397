"""``python -m benchmarks [--workdir bench-out]``: the quality and the speed benchmarks
(their tables and plots), offline, from a clean checkout, quality first. The README's
other benchmarks (schedules, scale, gpu, dense_memory, ...) run on their own:
``python -m benchmarks.NAME``."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

from . import quality, speed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--workdir", type=Path, default=Path("bench-out"), help="outputs and caches (default: bench-out)")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    # Each part is saved as soon as it ends, so a long run interrupted later keeps it.
    results = {"machine": platform.platform(),
               "quality": quality.run(args.workdir, sample_sweep=(10, 50, 200),
                                      checkpoint=args.workdir / "quality.partial.json")}
    (args.workdir / "quality.json").write_text(json.dumps(results["quality"], indent=2) + "\n")
    print(quality.table(results["quality"]), flush=True)
    for path in quality.plot(results["quality"], args.workdir):
        print(f"wrote {path}", flush=True)
    results["speed"] = speed.run(args.workdir)
    (args.workdir / "speed.json").write_text(json.dumps(results["speed"], indent=2) + "\n")
    (args.workdir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(speed.tables(results["speed"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
