"""Staging one package at one PROCESSING location: the body of the staging task.

Room in the house: :func:`stage_package` in three named phases - ``_plan_package``
(read the database: is the package already here, is it being deleted, where can it come
from), fetch and unpack (:mod:`~ccat_data_transfer.staging.sources`,
:mod:`~ccat_data_transfer.staging.unpack`), and record it as STAGED.  May import: the
staging finders, sources and unpack modules, storage, config, database, exceptions,
logging, ``ccat_ops_db``.

For one package at one location the task holds a small lock row (``manager_state`` key
``staging_lock:<package>:<location>``) so that two jobs never stage the same package into
the same place at once, and:

1. reuses a STAGED copy already at the location if every file is still on disk with its
   size (files shared by jobs at one location are one set of copies); a copy whose files
   vanished behind the database's back is staged again (recovery);
2. waits (:class:`StagingBusy`, retry later) while the deletion manager is deleting that
   package's files there;
3. otherwise picks the LTA copies in the order of
   :func:`~ccat_data_transfer.staging.sources.select_lta_copies` and copies the tar from
   the first that works, verifying its checksum;
4. unpacks and verifies every file, and records the package as STAGED.

A PROCESSING location must be a disk location (files are unpacked into a filesystem).
Two different files with the same relative path (from two SOURCE locations) cannot both
be staged to one location: the second is refused with a clear reason.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

from sqlalchemy import delete, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ccat_data_transfer.core.attempts import AttemptSuperseded
from ccat_data_transfer.core.database import DatabaseConnection
from ccat_data_transfer.core.errors import PermanentError, RetryableError
from ccat_data_transfer.core.liveness import beating, stall_window
from ccat_data_transfer.core.logs import get_logger
from ccat_data_transfer.core.storage import (
    DiskStorage,
    Storage,
    StorageUnavailableError,
    storage_for_location,
)
from ccat_data_transfer.staging.finders import (
    DELETING,
    FileRecord,
    file_copies_at,
    package_copies_at,
    package_files,
    path_conflicts,
)
from ccat_data_transfer.staging.sources import Source, copy_from_best_lta, select_lta_copies
from ccat_data_transfer.staging.unpack import (
    extract_and_verify,
    mark_package_as_staged_and_cleanup,
)
from ccat_ops_db import models as m

log = get_logger(__name__)

S = m.PhysicalCopyStatus

__all__ = ["StagingBusy", "stage_package"]


class StagingBusy(RetryableError):
    """Someone else is staging or deleting this package at this location: try later."""


@contextmanager
def _package_lock(db: DatabaseConnection, package_id: int, location_id: int) -> Iterator[str]:
    """Exclusive right to stage one package into one location (a ``manager_state`` row);
    yields the holder's token, the attempt that names its temporary files.

    The holder beats the lock's ``updated_at``; a lock whose beats stopped (a killed
    worker, :func:`ccat_data_transfer.core.liveness.stall_window`) is taken over."""
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
        stale = now - stall_window()
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
    MS = m.ManagerState
    try:
        with beating(MS, MS.key == key, MS.value == token, column="updated_at", label=key):
            yield token
    finally:
        with db.session_scope() as s:
            s.execute(
                delete(m.ManagerState).where(
                    m.ManagerState.key == key, m.ManagerState.value == token
                )
            )


def _lock_held(session: Session, package_id: int, location_id: int, token: str) -> bool:
    """Whether ``token`` still holds the package's staging lock (a conditional UPDATE
    that also beats it; the row stays locked until the caller's transaction ends): the
    check before an irreversible step of the holder's attempt.  Does not commit."""
    key = f"staging_lock:{package_id}:{location_id}"
    return (
        session.execute(
            update(m.ManagerState)
            .where(m.ManagerState.key == key, m.ManagerState.value == token)
            .values(updated_at=m.utcnow())
            .execution_options(synchronize_session=False)
        ).rowcount
        == 1
    )


@contextmanager
def _holding(
    db: DatabaseConnection, package_id: int, location_id: int, token: str
) -> Iterator[None]:
    """Run an irreversible step of the lock holder ``token`` while it still holds the
    package's staging lock (checked and held in one transaction); AttemptSuperseded if
    not (not a RetryableError: no other source is tried for it)."""
    with db.session_scope() as s:
        if not _lock_held(s, package_id, location_id, token):
            log.warning("attempt_superseded", work="staging", raw_data_package_id=package_id)
            raise AttemptSuperseded(f"package {package_id}: another stager took it over")
        yield


