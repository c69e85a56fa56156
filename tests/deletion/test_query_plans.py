"""Query plans at observatory scale (PostgreSQL only).

A fresh database is filled with 100,000 raw files (the idle state of
``bench/deletion_scale.py``: 2,000 packages, 200 of them in transfer), analysed, and one
cycle of every manager is run with a ``before_cursor_execute`` listener that records
each statement and its parameters (and so is ``deletion_history`` of a copy of the
history).  Every recorded SELECT / UPDATE / DELETE (and
``WITH`` / ``INSERT ... SELECT``) is then explained with ``EXPLAIN (FORMAT JSON)``; no
plan may read a big table (raw_data_file, physical_copy, raw_data_package,
deletion_log, deletion_log_copy, when it holds at least 10,000 rows) with a sequential scan.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, event, text

from ccat_data_transfer import deletion_manager, staging_manager, transfer_manager
from ccat_data_transfer.archive import cycle as archive_manager
from ccat_data_transfer.core.database import DatabaseConnection, dispose_engines
from ccat_data_transfer.packaging import raw_cycle, transfer_cycle
from ccat_ops_db.migrate import upgrade
from ccat_ops_db.topology import load_topology
from conftest import BACKENDS, DEFAULT_TOPOLOGY
from helpers_postgres import fresh_database

pytestmark = pytest.mark.skipif(
    "postgresql" not in BACKENDS, reason="query plans are checked on PostgreSQL only"
)

N_FILES = 100_000
N_PACKAGES = 2_000
INFLIGHT = 200
BIG_TABLES = (
    "raw_data_file",
    "physical_copy",
    "raw_data_package",
    "deletion_log",
    "deletion_log_copy",
)
BIG_ROWS = 10_000
MANAGERS = {
    "deletion_manager": deletion_manager.run_once,
    "transfer_manager": transfer_manager.run_once,
    "archive_manager": archive_manager.run_once,
    "raw_data_package_manager": raw_cycle.run_once,
    "data_transfer_package_manager": transfer_cycle.run_once,
    "staging_manager": staging_manager.run_once,
    # The trail of a copy of the history (the fill's copy 1: DELETED, with a batch row).
    "deletion_history": lambda session: deletion_manager.deletion_history(session, 1),
}


def _bench_fill():
    path = Path(__file__).resolve().parents[2] / "bench" / "deletion_fill.py"
    spec = importlib.util.spec_from_file_location("_bench_deletion_fill", path)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod.fill


@pytest.fixture(scope="module")
def big_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with fresh_database("ccat_plans") as url:
        upgrade(url)
        data_dir = tmp_path_factory.mktemp("plans_data")
        db = DatabaseConnection(url)
        with db.session_scope() as session:
            load_topology(session, DEFAULT_TOPOLOGY, data_dir)
        engine = create_engine(url)
        with engine.begin() as conn:
            _bench_fill()(conn, N_FILES, N_PACKAGES, INFLIGHT)
        engine.dispose()
        vac = create_engine(url, isolation_level="AUTOCOMMIT")
        with vac.connect() as conn:
            conn.execute(text("ANALYZE"))
        vac.dispose()
        yield url, data_dir


def _seq_scans(plan: dict[str, Any], big: set[str]) -> list[str]:
    found = []
    if plan.get("Node Type") == "Seq Scan" and plan.get("Relation Name") in big:
        found.append(plan["Relation Name"])
    for child in plan.get("Plans", []):
        found += _seq_scans(child, big)
    return found


def _explainable(sql: str) -> bool:
    head = sql.lstrip().split(None, 1)[0].upper() if sql.strip() else ""
    if head in ("SELECT", "UPDATE", "DELETE", "WITH"):
        return True
    return head == "INSERT" and " SELECT " in " ".join(sql.upper().split())


@pytest.mark.parametrize("manager", list(MANAGERS))
def test_manager_cycle_reads_no_big_table_sequentially(
    big_db: tuple[str, Path], manager: str, override_settings: Any
) -> None:
    url, data_dir = big_db
    override_settings(DATABASE_URL=url, DATA_DIR=str(data_dir))
    dispose_engines()
    db = DatabaseConnection(url)
    captured: list[tuple[str, Any]] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:
        if not executemany and _explainable(statement):
            captured.append((statement, parameters))

    with db.session_scope() as session:
        engine = session.get_bind()
        event.listen(engine, "before_cursor_execute", record)
        try:
            MANAGERS[manager](session)
        finally:
            event.remove(engine, "before_cursor_execute", record)
        session.rollback()
    assert captured, f"{manager} ran no query"

    explain_engine = create_engine(url)
    offenders = []
    with explain_engine.connect() as conn:
        rows = conn.execute(
            text("SELECT relname, reltuples FROM pg_class WHERE relname = ANY(:names)"),
            {"names": list(BIG_TABLES)},
        ).all()
        big = {name for name, tuples in rows if tuples >= BIG_ROWS}
        assert {"raw_data_file", "physical_copy", "deletion_log", "deletion_log_copy"} <= big
        raw = conn.connection.dbapi_connection
        for statement, parameters in captured:
            with raw.cursor() as cur:
                cur.execute("EXPLAIN (FORMAT JSON) " + statement, parameters)
                doc = cur.fetchone()[0]
            raw.rollback()
            plan = (json.loads(doc) if isinstance(doc, str) else doc)[0]["Plan"]
            scans = _seq_scans(plan, big)
            if scans:
                offenders.append(f"{sorted(set(scans))}: {' '.join(statement.split())[:600]}")
    explain_engine.dispose()
    dispose_engines()
    assert not offenders, f"{manager}: sequential scans on big tables:\n" + "\n\n".join(offenders)


def test_plan_check_flags_a_sequential_scan_of_a_big_table(big_db: tuple[str, Path]) -> None:
    """The check itself can fail: an unindexed filter on physical_copy is reported."""
    url, _ = big_db
    engine = create_engine(url)
    with engine.connect() as conn:
        doc = conn.execute(
            text("EXPLAIN (FORMAT JSON) SELECT id FROM physical_copy WHERE size + 1 > 0")
        ).scalar_one()
    engine.dispose()
    plan = (json.loads(doc) if isinstance(doc, str) else doc)[0]["Plan"]
    assert _seq_scans(plan, {"physical_copy"}) == ["physical_copy"]
