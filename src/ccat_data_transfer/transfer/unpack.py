"""Unpacking of one transferred DataTransferPackage at an LTA-site buffer.

The task takes the verified transfer (unpack SCHEDULED -> IN_PROGRESS), extracts the
DTP safely into a work folder beside the buffer, checks every RawDataPackage inside
against its recorded checksum and only then puts each tar in place at its
``relative_path`` (nothing is placed unless every package verifies), and records a
verified PRESENT copy of each RawDataPackage there.  Retryable without sending again.

Room in the house: tasks side; runs on the destination buffer's queue.  Imports
:mod:`~ccat_data_transfer.transfer.worker`, :mod:`~ccat_data_transfer.transfer.claims`,
core (storage, tar, database, logging) and ``ccat_ops_db``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.orm import Session

from ccat_data_transfer.core.attempts import AttemptSuperseded, new_attempt, owned_step
from ccat_data_transfer.core.database import DatabaseConnection
from ccat_data_transfer.core.errors import CcatError, ConfigurationError, PermanentError
from ccat_data_transfer.core.fileio import parent_beneath
from ccat_data_transfer.core.logs import get_logger
from ccat_data_transfer.core.storage import (
    DiskStorage,
    Storage,
    normalize_path,
    storage_for_location,
    work_dir_prefix,
)
from ccat_data_transfer.core.tarutil import CorruptTarError, UnsafeTarError, safe_extract
from ccat_data_transfer.transfer.claims import claim
from ccat_data_transfer.transfer.worker import (
    heartbeat,
    record_failed_attempt,
    record_present_copy,
)
from ccat_ops_db import models as m

log = get_logger("ccat_data_transfer.transfer_manager")

# (transfer_id, reason, permanent, fields) -> "failed" / "retry" / "skipped"
_record_failure = functools.partial(
    record_failed_attempt, m.DataTransfer, logger=log, event="unpack", prefix="unpack_"
)

__all__ = [
    "UnpackVerificationError",
    "execute_unpack",
]


class UnpackVerificationError(CcatError):
    """A RawDataPackage inside the DTP is missing or does not match its checksum."""


def _unpack_root(storage: Storage) -> Path | None:
    return storage.root if isinstance(storage, DiskStorage) else None


def _unpack_into(
    storage: Storage,
    dtp_path: str,
    packages: list[tuple[int, str, str | None]],
    owned: Callable[[], contextlib.AbstractContextManager[Session]],
    record: Callable[[Session, dict[int, tuple[int, str]]], None],
    transfer_id: int | None = None,
) -> dict[int, tuple[int, str]]:
    """Extract the DTP safely into a work folder of this attempt, verify each
    RawDataPackage, then -- inside ``owned()`` (the attempt still owns the row, and holds
    it) -- put each tar in place at its ``relative_path`` and ``record`` the result with
    that session.  Nothing is placed unless every package verifies.  The work folder is
    named after ``transfer_id`` (``.unpack.tmp-dt<id>-*``): the janitor keeps it while the
    unpack's heartbeat is fresh."""
    root = _unpack_root(storage)
    if root is not None:
        tag = f"dt{transfer_id}" if transfer_id is not None else "dt"
        work = Path(tempfile.mkdtemp(prefix=work_dir_prefix(tag), dir=root))
        local_tar = storage.local_path(dtp_path)
    else:
        work = Path(tempfile.mkdtemp(prefix="ccat-unpack-"))
        local_tar = work / "package.tar"
        storage.copy_out(dtp_path, local_tar)
    try:
        target = work / "x"
        members = {mem.arcname: mem for mem in safe_extract(local_tar, target)}
        results: dict[int, tuple[int, str]] = {}
        for rdp_id, rel, checksum in packages:
            name = normalize_path(rel)
            mem = members.get(name)
            if mem is None:
                raise UnpackVerificationError(f"raw data package {rel} is missing from the tar")
            if checksum is None or mem.sha256 != checksum.lower():
                raise UnpackVerificationError(
                    f"checksum mismatch for raw data package {rel}: expected {checksum}, "
                    f"got {mem.sha256}"
                )
            results[rdp_id] = (mem.size, mem.sha256)
        with owned() as session:
            for _rdp_id, rel, _ in packages:
                mem = members[normalize_path(rel)]
                if root is not None:
                    # Folders opened without following a symlink: nothing lands outside.
                    rel_norm = normalize_path(rel)
                    with parent_beneath(root, rel_norm, create=True) as (dir_fd, base):
                        os.replace(mem.path, base, dst_dir_fd=dir_fd)  # same fs: atomic
                else:
                    storage.copy_in(mem.path, rel)
            record(session, results)
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def execute_unpack(transfer_id: int) -> str:
    """Unpack a verified DTP at its destination buffer and record a PRESENT copy of each
    RawDataPackage there.  Retryable without sending again."""
    db = DatabaseConnection()
    attempt = new_attempt()
    with db.session_scope() as s:
        if not claim(
            s,
            m.DataTransfer,
            transfer_id,
            m.DataTransfer.status == m.Status.COMPLETED,
            m.DataTransfer.unpack_status == m.Status.SCHEDULED,
            unpack_status=m.Status.IN_PROGRESS,
            unpack_start_time=m.utcnow(),
            attempt_id=attempt,
        ):
            return "skipped"
        t = s.get(m.DataTransfer, transfer_id)
        dtp = t.data_transfer_package
        dest = t.destination_location
        dtp_path = dtp.relative_path
        packages = [(p.id, p.relative_path, p.checksum) for p in dtp.raw_data_packages]
        paths = {p.id: p.relative_path for p in dtp.raw_data_packages}
        fields = {
            "transfer_id": transfer_id,
            "data_transfer_package_id": dtp.id,
            "location": dest.name,
        }

    def record(s: Session, results: dict[int, tuple[int, str]]) -> None:
        now = m.utcnow()
        for rdp_id, (size, sha) in results.items():
            record_present_copy(
                s,
                m.RawDataPackagePhysicalCopy,
                "raw_data_package_id",
                rdp_id,
                dest.id,
                paths[rdp_id],
                size=size,
                checksum=sha,
                verified_at=now,
            )
        t = s.get(m.DataTransfer, transfer_id)
        t.unpack_status = m.Status.COMPLETED
        t.unpack_end_time = now
        t.unpack_failure_reason = None
        t.next_attempt_at = None

    def owned() -> contextlib.AbstractContextManager[Session]:
        return owned_step(
            m.DataTransfer, transfer_id, attempt, "place and record", status="unpack_status"
        )

    failure = functools.partial(_record_failure, attempt=attempt)
    try:
        if not packages:
            raise PermanentError("the data transfer package lists no raw data packages")
        with heartbeat(transfer_id, attempt=attempt):
            results = _unpack_into(
                storage_for_location(dest), dtp_path, packages, owned, record, transfer_id
            )
    except AttemptSuperseded:
        return "superseded"
    except (UnsafeTarError, PermanentError, ConfigurationError) as exc:
        return failure(transfer_id, f"{type(exc).__name__}: {exc}", True, fields)
    except (UnpackVerificationError, CorruptTarError) as exc:
        log.warning("unpack_checksum_mismatch", **fields, reason=str(exc))
        return failure(transfer_id, str(exc), False, fields)
    except Exception as exc:
        return failure(transfer_id, f"{type(exc).__name__}: {exc}", False, fields)
    log.info("transfer_unpacked", **fields, packages=len(results))
    return "completed"
