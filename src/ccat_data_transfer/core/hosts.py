"""Sites as hosts: how a worker reaches another site's machine.

In a multi-host deployment (docs/deployment-hosts.rst) every site is its own machine and
its workers run as the site's unix user, who alone can read and write the site's
storage.  Cross-site bytes move only by a network transfer method; cross-site knowledge
only through the database and the broker.  Who does what:

* **push** -- the origin site's worker (the transfer task runs on the origin location's
  queue) sends the bytes with the route's method, logged in to the destination host as
  the destination site's ``ssh_user`` (rsync, bbcp) or through the destination site's
  XRootD server (xrootd);
* **verify** -- the SHA-256 of what landed is computed on the destination host, where
  the bytes are (``sha256sum`` over ssh), never by reading them back across the link;
* **unpack, archive, delete** -- the site that holds the copy, by its own workers on its
  own locations' queues.

A site's reach comes from the topology (``[[sites]]`` ``host``, ``ssh_user``,
``ssh_port``, ``ssh_key``, ``xrootd_url``; validated in :mod:`ccat_ops_db.topology_sites`)
through the ``site`` table.  A host that does not answer gives a
:class:`~ccat_data_transfer.core.errors.RetryableError` naming the host, within
TRANSFER_CONNECT_TIMEOUT_SECONDS: ssh and xrdcp never run their own long retries, the
transfer's backoff retries.

Room in the house: core (no storage, no DB session).  Imports config, exceptions and
``ccat_ops_db`` models.
"""

from __future__ import annotations

import shlex
import socket
import time
from dataclasses import dataclass
from typing import Any, TextIO

from ccat_data_transfer.core.config import child_environment, settings
from ccat_data_transfer.core.errors import RetryableError
from ccat_data_transfer.core.subprocesses import run_bounded
from ccat_ops_db import models as m

__all__ = [
    "XROOTD_IN_FLIGHT",
    "SiteReach",
    "as_reach",
    "reach_of",
    "run_logged",
    "xrootd_env",
]

# xrdcp's copy chunking (set in xrootd_env): chunks in flight and their size.
XRD_PARALLEL_CHUNKS = 4
XRD_CHUNK_SIZE = 8 * 1024 * 1024
XROOTD_IN_FLIGHT = XRD_PARALLEL_CHUNKS * XRD_CHUNK_SIZE


def connect_timeout() -> int:
    return max(1, int(settings.get("TRANSFER_CONNECT_TIMEOUT_SECONDS", 10)))


@dataclass(frozen=True, slots=True)
class SiteReach:
    """How to reach one site's machine: ssh login and the network endpoints it serves."""

    host: str
    site: str = ""
    ssh_user: str | None = None
    ssh_port: int | None = None
    ssh_key: str | None = None
    xrootd_url: str | None = None

    @classmethod
    def of_site(cls, site: m.Site) -> SiteReach | None:
        if not site.host:
            return None
        return cls(
            host=site.host,
            site=site.name,
            ssh_user=site.ssh_user,
            ssh_port=site.ssh_port,
            ssh_key=site.ssh_key,
            xrootd_url=site.xrootd_url,
        )

    @property
    def label(self) -> str:
        """``site cologne (ccat-cologne@lta.example.org:22)`` -- for error messages."""
        where = f"{self.target}:{self.ssh_port or 22}"
        return f"site {self.site} ({where})" if self.site else f"host {where}"

    @property
    def target(self) -> str:
        """``user@host`` (or ``host``) for ssh and rsync."""
        return f"{self.ssh_user}@{self.host}" if self.ssh_user else self.host

    def ssh_base(self) -> list[str]:
        """``ssh`` with the options every connection to this host uses (no target)."""
        opts = [
            "ssh",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"ConnectTimeout={connect_timeout()}",
            "-o",
            "ServerAliveInterval=15",
            "-o",
            "ServerAliveCountMax=4",
        ]
        known_hosts = str(settings.get("TRANSFER_SSH_KNOWN_HOSTS_FILE", "") or "")
        if known_hosts:
            opts += ["-o", f"UserKnownHostsFile={known_hosts}"]
        if self.ssh_key:
            opts += ["-o", f"IdentityFile={self.ssh_key}", "-o", "IdentitiesOnly=yes"]
        if self.ssh_port:
            opts += ["-p", str(self.ssh_port)]
        return opts

    def ssh(self, *argv: str) -> list[str]:
        """The command running ``argv`` on this host (quoted for the remote shell)."""
        return [*self.ssh_base(), self.target, "--", shlex.join(argv)]

    def ssh_script(self, script: str) -> list[str]:
        """The command running the shell ``script`` (already quoted) on this host."""
        return [*self.ssh_base(), self.target, "--", script]

    def xrootd_path(self, path: str) -> str:
        """``root://host:port//abs/path`` of an absolute path on this host."""
        if not self.xrootd_url:
            raise RetryableError(f"{self.label} serves no XRootD endpoint (xrootd_url)")
        return f"{self.xrootd_url.rstrip('/')}//{path.lstrip('/')}"


