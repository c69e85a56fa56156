"""Transfer methods across hosts, with real servers on loopback.

Each site is its own host (:mod:`helpers_hosts`): a unix user owning a 0700 data root,
an sshd and an XRootD server listening on its own 127.0.0.x only (checked here on the
sockets of each server's processes).  Every method call runs as the pushing site's user
in its own process, so a shortcut through the local filesystem into another site's
root fails with "permission denied".  Covered: rsync over ssh
(verified on the destination host, resumed after ``kill -9`` without re-sending the
bytes already there), xrdcp with parallel streams (resumed after ``kill -9`` and from a
partial file, below the chunks that were in flight; a bad partial caught by the checksum), and an
unreachable host: a fast retryable error naming it, then success once it answers again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ccat_data_transfer.core.hosts import XROOTD_IN_FLIGHT
from helpers_hosts import SiteHosts, transfer_spec

SIZE = 64 * 1024 * 1024


@pytest.fixture(scope="module")
def hosts():
    with SiteHosts(["ccat", "cologne"]) as h:
        yield h


def _put(hosts: SiteHosts, site: str, path: str, data: bytes) -> Path:
    """A file in a site's root, owned by the site's user (as its workers would write)."""
    host = hosts.sites[site]
    target = host.root / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    for p in [target, *target.relative_to(host.root).parents]:
        os.chown(host.root / p, host.uid, host.gid)
    return target


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sent_bytes(log: Path) -> list[int]:
    """rsync's "Total bytes sent" of each run logged, in order."""
    return [
        int(n.replace(",", "")) for n in re.findall(r"Total bytes sent: ([\d,]+)", log.read_text())
    ]


