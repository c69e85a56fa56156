"""Small persistent state shared by manager processes (the ``manager_state`` table).

Room in the house: core, under the managers; it imports only the models.  Several
processes (one central manager, one per site, health beats from every worker) write the
same keys, so a write is one atomic upsert (``INSERT ... ON CONFLICT DO UPDATE`` on both
SQLite and PostgreSQL), never "read, then insert if missing": two processes that both
find no row would both insert, and the second would fail its whole cycle on the primary
key.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import bindparam, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from ccat_ops_db import models as m


def put_state(session: Session, key: str, value: str, now: datetime | None = None) -> None:
    """Set ``key`` to ``value`` (stamped ``now``), whether or not the row exists yet.

    Runs in the caller's transaction; the caller commits.
    """
    now = now or m.utcnow()
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(m.ManagerState).values(key=key, value=value, updated_at=now)
    statement = statement.on_conflict_do_update(
        index_elements=[m.ManagerState.key],
        set_={"value": statement.excluded.value, "updated_at": statement.excluded.updated_at},
    )
    session.execute(statement)


def get_state(session: Session, key: str) -> m.ManagerState | None:
    """The row of ``key``, or None."""
    return session.get(m.ManagerState, key)


_TABLE = m.ManagerState.__table__
_UPDATED_AT = select(_TABLE.c.updated_at).where(_TABLE.c.key == bindparam("key"))


def state_updated_at(session: Session, key: str) -> datetime | None:
    """When ``key`` was last set, or None: :func:`get_state`'s ``updated_at`` without
    loading the row as an object (a loop that only asks when it last ran)."""
    if session.autoflush:
        session.flush()
    return session.connection().execute(_UPDATED_AT, {"key": key}).scalar()
