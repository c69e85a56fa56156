"""Repair of a bad archive copy from a good copy elsewhere; a freeze when none is left.

A verification that finds an archive copy MISSING or CORRUPT marks it lost and calls the
hooks of ``archive_proof.on_bad_copies``;
:func:`~ccat_data_transfer.fixity.tasks.on_bad_copies` (registered when
:mod:`ccat_data_transfer.fixity.tasks` is imported) queues the task
``repair_archive_copy`` on the bad copy's own LTA ``archive_verification`` queue, so the
repair runs at the site that writes the bytes.

The repair (:func:`repair_copy`) tries the good sources of the same package in turn:

1. a copy at another LTA location: PRESENT, not lost, with the package's checksum; when
   its last full check is older than LTA_PROOF_MAX_AGE_SECONDS it is first re-read in
   full (:func:`~ccat_data_transfer.archive.verification.verify_copies` with ``full=True``), and
   one that fails that check is marked lost there (and is itself repaired or frozen);
2. a PRESENT, not lost copy at a BUFFER location.

For each it writes ``archive_event`` REPAIR_STARTED (naming the source), streams the
source's bytes through SHA-256 into the bad copy's path (``open_write``: atomic, the old
bytes stay until the new ones are complete), and commits the write only when the
source's bytes hash to the package checksum.  Then it re-reads what was written; only
when that, too, hashes to the package checksum does the copy become PRESENT again, not
lost, with fresh ``verified_at`` / ``fixity_checked_at`` (REPAIRED).  Any failure is a
REPAIR_FAILED with its reason; an archive source found bad is recorded as the fixity scan
records a bad copy (``archive_proof.record_bad_bytes``: marked lost, an archive_event, its
own repair queued) and the next source is tried.  A failure at the destination (unwritable, or the
written bytes differ) ends the attempt: a good copy exists, so nothing is frozen, and
the fixity manager queues the repair again later.

Locations on audit hold take no part: a copy there is neither repaired (until the hold
is cleared) nor used as a source, and, not being known bad, it prevents a freeze.

When every source was shown bad (or there is none), no good copy of the package exists
anywhere: the package is frozen (``frozen_at``/``frozen_reason``, archive_event FROZEN,
an error log line and an alert); the deletion rules then keep every copy of it.

Room in the house: stage fixity (the repair task's body).  Imports core (config,
database, storage, alerts, queue routing), the archive stage's public ``proof`` and
ccat_ops_db; never a manager.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import String, func, literal, select, update
from sqlalchemy.orm import Session

from ccat_data_transfer.archive import proof as archive_proof
from ccat_data_transfer.archive.proof import (
    CORRUPT,
    FIXITY_OK,
    MISSING,
    proof_cutoff,
    record_event,
)
from ccat_data_transfer.core.alerts import send_alert
from ccat_data_transfer.core.attempts import (
    AttemptSuperseded,
    beat_copies,
    claim_copies,
    new_attempt,
    release_copies,
)
from ccat_data_transfer.core.database import DatabaseConnection
from ccat_data_transfer.core.errors import CcatError
from ccat_data_transfer.core.liveness import beating
from ccat_data_transfer.core.logs import get_logger
from ccat_data_transfer.core.storage import (
    CHUNK_SIZE,
    ObjectNotFound,
    StorageError,
    storage_for_location,
)
from ccat_ops_db import models as m

log = get_logger(__name__)

REPAIR_STARTED = "REPAIR_STARTED"
REPAIRED = "REPAIRED"
REPAIR_FAILED = "REPAIR_FAILED"
FROZEN = "FROZEN"
#: The events of a repair attempt (the fixity manager waits after one before retrying).
REPAIR_STEPS = (REPAIR_STARTED, REPAIRED, REPAIR_FAILED)

ACTOR = "repair"


@dataclass
class _Copy:
    """What a repair needs to know of one copy (plain values: no session stays open)."""

    copy_id: int
    location: m.DataLocation
    path: str
    kind: str  # "lta" or "buffer"
    fixity_checked_at: Any = None


@dataclass
class _Target:
    copy: _Copy
    package_id: int
    checksum: str
    size: int | None


class _SourceBad(CcatError):
    """The source's bytes are not the package's (or it has none)."""


class _SourceMissing(_SourceBad):
    """The source has no such object."""


class _SourceUnreachable(CcatError):
    """The source could not be read now (storage error): not known bad."""


class _DestinationBad(CcatError):
    """The destination could not be written, or holds other bytes after the write."""


# ---------------------------------------------------------------------------------------
# The repair
# ---------------------------------------------------------------------------------------


def _target(session: Session, copy_id: int) -> _Target | None:
    """The bad copy, if it still needs a repair (PRESENT, lost, of a package)."""
    copy = session.get(m.PhysicalCopy, copy_id)
    if (
        copy is None
        or copy.raw_data_package_id is None
        or copy.status != m.PhysicalCopyStatus.PRESENT
        or copy.lost_at is None
    ):
        return None
    package = session.get(m.RawDataPackage, copy.raw_data_package_id)
    path = copy.relative_path or package.relative_path
    return _Target(
        _Copy(copy.id, copy.data_location, path, "lta"),
        package.id,
        package.checksum,
        package.size or copy.size,
    )


def _next_source(session: Session, target: _Target, tried: set[int]) -> _Copy | None:
    """The best untried good-looking copy of the package: another LTA location's (most
    recent full check first), else a buffer's."""
    pc, loc = m.PhysicalCopy, m.DataLocation
    base = (
        select(pc)
        .join(loc, loc.id == pc.data_location_id)
        .where(
            pc.raw_data_package_id == target.package_id,
            pc.id.not_in(tried | {target.copy.copy_id}),
            pc.data_location_id != target.copy.location.id,
            pc.status == m.PhysicalCopyStatus.PRESENT,
            pc.lost_at.is_(None),
            loc.audit_hold_at.is_(None),
        )
    )
    lta = session.scalars(
        base.where(
            loc.location_type == m.LocationType.LONG_TERM_ARCHIVE,
            pc.checksum == target.checksum,
        ).order_by(pc.fixity_checked_at.desc().nulls_last(), pc.id)
    ).first()
    kind = "lta"
    copy = lta
    if copy is None:
        kind = "buffer"
        copy = session.scalars(
            base.where(loc.location_type == m.LocationType.BUFFER).order_by(pc.id)
        ).first()
    if copy is None:
        return None
    package = session.get(m.RawDataPackage, target.package_id)
    return _Copy(
        copy.id,
        copy.data_location,
        copy.relative_path or package.relative_path,
        kind,
        copy.fixity_checked_at,
    )


