"""Alembic environment: runs on the connection the daemon hands over."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from iteris_daemon.catalog.models import Base

config = context.config


def _run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=True,  # SQLite cannot ALTER most things; batch mode recreates the table
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:  # the alembic command line, with sqlalchemy.url set
    with create_engine(config.get_main_option("sqlalchemy.url")).begin() as connection:
        _run(connection)
