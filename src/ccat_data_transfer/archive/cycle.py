"""Stage 5: move RawDataPackages from an LTA-site buffer into that site's long-term archive.

For every RawDataPackage with a PRESENT copy at the BUFFER of a site that has a
LONG_TERM_ARCHIVE location, the manager records one LongTermArchiveTransfer (unique per
package and LTA location), claims it atomically and submits a task on the buffer's
``long_term_archive_transfer`` queue.  The task copies the tar into the LTA (disk or S3;
writes are atomic), checks the checksum of what landed, writes a JSON metadata sidecar at
``<relative_path>.json``, records the LTA copy PRESENT (verified) and marks the package
ARCHIVED.  The buffer copy is left alone: the deletion manager removes it by its rules.
"""

from __future__ import annotations

import contextlib
import functools
import json
from datetime import timedelta
from typing import Any

from sqlalchemy import bindparam, exists, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from ccat_data_transfer.core import scope
from ccat_data_transfer.core.attempts import AttemptSuperseded, new_attempt, owned_step
from ccat_data_transfer.core.database import DatabaseConnection
from ccat_data_transfer.core.errors import ConfigurationError, PermanentError
from ccat_data_transfer.core.logs import get_logger
from ccat_data_transfer.core.operation_types import OperationType
from ccat_data_transfer.core.row_tasks import start_scheduled
from ccat_data_transfer.core.storage import storage_for_location
from ccat_data_transfer.core.transfer_methods import get_transfer_method, method_for_storages
from ccat_data_transfer.transfer.claims import claim, submit_claimed
from ccat_data_transfer.transfer.recovery import StalledWork, reset_stalled
from ccat_data_transfer.transfer.worker import (
    heartbeat,
    mark_completed,
    record_failed_attempt,
    record_present_copy,
    row_task,
    transfer_log_dir,
    worker_name,
)
from ccat_ops_db import models as m

log = get_logger(__name__)

# (archive_transfer_id, reason, permanent, fields) -> "failed" / "retry" / "skipped"
_record_failure = functools.partial(
    record_failed_attempt, m.LongTermArchiveTransfer, logger=log, event="archive_transfer"
)

#: Archive transfers in flight, reset (or their task sent again) by the site of the LTA
#: they go into; the task runs on the queue of the LTA-site buffer they come from.
STALLED_ARCHIVE_TRANSFERS = StalledWork(
    m.LongTermArchiveTransfer,
    m.LongTermArchiveTransfer.destination_location_id,
    "stalled in {status}: worker lost",
    "ccat_data_transfer.archive_manager.archive_raw_data_package",
    OperationType.LONG_TERM_ARCHIVE_TRANSFER,
    "origin_location",
)

__all__ = [
    "archive_raw_data_package",
    "build_metadata",
    "dispatch_archive_transfers",
    "execute_archive_transfer",
    "plan_archive_transfers",
    "reset_stalled_archive_transfers",
    "run_once",
    "sidecar_path",
]


def sidecar_path(relative_path: str) -> str:
    """Where the metadata sidecar of a package lies in the LTA."""
    return f"{relative_path}.json"


@functools.cache
def _archive_candidates() -> tuple[Any, Any]:
    """The candidates query of :func:`plan_archive_transfers` and its LTA id column,
    built once: its aliases of a polymorphic class make building it cost more than
    running it, every cycle."""
    buf = aliased(m.DataLocation)
    lta = aliased(m.DataLocation)
    copy = aliased(m.RawDataPackagePhysicalCopy)
    lta_copy = aliased(m.RawDataPackagePhysicalCopy)
    lta_t = m.LongTermArchiveTransfer
    candidates = (
        select(copy.raw_data_package_id, buf.id, lta.id)
        .join(buf, buf.id == copy.data_location_id)
        .join(lta, lta.site_id == buf.site_id)
        .where(
            copy.status == m.PhysicalCopyStatus.PRESENT,
            buf.location_type == m.LocationType.BUFFER,
            lta.location_type == m.LocationType.LONG_TERM_ARCHIVE,
            lta.active.is_(True),
            ~exists().where(
                lta_t.raw_data_package_id == copy.raw_data_package_id,
                lta_t.destination_location_id == lta.id,
            ),
            ~exists().where(
                lta_copy.raw_data_package_id == copy.raw_data_package_id,
                lta_copy.data_location_id == lta.id,
                lta_copy.status == m.PhysicalCopyStatus.PRESENT,
            ),
        )
        .order_by(copy.raw_data_package_id, buf.priority, lta.priority, lta.name)
    )
    return candidates, lta.id


