"""Recovery of the transfer stage: the retry policy, resets of stalled work, the
operator's retry.

Every failed attempt of a transfer, an unpack or an archive transfer goes through
:func:`fail_or_retry_values`: back to PENDING with exponential backoff, or FAILED when
out of retries.  Work whose worker vanished (in flight, untouched for a while; running
work refreshes ``updated_at`` with a heartbeat) counts as one failed attempt
(:func:`reset_stalled` over the kinds of :class:`StalledWork`, used by the recovery
service).

Room in the house: manager side, database only.  Imports core (config, scope, logging,
exceptions) and ``ccat_ops_db``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from ccat_data_transfer import scope
from ccat_data_transfer.config.config import settings
from ccat_data_transfer.exceptions import NotFoundError, ValidationError
from ccat_data_transfer.logging_utils import get_logger
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
    """One kind of in-flight work the recovery service resets: the rows of ``model`` whose
    ``status`` (or ``<prefix>status``) is in flight, among those matching ``only``.
    ``scope_column`` is the location whose site owns the reset; ``reason`` may name
    ``{status}``.  With ``recheck_cutoff`` the reset also requires the row still
    untouched, so a worker's heartbeat between the query and the reset wins."""

    model: Any
    scope_column: Any
    reason: str
    prefix: str = ""
    only: tuple[Any, ...] = ()
    recheck_cutoff: bool = True


#: Transfers (reset by the origin's site) and unpacks (by the destination's site).
STALLED_TRANSFERS = StalledWork(
    m.DataTransfer, m.DataTransfer.origin_location_id, "stalled in {status}: worker lost"
)
STALLED_UNPACKS = StalledWork(
    m.DataTransfer,
    m.DataTransfer.destination_location_id,
    "unpack stalled in {status}",
    prefix="unpack_",
    only=(m.DataTransfer.status == m.Status.COMPLETED,),
)


def reset_stalled(
    session: Session,
    kinds: tuple[StalledWork, ...],
    older_than: timedelta | float,
    location_ids: list[int] | None = None,
) -> int:
    """Count one failed attempt (:func:`fail_or_retry_values`) for every row of each of
    ``kinds`` in flight and not touched for ``older_than``; with ``location_ids`` only
    rows whose scope column is one of them.  Each row is reset by its own conditional
    UPDATE (still in that state), so a worker that finishes meanwhile wins.  Returns the
    number of rows reset; does not commit."""
    if not isinstance(older_than, timedelta):
        older_than = timedelta(seconds=float(older_than))
    now = m.utcnow()
    cutoff = now - older_than
    reset = 0
    for kind in kinds:
        model, prefix = kind.model, kind.prefix
        status = getattr(model, f"{prefix}status")
        retries = getattr(model, f"{prefix}retry_count")
        stalled = select(model.id, status, retries).where(
            *kind.only, status.in_(IN_FLIGHT), model.updated_at < cutoff
        )
        for row_id, was, count in session.execute(
            scope.restrict(stalled, kind.scope_column, location_ids)
        ).all():
            still = [model.id == row_id, status == was]
            if kind.recheck_cutoff:
                still.append(model.updated_at < cutoff)
            reason = kind.reason.format(status=was.name)
            values = fail_or_retry_values(count, reason, now, prefix=prefix)
            reset += session.execute(update(model).where(*still).values(**values)).rowcount
    return reset


def reset_stalled_transfers(
    session: Session, older_than: timedelta | float, location_ids: list[int] | None = None
) -> int:
    """Put transfers and unpacks whose worker vanished back in the queue.

    A row SCHEDULED or IN_PROGRESS (transfer or unpack) not touched for ``older_than``
    (running transfers refresh ``updated_at`` with a heartbeat) counts as one failed
    attempt: back to PENDING with backoff, or FAILED when out of retries.  Destination
    writes are atomic, so no partial object is left under its final name.  Returns the
    number of rows reset.  With ``location_ids`` only transfers whose origin, and unpacks
    whose destination, is one of them.  Used by the recovery service.
    """
    if not isinstance(older_than, timedelta):
        older_than = timedelta(seconds=float(older_than))
    reset = reset_stalled(session, (STALLED_TRANSFERS, STALLED_UNPACKS), older_than, location_ids)
    session.commit()
    if reset:
        log.warning("stalled_transfers_reset", count=reset, older_than_s=older_than.total_seconds())
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
