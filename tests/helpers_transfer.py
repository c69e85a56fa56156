"""Test fixtures for stages 3-5: a DataTransferPackage lying at the telescope buffer.

Built here (not with the packaging stage) so the transfer tests stand alone.  Everything
follows the path layout of docs/CONVENTIONS-dev.md: raw files at SOURCE under
``RawDataFile.relative_path``, RawDataPackage tars whose members are the files' relative
paths, a DataTransferPackage tar whose members are the packages' relative paths, all
with real SHA-256 checksums.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_data_transfer.core.storage import storage_for_location
from ccat_data_transfer.core.tarutil import TarMember, write_tar_with_checksums
from ccat_ops_db import models as m

SOURCE = "primecam_raw_data"
BUFFER = "ccat_telescope_buffer"


def _module(session: Session, instrument: str = "primecam", name: str = "280GHz") -> Any:
    return session.scalars(
        select(m.InstrumentModule)
        .join(m.Instrument)
        .where(m.Instrument.name == instrument, m.InstrumentModule.name == name)
    ).one()


def _execution(session: Session, tag: str) -> m.ExecutedObsUnit:
    obs = m.ObsUnit(name=f"obs_{tag}")
    session.add(obs)
    session.flush()
    eou = m.ExecutedObsUnit(
        name=f"exec_{tag}",
        obs_unit_id=obs.id,
        status=m.Status.COMPLETED,
        start_time=m.utcnow(),
        end_time=m.utcnow(),
        finished_at=m.utcnow(),
    )
    session.add(eou)
    session.flush()
    return eou


def make_dtp_at_source_buffer(
    system: Any, session: Session, n_packages: int = 2, files_per_package: int = 3
) -> m.DataTransferPackage:
    """Write files, RawDataPackage tars and the DTP tar; record rows and PRESENT copies.

    RawDataPackages are TRANSFERRING and present at the telescope buffer; the DTP is
    PENDING with a PRESENT copy at the telescope buffer.  Committed before returning.
    """
    tag = uuid.uuid4().hex[:10]
    source = system.location(session, SOURCE)
    buffer = system.location(session, BUFFER)
    src_root = Path(source.path)
    buf_storage = storage_for_location(buffer)
    module = _module(session)
    dtp_name = f"dtp_{tag}.tar"
    dtp = m.DataTransferPackage(
        file_name=dtp_name,
        relative_path=f"data_transfer_packages/{dtp_name}",
        status=m.Status.PENDING,
        origin_location_id=buffer.id,
    )
    session.add(dtp)
    session.flush()
    rdp_members: list[TarMember] = []
    for p in range(n_packages):
        eou = _execution(session, f"{tag}_{p}")
        rdp_name = f"{eou.name}_{module.name}.tar"
        rdp = m.RawDataPackage(
            file_name=rdp_name,
            relative_path=f"raw_data_packages/primecam/{module.name}/{rdp_name}",
            state=m.PackageState.TRANSFERRING,
            status=m.Status.COMPLETED,
            executed_obs_unit_id=eou.id,
            instrument_module_id=module.id,
            source_location_id=source.id,
            data_transfer_package_id=dtp.id,
        )
        session.add(rdp)
        session.flush()
        members = []
        for f in range(files_per_package):
            rel = f"primecam/{module.name}/{eou.name}/scan_{f:03d}.fits"
            data = os.urandom(1000 + 517 * f) + f"{tag}-{p}-{f}".encode()
            path = src_root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            digest = hashlib.sha256(data).hexdigest()
            raw = m.RawDataFile(
                relative_path=rel,
                size=len(data),
                checksum=digest,
                instrument_module_id=module.id,
                executed_obs_unit_id=eou.id,
                source_location_id=source.id,
                raw_data_package_id=rdp.id,
            )
            session.add(raw)
            session.flush()
            session.add(
                m.RawDataFilePhysicalCopy(
                    raw_data_file_id=raw.id,
                    data_location_id=source.id,
                    status=m.PhysicalCopyStatus.PRESENT,
                    relative_path=rel,
                    size=len(data),
                    checksum=digest,
                    verified_at=m.utcnow(),
                )
            )
            members.append(TarMember(rel, path, len(data), digest))
        with buf_storage.open_write(rdp.relative_path) as out:
            result = write_tar_with_checksums(members, out)
        assert result.ok
        rdp.size, rdp.checksum = result.size, result.sha256
        session.add(
            m.RawDataPackagePhysicalCopy(
                raw_data_package_id=rdp.id,
                data_location_id=buffer.id,
                status=m.PhysicalCopyStatus.PRESENT,
                relative_path=rdp.relative_path,
                size=result.size,
                checksum=result.sha256,
                verified_at=m.utcnow(),
            )
        )
        rdp_members.append(
            TarMember(
                rdp.relative_path,
                buf_storage.local_path(rdp.relative_path),
                result.size,
                result.sha256,
            )
        )
    with buf_storage.open_write(dtp.relative_path) as out:
        result = write_tar_with_checksums(rdp_members, out)
    assert result.ok
    dtp.size, dtp.checksum = result.size, result.sha256
    session.add(
        m.DataTransferPackagePhysicalCopy(
            data_transfer_package_id=dtp.id,
            data_location_id=buffer.id,
            status=m.PhysicalCopyStatus.PRESENT,
            relative_path=dtp.relative_path,
            size=result.size,
            checksum=result.sha256,
            verified_at=m.utcnow(),
        )
    )
    session.commit()
    return dtp


def make_dtp_rows_only(system: Any, session: Session, count: int) -> list[int]:
    """``count`` PENDING DTPs with a PRESENT copy at the telescope buffer, no bytes on
    disk (enough for planning decisions such as round-robin)."""
    buffer = system.location(session, BUFFER)
    ids = []
    for _ in range(count):
        name = f"dtp_{uuid.uuid4().hex[:12]}.tar"
        dtp = m.DataTransferPackage(
            file_name=name,
            relative_path=f"data_transfer_packages/{name}",
            status=m.Status.PENDING,
            checksum="0" * 64,
        )
        session.add(dtp)
        session.flush()
        session.add(
            m.DataTransferPackagePhysicalCopy(
                data_transfer_package_id=dtp.id,
                data_location_id=buffer.id,
                status=m.PhysicalCopyStatus.PRESENT,
                relative_path=dtp.relative_path,
            )
        )
        ids.append(dtp.id)
    session.commit()
    return ids


def replace_dtp_tar(system: Any, session: Session, dtp_id: int, entries: list[Any]) -> None:
    """Overwrite the DTP tar at the telescope buffer with a hand-made (possibly hostile)
    tar.  ``entries`` are (TarInfo, bytes | None).  Updates the DTP checksum to match, so
    the transfer verifies and only the unpack can catch it."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    blob = buf.getvalue()
    dtp = session.get(m.DataTransferPackage, dtp_id)
    storage = storage_for_location(system.location(session, BUFFER))
    with storage.open_write(dtp.relative_path) as out:
        out.write(blob)
    dtp.size = len(blob)
    dtp.checksum = hashlib.sha256(blob).hexdigest()
    session.commit()


def drive(session_factory: Any, *managers: Any, cycles: int = 6) -> list[dict[str, Any]]:
    """Run the managers' run_once in turn for ``cycles`` rounds, each in a new session."""
    summaries = []
    for _ in range(cycles):
        for run_once in managers:
            with session_factory() as session:
                summaries.append(run_once(session))
    return summaries
