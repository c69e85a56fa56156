"""The deletion worker: what the Celery tasks (:mod:`ccat_data_transfer.deletion.tasks`)
run to delete copies where the data is, and their base class :class:`DeletionTask`.

Every task runs :func:`delete_copies` in three phases:

1. :func:`_recheck_and_claim` (DB): the rule is checked again against the database
   (``deletion.rules``, ``deletion.rule_sql``: the archive proof, audit holds, frozen
   packages included); the copies whose rule holds move to DELETION_IN_PROGRESS; a
   refused LONG_TERM_ARCHIVE copy is left exactly as found;
2. :func:`_delete_from_storage` (storage): delete each claimed copy's bytes; a
   LONG_TERM_ARCHIVE is refused as a last guard.  Meanwhile the claimed copies'
   ``deletion_scheduled_at`` is their heartbeat (:mod:`ccat_data_transfer.core.liveness`);
   :func:`_look_at` sees whether the bytes of each other refused copy are there;
3. :func:`_settle_refused` (DB): a refused copy goes back to PRESENT / DELETION_POSSIBLE
   with a SKIPPED row only when its bytes were seen (else DELETED, or marked lost);
   :func:`_record_outcomes` (DB): DELETED with ``deleted_at``, or DELETION_FAILED (retry
   count + 1, error kept) for a later cycle to retry, and the audit rows; a package gone
   from the source site starts stage 1 for its raw files (``deletion.marking``).

Task names are explicit strings under ``ccat_data_transfer.deletion_manager`` (the names
workers and queued messages know), in :mod:`ccat_data_transfer.deletion.tasks`.

Room in the house: stage deletion (task bodies); imports ``storage`` (at run time), ``database``,
``exceptions`` and the ``deletion`` core modules (base, rules, rule_sql, trail, marking,
candidates for loading copies), never the manager's steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from celery import Task
from sqlalchemy import func, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from ccat_data_transfer.core.database import DatabaseConnection
from ccat_data_transfer.core.errors import RetryableError
from ccat_data_transfer.core.liveness import beating
from ccat_data_transfer.core.storage import storage_for_location
from ccat_data_transfer.deletion.base import (
    COPY_TYPE_RAW_DATA_PACKAGE,
    LT,
    PCT,
    WORKER_ACCEPTS,
    S,
    log,
)
from ccat_data_transfer.deletion.candidates import load_copies
from ccat_data_transfer.deletion.marking import mark_raw_data_files_for_deletion
from ccat_data_transfer.deletion.proof import request_post_decision_proof
from ccat_data_transfer.deletion.rule_sql import file_copies_still_deletable
from ccat_data_transfer.deletion.rules import (
    WAITING_FOR_PROOF,
    WAITING_FOR_PROOF_AFTER_DECISION,
    Decision,
    SiteRoles,
    decide_copy,
    delete_because,
    is_source_site_location,
    keep_because,
    site_roles,
)
from ccat_data_transfer.deletion.trail import copy_path, copy_size, log_row, write_log_rows
from ccat_ops_db import models as m


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
    """Where a copy whose rule no longer holds goes back to: DELETION_POSSIBLE for a stage-2
    raw file, else PRESENT.  Only for a copy whose bytes were seen there (see
    :func:`_settle_refused`); never for a LONG_TERM_ARCHIVE copy, which stays as found."""
    if (
        isinstance(copy, m.RawDataFilePhysicalCopy)
        and copy.deletion_possible_at is not None
        and copy.data_location.location_type in (LT.SOURCE, LT.BUFFER)
    ):
        return S.DELETION_POSSIBLE
    return S.PRESENT


def _decided_at(copy: m.PhysicalCopy) -> datetime:
    """When the deletion of ``copy`` was decided (a row without the mark: when it was last
    sent; neither: now, so that only a proof taken from now on counts)."""
    return copy.deletion_decided_at or copy.deletion_scheduled_at or m.utcnow()


def _recheck(
    session: Session,
    copy: m.PhysicalCopy,
    roles: SiteRoles,
    file_ok: set[int],
    file_before: set[int],
) -> Decision:
    """The rule, checked again at execution time, with the archives' proof taken after
    the decision to delete (``file_ok``: the raw-file copies whose set-based rule holds
    so; ``file_before``: those whose rule holds on a proof taken before the decision -
    they wait for the proof after it)."""
    loc = copy.data_location
    if loc.location_type == LT.LONG_TERM_ARCHIVE:
        return keep_because(
            "never delete from a LONG_TERM_ARCHIVE (worker guard)", "long_term_archive"
        )
    if copy.lost_at is not None:
        return keep_because("the copy is marked lost", "lost")
    if isinstance(copy, m.RawDataFilePhysicalCopy):
        if copy.id in file_ok:
            return delete_because(
                "rule re-checked by the worker",
                "no_active_staging_job"
                if loc.location_type == LT.PROCESSING
                else "parent_package_archived",
            )
        if copy.id in file_before:
            return keep_because(
                "waiting for proof: the archive copies of its package were not verified at "
                "their sites (and read back in full since written) after the deletion was "
                f"decided ({_decided_at(copy).isoformat(timespec='seconds')}); asked for",
                WAITING_FOR_PROOF_AFTER_DECISION,
            )
        return keep_because("rule no longer holds at execution time", "rule_no_longer_holds")
    after = decide_copy(session, copy, roles, decided_at=_decided_at(copy))
    if after.deletable or after.code != WAITING_FOR_PROOF:
        return after
    before = decide_copy(session, copy, roles)
    if before.deletable:  # it holds on the proof taken before the decision only
        return keep_because(after.reason.removeprefix("kept: "), WAITING_FOR_PROOF_AFTER_DECISION)
    return before


def _target(copy: m.PhysicalCopy, reason: str, back: m.PhysicalCopyStatus | None = None) -> dict:
    """A copy as plain data for the storage phase (no ORM object crosses the phases)."""
    return {
        "id": copy.id,
        "type": copy.type,
        "location_id": copy.data_location_id,
        "location": copy.data_location,
        "path": copy_path(copy),
        "size": copy_size(copy),
        "package_id": getattr(copy, "raw_data_package_id", None),
        "reason": reason,
        "back": back,
    }


def _skipped_row(
    c: m.PhysicalCopy, code: str, reason: str, actor: str, summary: dict[str, int]
) -> dict[str, Any]:
    """The audit row of a copy the worker leaves as it found it (SKIPPED), counted."""
    summary["skipped"] += 1
    return log_row(
        c.id,
        c.type,
        c.data_location,
        copy_size(c),
        code,
        m.DeletionOutcome.SKIPPED,
        f"{reason}; left {c.status.name} as found",
        actor,
    )


def _recheck_and_claim(
    session: Session,
    ids: list[int],
    actor: str,
    summary: dict[str, int],
    waiting: list[int],
    log_waiting: bool = True,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Phase 1 (DB): re-check every copy; move those whose rule holds to
    DELETION_IN_PROGRESS.  A copy whose rule holds but for the archives' proof taken
    after the decision to delete stays as found (SKIPPED; its id goes to ``waiting``, for
    which the proof is asked: a re-send of the task finds it).  Of the others, a copy at a
    LONG_TERM_ARCHIVE stays as found (the deletion path never changes an archive copy:
    SKIPPED, nothing else); every other one is left for the storage phase to look at
    before it goes back (:func:`_settle_refused`).  Returns (what to delete, what to look
    at), as plain data."""
    copies = [c for c in load_copies(session, ids) if c.status in WORKER_ACCEPTS]
    roles = site_roles(session)
    file_ids = [c.id for c in copies if isinstance(c, m.RawDataFilePhysicalCopy)]
    file_ok = file_copies_still_deletable(session, file_ids, post_decision=True)
    file_before = file_copies_still_deletable(session, file_ids) - file_ok
    go: dict[int, m.PhysicalCopy] = {}
    why: dict[int, str] = {}  # the rule that allows each deletion, for the audit trail
    logs: list[dict[str, Any]] = []
    unsure: list[dict[str, Any]] = []
    for c in copies:
        decision = _recheck(session, c, roles, file_ok, file_before)
        code = decision.code or "rule_no_longer_holds"
        if decision.deletable:
            go[c.id] = c
            why[c.id] = decision.code or "rule_holds"
        elif code == WAITING_FOR_PROOF_AFTER_DECISION:
            waiting.append(c.id)
            if log_waiting:
                logs.append(_skipped_row(c, code, decision.reason, actor, summary))
        elif c.data_location.location_type != LT.LONG_TERM_ARCHIVE:
            unsure.append(
                _target(c, code, _revert_status(c)) | {"why": decision.reason, "was": c.status}
            )
        else:
            logs.append(_skipped_row(c, code, decision.reason, actor, summary))
    claimed: set[int] = set()
    if go:
        claimed = set(
            session.execute(
                update(PCT)
                .where(PCT.c.id.in_(list(go)), PCT.c.status.in_(list(WORKER_ACCEPTS)))
                .values(status=S.DELETION_IN_PROGRESS, deletion_scheduled_at=m.utcnow())
                .returning(PCT.c.id)
            ).scalars()
        )
    targets = [_target(go[cid], why.get(cid, "rule_holds")) for cid in sorted(claimed)]
    write_log_rows(session, logs)
    return targets, unsure


