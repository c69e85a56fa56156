"""Routes of the transfer stage: which sites hold an LTA, which route joins two sites,
and where a transfer on a route lands.

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

Room in the house: topology queries and route decisions for the transfer manager; reads
the database only.  Imports core (exceptions) and ``ccat_ops_db``.
"""

from __future__ import annotations

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from ccat_data_transfer.core.errors import ConfigurationError
from ccat_data_transfer.core.shared_rows import active_site_buffers
from ccat_ops_db import models as m

__all__ = [
    "best_buffer",
    "find_route",
    "first_hop_destination",
    "lta_sites",
    "resolve_destination",
    "source_site_ids",
]

_ROUTE_PREFERENCE = {m.RouteType.CUSTOM: 0, m.RouteType.DIRECT: 1, m.RouteType.RELAY: 2}

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
        active_site_buffers(site_id).order_by(m.DataLocation.name).limit(1)
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
