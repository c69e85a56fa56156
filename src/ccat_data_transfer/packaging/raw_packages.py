"""Stage 1, raw data packages: tar the filed files of one ExecutedObsUnit x InstrumentModule
at SOURCE and move the tar to the site's BUFFER.

The grouping rule (when a group of filed files is complete, how it is split into
packages, when it is blocked) and the planning query live in
:mod:`ccat_data_transfer.packaging.raw_groups`; the claim / build / release steps this
stage shares with stage 2 in :mod:`ccat_data_transfer.packaging.skeleton`.  This module
holds the stage's claims and its task body (what is its own in them); the cycle is
:mod:`ccat_data_transfer.packaging.raw_cycle`, the Celery task
:mod:`ccat_data_transfer.packaging.tasks`.

What a cycle does
-----------------
``run_once(session)`` finds complete groups with one set-based query, skips sites whose
buffers are all in EMERGENCY state (package creation paused there; logged), and claims
each part atomically: it inserts a RawDataPackage (status SCHEDULED) and runs
``UPDATE raw_data_file SET raw_data_package_id = :p WHERE id IN (...) AND
raw_data_package_id IS NULL``; if the row count is short (another manager got there
first) the claim is rolled back.  Each claim is committed, then
``create_raw_data_package`` is submitted on the ``{site}_{source}_raw_data_package_creation``
queue (in-process in embedded mode).

The task moves the package SCHEDULED -> IN_PROGRESS (so two deliveries never both work)
and writes the tar once, in one streaming pass with ``write_tar_with_checksums`` (every
file verified against its filed checksum while the package checksum is computed),
straight into the best usable BUFFER of the site (lowest priority number, active, not in
EMERGENCY; on a storage error the next one) through the atomic ``Storage.open_write``
(temporary name, fsync, rename).  A buffer this worker cannot reach as a filesystem (S3)
gets a copy of a tar written at SOURCE the same way, and that SOURCE tar is removed.  The
task then records the package (COMPLETED, state WAITING) and its
RawDataPackagePhysicalCopy PRESENT at the buffer.  On a checksum
mismatch nothing is written: the bad file gets ``checksum_error`` (and blocks its group),
the claim is released.  On any other failure the claim is released and the package row
removed, so nothing half-done is recorded; the next cycle tries again.  Claims whose build
started and whose heartbeat stopped (a killed worker, :mod:`ccat_data_transfer.core.liveness`)
are released by the manager.

Room in the house: stage packaging (claims and the body of ``create_raw_data_package``).
Imports the packaging modules, core and :mod:`ccat_ops_db`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import exists, func, select
from sqlalchemy.orm import Session

from ccat_data_transfer.core.attempts import owned_step
from ccat_data_transfer.core.database import DatabaseConnection
from ccat_data_transfer.core.errors import CcatError
from ccat_data_transfer.core.logs import get_logger
from ccat_data_transfer.core.operation_types import OperationType
from ccat_data_transfer.core.storage import StorageError, storage_for_location
from ccat_data_transfer.core.tarutil import TarResult, TarSourceChangedError
from ccat_data_transfer.packaging import skeleton
from ccat_data_transfer.packaging.raw_groups import (
    GroupPlan,
    group_is_complete,
    package_file_name,
    package_relative_path,
    plan_packages,
    split_by_size,
    usable_buffers,
)
from ccat_data_transfer.packaging.raw_report import describe_raw_data_package
from ccat_ops_db import models as m

log = get_logger(__name__)

__all__ = [
    "GroupPlan",
    "claim_package",
    "build_raw_data_package",
    "describe_raw_data_package",
    "group_is_complete",
    "package_file_name",
    "plan_packages",
    "release_stalled_claims",
    "split_by_size",
    "usable_buffers",
]

# Built once (every cycle of this manager and of recovery runs it).
_STALLED_PACKAGES = select(m.RawDataPackage.id).where(
    m.RawDataPackage.status.in_([m.Status.SCHEDULED, m.Status.IN_PROGRESS]),
    # A package with a copy was built: never un-claim it.
    ~exists().where(m.PhysicalCopy.raw_data_package_id == m.RawDataPackage.id),
)

RAW_DATA_PACKAGE = skeleton.PackageKind(
    package_model=m.RawDataPackage,
    member_model=m.RawDataFile,
    member_fk="raw_data_package_id",
    member_order=(m.RawDataFile.relative_path,),
    copy_model=m.RawDataPackagePhysicalCopy,
    copy_fk="raw_data_package_id",
    location_attr="source_location",
    label="raw data package",
    members_word="files",
    id_key="package_id",
    event="raw_data_package",
    log=log,
    task="ccat_data_transfer.create_raw_data_package",
    operation=OperationType.RAW_DATA_PACKAGE_CREATION,
    stalled=_STALLED_PACKAGES,
    stalled_scope=m.RawDataPackage.source_location_id,
    not_local=(
        "SOURCE location {location} is not a local filesystem; packages are built where "
        "the files lie"
    ),
    missing="file missing at SOURCE",
    wrong_size="size at SOURCE is {actual} bytes, filed as {recorded}",
    bad_checksum="sha256 at SOURCE is {actual}, filed as {expected}",
    source_changed="a file changed while being packaged: {exc}",
    log_skips=True,
)


# ---------------------------------------------------------------------------------------
# Claims
# ---------------------------------------------------------------------------------------


def claim_package(session: Session, plan: GroupPlan, file_ids: Sequence[uuid.UUID]) -> int | None:
    """Claim ``file_ids`` for a new RawDataPackage and COMMIT; None if another manager
    claimed any of them first (then nothing is changed)."""
    eou = session.get(m.ExecutedObsUnit, plan.executed_obs_unit_id)
    module = session.get(m.InstrumentModule, plan.instrument_module_id)
    assert eou is not None and module is not None
    instrument = module.instrument.name
    part = (
        session.scalar(
            select(func.max(m.RawDataPackage.part_number)).where(
                m.RawDataPackage.executed_obs_unit_id == eou.id,
                m.RawDataPackage.instrument_module_id == module.id,
            )
        )
        or 0
    ) + 1
    file_name = package_file_name(eou.name, instrument, module.name, part)
    pkg = m.RawDataPackage(
        file_name=file_name,
        relative_path=package_relative_path(instrument, module.name, file_name),
        size=0,
        state=m.PackageState.WAITING,
        status=m.Status.SCHEDULED,
        executed_obs_unit_id=eou.id,
        instrument_module_id=module.id,
        part_number=part,
        source_location_id=plan.source_location_id,
    )
    claimed = skeleton.claim_members(session, RAW_DATA_PACKAGE, pkg, file_ids)
    if isinstance(claimed, skeleton.ClaimLost):
        reason = (
            "files claimed by another manager"
            if claimed is skeleton.ClaimLost.MEMBERS_TAKEN
            else "package name taken by another manager"
        )
        log.info("raw_data_package_claim_lost", reason=reason)
        return None
    return claimed


def release_stalled_claims(session: Session, location_ids: list[int] | None = None) -> int:
    """Release claims of packages whose build started and whose heartbeat stopped (a
    worker died): their files become packageable again; queued ones are sent again.
    With ``location_ids`` only packages built at those SOURCE locations.  Commits."""
    return skeleton.release_stalled_claims(session, RAW_DATA_PACKAGE, location_ids)


# ---------------------------------------------------------------------------------------
# The task body (the Celery task is packaging.tasks.create_raw_data_package)
# ---------------------------------------------------------------------------------------


def build_raw_data_package(package_id: int) -> dict[str, Any]:
    """Build, place and record one claimed RawDataPackage (idempotent): the body of the
    Celery task :func:`ccat_data_transfer.packaging.tasks.create_raw_data_package`."""
    return skeleton.run_task(RAW_DATA_PACKAGE, package_id, _build_package, _flag_mismatch)


def _build_package(db: DatabaseConnection, package_id: int, attempt: str) -> dict[str, Any]:
    """Tar into the best buffer that takes it and record; the buffer copy is removed if
    recording fails, and no tar is left at SOURCE whatever happens -- every rename,
    record and removal only while ``attempt`` owns the package row: once its claim was
    released, the package's path may be another build's recorded copy."""
    work = skeleton.load_work(
        db,
        RAW_DATA_PACKAGE,
        package_id,
        lambda s, source: usable_buffers(s, source.site_id),
        attempt=attempt,
    )
    if not work.extra:
        raise StorageError(f"no usable buffer at the site of {work.location.name}")
    src_storage = storage_for_location(work.location)
    placed: m.DataLocation | None = None
    model = m.RawDataPackage
    try:
        placed, result = _build_into_buffer(src_storage, work, package_id)
        with owned_step(model, package_id, attempt, "record", db=db) as session:
            skeleton.record_built(
                session,
                RAW_DATA_PACKAGE,
                package_id,
                placed.id,
                work.relative_path,
                result,
                status=m.Status.COMPLETED,
                state=m.PackageState.WAITING,
            )
    except BaseException:
        try:
            with owned_step(model, package_id, attempt, "clean up", db=db):
                if placed is not None:
                    _remove_quietly(storage_for_location(placed), work.relative_path, placed.name)
                _remove_quietly(src_storage, work.relative_path, work.location.name)
        except Exception as exc:  # superseded or DB gone: leave dark data, never a loss
            log.warning("package_cleanup_skipped", package_id=package_id, reason=str(exc))
        raise
    # Recorded by this attempt: a tar written at SOURCE for a buffer out of reach goes.
    _remove_quietly(src_storage, work.relative_path, work.location.name)
    return skeleton.report_built(RAW_DATA_PACKAGE, package_id, work, placed.name, result)


def _remove_quietly(storage: Any, path: str, where: str) -> None:
    try:  # leave dark data rather than hide the first error
        storage.delete(path)
    except Exception as exc:
        log.warning("package_tar_cleanup_failed", location=where, reason=str(exc))


def _build_into_buffer(
    src_storage: Any, work: skeleton.Work, package_id: int
) -> tuple[m.DataLocation, TarResult]:
    """Put the tar into the first of the site's usable buffers (best first) that takes it
    whole; returns that buffer and the tar's checksums.  StorageError if none does.

    A buffer on a filesystem this worker reaches gets the tar written once, straight
    into it (``open_write``: temporary name, fsync, rename; a killed write leaves only a
    temporary name the janitor removes).  A buffer out of reach (S3) gets a copy of a
    tar written at SOURCE, written once whatever the number of such buffers tried."""
    at_source: TarResult | None = None
    for buf in work.extra:
        buf_storage = storage_for_location(buf)
        try:
            direct = buf_storage.local_path(work.relative_path) is not None
            if direct:
                result = _write_tar(buf_storage, work)
            else:
                if at_source is None:
                    at_source = _write_tar(src_storage, work)
                result = at_source
                with owned_step(m.RawDataPackage, package_id, work.attempt, "copy tar into place"):
                    buf_storage.copy_in(
                        src_storage.local_path(work.relative_path), work.relative_path
                    )
            info = buf_storage.stat(work.relative_path)
            if info is None or info.size != result.size:
                raise StorageError(f"copy at {buf.name} has the wrong size")
            return buf, result
        except _SourceError as exc:
            raise exc.error from exc.error.__cause__
        except (StorageError, OSError) as exc:
            log.warning(
                "buffer_failover",
                location=buf.name,
                package_id=package_id,
                reason=f"{type(exc).__name__}: {exc}",
            )
    raise StorageError("no buffer of the site accepted the package")


class _SourceError(CcatError):
    """A packaging failure that is the source's, not the target's: no failover."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _write_tar(storage: Any, work: skeleton.Work) -> TarResult:
    """:func:`skeleton.write_tar`, with a file changing at SOURCE set apart from the
    target's errors (those move on to the next buffer; this fails the package)."""
    try:
        return skeleton.write_tar(RAW_DATA_PACKAGE, storage, work)
    except StorageError as exc:
        if isinstance(exc.__cause__, TarSourceChangedError):
            raise _SourceError(exc) from exc
        raise
    except OSError as exc:  # a member that cannot be read
        if exc.filename is not None and any(
            os.fspath(exc.filename) == os.fspath(mem.source_path) for mem in work.members
        ):
            raise _SourceError(exc) from exc
        raise


def _flag_mismatch(
    session: Session, package_id: int, pkg: m.RawDataPackage | None, path: str, reason: str
) -> dict[str, Any] | None:
    """Mark the filed file at ``path`` with ``checksum_error`` (it blocks its group)."""
    source_id = pkg.source_location_id if pkg is not None else None
    f = session.scalars(
        select(m.RawDataFile).where(
            m.RawDataFile.source_location_id == source_id,
            m.RawDataFile.relative_path == path,
        )
    ).one_or_none()
    if f is None:
        return None
    f.checksum_error = f"{reason} (found {m.utcnow():%Y-%m-%dT%H:%M:%SZ})"
    log.error(
        "raw_data_file_checksum_mismatch",
        file_id=str(f.id),
        relative_path=path,
        package_id=package_id,
        reason=reason,
    )
    return {"file_id": str(f.id), "relative_path": path, "reason": reason}
