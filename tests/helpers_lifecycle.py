"""Builders for lifecycle tests: rows plus real files, without running upstream stages.

Every builder takes an open session (``with system.session() as s:``), adds rows, flushes
so ids exist, and writes the bytes the rows describe into the location's storage (so a
deletion test can check that a file is really gone or really still there).  Nothing here
commits: the ``session_scope`` of the caller does.

Typical use::

    with system.session() as s:
        pkg = make_package_at(system, s, {"ccat_telescope_buffer": PRESENT, "cologne_lta": PRESENT})
    run_deletion_cycle(system)
    assert not object_exists(system, "ccat_telescope_buffer", pkg.relative_path)

Builders:

* :func:`make_package_at` - a RawDataPackage with copies at the named locations (status
  per location), ``files`` raw files at the SOURCE location (copies PRESENT, or another
  status), and the package tar bytes at every location whose copy is not DELETED.
* :func:`make_dtp` - a DataTransferPackage holding packages, with copies at locations.
* :func:`make_transfer` - a DataTransfer of a DTP between two locations.
* :func:`make_staging_job` / :func:`make_processing_files` - staging job and the unpacked
  raw-file copies at a PROCESSING location.
* :func:`set_buffer_status` - publish a buffer status as the buffer manager would.
* :func:`object_exists`, :func:`copy_row`, :func:`log_rows` - assertions helpers.
* :func:`archived_at_both_ltas`, :func:`lta_package_copies` - the end of the lifecycle, for
  the real-process tests and the benchmarks (this module imports neither pytest nor
  conftest).
"""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ccat_data_transfer.core import buffer_status as bs
from ccat_data_transfer.core.storage import storage_for_location
from ccat_ops_db import models as m

PRESENT = m.PhysicalCopyStatus.PRESENT
_seq = itertools.count(1)


def location(session: Session, name: str) -> m.DataLocation:
    return session.scalars(select(m.DataLocation).filter_by(name=name)).one()


def write_object(session: Session, location_name: str, relative_path: str, data: bytes) -> None:
    """Write bytes at ``relative_path`` of a location (atomically, via its storage)."""
    with storage_for_location(location(session, location_name)).open_write(relative_path) as f:
        f.write(data)


def object_exists(system: Any, location_name: str, relative_path: str) -> bool:
    with system.session() as s:
        return storage_for_location(location(s, location_name)).exists(relative_path)


def _module(session: Session, instrument: str = "primecam") -> m.InstrumentModule:
    return session.scalars(
        select(m.InstrumentModule)
        .join(m.Instrument)
        .where(m.Instrument.name == instrument)
        .order_by(m.InstrumentModule.id)
    ).first()


def make_executed_obs_unit(session: Session) -> m.ExecutedObsUnit:
    n = next(_seq)
    tag = uuid.uuid4().hex[:8]
    obs = m.ObsUnit(name=f"obs_{tag}_{n}")
    session.add(obs)
    session.flush()
    eou = m.ExecutedObsUnit(
        name=f"exec_{tag}_{n}",
        obs_unit_id=obs.id,
        status=m.Status.COMPLETED,
        finished_at=m.utcnow(),
    )
    session.add(eou)
    session.flush()
    return eou


@dataclass
class PackageFixture:
    """What :func:`make_package_at` built (ids only: safe to use after the session closed)."""

    package_id: int
    file_name: str
    relative_path: str
    size: int
    copy_ids: dict[str, int] = field(default_factory=dict)  # location name -> copy id
    file_ids: list[uuid.UUID] = field(default_factory=list)
    file_paths: list[str] = field(default_factory=list)
    file_copy_ids: list[int] = field(default_factory=list)  # copies at the SOURCE location
    file_size: int = 0
    source: str = "primecam_raw_data"


