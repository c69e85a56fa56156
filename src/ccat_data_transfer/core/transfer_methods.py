"""Transfer methods: how the bytes of one object get from one location to another.

A method is a small class with one call, :meth:`TransferMethodBase.transfer`, registered
under a :class:`ccat_ops_db.models.TransferMethod` member.  Adding a method touches only
this module: write the class, register it.  Routes (``DataTransferRoute.transfer_method``)
name the method a transfer uses.

Every method writes the destination atomically: the bytes land under a temporary name and
are renamed into place only when complete, so a transfer killed midway never leaves an
object under its final name.  Verification (checksum of what landed) is the caller's job
(:mod:`ccat_data_transfer.transfer.execution`); methods only move bytes and log the commands
they ran into the per-transfer log file.

Across hosts (sites on their own machines, :mod:`ccat_data_transfer.core.hosts`) the pushing
worker is the origin's, ``dst_host`` is the destination site's
:class:`~ccat_data_transfer.core.hosts.SiteReach`, and the network methods write to a fixed
temporary name (``.name.tmp-resume``), renamed into place on the destination host when whole;
a retry resumes from the bytes already there.  The checksum
of what landed is computed on the destination host (:meth:`TransferMethodBase.checksum`).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import time
import uuid
from dataclasses import dataclass
from typing import TextIO

from ccat_data_transfer.core.config import settings
from ccat_data_transfer.core.errors import ConfigurationError, RetryableError
from ccat_data_transfer.core.hosts import (
    XROOTD_IN_FLIGHT,
    SiteReach,
    as_reach,
    log_line,
    run_logged,
    xrootd_env,
)
from ccat_data_transfer.core.storage import (
    DiskStorage,
    ObjectNotFound,
    S3Storage,
    Storage,
    copy_stream,
    normalize_path,
    temporary_name,
)
from ccat_data_transfer.core.subprocesses import run_bounded
from ccat_ops_db import models as m

__all__ = [
    "BbcpMethod",
    "CommandLineMethod",
    "CopyMethod",
    "RsyncMethod",
    "S3Method",
    "TransferMethodBase",
    "TransferStats",
    "XrootdMethod",
    "get_transfer_method",
    "method_for_storages",
    "register_transfer_method",
]


@dataclass(frozen=True, slots=True)
class TransferStats:
    """What one transfer moved: bytes and wall-clock seconds."""

    bytes: int
    seconds: float

    @property
    def rate_mb_per_s(self) -> float:
        """Rate in MB/s (10**6 bytes); 0 when nothing measurable was moved."""
        if self.seconds <= 0:
            return 0.0
        return self.bytes / 1e6 / self.seconds


class TransferMethodBase:
    """One way of moving an object.  Subclasses implement :meth:`transfer`."""

    #: The route method this class implements.
    kind: m.TransferMethod

    def transfer(
        self,
        src_storage: Storage,
        src_path: str,
        dst_storage: Storage,
        dst_path: str,
        log_file: TextIO,
        *,
        src_host: SiteReach | str | None = None,
        dst_host: SiteReach | str | None = None,
    ) -> TransferStats:
        """Move ``src_path`` of ``src_storage`` to ``dst_path`` of ``dst_storage``.

        ``src_host``/``dst_host`` say how to reach an end on another machine (a
        :class:`~ccat_data_transfer.core.hosts.SiteReach` or a bare host name) for the network
        methods (rsync, xrootd, bbcp); ``None`` means the storage is reachable from here.  Raises
        :class:`~ccat_data_transfer.core.errors.RetryableError` for transient failures and
        :class:`~ccat_ops_db.errors.ConfigurationError`
        when the method cannot work at all with this setup.
        """
        raise NotImplementedError

    def checksum(
        self,
        dst_storage: Storage,
        dst_path: str,
        *,
        dst_host: SiteReach | str | None = None,
        size: int | None = None,
    ) -> str:
        """SHA-256 of what landed, computed where the bytes are: on the destination host
        over ssh for a disk location there, by the storage itself otherwise (a local
        disk; S3, reachable from every site, answers with the checksum it holds).
        ``size`` (the bytes expected there) scales the remote command's deadline; when
        unknown it is asked of the host first."""
        reach = as_reach(dst_host)
        if reach is not None and isinstance(dst_storage, DiskStorage):
            path = _local_root_path(dst_storage, dst_path, "checksum")
            return _remote_sha256(reach, path, _remote_size(reach, path) if size is None else size)
        return dst_storage.sha256(dst_path)

    def discard(
        self, dst_storage: Storage, dst_path: str, *, dst_host: SiteReach | str | None = None
    ) -> None:
        """Remove a copy that failed verification, where it lies."""
        reach = as_reach(dst_host)
        if reach is None or not isinstance(dst_storage, DiskStorage):
            dst_storage.delete(dst_path)
            return
        path = _local_root_path(dst_storage, dst_path, "discard")
        run_bounded(reach.ssh("rm", "-f", "--", path))


_log = log_line


def _is_local_host(host: SiteReach | str | None) -> bool:
    return as_reach(host) is None


def _local_root_path(storage: Storage, path: str, method: str) -> str:
    """Filesystem path of ``path`` in a disk storage (for command-line tools)."""
    if not isinstance(storage, DiskStorage):
        raise ConfigurationError(
            f"transfer method {method!r} needs disk locations at both ends, got {storage!r}; "
            "use the 's3' method for S3 locations"
        )
    # Paths are checked by the storage (relative, no '..'); the root may not exist on a
    # remote host, so build the string without resolving it here.

    return str(storage.root / normalize_path(path))


def _tmp_sibling(path: str) -> str:
    head, tail = os.path.split(path)
    return os.path.join(head, temporary_name(tail, uuid.uuid4().hex))


def _run(
    cmd: list[str],
    log_file: TextIO,
    what: str,
    reach: SiteReach | None = None,
    work_bytes: int = 0,
) -> None:
    """Run a command, its output appended to the transfer log; non-zero exit is retryable
    (naming the host of ``reach``); its deadline is scaled to ``work_bytes``."""
    run_logged(cmd, log_file, what, reach, work_bytes=work_bytes)


def _remote_size(reach: SiteReach, path: str) -> int:
    """Size of ``path`` on the host of ``reach`` (0 when it cannot be told): the work
    that scales the deadline of a command reading it there."""
    proc = run_bounded(reach.ssh("stat", "-L", "-c", "%s", "--", path))
    out = proc.stdout.strip()
    return int(out) if proc.returncode == 0 and out.isdigit() else 0


def _work_bytes(src: str, src_reach: SiteReach | None) -> int:
    """Bytes a copy of ``src`` (on ``src_reach``, None: here) moves."""
    if src_reach is not None:
        return _remote_size(src_reach, src)
    try:
        return os.path.getsize(src)
    except OSError:
        return 0


def _resume_name(path: str) -> str:
    """The fixed temporary name a resumable method writes to: a retry finds the bytes
    already there.  A temporary name (``.name.tmp-*``): hidden from listings, and the
    janitor removes it once untouched for JANITOR_MIN_AGE_SECONDS (and no live transfer
    of ``path`` holds it).  A long name is cut with a hash of all of it, so two long
    names sharing a head never share a partial."""
    head, tail = os.path.split(path)
    return os.path.join(head, temporary_name(tail, "resume"))


def _run_into_place(
    command: list[str], dst: str, log_file: TextIO, what: str, work_bytes: int = 0
) -> None:
    """Run a local copy ``command`` with a temporary sibling of ``dst`` appended as its
    target, then rename that into place: readers never see a partial ``dst``, and the
    temporary file is removed whatever happens.  Shared by the command-line methods."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = _tmp_sibling(dst)
    try:
        _run([*command, tmp], log_file, what, work_bytes=work_bytes)
        os.replace(tmp, dst)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def _command_stats(
    what: str, src: str, src_host: str | None, start: float, log_file: TextIO
) -> TransferStats:
    """Stats of a command-line transfer started at ``start`` (``time.monotonic``), logged.
    The size is that of the local source; 0 when the source is on a remote host."""
    size = os.path.getsize(src) if _is_local_host(src_host) else 0
    stats = TransferStats(size, time.monotonic() - start)
    _log(log_file, f"{what} done: {size} bytes in {stats.seconds:.3f} s")
    return stats


