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

The archive-proof rule for one package's LTA copies (what counts as proof, how a copy is
described in a reason) is in ``deletion.proof``.

Room in the house: core of the deletion stage; imports ``deletion.base``,
``deletion.rule_sql``, ``deletion.proof``, ``deletion.pressure``, config and
``ccat_ops_db``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, joinedload

from ccat_data_transfer.archive.proof import proof_cutoff, proof_max_age
from ccat_data_transfer.core.config import settings
from ccat_data_transfer.deletion.base import LT, S
from ccat_data_transfer.deletion.pressure import should_delete_based_on_buffer_status
from ccat_data_transfer.deletion.proof import (
    could_prove,
    counts_as_proof,
    lta_copies_of_package,
    no_lta_detail,
    verified_ago,
)
from ccat_data_transfer.deletion.rule_sql import (
    file_copies_still_deletable,
    min_verified_lta_copies,
)
from ccat_ops_db import models as m


@dataclass(frozen=True)
class Decision:
    """Whether one copy may be deleted now, and the rule that says so."""

    deletable: bool
    reason: str
    code: str = ""

    def __bool__(self) -> bool:
        return self.deletable


def keep_because(reason: str, code: str = "kept") -> Decision:
    return Decision(False, f"kept: {reason}", code)


#: Code of a copy kept only because the archive copies' proof is missing or stale.
WAITING_FOR_PROOF = "waiting_for_proof"
#: Code of a copy whose deletion was decided on proof taken before the decision, and
#: that waits (as it was: scheduled) for the archives' proof taken after it (the worker).
WAITING_FOR_PROOF_AFTER_DECISION = "waiting_for_proof_after_decision"


def delete_because(reason: str, code: str) -> Decision:
    return Decision(True, f"deletable: {reason}", code)


def _keep_archive(
    location: m.DataLocation, why: str = "permanent storage, never deleted automatically"
) -> Decision:
    """The first rule of every row: nothing is deleted automatically from an LTA."""
    return keep_because(f"{location.name} is a LONG_TERM_ARCHIVE: {why}", "long_term_archive")


@dataclass
class SiteRoles:
    """Which sites are source sites and which are LTA sites (from the topology in the DB)."""

    source_site_ids: set[int] = field(default_factory=set)
    lta_site_ids: set[int] = field(default_factory=set)
    # Sites with an active LTA location on an active site: the replication targets.
    active_lta_site_ids: set[int] = field(default_factory=set)
    site_names: dict[int, str] = field(default_factory=dict)


def site_roles(session: Session) -> SiteRoles:
    rows = session.execute(
        select(
            m.DataLocation.site_id,
            m.DataLocation.location_type,
            m.DataLocation.active,
            m.Site.active,
            m.Site.name,
        ).join(m.Site, m.Site.id == m.DataLocation.site_id)
    ).all()
    return site_roles_from(rows)


def site_roles_from(rows: Any) -> SiteRoles:
    """The site roles from (site id, location type, location active, site active, site
    name) of every location of a site."""
    roles = SiteRoles()
    for site_id, ltype, loc_active, site_active, site_name in rows:
        roles.site_names[site_id] = site_name
        if ltype == LT.SOURCE:
            roles.source_site_ids.add(site_id)
        elif ltype == LT.LONG_TERM_ARCHIVE:
            roles.lta_site_ids.add(site_id)
            if loc_active and site_active:
                roles.active_lta_site_ids.add(site_id)
    return roles


def is_source_site_location(location: m.DataLocation, roles: SiteRoles) -> bool:
    return (
        location.location_type in (LT.SOURCE, LT.BUFFER)
        and location.site_id in roles.source_site_ids
    )


def _is_lta_site_buffer(location: m.DataLocation, roles: SiteRoles) -> bool:
    return location.location_type == LT.BUFFER and location.site_id in roles.lta_site_ids


def _held_or_frozen(
    location: m.DataLocation, packages: Sequence[m.RawDataPackage | None]
) -> Decision | None:
    """Nothing is deleted at a location under an audit hold, nor any copy of a frozen
    package (the audit and fixity set them; an operator lifts them)."""
    if location.audit_hold_at is not None:
        return keep_because(
            f"{location.name} is under an audit hold since "
            f"{location.audit_hold_at.isoformat(timespec='seconds')} "
            f"({location.audit_hold_reason or 'no reason given'}); nothing is deleted there "
            "until an operator clears it",
            "audit_hold",
        )
    frozen = [p for p in packages if p is not None and p.frozen_at is not None]
    if frozen:
        return keep_because(
            "package "
            + ", ".join(
                f"{p.file_name} is frozen ({p.frozen_reason or 'no reason given'})" for p in frozen
            )
            + "; no copy of a frozen package is deleted",
            "frozen",
        )
    return None


