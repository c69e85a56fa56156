"""The archive task's body: copy one RawDataPackage from its LTA-site buffer into the
site's long-term archive, verify what landed, write the metadata sidecar, record the
archived copy.

Room in the house: stage archive (the body of ``archive_raw_data_package``, whose Celery
task is :mod:`ccat_data_transfer.archive.tasks`).  Imports core, what the transfer and
archive tasks share (:mod:`ccat_data_transfer.transfer.worker`) and ``ccat_ops_db``.
"""

from __future__ import annotations

import contextlib
import functools
import json
from typing import Any

from sqlalchemy.orm import Session

from ccat_data_transfer.core.attempts import AttemptSuperseded, new_attempt, owned_step
from ccat_data_transfer.core.database import DatabaseConnection
from ccat_data_transfer.core.errors import ConfigurationError, PermanentError
from ccat_data_transfer.core.logs import get_logger
from ccat_data_transfer.core.row_tasks import start_scheduled
from ccat_data_transfer.core.storage import storage_for_location
from ccat_data_transfer.core.transfer_methods import get_transfer_method, method_for_storages
from ccat_data_transfer.transfer.worker import (
    heartbeat,
    mark_completed,
    record_failed_attempt,
    record_present_copy,
    transfer_log_dir,
    worker_name,
)
from ccat_ops_db import models as m

# The archive stage's log records keep the logger name they had.
log = get_logger("ccat_data_transfer.archive.cycle")

# (archive_transfer_id, reason, permanent, fields) -> "failed" / "retry" / "skipped"
_record_failure = functools.partial(
    record_failed_attempt, m.LongTermArchiveTransfer, logger=log, event="archive_transfer"
)

__all__ = ["build_metadata", "execute_archive_transfer", "sidecar_path"]


def sidecar_path(relative_path: str) -> str:
    """Where the metadata sidecar of a package lies in the LTA."""
    return f"{relative_path}.json"


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
    copy = record_present_copy(
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
    # Bytes just (re)written: no read back since (the first fixity read gives it,
    # before the last copies outside the archives may go; see archive.proof).
    copy.fixity_checked_at = None
    pkg = s.get(m.RawDataPackage, rdp_id)
    if pkg.state != m.PackageState.ARCHIVED:
        pkg.state = m.PackageState.ARCHIVED
        pkg.archived_at = now
