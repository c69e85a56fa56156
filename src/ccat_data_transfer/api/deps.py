"""Shared FastAPI dependencies: the DB session of a request."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import Request
from sqlalchemy.orm import Session

from ccat_data_transfer.core.database import DatabaseConnection


def get_db(request: Request) -> DatabaseConnection:
    """The app's DatabaseConnection (``create_app(database_url=...)`` or the settings)."""
    db = getattr(request.app.state, "db", None)
    return db if db is not None else DatabaseConnection()


def get_session(request: Request) -> Iterator[Session]:
    """A session per request: committed when the endpoint returns, rolled back on error."""
    with get_db(request).session_scope() as session:
        yield session


#: Largest row id the API accepts: ids are 32-bit integers on PostgreSQL; a larger
#: number can name nothing, and is refused (422) before it reaches the database.
MAX_ID = 2**31 - 1
