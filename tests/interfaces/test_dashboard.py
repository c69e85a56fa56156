"""The web dashboard and /metrics: what the pages and their JSON show equals the DB."""

from __future__ import annotations

import re
from collections import defaultdict
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from ccat_data_transfer.api.auth import create_api_token
from ccat_ops_db import models as m
from helpers_dashboard import BUFFER_USE, make_app, populate_dashboard


@pytest.fixture
def populated(system):
    data = populate_dashboard(system)
    with TestClient(make_app(system.url)) as client:
        yield system, client, data


def _get_json(client, url, **params):
    resp = client.get(url, params=params)
    assert resp.status_code == 200, resp.text
    return resp.json()


def _state_counts(s):
    return {
        state.name: n
        for state, n in s.execute(
            select(m.RawDataPackage.state, func.count()).group_by(m.RawDataPackage.state)
        )
    }


def test_overview_json_counts_equal_database_counts(populated):
    system, client, _ = populated
    data = _get_json(client, "/dashboard/api/overview")
    with system.session() as s:
        states = _state_counts(s)
        transfers = dict(
            s.execute(select(m.DataTransfer.status, func.count()).group_by(m.DataTransfer.status))
            .tuples()
            .all()
        )
        day_ago = m.utcnow() - timedelta(days=1)
        deleted_24h = s.scalar(
            select(func.count(m.PhysicalCopy.id)).where(
                m.PhysicalCopy.status == m.PhysicalCopyStatus.DELETED,
                m.PhysicalCopy.deleted_at >= day_ago,
            )
        )
        location_names = set(s.scalars(select(m.DataLocation.name)))
    assert {k: v["count"] for k, v in data["package_states"].items() if v["count"]} == states
    assert {k: v["count"] for k, v in data["transfers"].items() if v["count"]} == {
        k.name: v for k, v in transfers.items()
    }
    assert data["deletions_last_day"]["count"] == deleted_24h > 0
    shown = {loc["name"]: loc for site in data["sites"] for loc in site["locations"]}
    assert set(shown) == location_names
    for name, (percent, state) in BUFFER_USE.items():
        assert shown[name]["disk_usage_percent"] == pytest.approx(percent)
        assert shown[name]["state"] == state
        assert (shown[name]["warning"], shown[name]["critical"], shown[name]["emergency"]) == (
            70,
            85,
            95,
        )
    assert shown["processing_scratch"]["state"] == "unknown"
    assert any("us_buffer is CRITICAL" in a["text"] for a in data["attention"])


def test_overview_page_shows_buffer_states_and_package_counts(populated):
    system, client, _ = populated
    html = client.get("/dashboard/").text
    with system.session() as s:
        states = _state_counts(s)
    for name, (_percent, state) in BUFFER_USE.items():
        assert f'data-location="{name}" data-state="{state}"' in html
    for state, n in states.items():
        assert re.search(rf'data-state="{state}"><dt>{state.lower()}</dt><dd>{n}</dd>', html), state
    assert "Needs attention" in html


def test_package_list_counts_states_and_filters_by_file_name_state_and_obs_unit(populated):
    system, client, _ = populated
    with system.session() as s:
        states = _state_counts(s)
        total = s.scalar(select(func.count(m.RawDataPackage.id)))
        by_name = s.scalar(
            select(func.count(m.RawDataPackage.id)).where(
                m.RawDataPackage.file_name.like("%chai_LFA%")
            )
        )
        by_obs = s.scalar(
            select(func.count(m.RawDataPackage.id))
            .join(m.ExecutedObsUnit)
            .where(m.ExecutedObsUnit.name == "orion_bar_map-002")
        )
    data = _get_json(client, "/dashboard/api/packages")
    assert data["total"] == total
    assert {k: v["count"] for k, v in data["state_counts"].items() if v["count"]} == states
    assert _get_json(client, "/dashboard/api/packages", file_name="CHAI_lfa")["total"] == by_name
    assert (
        _get_json(client, "/dashboard/api/packages", state="archived")["total"]
        == states["ARCHIVED"]
    )
    assert _get_json(client, "/dashboard/api/packages", obs_unit="bar_map-002")["total"] == by_obs
    both = _get_json(client, "/dashboard/api/packages", obs_unit="m83", state="FAILED")
    assert [p["state"] for p in both["items"]] == ["FAILED"]
    # A literal "%" is searched for, not used as a wildcard.
    assert _get_json(client, "/dashboard/api/packages", file_name="%")["total"] == 0
    html = client.get("/dashboard/packages", params={"state": "TRANSFERRING"}).text
    assert f'data-total="{states["TRANSFERRING"]}"' in html


