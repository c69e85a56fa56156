"""Proof that an archive copy holds what the database says, taken where its bytes are.

A row that says PRESENT is a claim, not a proof.  Before the last copies outside the
archives go, the deletion rules ask for a *fresh* proof of the LTA copies (see
``LTA_PROOF_MAX_AGE_SECONDS``): a worker at the LTA's site looked at the object itself.
This module is that look, and the request for it:

* :func:`request_verification` (managers) queues a verification of some archive copies
  on each copy's own ``archive_verification`` queue, so a worker of that site runs it,
  and stamps ``verification_requested_at`` so the same copies are not queued again while
  the request is outstanding;
* :func:`verify_copies` (the task body) checks each copy in three phases: read what the
  DB expects (one short transaction), look at storage (no transaction open: a stat, and
  with ``full`` a re-read of every byte through SHA-256), record the outcome.  A copy
  whose object exists with the expected size (and checksum) gets ``verified_at`` (and
  ``fixity_checked_at``); a copy whose object is missing or differs is marked
  ``lost_at``, so no rule counts it any more, and an ``archive_event`` says what was
  found.  What happens next to a bad copy (repair from another site, or a freeze) is
  :mod:`ccat_data_transfer.fixity`'s concern, called through ``on_bad_copies``.

The expected checksum is the *package's*, not the copy row's own: a copy row that
records another checksum than its package is itself a discrepancy.

Room in the house: tasks + core.  Imports the Celery app, config, database, storage,
queue routing and ``ccat_ops_db``; never a manager.
"""

from __future__ import annotations

import importlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from ccat_data_transfer.core.attempts import (
    beat_copies,
    claim_copies,
    new_attempt,
    release_copies,
)
from ccat_data_transfer.core.celery_app import app
from ccat_data_transfer.core.config import settings
from ccat_data_transfer.core.database import DatabaseConnection
from ccat_data_transfer.core.liveness import beating
from ccat_data_transfer.core.logs import get_logger
from ccat_data_transfer.core.operation_types import OperationType
from ccat_data_transfer.core.queues import route_task_by_location
from ccat_ops_db import models as m

log = get_logger(__name__)

PCT = m.PhysicalCopy.__table__
CopyClaim = m.CopyClaim

#: Outcomes of one copy's verification, also the ``archive_event.event`` written for it.
VERIFIED = "VERIFIED"
FIXITY_OK = "FIXITY_OK"
MISSING = "MISSING"
CORRUPT = "CORRUPT"
UNREACHABLE = "UNREACHABLE"

__all__ = [
    "CORRUPT",
    "FIXITY_OK",
    "MISSING",
    "UNREACHABLE",
    "VERIFIED",
    "Finding",
    "proof_max_age",
    "proof_cutoff",
    "record_event",
    "request_verification",
    "verify_archive_copies",
    "verify_copies",
]


def proof_max_age() -> timedelta:
    """How old a verification may be and still count as proof (LTA_PROOF_MAX_AGE_SECONDS)."""
    return timedelta(seconds=float(settings.get("LTA_PROOF_MAX_AGE_SECONDS", 3600)))


def proof_cutoff(now: datetime | None = None) -> datetime:
    """Verifications at or after this time are fresh proof."""
    return (now or m.utcnow()) - proof_max_age()


def _request_timeout() -> timedelta:
    """A request unanswered this long is sent again (its message or worker was lost)."""
    return timedelta(seconds=float(settings.get("LTA_VERIFICATION_TIMEOUT_SECONDS", 600)))


def record_event(
    session: Session,
    event: str,
    *,
    copy_id: int | None = None,
    package_id: int | None = None,
    location_id: int | None = None,
    actor: str = "system",
    message: str | None = None,
) -> None:
    """One row of the archive trail (in the caller's transaction)."""
    session.add(
        m.ArchiveEvent(
            event=event,
            physical_copy_id=copy_id,
            raw_data_package_id=package_id,
            data_location_id=location_id,
            actor=actor,
            message=message,
        )
    )


# ---------------------------------------------------------------------------------------
# Requesting a verification (managers)
# ---------------------------------------------------------------------------------------


