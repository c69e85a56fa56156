"""Stage 1, raw data packages: tar the filed files of one ExecutedObsUnit x InstrumentModule
at SOURCE and move the tar to the site's BUFFER.

When is a group complete?
-------------------------
A *group* is the set of filed, not yet packaged files of one ExecutedObsUnit x
InstrumentModule at one SOURCE location.  The group is **complete** when

1. its ExecutedObsUnit is marked finished (``finish-obs-unit`` or
   ``POST /api/v1/executed-obs-units/{name}/finish``), or
2. no new file was filed for it for ``RAW_DATA_PACKAGE_QUIET_PERIOD_SECONDS`` (the newest
   file's filing time is at least that old).

A complete group is split, in path order, into packages of at most
``RAW_DATA_PACKAGE_MAX_SIZE_BYTES`` (a single file larger than that is a package of its
own); every part is packaged.  An *incomplete* group whose files already exceed the size
limit packages its full parts now (every part except the last, still growing one) so
that a long observation streams out; the remainder waits for completeness.  A group with
a file flagged with ``checksum_error`` is **blocked**: none of its files are packaged
until an operator resolves the flagged file (its bytes or its filing), so that a package
never silently lacks a file.

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

The task moves the package SCHEDULED -> IN_PROGRESS (so two deliveries never both work),
writes the tar at SOURCE in one streaming pass with ``write_tar_with_checksums`` (every
file verified against its filed checksum while the package checksum is computed) through
the atomic ``Storage.open_write`` (temporary name, fsync, rename), copies it to the best
usable BUFFER of the site (lowest priority number, active, not in EMERGENCY; on a storage
error the next one), removes the SOURCE tar, and records the package (COMPLETED, state
WAITING) and its RawDataPackagePhysicalCopy PRESENT at the buffer.  On a checksum
mismatch nothing is written: the bad file gets ``checksum_error`` (and blocks its group),
the claim is released.  On any other failure the claim is released and the package row
removed, so nothing half-done is recorded; the next cycle tries again.  Claims stuck for
``STALLED_WORK_TIMEOUT_SECONDS`` (a killed worker) are released by the manager.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import bindparam, delete, exists, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ccat_data_transfer import buffer_status, scope
from ccat_data_transfer.celery_app import app
from ccat_data_transfer.config.config import settings
from ccat_data_transfer.database import DatabaseConnection
from ccat_data_transfer.exceptions import NotFoundError
from ccat_data_transfer.logging_utils import get_logger
from ccat_data_transfer.operation_types import OperationType
from ccat_data_transfer.queue_discovery import route_task_by_location
from ccat_data_transfer.stage_tasks import merge_inline_package_result, start_scheduled
from ccat_data_transfer.storage import StorageError, storage_for_location
from ccat_data_transfer.tarutil import TarMember, TarSourceChangedError, write_tar_with_checksums
from ccat_ops_db import models as m

log = get_logger(__name__)

__all__ = [
    "GroupPlan",
    "claim_package",
    "create_raw_data_package",
    "describe_raw_data_package",
    "package_file_name",
    "plan_packages",
    "release_stalled_claims",
    "run_once",
    "split_by_size",
    "usable_buffers",
]


# ---------------------------------------------------------------------------------------
# Decisions (plain functions of data)
# ---------------------------------------------------------------------------------------


def split_by_size(
    files: Sequence[tuple[Any, int]], max_size: int, complete: bool
) -> list[list[Any]]:
    """Split ``(key, size)`` pairs, in the given order, into parts of at most ``max_size``
    bytes (a larger single file is a part of its own).  When the group is not ``complete``
    the last part is left out: it may still grow."""
    parts: list[list[Any]] = []
    current: list[Any] = []
    current_size = 0
    for key, size in files:
        if current and current_size + size > max_size:
            parts.append(current)
            current, current_size = [], 0
        current.append(key)
        current_size += size
    if current and complete:
        parts.append(current)
    return parts


def group_is_complete(finished: bool, newest_filed_age_seconds: float, quiet: float) -> bool:
    """The completeness rule of the module docstring."""
    return finished or newest_filed_age_seconds >= quiet


_UNSAFE = re.compile(r"[^A-Za-z0-9._+=@-]")


def package_file_name(eou_name: str, instrument: str, module: str, part: int) -> str:
    def safe(text: str) -> str:
        return _UNSAFE.sub("_", text)

    return f"{safe(eou_name)}__{safe(instrument)}_{safe(module)}__part{part:03d}.tar"


def package_relative_path(instrument: str, module: str, file_name: str) -> str:
    return (
        f"raw_data_packages/{_UNSAFE.sub('_', instrument)}/{_UNSAFE.sub('_', module)}/{file_name}"
    )


# ---------------------------------------------------------------------------------------
# Queries
# ---------------------------------------------------------------------------------------


def usable_buffers(session: Session, site_id: int) -> list[m.DataLocation]:
    """Active BUFFER locations of a site, best first, without those in EMERGENCY state."""
    buffers = session.scalars(
        select(m.DataLocation)
        .where(
            m.DataLocation.site_id == site_id,
            m.DataLocation.location_type == m.LocationType.BUFFER,
            m.DataLocation.active.is_(True),
        )
        .order_by(m.DataLocation.priority, m.DataLocation.id)
    ).all()
    usable = []
    states = buffer_status.states_of([buf.name for buf in buffers], session)
    for buf in buffers:
        state = states[buf.name]
        if state == buffer_status.BufferState.EMERGENCY:
            log.warning(
                "buffer_skipped_emergency", location=buf.name, reason="buffer in emergency state"
            )
            continue
        usable.append(buf)
    return usable


@dataclass
class GroupPlan:
    """Parts to package for one group (files as ``(id, size)``)."""

    source_location_id: int
    executed_obs_unit_id: int
    instrument_module_id: int
    complete: bool
    parts: list[list[Any]] = field(default_factory=list)


def plan_packages(
    session: Session,
    summary: dict[str, Any] | None = None,
    location_ids: list[int] | None = None,
) -> list[GroupPlan]:
    """Groups with something to package now, and how to split them (no writes).  With
    ``location_ids`` only files whose SOURCE location is one of them (a site's scope)."""
    summary = summary if summary is not None else {}
    max_size = int(settings.RAW_DATA_PACKAGE_MAX_SIZE_BYTES)
    quiet = float(settings.RAW_DATA_PACKAGE_QUIET_PERIOD_SECONDS)
    now = m.utcnow()
    f = m.RawDataFile
    groups = (
        select(
            f.source_location_id,
            f.executed_obs_unit_id,
            f.instrument_module_id,
            func.count(),
            func.sum(f.size),
            func.max(f.created_at),
            func.count(f.checksum_error),
            m.ExecutedObsUnit.finished_at,
        )
        .join(m.ExecutedObsUnit, m.ExecutedObsUnit.id == f.executed_obs_unit_id)
        .where(f.raw_data_package_id.is_(None))
        .group_by(
            f.source_location_id,
            f.executed_obs_unit_id,
            f.instrument_module_id,
            m.ExecutedObsUnit.finished_at,
        )
        .order_by(func.min(f.created_at))
    )
    rows = session.execute(scope.restrict(groups, f.source_location_id, location_ids)).all()

    paused_sites: dict[int, bool] = {}
    plans: list[GroupPlan] = []
    for loc_id, eou_id, mod_id, _count, total, newest, n_bad, finished_at in rows:
        if n_bad:
            summary["blocked_groups"] = summary.get("blocked_groups", 0) + 1
            continue
        complete = group_is_complete(finished_at is not None, (now - newest).total_seconds(), quiet)
        if not complete and int(total or 0) <= max_size:
            summary["waiting_groups"] = summary.get("waiting_groups", 0) + 1
            continue
        location = session.get(m.DataLocation, loc_id)
        if location is None or not location.active:
            continue
        if location.site_id not in paused_sites:
            paused = not usable_buffers(session, location.site_id)
            paused_sites[location.site_id] = paused
            if paused:
                log.warning(
                    "raw_data_package_creation_paused",
                    site=location.site.name,
                    location=location.name,
                    reason="no usable buffer at the site (all inactive or in emergency state)",
                )
                summary.setdefault("paused_sites", []).append(location.site.name)
        if paused_sites[location.site_id]:
            continue
        files = session.execute(
            select(f.id, f.size)
            .where(
                f.raw_data_package_id.is_(None),
                f.source_location_id == loc_id,
                f.executed_obs_unit_id == eou_id,
                f.instrument_module_id == mod_id,
            )
            .order_by(f.relative_path)
        ).all()
        parts = split_by_size([(r[0], int(r[1])) for r in files], max_size, complete)
        if not complete:
            summary["waiting_groups"] = summary.get("waiting_groups", 0) + 1
        if parts:
            plans.append(GroupPlan(loc_id, eou_id, mod_id, complete, parts))
    return plans


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
    try:
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
        session.add(pkg)
        session.flush()
        claimed = session.execute(
            update(m.RawDataFile)
            .where(
                m.RawDataFile.id.in_(list(file_ids)), m.RawDataFile.raw_data_package_id.is_(None)
            )
            .values(raw_data_package_id=pkg.id)
            .execution_options(synchronize_session=False)
        ).rowcount
        if claimed != len(file_ids):
            session.rollback()
            log.info("raw_data_package_claim_lost", reason="files claimed by another manager")
            return None
        session.commit()
    except IntegrityError:
        session.rollback()
        log.info("raw_data_package_claim_lost", reason="package name taken by another manager")
        return None
    return pkg.id


# Built once (every cycle of this manager and of recovery runs it); ``limit`` is bound.
_STALLED_PACKAGES = select(m.RawDataPackage.id).where(
    m.RawDataPackage.status.in_([m.Status.SCHEDULED, m.Status.IN_PROGRESS]),
    m.RawDataPackage.created_at < bindparam("limit"),
    # A package with a copy was built: never un-claim it.
    ~exists().where(m.PhysicalCopy.raw_data_package_id == m.RawDataPackage.id),
)


def release_stalled_claims(session: Session, location_ids: list[int] | None = None) -> int:
    """Release claims of packages stuck SCHEDULED/IN_PROGRESS past the stall timeout
    (a worker died): their files become packageable again.  With ``location_ids`` only
    packages built at those SOURCE locations.  Commits."""
    limit = m.utcnow() - timedelta(seconds=int(settings.STALLED_WORK_TIMEOUT_SECONDS))
    ids = session.scalars(
        scope.restrict(_STALLED_PACKAGES, m.RawDataPackage.source_location_id, location_ids),
        {"limit": limit},
    ).all()
    released = 0
    for pkg_id in ids:
        if _release_claim(session, pkg_id, expected=(m.Status.SCHEDULED, m.Status.IN_PROGRESS)):
            released += 1
            log.warning("raw_data_package_claim_released", package_id=pkg_id, reason="stalled")
    session.commit()
    return released


def _release_claim(session: Session, pkg_id: int, expected: Sequence[m.Status]) -> bool:
    """Un-claim the files of an unfinished package and remove its row (no copy exists)."""
    gone = session.execute(
        update(m.RawDataPackage)
        .where(m.RawDataPackage.id == pkg_id, m.RawDataPackage.status.in_(list(expected)))
        .values(status=m.Status.FAILED)
        .execution_options(synchronize_session=False)
    ).rowcount
    if not gone:
        return False
    session.execute(
        update(m.RawDataFile)
        .where(m.RawDataFile.raw_data_package_id == pkg_id)
        .values(raw_data_package_id=None)
        .execution_options(synchronize_session=False)
    )
    session.execute(
        delete(m.RawDataPackage)
        .where(m.RawDataPackage.id == pkg_id)
        .execution_options(synchronize_session=False)
    )
    return True


# ---------------------------------------------------------------------------------------
# The manager cycle
# ---------------------------------------------------------------------------------------


def run_once(session: Session, site: str | None = None) -> dict[str, Any]:
    """One cycle: release stalled claims, plan, claim, submit.  Returns a summary.

    ``site`` scopes the cycle to raw files whose SOURCE location is at that site (default:
    the setting ``MANAGER_SITE``; see :mod:`ccat_data_transfer.scope`)."""
    location_ids = scope.location_ids(session, site)
    summary: dict[str, Any] = {
        "packages_submitted": 0,
        "packages_created": 0,
        "packages_failed": 0,
        "files_packaged": 0,
        "bytes_packaged": 0,
        "claims_lost": 0,
        "waiting_groups": 0,
        "blocked_groups": 0,
        "paused_sites": [],
        "checksum_errors": [],
        "released_stalled": release_stalled_claims(session, location_ids),
    }
    plans = plan_packages(session, summary, location_ids)
    session.commit()
    for plan in plans:
        for part in plan.parts:
            pkg_id = claim_package(session, plan, part)
            if pkg_id is None:
                summary["claims_lost"] += 1
                continue
            source = session.get(m.DataLocation, plan.source_location_id)
            assert source is not None
            queue = route_task_by_location(OperationType.RAW_DATA_PACKAGE_CREATION, source)
            session.commit()
            outcome = create_raw_data_package.apply_async(args=[pkg_id], queue=queue)
            summary["packages_submitted"] += 1
            _merge_eager(summary, outcome)
    if summary["checksum_errors"]:
        log.error(
            "raw_data_files_checksum_mismatch",
            count=len(summary["checksum_errors"]),
            files=[e["relative_path"] for e in summary["checksum_errors"]][:50],
        )
    return summary


def _merge_eager(summary: dict[str, Any], outcome: Any) -> None:
    """In embedded mode the task ran inline: fold its result into the summary."""
    merge_inline_package_result(
        summary, outcome, {"files_packaged": "files", "bytes_packaged": "size_bytes"}
    )


# ---------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------


class _ChecksumMismatch(Exception):
    """Files whose bytes do not match their filing: ``(relative_path, reason)``."""

    def __init__(self, mismatches: list[tuple[str, str]]) -> None:
        super().__init__(f"{len(mismatches)} files do not match their filed checksum")
        self.mismatches = mismatches


@app.task(bind=True, acks_late=True, name="ccat_data_transfer.create_raw_data_package")
def create_raw_data_package(self: Any, package_id: int) -> dict[str, Any]:
    """Build, place and record one claimed RawDataPackage (idempotent)."""
    db = DatabaseConnection()
    with db.session_scope() as session:
        started = start_scheduled(session, m.RawDataPackage, package_id)
    if not started:
        log.info("raw_data_package_task_skipped", package_id=package_id, reason="not scheduled")
        return {"status": "skipped", "package_id": package_id}
    try:
        return _build_package(db, package_id)
    except _ChecksumMismatch as exc:
        errors = _flag_mismatches(db, package_id, exc.mismatches)
        return {"status": "failed", "package_id": package_id, "checksum_errors": errors}
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        log.error("raw_data_package_failed", package_id=package_id, reason=reason)
        with db.session_scope() as session:
            _release_claim(session, package_id, expected=(m.Status.IN_PROGRESS,))
        return {"status": "failed", "package_id": package_id, "reason": reason}


@dataclass
class _Work:
    file_name: str
    relative_path: str
    source: m.DataLocation
    buffers: list[m.DataLocation]
    members: list[TarMember]
    missing: list[tuple[str, str]]


def _load_work(db: DatabaseConnection, package_id: int) -> _Work:
    with db.session_scope() as session:
        pkg = session.get(m.RawDataPackage, package_id)
        if pkg is None or pkg.source_location is None:
            raise NotFoundError(f"raw data package {package_id} vanished")
        source = pkg.source_location
        storage = storage_for_location(source)
        files = session.scalars(
            select(m.RawDataFile)
            .where(m.RawDataFile.raw_data_package_id == package_id)
            .order_by(m.RawDataFile.relative_path)
        ).all()
        if not files:
            raise NotFoundError(f"raw data package {package_id} has no files")
        members, missing = [], []
        for f in files:
            local = storage.local_path(f.relative_path)
            if local is None:
                raise StorageError(
                    f"SOURCE location {source.name} is not a local filesystem; packages are "
                    "built where the files lie"
                )
            info = storage.stat(f.relative_path)
            if info is None:
                missing.append((f.relative_path, "file missing at SOURCE"))
            elif info.size != f.size:
                missing.append(
                    (f.relative_path, f"size at SOURCE is {info.size} bytes, filed as {f.size}")
                )
            members.append(TarMember(f.relative_path, local, f.size, f.checksum.lower()))
        buffers = usable_buffers(session, source.site_id)
        session.expunge_all()
        return _Work(pkg.file_name, pkg.relative_path, source, buffers, members, missing)


def _build_package(db: DatabaseConnection, package_id: int) -> dict[str, Any]:
    work = _load_work(db, package_id)
    if work.missing:
        raise _ChecksumMismatch(work.missing)
    if not work.buffers:
        raise StorageError(f"no usable buffer at the site of {work.source.name}")
    src_storage = storage_for_location(work.source)
    try:
        with src_storage.open_write(work.relative_path) as out:
            result = write_tar_with_checksums(work.members, out)
            if result.mismatches:
                # Raising inside the block discards the temporary file: nothing appears.
                raise _ChecksumMismatch(
                    [
                        (path, f"sha256 at SOURCE is {actual}, filed as {expected}")
                        for path, expected, actual in result.mismatches
                    ]
                )
    except TarSourceChangedError as exc:
        raise StorageError(f"a file changed while being packaged: {exc}") from exc

    placed: m.DataLocation | None = None
    try:
        local_tar = src_storage.local_path(work.relative_path)
        for buf in work.buffers:
            try:
                buf_storage = storage_for_location(buf)
                buf_storage.copy_in(local_tar, work.relative_path)  # type: ignore[arg-type]
                info = buf_storage.stat(work.relative_path)
                if info is None or info.size != result.size:
                    raise StorageError(f"copy at {buf.name} has the wrong size")
                placed = buf
                break
            except (StorageError, OSError) as exc:
                log.warning(
                    "buffer_failover",
                    location=buf.name,
                    package_id=package_id,
                    reason=f"{type(exc).__name__}: {exc}",
                )
        if placed is None:
            raise StorageError("no buffer of the site accepted the package")
        with db.session_scope() as session:
            done = session.execute(
                update(m.RawDataPackage)
                .where(
                    m.RawDataPackage.id == package_id,
                    m.RawDataPackage.status == m.Status.IN_PROGRESS,
                )
                .values(
                    status=m.Status.COMPLETED,
                    state=m.PackageState.WAITING,
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
                m.RawDataPackagePhysicalCopy(
                    raw_data_package_id=package_id,
                    data_location_id=placed.id,
                    status=m.PhysicalCopyStatus.PRESENT,
                    relative_path=work.relative_path,
                    size=result.size,
                    checksum=result.sha256,
                    verified_at=m.utcnow(),
                )
            )
    except BaseException:
        if placed is not None:
            try:
                storage_for_location(placed).delete(work.relative_path)
            except Exception as exc:  # leave dark data rather than hide the first error
                log.warning("buffer_cleanup_failed", location=placed.name, reason=str(exc))
        raise
    finally:
        try:
            src_storage.delete(work.relative_path)
        except Exception as exc:
            log.warning("source_tar_cleanup_failed", location=work.source.name, reason=str(exc))
    log.info(
        "raw_data_package_created",
        package_id=package_id,
        file_name=work.file_name,
        location=placed.name,
        size_bytes=result.size,
        files=len(work.members),
    )
    return {
        "status": "completed",
        "package_id": package_id,
        "files": len(work.members),
        "size_bytes": result.size,
        "location": placed.name,
    }


def _flag_mismatches(
    db: DatabaseConnection, package_id: int, mismatches: list[tuple[str, str]]
) -> list[dict[str, Any]]:
    errors: list[dict[str, Any]] = []
    with db.session_scope() as session:
        pkg = session.get(m.RawDataPackage, package_id)
        source_id = pkg.source_location_id if pkg is not None else None
        for path, reason in mismatches:
            f = session.scalars(
                select(m.RawDataFile).where(
                    m.RawDataFile.source_location_id == source_id,
                    m.RawDataFile.relative_path == path,
                )
            ).one_or_none()
            if f is None:
                continue
            f.checksum_error = f"{reason} (found {m.utcnow():%Y-%m-%dT%H:%M:%SZ})"
            errors.append({"file_id": str(f.id), "relative_path": path, "reason": reason})
            log.error(
                "raw_data_file_checksum_mismatch",
                file_id=str(f.id),
                relative_path=path,
                package_id=package_id,
                reason=reason,
            )
        session.flush()
        _release_claim(session, package_id, expected=(m.Status.IN_PROGRESS,))
    return errors


# ---------------------------------------------------------------------------------------
# Reporting (CLI `package show`, GET /api/v1/packages/{id})
# ---------------------------------------------------------------------------------------


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def _copy_row(pc: m.PhysicalCopy) -> dict[str, Any]:
    return {
        "id": pc.id,
        "location": pc.data_location.name,
        "location_type": pc.data_location.location_type.value,
        "site": pc.data_location.site.name,
        "status": pc.status.name,
        "relative_path": pc.relative_path,
        "size": pc.size,
        "created_at": _iso(pc.created_at),
        "verified_at": _iso(pc.verified_at),
        "deleted_at": _iso(pc.deleted_at),
    }


def describe_raw_data_package(session: Session, ident: int | str) -> dict[str, Any]:
    """Everything about one RawDataPackage (by id or file_name) as plain data: its files,
    all its physical copies, its DataTransferPackage with copies and transfers, and its
    long-term-archive transfers.  NotFoundError if there is no such package."""
    pkg: m.RawDataPackage | None = None
    text = str(ident).strip()
    if text.isdigit():
        pkg = session.get(m.RawDataPackage, int(text))
    if pkg is None:
        pkg = session.scalars(
            select(m.RawDataPackage).where(m.RawDataPackage.file_name == text)
        ).one_or_none()
    if pkg is None:
        raise NotFoundError(f"no raw data package with id or file name {text!r}")
    files = session.scalars(
        select(m.RawDataFile)
        .where(m.RawDataFile.raw_data_package_id == pkg.id)
        .order_by(m.RawDataFile.relative_path)
    ).all()
    copies = session.scalars(
        select(m.RawDataPackagePhysicalCopy)
        .where(m.RawDataPackagePhysicalCopy.raw_data_package_id == pkg.id)
        .order_by(m.PhysicalCopy.id)
    ).all()
    module = pkg.instrument_module
    out: dict[str, Any] = {
        "id": pkg.id,
        "file_name": pkg.file_name,
        "relative_path": pkg.relative_path,
        "size": pkg.size,
        "checksum": pkg.checksum,
        "checksum_algorithm": pkg.checksum_algorithm,
        "state": pkg.state.name,
        "status": pkg.status.name,
        "executed_obs_unit": pkg.executed_obs_unit.name,
        "instrument_module": f"{module.instrument.name}/{module.name}",
        "part_number": pkg.part_number,
        "source_location": pkg.source_location.name if pkg.source_location else None,
        "failure_reason": pkg.failure_reason,
        "created_at": _iso(pkg.created_at),
        "archived_at": _iso(pkg.archived_at),
        "files": [
            {
                "id": str(f.id),
                "relative_path": f.relative_path,
                "size": f.size,
                "checksum": f.checksum,
                "checksum_error": f.checksum_error,
            }
            for f in files
        ],
        "physical_copies": [_copy_row(pc) for pc in copies],
        "data_transfer_package": None,
        "long_term_archive_transfers": [],
    }
    dtp = pkg.data_transfer_package
    if dtp is not None:
        dtp_copies = session.scalars(
            select(m.DataTransferPackagePhysicalCopy)
            .where(m.DataTransferPackagePhysicalCopy.data_transfer_package_id == dtp.id)
            .order_by(m.PhysicalCopy.id)
        ).all()
        transfers = session.scalars(
            select(m.DataTransfer)
            .where(m.DataTransfer.data_transfer_package_id == dtp.id)
            .order_by(m.DataTransfer.id)
        ).all()
        out["data_transfer_package"] = {
            "id": dtp.id,
            "file_name": dtp.file_name,
            "relative_path": dtp.relative_path,
            "size": dtp.size,
            "checksum": dtp.checksum,
            "status": dtp.status.name,
            "origin_location": dtp.origin_location.name if dtp.origin_location else None,
            "created_at": _iso(dtp.created_at),
            "physical_copies": [_copy_row(pc) for pc in dtp_copies],
            "transfers": [
                {
                    "id": t.id,
                    "origin": t.origin_location.name,
                    "destination": t.destination_location.name,
                    "is_primary": t.is_primary,
                    "status": t.status.name,
                    "unpack_status": t.unpack_status.name,
                    "bytes_transferred": t.bytes_transferred,
                    "rate_mb_per_s": t.rate_mb_per_s,
                    "start_time": _iso(t.start_time),
                    "end_time": _iso(t.end_time),
                    "failure_reason": t.failure_reason,
                }
                for t in transfers
            ],
        }
    ltas = session.scalars(
        select(m.LongTermArchiveTransfer)
        .where(m.LongTermArchiveTransfer.raw_data_package_id == pkg.id)
        .order_by(m.LongTermArchiveTransfer.id)
    ).all()
    out["long_term_archive_transfers"] = [
        {
            "id": t.id,
            "origin": t.origin_location.name,
            "destination": t.destination_location.name,
            "status": t.status.name,
            "bytes_transferred": t.bytes_transferred,
            "start_time": _iso(t.start_time),
            "end_time": _iso(t.end_time),
            "failure_reason": t.failure_reason,
        }
        for t in ltas
    ]
    return out
