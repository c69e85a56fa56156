"""Staging for scientists: jobs, LTA selection and fallback, STAGED copies, cleanup through
the deletion manager, recovery.  Runs on SQLite and PostgreSQL (``system`` fixture)."""

from __future__ import annotations

import shutil
from datetime import datetime, timedelta

import pytest
from sqlalchemy import func, select, update

from ccat_data_transfer import deletion_manager, staging_manager
from ccat_data_transfer.core.errors import NotFoundError, ValidationError
from ccat_data_transfer.core.storage import storage_for_location
from ccat_data_transfer.staging_manager import (
    create_staging_job,
    deactivate_staging_job,
    expire_staging_jobs,
    select_lta_copies,
)
from ccat_ops_db import models as m
from helpers_staging import (
    add_processing_location,
    corrupt_lta_copy,
    file_copies,
    make_archived_package,
    package_copies,
)

S = m.PhysicalCopyStatus


def _stage(system, **kwargs):
    """Create a job and run one staging cycle; returns the job id."""
    with system.session() as s:
        job_id = create_staging_job(s, **kwargs).id
    with system.session() as s:
        staging_manager.run_once(s)
    return job_id


def _job(system, job_id):
    with system.session() as s:
        job = s.get(m.StagingJob, job_id)
        s.expunge(job)
        return job


def _files_on_disk(system, location, package_id):
    with system.session() as s:
        loc = system.location(s, location)
        storage = storage_for_location(loc)
        files = s.scalars(
            select(m.RawDataFile).where(m.RawDataFile.raw_data_package_id == package_id)
        ).all()
        return {f.relative_path: storage.exists(f.relative_path) for f in files}


def _cleanup(system):
    with system.session() as s:
        return deletion_manager.run_once(s)


# --- creating jobs ----------------------------------------------------------------------


def test_job_by_package_ids_is_pending_active_with_default_retention(system):
    with system.session() as s:
        pkg = make_archived_package(system, s)
        job = create_staging_job(s, package_ids=[pkg.id, pkg.id], name="mine")
        assert job.status == m.Status.PENDING and job.active
        assert job.packages_total == 1 and job.packages_done == 0
        assert [p.id for p in job.raw_data_packages] == [pkg.id]
        assert job.destination_location.name == "processing_scratch"
        assert job.retention_period_minutes == 43200
        assert job.expires_at - job.created_at == timedelta(minutes=43200)


def test_job_by_obs_unit_takes_every_package_of_that_execution(system):
    with system.session() as s:
        pkg = make_archived_package(system, s)
        make_archived_package(system, s)
        job = create_staging_job(
            s, executed_obs_unit=pkg.executed_obs_unit.name, retention_minutes=60
        )
        assert [p.id for p in job.raw_data_packages] == [pkg.id]
        assert job.retention_period_minutes == 60


def test_job_by_instrument_and_time_range_uses_observation_time(system):
    with system.session() as s:
        early = make_archived_package(system, s, obs_start=datetime(2024, 1, 1, 10))
        late = make_archived_package(system, s, obs_start=datetime(2024, 2, 1, 10))
        make_archived_package(system, s, instrument="chai", obs_start=datetime(2024, 1, 1, 10))
        job = create_staging_job(
            s, instrument="primecam", start="2024-01-01T10:05:00Z", end=datetime(2024, 1, 2)
        )
        assert [p.id for p in job.raw_data_packages] == [early.id]
        assert late.id not in [p.id for p in job.raw_data_packages]


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"destination": "nowhere"}, NotFoundError, "unknown data location"),
        ({"destination": "cologne_lta"}, ValidationError, "PROCESSING"),
        ({"package_ids": [999999]}, NotFoundError, "999999"),
        (
            {"package_ids": None, "instrument": "chai", "start": "2030-01-01", "end": "2030-01-02"},
            NotFoundError,
            "no raw data packages match",
        ),
        ({"retention_minutes": 0}, ValidationError, "retention"),
        ({"package_ids": None}, ValidationError, "name the packages"),
    ],
)
def test_bad_requests_are_refused_with_a_reason(system, kwargs, error, text):
    with system.session() as s:
        pkg = make_archived_package(system, s)
        args = {"package_ids": [pkg.id], **kwargs}
        with pytest.raises(error, match=text):
            create_staging_job(s, **args)
        assert s.scalar(select(func.count()).select_from(m.StagingJob)) == 0


