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
