"""Stage 6, staging: bring archived packages from a LONG_TERM_ARCHIVE to a PROCESSING
location for scientists, and let them go again.

A scientist's request is a :class:`~ccat_ops_db.models.StagingJob`: packages, a
destination PROCESSING location, a retention period.  Create one with
:func:`create_staging_job` (the CLI ``stage`` and ``POST /api/v1/staging-jobs`` call it).

Choosing packages
-----------------
A job names its packages in one of three ways:

* by RawDataPackage ID (``package_ids``);
* by ExecutedObsUnit (``executed_obs_unit``: name or ID; optionally narrowed to one
  ``instrument``);
* by ``instrument`` and a time range ``start`` .. ``end``: every package of the instrument
  whose **observation** overlaps the half-open range ``[start, end)``.  The observation
  time is ``ExecutedObsUnit.start_time`` .. ``ExecutedObsUnit.end_time`` (when the obs unit
  has no ``end_time`` it is taken as an instant at its start; when it has no
  ``start_time`` its ``created_at`` stands in).  Scientists ask for "what was observed
  then", not for "what was packaged then", hence observation time and not
  ``RawDataPackage.created_at``.

Every chosen package must be ARCHIVED with at least one usable LTA copy (PRESENT, not
lost); otherwise nothing is written and
:class:`~ccat_data_transfer.exceptions.ValidationError` names the packages.

Retention
---------
``retention_minutes`` (else the destination's ``retention_period_minutes``, else the
setting ``RETENTION_PERIOD_MINUTES``).  ``expires_at`` is first ``created_at + retention``
and is reset to ``completed_at + retention`` when the data is ready: the clock runs from
the moment the scientist can use the files.  Each :func:`run_once` calls
:func:`expire_staging_jobs`, which turns active jobs past ``expires_at`` inactive
(``deactivated_at`` set); :func:`deactivate_staging_job` does the same on request
(``stage done ID``, ``POST /api/v1/staging-jobs/{id}/done``).  The deletion manager then
removes the files of packages that no active job at that location still needs.

What a cycle does
-----------------
:func:`run_once` expires jobs, then claims each due PENDING active job with ``UPDATE
staging_job SET status='IN_PROGRESS' WHERE id=:id AND status='PENDING'`` (row count 1 or
someone else has it), commits, and submits :func:`stage_staging_job` on the
``{site}_{destination}_staging`` queue (in-process in embedded mode).

The task stages the job's packages one by one (``packages_done`` moves as it goes) and
marks the job COMPLETED.  For one package at one location it holds a small lock row
(``manager_state`` key ``staging_lock:<package>:<location>``) so that two jobs never
stage the same package into the same place at once, and:

1. reuses a STAGED copy already at the location if every file is still on disk with its
   size (files shared by jobs at one location are one set of copies); a copy whose files
   vanished behind the database's back is staged again (recovery);
2. waits (retry later) while the deletion manager is deleting that package's files there;
3. otherwise picks the LTA copies in the order of :func:`select_lta_copies` and, for the
   first that works, copies the tar while hashing it and compares with
   ``RawDataPackage.checksum``.  An unreachable LTA, a missing object or a checksum
   mismatch (logged as ``staging_source_corrupt``, noted on the copy's ``last_error``)
   moves on to the next LTA;
4. unpacks with :func:`~ccat_data_transfer.tarutil.safe_extract`, checks every file's
   SHA-256 and size against its RawDataFile, and calls
   :func:`_mark_package_as_staged_and_cleanup`: one RawDataFilePhysicalCopy PRESENT per
   file, the tar deleted, the RawDataPackagePhysicalCopy at the location STAGED.

Failures: every LTA unreachable (or the destination full) is retryable: the job goes back
to PENDING with ``retry_count + 1`` and ``next_attempt_at`` (backoff
``STAGING_RETRY_BASE_SECONDS * 2**retry_count``), FAILED after ``STAGING_MAX_RETRIES``.
No good copy anywhere (all missing or corrupt), or files that do not match their
records, is permanent: FAILED with ``failure_reason``.  Physical copy rows are never
deleted; re-staging after a deletion adds new rows.

Path layout at PROCESSING
-------------------------
Files lie at ``<RawDataFile.relative_path>`` under the location root (the tar's members
are exactly these paths).  The tar is placed temporarily at
``<RawDataPackage.relative_path>`` (``raw_data_packages/<instrument>/<module>/<file>``)
and removed once unpacked; the STAGED package copy records that path.  A PROCESSING
location must be a disk location (files are unpacked into a filesystem).  Two different
files with the same relative path (from two SOURCE locations) cannot both be staged to
one location: the second is refused with a clear reason.

LTA copy selection order
------------------------
Only PRESENT, not lost copies at active LONG_TERM_ARCHIVE locations are candidates,
ordered by: 1. the destination's own site first, 2. the order of the setting
``STAGING_PREFERRED_SITES`` (site names or short names; unlisted sites after),
3. ``DataLocation.priority`` (lower first), 4. location name.  Reachability is found out by
trying: the next candidate is used when one is down, lacks the object or is corrupt.
"""

from __future__ import annotations

import errno
import hashlib
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ccat_data_transfer import scope
from ccat_data_transfer.celery_app import app
from ccat_data_transfer.config.config import settings
from ccat_data_transfer.database import DatabaseConnection
from ccat_data_transfer.exceptions import (
    NotFoundError,
    PermanentError,
    RetryableError,
    ValidationError,
)
from ccat_data_transfer.logging_utils import get_logger
from ccat_data_transfer.operation_types import OperationType
from ccat_data_transfer.queue_discovery import route_task_by_location
from ccat_data_transfer.storage import (
    CHUNK_SIZE,
    DiskStorage,
    ObjectNotFound,
    Storage,
    StorageError,
    StorageFullError,
    StorageUnavailableError,
    storage_for_location,
)
from ccat_data_transfer.tarutil import ExtractedMember, TarUtilError, safe_extract
from ccat_ops_db import models as m

