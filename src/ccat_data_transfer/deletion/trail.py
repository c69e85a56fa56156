"""The deletion audit trail: every decision, as a ``deletion_log`` row (time, copy id and
type, location, size, reason code, outcome, actor, message) and a JSON log line.

Rows are written per copy (decisions, the worker's DELETED / SKIPPED / FAILED), per batch
(bulk scheduling: one row lists its copies in ``copy_ids`` and in
``deletion_log_copy``) or per package and location
(stage 1); :func:`deletion_history` gathers both kinds for one copy.

Room in the house: core of the deletion stage; imports ``deletion.base``, ``database``
(the dialect) and ``ccat_ops_db``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import insert, select, text
from sqlalchemy.orm import Session

from ccat_data_transfer.core.database import is_postgresql
from ccat_data_transfer.deletion.base import log
from ccat_ops_db import models as m


def copy_size(copy: m.PhysicalCopy) -> int | None:
    if copy.size is not None:
        return int(copy.size)
    thing = thing_of_copy(copy)
    return int(thing.size) if thing is not None and thing.size is not None else None


def thing_of_copy(copy: m.PhysicalCopy) -> Any:
    if isinstance(copy, m.RawDataFilePhysicalCopy):
        return copy.raw_data_file
    if isinstance(copy, m.RawDataPackagePhysicalCopy):
        return copy.raw_data_package
    if isinstance(copy, m.DataTransferPackagePhysicalCopy):
        return copy.data_transfer_package
    return None


def copy_path(copy: m.PhysicalCopy) -> str | None:
    if copy.relative_path:
        return copy.relative_path
    thing = thing_of_copy(copy)
    return getattr(thing, "relative_path", None)


_EVENTS = {
    m.DeletionOutcome.SCHEDULED: "physical_copy_deletion_scheduled",
    m.DeletionOutcome.DELETED: "physical_copy_deleted",
    m.DeletionOutcome.FAILED: "physical_copy_deletion_failed",
    m.DeletionOutcome.SKIPPED: "physical_copy_deletion_skipped",
    m.DeletionOutcome.MARKED_POSSIBLE: "physical_copy_deletion_possible",
}


def log_row(
    copy_id: int | None,
    copy_type: str | None,
    location: m.DataLocation | None,
    size: int | None,
    reason: str,
    outcome: m.DeletionOutcome,
    message: str | None,
    actor: str = "deletion_manager",
) -> dict[str, Any]:
    fields = {
        "physical_copy_id": copy_id,
        "copy_type": copy_type,
        "location": location.name if location is not None else None,
        "size_bytes": size,
        "reason": reason,
        "outcome": outcome.name,
    }
    logger = log.warning if outcome in (m.DeletionOutcome.FAILED,) else log.info
    logger(_EVENTS[outcome], message=message, **fields)
    return {
        "created_at": m.utcnow(),
        "physical_copy_id": copy_id,
        "copy_type": copy_type,
        "data_location_id": location.id if location is not None else None,
        "location_name": location.name if location is not None else None,
        "size_bytes": size,
        "reason": reason[:128],
        "outcome": outcome,
        "actor": actor,
        "message": message,
    }


def write_log_rows(session: Session, rows: list[dict[str, Any]]) -> None:
    """Insert audit rows; a batch row (:func:`batch_row`) also gets one
    ``deletion_log_copy`` row per copy it covers, by which :func:`deletion_history` finds
    it."""
    single = [r for r in rows if not r.get("copy_ids")]
    if single:
        session.execute(insert(m.DeletionLog), single)
    for r in rows:
        if r.get("copy_ids"):
            log_id = session.execute(
                insert(m.DeletionLog).returning(m.DeletionLog.id), r
            ).scalar_one()
            _write_members(session, log_id, json.loads(r["copy_ids"]))


def _write_members(session: Session, log_id: int, copy_ids: list[int]) -> None:
    """The ``deletion_log_copy`` rows of one batch row: on PostgreSQL one statement for the
    whole batch (its ids as one array), elsewhere one multi-row INSERT."""
    if is_postgresql(session):
        session.execute(_MEMBERS_SQL, {"log_id": log_id, "ids": copy_ids})
        return
    session.execute(
        insert(m.DeletionLogCopy),
        [{"deletion_log_id": log_id, "physical_copy_id": i} for i in copy_ids],
    )


_MEMBERS_SQL = text(
    "INSERT INTO deletion_log_copy (deletion_log_id, physical_copy_id)"
    " SELECT :log_id, unnest(CAST(:ids AS bigint[]))"
)


def log_batch_scheduled(
    location: m.DataLocation, copy_type: str, ids: Sequence[int], size: int, code: str
) -> None:
    """The one JSON log line for copies scheduled together (the ``deletion_log`` rows are
    written per batch by :func:`batch_row`, or per copy by the PostgreSQL claim)."""
    log.info(
        _EVENTS[m.DeletionOutcome.SCHEDULED],
        copies=len(ids),
        first_physical_copy_id=ids[0],
        last_physical_copy_id=ids[-1],
        copy_type=copy_type,
        location=location.name,
        size_bytes=size,
        reason=code,
        outcome=m.DeletionOutcome.SCHEDULED.name,
    )


def batch_row(
    location: m.DataLocation,
    copy_type: str,
    ids: list[int],
    size: int,
    code: str,
    reason: str,
    actor: str = "deletion_manager",
) -> dict[str, Any]:
    """One SCHEDULED audit row (and one JSON log line) for a batch of copies scheduled
    together for the same reason; ``copy_ids`` lists them."""
    log_batch_scheduled(location, copy_type, ids, size, code)
    return {
        "created_at": m.utcnow(),
        "physical_copy_id": None,
        "copy_type": copy_type,
        "data_location_id": location.id,
        "location_name": location.name,
        "size_bytes": size,
        "reason": code[:128],
        "outcome": m.DeletionOutcome.SCHEDULED,
        "actor": actor,
        "message": f"{len(ids)} copies scheduled together: {reason}",
        "copy_ids": json.dumps(ids, separators=(",", ":")),
    }


def deletion_history(session: Session, copy_id: int) -> list[m.DeletionLog]:
    """Every ``deletion_log`` row about one copy, oldest first: its own rows (decisions
    per copy, and the worker's DELETED / SKIPPED / FAILED) and the batch rows of bulk
    scheduling that cover it (``deletion_log_copy``); two index lookups, whatever the
    size of the trail."""
    dl = m.DeletionLog
    dlc = m.DeletionLogCopy
    own = list(session.scalars(select(dl).where(dl.physical_copy_id == copy_id)))
    batches = list(
        session.scalars(
            select(dl)
            .join(dlc, dlc.deletion_log_id == dl.id)
            .where(dlc.physical_copy_id == copy_id)
        )
    )
    return sorted({r.id: r for r in own + batches}.values(), key=lambda r: r.id)


def add_deletion_log(
    session: Session,
    physical_copy: m.PhysicalCopy,
    message: str,
    *,
    reason: str | None = None,
    outcome: m.DeletionOutcome = m.DeletionOutcome.DELETED,
    actor: str = "deletion_manager",
) -> None:
    """Add deletion log entry for audit trail: a ``deletion_log`` row (time, copy id and
    type, location, size, reason, outcome, actor, message) and one JSON log line with the
    fields of the document's example."""
    row = log_row(
        physical_copy.id,
        physical_copy.type,
        physical_copy.data_location,
        copy_size(physical_copy),
        reason or message,
        outcome,
        message,
        actor,
    )
    write_log_rows(session, [row])
