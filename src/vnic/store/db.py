"""Engine, transactions and migrations for the central database.

SQLite (a file) is the default; PostgreSQL is used when the URL says so
(``postgresql+psycopg://user@host/db``). Writers are serialised where the
database needs it: SQLite transactions start with ``BEGIN IMMEDIATE`` so two
processes never both read-then-write the same rows, and PostgreSQL takes a
transaction-scoped advisory lock around allocations (:func:`allocation_lock`).

PostgreSQL may restart or be out of reach: every pooled connection is checked before
use (``pool_pre_ping``: a dead one is replaced, so the pool recovers by itself once the
server is back), and a unit of work that loses its connection, or cannot get one,
raises :class:`~vnic.errors.Unavailable` (503: retry) instead of an internal error.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from vnic.errors import Unavailable, shorten

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).parent / "migrations"
#: The newest migration. Checked against the migration scripts by a test; kept
#: here so that a command on a current database does not load Alembic at all.
SCHEMA_HEAD = "0006"
#: Advisory lock key for MAC allocation and MAC-range checks ("vnic" in ASCII).
ALLOCATION_LOCK_KEY = 0x766E6963


def make_engine(url: str, *, read_only: bool = False) -> Engine:
    """An engine for ``url``; SQLite gets foreign keys, a busy timeout and immediate writes
    (``read_only``: deferred transactions, which never wait for a writer under WAL)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            private_sqlite_file(Path(parsed.database))
        engine = create_engine(url, connect_args={"timeout": 60})
        _sqlite_pragmas(engine, "BEGIN" if read_only else "BEGIN IMMEDIATE")
        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        # Plain "postgresql://" would pick psycopg2, which we do not ship.
        url = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    return create_engine(url, pool_pre_ping=True)


#: Mode of the SQLite database and its -wal and -shm files: token hashes, owners and
#: the audit log are no one else's business on a shared host.
DB_FILE_MODE = 0o600


def private_sqlite_file(path: Path) -> None:
    """Make ``path`` (mode 0600, its directory 0700 if new) before SQLite opens it, and
    take group and other rights from an older database's files. SQLite gives the -wal
    and -shm files it creates the database file's mode."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, DB_FILE_MODE))
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            mode = file.stat().st_mode & 0o777
            if mode & 0o077:
                file.chmod(mode & DB_FILE_MODE)
        except (FileNotFoundError, PermissionError):
            continue  # not there yet, or another user's file we may only read


def _sqlite_pragmas(engine: Engine, begin: str) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when a transaction starts.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # IMMEDIATE takes the write lock up front: two writers queue instead of
        # both reading a free MAC and one failing at commit.
        conn.exec_driver_sql(begin)


def alembic_config(engine: Engine) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    # configparser reads "%" as interpolation; URLs with a socket path contain %2F.
    cfg.set_main_option(
        "sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%")
    )
    return cfg


def head_revision(engine: Engine) -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config(engine)).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The schema revision the database is at (None for an empty database)."""
    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def upgrade(engine: Engine, target: str = "head") -> None:
    """Migrate the schema to ``target`` (default: the newest)."""
    from alembic import command

    cfg = alembic_config(engine)
    with _migrating(engine) as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, target)


def downgrade(engine: Engine, target: str) -> None:
    from alembic import command

    cfg = alembic_config(engine)
    with _migrating(engine) as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, target)


@contextlib.contextmanager
def _migrating(engine: Engine) -> Iterator[Connection]:
    """A connection in one transaction for migrations. On SQLite, with foreign keys off
    while it runs: Alembic changes a table there by copying it and dropping the old
    one, and dropping a table deletes its rows first, which with foreign keys on
    cascades to every row referring to them (a session's VMs, a VM's MACs). The
    references are checked before the commit instead."""
    with engine.connect() as conn:
        sqlite = engine.dialect.name == "sqlite"
        raw: Any = conn.connection.dbapi_connection if sqlite else None
        if raw is not None:
            raw.execute("PRAGMA foreign_keys=OFF")  # outside a transaction: else a no-op
        try:
            with conn.begin():
                yield conn
                if raw is not None:
                    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").all()
                    if broken:
                        raise RuntimeError(f"migration left broken references: {broken[:5]}")
        finally:
            if raw is not None:
                raw.execute("PRAGMA foreign_keys=ON")


class Database:
    """The central database: an engine, sessions, and the schema kept current."""

    def __init__(self, url: str, *, migrate: bool = True) -> None:
        self.url = url
        self.disposed = False
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # Reads on SQLite get their own engine: a deferred BEGIN, so a read never
        # queues behind a writer's lock (WAL keeps its snapshot consistent).
        self._read_engine = (
            make_engine(url, read_only=True) if self.engine.dialect.name == "sqlite" else None
        )
        self._read_sessions = (
            sessionmaker(self._read_engine, expire_on_commit=False)
            if self._read_engine is not None
            else self._sessions
        )
        if migrate and current_revision(self.engine) != SCHEMA_HEAD:
            upgrade(self.engine)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Session]:
        """One unit of work: committed if the block succeeds, rolled back otherwise.
        :class:`~vnic.errors.Unavailable` when PostgreSQL is out of reach (see the module)."""
        with self._reachable(), self._sessions() as session, session.begin():
            yield session

    @contextlib.contextmanager
    def reading(self) -> Iterator[Session]:
        """A read-only unit of work (rolled back at the end: nothing in it is kept)."""
        with self._reachable(), self._read_sessions() as session:
            try:
                yield session
            finally:
                session.rollback()

    @contextlib.contextmanager
    def _reachable(self) -> Iterator[None]:
        """PostgreSQL's lost or refused connections as :class:`~vnic.errors.Unavailable`.
        Only there: SQLite's operational errors (a locked or full database) are other
        faults, told apart elsewhere (:func:`vnic.errors.storage_error`)."""
        try:
            yield
        except sa_exc.DBAPIError as exc:
            lost = isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError)
            if self.dialect != "postgresql" or not (lost or exc.connection_invalidated):
                raise
            # Not "nothing changed": whether a COMMIT that lost its connection took is
            # unknown, so the caller is told to retry (and to look, for a create).
            why = shorten(str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc), 200)
            raise Unavailable(
                f"the database did not answer ({why}); retry once it is back"
            ) from exc

    def allocation_lock(self, session: Session) -> None:
        """Serialise allocations until the transaction ends (SQLite already is)."""
        if self.dialect == "postgresql":
            session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": ALLOCATION_LOCK_KEY})

    def dispose(self) -> None:
        """Close every pooled connection; threads that hold their own (the fleet's
        NOTIFY listener) stop at their next look at :attr:`disposed`."""
        self.disposed = True
        self.engine.dispose()
        if self._read_engine is not None:
            self._read_engine.dispose()