def _delete_from_storage(
    targets: list[dict[str, Any]],
) -> list[tuple[dict[str, Any], bool, str]]:
    """Phase 2 (storage): delete each target's bytes; (target, ok, message) each."""
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
    return outcomes


def _look_at(unsure: list[dict[str, Any]]) -> list[tuple[dict[str, Any], bool | None]]:
    """Phase 2 (storage), for the copies the re-check refused: are their bytes there?
    (None: the storage could not tell.)"""
    looked: list[tuple[dict[str, Any], bool | None]] = []
    for t in unsure:
        try:
            looked.append((t, bool(storage_for_location(t["location"]).exists(t["path"]))))
        except Exception as exc:  # unknown: left as it is; a later resubmission looks again
            log.warning("deletion_revert_unverifiable", copy_id=t["id"], error=str(exc))
            looked.append((t, None))
    return looked


def _settle_refused(
    session: Session,
    looked: list[tuple[dict[str, Any], bool | None]],
    actor: str,
    summary: dict[str, int],
) -> list[tuple[dict[str, Any], bool, str]]:
    """Phase 3 (DB), for the copies the re-check refused (logged SKIPPED unless gone).  A
    copy goes back (:func:`_revert_status`) only when its bytes were seen there.  Bytes
    gone: a DELETION_IN_PROGRESS copy was deleted by an earlier attempt - returned as an
    outcome, to be recorded DELETED; a DELETION_SCHEDULED copy was never touched by a
    deletion, so its bytes vanished otherwise - it goes back marked lost.  Unknown (the
    storage could not tell): left as it is, for a later resubmission."""
    gone: list[tuple[dict[str, Any], bool, str]] = []
    logs = []
    for t, there in looked:
        if there is None:
            continue
        if not there and t["was"] == S.DELETION_IN_PROGRESS:
            message = f"object already absent (an earlier attempt); rule: {t['why']}"
            gone.append((t | {"reason": "already_absent"}, True, message))
            continue
        values: dict[str, Any] = {"status": t["back"], "deletion_scheduled_at": None}
        message = f"{t['why']}; back to {t['back'].name}"
        if not there:
            values.update(lost_at=m.utcnow(), last_error="object absent at deletion re-check")
            message += ", marked lost: the object is absent"
        session.execute(
            update(PCT)
            .where(PCT.c.id == t["id"], PCT.c.status.in_(list(WORKER_ACCEPTS)))
            .values(**values)
        )
        logs.append(
            log_row(
                t["id"],
                t["type"],
                t["location"],
                t["size"],
                t["reason"],
                m.DeletionOutcome.SKIPPED,
                message,
                actor,
            )
        )
        summary["skipped"] += 1
    write_log_rows(session, logs)
    return gone


