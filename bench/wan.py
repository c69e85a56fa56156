"""Benchmark: moving one package between two site hosts, by each network method.

Two sites on their own loopback hosts (``tests/helpers_hosts.py``: a unix user each
owning a 0700 data root, an sshd and an XRootD server per site on 127.0.0.x).  The
telescope site's user pushes one ``--gb`` GB package (random bytes) to the LTA site,
and in the same run the bench times:

* each of our methods (``rsync`` over ssh, ``xrootd`` with parallel streams), exactly as
  a worker runs them: the transfer to the temporary name, the rename into place and the
  SHA-256 computed on the destination host;
* the plain tool of each: ``ssh host 'cat > f'`` and ``xrdcp --streams N`` of the same
  file (no temporary name, no verification);
* ``openssl dgst -sha256`` of the file (the cost of one verification pass);
* bare ``rsync`` over the same ssh (no resume name, rename or verification): what the
  tool itself costs against ``cat``, apart from what our method adds.

The link between the two hosts is shaped to ``--link-mbit`` Mbit/s in each direction,
1000 by default (HTB on the loopback device, ``tc``; only the traffic to and from the
destination host's address is shaped, the rest of loopback is untouched, and the shaping
is removed at the end): the link is then the bottleneck, as between the observatory's
sites.  ``--link-mbit 0`` leaves loopback unshaped, where a 2-core machine is bound by
the CPU instead (ssh's cipher and the tools on both ends).

Then it kills our push at about half way (``kill -9`` of the whole process group) and
retries, and reports how many bytes the retry sent again: beyond what was missing at the
kill (rsync's ``Total bytes sent``; for xrootd the bytes after what the retry kept).
Targets: our wall time <= 1.3x the plain tool's; bytes sent again after the kill <= 10 %
of the package.

Must run as root (it creates the site users, like the tests).  Needs ~3x ``--gb`` of
free space in the temp folder.

    python bench/wan.py                 # 5 GB over a 1 Gbit/s link
    python bench/wan.py --link-mbit 0   # 5 GB over unshaped loopback
    python bench/wan.py --gb 0.5        # quick
"""

from __future__ import annotations

import sys as _sys  # noqa: E402
from pathlib import Path as _Path  # noqa: E402

_HERE = _Path(__file__).resolve().parent
_sys.path[:] = [p for p in _sys.path if _Path(p or ".").resolve() != _HERE]
_sys.path.insert(0, str(_HERE.parent / "tests"))

import argparse
import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from helpers_hosts import SiteHosts, transfer_spec

TARGET_RATIO = 1.3
TARGET_RESENT = 0.10
PATH = "pkg/package.tar"
#: The bench's hosts get addresses of their own (127.0.0.200, .201) so that the link
#: shaping touches nothing else on loopback (the tests' hosts start at 127.0.0.2).
FIRST_ADDRESS = 200


@contextlib.contextmanager
def shaped_link(address: str, mbit: float) -> Iterator[None]:
    """Traffic to and from ``address`` on loopback limited to ``mbit`` Mbit/s each way
    (an HTB class per direction; unclassified traffic bypasses the shaping)."""
    if mbit <= 0:
        yield
        return

    def tc(*args: str) -> None:
        subprocess.run(["tc", *args], check=True, capture_output=True, text=True)

    try:
        tc("qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb", "r2q", "1000")
    except subprocess.CalledProcessError as exc:
        raise SystemExit(
            f"cannot shape loopback (a root qdisc already there?): {exc.stderr}"
        ) from None
    try:
        rate = f"{mbit}mbit"
        # burst: a few loopback packets (MTU 64 KiB), or the class cannot send at all.
        for cls, direction in (("1:10", "dst"), ("1:20", "src")):
            tc("class", "add", "dev", "lo", "parent", "1:", "classid", cls, "htb", "rate", rate,
               "ceil", rate, "burst", "512k", "cburst", "512k")  # fmt: skip
            tc("filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1",
               "u32", "match", "ip", direction, f"{address}/32", "classid", cls)  # fmt: skip
        yield
    finally:
        subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], check=False)


def _make_source(path: Path, size: int, uid: int, gid: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    chunk = os.urandom(64 * 1024 * 1024)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, len(chunk))
            f.write(chunk[:n])
            left -= n
            chunk = chunk[1:] + chunk[:1]  # not one repeated block
    for p in (path.parent, path):
        os.chown(p, uid, gid)


def _clean_destination(hosts: SiteHosts) -> None:
    d = hosts.sites["cologne"].root / "pkg"
    if d.exists():
        for p in d.iterdir():
            p.unlink()


def _ours(hosts: SiteHosts, method: str) -> float:
    _clean_destination(hosts)
    result = hosts.push(transfer_spec(hosts, method, PATH))
    if "error" in result:
        raise SystemExit(f"{method}: {result}")
    # Measured inside the process, as in a running worker: transfer to the temporary
    # name, rename into place, SHA-256 on the destination host (no interpreter start).
    return float(result["seconds"])


def _as_ccat(hosts: SiteHosts, cmd: str) -> float:
    """Run a shell command as the telescope site's user; its wall time."""
    host = hosts.sites["ccat"]
    env = host.user_env({**os.environ, **hosts.settings_env()})
    start = time.monotonic()
    subprocess.run(["sh", "-c", cmd], env=env, cwd=host.work, check=True, **host.as_user())
    return time.monotonic() - start


