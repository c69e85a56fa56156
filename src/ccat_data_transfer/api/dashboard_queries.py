"""What the web dashboard shows: one query function per page, each returning plain data.

Every dashboard page and its JSON twin under ``/dashboard/api/...`` are built from the same
function here, so the numbers a person sees are the numbers the tests check.  Queries are
set-based (grouped counts, one page of rows at a time) and bounded (MAX_LIST_ROWS,
MAX_CHART_POINTS); nothing here writes.  Routes, access and rendering live in
:mod:`ccat_data_transfer.api.dashboard`.

Room in the house: API layer (read side).  May import core (buffer_status, database,
metrics) and ccat_ops_db; never managers, tasks or the routes module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from fastapi import HTTPException
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session, aliased

from ccat_data_transfer.api.banner import banner_items, location_anchor
from ccat_data_transfer.core.buffer_room import next_package_verdicts
from ccat_data_transfer.core.buffer_status import thresholds_for
from ccat_data_transfer.operations.metrics import collect_snapshot
from ccat_ops_db import models as m
from ccat_ops_db.topology import HOLDING_STATES

# Bounds that keep one page view cheap however big the tables grow.
MAX_LIST_ROWS = 500
MAX_CHART_POINTS = 300


def iso_time(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value is not None else None


def window_bounds(hours: int) -> datetime:
    return m.utcnow() - timedelta(hours=hours)


def _use_of(loc: m.DataLocation, buf: dict[str, Any] | None, present_bytes: int) -> dict:
    """A location's use as shown.  Buffers (and sources): the measured disk.  Long-term
    archives: the bytes of the PRESENT copies there against the configured quota
    (``capacity_bytes``), never the filesystem under them; no percent without a quota."""
    if loc.location_type == m.LocationType.LONG_TERM_ARCHIVE:
        quota = int(loc.capacity_bytes) if loc.capacity_bytes else None
        return {
            "use_basis": "quota",
            "disk_usage_percent": round(100.0 * present_bytes / quota, 2) if quota else None,
            "used_bytes": present_bytes,
            "total_bytes": quota,
        }
    return {
        "use_basis": "disk",
        "disk_usage_percent": buf["disk_usage_percent"] if buf else None,
        "used_bytes": buf["used_bytes"] if buf else None,
        "total_bytes": buf["total_bytes"] if buf else None,
    }


def overview_data(session: Session) -> dict[str, Any]:
    """Sites with their locations and buffer gauges, plus the pipeline's headline counts."""
    snap = collect_snapshot(session)
    buffers = {b["location"]: b for b in snap["buffers"]}
    held, present = _copies_held(snap)

    type_order = {t: i for i, t in enumerate(m.LocationType)}
    # Whether each LTA-site buffer can take the next package waiting to be sent.
    next_package = next_package_verdicts(session, session.scalars(select(m.DataLocation)))
    sites = []
    for site in session.scalars(select(m.Site).order_by(m.Site.name)):
        locations = []
        for loc in sorted(
            site.locations, key=lambda x: (type_order[x.location_type], x.priority, x.name)
        ):
            locations.append(_location_entry(loc, buffers, held, present, next_package))
        sites.append(
            {
                "name": site.name,
                "short_name": site.short_name,
                "description": site.description,
                "active": site.active,
                "locations": locations,
            }
        )

    package_states = {
        s.name: snap["package_states"].get(s.name, {"count": 0, "bytes": 0}) for s in m.PackageState
    }
    transfers = {s.name: snap["transfers"].get(s.name, {"count": 0, "bytes": 0}) for s in m.Status}
    staging = {s.name: snap["staging_jobs"].get(s.name, 0) for s in m.Status}

    banner = banner_items(snap, next_package)

    return {
        "generated_at": iso_time(m.utcnow()),
        "sites": sites,
        "package_states": package_states,
        "transfers": transfers,
        "archive_transfers": {s.name: snap["archive_transfers"].get(s.name, 0) for s in m.Status},
        "staging_jobs": staging,
        "raw_files": snap["raw_files"],
        "raw_files_unpackaged": snap["raw_files_unpackaged"],
        "deletions_last_day": snap["deletions_last_day"],
        "deletion_failures": snap["deletion_failures"],
        "transfer_bytes_last_hour": snap["transfer_bytes_last_hour"],
        "transfer_rate_mb_per_s": snap["transfer_rate_mb_per_s"],
        "raw_files_checksum_errors": snap["raw_files_checksum_errors"],
        "blocked_groups": snap["blocked_groups"],
        "audit_holds": snap["audit_holds"],
        "banner": banner,
        # The same items in their older shape (level and text), for scripts that read it.
        "attention": [{"level": i["level"], "text": i["text"]} for i in banner],
    }


