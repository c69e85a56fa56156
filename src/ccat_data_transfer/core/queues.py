"""Queue names and routing: work runs on a queue per location and operation.

A queue is named ``{site_short_name}_{location_name}_{operation}``; a worker started for
a site or a location discovers from the DB which queues it must consume, so adding a
location needs no code change.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_data_transfer.core.errors import NotFoundError
from ccat_data_transfer.core.operation_types import OperationType
from ccat_ops_db import models as m

# Which operations run where: a worker at a location consumes only these.
OPERATIONS_BY_LOCATION_TYPE: dict[m.LocationType, tuple[OperationType, ...]] = {
    m.LocationType.SOURCE: (
        OperationType.RAW_DATA_PACKAGE_CREATION,
        OperationType.DELETION,
    ),
    m.LocationType.BUFFER: (
        OperationType.DATA_TRANSFER_PACKAGE_CREATION,
        OperationType.DATA_TRANSFER,
        OperationType.DATA_TRANSFER_UNPACKING,
        OperationType.LONG_TERM_ARCHIVE_TRANSFER,
        OperationType.DELETION,
        OperationType.BUFFER_MONITORING,
    ),
    m.LocationType.LONG_TERM_ARCHIVE: (
        OperationType.LONG_TERM_ARCHIVE_TRANSFER,
        OperationType.STAGING,
        OperationType.ARCHIVE_VERIFICATION,
    ),
    m.LocationType.PROCESSING: (
        OperationType.STAGING,
        OperationType.DELETION,
    ),
}


def queue_name(site_short_name: str, location_name: str, operation: OperationType) -> str:
    return f"{site_short_name}_{location_name}_{OperationType(operation).value}"


def route_task_by_location(operation: OperationType, location: m.DataLocation) -> str:
    """The queue on which ``operation`` for ``location`` must run."""
    return queue_name(location.site.short_name, location.name, operation)


def queues_for_location(location: m.DataLocation) -> list[str]:
    ops = OPERATIONS_BY_LOCATION_TYPE.get(location.location_type, ())
    return [route_task_by_location(op, location) for op in ops]


def discover_queues(
    session: Session, site: str | None = None, location: str | None = None
) -> list[str]:
    """Queues a worker for ``site`` (name or short name) or ``location`` should consume.

    With neither, every active location's queues (a single all-in-one worker).
    """
    stmt = select(m.DataLocation).join(m.Site).where(m.DataLocation.active.is_(True))
    if location is not None:
        stmt = stmt.where(m.DataLocation.name == location)
    if site is not None:
        stmt = stmt.where((m.Site.name == site) | (m.Site.short_name == site))
    locations = session.scalars(stmt.order_by(m.DataLocation.name)).all()
    if not locations:
        what = f"location {location!r}" if location else f"site {site!r}" if site else "any"
        raise NotFoundError(f"no active data location for {what}; see `list-locations`")
    queues: list[str] = []
    for loc in locations:
        queues.extend(queues_for_location(loc))
    return queues
