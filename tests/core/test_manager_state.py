"""Manager state: one atomic upsert, so processes that start together never collide."""

from __future__ import annotations

from datetime import timedelta

from ccat_data_transfer.core.database import DatabaseConnection
from ccat_data_transfer.core.manager_state import get_state, put_state, state_updated_at
from ccat_ops_db import models as m


def test_two_processes_that_both_find_no_row_both_write_the_state(db_url):
    """The race of two managers starting at once: both read "no row", both write."""
    db = DatabaseConnection(db_url)
    first, _ = db.get_connection()
    second, _ = db.get_connection()
    try:
        assert get_state(first, "deletion:mark_catch_up") is None
        assert get_state(second, "deletion:mark_catch_up") is None
        put_state(first, "deletion:mark_catch_up", "3")
        first.commit()
        put_state(second, "deletion:mark_catch_up", "5")  # no unique violation
        second.commit()
    finally:
        first.close()
        second.close()
    with db.session_scope() as session:
        assert get_state(session, "deletion:mark_catch_up").value == "5"


def test_put_state_updates_value_and_time_of_an_existing_row(db_url):
    db = DatabaseConnection(db_url)
    then = m.utcnow() - timedelta(hours=1)
    with db.session_scope() as session:
        put_state(session, "k", "old", now=then)
    now = m.utcnow()
    with db.session_scope() as session:
        put_state(session, "k", "new", now=now)
    with db.session_scope() as session:
        row = get_state(session, "k")
        assert row.value == "new"
        assert abs((row.updated_at - now).total_seconds()) < 1


def test_state_updated_at_is_the_time_of_the_row_or_none(db_url):
    """The time alone, as the row has it; None for a key never set; a write pending in the
    same session counts (flushed first, as a query of the session would)."""
    db = DatabaseConnection(db_url)
    then = m.utcnow() - timedelta(minutes=30)
    with db.session_scope() as session:
        assert state_updated_at(session, "k") is None
        put_state(session, "k", "v", now=then)
    with db.session_scope() as session:
        assert state_updated_at(session, "k") == get_state(session, "k").updated_at
        assert abs((state_updated_at(session, "k") - then).total_seconds()) < 1
        session.add(m.ManagerState(key="pending", value="x", updated_at=then))
        assert state_updated_at(session, "pending") is not None
