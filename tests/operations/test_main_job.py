"""The main job (`ccat_data_transfer run --simulate`) as a user runs it: whole lifecycle,
summary, and a clean stop on Ctrl-C that resumes on restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import func, select

from ccat_data_transfer.core.database import DatabaseConnection, dispose_engines
from ccat_ops_db import models as m

CLI = [sys.executable, "-m", "ccat_data_transfer"]


def _env(tmp_path: Path) -> dict[str, str]:
    env = {**os.environ, "CCAT_DATA_TRANSFER_DATA_DIR": str(tmp_path / "data")}
    env.pop("CCAT_DATA_TRANSFER_DATABASE_URL", None)
    env["CCAT_DATA_TRANSFER_ENV"] = "default"
    return env


def _temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp-" in p.name or p.name.endswith(".writing")]


def test_main_job_runs_the_whole_lifecycle_and_prints_a_summary(tmp_path):
    started = time.monotonic()
    result = subprocess.run(
        CLI
        + [
            "run",
            "--simulate",
            "--observations",
            "3",
            "--files-per-module",
            "2",
            "--file-size-mb",
            "1",
        ],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Lifecycle summary" in result.stdout and "NOT complete" not in result.stdout
    assert time.monotonic() - started < 120
    db = DatabaseConnection(f"sqlite:///{tmp_path / 'data' / 'ops_db.sqlite'}")
    with db.session_scope() as s:
        states = set(s.scalars(select(m.RawDataPackage.state)).all())
        job = s.scalars(select(m.StagingJob)).one()
        left = s.scalar(
            select(func.count(m.PhysicalCopy.id))
            .join(m.DataLocation, m.DataLocation.id == m.PhysicalCopy.data_location_id)
            .where(
                m.DataLocation.location_type != m.LocationType.LONG_TERM_ARCHIVE,
                m.PhysicalCopy.status != m.PhysicalCopyStatus.DELETED,
            )
        )
    dispose_engines()
    assert states == {m.PackageState.ARCHIVED}
    assert job.status == m.Status.COMPLETED and not job.active
    assert left == 0
    assert (tmp_path / "data" / "logs" / "run.jsonl").stat().st_size > 0


def test_ctrl_c_stops_cleanly_and_the_work_resumes_on_restart(tmp_path):
    env = _env(tmp_path)
    proc = subprocess.Popen(
        CLI
        + [
            "run",
            "--simulate",
            "--observations",
            "6",
            "--files-per-module",
            "2",
            "--file-size-mb",
            "2",
            "--rate-mb-per-s",
            "8",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Interrupt once the run is under way (files filed and logged), however slow the
    # machine is to start it; a fixed sleep interrupted a loaded machine's start-up.
    log = tmp_path / "data" / "logs" / "run.jsonl"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        if log.exists() and b"raw_data_files_filed" in log.read_bytes():
            break
        time.sleep(0.2)
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, out + err  # stopped before the lifecycle was complete
    assert "Traceback" not in err
    data = tmp_path / "data"
    assert _temp_files(data) == []  # no half-written file
    db = DatabaseConnection(f"sqlite:///{data / 'ops_db.sqlite'}")
    with db.session_scope() as s:
        filed_before = s.scalar(select(func.count(m.RawDataFile.id)))
    dispose_engines()
    assert filed_before > 0

    again = subprocess.run(
        CLI
        + [
            "run",
            "--simulate",
            "--observations",
            "1",
            "--files-per-module",
            "1",
            "--file-size-mb",
            "1",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    with db.session_scope() as s:
        unarchived = s.scalar(
            select(func.count(m.RawDataPackage.id)).where(
                m.RawDataPackage.state != m.PackageState.ARCHIVED
            )
        )
        unpackaged = s.scalar(
            select(func.count(m.RawDataFile.id)).where(m.RawDataFile.raw_data_package_id.is_(None))
        )
    dispose_engines()
    assert unarchived == 0 and unpackaged == 0
    assert _temp_files(data) == []
