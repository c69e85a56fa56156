"""Consistency audit: does storage hold what the database says, and nothing else?

For each location the audit compares the copies the DB says hold bytes there with a
listing of the storage, and finds

* lost files: the DB says the copy is there, storage has no such object;
* dark data: storage has an object no live copy accounts for;
* drift: the object's size differs, or (sampled, or ``full``) its checksum does (the
  sampled check takes an S3 object's SHA-256 from its metadata without reading it;
  ``full`` re-reads every byte);
* temporary: leftovers of unfinished writes (temporary names, unpack work folders,
  unfinished S3 uploads) with their size and age; the janitor removes the old ones.

It reports and never deletes.  Copies found lost or corrupt get ``lost_at`` set, so the
deletion rules stop counting them as safe copies; an archive copy found so is recorded as
the fixity scan records it (``archive.proof.record_bad_bytes``: an ``archive_event``, its
repair queued).  A copy marked lost is unmarked only when a full re-read of its bytes
matches its checksum (never on the strength of a size or of stored metadata).
When the discrepancies exceed AUDIT_MAX_DISCREPANCY_FRACTION
of what was expected, the audit marks nothing (that pattern usually means an unmounted
disk or a wrong bucket, not lost data) but puts the location on *hold*: a systematic
fault is exactly when no copy elsewhere may be deleted on the strength of this location.
The hold (``data_location.audit_hold_at`` / ``audit_hold_reason``, an ``archive_event``
HOLD_SET, an error log line and an alert) stays until an operator lifts it
(:func:`clear_hold`, ``ccat_data_transfer audit hold clear``); the deletion rules read it.

Room in the house: core (called by the ``audit`` command).  Imports config, storage,
alerts, the archive trail of ``ccat_data_transfer.archive.proof`` and ccat_ops_db.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from ccat_data_transfer.archive.proof import CORRUPT, MISSING, record_bad_bytes, record_event
from ccat_data_transfer.buffers.janitor import db_keeper, leftovers
from ccat_data_transfer.core.alerts import send_alert
from ccat_data_transfer.core.config import settings
from ccat_data_transfer.core.errors import NotFoundError, ValidationError
from ccat_data_transfer.core.fileio import temporary_component
from ccat_data_transfer.core.logs import get_logger
from ccat_data_transfer.core.storage import Storage, StorageError, storage_for_location
from ccat_ops_db import models as m

log = get_logger(__name__)

# States in which a copy's bytes must be in storage.
HOLDING = (
    m.PhysicalCopyStatus.PRESENT,
    m.PhysicalCopyStatus.DELETION_POSSIBLE,
    m.PhysicalCopyStatus.DELETION_SCHEDULED,
    m.PhysicalCopyStatus.DELETION_FAILED,
)
# States in which the bytes may or may not be there (work in flight, unpacked tars).
UNCERTAIN = (m.PhysicalCopyStatus.DELETION_IN_PROGRESS, m.PhysicalCopyStatus.STAGED)


@dataclass
class Expected:
    copy_id: int
    copy_type: str
    path: str
    size: int | None
    checksum: str | None
    lost: bool


@dataclass
class LocationAudit:
    location: str
    expected: int = 0
    found: int = 0
    lost: list[dict[str, Any]] = field(default_factory=list)
    dark: list[dict[str, Any]] = field(default_factory=list)
    drift: list[dict[str, Any]] = field(default_factory=list)
    temporary: list[dict[str, Any]] = field(default_factory=list)
    checksums_checked: int = 0
    marked_lost: int = 0
    unmarked: int = 0
    aborted: str | None = None
    error: str | None = None
    held: bool = False

    @property
    def discrepancies(self) -> int:
        return len(self.lost) + len(self.dark) + len(self.drift)

    def as_dict(self) -> dict[str, Any]:
        return {
            "location": self.location,
            "expected": self.expected,
            "found": self.found,
            "lost": self.lost,
            "dark": self.dark,
            "drift": self.drift,
            "temporary": self.temporary,
            "checksums_checked": self.checksums_checked,
            "marked_lost": self.marked_lost,
            "unmarked": self.unmarked,
            "aborted": self.aborted,
            "error": self.error,
            "held": self.held,
        }


def _expected_copies(session: Session, location: m.DataLocation) -> tuple[list[Expected], set[str]]:
    """Copies that must have bytes at ``location`` and paths that may (in-flight work)."""
    pc = m.PhysicalCopy
    rows = session.execute(
        select(
            pc.id,
            pc.type,
            pc.status,
            pc.relative_path,
            pc.size,
            pc.checksum,
            pc.lost_at,
            m.RawDataFile.relative_path,
            m.RawDataFile.size,
            m.RawDataFile.checksum,
            m.RawDataPackage.relative_path,
            m.RawDataPackage.size,
            m.RawDataPackage.checksum,
            m.DataTransferPackage.relative_path,
            m.DataTransferPackage.size,
            m.DataTransferPackage.checksum,
        )
        .outerjoin(m.RawDataFile, m.RawDataFile.id == pc.raw_data_file_id)
        .outerjoin(m.RawDataPackage, m.RawDataPackage.id == pc.raw_data_package_id)
        .outerjoin(m.DataTransferPackage, m.DataTransferPackage.id == pc.data_transfer_package_id)
        .where(pc.data_location_id == location.id, pc.status.in_(HOLDING + UNCERTAIN))
    ).all()
    expected: list[Expected] = []
    maybe: set[str] = set()
    for row in rows:
        (
            cid,
            ctype,
            status,
            path,
            size,
            checksum,
            lost_at,
            f_path,
            f_size,
            f_sum,
            p_path,
            p_size,
            p_sum,
            d_path,
            d_size,
            d_sum,
        ) = row
        item = {
            "raw_data_file": (f_path, f_size, f_sum),
            "raw_data_package": (p_path, p_size, p_sum),
            "data_transfer_package": (d_path, d_size, d_sum),
        }.get(ctype, (None, None, None))
        path = path or item[0]
        if not path:
            continue
        if status in UNCERTAIN:
            maybe.add(path)
            continue
        expected.append(
            Expected(
                copy_id=cid,
                copy_type=ctype,
                path=path,
                size=size if size is not None else item[1],
                checksum=(checksum or item[2] or None),
                lost=lost_at is not None,
            )
        )
    return expected, maybe


def _temporary_leftovers(
    session: Session, location: m.DataLocation, storage: Any
) -> list[dict[str, Any]]:
    """The storage's temporary names (not dark data: no write finished there), logged;
    those the database keeps (a copy under them, live work) say why (``kept``)."""
    found = leftovers(storage, keep=db_keeper(session, location))
    for item in found:
        log.warning("audit_temporary_leftover", location=location.name, **item)
    return found


def audit_location(
    session: Session,
    location: m.DataLocation,
    full: bool = False,
    sample_fraction: float | None = None,
    max_fraction: float | None = None,
    mark: bool = True,
    rng: random.Random | None = None,
) -> LocationAudit:
    """Audit one location; marks lost copies unless the discrepancies look systemic."""
    report = LocationAudit(location=location.name)
    sample_fraction, max_fraction = _audit_fractions(full, sample_fraction, max_fraction)
    rng = rng or random.Random()
    read = _read_storage(session, location, report)
    if read is None:
        return report
    storage, listing = read

    expected, maybe = _expected_copies(session, location)
    report.expected = len(expected)
    known_paths = {e.path for e in expected} | maybe
    # Metadata sidecars written next to archived packages are accounted for by them.
    known_paths |= {f"{p}.json" for p in list(known_paths)}

    lost_ids, found_again = _compare_copies(
        expected, listing, storage, report, rng, sample_fraction, full
    )

    for path, size in sorted(listing.items()):
        if path not in known_paths:
            report.dark.append({"path": path, "size": size})

    if _hold_if_systemic(session, location, report, max_fraction):
        return report

    if mark:
        _mark_copies(session, location, report, lost_ids, found_again)
    _log_findings(location, report)
    return report


def _audit_fractions(
    full: bool, sample_fraction: float | None, max_fraction: float | None
) -> tuple[float, float]:
    """The checksum sample fraction (1.0 for a full audit) and the discrepancy limit,
    from the arguments or else the settings."""
    sample_fraction = (
        1.0
        if full
        else float(
            sample_fraction
            if sample_fraction is not None
            else settings.get("AUDIT_CHECKSUM_SAMPLE_FRACTION", 0.01)
        )
    )
    max_fraction = float(
        max_fraction
        if max_fraction is not None
        else settings.get("AUDIT_MAX_DISCREPANCY_FRACTION", 0.1)
    )
    return sample_fraction, max_fraction


def _read_storage(
    session: Session, location: m.DataLocation, report: LocationAudit
) -> tuple[Storage, dict[str, int]] | None:
    """Storage phase: the location's files by path (temporary names aside) and its
    temporary leftovers; None (``report.error`` set) if the storage is unreachable."""
    try:
        storage = storage_for_location(location)
        listing = {
            info.path: info.size for info in storage.list("") if not temporary_component(info.path)
        }
        report.temporary = _temporary_leftovers(session, location, storage)
    except StorageError as exc:
        report.error = f"storage unreachable: {exc}"
        log.error("audit_storage_unreachable", location=location.name, error=str(exc))
        return None
    return storage, listing


def _compare_copies(
    expected: list[Expected],
    listing: dict[str, int],
    storage: Storage,
    report: LocationAudit,
    rng: random.Random,
    sample_fraction: float,
    full: bool,
) -> tuple[list[int], list[int]]:
    """Storage phase: each expected copy is found, lost or drifted (size, sampled checksum);
    returns the copy ids to mark lost and those found again."""
    lost_ids: list[int] = []
    found_again: list[int] = []
    for exp in expected:
        size = listing.get(exp.path)
        if size is None and temporary_component(exp.path):
            # Listings hide what lies under a temporary name; a row from before filing
            # refused such paths is looked at directly, not reported lost.
            info = storage.stat(exp.path)
            size = info.size if info is not None else None
        if size is None:
            report.lost.append(
                {"physical_copy_id": exp.copy_id, "copy_type": exp.copy_type, "path": exp.path}
            )
            lost_ids.append(exp.copy_id)
            continue
        report.found += 1
        problem = None
        if exp.size is not None and size != exp.size:
            problem = f"size {size} != recorded {exp.size}"
        elif exp.checksum and (exp.lost or rng.random() < sample_fraction):
            report.checksums_checked += 1
            # The sampled check trusts a SHA-256 stored with the object (S3 metadata: one
            # HEAD, no bytes read); a full audit re-reads every byte, and so does the check
            # of a copy marked lost: only a full re-read clears a finding of bad bytes (the
            # metadata survives a same-size overwrite of the bytes).
            actual = storage.sha256(exp.path, reread=full or exp.lost)
            if actual.lower() != exp.checksum.lower():
                problem = f"sha256 {actual[:12]}... != recorded {exp.checksum[:12]}..."
        if problem:
            report.drift.append(
                {
                    "physical_copy_id": exp.copy_id,
                    "copy_type": exp.copy_type,
                    "path": exp.path,
                    "problem": problem,
                }
            )
            lost_ids.append(exp.copy_id)
        elif exp.lost:
            found_again.append(exp.copy_id)
    return lost_ids, found_again


def _hold_if_systemic(
    session: Session, location: m.DataLocation, report: LocationAudit, max_fraction: float
) -> bool:
    """Too many discrepancies look like a storage or configuration fault: abort, put the
    location on hold and return True (nothing is marked)."""
    denominator = max(report.expected, 1)
    if report.discrepancies and report.discrepancies / denominator > max_fraction:
        report.aborted = (
            f"{report.discrepancies} discrepancies for {report.expected} expected copies "
            f"exceed AUDIT_MAX_DISCREPANCY_FRACTION={max_fraction}; is the storage mounted "
            "and the location configured right?  Nothing was marked; the location is on "
            "hold until an operator clears it."
        )
        log.warning("audit_aborted", location=location.name, reason=report.aborted)
        report.held = set_hold(
            session,
            location,
            f"audit: {len(report.lost)} lost, {len(report.drift)} drift, "
            f"{len(report.dark)} dark of {report.expected} expected copies "
            f"(over AUDIT_MAX_DISCREPANCY_FRACTION={max_fraction})",
        )
        return True
    return False


def _mark_copies(
    session: Session,
    location: m.DataLocation,
    report: LocationAudit,
    lost_ids: list[int],
    found_again: list[int],
) -> None:
    """DB phase: mark the lost copies and clear the mark of those found again."""
    now = m.utcnow()
    if lost_ids:
        report.marked_lost = session.execute(
            update(m.PhysicalCopy)
            .where(m.PhysicalCopy.id.in_(lost_ids), m.PhysicalCopy.lost_at.is_(None))
            .values(lost_at=now, last_error="audit: missing or corrupt in storage")
        ).rowcount
    if location.location_type == m.LocationType.LONG_TERM_ARCHIVE:
        # An archive copy found bad: the same finding as the fixity scan's (an
        # archive_event, its repair queued), whatever reader found it.
        drifted = {d["physical_copy_id"]: d["problem"] for d in report.drift}
        for copy_id in lost_ids:
            record_bad_bytes(
                session,
                copy_id,
                "audit",
                drifted.get(copy_id, "no such object in storage"),
                outcome=CORRUPT if copy_id in drifted else MISSING,
            )
    if found_again:
        report.unmarked = session.execute(
            update(m.PhysicalCopy).where(m.PhysicalCopy.id.in_(found_again)).values(lost_at=None)
        ).rowcount


def _log_findings(location: m.DataLocation, report: LocationAudit) -> None:
    """Log every lost, drifted and dark item of the report."""
    for item in report.lost:
        log.error("audit_lost_copy", location=location.name, **item)
    for item in report.drift:
        log.error("audit_drift", location=location.name, **item)
    for item in report.dark:
        log.warning(
            "audit_dark_data", location=location.name, path=item["path"], size_bytes=item["size"]
        )


def run_audit(
    session: Session,
    location_name: str | None = None,
    full: bool = False,
    sample_fraction: float | None = None,
    mark: bool = True,
) -> list[LocationAudit]:
    """Audit one named location or every active one."""
    stmt = select(m.DataLocation).where(m.DataLocation.active.is_(True))
    if location_name:
        stmt = select(m.DataLocation).where(m.DataLocation.name == location_name)
    locations = session.scalars(stmt.order_by(m.DataLocation.name)).all()
    if not locations:
        raise NotFoundError(f"no data location named {location_name!r}; see `list-locations`")
    reports = []
    for loc in locations:
        if loc.storage_type == m.StorageType.TAPE:
            reports.append(LocationAudit(location=loc.name, error="tape locations are not audited"))
            continue
        reports.append(
            audit_location(session, loc, full=full, sample_fraction=sample_fraction, mark=mark)
        )
    return reports


# ---------------------------------------------------------------------------------------
# Holds: a location whose audit found a systematic fault
# ---------------------------------------------------------------------------------------


def set_hold(session: Session, location: m.DataLocation, reason: str, actor: str = "audit") -> bool:
    """Put ``location`` on hold (in the caller's transaction): no deletion may rely on its
    copies until an operator clears it.  A location already held keeps its first hold
    (and its time); True only when the hold is new, which is when the HOLD_SET event is
    written and the alert sent."""
    log.error("audit_hold", location=location.name, reason=reason)
    new = session.execute(
        update(m.DataLocation)
        .where(m.DataLocation.id == location.id, m.DataLocation.audit_hold_at.is_(None))
        .values(audit_hold_at=m.utcnow(), audit_hold_reason=reason)
    ).rowcount
    if not new:
        return False
    record_event(session, "HOLD_SET", location_id=location.id, actor=actor, message=reason)
    send_alert(
        {
            "event": "audit_hold",
            "location": location.name,
            "site": location.site.name if location.site else None,
            "reason": reason,
        }
    )
    return True


def list_holds(session: Session) -> list[dict[str, Any]]:
    """Every location on hold: name, site, since, reason (oldest first)."""
    rows = session.scalars(
        select(m.DataLocation)
        .where(m.DataLocation.audit_hold_at.is_not(None))
        .order_by(m.DataLocation.audit_hold_at, m.DataLocation.name)
    ).all()
    return [
        {
            "location": loc.name,
            "site": loc.site.name if loc.site else None,
            "since": loc.audit_hold_at,
            "reason": loc.audit_hold_reason,
        }
        for loc in rows
    ]


def clear_hold(
    session: Session, location_name: str, reason: str | None = None, actor: str = "operator"
) -> dict[str, Any]:
    """Lift the hold of ``location_name`` (an operator's decision, with its reason in the
    HOLD_CLEARED event); NotFoundError for an unknown location, ValidationError for one
    not on hold.  Returns what was cleared."""
    location = session.scalars(select(m.DataLocation).filter_by(name=location_name)).first()
    if location is None:
        raise NotFoundError(f"no data location named {location_name!r}; see `list-locations`")
    if location.audit_hold_at is None:
        raise ValidationError(f"location {location_name!r} is not on hold")
    held = {
        "location": location.name,
        "since": location.audit_hold_at,
        "reason": location.audit_hold_reason,
    }
    location.audit_hold_at = None
    location.audit_hold_reason = None
    message = f"cleared: {reason or 'no reason given'} (hold was: {held['reason']})"
    record_event(session, "HOLD_CLEARED", location_id=location.id, actor=actor, message=message)
    log.warning("audit_hold_cleared", location=location.name, actor=actor, reason=reason)
    return held