def _copy_bytes(source: _Copy, target: _Target, owns: Callable[[], bool]) -> None:
    """Stream the source over the target (atomic); the write is committed only when the
    source's bytes hash to the package checksum and this attempt still holds the copy's
    claim (``owns``; else :class:`AttemptSuperseded`, and the temporary file goes).  Then
    re-read what was written."""
    try:
        reader = storage_for_location(source.location).open_read(source.path)
    except ObjectNotFound as exc:
        raise _SourceMissing(f"no object {source.path} at {source.location.name}") from exc
    except StorageError as exc:
        raise _SourceUnreachable(f"cannot read {source.location.name}: {exc}") from exc
    destination = storage_for_location(target.copy.location)
    h = hashlib.sha256()
    size = 0
    try:
        with reader, destination.open_write(target.copy.path) as out:
            while True:
                try:
                    chunk = reader.read(CHUNK_SIZE)
                except (OSError, StorageError) as exc:
                    raise _SourceUnreachable(f"reading {source.location.name}: {exc}") from exc
                if not chunk:
                    break
                h.update(chunk)
                size += len(chunk)
                out.write(chunk)
            if h.hexdigest() != target.checksum:
                raise _SourceBad(
                    f"source at {source.location.name} hashes to {h.hexdigest()}, "
                    f"expected {target.checksum}"
                )
            if target.size is not None and size != target.size:
                raise _SourceBad(
                    f"source at {source.location.name} has {size} bytes, expected {target.size}"
                )
            if not owns():  # the rename into place is irreversible
                raise AttemptSuperseded(f"repair of copy {target.copy.copy_id} superseded")
    except (OSError, StorageError) as exc:
        raise _DestinationBad(f"writing {target.copy.location.name}: {exc}") from exc
    try:
        # A repair's proof is a re-read of the bytes that landed (on S3 too, not the
        # SHA-256 the writer stored as metadata).
        written = destination.sha256(target.copy.path, reread=True)
    except StorageError as exc:
        raise _DestinationBad(f"re-reading {target.copy.location.name}: {exc}") from exc
    if written != target.checksum:
        raise _DestinationBad(
            f"after the copy {target.copy.location.name} hashes to {written}, "
            f"expected {target.checksum}"
        )