def test_package_list_pages_cover_every_package_once(populated):
    system, client, _ = populated
    with system.session() as s:
        ids = set(s.scalars(select(m.RawDataPackage.id)))
    first = _get_json(client, "/dashboard/api/packages", per_page=50, page=1)
    second = _get_json(client, "/dashboard/api/packages", per_page=50, page=2)
    assert first["pages"] == second["pages"] == -(-len(ids) // 50) == 2
    seen = [p["id"] for p in first["items"] + second["items"]]
    assert len(seen) == len(set(seen)) and set(seen) == ids
    html = client.get("/dashboard/packages", params={"per_page": 50}).text
    assert 'rel="next"' in html and "page 1 / 2" in html


def test_package_list_rejects_an_unknown_state_with_a_reason(populated):
    _, client, _ = populated
    resp = client.get("/dashboard/api/packages", params={"state": "LOST"})
    assert resp.status_code == 400
    assert "ARCHIVED" in resp.json()["detail"]


def test_package_page_lists_its_copies_transfers_and_archive_moves(populated):
    system, client, data = populated
    pid = data.archived_package_id
    detail = _get_json(client, f"/dashboard/api/packages/{pid}")
    with system.session() as s:
        pkg = s.get(m.RawDataPackage, pid)
        copies = {(c.id, c.data_location.name, c.status.name) for c in pkg.physical_copies}
        transfer_ids = set(
            s.scalars(
                select(m.DataTransfer.id).where(
                    m.DataTransfer.data_transfer_package_id == pkg.data_transfer_package_id
                )
            )
        )
        lta_ids = set(
            s.scalars(
                select(m.LongTermArchiveTransfer.id).where(
                    m.LongTermArchiveTransfer.raw_data_package_id == pid
                )
            )
        )
    assert {(c["id"], c["location"], c["status"]) for c in detail["copies"]} == copies
    assert {t["id"] for t in detail["transfers"]} == transfer_ids
    assert {a["id"] for a in detail["archive_transfers"]} == lta_ids
    deleted = [c for c in detail["copies"] if c["status"] == "DELETED"]
    assert deleted and all(c["deleted_at"] for c in deleted)
    html = client.get(f"/dashboard/packages/{pid}").text
    for copy_id, _loc, status in copies:
        assert f'data-copy-id="{copy_id}" data-status="{status}"' in html
    for tid in transfer_ids:
        assert f'data-transfer-id="{tid}"' in html
    for aid in lta_ids:
        assert f'data-archive-id="{aid}"' in html


def test_unknown_package_page_is_404(populated):
    _, client, _ = populated
    assert client.get("/dashboard/packages/999999").status_code == 404
    assert client.get("/dashboard/api/packages/999999").status_code == 404


def test_deletions_filter_by_location_and_time_window(populated):
    system, client, _ = populated

    def db_counts(hours, location=None):
        since = m.utcnow() - timedelta(hours=hours)
        with system.session() as s:
            log_q = select(func.count(m.DeletionLog.id)).where(m.DeletionLog.created_at >= since)
            copy_q = (
                select(func.count(m.PhysicalCopy.id), func.sum(m.PhysicalCopy.size))
                .join(m.DataLocation)
                .where(
                    m.PhysicalCopy.status == m.PhysicalCopyStatus.DELETED,
                    m.PhysicalCopy.deleted_at >= since,
                )
            )
            if location:
                log_q = log_q.where(m.DeletionLog.location_name == location)
                copy_q = copy_q.where(m.DataLocation.name == location)
            n_copies, size = s.execute(copy_q).one()
            return s.scalar(log_q), n_copies, int(size or 0)

    for hours, location in [
        (24, None),
        (168, None),
        (24, "ccat_telescope_buffer"),
        (168, "cologne_buffer"),
        (24, "cologne_buffer"),
    ]:
        params = {"hours": hours, **({"location": location} if location else {})}
        data = _get_json(client, "/dashboard/api/deletions", **params)
        n_log, n_copies, size = db_counts(hours, location)
        assert data["log"]["total"] == n_log, params
        assert len(data["log"]["items"]) == n_log
        assert (data["deleted_copies"]["total"], data["deleted_copies"]["bytes"]) == (
            n_copies,
            size,
        )
        if location:
            assert {e["location"] for e in data["log"]["items"]} <= {location}
            assert {c["location"] for c in data["deleted_copies"]["items"]} <= {location}
    assert db_counts(168)[1] > db_counts(24)[1] > 0
    html = client.get("/dashboard/deletions", params={"hours": 24}).text
    assert f'data-stat="deleted-copies"><dt>copies</dt><dd>{db_counts(24)[1]}</dd>' in html
    assert client.get("/dashboard/api/deletions", params={"location": "nowhere"}).status_code == 404
    assert client.get("/dashboard/api/deletions", params={"hours": 0}).status_code == 422


def test_staging_page_shows_each_job_with_progress(populated):
    system, client, data = populated
    staging = _get_json(client, "/dashboard/api/staging")
    with system.session() as s:
        jobs = {j.id: j for j in s.scalars(select(m.StagingJob))}
        active = sum(1 for j in jobs.values() if j.active)
        shown = {j["id"]: j for j in staging["items"]}
        assert set(shown) == set(jobs)
        for jid, job in jobs.items():
            assert shown[jid]["status"] == job.status.name
            assert (shown[jid]["packages_done"], shown[jid]["packages_total"]) == (
                job.packages_done,
                job.packages_total,
            )
            assert shown[jid]["destination"] == job.destination_location.name
            assert shown[jid]["active"] == job.active
    assert staging["active"] == active
    assert sum(staging["counts"].values()) == len(jobs)
    html = client.get("/dashboard/staging").text
    assert "2 / 5 packages" in html
    assert f'data-stat="active"><span class="n">{active}</span>' in html


def test_buffer_usage_series_follow_the_samples(populated):
    system, client, _ = populated
    data = _get_json(client, "/dashboard/api/buffer-usage", hours=72)
    with system.session() as s:
        sampled = set(
            s.scalars(
                select(m.DataLocation.name)
                .join(
                    m.BufferUsageSample, m.BufferUsageSample.data_location_id == m.DataLocation.id
                )
                .distinct()
            )
        )
    assert {x["location"] for x in data["series"]} == sampled == set(BUFFER_USE)
    for series in data["series"]:
        percent = BUFFER_USE[series["location"]][0]
        assert 40 <= len(series["points"]) <= 300
        assert series["points"][-1]["percent"] == pytest.approx(percent)
        assert max(p["percent"] for p in series["points"]) == pytest.approx(percent)
        times = [p["t"] for p in series["points"]]
        assert times == sorted(times)
    one = _get_json(client, "/dashboard/api/buffer-usage", hours=2, location="us_buffer")
    assert [x["location"] for x in one["series"]] == ["us_buffer"]
    assert len(one["series"][0]["points"]) <= 3


def test_throughput_is_completed_bytes_grouped_by_day_of_end_time(populated):
    system, client, _ = populated
    data = _get_json(client, "/dashboard/api/throughput", days=14)
    today = m.utcnow().date()
    first = today - timedelta(days=13)
    expected: dict[str, int] = defaultdict(int)
    with system.session() as s:
        for t in s.scalars(select(m.DataTransfer)):
            if t.status == m.Status.COMPLETED and t.end_time and t.end_time.date() >= first:
                expected[t.end_time.date().isoformat()] += t.bytes_transferred
    assert len(data["days"]) == 14
    assert data["days"][0]["day"] == first.isoformat()
    assert data["days"][-1]["day"] == today.isoformat()
    assert {d["day"]: d["bytes"] for d in data["days"] if d["bytes"]} == dict(expected)
    assert data["total_bytes"] == sum(expected.values()) > 0
    html = client.get("/dashboard/trends", params={"days": 14}).text
    assert f'data-bytes="{data["total_bytes"]}"' in html


def test_metrics_endpoint_serves_prometheus_text(populated):
    system, client, _ = populated
    with system.session() as s:
        archived = _state_counts(s)["ARCHIVED"]
    resp = client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    assert f'ccat_raw_data_packages{{state="ARCHIVED"}} {float(archived)}' in resp.text


def test_private_dashboard_needs_a_viewer_token(populated, override_settings):
    system, client, _ = populated
    override_settings(DASHBOARD_PUBLIC=False)
    with system.session() as s:
        viewer = create_api_token(s, "night-operator", "viewer")
        instrument = create_api_token(s, "primecam", "instrument", instrument="primecam")
    assert client.get("/dashboard/").status_code == 401
    assert client.get("/dashboard/api/overview").status_code == 401
    bad = {"Authorization": "Bearer nonsense"}
    assert client.get("/dashboard/api/overview", headers=bad).status_code == 401
    other = {"Authorization": f"Bearer {instrument}"}
    assert client.get("/dashboard/api/overview", headers=other).status_code == 403
    ok = {"Authorization": f"Bearer {viewer}"}
    assert client.get("/dashboard/api/overview", headers=ok).status_code == 200
    assert client.get("/dashboard/", headers=ok).status_code == 200


def test_only_the_dashboard_static_files_are_served(populated):
    _, client, _ = populated
    css = client.get("/dashboard/static/dashboard.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert client.get("/dashboard/static/dashboard.js").status_code == 200
    assert client.get("/dashboard/static/..%2Fdashboard.py").status_code == 404
    assert client.get("/dashboard/static/index.html").status_code == 404


def test_every_page_renders_on_an_empty_database(system):
    with TestClient(make_app(system.url)) as client:
        for url in [
            "/dashboard/",
            "/dashboard/packages",
            "/dashboard/deletions",
            "/dashboard/staging",
            "/dashboard/trends",
        ]:
            resp = client.get(url)
            assert resp.status_code == 200, url
            assert "<main>" in resp.text
        assert _get_json(client, "/dashboard/api/packages")["total"] == 0
        assert _get_json(client, "/dashboard/api/buffer-usage")["series"] == []