def _copies_held(snap: dict[str, Any]) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """Copies not DELETED (count and bytes) and bytes PRESENT, by location name."""
    held: dict[str, dict[str, int]] = {}
    present: dict[str, int] = {}
    for row in snap["copies"]:
        if row["status"] == m.PhysicalCopyStatus.DELETED.name:
            continue
        h = held.setdefault(row["location"], {"count": 0, "bytes": 0})
        h["count"] += row["count"]
        h["bytes"] += row["bytes"]
        if row["status"] == m.PhysicalCopyStatus.PRESENT.name:
            present[row["location"]] = present.get(row["location"], 0) + row["bytes"]
    return held, present


def _location_entry(
    loc: m.DataLocation,
    buffers: dict[str, dict[str, Any]],
    held: dict[str, dict[str, int]],
    present: dict[str, int],
    next_package: dict[str, Any],
) -> dict[str, Any]:
    """One location of a site as the overview shows it: kind, use, state and holds."""
    buf = buffers.get(loc.name)
    th = thresholds_for(loc)
    use = _use_of(loc, buf, present.get(loc.name, 0))
    return {
        "name": loc.name,
        "anchor": location_anchor(loc.name),
        "location_type": loc.location_type.name,
        "storage_type": loc.storage_type.name,
        "priority": loc.priority,
        "active": loc.active,
        **use,
        "state": (buf["state"] if buf else "inactive") or "unknown",
        "warning": th.warning,
        "critical": th.critical,
        "emergency": th.emergency,
        "copies": held.get(loc.name, {"count": 0, "bytes": 0}),
        "audit_hold": loc.audit_hold_reason if loc.audit_hold_at else None,
        "next_package": next_package.get(loc.name),
    }


def package_state_counts(session: Session) -> dict[str, dict[str, int]]:
    counts = {s.name: {"count": 0, "bytes": 0} for s in m.PackageState}
    for state, count, size in session.execute(
        select(m.RawDataPackage.state, func.count(), func.sum(m.RawDataPackage.size)).group_by(
            m.RawDataPackage.state
        )
    ):
        counts[state.name] = {"count": count, "bytes": int(size or 0)}
    return counts


def _parse_state(state: str | None) -> m.PackageState | None:
    if not state:
        return None
    try:
        return m.PackageState[state.strip().upper()]
    except KeyError:
        names = ", ".join(s.name for s in m.PackageState)
        raise HTTPException(
            status_code=400, detail=f"unknown package state {state!r}; use one of {names}"
        ) from None


