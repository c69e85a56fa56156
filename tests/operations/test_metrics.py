"""Metrics: the Prometheus text and the InfluxDB lines reflect the database."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

from sqlalchemy import select

from ccat_data_transfer.operations.metrics import (
    collect_snapshot,
    prometheus_text,
    push_metrics,
    snapshot_to_line_protocol,
)
from ccat_ops_db import models as m


def _populate(system):
    with system.session() as s:
        module = s.scalars(select(m.InstrumentModule)).first()
        eou = m.ExecutedObsUnit(name="e1", obs_unit=m.ObsUnit(name="o1"))
        buf = system.location(s, "ccat_telescope_buffer")
        for i, state in enumerate(
            [m.PackageState.ARCHIVED, m.PackageState.ARCHIVED, m.PackageState.WAITING]
        ):
            pkg = m.RawDataPackage(
                file_name=f"p{i}.tar",
                relative_path=f"p{i}.tar",
                size=100 * (i + 1),
                state=state,
                executed_obs_unit=eou,
                instrument_module_id=module.id,
            )
            s.add(
                m.RawDataPackagePhysicalCopy(
                    raw_data_package=pkg,
                    data_location=buf,
                    size=pkg.size,
                    status=m.PhysicalCopyStatus.DELETED if i == 0 else m.PhysicalCopyStatus.PRESENT,
                    deleted_at=m.utcnow() if i == 0 else None,
                )
            )


def test_snapshot_counts_match_the_database(system):
    _populate(system)
    with system.session() as s:
        snap = collect_snapshot(s)
    assert snap["package_states"]["ARCHIVED"] == {"count": 2, "bytes": 300}
    assert snap["package_states"]["WAITING"] == {"count": 1, "bytes": 300}
    assert snap["deletions_last_day"] == {"count": 1, "bytes": 100}


def test_prometheus_text_has_the_families(system):
    _populate(system)
    text = prometheus_text(system.db.session_factory()).decode()
    assert 'ccat_raw_data_packages{state="ARCHIVED"} 2.0' in text
    assert "ccat_deletions_last_day 1.0" in text
    assert (
        'ccat_physical_copies{location="ccat_telescope_buffer",status="PRESENT",'
        'type="raw_data_package"} 2.0' in text
    )


def test_line_protocol_escapes_and_types():
    snap = {
        "raw_files": {"count": 3, "bytes": 30},
        "raw_files_unpackaged": 1,
        "package_states": {"ARCHIVED": {"count": 2, "bytes": 20}},
        "transfers": {},
        "transfer_rate_mb_per_s": 1.5,
        "deletions_last_day": {"count": 0, "bytes": 0},
        "deletion_failures": 0,
        "buffers": [
            {
                "location": "a b",
                "site": "s",
                "state": "normal",
                "disk_usage_percent": 12.5,
                "used_bytes": 10,
            }
        ],
        "queues": {},
    }
    lines = snapshot_to_line_protocol(snap, timestamp=1700000000)
    assert "raw_files count=3i,bytes=30i,unpackaged=1i 1700000000" in lines
    assert (
        "buffer_usage,location=a\\ b,site=s,state=normal percent=12.5,used_bytes=10i 1700000000"
        in lines
    )


def test_influx_push_posts_line_protocol(system, override_settings):
    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, self.headers.get("Authorization"), body.decode()))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        override_settings(
            INFLUXDB_ENABLED=True,
            INFLUXDB_URL=f"http://127.0.0.1:{server.server_port}",
            INFLUXDB_TOKEN="t0k",
        )
        _populate(system)
        with system.session() as s:
            assert push_metrics(s) is True
    finally:
        server.shutdown()
    path, auth, body = received[0]
    assert path.startswith("/api/v2/write?") and "bucket=data_transfer" in path
    assert auth == "Token t0k"
    assert "raw_data_packages,state=ARCHIVED count=2i,bytes=300i" in body


def test_influx_push_is_off_by_default(system):
    with system.session() as s:
        assert push_metrics(s) is None


def test_run_round_pushes_to_influxdb_when_enabled(system, override_settings):
    from ccat_data_transfer.operations.orchestrator import Orchestrator

    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            received.append(self.rfile.read(int(self.headers["Content-Length"])).decode())
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        override_settings(
            INFLUXDB_ENABLED=True,
            INFLUXDB_URL=f"http://127.0.0.1:{server.server_port}",
            METRICS_PUSH_INTERVAL_SECONDS=3600,
        )
        orchestrator = Orchestrator(db=system.db)
        orchestrator.run_round()
        orchestrator.run_round()  # within the interval: no second push
    finally:
        server.shutdown()
    assert len(received) == 1 and "raw_files count=0i" in received[0]


def _flag_a_checksum_error(system) -> None:
    """Two unpackaged files of one group, one of them flagged: one blocked group."""
    from helpers_lifecycle import location, make_executed_obs_unit

    with system.session() as s:
        module = s.scalars(select(m.InstrumentModule)).first()
        eou = make_executed_obs_unit(s)
        source = s.scalars(
            select(m.DataLocation).where(m.DataLocation.location_type == m.LocationType.SOURCE)
        ).first()
        for i in range(2):
            s.add(
                m.RawDataFile(
                    relative_path=f"bad/{i}.fits",
                    size=10,
                    checksum="0" * 64,
                    instrument_module_id=module.id,
                    executed_obs_unit_id=eou.id,
                    source_location_id=source.id,
                    checksum_error="sha256 mismatch at filing" if i == 0 else None,
                )
            )
        assert location(s, "ccat_telescope_buffer") is not None


def _stale_buffer_with_a_sample(system, name: str = "ccat_telescope_buffer") -> None:
    """The buffer manager measured ``name`` an hour ago and then stopped."""
    from datetime import timedelta

    from helpers_lifecycle import location, set_buffer_status

    with system.session() as s:
        set_buffer_status(s, name, 40, 100)
        loc = location(s, name)
        then = m.utcnow() - timedelta(hours=1)
        s.add(
            m.BufferUsageSample(
                data_location_id=loc.id,
                used_bytes=40,
                total_bytes=100,
                disk_usage_percent=40.0,
                measured_at=then,
            )
        )
        status = s.scalars(
            select(m.BufferStatus).where(m.BufferStatus.data_location_id == loc.id)
        ).one()
        status.measured_at = then


def test_metrics_pass_promtool_check(system, tmp_path):
    """Prometheus's own linter accepts the exposition text (names, units, types, help)."""
    import os
    import shutil
    import subprocess

    import pytest

    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is required in CI (.ci/run installs Debian's prometheus)")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    _populate(system)
    _flag_a_checksum_error(system)
    _stale_buffer_with_a_sample(system)
    text = prometheus_text(system.db.session_factory())
    check = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, timeout=60
    )
    assert check.returncode == 0, (check.stdout + check.stderr).decode()


