"""Database sessions for managers, workers, the CLI and the API.

``DatabaseConnection().get_connection()`` returns ``(session, engine)`` as the user's
document shows.  Engines are cached per URL.  SQLite runs with WAL and foreign keys on
(the embedded default); PostgreSQL sessions run in UTC.

Engines are per process.  A process that forks (Celery's prefork pool, a forking server)
must not let its children use the parent's pooled connections: two processes on one
PostgreSQL socket interleave their protocol messages (duplicate prepared statements,
"connection in transaction status", lost commits).  ``os.register_at_fork`` makes every
child drop the inherited pools without closing the parent's sockets, so the first session
in the child opens its own connection.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from ccat_data_transfer.core.config import database_url, normalise_database_url
from ccat_data_transfer.core.errors import DatabaseUnavailableError
from ccat_ops_db.migrate import upgrade

_engines: dict[str, Engine] = {}
_lock = threading.Lock()
#: One sessionmaker per engine: each sessionmaker makes a new Session subclass, whose
#: event dispatch SQLAlchemy builds on its first session, a cost every session paid.
_factories: weakref.WeakKeyDictionary[Engine, sessionmaker[Session]] = weakref.WeakKeyDictionary()


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL (None for other databases and for an in-memory one)."""
    if not url.startswith("sqlite"):
        return None
    db_path = url.split("///", 1)[1] if "///" in url else ""
    return Path(db_path) if db_path and db_path != ":memory:" else None


def _make_engine(url: str) -> Engine:
    # No folder is made here: only `init_database` creates the embedded database, so a
    # command that only reads never leaves an empty folder or database behind.
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            future=True,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        # pysqlite's default transaction handling is kept on purpose: it begins a
        # transaction only at the first write, so a manager that is only reading does
        # not block an in-process task that writes.  Managers commit before they submit
        # tasks; tasks receive IDs and open their own session.
        return engine
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=5,
        max_overflow=10,
        connect_args={"options": "-c timezone=UTC", "connect_timeout": 10},
        future=True,
    )


def get_engine(url: str | None = None) -> Engine:
    url = normalise_database_url(url) if url else database_url()
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _make_engine(url)
            _engines[url] = engine
        return engine


def dispose_engines() -> None:
    """Close every cached engine (tests, forked workers)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


def _forget_engines_in_child() -> None:
    """In a freshly forked child: drop the inherited pools, leave the parent's sockets open.

    ``dispose(close=False)`` discards the pool without sending anything on its connections
    (closing them here would end the parent's sessions); the cache is emptied so the child
    makes its own engines.  The lock is replaced because a fork can happen while another
    thread of the parent holds it.
    """
    global _lock
    _lock = threading.Lock()
    for engine in list(_engines.values()):
        engine.dispose(close=False)
    _engines.clear()


os.register_at_fork(after_in_child=_forget_engines_in_child)


def is_postgresql(session_or_engine: Session | Engine) -> bool:
    bind = (
        session_or_engine.get_bind()
        if isinstance(session_or_engine, Session)
        else session_or_engine
    )
    return bind.dialect.name == "postgresql"


class DatabaseConnection:
    """Entry point to the operations database, as used in the user's document."""

    def __init__(self, url: str | None = None) -> None:
        self.url = normalise_database_url(url) if url else database_url()

    @property
    def engine(self) -> Engine:
        return get_engine(self.url)

    def session_factory(self) -> sessionmaker[Session]:
        engine = self.engine
        with _lock:
            factory = _factories.get(engine)
            if factory is None:
                factory = sessionmaker(bind=engine, expire_on_commit=False, future=True)
                _factories[engine] = factory
        return factory

    def get_connection(self) -> tuple[Session, Engine]:
        """A new session and its engine; the caller closes the session."""
        return self.session_factory()(), self.engine

    @contextmanager
    def session_scope(self) -> Iterator[Session]:
        """A session committed on success and rolled back on error."""
        session = self.session_factory()()
        try:
            yield session
            session.commit()
        except Exception:
            session.rollback()
            raise
        finally:
            session.close()

    def check(self, *, must_exist: bool = True) -> None:
        """Raise DatabaseUnavailableError with a readable reason if the DB cannot be reached.

        With ``must_exist`` a missing SQLite file is that error too, before any connection
        (SQLite would create an empty file on connect)."""
        path = sqlite_file(self.url)
        if must_exist and path is not None and not path.is_file():
            raise DatabaseUnavailableError(f"no database at {path}; run `ccat_data_transfer init`")
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except OperationalError as exc:
            reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
            raise DatabaseUnavailableError(
                f"cannot reach the database at {_redact(self.url)}: {reason}"
            ) from None

    def has_schema(self) -> bool:
        return inspect(self.engine).has_table("data_location")


def _redact(url: str) -> str:
    """Hide a password in a URL before printing it."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        if ":" in creds:
            creds = creds.split(":", 1)[0] + ":***"
        return f"{scheme}://{creds}@{host}"
    return url


def init_database(url: str | None = None) -> DatabaseConnection:
    """Create or migrate the schema (Alembic upgrade head) and return the connection.  The
    one place that creates the embedded database's folder and file."""
    db = DatabaseConnection(url)
    path = sqlite_file(db.url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    db.check(must_exist=False)
    upgrade(db.url)
    return db