def package_list(
    session: Session,
    file_name: str | None = None,
    state: str | None = None,
    obs_unit: str | None = None,
    page: int = 1,
    per_page: int = 50,
) -> dict[str, Any]:
    """One page of RawDataPackages matching the filters, newest first."""
    pkg = m.RawDataPackage
    eou = aliased(m.ExecutedObsUnit)
    ou = aliased(m.ObsUnit)
    conditions = []
    if file_name:
        conditions.append(func.lower(pkg.file_name).contains(file_name.lower(), autoescape=True))
    parsed_state = _parse_state(state)
    if parsed_state is not None:
        conditions.append(pkg.state == parsed_state)
    if obs_unit:
        needle = obs_unit.lower()
        conditions.append(
            or_(
                func.lower(eou.name).contains(needle, autoescape=True),
                func.lower(ou.name).contains(needle, autoescape=True),
            )
        )

    def base(stmt: Any) -> Any:
        return (
            stmt.join(eou, eou.id == pkg.executed_obs_unit_id)
            .join(ou, ou.id == eou.obs_unit_id)
            .where(*conditions)
        )

    total = session.scalar(base(select(func.count(pkg.id)).select_from(pkg))) or 0
    pages = max(1, math.ceil(total / per_page))
    rows = session.execute(
        base(
            select(
                pkg.id,
                pkg.file_name,
                pkg.state,
                pkg.status,
                pkg.size,
                pkg.created_at,
                pkg.archived_at,
                eou.name,
                ou.name,
                m.InstrumentModule.name,
                m.Instrument.name,
            )
            .select_from(pkg)
            .join(m.InstrumentModule, m.InstrumentModule.id == pkg.instrument_module_id)
            .join(m.Instrument, m.Instrument.id == m.InstrumentModule.instrument_id)
        )
        .order_by(pkg.created_at.desc(), pkg.id.desc())
        .limit(per_page)
        .offset((page - 1) * per_page)
    ).all()

    where_held = _locations_holding(session, [r[0] for r in rows])
    items = _package_items(rows, where_held)
    return {
        "filters": {"file_name": file_name or "", "state": state or "", "obs_unit": obs_unit or ""},
        "total": total,
        "page": page,
        "per_page": per_page,
        "pages": pages,
        "items": items,
        "state_counts": package_state_counts(session),
    }


def _locations_holding(session: Session, ids: list[int]) -> dict[int, list[str]]:
    """The names of the locations holding a copy of each package, by package id."""
    where_held: dict[int, list[str]] = {i: [] for i in ids}
    if ids:
        for pkg_id, loc_name in session.execute(
            select(m.PhysicalCopy.raw_data_package_id, m.DataLocation.name)
            .join(m.DataLocation, m.DataLocation.id == m.PhysicalCopy.data_location_id)
            .where(
                m.PhysicalCopy.raw_data_package_id.in_(ids),
                m.PhysicalCopy.status.in_(HOLDING_STATES),
            )
            .group_by(m.PhysicalCopy.raw_data_package_id, m.DataLocation.name)
            .order_by(m.DataLocation.name)
        ):
            where_held[pkg_id].append(loc_name)
    return where_held


def _package_items(rows: Sequence[Any], where_held: dict[int, list[str]]) -> list[dict[str, Any]]:
    """The page's rows as the dicts the package list shows."""
    items = [
        {
            "id": r[0],
            "file_name": r[1],
            "state": r[2].name,
            "status": r[3].name,
            "size": r[4],
            "created_at": iso_time(r[5]),
            "archived_at": iso_time(r[6]),
            "executed_obs_unit": r[7],
            "obs_unit": r[8],
            "instrument_module": r[9],
            "instrument": r[10],
            "locations": where_held[r[0]],
        }
        for r in rows
    ]
    return items


