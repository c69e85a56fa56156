"""Stage 2, data transfer packages: bundle RawDataPackages waiting at a source-site BUFFER
into DataTransferPackages, the units the transfer manager sends over the network.

Aggregation rule
----------------
At each BUFFER of a source site (a site that has a SOURCE location), the RawDataPackages
that are COMPLETED, in state WAITING, PRESENT at that buffer and not yet in a
DataTransferPackage are taken oldest first and added to a bundle until it reaches
``DATA_TRANSFER_PACKAGE_TARGET_SIZE_BYTES`` (the bundle may overshoot by at most one
raw package).  Every bundle that reached the target is packaged; the last, smaller
bundle is packaged only once its oldest member has waited
``DATA_TRANSFER_PACKAGE_MAX_WAIT_SECONDS``, so a small package is never held forever.

Creation is not paused by buffer pressure: bundling is what lets the transfer manager
empty the buffer.

The cycle claims each bundle atomically (insert a DataTransferPackage SCHEDULED, then
``UPDATE raw_data_package SET data_transfer_package_id = :d WHERE id IN (...) AND
data_transfer_package_id IS NULL``, checking the row count), commits, and submits
``create_data_transfer_package`` on the ``{site}_{buffer}_data_transfer_package_creation``
queue.  The task builds the tar at the buffer in one read pass (members named by each
RawDataPackage's ``relative_path``; every member's checksum verified while reading),
writes it atomically, and records the package PENDING (ready for the transfer manager)
with a DataTransferPackagePhysicalCopy PRESENT at the buffer; the members go to
TRANSFERRING.  A member whose bytes no longer match its checksum is marked FAILED (with
the reason; its files are still at SOURCE) and the others return to the pool.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, delete, exists, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ccat_data_transfer import scope
from ccat_data_transfer.celery_app import app
from ccat_data_transfer.config.config import settings
from ccat_data_transfer.database import DatabaseConnection
from ccat_data_transfer.exceptions import NotFoundError
from ccat_data_transfer.logging_utils import get_logger
from ccat_data_transfer.operation_types import OperationType
from ccat_data_transfer.queue_discovery import route_task_by_location
from ccat_data_transfer.stage_tasks import merge_inline_package_result, start_scheduled
from ccat_data_transfer.storage import StorageError, storage_for_location
from ccat_data_transfer.tarutil import TarMember, write_tar_with_checksums
from ccat_ops_db import models as m

log = get_logger(__name__)

__all__ = [
    "Bundle",
    "bundle_packages",
    "claim_bundle",
    "create_data_transfer_package",
    "find_waiting_packages",
    "release_stalled_claims",
    "run_once",
]


@dataclass
class Bundle:
    buffer_id: int
    package_ids: list[int]
    size: int


def bundle_packages(
    packages: Sequence[tuple[int, int, datetime]],
    target: int,
    max_wait_seconds: float,
    now: datetime,
) -> list[list[int]]:
    """The aggregation rule on ``(id, size, created_at)`` tuples sorted oldest first."""
    bundles: list[list[int]] = []
    current: list[int] = []
    size = 0
    oldest: datetime | None = None
    for pkg_id, pkg_size, created in packages:
        current.append(pkg_id)
        size += pkg_size
        oldest = created if oldest is None else min(oldest, created)
        if size >= target:
            bundles.append(current)
            current, size, oldest = [], 0, None
    if current and oldest is not None and (now - oldest).total_seconds() >= max_wait_seconds:
        bundles.append(current)
    return bundles


# The per-cycle queries, built once (``buffer_id`` and ``limit`` bound at execution).
_SOURCE_SITE_BUFFERS = (
    select(m.DataLocation)
    .where(
        m.DataLocation.location_type == m.LocationType.BUFFER,
        m.DataLocation.site_id.in_(
            select(m.DataLocation.site_id).where(
                m.DataLocation.location_type == m.LocationType.SOURCE
            )
        ),
    )
    .order_by(m.DataLocation.priority, m.DataLocation.id)
)
_WAITING_PACKAGES = (
    select(m.RawDataPackage.id, m.RawDataPackage.size, m.RawDataPackage.created_at)
    .where(
        m.RawDataPackage.state == m.PackageState.WAITING,
        m.RawDataPackage.status == m.Status.COMPLETED,
        m.RawDataPackage.data_transfer_package_id.is_(None),
        exists()
        .where(
            m.RawDataPackagePhysicalCopy.raw_data_package_id == m.RawDataPackage.id,
            m.RawDataPackagePhysicalCopy.data_location_id == bindparam("buffer_id"),
            m.RawDataPackagePhysicalCopy.status == m.PhysicalCopyStatus.PRESENT,
        )
        .correlate(m.RawDataPackage),
    )
    .order_by(m.RawDataPackage.created_at, m.RawDataPackage.id)
)
_STALLED_BUNDLES = select(m.DataTransferPackage.id).where(
    m.DataTransferPackage.status.in_([m.Status.SCHEDULED, m.Status.IN_PROGRESS]),
    m.DataTransferPackage.created_at < bindparam("limit"),
    ~exists().where(m.PhysicalCopy.data_transfer_package_id == m.DataTransferPackage.id),
    ~exists().where(m.DataTransfer.data_transfer_package_id == m.DataTransferPackage.id),
)


def _source_site_buffers(
    session: Session, location_ids: list[int] | None = None
) -> list[m.DataLocation]:
    return list(
        session.scalars(scope.restrict(_SOURCE_SITE_BUFFERS, m.DataLocation.id, location_ids))
    )


def find_waiting_packages(
    session: Session, buffer: m.DataLocation
) -> list[tuple[int, int, datetime]]:
    """(id, size, created_at) of packages ready to bundle at ``buffer``, oldest first."""
    rows = session.execute(_WAITING_PACKAGES, {"buffer_id": buffer.id}).all()
    return [(r[0], int(r[1]), r[2]) for r in rows]


def claim_bundle(
    session: Session, buffer: m.DataLocation, package_ids: Sequence[int]
) -> int | None:
    """Create a DataTransferPackage (SCHEDULED) owning ``package_ids`` and COMMIT; None if
    another manager claimed any of them first."""
    stamp = m.utcnow().strftime("%Y%m%dT%H%M%S")
    file_name = f"{buffer.site.short_name}_{stamp}_{uuid.uuid4().hex[:12]}.tar"
    try:
        dtp = m.DataTransferPackage(
            file_name=file_name,
            relative_path=f"data_transfer_packages/{file_name}",
            size=0,
            status=m.Status.SCHEDULED,
            origin_location_id=buffer.id,
        )
        session.add(dtp)
        session.flush()
        claimed = session.execute(
            update(m.RawDataPackage)
            .where(
                m.RawDataPackage.id.in_(list(package_ids)),
                m.RawDataPackage.data_transfer_package_id.is_(None),
                m.RawDataPackage.state == m.PackageState.WAITING,
            )
            .values(data_transfer_package_id=dtp.id)
            .execution_options(synchronize_session=False)
        ).rowcount
        if claimed != len(package_ids):
            session.rollback()
            log.info("data_transfer_package_claim_lost", location=buffer.name)
            return None
        session.commit()
    except IntegrityError:
        session.rollback()
        return None
    return dtp.id


def release_stalled_claims(session: Session, location_ids: list[int] | None = None) -> int:
    """Release bundles stuck SCHEDULED/IN_PROGRESS past STALLED_WORK_TIMEOUT_SECONDS (a
    worker died); their raw data packages can be bundled again.  With ``location_ids``
    only bundles whose origin buffer is one of them.  Commits."""
    limit = m.utcnow() - timedelta(seconds=int(settings.STALLED_WORK_TIMEOUT_SECONDS))
    # Only bundles that never got built: no copy and no transfer (_STALLED_BUNDLES).  A
    # built package is IN_PROGRESS again while it is being transferred: not stalled.
    ids = session.scalars(
        scope.restrict(_STALLED_BUNDLES, m.DataTransferPackage.origin_location_id, location_ids),
        {"limit": limit},
    ).all()
    released = 0
    for dtp_id in ids:
        if _release(session, dtp_id, expected=(m.Status.SCHEDULED, m.Status.IN_PROGRESS)):
            released += 1
            log.warning("data_transfer_package_claim_released", dtp_id=dtp_id, reason="stalled")
    session.commit()
    return released


def run_once(session: Session, site: str | None = None) -> dict[str, Any]:
    """One cycle: bundle waiting packages at every source-site buffer and submit tasks.

    ``site`` scopes the cycle to the source-site buffers of that site (default: the
    setting ``MANAGER_SITE``; see :mod:`ccat_data_transfer.scope`)."""
    location_ids = scope.location_ids(session, site)
    target = int(settings.DATA_TRANSFER_PACKAGE_TARGET_SIZE_BYTES)
    max_wait = float(settings.DATA_TRANSFER_PACKAGE_MAX_WAIT_SECONDS)
    summary: dict[str, Any] = {
        "packages_submitted": 0,
        "packages_created": 0,
        "packages_failed": 0,
        "raw_data_packages_bundled": 0,
        "bytes_bundled": 0,
        "claims_lost": 0,
        "waiting_raw_data_packages": 0,
        "checksum_errors": [],
        "released_stalled": release_stalled_claims(session, location_ids),
    }
    now = m.utcnow()
    for buffer in _source_site_buffers(session, location_ids):
        waiting = find_waiting_packages(session, buffer)
        bundles = bundle_packages(waiting, target, max_wait, now)
        summary["waiting_raw_data_packages"] += len(waiting) - sum(len(b) for b in bundles)
        session.commit()
        for ids in bundles:
            dtp_id = claim_bundle(session, buffer, ids)
            if dtp_id is None:
                summary["claims_lost"] += 1
                continue
            queue = route_task_by_location(OperationType.DATA_TRANSFER_PACKAGE_CREATION, buffer)
            outcome = create_data_transfer_package.apply_async(args=[dtp_id], queue=queue)
            summary["packages_submitted"] += 1
            _merge_eager(summary, outcome)
    return summary


def _merge_eager(summary: dict[str, Any], outcome: Any) -> None:
    merge_inline_package_result(
        summary, outcome, {"raw_data_packages_bundled": "members", "bytes_bundled": "size_bytes"}
    )


# ---------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------


class _MemberMismatch(Exception):
    def __init__(self, bad: list[tuple[str, str]]) -> None:
        super().__init__(f"{len(bad)} raw data packages do not match their checksum")
        self.bad = bad


@app.task(bind=True, acks_late=True, name="ccat_data_transfer.create_data_transfer_package")
def create_data_transfer_package(self: Any, dtp_id: int) -> dict[str, Any]:
    """Build and record one claimed DataTransferPackage at its buffer (idempotent)."""
    db = DatabaseConnection()
    with db.session_scope() as session:
        started = start_scheduled(session, m.DataTransferPackage, dtp_id)
    if not started:
        return {"status": "skipped", "dtp_id": dtp_id}
    try:
        return _build(db, dtp_id)
    except _MemberMismatch as exc:
        errors = _fail_members(db, dtp_id, exc.bad)
        return {"status": "failed", "dtp_id": dtp_id, "checksum_errors": errors}
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        log.error("data_transfer_package_failed", dtp_id=dtp_id, reason=reason)
        with db.session_scope() as session:
            _release(session, dtp_id)
        return {"status": "failed", "dtp_id": dtp_id, "reason": reason}


def _build(db: DatabaseConnection, dtp_id: int) -> dict[str, Any]:
    with db.session_scope() as session:
        dtp = session.get(m.DataTransferPackage, dtp_id)
        if dtp is None or dtp.origin_location is None:
            raise NotFoundError(f"data transfer package {dtp_id} vanished")
        buffer = dtp.origin_location
        storage = storage_for_location(buffer)
        pkgs = session.scalars(
            select(m.RawDataPackage)
            .where(m.RawDataPackage.data_transfer_package_id == dtp_id)
            .order_by(m.RawDataPackage.created_at, m.RawDataPackage.id)
        ).all()
        if not pkgs:
            raise NotFoundError(f"data transfer package {dtp_id} has no members")
        members: list[TarMember] = []
        missing: list[tuple[str, str]] = []
        for p in pkgs:
            local = storage.local_path(p.relative_path)
            if local is None:
                raise StorageError(
                    f"buffer {buffer.name} is not a local filesystem; data transfer packages "
                    "are built on disk buffers"
                )
            info = storage.stat(p.relative_path)
            if info is None:
                missing.append((p.relative_path, f"missing at buffer {buffer.name}"))
            elif info.size != p.size:
                missing.append(
                    (p.relative_path, f"{info.size} bytes at {buffer.name}, recorded {p.size}")
                )
            members.append(TarMember(p.relative_path, local, p.size, (p.checksum or "").lower()))
        relative_path = dtp.relative_path
        file_name = dtp.file_name
        session.expunge_all()
    if missing:
        raise _MemberMismatch(missing)

    with storage.open_write(relative_path) as out:
        result = write_tar_with_checksums(members, out)
        if result.mismatches:
            raise _MemberMismatch(
                [
                    (path, f"sha256 at {buffer.name} is {actual}, recorded {expected}")
                    for path, expected, actual in result.mismatches
                ]
            )
    try:
        with db.session_scope() as session:
            done = session.execute(
                update(m.DataTransferPackage)
                .where(
                    m.DataTransferPackage.id == dtp_id,
                    m.DataTransferPackage.status == m.Status.IN_PROGRESS,
                )
                .values(
                    status=m.Status.PENDING,
                    size=result.size,
                    checksum=result.sha256,
                    checksum_algorithm="sha256",
                    failure_reason=None,
                )
                .execution_options(synchronize_session=False)
            ).rowcount
            if not done:
                raise StorageError("the claim was released while the package was built")
            session.add(
                m.DataTransferPackagePhysicalCopy(
                    data_transfer_package_id=dtp_id,
                    data_location_id=buffer.id,
                    status=m.PhysicalCopyStatus.PRESENT,
                    relative_path=relative_path,
                    size=result.size,
                    checksum=result.sha256,
                    verified_at=m.utcnow(),
                )
            )
            session.execute(
                update(m.RawDataPackage)
                .where(m.RawDataPackage.data_transfer_package_id == dtp_id)
                .values(state=m.PackageState.TRANSFERRING)
                .execution_options(synchronize_session=False)
            )
    except BaseException:
        storage.delete(relative_path)
        raise
    log.info(
        "data_transfer_package_created",
        dtp_id=dtp_id,
        file_name=file_name,
        location=buffer.name,
        size_bytes=result.size,
        members=len(members),
    )
    return {
        "status": "completed",
        "dtp_id": dtp_id,
        "members": len(members),
        "size_bytes": result.size,
        "location": buffer.name,
    }


def _release(
    session: Session, dtp_id: int, expected: Sequence[m.Status] = (m.Status.IN_PROGRESS,)
) -> bool:
    """Give the members of an unfinished DataTransferPackage back and remove its row."""
    gone = session.execute(
        update(m.DataTransferPackage)
        .where(
            m.DataTransferPackage.id == dtp_id,
            m.DataTransferPackage.status.in_(list(expected)),
        )
        .values(status=m.Status.FAILED)
        .execution_options(synchronize_session=False)
    ).rowcount
    if not gone:
        return False
    session.execute(
        update(m.RawDataPackage)
        .where(m.RawDataPackage.data_transfer_package_id == dtp_id)
        .values(data_transfer_package_id=None)
        .execution_options(synchronize_session=False)
    )
    session.execute(
        delete(m.DataTransferPackage)
        .where(m.DataTransferPackage.id == dtp_id)
        .execution_options(synchronize_session=False)
    )
    return True


def _fail_members(
    db: DatabaseConnection, dtp_id: int, bad: list[tuple[str, str]]
) -> list[dict[str, Any]]:
    errors = []
    with db.session_scope() as session:
        dtp = session.get(m.DataTransferPackage, dtp_id)
        buffer_id = dtp.origin_location_id if dtp is not None else None
        for path, reason in bad:
            pkg = session.scalars(
                select(m.RawDataPackage).where(
                    m.RawDataPackage.data_transfer_package_id == dtp_id,
                    m.RawDataPackage.relative_path == path,
                )
            ).one_or_none()
            if pkg is None:
                continue
            pkg.state = m.PackageState.FAILED
            pkg.failure_reason = reason
            for pc in pkg.physical_copies:
                if pc.data_location_id == buffer_id:
                    pc.last_error = reason
            errors.append({"raw_data_package_id": pkg.id, "relative_path": path, "reason": reason})
            log.error(
                "raw_data_package_checksum_mismatch",
                raw_data_package_id=pkg.id,
                relative_path=path,
                reason=reason,
            )
        session.flush()
        _release(session, dtp_id)
    return errors
