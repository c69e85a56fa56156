"""One deletion cycle: :func:`run_once` (the entry used by tests, the CLI's ``--once``
and the long-running loop alike), :func:`delete_data_packages` (the document's name for a
cycle) and :func:`sleep_time` (the pause between cycles, shorter under pressure).

Around the five steps of ``deletion.steps`` a cycle retries failed deletions
(:func:`reschedule_failed_deletions`), resubmits lost tasks
(:func:`resubmit_stalled_deletions`) - never at a LONG_TERM_ARCHIVE -, catches up on
stage 1 (:func:`mark_catch_up`) and asks the archives' sites for the proofs that waiting
deletions need (:func:`ask_for_proof`).

Room in the house: the deletion manager; imports the other ``deletion`` modules, ``scope``,
``buffer_status``, ``archive_proof`` (the request), config, ``database``, logging and
``ccat_ops_db``.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    DateTime,
    Integer,
    and_,
    bindparam,
    case,
    event,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session

from ccat_data_transfer.core import buffer_status as bs
from ccat_data_transfer.core import scope
from ccat_data_transfer.core.config import settings
from ccat_data_transfer.core.database import DatabaseConnection, is_postgresql
from ccat_data_transfer.core.liveness import (
    ResendFailed,
    resend_before,
    stalled_before,
    stopped,
    waited_in_queue,
    waiting_in_broker,
)
from ccat_data_transfer.core.logs import configure_logging
from ccat_data_transfer.core.manager_state import put_state, state_updated_at
from ccat_data_transfer.core.operation_types import OperationType
from ccat_data_transfer.core.queues import route_task_by_location
from ccat_data_transfer.deletion.base import (
    COPY_TYPE_RAW_DATA_FILE,
    DLT,
    LT,
    PCT,
    WORKER_ACCEPTS,
    S,
    kept,
    log,
    run,
)
from ccat_data_transfer.deletion.candidates import (
    cycle_roles,
    lta_copies_to_verify,
)
from ccat_data_transfer.deletion.claims import submit_batches
from ccat_data_transfer.deletion.marking import mark_raw_data_files_for_deletion
from ccat_data_transfer.deletion.pressure import (
    PRESSURE_TYPES,
    Statuses,
    state_from,
)
from ccat_data_transfer.deletion.proof import request_proofs
from ccat_data_transfer.deletion.steps import (
    delete_data_transfer_packages,
    delete_processing_raw_data_files,
    delete_raw_data_packages_bulk,
    delete_staged_raw_data_files_from_processing,
    process_deletion_possible_raw_data_files,
)
from ccat_data_transfer.deletion.tasks import delete_bulk_raw_data_files
from ccat_ops_db import models as m


def _not_at_an_archive() -> Any:
    """SQL: the copy is not at a LONG_TERM_ARCHIVE location.  The deletion path never
    changes an archive copy: not by a retry, nor by a resubmission."""
    lta_ids = select(DLT.c.id).where(DLT.c.location_type == LT.LONG_TERM_ARCHIVE)
    return PCT.c.data_location_id.not_in(lta_ids)


@kept
def _reschedule_statement(scoped: bool) -> Any:
    """The UPDATE of :func:`reschedule_failed_deletions` (parameters ``cap`` and, when
    ``scoped``, ``location_ids``)."""
    back = case(
        (
            and_(PCT.c.type == COPY_TYPE_RAW_DATA_FILE, PCT.c.deletion_possible_at.is_not(None)),
            literal(S.DELETION_POSSIBLE, PCT.c.status.type),
        ),
        else_=literal(S.PRESENT, PCT.c.status.type),
    )
    return (
        update(PCT)
        .where(
            PCT.c.status == S.DELETION_FAILED,
            PCT.c.deletion_retry_count < bindparam("cap", type_=Integer),
            _not_at_an_archive(),
            *(
                [PCT.c.data_location_id.in_(bindparam("location_ids", expanding=True))]
                if scoped
                else []
            ),
        )
        .values(status=back)
    )


def reschedule_failed_deletions(session: Session, location_ids: list[int] | None = None) -> int:
    """DELETION_FAILED copies below DELETION_MAX_RETRIES go back to where they came from
    (DELETION_POSSIBLE for stage-2 raw files, PRESENT otherwise) so this cycle's rules
    re-evaluate and reschedule them.  At the cap they stay DELETION_FAILED for a person.
    With ``location_ids`` only copies at those locations; never a copy at an LTA."""
    params: dict[str, Any] = {"cap": int(settings.DELETION_MAX_RETRIES)}
    if location_ids is not None:
        if not location_ids:
            return 0
        params["location_ids"] = list(location_ids)
    n = int(run(session, _reschedule_statement(location_ids is not None), params).rowcount or 0)
    if n:
        session.commit()
    return n


def deletion_stalled(window: timedelta | None = None, before: Any = None) -> ColumnElement[bool]:
    """A copy whose deletion STARTED (DELETION_IN_PROGRESS) and whose batch's heartbeat
    (``deletion_scheduled_at``) stopped (:func:`ccat_data_transfer.core.liveness.stopped`)."""
    return (PCT.c.status == S.DELETION_IN_PROGRESS) & stopped(
        PCT.c.deletion_scheduled_at, window=window, before=before
    )


@kept
def _stalled_statement(scoped: bool) -> Any:
    """The copies :func:`resubmit_stalled_deletions` looks at (parameters
    ``queued_before`` (``liveness.resend_before``), ``stalled_before``
    (``liveness.stalled_before``) and, when ``scoped``, ``location_ids``)."""
    at = PCT.c.deletion_scheduled_at
    queued = waited_in_queue(at, before=bindparam("queued_before", type_=DateTime))
    stmt = select(PCT.c.id, PCT.c.data_location_id, PCT.c.status).where(
        or_(
            (PCT.c.status == S.DELETION_SCHEDULED) & queued,
            deletion_stalled(before=bindparam("stalled_before", type_=DateTime)),
        ),
        _not_at_an_archive(),
    )
    if scoped:
        stmt = stmt.where(PCT.c.data_location_id.in_(bindparam("location_ids", expanding=True)))
    return stmt


def resubmit_stalled_deletions(session: Session, location_ids: list[int] | None = None) -> int:
    """Copies whose deletion task may be lost are submitted again (the task is
    idempotent; no retry is counted): DELETION_SCHEDULED ones sent longer than
    QUEUED_RESEND_SECONDS ago, DELETION_IN_PROGRESS ones whose batch's heartbeat
    (``deletion_scheduled_at``) stopped (:mod:`ccat_data_transfer.core.liveness`).  With
    ``location_ids`` only copies at those locations.  Never a copy at an LTA: one found in
    a deletion state stays as it is, for a person (it counts as no proof meanwhile)."""
    params: dict[str, Any] = {"queued_before": resend_before(), "stalled_before": stalled_before()}
    if location_ids is not None:
        params["location_ids"] = list(location_ids)
    rows = run(session, _stalled_statement(location_ids is not None), params).all()
    # Queued copies are sent again only when their location's queue is empty at the
    # broker (their message was lost); while messages wait there, it may be among them.
    locations = {loc_id: session.get(m.DataLocation, loc_id) for loc_id in {r[1] for r in rows}}
    lost = {
        loc_id
        for loc_id, loc in locations.items()
        if waiting_in_broker(route_task_by_location(OperationType.DELETION, loc)) == 0
    }
    rows = [r for r in rows if r[2] == S.DELETION_IN_PROGRESS or r[1] in lost]
    if not rows:
        return 0
    session.commit()  # end the read transaction before talking to the broker
    by_loc: dict[int, list[int]] = defaultdict(list)
    for cid, loc_id, _ in rows:
        by_loc[loc_id].append(cid)
    # Each location's batch is sent, then (only then) its copies stamped as sent; one
    # location's failing send does not stop the others.
    sent, failed, first = 0, 0, None
    for loc_id, ids in by_loc.items():
        try:
            submit_batches(delete_bulk_raw_data_files, locations[loc_id], [ids], session)
            session.execute(
                update(PCT)
                .where(PCT.c.id.in_(ids), PCT.c.status.in_(list(WORKER_ACCEPTS)))
                .values(deletion_scheduled_at=m.utcnow())
            )
            session.commit()
            sent += len(ids)
        except Exception as exc:
            failed += len(ids)
            first = first or exc
            session.rollback()
            log.exception("deletion_resubmit_failed", location_id=loc_id, error=str(exc))
    session.expire_all()
    if first is not None:
        raise ResendFailed("stalled deletions", (sent, failed, len(rows)), first)
    return sent


#: Settings of the cycle's transactions on PostgreSQL (each ends with its transaction).
_CYCLE_SETTINGS = (
    "SELECT set_config('jit', 'off', true),"
    " set_config('plan_cache_mode', 'force_custom_plan', true)"
)


#: ``Session.info`` key set while a cycle runs (:func:`_cycle_settings`).
_IN_CYCLE = "ccat_deletion_cycle"


@event.listens_for(Session, "after_begin")
def _apply_cycle_settings(session: Session, _transaction: Any, connection: Any) -> None:
    """As each transaction of a cycle on PostgreSQL begins: :data:`_CYCLE_SETTINGS`.  One
    listener for every session, which does nothing outside a cycle (adding and removing a
    listener per cycle cost more than the check)."""
    if session.info.get(_IN_CYCLE):
        connection.exec_driver_sql(_CYCLE_SETTINGS)


@contextlib.contextmanager
def _cycle_settings(session: Session) -> Iterator[None]:
    """PostgreSQL: as each transaction of this block begins, no JIT compilation and no
    generic plans.  The cycle's statements touch few rows, but the planner's estimates for
    the history they are checked against pass ``jit_above_cost`` once the tables hold
    millions of rows (compiling then costs 100-200 ms a statement); and a generic plan of a
    statement run again (the driver prepares it) does not know which state is asked for,
    so it plans for the average state - the history - instead of the few copies in it."""
    if not is_postgresql(session) or session.info.get(_IN_CYCLE):
        yield
        return
    session.info[_IN_CYCLE] = True
    try:
        if session.in_transaction():
            session.connection().exec_driver_sql(_CYCLE_SETTINGS)
        yield
    finally:
        session.info.pop(_IN_CYCLE, None)


def run_once(session: Session, site: str | None = None) -> dict[str, Any]:
    """One deletion cycle; returns what it did.  The five steps of the document, preceded
    by retries of failed deletions and followed by the catch-up of stage-1 marking.

    ``site`` scopes the cycle to copies at that site's locations (default: the setting
    ``MANAGER_SITE``); the rules still consult every site's copies
    (:mod:`ccat_data_transfer.core.scope`)."""
    with _cycle_settings(session):
        return _run_once(session, site)


def _run_once(session: Session, site: str | None) -> dict[str, Any]:
    ids = scope.location_ids(session, site)
    statuses = Statuses(session)
    summary: dict[str, Any] = {}
    summary["failed_rescheduled"] = reschedule_failed_deletions(session, ids)
    summary["stalled_resubmitted"] = resubmit_stalled_deletions(session, ids)
    summary["data_transfer_packages"] = delete_data_transfer_packages(session, statuses, ids)
    summary["raw_data_packages"] = delete_raw_data_packages_bulk(session, statuses, ids)
    summary["processing_raw_data_files"] = delete_processing_raw_data_files(session, statuses, ids)
    summary["staged_raw_data_files"] = delete_staged_raw_data_files_from_processing(
        session, statuses, ids
    )
    # Every step commits what it changes (before submitting any task), so a cycle that
    # changes nothing is one read-only transaction, which the caller ends.
    summary["marked_deletion_possible"] = mark_catch_up(session, ids, statuses)
    summary["deletion_possible_raw_data_files"] = process_deletion_possible_raw_data_files(
        session, statuses, ids
    )
    summary["verifications_requested"] = ask_for_proof(session, statuses, ids)
    summary["buffer_states"] = {name: state_from(st).value for name, st in statuses._cache.items()}
    return summary


def ask_for_proof(session: Session, statuses: Statuses, location_ids: list[int] | None) -> int:
    """Copies that wait only for proof of their archive copies: ask each archive's site
    for exactly the proof each needs (``deletion.proof.request_proofs``: a full read of an
    archive copy never read back since it was written, else a stat; an LTA-site buffer's
    own site's archive copy even when other archives hold proof).  A later cycle decides
    on the answer; in embedded mode the verification runs at once, so the next cycle
    does."""
    wanted = lta_copies_to_verify(session, statuses, location_ids)
    if not wanted:
        return 0
    session.commit()  # the verification may run inline, in its own session
    asked = request_proofs(session, wanted)
    session.expire_all()
    return asked


def mark_catch_up(
    session: Session, location_ids: list[int] | None = None, statuses: Statuses | None = None
) -> int:
    """The catch-up of stage 1 (:func:`mark_raw_data_files_for_deletion` over every
    package), at most once per ``DELETION_MARK_CATCHUP_SECONDS`` (0: every cycle).

    It is a safety net: stage 1 normally happens in the same transaction in which the
    deletion worker records that a package's last copy at the source site is DELETED.  It
    finds what that did not mark (data changed by hand, a restored LTA copy), at a cost
    that follows the backlog of PRESENT raw files, so it need not run in every cycle.  The
    time of the last run is kept in ``manager_state`` per scope, so that every process of
    the same scope shares it.  A run commits its marks and its time."""
    interval = float(settings.get("DELETION_MARK_CATCHUP_SECONDS", 0) or 0)
    key = (
        "deletion:mark_catch_up"
        + ("" if location_ids is None else "@" + ",".join(str(i) for i in sorted(location_ids)))[
            :100
        ]
    )
    now = m.utcnow()
    last = state_updated_at(session, key) if interval > 0 else None
    if last is not None and last > now - timedelta(seconds=interval):
        return 0
    roles = cycle_roles(session, statuses)
    marked = mark_raw_data_files_for_deletion(session, location_ids=location_ids, roles=roles)
    if interval > 0:
        # An upsert: another manager of the same scope may have written the row since.
        put_state(session, key, str(marked), now)
    if marked or interval > 0:
        session.commit()  # the marks and the time of this run (else nothing was written)
    return marked


def delete_data_packages(verbose: bool = False) -> dict[str, Any]:
    """Run one deletion cycle: 1. DataTransferPackages from buffers, 2. RawDataPackages
    from SOURCE and LTA buffers, 3. raw files from processing locations, 4. staged files
    from processing locations, 5. raw files marked DELETION_POSSIBLE."""
    if verbose:
        configure_logging(verbose=True)
    db = DatabaseConnection()
    with db.session_scope() as session:
        summary = run_once(session)
    log.info(
        "deletion_cycle_completed", **{k: v for k, v in summary.items() if k != "buffer_states"}
    )
    return summary


def sleep_time() -> float:
    """DELETION_MANAGER_SLEEP_TIME, shortened while any location is under pressure."""
    states = []
    try:
        db = DatabaseConnection()
        with db.session_scope() as session:
            statuses = Statuses(session)  # one read of the locations, one of the statuses
            states = [statuses.state(loc) for loc in statuses.locations(PRESSURE_TYPES)]
    except Exception as exc:  # the loop must go on even if the DB hiccups
        log.warning("sleep_time_status_unavailable", error=str(exc))
    return bs.manager_sleep_time(float(settings.DELETION_MANAGER_SLEEP_TIME), states)
