"""Recovery service: finds work whose worker died and puts it back in the queue.

Every stage marks what it is doing (queued: SCHEDULED; started: IN_PROGRESS) and every
long step renews a heartbeat while it runs (:mod:`ccat_data_transfer.core.liveness`).
Started work whose heartbeat stopped for HEARTBEAT_MISSED_BEATS beats has lost its
worker: each stage's own reset function turns it into one failed attempt (retry counted,
backoff), or FAILED when out of retries; a package build's claim is released.  Queued
work is never reset nor charged: when it has waited longer than QUEUED_RESEND_SECONDS
its task is sent again (the broker may have lost it); a duplicate delivery does nothing,
since every task takes its row with a conditional UPDATE.
Destination writes are atomic everywhere, so a reset never leaves a half-written file
under a final name.  Deletions stuck in flight are handed back to the deletion manager,
whose worker re-checks the rule before touching storage.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.orm import Session

from ccat_data_transfer.archive import cycle as archive_manager
from ccat_data_transfer.core import scope
from ccat_data_transfer.core.config import settings
from ccat_data_transfer.core.liveness import (
    ResendFailed,
    resend_all,
    stall_window,
    stopped,
    waited_in_queue,
)
from ccat_data_transfer.core.logs import get_logger
from ccat_data_transfer.core.operation_types import OperationType
from ccat_data_transfer.core.queues import route_task_by_location
from ccat_data_transfer.deletion.base import PCT
from ccat_data_transfer.deletion.cycle import deletion_stalled, resubmit_stalled_deletions
from ccat_data_transfer.packaging import raw_packages as raw_data_package_manager
from ccat_data_transfer.packaging import transfer_packages as data_transfer_package_manager
from ccat_data_transfer.packaging.skeleton import (
    release_stalled_claims,
    resend_queued_builds,
    stalled_builds,
)
from ccat_data_transfer.transfer import recovery as transfer_recovery
from ccat_ops_db import models as m

log = get_logger(__name__)


def stalled_timeout() -> timedelta:
    """How long started work may go without a heartbeat (HEARTBEAT_SECONDS x
    HEARTBEAT_MISSED_BEATS)."""
    return stall_window()


def staging_job_stalled(older_than: timedelta | None = None) -> ColumnElement[bool]:
    """A staging job that STARTED (IN_PROGRESS with a heartbeat) and whose heartbeat
    stopped (``older_than``: default :func:`stalled_timeout`)."""
    job = m.StagingJob
    return (job.status == m.Status.IN_PROGRESS) & stopped(job.heartbeat_at, window=older_than)


def stalled_work(session: Session, older_than: timedelta | None = None) -> dict[str, int]:
    """How much started work, per stage, has had no heartbeat for ``older_than``
    (default: the stall window plus two recovery passes, i.e. work the recovery service
    should already have reset: is it running?).  Read only; the same conditions as the
    resets of :func:`run_once`."""
    if older_than is None:
        passes = 2 * float(settings.get("RECOVERY_SERVICE_SLEEP_TIME", 30))
        older_than = stalled_timeout() + timedelta(seconds=passes)
    now = m.utcnow()

    kinds = {
        "transfer": transfer_recovery.STALLED_TRANSFERS,
        "unpack": transfer_recovery.STALLED_UNPACKS,
        "archive_transfer": archive_manager.STALLED_ARCHIVE_TRANSFERS,
    }
    queries: dict[str, Any] = {
        "raw_data_package": stalled_builds(raw_data_package_manager.RAW_DATA_PACKAGE, older_than),
        "data_transfer_package": stalled_builds(
            data_transfer_package_manager.DATA_TRANSFER_PACKAGE, older_than
        ),
    }
    for name, kind in kinds.items():
        queries[name] = transfer_recovery.stalled_rows(kind, now, older_than)[0]
    queries["staging_job"] = select(m.StagingJob.id).where(staging_job_stalled(older_than))
    queries["deletion"] = select(PCT.c.id).where(deletion_stalled(older_than))
    # One statement (one round trip per metrics scrape), a scalar count per kind.
    row = session.execute(
        select(
            *(
                select(func.count()).select_from(q.subquery()).scalar_subquery().label(name)
                for name, q in queries.items()
            )
        )
    ).one()
    return {name: int(row._mapping[name] or 0) for name in queries}


def reset_stalled_staging_jobs(
    session: Session, older_than: timedelta | None = None, location_ids: list[int] | None = None
) -> int:
    """Started staging jobs (IN_PROGRESS with a heartbeat) whose heartbeat stopped
    (``older_than``: default :func:`stalled_timeout`): back to PENDING (staging is
    idempotent: packages already STAGED are reused), or FAILED when out of retries.  A job
    claimed but still queued (no heartbeat yet) is never reset.  With ``location_ids``
    only jobs whose destination is one of them."""
    job = m.StagingJob
    max_retries = int(settings.get("STAGING_MAX_RETRIES", 5))
    dead = staging_job_stalled(older_than)
    reset = 0
    stalled = select(job.id, job.retry_count).where(dead)
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
            update(job).where(job.id == job_id, dead).values(**values)
        ).rowcount
    session.commit()
    return reset


def resend_queued_staging_jobs(session: Session, location_ids: list[int] | None = None) -> int:
    """Claimed staging jobs still queued (IN_PROGRESS, no heartbeat) whose task was sent
    (``start_time``) longer than QUEUED_RESEND_SECONDS ago: the task is sent again, no
    retry counted (the task takes the job with a conditional UPDATE); ``start_time`` is
    stamped only after the send went out, and a failing send does not stop the others
    (:func:`~ccat_data_transfer.core.liveness.resend_all`).  Returns how many."""
    job = m.StagingJob
    queued = select(job).where(
        job.status == m.Status.IN_PROGRESS,
        job.heartbeat_at.is_(None),
        waited_in_queue(func.coalesce(job.start_time, job.created_at)),
    )
    jobs = session.scalars(scope.restrict(queued, job.destination_location_id, location_ids)).all()
    sends = [
        (
            STAGING_TASK,
            row.id,
            route_task_by_location(OperationType.STAGING, row.destination_location),
        )
        for row in jobs
    ]
    session.commit()  # end the read transaction before talking to the broker

    def stamp(_task: str, job_id: int, queue: str) -> None:
        session.execute(
            update(job)
            .where(job.id == job_id, job.heartbeat_at.is_(None))
            .values(start_time=m.utcnow())
            .execution_options(synchronize_session=False)
        )
        log.warning("staging_job_resent", staging_job_id=job_id, queue=queue)

    return resend_all(session, "queued staging jobs", sends, stamp)


#: The staging task's name (its message is sent again by name).
STAGING_TASK = "ccat_data_transfer.stage_staging_job"


def run_once(
    session: Session, older_than: timedelta | None = None, site: str | None = None
) -> dict[str, int]:
    """One recovery pass over every stage.  Returns what was reset, per stage.

    ``site`` scopes the pass to stalled work whose location is at that site, the owner
    of each kind being the one of its manager (default: the setting ``MANAGER_SITE``;
    see :mod:`ccat_data_transfer.core.scope`)."""
    ids = scope.location_ids(session, site)
    queued_kinds = (
        transfer_recovery.STALLED_TRANSFERS,
        transfer_recovery.STALLED_UNPACKS,
        archive_manager.STALLED_ARCHIVE_TRANSFERS,
    )
    steps = {
        "raw_data_packages": lambda: release_stalled_claims(
            session, raw_data_package_manager.RAW_DATA_PACKAGE, ids, older_than, resend=False
        ),
        "data_transfer_packages": lambda: release_stalled_claims(
            session,
            data_transfer_package_manager.DATA_TRANSFER_PACKAGE,
            ids,
            older_than,
            resend=False,
        ),
        "transfers": lambda: transfer_recovery.reset_stalled_transfers(session, older_than, ids),
        "archive_transfers": lambda: archive_manager.reset_stalled_archive_transfers(
            session, older_than, ids
        ),
        "staging_jobs": lambda: reset_stalled_staging_jobs(session, older_than, ids),
        # The deletion manager also does this every cycle; the task re-checks the rule.
        "deletions": lambda: resubmit_stalled_deletions(session, location_ids=ids),
    }
    # Queued work whose message the broker may have lost: sent again, no retry charged;
    # one step per kind, so that one kind's failure does not keep the others' lost.
    for build in (
        raw_data_package_manager.RAW_DATA_PACKAGE,
        data_transfer_package_manager.DATA_TRANSFER_PACKAGE,
    ):
        steps[f"queued:{build.task}"] = lambda build=build: resend_queued_builds(
            session, build, ids
        )
    for kind in queued_kinds:
        steps[f"queued:{kind.task}"] = lambda kind=kind: transfer_recovery.resend_queued(
            session, (kind,), ids
        )
    steps[f"queued:{STAGING_TASK}"] = lambda: resend_queued_staging_jobs(session, ids)
    summary: dict[str, int] = {}
    failed_steps = 0
    for name, step in steps.items():
        # One step's failure must not stop the others (each is its own transaction).
        try:
            summary[name] = int(step() or 0)
        except Exception as exc:
            failed_steps += 1
            session.rollback()
            summary[name] = exc.sent if isinstance(exc, ResendFailed) else 0
            log.exception("recovery_step_failed", step=name, error=str(exc))
    queued = [name for name in summary if name.startswith("queued:")]
    summary["queued_resent"] = sum(summary.pop(name) for name in queued)
    summary["failed_steps"] = failed_steps
    if any(summary.values()):
        log.warning("stalled_work_reset", **summary)
    return summary
