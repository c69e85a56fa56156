"""Execution of one transfer: the task that sends a DataTransferPackage from its origin
to one destination location and verifies the checksum of what landed.

Three phases: take the SCHEDULED row (a duplicate delivery does nothing), move the bytes
with the route's transfer method and check the destination's checksum (a mismatch
removes the corrupt copy and counts as a failed attempt), then record the transfer
COMPLETED and the DTP's verified PRESENT copy at the destination.

Room in the house: tasks side; runs on the origin location's queue.  Imports
:mod:`~ccat_data_transfer.transfer.worker`, core (storage, transfer methods, database,
logging, Celery app) and ``ccat_ops_db``.
"""

from __future__ import annotations

import contextlib
import functools

from ccat_data_transfer.database import DatabaseConnection
from ccat_data_transfer.exceptions import ConfigurationError, PermanentError
from ccat_data_transfer.logging_utils import get_logger
from ccat_data_transfer.stage_tasks import start_scheduled
from ccat_data_transfer.storage import storage_for_location
from ccat_data_transfer.transfer.worker import (
    heartbeat,
    record_failed_attempt,
    record_present_copy,
    remote_host,
    row_task,
    transfer_log_dir,
    worker_name,
)
from ccat_data_transfer.transfer_methods import get_transfer_method, method_for_storages
from ccat_ops_db import models as m

log = get_logger("ccat_data_transfer.transfer_manager")

# (transfer_id, reason, permanent, fields) -> "failed" / "retry" / "skipped"
_record_failure = functools.partial(
    record_failed_attempt, m.DataTransfer, logger=log, event="transfer", log_retry_count=True
)

__all__ = [
    "ChecksumMismatchError",
    "execute_transfer",
    "transfer_data_transfer_package",
]


class ChecksumMismatchError(Exception):
    """What landed does not match the expected checksum (retryable)."""


def execute_transfer(transfer_id: int) -> str:
    """Send one DTP to one destination and verify it there.  Returns the outcome
    ("completed", "retry", "failed", "skipped").  Idempotent: only a SCHEDULED row is
    worked on, so a duplicate delivery does nothing."""
    db = DatabaseConnection()
    now = m.utcnow()
    with db.session_scope() as s:
        if not start_scheduled(
            s, m.DataTransfer, transfer_id, start_time=now, worker=worker_name()
        ):
            return "skipped"
        t = s.get(m.DataTransfer, transfer_id)
        dtp = t.data_transfer_package
        origin, dest = t.origin_location, t.destination_location
        path, expected = dtp.relative_path, (dtp.checksum or "").lower()
        method_kind, attempt = t.transfer_method, t.retry_count + 1
        log_path = transfer_log_dir() / f"data_transfer_{transfer_id}.log"
        t.log_path = str(log_path)
        dtp_id = dtp.id
    fields = {
        "transfer_id": transfer_id,
        "data_transfer_package_id": dtp_id,
        "origin": origin.name,
        "location": dest.name,
    }
    try:
        src_storage = storage_for_location(origin)
        dst_storage = storage_for_location(dest)
        method = get_transfer_method(method_for_storages(method_kind, src_storage, dst_storage))
        with open(log_path, "a", encoding="utf-8") as lf, heartbeat(transfer_id):
            lf.write(
                f"# transfer {transfer_id} attempt {attempt}: {origin.name}:{path} -> "
                f"{dest.name}:{path} ({type(method).__name__}) at {m.utcnow().isoformat()}Z\n"
            )
            lf.flush()
            stats = method.transfer(
                src_storage,
                path,
                dst_storage,
                path,
                lf,
                src_host=remote_host(origin),
                dst_host=remote_host(dest),
            )
            actual = method.checksum(dst_storage, path, dst_host=remote_host(dest))
            if actual.lower() != expected:
                lf.write(f"# checksum mismatch: expected {expected}, got {actual}\n")
                with contextlib.suppress(Exception):
                    if remote_host(dest) is None:
                        dst_storage.delete(path)
                log.warning(
                    "transfer_checksum_mismatch",
                    **fields,
                    expected=expected,
                    actual=actual,
                    attempt=attempt,
                    reason="destination checksum differs from DataTransferPackage.checksum; "
                    "corrupt copy removed, will retry",
                )
                raise ChecksumMismatchError(
                    f"checksum mismatch at {dest.name}: expected {expected}, got {actual}"
                )
            lf.write(f"# verified sha256 {actual}\n")
    except (ConfigurationError, PermanentError) as exc:
        return _record_failure(transfer_id, str(exc), True, fields)
    except Exception as exc:
        reason = (
            str(exc) if isinstance(exc, ChecksumMismatchError) else f"{type(exc).__name__}: {exc}"
        )
        return _record_failure(transfer_id, reason, False, fields)

    with db.session_scope() as s:
        t = s.get(m.DataTransfer, transfer_id)
        if t.status != m.Status.IN_PROGRESS:
            return "skipped"  # reset by recovery meanwhile; the retry will redo it
        end = m.utcnow()
        t.status = m.Status.COMPLETED
        t.end_time = end
        t.bytes_transferred = stats.bytes
        t.duration_seconds = stats.seconds
        t.rate_mb_per_s = stats.rate_mb_per_s
        t.failure_reason = None
        t.next_attempt_at = None
        record_present_copy(
            s,
            m.DataTransferPackagePhysicalCopy,
            "data_transfer_package_id",
            dtp_id,
            dest.id,
            path,
            size=stats.bytes,
            checksum=expected,
            verified_at=end,
        )
    log.info(
        "transfer_completed",
        **fields,
        size_bytes=stats.bytes,
        duration_s=round(stats.seconds, 3),
        rate_mb_per_s=round(stats.rate_mb_per_s, 3),
    )
    return "completed"


transfer_data_transfer_package = row_task(
    "ccat_data_transfer.transfer_manager.transfer_data_transfer_package",
    execute_transfer,
    "Celery task: run :func:`execute_transfer` on the origin location's queue.",
)
