"""Deletion manager: removes temporary copies when, and only when, it is provably safe.

This module is the user's lifecycle document turned into code, rule for rule:

* the decision functions (``can_delete_*``, ``decide_copy``) say whether one copy may go
  and why (a :class:`Decision` with a reason a person can read);
* the finders (``find_deletable_*``) collect what may go now, with set-based queries;
* the scheduling steps (``delete_*``) claim candidates atomically in batches
  (``UPDATE ... WHERE id IN (...) AND status IN (<expected>)``), commit, then submit one
  Celery task per batch per location on ``route_task_by_location(DELETION, location)``;
* the tasks (``delete_physical_copy``, ``delete_bulk_*``) re-check the rule against the DB
  before touching storage, delete, and record the outcome (``DELETED`` with
  ``deleted_at``, or ``DELETION_FAILED`` to be retried by a later cycle up to
  ``DELETION_MAX_RETRIES``).

Copies move PRESENT -> DELETION_SCHEDULED -> DELETION_IN_PROGRESS -> DELETED (raw files at
SOURCE/BUFFER: PRESENT -> DELETION_POSSIBLE -> DELETION_SCHEDULED -> ...).  Rows are never
removed; every decision goes to the ``deletion_log`` table and to the JSON log.

Nothing is ever deleted automatically from a LONG_TERM_ARCHIVE location: the finders never
select such copies and the worker refuses them as a last guard.
"""

from __future__ import annotations

