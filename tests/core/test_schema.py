"""The schema: migrations agree with the models, enums are stored by name, the user's SQL runs."""

from __future__ import annotations

from datetime import timedelta

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, select, text

from ccat_ops_db import models as m
from ccat_ops_db.migrate import head_revision

DOC_SQL = (
    "SELECT pc.id, pc.type, pc.status, pc.deleted_at, dl.name AS location_name "
    "FROM physical_copy pc JOIN data_location dl ON pc.data_location_id = dl.id "
    "WHERE pc.status = 'DELETED' AND pc.deleted_at > NOW() - INTERVAL '24 hours' "
    "ORDER BY pc.deleted_at DESC;"
)


def test_migrations_and_models_agree(db_url):
    engine = create_engine(db_url)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        assert ctx.get_current_revision() == head_revision()
        diff = compare_metadata(ctx, m.Base.metadata)
    engine.dispose()
    assert diff == [], f"models and migrations differ: {diff}"


def test_schema_has_the_tables_the_document_names(db_url):
    engine = create_engine(db_url)
    tables = set(inspect(engine).get_table_names())
    engine.dispose()
    for name in (
        "data_location",
        "physical_copy",
        "raw_data_file",
        "raw_data_package",
        "data_transfer_package",
        "data_transfer",
        "long_term_archive_transfer",
        "staging_job",
        "deletion_log",
        "site",
        "data_transfer_route",
    ):
        assert name in tables


def _one_package_copy(session, system, status, deleted_at=None):
    loc = system.location(session, "ccat_telescope_buffer")
    module = session.scalars(select(m.InstrumentModule)).first()
    obs = m.ObsUnit(name="obs-1")
    eou = m.ExecutedObsUnit(name="obs-1-exec-1", obs_unit=obs)
    pkg = m.RawDataPackage(
        file_name="p1.tar",
        relative_path="p1.tar",
        size=10,
        executed_obs_unit=eou,
        instrument_module_id=module.id,
    )
    copy = m.RawDataPackagePhysicalCopy(
        raw_data_package=pkg, data_location=loc, status=status, deleted_at=deleted_at
    )
    session.add_all([obs, eou, pkg, copy])
    session.flush()
    return copy


def test_enums_are_stored_by_name(system):
    with system.session() as s:
        copy = _one_package_copy(s, system, m.PhysicalCopyStatus.DELETED, m.utcnow())
        raw = s.execute(
            text("SELECT status, type FROM physical_copy WHERE id = :id"), {"id": copy.id}
        ).one()
        loc_type = s.execute(
            text("SELECT location_type, storage_type FROM data_location WHERE name='cologne_lta'")
        ).one()
    assert raw == ("DELETED", "raw_data_package")
    assert loc_type == ("LONG_TERM_ARCHIVE", "DISK")


def test_polymorphic_classes_load_back(system):
    with system.session() as s:
        _one_package_copy(s, system, m.PhysicalCopyStatus.PRESENT)
    with system.session() as s:
        copy = s.scalars(select(m.PhysicalCopy)).one()
        assert isinstance(copy, m.RawDataPackagePhysicalCopy)
        assert isinstance(system.location(s, "cologne_lta"), m.DiskDataLocation)


def test_document_deletion_history_sql_runs_unchanged_on_postgresql(system):
    if not system.url.startswith("postgresql"):
        # NOW() and INTERVAL are PostgreSQL syntax; the document's query is for production.
        return
    with system.session() as s:
        recent = _one_package_copy(s, system, m.PhysicalCopyStatus.DELETED, m.utcnow())
        loc = system.location(s, "ccat_telescope_buffer")
        old = m.RawDataPackagePhysicalCopy(
            raw_data_package=recent.raw_data_package,
            data_location=loc,
            status=m.PhysicalCopyStatus.DELETED,
            deleted_at=m.utcnow() - timedelta(days=3),
        )
        s.add(old)
    with system.session() as s:
        rows = s.execute(text(DOC_SQL)).all()
    assert [r.id for r in rows] == [recent.id]
    assert rows[0].location_name == "ccat_telescope_buffer"
    assert rows[0].type == "raw_data_package"
