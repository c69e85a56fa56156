"""The dry run: what the next deletion cycle would schedule, with the rule that allows
each deletion, and for every copy kept the rule that keeps it (:func:`deletion_plan`,
the CLI's ``deletion-plan``); and why one copy would or would not go now
(:func:`explain_copy`, the CLI's ``explain``).  Nothing is changed.

Room in the house: the deletion manager's read-only view; imports ``deletion.base``,
``deletion.rules``, ``deletion.candidates``, ``deletion.pressure``, ``deletion.trail``,
config and ``ccat_ops_db``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_data_transfer.core.config import settings
from ccat_data_transfer.deletion.base import IN_FLIGHT, LT, S
from ccat_data_transfer.deletion.candidates import (
    active_locations,
    deletable_package_copies,
    deletion_possible_selection,
    find_deletable_processing_raw_data_files,
    find_deletable_staged_raw_data_files_by_location,
    load_copies,
)
from ccat_data_transfer.deletion.pressure import (
    Statuses,
    cycle_limit,
    get_buffer_status_for_location,
    state_from,
)
from ccat_data_transfer.deletion.rules import (
    decide_copy,
    decide_dtp_copy,
    decide_rdp_copy,
    site_roles,
)
from ccat_data_transfer.deletion.trail import copy_size, thing_of_copy
from ccat_ops_db import models as m


@dataclass
class PlanItem:
    physical_copy_id: int
    copy_type: str
    location: str
    location_type: str
    name: str
    size_bytes: int | None
    status: str
    deletable: bool
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _item(copy: m.PhysicalCopy, deletable: bool, reason: str) -> PlanItem:
    thing = thing_of_copy(copy)
    name = (
        getattr(thing, "file_name", None) or getattr(thing, "relative_path", None) or str(copy.id)
    )
    return PlanItem(
        physical_copy_id=copy.id,
        copy_type=copy.type,
        location=copy.data_location.name,
        location_type=copy.data_location.location_type.name,
        name=str(name),
        size_bytes=copy_size(copy),
        status=copy.status.name,
        deletable=deletable,
        reason=reason,
    )


def deletion_plan(
    session: Session, location_name: str | None = None, max_kept: int | None = 1000
) -> list[PlanItem]:
    """Dry run: every copy the next cycle would schedule (with the rule that allows it) and,
    for copies kept, the rule that keeps them.  Nothing is changed."""
    statuses = Statuses(session)
    roles = site_roles(session)
    items: list[PlanItem] = []
    chosen: set[int] = set()

    def add(copy: m.PhysicalCopy, reason: str) -> None:
        if copy.id not in chosen and (
            location_name is None or copy.data_location.name == location_name
        ):
            chosen.add(copy.id)
            items.append(_item(copy, True, reason))

    for cls, decide in (
        (m.DataTransferPackagePhysicalCopy, decide_dtp_copy),
        (m.RawDataPackagePhysicalCopy, decide_rdp_copy),
    ):
        for _loc, pairs in deletable_package_copies(session, cls, decide, location_name).items():
            for c, d in pairs:
                add(c, d.reason)
    for _loc, copies in find_deletable_processing_raw_data_files(session).items():
        for c in copies:
            add(c, "deletable: no active StagingJob references it")
    for _loc, copies in find_deletable_staged_raw_data_files_by_location(session).items():
        for c in copies:
            add(c, "deletable: STAGED package, all staging jobs inactive")
    for loc in active_locations(session, [LT.SOURCE, LT.BUFFER]):
        if location_name is not None and loc.name != location_name:
            continue
        status = statuses.get(loc)
        cands = deletion_possible_selection(session, loc, status, cycle_limit(state_from(status)))
        for copy in load_copies(session, [c.copy_id for c in cands]):
            reason = next(c.reason for c in cands if c.copy_id == copy.id)
            add(copy, f"deletable: {reason}")

    stmt = (
        select(m.PhysicalCopy)
        .join(m.DataLocation, m.DataLocation.id == m.PhysicalCopy.data_location_id)
        .where(m.PhysicalCopy.status != S.DELETED)
        .order_by(m.DataLocation.name, m.PhysicalCopy.id)
    )
    if location_name is not None:
        stmt = stmt.where(m.DataLocation.name == location_name)
    kept = 0
    for copy in session.scalars(stmt):
        if copy.id in chosen:
            continue
        if max_kept is not None and kept >= max_kept:
            break
        if copy.status in IN_FLIGHT:
            reason = f"in progress: {copy.status.name}"
        elif copy.status == S.DELETION_FAILED:
            reason = (
                f"kept: DELETION_FAILED {copy.deletion_retry_count} time(s) (cap "
                f"{settings.DELETION_MAX_RETRIES}): {copy.last_error or ''}"
            )
        else:
            d = decide_copy(session, copy, roles, statuses.get(copy.data_location))
            reason = (
                d.reason if not d.deletable else "kept: deletable, but beyond this cycle's limits"
            )
        items.append(_item(copy, False, reason))
        kept += 1
    return items


def explain_copy(session: Session, physical_copy_id: int) -> PlanItem | None:
    """Why one copy would or would not be deleted now."""
    copy = session.get(m.PhysicalCopy, physical_copy_id)
    if copy is None:
        return None
    if copy.status == S.DELETED:
        return _item(copy, False, f"already DELETED at {copy.deleted_at}")
    if copy.status in IN_FLIGHT:
        return _item(copy, False, f"in progress: {copy.status.name}")
    d = decide_copy(
        session, copy, None, get_buffer_status_for_location(copy.data_location.name, session)
    )
    return _item(copy, d.deletable, d.reason)
