"""Planning of the transfer stage: which DataTransfer rows to create.

Primary transfers send each new DataTransferPackage from its source-site buffer to one
LTA site chosen round-robin (the rotation survives restarts in ``manager_state``),
skipping a site whose landing buffer cannot take the package now
(:mod:`~ccat_data_transfer.core.buffer_room`: critical or emergency, or less free space than
the package plus a margin); with no site able, the package waits PENDING (no retry
charged) and the cycle logs why;
onward transfers continue a RELAY route's second hop, and send secondaries from the
primary LTA-site buffer to every other LTA site once the primary copy is unpacked.
Route rules (where a hop lands) are in :mod:`~ccat_data_transfer.transfer.routes`.

Room in the house: manager side, database only (no storage, no tasks).  Imports
:mod:`~ccat_data_transfer.transfer.routes`, core (scope, logging, buffer_room) and
``ccat_ops_db``.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from sqlalchemy import bindparam, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from ccat_data_transfer.core import scope
from ccat_data_transfer.core.buffer_room import Room, Verdict, rooms_of
from ccat_data_transfer.core.errors import ConfigurationError
from ccat_data_transfer.core.logs import get_logger
from ccat_data_transfer.transfer.claims import claim
from ccat_data_transfer.transfer.routes import (
    find_route,
    first_hop_destination,
    lta_sites,
    resolve_destination,
    source_site_ids,
)
from ccat_ops_db import models as m

log = get_logger("ccat_data_transfer.transfer_manager")

ROUND_ROBIN_KEY = "transfer_manager:primary_round_robin"

__all__ = [
    "ROUND_ROBIN_KEY",
    "next_round_robin_site",
    "round_robin_order",
    "plan_onward_transfers",
    "plan_primary_transfers",
]


def next_round_robin_site(candidates: list[str], last: str | None) -> str:
    """The site after ``last`` in sorted ``candidates`` (wrapping); the first if none."""
    if not candidates:
        raise ValueError("no candidate site")
    ordered = sorted(candidates)
    if last is not None:
        for name in ordered:
            if name > last:
                return name
    return ordered[0]


def round_robin_order(candidates: list[str], last: str | None) -> list[str]:
    """Every candidate once, starting with :func:`next_round_robin_site` and wrapping: the
    order in which sites are tried when the next one cannot take a package."""
    ordered = sorted(candidates)
    i = ordered.index(next_round_robin_site(ordered, last))
    return ordered[i:] + ordered[:i]


def _load_rotation(session: Session) -> m.ManagerState | None:
    return session.scalars(
        select(m.ManagerState).where(m.ManagerState.key == ROUND_ROBIN_KEY).with_for_update()
    ).first()


def _save_rotation(session: Session, row: m.ManagerState | None, site_name: str) -> m.ManagerState:
    value = json.dumps({"last_site": site_name})
    if row is None:
        row = m.ManagerState(key=ROUND_ROBIN_KEY, value=value)
        session.add(row)
    else:
        row.value = value
        row.updated_at = m.utcnow()
    return row


def _rotation_last(row: m.ManagerState | None) -> str | None:
    if row is None:
        return None
    try:
        return json.loads(row.value).get("last_site")
    except (ValueError, AttributeError):
        return None


_TRANSFER_DESTINATION = aliased(m.DataLocation)
_TRANSFERS_TO_SITE = (
    select(func.count(m.DataTransfer.id))
    .join(_TRANSFER_DESTINATION, _TRANSFER_DESTINATION.id == m.DataTransfer.destination_location_id)
    .where(
        m.DataTransfer.data_transfer_package_id == bindparam("dtp_id"),
        _TRANSFER_DESTINATION.site_id == bindparam("site_id"),
    )
)


def _transfer_exists_to_site(session: Session, dtp_id: int, site_id: int) -> bool:
    return (session.scalar(_TRANSFERS_TO_SITE, {"dtp_id": dtp_id, "site_id": site_id}) or 0) > 0


def _landing(
    session: Session, route: m.DataTransferRoute, where: Any, **ids: int
) -> m.DataLocation | None:
    """``where(session, route)`` (where a hop on ``route`` lands), or None with the
    route's configuration error logged against ``ids``."""
    try:
        return where(session, route)
    except ConfigurationError as exc:
        log.error("transfer_route_invalid", **ids, reason=str(exc))
        return None


