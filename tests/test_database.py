"""Database connection: the document's entry point, SQLite pragmas, clear errors."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from ccat_data_transfer.database import DatabaseConnection
from ccat_data_transfer.exceptions import DatabaseUnavailableError


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
