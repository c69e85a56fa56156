"""The dashboard in a real browser (headless Chromium via Playwright): pages load, the
numbers shown equal the DB, the charts are drawn by the page's own script, no script
error.  Screenshots go to test-artifacts/.

Needs Debian's ``chromium`` at /usr/bin/chromium (Playwright never downloads a browser
here).  Without it the tests skip on a workstation and FAIL in CI (CI=true).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from sqlalchemy import delete, func, select
from test_banner import _filed_file, all_fresh

from ccat_ops_db import models as m
from helpers_dashboard import BUFFER_USE, make_app, populate_dashboard

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def _browser_missing() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} not found (apt-get install -y chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[test]')"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    reason = _browser_missing()
    if reason:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"browser tests cannot run in CI: {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """Run ``app`` with uvicorn on 127.0.0.1 (a free port) in a thread; stop it after."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:  # readiness of a real server, not a fixed wait
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


@pytest.fixture
def site(system, browser) -> Iterator[tuple[Any, str, Any, Any]]:
    """(system, base URL, page, populated data) with the dashboard served on loopback."""
    data = populate_dashboard(system)
    with serve(make_app(system.url)) as base:
        context = browser.new_context(viewport={"width": 1440, "height": 900})
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.on(
            "response",
            lambda r: errors.append(f"HTTP {r.status} {r.url}") if r.status >= 400 else None,
        )
        page.set_default_timeout(15000)
        yield system, base, page, data
        context.close()
        assert errors == [], f"browser reported errors: {errors}"


