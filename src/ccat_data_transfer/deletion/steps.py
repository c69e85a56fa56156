"""The five scheduling steps of a deletion cycle, in the document's order:

1. :func:`delete_data_transfer_packages` - DataTransferPackages from buffers;
2. :func:`delete_raw_data_packages_bulk` - RawDataPackages from SOURCE-site and LTA-site
   buffers;
3. :func:`delete_processing_raw_data_files` - raw files at PROCESSING locations;
4. :func:`delete_staged_raw_data_files_from_processing` - files of STAGED packages;
5. :func:`process_deletion_possible_raw_data_files` - stage 2 of source-site raw files.

Each step finds candidates (``deletion.candidates``), claims them in batches and submits
one task per batch (``deletion.claims``, ``deletion.worker``).

Room in the house: the deletion manager; imports the other ``deletion`` modules below it,
``database`` and ``ccat_ops_db``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from ccat_data_transfer.core.config import settings
from ccat_data_transfer.core.database import is_postgresql
from ccat_data_transfer.deletion.base import (
    COPY_TYPE_DATA_TRANSFER_PACKAGE,
    COPY_TYPE_RAW_DATA_FILE,
    COPY_TYPE_RAW_DATA_PACKAGE,
    LT,
    PCT,
    S,
)
from ccat_data_transfer.deletion.candidates import (
    EXPIRED,
    deletable_package_copies,
    deletion_possible_selection,
    locations_with_expired,
    oldest_under_pressure,
    processing_file_ids,
    retention_cutoff,
    staged_file_ids,
    staged_package_copies,
)
from ccat_data_transfer.deletion.claims import (
    Candidate,
    claim_expired,
    schedule_candidates,
    submit_batches,
)
from ccat_data_transfer.deletion.pressure import (
    Statuses,
    batch_size_for,
    bytes_to_free,
    cycle_limit,
    should_delete_based_on_buffer_status,
    state_from,
)
from ccat_data_transfer.deletion.rules import decide_dtp_copy, decide_rdp_copy
from ccat_data_transfer.deletion.tasks import (
    delete_bulk_data_transfer_packages,
    delete_bulk_raw_data_files,
    delete_bulk_raw_data_packages,
)
from ccat_data_transfer.deletion.trail import (
    add_deletion_log,
    batch_row,
    copy_size,
    write_log_rows,
)
from ccat_ops_db import models as m


def _schedule_package_copies(
    session: Session,
    copy_cls: type[m.PhysicalCopy],
    decide: Any,
    copy_type: str,
    task: Any,
    statuses: Statuses,
    location_ids: list[int] | None = None,
) -> int:
    found = deletable_package_copies(
        session, copy_cls, decide, location_ids=location_ids, statuses=statuses
    )
    total = 0
    for loc, items in found.items():
        state = statuses.state(loc)
        candidates = [Candidate(c.id, copy_type, copy_size(c), d.reason, d.code) for c, d in items]
        total += schedule_candidates(
            session, loc, candidates, task, (S.PRESENT,), batch_size_for(state)
        )
    return total


def delete_data_transfer_packages(
    session: Session, statuses: Statuses | None = None, location_ids: list[int] | None = None
) -> int:
    """Step 1: schedule deletion of DataTransferPackages from buffers (matrix rows
    "DataTransferPackage / SOURCE buffer" and "/ LTA site buffer")."""
    statuses = statuses or Statuses(session)
    return _schedule_package_copies(
        session,
        m.DataTransferPackagePhysicalCopy,
        decide_dtp_copy,
        COPY_TYPE_DATA_TRANSFER_PACKAGE,
        delete_bulk_data_transfer_packages,
        statuses,
        location_ids,
    )


def delete_raw_data_packages_bulk(
    session: Session, statuses: Statuses | None = None, location_ids: list[int] | None = None
) -> int:
    """Step 2: schedule deletion of RawDataPackages from SOURCE-site and LTA-site buffers in
    bulk: find (rule per copy), claim PRESENT -> DELETION_SCHEDULED per batch with one
    UPDATE, commit, one task per batch per location.  When a copy leaves the source site
    the worker marks the package's raw files DELETION_POSSIBLE."""
    statuses = statuses or Statuses(session)
    return _schedule_package_copies(
        session,
        m.RawDataPackagePhysicalCopy,
        decide_rdp_copy,
        COPY_TYPE_RAW_DATA_PACKAGE,
        delete_bulk_raw_data_packages,
        statuses,
        location_ids,
    )


