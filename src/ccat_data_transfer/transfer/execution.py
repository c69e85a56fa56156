"""Execution of one transfer: the task that sends a DataTransferPackage from its origin
to one destination location and verifies the checksum of what landed.

Three phases: take the SCHEDULED row with a fresh attempt token (a duplicate delivery
does nothing), move the bytes with the route's transfer method to the attempt's
temporary name and check the checksum there (a mismatch removes those bytes and counts
as a failed attempt), then rename the verified bytes into place and record the transfer
COMPLETED and the DTP's verified PRESENT copy at the destination, in one transaction
that checks the attempt still owns the row.  Every irreversible step (adopting an
earlier partial, discarding, renaming into place, recording) runs in
:func:`~ccat_data_transfer.core.attempts.owned_step`: an attempt whose row was reset by
recovery and taken by another stops without touching anything.

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

from ccat_data_transfer.core.attempts import AttemptSuperseded, new_attempt, owned_step
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
    # This attempt's token (the row's attempt_id while it owns the row).
    attempt_id: str = ""

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
        return _send_verify_and_record(job)
    except AttemptSuperseded:
        return "superseded"
    except (ConfigurationError, PermanentError) as exc:
        return _record_failure(transfer_id, str(exc), True, job.fields, attempt=job.attempt_id)
    except Exception as exc:
        reason = (
            str(exc) if isinstance(exc, ChecksumMismatchError) else f"{type(exc).__name__}: {exc}"
        )
        return _record_failure(transfer_id, reason, False, job.fields, attempt=job.attempt_id)


def _take(transfer_id: int) -> _Transfer | None:
    """DB phase: SCHEDULED -> IN_PROGRESS (None when another worker or recovery has the
    row), and what the transfer needs."""
    now = m.utcnow()
    attempt = new_attempt()
    with DatabaseConnection().session_scope() as s:
        if not start_scheduled(
            s, m.DataTransfer, transfer_id, start_time=now, worker=worker_name(), attempt_id=attempt
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
            attempt_id=attempt,
        )


def _owned(job: _Transfer, step: str) -> Any:
    return owned_step(m.DataTransfer, job.id, job.attempt_id, step)


def _send_verify_and_record(job: _Transfer) -> str:
    """Storage phase, then the owned rename and record: this worker (the origin site's)
    adopts an earlier partial (owned), pushes the bytes with the route's method to the
    attempt's temporary name, computes the checksum there (on the destination host when
    it is another machine); a mismatch discards those bytes (owned) and raises
    :class:`ChecksumMismatchError`.  Verified bytes are renamed into place and recorded
    in one owned transaction.  The command log goes to ``job.log_path``."""
    origin, dest, path, expected = job.origin, job.dest, job.path, job.expected
    src_storage = storage_for_location(origin)
    dst_storage = storage_for_location(dest)
    method = get_transfer_method(method_for_storages(job.method_kind, src_storage, dst_storage))
    reach = job.dst_reach
    temp = method.temp_name(dst_storage, path, job.attempt_id)
    with (
        open(job.log_path, "a", encoding="utf-8") as lf,
        heartbeat(job.id, attempt=job.attempt_id),
    ):
        where = f" on {reach.label}" if reach else ""
        lf.write(
            f"# transfer {job.id} attempt {job.attempt} ({job.attempt_id}): "
            f"{origin.name}:{path} -> {dest.name}:{temp}{where} ({type(method).__name__}) "
            f"at {m.utcnow().isoformat()}Z\n"
        )
        lf.flush()
        with _owned(job, "adopt partial"):
            method.adopt(dst_storage, path, job.attempt_id, lf, dst_host=reach)
        stats = method.land(
            src_storage, path, dst_storage, path, lf, attempt=job.attempt_id, dst_host=reach
        )
        actual = method.checksum(dst_storage, temp, dst_host=reach, size=stats.bytes or None)
        if actual.lower() != expected:
            lf.write(f"# checksum mismatch: expected {expected}, got {actual}\n")
            with _owned(job, "discard"), contextlib.suppress(Exception):
                method.discard(dst_storage, temp, dst_host=reach)
            log.warning(
                "transfer_checksum_mismatch",
                **job.fields,
                expected=expected,
                actual=actual,
                attempt=job.attempt,
                reason="checksum at the temporary name differs from "
                "DataTransferPackage.checksum; those bytes removed, will retry",
            )
            raise ChecksumMismatchError(
                f"checksum mismatch at {dest.name}: expected {expected}, got {actual}"
            )
        lf.write(f"# verified sha256 {actual} at {temp}\n")
        lf.flush()
        with _owned(job, "rename into place and record") as s:
            method.place(dst_storage, path, job.attempt_id, lf, dst_host=reach)
            lf.write(f"# renamed into place: {path}\n")
            _record_completed(s, job, stats)
    log.info(
        "transfer_completed",
        **job.fields,
        size_bytes=stats.bytes,
        duration_s=round(stats.seconds, 3),
        rate_mb_per_s=round(stats.rate_mb_per_s, 3),
    )
    return "completed"


def _record_completed(s: Any, job: _Transfer, stats: TransferStats) -> None:
    """DB phase (in the owned transaction): the transfer COMPLETED and the DTP's verified
    PRESENT copy at the destination."""
    t = s.get(m.DataTransfer, job.id)
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
