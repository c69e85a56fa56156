"""Stages 3 and 4: send DataTransferPackages between sites, verify them, unpack them.

Flow of one DataTransferPackage (DTP)::

    source-site BUFFER --primary--> LTA-site BUFFER (round-robin site) --unpack-->
        RawDataPackage tars PRESENT at that buffer (the archive manager takes over)
    primary LTA-site BUFFER --secondary--> every other LTA site's BUFFER --unpack--> ...

Route types (``DataTransferRoute.route_type``) decide where a transfer lands:

* ``DIRECT``: straight from the origin site to the destination site with no intermediate
  site.  It lands in the destination site's BUFFER of best priority (active).  A DTP is
  never written into a LONG_TERM_ARCHIVE location: the user's document says DTPs are
  "unpacked at LTA site buffers; only the extracted RawDataPackages are moved to LTA
  storage", so "skip" here means skipping any intermediate (relay) buffer, not the
  destination site's own buffer.
* ``RELAY``: two hops.  First to the relay site's best BUFFER, then (once that copy is
  verified) from there to the destination site's best BUFFER.  Both hops are
  DataTransfer rows with the same route.  The relay hop is unpacked only if the relay
  site is itself an LTA site (then it simply counts as that site's copy).
* ``CUSTOM``: a location-to-location override.  ``destination_location`` (if set) is the
  landing location instead of the best buffer (it must be a BUFFER);
  ``origin_location`` (if set) is the preferred origin when the DTP is present there.

When several active routes join the same two sites, CUSTOM wins over DIRECT over RELAY.

One DataTransfer row exists per (DTP, destination location).  The manager claims work
with ``UPDATE ... WHERE status = <expected>`` and commits before submitting tasks; tasks
claim again (SCHEDULED -> IN_PROGRESS) so a task delivered twice does nothing the
second time.  Failures retry with exponential backoff up to TRANSFER_MAX_RETRIES.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, exists, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased, selectinload

from ccat_data_transfer import scope
from ccat_data_transfer.buffer_status import state_of, transfer_limit
from ccat_data_transfer.celery_app import app
from ccat_data_transfer.config.config import data_dir, settings
from ccat_data_transfer.database import DatabaseConnection
from ccat_data_transfer.exceptions import (
    ConfigurationError,
    NotFoundError,
    PermanentError,
    ValidationError,
)
from ccat_data_transfer.logging_utils import get_logger
from ccat_data_transfer.operation_types import OperationType
from ccat_data_transfer.queue_discovery import route_task_by_location
from ccat_data_transfer.stage_tasks import start_scheduled
from ccat_data_transfer.storage import DiskStorage, Storage, normalize_path, storage_for_location
from ccat_data_transfer.tarutil import CorruptTarError, UnsafeTarError, safe_extract
from ccat_data_transfer.transfer_methods import get_transfer_method, method_for_storages
from ccat_ops_db import models as m

log = get_logger(__name__)

ROUND_ROBIN_KEY = "transfer_manager:primary_round_robin"
IN_FLIGHT = (m.Status.SCHEDULED, m.Status.IN_PROGRESS)
_ROUTE_PREFERENCE = {m.RouteType.CUSTOM: 0, m.RouteType.DIRECT: 1, m.RouteType.RELAY: 2}

__all__ = [
    "best_buffer",
    "dispatch_transfers",
    "dispatch_unpacks",
    "execute_transfer",
    "execute_unpack",
    "find_route",
    "lta_sites",
    "next_round_robin_site",
    "plan_onward_transfers",
    "plan_primary_transfers",
    "reset_stalled_transfers",
    "resolve_destination",
    "retry_transfer",
    "run_once",
    "transfer_data_transfer_package",
    "transfer_log_dir",
    "unpack_data_transfer_package",
    "update_package_status",
]


class ChecksumMismatchError(Exception):
    """What landed does not match the expected checksum (retryable)."""


# ---------------------------------------------------------------------------------------
# Topology queries and decisions
# ---------------------------------------------------------------------------------------


# Topology queries every manager cycle runs (several times): built once, since building
# a statement and its cache key costs more than running it on the small topology tables.
_LTA_SITES = (
    select(m.Site)
    .where(
        m.Site.active.is_(True),
        exists().where(
            m.DataLocation.site_id == m.Site.id,
            m.DataLocation.location_type == m.LocationType.LONG_TERM_ARCHIVE,
            m.DataLocation.active.is_(True),
        ),
    )
    .order_by(m.Site.name)
)
_SOURCE_SITE_IDS = (
    select(m.DataLocation.site_id)
    .where(m.DataLocation.location_type == m.LocationType.SOURCE)
    .distinct()
)


def lta_sites(session: Session) -> list[m.Site]:
    """Active sites with an active LONG_TERM_ARCHIVE location, ordered by name."""
    return list(session.scalars(_LTA_SITES).all())


def source_site_ids(session: Session) -> set[int]:
    """Sites with a SOURCE location (where data is born)."""
    return set(session.scalars(_SOURCE_SITE_IDS).all())


def best_buffer(session: Session, site_id: int) -> m.DataLocation | None:
    """The site's active BUFFER of best (lowest) priority; the next one is the failover."""
    return session.scalars(
        select(m.DataLocation)
        .where(
            m.DataLocation.site_id == site_id,
            m.DataLocation.location_type == m.LocationType.BUFFER,
            m.DataLocation.active.is_(True),
        )
        .order_by(m.DataLocation.priority, m.DataLocation.name)
        .limit(1)
    ).first()


