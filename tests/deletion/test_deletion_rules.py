"""The Deletion Decision Matrix of the user's document, one test per row (both directions).

Each test builds rows and real files, runs one deletion cycle (embedded mode: the tasks
run inline), then checks the storage (file gone / still there), the copy's status and
``deleted_at``, and the ``deletion_log`` rows.
"""

from __future__ import annotations

import json
from datetime import timedelta

from ccat_data_transfer import deletion_manager as dm
from ccat_ops_db import models as m
from helpers_lifecycle import (
    copy_row,
    log_rows,
    make_dtp,
    make_package_at,
    make_processing_files,
    make_staging_job,
    make_transfer,
    object_exists,
    run_deletion_cycle,
    scheduled_batch_rows,
)

S = m.PhysicalCopyStatus
A = m.PackageState.ARCHIVED


def assert_deleted(system, location_name, rel, copy_id):
    assert not object_exists(system, location_name, rel)
    row = copy_row(system, copy_id)
    assert row.status == S.DELETED
    assert row.deleted_at is not None
    outcomes = [o for o, _ in log_rows(system, copy_id)]
    assert outcomes == ["SCHEDULED", "DELETED"], outcomes


def assert_kept(system, location_name, rel, copy_id, status=S.PRESENT):
    assert object_exists(system, location_name, rel)
    row = copy_row(system, copy_id)
    assert row.status == status
    assert row.deleted_at is None
    assert log_rows(system, copy_id) == []


# --- RawDataPackage / SOURCE buffer -------------------------------------------------------


def test_raw_package_at_source_buffer_deleted_when_present_in_lta_and_archived(system):
    with system.session() as s:
        pkg = make_package_at(system, s, ["ccat_telescope_buffer", "cologne_lta"], state=A)
    run_deletion_cycle(system)
    assert_deleted(
        system, "ccat_telescope_buffer", pkg.relative_path, pkg.copy_ids["ccat_telescope_buffer"]
    )
    assert_kept(system, "cologne_lta", pkg.relative_path, pkg.copy_ids["cologne_lta"])
    # Side effect: the package left the source site, its raw files become DELETION_POSSIBLE.
    for cid in pkg.file_copy_ids:
        row = copy_row(system, cid)
        assert row.status == S.DELETION_POSSIBLE and row.deletion_possible_at is not None
    for rel in pkg.file_paths:  # retention not over: the files are still there
        assert object_exists(system, "primecam_raw_data", rel)


def test_raw_package_kept_at_source_when_lta_copy_is_deletion_scheduled(system):
    with system.session() as s:
        pkg = make_package_at(
            system,
            s,
            {"ccat_telescope_buffer": S.PRESENT, "cologne_lta": S.DELETION_SCHEDULED},
            state=A,
        )
    run_deletion_cycle(system)
    assert_kept(
        system, "ccat_telescope_buffer", pkg.relative_path, pkg.copy_ids["ccat_telescope_buffer"]
    )
    assert copy_row(system, pkg.copy_ids["cologne_lta"]).status == S.DELETION_SCHEDULED
    with system.session() as s:
        item = dm.explain_copy(s, pkg.copy_ids["ccat_telescope_buffer"])
    assert not item.deletable
    assert "no PRESENT copy at a LONG_TERM_ARCHIVE" in item.reason
    assert "cologne_lta copy is DELETION_SCHEDULED" in item.reason


def test_raw_package_kept_at_source_when_only_other_copy_is_at_lta_site_buffer(system):
    with system.session() as s:
        pkg = make_package_at(system, s, ["ccat_telescope_buffer", "cologne_buffer"], state=A)
    run_deletion_cycle(system)
    assert_kept(
        system, "ccat_telescope_buffer", pkg.relative_path, pkg.copy_ids["ccat_telescope_buffer"]
    )
    assert_kept(system, "cologne_buffer", pkg.relative_path, pkg.copy_ids["cologne_buffer"])
    with system.session() as s:
        pc = s.get(m.PhysicalCopy, pkg.copy_ids["ccat_telescope_buffer"])
        assert not dm.can_delete_raw_data_package_from_source_buffer(
            s, pc.raw_data_package, pc.data_location
        )


def test_raw_package_kept_at_source_when_lta_copy_is_lost(system):
    with system.session() as s:
        pkg = make_package_at(
            system, s, ["ccat_telescope_buffer", "cologne_lta"], state=A, lost=("cologne_lta",)
        )
    run_deletion_cycle(system)
    assert_kept(
        system, "ccat_telescope_buffer", pkg.relative_path, pkg.copy_ids["ccat_telescope_buffer"]
    )


