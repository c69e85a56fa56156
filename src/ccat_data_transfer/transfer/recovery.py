"""Recovery of the transfer stage: the retry policy, resets of stalled work, the
operator's retry.

Every failed attempt of a transfer, an unpack or an archive transfer goes through
:func:`fail_or_retry_values`: back to PENDING with exponential backoff, or FAILED when
out of retries.  Started work whose worker vanished (IN_PROGRESS, its heartbeat
``updated_at`` stopped; see :mod:`ccat_data_transfer.core.liveness`) counts as one failed
attempt (:func:`reset_stalled` over the kinds of :class:`StalledWork`, used by the
recovery service); queued work is never reset, its task is sent again if it waited long
(:func:`resend_queued`).

Room in the house: manager side, database only.  Imports core (config, scope, logging,
exceptions) and ``ccat_ops_db``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from ccat_data_transfer.core import scope
from ccat_data_transfer.core.config import settings
from ccat_data_transfer.core.errors import NotFoundError, ValidationError
from ccat_data_transfer.core.liveness import resend_all, stopped, waited_in_queue
from ccat_data_transfer.core.logs import get_logger
from ccat_data_transfer.core.operation_types import OperationType
from ccat_data_transfer.core.queues import route_task_by_location
from ccat_ops_db import models as m

log = get_logger("ccat_data_transfer.transfer_manager")

#: The states of work handed to a worker (claimed or running).
IN_FLIGHT = (m.Status.SCHEDULED, m.Status.IN_PROGRESS)

__all__ = [
    "IN_FLIGHT",
    "STALLED_TRANSFERS",
    "STALLED_UNPACKS",
    "StalledWork",
    "fail_or_retry_values",
    "reset_stalled",
    "resend_queued",
    "reset_stalled_transfers",
    "retry_due_at",
    "retry_transfer",
]


def retry_due_at(retry_count: int, now: datetime) -> datetime | None:
    """When the next attempt after a failure is due (exponential backoff from
    TRANSFER_RETRY_BASE_SECONDS), or None once TRANSFER_MAX_RETRIES are used up.

    The one retry policy of transfers, unpacks and archive transfers."""
    if retry_count >= int(settings.TRANSFER_MAX_RETRIES):
        return None
    delay = float(settings.TRANSFER_RETRY_BASE_SECONDS) * (2**retry_count)
    return now + timedelta(seconds=delay)


def fail_or_retry_values(
    retry_count: int, reason: str, now: datetime, permanent: bool = False, prefix: str = ""
) -> dict[str, Any]:
    """Column values after a failed attempt of a row with ``status``/``retry_count``
    columns (DataTransfer, LongTermArchiveTransfer), or with ``prefix`` ``"unpack_"`` of
    a DataTransfer's unpack: PENDING with backoff, or FAILED when out of retries or the
    failure is ``permanent``."""
    due = None if permanent else retry_due_at(retry_count, now)
    if due is None:
        return {
            f"{prefix}status": m.Status.FAILED,
            f"{prefix}failure_reason": reason,
            f"{prefix}end_time": now,
        }
    return {
        f"{prefix}status": m.Status.PENDING,
        f"{prefix}retry_count": retry_count + 1,
        "next_attempt_at": due,
        f"{prefix}failure_reason": reason,
    }


@dataclass(frozen=True)
class StalledWork:
    """One kind of in-flight work the recovery service watches: the rows of ``model``
    whose ``status`` (or ``<prefix>status``) is in flight, among those matching ``only``.
    ``scope_column`` is the location whose site owns the reset; ``reason`` may name
    ``{status}``.  Started (IN_PROGRESS) work beats ``updated_at``; a queued (SCHEDULED)
    row's ``updated_at`` is when its task was (last) sent: ``task`` (a task name) is sent
    again on the ``operation`` queue of the row's ``queue_location`` (a relationship)."""

    model: Any
    scope_column: Any
    reason: str
    task: str
    operation: OperationType
    queue_location: str
    prefix: str = ""
    only: tuple[Any, ...] = ()


#: Transfers (reset by the origin's site) and unpacks (by the destination's site).
STALLED_TRANSFERS = StalledWork(
    m.DataTransfer,
    m.DataTransfer.origin_location_id,
    "stalled in {status}: worker lost",
    "ccat_data_transfer.transfer_manager.transfer_data_transfer_package",
    OperationType.DATA_TRANSFER,
    "origin_location",
)
STALLED_UNPACKS = StalledWork(
    m.DataTransfer,
    m.DataTransfer.destination_location_id,
    "unpack stalled in {status}",
    "ccat_data_transfer.transfer_manager.unpack_data_transfer_package",
    OperationType.DATA_TRANSFER_UNPACKING,
    "destination_location",
    prefix="unpack_",
    only=(m.DataTransfer.status == m.Status.COMPLETED,),
)


def stalled_rows(
    kind: StalledWork, now: datetime, older_than: timedelta | None = None
) -> tuple[Any, Any]:
    """The STARTED rows of ``kind`` (IN_PROGRESS) whose heartbeat (``updated_at``)
    stopped: ``(select of (id, retry count), the condition)``."""
    model, prefix = kind.model, kind.prefix
    status = getattr(model, f"{prefix}status")
    retries = getattr(model, f"{prefix}retry_count")
    dead = (status == m.Status.IN_PROGRESS) & stopped(model.updated_at, now, older_than)
    return select(model.id, retries).where(*kind.only, dead), dead