def plan_archive_transfers(session: Session, location_ids: list[int] | None = None) -> list[int]:
    """Create a PENDING LongTermArchiveTransfer for every RawDataPackage PRESENT at an
    LTA-site buffer that has neither a transfer nor a PRESENT copy at that site's LTA.

    One set-based query finds the candidates; each site archives into its active LTA
    location of best priority.  With ``location_ids`` only into LTA locations among them
    (a site's scope).  Returns the new ids (committed)."""
    candidates, lta_id = _archive_candidates()
    rows = session.execute(scope.restrict(candidates, lta_id, location_ids)).all()
    if not rows:
        return []
    site_of = dict(
        session.execute(
            select(m.DataLocation.id, m.DataLocation.site_id).where(
                m.DataLocation.id.in_({r[2] for r in rows})
            )
        ).all()
    )
    chosen: dict[tuple[int, int], tuple[int, int]] = {}
    for rdp_id, buf_id, lta_id in rows:
        chosen.setdefault((rdp_id, site_of[lta_id]), (buf_id, lta_id))
    created: list[int] = []
    for (rdp_id, _site), (buf_id, lta_id) in chosen.items():
        row = m.LongTermArchiveTransfer(
            raw_data_package_id=rdp_id,
            origin_location_id=buf_id,
            destination_location_id=lta_id,
            status=m.Status.PENDING,
        )
        try:
            with session.begin_nested():
                session.add(row)
        except IntegrityError:
            continue  # another manager recorded it first
        created.append(row.id)
    session.commit()
    return created


# Built once (a manager cycle runs it every time); ``now`` is bound at execution.
_DUE_ARCHIVE_TRANSFERS = (
    select(m.LongTermArchiveTransfer.id, m.LongTermArchiveTransfer.origin_location_id)
    .where(
        m.LongTermArchiveTransfer.status == m.Status.PENDING,
        (m.LongTermArchiveTransfer.next_attempt_at.is_(None))
        | (m.LongTermArchiveTransfer.next_attempt_at <= bindparam("now")),
    )
    .order_by(m.LongTermArchiveTransfer.id)
)


def dispatch_archive_transfers(
    session: Session, submit: bool = True, location_ids: list[int] | None = None
) -> list[int]:
    """Claim due PENDING archive transfers (-> SCHEDULED), commit, submit their tasks on
    the LTA-site buffer's queue.  With ``location_ids`` only transfers into LTA
    locations among them.  Returns the claimed ids."""
    t = m.LongTermArchiveTransfer
    rows = session.execute(
        scope.restrict(_DUE_ARCHIVE_TRANSFERS, t.destination_location_id, location_ids),
        {"now": m.utcnow()},
    ).all()
    claimed: list[tuple[int, int]] = []
    for lta_id, origin_id in rows:
        if claim(session, t, lta_id, t.status == m.Status.PENDING, status=m.Status.SCHEDULED):
            claimed.append((lta_id, origin_id))
    return submit_claimed(
        session,
        claimed,
        archive_raw_data_package,
        OperationType.LONG_TERM_ARCHIVE_TRANSFER,
        submit,
    )


def run_once(session: Session, site: str | None = None) -> dict[str, int]:
    """One cycle of the archive manager: record new archive transfers and dispatch.

    ``site`` scopes the cycle to archive transfers into that site's LTA (default: the
    setting ``MANAGER_SITE``; see :mod:`ccat_data_transfer.core.scope`)."""
    ids = scope.location_ids(session, site)
    planned = plan_archive_transfers(session, ids)
    dispatched = dispatch_archive_transfers(session, location_ids=ids)
    return {"archive_planned": len(planned), "archive_dispatched": len(dispatched)}


def reset_stalled_archive_transfers(
    session: Session,
    older_than: timedelta | float | None = None,
    location_ids: list[int] | None = None,
) -> int:
    """Started (IN_PROGRESS) archive transfers whose heartbeat stopped (``older_than``:
    default HEARTBEAT_SECONDS x HEARTBEAT_MISSED_BEATS): one failed attempt each (back to
    PENDING with backoff, or FAILED); queued ones are never reset.  With ``location_ids`` only
    transfers into LTA locations among them.  For the recovery service."""
    reset = reset_stalled(session, (STALLED_ARCHIVE_TRANSFERS,), older_than, location_ids)
    session.commit()
    return reset


def build_metadata(rdp: m.RawDataPackage, location: m.DataLocation) -> dict[str, Any]:
    """The sidecar document: what a reader of the archive needs without the database."""
    eou = rdp.executed_obs_unit
    module = rdp.instrument_module
    return {
        "schema": "ccat_raw_data_package_metadata/1",
        "raw_data_package": {
            "id": rdp.id,
            "file_name": rdp.file_name,
            "relative_path": rdp.relative_path,
            "size": rdp.size,
            "checksum": rdp.checksum,
            "checksum_algorithm": rdp.checksum_algorithm,
            "part_number": rdp.part_number,
            "created_at": rdp.created_at.isoformat() if rdp.created_at else None,
        },
        "obs_unit": {"id": eou.obs_unit.id, "name": eou.obs_unit.name},
        "executed_obs_unit": {
            "id": eou.id,
            "name": eou.name,
            "start_time": eou.start_time.isoformat() if eou.start_time else None,
            "end_time": eou.end_time.isoformat() if eou.end_time else None,
            "metadata": eou.obs_metadata,
        },
        "instrument": module.instrument.name,
        "instrument_module": module.name,
        "files": [
            {
                "relative_path": f.relative_path,
                "size": f.size,
                "checksum": f.checksum,
                "checksum_algorithm": f.checksum_algorithm,
                "metadata": f.file_metadata,
            }
            for f in sorted(rdp.raw_data_files, key=lambda f: f.relative_path)
        ],
        "archive_location": location.name,
        "archived_at": m.utcnow().isoformat() + "Z",
    }