def _listening(pgid: int) -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket of process group ``pgid`` (read from
    /proc: the socket inodes among its processes' fds, their addresses in net/tcp*)."""
    inodes = set()
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or os.getpgid(int(proc.name)) != pgid:
                continue
            links = [os.readlink(fd) for fd in (proc / "fd").iterdir()]
        except (ProcessLookupError, FileNotFoundError):
            continue  # exited meanwhile
        inodes.update(m[1] for link in links if (m := re.fullmatch(r"socket:\[(\d+)\]", link)))
    found = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path("/proc/net", table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            hexaddr, hexport = fields[1].split(":")
            # The address is printed as 32-bit words in host byte order.
            raw = b"".join(
                struct.pack("=I", int(hexaddr[i : i + 8], 16)) for i in range(0, len(hexaddr), 8)
            )
            found.add((socket.inet_ntop(family, raw), int(hexport, 16)))
    return found


def test_each_server_listens_on_its_site_address_only(hosts):
    for host in hosts.sites.values():
        own = {host.address, f"::ffff:{host.address}"}
        for name, port in (("sshd", host.ssh_port), ("xrootd", host.xrootd_port)):
            sockets = _listening(host.procs[name].pid)
            assert port in {p for _, p in sockets}, (host.site, name, sockets)
            assert {a for a, _ in sockets} <= own, (host.site, name, sockets)
            socket.create_connection((host.address, port), 3).close()
            with pytest.raises(ConnectionRefusedError):  # another loopback address, same port
                socket.create_connection(("127.0.0.1", port), 3).close()


def test_site_user_cannot_take_a_local_shortcut(hosts):
    data = os.urandom(1024)
    _put(hosts, "ccat", "short/a.bin", data)
    result = hosts.push(transfer_spec(hosts, "copy", "short/a.bin", reach=False))
    assert result["error"] == "PermissionError", result
    assert "Permission denied" in result["message"]
    assert not (hosts.sites["cologne"].root / "short").exists()


def _push_checked(hosts, method: str, rel: str, size: int):
    """Push ``size`` random bytes from ccat to cologne by ``method``; the checksum the
    method reports, the bytes landed and their owner (the destination's user) are
    checked.  Returns the landed path."""
    data = os.urandom(size)
    _put(hosts, "ccat", rel, data)
    result = hosts.push(transfer_spec(hosts, method, rel))
    assert result.get("sha256") == _sha(data), result
    landed = hosts.sites["cologne"].root / rel
    assert landed.read_bytes() == data
    assert landed.stat().st_uid == hosts.sites["cologne"].uid
    return landed


def test_rsync_over_ssh_lands_verified_and_owned_by_the_destination_user(hosts):
    landed = _push_checked(hosts, "rsync", "pkg/one.tar", 3 * 1024 * 1024 + 17)
    assert [p.name for p in landed.parent.iterdir()] == ["one.tar"]  # no partial left
    log = (hosts.sites["ccat"].work / "rsync.log").read_text()
    assert "sha256sum" not in log  # the checksum is not part of the copy's traffic


@dataclass
class KilledPush:
    data: bytes
    spec: dict
    log: Path  # the pushing side's transfer log (started empty)
    partial: Path  # the temporary name at the destination
    had: int  # bytes under the temporary name after the kill
    final: Path


def _kill_paced_push(hosts, method: str, rel: str, size: int, at: int, mb_per_s: int):
    """Push ``size`` random bytes to ``rel`` by ``method`` as the ccat user, paced to
    ``mb_per_s``, and ``kill -9`` its whole process group once the destination's
    temporary name holds ``at`` bytes."""
    data = os.urandom(size)
    _put(hosts, "ccat", rel, data)
    spec = transfer_spec(hosts, method, rel)
    log = Path(spec["log"])
    log.unlink(missing_ok=True)
    final = hosts.sites["cologne"].root / rel
    partial = final.with_name(f".{final.name}.tmp-resume")
    slow = {"CCAT_DATA_TRANSFER_TRANSFER_BANDWIDTH_LIMIT_MB_PER_S": str(mb_per_s)}
    proc = hosts.run_as("ccat", ["transfer", json.dumps(spec)], env=slow, stdout=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if partial.exists() and partial.stat().st_size >= at:
            break
        assert proc.poll() is None, "the paced push finished before it could be killed"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(0.5)  # the receiving end notices the closed connection
    had = partial.stat().st_size
    assert at <= had < size and not final.exists()
    return KilledPush(data, spec, log, partial, had, final)


def test_rsync_resumes_after_kill_9_without_resending_what_landed(hosts):
    k = _kill_paced_push(hosts, "rsync", "big/resume.tar", SIZE, SIZE // 3, mb_per_s=16)
    result = hosts.push(k.spec)
    assert result.get("sha256") == _sha(k.data), result
    assert k.final.read_bytes() == k.data and not k.partial.exists()
    resent = _sent_bytes(k.log)[-1]
    # Only what was missing travels again (plus rsync's few KB of protocol).
    assert resent <= SIZE - k.had + 256 * 1024, (resent, k.had)


def test_xrootd_streams_transfer_and_destination_checksum(hosts):
    _push_checked(hosts, "xrootd", "x/pkg.tar", 9 * 1024 * 1024 + 3)
    log = (hosts.sites["ccat"].work / "xrootd.log").read_text()
    assert "--streams 4" in log


def test_xrootd_resumes_from_a_partial_and_a_bad_partial_fails_verification(hosts):
    data = os.urandom(128 * 1024 * 1024)
    landed = 112 * 1024 * 1024
    keep = landed - 2 * XROOTD_IN_FLIGHT
    _put(hosts, "ccat", "xr/part.tar", data)
    partial = _put(hosts, "cologne", "xr/.part.tar.tmp-resume", data[:landed])
    result = hosts.push(transfer_spec(hosts, "xrootd", "xr/part.tar"))
    assert result.get("sha256") == _sha(data), result
    assert not partial.exists()
    assert not partial.with_name(partial.name + "-tail").exists()
    log = (hosts.sites["ccat"].work / "xrootd.log").read_text()
    assert f"resuming: {keep} of {len(data)} bytes kept at the destination" in log

    # Bytes under the temporary name that are not the source's: the checksum computed
    # on the destination host shows it (the caller then removes the copy).
    _put(hosts, "ccat", "xr/bad.tar", data)
    _put(hosts, "cologne", "xr/.bad.tar.tmp-resume", os.urandom(landed))
    result = hosts.push(transfer_spec(hosts, "xrootd", "xr/bad.tar"))
    assert result["sha256"] != _sha(data)


def test_xrootd_resumes_after_kill_9_of_the_pushing_process(hosts):
    """``kill -9`` of a paced xrdcp push at about two thirds: the retry keeps what had
    landed below the chunks in flight and sends only the rest."""
    size = 160 * 1024 * 1024
    k = _kill_paced_push(hosts, "xrootd", "xk/killed.tar", size, 112 * 1024 * 1024, mb_per_s=40)
    assert "--xrate 40000000" in k.log.read_text()  # the pacing reached xrdcp
    result = hosts.push(k.spec)
    assert result.get("sha256") == _sha(k.data), (result, k.log.read_text()[-4000:])
    assert k.final.read_bytes() == k.data and not k.partial.exists()
    kept = int(re.findall(r"resuming: (\d+) of \d+ bytes kept", k.log.read_text())[-1])
    assert kept == k.had - 2 * XROOTD_IN_FLIGHT > 0  # only the rest was sent again


def test_xrootd_retry_sends_everything_when_little_had_landed(hosts):
    data = os.urandom(8 * 1024 * 1024)
    _put(hosts, "ccat", "xr/small.tar", data)
    _put(hosts, "cologne", "xr/.small.tar.tmp-resume", os.urandom(len(data) // 2))
    result = hosts.push(transfer_spec(hosts, "xrootd", "xr/small.tar"))
    assert result.get("sha256") == _sha(data), result


@pytest.mark.parametrize("method, server", [("rsync", "sshd"), ("xrootd", "xrootd")])
def test_unreachable_host_is_a_fast_retryable_error_then_success(hosts, method, server):
    data = os.urandom(256 * 1024)
    path = f"down/{method}.tar"
    _put(hosts, "ccat", path, data)
    cologne = hosts.sites["cologne"]
    cologne.stop(server)
    try:
        started = time.monotonic()
        result = hosts.push(transfer_spec(hosts, method, path))
        took = time.monotonic() - started
    finally:
        (cologne.start_sshd if server == "sshd" else cologne.start_xrootd)()
    assert result["error"] == "RetryableError", result
    assert "site cologne" in result["message"] and cologne.address in result["message"]
    assert took < 20  # the connect timeout (3 s here), not xrdcp's minutes of retries
    result = hosts.push(transfer_spec(hosts, method, path))
    assert result.get("sha256") == _sha(data), result


def test_s3_keeps_working_when_the_lta_site_is_another_host(hosts, s3_server, s3_bucket, tmp_path):
    """An S3 LTA at a site on its own host: the s3 method reaches the bucket directly and
    the checksum comes from S3, nothing goes over ssh to the site's host."""
    from ccat_data_transfer.core.storage import DiskStorage
    from ccat_data_transfer.core.transfer_methods import get_transfer_method

    data = os.urandom(2 * 1024 * 1024 + 5)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg/s3.tar").write_bytes(data)
    src = DiskStorage(tmp_path)
    dst = s3_server.storage(s3_bucket)
    cologne = hosts.sites["cologne"]
    cologne.stop("sshd")  # the site's host does not answer: S3 must not need it
    try:
        method = get_transfer_method("s3")
        with open(tmp_path / "s3.log", "w") as lf:
            reach = hosts.reach("cologne")
            method.transfer(src, "pkg/s3.tar", dst, "pkg/s3.tar", lf, dst_host=reach)
            assert method.checksum(dst, "pkg/s3.tar", dst_host=reach) == _sha(data)
    finally:
        cologne.start_sshd()


def test_resume_names_are_temporary_names():
    """The janitor removes a resume file left untouched (is_temp_name), and listings
    hide it; the final name is not temporary."""
    from ccat_data_transfer.core.storage.interface import is_temp_name
    from ccat_data_transfer.core.transfer_methods import _resume_name

    partial = _resume_name("a/b/pkg.tar")
    assert partial == "a/b/.pkg.tar.tmp-resume"
    assert is_temp_name(partial) and is_temp_name(partial + "-tail")
    assert not is_temp_name("a/b/pkg.tar")


def test_two_long_names_sharing_a_head_never_share_a_resume_name():
    """Resume names keep a hash of the whole name when they cut it: two parts of one
    long-named obs unit (same first 200 characters) get two partials, each a valid name."""
    from ccat_data_transfer.core.storage.interface import is_temp_name
    from ccat_data_transfer.core.transfer_methods import _resume_name

    head = "u" * 230
    first, second = f"pkg/{head}__part001.tar", f"pkg/{head}__part002.tar"
    a, b = _resume_name(first), _resume_name(second)
    assert a != b
    from ccat_data_transfer.core.storage.interface import temporary_prefix

    for final, partial in ((first, a), (second, b)):
        name = partial.rsplit("/", 1)[1]
        assert len(name.encode()) <= 255 and is_temp_name(partial)
        assert partial.startswith(temporary_prefix(final))  # the janitor knows whose it is
