"""The staging task: serve one claimed staging job, package by package.

Room in the house: the Celery task :func:`stage_staging_job` (name
``ccat_data_transfer.stage_staging_job``, queue ``{site}_{destination}_staging``) and the
job's state changes around :func:`~ccat_data_transfer.staging.package.stage_package`.
The task receives a job ID and re-reads the job; it takes the job with one conditional
UPDATE (its first heartbeat), so a duplicate delivery does nothing, and stamps
``heartbeat_at`` every HEARTBEAT_SECONDS while it runs (:mod:`ccat_data_transfer.core.liveness`).
May import: the staging package module, celery_app, config, database, exceptions, liveness,
logging, ``ccat_ops_db``.

The task stages the job's packages one by one (``packages_done`` moves as it goes) and
marks the job COMPLETED, resetting ``expires_at`` to ``completed_at + retention``.
Failures: every LTA unreachable (or the destination full) is retryable: the job goes back
to PENDING with ``retry_count + 1`` and ``next_attempt_at`` (backoff
``STAGING_RETRY_BASE_SECONDS * 2**retry_count``), FAILED after ``STAGING_MAX_RETRIES``.
No good copy anywhere (all missing or corrupt), or files that do not match their
records, is permanent: FAILED with ``failure_reason``.  Someone else staging or deleting
the package there (:class:`~ccat_data_transfer.staging.package.StagingBusy`) is not the
job's fault: it waits without counting a retry.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import update

from ccat_data_transfer.core.attempts import new_attempt
from ccat_data_transfer.core.celery_app import app
from ccat_data_transfer.core.config import settings
from ccat_data_transfer.core.database import DatabaseConnection
from ccat_data_transfer.core.errors import PermanentError, RetryableError
from ccat_data_transfer.core.liveness import beating
from ccat_data_transfer.core.logs import get_logger
from ccat_data_transfer.staging.package import StagingBusy, stage_package
from ccat_ops_db import models as m

log = get_logger("ccat_data_transfer.staging.task")  # the name its log records had

__all__ = ["stage_staging_job"]


@app.task(bind=True, acks_late=True, name="ccat_data_transfer.stage_staging_job")
def stage_staging_job(self: Any, job_id: int) -> dict[str, Any]:
    """Stage every package of one claimed (IN_PROGRESS) job; idempotent."""
    return _run_job(DatabaseConnection(), job_id)


def _job_state(db: DatabaseConnection, job_id: int, attempt: str) -> tuple[bool, bool]:
    """(the job is IN_PROGRESS and still this attempt's, the job is active)."""
    with db.session_scope() as s:
        job = s.get(m.StagingJob, job_id)
        if job is None:
            return False, False
        return job.status == m.Status.IN_PROGRESS and job.attempt_id == attempt, job.active


def _set_job(db: DatabaseConnection, job_id: int, attempt: str, **values: Any) -> bool:
    """Record ``values`` on the job if ``attempt`` still owns it (IN_PROGRESS with its
    ``attempt_id``): one conditional UPDATE; a superseded attempt records nothing."""
    with db.session_scope() as s:
        changed = s.execute(
            update(m.StagingJob)
            .where(
                m.StagingJob.id == job_id,
                m.StagingJob.status == m.Status.IN_PROGRESS,
                m.StagingJob.attempt_id == attempt,
            )
            .values(**values)
            .execution_options(synchronize_session=False)
        ).rowcount
    if not changed:
        log.warning("attempt_superseded", work="staging_job", row_id=job_id, attempt=attempt)
    return bool(changed)


def _take(db: DatabaseConnection, job_id: int, attempt: str) -> bool:
    """Start the claimed job: its first heartbeat and this attempt's token, in one
    conditional UPDATE (claimed and not started yet), so a second delivery of the task
    does nothing."""
    SJ = m.StagingJob
    with db.session_scope() as s:
        return bool(
            s.execute(
                update(SJ)
                .where(
                    SJ.id == job_id, SJ.status == m.Status.IN_PROGRESS, SJ.heartbeat_at.is_(None)
                )
                .values(heartbeat_at=m.utcnow(), attempt_id=attempt)
                .execution_options(synchronize_session=False)
            ).rowcount
        )


def _run_job(db: DatabaseConnection, job_id: int) -> dict[str, Any]:
    attempt = new_attempt()
    if not _take(db, job_id, attempt):
        log.info("staging_job_skipped", staging_job_id=job_id, reason="not claimed or started")
        return {"status": "skipped", "staging_job_id": job_id}
    SJ = m.StagingJob
    with beating(SJ, SJ.id == job_id, attempt=attempt, label=f"staging_job-{job_id}"):
        return _stage_job(db, job_id, attempt)


def _stage_job(db: DatabaseConnection, job_id: int, attempt: str) -> dict[str, Any]:
    with db.session_scope() as s:
        job = s.get(m.StagingJob, job_id)
        if job is None or job.status != m.Status.IN_PROGRESS:
            log.info("staging_job_skipped", staging_job_id=job_id, reason="not in progress")
            return {"status": "skipped", "staging_job_id": job_id}
        package_ids = sorted(p.id for p in job.raw_data_packages)
        dest_id = job.destination_location_id
        retention = job.retention_period_minutes or int(settings.RETENTION_PERIOD_MINUTES)
        retries = job.retry_count
    outcomes: dict[int, str] = {}
    try:
        for done, package_id in enumerate(package_ids):
            in_progress, active = _job_state(db, job_id, attempt)
            if not in_progress:
                return {"status": "skipped", "staging_job_id": job_id}
            if not active:
                _set_job(
                    db,
                    job_id,
                    attempt,
                    status=m.Status.FAILED,
                    failure_reason="deactivated before staging completed",
                )
                log.info("staging_job_cancelled", staging_job_id=job_id, reason="deactivated")
                return {"status": "cancelled", "staging_job_id": job_id}
            outcomes[package_id] = stage_package(db, package_id, dest_id)
            if not _set_job(db, job_id, attempt, packages_done=done + 1):
                return {"status": "skipped", "staging_job_id": job_id}
    except StagingBusy as exc:
        # Not the job's fault: try again soon without counting a retry.
        _set_job(
            db,
            job_id,
            attempt,
            status=m.Status.PENDING,
            failure_reason=str(exc),
            next_attempt_at=m.utcnow() + timedelta(seconds=_backoff(0)),
        )
        log.info("staging_job_waiting", staging_job_id=job_id, reason=str(exc))
        return {"status": "waiting", "staging_job_id": job_id, "reason": str(exc)}
    except PermanentError as exc:
        _fail(db, job_id, attempt, str(exc))
        return {"status": "failed", "staging_job_id": job_id, "reason": str(exc)}
    except Exception as exc:  # retryable, or unexpected: retry up to the limit
        return _retry_or_fail(db, job_id, attempt, retries, exc)
    now = m.utcnow()
    _set_job(
        db,
        job_id,
        attempt,
        status=m.Status.COMPLETED,
        completed_at=now,
        packages_done=len(package_ids),
        failure_reason=None,
        next_attempt_at=None,
        expires_at=now + timedelta(minutes=retention),
    )
    log.info(
        "staging_job_completed",
        staging_job_id=job_id,
        packages=len(package_ids),
        staged=sum(1 for o in outcomes.values() if o == "staged"),
        reused=sum(1 for o in outcomes.values() if o == "reused"),
    )
    return {"status": "completed", "staging_job_id": job_id, "packages": outcomes}


def _retry_or_fail(
    db: DatabaseConnection, job_id: int, attempt: str, retries: int, exc: Exception
) -> dict[str, Any]:
    """A retryable or unexpected error of one attempt: PENDING again with backoff, or
    FAILED once STAGING_MAX_RETRIES attempts were made."""
    reason = str(exc) if isinstance(exc, RetryableError) else f"{type(exc).__name__}: {exc}"
    if not isinstance(exc, RetryableError):
        log.exception("staging_job_error", staging_job_id=job_id, reason=reason)
    if retries + 1 >= int(settings.get("STAGING_MAX_RETRIES", 5)):
        _fail(db, job_id, attempt, f"gave up after {retries + 1} attempts: {reason}")
        return {"status": "failed", "staging_job_id": job_id, "reason": reason}
    _set_job(
        db,
        job_id,
        attempt,
        status=m.Status.PENDING,
        retry_count=retries + 1,
        failure_reason=reason,
        next_attempt_at=m.utcnow() + timedelta(seconds=_backoff(retries)),
    )
    log.warning("staging_job_retry", staging_job_id=job_id, reason=reason, attempt=retries + 1)
    return {"status": "retry", "staging_job_id": job_id, "reason": reason}


def _backoff(retries: int) -> float:
    base = float(settings.get("STAGING_RETRY_BASE_SECONDS", 60))
    return min(base * (2**retries), 86400.0)


def _fail(db: DatabaseConnection, job_id: int, attempt: str, reason: str) -> None:
    _set_job(
        db, job_id, attempt, status=m.Status.FAILED, failure_reason=reason, next_attempt_at=None
    )
    log.error("staging_job_failed", staging_job_id=job_id, reason=reason)