def _staged_copy_intact(
    session: Session, package_id: int, location_id: int, files: list[FileRecord], storage: Storage
) -> bool:
    """A STAGED copy is recorded here and every file is on disk with its size."""
    if not package_copies_at(session, package_id, location_id, [S.STAGED]):
        return False
    present = {
        c.raw_data_file_id: c
        for c in file_copies_at(session, [f.id for f in files], location_id, [S.PRESENT])
    }
    for f in files:
        copy = present.get(f.id)
        if copy is None:
            return False
        info = storage.stat(copy.relative_path or f.relative_path)
        if info is None or info.size != f.size:
            return False
    return True


class _PackagePlan(NamedTuple):
    """What staging one package needs, read from the database in one session."""

    files: list[FileRecord]
    dest_storage: DiskStorage
    dest_name: str
    sources: list[Source]
    tar_path: str
    checksum: str
    size: int


def _plan_package(db: DatabaseConnection, package_id: int, location_id: int) -> _PackagePlan | None:
    """The database phase: None when an intact STAGED copy is already there (reuse);
    raises :class:`StagingBusy` while the deletion manager removes the package there,
    PermanentError when it cannot be staged there at all."""
    with db.session_scope() as s:
        package = s.get(m.RawDataPackage, package_id)
        dest = s.get(m.DataLocation, location_id)
        if package is None or dest is None:
            raise PermanentError(f"package {package_id} or location {location_id} vanished")
        files = package_files(s, package_id)
        dest_storage = storage_for_location(dest)
        deleting = package_copies_at(s, package_id, location_id, DELETING) or (
            file_copies_at(s, [f.id for f in files], location_id, DELETING)
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
                return None
        except StorageUnavailableError as exc:
            raise RetryableError(f"PROCESSING location {dest.name} unavailable: {exc}") from exc
        conflicts = path_conflicts(s, files, location_id)
        if conflicts:
            raise PermanentError(
                f"cannot stage package {package_id} to {dest.name}: path(s) already used "
                f"there by other files: {', '.join(conflicts[:5])}"
            )
        sources = [
            Source(
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
    return _PackagePlan(files, dest_storage, dest_name, sources, tar_path, checksum, size)


def stage_package(db: DatabaseConnection, package_id: int, location_id: int) -> str:
    """Make one package available, unpacked, at one PROCESSING location.

    Returns ``"reused"`` (already STAGED there, files intact) or ``"staged"``.  Raises
    :class:`StagingBusy` (retry soon),
    :class:`~ccat_data_transfer.core.errors.RetryableError` (every LTA unreachable,
    destination full) or :class:`~ccat_data_transfer.core.errors.PermanentError` (no good
    copy, records inconsistent).
    """
    with _package_lock(db, package_id, location_id) as attempt:
        plan = _plan_package(db, package_id, location_id)
        if plan is None:
            return "reused"
        files, dest_storage, dest_name, sources, tar_path, checksum, size = plan
        try:
            source = copy_from_best_lta(
                db,
                package_id,
                sources,
                dest_storage,
                tar_path,
                checksum,
                size,
                dest_name,
                location_id,
                attempt=attempt,
                holding=lambda: _holding(db, package_id, location_id, attempt),
            )
        except AttemptSuperseded as exc:
            raise StagingBusy(str(exc)) from exc
        try:
            extracted = extract_and_verify(dest_storage, tar_path, files, package_id)
        except BaseException:
            with db.session_scope() as s:  # only the lock's holder removes the tar
                if _lock_held(s, package_id, location_id, attempt):
                    dest_storage.delete(tar_path)
            raise
        with db.session_scope() as s:
            if not _lock_held(s, package_id, location_id, attempt):
                log.warning(
                    "attempt_superseded",
                    work="staging",
                    raw_data_package_id=package_id,
                    reason="the package's staging lock was taken over; nothing recorded",
                )
                raise StagingBusy(f"package {package_id}: another stager took it over")
            mark_package_as_staged_and_cleanup(
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