def _new_transfer(
    session: Session,
    dtp_id: int,
    origin: m.DataLocation,
    destination: m.DataLocation,
    route: m.DataTransferRoute,
    is_primary: bool,
) -> m.DataTransfer | None:
    exists_already = session.scalar(
        select(m.DataTransfer.id).where(
            m.DataTransfer.data_transfer_package_id == dtp_id,
            m.DataTransfer.destination_location_id == destination.id,
        )
    )
    if exists_already is not None:
        return None
    transfer = m.DataTransfer(
        data_transfer_package_id=dtp_id,
        origin_location_id=origin.id,
        destination_location_id=destination.id,
        route_id=route.id,
        transfer_method=route.transfer_method,
        is_primary=is_primary,
        status=m.Status.PENDING,
        unpack_status=m.Status.PENDING,
    )
    try:
        with session.begin_nested():  # two managers may plan the same transfer at once
            session.add(transfer)
    except IntegrityError:
        return None  # the other one recorded it first (unique per package and destination)
    log.info(
        "transfer_planned",
        transfer_id=transfer.id,
        data_transfer_package_id=dtp_id,
        origin=origin.name,
        location=destination.name,
        route=route.name,
        route_type=route.route_type.value,
        primary=is_primary,
    )
    return transfer


@functools.cache
def _waiting_for_primary() -> tuple[Any, Any]:
    """PENDING DTPs PRESENT at an active buffer of the source sites (bound as
    ``sources``), with the buffer's id and the package's size; built once."""
    loc = aliased(m.DataLocation)
    copy = m.DataTransferPackagePhysicalCopy
    waiting = (
        select(m.DataTransferPackage.id, loc.id, m.DataTransferPackage.size)
        .join(copy, copy.data_transfer_package_id == m.DataTransferPackage.id)
        .join(loc, loc.id == copy.data_location_id)
        .where(
            m.DataTransferPackage.status == m.Status.PENDING,
            copy.status == m.PhysicalCopyStatus.PRESENT,
            loc.location_type == m.LocationType.BUFFER,
            loc.active.is_(True),
            loc.site_id.in_(bindparam("sources", expanding=True)),
        )
        .order_by(m.DataTransferPackage.id, loc.priority, loc.name)
    )
    return waiting, loc.id


