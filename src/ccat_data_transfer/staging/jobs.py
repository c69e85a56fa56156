"""Staging jobs: create, read and list a scientist's requests.

Room in the house: the job functions the CLI ``stage`` and the REST API
(``POST /api/v1/staging-jobs``) call.  A scientist's request is a
:class:`~ccat_ops_db.models.StagingJob`: packages, a destination PROCESSING location, a
retention period.  What a request may name, and when it is refused, is in
:mod:`ccat_data_transfer.staging.request`; ending jobs is in
:mod:`ccat_data_transfer.staging.retention`.  May import: the staging request module,
config, exceptions, logging, ``ccat_ops_db``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_data_transfer.core.errors import NotFoundError
from ccat_data_transfer.core.logs import get_logger
from ccat_data_transfer.staging.request import (
    naive_utc,
    refuse_unstageable,
    resolve_location,
    resolve_user,
    retention_minutes_for,
    select_packages,
)
from ccat_ops_db import models as m

log = get_logger(__name__)

__all__ = ["create_staging_job", "get_staging_job", "job_as_dict", "list_staging_jobs"]


def create_staging_job(
    session: Session,
    *,
    package_ids: Sequence[int] | None = None,
    executed_obs_unit: str | int | m.ExecutedObsUnit | None = None,
    instrument: str | int | None = None,
    start: datetime | str | None = None,
    end: datetime | str | None = None,
    destination: str | int | m.DataLocation = "processing_scratch",
    retention_minutes: int | None = None,
    name: str | None = None,
    user: str | int | m.User | None = None,
) -> m.StagingJob:
    """Record a staging request (PENDING, active) and return it (flushed, not committed).

    Raises :class:`~ccat_data_transfer.core.errors.NotFoundError` for an unknown location,
    user, obs unit, instrument or package, or when nothing matches;
    :class:`~ccat_data_transfer.core.errors.ValidationError` for a destination that is
    not an active PROCESSING location, a bad retention or time range, or packages that
    are not ARCHIVED with a usable LTA copy.  Nothing is written when it raises.

    ``expires_at`` is first ``created_at + retention``; the task resets it when the data
    is ready (see :mod:`ccat_data_transfer.staging.retention`).
    """
    dest = resolve_location(session, destination)
    owner = resolve_user(session, user)
    packages, label = select_packages(
        session,
        package_ids=package_ids,
        executed_obs_unit=executed_obs_unit,
        instrument=instrument,
        start=naive_utc(start, "start"),
        end=naive_utc(end, "end"),
    )
    retention_minutes = retention_minutes_for(dest, retention_minutes)
    refuse_unstageable(session, packages)

    now = m.utcnow()
    job = m.StagingJob(
        name=(name or f"stage {label}")[:256],
        user=owner,
        destination_location=dest,
        active=True,
        retention_period_minutes=retention_minutes,
        status=m.Status.PENDING,
        packages_total=len(packages),
        packages_done=0,
        retry_count=0,
        created_at=now,
        expires_at=now + timedelta(minutes=retention_minutes),
    )
    job.raw_data_packages = list(packages)
    session.add(job)
    session.flush()
    log.info(
        "staging_job_created",
        staging_job_id=job.id,
        location=dest.name,
        packages=len(packages),
        size_bytes=sum(p.size or 0 for p in packages),
        user=owner.username if owner else None,
        retention_minutes=retention_minutes,
    )
    return job


def get_staging_job(session: Session, job_id: int) -> m.StagingJob:
    job = session.get(m.StagingJob, job_id)
    if job is None:
        raise NotFoundError(f"no staging job {job_id}")
    return job


def list_staging_jobs(
    session: Session,
    *,
    active: bool | None = None,
    user: str | None = None,
    limit: int | None = None,
) -> list[m.StagingJob]:
    """Jobs, newest first; optionally only (in)active ones or one user's."""
    stmt = select(m.StagingJob).order_by(m.StagingJob.id.desc())
    if active is not None:
        stmt = stmt.where(m.StagingJob.active.is_(active))
    if user is not None:
        stmt = stmt.join(m.User, m.User.id == m.StagingJob.user_id).where(m.User.username == user)
    if limit:
        stmt = stmt.limit(limit)
    return list(session.scalars(stmt).all())


def job_as_dict(job: m.StagingJob) -> dict[str, Any]:
    """A job as plain data (API responses, ``stage list --json``)."""

    def iso(v: datetime | None) -> str | None:
        return v.isoformat() if v else None

    return {
        "id": job.id,
        "name": job.name,
        "user": job.user.username if job.user else None,
        "destination": job.destination_location.name,
        "status": job.status.name,
        "active": job.active,
        "packages_total": job.packages_total,
        "packages_done": job.packages_done,
        "package_ids": sorted(p.id for p in job.raw_data_packages),
        "retention_period_minutes": job.retention_period_minutes,
        "retry_count": job.retry_count,
        "failure_reason": job.failure_reason,
        "created_at": iso(job.created_at),
        "start_time": iso(job.start_time),
        "completed_at": iso(job.completed_at),
        "expires_at": iso(job.expires_at),
        "deactivated_at": iso(job.deactivated_at),
        "next_attempt_at": iso(job.next_attempt_at),
    }
