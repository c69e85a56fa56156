"""Deletion candidates: the set-based finders of what may be deleted now, location by
location, oldest first.

* package copies at buffers (:func:`find_deletable_raw_data_packages_by_location`,
  :func:`find_deletable_data_transfer_packages`): an SQL pre-filter, then the rule of
  ``deletion.rules`` per remaining copy;
* raw-file copies at PROCESSING locations (:func:`find_deletable_processing_raw_data_files`,
  :func:`find_deletable_staged_raw_data_files_by_location`);
* stage 2, DELETION_POSSIBLE raw-file copies at SOURCE and BUFFER locations: those past
  their retention, then under pressure the oldest others until the bytes needed are freed
  (:func:`_deletion_possible_selection`, :func:`_oldest_under_pressure`).

The SQL of each rule is in ``deletion.rule_sql``; nothing here changes the database.

Room in the house: the deletion manager's finders; imports ``deletion.base``,
``deletion.rule_sql``, ``deletion.rules``, ``deletion.pressure``, ``deletion.claims``
(the candidate record), ``scope`` and ``ccat_ops_db``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select, union_all
from sqlalchemy.orm import Session

from ccat_data_transfer import scope
from ccat_data_transfer.deletion import base
from ccat_data_transfer.deletion.base import DLT, LT, PCT, S, _alias
from ccat_data_transfer.deletion.claims import _Candidate
from ccat_data_transfer.deletion.pressure import (
    bytes_to_free,
    should_delete_based_on_buffer_status,
)
from ccat_data_transfer.deletion.rule_sql import (
    _active_staging_job,
    _package_copy_may_be_deletable,
    _proof_needed,
    _raw_file_processing_safe,
    copy_bytes,
    deletion_possible_candidates,
    lta_copies_awaiting_proof,
)
from ccat_data_transfer.deletion.rules import (
    Decision,
    _decide_dtp_copy,
    _decide_rdp_copy,
    _retention_minutes,
    site_roles,
)
from ccat_ops_db import models as m


def _active_locations(
    session: Session, types: Iterable[m.LocationType], location_ids: list[int] | None = None
) -> list[m.DataLocation]:
    """Active locations of ``types``; with ``location_ids`` only those (a site's scope)."""
    stmt = (
        select(m.DataLocation)
        .where(m.DataLocation.location_type.in_(list(types)), m.DataLocation.active.is_(True))
        .order_by(m.DataLocation.id)
    )
    return list(session.scalars(scope.restrict(stmt, m.DataLocation.id, location_ids)))


def _deletable_package_copies(
    session: Session,
    copy_cls: type[m.PhysicalCopy],
    decide: Any,
    location_name: str | None = None,
    location_ids: list[int] | None = None,
) -> dict[m.DataLocation, list[tuple[m.PhysicalCopy, Decision]]]:
    roles = site_roles(session)
    stmt = (
        select(copy_cls)
        .join(m.DataLocation, m.DataLocation.id == copy_cls.data_location_id)
        .where(
            copy_cls.status == S.PRESENT,
            copy_cls.lost_at.is_(None),
            m.DataLocation.active.is_(True),
            m.DataLocation.audit_hold_at.is_(None),
            m.DataLocation.location_type.in_([LT.SOURCE, LT.BUFFER]),
            _package_copy_may_be_deletable(copy_cls),
        )
        .order_by(copy_cls.created_at, copy_cls.id)
    )
    if location_name is not None:
        stmt = stmt.where(m.DataLocation.name == location_name)
    # A site's scope narrows the copies acted on; the rule still sees every site's copies.
    stmt = scope.restrict(stmt, copy_cls.data_location_id, location_ids)
    result: dict[m.DataLocation, list[tuple[m.PhysicalCopy, Decision]]] = defaultdict(list)
    for copy in session.scalars(stmt).unique():
        decision = decide(session, copy, roles)
        if decision.deletable:
            result[copy.data_location].append((copy, decision))
    return dict(result)


def find_deletable_raw_data_packages_by_location(
    session: Session,
) -> dict[m.DataLocation, list[m.RawDataPackage]]:
    """RawDataPackages that may be deleted now, by location (SOURCE-site and LTA-site
    buffers; never a LONG_TERM_ARCHIVE)."""
    found = _deletable_package_copies(session, m.RawDataPackagePhysicalCopy, _decide_rdp_copy)
    return {loc: [c.raw_data_package for c, _ in items] for loc, items in found.items()}


def find_deletable_data_transfer_packages(
    session: Session,
) -> list[tuple[m.DataTransferPackage, m.DataLocation]]:
    """(DataTransferPackage, DataLocation) pairs that may be deleted now."""
    found = _deletable_package_copies(session, m.DataTransferPackagePhysicalCopy, _decide_dtp_copy)
    return [(c.data_transfer_package, loc) for loc, items in found.items() for c, _ in items]


def _processing_file_ids(
    session: Session,
    location: m.DataLocation,
    statuses: Iterable[m.PhysicalCopyStatus],
    limit: int | None,
    package_ids: Sequence[int] | None = None,
) -> list[tuple[int, int | None]]:
    """(id, size) of the raw-file copies at a PROCESSING location in ``statuses`` that the
    PROCESSING rule allows (:func:`_raw_file_processing_safe`), oldest first; with
    ``package_ids`` only files of those packages."""
    pc = _alias(PCT, "f_pc")
    rdf = m.RawDataFile.__table__
    stmt = (
        select(pc.c.id, copy_bytes(pc, rdf))
        .join(rdf, rdf.c.id == pc.c.raw_data_file_id)
        .where(
            pc.c.type == base.COPY_TYPE_RAW_DATA_FILE,
            pc.c.data_location_id == location.id,
            pc.c.status.in_(list(statuses)),
            pc.c.lost_at.is_(None),
            *([rdf.c.raw_data_package_id.in_(list(package_ids))] if package_ids else []),
            _raw_file_processing_safe(pc),
        )
        .order_by(pc.c.created_at, pc.c.id)
    )
    if limit is not None:
        stmt = stmt.limit(limit)
    return [(r[0], r[1]) for r in session.execute(stmt)]


def find_deletable_processing_raw_data_files(
    session: Session, limit: int | None = None
) -> dict[m.DataLocation, list[m.RawDataFilePhysicalCopy]]:
    """PRESENT raw-file copies at PROCESSING locations that no active StagingJob uses."""
    result: dict[m.DataLocation, list[m.RawDataFilePhysicalCopy]] = {}
    for loc in _active_locations(session, [LT.PROCESSING]):
        ids = [i for i, _ in _processing_file_ids(session, loc, [S.PRESENT], limit)]
        if ids:
            result[loc] = _load_copies(session, ids)
    return result


def _load_copies(session: Session, ids: Sequence[int]) -> list[Any]:
    copies = session.scalars(select(m.PhysicalCopy).where(m.PhysicalCopy.id.in_(list(ids)))).all()
    order = {i: n for n, i in enumerate(ids)}
    return sorted(copies, key=lambda c: order[c.id])


def _staged_package_copies(
    session: Session, location: m.DataLocation
) -> list[m.RawDataPackagePhysicalCopy]:
    """STAGED package copies at a PROCESSING location whose staging jobs are all inactive."""
    copy = m.RawDataPackagePhysicalCopy
    return list(
        session.scalars(
            select(copy).where(
                copy.data_location_id == location.id,
                copy.status == S.STAGED,
                ~_active_staging_job(copy.raw_data_package_id, location.id),
            )
        )
    )


def _staged_file_ids(
    session: Session, location: m.DataLocation, package_ids: Sequence[int], limit: int | None
) -> list[tuple[int, int | None]]:
    """(id, size) of the PRESENT or STAGED raw-file copies of these STAGED packages."""
    if not package_ids:
        return []
    return _processing_file_ids(session, location, [S.PRESENT, S.STAGED], limit, package_ids)


def find_deletable_staged_raw_data_files_by_location(
    session: Session, limit: int | None = None
) -> dict[m.DataLocation, list[m.RawDataFilePhysicalCopy]]:
    """Raw-file copies of STAGED packages at PROCESSING locations whose staging jobs are all
    inactive (``active=False``): 1. find STAGED package copies, 2. check every staging job
    for them at that location is inactive, 3. collect their file copies for bulk deletion."""
    result: dict[m.DataLocation, list[m.RawDataFilePhysicalCopy]] = {}
    for loc in _active_locations(session, [LT.PROCESSING]):
        staged = _staged_package_copies(session, loc)
        ids = [
            i
            for i, _ in _staged_file_ids(
                session, loc, [c.raw_data_package_id for c in staged], limit
            )
        ]
        if ids:
            result[loc] = _load_copies(session, ids)
    return result


#: Reason and code of a stage-2 copy whose retention has expired.
EXPIRED = ("parent package archived; retention expired", "parent_package_archived")


def _retention_cutoff(location: m.DataLocation) -> datetime:
    """Copies marked DELETION_POSSIBLE at or before this time are past their retention."""
    return m.utcnow() - timedelta(minutes=_retention_minutes(location))


def _oldest_under_pressure(
    session: Session, location: m.DataLocation, cutoff: datetime, needed: int, room: int | None
) -> list[_Candidate]:
    """Under pressure: the DELETION_POSSIBLE copies still in retention (marked after
    ``cutoff``), oldest first, until ``needed`` bytes are covered or ``room`` copies (None:
    no cap) are taken."""
    others: list[_Candidate] = []
    if needed <= 0 or (room is not None and room <= 0):
        return others
    for r in session.execute(deletion_possible_candidates(location.id, retained_after=cutoff)):
        if needed <= 0 or (room is not None and len(others) >= room):
            break
        others.append(
            _Candidate(
                r.id,
                base.COPY_TYPE_RAW_DATA_FILE,
                r.size,
                f"buffer pressure at {location.name}: oldest DELETION_POSSIBLE first",
                "buffer_pressure",
            )
        )
        needed -= r.size or 0
    return others


def _deletion_possible_selection(
    session: Session, location: m.DataLocation, status: dict[str, Any], limit: int | None
) -> list[_Candidate]:
    """DELETION_POSSIBLE raw-file copies at ``location`` to delete now: those past their
    retention, then - under pressure - the oldest others until the bytes needed are freed."""
    cutoff = _retention_cutoff(location)
    expired = deletion_possible_candidates(location.id, expired_before=cutoff)
    if limit is not None:
        expired = expired.limit(limit)
    chosen = [
        _Candidate(r.id, base.COPY_TYPE_RAW_DATA_FILE, r.size, *EXPIRED)
        for r in session.execute(expired)
    ]
    if not should_delete_based_on_buffer_status(location, status):
        return chosen
    needed = bytes_to_free(session, location, status) - sum(c.size or 0 for c in chosen)
    room = None if limit is None else limit - len(chosen)
    return chosen + _oldest_under_pressure(session, location, cutoff, needed, room)


def lta_copies_to_verify(
    session: Session, statuses: Any, location_ids: list[int] | None = None
) -> list[int]:
    """The LTA copies whose verification would let waiting deletions go, in one query
    (``rule_sql.lta_copies_awaiting_proof``): those of the packages whose PRESENT copies at
    SOURCE and BUFFER locations, or whose DELETION_POSSIBLE raw-file copies past their
    retention (all of them at a location under pressure), wait only for a fresh proof.
    Locations under an audit hold, frozen packages and lost copies ask for nothing."""
    locations = [
        loc
        for loc in _active_locations(session, [LT.SOURCE, LT.BUFFER], location_ids)
        if loc.audit_hold_at is None
    ]
    if not locations:
        return []
    rdp = _alias(m.RawDataPackage.__table__, "w_rdp")
    rdf = _alias(m.RawDataFile.__table__, "w_rdf")
    pc = _alias(PCT, "w_pc")
    loc = _alias(DLT, "w_loc")

    def waiting(pkg: Any, copy_type: str, status: m.PhysicalCopyStatus) -> Any:
        """(package, its proofs needed) of the copies of one kind in one state."""
        return (
            select(pkg.label("pkg"), _proof_needed(loc).label("need"))
            .select_from(pc)
            .join(loc, loc.c.id == pc.c.data_location_id)
            .where(pc.c.type == copy_type, pc.c.status == status, pc.c.lost_at.is_(None))
        )

    packages = (
        waiting(pc.c.raw_data_package_id, base.COPY_TYPE_RAW_DATA_PACKAGE, S.PRESENT)
        .join(rdp, rdp.c.id == pc.c.raw_data_package_id)
        .where(pc.c.data_location_id.in_([x.id for x in locations]), rdp.c.frozen_at.is_(None))
    )
    windows = []
    for x in locations:
        if should_delete_based_on_buffer_status(x, statuses.get(x)):
            windows.append(pc.c.data_location_id == x.id)
        else:
            cutoff = _retention_cutoff(x)
            windows.append(and_(pc.c.data_location_id == x.id, pc.c.deletion_possible_at <= cutoff))
    files = (
        waiting(rdf.c.raw_data_package_id, base.COPY_TYPE_RAW_DATA_FILE, S.DELETION_POSSIBLE)
        .join(rdf, rdf.c.id == pc.c.raw_data_file_id)
        .join(rdp, rdp.c.id == rdf.c.raw_data_package_id)
        .where(
            pc.c.deletion_possible_at.is_not(None),
            or_(*windows),
            rdp.c.state == m.PackageState.ARCHIVED,
            rdp.c.frozen_at.is_(None),
        )
        .distinct()
    )
    return list(session.scalars(lta_copies_awaiting_proof(union_all(packages, files))))