def _record(session: Session, event: str, target: _Target, message: str) -> None:
    """One step of the target's repair in the archive trail (caller's transaction)."""
    record_event(
        session,
        event,
        copy_id=target.copy.copy_id,
        package_id=target.package_id,
        location_id=target.copy.location.id,
        actor=ACTOR,
        message=message,
    )


def _event(db: DatabaseConnection, event: str, target: _Target, message: str) -> None:
    with db.session_scope() as session:
        _record(session, event, target, message)


def _usable(source: _Copy) -> bool:
    """An LTA source with no recent full check is re-read in full first (marked lost,
    and repaired or frozen in turn, if that fails)."""
    if source.kind != "lta":
        return True
    checked = source.fixity_checked_at
    if checked is not None and checked >= proof_cutoff():
        return True
    findings = archive_proof.verify_copies([source.copy_id], full=True, actor=ACTOR)
    return bool(findings) and findings[0].outcome == FIXITY_OK


def _mark_repaired(db: DatabaseConnection, target: _Target, source: _Copy, attempt: str) -> None:
    now = m.utcnow()
    with db.session_scope() as session:
        if target.copy.copy_id not in beat_copies(session, [target.copy.copy_id], attempt):
            raise AttemptSuperseded(f"repair of copy {target.copy.copy_id} superseded")
        session.execute(
            update(m.PhysicalCopy)
            .where(
                m.PhysicalCopy.id == target.copy.copy_id,
                m.PhysicalCopy.status == m.PhysicalCopyStatus.PRESENT,
            )
            .values(
                lost_at=None,
                # What was found stays readable on the copy (and in the archive trail).
                last_error=func.substr(
                    literal(f"repaired from copy {source.copy_id} after: ", String)
                    + func.coalesce(m.PhysicalCopy.last_error, ""),
                    1,
                    2000,
                ),
                checksum=target.checksum,
                verified_at=now,
                fixity_checked_at=now,
                verification_requested_at=None,
            )
        )
        _record(
            session,
            REPAIRED,
            target,
            f"from copy {source.copy_id} at {source.location.name}; sha256 verified",
        )
    log.warning(
        "archive_copy_repaired",
        copy_id=target.copy.copy_id,
        location=target.copy.location.name,
        source=source.location.name,
    )


def repair_copy(copy_id: int) -> str:
    """Repair one bad archive copy; returns ``repaired``, ``failed``, ``frozen``,
    ``held`` (its location is on audit hold: repaired once the hold is cleared),
    ``not_needed``, ``busy`` (a live verification or repair holds the copy: a
    redelivered or concurrent repair does nothing) or ``superseded`` (this attempt lost
    the copy's claim midway: it renamed and recorded nothing).  Every step is an
    archive_event; no transaction stays open while bytes move."""
    db = DatabaseConnection()
    attempt = new_attempt()
    with db.session_scope() as session:
        if not claim_copies(session, [copy_id], "repair", attempt):
            log.info("archive_repair_busy", copy_id=copy_id, reason="a live attempt has the copy")
            return "busy"
    CC = m.CopyClaim
    try:
        with beating(
            CC,
            CC.physical_copy_id == copy_id,
            attempt=attempt,
            label=f"copy_claim-repair-{copy_id}",
        ):
            return _repair_owned(db, copy_id, attempt)
    except AttemptSuperseded:
        log.warning("attempt_superseded", work="repair", copy_id=copy_id, attempt=attempt)
        return "superseded"
    finally:
        with db.session_scope() as session:
            release_copies(session, [copy_id], attempt)