def test_raw_package_kept_at_source_until_state_is_archived(system):
    with system.session() as s:
        pkg = make_package_at(
            system, s, ["ccat_telescope_buffer", "cologne_lta"], state=m.PackageState.TRANSFERRING
        )
    run_deletion_cycle(system)
    assert_kept(
        system, "ccat_telescope_buffer", pkg.relative_path, pkg.copy_ids["ccat_telescope_buffer"]
    )
    for cid in pkg.file_copy_ids:
        assert copy_row(system, cid).status == S.PRESENT


# --- RawDataPackage / LTA site buffer -----------------------------------------------------


def test_raw_package_at_lta_site_buffer_deleted_when_present_in_same_site_lta(system):
    with system.session() as s:
        pkg = make_package_at(system, s, ["cologne_buffer", "cologne_lta"], state=A)
    run_deletion_cycle(system)
    assert_deleted(system, "cologne_buffer", pkg.relative_path, pkg.copy_ids["cologne_buffer"])
    assert_kept(system, "cologne_lta", pkg.relative_path, pkg.copy_ids["cologne_lta"])


def test_raw_package_kept_at_lta_site_buffer_when_only_other_site_lta_has_it(system):
    with system.session() as s:
        pkg = make_package_at(system, s, ["cologne_buffer", "us_lta"], state=A)
    run_deletion_cycle(system)
    assert_kept(system, "cologne_buffer", pkg.relative_path, pkg.copy_ids["cologne_buffer"])
    with system.session() as s:
        pc = s.get(m.PhysicalCopy, pkg.copy_ids["cologne_buffer"])
        assert not dm.can_delete_raw_data_package_from_lta_buffer(
            s, pc.raw_data_package, pc.data_location
        )
        assert "same site cologne" in dm.explain_copy(s, pc.id).reason


# --- RawDataPackage / LTA DataLocation ----------------------------------------------------


def test_raw_package_never_deleted_from_long_term_archive(system):
    with system.session() as s:
        pkg = make_package_at(system, s, ["cologne_lta", "us_lta"], state=A)
    run_deletion_cycle(system)
    assert_kept(system, "cologne_lta", pkg.relative_path, pkg.copy_ids["cologne_lta"])
    assert_kept(system, "us_lta", pkg.relative_path, pkg.copy_ids["us_lta"])


def test_worker_refuses_a_long_term_archive_copy_even_when_scheduled_by_hand(system):
    with system.session() as s:
        pkg = make_package_at(
            system, s, {"cologne_lta": S.DELETION_SCHEDULED, "us_lta": S.PRESENT}, state=A
        )
    dm.delete_physical_copy.apply_async(args=[pkg.copy_ids["cologne_lta"]])
    assert object_exists(system, "cologne_lta", pkg.relative_path)
    row = copy_row(system, pkg.copy_ids["cologne_lta"])
    # Left as found: the deletion path never changes an archive copy (issue 18); it was
    # turned back into PRESENT here before, without anyone knowing its bytes were there.
    assert row.status == S.DELETION_SCHEDULED and row.deleted_at is None
    assert log_rows(system, row.id) == [("SKIPPED", "long_term_archive")]
    with system.session() as s:  # the claim itself never takes an LTA copy either
        assert dm.claim_for_deletion(s, [pkg.copy_ids["us_lta"]]) == []


# --- DataTransferPackage / SOURCE buffer --------------------------------------------------


def test_dtp_at_source_buffer_deleted_after_transfer_and_unpack_completed(system):
    with system.session() as s:
        dtp = make_dtp(system, s, locations=["ccat_telescope_buffer", "cologne_buffer"])
        make_transfer(s, dtp.dtp_id, "ccat_telescope_buffer", "cologne_buffer")
    run_deletion_cycle(system)
    assert_deleted(
        system, "ccat_telescope_buffer", dtp.relative_path, dtp.copy_ids["ccat_telescope_buffer"]
    )


