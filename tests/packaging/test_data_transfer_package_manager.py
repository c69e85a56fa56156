"""Stage 2: bundling raw data packages at the source-site buffer."""

from __future__ import annotations

import tarfile
from datetime import timedelta

from sqlalchemy import select, update

from ccat_data_transfer.core.tarutil import sha256_file
from ccat_data_transfer.packaging import raw_cycle, transfer_cycle
from ccat_data_transfer.packaging import transfer_packages as dtpm
from ccat_ops_db import models as m
from helpers_pipeline import build_started_and_died, make_raw_files

SRC = "primecam_raw_data"
BUF = "ccat_telescope_buffer"


def _raw_packages(system, count, size=1000):
    for i in range(count):
        make_raw_files(system, SRC, f"eou-dtp-{i}", "primecam/280GHz", 1, size)
    with system.session() as s:
        assert raw_cycle.run_once(s)["packages_created"] == count
        return s.scalars(select(m.RawDataPackage).order_by(m.RawDataPackage.id)).all()


def _run(system):
    with system.session() as s:
        return transfer_cycle.run_once(s)


def _dtps(system):
    with system.session() as s:
        return s.scalars(select(m.DataTransferPackage).order_by(m.DataTransferPackage.id)).all()


def test_waiting_packages_are_bundled_into_a_pending_transfer_package(system):
    raws = _raw_packages(system, 3)
    summary = _run(system)
    assert summary["packages_created"] == 1 and summary["raw_data_packages_bundled"] == 3
    [dtp] = _dtps(system)
    assert dtp.status == m.Status.PENDING
    assert dtp.relative_path == f"data_transfer_packages/{dtp.file_name}"
    tar_path = system.location_path(BUF) / dtp.relative_path
    assert sha256_file(tar_path) == dtp.checksum and tar_path.stat().st_size == dtp.size
    with tarfile.open(tar_path) as tf:
        assert sorted(tf.getnames()) == sorted(r.relative_path for r in raws)
        for r in raws:
            data = tf.extractfile(r.relative_path).read()
            import hashlib

            assert hashlib.sha256(data).hexdigest() == r.checksum
    with system.session() as s:
        states = {p.state for p in s.scalars(select(m.RawDataPackage))}
        assert states == {m.PackageState.TRANSFERRING}
        [copy] = s.scalars(select(m.DataTransferPackagePhysicalCopy)).all()
        assert copy.data_location.name == BUF and copy.status == m.PhysicalCopyStatus.PRESENT
        assert copy.data_transfer_package_id == dtp.id
    assert _run(system)["packages_submitted"] == 0


def test_bundles_are_cut_at_the_target_size(system, override_settings):
    raws = _raw_packages(system, 5)
    override_settings(
        DATA_TRANSFER_PACKAGE_TARGET_SIZE_BYTES=raws[0].size * 2,
        DATA_TRANSFER_PACKAGE_MAX_WAIT_SECONDS=3600,
    )
    summary = _run(system)
    assert summary["packages_created"] == 2 and summary["waiting_raw_data_packages"] == 1
    with system.session() as s:
        counts = sorted(len(d.raw_data_packages) for d in s.scalars(select(m.DataTransferPackage)))
        assert counts == [2, 2]


def test_small_bundle_is_held_until_the_max_wait(system, override_settings):
    _raw_packages(system, 2)
    override_settings(
        DATA_TRANSFER_PACKAGE_TARGET_SIZE_BYTES=10**12, DATA_TRANSFER_PACKAGE_MAX_WAIT_SECONDS=3600
    )
    summary = _run(system)
    assert summary["packages_submitted"] == 0 and summary["waiting_raw_data_packages"] == 2
    with system.session() as s:
        s.execute(update(m.RawDataPackage).values(created_at=m.utcnow() - timedelta(seconds=3601)))
    assert _run(system)["packages_created"] == 1
    assert len(_dtps(system)) == 1


def test_bundle_rule_on_plain_data():
    now = m.utcnow()
    old = now - timedelta(seconds=100)
    pkgs = [(1, 40, old), (2, 40, now), (3, 40, now), (4, 10, now)]
    assert dtpm.bundle_packages(pkgs, 80, 1000, now) == [[1, 2]]
    assert dtpm.bundle_packages(pkgs, 80, 50, now) == [[1, 2]]
    assert dtpm.bundle_packages(pkgs[2:], 80, 0, now) == [[3, 4]]


def test_corrupted_member_package_is_failed_and_the_rest_waits(system):
    raws = _raw_packages(system, 2)
    victim = system.location_path(BUF) / raws[0].relative_path
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF
    victim.write_bytes(bytes(data))
    summary = _run(system)
    assert summary["packages_failed"] == 1
    assert [e["raw_data_package_id"] for e in summary["checksum_errors"]] == [raws[0].id]
    assert _dtps(system) == []
    assert not list((system.location_path(BUF) / "data_transfer_packages").glob("*"))
    with system.session() as s:
        bad = s.get(m.RawDataPackage, raws[0].id)
        good = s.get(m.RawDataPackage, raws[1].id)
        assert bad.state == m.PackageState.FAILED and "sha256" in bad.failure_reason
        assert good.state == m.PackageState.WAITING and good.data_transfer_package_id is None
    summary = _run(system)
    assert summary["packages_created"] == 1 and summary["raw_data_packages_bundled"] == 1


def test_a_second_manager_cannot_claim_bundled_packages(system):
    raws = _raw_packages(system, 2)
    with system.session() as s:
        buffer = system.location(s, BUF)
        first = dtpm.claim_bundle(s, buffer, [r.id for r in raws])
        second = dtpm.claim_bundle(s, buffer, [r.id for r in raws])
    assert first is not None and second is None
    assert len(_dtps(system)) == 1


def test_stalled_bundle_is_released_and_rebundled(system, override_settings):
    raws = _raw_packages(system, 2)
    with system.session() as s:
        assert dtpm.claim_bundle(s, system.location(s, BUF), [r.id for r in raws]) is not None
    build_started_and_died(system, m.DataTransferPackage, _dtps(system)[0].id)
    summary = _run(system)
    assert summary["released_stalled"] == 1 and summary["packages_created"] == 1
    assert [d.status for d in _dtps(system)] == [m.Status.PENDING]