def _shot(page: Any, system: Any, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    backend = "sqlite" if system.url.startswith("sqlite") else "postgresql"
    path = ARTIFACTS / f"dashboard-{name}-{backend}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def test_overview_shows_the_database_numbers_and_buffer_gauges(site):
    system, base, page, _ = site
    page.goto(f"{base}/dashboard/")
    with system.session() as s:
        states = dict(
            s.execute(select(m.RawDataPackage.state, func.count()).group_by(m.RawDataPackage.state))
            .tuples()
            .all()
        )
        day_ago = m.utcnow() - timedelta(days=1)
        deleted = s.scalar(
            select(func.count(m.PhysicalCopy.id)).where(
                m.PhysicalCopy.status == m.PhysicalCopyStatus.DELETED,
                m.PhysicalCopy.deleted_at >= day_ago,
            )
        )
    for state in m.PackageState:
        shown = page.inner_text(f"#tile-packages [data-state={state.name}] dd")
        assert int(shown) == states.get(state, 0), state
    assert int(page.inner_text("#tile-deletions [data-stat=deleted] dd")) == deleted
    for name, (percent, state) in BUFFER_USE.items():
        row = page.locator(f"tr[data-location={name}]")
        assert row.get_attribute("data-state") == state
        assert row.locator(".pct").inner_text() == f"{percent:.1f}"
        assert row.locator(".gauge").get_attribute("aria-valuenow") == f"{percent:.1f}"
        assert row.locator(f".badge.s-{state}").inner_text().lower() == state
    assert "us_buffer is CRITICAL" in page.inner_text("#attention")
    _shot(page, system, "overview")


def test_package_search_finds_packages_and_opens_a_package_page(site):
    system, base, page, data = site
    page.goto(f"{base}/dashboard/packages")
    with system.session() as s:
        total = s.scalar(select(func.count(m.RawDataPackage.id)))
        lfa = s.scalar(
            select(func.count(m.RawDataPackage.id)).where(
                m.RawDataPackage.file_name.like("%chai_LFA%")
            )
        )
    assert int(page.get_attribute("#result-count [data-total]", "data-total")) == total
    assert page.locator("#package-table tbody tr").count() == 50
    _shot(page, system, "packages")

    page.fill("input[name=file_name]", "chai_LFA")
    page.click("#package-search button[type=submit]")
    page.wait_for_url("**file_name=chai_LFA**")
    assert int(page.get_attribute("#result-count [data-total]", "data-total")) == lfa
    assert page.locator("#package-table tbody tr").count() == lfa

    page.select_option("select[name=state]", "FAILED")
    page.click("#package-search button[type=submit]")
    page.wait_for_url("**state=FAILED**")
    page.click("#package-table tbody tr a")
    page.wait_for_url(f"**/dashboard/packages/{data.failed_package_id}")
    assert "checksum mismatch" in page.inner_text("main")

    page.goto(f"{base}/dashboard/packages/{data.archived_package_id}")
    with system.session() as s:
        pkg = s.get(m.RawDataPackage, data.archived_package_id)
        copies = {c.id: c.status.name for c in pkg.physical_copies}
        transfers = s.scalar(
            select(func.count(m.DataTransfer.id)).where(
                m.DataTransfer.data_transfer_package_id == pkg.data_transfer_package_id
            )
        )
    rows = page.locator("#copies-table tbody tr")
    assert rows.count() == len(copies)
    for i in range(rows.count()):
        row = rows.nth(i)
        assert copies[int(row.get_attribute("data-copy-id"))] == row.get_attribute("data-status")
    assert page.locator("#transfers-table tbody tr[data-transfer-id]").count() == transfers
    assert page.locator("#archive-table tbody tr").count() == 2
    _shot(page, system, "package")


def test_deletions_page_filters_by_location_and_window(site):
    system, base, page, _ = site
    page.goto(f"{base}/dashboard/deletions")
    page.select_option("select[name=location]", "cologne_buffer")
    page.select_option("select[name=hours]", "168")
    page.click("#deletion-filter button[type=submit]")
    page.wait_for_url("**location=cologne_buffer**")
    since = m.utcnow() - timedelta(hours=168)
    with system.session() as s:
        n = s.scalar(
            select(func.count(m.PhysicalCopy.id))
            .join(m.DataLocation)
            .where(
                m.DataLocation.name == "cologne_buffer",
                m.PhysicalCopy.status == m.PhysicalCopyStatus.DELETED,
                m.PhysicalCopy.deleted_at >= since,
            )
        )
        logged = s.scalar(
            select(func.count(m.DeletionLog.id)).where(
                m.DeletionLog.location_name == "cologne_buffer", m.DeletionLog.created_at >= since
            )
        )
    assert n > 0
    assert int(page.inner_text("[data-stat=deleted-copies] dd")) == n
    assert page.locator("#deleted-table tbody tr").count() == n
    assert page.locator("#log-table tbody tr").count() == logged
    page.goto(f"{base}/dashboard/deletions?hours=24")
    _shot(page, system, "deletions")


def test_staging_page_shows_jobs_with_progress(site):
    system, base, page, _ = site
    page.goto(f"{base}/dashboard/staging")
    with system.session() as s:
        jobs = {j.id: j for j in s.scalars(select(m.StagingJob))}
        active = sum(1 for j in jobs.values() if j.active)
    rows = page.locator("#staging-table tbody tr")
    assert rows.count() == len(jobs)
    for i in range(rows.count()):
        row = rows.nth(i)
        job = jobs[int(row.get_attribute("data-job-id"))]
        assert row.get_attribute("data-status") == job.status.name
        assert f"{job.packages_done} / {job.packages_total} packages" in row.inner_text()
    assert int(page.inner_text("[data-stat=active] .n")) == active
    _shot(page, system, "staging")


def test_trend_charts_are_drawn_from_the_json_endpoints(site):
    system, base, page, _ = site
    page.goto(f"{base}/dashboard/trends?hours=72&days=14")
    page.wait_for_selector("#buffer-chart[data-rendered=true]")
    page.wait_for_selector("#throughput-chart[data-rendered=true]")
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
    lines = page.locator("#buffer-chart svg polyline")
    assert {lines.nth(i).get_attribute("data-location") for i in range(lines.count())} == sampled
    bars = page.locator("#throughput-chart svg rect.bar")
    assert bars.count() == 14
    drawn = sum(int(bars.nth(i).get_attribute("data-bytes")) for i in range(bars.count()))
    assert drawn == int(page.get_attribute("#throughput-total [data-bytes]", "data-bytes")) > 0
    _shot(page, system, "trends")


def _banner_seen(browser: Any, system: Any, tmp_path: Path, name: str) -> tuple[str, list[str]]:
    """The overview's banner text and links as the browser shows them; a screenshot of the
    page is saved as ``banner-{name}.png`` in ``tmp_path``; the first link is followed."""
    with serve(make_app(system.url)) as base:
        context = browser.new_context(viewport={"width": 1440, "height": 900})
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(f"{base}/dashboard/")
        text = page.inner_text("#attention")
        links = [a.get_attribute("href") for a in page.locator("#attention a").element_handles()]
        page.screenshot(path=str(tmp_path / f"banner-{name}.png"), full_page=True)
        if links:
            page.click("#attention a >> nth=0")
            page.wait_for_url(f"**{links[0]}")
            target = links[0].split("#", 1)[1]
            assert page.locator(f"#{target}").is_visible()
        context.close()
    assert errors == []
    return text, links


def test_banner_in_a_browser_all_clear_unknown_status_and_checksum_error(system, browser, tmp_path):
    all_fresh(system)
    text, links = _banner_seen(browser, system, tmp_path, "all-clear")
    assert text.startswith("All clear")
    assert links == []

    with system.session() as s:  # no buffer manager has measured us_buffer
        us = s.scalar(select(m.DataLocation.id).where(m.DataLocation.name == "us_buffer"))
        s.execute(delete(m.BufferStatus).where(m.BufferStatus.data_location_id == us))
    text, links = _banner_seen(browser, system, tmp_path, "unknown-status")
    assert "All clear" not in text
    assert "Needs attention" in text
    assert "us_buffer: buffer status UNKNOWN" in text
    assert links == ["/dashboard/#loc-us_buffer"]

    all_fresh(system)
    _filed_file(system, flagged=True, packaged=False)
    text, links = _banner_seen(browser, system, tmp_path, "checksum-error")
    assert "All clear" not in text
    assert "1 filed file(s) with a checksum error" in text
    assert "1 group(s) blocked from packaging by a file's checksum error" in text
    assert links == ["/dashboard/#tile-files", "/dashboard/#tile-files"]
    for name in ("all-clear", "unknown-status", "checksum-error"):
        assert (tmp_path / f"banner-{name}.png").stat().st_size > 10_000


def test_banner_in_a_browser_stale_stalled_failed_hold_and_emergency(system, browser, tmp_path):
    """Each further state of the banner rule, as a person sees it: every new item is
    shown with its words and a link that lands on the rows concerned."""
    from helpers_lifecycle import location, make_dtp, make_transfer, set_buffer_status
    from operations.test_metrics import _stale_buffer_with_a_sample

    all_fresh(system)
    _stale_buffer_with_a_sample(system, "us_buffer")  # measured an hour ago, then nothing
    text, links = _banner_seen(browser, system, tmp_path, "stale-status")
    assert "us_buffer: buffer status UNKNOWN, stale: last measured 60 min ago" in text
    assert links == ["/dashboard/#loc-us_buffer"]

    all_fresh(system)
    with system.session() as s:  # a transfer started, then its worker vanished long ago
        dtp_id = make_dtp(system, s).dtp_id
        stalled = make_transfer(s, dtp_id, "ccat_telescope_buffer", "cologne_buffer")
        row = s.get(m.DataTransfer, stalled)
        row.status, row.updated_at = m.Status.IN_PROGRESS, m.utcnow() - timedelta(hours=2)
    text, links = _banner_seen(browser, system, tmp_path, "stalled-work")
    assert "1 transfer(s) STALLED" in text and "recovery" in text
    assert links == ["/dashboard/#tile-transfers"]

    with system.session() as s:  # ... and is now out of retries
        s.get(m.DataTransfer, stalled).status = m.Status.FAILED
    text, links = _banner_seen(browser, system, tmp_path, "failed-work")
    assert "STALLED" not in text and "1 transfer(s) FAILED" in text
    assert links == ["/dashboard/#tile-transfers"]

    with system.session() as s:
        s.get(m.DataTransfer, stalled).status = m.Status.COMPLETED
        lta = location(s, "cologne_lta")
        lta.audit_hold_at, lta.audit_hold_reason = m.utcnow(), "2 copies failed verification"
    text, links = _banner_seen(browser, system, tmp_path, "audit-hold")
    assert "cologne_lta is ON HOLD" in text and "failed verification" in text
    assert links == ["/dashboard/#loc-cologne_lta"]

    with system.session() as s:  # the state that also sends the emergency alert
        location(s, "cologne_lta").audit_hold_at = None
        set_buffer_status(s, "cologne_buffer", 99 * 10**9, 100 * 10**9)
    text, links = _banner_seen(browser, system, tmp_path, "emergency")
    assert "cologne_buffer is EMERGENCY at 99.0 % full" in text
    assert "/dashboard/#loc-cologne_buffer" in links
    for name in ("stale-status", "stalled-work", "failed-work", "audit-hold", "emergency"):
        assert (tmp_path / f"banner-{name}.png").stat().st_size > 10_000
