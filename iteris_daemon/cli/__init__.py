"""The ``iteris-daemon`` command line. Each subcommand module registers its own
parsers (``register(commands)``) and handlers; this module parses, sets up logging,
and turns every :class:`~iteris_daemon.errors.IterisError` into one line and exit 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import IterisError
from ..logs import FORMATS, setup_logging
from . import catalog, daemon, merge


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iteris-daemon",
        description="Keep one unified LoRA adapter up to date: catalog task LoRAs, merge them with IterIS.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    parser.add_argument("--log-format", choices=FORMATS, default="auto",
                        help="auto: journald style under systemd, else text with timestamps (default: auto)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    merge.register(commands)
    catalog.register(commands)
    daemon.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, args.log_format)
    try:
        return args.handler(args)
    except IterisError as exc:
        print(f"iteris-daemon: error: {exc}", file=sys.stderr)
        return 2