log = get_logger(__name__)

S = m.PhysicalCopyStatus
LT = m.LocationType

#: Copy statuses meaning "the deletion manager is removing it right now".
_DELETING = (S.DELETION_SCHEDULED, S.DELETION_IN_PROGRESS)
# Chunk for IN (...) lists (SQLite's bound-parameter limit).
_IN_CHUNK = 500

__all__ = [
    "StagingBusy",
    "create_staging_job",
    "deactivate_staging_job",
    "expire_staging_jobs",
    "get_staging_job",
    "job_as_dict",
    "list_staging_jobs",
    "run_once",
    "select_lta_copies",
    "sleep_time",
    "stage_package",
    "stage_staging_job",
    "active_jobs_using_package",
]


class StagingBusy(RetryableError):
    """Someone else is staging or deleting this package at this location: try later."""


# ---------------------------------------------------------------------------------------
# Creating, listing and ending jobs
# ---------------------------------------------------------------------------------------


def _naive_utc(value: datetime | str | None, what: str) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ValidationError(f"{what}: {value!r} is not an ISO 8601 time") from None
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value


def _by_id_or_name(session: Session, model: Any, ident: str | int, name_column: Any) -> Any:
    """The row of ``model`` that ``ident`` names: by primary key when an int, else by
    ``name_column`` (None when there is none).  Staging requests may name locations, users
    and obs units either way."""
    if isinstance(ident, int):
        return session.get(model, ident)
    return session.scalars(select(model).where(name_column == ident)).one_or_none()


def _resolve_location(session: Session, destination: str | int | m.DataLocation) -> m.DataLocation:
    if isinstance(destination, m.DataLocation):
        return destination
    loc = _by_id_or_name(session, m.DataLocation, destination, m.DataLocation.name)
    if loc is None:
        raise NotFoundError(f"unknown data location {destination!r}; see `list-locations`")
    if loc.location_type != LT.PROCESSING:
        raise ValidationError(
            f"destination {loc.name!r} is a {loc.location_type.value} location; "
            "data can only be staged to a PROCESSING location"
        )
    if not loc.active:
        raise ValidationError(f"destination {loc.name!r} is not active")
    return loc


def _resolve_user(session: Session, user: str | int | m.User | None) -> m.User | None:
    if user is None or isinstance(user, m.User):
        return user
    row = _by_id_or_name(session, m.User, user, m.User.username)
    if row is None:
        raise NotFoundError(f"unknown user {user!r}")
    return row


def _resolve_instrument(session: Session, instrument: str | int) -> m.Instrument:
    stmt = select(m.Instrument)
    stmt = (
        stmt.where(m.Instrument.id == instrument)
        if isinstance(instrument, int)
        else stmt.where(func.lower(m.Instrument.name) == str(instrument).lower())
    )
    row = session.scalars(stmt).one_or_none()
    if row is None:
        raise NotFoundError(f"unknown instrument {instrument!r}")
    return row


def _resolve_obs_unit(session: Session, eou: str | int | m.ExecutedObsUnit) -> m.ExecutedObsUnit:
    if isinstance(eou, m.ExecutedObsUnit):
        return eou
    row = _by_id_or_name(session, m.ExecutedObsUnit, eou, m.ExecutedObsUnit.name)
    if row is None:
        raise NotFoundError(f"unknown executed obs unit {eou!r}")
    return row


def _usable_lta_copy_exists(package_id_col: Any) -> Any:
    """SQL: the package has a PRESENT, not lost copy at an active LTA location."""
    pc = m.PhysicalCopy.__table__
    loc = m.DataLocation.__table__
    return (
        select(pc.c.id)
        .join(loc, loc.c.id == pc.c.data_location_id)
        .where(
            pc.c.raw_data_package_id == package_id_col,
            pc.c.type == "raw_data_package",
            pc.c.status == S.PRESENT,
            pc.c.lost_at.is_(None),
            loc.c.location_type == LT.LONG_TERM_ARCHIVE,
            loc.c.active.is_(True),
        )
        .exists()
    )