def _remote_sha256(reach: SiteReach, path: str, size: int) -> str:
    """SHA-256 computed on the destination host itself: the bytes are hashed where they
    lie, not read back across the link.  ``openssl dgst`` where the host has it (about
    twice as fast as coreutils' ``sha256sum``), else ``sha256sum``."""
    q = shlex.quote(path)
    script = (
        "if command -v openssl >/dev/null 2>&1; then exec openssl dgst -sha256 -r "
        f"{q}; else exec sha256sum -- {q}; fi"
    )
    out = run_bounded(reach.ssh_script(script), work_bytes=size)
    if out.returncode != 0 or not out.stdout.strip():
        detail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise RetryableError(f"cannot checksum {path} on {reach.label}: {detail}")
    return out.stdout.split()[0]


def _stream_copy(src_storage: Storage, src_path: str, dst_storage: Storage, dst_path: str) -> int:
    """Copy one object between two storages this process reaches; atomic at the
    destination.  A source on a local filesystem goes through ``copy_in`` (disk to disk:
    the kernel moves the bytes, :func:`~ccat_data_transfer.core.fileio.copy_fd`); anything else,
    or a paced copy, streams through one reused buffer."""
    # TRANSFER_BANDWIDTH_LIMIT_MB_PER_S > 0 paces the copy, as a slow link would be.
    limit = float(settings.get("TRANSFER_BANDWIDTH_LIMIT_MB_PER_S", 0) or 0) * 1e6
    local = src_storage.local_path(src_path) if limit <= 0 else None
    if local is not None:
        try:
            return dst_storage.copy_in(local, dst_path)
        except FileNotFoundError as exc:
            if exc.filename is not None and os.fspath(exc.filename) == os.fspath(local):
                raise ObjectNotFound(f"{src_path} not found in {src_storage!r}") from exc
            raise
    with src_storage.open_read(src_path) as src, dst_storage.open_write(dst_path) as dst:
        return copy_stream(src, dst, rate_limit=limit)