def test_dtp_kept_at_source_when_transfer_completed_but_unpack_failed(system):
    with system.session() as s:
        dtp = make_dtp(system, s, locations=["ccat_telescope_buffer"])
        make_transfer(
            s, dtp.dtp_id, "ccat_telescope_buffer", "cologne_buffer", unpack_status=m.Status.FAILED
        )
    run_deletion_cycle(system)
    assert_kept(
        system, "ccat_telescope_buffer", dtp.relative_path, dtp.copy_ids["ccat_telescope_buffer"]
    )
    with system.session() as s:
        item = dm.explain_copy(s, dtp.copy_ids["ccat_telescope_buffer"])
    assert "unpack FAILED" in item.reason


# --- DataTransferPackage / LTA site buffer ------------------------------------------------


def test_dtp_at_lta_site_buffer_deleted_when_unpacked_at_all_lta_sites(system):
    with system.session() as s:
        dtp = make_dtp(system, s, locations=["cologne_buffer"])
        make_transfer(s, dtp.dtp_id, "ccat_telescope_buffer", "cologne_buffer")
        make_transfer(s, dtp.dtp_id, "cologne_buffer", "us_buffer", is_primary=False)
    run_deletion_cycle(system)
    assert_deleted(system, "cologne_buffer", dtp.relative_path, dtp.copy_ids["cologne_buffer"])


def test_dtp_kept_at_lta_site_buffer_when_unpacked_at_one_of_two_lta_sites(system):
    with system.session() as s:
        dtp = make_dtp(system, s, locations=["cologne_buffer"])
        make_transfer(s, dtp.dtp_id, "ccat_telescope_buffer", "cologne_buffer")
        make_transfer(
            s,
            dtp.dtp_id,
            "cologne_buffer",
            "us_buffer",
            status=m.Status.IN_PROGRESS,
            unpack_status=m.Status.PENDING,
            is_primary=False,
        )
    run_deletion_cycle(system)
    assert_kept(system, "cologne_buffer", dtp.relative_path, dtp.copy_ids["cologne_buffer"])
    with system.session() as s:
        assert "missing us" in dm.explain_copy(s, dtp.copy_ids["cologne_buffer"]).reason


# --- DataTransferPackage / LTA DataLocation -----------------------------------------------


def test_dtp_never_deleted_from_long_term_archive(system):
    with system.session() as s:
        dtp = make_dtp(system, s, locations=["cologne_lta"])
        make_transfer(s, dtp.dtp_id, "ccat_telescope_buffer", "cologne_buffer")
        make_transfer(s, dtp.dtp_id, "cologne_buffer", "us_buffer", is_primary=False)
    run_deletion_cycle(system)
    assert_kept(system, "cologne_lta", dtp.relative_path, dtp.copy_ids["cologne_lta"])


# --- RawDataFile / SOURCE (two stages) ----------------------------------------------------


def test_raw_file_deletion_possible_deleted_after_retention(system, override_settings):
    override_settings(RETENTION_PERIOD_MINUTES=60)
    old = m.utcnow() - timedelta(minutes=61)
    with system.session() as s:
        pkg = make_package_at(
            system,
            s,
            {"ccat_telescope_buffer": S.DELETED, "cologne_lta": S.PRESENT},
            file_status=S.DELETION_POSSIBLE,
            deletion_possible_at=old,
        )
    run_deletion_cycle(system)
    for cid, rel in zip(pkg.file_copy_ids, pkg.file_paths, strict=True):
        assert_deleted(system, "primecam_raw_data", rel, cid)


def test_raw_file_kept_before_retention_in_normal_state(system, override_settings):
    override_settings(RETENTION_PERIOD_MINUTES=60)
    recent = m.utcnow() - timedelta(minutes=59)
    with system.session() as s:
        pkg = make_package_at(
            system,
            s,
            {"ccat_telescope_buffer": S.DELETED, "cologne_lta": S.PRESENT},
            file_status=S.DELETION_POSSIBLE,
            deletion_possible_at=recent,
        )
        from helpers_lifecycle import set_buffer_status

        set_buffer_status(s, "primecam_raw_data", used_bytes=10, total_bytes=100)  # normal
    run_deletion_cycle(system)
    for cid, rel in zip(pkg.file_copy_ids, pkg.file_paths, strict=True):
        assert_kept(system, "primecam_raw_data", rel, cid, status=S.DELETION_POSSIBLE)
    with system.session() as s:
        assert "retention until" in dm.explain_copy(s, pkg.file_copy_ids[0]).reason


