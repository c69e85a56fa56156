"""The staging manager's cycle: expire jobs, claim the due ones, submit their tasks.

Room in the house: :func:`run_once`, the entry the long-running loop
(:func:`~ccat_data_transfer.core.manager_loop.run_manager`), the CLI's ``--once`` and the tests
all call, and :func:`sleep_time`.  May import: the staging finders, retention and task
modules, scope, queue routing, config, logging, ``ccat_ops_db``.

:func:`run_once` expires jobs, then claims each due PENDING active job with ``UPDATE
staging_job SET status='IN_PROGRESS' WHERE id=:id AND status='PENDING'`` (row count 1 or
someone else has it), commits, and submits
:func:`~ccat_data_transfer.staging.tasks.stage_staging_job` on the
``{site}_{destination}_staging`` queue (in-process in embedded mode).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ccat_data_transfer.core import scope
from ccat_data_transfer.core.config import settings
from ccat_data_transfer.core.logs import get_logger
from ccat_data_transfer.core.operation_types import OperationType
from ccat_data_transfer.core.queues import route_task_by_location
from ccat_data_transfer.staging.finders import claim_staging_job, due_staging_jobs
from ccat_data_transfer.staging.retention import expire_staging_jobs
from ccat_data_transfer.staging.tasks import stage_staging_job
from ccat_ops_db import models as m

log = get_logger(__name__)

__all__ = ["run_once", "sleep_time"]


def sleep_time() -> float:
    return float(settings.get("STAGING_MANAGER_SLEEP_TIME", 5))


def run_once(session: Session, site: str | None = None) -> dict[str, Any]:
    """One cycle: expire jobs, claim due PENDING jobs, commit, submit their tasks.

    ``site`` scopes the cycle to jobs whose destination is at that site (default: the
    setting ``MANAGER_SITE``; see :mod:`ccat_data_transfer.core.scope`)."""
    ids = scope.location_ids(session, site)
    summary: dict[str, Any] = {"expired": expire_staging_jobs(session, location_ids=ids)}
    now = m.utcnow()
    claimed: list[tuple[int, str]] = []
    for job_id, dest_id in due_staging_jobs(session, now, ids):
        dest = session.get(m.DataLocation, dest_id)
        queue = route_task_by_location(OperationType.STAGING, dest)
        if claim_staging_job(session, job_id, now):
            claimed.append((job_id, queue))
    # Commit before submitting: in embedded mode the task runs inline in its own session.
    session.commit()
    for job_id, queue in claimed:
        stage_staging_job.apply_async(args=[job_id], queue=queue)
    summary["claimed"] = len(claimed)
    summary["job_ids"] = [j for j, _ in claimed]
    if claimed:
        session.expire_all()
        SJ = m.StagingJob
        states = session.execute(
            select(SJ.status, func.count())
            .where(SJ.id.in_([j for j, _ in claimed]))
            .group_by(SJ.status)
        ).all()
        summary["jobs_by_status"] = {s.name: n for s, n in states}
    if summary["expired"] or claimed:
        log.info("staging_manager_cycle", **summary)
    return summary
