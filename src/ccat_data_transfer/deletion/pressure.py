"""Disk pressure: the buffer status of a location, whether it is under pressure, how many
bytes must go to bring it back under its threshold, and how much one cycle schedules.

The document's rule: pressure never deletes from a LONG_TERM_ARCHIVE, never acts on an
unknown status, always acts in the emergency state, otherwise when use reaches the
location's critical threshold (else DISK_USAGE_THRESHOLD_PERCENT).  Which copies go first
(oldest DELETION_POSSIBLE) is in ``deletion.candidates``.

Room in the house: core of the deletion stage; imports ``deletion.base``,
``deletion.rule_sql`` (the size of a copy), ``buffer_status``, config and ``ccat_ops_db``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ccat_data_transfer.core import buffer_status as bs
from ccat_data_transfer.core.config import settings
from ccat_data_transfer.deletion.base import (
    IN_FLIGHT,
    LT,
    MAX_BATCHES_PER_CYCLE,
    PCT,
    S,
    kept,
    log,
)
from ccat_data_transfer.deletion.rule_sql import copy_bytes
from ccat_ops_db import models as m


def get_buffer_status_for_location(
    location_name: str, session: Session | None = None
) -> dict[str, Any]:
    """The latest published buffer status of a location (``disk_usage_percent``, ``state``,
    ``used_bytes``, ``total_bytes``, ``measured_at``); ``{}`` when unknown."""
    try:
        return dict(bs.read_status(location_name, session) or {})
    except Exception as exc:  # an unreadable status is an unknown one: act safely
        log.warning("buffer_status_unavailable", location=location_name, error=str(exc))
        return {}


def pressure_threshold_percent(location: m.DataLocation) -> float | None:
    """Use above which pressure-driven deletion starts; None for locations never cleaned
    because of pressure.  SOURCE, BUFFER and PROCESSING locations use their own critical
    threshold if set, else DISK_USAGE_THRESHOLD_PERCENT; LONG_TERM_ARCHIVE: never."""
    if location.location_type == LT.LONG_TERM_ARCHIVE:
        return None
    if location.critical_threshold_percent is not None:
        return float(location.critical_threshold_percent)
    return float(settings.DISK_USAGE_THRESHOLD_PERCENT)


def should_delete_based_on_buffer_status(
    location: m.DataLocation, buffer_status: dict[str, Any] | None
) -> bool:
    """True when the location is under disk pressure and eligible data should go now even
    before its retention expires.  Never for a LONG_TERM_ARCHIVE; never when the status is
    unknown (no measurement, stale, Redis down): then only the safe rules run."""
    threshold = pressure_threshold_percent(location)
    if threshold is None or not buffer_status:
        return False
    state = str(buffer_status.get("state", bs.BufferState.UNKNOWN.value))
    if state == bs.BufferState.UNKNOWN.value:
        return False
    if state == bs.BufferState.EMERGENCY.value:
        return True
    percent = buffer_status.get("disk_usage_percent")
    if percent is None:
        return False
    return float(percent) >= threshold


def state_from(status: dict[str, Any]) -> bs.BufferState:
    try:
        return bs.BufferState(status.get("state", "unknown")) if status else bs.BufferState.UNKNOWN
    except ValueError:
        return bs.BufferState.UNKNOWN


def batch_size_for(state: bs.BufferState) -> int:
    size = max(1, int(settings.DELETION_BATCH_SIZE))
    if state.under_pressure:
        size *= max(1, int(settings.get("DELETION_CRITICAL_BATCH_MULTIPLIER", 4)))
    return size


def cycle_limit(state: bs.BufferState) -> int | None:
    """How many copies per location and step one cycle schedules; None (all) in emergency,
    which the steps then schedule one batch per pass (``deletion.steps._in_batches``)."""
    if state == bs.BufferState.EMERGENCY:
        return None
    return batch_size_for(state) * MAX_BATCHES_PER_CYCLE


#: Location types whose buffer status a cycle reads (the ones pressure may act on).
PRESSURE_TYPES = (LT.SOURCE, LT.BUFFER, LT.PROCESSING)


@kept
def _locations_statement() -> Any:
    """Every location with its site's active flag and name, by id."""
    dl = m.DataLocation
    return (
        select(dl, m.Site.active, m.Site.name)
        .outerjoin(m.Site, m.Site.id == dl.site_id)
        .order_by(dl.id)
    )


