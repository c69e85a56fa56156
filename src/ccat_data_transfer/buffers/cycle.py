"""Buffer manager: measures how full every active location is and escalates.

Each cycle measures every active DISK and S3 location, classifies the use with the
location's thresholds (``buffer_status.thresholds_for`` / ``classify``: normal < 70 % <=
warning < 85 % <= critical < 95 % <= emergency, overridable per location), publishes the
status (Redis in distributed mode, the ``buffer_status`` table in embedded mode) and keeps
a ``BufferUsageSample`` for history.  Other stages read the status back
(``buffer_status.state_of`` / ``transfer_limit`` / ``manager_sleep_time``,
``deletion_manager.get_buffer_status_for_location``).

Measurement: DISK - bytes stored under the location's root against ``capacity_bytes`` when
set, else the filesystem's used/total; S3 - bytes the DB records there (copies not DELETED)
against ``capacity_bytes`` as the quota.

Escalation (``_check_thresholds``): warning -> a logged warning; critical -> a logged
warning (transfer limits, shorter sleeps and faster deletion follow from the published
state); emergency -> an error log line, an alert POSTed to ALERT_WEBHOOK_URL when set
(failures are logged, never raised) and, when BUFFER_EMERGENCY_TRIGGERS_DELETION, a
deletion cycle at once.

Before measuring, the cycle runs the janitor (:func:`ccat_data_transfer.buffers.janitor.sweep`) on
the same locations: temporary names of killed writes, unchanged for
JANITOR_MIN_AGE_SECONDS, are removed (in the loop at most every JANITOR_MIN_AGE_SECONDS / 6,
since it walks the trees); the result carries ``janitor`` when anything was removed.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from ccat_data_transfer.buffers import janitor
from ccat_data_transfer.core import buffer_status as bs
from ccat_data_transfer.core import scope
from ccat_data_transfer.core.alerts import send_alert
from ccat_data_transfer.core.config import settings
from ccat_data_transfer.core.database import DatabaseConnection
from ccat_data_transfer.core.logs import get_logger
from ccat_data_transfer.core.manager_loop import run_manager
from ccat_data_transfer.core.storage import storage_for_location
from ccat_data_transfer.deletion import cycle as deletion_cycle
from ccat_ops_db import models as m
from ccat_ops_db.topology import HOLDING_STATES

log = get_logger(__name__)


def measure_location(session: Session, location: m.DataLocation) -> dict[str, Any] | None:
    """Measure one location now; None when it cannot be measured (tape, unreachable)."""
    if location.storage_type == m.StorageType.S3:
        used = int(
            session.scalar(
                select(func.coalesce(func.sum(m.PhysicalCopy.size), 0)).where(
                    m.PhysicalCopy.data_location_id == location.id,
                    m.PhysicalCopy.status.in_(HOLDING_STATES),
                    m.PhysicalCopy.lost_at.is_(None),
                )
            )
            or 0
        )
        total = location.capacity_bytes
    elif location.storage_type == m.StorageType.DISK:
        try:
            storage = storage_for_location(location)
            if location.capacity_bytes:
                used, total = storage.tree_bytes(), int(location.capacity_bytes)
            else:
                usage = storage.usage()
                used, total = usage.used_bytes, usage.total_bytes
        except Exception as exc:  # unmounted disk, missing root: unknown, not zero
            log.error("buffer_measure_failed", location=location.name, error=str(exc))
            return None
    else:
        return None
    percent = 100.0 * used / total if total else 0.0
    state = bs.classify(percent, bs.thresholds_for(location))
    return {
        "location": location.name,
        "used_bytes": int(used),
        "total_bytes": int(total) if total else None,
        "disk_usage_percent": round(percent, 4),
        "state": state.value,
        "measured_at": m.utcnow().isoformat(),
    }


class BufferManager:
    """Monitors disk use of every active location and publishes its buffer state."""

    def __init__(self) -> None:
        self.alerts_sent: list[dict[str, Any]] = []
        self._last_sweep: float | None = None

    def _sweep_if_due(self, locations: list[m.DataLocation], session: Session) -> dict[str, Any]:
        """The janitor on ``locations`` if it has not run for JANITOR_MIN_AGE_SECONDS / 6."""
        now = time.monotonic()
        if self._last_sweep is not None and now - self._last_sweep < (
            janitor.min_age_seconds() / 6
        ):
            return {}
        self._last_sweep = now
        swept = janitor.sweep(locations, session=session)
        return {name: r for name, r in swept.items() if r["removed"]}

    def _check_thresholds(
        self,
        location: m.DataLocation,
        status: dict[str, Any],
        previous_state: bs.BufferState = bs.BufferState.UNKNOWN,
    ) -> bs.BufferState:
        """Classify a measurement and escalate: warning and critical are logged; entering
        emergency logs an error and sends an administrator alert."""
        thresholds = bs.thresholds_for(location)
        state = bs.classify(status.get("disk_usage_percent"), thresholds)
        fields = {
            "location": location.name,
            "disk_usage_percent": status.get("disk_usage_percent"),
            "used_bytes": status.get("used_bytes"),
            "total_bytes": status.get("total_bytes"),
            "state": state.value,
        }
        if state == bs.BufferState.WARNING:
            log.warning("buffer_warning", threshold=thresholds.warning, **fields)
        elif state == bs.BufferState.CRITICAL:
            log.warning(
                "buffer_critical",
                threshold=thresholds.critical,
                max_transfers=bs.transfer_limit(state, location),
                **fields,
            )
        elif state == bs.BufferState.EMERGENCY:
            log.error("buffer_emergency", threshold=thresholds.emergency, **fields)
            if previous_state != bs.BufferState.EMERGENCY:
                payload = {
                    "event": "buffer_emergency",
                    "site": location.site.name,
                    "threshold_percent": thresholds.emergency,
                    "message": (
                        f"{location.name} is {status.get('disk_usage_percent'):.1f}% full "
                        f"(emergency >= {thresholds.emergency}%): package creation paused, "
                        "eligible data being deleted"
                    ),
                    **fields,
                }
                log.error(
                    "administrator_alert", **{k: v for k, v in payload.items() if k != "event"}
                )
                self.alerts_sent.append(payload)
                send_alert(payload)
        return state

    def run_once(self, session: Session, site: str | None = None) -> dict[str, Any]:
        """Measure, classify, publish and record every active location; returns
        ``{location: status}`` (plus ``deletion`` when an emergency triggered a cycle).

        ``site`` scopes the cycle to that site's locations (default: the setting
        ``MANAGER_SITE``); an emergency then runs a deletion cycle for the same site."""
        ids = scope.location_ids(session, site)
        result: dict[str, Any] = {}
        emergency = False
        locations = session.scalars(
            scope.restrict(
                select(m.DataLocation)
                .where(m.DataLocation.active.is_(True))
                .order_by(m.DataLocation.name),
                m.DataLocation.id,
                ids,
            )
        ).all()
        swept = self._sweep_if_due(list(locations), session)
        if swept:
            result["janitor"] = swept
        # The previous states in one read, the new ones published in one write (not
        # two queries per location).
        previous_states = bs.states_of([loc.name for loc in locations], session)
        measured: list[dict[str, Any]] = []
        samples: list[dict[str, Any]] = []
        for loc in locations:
            status = measure_location(session, loc)
            if status is None:
                continue
            previous = previous_states.get(loc.name, bs.BufferState.UNKNOWN)
            state = self._check_thresholds(loc, status, previous)
            status["state"] = state.value
            measured.append(status)
            samples.append(
                {
                    "data_location_id": loc.id,
                    "used_bytes": status["used_bytes"],
                    "total_bytes": status["total_bytes"],
                    "disk_usage_percent": status["disk_usage_percent"],
                }
            )
            result[loc.name] = status
            if (
                state == bs.BufferState.EMERGENCY
                and loc.location_type != m.LocationType.LONG_TERM_ARCHIVE
            ):
                emergency = True
        if samples:  # one INSERT for all (ORM objects would be inserted one by one)
            session.execute(insert(m.BufferUsageSample), samples)
        try:
            failures = bs.publish_statuses(measured, session)
        except Exception as exc:  # the store failed as a whole: readers see UNKNOWN
            failures = {status["location"]: exc for status in measured}
        for name, exc in failures.items():  # Redis down: readers see UNKNOWN and act safely
            log.error("buffer_status_publish_failed", location=name, error=str(exc))
        session.commit()
        if emergency and bool(settings.get("BUFFER_EMERGENCY_TRIGGERS_DELETION", True)):
            result["deletion"] = deletion_cycle.run_once(session, site=site)
        return result

    def sleep_time(self) -> float:
        return bs.manager_sleep_time(float(settings.BUFFER_MANAGER_SLEEP_TIME), self._states())

    def _states(self) -> list[bs.BufferState]:
        try:
            with DatabaseConnection().session_scope() as session:
                names = session.scalars(
                    select(m.DataLocation.name).where(m.DataLocation.active.is_(True))
                )
                return [bs.state_of(n, session) for n in names]
        except Exception as exc:  # keep looping
            log.warning("buffer_states_unavailable", error=str(exc))
            return []

    def run(self, once: bool = False, site: str | None = None) -> Any:
        """The loop (or one cycle); ``site`` as in :meth:`run_once`.  A scoped manager
        reports health as ``buffer_manager@<site>``."""
        return run_manager(
            scope.scoped_name("buffer_manager", scope.resolve_site(site)),
            lambda session: self.run_once(session, site=site),
            self.sleep_time,
            once=once,
        )


def run_once(session: Session, site: str | None = None) -> dict[str, Any]:
    return BufferManager().run_once(session, site=site)