def _repair_owned(db: DatabaseConnection, copy_id: int, attempt: str) -> str:
    """:func:`repair_copy` once the copy's claim is this attempt's."""

    def owns() -> bool:
        with db.session_scope() as session:
            return copy_id in beat_copies(session, [copy_id], attempt)

    with db.session_scope() as session:
        target = _target(session, copy_id)
        if target is not None and not target.checksum:
            target = None
            log.error("archive_repair_impossible", copy_id=copy_id, reason="no package checksum")
        session.expunge_all()
    if target is None:
        return "not_needed"
    if target.copy.location.audit_hold_at is not None:
        log.warning("archive_repair_waits_for_hold", copy_id=copy_id)
        return "held"
    tried: set[int] = set()
    # Copies at held locations are not used, but not known bad either: no freeze.
    unreachable = _held_copies_exist(db, target)
    while True:
        with db.session_scope() as session:
            source = _next_source(session, target, tried)
            session.expunge_all()
        if source is None:
            break
        tried.add(source.copy_id)
        if not _usable(source):
            unreachable = unreachable or _is_present_and_unmarked(db, source.copy_id)
            continue
        where = f"copy {source.copy_id} at {source.location.name} ({source.kind})"
        _event(db, REPAIR_STARTED, target, f"source: {where}")
        try:
            _copy_bytes(source, target, owns)
        except _SourceBad as exc:
            _event(db, REPAIR_FAILED, target, f"source {where} is bad: {exc}")
            log.error("archive_repair_source_bad", copy_id=copy_id, source=where, reason=str(exc))
            if source.kind == "lta":
                # The same finding as the fixity scan's (marked lost, an archive_event,
                # its own repair queued), made by the reader that found it.
                with db.session_scope() as session:
                    archive_proof.record_bad_bytes(
                        session,
                        source.copy_id,
                        ACTOR,
                        f"read as a repair source for copy {copy_id}: {exc}",
                        outcome=MISSING if isinstance(exc, _SourceMissing) else CORRUPT,
                    )
            continue
        except _SourceUnreachable as exc:
            _event(db, REPAIR_FAILED, target, f"source {where} unreachable: {exc}")
            unreachable = True
            continue
        except _DestinationBad as exc:
            _event(db, REPAIR_FAILED, target, str(exc))
            log.error("archive_repair_failed", copy_id=copy_id, reason=str(exc))
            return "failed"
        _mark_repaired(db, target, source, attempt)
        return "repaired"
    if unreachable:
        _event(
            db,
            REPAIR_FAILED,
            target,
            "no good copy reachable now (storage unreachable, or only at locations on audit "
            "hold); tried again later",
        )
        return "failed"
    freeze_package(db, target.package_id, f"no good copy left to repair copy {copy_id} from")
    return "frozen"


def _held_copies_exist(db: DatabaseConnection, target: _Target) -> bool:
    """Unmarked PRESENT copies of the package at locations on audit hold."""
    pc, loc = m.PhysicalCopy, m.DataLocation
    with db.session_scope() as session:
        return (
            session.scalar(
                select(pc.id)
                .join(loc, loc.id == pc.data_location_id)
                .where(
                    pc.raw_data_package_id == target.package_id,
                    pc.id != target.copy.copy_id,
                    pc.status == m.PhysicalCopyStatus.PRESENT,
                    pc.lost_at.is_(None),
                    loc.audit_hold_at.is_not(None),
                )
                .limit(1)
            )
            is not None
        )


def _is_present_and_unmarked(db: DatabaseConnection, copy_id: int) -> bool:
    """A source that could not be checked (storage unreachable) but is not known bad."""
    with db.session_scope() as session:
        copy = session.get(m.PhysicalCopy, copy_id)
        return copy is not None and copy.lost_at is None


def freeze_package(db: DatabaseConnection, package_id: int, reason: str) -> bool:
    """Freeze a package no good copy of which is left: every remaining copy is kept.
    True when newly frozen (then the event, the error line and the alert)."""
    with db.session_scope() as session:
        frozen = session.execute(
            update(m.RawDataPackage)
            .where(m.RawDataPackage.id == package_id, m.RawDataPackage.frozen_at.is_(None))
            .values(frozen_at=m.utcnow(), frozen_reason=reason)
        ).rowcount
        if not frozen:
            return False
        name = session.get(m.RawDataPackage, package_id).file_name
        record_event(session, FROZEN, package_id=package_id, actor=ACTOR, message=reason)
    log.error("package_frozen", package_id=package_id, package=name, reason=reason)
    send_alert(
        {"event": "package_frozen", "package_id": package_id, "package": name, "reason": reason}
    )
    return True
