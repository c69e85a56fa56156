"""Distributed mode under faults, with real processes (issue 16, item 5).

PostgreSQL, a Redis broker and Celery workers at their DEFAULT concurrency (a prefork pool
of 2 per site), the managers (``run --no-init``) and the recovery service, each its own
process as an operator starts them (see :mod:`helpers_cluster`).  The clocks are short
(heartbeats of a second, a stall window of a few seconds); every scenario checks the
property the issue asks for on the DB and on disk:

* a package of several GB, built while recovery runs with a stall window far shorter than
  the build: it is built exactly once (no released claim, no second build);
* a backlog in the broker longer than many resend and visibility timeouts (the telescope
  site's worker stopped while every transfer is queued): no retry charged, nothing FAILED;
* a private Redis without persistence killed and started empty mid-run: the lost
  messages are sent again and everything completes;
* one LTA site's buffer over its configured capacity: every package goes to the other
  site, nothing FAILED; with room again it is back in the rotation;
* ``kill -9`` of the worker running a package build, a transfer, an unpack and an archive
  copy: afterwards every file's bytes at both LTAs hash to the registered checksum, and
  the janitor leaves no temporary name behind.
"""

from __future__ import annotations

import hashlib
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import redis
from sqlalchemy import func, select

from ccat_data_transfer.core.database import DatabaseConnection
from ccat_data_transfer.filing.register import file_raw_data_files, finish_executed_obs_unit
from ccat_data_transfer.operations.simulator import InstrumentSimulator
from ccat_ops_db import models as m
from helpers_cluster import (
    RedisServer,
    all_done,
    count,
    db_state,
    failed_anything,
    open_cluster,
    packages,
    retries_charged,
    temporary_names,
    verify_files_at_both_ltas,
    wait,
)

DEFAULT_TOPOLOGY = (
    Path(__file__).resolve().parents[2] / "src" / "ccat_data_transfer" / "topology" / "default.toml"
)


def _file(
    db: DatabaseConnection, observations: int, size: int, run_id: str, files: int = 2
) -> None:
    sim = InstrumentSimulator(
        db=db, observations=observations, files_per_module=files, file_size=size,
        modules_per_instrument=1, run_id=run_id,
    )  # fmt: skip
    while sim.step():
        pass


def _topology_with_capacity(tmp_path: Path, capacities: dict[str, str]) -> Path:
    """The shipped topology with the ``capacity`` of the named locations changed: the
    operator's quota on a buffer, applied with ``init --topology``."""
    text = DEFAULT_TOPOLOGY.read_text()
    for name, capacity in capacities.items():
        text, n = re.subn(
            rf'(name = "{name}"\n(?:[^\[]*?\n)?)capacity = "[^"]*"',
            rf'\1capacity = "{capacity}"',
            text,
        )
        assert n == 1, name
    path = tmp_path / f"topology-{len(list(tmp_path.glob('topology-*')))}.toml"
    path.write_text(text)
    return path


def _capacity(db: DatabaseConnection, location: str) -> int | None:
    with db.session_scope() as s:
        return s.scalar(select(m.DataLocation.capacity_bytes).filter_by(name=location))


def _primary_destinations(db: DatabaseConnection, after_dtp: int = 0) -> list[str]:
    with db.session_scope() as s:
        return [
            t.destination_location.name
            for t in s.scalars(
                select(m.DataTransfer)
                .where(
                    m.DataTransfer.is_primary.is_(True),
                    m.DataTransfer.data_transfer_package_id > after_dtp,
                )
                .order_by(m.DataTransfer.id)
            )
        ]


# ---------------------------------------------------------------------------------------
# 1. A package of several GB built while recovery runs with a short stall window
# ---------------------------------------------------------------------------------------

BIG_FILE = 1 << 30  # 1 GiB each, three of them: a 3 GiB package (3.2 GB)