def request_verification(
    session: Session, copy_ids: Sequence[int], *, full: bool = False, now: datetime | None = None
) -> int:
    """Queue a verification of the given archive copies at their own sites; returns how
    many were queued.  Copies with a request still outstanding (younger than
    LTA_VERIFICATION_TIMEOUT_SECONDS) are left alone, so calling this every cycle for
    the same copies queues each once.  Commits."""
    now = now or m.utcnow()
    ids = sorted({int(i) for i in copy_ids})
    if not ids:
        return 0
    # One conditional UPDATE both picks the copies without an outstanding request and
    # stamps them, so two managers never queue the same copy twice.
    claimed = session.execute(
        update(PCT)
        .where(
            PCT.c.id.in_(ids),
            (PCT.c.verification_requested_at.is_(None))
            | (PCT.c.verification_requested_at < now - _request_timeout()),
        )
        .values(verification_requested_at=now)
        .returning(PCT.c.id, PCT.c.data_location_id)
    ).all()
    if not claimed:
        session.rollback()
        return 0
    session.commit()
    by_location: dict[int, list[int]] = defaultdict(list)
    for copy_id, location_id in claimed:
        by_location[location_id].append(copy_id)
    for location_id, copies in by_location.items():
        location = session.get(m.DataLocation, location_id)
        queue = route_task_by_location(OperationType.ARCHIVE_VERIFICATION, location)
        verify_archive_copies.apply_async(args=[sorted(copies)], kwargs={"full": full}, queue=queue)
    log.info("archive_verification_requested", copies=len(claimed), full=full)
    return len(claimed)


# ---------------------------------------------------------------------------------------
# Verifying (the task, at the copy's site)
# ---------------------------------------------------------------------------------------


@dataclass
class Finding:
    """What one copy's verification found."""

    copy_id: int
    package_id: int | None
    location_id: int
    outcome: str
    message: str = ""


@dataclass
class _Expected:
    copy_id: int
    package_id: int | None
    location: m.DataLocation
    path: str
    size: int | None
    checksum: str | None


def _expected(session: Session, copy_ids: Sequence[int]) -> list[_Expected]:
    """Phase 1: what the DB says each copy holds (copies still PRESENT only)."""
    rows = session.scalars(
        select(m.PhysicalCopy).where(
            m.PhysicalCopy.id.in_(list(copy_ids)),
            m.PhysicalCopy.status == m.PhysicalCopyStatus.PRESENT,
        )
    ).all()
    out = []
    for copy in rows:
        package = getattr(copy, "raw_data_package", None) or getattr(
            copy, "data_transfer_package", None
        )
        path = copy.relative_path or (package.relative_path if package is not None else None)
        if path is None:
            continue
        out.append(
            _Expected(
                copy_id=copy.id,
                package_id=copy.raw_data_package_id,
                location=copy.data_location,
                path=path,
                size=package.size if package is not None and package.size else copy.size,
                checksum=package.checksum if package is not None else copy.checksum,
            )
        )
    session.expunge_all()
    return out


def _look(expected: _Expected, full: bool) -> Finding:
    """Phase 2: look at the object itself (no DB transaction is open meanwhile)."""
    from ccat_data_transfer.core.storage import StorageError, storage_for_location

    def finding(outcome: str, message: str = "") -> Finding:
        return Finding(
            expected.copy_id, expected.package_id, expected.location.id, outcome, message
        )

    try:
        storage = storage_for_location(expected.location)
        info = storage.stat(expected.path)
        if info is None:
            return finding(MISSING, f"no object {expected.path} at {expected.location.name}")
        if expected.size is not None and info.size != expected.size:
            return finding(
                CORRUPT, f"size {info.size} at {expected.location.name}, expected {expected.size}"
            )
        if not full:
            return finding(VERIFIED)
        # Fixity means reading the bytes at rest: never the SHA-256 stored at write time.
        actual = storage.sha256(expected.path, reread=True)
    except StorageError as exc:
        return finding(UNREACHABLE, f"{expected.location.name}: {exc}")
    if expected.checksum and actual != expected.checksum:
        return finding(
            CORRUPT,
            f"sha256 {actual} at {expected.location.name}, expected {expected.checksum}",
        )
    return finding(FIXITY_OK)


