"""The fixity manager: re-read every archive copy within a period, on a byte budget.

Each LTA location may re-read FIXITY_BYTES_PER_DAY.  A cycle earns ``budget * elapsed /
86400`` bytes of credit for the time since the location's last cycle (kept in
``manager_state`` under ``fixity:scan:<location id>``; credit saved up is capped at one
day's budget) and spends it on the copies whose last full check is oldest (never checked
first): while the credit covers the next copy, it is taken.  A copy bigger than a day's
budget is taken once a full day's credit is saved, leaving a debt later cycles repay, so
no copy is starved and strict oldest-first order holds.  The chosen copies are handed to
:func:`ccat_data_transfer.archive.proof.request_verification` with ``full=True``: a worker
at the LTA's site re-reads them through SHA-256; a bad one goes to :mod:`.repair`.

Whether the budget can keep the promise: bytes held at the LTA / budget = the days a full
round takes, compared with FIXITY_PERIOD_DAYS, in the cycle's result and a log line (a
warning when the budget is too small).

Each cycle also re-queues the repair of archive copies still marked lost whose package is
not frozen and that had no repair step within FIXITY_REPAIR_RETRY_SECONDS (copies the
audit marked, repairs that failed on the destination or found no reachable source);
never into a location on audit hold (its repairs wait until the hold is cleared).

Room in the house: manager.  Imports core (config, manager_state, scope, archive_proof)
and the repair task.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, func, select
from sqlalchemy.orm import Session

from ccat_data_transfer.archive.proof import request_verification
from ccat_data_transfer.core import scope
from ccat_data_transfer.core.config import settings
from ccat_data_transfer.core.logs import get_logger
from ccat_data_transfer.core.manager_state import get_state, put_state
from ccat_data_transfer.fixity import repair
from ccat_data_transfer.fixity import tasks as repair_tasks
from ccat_ops_db import models as m

log = get_logger("ccat_data_transfer.fixity.scan")  # the name its log records had

PC = m.PhysicalCopy
DAY_SECONDS = 86400.0
#: Rows read per query while filling a cycle's credit.
PAGE = 500
#: Repairs re-queued per cycle at most.
REPAIR_BATCH = 100


def budget_bytes_per_day() -> int:
    """FIXITY_BYTES_PER_DAY: bytes each LTA location may re-read per day."""
    return int(float(settings.get("FIXITY_BYTES_PER_DAY", 15e12)))


def period_days() -> float:
    """FIXITY_PERIOD_DAYS: every archive copy should be re-read within this many days."""
    return float(settings.get("FIXITY_PERIOD_DAYS", 365))


def sleep_time() -> float:
    return float(settings.get("FIXITY_MANAGER_SLEEP_TIME", 60))


def _copy_size() -> Any:
    return func.coalesce(PC.size, m.RawDataPackage.size, 0)


def _checkable(location_id: int) -> list[Any]:
    """Conditions of the copies a scan re-reads at a location: package copies there,
    PRESENT and not lost."""
    return [
        PC.data_location_id == location_id,
        PC.raw_data_package_id.is_not(None),
        PC.status == m.PhysicalCopyStatus.PRESENT,
        PC.lost_at.is_(None),
    ]


def lta_locations(session: Session, site: str | None = None) -> list[m.DataLocation]:
    """Active LTA locations (not tape) of the scope."""
    stmt = select(m.DataLocation).where(
        m.DataLocation.location_type == m.LocationType.LONG_TERM_ARCHIVE,
        m.DataLocation.active.is_(True),
        m.DataLocation.storage_type != m.StorageType.TAPE,
    )
    stmt = scope.restrict(stmt, m.DataLocation.id, scope.location_ids(session, site))
    return list(session.scalars(stmt.order_by(m.DataLocation.name)))


def location_fixity(session: Session, location: m.DataLocation) -> dict[str, Any]:
    """Copies and bytes at an LTA location, its oldest full check, copies never checked,
    and the days a full round takes at the budget (one aggregate query)."""
    copies, size, oldest, never = session.execute(
        select(
            func.count(PC.id),
            func.coalesce(func.sum(_copy_size()), 0),
            func.min(PC.fixity_checked_at),
            func.count(PC.id).filter(PC.fixity_checked_at.is_(None)),
        )
        .outerjoin(m.RawDataPackage, m.RawDataPackage.id == PC.raw_data_package_id)
        .where(*_checkable(location.id))
    ).one()
    budget = budget_bytes_per_day()
    round_days = int(size) / budget if budget > 0 else float("inf")
    return {
        "location": location.name,
        "site": location.site.name if location.site else None,
        "copies": int(copies),
        "bytes": int(size),
        "oldest_fixity_check": oldest,
        "never_checked": int(never),
        "budget_bytes_per_day": budget,
        "round_days": round_days,
        "period_days": period_days(),
        "meets_period": round_days <= period_days(),
    }


@dataclass
class _Credit:
    at: datetime | None
    credit: float


def _state_key(location: m.DataLocation) -> str:
    return f"fixity:scan:{location.id}"


def _read_credit(session: Session, location: m.DataLocation) -> _Credit:
    row = get_state(session, _state_key(location))
    if row is None:
        return _Credit(None, 0.0)
    try:
        value = json.loads(row.value)
        return _Credit(datetime.fromisoformat(value["at"]), float(value["credit"]))
    except (ValueError, KeyError, TypeError):
        return _Credit(None, 0.0)


def earned_credit(previous: _Credit, now: datetime, budget: int) -> float:
    """Credit for this cycle: what was left plus the budget's share of the time since the
    last cycle (a first cycle counts one FIXITY_MANAGER_SLEEP_TIME), capped at one day's
    budget."""
    elapsed = (now - previous.at).total_seconds() if previous.at else sleep_time()
    return min(previous.credit + budget * max(elapsed, 0.0) / DAY_SECONDS, float(budget))


def pick_copies(
    session: Session, location: m.DataLocation, credit: float, budget: int, now: datetime
) -> tuple[list[int], int]:
    """The copies to re-read at ``location`` for ``credit`` bytes, oldest full check first
    (never checked first), and their bytes.  Copies with a verification outstanding are
    skipped (their answer is on its way)."""
    timeout = timedelta(seconds=float(settings.get("LTA_VERIFICATION_TIMEOUT_SECONDS", 600)))
    stmt = (
        select(PC.id, _copy_size())
        .outerjoin(m.RawDataPackage, m.RawDataPackage.id == PC.raw_data_package_id)
        .where(
            *_checkable(location.id),
            PC.verification_requested_at.is_(None) | (PC.verification_requested_at < now - timeout),
        )
        .order_by(PC.fixity_checked_at.asc().nulls_first(), PC.id)
    )
    chosen: list[int] = []
    spent = 0
    offset = 0
    while True:
        rows = session.execute(stmt.limit(PAGE).offset(offset)).all()
        for copy_id, size in rows:
            size = int(size or 0)
            if credit - spent < min(size, budget):
                return chosen, spent
            chosen.append(copy_id)
            spent += size
        if len(rows) < PAGE:
            return chosen, spent
        offset += PAGE


def scan_location(session: Session, location: m.DataLocation, now: datetime) -> dict[str, Any]:
    """One cycle's fixity work at one LTA location."""
    budget = budget_bytes_per_day()
    credit = earned_credit(_read_credit(session, location), now, budget)
    # A location on audit hold is not scanned: a systematic fault (an unmounted disk)
    # would mark every copy there lost, which is what the hold's audit refused to do.
    held = location.audit_hold_at is not None
    ids, spent = (
        ([], 0) if held or budget <= 0 else pick_copies(session, location, credit, budget, now)
    )
    put_state(
        session,
        _state_key(location),
        json.dumps({"at": now.isoformat(), "credit": credit - spent}),
        now,
    )
    session.commit()
    requested = request_verification(session, ids, full=True, now=now) if ids else 0
    status = location_fixity(session, location)
    status.update(
        requested=requested, requested_bytes=spent, credit_bytes=int(credit - spent), held=held
    )
    fields = {k: v for k, v in status.items() if k != "oldest_fixity_check"}
    if status["meets_period"]:
        log.info("fixity_scan", **fields)
    else:
        log.warning(
            "fixity_budget_too_small",
            hint="raise FIXITY_BYTES_PER_DAY or FIXITY_PERIOD_DAYS",
            **fields,
        )
    return status


