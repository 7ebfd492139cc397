"""Opening the catalog database and migrating it to the current schema.

Any SQLAlchemy URL works; the default is a SQLite file in the state directory,
opened in WAL mode with a busy timeout so the watcher, the scheduler and the CLI
can use it at once. Migrations ship inside the package and run programmatically.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from functools import partial
from pathlib import Path
from urllib.parse import quote

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (ArgumentError, DBAPIError, IntegrityError, NoSuchModuleError, OperationalError,
                            ProgrammingError)
from sqlalchemy.orm import Session, sessionmaker

from ..errors import IterisError, first_line
from ..paths import private_dir, state_dir
from .models import utcnow

log = logging.getLogger(__name__)
SQLITE_BUSY_TIMEOUT_MS = 30_000
# Page cache per SQLite connection. SQLite's default (2 MiB) fills as the catalog grows
# (runs are kept), so a long-running daemon's memory grew with its catalog: +6.6 MB over
# a 500-cycle soak whose catalog grew 0.3 -> 3.1 MB, with three pooled connections. The
# catalog's queries are point lookups and short scans; pages it evicts stay in the OS cache.
SQLITE_CACHE_KIB = 512
# The newest migration's revision. A catalog already there opens without Alembic, whose
# import and checks were most of a short command's time (``status``); a new migration
# must update it (tests/test_catalog.py compares it with the migrations' head).
SCHEMA_HEAD = "0012"
# How a database server reads its own clock, in UTC without a time zone (as the catalog's
# columns hold times). Claims and daemon liveness compare times written by different hosts,
# so they use the server's clock; SQLite runs in this process, its clock is this host's.
SERVER_CLOCK = {"postgresql": "SELECT clock_timestamp() AT TIME ZONE 'UTC'"}
INSUFFICIENT_PRIVILEGE = "42501"  # SQLSTATE of a server's "permission denied" (a read-only role)
READ_ONLY_TRANSACTION = "25006"  # ... and of a write to a server that takes none (a hot standby, a demoted primary)
# libpq's defaults wait for ever: a server that stopped answering without closing the
# connection (a host gone, a firewall dropping packets) held every job, and `status`, with no
# word. A connect gives up after 10 s; an idle connection is probed after 30 s, and given up
# after 3 probes 10 s apart unanswered. What the URL's query, $PGCONNECT_TIMEOUT or a service
# file (``?service=``, $PGSERVICE) gives wins.
LIBPQ_TIMEOUTS = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
                  "keepalives_count": 3}


# What creates a catalog, and what names it: said where a command finds none.
NO_CATALOG = "the daemon, `sources add` or `db upgrade` creates one; --db, $ITERIS_DAEMON_DB or --config names it"


class CatalogError(IterisError):
    """The catalog database cannot be opened or migrated."""


class CatalogLockedError(CatalogError):
    """Another process held the SQLite catalog's write lock for longer than the busy timeout."""


class CatalogFileGone(CatalogError):
    """The SQLite file a running process opened was deleted or replaced under it."""


class CatalogWriteRefused(CatalogError):
    """The catalog took no write for now: its disk is full, or its server takes no writes
    (a hot standby). A command says so in one line; the daemon's jobs try again later."""


# What a database that cannot be read or written raises (its server down or restarting, a
# lock held past the busy timeout, a full disk), as opposed to a bug.
DATABASE_FAILURES = (DBAPIError, CatalogLockedError, CatalogWriteRefused)
# The same, with the file system's errors (a SQLite file): what the daemon's periodic jobs
# catch, say and go on from.
CATALOG_FAILURES = (*DATABASE_FAILURES, OSError, CatalogFileGone)


def sqlite_url(path: Path) -> str:
    """The URL of the SQLite file ``path``, escaped: written ``sqlite:///{path}`` as it was,
    a state directory holding ``?`` or ``%41`` put the catalog somewhere else."""
    return URL.create("sqlite", database=str(path)).render_as_string(hide_password=False)


def default_url() -> str:
    return sqlite_url(state_dir() / "catalog.db")


