"""Real-process clusters for the distributed tests (tests/test_distributed*.py).

A :class:`Cluster` is a fresh PostgreSQL database, a Redis broker and the processes an
operator starts (``worker --site``, ``run --no-init``, ``recovery``), each its own process
group with its log file.  :func:`open_cluster` creates and drops it; :class:`RedisServer`
is a private, non-persistent ``redis-server`` a test may kill and restart.  The checks the
tests share (the lifecycle is done, every file's bytes at both LTAs, no temporary names
left) are here, once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import func, select

from ccat_data_transfer.core.database import DatabaseConnection
from ccat_ops_db import models as m
from helpers_lifecycle import archived_at_both_ltas, lta_package_copies
from helpers_postgres import fresh_database

CLI = [sys.executable, "-m", "ccat_data_transfer"]
LTAS = ("cologne_lta", "us_lta")

#: Short clocks for the tests: a stalled step is seen within seconds.
SHORT_CLOCKS = {
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A private ``redis-server`` on 127.0.0.1 without persistence (``--save ""
    --appendonly no``): killed and started again, it comes back empty."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is required for the distributed fault tests")
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "redis.log", "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    pytest.fail(f"redis-server did not start on port {self.port}")
                time.sleep(0.1)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.proc = None


class Cluster:
    """The processes of a test, each its own process group with its log file.  A subclass
    may run a site's processes otherwise (:meth:`site_env`, :meth:`popen_args`)."""

    #: Seconds a process has to exit after SIGTERM before its group gets SIGKILL.
    grace_seconds: float = 60

    def __init__(self, env: dict[str, str], url: str, logs: Path) -> None:
        self.env = env
        self.url = url
        self.logs = logs
        self.procs: dict[str, subprocess.Popen] = {}
        self.db = DatabaseConnection(url)

    @property
    def data_dir(self) -> Path:
        return Path(self.env["CCAT_DATA_TRANSFER_DATA_DIR"])

    def site_env(self, site: str | None) -> dict[str, str]:
        """The environment of a process of ``site`` (None: of no site in particular)."""
        return self.env

    def popen_args(self, site: str | None) -> dict[str, Any]:
        """More ``Popen`` arguments for a process of ``site`` (its user, its folder)."""
        return {}

    def start(
        self, name: str, args: list[str], *, site: str | None = None, **extra_env: str
    ) -> None:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(
            CLI + args,
            env={**self.site_env(site), **extra_env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **self.popen_args(site),
        )

    def _reap(self, proc: subprocess.Popen, deadline: float) -> None:
        """Wait for ``proc`` until ``deadline``, then SIGKILL its group: what still runs,
        and the children of a stopped worker, must be gone too."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (a worker's prefork children too) and wait."""
        proc = self.procs.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        self._reap(proc, time.monotonic() + self.grace_seconds)

    def stop_all(self) -> None:
        """SIGTERM to every process at once, then as :meth:`kill`."""
        procs, self.procs = self.procs, {}
        for proc in procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_seconds
        for proc in procs.values():
            self._reap(proc, deadline)

    def start_worker(self, site: str, **extra_env: str) -> None:
        # The worker's default concurrency (a prefork pool of 2), as deployed: the
        # children must not share the parent's DB connection.
        self.start(
            f"worker-{site}",
            ["worker", "--site", site, "--name", f"{site}@test"],
            site=site,
            **extra_env,
        )

    def start_managers(self, name: str = "managers", *args: str, **extra_env: str) -> None:
        """``run --no-init`` (every manager), its JSON log next to the other logs."""
        log = str(self.logs / f"{name}.jsonl")
        self.start(name, ["run", "--no-init", "--log-file", log, *args], **extra_env)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            CLI + list(args), env=self.env, capture_output=True, text=True, timeout=120
        )

    def tail(self, lines: int = 30) -> str:
        out = []
        for path in sorted([*self.logs.glob("*.log"), *self.logs.glob("*.jsonl")]):
            text_lines = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name}\n" + "\n".join(text_lines))
        return "\n".join(out)

    def events(self, event: str) -> list[dict]:
        """Every JSON log record named ``event`` in every process's log."""
        found = []
        for path in sorted([*self.logs.glob("*.log"), *self.logs.glob("*.jsonl")]):
            for line in path.read_text(errors="replace").splitlines():
                if f'"{event}"' not in line:
                    continue
                try:
                    record = json.loads(line[line.index("{") :])
                except ValueError:
                    continue
                if record.get("event") == event:
                    found.append({**record, "_log": path.name})
        return found


