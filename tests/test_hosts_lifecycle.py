"""The whole lifecycle with every site on its own host (loopback), real processes.

Four sites (telescope, two LTAs, processing), each a unix user owning a 0700 data root,
with its own sshd and XRootD server on 127.0.0.x (:mod:`helpers_hosts`).  Each site's
worker (default concurrency), managers (``run --no-init --site``) run as that site's
user, on PostgreSQL with the Redis broker, so a shortcut through the filesystem into
another site fails with "permission denied".  Routes: the telescope pushes to each LTA
by rsync over ssh, the LTAs replicate to each other by xrootd (parallel streams).

The test files data at the telescope host and waits until every package is archived at
both LTA hosts and deleted from the telescope by the rules; then kills (``-9``) the
telescope's worker in the middle of a slowed rsync push, and checks that the retry
sends only the bytes that had not landed; then stops an LTA's sshd (retries name the
host; success once it is back, nothing lost); and finally stages a package to the
processing host, pulled over ssh from an LTA host.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import signal
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import create_engine, func, select, text

from ccat_data_transfer.database import DatabaseConnection, dispose_engines
from ccat_data_transfer.simulator import InstrumentSimulator
from ccat_data_transfer.staging.jobs import create_staging_job
from ccat_ops_db import models as m
from conftest import DEFAULT_TOPOLOGY, PG_ADMIN_URL
from helpers_cluster import SHORT_CLOCKS, db_state, lifecycle_done
from helpers_hosts import SiteHosts

CLI = [sys.executable, "-m", "ccat_data_transfer"]
SITES = ("ccat", "cologne", "us", "processing")
ROUTES = {("ccat", "cologne"): "rsync", ("ccat", "us"): "rsync"}
ROUTES |= {("cologne", "us"): "xrootd", ("us", "cologne"): "xrootd"}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def hosts_topology(hosts: SiteHosts) -> str:
    """The default topology with every site on its own host: reach fields, absolute
    location paths inside each site's root, network methods on the routes."""
    raw = tomllib.loads(DEFAULT_TOPOLOGY.read_text())
    for site in raw["sites"]:
        site.update(hosts.sites[site["name"]].topology_entry(hosts.keys))
    for loc in raw["locations"]:
        loc["path"] = str(hosts.sites[loc["site"]].root / loc["name"])
    for route in raw["routes"]:
        route["method"] = ROUTES[(route["origin"], route["destination"])]
    out = ["[observatory]"] + [f"{k} = {_toml_value(v)}" for k, v in raw["observatory"].items()]
    for section in ("telescopes", "instruments", "sites", "locations", "routes"):
        for entry in raw[section]:
            out += ["", f"[[{section}]]"] + [f"{k} = {_toml_value(v)}" for k, v in entry.items()]
    return "\n".join(out) + "\n"


