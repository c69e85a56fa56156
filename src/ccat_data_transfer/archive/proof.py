"""Proof that an archive copy holds what the database says, taken where its bytes are.

A row that says PRESENT is a claim, not a proof.  Before the last copies outside the
archives go, the deletion rules ask for a *fresh* proof of the LTA copies (see
``LTA_PROOF_MAX_AGE_SECONDS``), and then for one taken after the decision to delete: a
worker at the LTA's site looked at the object itself (its proof is stamped with the
moment the look began).
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
  :mod:`ccat_data_transfer.fixity`'s concern, called through ``on_bad_copies``;
* :func:`record_bad_bytes` (public, for every stage that reads archive bytes: staging,
  repair, the audit, a transfer from an archive) records a finding of bad bytes exactly
  as the verification does: marked lost, an ``archive_event``, the repair queued.  Only a
  full re-read clears such a mark;
* :func:`read_back` / :func:`read_back_sql`: the copy was read back in full at least once
  since it was written, which the deletion rules ask of every archive copy that is to
  prove the last copies outside the archives (with a verification taken after the
  decision to delete them; ``deletion.rules``).

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

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from ccat_data_transfer.core.celery_app import app
from ccat_data_transfer.core.config import settings
from ccat_data_transfer.core.database import DatabaseConnection
from ccat_data_transfer.core.logs import get_logger
from ccat_data_transfer.core.operation_types import OperationType
from ccat_data_transfer.core.queues import route_task_by_location
from ccat_ops_db import models as m

log = get_logger(__name__)

PCT = m.PhysicalCopy.__table__

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
    "read_back",
    "read_back_sql",
    "record_bad_bytes",
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


def _mark_bad(session: Session, f: Finding, actor: str, now: datetime) -> None:
    """The finding of bad bytes (MISSING or CORRUPT), as every reader records it: the copy
    is marked lost (no rule counts it any more; only a full re-read clears the mark), with
    the reason in ``last_error``, and an ``archive_event`` says what was found.  The repair
    is queued by the caller once this is committed (:func:`_queue_repairs`)."""
    log.error(
        "archive_copy_bad",
        copy_id=f.copy_id,
        package_id=f.package_id,
        outcome=f.outcome,
        reason=f.message,
        actor=actor,
    )
    record_event(
        session,
        f.outcome,
        copy_id=f.copy_id,
        package_id=f.package_id,
        location_id=f.location_id,
        actor=actor,
        message=f.message or None,
    )
    # A mark already there is kept (its time says when the copy was first found bad).
    session.execute(
        update(PCT)
        .where(PCT.c.id == f.copy_id, PCT.c.status == m.PhysicalCopyStatus.PRESENT)
        .values(
            lost_at=func.coalesce(PCT.c.lost_at, now),
            last_error=f.message[:2000] if f.message else f.outcome,
            verification_requested_at=None,
        )
    )


def _record(session: Session, findings: list[Finding], actor: str, now: datetime) -> None:
    """Phase 3: record every finding.  Good copies get their proof (``verified_at``, and
    ``fixity_checked_at`` after a full read: ``now`` is when the look began, so a proof
    never claims a moment after its look); bad ones are recorded by :func:`_mark_bad`;
    unreachable storage changes nothing but the outstanding request, so it is asked again
    later.  Only a full re-read clears a lost mark (FIXITY_OK here, a repair's verified
    write, the audit's full re-read) - a stat never does."""
    for f in findings:
        if f.outcome in (MISSING, CORRUPT):
            _mark_bad(session, f, actor, now)
            continue
        values: dict[str, Any] = {"verification_requested_at": None}
        if f.outcome in (VERIFIED, FIXITY_OK):
            values["verified_at"] = now
            if f.outcome == FIXITY_OK:
                # A full re-read that matches the package's checksum: the one thing that
                # clears a finding of bad bytes.
                values.update(fixity_checked_at=now, lost_at=None)
        else:
            log.warning("archive_copy_unreachable", copy_id=f.copy_id, reason=f.message)
        if f.outcome == FIXITY_OK:  # routine stats leave no trail row
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


def _queue_repairs(bad: list[Finding]) -> None:
    """Run the ``on_bad_copies`` hooks (the repair) on committed bad findings."""
    if not bad:
        return
    importlib.import_module(REPAIR_HOOK_MODULE)
    for hook in list(on_bad_copies):
        hook(bad)


def verify_copies(
    copy_ids: Sequence[int], *, full: bool = False, actor: str = "archive_verifier"
) -> list[Finding]:
    """Verify archive copies where they are; returns one finding per copy still PRESENT.
    The proof is stamped with the time the look began (a deletion decided before that
    moment may rely on it; one decided during the look may not)."""
    db = DatabaseConnection()
    with db.session_scope() as session:
        expected = _expected(session, [int(i) for i in copy_ids])
    now = m.utcnow()
    findings = [_look(e, full) for e in expected]
    with db.session_scope() as session:
        _record(session, findings, actor, now)
    _queue_repairs([f for f in findings if f.outcome in (MISSING, CORRUPT)])
    return findings


def record_bad_bytes(
    session: Session,
    copy: m.PhysicalCopy | int,
    finder: str,
    detail: str,
    *,
    outcome: str = CORRUPT,
) -> Finding | None:
    """Public, for every stage that reads archive bytes (staging, repair, the audit, a
    transfer from an archive): record that ``copy`` holds bad bytes (``outcome`` CORRUPT,
    or MISSING when the object is gone) exactly as the fixity scan records its own
    finding - the copy is marked lost, an ``archive_event`` names ``finder`` and
    ``detail``, and the copy's repair is queued.  Commits the session (the repair runs in
    its own session, in embedded mode at once) and returns the finding (None: no such
    copy).  Only a full re-read clears the mark."""
    row = copy if isinstance(copy, m.PhysicalCopy) else session.get(m.PhysicalCopy, int(copy))
    if row is None:
        return None
    finding = Finding(
        copy_id=row.id,
        package_id=row.raw_data_package_id,
        location_id=row.data_location_id,
        outcome=outcome,
        message=f"{finder}: {detail}",
    )
    _mark_bad(session, finding, finder, m.utcnow())
    session.commit()
    _queue_repairs([finding])
    return finding


def read_back(copy: Any) -> bool:
    """The copy's bytes were read back in full at its site at least once since they were
    written: a full re-read (``fixity_checked_at``, the first fixity read after archiving,
    or a repair's re-read) at or after the copy's ``created_at``.  Python form of
    :func:`read_back_sql`."""
    checked = getattr(copy, "fixity_checked_at", None)
    created = getattr(copy, "created_at", None)
    return checked is not None and (created is None or checked >= created)


def read_back_sql(pc: Any) -> Any:
    """SQL of :func:`read_back` for a ``physical_copy`` table or alias."""
    return pc.c.fixity_checked_at.is_not(None) & (pc.c.fixity_checked_at >= pc.c.created_at)


@app.task(bind=True, acks_late=True, name="ccat_data_transfer.verify_archive_copies")
def verify_archive_copies(self: Any, copy_ids: list[int], full: bool = False) -> dict[str, int]:
    """Celery task: :func:`verify_copies` on the copies' own site's queue.  Idempotent:
    a duplicate delivery looks again and records the same outcome."""
    counts: dict[str, int] = defaultdict(int)
    for finding in verify_copies(copy_ids, full=full):
        counts[finding.outcome] += 1
    return dict(counts)