def test_package_not_archived_or_without_lta_copy_is_refused(system):
    with system.session() as s:
        waiting = make_archived_package(system, s)
        waiting.state = m.PackageState.TRANSFERRING
        no_copy = make_archived_package(system, s, lta_locations=())
        s.flush()
        with pytest.raises(ValidationError, match="TRANSFERRING"):
            create_staging_job(s, package_ids=[waiting.id])
        with pytest.raises(ValidationError, match="no usable LTA copy"):
            create_staging_job(s, package_ids=[no_copy.id])


# --- staging ----------------------------------------------------------------------------


def test_staging_unpacks_files_records_copies_removes_tar_and_completes_job(system):
    with system.session() as s:
        pkg = make_archived_package(system, s, n_files=4)
        pkg_id, tar_path = pkg.id, pkg.relative_path
        expected = {f.relative_path: f.checksum for f in pkg.raw_data_files}
    job_id = _stage(system, package_ids=[pkg_id])

    job = _job(system, job_id)
    assert job.status == m.Status.COMPLETED, job.failure_reason
    assert job.packages_done == job.packages_total == 1
    assert job.completed_at is not None and job.expires_at > job.completed_at
    root = system.location_path("processing_scratch")
    for rel, checksum in expected.items():
        import hashlib

        assert hashlib.sha256((root / rel).read_bytes()).hexdigest() == checksum
    assert not (root / tar_path).exists()
    with system.session() as s:
        copies = file_copies(s, pkg_id, "processing_scratch")
        assert len(copies) == 4 and {c.status for c in copies} == {S.PRESENT}
        assert {c.relative_path for c in copies} == set(expected)
        [pc] = package_copies(s, pkg_id, "processing_scratch")
        assert pc.status == S.STAGED and pc.relative_path == tar_path


def test_a_claimed_job_is_not_claimed_again(system):
    with system.session() as s:
        pkg = make_archived_package(system, s)
        job = create_staging_job(s, package_ids=[pkg.id])
        job.status = m.Status.IN_PROGRESS
    with system.session() as s:
        assert staging_manager.run_once(s)["claimed"] == 0
    job_id = _stage(system, package_ids=[pkg.id])
    with system.session() as s:
        assert staging_manager.run_once(s)["claimed"] == 0
    assert _job(system, job_id).status == m.Status.COMPLETED


def test_second_job_reuses_the_staged_package_without_new_copies(system):
    with system.session() as s:
        pkg_id = make_archived_package(system, s).id
    _stage(system, package_ids=[pkg_id])
    with system.session() as s:
        before = [c.id for c in file_copies(s, pkg_id, "processing_scratch")]
    second = _stage(system, package_ids=[pkg_id])
    assert _job(system, second).status == m.Status.COMPLETED
    with system.session() as s:
        assert [c.id for c in file_copies(s, pkg_id, "processing_scratch")] == before
        assert len(package_copies(s, pkg_id, "processing_scratch")) == 1


def test_preferred_copy_corrupt_falls_back_to_the_other_lta(system):
    with system.session() as s:
        pkg = make_archived_package(system, s)
        assert [c.data_location.name for c in select_lta_copies(s, pkg)] == [
            "cologne_lta",
            "us_lta",
        ]
        corrupt_lta_copy(system, s, pkg, "cologne_lta")
        pkg_id = pkg.id
    job_id = _stage(system, package_ids=[pkg_id])
    assert _job(system, job_id).status == m.Status.COMPLETED
    assert all(_files_on_disk(system, "processing_scratch", pkg_id).values())
    with system.session() as s:
        [cologne] = package_copies(s, pkg_id, "cologne_lta")
        assert "corrupt" in cologne.last_error
        assert cologne.status == S.PRESENT  # the corruption is reported, not hidden