def make_package_at(
    system: Any,
    session: Session,
    locations: dict[str, m.PhysicalCopyStatus] | list[str] | tuple[str, ...] = (
        "ccat_telescope_buffer",
    ),
    state: m.PackageState = m.PackageState.ARCHIVED,
    files: int = 2,
    file_size: int = 100,
    file_status: m.PhysicalCopyStatus = PRESENT,
    deletion_possible_at: datetime | None = None,
    source: str = "primecam_raw_data",
    package_size: int = 1000,
    lost: tuple[str, ...] = (),
    read_back: bool = True,
) -> PackageFixture:
    """A RawDataPackage with a copy at each location (``{name: status}`` or a list of names
    for PRESENT), ``files`` raw files at ``source`` (their copies in ``file_status``), and
    real bytes for every copy that is not DELETED.  ``lost`` names locations whose copy is
    marked lost (``lost_at`` set, no bytes written).  Every copy was verified at its site
    just now; with ``read_back`` (the default) the archive copies were also read back in
    full once since they were written (their first fixity read: ``fixity_checked_at``
    after ``created_at``), which the last copies outside the archives need before they
    go."""
    if not isinstance(locations, dict):
        locations = dict.fromkeys(locations, PRESENT)
    eou = make_executed_obs_unit(session)
    module = _module(session)
    n = next(_seq)
    file_name = f"pkg_{uuid.uuid4().hex[:10]}_{n}.tar"
    rel = f"raw_data_packages/primecam/{module.name}/{file_name}"
    src = location(session, source)
    package = m.RawDataPackage(
        file_name=file_name,
        relative_path=rel,
        size=package_size,
        checksum="0" * 64,
        state=state,
        status=m.Status.COMPLETED,
        executed_obs_unit_id=eou.id,
        instrument_module_id=module.id,
        source_location_id=src.id,
        archived_at=m.utcnow() if state == m.PackageState.ARCHIVED else None,
    )
    session.add(package)
    session.flush()
    fx = PackageFixture(
        package.id, file_name, rel, package_size, file_size=file_size, source=source
    )
    for i in range(files):
        frel = f"{eou.name}/{module.name}/file_{i}.fits"
        rdf = m.RawDataFile(
            relative_path=frel,
            size=file_size,
            checksum="0" * 64,
            instrument_module_id=module.id,
            executed_obs_unit_id=eou.id,
            source_location_id=src.id,
            raw_data_package_id=package.id,
        )
        session.add(rdf)
        session.flush()
        fc = m.RawDataFilePhysicalCopy(
            raw_data_file_id=rdf.id,
            data_location_id=src.id,
            status=file_status,
            relative_path=frel,
            size=file_size,
            deletion_possible_at=deletion_possible_at,
        )
        session.add(fc)
        session.flush()
        if file_status != m.PhysicalCopyStatus.DELETED:
            write_object(session, source, frel, b"f" * file_size)
        fx.file_ids.append(rdf.id)
        fx.file_paths.append(frel)
        fx.file_copy_ids.append(fc.id)
    for name, status in locations.items():
        loc = location(session, name)
        now = m.utcnow()
        checked = read_back and loc.location_type == m.LocationType.LONG_TERM_ARCHIVE
        copy = m.RawDataPackagePhysicalCopy(
            raw_data_package_id=package.id,
            data_location_id=loc.id,
            status=status,
            relative_path=rel,
            size=package_size,
            checksum="0" * 64,
            created_at=now - timedelta(seconds=1),
            fixity_checked_at=now if checked else None,
            verified_at=now,
            lost_at=m.utcnow() if name in lost else None,
            deleted_at=m.utcnow() if status == m.PhysicalCopyStatus.DELETED else None,
        )
        session.add(copy)
        session.flush()
        if status != m.PhysicalCopyStatus.DELETED and name not in lost:
            write_object(session, name, rel, b"p" * package_size)
        fx.copy_ids[name] = copy.id
    return fx


@dataclass
class DtpFixture:
    dtp_id: int
    file_name: str
    relative_path: str
    copy_ids: dict[str, int] = field(default_factory=dict)