def _select_packages(
    session: Session,
    *,
    package_ids: Sequence[int] | None,
    executed_obs_unit: str | int | m.ExecutedObsUnit | None,
    instrument: str | int | None,
    start: datetime | None,
    end: datetime | None,
) -> tuple[list[m.RawDataPackage], str]:
    """The packages a request names, and a short description for the job's name."""
    RDP = m.RawDataPackage
    by_ids = package_ids is not None and len(package_ids) > 0
    by_range = start is not None or end is not None
    modes = sum([by_ids, executed_obs_unit is not None, by_range])
    if modes == 0 and instrument is None:
        raise ValidationError(
            "name the packages to stage: package IDs, an executed obs unit, or an "
            "instrument with a time range (start and end)"
        )
    if modes > 1 or (by_ids and instrument is not None):
        raise ValidationError(
            "choose one way to name packages: package IDs, an executed obs unit "
            "(optionally with an instrument), or an instrument with a time range"
        )
    if by_ids:
        wanted: list[int] = []
        for pid in package_ids or []:
            if not isinstance(pid, int) or isinstance(pid, bool):
                raise ValidationError(f"package ID {pid!r} is not an integer")
            if pid not in wanted:
                wanted.append(pid)
        rows = session.scalars(select(RDP).where(RDP.id.in_(wanted))).all()
        found = {p.id: p for p in rows}
        missing = [pid for pid in wanted if pid not in found]
        if missing:
            raise NotFoundError(f"unknown raw data package(s): {', '.join(map(str, missing))}")
        label = "packages " + ",".join(map(str, wanted[:10])) + ("..." if len(wanted) > 10 else "")
        return [found[pid] for pid in wanted], label

    stmt = select(RDP).join(m.InstrumentModule, m.InstrumentModule.id == RDP.instrument_module_id)
    inst = _resolve_instrument(session, instrument) if instrument is not None else None
    if inst is not None:
        stmt = stmt.where(m.InstrumentModule.instrument_id == inst.id)
    if executed_obs_unit is not None:
        eou = _resolve_obs_unit(session, executed_obs_unit)
        stmt = stmt.where(RDP.executed_obs_unit_id == eou.id)
        label = f"obs unit {eou.name}" + (f" ({inst.name})" if inst else "")
    else:
        if inst is None:
            raise ValidationError("a time range needs an instrument (--instrument)")
        if start is None or end is None:
            raise ValidationError("a time range needs both a start and an end")
        if start >= end:
            raise ValidationError(f"the time range is empty: start {start} is not before end {end}")
        E = m.ExecutedObsUnit
        obs_start = func.coalesce(E.start_time, E.created_at)
        obs_end = func.coalesce(E.end_time, E.start_time, E.created_at)
        stmt = stmt.join(E, E.id == RDP.executed_obs_unit_id).where(
            obs_start < end, obs_end >= start
        )
        label = f"{inst.name} {start.isoformat()}..{end.isoformat()}"
    rows = list(session.scalars(stmt.order_by(RDP.id)).unique().all())
    if not rows:
        raise NotFoundError(f"no raw data packages match {label}")
    return rows, label


def create_staging_job(
    session: Session,
    *,
    package_ids: Sequence[int] | None = None,
    executed_obs_unit: str | int | m.ExecutedObsUnit | None = None,
    instrument: str | int | None = None,
    start: datetime | str | None = None,
    end: datetime | str | None = None,
    destination: str | int | m.DataLocation = "processing_scratch",
    retention_minutes: int | None = None,
    name: str | None = None,
    user: str | int | m.User | None = None,
) -> m.StagingJob:
    """Record a staging request (PENDING, active) and return it (flushed, not committed).

    Raises :class:`~ccat_data_transfer.exceptions.NotFoundError` for an unknown location,
    user, obs unit, instrument or package, or when nothing matches;
    :class:`~ccat_data_transfer.exceptions.ValidationError` for a destination that is
    not an active PROCESSING location, a bad retention or time range, or packages that
    are not ARCHIVED with a usable LTA copy.  Nothing is written when it raises.
    """
    dest = _resolve_location(session, destination)
    owner = _resolve_user(session, user)
    start_dt = _naive_utc(start, "start")
    end_dt = _naive_utc(end, "end")
    packages, label = _select_packages(
        session,
        package_ids=package_ids,
        executed_obs_unit=executed_obs_unit,
        instrument=instrument,
        start=start_dt,
        end=end_dt,
    )
    if retention_minutes is None:
        retention_minutes = dest.retention_period_minutes or int(settings.RETENTION_PERIOD_MINUTES)
    if (
        isinstance(retention_minutes, bool)
        or not isinstance(retention_minutes, int)
        or retention_minutes <= 0
    ):
        raise ValidationError(
            f"retention must be a positive whole number of minutes, not {retention_minutes!r}"
        )

    ids = [p.id for p in packages]
    usable: set[int] = set()
    for i in range(0, len(ids), _IN_CHUNK):
        chunk = ids[i : i + _IN_CHUNK]
        usable.update(
            session.scalars(
                select(m.RawDataPackage.id).where(
                    m.RawDataPackage.id.in_(chunk),
                    m.RawDataPackage.state == m.PackageState.ARCHIVED,
                    _usable_lta_copy_exists(m.RawDataPackage.id),
                )
            ).all()
        )
    bad = [p for p in packages if p.id not in usable]
    if bad:
        shown = ", ".join(
            f"{p.id} ({p.state.name}"
            + (")" if p.state != m.PackageState.ARCHIVED else ", no usable LTA copy)")
            for p in bad[:20]
        )
        more = f" and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise ValidationError(
            f"cannot stage: package(s) not ARCHIVED with a PRESENT copy at an active "
            f"long-term archive: {shown}{more}"
        )

    now = m.utcnow()
    job = m.StagingJob(
        name=(name or f"stage {label}")[:256],
        user=owner,
        destination_location=dest,
        active=True,
        retention_period_minutes=retention_minutes,
        status=m.Status.PENDING,
        packages_total=len(packages),
        packages_done=0,
        retry_count=0,
        created_at=now,
        expires_at=now + timedelta(minutes=retention_minutes),
    )
    job.raw_data_packages = list(packages)
    session.add(job)
    session.flush()
    log.info(
        "staging_job_created",
        staging_job_id=job.id,
        location=dest.name,
        packages=len(packages),
        size_bytes=sum(p.size or 0 for p in packages),
        user=owner.username if owner else None,
        retention_minutes=retention_minutes,
    )
    return job


def get_staging_job(session: Session, job_id: int) -> m.StagingJob:
    job = session.get(m.StagingJob, job_id)
    if job is None:
        raise NotFoundError(f"no staging job {job_id}")
    return job