class CopyMethod(TransferMethodBase):
    """Stream copy between two storages both reachable from here (shared filesystem,
    or any pair of storages this process can open)."""

    kind = m.TransferMethod.COPY

    def transfer(self, src_storage, src_path, dst_storage, dst_path, log_file, **hosts):
        for key, host in hosts.items():
            if not _is_local_host(host):
                raise ConfigurationError(
                    f"the 'copy' method needs a shared filesystem but {key}={host!r}; "
                    "use 'rsync', 'xrootd' or 'bbcp' for a remote host"
                )
        _log(log_file, f"copy {src_storage!r}:{src_path} -> {dst_storage!r}:{dst_path}")
        start = time.monotonic()
        n = _stream_copy(src_storage, src_path, dst_storage, dst_path)
        stats = TransferStats(n, time.monotonic() - start)
        _log(log_file, f"copied {n} bytes in {stats.seconds:.3f} s")
        return stats


class CommandLineMethod(TransferMethodBase):
    """A method that runs a command-line tool between disk locations, locally or with one
    end on another host.  Subclasses name the tool (``binary``), say what to tell a
    person when it is missing, and implement :meth:`copy`, which never leaves a partial
    object under the final name."""

    binary: str
    #: The configuration error's message when ``binary`` is not on PATH.
    missing_binary: str

    def transfer(
        self,
        src_storage,
        src_path,
        dst_storage,
        dst_path,
        log_file,
        *,
        src_host=None,
        dst_host=None,
    ):
        exe = shutil.which(self.binary)
        if exe is None:
            raise ConfigurationError(self.missing_binary)
        src = _local_root_path(src_storage, src_path, self.binary)
        dst = _local_root_path(dst_storage, dst_path, self.binary)
        src_reach, dst_reach = as_reach(src_host), as_reach(dst_host)
        if src_reach is not None and dst_reach is not None:
            raise ConfigurationError(
                f"'{self.binary}' cannot copy between two other hosts "
                f"({src_reach.label} -> {dst_reach.label}); the origin site's worker pushes"
            )
        start = time.monotonic()
        self.copy(exe, src, src_reach, dst, dst_reach, log_file)
        return _command_stats(self.binary, src, src_host, start, log_file)

    def copy(
        self,
        exe: str,
        src: str,
        src_reach: SiteReach | None,
        dst: str,
        dst_reach: SiteReach | None,
        log_file: TextIO,
    ) -> None:
        """Copy ``src`` (on ``src_reach``, None: here) to ``dst`` (on ``dst_reach``)."""
        raise NotImplementedError


