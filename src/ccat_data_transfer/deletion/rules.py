"""The deletion rules of the user's document, one decision function per row of its
matrix: whether one copy may be deleted now, and why.

Every answer is a :class:`Decision` (``deletable``, a ``code`` for machines and a
``reason`` a person reads); the same answer feeds the worker's double-check, the dry run
(``deletion.plan``) and the audit trail.  The functions read the facts they need (the
package's archive copies, its transfers) through the session and change nothing.

* RawDataPackage: :func:`decide_raw_data_package` (rows "SOURCE buffer" and "LTA site
  buffer": :func:`can_delete_raw_data_package_from_source_buffer`,
  :func:`can_delete_raw_data_package_from_lta_buffer`);
* DataTransferPackage: :func:`decide_data_transfer_package` (and its two ``can_delete_*``);
* raw file copies: :func:`decide_raw_data_file_copy` (the set-based form of these rules is
  in ``deletion.rule_sql``);
* any copy: :func:`decide_copy`.

Room in the house: core of the deletion stage; imports ``deletion.base``,
``deletion.rule_sql``, ``deletion.pressure``, config and ``ccat_ops_db``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, joinedload

from ccat_data_transfer.config.config import settings
from ccat_data_transfer.deletion.base import LT, S
from ccat_data_transfer.deletion.pressure import should_delete_based_on_buffer_status
from ccat_data_transfer.deletion.rule_sql import _file_copies_still_deletable
from ccat_ops_db import models as m


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


def _keep_archive(
    location: m.DataLocation, why: str = "permanent storage, never deleted automatically"
) -> Decision:
    """The first rule of every row: nothing is deleted automatically from an LTA."""
    return _keep(f"{location.name} is a LONG_TERM_ARCHIVE: {why}", "long_term_archive")


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
        return _keep_archive(location)
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
        return _keep_archive(
            location,
            "DataTransferPackages are not stored there and nothing is deleted automatically",
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
        return _keep_archive(loc, "never deleted automatically")
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
        return _keep_archive(copy.data_location)
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


def _decide_rdp_copy(session: Session, copy: Any, roles: SiteRoles) -> Decision:
    return decide_raw_data_package(session, copy.raw_data_package, copy.data_location, roles)


def _decide_dtp_copy(session: Session, copy: Any, roles: SiteRoles) -> Decision:
    return decide_data_transfer_package(
        session, copy.data_transfer_package, copy.data_location, roles
    )
