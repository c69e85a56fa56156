"""Distributed mode end to end, with real processes.

PostgreSQL (a fresh database), the Redis broker, three Celery worker processes (one per
site: the telescope and the two LTA sites), the managers (``run --no-init``) and the
recovery service, each a separate process started like an operator would.  Data is
filed, and the test waits until it is ARCHIVED at both LTA sites and the temporary
copies are cleaned up.  Then a worker is killed (SIGKILL) in the middle of a transfer,
and the work completes after the worker is restarted.  A second test runs the managers as
one process per site (``run --no-init --site SITE``, or ``MANAGER_SITE`` from the
environment) and shows that together they carry the data through the same lifecycle.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, func, select, text

from ccat_data_transfer.database import DatabaseConnection, dispose_engines
from ccat_data_transfer.simulator import InstrumentSimulator
from ccat_ops_db import models as m
from conftest import PG_ADMIN_URL

CLI = [sys.executable, "-m", "ccat_data_transfer"]


class Cluster:
    def __init__(self, env: dict[str, str], url: str, logs: Path) -> None:
        self.env = env
        self.url = url
        self.logs = logs
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str], **extra_env: str) -> None:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(
            CLI + args,
            env={**self.env, **extra_env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name)
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait(timeout=60)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.kill(name, signal.SIGTERM)

    def start_worker(self, site: str, **extra_env: str) -> None:
        # The worker's default concurrency (a prefork pool of 2), as deployed: the
        # children must not share the parent's DB connection.
        self.start(
            f"worker-{site}", ["worker", "--site", site, "--name", f"{site}@test"], **extra_env
        )

    def tail(self, lines: int = 30) -> str:
        out = []
        for path in sorted(self.logs.glob("*.log")):
            text_lines = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name}\n" + "\n".join(text_lines))
        return "\n".join(out)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    name = f"ccat_dist_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    redis_db = random.randint(4, 15)
    broker = f"redis://127.0.0.1:6379/{redis_db}"
    redis.Redis.from_url(broker).flushdb()
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {
        **os.environ,
        "CCAT_DATA_TRANSFER_ENV": "test",
        "CCAT_DATA_TRANSFER_EXECUTION_MODE": "distributed",
        "CCAT_DATA_TRANSFER_DATABASE_URL": url,
        "CCAT_DATA_TRANSFER_BROKER_URL": broker,
        "CCAT_DATA_TRANSFER_REDIS_URL": broker,
        "CCAT_DATA_TRANSFER_DATA_DIR": str(tmp_path / "data"),
        "CCAT_DATA_TRANSFER_LOG_FORMAT": "json",
        "CCAT_DATA_TRANSFER_LOG_LEVEL": "INFO",
        "CCAT_DATA_TRANSFER_BROKER_VISIBILITY_TIMEOUT_SECONDS": "15",
        "CCAT_DATA_TRANSFER_HEARTBEAT_SECONDS": "3",
        "CCAT_DATA_TRANSFER_HEARTBEAT_MISSED_BEATS": "4",
        "CCAT_DATA_TRANSFER_QUEUED_RESEND_SECONDS": "15",
        "CCAT_DATA_TRANSFER_RECOVERY_SERVICE_SLEEP_TIME": "2",
        "CCAT_DATA_TRANSFER_HEALTH_REFRESH_SECONDS": "1",
        "CCAT_DATA_TRANSFER_HEALTH_TTL_SECONDS": "4",
        "CCAT_DATA_TRANSFER_RETENTION_PERIOD_MINUTES": "0",
        "CCAT_DATA_TRANSFER_RAW_DATA_PACKAGE_QUIET_PERIOD_SECONDS": "0",
        "CCAT_DATA_TRANSFER_DATA_TRANSFER_PACKAGE_MAX_WAIT_SECONDS": "0",
        "CCAT_DATA_TRANSFER_TRANSFER_RETRY_BASE_SECONDS": "0",
        "CCAT_DATA_TRANSFER_EMBEDDED_ROUND_SLEEP_SECONDS": "0.5",
    }
    init = subprocess.run(CLI + ["init"], env=env, capture_output=True, text=True, timeout=120)
    assert init.returncode == 0, init.stderr
    c = Cluster(env, url, logs)
    try:
        yield c
    finally:
        c.stop_all()
        dispose_engines()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
        redis.Redis.from_url(broker).flushdb()


def _lifecycle_done(db: DatabaseConnection, packages_expected: int) -> bool:
    with db.session_scope() as s:
        archived = s.scalar(
            select(func.count(m.RawDataPackage.id)).where(
                m.RawDataPackage.state == m.PackageState.ARCHIVED
            )
        )
        lta_copies = s.scalar(
            select(func.count(m.PhysicalCopy.id))
            .join(m.DataLocation, m.DataLocation.id == m.PhysicalCopy.data_location_id)
            .where(
                m.PhysicalCopy.type == "raw_data_package",
                m.PhysicalCopy.status == m.PhysicalCopyStatus.PRESENT,
                m.DataLocation.location_type == m.LocationType.LONG_TERM_ARCHIVE,
            )
        )
        left_at_temporary = s.scalar(
            select(func.count(m.PhysicalCopy.id))
            .join(m.DataLocation, m.DataLocation.id == m.PhysicalCopy.data_location_id)
            .where(
                m.DataLocation.location_type.in_([m.LocationType.SOURCE, m.LocationType.BUFFER]),
                m.PhysicalCopy.status != m.PhysicalCopyStatus.DELETED,
            )
        )
    return (
        archived == packages_expected
        and lta_copies == 2 * packages_expected
        and left_at_temporary == 0
    )


def _wait(cluster: Cluster, what: str, predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for name, proc in cluster.procs.items():
            assert proc.poll() is None, f"{name} died:\n{cluster.tail()}"
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}\n{_db_state(cluster.url)}\n{cluster.tail()}")


def _db_state(url: str) -> str:
    db = DatabaseConnection(url)
    out = []
    with db.session_scope() as s:
        for t in s.scalars(select(m.DataTransfer)):
            out.append(
                f"transfer {t.id} dtp={t.data_transfer_package_id} "
                f"{t.origin_location.name}->{t.destination_location.name} {t.status.name} "
                f"unpack={t.unpack_status.name} retries={t.retry_count} "
                f"next={t.next_attempt_at} reason={t.failure_reason}"
            )
        for p in s.scalars(select(m.RawDataPackage)):
            out.append(
                f"package {p.id} {p.state.name} {p.status.name} dtp={p.data_transfer_package_id}"
            )
        for d in s.scalars(select(m.DataTransferPackage)):
            out.append(f"dtp {d.id} {d.status.name} {d.failure_reason}")
        for c in s.scalars(select(m.PhysicalCopy)):
            out.append(f"copy {c.id} {c.type} {c.data_location.name} {c.status.name}")
    return "\n".join(out)


def _file_and_wait_until_done(cluster: Cluster, db: DatabaseConnection, what: str) -> None:
    """The instruments file two small observations; wait until they are archived at both
    LTA sites and cleaned up at the source site."""
    sim = InstrumentSimulator(
        db=db, observations=2, files_per_module=2, file_size=256 * 1024, modules_per_instrument=1
    )
    while sim.step():
        pass
    _wait(cluster, what, lambda: _packages(db) > 0 and _lifecycle_done(db, _packages(db)), 180)


def _packages(db: DatabaseConnection) -> int:
    with db.session_scope() as s:
        return s.scalar(select(func.count(m.RawDataPackage.id))) or 0


def _service_alive(cluster: Cluster, worker: str) -> bool | None:
    client = redis.Redis.from_url(cluster.env["CCAT_DATA_TRANSFER_REDIS_URL"])
    return bool(client.exists(f"health:worker:{worker}"))


def test_distributed_lifecycle_survives_a_killed_worker(cluster: Cluster) -> None:
    db = DatabaseConnection(cluster.url)
    for site in ("ccat", "cologne", "us"):
        cluster.start_worker(site)
    cluster.start("managers", ["run", "--no-init"])
    cluster.start("recovery", ["recovery"])

    # Phase 1: instruments file data; it must reach both LTA sites and leave the buffers.
    _file_and_wait_until_done(cluster, db, "the first data to be archived and cleaned up")
    _wait(cluster, "worker health keys", lambda: _service_alive(cluster, "ccat@test"), 30)

    # Phase 2: a slow link from the telescope; kill its worker in the middle of a transfer.
    cluster.kill("worker-ccat", signal.SIGTERM)
    cluster.start_worker("ccat", CCAT_DATA_TRANSFER_TRANSFER_BANDWIDTH_LIMIT_MB_PER_S="1")
    before = _packages(db)
    sim2 = InstrumentSimulator(
        db=db,
        observations=1,
        files_per_module=3,
        file_size=3 * 1024 * 1024,
        modules_per_instrument=1,
        run_id="slow",
    )
    sim2.step()

    def transfer_in_progress() -> bool:
        with db.session_scope() as s:
            return bool(
                s.scalar(
                    select(func.count(m.DataTransfer.id)).where(
                        m.DataTransfer.status == m.Status.IN_PROGRESS,
                        m.DataTransfer.is_primary.is_(True),
                    )
                )
            )

    _wait(cluster, "a transfer in progress", transfer_in_progress, 120)
    time.sleep(1.0)  # some bytes are on their way
    cluster.kill("worker-ccat", signal.SIGKILL)
    with db.session_scope() as s:
        killed = s.scalars(
            select(m.DataTransfer).where(m.DataTransfer.status == m.Status.IN_PROGRESS)
        ).all()
        assert killed, "the transfer finished before the worker was killed"
        killed_ids = [t.id for t in killed]
        final_paths = [
            Path(t.destination_location.path) / t.data_transfer_package.relative_path
            for t in killed
        ]
    # Killed midway: nothing COMPLETED, nothing under the final name.
    assert not any(p.exists() for p in final_paths)
    _wait(
        cluster,
        "the killed worker's health key to expire",
        lambda: not _service_alive(cluster, "ccat@test"),
        30,
    )

    cluster.start_worker("ccat")
    _wait(
        cluster,
        "the interrupted data to be archived and cleaned up",
        lambda: _packages(db) > before and _lifecycle_done(db, _packages(db)),
        240,
    )
    with db.session_scope() as s:
        for tid in killed_ids:
            t = s.get(m.DataTransfer, tid)
            assert t.status == m.Status.COMPLETED
            assert t.retry_count >= 1, "the interrupted attempt was not counted"


def test_distributed_lifecycle_with_one_manager_process_per_site(cluster: Cluster) -> None:
    db = DatabaseConnection(cluster.url)
    sites = ("ccat", "cologne", "us", "processing")
    for site in ("ccat", "cologne", "us"):
        cluster.start_worker(site)
    for site in sites[:-1]:
        cluster.start(f"managers-{site}", ["run", "--no-init", "--site", site])
    # The same scope from the setting, as a per-site deployment would set it.
    cluster.start(
        "managers-processing", ["run", "--no-init"], CCAT_DATA_TRANSFER_MANAGER_SITE="proc"
    )

    _file_and_wait_until_done(
        cluster, db, "the data to be archived at both LTA sites and cleaned up by the site managers"
    )
    client = redis.Redis.from_url(cluster.env["CCAT_DATA_TRANSFER_REDIS_URL"])
    assert {k.decode() for k in client.smembers("health:known") if b"health:manager:" in k} == {
        f"health:manager:run@{site}" for site in sites
    }