def delete_processing_raw_data_files(
    session: Session, statuses: Statuses | None = None, location_ids: list[int] | None = None
) -> int:
    """Step 3: schedule deletion of PRESENT raw-file copies at PROCESSING locations that no
    active StagingJob references (all jobs using them have ``active=False``)."""
    statuses = statuses or Statuses(session)
    total = 0
    for loc in statuses.locations([LT.PROCESSING], location_ids):
        state = statuses.state(loc)
        size = batch_size_for(state)
        total += _in_batches(cycle_limit(state), size, _processing_pass, session, loc, size)
    return total


def _processing_pass(session: Session, loc: m.DataLocation, size: int, take: int) -> int:
    """One pass of step 3 at one location: at most ``take`` copies."""
    candidates = [
        Candidate(
            i,
            COPY_TYPE_RAW_DATA_FILE,
            nbytes,
            "no active StagingJob references it",
            "no_active_staging_job",
        )
        for i, nbytes in processing_file_ids(session, loc, [S.PRESENT], take)
    ]
    return schedule_candidates(
        session, loc, candidates, delete_bulk_raw_data_files, (S.PRESENT,), size
    )


def _in_batches(limit: int | None, batch_size: int, one_pass: Any, *args: Any) -> int:
    """Run ``one_pass(*args, take)``, which schedules at most ``take`` copies and returns
    how many it scheduled.  With a ``limit``, once.  Without (EMERGENCY: everything that
    may go), pass after pass of one batch each, until a pass schedules nothing or
    DELETION_EMERGENCY_MAX_BATCHES passes have run: no pass holds more than one batch of
    ids in memory, and what is left waits for the next cycle."""
    if limit is not None:
        return int(one_pass(*args, limit))
    total = 0
    for _ in range(max(1, int(settings.get("DELETION_EMERGENCY_MAX_BATCHES", 1000)))):
        done = int(one_pass(*args, batch_size))
        if done == 0:
            break
        total += done
    return total


def delete_staged_raw_data_files_from_processing(
    session: Session, statuses: Statuses | None = None, location_ids: list[int] | None = None
) -> int:
    """Step 4: for STAGED package copies at PROCESSING locations whose staging jobs are all
    inactive, schedule bulk deletion of their raw-file copies; a package copy whose files
    are all gone becomes DELETED."""
    statuses = statuses or Statuses(session)
    total = 0
    for loc in statuses.locations([LT.PROCESSING], location_ids):
        state = statuses.state(loc)
        staged = staged_package_copies(session, loc)
        if not staged:
            continue
        size = batch_size_for(state)
        package_ids = [c.raw_data_package_id for c in staged]
        total += _in_batches(
            cycle_limit(state), size, _staged_pass, session, loc, package_ids, size
        )
        _finish_staged_packages(session, loc)
    return total


def _staged_pass(
    session: Session, loc: m.DataLocation, package_ids: list[int], size: int, take: int
) -> int:
    """One pass of step 4 at one location: at most ``take`` copies."""
    candidates = [
        Candidate(
            i,
            COPY_TYPE_RAW_DATA_FILE,
            nbytes,
            "staging jobs inactive (STAGED package cleanup)",
            "staging_job_inactive",
        )
        for i, nbytes in staged_file_ids(session, loc, package_ids, take)
    ]
    return schedule_candidates(
        session, loc, candidates, delete_bulk_raw_data_files, (S.PRESENT, S.STAGED), size
    )


def _finish_staged_packages(session: Session, location: m.DataLocation) -> int:
    """STAGED package copies (jobs inactive) with no raw-file copy left at the location
    -> DELETED (the tar was already removed when staging finished)."""
    done = 0
    rdf = m.RawDataFile.__table__
    for copy in staged_package_copies(session, location):
        remaining = session.scalar(
            select(func.count())
            .select_from(PCT)
            .join(rdf, rdf.c.id == PCT.c.raw_data_file_id)
            .where(
                PCT.c.type == COPY_TYPE_RAW_DATA_FILE,
                PCT.c.data_location_id == location.id,
                PCT.c.status != S.DELETED,
                rdf.c.raw_data_package_id == copy.raw_data_package_id,
            )
        )
        if remaining:
            continue
        res = session.execute(
            update(PCT)
            .where(PCT.c.id == copy.id, PCT.c.status == S.STAGED)
            .values(status=S.DELETED, deleted_at=m.utcnow())
        )
        if res.rowcount:
            add_deletion_log(
                session,
                copy,
                "all raw files of the STAGED package deleted; staging jobs inactive",
                reason="staging_job_inactive",
                outcome=m.DeletionOutcome.DELETED,
            )
            done += 1
    session.commit()
    session.expire_all()
    return done


