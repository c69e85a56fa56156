"""What the dashboard's trends page shows: buffer and archive use over time, and the
bytes moved per day.  Plain data, bounded (MAX_CHART_POINTS), nothing written.

Room in the house: API layer (read side), beside :mod:`ccat_data_transfer.api.dashboard_queries`
(whose helpers it uses).  May import core and ccat_ops_db; never managers or tasks.
"""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, timedelta
from typing import Any

from fastapi import HTTPException
from sqlalchemy import Date, Integer, cast, func, select
from sqlalchemy.orm import Session

from ccat_data_transfer.api.dashboard_queries import MAX_CHART_POINTS, iso_time, window_bounds
from ccat_data_transfer.core.buffer_status import thresholds_for
from ccat_data_transfer.core.database import is_postgresql
from ccat_ops_db import models as m

__all__ = ["buffer_usage_data", "throughput_data"]


def _epoch_seconds(session: Session, column: Any) -> Any:
    if is_postgresql(session):
        return func.extract("epoch", column)
    return cast(func.strftime("%s", column), Integer)


#: Chart kinds: which location types each chart of use over time draws.
USAGE_KINDS: dict[str, tuple[m.LocationType, ...]] = {
    "buffer": (m.LocationType.BUFFER,),
    "archive": (m.LocationType.LONG_TERM_ARCHIVE,),
    "all": tuple(m.LocationType),
}


def buffer_usage_data(
    session: Session, hours: int = 168, location: str | None = None, kind: str = "all"
) -> dict[str, Any]:
    """Peak disk use per location in time buckets (at most MAX_CHART_POINTS per series);
    ``kind`` keeps buffers and archives apart (see USAGE_KINDS)."""
    if kind not in USAGE_KINDS:
        raise HTTPException(
            status_code=400, detail=f"unknown kind {kind!r}; use one of {', '.join(USAGE_KINDS)}"
        )
    since = window_bounds(hours)
    bucket_seconds = max(60, math.ceil(hours * 3600 / MAX_CHART_POINTS))
    sample = m.BufferUsageSample
    bucket = func.floor(_epoch_seconds(session, sample.measured_at) / bucket_seconds)
    stmt = (
        select(
            sample.data_location_id,
            bucket.label("bucket"),
            func.max(sample.disk_usage_percent),
            func.avg(sample.disk_usage_percent),
            func.max(sample.used_bytes),
        )
        .where(sample.measured_at >= since)
        .group_by(sample.data_location_id, bucket)
        .order_by(sample.data_location_id, bucket)
    )
    locations = {
        loc.id: loc
        for loc in session.scalars(select(m.DataLocation).order_by(m.DataLocation.name))
        if (not location or loc.name == location) and loc.location_type in USAGE_KINDS[kind]
    }
    if (
        location
        and not locations
        and not session.scalar(select(m.DataLocation.id).where(m.DataLocation.name == location))
    ):
        raise HTTPException(status_code=404, detail=f"no data location named {location!r}")
    points: dict[int, list[dict[str, Any]]] = {}
    for loc_id, b, peak, mean, used in session.execute(stmt):
        if loc_id not in locations:
            continue
        t = datetime.fromtimestamp(int(b) * bucket_seconds, UTC).replace(tzinfo=None)
        points.setdefault(loc_id, []).append(
            {
                "t": iso_time(t),
                "percent": round(float(peak), 2),
                "mean_percent": round(float(mean), 2),
                "used_bytes": int(used or 0),
            }
        )
    series = []
    for loc_id, loc in sorted(locations.items(), key=lambda kv: kv[1].name):
        if loc_id not in points:
            continue
        th = thresholds_for(loc)
        series.append(
            {
                "location": loc.name,
                "site": loc.site.name,
                "location_type": loc.location_type.name,
                "warning": th.warning,
                "critical": th.critical,
                "emergency": th.emergency,
                "points": points[loc_id],
            }
        )
    th = thresholds_for(None)
    return {
        "hours": hours,
        "kind": kind,
        "since": iso_time(since),
        "bucket_seconds": bucket_seconds,
        "thresholds": {"warning": th.warning, "critical": th.critical, "emergency": th.emergency},
        "series": series,
    }


def throughput_data(session: Session, days: int = 14) -> dict[str, Any]:
    """Bytes of COMPLETED DataTransfers per UTC day of their end time, the last ``days`` days."""
    today = m.utcnow().date()
    first = today - timedelta(days=days - 1)
    t = m.DataTransfer
    day_expr = cast(t.end_time, Date) if is_postgresql(session) else func.date(t.end_time)
    per_day: dict[str, tuple[int, int]] = {}
    for day, total, count in session.execute(
        select(day_expr, func.coalesce(func.sum(t.bytes_transferred), 0), func.count(t.id))
        .where(
            t.status == m.Status.COMPLETED,
            t.end_time >= datetime.combine(first, datetime.min.time()),
        )
        .group_by(day_expr)
    ):
        key = day.isoformat() if isinstance(day, date) else str(day)[:10]
        per_day[key] = (int(total), int(count))
    rows = []
    for i in range(days):
        key = (first + timedelta(days=i)).isoformat()
        total, count = per_day.get(key, (0, 0))
        rows.append({"day": key, "bytes": total, "transfers": count})
    return {
        "days": rows,
        "total_bytes": sum(r["bytes"] for r in rows),
        "total_transfers": sum(r["transfers"] for r in rows),
    }
