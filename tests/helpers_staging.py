"""Build archived packages for staging tests: real files, a real tar, real LTA copies.

``make_archived_package`` writes n files at the instrument's SOURCE location, records them
as RawDataFiles of a fresh ExecutedObsUnit, packs them with
``tarutil.write_tar_with_checksums`` (members named by ``RawDataFile.relative_path``),
stores the tar at ``RawDataPackage.relative_path`` in every given LTA location and records
a PRESENT RawDataPackagePhysicalCopy there; the package is ARCHIVED with the right size
and checksum.  Nothing is mocked.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_data_transfer.core.storage import storage_for_location
from ccat_data_transfer.core.tarutil import TarMember, write_tar_with_checksums
from ccat_ops_db import models as m


def _module(session: Session, instrument: str, module: str | None) -> m.InstrumentModule:
    stmt = (
        select(m.InstrumentModule)
        .join(m.Instrument)
        .where(m.Instrument.name == instrument)
        .order_by(m.InstrumentModule.id)
    )
    if module is not None:
        stmt = stmt.where(m.InstrumentModule.name == module)
    return session.scalars(stmt).first()


def make_archived_package(
    system: Any,
    session: Session,
    lta_locations: tuple[str, ...] = ("cologne_lta", "us_lta"),
    n_files: int = 3,
    *,
    instrument: str = "primecam",
    module: str | None = None,
    obs_start: datetime | None = None,
    obs_minutes: int = 10,
    file_size: int = 1500,
) -> m.RawDataPackage:
    """An ARCHIVED RawDataPackage with a PRESENT copy at each of ``lta_locations``."""
    tag = uuid.uuid4().hex[:8]
    mod = _module(session, instrument, module)
    source = session.scalars(
        select(m.DataLocation).where(
            m.DataLocation.location_type == m.LocationType.SOURCE,
            m.DataLocation.instrument_id == mod.instrument_id,
        )
    ).first()
    obs_unit = m.ObsUnit(name=f"obs-{tag}")
    start = obs_start or datetime(2024, 5, 1, 12, 0, 0)
    eou = m.ExecutedObsUnit(
        name=f"eou-{tag}",
        obs_unit=obs_unit,
        start_time=start,
        end_time=start + timedelta(minutes=obs_minutes),
        finished_at=start + timedelta(minutes=obs_minutes),
        status=m.Status.COMPLETED,
    )
    session.add_all([obs_unit, eou])
    session.flush()

    src_storage = storage_for_location(source)
    files: list[m.RawDataFile] = []
    members: list[TarMember] = []
    for i in range(n_files):
        rel = f"{instrument}/{mod.name}/{eou.name}/scan_{i:03d}.fits"
        data = os.urandom(file_size + i)
        with src_storage.open_write(rel) as f:
            f.write(data)
        files.append(
            m.RawDataFile(
                relative_path=rel,
                size=len(data),
                checksum=hashlib.sha256(data).hexdigest(),
                instrument_module=mod,
                executed_obs_unit=eou,
                source_location=source,
            )
        )
        members.append(
            TarMember(rel, src_storage.local_path(rel), len(data), hashlib.sha256(data).hexdigest())
        )

    file_name = f"{eou.name}_{instrument}_{mod.name}_part1.tar"
    relative_path = f"raw_data_packages/{instrument}/{mod.name}/{file_name}"
    with tempfile.TemporaryDirectory() as tmp:
        tar_local = Path(tmp) / file_name
        with open(tar_local, "wb") as out:
            result = write_tar_with_checksums(members, out)
        assert result.ok, result.mismatches
        package = m.RawDataPackage(
            file_name=file_name,
            relative_path=relative_path,
            size=result.size,
            checksum=result.sha256,
            state=m.PackageState.ARCHIVED,
            status=m.Status.COMPLETED,
            executed_obs_unit=eou,
            instrument_module=mod,
            source_location=source,
            archived_at=m.utcnow(),
        )
        session.add(package)
        session.flush()
        for f in files:
            f.raw_data_package_id = package.id
        session.add_all(files)
        for name in lta_locations:
            loc = system.location(session, name)
            storage_for_location(loc).copy_in(tar_local, relative_path)
            session.add(
                m.RawDataPackagePhysicalCopy(
                    raw_data_package_id=package.id,
                    data_location_id=loc.id,
                    status=m.PhysicalCopyStatus.PRESENT,
                    relative_path=relative_path,
                    size=result.size,
                    checksum=result.sha256,
                    verified_at=m.utcnow(),
                )
            )
    session.flush()
    return package


def corrupt_lta_copy(
    system: Any, session: Session, package: m.RawDataPackage, location: str
) -> Path:
    """Flip bytes in the middle of the package's tar at ``location`` (same size)."""
    path = storage_for_location(system.location(session, location)).local_path(
        package.relative_path
    )
    data = bytearray(path.read_bytes())
    mid = len(data) // 3
    data[mid : mid + 16] = bytes(b ^ 0xFF for b in data[mid : mid + 16])
    path.write_bytes(bytes(data))
    return path


def add_processing_location(
    system: Any, session: Session, name: str = "processing_second"
) -> m.DataLocation:
    """A second PROCESSING location (another site) added to the loaded topology."""
    site = m.Site(name=f"{name}_site", short_name=f"{name[:20]}s", description="second cluster")
    path = system.data_dir / "processing2" / name
    path.mkdir(parents=True, exist_ok=True)
    loc = m.DiskDataLocation(
        name=name,
        site=site,
        location_type=m.LocationType.PROCESSING,
        storage_type=m.StorageType.DISK,
        path=str(path),
        priority=0,
        active=True,
        retention_period_minutes=43200,
    )
    session.add_all([site, loc])
    session.flush()
    return loc


def file_copies(session: Session, package_id: int, location: str, statuses=None) -> list[Any]:
    """RawDataFilePhysicalCopy rows of a package's files at a location."""
    stmt = (
        select(m.RawDataFilePhysicalCopy)
        .join(m.RawDataFile, m.RawDataFile.id == m.RawDataFilePhysicalCopy.raw_data_file_id)
        .join(m.DataLocation, m.DataLocation.id == m.RawDataFilePhysicalCopy.data_location_id)
        .where(m.RawDataFile.raw_data_package_id == package_id, m.DataLocation.name == location)
        .order_by(m.RawDataFilePhysicalCopy.id)
    )
    if statuses is not None:
        stmt = stmt.where(m.RawDataFilePhysicalCopy.status.in_(list(statuses)))
    return list(session.scalars(stmt).all())


def package_copies(session: Session, package_id: int, location: str) -> list[Any]:
    return list(
        session.scalars(
            select(m.RawDataPackagePhysicalCopy)
            .join(m.DataLocation)
            .where(
                m.RawDataPackagePhysicalCopy.raw_data_package_id == package_id,
                m.DataLocation.name == location,
            )
            .order_by(m.RawDataPackagePhysicalCopy.id)
        ).all()
    )
