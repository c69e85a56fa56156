"""Archive truth on the deletion side (issue 18): nothing irreversible without fresh proof.

A copy at a SOURCE or BUFFER location whose deletion relies on the archives goes only when
enough LTA copies count as proof (PRESENT, not lost, at an active LONG_TERM_ARCHIVE without
an audit hold, holding the package's checksum, verified within LTA_PROOF_MAX_AGE_SECONDS);
a stale proof makes the manager ask the archive's site to look again and decide later.
Archive copies are never changed by the deletion path; held locations and frozen packages
are honoured.  The issue's scenarios 1-4 and the ``bytes_to_free`` defect are reproduced
here; each failed on the code before this change.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, update

from ccat_data_transfer import deletion_manager as dm
from ccat_data_transfer.deletion.pressure import bytes_to_free
from ccat_ops_db import models as m
from helpers_lifecycle import (
    copy_row,
    location,
    log_rows,
    make_dtp,
    make_package_at,
    make_processing_files,
    make_staging_job,
    make_transfer,
    object_exists,
    run_deletion_cycle,
    set_buffer_status,
)

# Repair of a bad archive copy is tests/fixity/test_fixity.py's; here the rules act alone.
pytestmark = pytest.mark.usefixtures("without_archive_repair")

S = m.PhysicalCopyStatus
A = m.PackageState.ARCHIVED
BUF = "ccat_telescope_buffer"
SRC = "primecam_raw_data"


def _set_copy(system, copy_id, **values):
    with system.session() as s:
        s.execute(update(m.PhysicalCopy).where(m.PhysicalCopy.id == copy_id).values(**values))


def _stale():
    """A verification older than LTA_PROOF_MAX_AGE_SECONDS (3600 s)."""
    return m.utcnow() - timedelta(hours=2)


def _archive_events(system, copy_id):
    with system.session() as s:
        return list(
            s.scalars(
                select(m.ArchiveEvent.event)
                .where(m.ArchiveEvent.physical_copy_id == copy_id)
                .order_by(m.ArchiveEvent.id)
            )
        )


def _at_buffer_with_files(system, lta=("cologne_lta",), **kw):
    with system.session() as s:
        return make_package_at(system, s, [BUF, *lta], state=A, **kw)


def _gone_from_buffer(system, lta=("cologne_lta",), files=2):
    """Archived, left the source site, its raw files DELETION_POSSIBLE since a day."""
    locs = {BUF: S.DELETED, **dict.fromkeys(lta, S.PRESENT)}
    with system.session() as s:
        return make_package_at(
            system,
            s,
            locs,
            state=A,
            files=files,
            file_status=S.DELETION_POSSIBLE,
            deletion_possible_at=m.utcnow() - timedelta(days=1),
        )


def _at_every_kind_of_place(system, override_settings):
    """Retention 0; a package at the source buffer, one gone from it (raw files
    DELETION_POSSIBLE), one at the LTA-site buffer: each deletable but for the test's hold
    or freeze."""
    override_settings(RETENTION_PERIOD_MINUTES=0)
    at_buffer = _at_buffer_with_files(system)
    gone = _gone_from_buffer(system)
    with system.session() as s:
        lta_site = make_package_at(system, s, ["cologne_buffer", "cologne_lta"], state=A)
    return at_buffer, gone, lta_site


def _assert_files_stay(system, pkg, status=S.PRESENT):
    for cid, rel in zip(pkg.file_copy_ids, pkg.file_paths, strict=True):
        assert object_exists(system, SRC, rel)
        assert copy_row(system, cid).status == status


# --- 1. fresh proof before the last copies go ---------------------------------------------


def test_stale_proof_keeps_the_source_copy_and_asks_the_archive_to_look_again(system):
    pkg = _at_buffer_with_files(system)
    lta_id, buf_id = pkg.copy_ids["cologne_lta"], pkg.copy_ids[BUF]
    _set_copy(system, lta_id, verified_at=_stale())
    run_deletion_cycle(system)
    # Kept this cycle; the verification ran at once (embedded mode) and found the object.
    assert object_exists(system, BUF, pkg.relative_path)
    assert copy_row(system, buf_id).status == S.PRESENT
    assert log_rows(system, buf_id) == []
    lta = copy_row(system, lta_id)
    assert lta.verified_at > m.utcnow() - timedelta(minutes=5)
    assert lta.verification_requested_at is None
    run_deletion_cycle(system)  # decided in a later cycle, on the fresh proof
    assert not object_exists(system, BUF, pkg.relative_path)
    assert copy_row(system, buf_id).status == S.DELETED


def test_vanished_archive_file_with_stale_proof_is_found_lost_and_the_source_stays(system):
    """Issue scenario 2: the LTA file vanished, the DB unchanged, the proof old."""
    pkg = _at_buffer_with_files(system)
    lta_id, buf_id = pkg.copy_ids["cologne_lta"], pkg.copy_ids[BUF]
    _set_copy(system, lta_id, verified_at=_stale())
    (system.location_path("cologne_lta") / pkg.relative_path).unlink()
    run_deletion_cycle(system)
    lta = copy_row(system, lta_id)
    assert lta.lost_at is not None and lta.status == S.PRESENT
    assert _archive_events(system, lta_id) == ["MISSING"]
    for _ in range(2):
        run_deletion_cycle(system)
        assert object_exists(system, BUF, pkg.relative_path)
        assert copy_row(system, buf_id).status == S.PRESENT
        _assert_files_stay(system, pkg)


def test_deletion_possible_files_wait_for_fresh_proof(system, override_settings):
    override_settings(RETENTION_PERIOD_MINUTES=0)
    pkg = _gone_from_buffer(system)
    lta_id = pkg.copy_ids["cologne_lta"]
    _set_copy(system, lta_id, verified_at=_stale())
    (system.location_path("cologne_lta") / pkg.relative_path).unlink()
    for _ in range(2):
        run_deletion_cycle(system)
        _assert_files_stay(system, pkg, S.DELETION_POSSIBLE)
    assert copy_row(system, lta_id).lost_at is not None


def test_deletion_possible_files_go_once_the_archive_confirmed_its_copy(system, override_settings):
    override_settings(RETENTION_PERIOD_MINUTES=0)
    pkg = _gone_from_buffer(system)
    _set_copy(system, pkg.copy_ids["cologne_lta"], verified_at=_stale())
    run_deletion_cycle(system)
    _assert_files_stay(system, pkg, S.DELETION_POSSIBLE)
    run_deletion_cycle(system)
    for cid, rel in zip(pkg.file_copy_ids, pkg.file_paths, strict=True):
        assert not object_exists(system, SRC, rel)
        assert copy_row(system, cid).status == S.DELETED


def test_never_verified_archive_copy_is_not_proof(system):
    """Issue scenario 4, unverified copy."""
    pkg = _at_buffer_with_files(system)
    _set_copy(system, pkg.copy_ids["cologne_lta"], verified_at=None)
    with system.session() as s:
        pc = s.get(m.PhysicalCopy, pkg.copy_ids[BUF])
        assert not dm.can_delete_raw_data_package_from_source_buffer(
            s, pc.raw_data_package, pc.data_location
        )
    run_deletion_cycle(system)
    assert object_exists(system, BUF, pkg.relative_path)
    assert copy_row(system, pkg.copy_ids[BUF]).status == S.PRESENT


def test_archive_copy_with_another_checksum_than_the_package_is_not_proof(
    system, override_settings
):
    """Issue scenario 4, checksum differs (nothing to verify: never proof)."""
    override_settings(RETENTION_PERIOD_MINUTES=0)
    pkg = _at_buffer_with_files(system)
    gone = _gone_from_buffer(system)
    for p in (pkg, gone):
        _set_copy(system, p.copy_ids["cologne_lta"], checksum="f" * 64)
    for _ in range(2):
        run_deletion_cycle(system)
        assert object_exists(system, BUF, pkg.relative_path)
        _assert_files_stay(system, gone, S.DELETION_POSSIBLE)
    assert copy_row(system, pkg.copy_ids["cologne_lta"]).verification_requested_at is None
    with system.session() as s:
        reason = dm.explain_copy(s, pkg.copy_ids[BUF]).reason
    assert "checksum" in reason


def test_worker_refuses_when_the_proof_went_stale_after_scheduling(system):
    pkg = _at_buffer_with_files(system)
    buf_id = pkg.copy_ids[BUF]
    with system.session() as s:
        assert dm.claim_for_deletion(s, [buf_id]) == [buf_id]
    _set_copy(system, pkg.copy_ids["cologne_lta"], verified_at=_stale())
    dm.delete_bulk_raw_data_packages.apply_async(args=[[buf_id]])
    assert object_exists(system, BUF, pkg.relative_path)
    assert copy_row(system, buf_id).status == S.PRESENT
    assert log_rows(system, buf_id)[-1] == ("SKIPPED", "waiting_for_proof")


def test_worker_refuses_raw_files_when_the_proof_went_stale_after_scheduling(system):
    pkg = _gone_from_buffer(system, files=1)
    fid = pkg.file_copy_ids[0]
    with system.session() as s:
        assert dm.claim_for_deletion(s, [fid], [S.DELETION_POSSIBLE]) == [fid]
    _set_copy(system, pkg.copy_ids["cologne_lta"], verified_at=_stale())
    dm.delete_bulk_raw_data_files.apply_async(args=[[fid]])
    assert object_exists(system, SRC, pkg.file_paths[0])
    assert copy_row(system, fid).status == S.DELETION_POSSIBLE


def test_plan_and_explain_say_waiting_for_proof(system):
    pkg = _at_buffer_with_files(system)
    _set_copy(system, pkg.copy_ids["cologne_lta"], verified_at=_stale())
    with system.session() as s:
        item = dm.explain_copy(s, pkg.copy_ids[BUF])
        plan = {i.physical_copy_id: i for i in dm.deletion_plan(s)}
        pc = s.get(m.PhysicalCopy, pkg.copy_ids[BUF])
        decision = dm.decide_copy(s, pc)
    assert decision.code == "waiting_for_proof"
    assert not item.deletable
    assert "waiting for proof" in item.reason and "cologne_lta" in item.reason
    assert "verified 2 h ago" in item.reason
    assert plan[pkg.copy_ids[BUF]].reason == item.reason
    # The dry run changes nothing, not even the request for a verification.
    assert copy_row(system, pkg.copy_ids["cologne_lta"]).verification_requested_at is None


def test_a_location_may_ask_for_two_verified_archive_copies(system, override_settings):
    with system.session() as s:
        location(s, BUF).min_verified_lta_copies = 2
    one = _at_buffer_with_files(system)
    two = _at_buffer_with_files(system, lta=("cologne_lta", "us_lta"))
    run_deletion_cycle(system)
    assert object_exists(system, BUF, one.relative_path)
    assert not object_exists(system, BUF, two.relative_path)
    with system.session() as s:
        assert "2 verified" in dm.explain_copy(s, one.copy_ids[BUF]).reason


def test_the_setting_asks_for_two_verified_archive_copies_for_raw_files(system, override_settings):
    override_settings(RETENTION_PERIOD_MINUTES=0, MIN_VERIFIED_LTA_COPIES=2)
    one = _gone_from_buffer(system)
    two = _gone_from_buffer(system, lta=("cologne_lta", "us_lta"))
    run_deletion_cycle(system)
    _assert_files_stay(system, one, S.DELETION_POSSIBLE)
    for rel in two.file_paths:
        assert not object_exists(system, SRC, rel)


def test_a_location_cannot_ask_for_no_proof(system, override_settings):
    override_settings(RETENTION_PERIOD_MINUTES=0)
    with system.session() as s:
        location(s, BUF).min_verified_lta_copies = 0
        location(s, SRC).min_verified_lta_copies = 0
    pkg = _at_buffer_with_files(system)
    gone = _gone_from_buffer(system)
    for p in (pkg, gone):  # the archive's file vanished; its proof is old
        _set_copy(system, p.copy_ids["cologne_lta"], verified_at=_stale())
        (system.location_path("cologne_lta") / p.relative_path).unlink()
    run_deletion_cycle(system)
    assert object_exists(system, BUF, pkg.relative_path)
    _assert_files_stay(system, gone, S.DELETION_POSSIBLE)


# --- 2. archive copies are never changed by the deletion path -----------------------------


def test_lta_copy_stuck_in_deletion_is_not_resubmitted_and_the_buffer_copy_stays(system):
    """Issue scenario 3: an LTA copy stuck in DELETION_SCHEDULED whose file is gone."""
    pkg = _at_buffer_with_files(system)
    lta_id = pkg.copy_ids["cologne_lta"]
    _set_copy(
        system,
        lta_id,
        status=S.DELETION_SCHEDULED,
        deletion_scheduled_at=m.utcnow() - timedelta(days=1),
    )
    (system.location_path("cologne_lta") / pkg.relative_path).unlink()
    summary = run_deletion_cycle(system)
    assert summary["stalled_resubmitted"] == 0
    lta = copy_row(system, lta_id)
    assert lta.status == S.DELETION_SCHEDULED
    assert object_exists(system, BUF, pkg.relative_path)
    assert copy_row(system, pkg.copy_ids[BUF]).status == S.PRESENT
    _assert_files_stay(system, pkg)


def test_failed_lta_deletion_is_never_rescheduled(system):
    with system.session() as s:
        pkg = make_package_at(system, s, {"cologne_lta": S.DELETION_FAILED}, state=A)
    with system.session() as s:
        assert dm.reschedule_failed_deletions(s) == 0
    assert copy_row(system, pkg.copy_ids["cologne_lta"]).status == S.DELETION_FAILED


def test_worker_leaves_a_refused_archive_copy_in_its_deletion_state(system):
    with system.session() as s:
        pkg = make_package_at(system, s, {"cologne_lta": S.DELETION_IN_PROGRESS}, state=A)
    (system.location_path("cologne_lta") / pkg.relative_path).unlink()
    dm.delete_physical_copy.apply_async(args=[pkg.copy_ids["cologne_lta"]])
    row = copy_row(system, pkg.copy_ids["cologne_lta"])
    assert row.status == S.DELETION_IN_PROGRESS and row.deleted_at is None
    assert log_rows(system, row.id) == [("SKIPPED", "long_term_archive")]


def test_refused_copy_whose_bytes_are_gone_is_not_made_present(system):
    """A redelivered task (DELETION_IN_PROGRESS: an earlier attempt may have deleted the
    bytes) whose rule no longer holds: the copy is reverted only if its bytes exist."""
    pkg = _at_buffer_with_files(system)
    buf_id = pkg.copy_ids[BUF]
    _set_copy(system, buf_id, status=S.DELETION_IN_PROGRESS)
    _set_copy(system, pkg.copy_ids["cologne_lta"], lost_at=m.utcnow())
    (system.location_path(BUF) / pkg.relative_path).unlink()
    dm.delete_bulk_raw_data_packages.apply_async(args=[[buf_id]])
    row = copy_row(system, buf_id)
    assert row.status == S.DELETED and row.deleted_at is not None
    assert log_rows(system, buf_id)[-1][0] == "DELETED"


def test_refused_scheduled_copy_whose_bytes_vanished_goes_back_marked_lost(system):
    """A DELETION_SCHEDULED copy was never touched by a deletion; if its bytes are gone
    when the re-check refuses it, it does not go back as a good copy."""
    pkg = _at_buffer_with_files(system)
    buf_id = pkg.copy_ids[BUF]
    with system.session() as s:
        assert dm.claim_for_deletion(s, [buf_id]) == [buf_id]
    _set_copy(system, pkg.copy_ids["cologne_lta"], lost_at=m.utcnow())
    (system.location_path(BUF) / pkg.relative_path).unlink()
    dm.delete_bulk_raw_data_packages.apply_async(args=[[buf_id]])
    row = copy_row(system, buf_id)
    assert row.status == S.PRESENT and row.lost_at is not None
    assert log_rows(system, buf_id)[-1] == ("SKIPPED", "no_lta_copy")


# --- 3. audit holds and frozen packages ---------------------------------------------------


def test_audit_hold_on_the_archive_stops_every_deletion_relying_on_it(system, override_settings):
    """Issue scenario 1: an audit over threshold put a hold on the archive."""
    at_buffer, gone, lta_site = _at_every_kind_of_place(system, override_settings)
    with system.session() as s:
        location(s, "cologne_lta").audit_hold_at = m.utcnow()
    for _ in range(2):
        run_deletion_cycle(system)
        assert object_exists(system, BUF, at_buffer.relative_path)
        assert copy_row(system, at_buffer.copy_ids[BUF]).status == S.PRESENT
        _assert_files_stay(system, at_buffer)
        _assert_files_stay(system, gone, S.DELETION_POSSIBLE)
        assert object_exists(system, "cologne_buffer", lta_site.relative_path)
    with system.session() as s:
        assert "audit hold" in dm.explain_copy(s, at_buffer.copy_ids[BUF]).reason


def test_no_deletion_runs_at_a_held_location(system, override_settings):
    override_settings(RETENTION_PERIOD_MINUTES=0)
    pkg = _at_buffer_with_files(system)
    gone = _gone_from_buffer(system)
    with system.session() as s:
        location(s, BUF).audit_hold_at = m.utcnow()
        location(s, SRC).audit_hold_at = m.utcnow()
    run_deletion_cycle(system)
    assert object_exists(system, BUF, pkg.relative_path)
    _assert_files_stay(system, gone, S.DELETION_POSSIBLE)
    # Scheduled before the hold: the worker's re-check refuses.
    buf_id, fid = pkg.copy_ids[BUF], gone.file_copy_ids[0]
    _set_copy(system, buf_id, status=S.DELETION_SCHEDULED)
    _set_copy(system, fid, status=S.DELETION_SCHEDULED)
    dm.delete_bulk_raw_data_packages.apply_async(args=[[buf_id]])
    dm.delete_bulk_raw_data_files.apply_async(args=[[fid]])
    assert object_exists(system, BUF, pkg.relative_path)
    assert object_exists(system, SRC, gone.file_paths[0])
    assert log_rows(system, buf_id)[-1] == ("SKIPPED", "audit_hold")
    assert copy_row(system, fid).status == S.DELETION_POSSIBLE


def test_no_copy_of_a_frozen_package_is_deleted_anywhere(system, override_settings):
    pkg, gone, lta_site = _at_every_kind_of_place(system, override_settings)
    with system.session() as s:
        staged = make_package_at(system, s, ["cologne_lta"], state=A)
        proc = make_processing_files(s, staged)
        make_staging_job(s, [staged.package_id], active=False)
        dtp = make_dtp(system, s, [lta_site.package_id], [BUF])
        make_transfer(s, dtp.dtp_id, BUF, "cologne_buffer")
        for p in (pkg, gone, lta_site, staged):
            s.get(m.RawDataPackage, p.package_id).frozen_at = m.utcnow()
    for _ in range(2):
        run_deletion_cycle(system)
    assert object_exists(system, BUF, pkg.relative_path)
    _assert_files_stay(system, pkg)
    _assert_files_stay(system, gone, S.DELETION_POSSIBLE)
    assert object_exists(system, "cologne_buffer", lta_site.relative_path)
    assert object_exists(system, BUF, dtp.relative_path)
    for cid in proc:
        assert copy_row(system, cid).status == S.PRESENT
    with system.session() as s:
        assert "frozen" in dm.explain_copy(s, pkg.copy_ids[BUF]).reason
    # Scheduled before the freeze: the worker's re-check refuses.
    _set_copy(system, pkg.copy_ids[BUF], status=S.DELETION_SCHEDULED)
    dm.delete_bulk_raw_data_packages.apply_async(args=[[pkg.copy_ids[BUF]]])
    assert log_rows(system, pkg.copy_ids[BUF])[-1] == ("SKIPPED", "frozen")
    _set_copy(system, gone.file_copy_ids[0], status=S.DELETION_SCHEDULED)
    dm.delete_bulk_raw_data_files.apply_async(args=[[gone.file_copy_ids[0]]])
    assert object_exists(system, SRC, gone.file_paths[0])


# --- 4. bytes_to_free ---------------------------------------------------------------------


def test_bytes_to_free_counts_copies_without_a_recorded_size_by_their_file_size(system):
    with system.session() as s:
        location(s, SRC).capacity_bytes = 10000
        pkg = make_package_at(
            system,
            s,
            {BUF: S.DELETED, "cologne_lta": S.PRESENT},
            state=A,
            files=2,
            file_size=500,
            file_status=S.DELETION_SCHEDULED,
            deletion_possible_at=m.utcnow(),
        )
        status = set_buffer_status(s, SRC, used_bytes=9900, total_bytes=10000)
        loc = location(s, SRC)
        with_size = bytes_to_free(s, loc, status)
        s.execute(
            update(m.PhysicalCopy).where(m.PhysicalCopy.id.in_(pkg.file_copy_ids)).values(size=None)
        )
        without_size = bytes_to_free(s, loc, status)
    # 85 % of 10000 = 8500: 1400 bytes over, 1000 of them already being deleted.
    assert with_size == 400
    assert without_size == with_size
