"""Safety properties of deletion: atomic claims, the worker's double-check, pressure that
never touches what must stay, exact pressure-driven freeing, and capped retries."""

from __future__ import annotations

import shutil
import threading
from datetime import timedelta

from sqlalchemy import select, update

from ccat_data_transfer import deletion_manager as dm
from ccat_data_transfer.buffers.cycle import BufferManager
from ccat_ops_db import models as m
from helpers_lifecycle import (
    copy_row,
    location,
    log_rows,
    make_package_at,
    object_exists,
    run_deletion_cycle,
    set_buffer_status,
)

S = m.PhysicalCopyStatus
A = m.PackageState.ARCHIVED


def _many_packages(system, n=6):
    with system.session() as s:
        return [
            make_package_at(system, s, ["ccat_telescope_buffer", "cologne_lta"], files=0)
            for _ in range(n)
        ]


def test_overlapping_claims_schedule_each_copy_once(system):
    pkgs = _many_packages(system)
    ids = [p.copy_ids["ccat_telescope_buffer"] for p in pkgs]
    with system.session() as s1:
        first = dm.claim_for_deletion(s1, ids[:4])
    with system.session() as s2:
        second = dm.claim_for_deletion(s2, ids[2:])
    assert first == sorted(ids[:4])
    assert second == sorted(ids[4:])  # the overlap was already claimed