class Statuses:
    """What one cycle reads once: the locations with their sites (one query, on first use:
    the active ones, and the site roles), and the buffer statuses of the active ones (one
    query or one Redis MGET for all of them, on first use)."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._cache: dict[str, dict[str, Any]] = {}
        self._locations: list[tuple[m.DataLocation, Any, Any]] | None = None
        #: The site roles (``deletion.rules.site_roles``), once read this cycle.
        self.roles: Any = None

    def locations(
        self, types: Iterable[m.LocationType], location_ids: list[int] | None = None
    ) -> list[m.DataLocation]:
        """Active locations of ``types`` by id; with ``location_ids`` only those (a site's
        scope)."""
        wanted = set(types)
        return [
            loc
            for loc, _, _ in self._read_locations()
            if loc.active
            and loc.location_type in wanted
            and (location_ids is None or loc.id in location_ids)
        ]

    def site_rows(self) -> list[tuple[Any, ...]]:
        """(site id, location type, location active, site active, site name) of every
        location of a site: what ``deletion.rules.site_roles_from`` reads."""
        return [
            (loc.site_id, loc.location_type, loc.active, site_active, site_name)
            for loc, site_active, site_name in self._read_locations()
            if site_name is not None
        ]

    def _read_locations(self) -> list[tuple[m.DataLocation, Any, Any]]:
        """Every location with its site's active flag and name, by id (one query)."""
        if self._locations is None:
            self._locations = [
                (loc, site_active, site_name)
                for loc, site_active, site_name in self.session.execute(_locations_statement())
            ]
        return self._locations

    def get(self, location: m.DataLocation) -> dict[str, Any]:
        if location.name not in self._cache:
            names = [location.name] + [
                loc.name for loc in self.locations(PRESSURE_TYPES) if loc.name != location.name
            ]
            try:
                read = bs.read_statuses(names, self.session)
            except Exception as exc:  # an unreadable status is an unknown one: act safely
                log.warning("buffer_status_unavailable", location=location.name, error=str(exc))
                read = {location.name: None}
            for name, status in read.items():
                self._cache.setdefault(name, dict(status or {}))
        return self._cache[location.name]

    def state(self, location: m.DataLocation) -> bs.BufferState:
        return state_from(self.get(location))


def bytes_to_free(session: Session, location: m.DataLocation, status: dict[str, Any]) -> int:
    """Bytes that must go for ``location`` to be back under its pressure threshold:
    ``used - threshold * capacity``, minus what is already being deleted there and what was
    deleted since the measurement, each copy counted as the selection counts it
    (``rule_sql.copy_bytes``: its size, else its raw file's)."""
    threshold = pressure_threshold_percent(location)
    total = status.get("total_bytes") if status else None
    if threshold is None or not total:
        return 0
    need = float(status["used_bytes"]) - threshold / 100.0 * float(total)
    in_flight = session.scalar(
        select(func.coalesce(func.sum(copy_bytes(PCT)), 0)).where(
            PCT.c.data_location_id == location.id, PCT.c.status.in_(list(IN_FLIGHT))
        )
    )
    freed = 0
    measured = status.get("measured_at")
    if measured:
        try:
            measured_at = datetime.fromisoformat(str(measured)).replace(tzinfo=None)
        except ValueError:
            measured_at = None
        if measured_at is not None:
            freed = session.scalar(
                select(func.coalesce(func.sum(copy_bytes(PCT)), 0)).where(
                    PCT.c.data_location_id == location.id,
                    PCT.c.status == S.DELETED,
                    PCT.c.deleted_at >= measured_at,
                )
            )
    return max(0, math.ceil(need - float(in_flight or 0) - float(freed or 0)))
