"""``python -m iteris_daemon.catalog.revision MESSAGE``: write a new migration by
comparing ``models.py`` with a scratch database migrated to the current head."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from alembic import command

from .db import _alembic_config, make_engine, sqlite_url, upgrade


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m iteris_daemon.catalog.revision MESSAGE", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as scratch:
        engine = make_engine(sqlite_url(Path(scratch) / "scratch.db"))
        upgrade(engine)
        with engine.begin() as connection:
            config = _alembic_config(connection)
            versions = Path(config.get_main_option("script_location")) / "versions"
            number = len(list(versions.glob("[0-9]*.py"))) + 1  # sequential ids read better than hashes
            command.revision(config, message=args[0], autogenerate=True, rev_id=f"{number:04d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
