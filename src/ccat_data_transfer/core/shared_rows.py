"""Rows and queries that several stages build the same way: a site's active BUFFER
locations in priority order, and a PRESENT physical copy row.

Room in the house: core.  Imports :mod:`ccat_ops_db` only; managers and tasks import it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, select

from ccat_ops_db import models as m

__all__ = ["active_site_buffers", "present_copy"]


def active_site_buffers(site_id: int) -> Select[tuple[m.DataLocation]]:
    """The active BUFFER locations of a site, best (lowest priority number) first.  A
    caller adds its own tie-break (``.order_by(...)``) and limit."""
    return (
        select(m.DataLocation)
        .where(
            m.DataLocation.site_id == site_id,
            m.DataLocation.location_type == m.LocationType.BUFFER,
            m.DataLocation.active.is_(True),
        )
        .order_by(m.DataLocation.priority)
    )


def present_copy(
    model: Any, *, data_location_id: int, relative_path: str, size: int, checksum: str, **more: Any
) -> Any:
    """A new ``model`` physical copy row, PRESENT at ``data_location_id``; ``more`` names
    what it is a copy of (``raw_data_file=...``, ``raw_data_package_id=...``) and any other
    column (``verified_at``)."""
    return model(
        data_location_id=data_location_id,
        status=m.PhysicalCopyStatus.PRESENT,
        relative_path=relative_path,
        size=size,
        checksum=checksum,
        **more,
    )