def _sqlite_pragmas(dbapi_connection, _record, busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS,
                    read_only: bool = False) -> None:
    cursor = dbapi_connection.cursor()
    if not read_only:  # a read-only catalog stays in the mode it was written in
        cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")  # safe with WAL: a crash loses at most the last commit
    cursor.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
    cursor.close()


_QUERY_PASSWORD = re.compile(r"(?i)([?&](?:ssl)?password=)[^&#]*")  # libpq takes both as query parameters


def mask_password(url: str) -> str:
    """``url`` with whatever may be its password written ``***``: from the ':' after the
    user name to the last '@', whether or not the URL parses (a password holding '@'
    or '/' is one reason it may not), and a ``password``/``sslpassword`` query parameter."""
    url = _QUERY_PASSWORD.sub(r"\1***", url)
    start = url.find("://")
    start = start + 3 if start >= 0 else 0
    at = url.rfind("@")
    colon = url.find(":", start, at) if at > start else -1
    return url if colon < 0 else f"{url[:colon + 1]}***{url[at:]}"


def shown_url(url: URL) -> str:
    """``url`` as logs, errors and ``/healthz`` show it: its password hidden, whether in its
    place or given as a query parameter (``?password=``, ``sslpassword``: libpq takes them)."""
    return _QUERY_PASSWORD.sub(r"\1***", url.render_as_string(hide_password=True))


def make_engine(url: str, *, busy_timeout: float | None = None, create: bool = True) -> Engine:
    """``busy_timeout``: seconds a SQLite write waits for another process's lock
    (default ``SQLITE_BUSY_TIMEOUT_MS``); ignored for other databases. ``create=False``:
    a SQLite file that does not exist is an error (a mistyped path must not look like an
    empty catalog), not a new catalog."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # ValueError: a port that is no number
        raise CatalogError(f"invalid database URL {mask_password(url)!r} (a SQLAlchemy URL: a SQLite file is "
                           "written sqlite:////abs/path.db, or sqlite:///relative/path.db)") from None
    if parsed.host and "@" in parsed.host:  # the rest of the password would be shown as the host name
        raise CatalogError(f"invalid database URL {mask_password(url)!r}: it has more than one '@'; a '@' in the "
                           "password is written %40 (percent-encoded)")
    opener = None
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        database = Path(parsed.database).expanduser().resolve()
        if not create and (not database.is_file() or database.stat().st_size == 0):  # an empty file: SQLite's empty database
            raise CatalogError(f"no catalog at {database} ({NO_CATALOG})")
        parsed = parsed.set(database=str(database))  # "~" expanded for SQLite too
        if not create and not _writable(database):
            opener = _read_only_opener(database)
        else:
            try:
                if create:  # the catalog is private state (a command that only reads it has no say in that)
                    private_dir(database.parent)
                # Created 0600 before SQLite opens it (SQLite gives its -wal/-shm files the same mode).
                os.close(os.open(database, os.O_CREAT | os.O_RDWR, 0o600))
            except OSError as exc:  # a read-only file system, a parent that is a file, no permission
                where = f"{exc.filename}: " if exc.filename and str(exc.filename) != str(database) else ""
                raise CatalogError(f"cannot open the catalog {database} for writing ({where}{exc.strerror})") from None
    options: dict = {"creator": opener} if opener else {}
    if (parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() in ("psycopg", "psycopg2")
            and "service" not in parsed.query and not os.environ.get("PGSERVICE")):  # a service file's settings win
        given = set(parsed.query) | ({"connect_timeout"} if os.environ.get("PGCONNECT_TIMEOUT") else set())
        options["connect_args"] = {key: value for key, value in LIBPQ_TIMEOUTS.items() if key not in given}
    try:
        engine = create_engine(parsed, **options)
    except (NoSuchModuleError, ImportError) as exc:
        raise CatalogError(f"cannot use database URL {shown_url(parsed)}: {exc}") from None
    if parsed.get_backend_name() == "sqlite":
        busy_ms = SQLITE_BUSY_TIMEOUT_MS if busy_timeout is None else int(busy_timeout * 1000)
        event.listen(engine, "connect", partial(_sqlite_pragmas, busy_timeout_ms=busy_ms, read_only=bool(opener)))
    return engine


def _writable(database: Path) -> bool:
    """Whether this process may write the SQLite file ``database`` and its folder (where
    SQLite makes the -wal and -shm): not on a read-only mount, nor another user's."""
    return os.access(database, os.W_OK) and os.access(database.parent, os.W_OK)