def execute_archive_transfer(archive_transfer_id: int) -> str:
    """Copy one RawDataPackage into the LTA, verify it, write its sidecar and record the
    archived copy.  Idempotent: only a SCHEDULED row is worked on."""
    db = DatabaseConnection()
    t = m.LongTermArchiveTransfer
    attempt = new_attempt()
    with db.session_scope() as s:
        if not start_scheduled(
            s,
            t,
            archive_transfer_id,
            start_time=m.utcnow(),
            worker=worker_name(),
            attempt_id=attempt,
        ):
            return "skipped"
        row = s.get(t, archive_transfer_id)
        rdp = row.raw_data_package
        origin, dest = row.origin_location, row.destination_location
        path, expected = rdp.relative_path, (rdp.checksum or "").lower()
        metadata = build_metadata(rdp, dest)
        rdp_id = rdp.id
    fields = {
        "archive_transfer_id": archive_transfer_id,
        "raw_data_package_id": rdp_id,
        "origin": origin.name,
        "location": dest.name,
    }
    meta_path = sidecar_path(path)
    failure = functools.partial(_record_failure, attempt=attempt)
    try:
        if not expected:
            raise PermanentError(f"raw data package {rdp_id} has no checksum to verify against")
        src_storage = storage_for_location(origin)
        dst_storage = storage_for_location(dest)
        method = get_transfer_method(method_for_storages(None, src_storage, dst_storage))
        temp = method.temp_name(dst_storage, path, attempt)
        log_path = transfer_log_dir() / f"long_term_archive_transfer_{archive_transfer_id}.log"

        def owned(step: str) -> Any:
            return owned_step(t, archive_transfer_id, attempt, step, db=db)

        with (
            open(log_path, "a", encoding="utf-8") as lf,
            heartbeat(archive_transfer_id, m.LongTermArchiveTransfer, attempt=attempt),
        ):
            with owned("adopt partial"):
                method.adopt(dst_storage, path, attempt, lf)
            stats = method.land(src_storage, path, dst_storage, path, lf, attempt=attempt)
            actual = dst_storage.sha256(temp)
            if actual != expected:
                with owned("discard"), contextlib.suppress(Exception):
                    dst_storage.delete(temp)
                log.warning(
                    "archive_checksum_mismatch",
                    **fields,
                    expected=expected,
                    actual=actual,
                    reason="LTA copy differs from RawDataPackage.checksum at its temporary "
                    "name; removed, will retry",
                )
                raise RuntimeError(
                    f"checksum mismatch in {dest.name}: expected {expected}, got {actual}"
                )
            with owned("sidecar, rename into place and record") as s:
                with dst_storage.open_write(meta_path) as f:
                    f.write(json.dumps(metadata, indent=2, sort_keys=True, default=str).encode())
                method.place(dst_storage, path, attempt, lf)
                _record_archived(
                    s, archive_transfer_id, rdp_id, dest.id, path, meta_path, stats, expected
                )
    except AttemptSuperseded:
        return "superseded"
    except (ConfigurationError, PermanentError) as exc:
        return failure(archive_transfer_id, str(exc), True, fields)
    except Exception as exc:
        return failure(archive_transfer_id, f"{type(exc).__name__}: {exc}", False, fields)
    log.info("raw_data_package_archived", **fields, size_bytes=stats.bytes)
    return "completed"


def _record_archived(
    s: Session,
    archive_transfer_id: int,
    rdp_id: int,
    location_id: int,
    path: str,
    meta_path: str,
    stats: Any,
    checksum: str,
) -> None:
    """The archive transfer COMPLETED, the verified PRESENT copy in the LTA and the
    package ARCHIVED (in the attempt's owned transaction)."""
    now = m.utcnow()
    row = s.get(m.LongTermArchiveTransfer, archive_transfer_id)
    mark_completed(row, stats, now)
    row.metadata_path = meta_path
    record_present_copy(
        s,
        m.RawDataPackagePhysicalCopy,
        "raw_data_package_id",
        rdp_id,
        location_id,
        path,
        size=stats.bytes,
        checksum=checksum,
        verified_at=now,
    )
    pkg = s.get(m.RawDataPackage, rdp_id)
    if pkg.state != m.PackageState.ARCHIVED:
        pkg.state = m.PackageState.ARCHIVED
        pkg.archived_at = now


archive_raw_data_package = row_task(
    "ccat_data_transfer.archive_manager.archive_raw_data_package",
    execute_archive_transfer,
    "Celery task: run :func:`execute_archive_transfer` on the LTA-site buffer's queue.",
)
