"""Stage 4: unpacking a verified DataTransferPackage at the LTA-site buffer."""

from __future__ import annotations

import io
import tarfile

from sqlalchemy import select, update

from ccat_data_transfer import transfer_manager
from ccat_ops_db import models as m
from helpers_transfer import drive, make_dtp_at_source_buffer, replace_dtp_tar


def _only_transfer(session, dtp_id):
    return session.scalars(
        select(m.DataTransfer).where(m.DataTransfer.data_transfer_package_id == dtp_id)
    ).one()


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def test_unpack_records_each_raw_data_package_present_at_the_lta_site_buffer(system):
    with system.session() as s:
        dtp = make_dtp_at_source_buffer(system, s, n_packages=3, files_per_package=2)
        dtp_id = dtp.id
        drive(system.session, transfer_manager.run_once, cycles=1)
        t = _only_transfer(s, dtp_id)
        assert t.unpack_status == m.Status.COMPLETED and t.unpack_end_time is not None
        root = system.location_path(t.destination_location.name)
        for rdp in s.get(m.DataTransferPackage, dtp_id).raw_data_packages:
            (copy,) = [
                c for c in rdp.physical_copies if c.data_location_id == t.destination_location_id
            ]
            assert copy.status == m.PhysicalCopyStatus.PRESENT
            assert copy.relative_path == rdp.relative_path and copy.checksum == rdp.checksum
            assert copy.verified_at is not None
            assert (root / rdp.relative_path).stat().st_size == rdp.size
        # Only the DTP and the package tars: no temporary unpack folder left behind.
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        expected = sorted([dtp.relative_path] + [p.relative_path for p in dtp.raw_data_packages])
        assert files == expected


def test_hostile_tar_is_rejected_and_nothing_is_written_outside_the_target(system):
    with system.session() as s:
        dtp = make_dtp_at_source_buffer(system, s, n_packages=1)
        dtp_id = dtp.id
        rdp = dtp.raw_data_packages[0]
        escape = tarfile.TarInfo("../../escaped.txt")
        escape.size = 4
        link = tarfile.TarInfo("raw_data_packages/link")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        replace_dtp_tar(
            system,
            s,
            dtp_id,
            [_file(rdp.relative_path, b"x" * 10), (escape, b"evil"), (link, None)],
        )
        drive(system.session, transfer_manager.run_once, cycles=2)
        t = _only_transfer(s, dtp_id)
        assert t.status == m.Status.COMPLETED  # the bytes arrived intact ...
        assert t.unpack_status == m.Status.FAILED  # ... but are refused by the unpack
        assert "refusing tar member" in t.unpack_failure_reason
        root = system.location_path(t.destination_location.name)
        assert not list(system.data_dir.rglob("escaped.txt"))
        assert not (root / "raw_data_packages").exists()
        assert not [p for p in root.rglob("*") if ".unpack" in p.as_posix()]
        assert not s.scalars(
            select(m.RawDataPackagePhysicalCopy).where(
                m.RawDataPackagePhysicalCopy.data_location_id == t.destination_location_id
            )
        ).all()


def test_raw_data_package_checksum_mismatch_fails_unpack_after_retries(system, override_settings):
    override_settings(TRANSFER_MAX_RETRIES=2)
    with system.session() as s:
        dtp = make_dtp_at_source_buffer(system, s, n_packages=2)
        dtp_id = dtp.id
        good, bad = dtp.raw_data_packages
        s.execute(
            update(m.RawDataPackage).where(m.RawDataPackage.id == bad.id).values(checksum="ab" * 32)
        )
        s.commit()
        drive(system.session, transfer_manager.run_once, cycles=1)
        t = _only_transfer(s, dtp_id)
        assert t.status == m.Status.COMPLETED
        assert t.unpack_status == m.Status.PENDING and t.unpack_retry_count == 1
        drive(system.session, transfer_manager.run_once, cycles=3)
        s.refresh(t)
        assert t.unpack_status == m.Status.FAILED and t.unpack_retry_count == 2
        assert "checksum mismatch" in t.unpack_failure_reason and bad.relative_path in (
            t.unpack_failure_reason
        )
        # Sent once only: unpack retries never re-send.
        assert t.retry_count == 0
        root = system.location_path(t.destination_location.name)
        assert not (root / good.relative_path).exists()
        s.expire_all()
        assert s.get(m.DataTransferPackage, dtp_id).status == m.Status.FAILED


def test_unpack_retry_after_fix_does_not_resend(system, override_settings):
    with system.session() as s:
        dtp = make_dtp_at_source_buffer(system, s, n_packages=1)
        dtp_id, rdp = dtp.id, dtp.raw_data_packages[0]
        real = rdp.checksum
        s.execute(
            update(m.RawDataPackage).where(m.RawDataPackage.id == rdp.id).values(checksum="0" * 64)
        )
        s.commit()
        override_settings(TRANSFER_MAX_RETRIES=0)
        drive(system.session, transfer_manager.run_once, cycles=1)
        t = _only_transfer(s, dtp_id)
        assert t.unpack_status == m.Status.FAILED
        started = t.start_time
        s.execute(
            update(m.RawDataPackage).where(m.RawDataPackage.id == rdp.id).values(checksum=real)
        )
        transfer_manager.retry_transfer(s, t.id)
        s.commit()
        drive(system.session, transfer_manager.run_once, cycles=1)
        s.refresh(t)
        assert t.unpack_status == m.Status.COMPLETED and t.start_time == started


def test_truncated_tar_is_not_a_permanent_unpack_failure(system):
    with system.session() as s:
        dtp = make_dtp_at_source_buffer(system, s, n_packages=1)
        rdp = dtp.raw_data_packages[0]
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info, data = _file(rdp.relative_path, b"y" * 5000)
            tar.addfile(info, io.BytesIO(data))
        blob = buf.getvalue()[:2048]  # cut inside the member
        from ccat_data_transfer.core.storage import storage_for_location

        st = storage_for_location(system.location(s, "ccat_telescope_buffer"))
        with st.open_write(dtp.relative_path) as out:
            out.write(blob)
        import hashlib

        dtp.checksum = hashlib.sha256(blob).hexdigest()
        s.commit()
        drive(system.session, transfer_manager.run_once, cycles=1)
        t = _only_transfer(s, dtp.id)
        assert t.unpack_status == m.Status.PENDING and t.unpack_retry_count == 1
