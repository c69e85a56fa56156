"""Liveness from heartbeats: recovery resets started work whose heartbeat stopped, never
work that runs long or waits in the queue; queued work whose message was lost is sent
again without charging a retry (:mod:`ccat_data_transfer.core.liveness`)."""

from __future__ import annotations

import time
from datetime import timedelta

from sqlalchemy import select, update

from ccat_data_transfer import transfer_manager
from ccat_data_transfer.archive import cycle as archive_manager
from ccat_data_transfer.deletion.cycle import resubmit_stalled_deletions
from ccat_data_transfer.operations import recovery
from ccat_data_transfer.packaging import raw_packages as rdpm
from ccat_data_transfer.packaging import skeleton
from ccat_data_transfer.packaging import tasks as packaging_tasks
from ccat_ops_db import models as m
from helpers_pipeline import make_raw_files
from helpers_staging import make_archived_package
from helpers_transfer import drive, make_dtp_at_source_buffer

SRC = "primecam_raw_data"
LONG_AGO = timedelta(hours=2)  # older than the old age-based timeout (1 hour)


def _claimed_package(system, tag: str) -> int:
    make_raw_files(system, SRC, tag, "primecam/280GHz", 2, 100)
    with system.session() as s:
        plan = rdpm.plan_packages(s)[0]
        pkg_id = rdpm.claim_package(s, plan, plan.parts[0])
    assert pkg_id is not None
    return pkg_id


def _set(system, model, row_id, **values) -> None:
    with system.session() as s:
        s.execute(update(model).where(model.id == row_id).values(**values))


def test_running_build_with_a_fresh_heartbeat_is_not_released_however_old(system):
    pkg_id = _claimed_package(system, "eou-alive")
    old = m.utcnow() - timedelta(days=2)
    _set(system, m.RawDataPackage, pkg_id, status=m.Status.IN_PROGRESS, created_at=old)
    _set(system, m.RawDataPackage, pkg_id, heartbeat_at=m.utcnow())
    with system.session() as s:
        assert recovery.run_once(s)["raw_data_packages"] == 0
        assert s.get(m.RawDataPackage, pkg_id).status == m.Status.IN_PROGRESS


def test_build_whose_heartbeat_stopped_is_released(system):
    pkg_id = _claimed_package(system, "eou-dead")
    beat = m.utcnow() - timedelta(minutes=10)
    _set(system, m.RawDataPackage, pkg_id, status=m.Status.IN_PROGRESS, heartbeat_at=beat)
    with system.session() as s:
        assert recovery.run_once(s)["raw_data_packages"] == 1
        assert s.get(m.RawDataPackage, pkg_id) is None


def test_build_beats_while_the_tar_is_written_and_survives_recovery_and_a_second_delivery(
    system, override_settings, monkeypatch
):
    """A build slower than the stall window: it beats, recovery running meanwhile leaves
    it alone, a second delivery of its task does nothing, and it completes once."""
    override_settings(HEARTBEAT_SECONDS=0.1, HEARTBEAT_MISSED_BEATS=3)
    pkg_id = _claimed_package(system, "eou-slow")
    real = skeleton.write_tar_with_checksums
    seen: dict[str, object] = {}

    def slow_tar(members, out):
        with system.session() as s:
            first = s.get(m.RawDataPackage, pkg_id).heartbeat_at
        time.sleep(1.0)  # > 3 beats of 0.1 s: age alone would call it stalled
        with system.session() as s:
            seen["beats_moved"] = s.get(m.RawDataPackage, pkg_id).heartbeat_at > first
            seen["recovery"] = recovery.run_once(s)["raw_data_packages"]
        seen["second_delivery"] = packaging_tasks.create_raw_data_package.run(pkg_id)["status"]
        return real(members, out)

    monkeypatch.setattr(skeleton, "write_tar_with_checksums", slow_tar)
    assert packaging_tasks.create_raw_data_package.run(pkg_id)["status"] == "completed"
    assert seen == {"beats_moved": True, "recovery": 0, "second_delivery": "skipped"}
    with system.session() as s:
        assert s.get(m.RawDataPackage, pkg_id).status == m.Status.COMPLETED


def _queued_transfer(system) -> int:
    with system.session() as s:
        make_dtp_at_source_buffer(system, s)
    with system.session() as s:
        transfer_manager.plan_primary_transfers(s)
        (tid,) = transfer_manager.dispatch_transfers(s, submit=False)  # message lost
    return tid


def _wait_in_queue_then_recover(system, model, row_id, stage):
    """Age the queued row past the old timeout, run recovery: it never resets the row
    (``stage`` count 0).  Returns (how many were sent again, status, retry count)."""
    _set(system, model, row_id, updated_at=m.utcnow() - LONG_AGO)
    with system.session() as s:
        summary = recovery.run_once(s)
    assert summary[stage] == 0
    with system.session() as s:
        row = s.get(model, row_id)
        return summary["queued_resent"], row.status, row.retry_count