def _schedule_deletion_possible_bulk(
    session: Session,
    location: m.DataLocation,
    status: dict[str, Any],
    limit: int | None,
    batch_size: int,
) -> int:
    """PostgreSQL form of :func:`deletion_possible_selection` + :func:`schedule_candidates`, with
    the same result: the expired copies are claimed straight from the rule's selectable
    (:func:`claim_expired`), without a Python object per copy, and audited with one
    SCHEDULED row per batch (as the other path does for stage 2).  Under pressure, the
    oldest others follow through :func:`schedule_candidates`, which needs a running sum of bytes."""
    cutoff = retention_cutoff(location)
    pressure = should_delete_based_on_buffer_status(location, status)
    # Computed before the claim, as in the other path: bytes_to_free subtracts what is
    # already scheduled, and the expired copies are subtracted below.
    needed = bytes_to_free(session, location, status) if pressure else 0
    sizes = dict(claim_expired(session, location, cutoff, limit))
    ids = sorted(sizes)
    chunks = [ids[start : start + batch_size] for start in range(0, len(ids), batch_size)]
    if chunks:
        rows = [
            batch_row(
                location,
                COPY_TYPE_RAW_DATA_FILE,
                chunk,
                sum(int(sizes[i] or 0) for i in chunk),
                EXPIRED[1],
                EXPIRED[0],
            )
            for chunk in chunks
        ]
        write_log_rows(session, rows)
        session.commit()  # before submitting: in embedded mode the task runs inline
        submit_batches(delete_bulk_raw_data_files, location, chunks, session)
        session.expire_all()
    scheduled = len(ids)
    if not pressure:
        return scheduled
    needed -= sum(int(size or 0) for size in sizes.values())
    room = None if limit is None else limit - scheduled
    others = oldest_under_pressure(session, location, cutoff, needed, room)
    return scheduled + schedule_candidates(
        session,
        location,
        others,
        delete_bulk_raw_data_files,
        (S.DELETION_POSSIBLE,),
        batch_size,
        audit_per_batch=True,
    )


def process_deletion_possible_raw_data_files(
    session: Session, statuses: Statuses | None = None, location_ids: list[int] | None = None
) -> int:
    """Stage 2 (step 5): DELETION_POSSIBLE raw-file copies whose retention has expired
    (``retention_period_minutes`` of the location, else RETENTION_PERIOD_MINUTES) are
    scheduled; under disk pressure the oldest others too, until exactly the bytes needed
    are freed.  Safety (package ARCHIVED, not frozen, with fresh proof from the archives;
    no audit hold here) is part of the query."""
    statuses = statuses or Statuses(session)
    total = 0
    # One statement asks every location whether it has a copy past its retention (one
    # probe of the partial index ix_physical_copy_deletion_possible each); a location
    # without one and without pressure has nothing this step could schedule.
    bulk = is_postgresql(session)
    locations = statuses.locations([LT.SOURCE, LT.BUFFER], location_ids)
    expired = locations_with_expired(session, {loc.id: retention_cutoff(loc) for loc in locations})
    for loc in locations:
        status = statuses.get(loc)
        if loc.id not in expired and not should_delete_based_on_buffer_status(loc, status):
            continue
        state = state_from(status)
        size = batch_size_for(state)
        total += _in_batches(
            cycle_limit(state), size, _stage_two_pass, session, loc, status, size, bulk
        )
    return total


def _stage_two_pass(
    session: Session,
    loc: m.DataLocation,
    status: dict[str, Any],
    size: int,
    bulk: bool,
    take: int,
) -> int:
    """One pass of stage 2 at one location: at most ``take`` copies (PostgreSQL claims
    them straight from the rule, elsewhere they are selected and then claimed)."""
    if bulk:
        return _schedule_deletion_possible_bulk(session, loc, status, take, size)
    candidates = deletion_possible_selection(session, loc, status, take)
    return schedule_candidates(
        session,
        loc,
        candidates,
        delete_bulk_raw_data_files,
        (S.DELETION_POSSIBLE,),
        size,
        audit_per_batch=True,
    )
