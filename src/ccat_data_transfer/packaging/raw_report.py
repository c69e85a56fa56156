"""Everything about one raw data package as plain data: its files, its copies, its data
transfer package with copies and transfers, its long-term-archive transfers (CLI
``package show``, ``GET /api/v1/packages/{id}``, the dashboard).

Room in the house: managers (reporting).  Reads the database only; imports
:mod:`ccat_ops_db` and the exceptions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_data_transfer.core.errors import NotFoundError
from ccat_ops_db import models as m

__all__ = ["describe_raw_data_package"]


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


# What a transfer row shows, and in which order (network transfers, archive transfers).
_TRANSFER_VALUES: dict[str, Callable[[Any], Any]] = {
    "id": lambda t: t.id,
    "origin": lambda t: t.origin_location.name,
    "destination": lambda t: t.destination_location.name,
    "is_primary": lambda t: t.is_primary,
    "status": lambda t: t.status.name,
    "unpack_status": lambda t: t.unpack_status.name,
    "bytes_transferred": lambda t: t.bytes_transferred,
    "rate_mb_per_s": lambda t: t.rate_mb_per_s,
    "start_time": lambda t: _iso(t.start_time),
    "end_time": lambda t: _iso(t.end_time),
    "failure_reason": lambda t: t.failure_reason,
}
_TRANSFER_FIELDS = tuple(_TRANSFER_VALUES)
_LTA_FIELDS = tuple(
    f for f in _TRANSFER_VALUES if f not in ("is_primary", "unpack_status", "rate_mb_per_s")
)


def _transfer_row(transfer: Any, fields: tuple[str, ...]) -> dict[str, Any]:
    return {name: _TRANSFER_VALUES[name](transfer) for name in fields}


def _rows(session: Session, model: Any, order: Any, **by: Any) -> Sequence[Any]:
    """The rows of ``model`` whose columns equal ``by``, in ``order``."""
    return session.scalars(select(model).filter_by(**by).order_by(order)).all()


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
    files = _rows(session, m.RawDataFile, m.RawDataFile.relative_path, raw_data_package_id=pkg.id)
    copies = _rows(
        session, m.RawDataPackagePhysicalCopy, m.PhysicalCopy.id, raw_data_package_id=pkg.id
    )
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
        dtp_copies = _rows(
            session,
            m.DataTransferPackagePhysicalCopy,
            m.PhysicalCopy.id,
            data_transfer_package_id=dtp.id,
        )
        transfers = _rows(
            session, m.DataTransfer, m.DataTransfer.id, data_transfer_package_id=dtp.id
        )
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
            "transfers": [_transfer_row(t, _TRANSFER_FIELDS) for t in transfers],
        }
    ltas = _rows(
        session, m.LongTermArchiveTransfer, m.LongTermArchiveTransfer.id, raw_data_package_id=pkg.id
    )
    out["long_term_archive_transfers"] = [_transfer_row(t, _LTA_FIELDS) for t in ltas]
    return out