def _rename_into_place(partial: str, dst: str, reach: SiteReach | None, log_file: TextIO) -> None:
    """Rename the complete ``partial`` to ``dst``, on the host where they lie."""
    if reach is None:
        os.replace(partial, dst)
    else:
        _run(reach.ssh("mv", "-f", "--", partial, dst), log_file, "rename", reach)


class RsyncMethod(CommandLineMethod):
    """rsync between disk locations, locally or with one end over ssh (``user@host:path``).

    Resumable: rsync writes to the fixed temporary name (``.name.tmp-resume``) with
    ``--append-verify``, so a retry after an interruption sends only the bytes not
    already there (and rsync re-sends the whole file if the whole-file checksum of the
    result does not match).  The complete file is then renamed into place.
    TRANSFER_BANDWIDTH_LIMIT_MB_PER_S paces it (``--bwlimit``).
    """

    kind = m.TransferMethod.RSYNC
    binary = "rsync"
    missing_binary = "rsync is not installed on this worker; install it or use 'copy'"

    def copy(self, exe, src, src_reach, dst, dst_reach, log_file):
        partial = _resume_name(dst)
        cmd = [exe, "--append-verify", "--mkpath", "-s", "--stats"]  # -s: no remote word splitting
        choice = str(settings.get("TRANSFER_RSYNC_CHECKSUM_CHOICE", "") or "")
        if choice:
            cmd.append(f"--checksum-choice={choice}")
        limit = float(settings.get("TRANSFER_BANDWIDTH_LIMIT_MB_PER_S", 0) or 0)
        if limit > 0:
            cmd.append(f"--bwlimit={max(1, int(limit * 1e6 / 1024))}")
        reach = src_reach or dst_reach
        if reach is not None:
            cmd += ["-e", shlex.join(reach.ssh_base())]
        if dst_reach is None:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
        src_arg = f"{src_reach.target}:{src}" if src_reach else src
        dst_arg = f"{dst_reach.target}:{partial}" if dst_reach else partial
        work = _work_bytes(src, src_reach)
        _run([*cmd, src_arg, dst_arg], log_file, "rsync", reach, work_bytes=work)
        _rename_into_place(partial, dst, dst_reach, log_file)


