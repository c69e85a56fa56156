"""Recovery service: stalled work whose worker died is put back, with the retry counted."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from ccat_data_transfer import transfer_manager
from ccat_data_transfer.operations import recovery
from ccat_ops_db import models as m
from helpers_staging import make_archived_package
from helpers_transfer import make_dtp_at_source_buffer


def _claimed_transfer(system):
    with system.session() as s:
        make_dtp_at_source_buffer(system, s)
    with system.session() as s:
        transfer_manager.plan_primary_transfers(s)
        (tid,) = transfer_manager.dispatch_transfers(s, submit=False)  # worker never runs it
    return tid


def test_transfer_stuck_past_timeout_is_reset_with_retry_counted(system):
    tid = _claimed_transfer(system)
    with system.session() as s:
        s.execute(
            update(m.DataTransfer)
            .where(m.DataTransfer.id == tid)
            .values(status=m.Status.IN_PROGRESS, updated_at=m.utcnow() - timedelta(hours=2))
        )
    with system.session() as s:
        summary = recovery.run_once(s, timedelta(hours=1))
    assert summary["transfers"] == 1
    with system.session() as s:
        t = s.get(m.DataTransfer, tid)
        assert t.status == m.Status.PENDING and t.retry_count == 1
        assert "worker lost" in t.failure_reason
    # and the transfer then completes normally
    with system.session() as s:
        for _ in range(3):
            transfer_manager.run_once(s)
    with system.session() as s:
        assert s.get(m.DataTransfer, tid).status == m.Status.COMPLETED


def test_recent_in_progress_work_is_left_alone(system):
    tid = _claimed_transfer(system)
    with system.session() as s:
        s.execute(
            update(m.DataTransfer)
            .where(m.DataTransfer.id == tid)
            .values(status=m.Status.IN_PROGRESS)
        )
    with system.session() as s:
        assert recovery.run_once(s, timedelta(hours=1))["transfers"] == 0
        assert s.get(m.DataTransfer, tid).status == m.Status.IN_PROGRESS


def test_stalled_staging_job_goes_back_to_pending(system):
    from ccat_data_transfer.staging_manager import create_staging_job

    with system.session() as s:
        pkg_id = make_archived_package(system, s).id
        job = create_staging_job(s, package_ids=[pkg_id], destination="processing_scratch")
        s.flush()
        job.status = m.Status.IN_PROGRESS
        job.start_time = m.utcnow() - timedelta(hours=3)
        job.heartbeat_at = m.utcnow() - timedelta(hours=3)  # started; its worker died
        job_id = job.id
    with system.session() as s:
        assert recovery.run_once(s, timedelta(hours=1))["staging_jobs"] == 1
        job = s.get(m.StagingJob, job_id)
        assert job.status == m.Status.PENDING and job.retry_count == 1


def test_transfer_package_in_transit_is_never_taken_for_a_stalled_bundle(system):
    """Regression: a DTP is IN_PROGRESS again while it is transferred; a slow transfer
    must not make the bundler release it (that would unlink its members)."""
    from ccat_data_transfer.packaging import transfer_packages as data_transfer_package_manager

    tid = _claimed_transfer(system)
    with system.session() as s:
        t = s.get(m.DataTransfer, tid)
        dtp_id = t.data_transfer_package_id
        s.execute(
            update(m.DataTransferPackage)
            .where(m.DataTransferPackage.id == dtp_id)
            .values(status=m.Status.IN_PROGRESS, created_at=m.utcnow() - timedelta(days=2))
        )
    with system.session() as s:
        assert data_transfer_package_manager.release_stalled_claims(s) == 0
        assert recovery.run_once(s, timedelta(hours=1))["data_transfer_packages"] == 0
        members = s.get(m.DataTransferPackage, dtp_id).raw_data_packages
        assert members and all(p.data_transfer_package_id == dtp_id for p in members)