def _plain_ssh(hosts: SiteHosts, src: Path) -> float:
    _clean_destination(hosts)
    reach = hosts.reach("cologne")
    dst = hosts.sites["cologne"].root / PATH
    remote = f"mkdir -p {shlex.quote(str(dst.parent))} && cat > {shlex.quote(str(dst))}"
    ssh = shlex.join([*reach.ssh_base(), reach.target, remote])
    return _as_ccat(hosts, f"{ssh} < {shlex.quote(str(src))}")


def _bare_rsync(hosts: SiteHosts, src: Path) -> float:
    """``rsync`` as a person types it over the same ssh: the tool's own cost, without
    our resume name, rename and verification."""
    _clean_destination(hosts)
    reach = hosts.reach("cologne")
    dst = hosts.sites["cologne"].root / PATH
    ssh = shlex.join(reach.ssh_base())
    return _as_ccat(
        hosts, shlex.join(["rsync", "--mkpath", "-s", "-e", ssh, str(src), f"{reach.target}:{dst}"])
    )


def _plain_xrdcp(hosts: SiteHosts, src: Path, streams: int) -> float:
    _clean_destination(hosts)
    reach = hosts.reach("cologne")
    dst = reach.xrootd_path(str(hosts.sites["cologne"].root / PATH))
    return _as_ccat(hosts, f"xrdcp --nopbar --path --streams {streams} {src} {dst}")


def _resent_after_kill(hosts: SiteHosts, method: str, size: int) -> tuple[float, int]:
    """Kill our push at about half way, retry; (fraction landed at the kill, bytes sent
    again by the retry)."""
    _clean_destination(hosts)
    spec = transfer_spec(hosts, method, PATH)
    Path(spec["log"]).unlink(missing_ok=True)
    partial = hosts.sites["cologne"].root / "pkg" / ".package.tar.tmp-resume"
    proc = hosts.run_as("ccat", ["transfer", json.dumps(spec)], stdout=subprocess.PIPE)
    while proc.poll() is None:
        if partial.exists() and partial.stat().st_size >= size // 2:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1.0)
    landed = partial.stat().st_size if partial.exists() else 0
    result = hosts.push(spec)
    if "error" in result:
        raise SystemExit(f"{method} retry: {result}")
    log = Path(spec["log"]).read_text()
    if method == "rsync":
        sent = [int(n.replace(",", "")) for n in re.findall(r"Total bytes sent: ([\d,]+)", log)]
        return landed / size, sent[-1]
    kept = re.findall(r"resuming: (\d+) of \d+ bytes kept", log)
    return landed / size, size - (int(kept[-1]) if kept else 0)  # xrdcp sent the rest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gb", type=float, default=5.0, help="package size in GB (10**9)")
    parser.add_argument("--streams", type=int, default=4, help="xrootd parallel streams")
    parser.add_argument(
        "--link-mbit",
        type=float,
        default=1000,
        help="shape the link to N Mbit/s (default 1000; 0: unshaped loopback)",
    )
    args = parser.parse_args()
    size = int(args.gb * 1e9)
    os.environ["CCAT_DATA_TRANSFER_TRANSFER_XROOTD_STREAMS"] = str(args.streams)
    with (
        SiteHosts(["ccat", "cologne"], first_address=FIRST_ADDRESS) as hosts,
        shaped_link(hosts.sites["cologne"].address, args.link_mbit),
    ):
        os.environ.update(hosts.settings_env())  # before the settings are first read
        ccat = hosts.sites["ccat"]
        src = ccat.root / PATH
        _make_source(src, size, ccat.uid, ccat.gid)
        t_dgst = _as_ccat(hosts, f"openssl dgst -sha256 {src} > /dev/null")
        rows = []
        t_bare_rsync = _bare_rsync(hosts, src)
        for method, plain in (
            ("rsync", lambda: _plain_ssh(hosts, src)),
            ("xrootd", lambda: _plain_xrdcp(hosts, src, args.streams)),
        ):
            t_plain = plain()
            t_ours = _ours(hosts, method)
            landed, resent = _resent_after_kill(hosts, method, size)
            rows.append((method, t_ours, t_plain, landed, resent))
        gb = size / 1e9
        link = f"link shaped to {args.link_mbit:g} Mbit/s" if args.link_mbit else "loopback"
        print(f"package {gb:.2f} GB, {link}, 2 site hosts; openssl dgst -sha256: {t_dgst:.1f} s")
        for method, t_ours, t_plain, landed, resent in rows:
            ratio = t_ours / t_plain
            # Bytes sent twice: what the retry sent beyond what was missing at the kill.
            again = max(0, resent - int(size * (1 - landed)))
            frac = again / size
            print(
                f"{method:6s} ours {t_ours:6.1f} s ({gb / t_ours * 1e3:5.0f} MB/s)  plain "
                f"{t_plain:6.1f} s  ratio {ratio:4.2f} (target <= {TARGET_RATIO}: "
                f"{'met' if ratio <= TARGET_RATIO else 'missed'})  vs plain+dgst "
                f"{t_ours / (t_plain + t_dgst):4.2f}"
            )
            if method == "rsync":
                print(
                    f"{'':6s} bare rsync {t_bare_rsync:6.1f} s: ours / bare rsync "
                    f"{t_ours / t_bare_rsync:4.2f}, bare rsync / plain "
                    f"{t_bare_rsync / t_plain:4.2f}"
                )
            print(
                f"{'':6s} killed with {landed:4.0%} landed; the retry sent "
                f"{resent / 1e6:.1f} MB, of which {again / 1e6:.1f} MB again = {frac:5.1%} "
                f"of the package (target <= {TARGET_RESENT:.0%}: "
                f"{'met' if frac <= TARGET_RESENT else 'missed'})"
            )


if __name__ == "__main__":
    main()