def _proof_of(
    session: Session,
    package: m.RawDataPackage,
    location: m.DataLocation,
    lta: list[Any],
    missing: Callable[[str], Decision],
    need: int | None = None,
    site_id: int | None = None,
    decided_at: datetime | None = None,
) -> tuple[Decision | None, list[Any]]:
    """The proof rule for deleting the copy at ``location`` (SQL:
    ``rule_sql._lta_present_exists``), over the package's LTA copies ``lta``: at least
    ``need`` (default :func:`min_verified_lta_copies` of ``location``) count as proof -
    verified within LTA_PROOF_MAX_AGE_SECONDS (and, with ``decided_at``, the worker's
    re-check, at or after the decision to delete) and read back in full since written.
    Returns (None, the proving copies) when it holds; else the Decision that keeps the
    copy: WAITING_FOR_PROOF (naming the copies to verify) when enough copies could prove
    it once verified, else ``missing(detail)``."""
    need = min_verified_lta_copies(location) if need is None else need
    cutoff = proof_cutoff()
    if decided_at is not None:
        cutoff = max(cutoff, decided_at)
    proven = [c for c in lta if counts_as_proof(c, package, cutoff)]
    if len(proven) >= need:
        return None, proven
    detail = no_lta_detail(session, package, lta, site_id)
    could = [c for c in lta if could_prove(c, package)]
    if len(could) < need:
        return missing(detail), proven
    stale = [c for c in could if c not in proven]
    minutes = int(proof_max_age().total_seconds() // 60)
    when = (
        f"verified within {minutes} min"
        if decided_at is None
        else f"verified after the deletion was decided ({decided_at.isoformat(timespec='seconds')})"
    )
    reason = (
        f"waiting for proof: {need} LONG_TERM_ARCHIVE cop{'y' if need == 1 else 'ies'} "
        f"{when} and read back in full since written needed, {len(proven)} so ({detail}); "
        "a verification of "
        + ", ".join(c.data_location.name for c in stale)
        + " at its site is asked for"
    )
    return keep_because(reason, WAITING_FOR_PROOF), proven


def _too_few(need: int, what: str, code: str = "no_lta_copy") -> Callable[[str], Decision]:
    """The Decision of :func:`_proof_of` when too few LTA copies could prove the package."""

    def missing(detail: str) -> Decision:
        if need <= 1:
            return keep_because(f"no PRESENT copy at {what} ({detail})", code)
        return keep_because(f"{need} verified copies at {what} needed ({detail})", code)

    return missing


def _decide_rdp_source(
    session: Session,
    package: m.RawDataPackage,
    location: m.DataLocation,
    roles: SiteRoles,
    decided_at: datetime | None = None,
) -> Decision:
    if not is_source_site_location(location, roles):
        return keep_because(f"{location.name} is not a BUFFER (or SOURCE) at a source site")
    lta = lta_copies_of_package(session, package.id)
    missing = _too_few(min_verified_lta_copies(location), "a LONG_TERM_ARCHIVE location")
    kept, proven = _proof_of(session, package, location, lta, missing, decided_at=decided_at)
    if kept is not None and kept.code != WAITING_FOR_PROOF:
        return kept
    if package.state != m.PackageState.ARCHIVED:
        return keep_because(
            f"package state is {package.state.name}, not ARCHIVED (source data is deleted "
            "only when ARCHIVED)",
            "not_archived",
        )
    if kept is not None:
        return kept
    names = ", ".join(f"{c.data_location.name} ({verified_ago(c.verified_at)})" for c in proven)
    return delete_because(f"ARCHIVED and PRESENT at LONG_TERM_ARCHIVE {names}", "archived_in_lta")


def _decide_rdp_lta_buffer(
    session: Session,
    package: m.RawDataPackage,
    location: m.DataLocation,
    roles: SiteRoles,
    decided_at: datetime | None = None,
) -> Decision:
    if not _is_lta_site_buffer(location, roles):
        return keep_because(f"{location.name} is not a BUFFER at an LTA site")
    lta = lta_copies_of_package(session, package.id)
    here = [c for c in lta if c.data_location.site_id == location.site_id]
    site = roles.site_names.get(location.site_id, "?")
    missing = _too_few(1, f"the LONG_TERM_ARCHIVE of the same site {site}", "no_same_site_lta_copy")
    # The same site's archive holds it (with proof), and as many proofs as any deletion.
    kept, proven = _proof_of(
        session,
        package,
        location,
        here,
        missing,
        need=1,
        site_id=location.site_id,
        decided_at=decided_at,
    )
    if kept is None:
        missing = _too_few(min_verified_lta_copies(location), "a LONG_TERM_ARCHIVE location")
        kept, _ = _proof_of(session, package, location, lta, missing, decided_at=decided_at)
    if kept is not None:
        return kept
    names = ", ".join(f"{c.data_location.name} ({verified_ago(c.verified_at)})" for c in proven)
    return delete_because(
        f"PRESENT at the same site's LONG_TERM_ARCHIVE {names}", "same_site_lta_present"
    )


def decide_raw_data_package(
    session: Session,
    package: m.RawDataPackage,
    location: m.DataLocation,
    roles: SiteRoles | None = None,
    decided_at: datetime | None = None,
) -> Decision:
    """The deletion rule for a RawDataPackage copy at ``location``; ``decided_at`` (the
    worker's re-check): the archives' proof must be taken at or after it."""
    roles = roles or site_roles(session)
    ltype = location.location_type
    if ltype == LT.LONG_TERM_ARCHIVE:
        return _keep_archive(location)
    if ltype == LT.PROCESSING:
        return keep_because(
            "RawDataPackages at a PROCESSING location are cleaned up through the STAGED rule",
            "processing_package",
        )
    return _site_rules(
        location,
        [package],
        is_source_site_location(location, roles)
        and (lambda: _decide_rdp_source(session, package, location, roles, decided_at)),
        _is_lta_site_buffer(location, roles)
        and (lambda: _decide_rdp_lta_buffer(session, package, location, roles, decided_at)),
    )


def _site_rules(
    location: m.DataLocation,
    packages: Sequence[m.RawDataPackage | None],
    source_rule: Any,
    lta_rule: Any,
) -> Decision:
    """A location at a source site and/or an LTA site: nothing goes while the location is
    held or one of ``packages`` frozen (:func:`_held_or_frozen`); then every rule that
    applies must allow the deletion, and the first one that keeps the copy gives the
    reason.  A falsy rule does not apply; a callable rule is evaluated only when it
    applies."""
    guard = _held_or_frozen(location, packages)
    if guard is not None:
        return guard
    rules = [rule for rule in (source_rule, lta_rule) if rule]
    if not rules:
        return keep_because(
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
        return keep_because(f"{location.name} is not a BUFFER at a source site")
    transfers = [
        t
        for t in _completed_transfers(session, dtp.id)
        if t.destination_location.site_id in roles.lta_site_ids
    ]
    done = [t for t in transfers if _transfer_done(t)]
    if not done:
        detail = "; ".join(_describe_transfer(t) for t in transfers) or "no transfer to an LTA site"
        return keep_because(
            "no DataTransfer to an LTA site with status COMPLETED and unpack_status COMPLETED "
            f"({detail})",
            "not_unpacked_at_lta_site",
        )
    names = ", ".join(t.destination_location.name for t in done)
    return delete_because(
        f"transferred and unpacked at LTA-site buffer {names}", "transfer_and_unpack_completed"
    )


def _decide_dtp_lta_buffer(
    session: Session, dtp: m.DataTransferPackage, location: m.DataLocation, roles: SiteRoles
) -> Decision:
    if not _is_lta_site_buffer(location, roles):
        return keep_because(f"{location.name} is not a BUFFER at an LTA site")
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
        return keep_because(
            "not yet transferred and unpacked at every LTA site: missing " + ", ".join(missing),
            "not_replicated_to_all_lta_sites",
        )
    return delete_because(
        "transferred and unpacked at every LTA site", "replicated_to_all_lta_sites"
    )


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
        return keep_because(
            f"no rule deletes a DataTransferPackage from a {location.location_type.name} location"
        )
    # A transfer package holds the bytes of its raw data packages: kept while one is frozen.
    held = list(
        session.scalars(
            select(m.RawDataPackage).where(
                m.RawDataPackage.data_transfer_package_id == dtp.id,
                m.RawDataPackage.frozen_at.is_not(None),
            )
        )
    )
    return _site_rules(
        location,
        held,
        location.site_id in roles.source_site_ids
        and (lambda: _decide_dtp_source(session, dtp, location, roles)),
        location.site_id in roles.lta_site_ids
        and (lambda: _decide_dtp_lta_buffer(session, dtp, location, roles)),
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


def retention_minutes(location: m.DataLocation) -> int:
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
    guard = _held_or_frozen(loc, [package])
    if guard is not None:
        return guard
    if loc.location_type == LT.PROCESSING:
        if package is None:
            return keep_because("the file belongs to no RawDataPackage")
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
            return keep_because(
                "active StagingJob(s) "
                + ", ".join(str(j.id) for j in jobs)
                + f" use package {package.file_name}",
                "active_staging_job",
            )
        if copy.id not in file_copies_still_deletable(session, [copy.id]):
            return keep_because(
                f"package {package.file_name} has no PRESENT copy at a LONG_TERM_ARCHIVE; this "
                "copy may be the last one",
                "no_lta_copy",
            )
        return delete_because("no active StagingJob references it", "no_active_staging_job")
    if loc.location_type not in (LT.SOURCE, LT.BUFFER):
        return keep_because(f"no rule deletes raw files from a {loc.location_type.name} location")
    if copy.status == S.PRESENT or copy.deletion_possible_at is None:
        where = package.file_name if package else "no package yet"
        return keep_because(
            f"parent package ({where}) has not left the source-site buffer; files become "
            "DELETION_POSSIBLE then",
            "parent_package_not_deleted",
        )
    if copy.id not in file_copies_still_deletable(session, [copy.id]):
        return _raw_file_kept_for_its_package(session, package, loc)
    until = copy.deletion_possible_at + timedelta(minutes=retention_minutes(loc))
    if until <= m.utcnow():
        return delete_because(
            "DELETION_POSSIBLE and retention period expired", "parent_package_archived"
        )
    if should_delete_based_on_buffer_status(loc, buffer_status):
        return delete_because(
            f"DELETION_POSSIBLE; {loc.name} is under pressure (oldest first until below threshold)",
            "buffer_pressure",
        )
    return keep_because(
        f"retention until {until.isoformat(timespec='seconds')} (DELETION_POSSIBLE since "
        f"{copy.deletion_possible_at.isoformat(timespec='seconds')}, retention "
        f"{retention_minutes(loc)} min) and {loc.name} is not under pressure",
        "retention",
    )


def _raw_file_kept_for_its_package(
    session: Session, package: m.RawDataPackage | None, location: m.DataLocation
) -> Decision:
    """Why a DELETION_POSSIBLE raw-file copy at ``location`` fails the package half of its
    rule (``rule_sql.package_archived_in_lta``), in words: not ARCHIVED, or the proof rule."""
    missing = _too_few(min_verified_lta_copies(location), "a LONG_TERM_ARCHIVE location")
    if package is not None and package.state == m.PackageState.ARCHIVED:
        lta = lta_copies_of_package(session, package.id)
        kept, _ = _proof_of(session, package, location, lta, missing)
        if kept is not None:
            return kept
    return keep_because(
        "parent package is not ARCHIVED with a PRESENT copy at a LONG_TERM_ARCHIVE",
        "no_lta_copy",
    )


def decide_copy(
    session: Session,
    copy: m.PhysicalCopy,
    roles: SiteRoles | None = None,
    buffer_status: dict | None = None,
    decided_at: datetime | None = None,
) -> Decision:
    """The rule for any physical copy (used by the worker's double-check, plan and
    explain); ``decided_at`` (the worker's double-check of a package copy): the archives'
    proof must be taken at or after the decision to delete."""
    if copy.data_location.location_type == LT.LONG_TERM_ARCHIVE:
        return _keep_archive(copy.data_location)
    if copy.lost_at is not None:
        return keep_because("the copy is marked lost (nothing to delete)", "lost")
    if isinstance(copy, m.RawDataPackagePhysicalCopy):
        return decide_raw_data_package(
            session, copy.raw_data_package, copy.data_location, roles, decided_at
        )
    if isinstance(copy, m.DataTransferPackagePhysicalCopy):
        return decide_data_transfer_package(
            session, copy.data_transfer_package, copy.data_location, roles
        )
    if isinstance(copy, m.RawDataFilePhysicalCopy):
        return decide_raw_data_file_copy(session, copy, buffer_status)
    return keep_because(f"unknown copy type {copy.type}")


def decide_rdp_copy(session: Session, copy: Any, roles: SiteRoles) -> Decision:
    return decide_raw_data_package(session, copy.raw_data_package, copy.data_location, roles)


def decide_dtp_copy(session: Session, copy: Any, roles: SiteRoles) -> Decision:
    return decide_data_transfer_package(
        session, copy.data_transfer_package, copy.data_location, roles
    )
