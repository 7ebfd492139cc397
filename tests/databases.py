"""Catalog databases for tests: a real SQLite file, and a real PostgreSQL server when
``ITERIS_TEST_POSTGRES_URL`` names one (``.ci/run`` starts Debian's and sets it)."""

from __future__ import annotations

import os
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import make_url

POSTGRES_ENV = "ITERIS_TEST_POSTGRES_URL"
SKIP_REASON = (
    f"no PostgreSQL server: set {POSTGRES_ENV}=postgresql+psycopg://USER:PASSWORD@127.0.0.1:5432/postgres "
    "to run the catalog tests against one (.ci/run does)"
)


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh, empty database on the test server; dropped afterwards."""
    admin_url = os.environ.get(POSTGRES_ENV)
    if not admin_url:
        pytest.skip(SKIP_REASON)
    name = f"iteris_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def database(kind: str, tmp_path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'catalog.db'}"
    else:
        with postgres_database() as url:
            yield url


@contextmanager
def rows_loaded(entity: type) -> Iterator[list[int]]:
    """The ids of ``entity`` rows the ORM loads inside the block, in load order."""
    loaded: list[int] = []

    def count(target, _context) -> None:
        loaded.append(target.id)

    event.listen(entity, "load", count)
    try:
        yield loaded
    finally:
        event.remove(entity, "load", count)


@contextmanager
def sqlite_write_locked(database: Path, update: str) -> Iterator[None]:
    """Another connection's write transaction on the SQLite catalog ``database``, holding the
    write lock with ``update`` made and not committed, for the block."""
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute(update)
    try:
        yield
    finally:
        holder.execute("ROLLBACK")
        holder.close()
