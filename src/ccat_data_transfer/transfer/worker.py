"""What the worker tasks of the transfer and archive stages share.

The transfer task, the unpack task and the archive task (``transfer.tasks``,
``archive.tasks``) each take a row, run long
storage work under a heartbeat (so the recovery service does not take slow work for
dead work), keep a per-row command log, and end by recording either a verified PRESENT
copy or a failed attempt (retry with backoff, or FAILED).

Room in the house: tasks side.  Imports :mod:`~ccat_data_transfer.transfer.recovery`
(the retry policy), core (config, database, liveness, logging) and ``ccat_ops_db``.
"""

from __future__ import annotations

import contextlib
import os
import socket
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_data_transfer.core.attempts import still_owns
from ccat_data_transfer.core.config import data_dir, settings
from ccat_data_transfer.core.database import DatabaseConnection
from ccat_data_transfer.core.liveness import beating
from ccat_data_transfer.core.logs import get_logger
from ccat_data_transfer.transfer.recovery import fail_or_retry_values
from ccat_ops_db import models as m

log = get_logger("ccat_data_transfer.transfer_manager")

__all__ = [
    "heartbeat",
    "mark_completed",
    "record_failed_attempt",
    "record_present_copy",
    "transfer_log_dir",
    "worker_name",
]


def transfer_log_dir() -> Path:
    """Folder of the kept per-transfer command logs (TRANSFER_LOG_DIR or
    <DATA_DIR>/logs/transfers)."""
    configured = str(settings.get("TRANSFER_LOG_DIR", "") or "")
    path = Path(configured).expanduser() if configured else data_dir() / "logs" / "transfers"
    path.mkdir(parents=True, exist_ok=True)
    return path


def worker_name() -> str:
    """``host:pid`` of this worker, recorded on the row it starts."""
    return f"{socket.gethostname()}:{os.getpid()}"


def heartbeat(
    row_id: int, model: Any = m.DataTransfer, attempt: str | None = None
) -> contextlib.AbstractContextManager[None]:
    """Refresh the row's ``updated_at`` (the heartbeat of transfers, unpacks and archive
    transfers) every HEARTBEAT_SECONDS while long work runs, so the recovery service does
    not take slow work for dead work (:func:`ccat_data_transfer.core.liveness.beating`).
    With ``attempt`` only while that attempt owns the row: a superseded attempt must not
    keep its successor's row looking alive."""
    where = [model.id == row_id]
    if attempt is not None:
        where.append(model.attempt_id == attempt)
    return beating(model, *where, column="updated_at", label=f"{model.__tablename__}-{row_id}")


def mark_completed(row: Any, stats: Any, now: datetime) -> None:
    """A transfer row (DataTransfer, LongTermArchiveTransfer) whose bytes landed and
    verified: COMPLETED at ``now`` with what ``stats`` (a TransferStats) measured, no
    failure and no next attempt."""
    row.status = m.Status.COMPLETED
    row.end_time = now
    row.bytes_transferred = stats.bytes
    row.duration_seconds = stats.seconds
    row.failure_reason = None
    row.next_attempt_at = None


def record_present_copy(
    session: Session,
    model: Any,
    package_key: str,
    package_id: int,
    location_id: int,
    relative_path: str,
    *,
    size: int,
    checksum: str,
    verified_at: datetime,
) -> Any:
    """The PRESENT copy (``model``: DataTransferPackagePhysicalCopy or
    RawDataPackagePhysicalCopy) of package ``package_id`` (its ``package_key`` column) at
    a location, created if missing, stamped with what was verified there."""
    owner = getattr(model, package_key)
    copy = session.scalars(
        select(model).where(
            owner == package_id,
            model.data_location_id == location_id,
            model.status == m.PhysicalCopyStatus.PRESENT,
        )
    ).first()
    if copy is None:
        copy = model(
            **{package_key: package_id},
            data_location_id=location_id,
            status=m.PhysicalCopyStatus.PRESENT,
            relative_path=relative_path,
        )
        session.add(copy)
    copy.size = size
    copy.checksum = checksum
    copy.verified_at = verified_at
    return copy


def record_failed_attempt(
    model: Any,
    row_id: int,
    reason: str,
    permanent: bool,
    fields: dict[str, Any],
    *,
    logger: Any,
    event: str,
    prefix: str = "",
    log_retry_count: bool = False,
    attempt: str | None = None,
) -> str:
    """Record a failed attempt of the IN_PROGRESS work of row ``row_id`` (its ``status``,
    or ``<prefix>status``) in its own transaction: retry with backoff, or FAILED when out
    of retries or ``permanent``; then log ``<event>_failed`` or
    ``<event>_retry_scheduled`` with ``fields`` (and the retry count with
    ``log_retry_count``).  Returns the outcome: "failed", "retry", or "skipped" (nothing
    logged) when the row is no longer IN_PROGRESS, or (with ``attempt``) no longer owned
    by that attempt (:func:`~ccat_data_transfer.core.attempts.still_owns`: a superseded
    attempt never records)."""
    with DatabaseConnection().session_scope() as s:
        if attempt is not None and not still_owns(
            s, model, row_id, attempt, status=f"{prefix}status"
        ):
            log.warning(
                "attempt_superseded",
                work=model.__tablename__,
                row_id=row_id,
                attempt=attempt,
                step="record failure",
            )
            return "skipped"
        row = s.get(model, row_id)
        if row is None or getattr(row, f"{prefix}status") != m.Status.IN_PROGRESS:
            return "skipped"
        values = fail_or_retry_values(
            getattr(row, f"{prefix}retry_count"), reason, m.utcnow(), permanent, prefix
        )
        for key, value in values.items():
            setattr(row, key, value)
        failed = getattr(row, f"{prefix}status") == m.Status.FAILED
        retries = getattr(row, f"{prefix}retry_count")
    extra = {"retry_count": retries} if log_retry_count else {}
    if failed:
        logger.error(f"{event}_failed", **fields, reason=reason, **extra)
        return "failed"
    logger.warning(f"{event}_retry_scheduled", **fields, reason=reason, **extra)
    return "retry"