class XrootdMethod(CommandLineMethod):
    """``xrdcp --streams N`` (parallel TCP streams, for long fat links) from this host to
    the destination site's XRootD server (the site's ``xrootd_url``).

    The file goes to the fixed temporary name ``.name.tmp-resume`` and is renamed into
    place over ssh when complete.  Resumable, though xrdcp 5.5 refuses ``--continue``
    towards a server: a retry that finds ``P`` bytes there keeps the first
    ``P - 2 * XROOTD_IN_FLIGHT`` (the chunks xrdcp had in flight when it was stopped
    may have left holes above that; ``XROOTD_IN_FLIGHT`` of :mod:`ccat_data_transfer.core.hosts`),
    cuts the rest off on the destination host, sends only the remaining bytes (xrdcp
    reading from a pipe) to ``.name.tmp-resume-tail`` and appends that there.  The
    checksum on the destination host catches a resumed file that is not whole (the
    caller then removes it and the next retry sends everything).  xrdcp's own retries
    are off and its timeouts short (:func:`~ccat_data_transfer.core.hosts.xrootd_env`): our
    backoff retries.  TRANSFER_BANDWIDTH_LIMIT_MB_PER_S paces it (``--xrate``).
    """

    kind = m.TransferMethod.XROOTD
    binary = "xrdcp"
    missing_binary = (
        "transfer method 'xrootd' is configured but xrdcp is not installed on this worker; "
        "install the xrootd client (Debian: xrootd-client) or change the route's method"
    )

    def copy(self, exe, src, src_reach, dst, dst_reach, log_file):
        if src_reach is not None or dst_reach is None or not dst_reach.xrootd_url:
            raise ConfigurationError(
                "the 'xrootd' method pushes a local file to the destination site's XRootD "
                "server: the destination site needs 'host' and 'xrootd_url' in the topology"
            )
        partial = _resume_name(dst)
        streams = max(1, int(settings.get("TRANSFER_XROOTD_STREAMS", 4)))
        cmd = [exe, "--nopbar", "--path", "--force", "--streams", str(streams)]
        limit = float(settings.get("TRANSFER_BANDWIDTH_LIMIT_MB_PER_S", 0) or 0)
        if limit > 0:
            cmd += ["--xrate", str(max(1, int(limit * 1e6)))]  # bytes per second
        size = os.path.getsize(src)
        keep = min(self._size_there(dst_reach, partial), size) - 2 * XROOTD_IN_FLIGHT
        if keep <= 0:
            run_logged(
                [*cmd, src, dst_reach.xrootd_path(partial)],
                log_file,
                "xrdcp",
                dst_reach,
                env=xrootd_env(),
                work_bytes=size,
            )
        else:
            tail = partial + "-tail"
            _log(log_file, f"resuming: {keep} of {size} bytes kept at the destination")
            with open(src, "rb") as f:
                f.seek(keep)
                run_logged(
                    [*cmd, "-", dst_reach.xrootd_path(tail)],
                    log_file,
                    "xrdcp",
                    dst_reach,
                    env=xrootd_env(),
                    stdin=f,
                    work_bytes=size - keep,
                )
            q_partial, q_tail = shlex.quote(partial), shlex.quote(tail)
            _run(
                dst_reach.ssh_script(
                    f"truncate -s {keep} {q_partial} && cat {q_tail} >> {q_partial} "
                    f"&& rm -f {q_tail}"
                ),
                log_file,
                "append",
                dst_reach,
                work_bytes=size,
            )
        _rename_into_place(partial, dst, dst_reach, log_file)

    @staticmethod
    def _size_there(reach: SiteReach, path: str) -> int:
        """Size of ``path`` on the destination's XRootD server (0 when absent)."""
        xrdfs = shutil.which("xrdfs") or "xrdfs"
        proc = run_bounded([xrdfs, reach.xrootd_url or "", "stat", path], env=xrootd_env())
        match = re.search(r"^Size:\s+(\d+)", proc.stdout, re.MULTILINE)
        return int(match.group(1)) if proc.returncode == 0 and match else 0


