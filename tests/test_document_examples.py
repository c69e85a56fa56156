"""The Python examples of the user's lifecycle document, run as written (ids and names
substituted where the document uses placeholders) against a populated database."""

from __future__ import annotations

import pytest

from ccat_ops_db import models as m
from helpers_lifecycle import (
    copy_row,
    make_dtp,
    make_package_at,
    make_transfer,
    object_exists,
    set_buffer_status,
)

S = m.PhysicalCopyStatus


@pytest.fixture
def populated(system, override_settings):
    """A DB with deletable and kept packages at several locations, and a DTP."""
    override_settings(RETENTION_PERIOD_MINUTES=10**6)
    with system.session() as s:
        deletable = [
            make_package_at(system, s, ["ccat_telescope_buffer", "cologne_lta"]) for _ in range(2)
        ]
        at_lta_buffer = make_package_at(system, s, ["cologne_buffer", "cologne_lta"])
        kept = make_package_at(system, s, ["ccat_telescope_buffer", "cologne_buffer"])
        dtp = make_dtp(system, s, [p.package_id for p in deletable], ["ccat_telescope_buffer"])
        make_transfer(s, dtp.dtp_id, "ccat_telescope_buffer", "cologne_buffer")
        set_buffer_status(s, "cologne_buffer", used_bytes=42, total_bytes=100)
    return {
        "system": system,
        "deletable": deletable,
        "at_lta_buffer": at_lta_buffer,
        "kept": kept,
        "dtp": dtp,
    }


def test_inspect_deletable_data_example_runs_as_written(populated, capsys):
    from ccat_data_transfer.core.database import DatabaseConnection
    from ccat_data_transfer.deletion_manager import (
        find_deletable_data_transfer_packages,
        find_deletable_raw_data_packages_by_location,
    )

    # Get database connection
    db = DatabaseConnection()
    session, _ = db.get_connection()

    try:
        # Find deletable RawDataPackages by location
        deletable_packages = find_deletable_raw_data_packages_by_location(session)

        print("\n=== Deletable RawDataPackages ===")
        for location, packages in deletable_packages.items():
            total_size = sum(p.size for p in packages)
            print(f"\nLocation: {location.name} ({location.location_type.value})")
            print(f"  Site: {location.site.name}")
            print(f"  Packages: {len(packages)}")
            print(f"  Total size: {total_size / (1024**3):.2f} GB")

        # Find deletable DataTransferPackages
        deletable_transfers = find_deletable_data_transfer_packages(session)

        print("\n=== Deletable DataTransferPackages ===")
        for package, location in deletable_transfers:
            print(f"Package: {package.file_name}")
            print(f"  Location: {location.name}")
            print(f"  Size: {package.size / (1024**3):.2f} GB")

    finally:
        session.close()

    out = capsys.readouterr().out
    assert "Location: ccat_telescope_buffer (buffer)" in out
    assert "Site: ccat" in out and "Packages: 2" in out
    assert "Location: cologne_buffer (buffer)" in out and "Site: cologne" in out
    assert f"Package: {populated['dtp'].file_name}" in out
    assert populated["kept"].file_name not in out


def test_trigger_manual_deletion_cycle_example_runs_as_written(populated, capsys):
    from ccat_data_transfer.deletion_manager import delete_data_packages

    # Run one deletion cycle with verbose logging
    delete_data_packages(verbose=True)
    print("Deletion cycle completed")

    assert "Deletion cycle completed" in capsys.readouterr().out
    for p in populated["deletable"]:
        assert (
            copy_row(populated["system"], p.copy_ids["ccat_telescope_buffer"]).status == S.DELETED
        )
    kept = populated["kept"]
    assert copy_row(populated["system"], kept.copy_ids["ccat_telescope_buffer"]).status == S.PRESENT


def test_schedule_specific_deletion_example_runs_as_written(populated, system, capsys):
    target_id = populated["deletable"][0].copy_ids["ccat_telescope_buffer"]

    from ccat_data_transfer.core.database import DatabaseConnection
    from ccat_data_transfer.core.operation_types import OperationType
    from ccat_data_transfer.core.queues import route_task_by_location
    from ccat_data_transfer.deletion_manager import delete_physical_copy
    from ccat_ops_db import models

    db = DatabaseConnection()
    session, _ = db.get_connection()

    try:
        # Find a specific physical copy to delete
        physical_copy = (
            session.query(models.RawDataPackagePhysicalCopy)
            .filter(
                models.RawDataPackagePhysicalCopy.id == target_id,
                models.RawDataPackagePhysicalCopy.status == models.PhysicalCopyStatus.PRESENT,
            )
            .first()
        )

        if physical_copy:
            # Safety check: Verify it's actually deletable
            # (Add your safety checks here based on location type and package state)

            # Mark as scheduled
            physical_copy.status = models.PhysicalCopyStatus.DELETION_SCHEDULED
            session.commit()

            # Route to appropriate queue
            queue_name = route_task_by_location(OperationType.DELETION, physical_copy.data_location)

            # Schedule deletion task
            delete_physical_copy.apply_async(
                args=[physical_copy.id], kwargs={"queue_name": queue_name}, queue=queue_name
            )

            print(f"Scheduled deletion of physical copy {physical_copy.id}")

    finally:
        session.close()

    assert f"Scheduled deletion of physical copy {target_id}" in capsys.readouterr().out
    assert copy_row(system, target_id).status == S.DELETED
    assert not object_exists(
        system, "ccat_telescope_buffer", populated["deletable"][0].relative_path
    )


def test_check_buffer_status_example_runs_as_written(populated, capsys):
    from ccat_data_transfer.deletion_manager import get_buffer_status_for_location

    status = get_buffer_status_for_location("cologne_buffer")
    print(f"Disk usage: {status.get('disk_usage_percent')}%")

    assert "Disk usage: 42.0%" in capsys.readouterr().out
    assert get_buffer_status_for_location("us_buffer") == {}


def test_query_deletion_candidates_example_runs_as_written(populated, capsys):
    from ccat_data_transfer.core.database import DatabaseConnection
    from ccat_data_transfer.deletion_manager import find_deletable_raw_data_packages_by_location

    db = DatabaseConnection()
    session, _ = db.get_connection()
    deletable = find_deletable_raw_data_packages_by_location(session)
    for location, packages in deletable.items():
        print(f"{location.name}: {len(packages)} packages")
    session.close()

    out = capsys.readouterr().out
    assert "ccat_telescope_buffer: 2 packages" in out
    assert "cologne_buffer: 1 packages" in out


def test_deletion_history_sql_of_the_document_runs(populated, system):
    from sqlalchemy import text

    from ccat_data_transfer.deletion_manager import delete_data_packages

    delete_data_packages()
    with system.session() as s:
        if s.get_bind().dialect.name != "postgresql":
            pytest.skip("the document's SQL uses PostgreSQL's NOW() - INTERVAL")
        rows = s.execute(
            text(
                "SELECT pc.id, pc.type, pc.status, pc.deleted_at, dl.name as location_name "
                "FROM physical_copy pc JOIN data_location dl ON pc.data_location_id = dl.id "
                "WHERE pc.status = 'DELETED' AND pc.deleted_at > NOW() - INTERVAL '24 hours' "
                "ORDER BY pc.deleted_at DESC;"
            )
        ).all()
    assert {r.location_name for r in rows} >= {"ccat_telescope_buffer", "cologne_buffer"}