def reset_stalled(
    session: Session,
    kinds: tuple[StalledWork, ...],
    older_than: timedelta | float | None = None,
    location_ids: list[int] | None = None,
) -> int:
    """Count one failed attempt (:func:`fail_or_retry_values`) for every STARTED row
    (IN_PROGRESS) of each of ``kinds`` whose heartbeat (``updated_at``) stopped
    (:func:`ccat_data_transfer.core.liveness.stopped`; ``older_than`` overrides the window);
    with ``location_ids`` only rows whose scope column is one of them.  Each row is reset
    by its own conditional UPDATE (still in that state, still without a beat), so a worker
    that beats or finishes meanwhile wins.  Queued rows are never reset: see
    :func:`resend_queued`.  Returns the number of rows reset; does not commit."""
    if older_than is not None and not isinstance(older_than, timedelta):
        older_than = timedelta(seconds=float(older_than))
    now = m.utcnow()
    reset = 0
    for kind in kinds:
        model, prefix = kind.model, kind.prefix
        stalled, dead = stalled_rows(kind, now, older_than)
        for row_id, count in session.execute(
            scope.restrict(stalled, kind.scope_column, location_ids)
        ).all():
            still = [model.id == row_id, dead]
            reason = kind.reason.format(status=m.Status.IN_PROGRESS.name)
            values = fail_or_retry_values(count, reason, now, prefix=prefix)
            reset += session.execute(update(model).where(*still).values(**values)).rowcount
    return reset


def resend_queued(
    session: Session, kinds: tuple[StalledWork, ...], location_ids: list[int] | None = None
) -> int:
    """Send again the task of every queued (SCHEDULED) row of ``kinds`` whose task was
    sent longer than QUEUED_RESEND_SECONDS ago (the broker may have lost it); no retry is
    charged and the row is not reset.  ``updated_at`` (when the task was sent) is stamped
    only after the send went out, one row at a time
    (:func:`~ccat_data_transfer.core.liveness.resend_all`): a failing send leaves its row
    as it was and does not stop the others.  Returns how many were sent again."""
    sends: list[tuple[str, int, str]] = []
    by_task: dict[str, StalledWork] = {}
    for kind in kinds:
        model, prefix = kind.model, kind.prefix
        status = getattr(model, f"{prefix}status")
        waited = waited_in_queue(model.updated_at)
        queued = select(model).where(*kind.only, status == m.Status.SCHEDULED, waited)
        rows = session.scalars(scope.restrict(queued, kind.scope_column, location_ids)).all()
        by_task[kind.task] = kind
        for row in rows:
            queue = route_task_by_location(kind.operation, getattr(row, kind.queue_location))
            sends.append((kind.task, row.id, queue))
    session.commit()  # end the read transaction before talking to the broker

    def stamp(task: str, row_id: int, queue: str) -> None:
        kind = by_task[task]
        status = getattr(kind.model, f"{kind.prefix}status")
        session.execute(
            update(kind.model)
            .where(kind.model.id == row_id, status == m.Status.SCHEDULED)
            .values(updated_at=m.utcnow())
            .execution_options(synchronize_session=False)
        )
        log.warning("queued_work_resent", task=kind.task, row_id=row_id, queue=queue)

    return resend_all(session, "queued " + "/".join(k.task for k in kinds), sends, stamp)


def reset_stalled_transfers(
    session: Session,
    older_than: timedelta | float | None = None,
    location_ids: list[int] | None = None,
) -> int:
    """Put transfers and unpacks whose worker vanished back in the queue.

    A transfer or unpack IN_PROGRESS whose heartbeat (``updated_at``) stopped
    (``older_than``: default HEARTBEAT_SECONDS x HEARTBEAT_MISSED_BEATS) counts as one
    failed attempt: back to PENDING with backoff, or FAILED when out of retries.  Queued
    ones (SCHEDULED) are never reset (:func:`resend_queued`).  Destination writes are atomic, so
    no partial object is left under its final name.  Returns the number of rows reset.
    With ``location_ids`` only transfers whose origin, and unpacks whose destination, is
    one of them.  Used by the recovery service.
    """
    reset = reset_stalled(session, (STALLED_TRANSFERS, STALLED_UNPACKS), older_than, location_ids)
    session.commit()
    if reset:
        log.warning("stalled_transfers_reset", count=reset)
    return reset


def retry_transfer(session: Session, transfer_id: int) -> m.DataTransfer:
    """Operator action: a FAILED transfer (or a FAILED unpack) back to PENDING with fresh
    retry counts.  Raises NotFoundError / ValidationError."""
    transfer = session.get(m.DataTransfer, transfer_id)
    if transfer is None:
        raise NotFoundError(f"no data transfer with id {transfer_id}")
    if transfer.status == m.Status.FAILED:
        transfer.status = m.Status.PENDING
        transfer.retry_count = 0
        transfer.next_attempt_at = None
        transfer.failure_reason = None
    elif transfer.unpack_status == m.Status.FAILED:
        transfer.unpack_status = m.Status.PENDING
        transfer.unpack_retry_count = 0
        transfer.next_attempt_at = None
        transfer.unpack_failure_reason = None
    else:
        raise ValidationError(
            f"transfer {transfer_id} is {transfer.status.name} (unpack "
            f"{transfer.unpack_status.name}); only FAILED transfers or unpacks can be retried"
        )
    dtp = transfer.data_transfer_package
    if dtp.status == m.Status.FAILED:
        dtp.status = m.Status.IN_PROGRESS
        dtp.failure_reason = None
    session.flush()
    log.info("transfer_retry_requested", transfer_id=transfer_id)
    return transfer