def test_preferred_lta_down_falls_back_to_the_other_lta(system):
    with system.session() as s:
        pkg_id = make_archived_package(system, s).id
    shutil.rmtree(system.location_path("cologne_lta"))  # unmounted archive
    job_id = _stage(system, package_ids=[pkg_id])
    assert _job(system, job_id).status == m.Status.COMPLETED
    assert all(_files_on_disk(system, "processing_scratch", pkg_id).values())


def test_preferred_copy_missing_or_location_inactive_falls_back(system):
    with system.session() as s:
        a = make_archived_package(system, s)
        b = make_archived_package(system, s)
        storage_for_location(system.location(s, "cologne_lta")).delete(a.relative_path)
        a_id, b_id = a.id, b.id
    job_a = _stage(system, package_ids=[a_id])
    assert _job(system, job_a).status == m.Status.COMPLETED
    with system.session() as s:
        system.location(s, "cologne_lta").active = False
        s.flush()
        assert [
            c.data_location.name for c in select_lta_copies(s, s.get(m.RawDataPackage, b_id))
        ] == ["us_lta"]
    job_b = _stage(system, package_ids=[b_id])
    assert _job(system, job_b).status == m.Status.COMPLETED


def test_preferred_sites_setting_orders_the_lta_copies(system, override_settings):
    override_settings(STAGING_PREFERRED_SITES=["us"])
    with system.session() as s:
        pkg = make_archived_package(system, s)
        order = [c.data_location.name for c in select_lta_copies(s, pkg)]
        assert order == ["us_lta", "cologne_lta"]
        # An LTA at the destination's own site beats any preference.
        own = m.DiskDataLocation(
            name="proc_lta",
            site=system.location(s, "processing_scratch").site,
            location_type=m.LocationType.LONG_TERM_ARCHIVE,
            storage_type=m.StorageType.DISK,
            path=str(system.data_dir / "proc_lta"),
            priority=5,
        )
        s.add(own)
        s.flush()
        s.add(
            m.RawDataPackagePhysicalCopy(
                raw_data_package_id=pkg.id,
                data_location_id=own.id,
                status=S.PRESENT,
                relative_path=pkg.relative_path,
            )
        )
        s.flush()
        dest = system.location(s, "processing_scratch")
        assert [c.data_location.name for c in select_lta_copies(s, pkg, dest)][0] == "proc_lta"


def test_every_lta_copy_corrupt_fails_the_job_with_a_reason(system):
    with system.session() as s:
        pkg = make_archived_package(system, s)
        corrupt_lta_copy(system, s, pkg, "cologne_lta")
        corrupt_lta_copy(system, s, pkg, "us_lta")
        pkg_id = pkg.id
    job = _job(system, _stage(system, package_ids=[pkg_id]))
    assert job.status == m.Status.FAILED
    assert "missing or corrupt" in job.failure_reason
    assert not any(_files_on_disk(system, "processing_scratch", pkg_id).values())
    with system.session() as s:
        assert package_copies(s, pkg_id, "processing_scratch") == []
        assert not storage_for_location(system.location(s, "processing_scratch")).exists(
            s.get(m.RawDataPackage, pkg_id).relative_path
        )


def test_every_lta_unreachable_retries_with_backoff_then_fails(system, override_settings):
    override_settings(STAGING_MAX_RETRIES=2, STAGING_RETRY_BASE_SECONDS=0)
    with system.session() as s:
        pkg_id = make_archived_package(system, s).id
    shutil.rmtree(system.location_path("cologne_lta"))
    shutil.rmtree(system.location_path("us_lta"))
    job_id = _stage(system, package_ids=[pkg_id])
    job = _job(system, job_id)
    assert job.status == m.Status.PENDING and job.retry_count == 1
    assert "could be read" in job.failure_reason
    with system.session() as s:
        staging_manager.run_once(s)
    job = _job(system, job_id)
    assert job.status == m.Status.FAILED and "gave up after 2 attempts" in job.failure_reason