def package_detail(session: Session, package_id: int) -> dict[str, Any]:
    """One RawDataPackage with its files, copies, transfers and archive transfers (404 if
    unknown)."""
    pkg = session.get(m.RawDataPackage, package_id)
    if pkg is None:
        raise HTTPException(status_code=404, detail=f"no raw data package with id {package_id}")
    copies = session.scalars(
        select(m.RawDataPackagePhysicalCopy)
        .where(m.RawDataPackagePhysicalCopy.raw_data_package_id == pkg.id)
        .order_by(m.PhysicalCopy.created_at, m.PhysicalCopy.id)
    ).all()
    file_count, file_bytes = session.execute(
        select(func.count(m.RawDataFile.id), func.coalesce(func.sum(m.RawDataFile.size), 0)).where(
            m.RawDataFile.raw_data_package_id == pkg.id
        )
    ).one()
    dtp = pkg.data_transfer_package
    transfers = _package_transfers(session, dtp)
    archive_transfers = _package_archive_transfers(session, pkg)
    eou = pkg.executed_obs_unit
    return {
        "id": pkg.id,
        "file_name": pkg.file_name,
        "relative_path": pkg.relative_path,
        "state": pkg.state.name,
        "status": pkg.status.name,
        "size": pkg.size,
        "checksum": pkg.checksum,
        "checksum_algorithm": pkg.checksum_algorithm,
        "part_number": pkg.part_number,
        "created_at": iso_time(pkg.created_at),
        "archived_at": iso_time(pkg.archived_at),
        "failure_reason": pkg.failure_reason,
        "executed_obs_unit": eou.name,
        "obs_unit": eou.obs_unit.name,
        "instrument": pkg.instrument_module.instrument.name,
        "instrument_module": pkg.instrument_module.name,
        "files": {"count": file_count, "bytes": int(file_bytes)},
        "data_transfer_package": (
            {"id": dtp.id, "file_name": dtp.file_name, "status": dtp.status.name, "size": dtp.size}
            if dtp is not None
            else None
        ),
        "copies": [
            {
                "id": c.id,
                "location": c.data_location.name,
                "site": c.data_location.site.name,
                "location_type": c.data_location.location_type.name,
                "status": c.status.name,
                "size": c.size,
                "relative_path": c.relative_path,
                "created_at": iso_time(c.created_at),
                "verified_at": iso_time(c.verified_at),
                "deleted_at": iso_time(c.deleted_at),
                "last_error": c.last_error,
            }
            for c in copies
        ],
        "transfers": transfers,
        "archive_transfers": archive_transfers,
    }


def _package_transfers(session: Session, dtp: m.DataTransferPackage | None) -> list[dict[str, Any]]:
    """The transfers of the package's transfer package, oldest first."""
    transfers = []
    if dtp is not None:
        for t in session.scalars(
            select(m.DataTransfer)
            .where(m.DataTransfer.data_transfer_package_id == dtp.id)
            .order_by(m.DataTransfer.created_at, m.DataTransfer.id)
        ):
            transfers.append(
                {
                    "id": t.id,
                    "origin": t.origin_location.name,
                    "destination": t.destination_location.name,
                    "primary": t.is_primary,
                    "method": t.transfer_method.name,
                    "status": t.status.name,
                    "unpack_status": t.unpack_status.name,
                    "bytes_transferred": t.bytes_transferred,
                    "rate_mb_per_s": t.rate_mb_per_s,
                    "retry_count": t.retry_count,
                    "start_time": iso_time(t.start_time),
                    "end_time": iso_time(t.end_time),
                    "failure_reason": t.failure_reason or t.unpack_failure_reason,
                }
            )
    return transfers


def _package_archive_transfers(session: Session, pkg: m.RawDataPackage) -> list[dict[str, Any]]:
    """The package's transfers to long-term archives, oldest first."""
    archive_transfers = [
        {
            "id": a.id,
            "origin": a.origin_location.name,
            "destination": a.destination_location.name,
            "status": a.status.name,
            "bytes_transferred": a.bytes_transferred,
            "retry_count": a.retry_count,
            "start_time": iso_time(a.start_time),
            "end_time": iso_time(a.end_time),
            "metadata_path": a.metadata_path,
            "failure_reason": a.failure_reason,
        }
        for a in session.scalars(
            select(m.LongTermArchiveTransfer)
            .where(m.LongTermArchiveTransfer.raw_data_package_id == pkg.id)
            .order_by(m.LongTermArchiveTransfer.created_at, m.LongTermArchiveTransfer.id)
        )
    ]
    return archive_transfers


def _location_names(session: Session) -> list[str]:
    return list(session.scalars(select(m.DataLocation.name).order_by(m.DataLocation.name)))


