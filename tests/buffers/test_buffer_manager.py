"""Buffer manager: measurement, classification, publication, history and escalation."""

from __future__ import annotations

from sqlalchemy import select

from ccat_data_transfer import deletion_manager as dm
from ccat_data_transfer.buffers.cycle import BufferManager, measure_location, send_alert
from ccat_data_transfer.core import buffer_status as bs
from ccat_ops_db import models as m
from helpers_lifecycle import location, make_package_at, write_object
from helpers_webhook import webhook_fixture  # noqa: F401 - the webhook fixture


def _fill(system, name, capacity, used):
    with system.session() as s:
        location(s, name).capacity_bytes = capacity
        if used:
            write_object(s, name, "filler.bin", b"x" * used)


def test_disk_location_measured_against_capacity_published_and_sampled(system):
    _fill(system, "cologne_buffer", 1000, 750)
    with system.session() as s:
        result = BufferManager().run_once(s)
    st = result["cologne_buffer"]
    assert st["used_bytes"] == 750 and st["total_bytes"] == 1000
    assert st["disk_usage_percent"] == 75.0 and st["state"] == "warning"
    back = dm.get_buffer_status_for_location("cologne_buffer")
    assert back["disk_usage_percent"] == 75.0 and back["state"] == "warning"
    with system.session() as s:
        samples = s.scalars(
            select(m.BufferUsageSample).where(
                m.BufferUsageSample.data_location_id == location(s, "cologne_buffer").id
            )
        ).all()
        assert [x.used_bytes for x in samples] == [750]


def test_location_without_capacity_uses_the_filesystem(system):
    with system.session() as s:
        loc = location(s, "cologne_lta")
        assert loc.capacity_bytes is None
        st = measure_location(s, loc)
    assert st["total_bytes"] > 0 and 0 <= st["disk_usage_percent"] <= 100


def test_per_location_thresholds_override_the_settings(system):
    _fill(system, "us_buffer", 1000, 500)
    with system.session() as s:
        location(s, "us_buffer").warning_threshold_percent = 40
        location(s, "us_buffer").critical_threshold_percent = 45
    with system.session() as s:
        assert BufferManager().run_once(s)["us_buffer"]["state"] == "critical"


def test_s3_location_measured_from_db_bytes_against_quota(system):
    with system.session() as s:
        site = s.scalars(select(m.Site).filter_by(name="cologne")).one()
        s3 = m.S3DataLocation(
            name="cologne_s3_buffer",
            site_id=site.id,
            location_type=m.LocationType.BUFFER,
            bucket="nowhere",
            endpoint_url="http://127.0.0.1:9",
            capacity_bytes=1000,
            priority=5,
        )
        s.add(s3)
        s.flush()
        pkg = make_package_at(system, s, ["cologne_lta"], files=0)
        for size, status in (
            (600, m.PhysicalCopyStatus.PRESENT),
            (300, m.PhysicalCopyStatus.DELETED),
        ):
            s.add(
                m.RawDataPackagePhysicalCopy(
                    raw_data_package_id=pkg.package_id,
                    data_location_id=s3.id,
                    status=status,
                    size=size,
                )
            )
    with system.session() as s:
        st = BufferManager().run_once(s)["cologne_s3_buffer"]
    assert st["used_bytes"] == 600 and st["disk_usage_percent"] == 60.0 and st["state"] == "normal"


def test_critical_state_limits_transfers_and_shortens_sleep(system, override_settings):
    override_settings(
        MAX_CRITICAL_TRANSFERS=1, DELETION_MANAGER_SLEEP_TIME=5, CRITICAL_SLEEP_DIVISOR=5
    )
    assert dm.sleep_time() == 5.0
    _fill(system, "ccat_telescope_buffer", 1000, 900)
    with system.session() as s:
        BufferManager().run_once(s)
        state = bs.state_of("ccat_telescope_buffer", s)
    assert state == bs.BufferState.CRITICAL
    assert bs.transfer_limit(state) == 1
    assert dm.sleep_time() == 1.0


def test_emergency_sends_one_alert_to_the_webhook(system, override_settings, webhook):
    url, received = webhook
    override_settings(ALERT_WEBHOOK_URL=url)
    _fill(system, "us_buffer", 1000, 990)
    with system.session() as s:
        BufferManager().run_once(s)
    assert len(received) == 1
    alert = received[0]
    assert alert["event"] == "buffer_emergency" and alert["location"] == "us_buffer"
    assert alert["site"] == "us" and alert["disk_usage_percent"] == 99.0
    with system.session() as s:  # still in emergency: no new alert
        BufferManager().run_once(s)
    assert len(received) == 1


def test_alert_webhook_failure_is_logged_not_raised(system, override_settings):
    override_settings(
        ALERT_WEBHOOK_URL="http://127.0.0.1:9/unreachable", ALERT_WEBHOOK_TIMEOUT_SECONDS=2
    )
    assert send_alert({"event": "buffer_emergency", "location": "x"}) is False
    _fill(system, "us_buffer", 1000, 990)
    with system.session() as s:
        assert BufferManager().run_once(s)["us_buffer"]["state"] == "emergency"


def test_redis_down_means_unknown_status_and_no_pressure(system, override_settings):
    override_settings(EXECUTION_MODE="distributed", REDIS_URL="redis://127.0.0.1:1/0")
    try:
        status = dm.get_buffer_status_for_location("cologne_buffer")
        assert status == {}
        with system.session() as s:
            assert not dm.should_delete_based_on_buffer_status(
                location(s, "cologne_buffer"), status
            )
            assert bs.state_of("cologne_buffer") == bs.BufferState.UNKNOWN
    finally:
        override_settings(EXECUTION_MODE="embedded")


def test_should_delete_based_on_buffer_status_rules(system):
    with system.session() as s:
        buf, lta = location(s, "cologne_buffer"), location(s, "cologne_lta")
        full = {"state": "emergency", "disk_usage_percent": 99.0}
        assert dm.should_delete_based_on_buffer_status(buf, full)
        assert not dm.should_delete_based_on_buffer_status(lta, full)
        assert not dm.should_delete_based_on_buffer_status(buf, {})
        assert not dm.should_delete_based_on_buffer_status(
            buf, {"state": "warning", "disk_usage_percent": 80}
        )
        assert dm.should_delete_based_on_buffer_status(
            buf, {"state": "critical", "disk_usage_percent": 86}
        )
