"""Routing that knows capacity: the round-robin skips an LTA site whose landing buffer
cannot take a package now, a package no site can take waits, a package no buffer could
ever take is refused at packaging, and disk-monitor / the dashboard say so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from ccat_data_transfer import transfer_manager
from ccat_data_transfer.api.dashboard_queries import overview_data
from ccat_data_transfer.core.buffer_status import publish_status
from ccat_data_transfer.packaging import raw_cycle, transfer_cycle
from ccat_data_transfer.packaging import transfer_packages as dtpm
from ccat_ops_db import models as m
from helpers_pipeline import make_raw_files
from helpers_transfer import make_dtp_rows_only

CONSOLE_SCRIPT = Path(sys.executable).parent / "ccat_data_transfer"
SIZE = 500_000  # bytes of each package in these tests
MARGIN = 100


@pytest.fixture
def small_margin(override_settings):
    override_settings(ROUTING_FREE_SPACE_MARGIN_BYTES=MARGIN, ROUTING_FREE_SPACE_MARGIN_PERCENT=0)


def _publish(s, location, used, total, state="normal"):
    publish_status(
        {
            "location": location,
            "used_bytes": used,
            "total_bytes": total,
            "disk_usage_percent": 100.0 * used / total,
            "state": state,
        },
        s,
    )
    s.commit()


def _packages(system, s, count, size=SIZE):
    ids = make_dtp_rows_only(system, s, count)
    s.execute(
        update(m.DataTransferPackage).where(m.DataTransferPackage.id.in_(ids)).values(size=size)
    )
    s.commit()
    return ids


def _sites_of(s, transfer_ids):
    return [s.get(m.DataTransfer, t).destination_location.site.name for t in transfer_ids]


def test_round_robin_skips_a_site_without_room_for_package_plus_margin_and_returns_when_it_has(
    system, small_margin, caplog
):
    caplog.set_level("INFO")
    with system.session() as s:
        # cologne: 400_000 free, less than SIZE + MARGIN.
        _publish(s, "cologne_buffer", 600_000, 1_000_000)
        _publish(s, "us_buffer", 0, 10_000_000)
        _packages(system, s, 4)
        created = transfer_manager.plan_primary_transfers(s)
        assert _sites_of(s, created) == ["us"] * 4
        assert any("routing_skipped_site" in str(r.msg) for r in caplog.records)
        # cologne recovers (data deleted): the rotation uses it again.
        _publish(s, "cologne_buffer", 0, 1_000_000)
        _packages(system, s, 2)
        assert sorted(_sites_of(s, transfer_manager.plan_primary_transfers(s))) == [
            "cologne",
            "us",
        ]


def test_packages_routed_in_one_cycle_count_against_the_room_of_their_buffer(system, small_margin):
    with system.session() as s:
        _publish(s, "cologne_buffer", 0, 1_000_000)  # room for one package, not two
        _publish(s, "us_buffer", 0, 10_000_000)
        _packages(system, s, 6)
        sites = _sites_of(s, transfer_manager.plan_primary_transfers(s))
        assert sites.count("cologne") == 1 and sites.count("us") == 5


@pytest.mark.parametrize("state", ["critical", "emergency"])
def test_round_robin_skips_a_buffer_in_critical_or_emergency_state_until_it_recovers(
    system, small_margin, state
):
    with system.session() as s:
        _publish(s, "cologne_buffer", 90_000_000, 100_000_000, state)  # 10 MB free
        _publish(s, "us_buffer", 0, 100_000_000)
        _packages(system, s, 3, size=1000)
        assert _sites_of(s, transfer_manager.plan_primary_transfers(s)) == ["us"] * 3
        _publish(s, "cologne_buffer", 50_000_000, 100_000_000, "normal")
        _packages(system, s, 2, size=1000)
        assert sorted(_sites_of(s, transfer_manager.plan_primary_transfers(s))) == [
            "cologne",
            "us",
        ]


def test_no_site_with_room_the_package_waits_pending_with_no_transfer_and_no_retry(
    system, small_margin, caplog
):
    with system.session() as s:
        _publish(s, "cologne_buffer", 900_000, 1_000_000, "critical")
        _publish(s, "us_buffer", 600_000, 1_000_000)
        (dtp_id,) = _packages(system, s, 1)
    for _ in range(3):
        with system.session() as s:
            transfer_manager.run_once(s)
    with system.session() as s:
        assert s.get(m.DataTransferPackage, dtp_id).status == m.Status.PENDING
        assert s.scalars(select(m.DataTransfer)).all() == []
        failed = s.scalars(
            select(m.DataTransferPackage).where(m.DataTransferPackage.status == m.Status.FAILED)
        ).all()
        assert failed == []
    waiting = [r for r in caplog.records if "primary_transfers_waiting" in str(r.msg)]
    assert waiting and "us_buffer cannot take next package" in str(waiting[-1].msg)
    with system.session() as s:
        _publish(s, "us_buffer", 0, 1_000_000)
        (tid,) = transfer_manager.plan_primary_transfers(s)
        t = s.get(m.DataTransfer, tid)
        assert t.destination_location.name == "us_buffer" and t.retry_count == 0


def test_expired_status_falls_back_to_the_last_measured_sample(system, small_margin):
    with system.session() as s:
        for name, used in (("cologne_buffer", 600_000), ("us_buffer", 0)):
            s.add(
                m.BufferUsageSample(
                    data_location_id=system.location(s, name).id,
                    used_bytes=used,
                    total_bytes=1_000_000,
                    disk_usage_percent=used / 10_000,
                )
            )
        s.commit()
        _packages(system, s, 2, size=300_000)
        # No live status: cologne's last sample says 400_000 free, enough for one only.
        assert sorted(_sites_of(s, transfer_manager.plan_primary_transfers(s))) == [
            "cologne",
            "us",
        ]
        _packages(system, s, 2, size=300_000)
        assert _sites_of(s, transfer_manager.plan_primary_transfers(s)) == ["us", "us"]


def test_never_measured_buffer_of_unknown_capacity_still_takes_packages(system, small_margin):
    with system.session() as s:
        for name in ("cologne_buffer", "us_buffer"):
            system.location(s, name).capacity_bytes = None
        s.commit()
        _packages(system, s, 4)
        assert sorted(_sites_of(s, transfer_manager.plan_primary_transfers(s))) == [
            "cologne",
            "cologne",
            "us",
            "us",
        ]


def _raw_waiting(system, count, size):
    for i in range(count):
        make_raw_files(system, "primecam_raw_data", f"eou-route-{i}", "primecam/280GHz", 1, size)
    with system.session() as s:
        assert raw_cycle.run_once(s)["packages_created"] == count
        return [p.id for p in s.scalars(select(m.RawDataPackage).order_by(m.RawDataPackage.id))]


def test_raw_package_larger_than_every_lta_buffer_is_refused_at_packaging_and_stays(
    system, small_margin, override_settings
):
    override_settings(DATA_TRANSFER_PACKAGE_MAX_WAIT_SECONDS=0)
    (big,) = _raw_waiting(system, 1, 20_000)
    with system.session() as s:
        size = s.get(m.RawDataPackage, big).size
        for name in ("cologne_buffer", "us_buffer"):
            system.location(s, name).capacity_bytes = size - 1000
        s.commit()
    with system.session() as s:
        summary = transfer_cycle.run_once(s)
    assert summary["refused_too_large"] == [big]
    assert summary["packages_submitted"] == 0
    with system.session() as s:
        pkg = s.get(m.RawDataPackage, big)
        assert pkg.state == m.PackageState.FAILED and pkg.data_transfer_package_id is None
        assert f"{size} bytes is larger than any LTA-site buffer" in pkg.failure_reason
        assert f"{size - 1000 - MARGIN} bytes at " in pkg.failure_reason
        assert s.scalars(select(m.DataTransferPackage)).all() == []
        copy = s.scalars(
            select(m.RawDataPackagePhysicalCopy).where(
                m.RawDataPackagePhysicalCopy.raw_data_package_id == big
            )
        ).one()
        assert copy.status == m.PhysicalCopyStatus.PRESENT
        assert (Path(copy.data_location.path) / copy.relative_path).is_file()


def test_bundles_close_before_passing_the_largest_buffer_capacity():
    now = m.utcnow()
    old = now - timedelta(hours=1)
    packages = [(1, 400, old), (2, 400, old), (3, 400, old), (4, 400, old)]
    assert dtpm.bundle_packages(packages, 10_000, 0, now, max_size=900) == [[1, 2], [3, 4]]
    assert dtpm.bundle_packages(packages, 10_000, 0, now) == [[1, 2, 3, 4]]


def _disk_monitor(system, *args):
    env = {
        **os.environ,
        "CCAT_DATA_TRANSFER_DATA_DIR": str(system.data_dir),
        "CCAT_DATA_TRANSFER_DATABASE_URL": system.url,
        "CCAT_DATA_TRANSFER_ROUTING_FREE_SPACE_MARGIN_BYTES": str(MARGIN),
        "CCAT_DATA_TRANSFER_ROUTING_FREE_SPACE_MARGIN_PERCENT": "0",
    }
    return subprocess.run(
        [str(CONSOLE_SCRIPT), "disk-monitor", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_disk_monitor_says_when_a_buffer_cannot_take_the_next_waiting_package(system):
    with system.session() as s:
        system.location(s, "cologne_buffer").capacity_bytes = 2_000_000
        system.location(s, "us_buffer").capacity_bytes = 10_000_000
        s.commit()
        (dtp_id,) = _packages(system, s, 1, size=3_000_000)
    done = _disk_monitor(system, "--site", "cologne")
    assert done.returncode == 0, done.stderr
    assert "cologne_buffer cannot take next package (3.0 MB needed, 2.0 MB free)" in done.stdout
    rows = {r["location"]: r for r in json.loads(_disk_monitor(system, "--all", "--json").stdout)}
    assert rows["cologne_buffer"]["next_package"]["can_take"] is False
    assert rows["cologne_buffer"]["next_package"]["data_transfer_package_id"] == dtp_id
    assert rows["us_buffer"]["next_package"]["can_take"] is True
    assert rows["ccat_telescope_buffer"]["next_package"] is None  # not an LTA-site buffer


def test_dashboard_overview_says_when_a_buffer_cannot_take_the_next_waiting_package(
    system, small_margin
):
    with system.session() as s:
        _publish(s, "cologne_buffer", 600_000, 1_000_000)
        _publish(s, "us_buffer", 0, 10_000_000)
        _packages(system, s, 1)
        data = overview_data(s)
    locs = {loc["name"]: loc for site in data["sites"] for loc in site["locations"]}
    reason = locs["cologne_buffer"]["next_package"]["reason"]
    assert reason == "cologne_buffer cannot take next package (500.1 kB needed, 400.0 kB free)"
    assert locs["us_buffer"]["next_package"]["can_take"] is True
    assert {"level": "warning", "text": reason} in data["attention"]


@pytest.mark.parametrize("state", ["critical", "emergency"])
def test_a_transfer_to_a_buffer_under_pressure_waits_pending_uncharged_until_it_recovers(
    system, small_margin, state
):
    with system.session() as s:
        for buffer in ("ccat_telescope_buffer", "cologne_buffer", "us_buffer"):
            _publish(s, buffer, 0, 100_000_000)
        _packages(system, s, 2, size=1000)
        planned = transfer_manager.plan_primary_transfers(s)
        assert sorted(_sites_of(s, planned)) == ["cologne", "us"]
        # After routing, cologne fills up (its own data, another secondary copy...).
        _publish(s, "cologne_buffer", 96_000_000, 100_000_000, state)
        sent = transfer_manager.dispatch_transfers(s, submit=False)
        to_cologne = [t for t in planned if _sites_of(s, [t]) == ["cologne"]]
        to_us = [t for t in planned if t not in to_cologne]
        assert sent == to_us
        waiting = s.get(m.DataTransfer, to_cologne[0])
        assert (waiting.status, waiting.retry_count) == (m.Status.PENDING, 0)
        _publish(s, "cologne_buffer", 10_000_000, 100_000_000, "normal")
        assert transfer_manager.dispatch_transfers(s, submit=False) == to_cologne
