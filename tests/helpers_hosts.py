"""Real hosts on loopback: one sshd and one XRootD server per site, each site its own user.

:class:`SiteHosts` gives every site

* a unix user ``ccat-<site>`` (created if missing: the tests run as root, as in CI), who
  owns the site's data root, mode 0700, so that a worker of another site that took a
  local shortcut across sites gets "permission denied";
* an sshd bound to its own loopback address 127.0.0.x (x = 2, 3, ...) on a free port,
  with a host key generated for the test, accepting only that site's user, by key;
* an XRootD server running as that user on the same address, exporting the data root.
  xrootd 5.5 has no bind-address directive: it binds one IPv6 socket to the wildcard
  ``[::]`` of its port (dual-stack, IPV6_V6ONLY off).  So the harness compiles a small
  ``bind()`` wrapper (:data:`BIND_SHIM`) and preloads it into xrootd only
  (``LD_PRELOAD``): a bind to the IPv4 wildcard becomes a bind to the site's address
  (``CCAT_BIND_ADDRESS``), a bind to the IPv6 wildcard one to its v4-mapped form
  ``::ffff:127.0.0.x`` (refused on a v6-only socket, which that address cannot serve);
  every other bind, and the port, pass unchanged.  ``xrd.allow host localhost`` stays
  as a second guard.  This needs a C compiler (``cc``) at test time.

Keys are generated into a temporary directory at test time (never committed): one client
key per site user, ``keys/<user>/id_ed25519`` (the topology's ``ssh_key`` is
``<tmp>/keys/%u/id_ed25519``, ssh expands ``%u`` to the local user), all of them
authorised at every site, and a ``known_hosts`` with every site's host key.

Run as a script, this module performs one transfer with a transfer method, as whoever
runs it (the tests run it as a site user): ``python helpers_hosts.py transfer JSON``;
``python helpers_hosts.py simulate JSON`` runs the instrument simulator (the telescope
site's instruments writing and filing their files as that site's user).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
HERE = Path(__file__).resolve().parent

# The bind() wrapper preloaded into xrootd (see the module docstring).  A wildcard bind
# without a usable CCAT_BIND_ADDRESS fails rather than listen on every interface.
BIND_SHIM = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

int bind(int fd, const struct sockaddr *sa, socklen_t len)
{
    static bind_fn next;
    const char *want = getenv("CCAT_BIND_ADDRESS");
    struct in_addr v4;
    struct sockaddr_in in;
    struct sockaddr_in6 in6;
    int v6only = 0;
    socklen_t optlen = sizeof v6only;

    if (next == NULL && (next = (bind_fn)dlsym(RTLD_NEXT, "bind")) == NULL) {
        errno = ENOSYS;
        return -1;
    }
    if (sa != NULL && sa->sa_family == AF_INET && len >= sizeof in) {
        memcpy(&in, sa, sizeof in);
        if (in.sin_addr.s_addr != htonl(INADDR_ANY))
            return next(fd, sa, len);
        if (want == NULL || inet_pton(AF_INET, want, &v4) != 1)
            goto refuse;
        in.sin_addr = v4;
        return next(fd, (const struct sockaddr *)&in, sizeof in);
    }
    if (sa != NULL && sa->sa_family == AF_INET6 && len >= sizeof in6) {
        memcpy(&in6, sa, sizeof in6);
        if (!IN6_IS_ADDR_UNSPECIFIED(&in6.sin6_addr))
            return next(fd, sa, len);
        if (want == NULL || inet_pton(AF_INET, want, &v4) != 1)
            goto refuse;
        if (getsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, &optlen) != 0 || v6only)
            goto refuse;
        memset(&in6.sin6_addr, 0, sizeof in6.sin6_addr);
        in6.sin6_addr.s6_addr[10] = 0xff;
        in6.sin6_addr.s6_addr[11] = 0xff;
        memcpy(&in6.sin6_addr.s6_addr[12], &v4, 4);
        return next(fd, (const struct sockaddr *)&in6, sizeof in6);
    }
    return next(fd, sa, len);
refuse:
    errno = EADDRNOTAVAIL;
    return -1;
}
"""


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def wait_listening(address: str, port: int, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((address, port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} does not listen on {address}:{port}")


def build_bind_shim(directory: Path) -> Path:
    """:data:`BIND_SHIM` compiled into ``directory/bindshim.so``, readable by every user
    (xrootd runs as the site's user)."""
    source, shared = directory / "bindshim.c", directory / "bindshim.so"
    source.write_text(BIND_SHIM)
    cmd = ["cc", "-shared", "-fPIC", "-O2", "-Wall", "-o", str(shared), str(source), "-ldl"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"compiling the xrootd bind shim failed:\n{done.stderr}")
    shared.chmod(0o644)
    return shared


def ensure_user(name: str) -> pwd.struct_passwd:
    """The unix user ``name``, created (with a home and a usable but password-less
    account, so sshd accepts key logins) when missing."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    subprocess.run(
        [
            "useradd",
            "--system",
            "--user-group",
            "--create-home",
            "--home-dir",
            f"/var/lib/ccat-hosts/{name}",
            "--shell",
            "/bin/sh",
            name,
        ],
        check=True,
        capture_output=True,
    )
    # '!' (locked) would make sshd refuse the key login; '*' only means "no password".
    subprocess.run(["usermod", "-p", "*", name], check=True, capture_output=True)
    return pwd.getpwnam(name)


def grant_traverse(*paths: Path) -> None:
    """Let every user traverse (o+x, never read) the directories above ``paths``: the site
    users run this interpreter and this source tree (a pyenv Python under /root, mode
    0700, is otherwise out of their reach)."""
    for path in paths:
        for parent in Path(os.path.realpath(path)).parents:
            mode = parent.stat().st_mode
            if not mode & 0o001:
                parent.chmod((mode & 0o7777) | 0o001)


@dataclass
class SiteHost:
    """One site's machine: its user, loopback address, data root and servers."""

    site: str
    user: str
    uid: int
    gid: int
    address: str
    root: Path
    work: Path
    ssh_port: int = 0
    xrootd_port: int = 0
    bind_shim: Path | None = None  # preloaded into xrootd: listen on ``address`` only
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    # -- servers -----------------------------------------------------------------------
    def start_sshd(self) -> None:
        self.ssh_port = self.ssh_port or free_port(self.address)
        log = open(self.work / "sshd.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(self.work / "sshd_config"), "-p", str(self.ssh_port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs["sshd"] = proc
        wait_listening(self.address, self.ssh_port, proc, f"sshd of {self.site}")

    def start_xrootd(self) -> None:
        if self.bind_shim is None:
            raise RuntimeError(f"no bind shim for the xrootd of {self.site}")
        self.xrootd_port = self.xrootd_port or free_port(self.address)
        env = {**os.environ, "LD_PRELOAD": str(self.bind_shim), "CCAT_BIND_ADDRESS": self.address}
        log = open(self.work / "xrootd.out", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [
                "xrootd",
                "-c",
                str(self.work / "xrootd.cfg"),
                "-l",
                str(self.work / "xrootd.log"),
                "-n",
                self.site,
                "-p",
                str(self.xrootd_port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.work,
            env=env,
            **self.as_user(),
        )
        self.procs["xrootd"] = proc
        wait_listening(self.address, self.xrootd_port, proc, f"xrootd of {self.site}")

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)

    # -- running as the site's user ------------------------------------------------------
    def as_user(self) -> dict[str, Any]:
        """Popen arguments that run a child as this site's user (no other groups)."""
        return {"user": self.uid, "group": self.gid, "extra_groups": [], "umask": 0o022}

    def user_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env.update(HOME=pwd.getpwuid(self.uid).pw_dir, USER=self.user, LOGNAME=self.user)
        return env

    @property
    def xrootd_url(self) -> str:
        return f"root://{self.address}:{self.xrootd_port}"

    def topology_entry(self, keys: Path) -> dict[str, Any]:
        """The ``[[sites]]`` reach fields of this site."""
        return {
            "host": self.address,
            "ssh_user": self.user,
            "ssh_port": self.ssh_port,
            "ssh_key": str(keys / "%u" / "id_ed25519"),
            "xrootd_url": self.xrootd_url,
        }


class SiteHosts:
    """The site hosts of one test: users, keys, sshd and xrootd per site.  A context
    manager: leaving it stops every server and removes the temporary directory."""

    def __init__(self, sites: list[str], *, first_address: int = 2, xrootd: bool = True) -> None:
        if os.geteuid() != 0:
            raise RuntimeError("the multi-host tests run as root (they create site users)")
        for tool in ("ssh", "ssh-keygen", "rsync", "xrootd", "xrdcp"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} is not installed (.ci/run installs it)")
        if xrootd and shutil.which("cc") is None:
            raise RuntimeError("cc is not installed: the xrootd bind shim is compiled at test time")
        self.base = Path(tempfile.mkdtemp(prefix="ccat-hosts-"))
        self.base.chmod(0o755)
        self.keys = self.base / "keys"
        self.keys.mkdir(mode=0o755)
        self.known_hosts = self.base / "known_hosts"
        self.authorized = self.base / "authorized_keys"
        self.sites: dict[str, SiteHost] = {}
        self.xrootd = xrootd
        shim = build_bind_shim(self.base) if xrootd else None
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        grant_traverse(Path(sys.executable), HERE)
        for i, site in enumerate(sites):
            user = ensure_user(f"ccat-{site}")
            address = f"127.0.0.{first_address + i}"
            work = self.base / "srv" / site
            work.mkdir(parents=True)
            root = self.base / "data" / site
            root.mkdir(parents=True)
            for d in (root, work):
                os.chown(d, user.pw_uid, user.pw_gid)
            root.chmod(0o700)
            self.sites[site] = SiteHost(
                site, user.pw_name, user.pw_uid, user.pw_gid, address, root, work, bind_shim=shim
            )
        (self.base / "data").chmod(0o755)
        (self.base / "srv").chmod(0o755)
        self._make_keys()

    def _make_keys(self) -> None:
        authorized = []
        for host in self.sites.values():
            kdir = self.keys / host.user
            kdir.mkdir(mode=0o700)
            key = kdir / "id_ed25519"
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", host.user, "-f", str(key)],
                check=True,
            )
            for path in (kdir, key, kdir / "id_ed25519.pub"):
                os.chown(path, host.uid, host.gid)
            authorized.append((kdir / "id_ed25519.pub").read_text().strip())
            hostkey = host.work / "ssh_host_ed25519_key"
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hostkey)], check=True
            )
        self.authorized.write_text("\n".join(authorized) + "\n")
        self.authorized.chmod(0o644)

    def start(self) -> SiteHosts:
        lines = []
        for host in self.sites.values():
            host.ssh_port = free_port(host.address)
            (host.work / "sshd_config").write_text(
                f"ListenAddress {host.address}\n"
                f"HostKey {host.work / 'ssh_host_ed25519_key'}\n"
                f"PidFile {host.work / 'sshd.pid'}\n"
                f"AuthorizedKeysFile {self.authorized}\n"
                f"AllowUsers {host.user}\n"
                "PubkeyAuthentication yes\nPasswordAuthentication no\n"
                "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
                "PrintMotd no\nMaxStartups 100:30:200\nMaxSessions 50\n"
            )
            host.start_sshd()
            pub = (host.work / "ssh_host_ed25519_key.pub").read_text().split()
            lines.append(f"[{host.address}]:{host.ssh_port} {pub[0]} {pub[1]}")
            if self.xrootd:
                (host.work / "xrootd.cfg").write_text(
                    f"all.export {host.root}\n"
                    f"all.adminpath {host.work / 'admin'}\n"
                    f"all.pidpath {host.work / 'admin'}\n"
                    # Besides the bind shim: refuse every client not on loopback.
                    "xrd.allow host localhost\n"
                )
                os.chown(host.work / "xrootd.cfg", host.uid, host.gid)
                host.start_xrootd()
        self.known_hosts.write_text("\n".join(lines) + "\n")
        self.known_hosts.chmod(0o644)
        return self

    def __enter__(self) -> SiteHosts:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for host in self.sites.values():
            host.stop_all()
        # Files the site users wrote: removed as root, whatever their modes.
        shutil.rmtree(self.base, ignore_errors=True)

    def settings_env(self) -> dict[str, str]:
        """The settings every worker of these hosts needs (known hosts, fast failure)."""
        return {
            "CCAT_DATA_TRANSFER_TRANSFER_SSH_KNOWN_HOSTS_FILE": str(self.known_hosts),
            "CCAT_DATA_TRANSFER_TRANSFER_CONNECT_TIMEOUT_SECONDS": "3",
        }

    def reach(self, site: str) -> Any:
        from ccat_data_transfer.core.hosts import SiteReach

        host = self.sites[site]
        return SiteReach(site=site, **host.topology_entry(self.keys))

    def push(self, spec: dict, env: dict[str, str] | None = None, timeout: float = 600) -> dict:
        """Run one transfer (:func:`transfer_spec`) as the ccat site's user and wait; its
        JSON result (``bytes``, ``seconds``, ``sha256``, or ``error`` and ``message``)."""
        proc = self.run_as("ccat", ["transfer", json.dumps(spec)], env=env, stdout=subprocess.PIPE)
        out, _ = proc.communicate(timeout=timeout)
        return json.loads(out.decode().strip().splitlines()[-1])

    def run_as(
        self, site: str, args: list[str], env: dict[str, str] | None = None, **popen: Any
    ) -> subprocess.Popen:
        """Start ``python helpers_hosts.py ARGS`` as the site's user (own session)."""
        host = self.sites[site]
        full_env = host.user_env({**os.environ, **self.settings_env(), **(env or {})})
        full_env["PYTHONPATH"] = os.pathsep.join(
            [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        return subprocess.Popen(
            [sys.executable, str(HERE / "helpers_hosts.py"), *args],
            env=full_env,
            cwd=host.work,
            start_new_session=True,
            **host.as_user(),
            **popen,
        )


def transfer_spec(
    hosts: SiteHosts, method: str, path: str, *, reach: bool = True
) -> dict[str, Any]:
    """The JSON spec of one push of ``path`` from the ccat site's root to the cologne
    site's, by ``method`` (``reach``: the destination is another host), for
    ``helpers_hosts.py transfer``; the log is ``<ccat work>/<method>.log``."""
    src, dst = hosts.sites["ccat"], hosts.sites["cologne"]
    return {
        "method": method,
        "src_root": str(src.root),
        "dst_root": str(dst.root),
        "path": path,
        "log": str(src.work / f"{method}.log"),
        "reach": {"site": "cologne", **dst.topology_entry(hosts.keys)} if reach else None,
    }


def _transfer_main(spec: dict[str, Any]) -> int:
    """One method call as this process's user: ``spec`` names the method, the local
    source (root, path), the destination (root, path) and its reach (or none)."""
    from ccat_data_transfer.core.hosts import SiteReach
    from ccat_data_transfer.core.storage import DiskStorage
    from ccat_data_transfer.core.transfer_methods import get_transfer_method

    method = get_transfer_method(spec["method"])
    reach = SiteReach(**spec["reach"]) if spec.get("reach") else None
    src = DiskStorage(spec["src_root"])
    dst = DiskStorage(spec["dst_root"])
    with open(spec["log"], "a", encoding="utf-8") as lf:
        started = time.monotonic()
        try:
            stats = method.transfer(src, spec["path"], dst, spec["path"], lf, dst_host=reach)
            digest = method.checksum(dst, spec["path"], dst_host=reach)
        except Exception as exc:  # reported to the test, which asserts on it
            print(json.dumps({"error": type(exc).__name__, "message": str(exc)}), flush=True)
            return 1
    elapsed = time.monotonic() - started  # transfer, rename and destination checksum
    print(json.dumps({"bytes": stats.bytes, "seconds": elapsed, "sha256": digest}))
    return 0


def _simulate_main(spec: dict[str, Any]) -> int:
    """The instruments write and file observations as this process's user: ``spec`` is
    the database ``url`` and the simulator's keyword arguments."""
    from ccat_data_transfer.core.database import DatabaseConnection
    from ccat_data_transfer.operations.simulator import InstrumentSimulator

    kwargs = dict(spec)
    sim = InstrumentSimulator(db=DatabaseConnection(kwargs.pop("url")), **kwargs)
    while sim.step():
        pass
    return 0


if __name__ == "__main__":
    mains = {"transfer": _transfer_main, "simulate": _simulate_main}
    if len(sys.argv) == 3 and sys.argv[1] in mains:
        sys.exit(mains[sys.argv[1]](json.loads(sys.argv[2])))
    sys.exit("usage: helpers_hosts.py transfer|simulate JSON")