def _read_only_opener(database: Path) -> Callable[[], sqlite3.Connection]:
    """Connections that only read the SQLite catalog ``database``, which this process may not
    write (a backup on a read-only mount): every command failed there, even `status`. SQLite
    reads a WAL database read-only only through its -wal and -shm, which it cannot create
    there: where there is no -wal (nothing is written to it meanwhile) it is opened
    ``immutable``; a -wal without its -shm cannot be read."""
    wal = Path(f"{database}-wal")
    if wal.exists() and not Path(f"{database}-shm").exists():
        raise CatalogError(f"cannot read the catalog {database}: it cannot be written here, and its -wal has no -shm "
                           "beside it; copy the catalog.db* files into a folder that can be written, and open the copy")
    uri = f"file:{quote(str(database))}?mode=ro" + ("" if wal.exists() else "&immutable=1")
    return partial(sqlite3.connect, uri, uri=True, check_same_thread=False)


def is_sqlite_busy(exc: OperationalError) -> bool:
    """SQLITE_BUSY (any extended code): the busy timeout ran out behind another connection's lock."""
    code = getattr(exc.orig, "sqlite_errorcode", None)
    return (code & 0xFF) == 5 if isinstance(code, int) else "database is locked" in str(exc.orig)


def _is_sqlite_read_only(exc: OperationalError) -> bool:
    """SQLITE_READONLY (any extended code): a write to a catalog opened read-only."""
    code = getattr(exc.orig, "sqlite_errorcode", None)
    return isinstance(code, int) and (code & 0xFF) == 8


def _is_sqlite_full(exc: OperationalError) -> bool:
    """SQLITE_FULL: the disk (or the database's page limit) is full."""
    code = getattr(exc.orig, "sqlite_errorcode", None)
    return isinstance(code, int) and (code & 0xFF) == 13


def _sqlstate(exc: DBAPIError) -> str | None:
    return getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)