def test_staging_waits_while_the_deletion_manager_removes_the_same_files(system):
    with system.session() as s:
        pkg_id = make_archived_package(system, s).id
    first = _stage(system, package_ids=[pkg_id])
    with system.session() as s:
        deactivate_staging_job(s, first)
        copy = file_copies(s, pkg_id, "processing_scratch")[0]
        copy.status = S.DELETION_SCHEDULED
    second = _stage(system, package_ids=[pkg_id])
    job = _job(system, second)
    assert job.status == m.Status.PENDING and job.retry_count == 0
    assert "deletion manager" in job.failure_reason


def test_deactivated_pending_job_is_never_claimed(system):
    with system.session() as s:
        pkg_id = make_archived_package(system, s).id
        job_id = create_staging_job(s, package_ids=[pkg_id]).id
        deactivate_staging_job(s, job_id)
    with system.session() as s:
        assert staging_manager.run_once(s)["claimed"] == 0
    assert _job(system, job_id).deactivated_at is not None
    assert not any(_files_on_disk(system, "processing_scratch", pkg_id).values())


# --- cleanup through the deletion manager -----------------------------------------------


def test_two_jobs_share_a_package_and_deactivating_one_keeps_the_files(system):
    with system.session() as s:
        pkg_id = make_archived_package(system, s).id
    first = _stage(system, package_ids=[pkg_id])
    second = _stage(system, package_ids=[pkg_id])
    with system.session() as s:
        deactivate_staging_job(s, first)
    _cleanup(system)
    assert all(_files_on_disk(system, "processing_scratch", pkg_id).values())
    with system.session() as s:
        assert {c.status for c in file_copies(s, pkg_id, "processing_scratch")} == {S.PRESENT}
        assert package_copies(s, pkg_id, "processing_scratch")[0].status == S.STAGED

    with system.session() as s:
        deactivate_staging_job(s, second)
    _cleanup(system)
    _cleanup(system)
    assert not any(_files_on_disk(system, "processing_scratch", pkg_id).values())
    with system.session() as s:
        assert {c.status for c in file_copies(s, pkg_id, "processing_scratch")} == {S.DELETED}
        [pc] = package_copies(s, pkg_id, "processing_scratch")
        assert pc.status == S.DELETED and pc.deleted_at is not None
        # The archive copies are never touched.
        assert {c.status for c in package_copies(s, pkg_id, "cologne_lta")} == {S.PRESENT}


def test_retention_expiry_deactivates_the_job_and_cleanup_follows(system):
    with system.session() as s:
        pkg_id = make_archived_package(system, s).id
    job_id = _stage(system, package_ids=[pkg_id], retention_minutes=30)
    with system.session() as s:
        assert expire_staging_jobs(s) == 0
        assert expire_staging_jobs(s, now=m.utcnow() + timedelta(minutes=29)) == 0
        s.execute(
            update(m.StagingJob)
            .where(m.StagingJob.id == job_id)
            .values(expires_at=m.utcnow() - timedelta(minutes=1))
        )
    with system.session() as s:
        assert staging_manager.run_once(s)["expired"] == 1
    job = _job(system, job_id)
    assert not job.active and job.deactivated_at is not None
    assert job.status == m.Status.COMPLETED
    _cleanup(system)
    _cleanup(system)
    assert not any(_files_on_disk(system, "processing_scratch", pkg_id).values())
    with system.session() as s:
        assert package_copies(s, pkg_id, "processing_scratch")[0].status == S.DELETED


def test_staging_again_after_deletion_adds_new_copies_and_keeps_the_old_rows(system):
    with system.session() as s:
        pkg_id = make_archived_package(system, s).id
    first = _stage(system, package_ids=[pkg_id])
    with system.session() as s:
        deactivate_staging_job(s, first)
    _cleanup(system)
    _cleanup(system)
    assert not any(_files_on_disk(system, "processing_scratch", pkg_id).values())

    again = _stage(system, package_ids=[pkg_id])
    assert _job(system, again).status == m.Status.COMPLETED
    assert all(_files_on_disk(system, "processing_scratch", pkg_id).values())
    with system.session() as s:
        copies = file_copies(s, pkg_id, "processing_scratch")
        assert sorted(c.status.name for c in copies) == ["DELETED"] * 3 + ["PRESENT"] * 3
        assert [c.status for c in package_copies(s, pkg_id, "processing_scratch")] == [
            S.DELETED,
            S.STAGED,
        ]