def plan_primary_transfers(session: Session, location_ids: list[int] | None = None) -> list[int]:
    """Give every PENDING DTP present at a source-site buffer its primary transfer.

    The destination site rotates round-robin over the LTA sites reachable from the
    origin site; the last chosen site is kept in ``manager_state`` so a restarted
    manager continues the rotation.  A site whose landing buffer cannot take the package
    now is skipped for the next one (it is back in the rotation once it has room); a
    package no site can take stays PENDING, with one log line per cycle saying why.
    With ``location_ids`` only DTPs present at those buffers (the origin site's scope).
    Returns the new DataTransfer ids (committed).
    """
    sources = source_site_ids(session)
    if not sources:
        return []
    origins, sizes = _waiting_packages(session, sources, location_ids)
    if not origins:
        return []

    sites = lta_sites(session)
    rotation = _load_rotation(session)
    last = _rotation_last(rotation)
    created: list[int] = []
    rooms: dict[int, Room] = {}  # landing buffer id -> room left, this cycle
    unable: dict[int, list[str]] = {}  # DTP id -> why no site took it
    skipped: dict[str, tuple[int, Verdict]] = {}  # site -> first package it refused
    for dtp_id, loc_ids in origins.items():
        origin = session.get(m.DataLocation, loc_ids[0])
        routes = {
            s.name: r
            for s in sites
            if s.id != origin.site_id and (r := find_route(session, origin.site_id, s.id))
        }
        if not routes:
            log.warning(
                "no_route_to_lta",
                data_transfer_package_id=dtp_id,
                location=origin.name,
                reason="no active route from this site to any LTA site",
            )
            continue
        chosen = _first_site_with_room(session, dtp_id, sizes[dtp_id], routes, last, rooms, skipped)
        if isinstance(chosen, list):
            unable[dtp_id] = chosen
            continue
        site_name, route, destination = chosen
        if route.origin_location_id in loc_ids:
            origin = route.origin_location
        if not claim(
            session,
            m.DataTransferPackage,
            dtp_id,
            m.DataTransferPackage.status == m.Status.PENDING,
            status=m.Status.IN_PROGRESS,
            origin_location_id=origin.id,
        ):
            continue  # another manager took it
        transfer = _new_transfer(session, dtp_id, origin, destination, route, is_primary=True)
        last = site_name
        rotation = _save_rotation(session, rotation, site_name)
        rooms[destination.id] = rooms[destination.id].take(sizes[dtp_id])
        if transfer is not None:
            created.append(transfer.id)
    session.commit()
    _log_waiting(skipped, unable)
    return created


def _waiting_packages(
    session: Session, sources: set[int], location_ids: list[int] | None
) -> tuple[dict[int, list[int]], dict[int, int]]:
    """DB phase: the PENDING DTPs present at a source-site buffer (in scope), with the
    buffers holding each and its size."""
    waiting, loc_id = _waiting_for_primary()
    rows = session.execute(
        scope.restrict(waiting, loc_id, location_ids), {"sources": sorted(sources)}
    ).all()
    origins: dict[int, list[int]] = {}
    sizes: dict[int, int] = {}
    for dtp_id, loc_id, size in rows:
        origins.setdefault(dtp_id, []).append(loc_id)
        sizes[dtp_id] = int(size or 0)
    return origins, sizes


def _log_waiting(skipped: dict[str, tuple[int, Verdict]], unable: dict[int, list[str]]) -> None:
    """One line per skipped site, one for the packages no site could take this cycle."""
    for site_name, (dtp_id, verdict) in sorted(skipped.items()):
        log.info(  # once per site and cycle, not once per package
            "routing_skipped_site",
            site=site_name,
            location=verdict.location,
            data_transfer_package_id=dtp_id,
            needed_bytes=verdict.needed_bytes,
            free_bytes=verdict.free_bytes,
            reason=verdict.reason,
        )
    if unable:
        log.warning(
            "primary_transfers_waiting",
            packages=len(unable),
            data_transfer_package_ids=sorted(unable)[:20],
            reasons=sorted({r for reasons in unable.values() for r in reasons}),
            reason="no LTA site's landing buffer can take these packages now; they stay "
            "PENDING (no retry charged) until one has room",
        )


def _first_site_with_room(
    session: Session,
    dtp_id: int,
    size: int,
    routes: dict[str, m.DataTransferRoute],
    last: str | None,
    rooms: dict[int, Room],
    skipped: dict[str, tuple[int, Verdict]],
) -> tuple[str, m.DataTransferRoute, m.DataLocation] | list[str]:
    """The first site in round-robin order whose landing buffer takes ``size`` bytes now,
    with its route and landing location; else the reasons each site gave.  A skipped
    site is noted in ``skipped`` (the first package it refused, and why)."""
    reasons: list[str] = []
    for site_name in round_robin_order(list(routes), last):
        route = routes[site_name]
        destination = _landing(
            session, route, first_hop_destination, data_transfer_package_id=dtp_id
        )
        if destination is None:
            reasons.append(f"{site_name}: route configuration error")
            continue
        if destination.id not in rooms:
            rooms.update(rooms_of(session, [destination]))
        verdict = rooms[destination.id].verdict(size)
        if verdict.ok:
            return site_name, route, destination
        skipped.setdefault(site_name, (dtp_id, verdict))
        reasons.append(verdict.reason)
    return reasons