def _record_outcomes(
    session: Session,
    outcomes: list[tuple[dict[str, Any], bool, str]],
    actor: str,
    summary: dict[str, int],
) -> None:
    """Phase 3 (DB): DELETED or DELETION_FAILED, the audit rows, and stage 1 for packages
    gone from the source site."""
    ok_ids = [t["id"] for t, ok, _ in outcomes if ok]
    if ok_ids:
        session.execute(
            update(PCT)
            .where(PCT.c.id.in_(ok_ids), PCT.c.status == S.DELETION_IN_PROGRESS)
            .values(status=S.DELETED, deleted_at=m.utcnow(), last_error=None)
        )
    logs = []
    source_packages: list[int] = []
    roles = site_roles(session)
    for t, ok, message in outcomes:
        loc = t["location"]
        if ok:
            summary["deleted"] += 1
            reason, outcome = t.get("reason", "rule_holds"), m.DeletionOutcome.DELETED
            if t["type"] == COPY_TYPE_RAW_DATA_PACKAGE and is_source_site_location(loc, roles):
                source_packages.append(t["package_id"])
        else:
            summary["failed"] += 1
            reason, outcome = "storage_error", m.DeletionOutcome.FAILED
            session.execute(
                update(PCT)
                .where(PCT.c.id == t["id"], PCT.c.status == S.DELETION_IN_PROGRESS)
                .values(
                    status=S.DELETION_FAILED,
                    deletion_retry_count=PCT.c.deletion_retry_count + 1,
                    last_error=message[:2000],
                )
            )
        logs.append(log_row(t["id"], t["type"], loc, t["size"], reason, outcome, message, actor))
    write_log_rows(session, logs)
    if source_packages:
        # Side effect of the document: a package gone from the source site makes its
        # raw files DELETION_POSSIBLE (stage 1), in one bulk UPDATE.
        mark_raw_data_files_for_deletion(session, source_packages)