def make_dtp(
    system: Any,
    session: Session,
    package_ids: list[int] | None = None,
    locations: dict[str, m.PhysicalCopyStatus] | list[str] | tuple[str, ...] = (
        "ccat_telescope_buffer",
    ),
    size: int = 2000,
    origin: str = "ccat_telescope_buffer",
) -> DtpFixture:
    """A DataTransferPackage (holding ``package_ids``) with copies and bytes at locations."""
    if not isinstance(locations, dict):
        locations = dict.fromkeys(locations, PRESENT)
    file_name = f"dtp_{uuid.uuid4().hex[:10]}_{next(_seq)}.tar"
    rel = f"data_transfer_packages/{file_name}"
    dtp = m.DataTransferPackage(
        file_name=file_name,
        relative_path=rel,
        size=size,
        checksum="0" * 64,
        status=m.Status.COMPLETED,
        origin_location_id=location(session, origin).id,
    )
    session.add(dtp)
    session.flush()
    for pid in package_ids or []:
        session.get(m.RawDataPackage, pid).data_transfer_package_id = dtp.id
    fx = DtpFixture(dtp.id, file_name, rel)
    for name, status in locations.items():
        copy = m.DataTransferPackagePhysicalCopy(
            data_transfer_package_id=dtp.id,
            data_location_id=location(session, name).id,
            status=status,
            relative_path=rel,
            size=size,
        )
        session.add(copy)
        session.flush()
        if status != m.PhysicalCopyStatus.DELETED:
            write_object(session, name, rel, b"d" * size)
        fx.copy_ids[name] = copy.id
    session.flush()
    return fx


def make_transfer(
    session: Session,
    dtp_id: int,
    origin: str,
    destination: str,
    status: m.Status = m.Status.COMPLETED,
    unpack_status: m.Status = m.Status.COMPLETED,
    is_primary: bool = True,
) -> int:
    """A DataTransfer row of a DTP from ``origin`` to ``destination``; returns its id."""
    t = m.DataTransfer(
        data_transfer_package_id=dtp_id,
        origin_location_id=location(session, origin).id,
        destination_location_id=location(session, destination).id,
        status=status,
        unpack_status=unpack_status,
        is_primary=is_primary,
    )
    session.add(t)
    session.flush()
    return t.id


def make_staging_job(
    session: Session,
    package_ids: list[int],
    destination: str = "processing_scratch",
    active: bool = True,
) -> int:
    job = m.StagingJob(
        name=f"job_{next(_seq)}",
        destination_location_id=location(session, destination).id,
        active=active,
        status=m.Status.COMPLETED,
    )
    job.raw_data_packages = [session.get(m.RawDataPackage, pid) for pid in package_ids]
    session.add(job)
    session.flush()
    return job.id


def make_processing_files(
    session: Session,
    pkg: PackageFixture,
    destination: str = "processing_scratch",
    status: m.PhysicalCopyStatus = PRESENT,
    package_copy_status: m.PhysicalCopyStatus | None = m.PhysicalCopyStatus.STAGED,
) -> list[int]:
    """The package's raw files unpacked at a PROCESSING location (copies + bytes), and the
    package copy there (STAGED by default; None for no package copy).  Returns file copy ids."""
    loc = location(session, destination)
    ids = []
    for fid, frel in zip(pkg.file_ids, pkg.file_paths, strict=True):
        c = m.RawDataFilePhysicalCopy(
            raw_data_file_id=fid,
            data_location_id=loc.id,
            status=status,
            relative_path=frel,
            size=pkg.file_size,
        )
        session.add(c)
        session.flush()
        write_object(session, destination, frel, b"s" * pkg.file_size)
        ids.append(c.id)
    if package_copy_status is not None:
        pc = m.RawDataPackagePhysicalCopy(
            raw_data_package_id=pkg.package_id,
            data_location_id=loc.id,
            status=package_copy_status,
            relative_path=pkg.relative_path,
            size=pkg.size,
        )
        session.add(pc)
        session.flush()
        pkg.copy_ids[destination] = pc.id
    return ids