import functools
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from celery import Task
from sqlalchemy import (
    BigInteger,
    and_,
    any_,
    bindparam,
    exists,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session, joinedload
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.visitors import InternalTraversal

from ccat_data_transfer import buffer_status as bs
from ccat_data_transfer import scope
from ccat_data_transfer.celery_app import app
from ccat_data_transfer.config.config import settings
from ccat_data_transfer.database import DatabaseConnection, is_postgresql
from ccat_data_transfer.exceptions import RetryableError
from ccat_data_transfer.logging_utils import configure_logging, get_logger
from ccat_data_transfer.operation_types import OperationType
from ccat_data_transfer.queue_discovery import route_task_by_location
from ccat_ops_db import models as m

log = get_logger(__name__)

S = m.PhysicalCopyStatus
LT = m.LocationType
PCT = m.PhysicalCopy.__table__
DLT = m.DataLocation.__table__


@functools.cache
def _alias(table: Any, name: str) -> Any:
    """A named alias of a table, built once: building an alias proxies every column, which
    cost about as much as the SQL of an idle cycle when done anew in every query."""
    return table.alias(name)


#: Copy states that mean "a deletion is under way".
IN_FLIGHT = (S.DELETION_SCHEDULED, S.DELETION_IN_PROGRESS)
#: States the worker accepts: scheduled (normal), in progress (redelivered after a crash).
WORKER_ACCEPTS = (S.DELETION_SCHEDULED, S.DELETION_IN_PROGRESS)
_MAX_BATCHES_PER_CYCLE = 10

COPY_TYPE_RAW_DATA_FILE = "raw_data_file"
COPY_TYPE_RAW_DATA_PACKAGE = "raw_data_package"
COPY_TYPE_DATA_TRANSFER_PACKAGE = "data_transfer_package"


# ---------------------------------------------------------------------------------------
# Decisions
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """Whether one copy may be deleted now, and the rule that says so."""

    deletable: bool
    reason: str
    code: str = ""

    def __bool__(self) -> bool:
        return self.deletable


def _keep(reason: str, code: str = "kept") -> Decision:
    return Decision(False, f"kept: {reason}", code)


def _delete(reason: str, code: str) -> Decision:
    return Decision(True, f"deletable: {reason}", code)


@dataclass
class SiteRoles:
    """Which sites are source sites and which are LTA sites (from the topology in the DB)."""

    source_site_ids: set[int] = field(default_factory=set)
    lta_site_ids: set[int] = field(default_factory=set)
    # Sites with an active LTA location on an active site: the replication targets.
    active_lta_site_ids: set[int] = field(default_factory=set)
    site_names: dict[int, str] = field(default_factory=dict)


def site_roles(session: Session) -> SiteRoles:
    roles = SiteRoles()
    rows = session.execute(
        select(
            m.DataLocation.site_id,
            m.DataLocation.location_type,
            m.DataLocation.active,
            m.Site.active,
            m.Site.name,
        ).join(m.Site, m.Site.id == m.DataLocation.site_id)
    ).all()
    for site_id, ltype, loc_active, site_active, site_name in rows:
        roles.site_names[site_id] = site_name
        if ltype == LT.SOURCE:
            roles.source_site_ids.add(site_id)
        elif ltype == LT.LONG_TERM_ARCHIVE:
            roles.lta_site_ids.add(site_id)
            if loc_active and site_active:
                roles.active_lta_site_ids.add(site_id)
    return roles


def _is_source_site_location(location: m.DataLocation, roles: SiteRoles) -> bool:
    return (
        location.location_type in (LT.SOURCE, LT.BUFFER)
        and location.site_id in roles.source_site_ids
    )


def _is_lta_site_buffer(location: m.DataLocation, roles: SiteRoles) -> bool:
    return location.location_type == LT.BUFFER and location.site_id in roles.lta_site_ids


def _per_row(conds: list[Any], *own: Any, per_row: bool = False) -> Any:
    """``EXISTS (SELECT 1 WHERE conds)``, correlated to everything but ``own``.  With
    ``per_row``, ``OFFSET 0`` keeps PostgreSQL from flattening it into a join that starts
    from the other side (every LTA copy, every transfer: the history); it is then checked
    once per outer row, by index, so its cost follows the rows asked about."""
    sub = select(literal(1)).where(*conds).correlate_except(*own)
    if per_row:
        sub = sub.offset(0)
    return sub.exists()


def _lta_present_exists(
    package_id_col: Any, same_site_id: Any = None, per_row: bool = False
) -> Any:
    """SQL: the package has a PRESENT, not-lost copy at an active LONG_TERM_ARCHIVE location
    (optionally at a given site).  An LTA-site BUFFER does not count.  ``per_row``: see
    :func:`_per_row`."""
    lpc = _alias(PCT, "lta_pc")
    lloc = _alias(DLT, "lta_loc")
    conds = [
        lpc.c.raw_data_package_id == package_id_col,
        lpc.c.type == COPY_TYPE_RAW_DATA_PACKAGE,
        lpc.c.status == S.PRESENT,
        lpc.c.lost_at.is_(None),
        lloc.c.id == lpc.c.data_location_id,
        lloc.c.location_type == LT.LONG_TERM_ARCHIVE,
        lloc.c.active.is_(True),
    ]
    if same_site_id is not None:
        conds.append(lloc.c.site_id == same_site_id)
    return _per_row(conds, lpc, lloc, per_row=per_row)


def _lta_copies_of_package(session: Session, package_id: int) -> list[m.RawDataPackagePhysicalCopy]:
    return list(
        session.scalars(
            select(m.RawDataPackagePhysicalCopy)
            .join(
                m.DataLocation, m.DataLocation.id == m.RawDataPackagePhysicalCopy.data_location_id
            )
            .where(
                m.RawDataPackagePhysicalCopy.raw_data_package_id == package_id,
                m.DataLocation.location_type == LT.LONG_TERM_ARCHIVE,
            )
            .order_by(m.RawDataPackagePhysicalCopy.id)
        )
    )


def _usable_lta_copy(copy: m.PhysicalCopy) -> bool:
    return copy.status == S.PRESENT and copy.lost_at is None and copy.data_location.active


def _describe_copy(copy: m.PhysicalCopy) -> str:
    text = f"{copy.data_location.name} copy is {copy.status.name}"
    if copy.lost_at is not None:
        text += " and marked lost"
    elif not copy.data_location.active:
        text += " at an inactive location"
    return text


def _no_lta_detail(
    session: Session, package_id: int, lta_copies: list[Any], site_id: int | None
) -> str:
    if lta_copies:
        return "; ".join(_describe_copy(c) for c in lta_copies)
    others = session.scalars(
        select(m.RawDataPackagePhysicalCopy).where(
            m.RawDataPackagePhysicalCopy.raw_data_package_id == package_id,
            m.RawDataPackagePhysicalCopy.status != S.DELETED,
        )
    ).all()
    where = ", ".join(
        f"{c.data_location.name} ({c.data_location.location_type.name}, {c.status.name})"
        for c in others
    )
    scope = "at this site " if site_id is not None else ""
    return f"no copy {scope}at any LONG_TERM_ARCHIVE; copies: {where or 'none'}"


def _decide_rdp_source(
    session: Session, package: m.RawDataPackage, location: m.DataLocation, roles: SiteRoles
) -> Decision:
    if not _is_source_site_location(location, roles):
        return _keep(f"{location.name} is not a BUFFER (or SOURCE) at a source site")
    lta = _lta_copies_of_package(session, package.id)
    present = [c for c in lta if _usable_lta_copy(c)]
    if not present:
        detail = _no_lta_detail(session, package.id, lta, None)
        return _keep(f"no PRESENT copy at a LONG_TERM_ARCHIVE location ({detail})", "no_lta_copy")
    if package.state != m.PackageState.ARCHIVED:
        return _keep(
            f"package state is {package.state.name}, not ARCHIVED (source data is deleted "
            "only when ARCHIVED)",
            "not_archived",
        )
    names = ", ".join(c.data_location.name for c in present)
    return _delete(f"ARCHIVED and PRESENT at LONG_TERM_ARCHIVE {names}", "archived_in_lta")


def _decide_rdp_lta_buffer(
    session: Session, package: m.RawDataPackage, location: m.DataLocation, roles: SiteRoles
) -> Decision:
    if not _is_lta_site_buffer(location, roles):
        return _keep(f"{location.name} is not a BUFFER at an LTA site")
    lta = [
        c
        for c in _lta_copies_of_package(session, package.id)
        if c.data_location.site_id == location.site_id
    ]
    present = [c for c in lta if _usable_lta_copy(c)]
    if not present:
        detail = _no_lta_detail(session, package.id, lta, location.site_id)
        site = roles.site_names.get(location.site_id, "?")
        return _keep(
            f"no PRESENT copy at the LONG_TERM_ARCHIVE of the same site {site} ({detail})",
            "no_same_site_lta_copy",
        )
    names = ", ".join(c.data_location.name for c in present)
    return _delete(f"PRESENT at the same site's LONG_TERM_ARCHIVE {names}", "same_site_lta_present")


def decide_raw_data_package(
    session: Session,
    package: m.RawDataPackage,
    location: m.DataLocation,
    roles: SiteRoles | None = None,
) -> Decision:
    """The deletion rule for a RawDataPackage copy at ``location``."""
    roles = roles or site_roles(session)
    ltype = location.location_type
    if ltype == LT.LONG_TERM_ARCHIVE:
        return _keep(
            f"{location.name} is a LONG_TERM_ARCHIVE: permanent storage, never deleted "
            "automatically",
            "long_term_archive",
        )
    if ltype == LT.PROCESSING:
        return _keep(
            "RawDataPackages at a PROCESSING location are cleaned up through the STAGED rule",
            "processing_package",
        )
    at_source = _is_source_site_location(location, roles)
    at_lta_site = _is_lta_site_buffer(location, roles)
    return _both_site_rules(
        location,
        at_source and (lambda: _decide_rdp_source(session, package, location, roles)),
        at_lta_site and (lambda: _decide_rdp_lta_buffer(session, package, location, roles)),
    )


def _both_site_rules(location: m.DataLocation, source_rule: Any, lta_rule: Any) -> Decision:
    """A location at a source site and/or an LTA site: every rule that applies must allow
    the deletion; the first one that keeps the copy gives the reason.  A falsy rule does not
    apply; a callable rule is evaluated only when it applies."""
    rules = [rule for rule in (source_rule, lta_rule) if rule]
    if not rules:
        return _keep(
            f"no rule deletes from {location.name} (neither a source-site nor an LTA-site buffer)"
        )
    decisions = []
    for rule in rules:
        d = rule()
        if not d.deletable:
            return d
        decisions.append(d)
    return decisions[0]


def can_delete_raw_data_package_from_source_buffer(
    session: Session, package: m.RawDataPackage, location: m.DataLocation
) -> bool:
    """Matrix row "RawDataPackage / SOURCE buffer": the location is a BUFFER (or the SOURCE)
    at a source site, the package has >= 1 PRESENT copy at a LONG_TERM_ARCHIVE location (an
    LTA-site buffer does not count) and its state is ARCHIVED."""
    if location.location_type == LT.LONG_TERM_ARCHIVE:
        return False
    return _decide_rdp_source(session, package, location, site_roles(session)).deletable


def can_delete_raw_data_package_from_lta_buffer(
    session: Session, package: m.RawDataPackage, location: m.DataLocation
) -> bool:
    """Matrix row "RawDataPackage / LTA site buffer": the location is a BUFFER at an LTA site
    and the package is PRESENT in the LONG_TERM_ARCHIVE location of the same site."""
    if location.location_type == LT.LONG_TERM_ARCHIVE:
        return False
    return _decide_rdp_lta_buffer(session, package, location, site_roles(session)).deletable


def _completed_transfers(session: Session, dtp_id: int) -> list[m.DataTransfer]:
    return list(
        session.scalars(
            select(m.DataTransfer)
            .options(joinedload(m.DataTransfer.destination_location))
            .where(m.DataTransfer.data_transfer_package_id == dtp_id)
            .order_by(m.DataTransfer.id)
        )
    )


def _transfer_done(t: m.DataTransfer) -> bool:
    return t.status == m.Status.COMPLETED and t.unpack_status == m.Status.COMPLETED


def _describe_transfer(t: m.DataTransfer) -> str:
    return (
        f"to {t.destination_location.name}: transfer {t.status.name}, unpack {t.unpack_status.name}"
    )


def _decide_dtp_source(
    session: Session, dtp: m.DataTransferPackage, location: m.DataLocation, roles: SiteRoles
) -> Decision:
    if not (location.location_type == LT.BUFFER and location.site_id in roles.source_site_ids):
        return _keep(f"{location.name} is not a BUFFER at a source site")
    transfers = [
        t
        for t in _completed_transfers(session, dtp.id)
        if t.destination_location.site_id in roles.lta_site_ids
    ]
    done = [t for t in transfers if _transfer_done(t)]
    if not done:
        detail = "; ".join(_describe_transfer(t) for t in transfers) or "no transfer to an LTA site"
        return _keep(
            "no DataTransfer to an LTA site with status COMPLETED and unpack_status COMPLETED "
            f"({detail})",
            "not_unpacked_at_lta_site",
        )
    names = ", ".join(t.destination_location.name for t in done)
    return _delete(
        f"transferred and unpacked at LTA-site buffer {names}", "transfer_and_unpack_completed"
    )


def _decide_dtp_lta_buffer(
    session: Session, dtp: m.DataTransferPackage, location: m.DataLocation, roles: SiteRoles
) -> Decision:
    if not _is_lta_site_buffer(location, roles):
        return _keep(f"{location.name} is not a BUFFER at an LTA site")
    transfers = _completed_transfers(session, dtp.id)
    # Every active LTA site, this one included: the copy here is the one unpacked here and
    # the origin of the secondary transfers to the other sites.
    missing = []
    for site_id in sorted(roles.active_lta_site_ids | {location.site_id}):
        to_site = [t for t in transfers if t.destination_location.site_id == site_id]
        if not any(_transfer_done(t) for t in to_site):
            detail = "; ".join(_describe_transfer(t) for t in to_site) or "no transfer"
            missing.append(f"{roles.site_names.get(site_id, site_id)} ({detail})")
    if missing:
        return _keep(
            "not yet transferred and unpacked at every LTA site: missing " + ", ".join(missing),
            "not_replicated_to_all_lta_sites",
        )
    return _delete("transferred and unpacked at every LTA site", "replicated_to_all_lta_sites")


def decide_data_transfer_package(
    session: Session,
    dtp: m.DataTransferPackage,
    location: m.DataLocation,
    roles: SiteRoles | None = None,
) -> Decision:
    """The deletion rule for a DataTransferPackage copy at ``location``."""
    roles = roles or site_roles(session)
    if location.location_type == LT.LONG_TERM_ARCHIVE:
        return _keep(
            f"{location.name} is a LONG_TERM_ARCHIVE: DataTransferPackages are not stored "
            "there and nothing is deleted automatically",
            "long_term_archive",
        )
    if location.location_type != LT.BUFFER:
        return _keep(
            f"no rule deletes a DataTransferPackage from a {location.location_type.name} location"
        )
    at_source = location.site_id in roles.source_site_ids
    at_lta = location.site_id in roles.lta_site_ids
    return _both_site_rules(
        location,
        at_source and (lambda: _decide_dtp_source(session, dtp, location, roles)),
        at_lta and (lambda: _decide_dtp_lta_buffer(session, dtp, location, roles)),
    )


def can_delete_data_transfer_package_from_source_buffer(
    session: Session, dtp: m.DataTransferPackage, location: m.DataLocation
) -> bool:
    """Matrix row "DataTransferPackage / SOURCE buffer": a DataTransfer to a location at an
    LTA site has status COMPLETED and unpack_status COMPLETED."""
    return _decide_dtp_source(session, dtp, location, site_roles(session)).deletable


def can_delete_data_transfer_package_from_lta_buffer(
    session: Session, dtp: m.DataTransferPackage, location: m.DataLocation
) -> bool:
    """Matrix row "DataTransferPackage / LTA site buffer": transferred and unpacked at ALL
    other (active) LTA sites, and unpacked here."""
    return _decide_dtp_lta_buffer(session, dtp, location, site_roles(session)).deletable


# --- raw data files: set-based predicates ---------------------------------------------------


def _raw_file_source_safe(file_pc: Any) -> Any:
    """SQL: the file copy's parent package is ARCHIVED and PRESENT at an LTA location, and
    the copy went through stage 1 (DELETION_POSSIBLE).  (:func:`_claim_expired` states
    the same rule as joins, for PostgreSQL at scale.)"""
    rdf = _alias(m.RawDataFile.__table__, "safe_rdf")
    rdp = _alias(m.RawDataPackage.__table__, "safe_rdp")
    return and_(
        file_pc.c.deletion_possible_at.is_not(None),
        exists()
        .where(
            rdf.c.id == file_pc.c.raw_data_file_id,
            rdp.c.id == rdf.c.raw_data_package_id,
            rdp.c.state == m.PackageState.ARCHIVED,
            _lta_present_exists(rdp.c.id),
        )
        .correlate_except(rdf, rdp),
    )


def _raw_file_processing_safe(file_pc: Any) -> Any:
    """SQL: no active StagingJob for this PROCESSING location references the file's package,
    and the package still has a PRESENT copy at a LONG_TERM_ARCHIVE (so this copy is never
    the last one)."""
    rdf = _alias(m.RawDataFile.__table__, "safe_rdf")
    sj = m.StagingJob.__table__
    link = m.staging_job_raw_data_package
    active_job = (
        exists()
        .where(
            link.c.raw_data_package_id == rdf.c.raw_data_package_id,
            sj.c.id == link.c.staging_job_id,
            sj.c.active.is_(True),
            sj.c.destination_location_id == file_pc.c.data_location_id,
        )
        .correlate_except(link, sj)
    )
    return (
        exists()
        .where(
            rdf.c.id == file_pc.c.raw_data_file_id,
            rdf.c.raw_data_package_id.is_not(None),
            ~active_job,
            _lta_present_exists(rdf.c.raw_data_package_id),
        )
        .correlate_except(rdf)
    )


def _file_copies_still_deletable(session: Session, ids: Sequence[int]) -> set[int]:
    """Of these raw-file copy ids, those whose rule holds now (one query per rule)."""
    if not ids:
        return set()
    pc = _alias(PCT, "f_pc")
    loc = _alias(DLT, "f_loc")
    base = (
        select(pc.c.id)
        .join(loc, loc.c.id == pc.c.data_location_id)
        .where(pc.c.id.in_(list(ids)), pc.c.type == COPY_TYPE_RAW_DATA_FILE, pc.c.lost_at.is_(None))
    )
    ok = set(
        session.scalars(
            base.where(loc.c.location_type.in_([LT.SOURCE, LT.BUFFER]), _raw_file_source_safe(pc))
        )
    )
    ok |= set(
        session.scalars(
            base.where(loc.c.location_type == LT.PROCESSING, _raw_file_processing_safe(pc))
        )
    )
    return ok


def _retention_minutes(location: m.DataLocation) -> int:
    if location.retention_period_minutes is not None:
        return int(location.retention_period_minutes)
    return int(settings.RETENTION_PERIOD_MINUTES)


def decide_raw_data_file_copy(
    session: Session, copy: m.RawDataFilePhysicalCopy, buffer_status: dict[str, Any] | None = None
) -> Decision:
    """The rule for one raw file copy (plan and explain; the cycle uses the set-based form)."""
    loc = copy.data_location
    if loc.location_type == LT.LONG_TERM_ARCHIVE:
        return _keep(
            f"{loc.name} is a LONG_TERM_ARCHIVE: never deleted automatically", "long_term_archive"
        )
    rdf = copy.raw_data_file
    package = rdf.raw_data_package
    if loc.location_type == LT.PROCESSING:
        if package is None:
            return _keep("the file belongs to no RawDataPackage")
        jobs = session.scalars(
            select(m.StagingJob)
            .join(m.staging_job_raw_data_package)
            .where(
                m.staging_job_raw_data_package.c.raw_data_package_id == package.id,
                m.StagingJob.active.is_(True),
                m.StagingJob.destination_location_id == loc.id,
            )
        ).all()
        if jobs:
            return _keep(
                "active StagingJob(s) "
                + ", ".join(str(j.id) for j in jobs)
                + f" use package {package.file_name}",
                "active_staging_job",
            )
        if copy.id not in _file_copies_still_deletable(session, [copy.id]):
            return _keep(
                f"package {package.file_name} has no PRESENT copy at a LONG_TERM_ARCHIVE; this "
                "copy may be the last one",
                "no_lta_copy",
            )
        return _delete("no active StagingJob references it", "no_active_staging_job")
    if loc.location_type not in (LT.SOURCE, LT.BUFFER):
        return _keep(f"no rule deletes raw files from a {loc.location_type.name} location")
    if copy.status == S.PRESENT or copy.deletion_possible_at is None:
        where = package.file_name if package else "no package yet"
        return _keep(
            f"parent package ({where}) has not left the source-site buffer; files become "
            "DELETION_POSSIBLE then",
            "parent_package_not_deleted",
        )
    if copy.id not in _file_copies_still_deletable(session, [copy.id]):
        return _keep(
            "parent package is not ARCHIVED with a PRESENT copy at a LONG_TERM_ARCHIVE",
            "no_lta_copy",
        )
    until = copy.deletion_possible_at + timedelta(minutes=_retention_minutes(loc))
    if until <= m.utcnow():
        return _delete("DELETION_POSSIBLE and retention period expired", "parent_package_archived")
    if should_delete_based_on_buffer_status(loc, buffer_status):
        return _delete(
            f"DELETION_POSSIBLE; {loc.name} is under pressure (oldest first until below threshold)",
            "buffer_pressure",
        )
    return _keep(
        f"retention until {until.isoformat(timespec='seconds')} (DELETION_POSSIBLE since "
        f"{copy.deletion_possible_at.isoformat(timespec='seconds')}, retention "
        f"{_retention_minutes(loc)} min) and {loc.name} is not under pressure",
        "retention",
    )


def decide_copy(
    session: Session,
    copy: m.PhysicalCopy,
    roles: SiteRoles | None = None,
    buffer_status: dict | None = None,
) -> Decision:
    """The rule for any physical copy (used by the worker's double-check, plan and explain)."""
    if copy.data_location.location_type == LT.LONG_TERM_ARCHIVE:
        return _keep(
            f"{copy.data_location.name} is a LONG_TERM_ARCHIVE: permanent storage, "
            "never deleted automatically",
            "long_term_archive",
        )
    if copy.lost_at is not None:
        return _keep("the copy is marked lost (nothing to delete)", "lost")
    if isinstance(copy, m.RawDataPackagePhysicalCopy):
        return decide_raw_data_package(session, copy.raw_data_package, copy.data_location, roles)
    if isinstance(copy, m.DataTransferPackagePhysicalCopy):
        return decide_data_transfer_package(
            session, copy.data_transfer_package, copy.data_location, roles
        )
    if isinstance(copy, m.RawDataFilePhysicalCopy):
        return decide_raw_data_file_copy(session, copy, buffer_status)
    return _keep(f"unknown copy type {copy.type}")


# ---------------------------------------------------------------------------------------
# Buffer status
# ---------------------------------------------------------------------------------------


def get_buffer_status_for_location(
    location_name: str, session: Session | None = None
) -> dict[str, Any]:
    """The latest published buffer status of a location (``disk_usage_percent``, ``state``,
    ``used_bytes``, ``total_bytes``, ``measured_at``); ``{}`` when unknown."""
    try:
        return dict(bs.read_status(location_name, session) or {})
    except Exception as exc:  # an unreadable status is an unknown one: act safely
        log.warning("buffer_status_unavailable", location=location_name, error=str(exc))
        return {}


def pressure_threshold_percent(location: m.DataLocation) -> float | None:
    """Use above which pressure-driven deletion starts; None for locations never cleaned
    because of pressure.  SOURCE, BUFFER and PROCESSING locations use their own critical
    threshold if set, else DISK_USAGE_THRESHOLD_PERCENT; LONG_TERM_ARCHIVE: never."""
    if location.location_type == LT.LONG_TERM_ARCHIVE:
        return None
    if location.critical_threshold_percent is not None:
        return float(location.critical_threshold_percent)
    return float(settings.DISK_USAGE_THRESHOLD_PERCENT)


def should_delete_based_on_buffer_status(
    location: m.DataLocation, buffer_status: dict[str, Any] | None
) -> bool:
    """True when the location is under disk pressure and eligible data should go now even
    before its retention expires.  Never for a LONG_TERM_ARCHIVE; never when the status is
    unknown (no measurement, stale, Redis down): then only the safe rules run."""
    threshold = pressure_threshold_percent(location)
    if threshold is None or not buffer_status:
        return False
    state = str(buffer_status.get("state", bs.BufferState.UNKNOWN.value))
    if state == bs.BufferState.UNKNOWN.value:
        return False
    if state == bs.BufferState.EMERGENCY.value:
        return True
    percent = buffer_status.get("disk_usage_percent")
    if percent is None:
        return False
    return float(percent) >= threshold


def _state_from(status: dict[str, Any]) -> bs.BufferState:
    try:
        return bs.BufferState(status.get("state", "unknown")) if status else bs.BufferState.UNKNOWN
    except ValueError:
        return bs.BufferState.UNKNOWN


def _batch_size(state: bs.BufferState) -> int:
    size = max(1, int(settings.DELETION_BATCH_SIZE))
    if state.under_pressure:
        size *= max(1, int(settings.get("DELETION_CRITICAL_BATCH_MULTIPLIER", 4)))
    return size


def _cycle_limit(state: bs.BufferState) -> int | None:
    """How many copies per location and step one cycle schedules; None (all) in emergency."""
    if state == bs.BufferState.EMERGENCY:
        return None
    return _batch_size(state) * _MAX_BATCHES_PER_CYCLE


class _Statuses:
    """Buffer statuses read once per cycle."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._cache: dict[str, dict[str, Any]] = {}

    def get(self, location: m.DataLocation) -> dict[str, Any]:
        if location.name not in self._cache:
            self._cache[location.name] = get_buffer_status_for_location(location.name, self.session)
        return self._cache[location.name]

    def state(self, location: m.DataLocation) -> bs.BufferState:
        return _state_from(self.get(location))


# ---------------------------------------------------------------------------------------
# Audit trail
# ---------------------------------------------------------------------------------------


def _copy_size(copy: m.PhysicalCopy) -> int | None:
    if copy.size is not None:
        return int(copy.size)
    thing = _thing_of(copy)
    return int(thing.size) if thing is not None and thing.size is not None else None


def _thing_of(copy: m.PhysicalCopy) -> Any:
    if isinstance(copy, m.RawDataFilePhysicalCopy):
        return copy.raw_data_file
    if isinstance(copy, m.RawDataPackagePhysicalCopy):
        return copy.raw_data_package
    if isinstance(copy, m.DataTransferPackagePhysicalCopy):
        return copy.data_transfer_package
    return None


def _copy_path(copy: m.PhysicalCopy) -> str | None:
    if copy.relative_path:
        return copy.relative_path
    thing = _thing_of(copy)
    return getattr(thing, "relative_path", None)


_EVENTS = {
    m.DeletionOutcome.SCHEDULED: "physical_copy_deletion_scheduled",
    m.DeletionOutcome.DELETED: "physical_copy_deleted",
    m.DeletionOutcome.FAILED: "physical_copy_deletion_failed",
    m.DeletionOutcome.SKIPPED: "physical_copy_deletion_skipped",
    m.DeletionOutcome.MARKED_POSSIBLE: "physical_copy_deletion_possible",
}


def _log_row(
    copy_id: int | None,
    copy_type: str | None,
    location: m.DataLocation | None,
    size: int | None,
    reason: str,
    outcome: m.DeletionOutcome,
    message: str | None,
    actor: str = "deletion_manager",
) -> dict[str, Any]:
    fields = {
        "physical_copy_id": copy_id,
        "copy_type": copy_type,
        "location": location.name if location is not None else None,
        "size_bytes": size,
        "reason": reason,
        "outcome": outcome.name,
    }
    logger = log.warning if outcome in (m.DeletionOutcome.FAILED,) else log.info
    logger(_EVENTS[outcome], message=message, **fields)
    return {
        "created_at": m.utcnow(),
        "physical_copy_id": copy_id,
        "copy_type": copy_type,
        "data_location_id": location.id if location is not None else None,
        "location_name": location.name if location is not None else None,
        "size_bytes": size,
        "reason": reason[:128],
        "outcome": outcome,
        "actor": actor,
        "message": message,
    }


def _write_log_rows(session: Session, rows: list[dict[str, Any]]) -> None:
    if rows:
        session.execute(insert(m.DeletionLog), rows)


def _batch_row(
    location: m.DataLocation,
    copy_type: str,
    ids: list[int],
    size: int,
    code: str,
    reason: str,
    actor: str = "deletion_manager",
) -> dict[str, Any]:
    """One SCHEDULED audit row (and one JSON log line) for a batch of copies scheduled
    together for the same reason; ``copy_ids`` lists them."""
    log.info(
        _EVENTS[m.DeletionOutcome.SCHEDULED],
        copies=len(ids),
        first_physical_copy_id=ids[0],
        last_physical_copy_id=ids[-1],
        copy_type=copy_type,
        location=location.name,
        size_bytes=size,
        reason=code,
        outcome=m.DeletionOutcome.SCHEDULED.name,
    )
    return {
        "created_at": m.utcnow(),
        "physical_copy_id": None,
        "copy_type": copy_type,
        "data_location_id": location.id,
        "location_name": location.name,
        "size_bytes": size,
        "reason": code[:128],
        "outcome": m.DeletionOutcome.SCHEDULED,
        "actor": actor,
        "message": f"{len(ids)} copies scheduled together: {reason}",
        "copy_ids": json.dumps(ids, separators=(",", ":")),
    }


def deletion_history(session: Session, copy_id: int) -> list[m.DeletionLog]:
    """Every ``deletion_log`` row about one copy, oldest first: its own rows (decisions
    per copy, and the worker's DELETED / SKIPPED / FAILED) and the batch rows of bulk
    scheduling that list it in ``copy_ids``."""
    dl = m.DeletionLog
    rows = list(session.scalars(select(dl).where(dl.physical_copy_id == copy_id)))
    copy = session.get(m.PhysicalCopy, copy_id)
    if copy is not None:
        batches = session.scalars(
            select(dl).where(
                dl.data_location_id == copy.data_location_id,
                dl.created_at >= copy.created_at,
                dl.physical_copy_id.is_(None),
                dl.copy_ids.is_not(None),
                dl.copy_ids.contains(str(copy_id)),  # a cheap pre-filter; exact below
            )
        )
        rows += [r for r in batches if copy_id in json.loads(r.copy_ids or "[]")]
    return sorted(rows, key=lambda r: r.id)


def _add_deletion_log(
    session: Session,
    physical_copy: m.PhysicalCopy,
    message: str,
    *,
    reason: str | None = None,
    outcome: m.DeletionOutcome = m.DeletionOutcome.DELETED,
    actor: str = "deletion_manager",
) -> None:
    """Add deletion log entry for audit trail: a ``deletion_log`` row (time, copy id and
    type, location, size, reason, outcome, actor, message) and one JSON log line with the
    fields of the document's example."""
    row = _log_row(
        physical_copy.id,
        physical_copy.type,
        physical_copy.data_location,
        _copy_size(physical_copy),
        reason or message,
        outcome,
        message,
        actor,
    )
    _write_log_rows(session, [row])


# ---------------------------------------------------------------------------------------
# Claiming and submitting
# ---------------------------------------------------------------------------------------


def claim_for_deletion(
    session: Session,
    copy_ids: Sequence[int],
    expected_statuses: Iterable[m.PhysicalCopyStatus] = (S.PRESENT,),
) -> list[int]:
    """Atomically move copies from an expected state to DELETION_SCHEDULED; returns the ids
    this caller claimed.  One ``UPDATE ... WHERE id IN (...) AND status IN (...)
    RETURNING id``: when two managers race, the database lets each row change once, so
    every copy is scheduled by exactly one of them.  Never touches LTA copies."""
    if not copy_ids:
        return []
    lta_ids = select(DLT.c.id).where(DLT.c.location_type == LT.LONG_TERM_ARCHIVE)
    stmt = (
        update(PCT)
        .where(
            PCT.c.id.in_(list(copy_ids)),
            PCT.c.status.in_(list(expected_statuses)),
            PCT.c.lost_at.is_(None),
            PCT.c.data_location_id.not_in(lta_ids),
        )
        .values(status=S.DELETION_SCHEDULED, deletion_scheduled_at=m.utcnow())
        .returning(PCT.c.id)
    )
    return sorted(session.execute(stmt).scalars().all())


_CLAIM_AND_LOG_SQL = text(
    """
    WITH cand AS (
        SELECT * FROM unnest(
            CAST(:ids AS bigint[]), CAST(:types AS text[]), CAST(:sizes AS bigint[]),
            CAST(:codes AS text[]), CAST(:reasons AS text[])
        ) AS c(id, copy_type, size, code, reason)
    ), claimed AS (
        UPDATE physical_copy pc
        SET status = :scheduled, deletion_scheduled_at = :now
        WHERE pc.id = ANY(CAST(:ids AS bigint[]))
          AND pc.status = ANY(CAST(:expected AS text[]))
          AND pc.lost_at IS NULL
          AND pc.data_location_id NOT IN (
              SELECT id FROM data_location WHERE location_type = :lta)
        RETURNING pc.id
    ), logged AS (
        INSERT INTO deletion_log (created_at, physical_copy_id, copy_type, data_location_id,
            location_name, size_bytes, reason, outcome, actor, message)
        SELECT :now, cand.id, cand.copy_type, :location_id, :location_name, cand.size,
            left(cand.code, 128), :outcome, 'deletion_manager', cand.reason
        FROM claimed JOIN cand ON cand.id = claimed.id
        RETURNING physical_copy_id
    )
    SELECT physical_copy_id FROM logged
    """
)


def _claim_and_log_bulk(
    session: Session,
    location: m.DataLocation,
    chunk: list[_Candidate],
    expected: tuple[m.PhysicalCopyStatus, ...],
) -> list[int]:
    """PostgreSQL: :func:`claim_for_deletion` and the per-copy SCHEDULED audit rows in one
    statement (the same UPDATE ... WHERE status IN (expected) guard, the same rows in
    ``deletion_log``), so that scheduling a million copies does not build a million rows
    in Python.  One JSON log line per batch instead of one per copy; the audit table keeps
    every copy."""
    now = m.utcnow()
    claimed = sorted(
        session.execute(
            _CLAIM_AND_LOG_SQL,
            {
                "ids": [c.copy_id for c in chunk],
                "types": [c.copy_type for c in chunk],
                "sizes": [c.size for c in chunk],
                "codes": [c.code for c in chunk],
                "reasons": [c.reason for c in chunk],
                "expected": [st.name for st in expected],
                "scheduled": S.DELETION_SCHEDULED.name,
                "lta": LT.LONG_TERM_ARCHIVE.name,
                "now": now,
                "location_id": location.id,
                "location_name": location.name,
                "outcome": m.DeletionOutcome.SCHEDULED.name,
            },
        ).scalars()
    )
    if claimed:
        by_id = {c.copy_id: c for c in chunk}
        codes = sorted({by_id[i].code for i in claimed})
        log.info(
            _EVENTS[m.DeletionOutcome.SCHEDULED],
            copies=len(claimed),
            first_physical_copy_id=claimed[0],
            last_physical_copy_id=claimed[-1],
            copy_type=chunk[0].copy_type,
            location=location.name,
            size_bytes=sum(int(by_id[i].size or 0) for i in claimed),
            reason=",".join(codes),
            outcome=m.DeletionOutcome.SCHEDULED.name,
        )
    return claimed


@dataclass
class _Candidate:
    copy_id: int
    copy_type: str
    size: int | None
    reason: str
    code: str


def _schedule(
    session: Session,
    location: m.DataLocation,
    candidates: list[_Candidate],
    task: Any,
    expected: Iterable[m.PhysicalCopyStatus],
    batch_size: int,
    audit_per_batch: bool = False,
) -> int:
    """Claim candidates in batches, log, commit, then submit one task per batch.

    The audit rows are SCHEDULED rows per copy, or with ``audit_per_batch`` (stage 2, raw
    files by the million) one row per batch and reason that lists the copies it covers;
    the worker writes the per-copy DELETED / SKIPPED / FAILED rows either way."""
    scheduled = 0
    expected = tuple(expected)
    queue = route_task_by_location(OperationType.DELETION, location)
    bulk = is_postgresql(session)
    for start in range(0, len(candidates), batch_size):
        chunk = candidates[start : start + batch_size]
        if audit_per_batch:
            by_id = {c.copy_id: c for c in chunk}
            claimed = claim_for_deletion(session, list(by_id), expected)
            groups: dict[tuple[str, str, str], list[int]] = defaultdict(list)
            for cid in claimed:
                c = by_id[cid]
                groups[(c.copy_type, c.code, c.reason)].append(cid)
            _write_log_rows(
                session,
                [
                    _batch_row(
                        location,
                        copy_type,
                        ids,
                        sum(int(by_id[i].size or 0) for i in ids),
                        code,
                        reason,
                    )
                    for (copy_type, code, reason), ids in groups.items()
                ],
            )
        elif bulk:
            claimed = _claim_and_log_bulk(session, location, chunk, expected)
        else:
            by_id = {c.copy_id: c for c in chunk}
            claimed = claim_for_deletion(session, list(by_id), expected)
            rows = [
                _log_row(
                    cid,
                    by_id[cid].copy_type,
                    location,
                    by_id[cid].size,
                    by_id[cid].code,
                    m.DeletionOutcome.SCHEDULED,
                    by_id[cid].reason,
                )
                for cid in claimed
            ]
            _write_log_rows(session, rows)
        session.commit()  # before submitting: in embedded mode the task runs inline
        if claimed:
            task.apply_async(args=[claimed], kwargs={"queue_name": queue}, queue=queue)
            scheduled += len(claimed)
        session.expire_all()
    return scheduled


# ---------------------------------------------------------------------------------------
# Finders
# ---------------------------------------------------------------------------------------


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


def _package_copy_may_be_deletable(copy_cls: type[m.PhysicalCopy]) -> Any:
    """SQL for a condition every deletable package copy meets (each rule of the matrix
    requires it), so that the per-copy rule runs only on the few copies that may pass it
    instead of on every copy in the buffers.  It never admits a copy: the rule decides.

    * RawDataPackage (source-site and LTA-site buffer rows): a PRESENT, not-lost copy at
      an active LONG_TERM_ARCHIVE exists (the same-site LTA copy is one of them).
    * DataTransferPackage (both rows): a DataTransfer of it is COMPLETED and unpacked.

    Both are checked per candidate copy (``per_row``): the copies at buffers are the
    backlog, while the LTA copies and transfers they are checked against are the history.
    """
    if copy_cls is m.RawDataPackagePhysicalCopy:
        return _lta_present_exists(copy_cls.raw_data_package_id, per_row=True)
    if copy_cls is m.DataTransferPackagePhysicalCopy:
        dt = m.DataTransfer.__table__
        return _per_row(
            [
                dt.c.data_transfer_package_id == copy_cls.data_transfer_package_id,
                dt.c.status == m.Status.COMPLETED,
                dt.c.unpack_status == m.Status.COMPLETED,
            ],
            dt,
            per_row=True,
        )
    return true()


def _decide_rdp_copy(session: Session, copy: Any, roles: SiteRoles) -> Decision:
    return decide_raw_data_package(session, copy.raw_data_package, copy.data_location, roles)


def _decide_dtp_copy(session: Session, copy: Any, roles: SiteRoles) -> Decision:
    return decide_data_transfer_package(
        session, copy.data_transfer_package, copy.data_location, roles
    )


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
) -> list[tuple[int, int | None]]:
    pc = _alias(PCT, "f_pc")
    rdf = m.RawDataFile.__table__
    stmt = (
        select(pc.c.id, func.coalesce(pc.c.size, rdf.c.size))
        .join(rdf, rdf.c.id == pc.c.raw_data_file_id)
        .where(
            pc.c.type == COPY_TYPE_RAW_DATA_FILE,
            pc.c.data_location_id == location.id,
            pc.c.status.in_(list(statuses)),
            pc.c.lost_at.is_(None),
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
    sj = m.StagingJob.__table__
    link = m.staging_job_raw_data_package
    active_job = (
        exists()
        .where(
            link.c.raw_data_package_id == m.RawDataPackagePhysicalCopy.raw_data_package_id,
            sj.c.id == link.c.staging_job_id,
            sj.c.active.is_(True),
            sj.c.destination_location_id == location.id,
        )
        .correlate_except(link, sj)
    )
    return list(
        session.scalars(
            select(m.RawDataPackagePhysicalCopy).where(
                m.RawDataPackagePhysicalCopy.data_location_id == location.id,
                m.RawDataPackagePhysicalCopy.status == S.STAGED,
                ~active_job,
            )
        )
    )


def _staged_file_ids(
    session: Session, location: m.DataLocation, package_ids: Sequence[int], limit: int | None
) -> list[tuple[int, int | None]]:
    if not package_ids:
        return []
    pc = _alias(PCT, "f_pc")
    rdf = m.RawDataFile.__table__
    stmt = (
        select(pc.c.id, func.coalesce(pc.c.size, rdf.c.size))
        .join(rdf, rdf.c.id == pc.c.raw_data_file_id)
        .where(
            pc.c.type == COPY_TYPE_RAW_DATA_FILE,
            pc.c.data_location_id == location.id,
            pc.c.status.in_([S.PRESENT, S.STAGED]),
            pc.c.lost_at.is_(None),
            rdf.c.raw_data_package_id.in_(list(package_ids)),
            _raw_file_processing_safe(pc),
        )
        .order_by(pc.c.created_at, pc.c.id)
    )
    if limit is not None:
        stmt = stmt.limit(limit)
    return [(r[0], r[1]) for r in session.execute(stmt)]


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


def _deletion_possible_base(location: m.DataLocation) -> tuple[Any, Any, Any]:
    """The DELETION_POSSIBLE raw-file copies at ``location`` that the stage-2 safety rule
    allows, oldest first, as ``(copy alias, SELECT id, size, start of retention)``."""
    pc = _alias(PCT, "f_pc")
    rdf = m.RawDataFile.__table__
    # _raw_file_source_safe requires deletion_possible_at to be set, so it is the start of
    # the retention clock; comparing the bare column lets the partial index
    # ix_physical_copy_deletion_possible find the expired copies without a scan.
    since = pc.c.deletion_possible_at
    # The file's size is looked up only for a copy without one (COALESCE stops at the
    # first non-null); _raw_file_source_safe already requires the file row to exist.
    size = func.coalesce(
        pc.c.size,
        select(rdf.c.size).where(rdf.c.id == pc.c.raw_data_file_id).scalar_subquery(),
    )
    base = (
        select(pc.c.id, size.label("size"))
        .where(
            pc.c.type == COPY_TYPE_RAW_DATA_FILE,
            pc.c.data_location_id == location.id,
            pc.c.status == S.DELETION_POSSIBLE,
            pc.c.lost_at.is_(None),
            _raw_file_source_safe(pc),
        )
        .order_by(since, pc.c.created_at, pc.c.id)
    )
    return pc, base, since


def _deletion_possible_selection(
    session: Session, location: m.DataLocation, status: dict[str, Any], limit: int | None
) -> list[_Candidate]:
    """DELETION_POSSIBLE raw-file copies at ``location`` to delete now: those past their
    retention, then - under pressure - the oldest others until the bytes needed are freed."""
    pc, base, since = _deletion_possible_base(location)
    cutoff = m.utcnow() - timedelta(minutes=_retention_minutes(location))
    expired_stmt = base.where(since <= cutoff)
    if limit is not None:
        expired_stmt = expired_stmt.limit(limit)
    chosen = [
        _Candidate(
            r.id,
            COPY_TYPE_RAW_DATA_FILE,
            r.size,
            "parent package archived; retention expired",
            "parent_package_archived",
        )
        for r in session.execute(expired_stmt)
    ]
    if not should_delete_based_on_buffer_status(location, status):
        return chosen
    needed = bytes_to_free(session, location, status) - sum(c.size or 0 for c in chosen)
    if needed <= 0:
        return chosen
    for r in session.execute(base.where(since > cutoff)):
        if needed <= 0 or (limit is not None and len(chosen) >= limit):
            break
        chosen.append(
            _Candidate(
                r.id,
                COPY_TYPE_RAW_DATA_FILE,
                r.size,
                f"buffer pressure at {location.name}: oldest DELETION_POSSIBLE first",
                "buffer_pressure",
            )
        )
        needed -= r.size or 0
    return chosen


def _schedule_deletion_possible_bulk(
    session: Session,
    location: m.DataLocation,
    status: dict[str, Any],
    limit: int | None,
    batch_size: int,
) -> int:
    """PostgreSQL form of :func:`_deletion_possible_selection` + :func:`_schedule`, with
    the same result: the expired copies are claimed straight from the selection (the same
    safety rule, :func:`_raw_file_source_safe`, in the same statement), without a Python
    object per copy, and audited with one SCHEDULED row per batch (as the Python path
    does for stage 2).  Under pressure, the oldest others follow through the Python path,
    which needs a running sum of bytes."""
    cutoff = m.utcnow() - timedelta(minutes=_retention_minutes(location))
    pressure = should_delete_based_on_buffer_status(location, status)
    # Computed before the claim, as in the Python path: bytes_to_free subtracts what is
    # already scheduled, and the expired copies are subtracted below.
    needed = bytes_to_free(session, location, status) if pressure else 0
    claimed = _claim_expired(session, location, cutoff, limit)
    sizes = dict(claimed)
    ids = sorted(sizes)
    chunks = [ids[start : start + batch_size] for start in range(0, len(ids), batch_size)]
    if chunks:
        _write_log_rows(
            session,
            [
                _batch_row(
                    location,
                    COPY_TYPE_RAW_DATA_FILE,
                    chunk,
                    sum(int(sizes[i] or 0) for i in chunk),
                    "parent_package_archived",
                    "parent package archived; retention expired",
                )
                for chunk in chunks
            ],
        )
        session.commit()  # before submitting: in embedded mode the task runs inline
    queue = route_task_by_location(OperationType.DELETION, location)
    for chunk in chunks:
        delete_bulk_raw_data_files.apply_async(
            args=[chunk], kwargs={"queue_name": queue}, queue=queue
        )
    if chunks:
        session.expire_all()
    scheduled = len(ids)
    needed -= sum(int(size or 0) for size in sizes.values())
    if not pressure or needed <= 0 or (limit is not None and scheduled >= limit):
        return scheduled
    _, base, since = _deletion_possible_base(location)
    others: list[_Candidate] = []
    for r in session.execute(base.where(since > cutoff)):
        if needed <= 0 or (limit is not None and scheduled + len(others) >= limit):
            break
        others.append(
            _Candidate(
                r.id,
                COPY_TYPE_RAW_DATA_FILE,
                r.size,
                f"buffer pressure at {location.name}: oldest DELETION_POSSIBLE first",
                "buffer_pressure",
            )
        )
        needed -= r.size or 0
    return scheduled + _schedule(
        session,
        location,
        others,
        delete_bulk_raw_data_files,
        (S.DELETION_POSSIBLE,),
        batch_size,
        audit_per_batch=True,
    )


class _ArrayOfSelect(ColumnElement[Any]):
    """PostgreSQL ``ARRAY(SELECT ...)``: the rows a SELECT picks, as one array value.
    ``id = ANY(ARRAY(SELECT ...))`` makes the claim a primary-key lookup per picked copy,
    where a join with the same SELECT may scan the whole table."""

    inherit_cache = True
    _traverse_internals = [("stmt", InternalTraversal.dp_clauseelement)]

    def __init__(self, stmt: Any) -> None:
        self.stmt = stmt
        self.type = ARRAY(BigInteger())


@compiles(_ArrayOfSelect, "postgresql")
def _compile_array_of_select(element: _ArrayOfSelect, compiler: Any, **kw: Any) -> str:
    return f"ARRAY({compiler.process(element.stmt, **kw)})"


def _claim_expired(
    session: Session, location: m.DataLocation, cutoff: datetime, limit: int | None
) -> list[tuple[int, int | None]]:
    """PostgreSQL, one statement: claim (``DELETION_POSSIBLE -> DELETION_SCHEDULED``) the
    expired DELETION_POSSIBLE copies at ``location`` that the stage-2 safety rule allows,
    oldest first, at most ``limit``.  Returns (copy id, size) of the claimed copies.

    The rule is that of :func:`_raw_file_source_safe` (the file's package is ARCHIVED and
    PRESENT at an active LTA; ``deletion_possible_at`` is set), stated so that its cost
    follows the copies at this location: ``cand`` = the expired copies (partial index
    ix_physical_copy_deletion_possible) with their package; ``ok`` = those of their
    packages that pass the package rule, each checked once, not once per file.  An empty
    location costs one index probe.  The claim guard is the UPDATE's own ``WHERE status =
    'DELETION_POSSIBLE'``: when two managers race, PostgreSQL re-checks it on every row the
    other one changed first, so each copy is claimed once."""
    if location.location_type == LT.LONG_TERM_ARCHIVE:  # never: callers pass SOURCE/BUFFER
        raise ValueError(f"refusing to schedule deletions at LTA {location.name}")
    pc = _alias(PCT, "f_pc")
    rdf = _alias(m.RawDataFile.__table__, "safe_rdf")
    rdp = _alias(m.RawDataPackage.__table__, "safe_rdp")
    cand = (
        select(
            pc.c.id,
            pc.c.deletion_possible_at.label("since"),
            pc.c.created_at,
            rdf.c.raw_data_package_id.label("pkg"),
        )
        .join_from(pc, rdf, rdf.c.id == pc.c.raw_data_file_id)
        .where(
            pc.c.type == COPY_TYPE_RAW_DATA_FILE,
            pc.c.data_location_id == location.id,
            pc.c.status == S.DELETION_POSSIBLE,
            pc.c.lost_at.is_(None),
            pc.c.deletion_possible_at.is_not(None),
            pc.c.deletion_possible_at <= cutoff,
        )
        .cte("cand")
        .prefix_with("MATERIALIZED")
    )
    ok = (
        select(rdp.c.id)
        .where(
            rdp.c.id.in_(select(cand.c.pkg)),
            rdp.c.state == m.PackageState.ARCHIVED,
            _lta_present_exists(rdp.c.id),
        )
        .cte("ok")
        .prefix_with("MATERIALIZED")
    )
    picked = (
        select(cand.c.id)
        .where(cand.c.pkg.in_(select(ok.c.id)))
        .order_by(cand.c.since, cand.c.created_at, cand.c.id)
    )
    if limit is not None:
        picked = picked.limit(limit)
    file_size = m.RawDataFile.__table__.c.size
    size = func.coalesce(
        PCT.c.size,
        select(file_size)
        .where(m.RawDataFile.__table__.c.id == PCT.c.raw_data_file_id)
        .scalar_subquery(),
    )
    claim = (
        update(PCT)
        .where(
            PCT.c.id == any_(_ArrayOfSelect(picked)),
            PCT.c.data_location_id == location.id,
            PCT.c.status == S.DELETION_POSSIBLE,
            PCT.c.lost_at.is_(None),
        )
        .values(status=S.DELETION_SCHEDULED, deletion_scheduled_at=m.utcnow())
        .returning(PCT.c.id, size)
    )
    # The oldest-first sort of a large backlog should not spill to disk (4 MB default);
    # SET LOCAL ends with this transaction, which the caller commits right after.
    session.execute(text("SET LOCAL work_mem = '64MB'"))
    return [(int(r[0]), r[1]) for r in session.execute(claim)]


def bytes_to_free(session: Session, location: m.DataLocation, status: dict[str, Any]) -> int:
    """Bytes that must go for ``location`` to be back under its pressure threshold:
    ``used - threshold * capacity``, minus what is already being deleted there and what was
    deleted since the measurement."""
    threshold = pressure_threshold_percent(location)
    total = status.get("total_bytes") if status else None
    if threshold is None or not total:
        return 0
    need = float(status["used_bytes"]) - threshold / 100.0 * float(total)
    in_flight = session.scalar(
        select(func.coalesce(func.sum(PCT.c.size), 0)).where(
            PCT.c.data_location_id == location.id, PCT.c.status.in_(list(IN_FLIGHT))
        )
    )
    freed = 0
    measured = status.get("measured_at")
    if measured:
        try:
            measured_at = datetime.fromisoformat(str(measured)).replace(tzinfo=None)
        except ValueError:
            measured_at = None
        if measured_at is not None:
            freed = session.scalar(
                select(func.coalesce(func.sum(PCT.c.size), 0)).where(
                    PCT.c.data_location_id == location.id,
                    PCT.c.status == S.DELETED,
                    PCT.c.deleted_at >= measured_at,
                )
            )
    return max(0, math.ceil(need - float(in_flight or 0) - float(freed or 0)))


# ---------------------------------------------------------------------------------------
# The five steps of a cycle
# ---------------------------------------------------------------------------------------


def _schedule_package_copies(
    session: Session,
    copy_cls: type[m.PhysicalCopy],
    decide: Any,
    copy_type: str,
    task: Any,
    statuses: _Statuses,
    location_ids: list[int] | None = None,
) -> int:
    found = _deletable_package_copies(session, copy_cls, decide, location_ids=location_ids)
    total = 0
    for loc, items in found.items():
        state = statuses.state(loc)
        candidates = [
            _Candidate(c.id, copy_type, _copy_size(c), d.reason, d.code) for c, d in items
        ]
        total += _schedule(session, loc, candidates, task, (S.PRESENT,), _batch_size(state))
    return total


def delete_data_transfer_packages(
    session: Session, statuses: _Statuses | None = None, location_ids: list[int] | None = None
) -> int:
    """Step 1: schedule deletion of DataTransferPackages from buffers (matrix rows
    "DataTransferPackage / SOURCE buffer" and "/ LTA site buffer")."""
    statuses = statuses or _Statuses(session)
    return _schedule_package_copies(
        session,
        m.DataTransferPackagePhysicalCopy,
        _decide_dtp_copy,
        COPY_TYPE_DATA_TRANSFER_PACKAGE,
        delete_bulk_data_transfer_packages,
        statuses,
        location_ids,
    )


def delete_raw_data_packages_bulk(
    session: Session, statuses: _Statuses | None = None, location_ids: list[int] | None = None
) -> int:
    """Step 2: schedule deletion of RawDataPackages from SOURCE-site and LTA-site buffers in
    bulk: find (rule per copy), claim PRESENT -> DELETION_SCHEDULED per batch with one
    UPDATE, commit, one task per batch per location.  When a copy leaves the source site
    the worker marks the package's raw files DELETION_POSSIBLE."""
    statuses = statuses or _Statuses(session)
    return _schedule_package_copies(
        session,
        m.RawDataPackagePhysicalCopy,
        _decide_rdp_copy,
        COPY_TYPE_RAW_DATA_PACKAGE,
        delete_bulk_raw_data_packages,
        statuses,
        location_ids,
    )


def delete_processing_raw_data_files(
    session: Session, statuses: _Statuses | None = None, location_ids: list[int] | None = None
) -> int:
    """Step 3: schedule deletion of PRESENT raw-file copies at PROCESSING locations that no
    active StagingJob references (all jobs using them have ``active=False``)."""
    statuses = statuses or _Statuses(session)
    total = 0
    for loc in _active_locations(session, [LT.PROCESSING], location_ids):
        state = statuses.state(loc)
        rows = _processing_file_ids(session, loc, [S.PRESENT], _cycle_limit(state))
        candidates = [
            _Candidate(
                i,
                COPY_TYPE_RAW_DATA_FILE,
                size,
                "no active StagingJob references it",
                "no_active_staging_job",
            )
            for i, size in rows
        ]
        total += _schedule(
            session, loc, candidates, delete_bulk_raw_data_files, (S.PRESENT,), _batch_size(state)
        )
    return total


def delete_staged_raw_data_files_from_processing(
    session: Session, statuses: _Statuses | None = None, location_ids: list[int] | None = None
) -> int:
    """Step 4: for STAGED package copies at PROCESSING locations whose staging jobs are all
    inactive, schedule bulk deletion of their raw-file copies; a package copy whose files
    are all gone becomes DELETED."""
    statuses = statuses or _Statuses(session)
    total = 0
    for loc in _active_locations(session, [LT.PROCESSING], location_ids):
        state = statuses.state(loc)
        staged = _staged_package_copies(session, loc)
        if not staged:
            continue
        rows = _staged_file_ids(
            session, loc, [c.raw_data_package_id for c in staged], _cycle_limit(state)
        )
        candidates = [
            _Candidate(
                i,
                COPY_TYPE_RAW_DATA_FILE,
                size,
                "staging jobs inactive (STAGED package cleanup)",
                "staging_job_inactive",
            )
            for i, size in rows
        ]
        total += _schedule(
            session,
            loc,
            candidates,
            delete_bulk_raw_data_files,
            (S.PRESENT, S.STAGED),
            _batch_size(state),
        )
        _finish_staged_packages(session, loc)
    return total


def _finish_staged_packages(session: Session, location: m.DataLocation) -> int:
    """STAGED package copies (jobs inactive) with no raw-file copy left at the location
    -> DELETED (the tar was already removed when staging finished)."""
    done = 0
    rdf = m.RawDataFile.__table__
    for copy in _staged_package_copies(session, location):
        remaining = session.scalar(
            select(func.count())
            .select_from(PCT)
            .join(rdf, rdf.c.id == PCT.c.raw_data_file_id)
            .where(
                PCT.c.type == COPY_TYPE_RAW_DATA_FILE,
                PCT.c.data_location_id == location.id,
                PCT.c.status != S.DELETED,
                rdf.c.raw_data_package_id == copy.raw_data_package_id,
            )
        )
        if remaining:
            continue
        res = session.execute(
            update(PCT)
            .where(PCT.c.id == copy.id, PCT.c.status == S.STAGED)
            .values(status=S.DELETED, deleted_at=m.utcnow())
        )
        if res.rowcount:
            _add_deletion_log(
                session,
                copy,
                "all raw files of the STAGED package deleted; staging jobs inactive",
                reason="staging_job_inactive",
                outcome=m.DeletionOutcome.DELETED,
            )
            done += 1
    session.commit()
    session.expire_all()
    return done


def mark_raw_data_files_for_deletion(
    session: Session,
    raw_data_package_ids: Sequence[int] | None = None,
    location_ids: list[int] | None = None,
) -> int:
    """Stage 1 of raw-file deletion, one bulk UPDATE: PRESENT raw-file copies at SOURCE and
    BUFFER locations become DELETION_POSSIBLE (``deletion_possible_at`` = now) once their
    parent package has left the source site (its copies there are all DELETED) and is
    ARCHIVED with a PRESENT copy at a LONG_TERM_ARCHIVE.  Restricted to the given packages
    when ``raw_data_package_ids`` is set, and to copies at ``location_ids`` when set (a
    site's scope).  Returns the number of copies marked."""
    roles = site_roles(session)
    if not roles.source_site_ids:
        return 0
    rdf = m.RawDataFile.__table__
    rdp = m.RawDataPackage.__table__
    spc = _alias(PCT, "src_pc")
    sloc = _alias(DLT, "src_loc")
    at_source_site = [
        spc.c.raw_data_package_id == rdp.c.id,
        spc.c.type == COPY_TYPE_RAW_DATA_PACKAGE,
        sloc.c.id == spc.c.data_location_id,
        sloc.c.location_type.in_([LT.SOURCE, LT.BUFFER]),
        sloc.c.site_id.in_(sorted(roles.source_site_ids)),
    ]
    left_source_site = and_(
        exists().where(*at_source_site, spc.c.status == S.DELETED).correlate_except(spc, sloc),
        ~exists().where(*at_source_site, spc.c.status != S.DELETED).correlate_except(spc, sloc),
    )
    # The package rule: ARCHIVED, PRESENT at an active LTA, and gone from the source site.
    package_rule = [
        rdp.c.state == m.PackageState.ARCHIVED,
        _lta_present_exists(rdp.c.id),
        left_source_site,
        *([rdp.c.id.in_(list(raw_data_package_ids))] if raw_data_package_ids is not None else []),
    ]
    file_locations = scope.restrict(
        select(DLT.c.id).where(DLT.c.location_type.in_([LT.SOURCE, LT.BUFFER])),
        DLT.c.id,
        location_ids,
    )
    copy_rule = [
        PCT.c.type == COPY_TYPE_RAW_DATA_FILE,
        PCT.c.status == S.PRESENT,
        PCT.c.data_location_id.in_(file_locations),
    ]
    if is_postgresql(session) and raw_data_package_ids is None:
        # (With raw_data_package_ids given, the rule is already restricted to them.)
        # Set-based from the few packages that qualify: the PRESENT file copies at SOURCE
        # and BUFFER locations (the backlog, not the history) name their packages (one
        # primary-key lookup each), and only those distinct packages are checked against
        # the package rule.  With none, nothing is marked and the UPDATE is skipped: the
        # idle cycle does not grow with the number of files already marked.
        file_pkg = (
            select(rdf.c.raw_data_package_id.label("pid"))
            .where(rdf.c.id == PCT.c.raw_data_file_id)
            .limit(1)
            .lateral("file_pkg")
        )
        candidates = (
            select(file_pkg.c.pid)
            .select_from(PCT.join(file_pkg, true()))
            .where(*copy_rule)
            .distinct()
            .subquery("candidates")
        )
        qualifying = list(
            session.scalars(
                select(rdp.c.id).where(rdp.c.id.in_(select(candidates.c.pid)), *package_rule)
            )
        )
        if not qualifying:
            return 0
        pkg_ids = bindparam("qualifying_ids", value=qualifying, type_=ARRAY(BigInteger))
        # The UPDATE keeps the whole rule (state may have moved since the SELECT) and is
        # restricted to the qualifying packages' files.
        copy_rule.append(
            PCT.c.raw_data_file_id.in_(
                select(rdf.c.id).where(rdf.c.raw_data_package_id == any_(pkg_ids))
            )
        )
        package_rule.append(rdp.c.id == any_(pkg_ids))
    package_ok = (
        exists()
        .where(
            rdf.c.id == PCT.c.raw_data_file_id,
            rdp.c.id == rdf.c.raw_data_package_id,
            *package_rule,
        )
        .correlate_except(rdf, rdp)
    )
    now = m.utcnow()
    stmt = (
        update(PCT)
        .where(*copy_rule, package_ok)
        .values(status=S.DELETION_POSSIBLE, deletion_possible_at=now)
    )
    # One audit row per package and location, not per file: a package has thousands.
    # groups: (package id, location id, copies marked, bytes)
    if is_postgresql(session):
        # The UPDATE and the grouping in one statement: a million marked copies need not
        # travel to Python.
        marked = stmt.returning(PCT.c.raw_data_file_id, PCT.c.data_location_id, PCT.c.size).cte(
            "marked"
        )
        groups = session.execute(
            select(
                rdf.c.raw_data_package_id,
                marked.c.data_location_id,
                func.count(),
                func.coalesce(func.sum(marked.c.size), 0),
            )
            .select_from(marked.outerjoin(rdf, rdf.c.id == marked.c.raw_data_file_id))
            .group_by(rdf.c.raw_data_package_id, marked.c.data_location_id)
        ).all()
    else:
        returned = session.execute(
            stmt.returning(PCT.c.raw_data_file_id, PCT.c.data_location_id, PCT.c.size)
        ).all()
        file_pkg: dict[Any, Any] = {}
        file_ids = [r[0] for r in returned]
        for start in range(0, len(file_ids), 10000):
            file_pkg.update(
                session.execute(
                    select(rdf.c.id, rdf.c.raw_data_package_id).where(
                        rdf.c.id.in_(file_ids[start : start + 10000])
                    )
                ).all()
            )
        acc: dict[tuple[Any, int], list[int]] = defaultdict(lambda: [0, 0])
        for file_id, loc_id, size in returned:
            a = acc[(file_pkg.get(file_id), loc_id)]
            a[0] += 1
            a[1] += int(size or 0)
        groups = [(pkg, loc, n, size) for (pkg, loc), (n, size) in acc.items()]
    if not groups:
        return 0
    locations = {loc.id: loc for loc in session.scalars(select(m.DataLocation))}
    rows = [
        _log_row(
            None,
            COPY_TYPE_RAW_DATA_FILE,
            locations.get(loc_id),
            int(size or 0),
            "parent_package_archived",
            m.DeletionOutcome.MARKED_POSSIBLE,
            f"{n} raw file copies of package {pkg_id} -> DELETION_POSSIBLE",
        )
        for pkg_id, loc_id, n, size in groups
    ]
    _write_log_rows(session, rows)
    return sum(int(g[2]) for g in groups)


def process_deletion_possible_raw_data_files(
    session: Session, statuses: _Statuses | None = None, location_ids: list[int] | None = None
) -> int:
    """Stage 2 (step 5): DELETION_POSSIBLE raw-file copies whose retention has expired
    (``retention_period_minutes`` of the location, else RETENTION_PERIOD_MINUTES) are
    scheduled; under disk pressure the oldest others too, until exactly the bytes needed
    are freed.  Safety (package ARCHIVED and PRESENT at an LTA) is part of the query."""
    statuses = statuses or _Statuses(session)
    total = 0
    # Every location is asked (the partial index ix_physical_copy_deletion_possible answers
    # an empty one at once); a DISTINCT over every DELETION_POSSIBLE row would grow with
    # the history.
    bulk = is_postgresql(session)
    for loc in _active_locations(session, [LT.SOURCE, LT.BUFFER], location_ids):
        status = statuses.get(loc)
        state = _state_from(status)
        if bulk:
            total += _schedule_deletion_possible_bulk(
                session, loc, status, _cycle_limit(state), _batch_size(state)
            )
            continue
        candidates = _deletion_possible_selection(session, loc, status, _cycle_limit(state))
        total += _schedule(
            session,
            loc,
            candidates,
            delete_bulk_raw_data_files,
            (S.DELETION_POSSIBLE,),
            _batch_size(state),
            audit_per_batch=True,
        )
    return total


def reschedule_failed_deletions(session: Session, location_ids: list[int] | None = None) -> int:
    """DELETION_FAILED copies below DELETION_MAX_RETRIES go back to where they came from
    (DELETION_POSSIBLE for stage-2 raw files, PRESENT otherwise) so this cycle's rules
    re-evaluate and reschedule them.  At the cap they stay DELETION_FAILED for a person.
    With ``location_ids`` only copies at those locations."""
    cap = int(settings.DELETION_MAX_RETRIES)
    lta_ids = select(DLT.c.id).where(DLT.c.location_type == LT.LONG_TERM_ARCHIVE)
    base = [
        PCT.c.status == S.DELETION_FAILED,
        PCT.c.deletion_retry_count < cap,
        PCT.c.data_location_id.not_in(lta_ids),
        *([PCT.c.data_location_id.in_(location_ids)] if location_ids is not None else []),
    ]
    n1 = session.execute(
        update(PCT)
        .where(
            *base, PCT.c.type == COPY_TYPE_RAW_DATA_FILE, PCT.c.deletion_possible_at.is_not(None)
        )
        .values(status=S.DELETION_POSSIBLE)
    ).rowcount
    n2 = session.execute(
        update(PCT)
        .where(
            *base, or_(PCT.c.type != COPY_TYPE_RAW_DATA_FILE, PCT.c.deletion_possible_at.is_(None))
        )
        .values(status=S.PRESENT)
    ).rowcount
    session.commit()
    return int(n1 or 0) + int(n2 or 0)


def resubmit_stalled_deletions(session: Session, location_ids: list[int] | None = None) -> int:
    """Copies scheduled longer ago than DELETION_STALLED_SECONDS (lost task, dead worker)
    are submitted again; the task is idempotent.  With ``location_ids`` only copies at
    those locations."""
    cutoff = m.utcnow() - timedelta(seconds=int(settings.get("DELETION_STALLED_SECONDS", 3600)))
    stalled = select(PCT.c.id, PCT.c.data_location_id, PCT.c.type).where(
        PCT.c.status.in_(list(IN_FLIGHT)), PCT.c.deletion_scheduled_at < cutoff
    )
    rows = session.execute(scope.restrict(stalled, PCT.c.data_location_id, location_ids)).all()
    if not rows:
        return 0
    session.execute(
        update(PCT)
        .where(PCT.c.id.in_([r[0] for r in rows]))
        .values(deletion_scheduled_at=m.utcnow())
    )
    session.commit()
    by_loc: dict[int, list[int]] = defaultdict(list)
    for cid, loc_id, _ in rows:
        by_loc[loc_id].append(cid)
    for loc_id, ids in by_loc.items():
        loc = session.get(m.DataLocation, loc_id)
        queue = route_task_by_location(OperationType.DELETION, loc)
        delete_bulk_raw_data_files.apply_async(
            args=[ids], kwargs={"queue_name": queue}, queue=queue
        )
    session.expire_all()
    return len(rows)


def run_once(session: Session, site: str | None = None) -> dict[str, Any]:
    """One deletion cycle; returns what it did.  The five steps of the document, preceded
    by retries of failed deletions and followed by the catch-up of stage-1 marking.

    ``site`` scopes the cycle to copies at that site's locations (default: the setting
    ``MANAGER_SITE``); the rules still consult every site's copies
    (:mod:`ccat_data_transfer.scope`)."""
    ids = scope.location_ids(session, site)
    statuses = _Statuses(session)
    summary: dict[str, Any] = {}
    summary["failed_rescheduled"] = reschedule_failed_deletions(session, ids)
    summary["stalled_resubmitted"] = resubmit_stalled_deletions(session, ids)
    summary["data_transfer_packages"] = delete_data_transfer_packages(session, statuses, ids)
    summary["raw_data_packages"] = delete_raw_data_packages_bulk(session, statuses, ids)
    summary["processing_raw_data_files"] = delete_processing_raw_data_files(session, statuses, ids)
    summary["staged_raw_data_files"] = delete_staged_raw_data_files_from_processing(
        session, statuses, ids
    )
    summary["marked_deletion_possible"] = mark_catch_up(session, ids)
    session.commit()
    summary["deletion_possible_raw_data_files"] = process_deletion_possible_raw_data_files(
        session, statuses, ids
    )
    session.commit()
    summary["buffer_states"] = {name: _state_from(st).value for name, st in statuses._cache.items()}
    return summary


def mark_catch_up(session: Session, location_ids: list[int] | None = None) -> int:
    """The catch-up of stage 1 (:func:`mark_raw_data_files_for_deletion` over every
    package), at most once per ``DELETION_MARK_CATCHUP_SECONDS`` (0: every cycle).

    It is a safety net: stage 1 normally happens in the same transaction in which the
    deletion worker records that a package's last copy at the source site is DELETED.  It
    finds what that did not mark (data changed by hand, a restored LTA copy), at a cost
    that follows the backlog of PRESENT raw files, so it need not run in every cycle.  The
    time of the last run is kept in ``manager_state`` per scope, so that every process of
    the same scope shares it."""
    interval = float(settings.get("DELETION_MARK_CATCHUP_SECONDS", 0) or 0)
    key = "deletion:mark_catch_up" + (
        "" if location_ids is None else "@" + ",".join(str(i) for i in sorted(location_ids))
    )[:100]
    now = m.utcnow()
    row = session.get(m.ManagerState, key) if interval > 0 else None
    if row is not None and row.updated_at > now - timedelta(seconds=interval):
        return 0
    marked = mark_raw_data_files_for_deletion(session, location_ids=location_ids)
    if interval > 0:
        if row is None:
            session.add(m.ManagerState(key=key, value=str(marked), updated_at=now))
        else:
            row.value, row.updated_at = str(marked), now
    return marked


def delete_data_packages(verbose: bool = False) -> dict[str, Any]:
    """Run one deletion cycle: 1. DataTransferPackages from buffers, 2. RawDataPackages
    from SOURCE and LTA buffers, 3. raw files from processing locations, 4. staged files
    from processing locations, 5. raw files marked DELETION_POSSIBLE."""
    if verbose:
        configure_logging(verbose=True)
    db = DatabaseConnection()
    with db.session_scope() as session:
        summary = run_once(session)
    log.info(
        "deletion_cycle_completed", **{k: v for k, v in summary.items() if k != "buffer_states"}
    )
    return summary


def sleep_time() -> float:
    """DELETION_MANAGER_SLEEP_TIME, shortened while any location is under pressure."""
    states = []
    try:
        db = DatabaseConnection()
        with db.session_scope() as session:
            for loc in _active_locations(session, [LT.SOURCE, LT.BUFFER, LT.PROCESSING]):
                states.append(_state_from(get_buffer_status_for_location(loc.name, session)))
    except Exception as exc:  # the loop must go on even if the DB hiccups
        log.warning("sleep_time_status_unavailable", error=str(exc))
    return bs.manager_sleep_time(float(settings.DELETION_MANAGER_SLEEP_TIME), states)


# ---------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------


class DeletionTask(Task):
    """Base class of deletion tasks: late acknowledgement (a crashed worker's task is
    redelivered; the body is idempotent), automatic retry with exponential backoff for
    transient errors (database unreachable), and a log line on final failure.  Storage
    errors are not retried here: the copy goes DELETION_FAILED and a later cycle
    reschedules it, up to DELETION_MAX_RETRIES."""

    abstract = True
    acks_late = True
    autoretry_for = (OperationalError, RetryableError)
    retry_backoff = True
    retry_backoff_max = 600
    retry_jitter = True
    max_retries = 3

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        log.error(
            "deletion_task_failed", task=self.name, task_id=task_id, args=args, error=str(exc)
        )


def _revert_status(copy: m.PhysicalCopy) -> m.PhysicalCopyStatus:
    if (
        isinstance(copy, m.RawDataFilePhysicalCopy)
        and copy.deletion_possible_at is not None
        and copy.data_location.location_type in (LT.SOURCE, LT.BUFFER)
    ):
        return S.DELETION_POSSIBLE
    return S.PRESENT


def _delete_physical_copies(
    physical_copy_ids: Sequence[int], actor: str = "deletion_worker"
) -> dict[str, int]:
    """Body of every deletion task: double-check, delete from storage, record."""
    from ccat_data_transfer.storage import storage_for_location

    summary = {"deleted": 0, "skipped": 0, "failed": 0}
    ids = [int(i) for i in physical_copy_ids]
    if not ids:
        return summary
    db = DatabaseConnection()
    targets: list[dict[str, Any]] = []
    with db.session_scope() as session:
        copies = _load_copies(session, ids)
        copies = [c for c in copies if c.status in WORKER_ACCEPTS]
        roles = site_roles(session)
        file_ok = _file_copies_still_deletable(
            session, [c.id for c in copies if isinstance(c, m.RawDataFilePhysicalCopy)]
        )
        go: dict[int, m.PhysicalCopy] = {}
        why: dict[int, str] = {}  # the rule that allows each deletion, for the audit trail
        logs: list[dict[str, Any]] = []
        for c in copies:
            loc = c.data_location
            if loc.location_type == LT.LONG_TERM_ARCHIVE:
                decision = _keep(
                    "never delete from a LONG_TERM_ARCHIVE (worker guard)", "long_term_archive"
                )
            elif c.lost_at is not None:
                decision = _keep("the copy is marked lost", "lost")
            elif isinstance(c, m.RawDataFilePhysicalCopy):
                decision = (
                    _delete(
                        "rule re-checked by the worker",
                        "no_active_staging_job"
                        if loc.location_type == LT.PROCESSING
                        else "parent_package_archived",
                    )
                    if c.id in file_ok
                    else _keep("rule no longer holds at execution time", "rule_no_longer_holds")
                )
            else:
                decision = decide_copy(session, c, roles)
            if decision.deletable:
                go[c.id] = c
                why[c.id] = decision.code or "rule_holds"
                continue
            back = _revert_status(c)
            session.execute(
                update(PCT)
                .where(PCT.c.id == c.id, PCT.c.status.in_(list(WORKER_ACCEPTS)))
                .values(status=back, deletion_scheduled_at=None)
            )
            logs.append(
                _log_row(
                    c.id,
                    c.type,
                    loc,
                    _copy_size(c),
                    decision.code or "rule_no_longer_holds",
                    m.DeletionOutcome.SKIPPED,
                    f"{decision.reason}; back to {back.name}",
                    actor,
                )
            )
            summary["skipped"] += 1
        claimed = set()
        if go:
            claimed = set(
                session.execute(
                    update(PCT)
                    .where(PCT.c.id.in_(list(go)), PCT.c.status.in_(list(WORKER_ACCEPTS)))
                    .values(status=S.DELETION_IN_PROGRESS)
                    .returning(PCT.c.id)
                ).scalars()
            )
        for cid in sorted(claimed):
            c = go[cid]
            targets.append(
                {
                    "id": cid,
                    "type": c.type,
                    "location_id": c.data_location_id,
                    "location": c.data_location,
                    "path": _copy_path(c),
                    "size": _copy_size(c),
                    "package_id": getattr(c, "raw_data_package_id", None),
                    "reason": why.get(cid, "rule_holds"),
                }
            )
        _write_log_rows(session, logs)
    if not targets:
        return summary

    storages: dict[int, Any] = {}
    outcomes: list[tuple[dict[str, Any], bool, str]] = []
    for t in targets:
        try:
            if not t["path"]:
                raise ValueError("copy has no relative path")
            if t["location"].location_type == LT.LONG_TERM_ARCHIVE:  # unreachable; last guard
                raise PermissionError("refusing to delete from a LONG_TERM_ARCHIVE")
            if t["location_id"] not in storages:
                storages[t["location_id"]] = storage_for_location(t["location"])
            existed = storages[t["location_id"]].delete(t["path"])
            outcomes.append((t, True, "deleted" if existed else "object was already absent"))
        except Exception as exc:  # any storage failure: record, a later cycle retries
            outcomes.append((t, False, f"{type(exc).__name__}: {exc}"))

    with db.session_scope() as session:
        now = m.utcnow()
        ok_ids = [t["id"] for t, ok, _ in outcomes if ok]
        if ok_ids:
            session.execute(
                update(PCT)
                .where(PCT.c.id.in_(ok_ids), PCT.c.status == S.DELETION_IN_PROGRESS)
                .values(status=S.DELETED, deleted_at=now, last_error=None)
            )
        logs = []
        source_packages: list[int] = []
        roles = site_roles(session)
        for t, ok, message in outcomes:
            loc = t["location"]
            if ok:
                summary["deleted"] += 1
                logs.append(
                    _log_row(
                        t["id"],
                        t["type"],
                        loc,
                        t["size"],
                        t.get("reason", "rule_holds"),
                        m.DeletionOutcome.DELETED,
                        message,
                        actor,
                    )
                )
                if t["type"] == COPY_TYPE_RAW_DATA_PACKAGE and _is_source_site_location(loc, roles):
                    source_packages.append(t["package_id"])
            else:
                summary["failed"] += 1
                session.execute(
                    update(PCT)
                    .where(PCT.c.id == t["id"], PCT.c.status == S.DELETION_IN_PROGRESS)
                    .values(
                        status=S.DELETION_FAILED,
                        deletion_retry_count=PCT.c.deletion_retry_count + 1,
                        last_error=message[:2000],
                    )
                )
                logs.append(
                    _log_row(
                        t["id"],
                        t["type"],
                        loc,
                        t["size"],
                        "storage_error",
                        m.DeletionOutcome.FAILED,
                        message,
                        actor,
                    )
                )
        _write_log_rows(session, logs)
        if source_packages:
            # Side effect of the document: a package gone from the source site makes its
            # raw files DELETION_POSSIBLE (stage 1), in one bulk UPDATE.
            mark_raw_data_files_for_deletion(session, source_packages)
    return summary


def _delete_bulk_raw_data_files_internal(
    physical_copy_ids: Sequence[int], queue_name: str | None = None
) -> dict[str, int]:
    """The actual work of a bulk deletion: load the batch, re-check every rule against the
    DB in one query per rule (copies whose rule no longer holds go back to
    PRESENT / DELETION_POSSIBLE with a SKIPPED log), move the rest to
    DELETION_IN_PROGRESS, delete from storage, then mark DELETED (``deleted_at``) or
    DELETION_FAILED (retry count + 1, error kept) and write the audit trail."""
    return _delete_physical_copies(physical_copy_ids)


@app.task(
    bind=True, base=DeletionTask, name="ccat_data_transfer.deletion_manager.delete_physical_copy"
)
def delete_physical_copy(
    self: Task, physical_copy_id: int, queue_name: str | None = None
) -> dict[str, int]:
    """Delete one physical copy that is DELETION_SCHEDULED (the rule is checked again here
    before storage is touched; nothing happens if it no longer holds)."""
    return _delete_physical_copies([physical_copy_id])


@app.task(
    bind=True,
    base=DeletionTask,
    name="ccat_data_transfer.deletion_manager.delete_bulk_raw_data_files",
)
def delete_bulk_raw_data_files(
    self: Task, physical_copy_ids: list[int], queue_name: str | None = None
) -> dict[str, int]:
    """Delete a batch of raw-file copies at one location (one task per batch)."""
    return _delete_bulk_raw_data_files_internal(physical_copy_ids, queue_name)


@app.task(
    bind=True,
    base=DeletionTask,
    name="ccat_data_transfer.deletion_manager.delete_bulk_raw_data_packages",
)
def delete_bulk_raw_data_packages(
    self: Task, physical_copy_ids: list[int], queue_name: str | None = None
) -> dict[str, int]:
    """Delete a batch of RawDataPackage copies at one location."""
    return _delete_physical_copies(physical_copy_ids)


@app.task(
    bind=True,
    base=DeletionTask,
    name="ccat_data_transfer.deletion_manager.delete_bulk_data_transfer_packages",
)
def delete_bulk_data_transfer_packages(
    self: Task, physical_copy_ids: list[int], queue_name: str | None = None
) -> dict[str, int]:
    """Delete a batch of DataTransferPackage copies at one location."""
    return _delete_physical_copies(physical_copy_ids)


# ---------------------------------------------------------------------------------------
# Dry run: what would be deleted now, and what keeps the rest
# ---------------------------------------------------------------------------------------


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
    thing = _thing_of(copy)
    name = (
        getattr(thing, "file_name", None) or getattr(thing, "relative_path", None) or str(copy.id)
    )
    return PlanItem(
        physical_copy_id=copy.id,
        copy_type=copy.type,
        location=copy.data_location.name,
        location_type=copy.data_location.location_type.name,
        name=str(name),
        size_bytes=_copy_size(copy),
        status=copy.status.name,
        deletable=deletable,
        reason=reason,
    )


def deletion_plan(
    session: Session, location_name: str | None = None, max_kept: int | None = 1000
) -> list[PlanItem]:
    """Dry run: every copy the next cycle would schedule (with the rule that allows it) and,
    for copies kept, the rule that keeps them.  Nothing is changed."""
    statuses = _Statuses(session)
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
        (m.DataTransferPackagePhysicalCopy, _decide_dtp_copy),
        (m.RawDataPackagePhysicalCopy, _decide_rdp_copy),
    ):
        for _loc, pairs in _deletable_package_copies(session, cls, decide, location_name).items():
            for c, d in pairs:
                add(c, d.reason)
    for _loc, copies in find_deletable_processing_raw_data_files(session).items():
        for c in copies:
            add(c, "deletable: no active StagingJob references it")
    for _loc, copies in find_deletable_staged_raw_data_files_by_location(session).items():
        for c in copies:
            add(c, "deletable: STAGED package, all staging jobs inactive")
    for loc in _active_locations(session, [LT.SOURCE, LT.BUFFER]):
        if location_name is not None and loc.name != location_name:
            continue
        status = statuses.get(loc)
        cands = _deletion_possible_selection(
            session, loc, status, _cycle_limit(_state_from(status))
        )
        for copy in _load_copies(session, [c.copy_id for c in cands]):
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


__all__ = [
    "Decision",
    "DeletionTask",
    "PlanItem",
    "bytes_to_free",
    "can_delete_data_transfer_package_from_lta_buffer",
    "can_delete_data_transfer_package_from_source_buffer",
    "can_delete_raw_data_package_from_lta_buffer",
    "can_delete_raw_data_package_from_source_buffer",
    "claim_for_deletion",
    "decide_copy",
    "delete_bulk_data_transfer_packages",
    "delete_bulk_raw_data_files",
    "delete_bulk_raw_data_packages",
    "delete_data_packages",
    "delete_data_transfer_packages",
    "delete_physical_copy",
    "delete_processing_raw_data_files",
    "delete_raw_data_packages_bulk",
    "delete_staged_raw_data_files_from_processing",
    "deletion_plan",
    "explain_copy",
    "find_deletable_data_transfer_packages",
    "find_deletable_processing_raw_data_files",
    "find_deletable_raw_data_packages_by_location",
    "find_deletable_staged_raw_data_files_by_location",
    "get_buffer_status_for_location",
    "mark_raw_data_files_for_deletion",
    "process_deletion_possible_raw_data_files",
    "run_once",
    "should_delete_based_on_buffer_status",
]
