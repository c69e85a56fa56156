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

No package is built larger than the largest LTA-site buffer can ever take (its capacity
less the routing margin, :func:`~ccat_data_transfer.core.buffer_room.largest_landing_capacity`):
a bundle closes before it would pass that size, and a RawDataPackage larger than it on its
own is refused before anything is built: it is marked FAILED with a ``failure_reason``
naming both sizes, and its bytes stay at the source-site buffer (and its files at SOURCE).

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

The claim / build / release steps are shared with stage 1
(:mod:`ccat_data_transfer.packaging.skeleton`); what is this stage's own is here: the
aggregation rule, the bundle row, members going to TRANSFERRING, failing a member.

The cycle (``run_once``) is :mod:`ccat_data_transfer.packaging.transfer_cycle`, the Celery
task :mod:`ccat_data_transfer.packaging.tasks`.

Room in the house: stage packaging (the aggregation rule, claims, and the body of
``create_data_transfer_package``).  Imports the packaging skeleton, core and
:mod:`ccat_ops_db`.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, exists, select, update
from sqlalchemy.orm import Session

from ccat_data_transfer.core import scope
from ccat_data_transfer.core.attempts import owned_step
from ccat_data_transfer.core.database import DatabaseConnection
from ccat_data_transfer.core.logs import get_logger
from ccat_data_transfer.core.operation_types import OperationType
from ccat_data_transfer.core.storage import storage_for_location
from ccat_data_transfer.packaging import skeleton
from ccat_ops_db import models as m

log = get_logger(__name__)

__all__ = [
    "Bundle",
    "bundle_packages",
    "claim_bundle",
    "build_data_transfer_package",
    "find_waiting_packages",
    "refuse_too_large",
    "release_stalled_claims",
    "source_site_buffers",
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
    max_size: int | None = None,
) -> list[list[int]]:
    """The aggregation rule on ``(id, size, created_at)`` tuples sorted oldest first.

    With ``max_size`` a bundle also closes before the next package would take it past
    that size (the largest package an LTA-site buffer can take)."""
    bundles: list[list[int]] = []
    current: list[int] = []
    size = 0
    oldest: datetime | None = None
    for pkg_id, pkg_size, created in packages:
        if current and max_size is not None and size + pkg_size > max_size:
            bundles.append(current)
            current, size, oldest = [], 0, None
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
    ~exists().where(m.PhysicalCopy.data_transfer_package_id == m.DataTransferPackage.id),
    ~exists().where(m.DataTransfer.data_transfer_package_id == m.DataTransferPackage.id),
)


