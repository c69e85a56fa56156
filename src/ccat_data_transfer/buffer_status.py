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
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import select

from ccat_data_transfer.config.config import settings
from ccat_data_transfer.logging_utils import get_logger
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
    from ccat_data_transfer.database import DatabaseConnection

    def write(s: Any) -> None:
        loc = s.scalars(select(m.DataLocation).filter_by(name=status["location"])).one()
        row = s.get(m.BufferStatus, loc.id)
        if row is None:
            row = m.BufferStatus(data_location_id=loc.id)
            s.add(row)
        row.used_bytes = int(status["used_bytes"])
        row.total_bytes = status.get("total_bytes")
        row.disk_usage_percent = float(status["disk_usage_percent"])
        row.state = str(status["state"])
        row.measured_at = m.utcnow()

    if session is not None:
        write(session)
    else:
        with DatabaseConnection().session_scope() as s:
            write(s)


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


def _read_db(location_name: str, session: Any) -> dict[str, Any] | None:
    from ccat_data_transfer.database import DatabaseConnection

    def read(s: Any) -> dict[str, Any] | None:
        row = s.execute(
            select(m.BufferStatus)
            .join(m.DataLocation, m.DataLocation.id == m.BufferStatus.data_location_id)
            .where(m.DataLocation.name == location_name)
        ).scalar_one_or_none()
        if row is None or row.measured_at < m.utcnow() - timedelta(seconds=_ttl()):
            return None
        return {
            "location": location_name,
            "used_bytes": row.used_bytes,
            "total_bytes": row.total_bytes,
            "disk_usage_percent": row.disk_usage_percent,
            "state": row.state,
            "measured_at": row.measured_at.isoformat(),
        }

    if session is not None:
        return read(session)
    session_, _ = DatabaseConnection().get_connection()
    try:
        return read(session_)
    finally:
        session_.close()


def state_of(location_name: str, session: Any = None) -> BufferState:
    status = read_status(location_name, session)
    if not status:
        return BufferState.UNKNOWN
    try:
        return BufferState(status.get("state", "unknown"))
    except ValueError:
        return BufferState.UNKNOWN