def _file_sparse_observation(db: DatabaseConnection, root: Path, eou: str, files: int) -> None:
    """File ``files`` sparse files of BIG_FILE bytes (a unique first block, then zeros:
    real bytes to tar and hash, little disk) as one finished observation at
    primecam_raw_data."""
    entries = []
    for n in range(files):
        rel = f"big/{eou}/280GHz/scan_{n:04d}.fits"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        head = f"{eou}/{n}".encode().ljust(2880, b" ")
        with open(path, "wb") as fh:
            fh.write(head)
            fh.truncate(BIG_FILE)
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(8 << 20):
                digest.update(chunk)
        entries.append({
            "relative_path": rel, "size": BIG_FILE, "checksum": digest.hexdigest(),
            "checksum_algorithm": "sha256", "executed_obs_unit": eou,
            "obs_unit": "primecam-field-1", "instrument_module": "primecam/280GHz",
        })  # fmt: skip
    with db.session_scope() as s:
        file_raw_data_files(s, "primecam_raw_data", entries)
        row = s.scalars(select(m.ExecutedObsUnit).filter_by(name=eou)).one()
        row.start_time = row.end_time = m.utcnow()
    with db.session_scope() as s:
        finish_executed_obs_unit(s, eou)


def test_a_multi_gb_package_is_built_once_while_recovery_runs(tmp_path: Path) -> None:
    # A stall window of 1 s (beats every 0.5 s, 2 missed), recovery every 0.5 s, and a broker
    # that re-delivers an unacknowledged task after 4 s: the build takes far longer.
    with open_cluster(
        tmp_path, HEARTBEAT_SECONDS=0.5, HEARTBEAT_MISSED_BEATS=2,
        RECOVERY_SERVICE_SLEEP_TIME=0.5, BROKER_VISIBILITY_TIMEOUT_SECONDS=4,
        QUEUED_RESEND_SECONDS=4,
    ) as cluster:  # fmt: skip
        db = cluster.db
        # No LTA-site worker: the test ends once the telescope site has built both
        # packages (the 3 GiB transfers are not its subject).
        cluster.start_worker("ccat")
        cluster.start_managers()
        cluster.start("recovery", ["recovery"])
        with db.session_scope() as s:
            root = Path(
                s.scalars(select(m.DataLocation.path).filter_by(name="primecam_raw_data")).one()
            )
        _file_sparse_observation(db, root, "primecam-big-obs0001", 3)

        durations = {}
        for model, built in (
            (m.RawDataPackage, m.RawDataPackage.status == m.Status.COMPLETED),
            (m.DataTransferPackage, m.DataTransferPackage.status != m.Status.SCHEDULED),
        ):
            wait(cluster, f"{model.__name__} build started",
                 lambda model=model: count(db, select(func.count(model.id)).where(
                     model.status == m.Status.IN_PROGRESS)), 120, every=0.1)  # fmt: skip
            started = time.monotonic()
            wait(cluster, f"{model.__name__} built",
                 lambda model=model, built=built: count(
                     db, select(func.count(model.id)).where(built, model.checksum.is_not(None))),
                 300, every=0.2)  # fmt: skip
            durations[model.__name__] = time.monotonic() - started
        # Its 3 GiB transfer is not this test's subject: stop the site's worker now.
        cluster.kill("worker-ccat", signal.SIGKILL)
        print(f"\nbuild seconds (stall window 1 s): {durations}")

        # Each build outlasted the stall window many times over ...
        assert min(durations.values()) > 3 * 1, durations
        with db.session_scope() as s:
            # ... and happened once: a released claim deletes the row and the next claim
            # gets a new id, so one row with id 1 per stage means one build attempt.
            assert s.scalars(select(m.RawDataPackage.id)).all() == [1]
            assert s.scalars(select(m.DataTransferPackage.id)).all() == [1]
            rdp = s.get(m.RawDataPackage, 1)
            assert rdp.size > 3 * BIG_FILE
            assert s.get(m.DataTransferPackage, 1).size > rdp.size
        for event in ("raw_data_package_claim_released", "data_transfer_package_claim_released"):
            assert cluster.events(event) == [], event
        assert len(cluster.events("raw_data_package_created")) == 1
        assert len(cluster.events("data_transfer_package_created")) == 1
        # Recovery was running all along (it passed many times during the builds).
        assert "recovery" in cluster.procs and cluster.procs["recovery"].poll() is None
        assert failed_anything(db) == []


# ---------------------------------------------------------------------------------------
# 2. A backlog in the broker longer than many timeouts
# ---------------------------------------------------------------------------------------


def _broker_waiting(url: str) -> int:
    """Messages waiting in the broker's queues (Redis lists not named with ``_``)."""
    client = redis.Redis.from_url(url)
    total = 0
    for key in client.scan_iter():
        if not key.startswith(b"_") and client.type(key) == b"list":
            total += int(client.llen(key))
    return total