class HostCluster:
    """Processes of the test, each started as a site's user."""

    def __init__(self, hosts: SiteHosts, env: dict[str, str], url: str, logs: Path) -> None:
        self.hosts = hosts
        self.env = env
        self.url = url
        self.logs = logs
        self.procs: dict[str, subprocess.Popen] = {}

    def site_env(self, site: str) -> dict[str, str]:
        host = self.hosts.sites[site]
        return host.user_env(
            {
                **self.env,
                **self.hosts.settings_env(),
                "CCAT_DATA_TRANSFER_DATA_DIR": str(host.work / "state"),
                "CCAT_DATA_TRANSFER_TRANSFER_LOG_DIR": str(host.work / "logs"),
            }
        )

    def start(self, name: str, site: str, args: list[str], **extra_env: str) -> None:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        host = self.hosts.sites[site]
        self.procs[name] = subprocess.Popen(
            CLI + args,
            env={**self.site_env(site), **extra_env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=host.work,
            **host.as_user(),
        )

    def start_worker(self, site: str, **extra_env: str) -> None:
        self.start(
            f"worker-{site}",
            site,
            ["worker", "--site", site, "--name", f"{site}@hosts"],
            **extra_env,
        )

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name)
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=8)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:  # a warm shutdown waiting for its tasks
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)

    def stop_all(self) -> None:
        """SIGTERM to every process at once; SIGKILL to what still runs 8 s later."""
        procs, self.procs = self.procs, {}
        for proc in procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 8
        for proc in procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)

    def tail(self, lines: int = 25) -> str:
        out = []
        for path in sorted(self.logs.glob("*.log")):
            text_lines = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name}\n" + "\n".join(text_lines))
        return "\n".join(out)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[HostCluster]:
    hosts = SiteHosts(list(SITES)).start()
    name = f"ccat_hosts_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    broker = f"redis://127.0.0.1:6379/{random.randint(4, 15)}"
    redis.Redis.from_url(broker).flushdb()
    logs = tmp_path / "logs"
    logs.mkdir()
    logs.chmod(0o777)  # each site's processes append their own log here
    topology = hosts.base / "topology.toml"
    topology.write_text(hosts_topology(hosts))
    topology.chmod(0o644)
    env = {
        **os.environ,
        "CCAT_DATA_TRANSFER_ENV": "test",
        "CCAT_DATA_TRANSFER_EXECUTION_MODE": "distributed",
        "CCAT_DATA_TRANSFER_DATABASE_URL": url,
        "CCAT_DATA_TRANSFER_BROKER_URL": broker,
        "CCAT_DATA_TRANSFER_REDIS_URL": broker,
        "CCAT_DATA_TRANSFER_TOPOLOGY_FILE": str(topology),
        "CCAT_DATA_TRANSFER_LOG_FORMAT": "json",
        "CCAT_DATA_TRANSFER_LOG_LEVEL": "INFO",
        **SHORT_CLOCKS,
        "CCAT_DATA_TRANSFER_TRANSFER_RETRY_BASE_SECONDS": "1",
        "CCAT_DATA_TRANSFER_TRANSFER_MAX_RETRIES": "100",
    }
    c = HostCluster(hosts, env, url, logs)
    try:
        init = subprocess.run(
            CLI + ["init"],
            env={**env, "CCAT_DATA_TRANSFER_DATA_DIR": str(hosts.base / "init")},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert init.returncode == 0, init.stderr
        for site in SITES:  # what init made in a site's root belongs to the site's user
            host = hosts.sites[site]
            subprocess.run(["chown", "-R", f"{host.uid}:{host.gid}", str(host.root)], check=True)
            for sub in ("state", "logs"):
                (host.work / sub).mkdir(exist_ok=True)
                os.chown(host.work / sub, host.uid, host.gid)
        yield c
    finally:
        c.stop_all()
        dispose_engines()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
        redis.Redis.from_url(broker).flushdb()
        hosts.close()


def _wait(cluster: HostCluster, what: str, predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for name, proc in cluster.procs.items():
            assert proc.poll() is None, f"{name} died:\n{cluster.tail()}"
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}\n{db_state(cluster.url)}\n{cluster.tail()}")


def _file(cluster: HostCluster, db: DatabaseConnection, **kwargs: Any) -> None:
    """The instruments write and file observations at the telescope host (files then
    owned by the telescope site's user, as its instruments would write them)."""
    sim = InstrumentSimulator(db=db, modules_per_instrument=1, **kwargs)
    while sim.step():
        pass
    ccat = cluster.hosts.sites["ccat"]
    subprocess.run(["chown", "-R", f"{ccat.uid}:{ccat.gid}", str(ccat.root)], check=True)


def _packages(db: DatabaseConnection) -> int:
    with db.session_scope() as s:
        return s.scalar(select(func.count(m.RawDataPackage.id))) or 0


def _all_done(db: DatabaseConnection) -> bool:
    n = _packages(db)
    return n > 0 and lifecycle_done(db, n)


def _partials(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*.tmp-resume") if p.is_file()]


def test_lifecycle_across_hosts(cluster: HostCluster) -> None:
    db = DatabaseConnection(cluster.url)
    for site in SITES:
        cluster.start_worker(site)
        cluster.start(f"managers-{site}", site, ["run", "--no-init", "--site", site])
    cluster.start("recovery", "ccat", ["recovery"])

    # 1. Data filed at the telescope host reaches both LTA hosts (rsync, then xrootd),
    #    is archived there and deleted at the telescope by the rules.
    _file(cluster, db, observations=2, files_per_module=2, file_size=256 * 1024)
    _wait(cluster, "the first data to be archived at both LTA hosts", lambda: _all_done(db), 240)
    with db.session_scope() as s:
        used = set(
            s.scalars(
                select(m.DataTransfer.transfer_method).where(
                    m.DataTransfer.status == m.Status.COMPLETED
                )
            )
        )
    assert used == {m.TransferMethod.RSYNC, m.TransferMethod.XROOTD}
    for site in ("cologne", "us"):
        host = cluster.hosts.sites[site]
        archived = [p for p in (host.root / f"{site}_lta").rglob("*") if p.is_file()]
        assert archived and all(p.stat().st_uid == host.uid for p in archived)

    # 2. kill -9 of the pushing (telescope) worker in the middle of a slowed rsync push;
    #    the retry sends only the bytes that had not landed.
    cluster.kill("worker-ccat", signal.SIGTERM)
    cluster.start_worker("ccat", CCAT_DATA_TRANSFER_TRANSFER_BANDWIDTH_LIMIT_MB_PER_S="2")
    before = _packages(db)
    _file(cluster, db, observations=1, files_per_module=4, file_size=3 * 1024 * 1024, run_id="big")
    lta_roots = [cluster.hosts.sites[s].root for s in ("cologne", "us")]

    def partial_growing() -> bool:
        return any(p.stat().st_size > 2 * 1024 * 1024 for r in lta_roots for p in _partials(r))

    _wait(cluster, "a push to be half-way", partial_growing, 180)
    cluster.kill("worker-ccat", signal.SIGKILL)
    time.sleep(1.0)
    with db.session_scope() as s:
        killed = s.scalars(
            select(m.DataTransfer).where(
                m.DataTransfer.status == m.Status.IN_PROGRESS, m.DataTransfer.is_primary.is_(True)
            )
        ).all()
        assert killed, "the push finished before the worker was killed"
        sizes = {t.id: t.data_transfer_package.size for t in killed}
        logs = {t.id: Path(t.log_path) for t in killed}
    landed = {p: p.stat().st_size for r in lta_roots for p in _partials(r)}
    assert landed and all(0 < n for n in landed.values())
    cluster.start_worker("ccat")
    _wait(
        cluster,
        "the interrupted data to be archived",
        lambda: _packages(db) > before and _all_done(db),
        240,
    )
    with db.session_scope() as s:
        for tid in sizes:
            t = s.get(m.DataTransfer, tid)
            assert t.status == m.Status.COMPLETED and t.retry_count >= 1
    for tid, log in logs.items():
        sent = [
            int(n.replace(",", ""))
            for n in re.findall(r"Total bytes sent: ([\d,]+)", log.read_text())
        ]
        assert sent, log.read_text()
        # The retry sent at most what was missing (plus protocol), not the whole package.
        assert sent[-1] <= sizes[tid] - max(landed.values()) + 512 * 1024, (sent, sizes, landed)
    assert not any(_partials(r) for r in lta_roots)

    # 3. An LTA host that does not answer (its sshd stopped): retries naming the host,
    #    then success once it is back; nothing lost.
    cologne = cluster.hosts.sites["cologne"]
    cologne.stop("sshd")
    before = _packages(db)
    _file(cluster, db, observations=1, files_per_module=2, file_size=256 * 1024, run_id="down")

    def retried_naming_cologne() -> bool:
        with db.session_scope() as s:
            return bool(
                s.scalar(
                    select(func.count(m.DataTransfer.id)).where(
                        m.DataTransfer.retry_count >= 1,
                        m.DataTransfer.failure_reason.contains("site cologne"),
                        m.DataTransfer.failure_reason.contains(cologne.address),
                    )
                )
            )

    try:
        _wait(cluster, "a retry naming the unreachable host", retried_naming_cologne, 180)
    finally:
        cologne.start_sshd()
    _wait(
        cluster,
        "the data to be archived once the host is back",
        lambda: _packages(db) > before and _all_done(db),
        240,
    )
    with db.session_scope() as s:
        assert not s.scalar(
            select(func.count(m.DataTransfer.id)).where(m.DataTransfer.status == m.Status.FAILED)
        )

    # 4. Stage a package to the processing host: pulled over ssh from an LTA host.
    with db.session_scope() as s:
        package = s.scalars(select(m.RawDataPackage).order_by(m.RawDataPackage.id)).first()
        job_id = create_staging_job(s, package_ids=[package.id]).id
        files = {
            f.relative_path: f.checksum
            for f in s.scalars(
                select(m.RawDataFile).where(m.RawDataFile.raw_data_package_id == package.id)
            )
        }

    def staged() -> bool:
        with db.session_scope() as s:
            return s.get(m.StagingJob, job_id).status == m.Status.COMPLETED

    _wait(cluster, "the package to be staged at the processing host", staged, 180)
    proc = cluster.hosts.sites["processing"]
    scratch = proc.root / "processing_scratch"
    for rel, checksum in files.items():
        path = next(p for p in scratch.rglob("*") if p.as_posix().endswith("/" + rel))
        assert path.stat().st_uid == proc.uid
        assert hashlib.sha256(path.read_bytes()).hexdigest() == checksum