@contextmanager
def open_cluster(
    tmp_path: Path,
    broker: str | None = None,
    factory: Callable[[dict[str, str], str, Path], Cluster] = Cluster,
    **env: str,
) -> Iterator[Cluster]:
    """A fresh PostgreSQL database (dropped at the end) with the topology loaded, on
    ``broker`` (default: a random DB of the shared Redis, flushed), with SHORT_CLOCKS and
    ``env`` (names without the CCAT_DATA_TRANSFER_ prefix) for every process; the cluster
    made by ``factory(env, url, logs)``."""
    if broker is None:
        broker = f"redis://127.0.0.1:6379/{uuid.uuid4().int % 12 + 4}"
    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    with fresh_database("ccat_dist") as url:
        redis.Redis.from_url(broker).flushdb()
        full_env = {
            **os.environ,
            "CCAT_DATA_TRANSFER_ENV": "test",
            "CCAT_DATA_TRANSFER_EXECUTION_MODE": "distributed",
            "CCAT_DATA_TRANSFER_DATABASE_URL": url,
            "CCAT_DATA_TRANSFER_BROKER_URL": broker,
            "CCAT_DATA_TRANSFER_REDIS_URL": broker,
            "CCAT_DATA_TRANSFER_DATA_DIR": str(tmp_path / "data"),
            "CCAT_DATA_TRANSFER_LOG_FORMAT": "json",
            "CCAT_DATA_TRANSFER_LOG_LEVEL": "INFO",
            **SHORT_CLOCKS,
            **{f"CCAT_DATA_TRANSFER_{k}": str(v) for k, v in env.items()},
        }
        c = factory(full_env, url, logs)
        try:
            init = c.cli("init")
            assert init.returncode == 0, init.stderr
            yield c
        finally:
            c.stop_all()
            try:
                redis.Redis.from_url(broker).flushdb()
            except redis.ConnectionError:
                pass
            # Big test data must not outlive the test (pytest keeps the last runs' tmp dirs).
            shutil.rmtree(tmp_path / "data", ignore_errors=True)


# ---------------------------------------------------------------------------------------
# Waiting and reading the state
# ---------------------------------------------------------------------------------------


def wait(cluster: Cluster, what: str, predicate: Callable[[], object], timeout: float,
         every: float = 0.5) -> float:  # fmt: skip
    """Poll ``predicate`` until it is true; returns the seconds waited.  Fails with the
    DB state and the logs' tails on timeout or when a process died."""
    started = time.monotonic()
    deadline = started + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic() - started
        for name, proc in cluster.procs.items():
            assert proc.poll() is None, f"{name} died:\n{cluster.tail()}"
        time.sleep(every)
    pytest.fail(f"timed out waiting for {what}\n{db_state(cluster.url)}\n{cluster.tail()}")


def count(db: DatabaseConnection, stmt) -> int:
    with db.session_scope() as s:
        return int(s.scalar(stmt) or 0)


def packages(db: DatabaseConnection) -> int:
    return count(db, select(func.count(m.RawDataPackage.id)))


def lifecycle_done(db: DatabaseConnection, packages_expected: int) -> bool:
    """Every package ARCHIVED with a PRESENT copy at both LTAs, nothing left at the
    source sites' locations or the buffers."""
    with db.session_scope() as s:
        if not archived_at_both_ltas(s, packages_expected):
            return False
        left_at_temporary = s.scalar(
            select(func.count(m.PhysicalCopy.id))
            .join(m.DataLocation, m.DataLocation.id == m.PhysicalCopy.data_location_id)
            .where(
                m.DataLocation.location_type.in_([m.LocationType.SOURCE, m.LocationType.BUFFER]),
                m.PhysicalCopy.status != m.PhysicalCopyStatus.DELETED,
            )
        )
    return left_at_temporary == 0