def test_location_retention_override_wins_over_the_setting(system, override_settings):
    override_settings(RETENTION_PERIOD_MINUTES=100000)
    with system.session() as s:
        system.location(s, "primecam_raw_data").retention_period_minutes = 10
        pkg = make_package_at(
            system,
            s,
            {"ccat_telescope_buffer": S.DELETED, "cologne_lta": S.PRESENT},
            file_status=S.DELETION_POSSIBLE,
            deletion_possible_at=m.utcnow() - timedelta(minutes=11),
        )
    run_deletion_cycle(system)
    assert copy_row(system, pkg.file_copy_ids[0]).status == S.DELETED


def test_raw_file_present_kept_while_parent_package_is_at_source_buffer(system, override_settings):
    override_settings(RETENTION_PERIOD_MINUTES=0)
    with system.session() as s:
        pkg = make_package_at(system, s, ["ccat_telescope_buffer", "cologne_buffer"], state=A)
    run_deletion_cycle(system)
    for cid, rel in zip(pkg.file_copy_ids, pkg.file_paths, strict=True):
        assert_kept(system, "primecam_raw_data", rel, cid)


def test_raw_files_go_through_both_stages_in_two_cycles(system, override_settings):
    override_settings(RETENTION_PERIOD_MINUTES=0)
    with system.session() as s:
        pkg = make_package_at(system, s, ["ccat_telescope_buffer", "cologne_lta"], state=A)
    first = run_deletion_cycle(system)
    assert first["raw_data_packages"] == 1
    # Retention 0: the marked files are deleted in the same cycle's fifth step.
    for cid, rel in zip(pkg.file_copy_ids, pkg.file_paths, strict=True):
        assert_deleted(system, "primecam_raw_data", rel, cid)
    with system.session() as s:
        marks = s.query(m.DeletionLog).filter_by(outcome=m.DeletionOutcome.MARKED_POSSIBLE).all()
        assert len(marks) == 1 and "2 raw file copies" in marks[0].message


# --- RawDataFile / PROCESSING -------------------------------------------------------------


def test_processing_files_deleted_when_no_active_staging_job(system):
    with system.session() as s:
        pkg = make_package_at(system, s, ["cologne_lta"], state=A, files=2)
        ids = make_processing_files(s, pkg, package_copy_status=None)
        make_staging_job(s, [pkg.package_id], active=False)
    run_deletion_cycle(system)
    for cid, rel in zip(ids, pkg.file_paths, strict=True):
        assert_deleted(system, "processing_scratch", rel, cid)


def test_processing_files_kept_while_a_staging_job_is_active(system):
    with system.session() as s:
        pkg = make_package_at(system, s, ["cologne_lta"], state=A, files=2)
        ids = make_processing_files(s, pkg, package_copy_status=S.STAGED)
        make_staging_job(s, [pkg.package_id], active=False)
        make_staging_job(s, [pkg.package_id], active=True)
    run_deletion_cycle(system)
    for cid, rel in zip(ids, pkg.file_paths, strict=True):
        assert_kept(system, "processing_scratch", rel, cid)
    assert copy_row(system, pkg.copy_ids["processing_scratch"]).status == S.STAGED


def test_staged_package_cleanup_deletes_files_then_marks_package_copy_deleted(system):
    with system.session() as s:
        pkg = make_package_at(system, s, ["cologne_lta"], state=A, files=3)
        ids = make_processing_files(s, pkg, status=S.STAGED, package_copy_status=S.STAGED)
        make_staging_job(s, [pkg.package_id], active=False)
    with system.session() as s:
        found = dm.find_deletable_staged_raw_data_files_by_location(s)
        assert sorted(c.id for c in next(iter(found.values()))) == sorted(ids)
    summary = run_deletion_cycle(system)
    assert summary["staged_raw_data_files"] == 3
    for cid, rel in zip(ids, pkg.file_paths, strict=True):
        assert_deleted(system, "processing_scratch", rel, cid)
    row = copy_row(system, pkg.copy_ids["processing_scratch"])
    assert row.status == S.DELETED and row.deleted_at is not None
    assert log_rows(system, row.id) == [("DELETED", "staging_job_inactive")]


def test_processing_files_kept_when_no_lta_copy_remains(system):
    with system.session() as s:
        pkg = make_package_at(system, s, ["cologne_lta"], state=A, files=1, lost=("cologne_lta",))
        ids = make_processing_files(s, pkg, package_copy_status=None)
        make_staging_job(s, [pkg.package_id], active=False)
    run_deletion_cycle(system)
    assert_kept(system, "processing_scratch", pkg.file_paths[0], ids[0])


