"""Stage 3: transfers between sites (routes, round-robin, limits, verification, retries)."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from ccat_data_transfer import transfer_manager
from ccat_data_transfer.archive import cycle as archive_manager
from ccat_data_transfer.core.buffer_status import publish_status
from ccat_data_transfer.core.errors import ConfigurationError, ValidationError
from ccat_data_transfer.core.storage import DiskStorage
from ccat_data_transfer.core.transfer_methods import (
    BbcpMethod,
    CopyMethod,
    RsyncMethod,
    TransferStats,
    get_transfer_method,
    register_transfer_method,
)
from ccat_ops_db import models as m
from helpers_transfer import BUFFER, drive, make_dtp_at_source_buffer, make_dtp_rows_only

LTA_BUFFERS = {"cologne": "cologne_buffer", "us": "us_buffer"}


@pytest.fixture
def copy_method() -> Any:
    """Lets a test swap the COPY method; the real one comes back afterwards."""
    original = get_transfer_method(m.TransferMethod.COPY)
    yield lambda method: register_transfer_method(m.TransferMethod.COPY, method)
    register_transfer_method(m.TransferMethod.COPY, original)


def _transfers(session: Any, dtp_id: int) -> list[m.DataTransfer]:
    return list(
        session.scalars(
            select(m.DataTransfer)
            .where(m.DataTransfer.data_transfer_package_id == dtp_id)
            .order_by(m.DataTransfer.id)
        )
    )


def _publish(session: Any, location: str, state: str, percent: float) -> None:
    publish_status(
        {
            "location": location,
            "used_bytes": int(percent),
            "total_bytes": 100,
            "disk_usage_percent": percent,
            "state": state,
        },
        session,
    )
    session.commit()


def test_package_goes_to_primary_then_secondary_lta_buffer_and_is_archived_at_both(system):
    with system.session() as s:
        dtp = make_dtp_at_source_buffer(system, s, n_packages=2, files_per_package=3)
        dtp_id, rdp_ids = dtp.id, [p.id for p in dtp.raw_data_packages]
    drive(system.session, transfer_manager.run_once, archive_manager.run_once, cycles=3)
    with system.session() as s:
        transfers = _transfers(s, dtp_id)
        assert [t.is_primary for t in transfers] == [True, False]
        assert {t.destination_location.name for t in transfers} == set(LTA_BUFFERS.values())
        assert transfers[1].origin_location_id == transfers[0].destination_location_id
        for t in transfers:
            assert (t.status, t.unpack_status) == (m.Status.COMPLETED, m.Status.COMPLETED)
            assert t.bytes_transferred == s.get(m.DataTransferPackage, dtp_id).size
            assert t.duration_seconds is not None and t.rate_mb_per_s is not None
            assert Path(t.log_path).is_file()
        assert s.get(m.DataTransferPackage, dtp_id).status == m.Status.COMPLETED
        for rdp_id in rdp_ids:
            rdp = s.get(m.RawDataPackage, rdp_id)
            assert rdp.state == m.PackageState.ARCHIVED and rdp.archived_at is not None
            where = {
                c.data_location.name
                for c in rdp.physical_copies
                if c.status == m.PhysicalCopyStatus.PRESENT and c.verified_at is not None
            }
            assert {"cologne_buffer", "us_buffer", "cologne_lta", "us_lta"} <= where
            for lta in ("cologne_lta", "us_lta"):
                tar = system.location_path(lta) / rdp.relative_path
                assert hashlib.sha256(tar.read_bytes()).hexdigest() == rdp.checksum
        # The DTP itself never lands in an LTA location, and buffer copies stay.
        copies = s.scalars(
            select(m.DataTransferPackagePhysicalCopy).where(
                m.DataTransferPackagePhysicalCopy.data_transfer_package_id == dtp_id
            )
        ).all()
        assert {c.data_location.name for c in copies} == {BUFFER, *LTA_BUFFERS.values()}


def test_destination_checksum_mismatch_removes_copy_logs_event_and_retries(
    system, copy_method, caplog
):
    calls: list[int] = []

    class FlipFirstByteOnce(CopyMethod):
        def land(self, src_storage, src_path, dst_storage, dst_path, log_file, **kw):
            stats = super().land(src_storage, src_path, dst_storage, dst_path, log_file, **kw)
            calls.append(1)
            if len(calls) == 1:
                # Corrupted in transit: the bytes at the attempt's temporary name.
                temp = self.temp_name(dst_storage, dst_path, kw.get("attempt"))
                path = dst_storage.local_path(temp)
                data = bytearray(path.read_bytes())
                data[700] ^= 0xFF
                path.write_bytes(bytes(data))
            return stats

    copy_method(FlipFirstByteOnce())
    with system.session() as s:
        dtp_id = make_dtp_at_source_buffer(system, s, n_packages=1).id
        drive(system.session, transfer_manager.run_once, cycles=1)
        (t,) = _transfers(s, dtp_id)
        s.refresh(t)
        assert t.status == m.Status.PENDING and t.retry_count == 1
        assert "checksum mismatch" in t.failure_reason
        dest = system.location_path(t.destination_location.name)
        assert not (dest / s.get(m.DataTransferPackage, dtp_id).relative_path).exists()
        assert any("transfer_checksum_mismatch" in str(r.msg) for r in caplog.records)
        drive(system.session, transfer_manager.run_once, cycles=1)
        s.refresh(t)
        assert t.status == m.Status.COMPLETED and t.unpack_status == m.Status.COMPLETED
        copy = s.scalars(
            select(m.DataTransferPackagePhysicalCopy).where(
                m.DataTransferPackagePhysicalCopy.data_location_id == t.destination_location_id
            )
        ).one()
        assert copy.status == m.PhysicalCopyStatus.PRESENT and copy.verified_at is not None


def test_transfer_killed_midway_leaves_no_file_and_no_completed_row_then_retries(
    system, copy_method
):
    class DiesHalfway(CopyMethod):
        def land(self, src_storage, src_path, dst_storage, dst_path, log_file, **kw):
            with src_storage.open_read(src_path) as src:
                data = src.read()
            with dst_storage.open_write(dst_path) as out:
                out.write(data[: len(data) // 2])
                raise ConnectionResetError("link dropped")

    original = copy_method(DiesHalfway())
    with system.session() as s:
        dtp = make_dtp_at_source_buffer(system, s, n_packages=1)
        dtp_id, rel = dtp.id, dtp.relative_path
        drive(system.session, transfer_manager.run_once, cycles=1)
        (t,) = _transfers(s, dtp_id)
        s.refresh(t)
        assert t.status == m.Status.PENDING and t.retry_count == 1
        assert "link dropped" in t.failure_reason
        dest = system.location_path(t.destination_location.name)
        assert not (dest / rel).exists()
        assert not [p for p in dest.rglob("*") if p.is_file()]  # no temp left either
        assert (
            s.scalar(select(m.DataTransfer.id).where(m.DataTransfer.status == m.Status.COMPLETED))
            is None
        )
        copy_method(original)
        drive(system.session, transfer_manager.run_once, cycles=1)
        s.refresh(t)
        assert t.status == m.Status.COMPLETED
        assert hashlib.sha256((dest / rel).read_bytes()).hexdigest() == dtp.checksum


def test_stalled_in_progress_transfer_is_reset_and_then_completed(system):
    with system.session() as s:
        dtp_id = make_dtp_at_source_buffer(system, s, n_packages=1).id
        transfer_manager.plan_primary_transfers(s)
        (t,) = _transfers(s, dtp_id)
        # A worker claimed it and died: IN_PROGRESS, untouched for two hours.
        s.execute(
            update(m.DataTransfer)
            .where(m.DataTransfer.id == t.id)
            .values(status=m.Status.IN_PROGRESS, updated_at=m.utcnow() - timedelta(hours=2))
        )
        s.commit()
        assert transfer_manager.reset_stalled_transfers(s, timedelta(hours=3)) == 0
        assert transfer_manager.reset_stalled_transfers(s, timedelta(hours=1)) == 1
        s.refresh(t)
        assert t.status == m.Status.PENDING and t.retry_count == 1
        drive(system.session, transfer_manager.run_once, cycles=1)
        s.refresh(t)
        assert t.status == m.Status.COMPLETED


def test_transfer_fails_with_reason_after_max_retries(system, copy_method, override_settings):
    override_settings(TRANSFER_MAX_RETRIES=2)

    class AlwaysBroken(CopyMethod):
        def land(self, *args, **kw):
            raise OSError("no route to host")

    copy_method(AlwaysBroken())
    with system.session() as s:
        dtp_id = make_dtp_at_source_buffer(system, s, n_packages=1).id
        drive(system.session, transfer_manager.run_once, cycles=5)
        (t,) = _transfers(s, dtp_id)
        assert t.status == m.Status.FAILED and t.retry_count == 2
        assert "no route to host" in t.failure_reason
        assert s.get(m.DataTransferPackage, dtp_id).status == m.Status.FAILED
        # The operator's retry resets it; with a working method it then completes.
        transfer_manager.retry_transfer(s, t.id)
        s.commit()
        assert (t.status, t.retry_count) == (m.Status.PENDING, 0)
        with pytest.raises(ValidationError):
            transfer_manager.retry_transfer(s, t.id)


def test_retry_backoff_is_exponential(system, copy_method, override_settings):
    override_settings(TRANSFER_RETRY_BASE_SECONDS=30)

    class Broken(CopyMethod):
        def land(self, *args, **kw):
            raise OSError("boom")

    copy_method(Broken())
    with system.session() as s:
        dtp_id = make_dtp_at_source_buffer(system, s, n_packages=1).id
        drive(system.session, transfer_manager.run_once, cycles=1)
        (t,) = _transfers(s, dtp_id)
        first = (t.next_attempt_at - m.utcnow()).total_seconds()
        assert 25 < first <= 30
        # Not due yet: the next cycle does not send it again.
        assert transfer_manager.dispatch_transfers(s, submit=False) == []
        s.execute(
            update(m.DataTransfer).where(m.DataTransfer.id == t.id).values(next_attempt_at=None)
        )
        s.commit()
        transfer_manager.dispatch_transfers(s)
        s.refresh(t)
        assert t.retry_count == 2
        assert 55 < (t.next_attempt_at - m.utcnow()).total_seconds() <= 60


def test_round_robin_spreads_100_packages_evenly_across_lta_sites(system):
    with system.session() as s:
        make_dtp_rows_only(system, s, 100)
        transfer_manager.plan_primary_transfers(s)
        counts: dict[str, int] = {}
        for t in s.scalars(select(m.DataTransfer)):
            site = t.destination_location.site.name
            counts[site] = counts.get(site, 0) + 1
    assert set(counts) == {"cologne", "us"}
    assert sum(counts.values()) == 100
    assert max(counts.values()) - min(counts.values()) <= 1


def test_round_robin_rotation_survives_a_manager_restart(system):
    from ccat_data_transfer.core.database import dispose_engines

    sites = []
    for _ in range(5):
        # Each pass is a fresh process state: new engine, new session, one package.
        dispose_engines()
        with system.session() as s:
            make_dtp_rows_only(system, s, 1)
            (tid,) = transfer_manager.plan_primary_transfers(s)
            sites.append(s.get(m.DataTransfer, tid).destination_location.site.name)
    assert sites == (["cologne", "us"] * 3)[:5] or sites == (["us", "cologne"] * 3)[:5]
    with system.session() as s:
        state = s.get(m.ManagerState, transfer_manager.ROUND_ROBIN_KEY)
        assert sites[-1] in state.value


@pytest.mark.parametrize(
    ("state", "percent", "expected_key"),
    [
        ("normal", 10.0, "MAX_NORMAL_TRANSFERS"),
        ("critical", 90.0, "MAX_CRITICAL_TRANSFERS"),
        (None, None, "MAX_CRITICAL_TRANSFERS"),  # never measured: UNKNOWN
    ],
)
def test_parallel_transfers_follow_the_origin_buffer_state(
    system, override_settings, state, percent, expected_key
):
    override_settings(MAX_NORMAL_TRANSFERS=4, MAX_CRITICAL_TRANSFERS=2)
    expected = {"MAX_NORMAL_TRANSFERS": 4, "MAX_CRITICAL_TRANSFERS": 2}[expected_key]
    with system.session() as s:
        if state is not None:
            _publish(s, BUFFER, state, percent)
        make_dtp_rows_only(system, s, 9)
        transfer_manager.plan_primary_transfers(s)
        claimed = transfer_manager.dispatch_transfers(s, submit=False)
        assert len(claimed) == expected
        in_flight = s.scalars(
            select(m.DataTransfer).where(m.DataTransfer.status == m.Status.SCHEDULED)
        ).all()
        assert len(in_flight) == expected
        # Slots are full: a second manager cycle claims nothing more.
        assert transfer_manager.dispatch_transfers(s, submit=False) == []


def test_two_managers_never_claim_the_same_transfer(system, override_settings):
    override_settings(MAX_CRITICAL_TRANSFERS=5)
    with system.session() as a, system.session() as b:
        make_dtp_rows_only(system, a, 3)
        first = transfer_manager.plan_primary_transfers(a)
        second = transfer_manager.plan_primary_transfers(b)
        assert len(first) == 3 and second == []
        got_a = transfer_manager.dispatch_transfers(a, submit=False)
        got_b = transfer_manager.dispatch_transfers(b, submit=False)
        assert not set(got_a) & set(got_b)
        assert len(got_a) + len(got_b) == 3


def test_relay_route_goes_through_the_relay_site_buffer(system):
    with system.session() as s:
        ccat = s.scalars(select(m.Site).filter_by(name="ccat")).one()
        us = s.scalars(select(m.Site).filter_by(name="us")).one()
        relay = m.Site(name="relay_site", short_name="relay")
        s.add(relay)
        s.flush()
        s.add(
            m.DiskDataLocation(
                name="relay_buffer",
                site_id=relay.id,
                location_type=m.LocationType.BUFFER,
                path=str(system.data_dir / "relay" / "relay_buffer"),
            )
        )
        (system.data_dir / "relay" / "relay_buffer").mkdir(parents=True)
        # Only the us route exists, and it is a relay.
        s.execute(
            update(m.DataTransferRoute)
            .where(m.DataTransferRoute.destination_site_id != us.id)
            .values(active=False)
        )
        s.execute(
            update(m.DataTransferRoute)
            .where(
                m.DataTransferRoute.origin_site_id == ccat.id,
                m.DataTransferRoute.destination_site_id == us.id,
            )
            .values(route_type=m.RouteType.RELAY, relay_site_id=relay.id)
        )
        s.commit()
        dtp_id = make_dtp_at_source_buffer(system, s, n_packages=1).id
    drive(system.session, transfer_manager.run_once, cycles=3)
    with system.session() as s:
        transfers = _transfers(s, dtp_id)
        hops = [(t.origin_location.name, t.destination_location.name) for t in transfers]
        assert hops == [(BUFFER, "relay_buffer"), ("relay_buffer", "us_buffer")]
        assert all(t.status == m.Status.COMPLETED for t in transfers)
        # Only the LTA-site copy is unpacked; the relay copy is just passed on.
        assert transfers[0].unpack_status == m.Status.PENDING
        assert transfers[1].unpack_status == m.Status.COMPLETED


def test_custom_route_lands_in_its_destination_location(system):
    with system.session() as s:
        cologne = s.scalars(select(m.Site).filter_by(name="cologne")).one()
        alt = m.DiskDataLocation(
            name="cologne_buffer_fast",
            site_id=cologne.id,
            location_type=m.LocationType.BUFFER,
            priority=9,  # worse priority: only the custom route sends here
            path=str(system.data_dir / "cologne" / "fast"),
        )
        s.add(alt)
        (system.data_dir / "cologne" / "fast").mkdir(parents=True)
        s.flush()
        s.execute(
            update(m.DataTransferRoute)
            .where(m.DataTransferRoute.destination_site_id != cologne.id)
            .values(active=False)
        )
        s.execute(
            update(m.DataTransferRoute)
            .where(m.DataTransferRoute.destination_site_id == cologne.id)
            .values(route_type=m.RouteType.CUSTOM, destination_location_id=alt.id)
        )
        s.commit()
        dtp_id = make_dtp_at_source_buffer(system, s, n_packages=1).id
    drive(system.session, transfer_manager.run_once, cycles=1)
    with system.session() as s:
        (t,) = _transfers(s, dtp_id)
        assert t.destination_location.name == "cologne_buffer_fast"
        assert (t.status, t.unpack_status) == (m.Status.COMPLETED, m.Status.COMPLETED)


def test_default_direct_routes_land_in_the_lta_site_buffer_not_the_lta(system):
    with system.session() as s:
        make_dtp_rows_only(system, s, 2)
        transfer_manager.plan_primary_transfers(s)
        types = {t.destination_location.location_type for t in s.scalars(select(m.DataTransfer))}
        assert types == {m.LocationType.BUFFER}
        assert {t.route.route_type for t in s.scalars(select(m.DataTransfer))} == {
            m.RouteType.DIRECT
        }


def test_bbcp_without_binary_is_a_configuration_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    src, dst = DiskStorage(tmp_path / "a", create=True), DiskStorage(tmp_path / "b", create=True)
    (tmp_path / "a" / "f").write_bytes(b"x")
    with pytest.raises(ConfigurationError, match="bbcp"):
        BbcpMethod().transfer(src, "f", dst, "f", open(tmp_path / "log", "w"))


def test_bbcp_route_without_binary_fails_the_transfer_at_once(system, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with system.session() as s:
        s.execute(update(m.DataTransferRoute).values(transfer_method=m.TransferMethod.BBCP))
        s.commit()
        dtp_id = make_dtp_at_source_buffer(system, s, n_packages=1).id
        drive(system.session, transfer_manager.run_once, cycles=1)
        (t,) = _transfers(s, dtp_id)
        assert t.status == m.Status.FAILED and t.retry_count == 0
        assert "bbcp" in t.failure_reason


def test_rsync_method_copies_atomically_between_disk_locations(tmp_path):
    src, dst = DiskStorage(tmp_path / "a", create=True), DiskStorage(tmp_path / "b", create=True)
    (tmp_path / "a" / "d").mkdir()
    (tmp_path / "a" / "d" / "f.tar").write_bytes(b"hello" * 1000)
    with open(tmp_path / "log", "w") as log_file:
        stats = RsyncMethod().transfer(src, "d/f.tar", dst, "x/f.tar", log_file)
    assert isinstance(stats, TransferStats) and stats.bytes == 5000
    assert (tmp_path / "b" / "x" / "f.tar").read_bytes() == b"hello" * 1000
    assert [p.name for p in (tmp_path / "b" / "x").iterdir()] == ["f.tar"]
    assert "rsync" in (tmp_path / "log").read_text()


@pytest.mark.parametrize("choice", ["", "xxh64"])
def test_rsync_checksum_choice_setting(tmp_path, override_settings, choice):
    """TRANSFER_RSYNC_CHECKSUM_CHOICE: empty lets the two rsyncs negotiate (no flag, so an
    older rsync at the other end still works); a name is passed as --checksum-choice."""
    override_settings(TRANSFER_RSYNC_CHECKSUM_CHOICE=choice)
    src, dst = DiskStorage(tmp_path / "a", create=True), DiskStorage(tmp_path / "b", create=True)
    (tmp_path / "a" / "f.tar").write_bytes(b"x" * 4096)
    with open(tmp_path / "log", "w") as log_file:
        RsyncMethod().transfer(src, "f.tar", dst, "f.tar", log_file)
    command = next(line for line in (tmp_path / "log").read_text().splitlines() if "$ " in line)
    assert ("--checksum-choice" in command) == bool(choice)
    assert ("--checksum-choice=xxh64" in command) == (choice == "xxh64")
    assert (tmp_path / "b" / "f.tar").read_bytes() == b"x" * 4096


def test_rsync_route_transfers_and_verifies(system):
    with system.session() as s:
        s.execute(update(m.DataTransferRoute).values(transfer_method=m.TransferMethod.RSYNC))
        s.commit()
        dtp_id = make_dtp_at_source_buffer(system, s, n_packages=1).id
        drive(system.session, transfer_manager.run_once, cycles=1)
        (t,) = _transfers(s, dtp_id)
        assert t.status == m.Status.COMPLETED and t.transfer_method == m.TransferMethod.RSYNC
        assert "rsync" in Path(t.log_path).read_text()
