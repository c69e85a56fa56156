"""Proof that an archive copy holds what the database says, taken where its bytes are.

A row that says PRESENT is a claim, not a proof.  Before the last copies outside the
archives go, the deletion rules ask for a *fresh* proof of the LTA copies (see
``LTA_PROOF_MAX_AGE_SECONDS``): a worker at the LTA's site looked at the object itself.
This module is that look, and the request for it:

* :func:`request_verification` (managers) queues a verification of some archive copies
  on each copy's own ``archive_verification`` queue, so a worker of that site runs it,
  and stamps ``verification_requested_at`` so the same copies are not queued again while
  the request is outstanding;
* :func:`~ccat_data_transfer.archive.verification.verify_copies` (the task body, in
  :mod:`ccat_data_transfer.archive.verification`,
  re-exported here; the Celery task is :mod:`ccat_data_transfer.archive.tasks`) checks
  each copy in three phases: read what the DB expects (one short transaction), look at
  storage (no transaction open: a stat, and
  with ``full`` a re-read of every byte through SHA-256), record the outcome.  A copy
  whose object exists with the expected size (and checksum) gets ``verified_at`` (and
  ``fixity_checked_at``); a copy whose object is missing or differs is marked
  ``lost_at``, so no rule counts it any more, and an ``archive_event`` says what was
  found.  What happens next to a bad copy (repair from another site, or a freeze) is
  :mod:`ccat_data_transfer.fixity`'s concern, called through ``on_bad_copies``;
* :func:`~ccat_data_transfer.archive.verification.record_bad_bytes` (public, for every
  stage that reads archive bytes: staging, repair, the audit, a transfer from an
  archive) records a finding of bad bytes exactly as the verification does: marked lost,
  an ``archive_event``, the repair queued.  Only a full re-read clears such a mark;
* :func:`~ccat_data_transfer.archive.verification.read_back` /
  :func:`~ccat_data_transfer.archive.verification.read_back_sql`: the copy was read back
  in full at least once since it was written, which the deletion rules ask of every
  archive copy that is to prove the last copies outside the archives (with a
  verification taken after the decision to delete them; ``deletion.rules``).

The expected checksum is the *package's*, not the copy row's own: a copy row that
records another checksum than its package is itself a discrepancy.

Room in the house: stage archive, its public module (the deletion and fixity stages and
the operations use it).  Imports the archive stage's verification and tasks modules,
core and ``ccat_ops_db``; never a manager.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import update
from sqlalchemy.orm import Session

from ccat_data_transfer.archive.tasks import verify_archive_copies
from ccat_data_transfer.archive.verification import (
    CORRUPT,
    FIXITY_OK,
    MISSING,
    PCT,
    REPAIR_HOOK_MODULE,
    UNREACHABLE,
    VERIFIED,
    Finding,
    on_bad_copies,
    read_back,
    read_back_sql,
    record_bad_bytes,
    record_event,
    verify_copies,
)
from ccat_data_transfer.core.config import settings
from ccat_data_transfer.core.logs import get_logger
from ccat_data_transfer.core.operation_types import OperationType
from ccat_data_transfer.core.queues import route_task_by_location
from ccat_ops_db import models as m

log = get_logger(__name__)

__all__ = [
    "CORRUPT",
    "FIXITY_OK",
    "Finding",
    "MISSING",
    "REPAIR_HOOK_MODULE",
    "UNREACHABLE",
    "VERIFIED",
    "on_bad_copies",
    "proof_cutoff",
    "proof_max_age",
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