def list_staging_jobs(
    session: Session,
    *,
    active: bool | None = None,
    user: str | None = None,
    limit: int | None = None,
) -> list[m.StagingJob]:
    """Jobs, newest first; optionally only (in)active ones or one user's."""
    stmt = select(m.StagingJob).order_by(m.StagingJob.id.desc())
    if active is not None:
        stmt = stmt.where(m.StagingJob.active.is_(active))
    if user is not None:
        stmt = stmt.join(m.User, m.User.id == m.StagingJob.user_id).where(m.User.username == user)
    if limit:
        stmt = stmt.limit(limit)
    return list(session.scalars(stmt).all())


def deactivate_staging_job(session: Session, job_id: int) -> m.StagingJob:
    """Say "done" for a job: it goes inactive and its files may be cleaned up once no
    other active job at that location needs them.  Idempotent."""
    job = get_staging_job(session, job_id)
    if job.active:
        now = m.utcnow()
        session.execute(
            update(m.StagingJob)
            .where(m.StagingJob.id == job_id, m.StagingJob.active.is_(True))
            .values(active=False, deactivated_at=now)
            .execution_options(synchronize_session=False)
        )
        session.refresh(job)
        log.info("staging_job_deactivated", staging_job_id=job_id, reason="user_done")
    return job


def expire_staging_jobs(
    session: Session, now: datetime | None = None, location_ids: list[int] | None = None
) -> int:
    """Active jobs past ``expires_at`` become inactive (one bulk UPDATE); returns how many.
    With ``location_ids`` only jobs whose destination is one of them."""
    now = now or m.utcnow()
    SJ = m.StagingJob
    expired = session.scalars(
        scope.restrict(
            select(SJ.id).where(
                SJ.active.is_(True), SJ.expires_at.is_not(None), SJ.expires_at <= now
            ),
            SJ.destination_location_id,
            location_ids,
        )
    ).all()
    if not expired:
        return 0
    count = 0
    for i in range(0, len(expired), _IN_CHUNK):
        count += session.execute(
            update(SJ)
            .where(SJ.id.in_(expired[i : i + _IN_CHUNK]), SJ.active.is_(True))
            .values(active=False, deactivated_at=now)
            .execution_options(synchronize_session=False)
        ).rowcount
    log.info("staging_jobs_expired", count=count, staging_job_ids=list(expired[:50]))
    return count


def job_as_dict(job: m.StagingJob) -> dict[str, Any]:
    """A job as plain data (API responses, ``stage list --json``)."""

    def iso(v: datetime | None) -> str | None:
        return v.isoformat() if v else None

    return {
        "id": job.id,
        "name": job.name,
        "user": job.user.username if job.user else None,
        "destination": job.destination_location.name,
        "status": job.status.name,
        "active": job.active,
        "packages_total": job.packages_total,
        "packages_done": job.packages_done,
        "package_ids": sorted(p.id for p in job.raw_data_packages),
        "retention_period_minutes": job.retention_period_minutes,
        "retry_count": job.retry_count,
        "failure_reason": job.failure_reason,
        "created_at": iso(job.created_at),
        "start_time": iso(job.start_time),
        "completed_at": iso(job.completed_at),
        "expires_at": iso(job.expires_at),
        "deactivated_at": iso(job.deactivated_at),
        "next_attempt_at": iso(job.next_attempt_at),
    }


# ---------------------------------------------------------------------------------------
# Choosing the LTA copy
# ---------------------------------------------------------------------------------------


def _preferred_sites() -> list[str]:
    value = settings.get("STAGING_PREFERRED_SITES", []) or []
    if isinstance(value, str):
        value = [v for v in value.split(",")]
    return [str(v).strip().lower() for v in value if str(v).strip()]


def select_lta_copies(
    session: Session, package: m.RawDataPackage, destination: m.DataLocation | None = None
) -> list[m.RawDataPackagePhysicalCopy]:
    """The usable LTA copies of ``package``, best first (see the module's selection order)."""
    copies = session.scalars(
        select(m.RawDataPackagePhysicalCopy)
        .join(m.DataLocation, m.DataLocation.id == m.RawDataPackagePhysicalCopy.data_location_id)
        .where(
            m.RawDataPackagePhysicalCopy.raw_data_package_id == package.id,
            m.RawDataPackagePhysicalCopy.status == S.PRESENT,
            m.RawDataPackagePhysicalCopy.lost_at.is_(None),
            m.DataLocation.location_type == LT.LONG_TERM_ARCHIVE,
            m.DataLocation.active.is_(True),
        )
    ).all()
    preferred = _preferred_sites()

    def rank(copy: m.RawDataPackagePhysicalCopy) -> tuple[int, int, int, str, int]:
        loc = copy.data_location
        own = 0 if destination is not None and loc.site_id == destination.site_id else 1
        names = (loc.site.name.lower(), loc.site.short_name.lower())
        pref = next((i for i, s in enumerate(preferred) if s in names), len(preferred))
        return (own, pref, loc.priority or 0, loc.name, copy.id)

    return sorted(copies, key=rank)


# ---------------------------------------------------------------------------------------
# The manager
# ---------------------------------------------------------------------------------------


def sleep_time() -> float:
    return float(settings.get("STAGING_MANAGER_SLEEP_TIME", 5))


