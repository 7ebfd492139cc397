"""The ``iteris-daemon`` command line. Each subcommand module registers its own
parsers (``register(commands)``) and handlers; this module parses, sets up logging,
and turns every :class:`~iteris_daemon.errors.IterisError` into one line and exit 2."""

from __future__ import annotations

import argparse
import logging
import os
import select
import sys
from collections.abc import Sequence
from typing import Any

from .. import __version__
from ..errors import IterisError
from ..logs import FORMATS, say_fatal, setup_logging
from . import catalog, compare, daemon, merge

log = logging.getLogger(__name__)


def _add_global_options(parser: argparse.ArgumentParser, verbose: Any, log_format: Any) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", default=verbose, help="log debug details")
    parser.add_argument("--log-format", choices=FORMATS, default=log_format,
                        help="auto: journald style under systemd, else text with UTC timestamps (default: auto)")


class _CommandParser(argparse.ArgumentParser):
    """Every (sub)command's parser also takes the global options, after the command's name.
    Their defaults are not set here (``SUPPRESS``): given before the command, they stay."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        _add_global_options(self, argparse.SUPPRESS, argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iteris-daemon",
        description="Keep one unified LoRA adapter up to date: catalog task LoRAs, merge them with IterIS.",
    )
    _add_global_options(parser, False, "auto")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_CommandParser)
    merge.register(commands)
    compare.register(commands)
    catalog.register(commands)
    daemon.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            code = _main(argv)
        except SystemExit:  # argparse's --help / usage errors: their output too
            sys.stdout.flush()
            raise
        sys.stdout.flush()  # inside the try: a closed pipe surfaces here, not at exit
        return code
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback (a merge's output is swapped in whole)
        print("iteris-daemon: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (``iteris-daemon plugins | head``): exit quietly, as the
        # Python docs recommend for SIGPIPE, unless the broken pipe was not stdout's.
        if not _stdout_is_broken():
            raise
        try:  # Python flushes stdout again at exit: let that go nowhere
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, args.log_format)
    try:
        return args.handler(args)
    except IterisError as exc:
        if exc.__cause__ is not None:  # a plugin's or a library's failure behind the one line
            log.debug("caused by", exc_info=exc.__cause__)
        say_fatal(log, str(exc))
        return 2


def _stdout_is_broken() -> bool:
    """Whether stdout's reader is gone (a BrokenPipeError may also come from a socket);
    True when this cannot be told, as the documented recipe assumes."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return True