def as_reach(host: SiteReach | str | None) -> SiteReach | None:
    """A :class:`SiteReach` from what callers pass as ``src_host``/``dst_host``: a reach,
    a bare host name (ssh defaults), or None/this machine (local)."""
    if isinstance(host, SiteReach):
        return host
    if not host or host in ("localhost", "127.0.0.1", "::1"):
        return None
    return SiteReach(host=host)


def reach_of(location: m.DataLocation, here_site_id: int) -> SiteReach | None:
    """How a worker of site ``here_site_id`` reaches ``location``: None when the location
    is at that site (or every site shares a filesystem), else its site's reach.  A
    location's own ``host`` stands in for a site that declares none."""
    if location.site_id == here_site_id:
        return None
    reach = SiteReach.of_site(location.site)
    if reach is not None:
        return reach
    host = location.host
    if not host or host in (socket.gethostname(), socket.getfqdn()):
        return None
    return SiteReach(host=host, site=location.site.name)


def xrootd_env() -> dict[str, str]:
    """The environment of xrdcp/xrdfs: give up on an unreachable server within the
    connect timeout (its defaults wait minutes), no retries of its own."""
    timeout = str(connect_timeout())
    return child_environment(
        **{
            "XRD_CONNECTIONRETRY": "1",
            "XRD_CONNECTIONWINDOW": timeout,
            "XRD_STREAMERRORWINDOW": "0",
            "XRD_REQUESTTIMEOUT": str(max(60, 6 * int(timeout))),
            "XRD_STREAMTIMEOUT": str(max(60, 6 * int(timeout))),
            "XRD_TIMEOUTRESOLUTION": "1",
            # Fixed so that the resume margin of the 'xrootd' method holds: at most
            # PARALLELCHUNKS chunks of CHUNKSIZE are in flight, so everything more than
            # XROOTD_IN_FLIGHT bytes below the end of a partial file has been written.
            "XRD_CPPARALLELCHUNKS": str(XRD_PARALLEL_CHUNKS),
            "XRD_CPCHUNKSIZE": str(XRD_CHUNK_SIZE),
        }
    )


def log_line(log_file: TextIO, line: str) -> None:
    log_file.write(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {line}\n")
    log_file.flush()


def run_logged(
    cmd: list[str],
    log_file: TextIO,
    what: str,
    reach: SiteReach | None = None,
    env: dict[str, str] | None = None,
    stdin: Any = None,
    work_bytes: int = 0,
) -> str:
    """Run a command, its output appended to the transfer log; returns its stdout.  A
    non-zero exit is retryable and, with ``reach``, names the host it was talking to.
    The command has a deadline scaled to ``work_bytes`` (the bytes it moves or reads;
    :func:`~ccat_data_transfer.core.subprocesses.run_bounded`)."""
    log_line(log_file, "$ " + shlex.join(cmd))
    try:
        proc = run_bounded(cmd, work_bytes=work_bytes, env=env, stdin=stdin)
    except RetryableError as exc:
        log_line(log_file, f"# {exc}")
        raise
    for stream in (proc.stdout, proc.stderr):
        if stream:
            log_file.write(stream if stream.endswith("\n") else stream + "\n")
    log_file.flush()
    if proc.returncode != 0:
        detail = (proc.stderr.strip().splitlines() or [""])[-1][:300]
        where = f" with {reach.label}" if reach is not None else ""
        raise RetryableError(
            f"{what}{where} failed (exit status {proc.returncode}): {detail or 'see the log'}"
        )
    return proc.stdout
