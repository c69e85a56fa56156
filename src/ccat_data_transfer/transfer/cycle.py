"""The transfer manager's cycle: what the manager loop calls.

:func:`run_once` plans new transfers (:mod:`~ccat_data_transfer.transfer.planning`),
dispatches due transfers within each origin buffer's parallel-transfer limit and due
unpacks at LTA-site buffers (claim, commit, then submit the task on the location's
queue), and derives each DataTransferPackage's status from its transfers.

Room in the house: manager side.  Imports the stage's planning, routes, recovery and
claims modules and its tasks (:mod:`~ccat_data_transfer.transfer.execution`,
:mod:`~ccat_data_transfer.transfer.unpack`) to submit them; core (scope, buffer status,
queue routing, logging) and ``ccat_ops_db``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import bindparam, func, or_, select
from sqlalchemy.orm import Session, aliased, selectinload

from ccat_data_transfer.core import scope
from ccat_data_transfer.core.buffer_room import rooms_of
from ccat_data_transfer.core.buffer_status import state_of, transfer_limit
from ccat_data_transfer.core.logs import get_logger
from ccat_data_transfer.core.operation_types import OperationType
from ccat_data_transfer.transfer.claims import claim, submit_claimed
from ccat_data_transfer.transfer.planning import plan_onward_transfers, plan_primary_transfers
from ccat_data_transfer.transfer.recovery import IN_FLIGHT
from ccat_data_transfer.transfer.routes import lta_sites
from ccat_data_transfer.transfer.tasks import (
    transfer_data_transfer_package,
    unpack_data_transfer_package,
)
from ccat_ops_db import models as m

log = get_logger("ccat_data_transfer.transfer_manager")

__all__ = [
    "dispatch_transfers",
    "dispatch_unpacks",
    "run_once",
    "update_package_status",
]


def _due(column: Any, now: Any) -> Any:
    return or_(column.is_(None), column <= now)


# The dispatch queries, built once (``now`` bound at execution).
_PENDING_TRANSFERS = (
    select(
        m.DataTransfer.id,
        m.DataTransfer.origin_location_id,
        m.DataTransfer.destination_location_id,
    )
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
    A transfer whose destination is critical or in emergency (:func:`blocked_destinations`)
    waits PENDING, with no retry charged, until that buffer recovers: sending it would
    only fill the buffer further or fail on a full disk (the primary route already avoids
    such a site; a secondary copy has no other place to go).
    """
    origin_col = m.DataTransfer.origin_location_id
    pending = session.execute(
        scope.restrict(_PENDING_TRANSFERS, origin_col, location_ids), {"now": m.utcnow()}
    ).all()
    if not pending:
        return []
    blocked = blocked_destinations(session, {row[2] for row in pending})
    in_flight = dict(
        session.execute(scope.restrict(_IN_FLIGHT_BY_ORIGIN, origin_col, location_ids)).all()
    )
    slots: dict[int, int] = {}
    claimed: list[tuple[int, int]] = []
    for transfer_id, origin_id, destination_id in pending:
        if destination_id in blocked:
            continue
        if origin_id not in slots:
            origin = session.get(m.DataLocation, origin_id)
            limit = transfer_limit(state_of(origin.name, session), origin)
            slots[origin_id] = max(0, limit - int(in_flight.get(origin_id, 0)))
        if slots[origin_id] <= 0:
            continue
        if claim(
            session,
            m.DataTransfer,
            transfer_id,
            m.DataTransfer.status == m.Status.PENDING,
            status=m.Status.SCHEDULED,
        ):
            slots[origin_id] -= 1
            claimed.append((transfer_id, origin_id))
    return submit_claimed(
        session, claimed, transfer_data_transfer_package, OperationType.DATA_TRANSFER, submit
    )


def blocked_destinations(session: Session, destination_ids: set[int]) -> set[int]:
    """The ids among ``destination_ids`` whose buffer is critical or in emergency now (as
    its buffer manager measured it, or from its capacity): no transfer is sent there.
    Logged once per destination and cycle."""
    locations = session.scalars(
        select(m.DataLocation)
        .where(m.DataLocation.id.in_(destination_ids))
        .order_by(m.DataLocation.id)
    ).all()
    blocked = set()
    for location_id, room in rooms_of(session, locations).items():
        if room.state.under_pressure:
            blocked.add(location_id)
            log.info(
                "transfers_waiting_for_room",
                location=room.location,
                state=room.state.value,
                reason=f"{room.location} is {room.state.value}: transfers to it wait",
            )
    return blocked


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
        if claim(
            session,
            m.DataTransfer,
            transfer_id,
            m.DataTransfer.status == m.Status.COMPLETED,
            m.DataTransfer.unpack_status == m.Status.PENDING,
            unpack_status=m.Status.SCHEDULED,
        ):
            claimed.append((transfer_id, dest_id))
    return submit_claimed(
        session,
        claimed,
        unpack_data_transfer_package,
        OperationType.DATA_TRANSFER_UNPACKING,
        submit,
    )


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