def test_a_backlog_in_the_broker_is_neither_charged_nor_failed(tmp_path: Path) -> None:
    # Both LTA-site buffers get a 20 MB quota, nearly filled by a file of someone else's:
    # no package can land, so every package is built and waits.
    quota = _topology_with_capacity(tmp_path, {"cologne_buffer": "20 MB", "us_buffer": "20 MB"})
    with open_cluster(
        tmp_path, HEARTBEAT_SECONDS=1, HEARTBEAT_MISSED_BEATS=2, RECOVERY_SERVICE_SLEEP_TIME=1,
        QUEUED_RESEND_SECONDS=2, BROKER_VISIBILITY_TIMEOUT_SECONDS=3,
        MAX_NORMAL_TRANSFERS=50, MAX_CRITICAL_TRANSFERS=50,
        DATA_TRANSFER_PACKAGE_TARGET_SIZE_BYTES=1, BUFFER_MANAGER_SLEEP_TIME=1,
        ROUTING_FREE_SPACE_MARGIN_BYTES=0, ROUTING_FREE_SPACE_MARGIN_PERCENT=0,
    ) as cluster:  # fmt: skip
        db = cluster.db
        assert cluster.cli("init", "--topology", str(quota)).returncode == 0
        fillers = []
        for buffer in ("cologne_buffer", "us_buffer"):
            with db.session_scope() as s:
                root = Path(s.scalars(select(m.DataLocation.path).filter_by(name=buffer)).one())
            root.mkdir(parents=True, exist_ok=True)
            fillers.append(root / "filler.bin")
            fillers[-1].write_bytes(b"\0" * 19_800_000)
        for site in ("ccat", "cologne", "us"):
            cluster.start_worker(site)
        cluster.start_managers()
        cluster.start("recovery", ["recovery"])
        observations = 10
        _file(db, observations, 128 * 1024, "backlog")
        built = select(func.count(m.DataTransferPackage.id)).where(
            m.DataTransferPackage.status == m.Status.PENDING,
            m.DataTransferPackage.checksum.is_not(None),
        )
        wait(cluster, "every package built, waiting for room",
             lambda: count(db, built) == observations, 120)  # fmt: skip
        assert _primary_destinations(db) == []

        # The telescope site's worker stops; room comes back; every transfer is queued
        # in the broker with nobody to take it.
        cluster.kill("worker-ccat", signal.SIGTERM)
        for filler in fillers:
            filler.unlink()
        queued = select(func.count(m.DataTransfer.id)).where(
            m.DataTransfer.status == m.Status.SCHEDULED
        )
        wait(cluster, "every transfer queued", lambda: count(db, queued) == observations, 60)
        backlog_started = time.monotonic()
        broker = cluster.env["CCAT_DATA_TRANSFER_BROKER_URL"]
        while time.monotonic() - backlog_started < 16:  # 8 resend and 5 visibility timeouts
            assert count(db, queued) == observations, db_state(cluster.url)
            # The broker holds each queued task once: nothing is re-sent over a backlog.
            assert _broker_waiting(broker) == observations
            time.sleep(1)
        assert retries_charged(db) == {"transfers": 0, "unpacks": 0, "archive_transfers": 0}

        cluster.start_worker("ccat")
        took = wait(cluster, "the backlog to be archived and cleaned up", lambda: all_done(db), 240)
        print(
            f"\nbacklog of {observations} transfers: done {took:.1f} s after the worker came back"
        )
        assert packages(db) == observations
        charged = retries_charged(db)
        print(f"retries charged in a fault-free run with a backlog: {charged}")
        assert charged == {"transfers": 0, "unpacks": 0, "archive_transfers": 0}
        assert failed_anything(db) == []
        assert cluster.events("stalled_transfers_reset") == []


# ---------------------------------------------------------------------------------------
# 3. Redis (without persistence) restarted mid-run
# ---------------------------------------------------------------------------------------


