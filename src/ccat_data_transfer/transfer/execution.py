"""Execution of one transfer: the task that sends a DataTransferPackage from its origin
to one destination location and verifies the checksum of what landed.

Three phases: take the SCHEDULED row (a duplicate delivery does nothing), move the bytes
with the route's transfer method and check the destination's checksum (a mismatch
removes the corrupt copy and counts as a failed attempt), then record the transfer
COMPLETED and the DTP's verified PRESENT copy at the destination.

Room in the house: tasks side; runs on the origin location's queue.  Imports
:mod:`~ccat_data_transfer.transfer.worker`, core (storage, transfer methods, database,
logging) and ``ccat_ops_db``.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ccat_data_transfer.core.database import DatabaseConnection
from ccat_data_transfer.core.errors import CcatError, ConfigurationError, PermanentError
from ccat_data_transfer.core.hosts import SiteReach, reach_of
from ccat_data_transfer.core.logs import get_logger
from ccat_data_transfer.core.row_tasks import start_scheduled
from ccat_data_transfer.core.storage import storage_for_location
from ccat_data_transfer.core.transfer_methods import (
    TransferStats,
    get_transfer_method,
    method_for_storages,
)
from ccat_data_transfer.transfer.worker import (
    heartbeat,
    mark_completed,
    record_failed_attempt,
    record_present_copy,
    transfer_log_dir,
    worker_name,
)
from ccat_ops_db import models as m

log = get_logger("ccat_data_transfer.transfer_manager")

# (transfer_id, reason, permanent, fields) -> "failed" / "retry" / "skipped"
_record_failure = functools.partial(
    record_failed_attempt, m.DataTransfer, logger=log, event="transfer", log_retry_count=True
)

__all__ = [
    "ChecksumMismatchError",
    "execute_transfer",
]


class ChecksumMismatchError(CcatError):
    """What landed does not match the expected checksum (retryable)."""


@dataclass(frozen=True)
class _Transfer:
    """What the storage phase and the log records need, read when the row is taken."""

    id: int
    dtp_id: int
    origin: m.DataLocation
    dest: m.DataLocation
    path: str
    expected: str
    method_kind: m.TransferMethod | None
    attempt: int
    log_path: Path
    # How this worker (the origin site's: it pushes) reaches the destination; None when
    # the destination shares this worker's filesystem.
    dst_reach: SiteReach | None = None

    @property
    def fields(self) -> dict[str, Any]:
        return {
            "transfer_id": self.id,
            "data_transfer_package_id": self.dtp_id,
            "origin": self.origin.name,
            "location": self.dest.name,
        }


def execute_transfer(transfer_id: int) -> str:
    """Send one DTP to one destination and verify it there.  Returns the outcome
    ("completed", "retry", "failed", "skipped").  Idempotent: only a SCHEDULED row is
    worked on, so a duplicate delivery does nothing."""
    job = _take(transfer_id)
    if job is None:
        return "skipped"
    try:
        stats = _send_and_verify(job)
    except (ConfigurationError, PermanentError) as exc:
        return _record_failure(transfer_id, str(exc), True, job.fields)
    except Exception as exc:
        reason = (
            str(exc) if isinstance(exc, ChecksumMismatchError) else f"{type(exc).__name__}: {exc}"
        )
        return _record_failure(transfer_id, reason, False, job.fields)
    return _record_completed(job, stats)


def _take(transfer_id: int) -> _Transfer | None:
    """DB phase: SCHEDULED -> IN_PROGRESS (None when another worker or recovery has the
    row), and what the transfer needs."""
    now = m.utcnow()
    with DatabaseConnection().session_scope() as s:
        if not start_scheduled(
            s, m.DataTransfer, transfer_id, start_time=now, worker=worker_name()
        ):
            return None
        t = s.get(m.DataTransfer, transfer_id)
        dtp = t.data_transfer_package
        log_path = transfer_log_dir() / f"data_transfer_{transfer_id}.log"
        t.log_path = str(log_path)
        return _Transfer(
            id=transfer_id,
            dtp_id=dtp.id,
            origin=t.origin_location,
            dest=t.destination_location,
            path=dtp.relative_path,
            expected=(dtp.checksum or "").lower(),
            method_kind=t.transfer_method,
            attempt=t.retry_count + 1,
            log_path=log_path,
            dst_reach=reach_of(t.destination_location, t.origin_location.site_id),
        )


def _send_and_verify(job: _Transfer) -> TransferStats:
    """Storage phase: this worker (the origin site's) pushes the bytes with the route's
    method, then the checksum is computed where they landed (on the destination host
    when it is another machine); a mismatch removes the copy there and raises
    :class:`ChecksumMismatchError`.  The command log goes to ``job.log_path``."""
    origin, dest, path, expected = job.origin, job.dest, job.path, job.expected
    src_storage = storage_for_location(origin)
    dst_storage = storage_for_location(dest)
    method = get_transfer_method(method_for_storages(job.method_kind, src_storage, dst_storage))
    with open(job.log_path, "a", encoding="utf-8") as lf, heartbeat(job.id):
        where = f" on {job.dst_reach.label}" if job.dst_reach else ""
        lf.write(
            f"# transfer {job.id} attempt {job.attempt}: {origin.name}:{path} -> "
            f"{dest.name}:{path}{where} ({type(method).__name__}) at {m.utcnow().isoformat()}Z\n"
        )
        lf.flush()
        stats = method.transfer(src_storage, path, dst_storage, path, lf, dst_host=job.dst_reach)
        actual = method.checksum(
            dst_storage, path, dst_host=job.dst_reach, size=stats.bytes or None
        )
        if actual.lower() != expected:
            lf.write(f"# checksum mismatch: expected {expected}, got {actual}\n")
            with contextlib.suppress(Exception):
                method.discard(dst_storage, path, dst_host=job.dst_reach)
            log.warning(
                "transfer_checksum_mismatch",
                **job.fields,
                expected=expected,
                actual=actual,
                attempt=job.attempt,
                reason="destination checksum differs from DataTransferPackage.checksum; "
                "corrupt copy removed, will retry",
            )
            raise ChecksumMismatchError(
                f"checksum mismatch at {dest.name}: expected {expected}, got {actual}"
            )
        lf.write(f"# verified sha256 {actual}\n")
    return stats


def _record_completed(job: _Transfer, stats: TransferStats) -> str:
    """DB phase: the transfer COMPLETED and the DTP's verified PRESENT copy at the
    destination, unless recovery reset the row meanwhile (then its retry redoes it)."""
    with DatabaseConnection().session_scope() as s:
        t = s.get(m.DataTransfer, job.id)
        if t.status != m.Status.IN_PROGRESS:
            return "skipped"
        end = m.utcnow()
        mark_completed(t, stats, end)
        t.rate_mb_per_s = stats.rate_mb_per_s
        record_present_copy(
            s,
            m.DataTransferPackagePhysicalCopy,
            "data_transfer_package_id",
            job.dtp_id,
            job.dest.id,
            job.path,
            size=stats.bytes,
            checksum=job.expected,
            verified_at=end,
        )
    log.info(
        "transfer_completed",
        **job.fields,
        size_bytes=stats.bytes,
        duration_s=round(stats.seconds, 3),
        rate_mb_per_s=round(stats.rate_mb_per_s, 3),
    )
    return "completed"
