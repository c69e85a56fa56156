"""Room in a buffer: can a location take a package of N bytes now?

The transfer manager asks before it routes a package to an LTA site (the round-robin
skips a site whose landing buffer cannot take it), packaging asks how big a package may
ever be (no larger than the biggest LTA-site buffer), and ``disk-monitor`` and the
dashboard say when a buffer cannot take the next waiting package.  One rule for all:

* a buffer in state critical or emergency takes nothing;
* otherwise it takes a package when ``free >= size + margin``, where free is the capacity
  minus what is used minus the packages already on their way to it (transfers not yet
  COMPLETED), and the margin is ROUTING_FREE_SPACE_MARGIN_BYTES or
  ROUTING_FREE_SPACE_MARGIN_PERCENT of the capacity, whichever is larger.

Where the numbers come from, best first: the live status the buffer manager published;
when it expired, the last measurement kept in the DB (``buffer_usage_sample``); never
measured, the location's ``capacity_bytes`` against the bytes the DB records there.  Only
when none of these exists (no capacity known, never measured) is the room unknown, and
an unknown room takes the package: it must not stall every transfer, and a write that
does not fit fails with "no space" and is retried elsewhere later.

Room in the house: core.  Imports :mod:`~ccat_data_transfer.core.buffer_status` (live
statuses and the last samples), config and ``ccat_ops_db``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import bindparam, func, select
from sqlalchemy.orm import Session

from ccat_data_transfer.core import buffer_status as bs
from ccat_data_transfer.core.buffer_status import last_samples
from ccat_data_transfer.core.config import settings
from ccat_data_transfer.core.formatting import human_bytes
from ccat_ops_db import models as m
from ccat_ops_db.topology import HOLDING_STATES

__all__ = [
    "Room",
    "Verdict",
    "largest_landing_capacity",
    "lta_site_buffers",
    "margin_bytes",
    "next_package_verdicts",
    "next_waiting_package",
    "room_from_status",
    "rooms_of",
]

#: Transfers whose bytes are on their way to a buffer, not yet (fully) in its measurement.
_ON_THE_WAY = (m.Status.PENDING, m.Status.SCHEDULED, m.Status.IN_PROGRESS)


def margin_bytes(total_bytes: int | None) -> int:
    """The free space a buffer keeps beyond the package: the larger of the two settings."""
    fixed = int(settings.get("ROUTING_FREE_SPACE_MARGIN_BYTES", 0) or 0)
    percent = float(settings.get("ROUTING_FREE_SPACE_MARGIN_PERCENT", 0) or 0)
    return max(fixed, int(total_bytes * percent / 100) if total_bytes else 0)


@dataclass(frozen=True)
class Verdict:
    """Whether a buffer takes a package, and why (``reason`` reads for a person)."""

    ok: bool
    location: str
    needed_bytes: int
    free_bytes: int | None
    reason: str


@dataclass(frozen=True)
class Room:
    """What a location can take now (``free_bytes`` None: unknown)."""

    location: str
    total_bytes: int | None
    free_bytes: int | None
    state: bs.BufferState
    source: str  # "live", "last sample", "capacity" or "unknown"

    def verdict(self, size: int) -> Verdict:
        needed = int(size) + margin_bytes(self.total_bytes)
        if self.state.under_pressure:
            return Verdict(
                False,
                self.location,
                needed,
                self.free_bytes,
                f"{self.location} cannot take next package (it is {self.state.value})",
            )
        if self.free_bytes is not None and self.free_bytes < needed:
            return Verdict(
                False,
                self.location,
                needed,
                self.free_bytes,
                f"{self.location} cannot take next package ({human_bytes(needed)} needed, "
                f"{human_bytes(max(self.free_bytes, 0))} free)",
            )
        room = "unknown room" if self.free_bytes is None else f"{human_bytes(self.free_bytes)} free"
        return Verdict(True, self.location, needed, self.free_bytes, f"{self.location}: {room}")

    def take(self, size: int) -> Room:
        """The room left once a package of ``size`` bytes is on its way here."""
        free = None if self.free_bytes is None else self.free_bytes - int(size)
        return Room(self.location, self.total_bytes, free, self.state, self.source)


def room_from_status(
    location: m.DataLocation, status: dict | None, on_the_way: int = 0, source: str = "live"
) -> Room:
    """The room of ``location`` from a status dict (``used_bytes``, ``total_bytes``,
    ``state``), less ``on_the_way`` bytes; unknown when the status has no total."""
    if not status:
        return Room(location.name, None, None, bs.BufferState.UNKNOWN, "unknown")
    total = status.get("total_bytes") or location.capacity_bytes
    used = status.get("used_bytes")
    free = int(total) - int(used) - int(on_the_way) if total and used is not None else None
    state = bs.state_in(status)
    if state == bs.BufferState.UNKNOWN and total and used is not None:
        state = bs.classify(100.0 * int(used) / int(total), bs.thresholds_for(location))
    return Room(location.name, int(total) if total else None, free, state, source)


_BYTES_ON_THE_WAY = (
    select(m.DataTransfer.destination_location_id, func.sum(m.DataTransferPackage.size))
    .join(m.DataTransferPackage)
    .where(
        m.DataTransfer.destination_location_id.in_(bindparam("ids", expanding=True)),
        m.DataTransfer.status.in_(_ON_THE_WAY),
    )
    .group_by(m.DataTransfer.destination_location_id)
)
_BYTES_HELD = (
    select(m.PhysicalCopy.data_location_id, func.sum(m.PhysicalCopy.size))
    .where(
        m.PhysicalCopy.data_location_id.in_(bindparam("ids", expanding=True)),
        m.PhysicalCopy.status.in_(HOLDING_STATES),
        m.PhysicalCopy.lost_at.is_(None),
    )
    .group_by(m.PhysicalCopy.data_location_id)
)


def rooms_of(
    session: Session,
    locations: Iterable[m.DataLocation],
    measured: dict[str, dict] | None = None,
) -> dict[int, Room]:
    """``{location id: Room}`` for ``locations`` (a few queries for all of them).
    ``measured`` (``{name: status}``, a measurement just taken) replaces the live status."""
    locs = list(locations)
    if not locs:
        return {}
    ids = [loc.id for loc in locs]
    on_the_way = {k: int(v or 0) for k, v in session.execute(_BYTES_ON_THE_WAY, {"ids": ids})}
    live = measured or bs.read_statuses([loc.name for loc in locs], session)
    samples = last_samples(session) if any(not live.get(loc.name) for loc in locs) else {}
    held: dict[int, int] | None = None
    rooms: dict[int, Room] = {}
    for loc in locs:
        way = on_the_way.get(loc.id, 0)
        status, source = live.get(loc.name), "live"
        if not status and loc.id in samples:
            sample = samples[loc.id]
            status = {"used_bytes": sample.used_bytes, "total_bytes": sample.total_bytes}
            source = "last sample"
        if not status and loc.capacity_bytes:
            if held is None:
                held = {k: int(v or 0) for k, v in session.execute(_BYTES_HELD, {"ids": ids})}
            status, source = {"used_bytes": held.get(loc.id, 0)}, "capacity"
        rooms[loc.id] = room_from_status(loc, status, way, source)
    return rooms


def lta_site_buffers(session: Session) -> list[m.DataLocation]:
    """The active BUFFER locations of the active sites that hold an active LTA: where
    DataTransferPackages land and are unpacked."""
    lta = select(m.DataLocation.site_id).where(
        m.DataLocation.location_type == m.LocationType.LONG_TERM_ARCHIVE,
        m.DataLocation.active.is_(True),
    )
    return list(
        session.scalars(
            select(m.DataLocation)
            .join(m.Site)
            .where(
                m.Site.active.is_(True),
                m.DataLocation.location_type == m.LocationType.BUFFER,
                m.DataLocation.active.is_(True),
                m.DataLocation.site_id.in_(lta),
            )
            .order_by(m.DataLocation.name)
        )
    )


def largest_landing_capacity(session: Session) -> tuple[int, str] | None:
    """``(bytes, location)``: the largest package any LTA-site buffer can ever take (its
    capacity less the margin), or None when no LTA-site buffer's capacity is known."""
    best: tuple[int, str] | None = None
    for room in rooms_of(session, lta_site_buffers(session)).values():
        if room.total_bytes is None:
            return None  # a buffer of unknown size could take anything: refuse nothing
        fits = room.total_bytes - margin_bytes(room.total_bytes)
        if best is None or fits > best[0]:
            best = (fits, room.location)
    return best