def requeue_repairs(session: Session, location_ids: list[int], now: datetime) -> int:
    """Queue the repair of lost archive copies at ``location_ids`` whose package is not
    frozen and that had no repair step for FIXITY_REPAIR_RETRY_SECONDS."""
    if not location_ids:
        return 0
    quiet = now - timedelta(seconds=float(settings.get("FIXITY_REPAIR_RETRY_SECONDS", 3600)))
    ev = m.ArchiveEvent
    recent_step = exists().where(
        ev.physical_copy_id == PC.id,
        ev.event.in_(repair.REPAIR_STEPS),
        ev.created_at >= quiet,
    )
    ids = session.scalars(
        select(PC.id)
        .join(m.RawDataPackage, m.RawDataPackage.id == PC.raw_data_package_id)
        .join(m.DataLocation, m.DataLocation.id == PC.data_location_id)
        .where(
            m.DataLocation.audit_hold_at.is_(None),
            PC.data_location_id.in_(location_ids),
            PC.status == m.PhysicalCopyStatus.PRESENT,
            PC.lost_at.is_not(None),
            and_(m.RawDataPackage.frozen_at.is_(None), ~recent_step),
        )
        .order_by(PC.lost_at, PC.id)
        .limit(REPAIR_BATCH)
    ).all()
    for copy_id in ids:
        repair_tasks.queue_repair(session, copy_id)
    return len(ids)


def run_once(session: Session, site: str | None = None) -> dict[str, Any]:
    """One cycle of the fixity manager over the scope's LTA locations."""
    now = m.utcnow()
    locations = lta_locations(session, site)
    results = [scan_location(session, loc, now) for loc in locations]
    repairs = requeue_repairs(session, [loc.id for loc in locations], now)
    return {
        "fixity_requested": sum(r["requested"] for r in results),
        "fixity_requested_bytes": sum(r["requested_bytes"] for r in results),
        "repairs_queued": repairs,
        "budget_meets_period": all(r["meets_period"] for r in results),
        "locations": results,
    }