def test_checksum_errors_and_blocked_groups_are_metrics(system):
    _flag_a_checksum_error(system)
    text = prometheus_text(system.db.session_factory()).decode()
    assert "ccat_raw_files_checksum_errors 1.0" in text
    assert "ccat_blocked_groups 1.0" in text


def test_buffer_state_is_its_own_gauge_with_a_fixed_set_of_series(system):
    from helpers_lifecycle import set_buffer_status

    with system.session() as s:
        set_buffer_status(s, "ccat_telescope_buffer", 50, 100, state="warning")
    text = prometheus_text(system.db.session_factory()).decode()
    lines = [ln for ln in text.splitlines() if ln.startswith("ccat_buffer_state{")]
    mine = [ln for ln in lines if 'location="ccat_telescope_buffer"' in ln]
    assert len(mine) == 5  # normal, warning, critical, emergency, unknown
    assert any('state="warning"' in ln and ln.endswith(" 1.0") for ln in mine)
    assert sum(ln.endswith(" 1.0") for ln in mine) == 1
    usage = [ln for ln in text.splitlines() if ln.startswith("ccat_buffer_usage_percent{")]
    assert usage and all("state=" not in ln for ln in usage)


def test_buffer_metrics_outlive_the_buffer_manager(system):
    """An expired live status leaves the last measured use (from the DB's samples), its
    age, and the state ``unknown``: the series does not vanish with one manager."""
    _stale_buffer_with_a_sample(system)
    text = prometheus_text(system.db.session_factory()).decode()
    usage = [
        ln
        for ln in text.splitlines()
        if ln.startswith("ccat_buffer_usage_percent{") and 'location="ccat_telescope_buffer"' in ln
    ]
    assert len(usage) == 1 and usage[0].endswith(" 40.0")
    state = [
        ln
        for ln in text.splitlines()
        if ln.startswith("ccat_buffer_state{") and 'location="ccat_telescope_buffer"' in ln
    ]
    assert any('state="unknown"' in ln and ln.endswith(" 1.0") for ln in state)
    age = [
        ln
        for ln in text.splitlines()
        if ln.startswith("ccat_buffer_status_age_seconds{")
        and 'location="ccat_telescope_buffer"' in ln
    ]
    assert age and float(age[0].rsplit(" ", 1)[1]) >= 3500
