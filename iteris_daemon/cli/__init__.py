"""The ``iteris-daemon`` command line. Each subcommand module registers its own
parsers (``register(commands)``) and handlers; this module parses, sets up logging,
and turns every :class:`~iteris_daemon.errors.IterisError` into one line and exit 2."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ..errors import IterisError
from . import catalog, merge

NOISY = ("transformers", "httpx", "httpx2", "urllib3", "huggingface_hub", "alembic", "watchdog")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iteris-daemon",
        description="Keep one unified LoRA adapter up to date: catalog task LoRAs, merge them with IterIS.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    merge.register(commands)
    catalog.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.handler(args)
    except IterisError as exc:
        print(f"iteris-daemon: error: {exc}", file=sys.stderr)
        return 2