def run_once(session: Session, site: str | None = None) -> dict[str, Any]:
    """One cycle: expire jobs, claim due PENDING jobs, commit, submit their tasks.

    ``site`` scopes the cycle to jobs whose destination is at that site (default: the
    setting ``MANAGER_SITE``; see :mod:`ccat_data_transfer.scope`)."""
    ids = scope.location_ids(session, site)
    summary: dict[str, Any] = {"expired": expire_staging_jobs(session, location_ids=ids)}
    now = m.utcnow()
    SJ = m.StagingJob
    due = session.execute(
        scope.restrict(
            select(SJ.id, SJ.destination_location_id)
            .where(
                SJ.status == m.Status.PENDING,
                SJ.active.is_(True),
                or_(SJ.next_attempt_at.is_(None), SJ.next_attempt_at <= now),
            )
            .order_by(SJ.created_at, SJ.id),
            SJ.destination_location_id,
            ids,
        )
    ).all()
    claimed: list[tuple[int, str]] = []
    for job_id, dest_id in due:
        dest = session.get(m.DataLocation, dest_id)
        queue = route_task_by_location(OperationType.STAGING, dest)
        got = session.execute(
            update(SJ)
            .where(SJ.id == job_id, SJ.status == m.Status.PENDING, SJ.active.is_(True))
            .values(status=m.Status.IN_PROGRESS, start_time=now)
            .execution_options(synchronize_session=False)
        ).rowcount
        if got == 1:
            claimed.append((job_id, queue))
    # Commit before submitting: in embedded mode the task runs inline in its own session.
    session.commit()
    for job_id, queue in claimed:
        stage_staging_job.apply_async(args=[job_id], queue=queue)
    summary["claimed"] = len(claimed)
    summary["job_ids"] = [j for j, _ in claimed]
    if claimed:
        session.expire_all()
        states = session.execute(
            select(SJ.status, func.count())
            .where(SJ.id.in_([j for j, _ in claimed]))
            .group_by(SJ.status)
        ).all()
        summary["jobs_by_status"] = {s.name: n for s, n in states}
    if summary["expired"] or claimed:
        log.info("staging_manager_cycle", **summary)
    return summary


# ---------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------


@app.task(bind=True, acks_late=True, name="ccat_data_transfer.stage_staging_job")
def stage_staging_job(self: Any, job_id: int) -> dict[str, Any]:
    """Stage every package of one claimed (IN_PROGRESS) job; idempotent."""
    return _run_job(DatabaseConnection(), job_id)


def _job_state(db: DatabaseConnection, job_id: int) -> tuple[bool, bool]:
    with db.session_scope() as s:
        job = s.get(m.StagingJob, job_id)
        if job is None:
            return False, False
        return job.status == m.Status.IN_PROGRESS, job.active


def _set_job(db: DatabaseConnection, job_id: int, **values: Any) -> None:
    with db.session_scope() as s:
        s.execute(
            update(m.StagingJob)
            .where(m.StagingJob.id == job_id, m.StagingJob.status == m.Status.IN_PROGRESS)
            .values(**values)
            .execution_options(synchronize_session=False)
        )


def _run_job(db: DatabaseConnection, job_id: int) -> dict[str, Any]:
    with db.session_scope() as s:
        job = s.get(m.StagingJob, job_id)
        if job is None or job.status != m.Status.IN_PROGRESS:
            log.info("staging_job_skipped", staging_job_id=job_id, reason="not in progress")
            return {"status": "skipped", "staging_job_id": job_id}
        package_ids = sorted(p.id for p in job.raw_data_packages)
        dest_id = job.destination_location_id
        retention = job.retention_period_minutes or int(settings.RETENTION_PERIOD_MINUTES)
        retries = job.retry_count
    outcomes: dict[int, str] = {}
    try:
        for done, package_id in enumerate(package_ids):
            in_progress, active = _job_state(db, job_id)
            if not in_progress:
                return {"status": "skipped", "staging_job_id": job_id}
            if not active:
                _set_job(
                    db,
                    job_id,
                    status=m.Status.FAILED,
                    failure_reason="deactivated before staging completed",
                )
                log.info("staging_job_cancelled", staging_job_id=job_id, reason="deactivated")
                return {"status": "cancelled", "staging_job_id": job_id}
            outcomes[package_id] = stage_package(db, package_id, dest_id)
            _set_job(db, job_id, packages_done=done + 1)
    except StagingBusy as exc:
        # Not the job's fault: try again soon without counting a retry.
        _set_job(
            db,
            job_id,
            status=m.Status.PENDING,
            failure_reason=str(exc),
            next_attempt_at=m.utcnow() + timedelta(seconds=_backoff(0)),
        )
        log.info("staging_job_waiting", staging_job_id=job_id, reason=str(exc))
        return {"status": "waiting", "staging_job_id": job_id, "reason": str(exc)}
    except PermanentError as exc:
        _fail(db, job_id, str(exc))
        return {"status": "failed", "staging_job_id": job_id, "reason": str(exc)}
    except Exception as exc:  # retryable, or unexpected: retry up to the limit
        reason = str(exc) if isinstance(exc, RetryableError) else f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, RetryableError):
            log.exception("staging_job_error", staging_job_id=job_id, reason=reason)
        if retries + 1 >= int(settings.get("STAGING_MAX_RETRIES", 5)):
            _fail(db, job_id, f"gave up after {retries + 1} attempts: {reason}")
            return {"status": "failed", "staging_job_id": job_id, "reason": reason}
        _set_job(
            db,
            job_id,
            status=m.Status.PENDING,
            retry_count=retries + 1,
            failure_reason=reason,
            next_attempt_at=m.utcnow() + timedelta(seconds=_backoff(retries)),
        )
        log.warning("staging_job_retry", staging_job_id=job_id, reason=reason, attempt=retries + 1)
        return {"status": "retry", "staging_job_id": job_id, "reason": reason}
    now = m.utcnow()
    _set_job(
        db,
        job_id,
        status=m.Status.COMPLETED,
        completed_at=now,
        packages_done=len(package_ids),
        failure_reason=None,
        next_attempt_at=None,
        expires_at=now + timedelta(minutes=retention),
    )
    log.info(
        "staging_job_completed",
        staging_job_id=job_id,
        packages=len(package_ids),
        staged=sum(1 for o in outcomes.values() if o == "staged"),
        reused=sum(1 for o in outcomes.values() if o == "reused"),
    )
    return {"status": "completed", "staging_job_id": job_id, "packages": outcomes}