def next_package_verdicts(
    session: Session,
    locations: Iterable[m.DataLocation],
    measured: dict[str, dict] | None = None,
) -> dict[str, dict]:
    """For the LTA-site buffers among ``locations``: can each take the next package
    waiting for its primary transfer?  ``{name: {data_transfer_package_id, size_bytes,
    can_take, needed_bytes, free_bytes, reason}}``; empty when no package waits."""
    waiting = next_waiting_package(session)
    if waiting is None:
        return {}
    landing = {loc.id for loc in lta_site_buffers(session)}
    rooms = rooms_of(session, [loc for loc in locations if loc.id in landing], measured)
    out = {}
    for room in rooms.values():
        v = room.verdict(waiting[1])
        out[room.location] = {
            "data_transfer_package_id": waiting[0],
            "size_bytes": waiting[1],
            "can_take": v.ok,
            "needed_bytes": v.needed_bytes,
            "free_bytes": v.free_bytes,
            "reason": v.reason,
        }
    return out


def next_waiting_package(session: Session) -> tuple[int, int] | None:
    """``(id, size)`` of the oldest DataTransferPackage waiting for its primary transfer."""
    row = session.execute(
        select(m.DataTransferPackage.id, m.DataTransferPackage.size)
        .where(m.DataTransferPackage.status == m.Status.PENDING)
        .order_by(m.DataTransferPackage.id)
        .limit(1)
    ).first()
    return (int(row[0]), int(row[1] or 0)) if row else None
