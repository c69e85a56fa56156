"""Buffer state: how full a location is, what that means, and where the answer is kept.

The buffer manager measures locations and publishes a status here; every other stage
reads it back to adapt (transfer limits, manager sleep times, pressure-driven deletion,
pausing package creation).  Distributed mode keeps statuses in Redis with a TTL; the
embedded mode keeps them in the ``buffer_status`` table.  A status that is missing,
stale, or unreadable (Redis down) is UNKNOWN: callers must then act safely, i.e. never
delete because of pressure, and transfer at the critical limit.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import bindparam, func, select
from sqlalchemy.exc import NoResultFound
from sqlalchemy.orm import Session

from ccat_data_transfer.core.config import settings
from ccat_data_transfer.core.database import DatabaseConnection
from ccat_data_transfer.core.logs import get_logger
from ccat_ops_db import models as m

log = get_logger(__name__)

REDIS_KEY = "buffer_status:{location}"


class BufferState(enum.StrEnum):
    NORMAL = "normal"
    WARNING = "warning"
    CRITICAL = "critical"
    EMERGENCY = "emergency"
    UNKNOWN = "unknown"

    @property
    def under_pressure(self) -> bool:
        return self in (BufferState.CRITICAL, BufferState.EMERGENCY)


@dataclass(frozen=True)
class Thresholds:
    warning: float
    critical: float
    emergency: float


def thresholds_for(location: m.DataLocation | None = None) -> Thresholds:
    """The location's own thresholds where it overrides them, else the settings."""

    def pick(attr: str, key: str) -> float:
        value = getattr(location, attr, None) if location is not None else None
        return float(value if value is not None else settings.get(key))

    return Thresholds(
        warning=pick("warning_threshold_percent", "BUFFER_WARNING_THRESHOLD_PERCENT"),
        critical=pick("critical_threshold_percent", "BUFFER_CRITICAL_THRESHOLD_PERCENT"),
        emergency=pick("emergency_threshold_percent", "BUFFER_EMERGENCY_THRESHOLD_PERCENT"),
    )


def classify(percent: float | None, thresholds: Thresholds) -> BufferState:
    """normal < warning (70) <= ... < critical (85) <= ... < emergency (95) <= ..."""
    if percent is None:
        return BufferState.UNKNOWN
    if percent >= thresholds.emergency:
        return BufferState.EMERGENCY
    if percent >= thresholds.critical:
        return BufferState.CRITICAL
    if percent >= thresholds.warning:
        return BufferState.WARNING
    return BufferState.NORMAL


def transfer_limit(state: BufferState, location: m.DataLocation | None = None) -> int:
    """Parallel transfers allowed out of a location in ``state``.

    UNKNOWN counts as critical: without a measurement we neither stop nor go full speed.
    """
    if state in (BufferState.NORMAL, BufferState.WARNING):
        override = getattr(location, "max_parallel_transfers", None) if location else None
        return int(override if override is not None else settings.MAX_NORMAL_TRANSFERS)
    return int(settings.MAX_CRITICAL_TRANSFERS)


def manager_sleep_time(base_seconds: float, states: list[BufferState]) -> float:
    """Shorter manager cycles when any location is critical or in emergency."""
    if any(s.under_pressure for s in states):
        return float(base_seconds) / max(1.0, float(settings.CRITICAL_SLEEP_DIVISOR))
    return float(base_seconds)


# ---------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------


def _ttl() -> int:
    return int(settings.BUFFER_STATUS_TTL_SECONDS)


def _use_redis() -> bool:
    return str(settings.get("EXECUTION_MODE", "embedded")).lower() != "embedded"


def redis_client() -> Any:
    import redis

    return redis.Redis.from_url(
        str(settings.REDIS_URL), socket_connect_timeout=2, socket_timeout=2, decode_responses=True
    )


# Statements of the embedded store, built once (every manager cycle reads statuses: the
# construction and cache key of a fresh statement cost more than running it).
_STATUS_COLUMNS = select(
    m.DataLocation.name,
    m.BufferStatus.used_bytes,
    m.BufferStatus.total_bytes,
    m.BufferStatus.disk_usage_percent,
    m.BufferStatus.state,
    m.BufferStatus.measured_at,
).join(m.DataLocation, m.DataLocation.id == m.BufferStatus.data_location_id)
_STATUS_OF = _STATUS_COLUMNS.where(m.DataLocation.name == bindparam("name"))
_STATUSES_OF = _STATUS_COLUMNS.where(m.DataLocation.name.in_(bindparam("names", expanding=True)))
_LOCATION_IDS = select(m.DataLocation.name, m.DataLocation.id).where(
    m.DataLocation.name.in_(bindparam("names", expanding=True))
)
_STATUS_ROWS = select(m.BufferStatus).where(
    m.BufferStatus.data_location_id.in_(bindparam("ids", expanding=True))
)


def publish_status(status: dict[str, Any], session: Any = None) -> None:
    """Store a measured status (dict with location, used_bytes, total_bytes,
    disk_usage_percent, state, measured_at)."""
    if _use_redis():
        redis_client().set(
            REDIS_KEY.format(location=status["location"]),
            json.dumps(status, default=str),
            ex=_ttl(),
        )
        return
    _publish_db(status, session)


def _publish_db(status: dict[str, Any], session: Any) -> None:
    failures = _publish_many_db([status], session)
    if failures:
        raise failures[status["location"]]


