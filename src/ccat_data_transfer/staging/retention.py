"""Letting staged data go again: job expiry, "done", and who still needs a package.

Room in the house: the end of a staging job's life.  May import: the staging jobs and
finders modules, scope, logging, ``ccat_ops_db``.

Retention
---------
``retention_minutes`` (else the destination's ``retention_period_minutes``, else the
setting ``RETENTION_PERIOD_MINUTES``).  ``expires_at`` is first ``created_at + retention``
and is reset to ``completed_at + retention`` when the data is ready: the clock runs from
the moment the scientist can use the files.  Each staging cycle calls
:func:`expire_staging_jobs`, which turns active jobs past ``expires_at`` inactive
(``deactivated_at`` set); :func:`deactivate_staging_job` does the same on request
(``stage done ID``, ``POST /api/v1/staging-jobs/{id}/done``).  The deletion manager then
removes the files of packages that no active job at that location still needs
(:func:`active_jobs_using_package`).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import and_, select, update
from sqlalchemy.orm import Session

from ccat_data_transfer.core import scope
from ccat_data_transfer.core.logs import get_logger
from ccat_data_transfer.staging.finders import in_chunks
from ccat_data_transfer.staging.jobs import get_staging_job
from ccat_ops_db import models as m

log = get_logger(__name__)

__all__ = ["active_jobs_using_package", "deactivate_staging_job", "expire_staging_jobs"]


def _end_jobs(session: Session, job_ids: list[int], now: datetime) -> int:
    """Turn the still active ones of ``job_ids`` inactive (``deactivated_at = now``), one
    ``UPDATE ... WHERE active`` per chunk; returns how many changed."""
    SJ = m.StagingJob
    count = 0
    for chunk in in_chunks(job_ids):
        count += session.execute(
            update(SJ)
            .where(SJ.id.in_(chunk), SJ.active.is_(True))
            .values(active=False, deactivated_at=now)
            .execution_options(synchronize_session=False)
        ).rowcount
    return count


def deactivate_staging_job(session: Session, job_id: int) -> m.StagingJob:
    """Say "done" for a job: it goes inactive and its files may be cleaned up once no
    other active job at that location needs them.  Idempotent."""
    job = get_staging_job(session, job_id)
    if job.active:
        _end_jobs(session, [job_id], m.utcnow())
        session.refresh(job)
        log.info("staging_job_deactivated", staging_job_id=job_id, reason="user_done")
    return job


def expire_staging_jobs(
    session: Session, now: datetime | None = None, location_ids: list[int] | None = None
) -> int:
    """Active jobs past ``expires_at`` become inactive (one bulk UPDATE); returns how many.
    With ``location_ids`` only jobs whose destination is one of them."""
    now = now or m.utcnow()
    SJ = m.StagingJob
    expired = session.scalars(
        scope.restrict(
            select(SJ.id).where(
                SJ.active.is_(True), SJ.expires_at.is_not(None), SJ.expires_at <= now
            ),
            SJ.destination_location_id,
            location_ids,
        )
    ).all()
    if not expired:
        return 0
    count = _end_jobs(session, list(expired), now)
    log.info("staging_jobs_expired", count=count, staging_job_ids=list(expired[:50]))
    return count


def active_jobs_using_package(session: Session, package_id: int, location_id: int) -> list[int]:
    """IDs of active staging jobs at ``location_id`` that include ``package_id``."""
    link = m.staging_job_raw_data_package
    return list(
        session.scalars(
            select(m.StagingJob.id)
            .join(link, link.c.staging_job_id == m.StagingJob.id)
            .where(
                and_(
                    link.c.raw_data_package_id == package_id,
                    m.StagingJob.destination_location_id == location_id,
                    m.StagingJob.active.is_(True),
                )
            )
        ).all()
    )