def all_done(db: DatabaseConnection) -> bool:
    n = packages(db)
    return n > 0 and lifecycle_done(db, n)


def failed_anything(db: DatabaseConnection) -> list[str]:
    """Rows of any stage that ended FAILED (the tests of faults that must not fail
    anything assert this is empty)."""
    out = []
    with db.session_scope() as s:
        for t in s.scalars(select(m.DataTransfer)):
            if m.Status.FAILED in (t.status, t.unpack_status):
                out.append(f"transfer {t.id}: {t.failure_reason} / {t.unpack_failure_reason}")
        for a in s.scalars(
            select(m.LongTermArchiveTransfer).where(
                m.LongTermArchiveTransfer.status == m.Status.FAILED
            )
        ):
            out.append(f"archive transfer {a.id}: {a.failure_reason}")
        for d in s.scalars(
            select(m.DataTransferPackage).where(m.DataTransferPackage.status == m.Status.FAILED)
        ):
            out.append(f"data transfer package {d.id}: {d.failure_reason}")
        for p in s.scalars(
            select(m.RawDataPackage).where(m.RawDataPackage.status == m.Status.FAILED)
        ):
            out.append(f"raw data package {p.id}: {p.failure_reason}")
    return out


def retries_charged(db: DatabaseConnection) -> dict[str, int]:
    """The retry counters of transfers, unpacks and archive copies, summed."""
    with db.session_scope() as s:
        return {
            "transfers": int(s.scalar(select(func.sum(m.DataTransfer.retry_count))) or 0),
            "unpacks": int(s.scalar(select(func.sum(m.DataTransfer.unpack_retry_count))) or 0),
            "archive_transfers": int(
                s.scalar(select(func.sum(m.LongTermArchiveTransfer.retry_count))) or 0
            ),
        }


def db_state(url: str) -> str:
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
        for a in s.scalars(select(m.LongTermArchiveTransfer)):
            out.append(
                f"archive {a.id} rdp={a.raw_data_package_id} {a.status.name} "
                f"retries={a.retry_count} reason={a.failure_reason}"
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


# ---------------------------------------------------------------------------------------
# What is on disk
# ---------------------------------------------------------------------------------------


def _sha256_stream(stream) -> str:
    digest = hashlib.sha256()
    while chunk := stream.read(1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def verify_files_at_both_ltas(db: DatabaseConnection) -> int:
    """Read every archived package at both LTAs: the tar's sha256 is the package's, and
    every member's bytes hash to its RawDataFile's registered checksum, each file once per
    LTA.  Returns how many file copies were verified."""
    with db.session_scope() as s:
        rows = lta_package_copies(s)
        files = {
            path: (pid, checksum)
            for path, pid, checksum in s.execute(
                select(
                    m.RawDataFile.relative_path,
                    m.RawDataFile.raw_data_package_id,
                    m.RawDataFile.checksum,
                )
            ).all()
        }
    seen: dict[str, set[str]] = {lta: set() for lta in LTAS}
    for package_id, checksum, rel, lta, root, _copy in rows:
        path = Path(root) / rel
        with open(path, "rb") as fh:
            assert _sha256_stream(fh) == checksum, (lta, rel)
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                assert member.isfile(), (lta, rel, member.name)
                pid, expected = files[member.name]
                assert pid == package_id, (lta, member.name)
                assert _sha256_stream(tar.extractfile(member)) == expected, (lta, member.name)
                assert member.name not in seen[lta], f"{member.name} twice at {lta}"
                seen[lta].add(member.name)
    for lta in LTAS:
        assert seen[lta] == set(files), f"{lta}: files missing {set(files) - seen[lta]}"
    return sum(len(v) for v in seen.values())


def temporary_names(root: Path) -> list[Path]:
    """Leftovers of interrupted writes under ``root``: ``.<name>.tmp-*`` files and
    ``.unpack.tmp-*`` work folders."""
    return sorted(p for p in root.rglob("*") if ".tmp-" in p.name)