def _backoff(retries: int) -> float:
    base = float(settings.get("STAGING_RETRY_BASE_SECONDS", 60))
    return min(base * (2**retries), 86400.0)


def _fail(db: DatabaseConnection, job_id: int, reason: str) -> None:
    _set_job(db, job_id, status=m.Status.FAILED, failure_reason=reason, next_attempt_at=None)
    log.error("staging_job_failed", staging_job_id=job_id, reason=reason)


# ---------------------------------------------------------------------------------------
# Staging one package at one location
# ---------------------------------------------------------------------------------------


@contextmanager
def _package_lock(db: DatabaseConnection, package_id: int, location_id: int) -> Iterator[None]:
    """Exclusive right to stage one package into one location (a ``manager_state`` row).

    A lock older than ``STALLED_WORK_TIMEOUT_SECONDS`` (a killed worker) is taken over."""
    key = f"staging_lock:{package_id}:{location_id}"
    token = uuid.uuid4().hex
    now = m.utcnow()
    acquired = False
    try:
        with db.session_scope() as s:
            s.add(m.ManagerState(key=key, value=token, updated_at=now))
            s.flush()
        acquired = True
    except IntegrityError:
        stale = now - timedelta(seconds=float(settings.get("STALLED_WORK_TIMEOUT_SECONDS", 3600)))
        with db.session_scope() as s:
            acquired = (
                s.execute(
                    update(m.ManagerState)
                    .where(m.ManagerState.key == key, m.ManagerState.updated_at < stale)
                    .values(value=token, updated_at=now)
                    .execution_options(synchronize_session=False)
                ).rowcount
                == 1
            )
    if not acquired:
        raise StagingBusy(f"package {package_id} is being staged to this location by another job")
    try:
        yield
    finally:
        with db.session_scope() as s:
            s.execute(
                delete(m.ManagerState).where(
                    m.ManagerState.key == key, m.ManagerState.value == token
                )
            )


@dataclass(frozen=True)
class _FileRecord:
    id: uuid.UUID
    relative_path: str
    size: int
    checksum: str


@dataclass(frozen=True)
class _Source:
    copy_id: int
    location_id: int
    location_name: str
    relative_path: str


class _CorruptCopy(Exception):
    pass


def _package_files(session: Session, package_id: int) -> list[_FileRecord]:
    rows = session.execute(
        select(
            m.RawDataFile.id,
            m.RawDataFile.relative_path,
            m.RawDataFile.size,
            m.RawDataFile.checksum,
        ).where(m.RawDataFile.raw_data_package_id == package_id)
    ).all()
    return [_FileRecord(r[0], r[1], r[2], (r[3] or "").lower()) for r in rows]


def _file_copies_at(
    session: Session, file_ids: Sequence[uuid.UUID], location_id: int, statuses: Sequence[S]
) -> list[m.RawDataFilePhysicalCopy]:
    out: list[m.RawDataFilePhysicalCopy] = []
    ids = list(file_ids)
    for i in range(0, len(ids), _IN_CHUNK):
        out.extend(
            session.scalars(
                select(m.RawDataFilePhysicalCopy).where(
                    m.RawDataFilePhysicalCopy.raw_data_file_id.in_(ids[i : i + _IN_CHUNK]),
                    m.RawDataFilePhysicalCopy.data_location_id == location_id,
                    m.RawDataFilePhysicalCopy.status.in_(list(statuses)),
                )
            ).all()
        )
    return out


def _package_copies_at(
    session: Session, package_id: int, location_id: int, statuses: Sequence[S]
) -> list[m.RawDataPackagePhysicalCopy]:
    return list(
        session.scalars(
            select(m.RawDataPackagePhysicalCopy)
            .where(
                m.RawDataPackagePhysicalCopy.raw_data_package_id == package_id,
                m.RawDataPackagePhysicalCopy.data_location_id == location_id,
                m.RawDataPackagePhysicalCopy.status.in_(list(statuses)),
            )
            .order_by(m.RawDataPackagePhysicalCopy.id.desc())
        ).all()
    )


def _staged_copy_intact(
    session: Session, package_id: int, location_id: int, files: list[_FileRecord], storage: Storage
) -> bool:
    """A STAGED copy is recorded here and every file is on disk with its size."""
    if not _package_copies_at(session, package_id, location_id, [S.STAGED]):
        return False
    present = {
        c.raw_data_file_id: c
        for c in _file_copies_at(session, [f.id for f in files], location_id, [S.PRESENT])
    }
    for f in files:
        copy = present.get(f.id)
        if copy is None:
            return False
        info = storage.stat(copy.relative_path or f.relative_path)
        if info is None or info.size != f.size:
            return False
    return True


def _path_conflicts(session: Session, files: list[_FileRecord], location_id: int) -> list[str]:
    """Paths of our files already taken at the location by copies of *other* files."""
    pc = m.PhysicalCopy.__table__
    ours = {f.id for f in files}
    paths = [f.relative_path for f in files]
    taken: list[str] = []
    for i in range(0, len(paths), _IN_CHUNK):
        rows = session.execute(
            select(pc.c.relative_path, pc.c.raw_data_file_id).where(
                pc.c.type == "raw_data_file",
                pc.c.data_location_id == location_id,
                pc.c.relative_path.in_(paths[i : i + _IN_CHUNK]),
                pc.c.status.not_in([S.DELETED]),
            )
        ).all()
        taken.extend(p for p, fid in rows if fid not in ours)
    return sorted(set(taken))