def source_site_buffers(
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


DATA_TRANSFER_PACKAGE = skeleton.PackageKind(
    package_model=m.DataTransferPackage,
    member_model=m.RawDataPackage,
    member_fk="data_transfer_package_id",
    member_order=(m.RawDataPackage.created_at, m.RawDataPackage.id),
    copy_model=m.DataTransferPackagePhysicalCopy,
    copy_fk="data_transfer_package_id",
    location_attr="origin_location",
    label="data transfer package",
    members_word="members",
    id_key="dtp_id",
    event="data_transfer_package",
    log=log,
    task="ccat_data_transfer.create_data_transfer_package",
    operation=OperationType.DATA_TRANSFER_PACKAGE_CREATION,
    # Only bundles that never got built: no copy and no transfer (_STALLED_BUNDLES).  A
    # built package is IN_PROGRESS again while it is being transferred: not stalled.
    stalled=_STALLED_BUNDLES,
    stalled_scope=m.DataTransferPackage.origin_location_id,
    not_local=(
        "buffer {location} is not a local filesystem; data transfer packages are built on "
        "disk buffers"
    ),
    missing="missing at buffer {location}",
    wrong_size="{actual} bytes at {location}, recorded {recorded}",
    bad_checksum="sha256 at {location} is {actual}, recorded {expected}",
)


def claim_bundle(
    session: Session, buffer: m.DataLocation, package_ids: Sequence[int]
) -> int | None:
    """Create a DataTransferPackage (SCHEDULED) owning ``package_ids`` and COMMIT; None if
    another manager claimed any of them first."""
    stamp = m.utcnow().strftime("%Y%m%dT%H%M%S")
    file_name = f"{buffer.site.short_name}_{stamp}_{uuid.uuid4().hex[:12]}.tar"
    dtp = m.DataTransferPackage(
        file_name=file_name,
        relative_path=f"data_transfer_packages/{file_name}",
        size=0,
        status=m.Status.SCHEDULED,
        origin_location_id=buffer.id,
    )
    claimed = skeleton.claim_members(
        session,
        DATA_TRANSFER_PACKAGE,
        dtp,
        package_ids,
        m.RawDataPackage.state == m.PackageState.WAITING,
    )
    if claimed is skeleton.ClaimLost.MEMBERS_TAKEN:
        log.info("data_transfer_package_claim_lost", location=buffer.name)
    return None if isinstance(claimed, skeleton.ClaimLost) else claimed


def release_stalled_claims(session: Session, location_ids: list[int] | None = None) -> int:
    """Release bundles whose build started and whose heartbeat stopped (a worker died);
    their raw data packages can be bundled again; queued ones are sent again.  With ``location_ids``
    only bundles whose origin buffer is one of them.  Commits."""
    return skeleton.release_stalled_claims(session, DATA_TRANSFER_PACKAGE, location_ids)


def refuse_too_large(
    session: Session,
    buffer: m.DataLocation,
    waiting: list[tuple[int, int, datetime]],
    limit: tuple[int, str] | None,
) -> tuple[list[tuple[int, int, datetime]], list[int]]:
    """Mark FAILED the waiting packages larger than ``limit`` (``(bytes, location)``, the
    largest package any LTA-site buffer can take), with the reason; returns the others
    and the ids refused.  Nothing is built or moved: the refused stay at ``buffer``."""
    if limit is None:
        return waiting, []
    fits, where = limit
    kept, refused = [], []
    for item in waiting:
        if item[1] <= fits:
            kept.append(item)
            continue
        reason = (
            f"{item[1]} bytes is larger than any LTA-site buffer can take ({fits} bytes at "
            f"{where}: its capacity less the routing margin); not packaged, it stays at "
            f"{buffer.name}"
        )
        done = session.execute(
            update(m.RawDataPackage)
            .where(
                m.RawDataPackage.id == item[0],
                m.RawDataPackage.state == m.PackageState.WAITING,
                m.RawDataPackage.data_transfer_package_id.is_(None),
            )
            .values(state=m.PackageState.FAILED, failure_reason=reason)
            .execution_options(synchronize_session=False)
        ).rowcount
        if done:
            refused.append(item[0])
            log.error(
                "data_transfer_package_refused",
                raw_data_package_id=item[0],
                size_bytes=item[1],
                largest_acceptable_bytes=fits,
                location=buffer.name,
                largest_buffer=where,
                reason=reason,
            )
    session.commit()
    return kept, refused


# ---------------------------------------------------------------------------------------
# The task body (the Celery task is packaging.tasks.create_data_transfer_package)
# ---------------------------------------------------------------------------------------


def build_data_transfer_package(dtp_id: int) -> dict[str, Any]:
    """Build and record one claimed DataTransferPackage at its buffer (idempotent): the
    body of the Celery task
    :func:`ccat_data_transfer.packaging.tasks.create_data_transfer_package`."""
    return skeleton.run_task(DATA_TRANSFER_PACKAGE, dtp_id, _build, _fail_member)


def _build(db: DatabaseConnection, dtp_id: int, attempt: str) -> dict[str, Any]:
    """Tar at the buffer and record; the members go to TRANSFERRING.  The rename, the
    record and a cleanup happen only while ``attempt`` owns the package row."""
    work = skeleton.load_work(db, DATA_TRANSFER_PACKAGE, dtp_id, attempt=attempt)
    buffer = work.location
    storage = storage_for_location(buffer)
    result = skeleton.write_tar(DATA_TRANSFER_PACKAGE, storage, work)
    model = m.DataTransferPackage
    try:
        with owned_step(model, dtp_id, attempt, "record", db=db) as session:
            skeleton.record_built(
                session,
                DATA_TRANSFER_PACKAGE,
                dtp_id,
                buffer.id,
                work.relative_path,
                result,
                status=m.Status.PENDING,
            )
            session.execute(
                update(m.RawDataPackage)
                .where(m.RawDataPackage.data_transfer_package_id == dtp_id)
                .values(state=m.PackageState.TRANSFERRING)
                .execution_options(synchronize_session=False)
            )
    except BaseException:
        try:
            with owned_step(model, dtp_id, attempt, "clean up", db=db):
                storage.delete(work.relative_path)
        except Exception as exc:  # superseded or DB gone: leave dark data, never a loss
            log.warning("package_cleanup_skipped", data_transfer_package_id=dtp_id, reason=str(exc))
        raise
    return skeleton.report_built(DATA_TRANSFER_PACKAGE, dtp_id, work, buffer.name, result)


def _fail_member(
    session: Session, dtp_id: int, dtp: m.DataTransferPackage | None, path: str, reason: str
) -> dict[str, Any] | None:
    """Mark the raw data package at ``path`` FAILED (its files are still at SOURCE), with
    the reason on its copy at the buffer."""
    buffer_id = dtp.origin_location_id if dtp is not None else None
    pkg = session.scalars(
        select(m.RawDataPackage).where(
            m.RawDataPackage.data_transfer_package_id == dtp_id,
            m.RawDataPackage.relative_path == path,
        )
    ).one_or_none()
    if pkg is None:
        return None
    pkg.state = m.PackageState.FAILED
    pkg.failure_reason = reason
    for pc in pkg.physical_copies:
        if pc.data_location_id == buffer_id:
            pc.last_error = reason
    log.error(
        "raw_data_package_checksum_mismatch",
        raw_data_package_id=pkg.id,
        relative_path=path,
        reason=reason,
    )
    return {"raw_data_package_id": pkg.id, "relative_path": path, "reason": reason}