def find_route(
    session: Session, origin_site_id: int, destination_site_id: int
) -> m.DataTransferRoute | None:
    """The active route between two sites (CUSTOM before DIRECT before RELAY)."""
    routes = session.scalars(
        select(m.DataTransferRoute).where(
            m.DataTransferRoute.origin_site_id == origin_site_id,
            m.DataTransferRoute.destination_site_id == destination_site_id,
            m.DataTransferRoute.active.is_(True),
        )
    ).all()
    if not routes:
        return None
    return min(routes, key=lambda r: (_ROUTE_PREFERENCE[r.route_type], r.id))


def resolve_destination(
    session: Session, route: m.DataTransferRoute, site_id: int | None = None
) -> m.DataLocation:
    """Where a transfer on ``route`` towards ``site_id`` (default: the route's destination
    site) lands.  See the module docstring for the meaning of each route type."""
    site_id = site_id or route.destination_site_id
    if (
        route.route_type == m.RouteType.CUSTOM
        and route.destination_location is not None
        and site_id == route.destination_site_id
    ):
        loc = route.destination_location
        if loc.location_type != m.LocationType.BUFFER or not loc.active:
            raise ConfigurationError(
                f"route {route.name!r}: destination_location {loc.name!r} must be an active "
                "BUFFER (DataTransferPackages are unpacked in buffers, never stored in an LTA)"
            )
        return loc
    loc = best_buffer(session, site_id)
    if loc is None:
        site = session.get(m.Site, site_id)
        raise ConfigurationError(
            f"route {route.name!r}: site {site.name if site else site_id!r} has no active BUFFER"
        )
    return loc


def first_hop_destination(session: Session, route: m.DataTransferRoute) -> m.DataLocation:
    """The landing location of the first hop: the relay site's buffer for RELAY routes."""
    if route.route_type == m.RouteType.RELAY:
        if route.relay_site_id is None:
            raise ConfigurationError(f"relay route {route.name!r} names no relay site")
        return resolve_destination(session, route, route.relay_site_id)
    return resolve_destination(session, route)


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


# ---------------------------------------------------------------------------------------
# Manager: planning
# ---------------------------------------------------------------------------------------


