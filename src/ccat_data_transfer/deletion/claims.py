"""Claims: moving deletion candidates to DELETION_SCHEDULED atomically, writing the
SCHEDULED audit, committing, and submitting one task per batch.

A claim is ``UPDATE ... WHERE id IN (...) AND status IN (<expected>)``: when two managers
race, the database lets each row change once, so every copy is scheduled by exactly one
of them.  SQLite and PostgreSQL differ here only in how they claim (PostgreSQL claims and
audits in one statement, and claims stage 2's expired copies straight from the rule's
selectable); what may be claimed is stated once in ``deletion.rule_sql``.

Room in the house: the deletion manager's scheduling edge; imports ``deletion.base``,
``deletion.rule_sql``, ``deletion.trail``, ``database``, ``queue_discovery`` and
``ccat_ops_db``.  The tasks it submits are passed in, so it does not import the worker.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, any_, select, text, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.visitors import InternalTraversal

from ccat_data_transfer.core.database import is_postgresql
from ccat_data_transfer.core.operation_types import OperationType
from ccat_data_transfer.core.queues import route_task_by_location
from ccat_data_transfer.deletion.base import DLT, LT, PCT, S
from ccat_data_transfer.deletion.proof import request_post_decision_proof
from ccat_data_transfer.deletion.rule_sql import copy_bytes, deletion_possible_candidates
from ccat_data_transfer.deletion.trail import (
    batch_row,
    log_batch_scheduled,
    log_row,
    write_log_rows,
)
from ccat_ops_db import models as m


@dataclass
class Candidate:
    """A copy chosen for deletion, with the rule (code and words) that allows it."""

    copy_id: int
    copy_type: str
    size: int | None
    reason: str
    code: str


def _decided() -> dict[str, Any]:
    """The values of a claim: DELETION_SCHEDULED, sent now, decided now (the moment after
    which the archives' proof must be taken for a copy that may be the last one outside
    them; ``deletion.rules``)."""
    now = m.utcnow()
    return {
        "status": S.DELETION_SCHEDULED,
        "deletion_scheduled_at": now,
        "deletion_decided_at": now,
    }


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
        .values(**_decided())
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
        SET status = :scheduled, deletion_scheduled_at = :now, deletion_decided_at = :now
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
    chunk: list[Candidate],
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
        log_batch_scheduled(
            location,
            chunk[0].copy_type,
            claimed,
            sum(int(by_id[i].size or 0) for i in claimed),
            ",".join(sorted({by_id[i].code for i in claimed})),
        )
    return claimed


def _claim_and_audit(
    session: Session,
    location: m.DataLocation,
    chunk: list[Candidate],
    expected: tuple[m.PhysicalCopyStatus, ...],
    audit_per_batch: bool,
) -> list[int]:
    """Claim one batch and write its SCHEDULED audit rows; returns the ids claimed.

    The rows are one per copy, or with ``audit_per_batch`` (stage 2, raw files by the
    million) one per batch and reason that lists the copies it covers.  Per copy,
    PostgreSQL claims and writes the rows in one statement (:func:`_claim_and_log_bulk`);
    elsewhere the claim is followed by one INSERT of the same rows."""
    if not audit_per_batch and is_postgresql(session):
        return _claim_and_log_bulk(session, location, chunk, expected)
    by_id = {c.copy_id: c for c in chunk}
    claimed = claim_for_deletion(session, list(by_id), expected)
    if audit_per_batch:
        groups: dict[tuple[str, str, str], list[int]] = defaultdict(list)
        for cid in claimed:
            c = by_id[cid]
            groups[(c.copy_type, c.code, c.reason)].append(cid)
        rows = [
            batch_row(
                location, copy_type, ids, sum(int(by_id[i].size or 0) for i in ids), code, reason
            )
            for (copy_type, code, reason), ids in groups.items()
        ]
    else:
        rows = [
            log_row(
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
    write_log_rows(session, rows)
    return claimed


def submit_batches(
    task: Any, location: m.DataLocation, batches: Iterable[list[int]], session: Session
) -> None:
    """One task per batch on the location's deletion queue, after asking the archives'
    sites for the proof that the batch's deletion needs, now that it is decided
    (``deletion.proof.request_post_decision_proof``; the decision is committed: in
    embedded mode the proof is taken before the task runs, elsewhere the worker keeps a
    copy whose proof has not arrived and a re-send finds it)."""
    queue = route_task_by_location(OperationType.DELETION, location)
    for ids in batches:
        request_post_decision_proof(session, ids)
        task.apply_async(args=[ids], kwargs={"queue_name": queue}, queue=queue)


def schedule_candidates(
    session: Session,
    location: m.DataLocation,
    candidates: list[Candidate],
    task: Any,
    expected: Iterable[m.PhysicalCopyStatus],
    batch_size: int,
    audit_per_batch: bool = False,
) -> int:
    """Claim candidates in batches (:func:`_claim_and_audit`), commit, then submit one
    task per batch; the worker writes the per-copy DELETED / SKIPPED / FAILED rows."""
    scheduled = 0
    expected = tuple(expected)
    for start in range(0, len(candidates), batch_size):
        chunk = candidates[start : start + batch_size]
        claimed = _claim_and_audit(session, location, chunk, expected, audit_per_batch)
        session.commit()  # before submitting: in embedded mode the task runs inline
        if claimed:
            submit_batches(task, location, [claimed], session)
            scheduled += len(claimed)
        session.expire_all()
    return scheduled


class ArrayOfSelect(ColumnElement[Any]):
    """PostgreSQL ``ARRAY(SELECT ...)``: the rows a SELECT picks, as one array value.
    ``id = ANY(ARRAY(SELECT ...))`` makes the claim a primary-key lookup per picked copy,
    where a join with the same SELECT may scan the whole table."""

    inherit_cache = True
    _traverse_internals = [("stmt", InternalTraversal.dp_clauseelement)]

    def __init__(self, stmt: Any) -> None:
        self.stmt = stmt
        self.type = ARRAY(BigInteger())


@compiles(ArrayOfSelect, "postgresql")
def _compile_array_of_select(element: ArrayOfSelect, compiler: Any, **kw: Any) -> str:
    return f"ARRAY({compiler.process(element.stmt, **kw)})"


def claim_expired(
    session: Session, location: m.DataLocation, cutoff: datetime, limit: int | None
) -> list[tuple[int, int | None]]:
    """PostgreSQL, one statement: claim (``DELETION_POSSIBLE -> DELETION_SCHEDULED``) the
    copies of :func:`~ccat_data_transfer.deletion.rule_sql.deletion_possible_candidates`
    marked at or before ``cutoff``, oldest first, at most ``limit``.  Returns (copy id,
    size) of the claimed copies.

    The claim guard is the UPDATE's own ``WHERE status = 'DELETION_POSSIBLE'``: when two
    managers race, PostgreSQL re-checks it on every row the other one changed first, so
    each copy is claimed once."""
    if location.location_type == LT.LONG_TERM_ARCHIVE:  # never: callers pass SOURCE/BUFFER
        raise ValueError(f"refusing to schedule deletions at LTA {location.name}")
    picked = deletion_possible_candidates(location.id, expired_before=cutoff)
    picked = picked.with_only_columns(picked.selected_columns.id)
    if limit is not None:
        picked = picked.limit(limit)
    size = copy_bytes(PCT)
    claim = (
        update(PCT)
        .where(
            PCT.c.id == any_(ArrayOfSelect(picked)),
            PCT.c.data_location_id == location.id,
            PCT.c.status == S.DELETION_POSSIBLE,
            PCT.c.lost_at.is_(None),
        )
        .values(**_decided())
        .returning(PCT.c.id, size)
    )
    # The oldest-first sort of a large backlog should not spill to disk (4 MB default);
    # SET LOCAL ends with this transaction, which the caller commits right after.
    session.execute(text("SET LOCAL work_mem = '64MB'"))
    return [(int(r[0]), r[1]) for r in session.execute(claim)]