def test_files_removed_behind_the_systems_back_are_staged_again(system):
    with system.session() as s:
        pkg = make_archived_package(system, s)
        pkg_id, victim = pkg.id, pkg.raw_data_files[0].relative_path
    _stage(system, package_ids=[pkg_id])
    (system.location_path("processing_scratch") / victim).unlink()
    again = _stage(system, package_ids=[pkg_id])
    assert _job(system, again).status == m.Status.COMPLETED
    assert all(_files_on_disk(system, "processing_scratch", pkg_id).values())
    with system.session() as s:
        assert len(file_copies(s, pkg_id, "processing_scratch")) == 3  # rows reused


def test_package_at_two_processing_locations_is_cleaned_up_at_each_on_its_own(system):
    with system.session() as s:
        pkg_id = make_archived_package(system, s).id
        add_processing_location(system, s, "processing_second")
    here = _stage(system, package_ids=[pkg_id])
    there = _stage(system, package_ids=[pkg_id], destination="processing_second")
    assert _job(system, there).status == m.Status.COMPLETED
    assert all(_files_on_disk(system, "processing_second", pkg_id).values())

    with system.session() as s:
        deactivate_staging_job(s, here)
    _cleanup(system)
    _cleanup(system)
    assert not any(_files_on_disk(system, "processing_scratch", pkg_id).values())
    assert all(_files_on_disk(system, "processing_second", pkg_id).values())
    with system.session() as s:
        assert package_copies(s, pkg_id, "processing_scratch")[0].status == S.DELETED
        assert package_copies(s, pkg_id, "processing_second")[0].status == S.STAGED

    with system.session() as s:
        deactivate_staging_job(s, there)
    _cleanup(system)
    _cleanup(system)
    assert not any(_files_on_disk(system, "processing_second", pkg_id).values())
    with system.session() as s:
        assert package_copies(s, pkg_id, "processing_second")[0].status == S.DELETED


def test_new_job_for_a_package_awaiting_cleanup_keeps_its_files(system):
    with system.session() as s:
        pkg_id = make_archived_package(system, s).id
    first = _stage(system, package_ids=[pkg_id])
    with system.session() as s:
        deactivate_staging_job(s, first)
    second = _stage(system, package_ids=[pkg_id])  # reuses the STAGED copy
    assert _job(system, second).status == m.Status.COMPLETED
    _cleanup(system)
    assert all(_files_on_disk(system, "processing_scratch", pkg_id).values())


def test_staging_from_an_s3_archive(system, s3_server, s3_bucket, override_settings):
    override_settings(
        S3_ACCESS_KEY_ID=s3_server.access_key, S3_SECRET_ACCESS_KEY=s3_server.secret_key
    )
    with system.session() as s:
        s.execute(
            update(m.DataLocation)
            .where(m.DataLocation.name == "us_lta")
            .values(
                storage_type=m.StorageType.S3,
                endpoint_url=s3_server.endpoint_url,
                bucket=s3_bucket,
                prefix="lta",
                path=None,
            )
        )
    with system.session() as s:
        pkg_id = make_archived_package(system, s, lta_locations=("us_lta",)).id
    job_id = _stage(system, package_ids=[pkg_id])
    assert _job(system, job_id).status == m.Status.COMPLETED, _job(system, job_id).failure_reason
    assert all(_files_on_disk(system, "processing_scratch", pkg_id).values())


def test_progress_counts_staged_packages_when_a_later_one_fails(system):
    with system.session() as s:
        good = make_archived_package(system, s).id
        bad = make_archived_package(system, s)
        corrupt_lta_copy(system, s, bad, "cologne_lta")
        corrupt_lta_copy(system, s, bad, "us_lta")
        bad_id = bad.id
    job = _job(system, _stage(system, package_ids=[good, bad_id]))
    assert job.status == m.Status.FAILED and f"package {bad_id}" in job.failure_reason
    assert (job.packages_done, job.packages_total) == (1, 2)
    assert all(_files_on_disk(system, "processing_scratch", good).values())