def _record(session: Session, findings: list[Finding], actor: str, now: datetime) -> None:
    """Phase 3: record every finding.  Good copies get their proof; bad ones are marked
    lost (no rule counts them) and leave a trail row; unreachable storage changes
    nothing but the outstanding request, so it is asked again later."""
    for f in findings:
        values: dict[str, Any] = {"verification_requested_at": None}
        if f.outcome in (VERIFIED, FIXITY_OK):
            values["verified_at"] = now
            if f.outcome == FIXITY_OK:
                values["fixity_checked_at"] = now
        elif f.outcome in (MISSING, CORRUPT):
            values.update(lost_at=now, last_error=f.message)
            log.error(
                "archive_copy_bad",
                copy_id=f.copy_id,
                package_id=f.package_id,
                outcome=f.outcome,
                reason=f.message,
            )
        else:
            log.warning("archive_copy_unreachable", copy_id=f.copy_id, reason=f.message)
        if f.outcome in (FIXITY_OK, MISSING, CORRUPT):  # routine stats leave no trail row
            record_event(
                session,
                f.outcome,
                copy_id=f.copy_id,
                package_id=f.package_id,
                location_id=f.location_id,
                actor=actor,
                message=f.message or None,
            )
        # Only a copy still PRESENT is changed: a deletion or another verification that
        # got there first wins.
        session.execute(
            update(PCT)
            .where(PCT.c.id == f.copy_id, PCT.c.status == m.PhysicalCopyStatus.PRESENT)
            .values(**values)
        )


#: Called with the bad findings after they are recorded (repair or freeze); set by
#: :mod:`ccat_data_transfer.fixity.repair` when it is imported.
on_bad_copies: list[Callable[[list[Finding]], None]] = []

#: The module whose import registers the repair hook; imported before the hooks run, so
#: that every process that finds a bad copy (a worker, a manager, the embedded mode)
#: repairs it, not only one that happened to import it.
REPAIR_HOOK_MODULE = "ccat_data_transfer.fixity.repair"


def verify_copies(
    copy_ids: Sequence[int], *, full: bool = False, actor: str = "archive_verifier"
) -> list[Finding]:
    """Verify archive copies where they are; returns one finding per copy still PRESENT
    that this attempt could take.

    Each copy is taken first (a ``copy_claim``,
    :func:`~ccat_data_transfer.core.attempts.claim_copies`):
    a copy that a live verification or repair holds is left to it (a redelivered or
    concurrent task does nothing for it).  The claims beat while the storage is read,
    the findings are recorded only for the claims still held, and released with them."""
    db = DatabaseConnection()
    attempt = new_attempt()
    with db.session_scope() as session:
        taken = claim_copies(session, [int(i) for i in copy_ids], "verification", attempt)
    if not taken:
        return []
    try:
        with db.session_scope() as session:
            expected = _expected(session, taken)
        with beating(
            CopyClaim,
            CopyClaim.physical_copy_id.in_(taken),
            CopyClaim.attempt_id == attempt,
            label="copy_claim-verification",
        ):
            findings = [_look(e, full) for e in expected]
        now = m.utcnow()
        with db.session_scope() as session:
            owned = beat_copies(session, taken, attempt)
            if len(owned) < len(taken):
                log.warning(
                    "attempt_superseded",
                    work="verification",
                    copies=sorted(set(taken) - owned),
                    attempt=attempt,
                )
            findings = [f for f in findings if f.copy_id in owned]
            _record(session, findings, actor, now)
            release_copies(session, taken, attempt)
    except BaseException:
        with db.session_scope() as session:
            release_copies(session, taken, attempt)
        raise
    bad = [f for f in findings if f.outcome in (MISSING, CORRUPT)]
    if bad:
        importlib.import_module(REPAIR_HOOK_MODULE)
        for hook in list(on_bad_copies):
            hook(bad)
    return findings


@app.task(bind=True, acks_late=True, name="ccat_data_transfer.verify_archive_copies")
def verify_archive_copies(self: Any, copy_ids: list[int], full: bool = False) -> dict[str, int]:
    """Celery task: :func:`verify_copies` on the copies' own site's queue.  Idempotent:
    a duplicate delivery looks again and records the same outcome."""
    counts: dict[str, int] = defaultdict(int)
    for finding in verify_copies(copy_ids, full=full):
        counts[finding.outcome] += 1
    return dict(counts)