def set_buffer_status(
    session: Session,
    location_name: str,
    used_bytes: int,
    total_bytes: int,
    state: str | None = None,
) -> dict[str, Any]:
    """Publish a status for a location as the buffer manager would."""
    loc = location(session, location_name)
    percent = 100.0 * used_bytes / total_bytes
    state = state or bs.classify(percent, bs.thresholds_for(loc)).value
    status = {
        "location": location_name,
        "used_bytes": used_bytes,
        "total_bytes": total_bytes,
        "disk_usage_percent": percent,
        "state": state,
        "measured_at": m.utcnow().isoformat(),
    }
    bs.publish_status(status, session)
    return status


def copy_row(system: Any, copy_id: int) -> m.PhysicalCopy:
    """A fresh read of one physical copy."""
    with system.session() as s:
        return s.get(m.PhysicalCopy, copy_id)


def log_rows(system: Any, copy_id: int) -> list[tuple[str, str]]:
    """(outcome name, reason) of every deletion_log row about a copy, oldest first: its own
    rows and the batch rows that list it."""
    from ccat_data_transfer.deletion_manager import deletion_history

    with system.session() as s:
        return [(r.outcome.name, r.reason) for r in deletion_history(s, copy_id)]


def run_deletion_cycle(system: Any) -> dict[str, Any]:
    from ccat_data_transfer import deletion_manager

    with system.session() as s:
        return deletion_manager.run_once(s)


def scheduled_batch_rows(session: Session) -> list[m.DeletionLog]:
    """The batch rows the deletion cycle wrote (outcome SCHEDULED, no single copy; the
    batch's copy ids in ``copy_ids``), in the order they were written."""
    return list(
        session.scalars(
            select(m.DeletionLog)
            .where(
                m.DeletionLog.outcome == m.DeletionOutcome.SCHEDULED,
                m.DeletionLog.physical_copy_id.is_(None),
            )
            .order_by(m.DeletionLog.id)
        )
    )


def lta_package_copies(session: Session) -> list[Any]:
    """Every PRESENT package copy at an LTA, in copy order: (package id, package checksum,
    relative path, location name, location path, copy id), for tests that read the
    archived bytes back."""
    return session.execute(
        select(
            m.RawDataPackage.id,
            m.RawDataPackage.checksum,
            m.PhysicalCopy.relative_path,
            m.DataLocation.name,
            m.DataLocation.path,
            m.PhysicalCopy.id,
        )
        .join(m.PhysicalCopy, m.PhysicalCopy.raw_data_package_id == m.RawDataPackage.id)
        .join(m.DataLocation, m.DataLocation.id == m.PhysicalCopy.data_location_id)
        .where(
            m.DataLocation.location_type == m.LocationType.LONG_TERM_ARCHIVE,
            m.PhysicalCopy.status == m.PhysicalCopyStatus.PRESENT,
        )
        .order_by(m.PhysicalCopy.id)
    ).all()


def archived_at_both_ltas(session: Session, packages: int) -> bool:
    """``packages`` packages ARCHIVED, with a PRESENT copy of each at both LTAs."""
    archived = session.scalar(
        select(func.count(m.RawDataPackage.id)).where(
            m.RawDataPackage.state == m.PackageState.ARCHIVED
        )
    )
    lta_copies = session.scalar(
        select(func.count(m.PhysicalCopy.id))
        .join(m.DataLocation, m.DataLocation.id == m.PhysicalCopy.data_location_id)
        .where(
            m.PhysicalCopy.type == "raw_data_package",
            m.PhysicalCopy.status == m.PhysicalCopyStatus.PRESENT,
            m.DataLocation.location_type == m.LocationType.LONG_TERM_ARCHIVE,
        )
    )
    return archived == packages and lta_copies == 2 * packages