def test_queued_transfer_is_never_reset_nor_charged_while_it_waits(system, override_settings):
    override_settings(QUEUED_RESEND_SECONDS=86400)  # the broker still holds it
    tid = _queued_transfer(system)
    outcome = _wait_in_queue_then_recover(system, m.DataTransfer, tid, "transfers")
    assert outcome == (0, m.Status.SCHEDULED, 0)


def test_lost_transfer_message_is_sent_again_without_a_retry_and_completes(system):
    tid = _queued_transfer(system)
    outcome = _wait_in_queue_then_recover(system, m.DataTransfer, tid, "transfers")
    assert outcome == (1, m.Status.COMPLETED, 0)


def test_lost_archive_message_is_sent_again_without_a_retry_and_completes(system):
    with system.session() as s:
        make_dtp_at_source_buffer(system, s, n_packages=1)
    drive(system.session, transfer_manager.run_once, cycles=1)
    with system.session() as s:
        archive_manager.plan_archive_transfers(s)
        (aid,) = archive_manager.dispatch_archive_transfers(s, submit=False)
    model = m.LongTermArchiveTransfer
    outcome = _wait_in_queue_then_recover(system, model, aid, "archive_transfers")
    assert outcome == (1, m.Status.COMPLETED, 0)


def test_started_transfer_whose_heartbeat_stopped_is_reset_within_minutes(system):
    tid = _queued_transfer(system)
    beat = m.utcnow() - timedelta(minutes=5)
    _set(system, m.DataTransfer, tid, status=m.Status.IN_PROGRESS, updated_at=beat)
    with system.session() as s:
        assert recovery.run_once(s)["transfers"] == 1
        t = s.get(m.DataTransfer, tid)
        assert (t.status, t.retry_count) == (m.Status.PENDING, 1)


def _claimed_staging_job(system) -> int:
    from ccat_data_transfer.staging.finders import claim_staging_job
    from ccat_data_transfer.staging_manager import create_staging_job

    with system.session() as s:
        pkg_id = make_archived_package(system, s).id
        job = create_staging_job(s, package_ids=[pkg_id], destination="processing_scratch")
        s.flush()
        job_id = job.id
    with system.session() as s:
        assert claim_staging_job(s, job_id, m.utcnow() - LONG_AGO)  # its message lost
    return job_id


def test_lost_staging_message_is_sent_again_without_a_retry_and_completes(system):
    job_id = _claimed_staging_job(system)
    with system.session() as s:
        summary = recovery.run_once(s)
    assert summary["staging_jobs"] == 0 and summary["queued_resent"] == 1
    with system.session() as s:
        job = s.get(m.StagingJob, job_id)
        assert (job.status, job.retry_count) == (m.Status.COMPLETED, 0)


def test_second_delivery_of_a_started_staging_job_does_nothing(system):
    from ccat_data_transfer.staging.tasks import stage_staging_job

    job_id = _claimed_staging_job(system)
    _set(system, m.StagingJob, job_id, heartbeat_at=m.utcnow())  # a worker runs it
    assert stage_staging_job.run(job_id)["status"] == "skipped"
    with system.session() as s:
        assert recovery.run_once(s)["staging_jobs"] == 0
        assert s.get(m.StagingJob, job_id).status == m.Status.IN_PROGRESS


def _copy_in_deletion(system, status, age: timedelta) -> int:
    """A package copy whose deletion is ``status``, last sent or beaten ``age`` ago."""
    with system.session() as s:
        make_dtp_at_source_buffer(system, s)
    with system.session() as s:
        copy_id = s.scalars(select(m.DataTransferPackagePhysicalCopy.id)).first()
    since = m.utcnow() - age
    _set(system, m.PhysicalCopy, copy_id, status=status, deletion_scheduled_at=since)
    return copy_id


def test_lost_deletion_batch_is_sent_again_without_a_retry(system):
    # Queued for 10 minutes (longer than QUEUED_RESEND_SECONDS, less than the old hour).
    scheduled = m.PhysicalCopyStatus.DELETION_SCHEDULED
    copy_id = _copy_in_deletion(system, scheduled, timedelta(minutes=10))
    with system.session() as s:
        assert resubmit_stalled_deletions(s) == 1
    with system.session() as s:
        copy = s.get(m.PhysicalCopy, copy_id)
        # The task ran again: it re-checked the rule (not deletable yet: back to PRESENT).
        assert copy.status != scheduled and copy.deletion_retry_count == 0


def test_running_deletion_batch_is_left_alone_until_its_heartbeat_stops(system):
    running = m.PhysicalCopyStatus.DELETION_IN_PROGRESS
    copy_id = _copy_in_deletion(system, running, timedelta(0))
    with system.session() as s:
        assert resubmit_stalled_deletions(s) == 0
    _set(system, m.PhysicalCopy, copy_id, deletion_scheduled_at=m.utcnow() - timedelta(minutes=10))
    with system.session() as s:
        assert resubmit_stalled_deletions(s) == 1