def test_processing_files_deleted_when_only_another_locations_job_is_active(system):
    with system.session() as s:
        from helpers_lifecycle import location

        pkg = make_package_at(system, s, ["cologne_lta"], state=A, files=2)
        ids = make_processing_files(s, pkg, package_copy_status=None)
        make_staging_job(s, [pkg.package_id], active=False)
        other = m.DiskDataLocation(
            name="processing_other",
            site_id=location(s, "processing_scratch").site_id,
            location_type=m.LocationType.PROCESSING,
            storage_type=m.StorageType.DISK,
            path=str(system.data_dir / "processing_other"),
        )
        s.add(other)
        s.flush()
        make_staging_job(s, [pkg.package_id], destination="processing_other", active=True)
    run_deletion_cycle(system)
    for cid, rel in zip(ids, pkg.file_paths, strict=True):
        assert_deleted(system, "processing_scratch", rel, cid)


def test_stage_two_scheduling_writes_one_audit_row_per_batch_listing_its_copies(
    system, override_settings
):
    """Stage 2 (raw files, by the million) audits one SCHEDULED row per batch with the ids
    it covers; the worker still writes one DELETED row per copy, and deletion_history
    finds both for a copy."""

    override_settings(RETENTION_PERIOD_MINUTES=60, DELETION_BATCH_SIZE=2)
    old = m.utcnow() - timedelta(minutes=61)
    with system.session() as s:
        pkg = make_package_at(
            system,
            s,
            {"ccat_telescope_buffer": S.DELETED, "cologne_lta": S.PRESENT},
            files=5,
            file_status=S.DELETION_POSSIBLE,
            deletion_possible_at=old,
        )
    run_deletion_cycle(system)
    with system.session() as s:
        batches = scheduled_batch_rows(s)
        listed = [json.loads(b.copy_ids) for b in batches]
        assert [len(ids) for ids in listed] == [2, 2, 1]  # DELETION_BATCH_SIZE = 2
        assert sorted(i for ids in listed for i in ids) == sorted(pkg.file_copy_ids)
        assert all(b.location_name == "primecam_raw_data" for b in batches)
        assert all(b.reason == "parent_package_archived" for b in batches)
        assert [b.size_bytes for b in batches] == [200, 200, 100]
        for cid in pkg.file_copy_ids:
            history = dm.deletion_history(s, cid)
            assert [r.outcome.name for r in history] == ["SCHEDULED", "DELETED"]
            assert history[1].physical_copy_id == cid
        # A copy of another package is not in these batches' history.
        other = make_package_at(system, s, ["ccat_telescope_buffer"], files=1)
        s.commit()
        assert dm.deletion_history(s, other.file_copy_ids[0]) == []


def test_stage_one_catch_up_runs_at_most_once_per_interval(system, override_settings):
    """Files of a package that already left the source site (state made by hand, so no
    deletion marked them) are marked by the catch-up: at once in the first cycle, then
    not again until DELETION_MARK_CATCHUP_SECONDS have passed."""
    from datetime import timedelta

    override_settings(DELETION_MARK_CATCHUP_SECONDS=300)
    left = {"ccat_telescope_buffer": S.DELETED, "cologne_lta": S.PRESENT}
    with system.session() as s:
        first = make_package_at(system, s, left, state=A)
    assert run_deletion_cycle(system)["marked_deletion_possible"] == 2
    assert copy_row(system, first.file_copy_ids[0]).status == S.DELETION_POSSIBLE
    with system.session() as s:
        second = make_package_at(system, s, left, state=A)
    assert run_deletion_cycle(system)["marked_deletion_possible"] == 0  # within the interval
    assert copy_row(system, second.file_copy_ids[0]).status == S.PRESENT
    with system.session() as s:  # the interval has passed
        for row in s.query(m.ManagerState).filter(m.ManagerState.key.like("deletion:mark%")):
            row.updated_at = m.utcnow() - timedelta(seconds=301)
    assert run_deletion_cycle(system)["marked_deletion_possible"] == 2
    assert copy_row(system, second.file_copy_ids[0]).status == S.DELETION_POSSIBLE
    override_settings(DELETION_MARK_CATCHUP_SECONDS=0)  # 0: every cycle
    with system.session() as s:
        third = make_package_at(system, s, left, state=A)
    assert run_deletion_cycle(system)["marked_deletion_possible"] == 2
    assert copy_row(system, third.file_copy_ids[0]).status == S.DELETION_POSSIBLE