def _publish_many_db(statuses: list[dict[str, Any]], session: Any) -> dict[str, Exception]:
    def write(s: Any) -> dict[str, Exception]:
        names = [status["location"] for status in statuses]
        ids = dict(s.execute(_LOCATION_IDS, {"names": names}).all())
        rows = {
            row.data_location_id: row
            for row in s.scalars(_STATUS_ROWS, {"ids": list(ids.values())})
        }
        failures: dict[str, Exception] = {}
        for status in statuses:
            loc_id = ids.get(status["location"])
            if loc_id is None:
                failures[status["location"]] = NoResultFound(
                    f"no data location named {status['location']!r}"
                )
                continue
            row = rows.get(loc_id)
            if row is None:
                row = rows[loc_id] = m.BufferStatus(data_location_id=loc_id)
                s.add(row)
            row.used_bytes = int(status["used_bytes"])
            row.total_bytes = status.get("total_bytes")
            row.disk_usage_percent = float(status["disk_usage_percent"])
            row.state = str(status["state"])
            row.measured_at = m.utcnow()
        return failures

    if session is not None:
        return write(session)
    with DatabaseConnection().session_scope() as s:
        return write(s)


def publish_statuses(statuses: list[dict[str, Any]], session: Any = None) -> dict[str, Exception]:
    """:func:`publish_status` for several locations at once (embedded: two queries in
    all, not two per location).  Returns the locations whose status could not be
    published, with the error (Redis down, unknown location); the others are stored."""
    if not statuses:
        return {}
    if not _use_redis():
        return _publish_many_db(statuses, session)
    failures: dict[str, Exception] = {}
    for status in statuses:
        try:
            publish_status(status, session)
        except Exception as exc:  # reported to the caller, per location
            failures[status["location"]] = exc
    return failures


def read_status(location_name: str, session: Any = None) -> dict[str, Any] | None:
    """The latest fresh status of a location, or None when unknown (never measured,
    stale, or the store cannot be reached)."""
    if _use_redis():
        try:
            raw = redis_client().get(REDIS_KEY.format(location=location_name))
        except Exception as exc:  # Redis down: status unknown, callers act safely
            log.warning("buffer_status_unavailable", location=location_name, error=str(exc))
            return None
        return json.loads(raw) if raw else None
    return _read_db(location_name, session)


def _status_dict(row: Any, oldest: Any) -> dict[str, Any] | None:
    """A row of ``_STATUS_COLUMNS`` as a status, or None when stale."""
    name, used, total, percent, state, measured_at = row
    if measured_at < oldest:
        return None
    return {
        "location": name,
        "used_bytes": used,
        "total_bytes": total,
        "disk_usage_percent": percent,
        "state": state,
        "measured_at": measured_at.isoformat(),
    }


def _with_session(session: Any, read: Any) -> Any:
    if session is not None:
        return read(session)
    session_, _ = DatabaseConnection().get_connection()
    try:
        return read(session_)
    finally:
        session_.close()


def _read_db(location_name: str, session: Any) -> dict[str, Any] | None:
    def read(s: Any) -> dict[str, Any] | None:
        row = s.execute(_STATUS_OF, {"name": location_name}).one_or_none()
        if row is None:
            return None
        return _status_dict(row, m.utcnow() - timedelta(seconds=_ttl()))

    return _with_session(session, read)


def read_statuses(
    location_names: Iterable[str], session: Any = None
) -> dict[str, dict[str, Any] | None]:
    """:func:`read_status` of several locations at once (one query, or one Redis MGET):
    ``{name: status or None}`` for every name asked for."""
    names = list(dict.fromkeys(location_names))
    if not names:
        return {}
    if _use_redis():
        try:
            raws = redis_client().mget([REDIS_KEY.format(location=n) for n in names])
        except Exception as exc:  # Redis down: statuses unknown, callers act safely
            for name in names:
                log.warning("buffer_status_unavailable", location=name, error=str(exc))
            return dict.fromkeys(names)
        return {n: (json.loads(raw) if raw else None) for n, raw in zip(names, raws, strict=True)}

    def read(s: Any) -> dict[str, dict[str, Any] | None]:
        oldest = m.utcnow() - timedelta(seconds=_ttl())
        found = {
            row[0]: _status_dict(row, oldest) for row in s.execute(_STATUSES_OF, {"names": names})
        }
        return {n: found.get(n) for n in names}

    return _with_session(session, read)


def state_in(status: dict[str, Any] | None) -> BufferState:
    """The state a status dict records (UNKNOWN when there is none or it is unreadable)."""
    if not status:
        return BufferState.UNKNOWN
    try:
        return BufferState(status.get("state", "unknown"))
    except ValueError:
        return BufferState.UNKNOWN


def state_of(location_name: str, session: Any = None) -> BufferState:
    return state_in(read_status(location_name, session))


def states_of(location_names: Iterable[str], session: Any = None) -> dict[str, BufferState]:
    """:func:`state_of` of several locations at once: ``{name: state}``."""
    return {n: state_in(st) for n, st in read_statuses(location_names, session).items()}


def last_samples(session: Session) -> dict[int, m.BufferUsageSample]:
    """The latest usage sample of every location (one query, by the (location, time)
    index): what was last measured, kept in the DB after a live status expires."""
    s = m.BufferUsageSample
    latest = (
        select(s.data_location_id, func.max(s.measured_at).label("at"))
        .group_by(s.data_location_id)
        .subquery()
    )
    rows = session.scalars(
        select(s).join(
            latest,
            (latest.c.data_location_id == s.data_location_id) & (latest.c.at == s.measured_at),
        )
    )
    return {row.data_location_id: row for row in rows}
