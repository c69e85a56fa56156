"""Staging's set-based finders and its one claim: the SQL of the staging stage.

Room in the house: the queries the staging manager, its task and its job functions ask
of the database; no storage, no Celery, no writes except :func:`claim_staging_job` (one
conditional ``UPDATE``).  May import: ``ccat_data_transfer.core.scope`` and ``ccat_ops_db``.

* :func:`usable_lta_copy` - the rule "a PRESENT, not lost copy at an active
  LONG_TERM_ARCHIVE location", stated once for the request check and the copy selection;
* :func:`due_staging_jobs` and :func:`claim_staging_job` - the cycle's work;
* :func:`package_files`, :func:`file_copies_at`, :func:`package_copies_at`,
  :func:`path_conflicts` - what one package has, and what lies at one location.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from ccat_data_transfer.core import scope
from ccat_ops_db import models as m

S = m.PhysicalCopyStatus
LT = m.LocationType

#: Copy statuses meaning "the deletion manager is removing it right now".
DELETING = (S.DELETION_SCHEDULED, S.DELETION_IN_PROGRESS)
# Chunk for IN (...) lists (SQLite's bound-parameter limit).
IN_CHUNK = 500

_T = TypeVar("_T")

__all__ = [
    "DELETING",
    "IN_CHUNK",
    "FileRecord",
    "claim_staging_job",
    "due_staging_jobs",
    "file_copies_at",
    "in_chunks",
    "package_copies_at",
    "package_files",
    "path_conflicts",
    "usable_lta_copy",
    "usable_lta_copy_exists",
]


def in_chunks(items: Sequence[_T]) -> Iterator[Sequence[_T]]:
    """``items`` in slices of ``IN_CHUNK`` (one ``IN (...)`` list each)."""
    for i in range(0, len(items), IN_CHUNK):
        yield items[i : i + IN_CHUNK]


def usable_lta_copy(copy: Any, location: Any) -> list[Any]:
    """SQL conditions: ``copy`` is PRESENT and not lost, at an active LONG_TERM_ARCHIVE
    ``location`` (``copy``/``location``: the physical-copy and location tables or
    entities, joined by the caller)."""
    return [
        copy.status == S.PRESENT,
        copy.lost_at.is_(None),
        location.location_type == LT.LONG_TERM_ARCHIVE,
        location.active.is_(True),
    ]


def usable_lta_copy_exists(package_id_col: Any) -> Any:
    """SQL: the package has a PRESENT, not lost copy at an active LTA location."""
    pc = m.PhysicalCopy.__table__
    loc = m.DataLocation.__table__
    return (
        select(pc.c.id)
        .join(loc, loc.c.id == pc.c.data_location_id)
        .where(
            pc.c.raw_data_package_id == package_id_col,
            pc.c.type == "raw_data_package",
            *usable_lta_copy(pc.c, loc.c),
        )
        .exists()
    )


# ---------------------------------------------------------------------------------------
# The cycle's work
# ---------------------------------------------------------------------------------------


def due_staging_jobs(
    session: Session, now: datetime, location_ids: list[int] | None
) -> list[tuple[int, int]]:
    """(job id, destination location id) of the PENDING active jobs whose next attempt is
    due, oldest first; with ``location_ids`` only jobs whose destination is one of them."""
    SJ = m.StagingJob
    rows = session.execute(
        scope.restrict(
            select(SJ.id, SJ.destination_location_id)
            .where(
                SJ.status == m.Status.PENDING,
                SJ.active.is_(True),
                or_(SJ.next_attempt_at.is_(None), SJ.next_attempt_at <= now),
            )
            .order_by(SJ.created_at, SJ.id),
            SJ.destination_location_id,
            location_ids,
        )
    ).all()
    return [(job_id, dest_id) for job_id, dest_id in rows]


def claim_staging_job(session: Session, job_id: int, now: datetime) -> bool:
    """``UPDATE staging_job SET status='IN_PROGRESS' WHERE id=:id AND status='PENDING'``
    (and still active): True when this call took the job, False when someone else has it.
    Does not commit."""
    SJ = m.StagingJob
    got = session.execute(
        update(SJ)
        .where(SJ.id == job_id, SJ.status == m.Status.PENDING, SJ.active.is_(True))
        # Queued: no heartbeat until the task takes the job (start_time: when it was sent).
        .values(status=m.Status.IN_PROGRESS, start_time=now, heartbeat_at=None)
        .execution_options(synchronize_session=False)
    ).rowcount
    return got == 1


# ---------------------------------------------------------------------------------------
# One package, one location
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileRecord:
    """What the database says one RawDataFile of a package is."""

    id: uuid.UUID
    relative_path: str
    size: int
    checksum: str


def package_files(session: Session, package_id: int) -> list[FileRecord]:
    rows = session.execute(
        select(
            m.RawDataFile.id,
            m.RawDataFile.relative_path,
            m.RawDataFile.size,
            m.RawDataFile.checksum,
        ).where(m.RawDataFile.raw_data_package_id == package_id)
    ).all()
    return [FileRecord(r[0], r[1], r[2], (r[3] or "").lower()) for r in rows]


def file_copies_at(
    session: Session, file_ids: Sequence[uuid.UUID], location_id: int, statuses: Sequence[S]
) -> list[m.RawDataFilePhysicalCopy]:
    FC = m.RawDataFilePhysicalCopy
    out: list[m.RawDataFilePhysicalCopy] = []
    for chunk in in_chunks(list(file_ids)):
        out.extend(
            session.scalars(
                select(FC).where(
                    FC.raw_data_file_id.in_(chunk),
                    FC.data_location_id == location_id,
                    FC.status.in_(list(statuses)),
                )
            ).all()
        )
    return out


def package_copies_at(
    session: Session, package_id: int, location_id: int, statuses: Sequence[S]
) -> list[m.RawDataPackagePhysicalCopy]:
    PC = m.RawDataPackagePhysicalCopy
    return list(
        session.scalars(
            select(PC)
            .where(
                PC.raw_data_package_id == package_id,
                PC.data_location_id == location_id,
                PC.status.in_(list(statuses)),
            )
            .order_by(PC.id.desc())
        ).all()
    )


def path_conflicts(session: Session, files: list[FileRecord], location_id: int) -> list[str]:
    """Paths of our files already taken at the location by copies of *other* files."""
    pc = m.PhysicalCopy.__table__
    ours = {f.id for f in files}
    taken: list[str] = []
    for chunk in in_chunks([f.relative_path for f in files]):
        rows = session.execute(
            select(pc.c.relative_path, pc.c.raw_data_file_id).where(
                pc.c.type == "raw_data_file",
                pc.c.data_location_id == location_id,
                pc.c.relative_path.in_(chunk),
                pc.c.status.not_in([S.DELETED]),
            )
        ).all()
        taken.extend(p for p, fid in rows if fid not in ours)
    return sorted(set(taken))
