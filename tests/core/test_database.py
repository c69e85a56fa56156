"""Database connection: the document's entry point, SQLite pragmas, clear errors."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from ccat_data_transfer.core.database import DatabaseConnection
from ccat_data_transfer.core.errors import DatabaseUnavailableError


def test_get_connection_returns_session_and_engine(system):
    session, engine = DatabaseConnection().get_connection()
    try:
        assert str(engine.url) == system.url or engine.url.render_as_string() == system.url
        assert session.execute(text("SELECT 1")).scalar() == 1
    finally:
        session.close()


def test_sqlite_runs_with_wal_and_foreign_keys(tmp_path):
    session, _ = DatabaseConnection(f"sqlite:///{tmp_path}/x.sqlite").get_connection()
    try:
        assert session.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert session.execute(text("PRAGMA foreign_keys")).scalar() == 1
    finally:
        session.close()


def test_unreachable_database_gives_a_clear_error():
    db = DatabaseConnection("postgresql+psycopg://nobody:secret@127.0.0.1:1/none")
    with pytest.raises(DatabaseUnavailableError) as err:
        db.check()
    assert "cannot reach the database" in str(err.value)
    assert "secret" not in str(err.value)


def _backend_id(session) -> str:
    if session.get_bind().dialect.name == "postgresql":
        return str(session.execute(text("SELECT pg_backend_pid()")).scalar())
    return str(id(session.connection().connection.dbapi_connection))


def test_forked_child_opens_its_own_connection_and_leaves_the_parents_alone(db_url):
    """A prefork worker's children never share the parent's pooled DB connection.

    The parent keeps a pooled connection across the fork (as ``worker`` does after queue
    discovery); the child's first session must be on a new server process, and the
    parent's connection must still work after the child has used its own and exited.
    """
    import os

    db = DatabaseConnection(db_url)
    with db.session_scope() as session:
        parent_backend = _backend_id(session)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its backend and exit without running pytest's teardown
        code = 1
        try:
            os.close(read_fd)
            with DatabaseConnection(db_url).session_scope() as child_session:
                child_backend = _backend_id(child_session)
                child_session.execute(text("SELECT 1"))
            os.write(write_fd, child_backend.encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    child_backend = os.read(read_fd, 100).decode()
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert child_backend and child_backend != parent_backend
    with db.session_scope() as session:
        assert _backend_id(session) == parent_backend  # the pooled connection is intact
        assert session.execute(text("SELECT 1")).scalar() == 1
