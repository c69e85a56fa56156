"""Recovery service: finds work whose worker died and puts it back in the queue.

Every stage marks what it is doing (SCHEDULED / IN_PROGRESS rows) and, for long work,
refreshes a heartbeat (``updated_at``) while it runs.  Work untouched for longer than
STALLED_WORK_TIMEOUT_SECONDS has lost its worker: each stage's own reset function turns
it into one failed attempt (retry counted, backoff), or FAILED when out of retries.
Destination writes are atomic everywhere, so a reset never leaves a half-written file
under a final name.  Deletions stuck in flight are handed back to the deletion manager,
whose worker re-checks the rule before touching storage.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from ccat_data_transfer import scope
from ccat_data_transfer.config.config import settings
from ccat_data_transfer.logging_utils import get_logger
from ccat_ops_db import models as m

log = get_logger(__name__)


def stalled_timeout() -> timedelta:
    return timedelta(seconds=float(settings.STALLED_WORK_TIMEOUT_SECONDS))


def reset_stalled_staging_jobs(
    session: Session, older_than: timedelta, location_ids: list[int] | None = None
) -> int:
    """Staging jobs IN_PROGRESS since before ``older_than``: back to PENDING (staging is
    idempotent: packages already STAGED are reused), or FAILED when out of retries.  With
    ``location_ids`` only jobs whose destination is one of them."""
    cutoff = m.utcnow() - older_than
    job = m.StagingJob
    max_retries = int(settings.get("STAGING_MAX_RETRIES", 5))
    reset = 0
    stalled = select(job.id, job.retry_count).where(
        job.status == m.Status.IN_PROGRESS, job.start_time < cutoff
    )
    for job_id, retries in session.execute(
        scope.restrict(stalled, job.destination_location_id, location_ids)
    ).all():
        if retries >= max_retries:
            values: dict[str, Any] = {
                "status": m.Status.FAILED,
                "failure_reason": "stalled in IN_PROGRESS: worker lost, out of retries",
            }
        else:
            values = {
                "status": m.Status.PENDING,
                "retry_count": retries + 1,
                "failure_reason": "stalled in IN_PROGRESS: worker lost",
                "next_attempt_at": m.utcnow(),
            }
        reset += session.execute(
            update(job).where(job.id == job_id, job.status == m.Status.IN_PROGRESS).values(**values)
        ).rowcount
    session.commit()
    return reset


def run_once(
    session: Session, older_than: timedelta | None = None, site: str | None = None
) -> dict[str, int]:
    """One recovery pass over every stage.  Returns what was reset, per stage.

    ``site`` scopes the pass to stalled work whose location is at that site, the owner
    of each kind being the one of its manager (default: the setting ``MANAGER_SITE``;
    see :mod:`ccat_data_transfer.scope`)."""
    from ccat_data_transfer import (
        archive_manager,
        data_transfer_package_manager,
        raw_data_package_manager,
    )
    from ccat_data_transfer.deletion.cycle import resubmit_stalled_deletions
    from ccat_data_transfer.transfer import recovery as transfer_manager

    older_than = older_than or stalled_timeout()
    ids = scope.location_ids(session, site)
    steps = {
        "raw_data_packages": lambda: raw_data_package_manager.release_stalled_claims(session, ids),
        "data_transfer_packages": lambda: data_transfer_package_manager.release_stalled_claims(
            session, ids
        ),
        "transfers": lambda: transfer_manager.reset_stalled_transfers(session, older_than, ids),
        "archive_transfers": lambda: archive_manager.reset_stalled_archive_transfers(
            session, older_than, ids
        ),
        "staging_jobs": lambda: reset_stalled_staging_jobs(session, older_than, ids),
        # The deletion manager also does this every cycle; the task re-checks the rule.
        "deletions": lambda: resubmit_stalled_deletions(session, location_ids=ids),
    }
    summary: dict[str, int] = {}
    for name, step in steps.items():
        # One stage's failure must not keep the others' stalled work stuck.
        try:
            summary[name] = int(step() or 0)
        except Exception as exc:
            session.rollback()
            summary[name] = 0
            log.exception("recovery_step_failed", step=name, error=str(exc))
    if any(summary.values()):
        log.warning("stalled_work_reset", **summary)
    return summary
