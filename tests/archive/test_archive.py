"""Stage 5: from the LTA-site buffer into the long-term archive (disk and S3)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from sqlalchemy import select

from ccat_data_transfer import transfer_manager
from ccat_data_transfer.archive import cycle as archive_manager
from ccat_data_transfer.archive import execution as archive_execution
from ccat_data_transfer.core.storage import S3Storage
from ccat_data_transfer.core.transfer_methods import (
    CopyMethod,
    get_transfer_method,
    register_transfer_method,
)
from ccat_ops_db import models as m
from ccat_ops_db.topology import load_topology
from helpers_transfer import drive, make_dtp_at_source_buffer

DEFAULT_TOPOLOGY = (
    Path(__file__).resolve().parents[2] / "src" / "ccat_data_transfer" / "topology" / "default.toml"
)


def _archive_copies(session: Any, rdp_id: int) -> dict[str, m.RawDataPackagePhysicalCopy]:
    rows = session.scalars(
        select(m.RawDataPackagePhysicalCopy).where(
            m.RawDataPackagePhysicalCopy.raw_data_package_id == rdp_id
        )
    ).all()
    return {c.data_location.name: c for c in rows}


def _us_lta_on_s3(system: Any, session: Any, endpoint_url: str, bucket: str) -> None:
    text = DEFAULT_TOPOLOGY.read_text()
    s3_block = (
        '[[locations]]\nname = "us_lta"\nsite = "us"\ntype = "long_term_archive"\n'
        f'storage = "s3"\nbucket = "{bucket}"\nendpoint_url = "{endpoint_url}"\n'
        'prefix = "archive"\n'
    )
    text, n = re.subn(
        r'\[\[locations\]\]\nname = "us_lta"\n(?:[^\[\n][^\n]*\n)*', s3_block + "\n", text
    )
    assert n == 1
    path = system.data_dir / "topology_s3.toml"
    path.write_text(text)
    load_topology(session, path, system.data_dir)
    session.commit()


def test_package_is_archived_at_a_disk_lta_and_an_s3_lta(
    system, s3_server, s3_bucket, override_settings
):
    override_settings(
        S3_ACCESS_KEY_ID=s3_server.access_key, S3_SECRET_ACCESS_KEY=s3_server.secret_key
    )
    bucket = s3_bucket
    with system.session() as s:
        _us_lta_on_s3(system, s, s3_server.endpoint_url, bucket)
        assert system.location(s, "us_lta").storage_type == m.StorageType.S3
        dtp = make_dtp_at_source_buffer(system, s, n_packages=2, files_per_package=2)
        rdps = [(p.id, p.relative_path, p.checksum) for p in dtp.raw_data_packages]
    drive(system.session, transfer_manager.run_once, archive_manager.run_once, cycles=3)
    with system.session() as s:
        us_lta = system.location(s, "us_lta")
        s3 = S3Storage(us_lta.endpoint_url, us_lta.bucket, prefix=us_lta.prefix)
        for rdp_id, rel, checksum in rdps:
            rdp = s.get(m.RawDataPackage, rdp_id)
            assert rdp.state == m.PackageState.ARCHIVED
            copies = _archive_copies(s, rdp_id)
            for lta in ("cologne_lta", "us_lta"):
                assert copies[lta].status == m.PhysicalCopyStatus.PRESENT
                assert copies[lta].verified_at is not None and copies[lta].checksum == checksum
            disk = system.location_path("cologne_lta") / rel
            assert hashlib.sha256(disk.read_bytes()).hexdigest() == checksum
            assert s3.sha256(rel) == checksum
            sidecar = json.loads(s3.open_read(rel + ".json").read())
            assert sidecar["raw_data_package"]["checksum"] == checksum
            # The buffer copies are the deletion manager's business, not ours.
            assert copies["us_buffer"].status == m.PhysicalCopyStatus.PRESENT
            assert copies["cologne_buffer"].status == m.PhysicalCopyStatus.PRESENT
        done = s.scalars(select(m.LongTermArchiveTransfer)).all()
        assert len(done) == 4 and {t.status for t in done} == {m.Status.COMPLETED}


def test_metadata_sidecar_describes_files_obs_unit_instrument_and_package(system):
    with system.session() as s:
        dtp = make_dtp_at_source_buffer(system, s, n_packages=1, files_per_package=3)
        rdp = dtp.raw_data_packages[0]
        files = {f.relative_path: (f.size, f.checksum) for f in rdp.raw_data_files}
        obs_name = rdp.executed_obs_unit.obs_unit.name
        rdp_id, rel, size, checksum = rdp.id, rdp.relative_path, rdp.size, rdp.checksum
    drive(system.session, transfer_manager.run_once, archive_manager.run_once, cycles=2)
    with system.session() as s:
        t = s.scalars(
            select(m.LongTermArchiveTransfer).where(
                m.LongTermArchiveTransfer.raw_data_package_id == rdp_id
            )
        ).first()
        assert t.status == m.Status.COMPLETED and t.metadata_path == rel + ".json"
        doc = json.loads(
            (system.location_path(t.destination_location.name) / t.metadata_path).read_text()
        )
    assert doc["raw_data_package"]["size"] == size
    assert doc["raw_data_package"]["checksum"] == checksum
    assert doc["obs_unit"]["name"] == obs_name
    assert doc["instrument"] == "primecam" and doc["instrument_module"] == "280GHz"
    assert {f["relative_path"]: (f["size"], f["checksum"]) for f in doc["files"]} == files


def test_archive_copy_that_lands_corrupt_is_removed_and_retried(system):
    with system.session() as s:
        dtp = make_dtp_at_source_buffer(system, s, n_packages=1)
        rdp_id = dtp.raw_data_packages[0].id
    drive(system.session, transfer_manager.run_once, cycles=1)  # primary only
    original = get_transfer_method(m.TransferMethod.COPY)
    calls: list[str] = []

    class FlipOnce(CopyMethod):
        def land(self, src_storage, src_path, dst_storage, dst_path, log_file, **kw):
            stats = super().land(src_storage, src_path, dst_storage, dst_path, log_file, **kw)
            calls.append(dst_path)
            if len(calls) == 1:
                # Corrupted in transit: the bytes at the attempt's temporary name.
                p = dst_storage.local_path(self.temp_name(dst_storage, dst_path, kw["attempt"]))
                data = bytearray(p.read_bytes())
                data[-1] ^= 1
                p.write_bytes(bytes(data))
            return stats

    register_transfer_method(m.TransferMethod.COPY, FlipOnce())
    try:
        with system.session() as s:
            archive_manager.run_once(s)
            (t,) = s.scalars(select(m.LongTermArchiveTransfer)).all()
            s.refresh(t)
            assert t.status == m.Status.PENDING and t.retry_count == 1
            assert "checksum mismatch" in t.failure_reason
            lta_path = system.location_path(t.destination_location.name)
            assert not (lta_path / t.raw_data_package.relative_path).exists()
            assert s.get(m.RawDataPackage, rdp_id).state == m.PackageState.TRANSFERRING
            archive_manager.run_once(s)
            s.refresh(t)
            assert t.status == m.Status.COMPLETED
            s.expire_all()
            assert s.get(m.RawDataPackage, rdp_id).state == m.PackageState.ARCHIVED
    finally:
        register_transfer_method(m.TransferMethod.COPY, original)


def test_archive_task_delivered_twice_archives_once(system):
    with system.session() as s:
        make_dtp_at_source_buffer(system, s, n_packages=1)
    drive(system.session, transfer_manager.run_once, cycles=1)
    with system.session() as s:
        archive_manager.plan_archive_transfers(s)
        (claimed,) = archive_manager.dispatch_archive_transfers(s, submit=False)
    assert archive_execution.execute_archive_transfer(claimed) == "completed"
    assert archive_execution.execute_archive_transfer(claimed) == "skipped"
    with system.session() as s:
        # Nothing left to plan: the package has its LTA copy at that site.
        assert archive_manager.plan_archive_transfers(s) == []
        lta_copies = [
            c
            for c in s.scalars(select(m.RawDataPackagePhysicalCopy))
            if c.data_location.location_type == m.LocationType.LONG_TERM_ARCHIVE
        ]
        assert len(lta_copies) == 1


def test_source_site_buffer_copies_are_never_archived_directly(system):
    with system.session() as s:
        make_dtp_at_source_buffer(system, s, n_packages=2)
        assert archive_manager.plan_archive_transfers(s) == []