def test_a_package_locked_by_another_stager_waits_and_a_stale_lock_is_taken_over(system):
    with system.session() as s:
        pkg_id = make_archived_package(system, s).id
        dest_id = system.location(s, "processing_scratch").id
        s.add(m.ManagerState(key=f"staging_lock:{pkg_id}:{dest_id}", value="other"))
    job_id = _stage(system, package_ids=[pkg_id])
    job = _job(system, job_id)
    assert job.status == m.Status.PENDING and "another job" in job.failure_reason
    assert not any(_files_on_disk(system, "processing_scratch", pkg_id).values())

    with system.session() as s:
        lock = s.get(m.ManagerState, f"staging_lock:{pkg_id}:{dest_id}")
        lock.updated_at = m.utcnow() - timedelta(days=2)  # its worker died long ago
    with system.session() as s:
        staging_manager.run_once(s)
    assert _job(system, job_id).status == m.Status.COMPLETED
    with system.session() as s:
        assert s.get(m.ManagerState, f"staging_lock:{pkg_id}:{dest_id}") is None


# --- files that belong to no package ------------------------------------------------------


def _package_file_paths(system, package_id):
    with system.session() as s:
        return sorted(
            s.scalars(
                select(m.RawDataFile.relative_path).where(
                    m.RawDataFile.raw_data_package_id == package_id
                )
            )
        )


def test_staging_never_overwrites_a_file_it_did_not_create(system):
    """A scientist's own file lies where a member would go: the job stops with a reason
    and the file keeps its bytes."""
    with system.session() as s:
        pkg_id = make_archived_package(system, s).id
    theirs = system.location_path("processing_scratch") / _package_file_paths(system, pkg_id)[1]
    theirs.parent.mkdir(parents=True, exist_ok=True)
    theirs.write_bytes(b"a scientist's own notes")
    job = _job(system, _stage(system, package_ids=[pkg_id]))
    assert job.status == m.Status.FAILED
    assert "already exists" in job.failure_reason and "left as it is" in job.failure_reason
    assert theirs.read_bytes() == b"a scientist's own notes"


def test_a_failed_check_deletes_no_file_it_did_not_create(system):
    """The issue's case: one member does not match its record, and a file that belongs to
    no package lies at another member's path: it was overwritten, then deleted."""
    with system.session() as s:
        pkg_id = make_archived_package(system, s).id
    paths = _package_file_paths(system, pkg_id)
    with system.session() as s:
        s.execute(
            update(m.RawDataFile)
            .where(m.RawDataFile.relative_path == paths[0])
            .values(checksum="f" * 64)
        )
    theirs = system.location_path("processing_scratch") / paths[1]
    theirs.parent.mkdir(parents=True, exist_ok=True)
    theirs.write_bytes(b"not from any package")
    job = _job(system, _stage(system, package_ids=[pkg_id]))
    assert job.status == m.Status.FAILED and "do not match" in job.failure_reason
    assert theirs.read_bytes() == b"not from any package"
    root = system.location_path("processing_scratch")
    assert not (root / paths[0]).exists() and not (root / paths[2]).exists()
    assert not [p for p in root.rglob("*") if ".tmp-" in p.name]  # the work folder is gone


def test_staging_again_reuses_files_with_the_same_bytes(system):
    with system.session() as s:
        pkg_id = make_archived_package(system, s).id
    assert _job(system, _stage(system, package_ids=[pkg_id])).status == m.Status.COMPLETED
    root = system.location_path("processing_scratch")
    first = {p: (root / p).stat().st_ino for p in _package_file_paths(system, pkg_id)}
    with system.session() as s:
        s.execute(update(m.StagingJob).values(active=False))
        for copy in package_copies(s, pkg_id, "processing_scratch"):
            copy.status = S.DELETED
    assert _job(system, _stage(system, package_ids=[pkg_id])).status == m.Status.COMPLETED
    assert {p: (root / p).stat().st_ino for p in first} == first  # not replaced
