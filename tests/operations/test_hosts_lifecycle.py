"""The whole lifecycle with every site on its own host (loopback), real processes.

Four sites (telescope, two LTAs, processing), each a unix user owning a 0700 data root,
with its own sshd and XRootD server on 127.0.0.x (:mod:`helpers_hosts`).  Each site's
worker (default concurrency), managers (``run --no-init --site``) run as that site's
user, on PostgreSQL with the Redis broker, so a shortcut through the filesystem into
another site fails with "permission denied".  Routes: the telescope pushes to each LTA
by rsync over ssh, the LTAs replicate to each other by xrootd (parallel streams).

The test files data at the telescope host (the instrument simulator runs as the
telescope site's user) and waits until every package is archived at both LTA hosts and
deleted from the telescope by the rules; then kills (``-9``) the telescope's worker in
the middle of a slowed rsync push, and checks that the retry sends only the bytes that
had not landed; then stops an LTA's sshd (retries name the host; success once it is
back, nothing lost); and finally stages a package to the processing host, pulled over
ssh from an LTA host.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import signal
import subprocess
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from ccat_data_transfer.core.database import DatabaseConnection
from ccat_data_transfer.staging.jobs import create_staging_job
from ccat_ops_db import models as m
from conftest import DEFAULT_TOPOLOGY
from helpers_cluster import Cluster, all_done, open_cluster, packages, wait
from helpers_hosts import SiteHosts

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


class HostCluster(Cluster):
    """A cluster whose processes each run as a site's user, in its work folder, with its
    own state and transfer-log folders."""

    grace_seconds = 8  # a warm shutdown waiting for its tasks is not waited for

    def __init__(self, hosts: SiteHosts, env: dict[str, str], url: str, logs: Path) -> None:
        super().__init__(env, url, logs)
        self.hosts = hosts
        logs.chmod(0o777)  # each site's processes append their own log here

    def site_env(self, site: str | None) -> dict[str, str]:
        host = self.hosts.sites[site]
        return host.user_env(
            {
                **self.env,
                **self.hosts.settings_env(),
                "CCAT_DATA_TRANSFER_DATA_DIR": str(host.work / "state"),
                "CCAT_DATA_TRANSFER_TRANSFER_LOG_DIR": str(host.work / "logs"),
            }
        )

    def popen_args(self, site: str | None) -> dict[str, Any]:
        host = self.hosts.sites[site]
        return {"cwd": host.work, **host.as_user()}

    def file_at_telescope(self, **kwargs: Any) -> None:
        """The instruments write and file observations at the telescope host: the
        simulator runs as the telescope site's user (``helpers_hosts.py simulate``)."""
        spec = {"url": self.url, "modules_per_instrument": 1, **kwargs}
        proc = self.hosts.run_as(
            "ccat",
            ["simulate", json.dumps(spec)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"the simulator exited with {proc.returncode}:\n{out}"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[HostCluster]:
    with SiteHosts(list(SITES)) as hosts:
        topology = hosts.base / "topology.toml"
        topology.write_text(hosts_topology(hosts))
        topology.chmod(0o644)
        with open_cluster(
            tmp_path,
            factory=functools.partial(HostCluster, hosts),
            DATA_DIR=str(hosts.base / "init"),
            TOPOLOGY_FILE=str(topology),
            TRANSFER_RETRY_BASE_SECONDS="1",
            TRANSFER_MAX_RETRIES="100",
        ) as c:
            for site in SITES:  # what init made in a site's root belongs to the site's user
                host = hosts.sites[site]
                subprocess.run(
                    ["chown", "-R", f"{host.uid}:{host.gid}", str(host.root)], check=True
                )
                for sub in ("state", "logs"):
                    (host.work / sub).mkdir(exist_ok=True)
                    os.chown(host.work / sub, host.uid, host.gid)
            yield c


def _partials(root: Path) -> list[Path]:
    # The parked resume name and the per-attempt ones (.name.tmp-resume-<attempt>).
    return [p for p in root.rglob(".*.tmp-resume*") if p.is_file()]


def _wait_new_data_done(cluster, db: DatabaseConnection, before: int, what: str) -> None:
    """Wait until there are more than ``before`` packages and every one is archived at
    both LTA hosts and cleaned up (the data filed since ``before`` went all the way)."""
    wait(cluster, what, lambda: packages(db) > before and all_done(db), 240)


def test_lifecycle_across_hosts(cluster: HostCluster) -> None:
    db = DatabaseConnection(cluster.url)
    for site in SITES:
        cluster.start_worker(site)
        cluster.start(f"managers-{site}", ["run", "--no-init", "--site", site], site=site)
    cluster.start("recovery", ["recovery"], site="ccat")

    # 1. Data filed at the telescope host reaches both LTA hosts (rsync, then xrootd),
    #    is archived there and deleted at the telescope by the rules.
    cluster.file_at_telescope(observations=2, files_per_module=2, file_size=256 * 1024)
    wait(cluster, "the first data to be archived at both LTA hosts", lambda: all_done(db), 240)
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
    before = packages(db)
    cluster.file_at_telescope(
        observations=1, files_per_module=4, file_size=3 * 1024 * 1024, run_id="big"
    )
    lta_roots = [cluster.hosts.sites[s].root for s in ("cologne", "us")]

    def partial_growing() -> bool:
        return any(p.stat().st_size > 2 * 1024 * 1024 for r in lta_roots for p in _partials(r))

    wait(cluster, "a push to be half-way", partial_growing, 180)
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
    _wait_new_data_done(cluster, db, before, "the interrupted data to be archived")
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
    before = packages(db)
    cluster.file_at_telescope(
        observations=1, files_per_module=2, file_size=256 * 1024, run_id="down"
    )

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
        wait(cluster, "a retry naming the unreachable host", retried_naming_cologne, 180)
    finally:
        cologne.start_sshd()
    _wait_new_data_done(cluster, db, before, "the data to be archived once the host is back")
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

    wait(cluster, "the package to be staged at the processing host", staged, 180)
    proc = cluster.hosts.sites["processing"]
    scratch = proc.root / "processing_scratch"
    for rel, checksum in files.items():
        path = next(p for p in scratch.rglob("*") if p.as_posix().endswith("/" + rel))
        assert path.stat().st_uid == proc.uid
        assert hashlib.sha256(path.read_bytes()).hexdigest() == checksum
