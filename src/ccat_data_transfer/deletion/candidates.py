"""Deletion candidates: the set-based finders of what may be deleted now, location by
location, oldest first.

* package copies at buffers (:func:`find_deletable_raw_data_packages_by_location`,
  :func:`find_deletable_data_transfer_packages`): an SQL pre-filter, then the rule of
  ``deletion.rules`` per remaining copy;
* raw-file copies at PROCESSING locations (:func:`find_deletable_processing_raw_data_files`,
  :func:`find_deletable_staged_raw_data_files_by_location`);
* stage 2, DELETION_POSSIBLE raw-file copies at SOURCE and BUFFER locations: those past
  their retention, then under pressure the oldest others until the bytes needed are freed
  (:func:`deletion_possible_selection`, :func:`oldest_under_pressure`).

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

from sqlalchemy import (
    DateTime,
    Integer,
    and_,
    bindparam,
    case,
    cast,
    exists,
    null,
    or_,
    select,
    union_all,
)
from sqlalchemy.orm import Session

from ccat_data_transfer.core import scope
from ccat_data_transfer.deletion import base
from ccat_data_transfer.deletion.base import DLT, LT, PCT, S, kept, load_in_order, run, table_alias
from ccat_data_transfer.deletion.claims import Candidate
from ccat_data_transfer.deletion.pressure import (
    Statuses,
    bytes_to_free,
    should_delete_based_on_buffer_status,
)
from ccat_data_transfer.deletion.rule_sql import (
    active_staging_job,
    copy_bytes,
    deletion_possible_candidates,
    exists_per_row,
    lta_copies_awaiting_proof,
    oldest_marked,
    package_copy_may_be_deletable,
    proof_needed,
    raw_file_processing_safe,
    rule_params,
)
from ccat_data_transfer.deletion.rules import (
    Decision,
    decide_dtp_copy,
    decide_rdp_copy,
    retention_minutes,
    site_roles,
    site_roles_from,
)
from ccat_ops_db import models as m


def active_locations(
    session: Session, types: Iterable[m.LocationType], location_ids: list[int] | None = None
) -> list[m.DataLocation]:
    """Active locations of ``types``; with ``location_ids`` only those (a site's scope)."""
    stmt = (
        select(m.DataLocation)
        .where(m.DataLocation.location_type.in_(list(types)), m.DataLocation.active.is_(True))
        .order_by(m.DataLocation.id)
    )
    return list(session.scalars(scope.restrict(stmt, m.DataLocation.id, location_ids)))


@kept
def _package_copies_statement(copy_cls: type[m.PhysicalCopy], named: bool, scoped: bool) -> Any:
    """The ids of the PRESENT copies of ``copy_cls`` at active, unheld SOURCE and BUFFER
    locations that pass the SQL pre-filter, oldest first (parameters ``location_name`` when
    ``named``, ``location_ids`` when ``scoped``)."""
    stmt = (
        select(copy_cls.id)
        .join(m.DataLocation, m.DataLocation.id == copy_cls.data_location_id)
        .where(
            copy_cls.status == S.PRESENT,
            copy_cls.lost_at.is_(None),
            m.DataLocation.active.is_(True),
            m.DataLocation.audit_hold_at.is_(None),
            m.DataLocation.location_type.in_([LT.SOURCE, LT.BUFFER]),
            package_copy_may_be_deletable(copy_cls),
        )
        .order_by(copy_cls.created_at, copy_cls.id)
    )
    if named:
        stmt = stmt.where(m.DataLocation.name == bindparam("location_name"))
    if scoped:
        stmt = stmt.where(copy_cls.data_location_id.in_(bindparam("location_ids", expanding=True)))
    return stmt


def cycle_roles(session: Session, statuses: Statuses | None) -> Any:
    """The site roles, read once per cycle when the cycle's ``statuses`` are given."""
    if statuses is None:
        return site_roles(session)
    if statuses.roles is None:
        statuses.roles = site_roles_from(statuses.site_rows())
    return statuses.roles


def deletable_package_copies(
    session: Session,
    copy_cls: type[m.PhysicalCopy],
    decide: Any,
    location_name: str | None = None,
    location_ids: list[int] | None = None,
    statuses: Statuses | None = None,
) -> dict[m.DataLocation, list[tuple[m.PhysicalCopy, Decision]]]:
    roles = cycle_roles(session, statuses)
    # A site's scope narrows the copies acted on; the rule still sees every site's copies.
    params: dict[str, Any] = {}
    if location_name is not None:
        params["location_name"] = location_name
    if location_ids is not None:
        if not location_ids:
            return {}
        params["location_ids"] = list(location_ids)
    stmt = _package_copies_statement(copy_cls, location_name is not None, location_ids is not None)
    ids = list(dict.fromkeys(r[0] for r in run(session, stmt, params)))
    result: dict[m.DataLocation, list[tuple[m.PhysicalCopy, Decision]]] = defaultdict(list)
    for copy in load_in_order(session, copy_cls, ids):
        decision = decide(session, copy, roles)
        if decision.deletable:
            result[copy.data_location].append((copy, decision))
    return dict(result)


def find_deletable_raw_data_packages_by_location(
    session: Session,
) -> dict[m.DataLocation, list[m.RawDataPackage]]:
    """RawDataPackages that may be deleted now, by location (SOURCE-site and LTA-site
    buffers; never a LONG_TERM_ARCHIVE)."""
    found = deletable_package_copies(session, m.RawDataPackagePhysicalCopy, decide_rdp_copy)
    return {loc: [c.raw_data_package for c, _ in items] for loc, items in found.items()}


def find_deletable_data_transfer_packages(
    session: Session,
) -> list[tuple[m.DataTransferPackage, m.DataLocation]]:
    """(DataTransferPackage, DataLocation) pairs that may be deleted now."""
    found = deletable_package_copies(session, m.DataTransferPackagePhysicalCopy, decide_dtp_copy)
    return [(c.data_transfer_package, loc) for loc, items in found.items() for c, _ in items]


@kept
def _processing_files_statement(
    statuses: tuple[m.PhysicalCopyStatus, ...], limited: bool, of_packages: bool
) -> Any:
    """The statement of :func:`processing_file_ids` (parameters ``location_id``, and
    ``limit`` / ``package_ids`` when ``limited`` / ``of_packages``)."""
    pc = table_alias(PCT, "f_pc")
    rdf = m.RawDataFile.__table__
    stmt = (
        select(pc.c.id, copy_bytes(pc, rdf))
        .join(rdf, rdf.c.id == pc.c.raw_data_file_id)
        .where(
            pc.c.type == base.COPY_TYPE_RAW_DATA_FILE,
            pc.c.data_location_id == bindparam("location_id"),
            pc.c.status.in_(list(statuses)),
            pc.c.lost_at.is_(None),
            *(
                [rdf.c.raw_data_package_id.in_(bindparam("package_ids", expanding=True))]
                if of_packages
                else []
            ),
            raw_file_processing_safe(pc),
        )
        .order_by(pc.c.created_at, pc.c.id)
    )
    return stmt.limit(bindparam("limit")) if limited else stmt


def processing_file_ids(
    session: Session,
    location: m.DataLocation,
    statuses: Iterable[m.PhysicalCopyStatus],
    limit: int | None,
    package_ids: Sequence[int] | None = None,
) -> list[tuple[int, int | None]]:
    """(id, size) of the raw-file copies at a PROCESSING location in ``statuses`` that the
    PROCESSING rule allows (:func:`raw_file_processing_safe`), oldest first; with
    ``package_ids`` only files of those packages."""
    params: dict[str, Any] = {"location_id": location.id}
    if limit is not None:
        params["limit"] = limit
    if package_ids:
        params["package_ids"] = list(package_ids)
    stmt = _processing_files_statement(tuple(statuses), limit is not None, bool(package_ids))
    return [(r[0], r[1]) for r in run(session, stmt, params)]


def find_deletable_processing_raw_data_files(
    session: Session, limit: int | None = None
) -> dict[m.DataLocation, list[m.RawDataFilePhysicalCopy]]:
    """PRESENT raw-file copies at PROCESSING locations that no active StagingJob uses."""
    result: dict[m.DataLocation, list[m.RawDataFilePhysicalCopy]] = {}
    for loc in active_locations(session, [LT.PROCESSING]):
        ids = [i for i, _ in processing_file_ids(session, loc, [S.PRESENT], limit)]
        if ids:
            result[loc] = load_copies(session, ids)
    return result


def load_copies(session: Session, ids: Sequence[int]) -> list[Any]:
    copies = session.scalars(select(m.PhysicalCopy).where(m.PhysicalCopy.id.in_(list(ids)))).all()
    order = {i: n for n, i in enumerate(ids)}
    return sorted(copies, key=lambda c: order[c.id])


@kept
def _staged_copies_statement() -> Any:
    """The ids of :func:`staged_package_copies` (parameter ``location_id``)."""
    copy = m.RawDataPackagePhysicalCopy
    location_id = bindparam("location_id")
    return select(copy.id).where(
        copy.data_location_id == location_id,
        copy.status == S.STAGED,
        ~active_staging_job(copy.raw_data_package_id, location_id),
    )


def staged_package_copies(
    session: Session, location: m.DataLocation
) -> list[m.RawDataPackagePhysicalCopy]:
    """STAGED package copies at a PROCESSING location whose staging jobs are all inactive."""
    ids = [r[0] for r in run(session, _staged_copies_statement(), {"location_id": location.id})]
    return load_in_order(session, m.RawDataPackagePhysicalCopy, ids)


def staged_file_ids(
    session: Session, location: m.DataLocation, package_ids: Sequence[int], limit: int | None
) -> list[tuple[int, int | None]]:
    """(id, size) of the PRESENT or STAGED raw-file copies of these STAGED packages."""
    if not package_ids:
        return []
    return processing_file_ids(session, location, [S.PRESENT, S.STAGED], limit, package_ids)


def find_deletable_staged_raw_data_files_by_location(
    session: Session, limit: int | None = None
) -> dict[m.DataLocation, list[m.RawDataFilePhysicalCopy]]:
    """Raw-file copies of STAGED packages at PROCESSING locations whose staging jobs are all
    inactive (``active=False``): 1. find STAGED package copies, 2. check every staging job
    for them at that location is inactive, 3. collect their file copies for bulk deletion."""
    result: dict[m.DataLocation, list[m.RawDataFilePhysicalCopy]] = {}
    for loc in active_locations(session, [LT.PROCESSING]):
        staged = staged_package_copies(session, loc)
        ids = [
            i
            for i, _ in staged_file_ids(
                session, loc, [c.raw_data_package_id for c in staged], limit
            )
        ]
        if ids:
            result[loc] = load_copies(session, ids)
    return result


#: Reason and code of a stage-2 copy whose retention has expired.
EXPIRED = ("parent package archived; retention expired", "parent_package_archived")


def retention_cutoff(location: m.DataLocation) -> datetime:
    """Copies marked DELETION_POSSIBLE at or before this time are past their retention."""
    return m.utcnow() - timedelta(minutes=retention_minutes(location))


@kept
def _oldest_marked_statement(n: int) -> Any:
    return select(*(oldest_marked(bindparam(f"location_{i}")) for i in range(n)))


def locations_with_expired(session: Session, cutoffs: dict[int, datetime]) -> set[int]:
    """Of these locations (id: retention cutoff), those holding a DELETION_POSSIBLE raw-file
    copy marked at or before their cutoff: one statement, one index probe per location
    (:func:`~ccat_data_transfer.deletion.rule_sql.oldest_marked`)."""
    if not cutoffs:
        return set()
    ids = list(cutoffs)
    params = {f"location_{i}": loc_id for i, loc_id in enumerate(ids)}
    oldest = run(session, _oldest_marked_statement(len(ids)), params).one()
    return {i for i, t in zip(ids, oldest, strict=True) if t is not None and t <= cutoffs[i]}


def oldest_under_pressure(
    session: Session, location: m.DataLocation, cutoff: datetime, needed: int, room: int | None
) -> list[Candidate]:
    """Under pressure: the DELETION_POSSIBLE copies still in retention (marked after
    ``cutoff``), oldest first, until ``needed`` bytes are covered or ``room`` copies (None:
    no cap) are taken."""
    others: list[Candidate] = []
    if needed <= 0 or (room is not None and room <= 0):
        return others
    others_stmt = deletion_possible_candidates(location.id, retained_after=cutoff)
    if room is not None:
        others_stmt = others_stmt.limit(room)
    for r in session.execute(others_stmt):
        if needed <= 0 or (room is not None and len(others) >= room):
            break
        others.append(
            Candidate(
                r.id,
                base.COPY_TYPE_RAW_DATA_FILE,
                r.size,
                f"buffer pressure at {location.name}: oldest DELETION_POSSIBLE first",
                "buffer_pressure",
            )
        )
        needed -= r.size or 0
    return others


def deletion_possible_selection(
    session: Session, location: m.DataLocation, status: dict[str, Any], limit: int | None
) -> list[Candidate]:
    """DELETION_POSSIBLE raw-file copies at ``location`` to delete now: those past their
    retention, then - under pressure - the oldest others until the bytes needed are freed."""
    cutoff = retention_cutoff(location)
    expired = deletion_possible_candidates(location.id, expired_before=cutoff)
    if limit is not None:
        expired = expired.limit(limit)
    chosen = [
        Candidate(r.id, base.COPY_TYPE_RAW_DATA_FILE, r.size, *EXPIRED)
        for r in session.execute(expired)
    ]
    if not should_delete_based_on_buffer_status(location, status):
        return chosen
    needed = bytes_to_free(session, location, status) - sum(c.size or 0 for c in chosen)
    room = None if limit is None else limit - len(chosen)
    return chosen + oldest_under_pressure(session, location, cutoff, needed, room)


def lta_copies_to_verify(
    session: Session, statuses: Any, location_ids: list[int] | None = None
) -> list[tuple[int, bool]]:
    """The LTA copies whose verification would let waiting deletions go, in one query
    (``rule_sql.lta_copies_awaiting_proof``), each with whether it needs a full read
    (never read back since written) or a stat: those of the packages whose PRESENT copies
    at SOURCE and BUFFER locations, or whose DELETION_POSSIBLE raw-file copies past their
    retention (all of them at a location under pressure), wait only for proof - and an
    LTA-site buffer's own site's archive copy, whatever the other archives hold.
    Locations under an audit hold, frozen packages and lost copies ask for nothing."""
    locations = [
        loc
        for loc in statuses.locations([LT.SOURCE, LT.BUFFER], location_ids)
        if loc.audit_hold_at is None
    ]
    if not locations:
        return []
    pressure = tuple(should_delete_based_on_buffer_status(x, statuses.get(x)) for x in locations)
    params = rule_params()
    for x, pressed in zip(locations, pressure, strict=True):
        if not pressed:
            params[f"cutoff_{x.id}"] = retention_cutoff(x)
    stmt = _to_verify_statement(tuple(x.id for x in locations), pressure)
    return [(int(i), bool(full)) for i, full in run(session, stmt, params)]


@kept
def _to_verify_statement(location_ids: tuple[int, ...], pressure: tuple[bool, ...]) -> Any:
    """The statement of :func:`lta_copies_to_verify` for these SOURCE and BUFFER locations,
    each under pressure or not (parameters: ``rule_params`` and ``cutoff_<id>`` of each
    location not under pressure)."""
    rdp = table_alias(m.RawDataPackage.__table__, "w_rdp")
    rdf = table_alias(m.RawDataFile.__table__, "w_rdf")
    pc = table_alias(PCT, "w_pc")
    loc = table_alias(DLT, "w_loc")

    lta_here = table_alias(DLT, "w_lta_here")
    # An LTA-site buffer's package copy also needs its own site's archive proof.
    own_site = case(
        (
            and_(
                loc.c.location_type == LT.BUFFER,
                exists()
                .where(
                    lta_here.c.site_id == loc.c.site_id,
                    lta_here.c.location_type == LT.LONG_TERM_ARCHIVE,
                )
                .correlate_except(lta_here),
            ),
            loc.c.site_id,
        ),
        else_=null(),
    )

    def waiting(pkg: Any, copy_type: str, status: m.PhysicalCopyStatus, site: Any) -> Any:
        """(package, its proofs needed, the site whose own archive must prove it) of the
        copies of one kind in one state."""
        return (
            select(pkg.label("pkg"), proof_needed(loc).label("need"), site.label("site"))
            .select_from(pc)
            .join(loc, loc.c.id == pc.c.data_location_id)
            .where(pc.c.type == copy_type, pc.c.status == status, pc.c.lost_at.is_(None))
        )

    # Frozen is checked per copy (by key): a join may hash every package (the history).
    frozen = exists_per_row(
        [rdp.c.id == pc.c.raw_data_package_id, rdp.c.frozen_at.is_not(None)], rdp, per_row=True
    )
    packages = waiting(
        pc.c.raw_data_package_id, base.COPY_TYPE_RAW_DATA_PACKAGE, S.PRESENT, own_site
    ).where(pc.c.data_location_id.in_(list(location_ids)), ~frozen)
    windows = [
        pc.c.data_location_id == loc_id
        if pressed
        else and_(
            pc.c.data_location_id == loc_id,
            pc.c.deletion_possible_at <= bindparam(f"cutoff_{loc_id}", type_=DateTime),
        )
        for loc_id, pressed in zip(location_ids, pressure, strict=True)
    ]
    files = (
        waiting(
            rdf.c.raw_data_package_id,
            base.COPY_TYPE_RAW_DATA_FILE,
            S.DELETION_POSSIBLE,
            cast(null(), Integer),
        )
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
    return lta_copies_awaiting_proof(union_all(packages, files))
