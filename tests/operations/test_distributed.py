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

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import func, select

from ccat_data_transfer.core.database import DatabaseConnection
from ccat_data_transfer.operations.simulator import InstrumentSimulator
from ccat_ops_db import models as m
from helpers_cluster import Cluster, lifecycle_done, open_cluster, packages, wait


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with open_cluster(tmp_path) as c:
        yield c


def _file_and_wait_until_done(cluster: Cluster, db: DatabaseConnection, what: str) -> None:
    """The instruments file two small observations; wait until they are archived at both
    LTA sites and cleaned up at the source site."""
    sim = InstrumentSimulator(
        db=db, observations=2, files_per_module=2, file_size=256 * 1024, modules_per_instrument=1
    )
    while sim.step():
        pass
    wait(cluster, what, lambda: packages(db) > 0 and lifecycle_done(db, packages(db)), 180)


def _service_alive(cluster: Cluster, worker: str) -> bool | None:
    client = redis.Redis.from_url(cluster.env["CCAT_DATA_TRANSFER_REDIS_URL"])
    return bool(client.exists(f"health:worker:{worker}"))


def test_distributed_lifecycle_survives_a_killed_worker(cluster: Cluster) -> None:
    db = DatabaseConnection(cluster.url)
    for site in ("ccat", "cologne", "us"):
        cluster.start_worker(site)
    cluster.start_managers()
    cluster.start("recovery", ["recovery"])

    # Phase 1: instruments file data; it must reach both LTA sites and leave the buffers.
    _file_and_wait_until_done(cluster, db, "the first data to be archived and cleaned up")
    wait(cluster, "worker health keys", lambda: _service_alive(cluster, "ccat@test"), 30)

    # Phase 2: a slow link from the telescope; kill its worker in the middle of a transfer.
    cluster.kill("worker-ccat", signal.SIGTERM)
    cluster.start_worker("ccat", CCAT_DATA_TRANSFER_TRANSFER_BANDWIDTH_LIMIT_MB_PER_S="1")
    before = packages(db)
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

    wait(cluster, "a transfer in progress", transfer_in_progress, 120)
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
    wait(
        cluster,
        "the killed worker's health key to expire",
        lambda: not _service_alive(cluster, "ccat@test"),
        30,
    )

    cluster.start_worker("ccat")
    wait(
        cluster,
        "the interrupted data to be archived and cleaned up",
        lambda: packages(db) > before and lifecycle_done(db, packages(db)),
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
        cluster.start_managers(f"managers-{site}", "--site", site)
    # The same scope from the setting, as a per-site deployment would set it.
    cluster.start_managers("managers-processing", CCAT_DATA_TRANSFER_MANAGER_SITE="proc")

    _file_and_wait_until_done(
        cluster, db, "the data to be archived at both LTA sites and cleaned up by the site managers"
    )
    client = redis.Redis.from_url(cluster.env["CCAT_DATA_TRANSFER_REDIS_URL"])
    assert {k.decode() for k in client.smembers("health:known") if b"health:manager:" in k} == {
        f"health:manager:run@{site}" for site in sites
    }
