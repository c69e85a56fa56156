"""Verifying archive copies where their bytes are: the body of the
``ccat_data_transfer.verify_archive_copies`` task (:mod:`ccat_data_transfer.archive.tasks`).

:func:`verify_copies` checks each copy in three phases: read what the DB expects (one
short transaction), look at storage (no transaction open: a stat, and with ``full`` a
re-read of every byte through SHA-256), record the outcome.  A copy whose object exists
with the expected size (and checksum) gets ``verified_at`` (and ``fixity_checked_at``); a
copy whose object is missing or differs is marked ``lost_at``, so no rule counts it any
more, and an ``archive_event`` says what was found; then the hooks of
``on_bad_copies`` run (the fixity stage's repair).

Its names are public through :mod:`ccat_data_transfer.archive.proof`, the archive stage's
public module.

Room in the house: stage archive (task body).  Imports core and ``ccat_ops_db``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from ccat_data_transfer.core.attempts import (
    beat_copies,
    claim_copies,
    new_attempt,
    release_copies,
)
from ccat_data_transfer.core.database import DatabaseConnection
from ccat_data_transfer.core.liveness import beating
from ccat_data_transfer.core.logs import get_logger
from ccat_data_transfer.core.storage import StorageError, storage_for_location
from ccat_ops_db import models as m

log = get_logger("ccat_data_transfer.archive.proof")

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
    "PCT",
    "REPAIR_HOOK_MODULE",
    "UNREACHABLE",
    "VERIFIED",
    "Finding",
    "on_bad_copies",
    "read_back",
    "read_back_sql",
    "record_bad_bytes",
    "record_event",
    "verify_copies",
]


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


def _trail(session: Session, f: Finding, actor: str) -> None:
    """The archive trail row of one finding (what was found, by whom)."""
    record_event(
        session,
        f.outcome,
        copy_id=f.copy_id,
        package_id=f.package_id,
        location_id=f.location_id,
        actor=actor,
        message=f.message or None,
    )


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
    _trail(session, f, actor)
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
            _trail(session, f, actor)
        # Only a copy still PRESENT is changed: a deletion or another verification that
        # got there first wins.
        session.execute(
            update(PCT)
            .where(PCT.c.id == f.copy_id, PCT.c.status == m.PhysicalCopyStatus.PRESENT)
            .values(**values)
        )


#: Called with the bad findings after they are recorded (repair or freeze); set by
#: :mod:`ccat_data_transfer.fixity.tasks` when it is imported.
on_bad_copies: list[Callable[[list[Finding]], None]] = []

#: The module whose import registers the repair hook; imported before the hooks run, so
#: that every process that finds a bad copy (a worker, a manager, the embedded mode)
#: repairs it, not only one that happened to import it.
REPAIR_HOOK_MODULE = "ccat_data_transfer.fixity.tasks"


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
    """Verify archive copies where they are; returns one finding per copy still PRESENT
    that this attempt could take.

    Each copy is taken first (a ``copy_claim``,
    :func:`~ccat_data_transfer.core.attempts.claim_copies`): a copy that a live
    verification or repair holds is left to it (a redelivered or concurrent task does
    nothing for it).  The claims beat while the storage is read, the findings are recorded
    only for the claims still held, and released with them.  The proof is stamped with the
    time the look began (a deletion decided before that moment may rely on it; one decided
    during the look may not)."""
    db = DatabaseConnection()
    attempt = new_attempt()
    with db.session_scope() as session:
        taken = claim_copies(session, [int(i) for i in copy_ids], "verification", attempt)
    if not taken:
        return []
    try:
        with db.session_scope() as session:
            expected = _expected(session, taken)
        now = m.utcnow()
        with beating(
            CopyClaim,
            CopyClaim.physical_copy_id.in_(taken),
            attempt=attempt,
            label="copy_claim-verification",
        ):
            findings = [_look(e, full) for e in expected]
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