@functools.cache
def _waiting_for_primary() -> tuple[Any, Any]:
    """PENDING DTPs PRESENT at an active buffer of the source sites (bound as
    ``sources``), with the buffer's id column; built once."""
    loc = aliased(m.DataLocation)
    copy = m.DataTransferPackagePhysicalCopy
    waiting = (
        select(m.DataTransferPackage.id, loc.id)
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
    manager continues the rotation.  With ``location_ids`` only DTPs present at those
    buffers (the origin site's scope).  Returns the new DataTransfer ids (committed).
    """
    sources = source_site_ids(session)
    if not sources:
        return []
    waiting, loc_id = _waiting_for_primary()
    rows = session.execute(
        scope.restrict(waiting, loc_id, location_ids), {"sources": sorted(sources)}
    ).all()
    origins: dict[int, list[int]] = {}
    for dtp_id, loc_id in rows:
        origins.setdefault(dtp_id, []).append(loc_id)
    if not origins:
        return []

    sites = lta_sites(session)
    rotation = _load_rotation(session)
    last = _rotation_last(rotation)
    created: list[int] = []
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
        site_name = next_round_robin_site(list(routes), last)
        route = routes[site_name]
        if route.origin_location_id in loc_ids:
            origin = route.origin_location
        try:
            destination = first_hop_destination(session, route)
        except ConfigurationError as exc:
            log.error("transfer_route_invalid", data_transfer_package_id=dtp_id, reason=str(exc))
            continue
        claimed = session.execute(
            update(m.DataTransferPackage)
            .where(
                m.DataTransferPackage.id == dtp_id,
                m.DataTransferPackage.status == m.Status.PENDING,
            )
            .values(status=m.Status.IN_PROGRESS, origin_location_id=origin.id)
        ).rowcount
        if claimed != 1:
            continue  # another manager took it
        transfer = _new_transfer(session, dtp_id, origin, destination, route, is_primary=True)
        last = site_name
        rotation = _save_rotation(session, rotation, site_name)
        if transfer is not None:
            created.append(transfer.id)
    session.commit()
    return created


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
        try:
            destination = resolve_destination(session, route)
        except ConfigurationError as exc:
            log.error("transfer_route_invalid", transfer_id=hop.id, reason=str(exc))
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
            try:
                destination = first_hop_destination(session, route)
            except ConfigurationError as exc:
                log.error("transfer_route_invalid", transfer_id=primary.id, reason=str(exc))
                continue
            t = _new_transfer(
                session, primary.data_transfer_package_id, here, destination, route, False
            )
            if t is not None:
                created.append(t.id)
    session.commit()
    return created


# ---------------------------------------------------------------------------------------
# Manager: dispatch
# ---------------------------------------------------------------------------------------


def _due(column: Any, now: Any) -> Any:
    return or_(column.is_(None), column <= now)


# The dispatch queries, built once (``now`` bound at execution).
_PENDING_TRANSFERS = (
    select(m.DataTransfer.id, m.DataTransfer.origin_location_id)
    .where(
        m.DataTransfer.status == m.Status.PENDING,
        _due(m.DataTransfer.next_attempt_at, bindparam("now")),
    )
    .order_by(m.DataTransfer.is_primary.desc(), m.DataTransfer.id)
)
_IN_FLIGHT_BY_ORIGIN = (
    select(m.DataTransfer.origin_location_id, func.count(m.DataTransfer.id))
    .where(m.DataTransfer.status.in_(IN_FLIGHT))
    .group_by(m.DataTransfer.origin_location_id)
)


def dispatch_transfers(
    session: Session, submit: bool = True, location_ids: list[int] | None = None
) -> list[int]:
    """Claim due PENDING transfers (PENDING -> SCHEDULED) within each origin location's
    parallel-transfer limit, commit, then submit their tasks.  Returns the claimed ids.
    With ``location_ids`` only transfers whose origin is one of them.

    The limit follows the origin buffer's state: ``transfer_limit(state_of(origin))``
    (normal/warning: MAX_NORMAL_TRANSFERS or the location's own cap; critical,
    emergency or unknown: MAX_CRITICAL_TRANSFERS), minus transfers already in flight.
    """
    origin_col = m.DataTransfer.origin_location_id
    pending = session.execute(
        scope.restrict(_PENDING_TRANSFERS, origin_col, location_ids), {"now": m.utcnow()}
    ).all()
    if not pending:
        return []
    in_flight = dict(
        session.execute(scope.restrict(_IN_FLIGHT_BY_ORIGIN, origin_col, location_ids)).all()
    )
    slots: dict[int, int] = {}
    claimed: list[tuple[int, int]] = []
    for transfer_id, origin_id in pending:
        if origin_id not in slots:
            origin = session.get(m.DataLocation, origin_id)
            limit = transfer_limit(state_of(origin.name, session), origin)
            slots[origin_id] = max(0, limit - int(in_flight.get(origin_id, 0)))
        if slots[origin_id] <= 0:
            continue
        rc = session.execute(
            update(m.DataTransfer)
            .where(m.DataTransfer.id == transfer_id, m.DataTransfer.status == m.Status.PENDING)
            .values(status=m.Status.SCHEDULED)
        ).rowcount
        if rc == 1:
            slots[origin_id] -= 1
            claimed.append((transfer_id, origin_id))
    session.commit()
    if submit:
        for transfer_id, origin_id in claimed:
            origin = session.get(m.DataLocation, origin_id)
            queue = route_task_by_location(OperationType.DATA_TRANSFER, origin)
            transfer_data_transfer_package.apply_async(args=[transfer_id], queue=queue)
        session.expire_all()
    return [t for t, _ in claimed]


_UNPACK_DESTINATION = aliased(m.DataLocation)
_DUE_UNPACKS = (
    select(m.DataTransfer.id, m.DataTransfer.destination_location_id)
    .join(_UNPACK_DESTINATION, _UNPACK_DESTINATION.id == m.DataTransfer.destination_location_id)
    .where(
        m.DataTransfer.status == m.Status.COMPLETED,
        m.DataTransfer.unpack_status == m.Status.PENDING,
        _UNPACK_DESTINATION.site_id.in_(bindparam("lta_site_ids", expanding=True)),
        _due(m.DataTransfer.next_attempt_at, bindparam("now")),
    )
    .order_by(m.DataTransfer.id)
)


def dispatch_unpacks(
    session: Session, submit: bool = True, location_ids: list[int] | None = None
) -> list[int]:
    """Claim verified transfers to LTA-site buffers whose unpack is due (unpack_status
    PENDING -> SCHEDULED), commit, submit the unpack task on the destination's queue.
    With ``location_ids`` only unpacks whose destination is one of them."""
    lta_ids = [s.id for s in lta_sites(session)]
    if not lta_ids:
        return []
    rows = session.execute(
        scope.restrict(_DUE_UNPACKS, m.DataTransfer.destination_location_id, location_ids),
        {"now": m.utcnow(), "lta_site_ids": lta_ids},
    ).all()
    claimed: list[tuple[int, int]] = []
    for transfer_id, dest_id in rows:
        rc = session.execute(
            update(m.DataTransfer)
            .where(
                m.DataTransfer.id == transfer_id,
                m.DataTransfer.status == m.Status.COMPLETED,
                m.DataTransfer.unpack_status == m.Status.PENDING,
            )
            .values(unpack_status=m.Status.SCHEDULED)
        ).rowcount
        if rc == 1:
            claimed.append((transfer_id, dest_id))
    session.commit()
    if submit:
        for transfer_id, dest_id in claimed:
            loc = session.get(m.DataLocation, dest_id)
            queue = route_task_by_location(OperationType.DATA_TRANSFER_UNPACKING, loc)
            unpack_data_transfer_package.apply_async(args=[transfer_id], queue=queue)
        session.expire_all()
    return [t for t, _ in claimed]


# Built once; the transfers of every package, their destinations and the packages'
# origins come in a few more queries (not one each, after the dispatch expired them).
_OPEN_DTPS = (
    select(m.DataTransferPackage)
    .where(m.DataTransferPackage.status.in_((m.Status.IN_PROGRESS, m.Status.FAILED)))
    .options(
        selectinload(m.DataTransferPackage.transfers).selectinload(
            m.DataTransfer.destination_location
        ),
        selectinload(m.DataTransferPackage.origin_location),
    )
)


def update_package_status(session: Session, location_ids: list[int] | None = None) -> int:
    """DTP status from its transfers: COMPLETED once every LTA site (other than the
    origin's) holds it transferred and unpacked; FAILED while any transfer or unpack is
    FAILED (``transfers retry`` brings it back).  With ``location_ids`` only DTPs whose
    origin is one of them.  Returns how many became COMPLETED."""
    sites = {s.id for s in lta_sites(session)}
    dtps = session.scalars(
        scope.restrict(_OPEN_DTPS, m.DataTransferPackage.origin_location_id, location_ids)
    ).all()
    completed = 0
    for dtp in dtps:
        transfers = dtp.transfers
        failed = [t for t in transfers if m.Status.FAILED in (t.status, t.unpack_status)]
        if failed:
            if dtp.status != m.Status.FAILED:
                t = failed[0]
                dtp.status = m.Status.FAILED
                dtp.failure_reason = (
                    f"transfer {t.id} to {t.destination_location.name}: "
                    f"{t.failure_reason or t.unpack_failure_reason}"
                )
            continue
        if dtp.status == m.Status.FAILED:
            dtp.status = m.Status.IN_PROGRESS
            dtp.failure_reason = None
        origin_site = dtp.origin_location.site_id if dtp.origin_location else None
        needed = sites - {origin_site}
        have = {
            t.destination_location.site_id
            for t in transfers
            if t.status == m.Status.COMPLETED and t.unpack_status == m.Status.COMPLETED
        }
        if needed and needed <= have:
            dtp.status = m.Status.COMPLETED
            completed += 1
            log.info("data_transfer_package_completed", data_transfer_package_id=dtp.id)
    session.commit()
    return completed


def run_once(session: Session, site: str | None = None) -> dict[str, int]:
    """One cycle of the transfer manager: plan, dispatch transfers and unpacks, update
    package statuses.  In embedded mode the tasks run inline during the dispatch.

    ``site`` scopes the cycle (default: the setting ``MANAGER_SITE``): transfers whose
    origin is at the site (they are pushed from there), unpacks whose destination is at
    the site, and the status of transfer packages that originate there."""
    ids = scope.location_ids(session, site)
    summary = {
        "primary_planned": len(plan_primary_transfers(session, ids)),
        "onward_planned": len(plan_onward_transfers(session, ids)),
        "transfers_dispatched": len(dispatch_transfers(session, location_ids=ids)),
        "unpacks_dispatched": len(dispatch_unpacks(session, location_ids=ids)),
    }
    summary["packages_completed"] = update_package_status(session, ids)
    return summary


# ---------------------------------------------------------------------------------------
# Recovery and operator actions
# ---------------------------------------------------------------------------------------


def _retry_due_at(retry_count: int, now: datetime) -> datetime | None:
    """When the next attempt after a failure is due (exponential backoff from
    TRANSFER_RETRY_BASE_SECONDS), or None once TRANSFER_MAX_RETRIES are used up.

    The one retry policy of transfers, unpacks and archive transfers."""
    if retry_count >= int(settings.TRANSFER_MAX_RETRIES):
        return None
    delay = float(settings.TRANSFER_RETRY_BASE_SECONDS) * (2**retry_count)
    return now + timedelta(seconds=delay)


def _fail_or_retry_values(
    retry_count: int, reason: str, now: datetime, permanent: bool = False
) -> dict[str, Any]:
    """Column values after a failed attempt of a row with ``status``/``retry_count``
    columns (DataTransfer, LongTermArchiveTransfer): PENDING with backoff, or FAILED when
    out of retries or the failure is ``permanent``."""
    due = None if permanent else _retry_due_at(retry_count, now)
    if due is None:
        return {"status": m.Status.FAILED, "failure_reason": reason, "end_time": now}
    return {
        "status": m.Status.PENDING,
        "retry_count": retry_count + 1,
        "next_attempt_at": due,
        "failure_reason": reason,
    }


def reset_stalled_transfers(
    session: Session, older_than: timedelta | float, location_ids: list[int] | None = None
) -> int:
    """Put transfers and unpacks whose worker vanished back in the queue.

    A row SCHEDULED or IN_PROGRESS (transfer or unpack) not touched for ``older_than``
    (running transfers refresh ``updated_at`` with a heartbeat) counts as one failed
    attempt: back to PENDING with backoff, or FAILED when out of retries.  Destination
    writes are atomic, so no partial object is left under its final name.  Returns the
    number of rows reset.  With ``location_ids`` only transfers whose origin, and unpacks
    whose destination, is one of them.  Used by the recovery service.
    """
    if not isinstance(older_than, timedelta):
        older_than = timedelta(seconds=float(older_than))
    now = m.utcnow()
    cutoff = now - older_than
    reset = 0
    stalled = session.execute(
        scope.restrict(
            select(m.DataTransfer.id, m.DataTransfer.status, m.DataTransfer.retry_count).where(
                m.DataTransfer.status.in_(IN_FLIGHT), m.DataTransfer.updated_at < cutoff
            ),
            m.DataTransfer.origin_location_id,
            location_ids,
        )
    ).all()
    for transfer_id, status, retries in stalled:
        values = _fail_or_retry_values(retries, f"stalled in {status.name}: worker lost", now)
        reset += session.execute(
            update(m.DataTransfer)
            .where(
                m.DataTransfer.id == transfer_id,
                m.DataTransfer.status == status,
                m.DataTransfer.updated_at < cutoff,
            )
            .values(**values)
        ).rowcount
    stalled_unpacks = session.execute(
        scope.restrict(
            select(
                m.DataTransfer.id, m.DataTransfer.unpack_status, m.DataTransfer.unpack_retry_count
            ).where(
                m.DataTransfer.status == m.Status.COMPLETED,
                m.DataTransfer.unpack_status.in_(IN_FLIGHT),
                m.DataTransfer.updated_at < cutoff,
            ),
            m.DataTransfer.destination_location_id,
            location_ids,
        )
    ).all()
    for transfer_id, status, retries in stalled_unpacks:
        values = _unpack_fail_or_retry_values(retries, f"unpack stalled in {status.name}", now)
        reset += session.execute(
            update(m.DataTransfer)
            .where(
                m.DataTransfer.id == transfer_id,
                m.DataTransfer.unpack_status == status,
                m.DataTransfer.updated_at < cutoff,
            )
            .values(**values)
        ).rowcount
    session.commit()
    if reset:
        log.warning("stalled_transfers_reset", count=reset, older_than_s=older_than.total_seconds())
    return reset


def _unpack_fail_or_retry_values(retry_count: int, reason: str, now: datetime) -> dict[str, Any]:
    due = _retry_due_at(retry_count, now)
    if due is None:
        return {
            "unpack_status": m.Status.FAILED,
            "unpack_failure_reason": reason,
            "unpack_end_time": now,
        }
    return {
        "unpack_status": m.Status.PENDING,
        "unpack_retry_count": retry_count + 1,
        "next_attempt_at": due,
        "unpack_failure_reason": reason,
    }


def retry_transfer(session: Session, transfer_id: int) -> m.DataTransfer:
    """Operator action: a FAILED transfer (or a FAILED unpack) back to PENDING with fresh
    retry counts.  Raises NotFoundError / ValidationError."""
    transfer = session.get(m.DataTransfer, transfer_id)
    if transfer is None:
        raise NotFoundError(f"no data transfer with id {transfer_id}")
    if transfer.status == m.Status.FAILED:
        transfer.status = m.Status.PENDING
        transfer.retry_count = 0
        transfer.next_attempt_at = None
        transfer.failure_reason = None
    elif transfer.unpack_status == m.Status.FAILED:
        transfer.unpack_status = m.Status.PENDING
        transfer.unpack_retry_count = 0
        transfer.next_attempt_at = None
        transfer.unpack_failure_reason = None
    else:
        raise ValidationError(
            f"transfer {transfer_id} is {transfer.status.name} (unpack "
            f"{transfer.unpack_status.name}); only FAILED transfers or unpacks can be retried"
        )
    dtp = transfer.data_transfer_package
    if dtp.status == m.Status.FAILED:
        dtp.status = m.Status.IN_PROGRESS
        dtp.failure_reason = None
    session.flush()
    log.info("transfer_retry_requested", transfer_id=transfer_id)
    return transfer


# ---------------------------------------------------------------------------------------
# Worker side: the transfer task
# ---------------------------------------------------------------------------------------


def transfer_log_dir() -> Path:
    """Folder of the kept per-transfer command logs (TRANSFER_LOG_DIR or
    <DATA_DIR>/logs/transfers)."""
    configured = str(settings.get("TRANSFER_LOG_DIR", "") or "")
    path = Path(configured).expanduser() if configured else data_dir() / "logs" / "transfers"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@contextlib.contextmanager
def _heartbeat(transfer_id: int, model: Any = m.DataTransfer) -> Iterator[None]:
    """Refresh the row's ``updated_at`` while long work runs, so the recovery service
    does not take a slow transfer for a dead one."""
    interval = max(5.0, float(settings.get("STALLED_WORK_TIMEOUT_SECONDS", 3600)) / 4)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            try:
                with DatabaseConnection().session_scope() as s:
                    s.execute(
                        update(model).where(model.id == transfer_id).values(updated_at=m.utcnow())
                    )
            except Exception as exc:  # the heartbeat must never break the transfer
                log.warning("transfer_heartbeat_failed", transfer_id=transfer_id, error=str(exc))

    thread = threading.Thread(target=beat, name=f"heartbeat-{transfer_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def _host(location: m.DataLocation) -> str | None:
    host = location.host
    if not host or host in (socket.gethostname(), socket.getfqdn()):
        return None
    return host


def execute_transfer(transfer_id: int) -> str:
    """Send one DTP to one destination and verify it there.  Returns the outcome
    ("completed", "retry", "failed", "skipped").  Idempotent: only a SCHEDULED row is
    worked on, so a duplicate delivery does nothing."""
    db = DatabaseConnection()
    now = m.utcnow()
    with db.session_scope() as s:
        if not start_scheduled(
            s, m.DataTransfer, transfer_id, start_time=now, worker=_worker_name()
        ):
            return "skipped"
        t = s.get(m.DataTransfer, transfer_id)
        dtp = t.data_transfer_package
        origin, dest = t.origin_location, t.destination_location
        path, expected = dtp.relative_path, (dtp.checksum or "").lower()
        method_kind, attempt = t.transfer_method, t.retry_count + 1
        log_path = transfer_log_dir() / f"data_transfer_{transfer_id}.log"
        t.log_path = str(log_path)
        dtp_id = dtp.id
    fields = {
        "transfer_id": transfer_id,
        "data_transfer_package_id": dtp_id,
        "origin": origin.name,
        "location": dest.name,
    }
    try:
        src_storage = storage_for_location(origin)
        dst_storage = storage_for_location(dest)
        method = get_transfer_method(method_for_storages(method_kind, src_storage, dst_storage))
        with open(log_path, "a", encoding="utf-8") as lf, _heartbeat(transfer_id):
            lf.write(
                f"# transfer {transfer_id} attempt {attempt}: {origin.name}:{path} -> "
                f"{dest.name}:{path} ({type(method).__name__}) at {m.utcnow().isoformat()}Z\n"
            )
            lf.flush()
            stats = method.transfer(
                src_storage,
                path,
                dst_storage,
                path,
                lf,
                src_host=_host(origin),
                dst_host=_host(dest),
            )
            actual = method.checksum(dst_storage, path, dst_host=_host(dest))
            if actual.lower() != expected:
                lf.write(f"# checksum mismatch: expected {expected}, got {actual}\n")
                with contextlib.suppress(Exception):
                    if _host(dest) is None:
                        dst_storage.delete(path)
                log.warning(
                    "transfer_checksum_mismatch",
                    **fields,
                    expected=expected,
                    actual=actual,
                    attempt=attempt,
                    reason="destination checksum differs from DataTransferPackage.checksum; "
                    "corrupt copy removed, will retry",
                )
                raise ChecksumMismatchError(
                    f"checksum mismatch at {dest.name}: expected {expected}, got {actual}"
                )
            lf.write(f"# verified sha256 {actual}\n")
    except (ConfigurationError, PermanentError) as exc:
        return _record_transfer_failure(transfer_id, str(exc), permanent=True, fields=fields)
    except Exception as exc:
        reason = (
            str(exc) if isinstance(exc, ChecksumMismatchError) else f"{type(exc).__name__}: {exc}"
        )
        return _record_transfer_failure(transfer_id, reason, permanent=False, fields=fields)

    with db.session_scope() as s:
        t = s.get(m.DataTransfer, transfer_id)
        if t.status != m.Status.IN_PROGRESS:
            return "skipped"  # reset by recovery meanwhile; the retry will redo it
        end = m.utcnow()
        t.status = m.Status.COMPLETED
        t.end_time = end
        t.bytes_transferred = stats.bytes
        t.duration_seconds = stats.seconds
        t.rate_mb_per_s = stats.rate_mb_per_s
        t.failure_reason = None
        t.next_attempt_at = None
        copy = s.scalars(
            select(m.DataTransferPackagePhysicalCopy).where(
                m.DataTransferPackagePhysicalCopy.data_transfer_package_id == dtp_id,
                m.DataTransferPackagePhysicalCopy.data_location_id == dest.id,
                m.DataTransferPackagePhysicalCopy.status == m.PhysicalCopyStatus.PRESENT,
            )
        ).first()
        if copy is None:
            copy = m.DataTransferPackagePhysicalCopy(
                data_transfer_package_id=dtp_id,
                data_location_id=dest.id,
                status=m.PhysicalCopyStatus.PRESENT,
                relative_path=path,
            )
            s.add(copy)
        copy.size = stats.bytes
        copy.checksum = expected
        copy.verified_at = end
    log.info(
        "transfer_completed",
        **fields,
        size_bytes=stats.bytes,
        duration_s=round(stats.seconds, 3),
        rate_mb_per_s=round(stats.rate_mb_per_s, 3),
    )
    return "completed"


def _record_transfer_failure(
    transfer_id: int, reason: str, permanent: bool, fields: dict[str, Any]
) -> str:
    with DatabaseConnection().session_scope() as s:
        t = s.get(m.DataTransfer, transfer_id)
        if t is None or t.status != m.Status.IN_PROGRESS:
            return "skipped"
        values = _fail_or_retry_values(t.retry_count, reason, m.utcnow(), permanent)
        for key, value in values.items():
            setattr(t, key, value)
        outcome = "failed" if t.status == m.Status.FAILED else "retry"
        retries = t.retry_count
    if outcome == "failed":
        log.error("transfer_failed", **fields, reason=reason, retry_count=retries)
    else:
        log.warning("transfer_retry_scheduled", **fields, reason=reason, retry_count=retries)
    return outcome


@app.task(
    bind=True,
    acks_late=True,
    name="ccat_data_transfer.transfer_manager.transfer_data_transfer_package",
)
def transfer_data_transfer_package(self: Any, transfer_id: int) -> str:
    """Celery task: run :func:`execute_transfer` on the origin location's queue."""
    return execute_transfer(int(transfer_id))


# ---------------------------------------------------------------------------------------
# Worker side: the unpack task
# ---------------------------------------------------------------------------------------


class UnpackVerificationError(Exception):
    """A RawDataPackage inside the DTP is missing or does not match its checksum."""


def _unpack_root(storage: Storage) -> Path | None:
    return storage.root if isinstance(storage, DiskStorage) else None


def _unpack_into(
    storage: Storage, dtp_path: str, packages: list[tuple[int, str, str | None]]
) -> dict[int, tuple[int, str]]:
    """Extract the DTP safely, verify each RawDataPackage, then put each tar in place at
    its ``relative_path``.  Nothing is placed unless every package verifies."""
    root = _unpack_root(storage)
    if root is not None:
        work = Path(tempfile.mkdtemp(prefix=".unpack.tmp-", dir=root))
        local_tar = storage.local_path(dtp_path)
    else:
        work = Path(tempfile.mkdtemp(prefix="ccat-unpack-"))
        local_tar = work / "package.tar"
        storage.copy_out(dtp_path, local_tar)
    try:
        target = work / "x"
        members = {mem.arcname: mem for mem in safe_extract(local_tar, target)}
        results: dict[int, tuple[int, str]] = {}
        for rdp_id, rel, checksum in packages:
            name = normalize_path(rel)
            mem = members.get(name)
            if mem is None:
                raise UnpackVerificationError(f"raw data package {rel} is missing from the tar")
            if checksum is None or mem.sha256 != checksum.lower():
                raise UnpackVerificationError(
                    f"checksum mismatch for raw data package {rel}: expected {checksum}, "
                    f"got {mem.sha256}"
                )
            results[rdp_id] = (mem.size, mem.sha256)
        for _rdp_id, rel, _ in packages:
            mem = members[normalize_path(rel)]
            final = storage.local_path(rel) if root is not None else None
            if final is not None:
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(mem.path, final)  # same filesystem: atomic
            else:
                storage.copy_in(mem.path, rel)
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def execute_unpack(transfer_id: int) -> str:
    """Unpack a verified DTP at its destination buffer and record a PRESENT copy of each
    RawDataPackage there.  Retryable without sending again."""
    db = DatabaseConnection()
    with db.session_scope() as s:
        rc = s.execute(
            update(m.DataTransfer)
            .where(
                m.DataTransfer.id == transfer_id,
                m.DataTransfer.status == m.Status.COMPLETED,
                m.DataTransfer.unpack_status == m.Status.SCHEDULED,
            )
            .values(unpack_status=m.Status.IN_PROGRESS, unpack_start_time=m.utcnow())
        ).rowcount
        if rc != 1:
            return "skipped"
        t = s.get(m.DataTransfer, transfer_id)
        dtp = t.data_transfer_package
        dest = t.destination_location
        dtp_path = dtp.relative_path
        packages = [(p.id, p.relative_path, p.checksum) for p in dtp.raw_data_packages]
        paths = {p.id: p.relative_path for p in dtp.raw_data_packages}
        fields = {
            "transfer_id": transfer_id,
            "data_transfer_package_id": dtp.id,
            "location": dest.name,
        }
    try:
        if not packages:
            raise PermanentError("the data transfer package lists no raw data packages")
        with _heartbeat(transfer_id):
            results = _unpack_into(storage_for_location(dest), dtp_path, packages)
    except (UnsafeTarError, PermanentError, ConfigurationError) as exc:
        return _record_unpack_failure(transfer_id, f"{type(exc).__name__}: {exc}", True, fields)
    except (UnpackVerificationError, CorruptTarError) as exc:
        log.warning("unpack_checksum_mismatch", **fields, reason=str(exc))
        return _record_unpack_failure(transfer_id, str(exc), False, fields)
    except Exception as exc:
        return _record_unpack_failure(transfer_id, f"{type(exc).__name__}: {exc}", False, fields)

    with db.session_scope() as s:
        t = s.get(m.DataTransfer, transfer_id)
        if t.unpack_status != m.Status.IN_PROGRESS:
            return "skipped"
        now = m.utcnow()
        for rdp_id, (size, sha) in results.items():
            copy = s.scalars(
                select(m.RawDataPackagePhysicalCopy).where(
                    m.RawDataPackagePhysicalCopy.raw_data_package_id == rdp_id,
                    m.RawDataPackagePhysicalCopy.data_location_id == dest.id,
                    m.RawDataPackagePhysicalCopy.status == m.PhysicalCopyStatus.PRESENT,
                )
            ).first()
            if copy is None:
                copy = m.RawDataPackagePhysicalCopy(
                    raw_data_package_id=rdp_id,
                    data_location_id=dest.id,
                    status=m.PhysicalCopyStatus.PRESENT,
                    relative_path=paths[rdp_id],
                )
                s.add(copy)
            copy.size = size
            copy.checksum = sha
            copy.verified_at = now
        t.unpack_status = m.Status.COMPLETED
        t.unpack_end_time = now
        t.unpack_failure_reason = None
        t.next_attempt_at = None
    log.info("transfer_unpacked", **fields, packages=len(results))
    return "completed"


def _record_unpack_failure(
    transfer_id: int, reason: str, permanent: bool, fields: dict[str, Any]
) -> str:
    with DatabaseConnection().session_scope() as s:
        t = s.get(m.DataTransfer, transfer_id)
        if t is None or t.unpack_status != m.Status.IN_PROGRESS:
            return "skipped"
        now = m.utcnow()
        if permanent:
            values = {
                "unpack_status": m.Status.FAILED,
                "unpack_failure_reason": reason,
                "unpack_end_time": now,
            }
        else:
            values = _unpack_fail_or_retry_values(t.unpack_retry_count, reason, now)
        for key, value in values.items():
            setattr(t, key, value)
        outcome = "failed" if t.unpack_status == m.Status.FAILED else "retry"
    if outcome == "failed":
        log.error("unpack_failed", **fields, reason=reason)
    else:
        log.warning("unpack_retry_scheduled", **fields, reason=reason)
    return outcome


@app.task(
    bind=True,
    acks_late=True,
    name="ccat_data_transfer.transfer_manager.unpack_data_transfer_package",
)
def unpack_data_transfer_package(self: Any, transfer_id: int) -> str:
    """Celery task: run :func:`execute_unpack` on the destination buffer's queue."""
    return execute_unpack(int(transfer_id))