def delete_copies(
    physical_copy_ids: Sequence[int], actor: str = "deletion_worker"
) -> dict[str, int]:
    """Body of every deletion task: double-check, delete from storage, record."""
    summary = {"deleted": 0, "skipped": 0, "failed": 0}
    ids = [int(i) for i in physical_copy_ids]
    if not ids:
        return summary
    db = DatabaseConnection()
    waiting: list[int] = []
    with db.session_scope() as session:
        # A copy scheduled by hand (not through a claim) is taken as decided when it was
        # last sent, else now: the archives' proof must be taken after that.
        session.execute(
            update(PCT)
            .where(
                PCT.c.id.in_(ids),
                PCT.c.status.in_(list(WORKER_ACCEPTS)),
                PCT.c.deletion_decided_at.is_(None),
            )
            .values(deletion_decided_at=func.coalesce(PCT.c.deletion_scheduled_at, m.utcnow()))
        )
        targets, unsure = _recheck_and_claim(session, ids, actor, summary, waiting, False)
    if waiting:
        # The archives' sites are asked for the proof after the decision (a copy whose
        # archive file vanished meanwhile: the proof finds it, and the copy here stays);
        # in embedded mode it is taken now, so the copies are checked once more.  A copy
        # still waiting stays as it was, for a re-send of the task.
        with db.session_scope() as session:
            request_post_decision_proof(session, waiting)
        with db.session_scope() as session:
            more, more_unsure = _recheck_and_claim(session, waiting, actor, summary, [])
        targets += more
        unsure += more_unsure
    if not targets and not unsure:
        return summary
    # The batch's heartbeat: recovery leaves it alone while its copies keep beating.
    claimed = [t["id"] for t in targets]
    heartbeat = (
        beating(
            PCT,
            PCT.c.id.in_(claimed),
            PCT.c.status == S.DELETION_IN_PROGRESS,
            column="deletion_scheduled_at",
            label=f"deletion-{claimed[0]}",
        )
        if claimed
        else contextlib.nullcontext()
    )
    with heartbeat:
        outcomes = _delete_from_storage(targets)
    looked = _look_at(unsure)
    with db.session_scope() as session:
        outcomes += _settle_refused(session, looked, actor, summary)
        _record_outcomes(session, outcomes, actor, summary)
    return summary


def delete_bulk_raw_data_files_internal(
    physical_copy_ids: Sequence[int], queue_name: str | None = None
) -> dict[str, int]:
    """The actual work of a bulk deletion: load the batch, re-check every rule against the
    DB in one query per rule (copies whose rule no longer holds go back to
    PRESENT / DELETION_POSSIBLE with a SKIPPED log), move the rest to
    DELETION_IN_PROGRESS, delete from storage, then mark DELETED (``deleted_at``) or
    DELETION_FAILED (retry count + 1, error kept) and write the audit trail."""
    return delete_copies(physical_copy_ids)