def _alembic_config(connection):
    from alembic.config import Config

    from .. import migrations

    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.attributes["connection"] = connection
    return config


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """Daemons starting together on one catalog migrate one after the other: a file lock
    beside a SQLite database; for servers, an advisory lock taken inside the transaction."""
    database = engine.url.database
    if engine.url.get_backend_name() == "sqlite" and database not in (None, "", ":memory:"):
        import fcntl

        descriptor = os.open(f"{database}.migrate-lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)  # closing releases the lock
    else:
        yield


@contextmanager
def _migrating(engine: Engine) -> Iterator[Connection]:
    """A transaction to migrate in, with SQLite's foreign keys off while it lasts.

    Batch mode rebuilds a SQLite table (copy, DROP, rename); with foreign keys on, the
    DROP of a parent table (merge_groups) would cascade-delete its children's rows
    (merge_runs). The pragma cannot change inside a transaction, so it is set before
    one begins, and every reference is checked before the migration commits.

    On SQLite the transaction is opened with an explicit ``BEGIN IMMEDIATE`` (see
    :meth:`Catalog.session`): pysqlite opens none before DDL, so each ``CREATE``/``ALTER``
    of a migration committed on its own, and an upgrade stopped part-way (a restart, a
    full disk) left a table or column that every later upgrade stumbled on.
    """
    with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()
        try:
            with connection.begin():
                if sqlite:
                    connection.exec_driver_sql("BEGIN IMMEDIATE")
                if connection.dialect.name == "postgresql":
                    connection.execute(text("SELECT pg_advisory_xact_lock(74837201)"))  # any fixed key
                yield connection
                if sqlite and (dangling := connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()):
                    raise CatalogError(f"migration would leave rows pointing nowhere (table, row, parent): {dangling[:3]}")
        finally:
            if sqlite:
                connection.exec_driver_sql("PRAGMA foreign_keys=ON")
                connection.commit()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the database to ``revision`` (creating it when empty)."""
    from alembic import command

    with _migration_lock(engine), _migrating(engine) as connection:
        command.upgrade(_alembic_config(connection), revision)


def downgrade(engine: Engine, revision: str) -> None:
    from alembic import command

    with _migration_lock(engine), _migrating(engine) as connection:
        command.downgrade(_alembic_config(connection), revision)


def at_head(engine: Engine) -> bool:
    """Whether the database is at :data:`SCHEMA_HEAD`, read without Alembic; False when
    it has no version table yet (an empty database) or cannot say."""
    try:
        with engine.connect() as connection:
            return connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalars().all() == [SCHEMA_HEAD]
    except DBAPIError:
        return False


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def schema_mismatch(engine: Engine, may_migrate: bool) -> str | None:
    """Why the catalog cannot be used as it is: a schema newer than this code knows (written
    by a newer iteris-daemon), or an older one where ``may_migrate`` is False (a command
    that only reads or requests must not change the schema under a running daemon)."""
    from alembic.script import ScriptDirectory

    current = current_revision(engine)
    if current is None and not may_migrate:  # created by a command that only reads, under no daemon
        return f"is an empty database, not a catalog ({NO_CATALOG})"
    if current is None or current == SCHEMA_HEAD:
        return None  # empty: created by the caller
    known = {script.revision for script in ScriptDirectory.from_config(_alembic_config(None)).walk_revisions()}
    if current not in known and not re.fullmatch(r"\d{4}", current):  # ours are numbered
        return (f"is at schema revision {current}, which is not one of iteris-daemon's (0001 to {SCHEMA_HEAD}): it is "
                "another application's database; give the catalog a database of its own")
    if current not in known:
        return (f"is at schema revision {current}, newer than this iteris-daemon knows (its latest is {SCHEMA_HEAD}): "
                "upgrade iteris-daemon, or use the version that wrote it")
    if not may_migrate:
        return (f"is at schema revision {current}, older than this iteris-daemon's {SCHEMA_HEAD}: run "
                "`iteris-daemon db upgrade` with this command's --db or --config, if it had one (or start the "
                "daemon, which migrates it)")
    return None


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config(None)).get_current_head()


class Catalog:
    """The catalog: an engine plus a session factory, migrated on open."""

    def __init__(self, url: str | None = None, *, migrate: bool = True, busy_timeout: float | None = None,
                 create: bool = True):
        """``busy_timeout``: seconds a SQLite write waits for a lock held by another process
        before failing with :class:`CatalogLockedError` (default 30); ``create``: see
        :func:`make_engine` (and False: an older schema is refused, not migrated)."""
        self.url = url or default_url()
        self.busy_timeout = SQLITE_BUSY_TIMEOUT_MS / 1000 if busy_timeout is None else busy_timeout
        self.engine = make_engine(self.url, busy_timeout=self.busy_timeout, create=create)
        self._sqlite = self.engine.url.get_backend_name() == "sqlite"
        if migrate and not at_head(self.engine):
            try:
                problem = schema_mismatch(self.engine, may_migrate=create)
                if problem is not None:
                    raise CatalogError(f"the catalog at {self.safe_url} {problem}")
                upgrade(self.engine)
            except Exception as exc:
                if isinstance(exc, IterisError):
                    raise
                raise CatalogError(f"cannot open {'or migrate ' if create else ''}the catalog at {self.safe_url}: "
                                   f"{exc}".splitlines()[0]) from exc
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._opened = self._file_identity()

    def _file_identity(self) -> tuple[int, int] | None:
        """The SQLite file this catalog opened, as (device, inode); None for a server's."""
        path = self.engine.url.database if self._sqlite else None
        if not path or path == ":memory:":
            return None
        try:
            found = os.stat(path)
        except OSError:
            return None
        return found.st_dev, found.st_ino

    def check_file(self) -> None:
        """Raise :class:`CatalogFileGone` if the SQLite file was deleted or replaced since it was
        opened: the daemon went on writing into the deleted file, its health ok, while
        ``status`` found no catalog and a restart lost what it had recorded meanwhile."""
        if self._opened is not None and self._file_identity() != self._opened:
            raise CatalogFileGone(f"the catalog file {self.engine.url.database} was deleted or replaced while this "
                               "process had it open: it writes into the file it opened, which nothing else reads; "
                               "restart the daemon (what it recorded since is lost)")

    @property
    def safe_url(self) -> str:
        """The URL with any password hidden, for logs and errors."""
        return shown_url(self.engine.url)  # a SQLite path as opened

    @contextmanager
    def session(self, write: bool = True) -> Iterator[Session]:
        """A transaction: committed when the block ends, rolled back on error.
        ``write=False``: for reading only, in one consistent view on SQLite and
        PostgreSQL (a snapshot), without a lock on SQLite (a deferred ``BEGIN``; in WAL
        mode readers and the writer never wait for each other); PostgreSQL refuses a
        write in it. For long reads that must not hold sources and other daemons back.

        On SQLite the transaction is opened explicitly with ``BEGIN IMMEDIATE``. The
        pysqlite driver otherwise opens none before a ``SAVEPOINT`` (it only does before
        INSERT/UPDATE/DELETE), so SQLite ran each ``session.begin_nested()`` block as a
        transaction of its own that its RELEASE committed: ``registry.record`` wrote the
        adapter row, its revision and the row's status in three commits, and a process
        killed in between left an adapter with no revision. IMMEDIATE (the write lock
        taken up front, waiting up to the busy timeout) rather than a deferred BEGIN:
        a WAL transaction that has read and then writes after another process committed
        fails at once with SQLITE_BUSY, without waiting.

        A lock held by another process beyond the busy timeout raises
        :class:`CatalogLockedError`, naming the database, instead of a raw driver error.
        """
        try:
            with self._sessions() as session, session.begin():
                if self._sqlite:
                    session.connection().exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
                elif not write and self.engine.url.get_backend_name() == "postgresql":
                    session.connection().exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                yield session
        except OperationalError as exc:
            if self._sqlite and _is_sqlite_read_only(exc):
                raise CatalogError(f"the catalog {self.safe_url} cannot be written here (a read-only file system, or "
                                   "another user's): nothing was written") from exc
            if self._sqlite and is_sqlite_busy(exc):
                raise CatalogLockedError(
                    f"the catalog {self.safe_url} is locked by another process (still locked after waiting "
                    f"{self.busy_timeout:g} s); nothing was written, try again once it is released"
                ) from exc
            if self._sqlite and _is_sqlite_full(exc):
                raise CatalogWriteRefused(f"the catalog {self.safe_url} cannot be written: its disk is full "
                                          "(database or disk is full); nothing was written, free space there "
                                          "(`db prune` needs some too)") from exc
            raise
        except ProgrammingError as exc:
            if _sqlstate(exc) == INSUFFICIENT_PRIVILEGE:
                raise CatalogError(f"the catalog {self.safe_url} cannot be {'written' if write else 'read'} by this "
                                   f"database user ({first_line(exc.orig)}): nothing was written") from exc
            raise
        except DBAPIError as exc:  # psycopg's ReadOnlySqlTransaction is an InternalError
            if write and _sqlstate(exc) == READ_ONLY_TRANSACTION:
                raise CatalogWriteRefused(f"the catalog {self.safe_url} takes no writes ({first_line(exc.orig)}: a "
                                          "hot standby, a demoted primary, or default_transaction_read_only); nothing "
                                          "was written, point the URL at the primary") from exc
            raise

    def now(self, session: Session) -> datetime:
        """The time on the catalog's clock (naive UTC). Daemons on several hosts share a server
        catalog, and comparing the times one wrote with another's clock would let a clock
        running ahead take a live claim or call a live daemon gone; the server's clock is the one
        they all read. SQLite, and a server whose clock this does not know how to read: this host's."""
        query = SERVER_CLOCK.get(self.engine.url.get_backend_name())
        return utcnow() if query is None else session.execute(text(query)).scalar_one()

    def write_retrying_conflict(self, work: Callable[[Session], None]) -> None:
        """Run ``work`` in a transaction, once more if a unique constraint failed: another
        daemon inserted the same new row at the same moment, and the retry sees it."""
        try:
            with self.session() as session:
                work(session)
        except IntegrityError:
            with self.session() as session:
                work(session)

    def close(self) -> None:
        self.engine.dispose()