def test_redis_restarted_without_persistence_mid_run(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        with open_cluster(
            tmp_path, broker=server.url, MAX_NORMAL_TRANSFERS=8, MAX_CRITICAL_TRANSFERS=8,
            DATA_TRANSFER_PACKAGE_TARGET_SIZE_BYTES=1, HEARTBEAT_SECONDS=1,
            HEARTBEAT_MISSED_BEATS=3, RECOVERY_SERVICE_SLEEP_TIME=1, QUEUED_RESEND_SECONDS=5,
            BROKER_VISIBILITY_TIMEOUT_SECONDS=10,
        ) as cluster:  # fmt: skip
            db = cluster.db
            cluster.start_worker("ccat", CCAT_DATA_TRANSFER_TRANSFER_BANDWIDTH_LIMIT_MB_PER_S="1")
            for site in ("cologne", "us"):
                cluster.start_worker(site)
            cluster.start_managers()
            cluster.start("recovery", ["recovery"])
            _file(db, 8, 512 * 1024, "redis")
            # Kill the broker while tasks wait in it: those messages are lost.
            wait(cluster, "tasks waiting in the broker",
                 lambda: _broker_waiting(server.url) >= 2, 120, every=0.1)  # fmt: skip
            lost = _broker_waiting(server.url)
            server.kill()
            time.sleep(3)
            server.start()
            assert _broker_waiting(server.url) == 0  # it came back empty
            took = wait(cluster, "all work after the broker restart", lambda: all_done(db), 240)
            resent = [
                e
                for event in ("queued_work_resent", "raw_data_package_task_resent",
                              "data_transfer_package_task_resent")
                for e in cluster.events(event)
            ]  # fmt: skip
            print(
                f"\nredis restart: {lost} messages lost, {len(resent)} re-sent, "
                f"all done {took:.1f} s after the restart (resend window 5 s)"
            )
            assert resent, "messages were lost but nothing was sent again"
            assert packages(db) == 8
            assert failed_anything(db) == []
    finally:
        server.kill()


# ---------------------------------------------------------------------------------------
# 4. A full buffer at one LTA site
# ---------------------------------------------------------------------------------------


def test_a_full_lta_buffer_sends_work_to_the_other_site_until_it_has_room(
    tmp_path: Path,
) -> None:
    full = _topology_with_capacity(tmp_path, {"cologne_buffer": "64 KB"})
    with open_cluster(
        tmp_path, DATA_TRANSFER_PACKAGE_TARGET_SIZE_BYTES=1, BUFFER_MANAGER_SLEEP_TIME=1,
        ROUTING_FREE_SPACE_MARGIN_BYTES=0, ROUTING_FREE_SPACE_MARGIN_PERCENT=0,
        HEARTBEAT_SECONDS=1, HEARTBEAT_MISSED_BEATS=3, RECOVERY_SERVICE_SLEEP_TIME=1,
    ) as cluster:  # fmt: skip
        db = cluster.db
        assert cluster.cli("init", "--topology", str(full)).returncode == 0
        assert _capacity(db, "cologne_buffer") == 64_000
        for site in ("ccat", "cologne", "us"):
            cluster.start_worker(site)
        cluster.start_managers()
        cluster.start("recovery", ["recovery"])

        # cologne's buffer cannot take a 256 KiB package: all go to us.
        _file(db, 4, 128 * 1024, "full")
        wait(cluster, "the first data archived", lambda: all_done(db) and packages(db) == 4, 180)
        assert _primary_destinations(db) == ["us_buffer"] * 4
        skipped = cluster.events("routing_skipped_site")
        assert skipped and {e["location"] for e in skipped} == {"cologne_buffer"}
        assert failed_anything(db) == []
        with db.session_scope() as s:
            last_dtp = s.scalar(select(func.max(m.DataTransferPackage.id)))

        # Room comes back (the quota is raised): cologne is in the rotation again.
        assert cluster.cli("init", "--topology", str(DEFAULT_TOPOLOGY)).returncode == 0
        _file(db, 4, 128 * 1024, "room")
        wait(cluster, "the second data archived", lambda: all_done(db) and packages(db) == 8, 180)
        after = _primary_destinations(db, last_dtp)
        assert len(after) == 4 and "cologne_buffer" in after, after
        assert failed_anything(db) == []


# ---------------------------------------------------------------------------------------
# 5. kill -9 of a worker during packaging, a transfer, an unpack and an archive copy
# ---------------------------------------------------------------------------------------


def _kill_when(cluster, what: str, running: Callable[[], str | None], timeout: float = 180):
    """Wait until ``running()`` names the site whose worker runs the step, kill -9 that
    worker (its whole process group) and start it again.  Returns (site, kill time)."""
    site: list[str | None] = [None]

    def probe() -> bool:
        site[0] = running()
        return site[0] is not None

    wait(cluster, what, probe, timeout, every=0.05)
    killed_at = time.monotonic()
    cluster.kill(f"worker-{site[0]}", signal.SIGKILL)
    cluster.start_worker(site[0])
    return site[0], killed_at


def test_kill_9_during_each_step_loses_nothing_and_leaves_no_leftovers(tmp_path: Path) -> None:
    with open_cluster(
        tmp_path, HEARTBEAT_SECONDS=1, HEARTBEAT_MISSED_BEATS=3, RECOVERY_SERVICE_SLEEP_TIME=1,
        QUEUED_RESEND_SECONDS=5, BROKER_VISIBILITY_TIMEOUT_SECONDS=10,
        JANITOR_MIN_AGE_SECONDS=8, TRANSFER_BANDWIDTH_LIMIT_MB_PER_S=60,
    ) as cluster:  # fmt: skip
        db = cluster.db
        for site in ("ccat", "cologne", "us"):
            cluster.start_worker(site)
        cluster.start_managers()
        cluster.start("recovery", ["recovery"])
        _file(db, 1, 192 << 20, "kill", files=2)  # one 384 MiB package
        recovered: dict[str, float] = {}

        def in_progress(model, *where, site_of) -> Callable[[], str | None]:
            def probe() -> str | None:
                with db.session_scope() as s:
                    row = s.scalars(select(model).where(*where).limit(1)).first()
                    return site_of(row) if row is not None else None

            return probe

        # Packaging: the raw data package's build at the telescope site.
        site, t0 = _kill_when(cluster, "a package build running", in_progress(
            m.RawDataPackage, m.RawDataPackage.status == m.Status.IN_PROGRESS,
            site_of=lambda p: "ccat"))  # fmt: skip
        recovered["packaging"] = wait(cluster, "the package built after the kill",
            lambda: count(db, select(func.count(m.RawDataPackage.id)).where(
                m.RawDataPackage.status == m.Status.COMPLETED)) == 1, 120)  # fmt: skip
        assert cluster.events("raw_data_package_claim_released"), "the build was not interrupted"

        # A transfer: pushed by the worker of its origin's site.
        transfer = (m.DataTransfer.status == m.Status.IN_PROGRESS,)
        site, t0 = _kill_when(cluster, "a transfer running", in_progress(
            m.DataTransfer, *transfer, site_of=lambda t: t.origin_location.site.name))  # fmt: skip
        recovered["transfer"] = wait(cluster, "the transfer done after the kill",
            lambda: count(db, select(func.count(m.DataTransfer.id)).where(
                m.DataTransfer.status == m.Status.COMPLETED, m.DataTransfer.retry_count == 1)),
            120)  # fmt: skip

        # An unpack: by the worker of the site it landed at.
        site, t0 = _kill_when(cluster, "an unpack running", in_progress(
            m.DataTransfer, m.DataTransfer.unpack_status == m.Status.IN_PROGRESS,
            site_of=lambda t: t.destination_location.site.name))  # fmt: skip
        recovered["unpack"] = wait(cluster, "the unpack done after the kill",
            lambda: count(db, select(func.count(m.DataTransfer.id)).where(
                m.DataTransfer.unpack_status == m.Status.COMPLETED,
                m.DataTransfer.unpack_retry_count == 1)), 120)  # fmt: skip

        # An archive copy: by the worker of the LTA's site.
        site, t0 = _kill_when(cluster, "an archive copy running", in_progress(
            m.LongTermArchiveTransfer, m.LongTermArchiveTransfer.status == m.Status.IN_PROGRESS,
            site_of=lambda a: a.destination_location.site.name))  # fmt: skip
        recovered["archive"] = wait(cluster, "the archive copy done after the kill",
            lambda: count(db, select(func.count(m.LongTermArchiveTransfer.id)).where(
                m.LongTermArchiveTransfer.status == m.Status.COMPLETED,
                m.LongTermArchiveTransfer.retry_count == 1)), 120)  # fmt: skip
        print(f"\nseconds from kill -9 to the step done again (stall window 3 s): {recovered}")

        wait(cluster, "the package archived at both LTAs and cleaned up", lambda: all_done(db), 240)
        assert failed_anything(db) == []
        assert verify_files_at_both_ltas(db) == 2 * 2
        # The killed writes left temporary names; the janitor removes them.
        wait(cluster, "no temporary names left", lambda: not temporary_names(cluster.data_dir), 60)
        assert cluster.events("janitor_removed"), "the kills left nothing to clean?"