class S3Method(TransferMethodBase):
    """boto3 uploads/downloads: at least one end is an S3 location (endpoint, bucket and
    credentials from the settings).  Multipart uploads are aborted on failure, and local
    downloads go to a temporary name, so nothing partial appears."""

    kind = m.TransferMethod.S3

    def transfer(self, src_storage, src_path, dst_storage, dst_path, log_file, **hosts):
        if not isinstance(src_storage, S3Storage) and not isinstance(dst_storage, S3Storage):
            raise ConfigurationError(
                "the 's3' transfer method needs an S3 location at one end; "
                f"got {src_storage!r} -> {dst_storage!r}"
            )
        _log(log_file, f"s3 {src_storage!r}:{src_path} -> {dst_storage!r}:{dst_path}")
        start = time.monotonic()
        local_src = src_storage.local_path(src_path)
        local_dst = dst_storage.local_path(dst_path)
        if isinstance(dst_storage, S3Storage) and local_src is not None:
            n = dst_storage.copy_in(local_src, dst_path)
        elif isinstance(src_storage, S3Storage) and local_dst is not None:
            with dst_storage.open_write(dst_path) as dst, src_storage.open_read(src_path) as src:
                n = copy_stream(src, dst)
        else:
            n = _stream_copy(src_storage, src_path, dst_storage, dst_path)
        stats = TransferStats(n, time.monotonic() - start)
        _log(log_file, f"s3 done: {n} bytes in {stats.seconds:.3f} s")
        return stats


class BbcpMethod(CommandLineMethod):
    """bbcp (parallel streams) where the binary is installed; a clear configuration error
    otherwise.  The target is a temporary name renamed into place on success.  Not
    resumable: an interrupted bbcp starts again."""

    kind = m.TransferMethod.BBCP
    binary = "bbcp"
    missing_binary = (
        "transfer method 'bbcp' is configured but the bbcp binary is not installed on "
        "this worker (not on PATH); install bbcp or change the route's method"
    )
    streams = 4

    def local_command(self, exe: str, src_arg: str) -> list[str]:
        return [exe, "-P", "10", "-s", str(self.streams), src_arg]

    def copy(self, exe, src, src_reach, dst, dst_reach, log_file):
        src_arg = f"{src_reach.target}:{src}" if src_reach else src
        work = _work_bytes(src, src_reach)
        if dst_reach is None:
            _run_into_place(self.local_command(exe, src_arg), dst, log_file, "bbcp", work)
            return
        tmp = _tmp_sibling(dst)
        _run(dst_reach.ssh("mkdir", "-p", "--", os.path.dirname(dst)), log_file, "mkdir", dst_reach)
        cmd = [
            *self.local_command(exe, src_arg),
            "-T",
            shlex.join(dst_reach.ssh_base()) + " %I -l %U %H bbcp",
        ]
        _run([*cmd, f"{dst_reach.target}:{tmp}"], log_file, "bbcp", dst_reach, work)
        _rename_into_place(tmp, dst, dst_reach, log_file)


_REGISTRY: dict[m.TransferMethod, TransferMethodBase] = {}


def register_transfer_method(
    kind: m.TransferMethod, method: TransferMethodBase
) -> TransferMethodBase | None:
    """Register ``method`` for ``kind``; returns the one it replaces (tests restore it)."""
    previous = _REGISTRY.get(kind)
    _REGISTRY[kind] = method
    return previous


def get_transfer_method(kind: m.TransferMethod | str) -> TransferMethodBase:
    """The registered method for a route's ``transfer_method``."""
    try:
        key = kind if isinstance(kind, m.TransferMethod) else m.TransferMethod(str(kind).lower())
        return _REGISTRY[key]
    except (KeyError, ValueError):
        known = ", ".join(k.value for k in _REGISTRY)
        raise ConfigurationError(f"unknown transfer method {kind!r} (known: {known})") from None


def method_for_storages(
    preferred: m.TransferMethod | None, src_storage: Storage, dst_storage: Storage
) -> m.TransferMethod:
    """The method to use between two storages: S3 whenever one end is S3 (no other method
    can reach it), else ``preferred`` (COPY when none)."""
    if isinstance(src_storage, S3Storage) or isinstance(dst_storage, S3Storage):
        return m.TransferMethod.S3
    return preferred or m.TransferMethod.COPY


for _cls in (CopyMethod, RsyncMethod, S3Method, BbcpMethod, XrootdMethod):
    register_transfer_method(_cls.kind, _cls())