def stage_package(db: DatabaseConnection, package_id: int, location_id: int) -> str:
    """Make one package available, unpacked, at one PROCESSING location.

    Returns ``"reused"`` (already STAGED there, files intact) or ``"staged"``.  Raises
    :class:`StagingBusy` (retry soon),
    :class:`~ccat_data_transfer.exceptions.RetryableError` (every LTA unreachable,
    destination full) or :class:`~ccat_data_transfer.exceptions.PermanentError` (no good
    copy, records inconsistent).
    """
    with _package_lock(db, package_id, location_id):
        with db.session_scope() as s:
            package = s.get(m.RawDataPackage, package_id)
            dest = s.get(m.DataLocation, location_id)
            if package is None or dest is None:
                raise PermanentError(f"package {package_id} or location {location_id} vanished")
            files = _package_files(s, package_id)
            dest_storage = storage_for_location(dest)
            deleting = _package_copies_at(s, package_id, location_id, _DELETING) or (
                _file_copies_at(s, [f.id for f in files], location_id, _DELETING)
            )
            if deleting:
                raise StagingBusy(
                    f"the deletion manager is removing package {package_id} from {dest.name}"
                )
            try:
                if _staged_copy_intact(s, package_id, location_id, files, dest_storage):
                    log.info(
                        "package_staging_reused",
                        raw_data_package_id=package_id,
                        location=dest.name,
                    )
                    return "reused"
            except StorageUnavailableError as exc:
                raise RetryableError(f"PROCESSING location {dest.name} unavailable: {exc}") from exc
            conflicts = _path_conflicts(s, files, location_id)
            if conflicts:
                raise PermanentError(
                    f"cannot stage package {package_id} to {dest.name}: path(s) already used "
                    f"there by other files: {', '.join(conflicts[:5])}"
                )
            sources = [
                _Source(
                    c.id,
                    c.data_location_id,
                    c.data_location.name,
                    c.relative_path or package.relative_path,
                )
                for c in select_lta_copies(s, package, dest)
            ]
            tar_path = package.relative_path
            checksum = (package.checksum or "").lower()
            size = package.size
            dest_name = dest.name
        if not isinstance(dest_storage, DiskStorage):
            raise PermanentError(
                f"PROCESSING location {dest_name} is not a disk location; staging unpacks files "
                "into a filesystem"
            )
        if not sources:
            raise PermanentError(f"package {package_id} has no usable long-term archive copy")
        if not checksum:
            raise PermanentError(f"package {package_id} has no recorded checksum to verify against")

        source = _copy_from_best_lta(
            db, package_id, sources, dest_storage, tar_path, checksum, size, dest_name
        )
        try:
            extracted = _extract_and_verify(dest_storage, tar_path, files, package_id)
        except BaseException:
            dest_storage.delete(tar_path)
            raise
        with db.session_scope() as s:
            _mark_package_as_staged_and_cleanup(
                s,
                package=s.get(m.RawDataPackage, package_id),
                location=s.get(m.DataLocation, location_id),
                storage=dest_storage,
                extracted=extracted,
            )
        log.info(
            "package_staged",
            raw_data_package_id=package_id,
            location=dest_name,
            source_location=source.location_name,
            size_bytes=size,
            files=len(extracted),
        )
        return "staged"


def _copy_from_best_lta(
    db: DatabaseConnection,
    package_id: int,
    sources: list[_Source],
    dest_storage: Storage,
    tar_path: str,
    checksum: str,
    size: int,
    dest_name: str,
) -> _Source:
    """Copy the tar from the first LTA copy that is reachable, present and correct."""
    unreachable: list[str] = []
    bad: list[str] = []
    for src in sources:
        try:
            with db.session_scope() as s:
                src_storage = storage_for_location(s.get(m.DataLocation, src.location_id))
            _copy_verified(src_storage, src.relative_path, dest_storage, tar_path, checksum, size)
            return src
        except StorageFullError as exc:
            raise RetryableError(f"PROCESSING location {dest_name} is full: {exc}") from exc
        except ObjectNotFound as exc:
            bad.append(f"{src.location_name}: missing")
            log.warning(
                "staging_source_missing",
                raw_data_package_id=package_id,
                physical_copy_id=src.copy_id,
                location=src.location_name,
                reason=str(exc),
            )
            _note_source_problem(db, src.copy_id, f"missing when staging: {exc}")
        except _CorruptCopy as exc:
            bad.append(f"{src.location_name}: {exc}")
            log.error(
                "staging_source_corrupt",
                raw_data_package_id=package_id,
                physical_copy_id=src.copy_id,
                location=src.location_name,
                reason=str(exc),
            )
            _note_source_problem(db, src.copy_id, f"corrupt when staging: {exc}")
        except (StorageUnavailableError, StorageError, OSError) as exc:
            unreachable.append(f"{src.location_name}: {exc}")
            log.warning(
                "staging_source_unavailable",
                raw_data_package_id=package_id,
                physical_copy_id=src.copy_id,
                location=src.location_name,
                reason=str(exc),
            )
    if unreachable:
        raise RetryableError(
            f"package {package_id}: no long-term archive copy could be read "
            f"({'; '.join(unreachable + bad)})"
        )
    raise PermanentError(
        f"package {package_id}: every long-term archive copy is missing or corrupt "
        f"({'; '.join(bad)})"
    )


def _note_source_problem(db: DatabaseConnection, copy_id: int, message: str) -> None:
    with db.session_scope() as s:
        s.execute(
            update(m.PhysicalCopy)
            .where(m.PhysicalCopy.id == copy_id)
            .values(last_error=f"{m.utcnow().isoformat()} {message}"[:2000])
            .execution_options(synchronize_session=False)
        )