def _is_relay_hop(transfer: m.DataTransfer) -> bool:
    route = transfer.route
    return (
        route is not None
        and route.route_type == m.RouteType.RELAY
        and transfer.destination_location.site_id == route.relay_site_id
        and route.relay_site_id != route.destination_site_id
    )


# The planning queries of plan_onward_transfers, built once.
_ACTIVE_DTP = m.DataTransferPackage.status.in_((m.Status.IN_PROGRESS, m.Status.FAILED))
_COMPLETED_RELAY_HOPS = (
    select(m.DataTransfer)
    .join(m.DataTransferPackage)
    .join(m.DataTransferRoute, m.DataTransferRoute.id == m.DataTransfer.route_id)
    .where(
        _ACTIVE_DTP,
        m.DataTransfer.status == m.Status.COMPLETED,
        m.DataTransferRoute.route_type == m.RouteType.RELAY,
    )
)
_UNPACKED_PRIMARIES = (
    select(m.DataTransfer)
    .join(m.DataTransferPackage)
    .where(
        _ACTIVE_DTP,
        m.DataTransfer.is_primary.is_(True),
        m.DataTransfer.status == m.Status.COMPLETED,
        m.DataTransfer.unpack_status == m.Status.COMPLETED,
    )
)


def plan_onward_transfers(session: Session, location_ids: list[int] | None = None) -> list[int]:
    """Second hops of RELAY routes, and secondary transfers to the other LTA sites once
    the primary site has the package unpacked.  With ``location_ids`` only hops that
    leave from those locations (where the previous hop landed).  Returns new
    DataTransfer ids."""
    created: list[int] = []

    # Relay hops whose copy is verified: continue to the route's destination site.
    done = session.scalars(
        scope.restrict(_COMPLETED_RELAY_HOPS, m.DataTransfer.destination_location_id, location_ids)
    ).all()
    for hop in done:
        if not _is_relay_hop(hop):
            continue
        route = hop.route
        if _transfer_exists_to_site(
            session, hop.data_transfer_package_id, route.destination_site_id
        ):
            continue
        destination = _landing(session, route, resolve_destination, transfer_id=hop.id)
        if destination is None:
            continue
        t = _new_transfer(
            session,
            hop.data_transfer_package_id,
            hop.destination_location,
            destination,
            route,
            is_primary=hop.is_primary,
        )
        if t is not None:
            created.append(t.id)

    # Secondary transfers: from the primary LTA-site buffer to every other LTA site.
    sites = lta_sites(session)
    primaries = session.scalars(
        scope.restrict(_UNPACKED_PRIMARIES, m.DataTransfer.destination_location_id, location_ids)
    ).all()
    lta_site_ids = {s.id for s in sites}
    for primary in primaries:
        if _is_relay_hop(primary):
            continue
        here = primary.destination_location
        if here.site_id not in lta_site_ids:
            continue
        origin_site_id = (
            primary.data_transfer_package.origin_location.site_id
            if (primary.data_transfer_package.origin_location is not None)
            else primary.origin_location.site_id
        )
        for site in sites:
            if site.id in (here.site_id, origin_site_id):
                continue
            if _transfer_exists_to_site(session, primary.data_transfer_package_id, site.id):
                continue
            route = find_route(session, here.site_id, site.id)
            if route is None:
                log.warning(
                    "no_route_for_secondary",
                    data_transfer_package_id=primary.data_transfer_package_id,
                    location=here.name,
                    reason=f"no active route from {here.site.name} to {site.name}",
                )
                continue
            destination = _landing(session, route, first_hop_destination, transfer_id=primary.id)
            if destination is None:
                continue
            t = _new_transfer(
                session, primary.data_transfer_package_id, here, destination, route, False
            )
            if t is not None:
                created.append(t.id)
    session.commit()
    return created
