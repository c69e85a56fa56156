"""Test fixtures shared by the whole suite.

Every DB test runs twice: on SQLite (the embedded default) and on PostgreSQL (a fresh
database created for this run and dropped at its end).  PostgreSQL is not optional: if it
does not answer, the tests fail, they do not skip.  Pick backends with
CCAT_TEST_BACKENDS=sqlite or =postgresql for a quick local run.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ["CCAT_DATA_TRANSFER_ENV"] = "test"
os.environ["CCAT_DATA_TRANSFER_EXECUTION_MODE"] = "embedded"

import pytest  # noqa: E402
from sqlalchemy import create_engine, select, text  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from ccat_data_transfer.core.celery_app import configure_celery  # noqa: E402
from ccat_data_transfer.core.config import settings  # noqa: E402
from ccat_data_transfer.core.database import DatabaseConnection, dispose_engines  # noqa: E402
from ccat_ops_db import models as m  # noqa: E402
from ccat_ops_db.migrate import upgrade  # noqa: E402
from ccat_ops_db.topology import load_topology  # noqa: E402
from helpers_postgres import fresh_database  # noqa: E402

pytest_plugins = ["fixtures_s3"]

BACKENDS = [
    b.strip()
    for b in os.environ.get("CCAT_TEST_BACKENDS", "sqlite,postgresql").split(",")
    if b.strip()
]
DEFAULT_TOPOLOGY = (
    Path(__file__).resolve().parent.parent
    / "src"
    / "ccat_data_transfer"
    / "topology"
    / "default.toml"
)

configure_celery()


@pytest.fixture(scope="session")
def pg_database_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test run, migrated to head."""
    with fresh_database("ccat_test") as url:
        upgrade(url)
        yield url


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SQLite file migrated to head once; each test gets a copy."""
    path = tmp_path_factory.mktemp("sqlite_template") / "template.sqlite"
    upgrade(f"sqlite:///{path}")
    dispose_engines()
    return path


def _truncate_all(url: str) -> None:
    engine = create_engine(url)
    tables = ", ".join(f'"{t.name}"' for t in m.Base.metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    engine.dispose()


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """URL of an empty, migrated database; parametrised over SQLite and PostgreSQL."""
    if request.param == "sqlite":
        path = tmp_path / "ops_db.sqlite"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        return f"sqlite:///{path}"
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_database_url")
        dispose_engines()
        _truncate_all(url)
        return url
    raise ValueError(f"unknown backend {request.param}")


@pytest.fixture
def override_settings() -> Iterator[Any]:
    """Call ``override_settings(KEY=value, ...)``; the old values come back after the test."""
    saved: dict[str, Any] = {}
    missing = object()

    def _set(**values: Any) -> None:
        for key, value in values.items():
            if key not in saved:
                saved[key] = settings.get(key, missing)
            settings.set(key, value)
        configure_celery()

    yield _set
    for key, value in saved.items():
        if value is missing:
            settings.unset(key)
        else:
            settings.set(key, value)
    configure_celery()


@dataclass
class System:
    """A loaded default topology on a fresh DB, with its data folder."""

    url: str
    data_dir: Path
    db: DatabaseConnection

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self.db.session_scope() as session:
            yield session

    def location(self, session: Session, name: str) -> m.DataLocation:
        return session.scalars(select(m.DataLocation).filter_by(name=name)).one()

    def location_path(self, name: str) -> Path:
        with self.session() as s:
            return Path(self.location(s, name).path)


@pytest.fixture
def system(db_url: str, tmp_path: Path, override_settings: Any) -> Iterator[System]:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    override_settings(DATA_DIR=str(data_dir), DATABASE_URL=db_url)
    db = DatabaseConnection(db_url)
    with db.session_scope() as session:
        load_topology(session, DEFAULT_TOPOLOGY, data_dir)
        for loc in session.scalars(select(m.DataLocation)):
            if loc.path:
                Path(loc.path).mkdir(parents=True, exist_ok=True)
    yield System(url=db_url, data_dir=data_dir, db=db)
    dispose_engines()


@pytest.fixture
def without_archive_repair(monkeypatch: pytest.MonkeyPatch) -> None:
    """No repair (or freeze) runs after a verification finds a bad archive copy: for tests
    of what the verification and the deletion rules do on their own."""
    import ccat_data_transfer.fixity.tasks  # noqa: F401 - its hook is registered first
    from ccat_data_transfer.archive import proof as archive_proof
    from ccat_data_transfer.archive import verification

    # The hooks are read where verify_copies runs (the verification module).
    monkeypatch.setattr(verification, "on_bad_copies", [])
    monkeypatch.setattr(archive_proof, "on_bad_copies", verification.on_bad_copies)