def _copy_verified(
    src: Storage, src_path: str, dst: Storage, dst_path: str, checksum: str, size: int
) -> None:
    """Stream ``src_path`` to ``dst_path`` while hashing; a mismatch removes the copy."""
    h = hashlib.sha256()
    written = 0
    buf = bytearray(CHUNK_SIZE)
    mv = memoryview(buf)
    with src.open_read(src_path) as r, dst.open_write(dst_path) as w:
        readinto = getattr(r, "readinto", None)
        while True:
            if readinto is not None:
                n = readinto(mv)
                data: Any = mv[:n]
            else:
                data = r.read(CHUNK_SIZE)
                n = len(data)
            if not n:
                break
            h.update(data)
            w.write(data)
            written += n
    digest = h.hexdigest()
    if digest != checksum or (size and written != size):
        dst.delete(dst_path)
        raise _CorruptCopy(
            f"checksum mismatch after copying ({written} bytes, sha256 {digest[:16]}..., "
            f"expected {checksum[:16]}... / {size} bytes)"
        )


def _extract_and_verify(
    storage: DiskStorage, tar_path: str, files: list[_FileRecord], package_id: int
) -> list[tuple[_FileRecord, ExtractedMember]]:
    """Unpack the tar at the location root; every recorded file must come out intact."""
    local_tar = storage.local_path(tar_path)
    assert local_tar is not None
    try:
        members = safe_extract(local_tar, storage.root, overwrite=True)
    except TarUtilError as exc:
        raise PermanentError(f"package {package_id}: cannot unpack: {exc}") from exc
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise RetryableError(f"no space left unpacking package {package_id}: {exc}") from exc
        raise
    by_name = {mem.arcname: mem for mem in members}
    problems: list[str] = []
    pairs: list[tuple[_FileRecord, ExtractedMember]] = []
    for f in files:
        mem = by_name.pop(f.relative_path, None)
        if mem is None:
            problems.append(f"{f.relative_path}: not in the package")
        elif mem.sha256 != f.checksum or mem.size != f.size:
            problems.append(f"{f.relative_path}: sha256/size differ from the record")
        else:
            pairs.append((f, mem))
    extra = sorted(by_name)
    if extra:
        problems.append(f"unrecorded member(s) {', '.join(extra[:5])}")
    if problems:
        for mem in members:
            rel = Path(mem.path).relative_to(storage.root).as_posix()
            storage.delete(rel)
        log.error(
            "staging_files_mismatch",
            raw_data_package_id=package_id,
            reason="; ".join(problems[:10]),
        )
        raise PermanentError(
            f"package {package_id}: unpacked files do not match their records: "
            + "; ".join(problems[:5])
        )
    return pairs


def _mark_package_as_staged_and_cleanup(
    session: Session,
    package: m.RawDataPackage,
    location: m.DataLocation,
    storage: Storage,
    extracted: list[tuple[_FileRecord, ExtractedMember]],
) -> m.RawDataPackagePhysicalCopy:
    """Record the unpacked files, delete the tar, mark the package copy STAGED.

    STAGED means "unpacked and archive removed": every RawDataFile of the package has a
    PRESENT RawDataFilePhysicalCopy at ``location`` (one per file and location, shared by
    every job that uses it), and the tar that was copied in is gone.  Existing rows are
    refreshed, missing ones added; rows are never deleted.
    """
    now = m.utcnow()
    # The tar goes first: if the DB write then fails, a retry copies it again.
    storage.delete(package.relative_path)

    existing = {
        c.raw_data_file_id: c
        for c in _file_copies_at(session, [f.id for f, _ in extracted], location.id, [S.PRESENT])
    }
    new_rows = []
    for record, member in extracted:
        copy = existing.get(record.id)
        if copy is not None:
            copy.verified_at = now
            continue
        new_rows.append(
            m.RawDataFilePhysicalCopy(
                raw_data_file_id=record.id,
                data_location_id=location.id,
                status=S.PRESENT,
                relative_path=record.relative_path,
                size=member.size,
                checksum=member.sha256,
                created_at=now,
                verified_at=now,
            )
        )
    session.add_all(new_rows)

    staged = _package_copies_at(session, package.id, location.id, [S.STAGED, S.PRESENT])
    if staged:
        package_copy = staged[0]
        package_copy.status = S.STAGED
        package_copy.verified_at = now
    else:
        package_copy = m.RawDataPackagePhysicalCopy(
            raw_data_package_id=package.id,
            data_location_id=location.id,
            status=S.STAGED,
            relative_path=package.relative_path,
            size=package.size,
            checksum=package.checksum,
            created_at=now,
            verified_at=now,
        )
        session.add(package_copy)
    session.flush()
    log.info(
        "package_marked_staged",
        physical_copy_id=package_copy.id,
        copy_type="raw_data_package",
        raw_data_package_id=package.id,
        location=location.name,
        size_bytes=package.size,
        files_recorded=len(new_rows),
        files_reused=len(existing),
    )
    return package_copy


def active_jobs_using_package(session: Session, package_id: int, location_id: int) -> list[int]:
    """IDs of active staging jobs at ``location_id`` that include ``package_id``."""
    link = m.staging_job_raw_data_package
    return list(
        session.scalars(
            select(m.StagingJob.id)
            .join(link, link.c.staging_job_id == m.StagingJob.id)
            .where(
                and_(
                    link.c.raw_data_package_id == package_id,
                    m.StagingJob.destination_location_id == location_id,
                    m.StagingJob.active.is_(True),
                )
            )
        ).all()
    )