def test_two_managers_claiming_at_once_in_threads_schedule_each_copy_once(system):
    pkgs = _many_packages(system, 20)
    ids = [p.copy_ids["ccat_telescope_buffer"] for p in pkgs]
    barrier = threading.Barrier(2)
    results: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def manager(name: str, candidates: list[int]) -> None:
        try:
            with system.session() as s:
                barrier.wait(timeout=30)
                results[name] = dm.claim_for_deletion(s, candidates)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [
        threading.Thread(target=manager, args=("a", ids)),
        threading.Thread(target=manager, args=("b", list(reversed(ids)))),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert set(results["a"]).isdisjoint(results["b"])
    assert sorted(results["a"] + results["b"]) == sorted(ids)


def test_copy_whose_rule_stops_holding_before_execution_is_not_deleted(system):
    with system.session() as s:
        pkg = make_package_at(system, s, ["ccat_telescope_buffer", "cologne_lta"], state=A)
    cid = pkg.copy_ids["ccat_telescope_buffer"]
    with system.session() as s:
        assert dm.claim_for_deletion(s, [cid]) == [cid]
    # Between scheduling and execution the only LTA copy is found lost.
    with system.session() as s:
        s.get(m.PhysicalCopy, pkg.copy_ids["cologne_lta"]).lost_at = m.utcnow()
    dm.delete_bulk_raw_data_packages.apply_async(args=[[cid]])
    assert object_exists(system, "ccat_telescope_buffer", pkg.relative_path)
    row = copy_row(system, cid)
    assert row.status == S.PRESENT and row.deleted_at is None
    outcome, reason = log_rows(system, cid)[-1]
    assert outcome == "SKIPPED" and reason == "no_lta_copy"
    for fid in pkg.file_copy_ids:  # and its raw files were not marked
        assert copy_row(system, fid).status == S.PRESENT


def test_raw_file_whose_rule_stops_holding_goes_back_to_deletion_possible(system):
    with system.session() as s:
        pkg = make_package_at(
            system,
            s,
            {"ccat_telescope_buffer": S.DELETED, "cologne_lta": S.PRESENT},
            file_status=S.DELETION_POSSIBLE,
            deletion_possible_at=m.utcnow(),
            files=1,
        )
    fid = pkg.file_copy_ids[0]
    with system.session() as s:
        assert dm.claim_for_deletion(s, [fid], [S.DELETION_POSSIBLE]) == [fid]
        s.get(m.PhysicalCopy, pkg.copy_ids["cologne_lta"]).status = S.DELETION_SCHEDULED
    dm.delete_bulk_raw_data_files.apply_async(args=[[fid]], kwargs={"queue_name": "q"})
    assert object_exists(system, "primecam_raw_data", pkg.file_paths[0])
    assert copy_row(system, fid).status == S.DELETION_POSSIBLE
    assert log_rows(system, fid)[-1][0] == "SKIPPED"


def test_at_99_percent_lta_untouched_and_nothing_unarchived_deleted(system, override_settings):
    override_settings(RETENTION_PERIOD_MINUTES=10**6)
    with system.session() as s:
        lta_only = make_package_at(system, s, ["cologne_lta", "us_lta"], files=1)
        unarchived = make_package_at(
            system, s, ["ccat_telescope_buffer"], state=m.PackageState.TRANSFERRING, files=2
        )
        # Files DELETION_POSSIBLE whose package is not ARCHIVED: pressure must not take them.
        odd = make_package_at(
            system,
            s,
            {"ccat_telescope_buffer": S.DELETED, "cologne_buffer": S.PRESENT},
            state=m.PackageState.TRANSFERRING,
            file_status=S.DELETION_POSSIBLE,
            deletion_possible_at=m.utcnow() - timedelta(days=1),
            files=2,
        )
        for name in (
            "primecam_raw_data",
            "ccat_telescope_buffer",
            "cologne_lta",
            "us_lta",
            "cologne_buffer",
        ):
            set_buffer_status(s, name, used_bytes=99, total_bytes=100)
    summary = run_deletion_cycle(system)
    assert summary["buffer_states"]["primecam_raw_data"] == "emergency"
    for name in ("cologne_lta", "us_lta"):
        assert object_exists(system, name, lta_only.relative_path)
        assert copy_row(system, lta_only.copy_ids[name]).status == S.PRESENT
    assert object_exists(system, "ccat_telescope_buffer", unarchived.relative_path)
    for p in (unarchived, odd, lta_only):
        for rel in p.file_paths:
            assert object_exists(system, "primecam_raw_data", rel)
    with system.session() as s:
        assert s.scalar(select(m.DeletionLog.id).limit(1)) is None


def _pressure_setup(system, files=10, size=990):
    """One archived package gone from the buffer; its files DELETION_POSSIBLE with
    staggered ages (file 0 the oldest) filling primecam_raw_data (capacity 10000 B)."""
    with system.session() as s:
        location(s, "primecam_raw_data").capacity_bytes = 10000
        pkg = make_package_at(
            system,
            s,
            {"ccat_telescope_buffer": S.DELETED, "cologne_lta": S.PRESENT},
            file_status=S.DELETION_POSSIBLE,
            deletion_possible_at=m.utcnow(),
            files=files,
            file_size=size,
        )
        now = m.utcnow()
        for i, cid in enumerate(pkg.file_copy_ids):
            s.execute(
                update(m.PhysicalCopy)
                .where(m.PhysicalCopy.id == cid)
                .values(deletion_possible_at=now - timedelta(minutes=100 - i))
            )
    return pkg


def test_pressure_frees_exactly_the_bytes_needed_oldest_first(system, override_settings):
    override_settings(RETENTION_PERIOD_MINUTES=10**6, BUFFER_EMERGENCY_TRIGGERS_DELETION=False)
    pkg = _pressure_setup(system)  # 9900 of 10000 bytes: 99 %
    with system.session() as s:
        status = BufferManager().run_once(s)["primecam_raw_data"]
    assert status["state"] == "emergency" and status["used_bytes"] == 9900
    run_deletion_cycle(system)
    # Threshold 85 %: 9900 - 8500 = 1400 bytes needed -> the two oldest files (1980 B).
    gone = [
        i
        for i, rel in enumerate(pkg.file_paths)
        if not object_exists(system, "primecam_raw_data", rel)
    ]
    assert gone == [0, 1]
    for i, cid in enumerate(pkg.file_copy_ids):
        row = copy_row(system, cid)
        assert row.status == (S.DELETED if i < 2 else S.DELETION_POSSIBLE)
        if i < 2:
            assert log_rows(system, cid) == [
                ("SCHEDULED", "buffer_pressure"),
                ("DELETED", "parent_package_archived"),
            ]
    # A second cycle on the same (stale) measurement frees nothing more.
    run_deletion_cycle(system)
    assert copy_row(system, pkg.file_copy_ids[2]).status == S.DELETION_POSSIBLE
    # Measured again: 7920 / 10000 = 79 %, below the threshold: nothing more.
    with system.session() as s:
        assert BufferManager().run_once(s)["primecam_raw_data"]["state"] == "warning"
    run_deletion_cycle(system)
    assert all(object_exists(system, "primecam_raw_data", rel) for rel in pkg.file_paths[2:])


def test_emergency_buffer_manager_deletes_eligible_data_at_once(system, override_settings):
    override_settings(RETENTION_PERIOD_MINUTES=10**6)
    pkg = _pressure_setup(system)
    with system.session() as s:
        result = BufferManager().run_once(s)
    assert result["deletion"]["deletion_possible_raw_data_files"] == 2
    assert not object_exists(system, "primecam_raw_data", pkg.file_paths[0])
    assert object_exists(system, "primecam_raw_data", pkg.file_paths[2])


def test_unknown_buffer_status_means_no_pressure_deletion(system, override_settings):
    override_settings(RETENTION_PERIOD_MINUTES=10**6)
    pkg = _pressure_setup(system)  # 99 % full, but never measured: status unknown
    summary = run_deletion_cycle(system)
    assert summary["buffer_states"]["primecam_raw_data"] == "unknown"
    assert all(object_exists(system, "primecam_raw_data", rel) for rel in pkg.file_paths)


def test_failed_deletion_is_retried_up_to_the_cap(system, override_settings):
    override_settings(DELETION_MAX_RETRIES=2)
    with system.session() as s:
        pkg = make_package_at(system, s, ["ccat_telescope_buffer", "cologne_lta"], files=0)
    cid = pkg.copy_ids["ccat_telescope_buffer"]
    # Make the delete fail for real (root-proof): the object's path is now a directory.
    target = system.location_path("ccat_telescope_buffer") / pkg.relative_path
    target.unlink()
    target.mkdir()
    (target / "inside").write_bytes(b"x")

    run_deletion_cycle(system)
    row = copy_row(system, cid)
    assert row.status == S.DELETION_FAILED and row.deletion_retry_count == 1 and row.last_error
    run_deletion_cycle(system)  # rescheduled by a later cycle, fails again
    assert copy_row(system, cid).deletion_retry_count == 2
    run_deletion_cycle(system)  # at the cap: left for a person
    row = copy_row(system, cid)
    assert row.status == S.DELETION_FAILED and row.deletion_retry_count == 2
    assert [o for o, _ in log_rows(system, cid)] == ["SCHEDULED", "FAILED", "SCHEDULED", "FAILED"]
    assert (target / "inside").exists()

    # Once the cause is fixed and the counter reset by an operator, it goes through.
    shutil.rmtree(target)
    target.write_bytes(b"p")
    with system.session() as s:
        s.execute(
            update(m.PhysicalCopy).where(m.PhysicalCopy.id == cid).values(deletion_retry_count=0)
        )
    run_deletion_cycle(system)
    assert copy_row(system, cid).status == S.DELETED
    assert not target.exists()


def test_doc_style_manual_scheduling_of_a_copy_not_deletable_is_refused(system):
    with system.session() as s:
        pkg = make_package_at(system, s, ["ccat_telescope_buffer"], state=A)
    cid = pkg.copy_ids["ccat_telescope_buffer"]
    with system.session() as s:
        s.get(m.PhysicalCopy, cid).status = S.DELETION_SCHEDULED
    dm.delete_physical_copy.apply_async(args=[cid], kwargs={"queue_name": "x"}, queue="x")
    assert object_exists(system, "ccat_telescope_buffer", pkg.relative_path)
    assert copy_row(system, cid).status == S.PRESENT


def test_physical_copy_rows_are_never_removed(system, override_settings):
    override_settings(RETENTION_PERIOD_MINUTES=0)
    with system.session() as s:
        make_package_at(system, s, ["ccat_telescope_buffer", "cologne_lta"], files=3)
        before = s.query(m.PhysicalCopy).count()
    run_deletion_cycle(system)
    with system.session() as s:
        assert s.query(m.PhysicalCopy).count() == before
        assert s.query(m.PhysicalCopy).filter_by(status=S.DELETED).count() == 4
