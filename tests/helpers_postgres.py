"""Fresh PostgreSQL databases on the test server, for the tests and the benchmarks.

Imports neither pytest nor conftest: ``bench/`` puts ``tests/`` on ``sys.path`` and uses
it as it is.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from ccat_data_transfer.core.database import dispose_engines

PG_ADMIN_URL = os.environ.get(
    "CCAT_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def database_url(name: str) -> str:
    """The URL of database ``name`` on the test server."""
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name


def _create(admin, name: str) -> None:
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as exc:
        admin.dispose()
        raise RuntimeError(
            f"PostgreSQL is required and did not answer at {PG_ADMIN_URL}: {exc.orig}"
        ) from exc


def ensure_database(name: str) -> tuple[str, bool]:
    """The URL of database ``name``, created when missing, and whether it was there
    already (a benchmark keeps a filled database for its next run)."""
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            exists = conn.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}
            ).first()
        if not exists:
            _create(admin, name)
    finally:
        admin.dispose()
    return database_url(name), bool(exists)


@contextmanager
def fresh_database(prefix: str) -> Iterator[str]:
    """The URL of a new, empty database ``<prefix>_<random>``.  On leaving, this process's
    engines are disposed and the database is dropped, whoever is still connected."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    _create(admin, name)
    try:
        yield database_url(name)
    finally:
        dispose_engines()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