def deletions_data(
    session: Session, location: str | None = None, hours: int = 24, limit: int = MAX_LIST_ROWS
) -> dict[str, Any]:
    """The deletion audit trail in a time window: log entries and DELETED copies."""
    since = window_bounds(hours)
    loc_id = None
    if location:
        loc_id = session.scalar(select(m.DataLocation.id).where(m.DataLocation.name == location))
        if loc_id is None:
            raise HTTPException(status_code=404, detail=f"no data location named {location!r}")

    log = m.DeletionLog
    log_where = [log.created_at >= since]
    if location:
        log_where.append(or_(log.data_location_id == loc_id, log.location_name == location))
    log_outcomes = {o.name: 0 for o in m.DeletionOutcome}
    for outcome, count in session.execute(
        select(log.outcome, func.count()).where(*log_where).group_by(log.outcome)
    ):
        log_outcomes[outcome.name] = count
    log_total = sum(log_outcomes.values())
    log_rows = [
        {
            "id": r.id,
            "created_at": iso_time(r.created_at),
            "location": r.location_name,
            "physical_copy_id": r.physical_copy_id,
            "copy_type": r.copy_type,
            "size_bytes": r.size_bytes,
            "reason": r.reason,
            "outcome": r.outcome.name,
            "actor": r.actor,
            "message": r.message,
        }
        for r in session.scalars(
            select(log)
            .where(*log_where)
            .order_by(log.created_at.desc(), log.id.desc())
            .limit(limit)
        )
    ]

    pc = m.PhysicalCopy
    copy_where = [pc.status == m.PhysicalCopyStatus.DELETED, pc.deleted_at >= since]
    if location:
        copy_where.append(pc.data_location_id == loc_id)
    copy_count, copy_bytes = session.execute(
        select(func.count(pc.id), func.coalesce(func.sum(pc.size), 0)).where(*copy_where)
    ).one()
    copy_rows = [
        {
            "id": cid,
            "type": ctype,
            "location": loc_name,
            "relative_path": rel,
            "size": size,
            "deleted_at": iso_time(deleted_at),
        }
        for cid, ctype, loc_name, rel, size, deleted_at in session.execute(
            select(pc.id, pc.type, m.DataLocation.name, pc.relative_path, pc.size, pc.deleted_at)
            .join(m.DataLocation, m.DataLocation.id == pc.data_location_id)
            .where(*copy_where)
            .order_by(pc.deleted_at.desc(), pc.id.desc())
            .limit(limit)
        )
    ]
    return {
        "location": location or "",
        "hours": hours,
        "since": iso_time(since),
        "log": {"total": log_total, "outcomes": log_outcomes, "items": log_rows},
        "deleted_copies": {"total": copy_count, "bytes": int(copy_bytes), "items": copy_rows},
        "locations": _location_names(session),
        "limit": limit,
    }


def staging_data(session: Session, active: bool | None = None) -> dict[str, Any]:
    job = m.StagingJob
    counts = {s.name: 0 for s in m.Status}
    for status, count in session.execute(select(job.status, func.count()).group_by(job.status)):
        counts[status.name] = count
    active_count = session.scalar(select(func.count(job.id)).where(job.active.is_(True))) or 0
    stmt = select(job).order_by(job.active.desc(), job.created_at.desc(), job.id.desc())
    if active is not None:
        stmt = stmt.where(job.active.is_(active))
    now = m.utcnow()
    items = []
    for j in session.scalars(stmt.limit(MAX_LIST_ROWS)):
        total = j.packages_total or 0
        items.append(
            {
                "id": j.id,
                "name": j.name,
                "user": j.user.username if j.user else None,
                "status": j.status.name,
                "active": j.active,
                "destination": j.destination_location.name,
                "packages_done": j.packages_done,
                "packages_total": total,
                "progress_percent": round(100.0 * j.packages_done / total, 1) if total else 0.0,
                "created_at": iso_time(j.created_at),
                "start_time": iso_time(j.start_time),
                "completed_at": iso_time(j.completed_at),
                "expires_at": iso_time(j.expires_at),
                "expired": j.expires_at is not None and j.expires_at < now,
                "failure_reason": j.failure_reason,
            }
        )
    return {"counts": counts, "active": active_count, "total": sum(counts.values()), "items": items}
