"""The dashboard's banner rule (api/banner.py): each state that needs a person gives its
item, with its level, its text and a link to the rows concerned; "All clear" only when none
does.  Built from the DB on both backends through overview_data, whose list the HTML page
and its JSON twin show."""

from __future__ import annotations

from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from ccat_data_transfer.api.dashboard_queries import overview_data
from ccat_ops_db import models as m
from helpers_dashboard import make_app
from helpers_lifecycle import (
    location,
    make_dtp,
    make_executed_obs_unit,
    make_package_at,
    make_transfer,
    set_buffer_status,
)
from operations.test_metrics import _stale_buffer_with_a_sample

GB = 1_000_000_000


def all_fresh(system, skip: tuple[str, ...] = (), total: int = 100 * GB) -> None:
    """A buffer manager has just measured every active location (10 % full), but ``skip``."""
    with system.session() as s:
        for loc in s.scalars(select(m.DataLocation).where(m.DataLocation.active.is_(True))):
            if loc.name not in skip:
                set_buffer_status(s, loc.name, total // 10, total)


def banner(system) -> list[dict[str, str]]:
    with system.session() as s:
        return overview_data(s)["banner"]


def kinds(items) -> list[str]:
    return sorted(i["kind"] for i in items)


def only(items, kind: str) -> dict[str, str]:
    assert kinds(items) == [kind], items
    return items[0]


def test_banner_is_empty_when_nothing_needs_a_person(system):
    all_fresh(system)
    assert banner(system) == []


def test_banner_names_a_location_whose_buffer_status_is_unknown(system):
    all_fresh(system, skip=("cologne_buffer",))
    item = only(banner(system), "unknown_status")
    assert item["level"] == "critical"
    assert "cologne_buffer" in item["text"] and "UNKNOWN" in item["text"]
    assert item["link"] == "/dashboard/#loc-cologne_buffer"


def test_banner_names_a_location_whose_buffer_status_is_stale(system):
    all_fresh(system)
    _stale_buffer_with_a_sample(system, "us_buffer")  # measured an hour ago, then nothing
    item = only(banner(system), "stale_status")
    assert item["level"] == "critical"
    assert "us_buffer" in item["text"] and "stale" in item["text"]
    assert "60 min ago" in item["text"]
    assert item["link"] == "/dashboard/#loc-us_buffer"


def _filed_file(system, flagged: bool, packaged: bool) -> None:
    with system.session() as s:
        pkg_id = make_package_at(system, s).package_id if packaged else None
        eou = make_executed_obs_unit(s)
        s.add(
            m.RawDataFile(
                relative_path="bad/0.fits",
                size=10,
                checksum="0" * 64,
                instrument_module_id=s.scalars(select(m.InstrumentModule)).first().id,
                executed_obs_unit_id=eou.id,
                source_location_id=location(s, "primecam_raw_data").id,
                raw_data_package_id=pkg_id,
                checksum_error="sha256 mismatch at filing" if flagged else None,
            )
        )


def test_banner_says_checksum_for_a_filed_file_with_a_checksum_error(system):
    all_fresh(system)
    _filed_file(system, flagged=True, packaged=True)
    item = only(banner(system), "checksum_error")
    assert item["level"] == "critical"
    assert item["text"].startswith("1 filed file(s) with a checksum error")
    assert item["link"] == "/dashboard/#tile-files"


def test_banner_names_a_group_blocked_by_a_checksum_error(system):
    all_fresh(system)
    _filed_file(system, flagged=True, packaged=False)
    items = banner(system)
    assert kinds(items) == ["blocked_group", "checksum_error"]
    blocked = next(i for i in items if i["kind"] == "blocked_group")
    assert blocked["text"] == "1 group(s) blocked from packaging by a file's checksum error"


def test_banner_counts_failed_transfers_and_links_to_them(system):
    all_fresh(system)
    with system.session() as s:
        dtp = make_dtp(system, s)
        make_transfer(s, dtp.dtp_id, "ccat_telescope_buffer", "cologne_buffer", m.Status.FAILED)
    item = only(banner(system), "failed_transfer")
    assert (item["level"], item["text"]) == ("critical", "1 transfer(s) FAILED")
    assert item["link"] == "/dashboard/#tile-transfers"


def test_banner_names_started_work_whose_heartbeat_stopped_and_recovery_did_not_reset(system):
    from ccat_data_transfer.operations.recovery import run_once, stalled_timeout

    all_fresh(system)
    with system.session() as s:
        one, two = make_dtp(system, s).dtp_id, make_dtp(system, s).dtp_id
        origin, dest = "ccat_telescope_buffer", "cologne_buffer"
        beating = make_transfer(s, one, origin, dest, m.Status.IN_PROGRESS)
        just_stopped = make_transfer(s, one, origin, "us_buffer", m.Status.IN_PROGRESS)
        long_stopped = make_transfer(s, two, origin, dest, m.Status.IN_PROGRESS)
        now = m.utcnow()
        for transfer_id, silent_for in (
            (beating, timedelta(seconds=1)),
            # Past the stall window, but the recovery service has not had its turn yet.
            (just_stopped, stalled_timeout() + timedelta(seconds=5)),
            (long_stopped, timedelta(hours=2)),
        ):
            s.get(m.DataTransfer, transfer_id).updated_at = now - silent_for
    item = only(banner(system), "stalled_transfer")
    assert item["level"] == "critical"
    assert item["text"].startswith("1 transfer(s) STALLED") and "recovery" in item["text"]
    assert item["link"] == "/dashboard/#tile-transfers"
    with system.session() as s:  # the recovery service resets both silent ones
        assert run_once(s)["transfers"] == 2
    assert banner(system) == []


def test_banner_names_an_audit_hold(system):
    all_fresh(system)
    with system.session() as s:
        loc = location(s, "cologne_lta")
        loc.audit_hold_at = m.utcnow()
        loc.audit_hold_reason = "2 copies failed verification"
    item = only(banner(system), "audit_hold")
    assert "cologne_lta is ON HOLD" in item["text"] and "failed verification" in item["text"]
    assert item["link"] == "/dashboard/#loc-cologne_lta"


def test_banner_counts_frozen_packages(system):
    all_fresh(system)
    with system.session() as s:
        pkg = make_package_at(system, s, ["cologne_lta"])
        s.get(m.RawDataPackage, pkg.package_id).frozen_at = m.utcnow()
    item = only(banner(system), "frozen_package")
    assert item["text"].startswith("1 package(s) FROZEN")


def test_banner_names_a_buffer_that_cannot_take_the_next_package(system):
    # Each LTA-site buffer has 1 kB in all, and a 2 kB package waits to be sent.
    all_fresh(system, skip=("cologne_buffer", "us_buffer"))
    with system.session() as s:
        for name in ("cologne_buffer", "us_buffer"):
            set_buffer_status(s, name, 10, 1000)
        dtp = make_dtp(system, s, size=2000)
        s.get(m.DataTransferPackage, dtp.dtp_id).status = m.Status.PENDING
    items = banner(system)
    assert kinds(items) == ["cannot_take_next_package"] * 2
    assert {i["link"] for i in items} == {
        "/dashboard/#loc-cologne_buffer",
        "/dashboard/#loc-us_buffer",
    }
    assert all(i["level"] == "warning" for i in items)


@pytest.fixture
def client(system):
    with TestClient(make_app(system.url)) as c:
        yield c


def test_overview_page_and_json_show_the_same_banner_with_links(system, client):
    all_fresh(system, skip=("cologne_buffer",))
    _filed_file(system, flagged=True, packaged=False)
    data = client.get("/dashboard/api/overview").json()
    assert data["banner"] == banner(system)
    assert data["attention"] == [{"level": i["level"], "text": i["text"]} for i in data["banner"]]
    html = client.get("/dashboard/").text
    assert "All clear" not in html
    for item in data["banner"]:
        assert f'<a href="{item["link"]}">{item["text"]}</a>' in html.replace("&#39;", "'")
    assert 'id="loc-cologne_buffer"' in html


def test_overview_page_says_all_clear_only_when_the_banner_is_empty(system, client):
    all_fresh(system)
    assert "All clear" in client.get("/dashboard/").text


def _archive_holding(system, size: int, capacity: int | None) -> int:
    """cologne_lta holds one PRESENT package copy of ``size`` bytes, while its filesystem
    is measured as 41 GB of 270.6 GB; returns the bytes of PRESENT copies there."""
    all_fresh(system)
    with system.session() as s:
        make_package_at(system, s, ["cologne_lta"], package_size=size)
        set_buffer_status(s, "cologne_lta", 41 * GB, 270_600_000_000)
        loc = location(s, "cologne_lta")
        loc.capacity_bytes = capacity
        s.flush()
        return int(
            s.scalar(
                select(func.sum(m.PhysicalCopy.size)).where(
                    m.PhysicalCopy.data_location_id == loc.id,
                    m.PhysicalCopy.status == m.PhysicalCopyStatus.PRESENT,
                )
            )
        )


def _shown(client, name: str) -> dict:
    data = client.get("/dashboard/api/overview").json()
    return next(loc for site in data["sites"] for loc in site["locations"] if loc["name"] == name)


def test_archive_use_without_a_quota_is_bytes_held_and_no_percent(system, client):
    held = _archive_holding(system, 201_000, None)
    assert held >= 201_000
    shown = _shown(client, "cologne_lta")
    assert (shown["used_bytes"], shown["total_bytes"], shown["disk_usage_percent"]) == (
        held,
        None,
        None,
    )
    html = client.get("/dashboard/").text
    assert "held (no quota set)" in html
    assert "270.6 GB" not in html and "41.0 GB" not in html


def test_archive_use_with_a_quota_is_bytes_held_against_it(system, client):
    held = _archive_holding(system, 201_000, 1_000_000_000_000)
    shown = _shown(client, "cologne_lta")
    assert shown["used_bytes"] == held
    assert shown["total_bytes"] == 1_000_000_000_000
    assert shown["disk_usage_percent"] == pytest.approx(100.0 * held / 1e12, abs=0.01)
    assert "of 1.0 TB quota" in client.get("/dashboard/").text


def test_use_charts_keep_buffers_and_archives_apart(system, client):
    with system.session() as s:
        for name in ("cologne_buffer", "cologne_lta", "primecam_raw_data"):
            s.add(
                m.BufferUsageSample(
                    data_location_id=location(s, name).id,
                    used_bytes=1,
                    total_bytes=10,
                    disk_usage_percent=10.0,
                    measured_at=m.utcnow() - timedelta(minutes=5),
                )
            )

    def drawn(kind: str) -> set[str]:
        resp = client.get("/dashboard/api/buffer-usage", params={"hours": 24, "kind": kind})
        assert resp.status_code == 200, resp.text
        return {series["location"] for series in resp.json()["series"]}

    assert drawn("buffer") == {"cologne_buffer"}
    assert drawn("archive") == {"cologne_lta"}
    assert drawn("all") == {"cologne_buffer", "cologne_lta", "primecam_raw_data"}
    html = client.get("/dashboard/trends").text
    assert "kind=buffer" in html and 'id="archive-chart"' in html
