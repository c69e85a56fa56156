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
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from typing import TextIO

from ccat_data_transfer.config.config import settings
from ccat_data_transfer.exceptions import ConfigurationError, RetryableError
from ccat_data_transfer.storage import (
    DiskStorage,
    ObjectNotFound,
    S3Storage,
    Storage,
    copy_stream,
)
from ccat_ops_db import models as m

__all__ = [
    "BbcpMethod",
    "CommandLineMethod",
    "CopyMethod",
    "RsyncMethod",
    "S3Method",
    "TransferMethodBase",
    "TransferStats",
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
        src_host: str | None = None,
        dst_host: str | None = None,
    ) -> TransferStats:
        """Move ``src_path`` of ``src_storage`` to ``dst_path`` of ``dst_storage``.

        ``src_host``/``dst_host`` name a remote host for methods that reach one over ssh
        (rsync, bbcp); ``None`` means the storage is reachable from here.  Raises
        :class:`~ccat_data_transfer.exceptions.RetryableError` for transient failures and
        :class:`~ccat_data_transfer.exceptions.ConfigurationError`
        when the method cannot work at all with this setup.
        """
        raise NotImplementedError

    def checksum(self, dst_storage: Storage, dst_path: str, *, dst_host: str | None = None) -> str:
        """SHA-256 of what landed at the destination (read back from the destination)."""
        if dst_host and not _is_local_host(dst_host):
            return _remote_sha256(dst_host, _local_root_path(dst_storage, dst_path, "checksum"))
        return dst_storage.sha256(dst_path)


def _log(log_file: TextIO, line: str) -> None:
    log_file.write(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {line}\n")
    log_file.flush()


def _is_local_host(host: str | None) -> bool:
    return not host or host in ("localhost", "127.0.0.1", "::1")


def _local_root_path(storage: Storage, path: str, method: str) -> str:
    """Filesystem path of ``path`` in a disk storage (for command-line tools)."""
    if not isinstance(storage, DiskStorage):
        raise ConfigurationError(
            f"transfer method {method!r} needs disk locations at both ends, got {storage!r}; "
            "use the 's3' method for S3 locations"
        )
    # Paths are checked by the storage (relative, no '..'); the root may not exist on a
    # remote host, so build the string without resolving it here.
    from ccat_data_transfer.storage import normalize_path

    return str(storage.root / normalize_path(path))


def _tmp_sibling(path: str) -> str:
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.tmp-{uuid.uuid4().hex}")


def _run(cmd: list[str], log_file: TextIO, what: str) -> None:
    """Run a command, its output appended to the transfer log; non-zero exit is retryable."""
    _log(log_file, "$ " + shlex.join(cmd))
    proc = subprocess.run(cmd, stdout=log_file, stderr=subprocess.STDOUT, check=False)
    log_file.flush()
    if proc.returncode != 0:
        raise RetryableError(f"{what} exited with status {proc.returncode} (see the transfer log)")


def _run_into_place(command: list[str], dst: str, log_file: TextIO, what: str) -> None:
    """Run a local copy ``command`` with a temporary sibling of ``dst`` appended as its
    target, then rename that into place: readers never see a partial ``dst``, and the
    temporary file is removed whatever happens.  Shared by the command-line methods."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = _tmp_sibling(dst)
    try:
        _run([*command, tmp], log_file, what)
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


def _remote_sha256(host: str, path: str) -> str:
    out = subprocess.run(
        ["ssh", "-o", "BatchMode=yes", host, "sha256sum", "--", shlex.quote(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0 or not out.stdout.strip():
        raise RetryableError(f"cannot checksum {host}:{path}: {out.stderr.strip()}")
    return out.stdout.split()[0]


def _stream_copy(src_storage: Storage, src_path: str, dst_storage: Storage, dst_path: str) -> int:
    """Copy one object between two storages this process reaches; atomic at the
    destination.  A source on a local filesystem goes through ``copy_in`` (disk to disk:
    the kernel moves the bytes, :func:`~ccat_data_transfer.fileio.copy_fd`); anything else,
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
                    "use 'rsync' or 'bbcp' for a remote host"
                )
        _log(log_file, f"copy {src_storage!r}:{src_path} -> {dst_storage!r}:{dst_path}")
        start = time.monotonic()
        n = _stream_copy(src_storage, src_path, dst_storage, dst_path)
        stats = TransferStats(n, time.monotonic() - start)
        _log(log_file, f"copied {n} bytes in {stats.seconds:.3f} s")
        return stats


class CommandLineMethod(TransferMethodBase):
    """A method that runs a command-line tool between disk locations, locally or with a
    remote end over ssh (``host:path``).  Subclasses name the tool (``binary``), say what
    to tell a person when it is missing, and build its commands.

    Locally the target is a temporary sibling renamed into place; towards a remote host
    the subclass's :meth:`send_to_host` keeps the same guarantee.
    """

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
        src_arg = src if _is_local_host(src_host) else f"{src_host}:{src}"
        start = time.monotonic()
        if _is_local_host(dst_host):
            _run_into_place(self.local_command(exe, src_arg), dst, log_file, self.binary)
        else:
            self.send_to_host(exe, src_arg, dst_host, dst, log_file)
        return _command_stats(self.binary, src, src_host, start, log_file)

    def local_command(self, exe: str, src_arg: str) -> list[str]:
        """The command copying ``src_arg`` to a local target appended to it."""
        raise NotImplementedError

    def send_to_host(
        self, exe: str, src_arg: str, dst_host: str, dst: str, log_file: TextIO
    ) -> None:
        """Copy ``src_arg`` to ``dst`` on ``dst_host``, never partial under ``dst``."""
        raise NotImplementedError


class RsyncMethod(CommandLineMethod):
    """rsync between disk locations, locally or over ssh (``host:path``).

    Locally the target is a temporary sibling renamed into place.  Over ssh rsync itself
    writes to a temporary file in the target directory and renames it when complete
    (we never pass ``--inplace``), which is the same guarantee.
    """

    kind = m.TransferMethod.RSYNC
    binary = "rsync"
    missing_binary = "rsync is not installed on this worker; install it or use 'copy'"

    def local_command(self, exe: str, src_arg: str) -> list[str]:
        return [exe, "-a", "--no-perms", "--chmod=F644", src_arg]

    def send_to_host(
        self, exe: str, src_arg: str, dst_host: str, dst: str, log_file: TextIO
    ) -> None:
        _run(
            [exe, "-a", "--mkpath", "-e", "ssh -o BatchMode=yes", src_arg, f"{dst_host}:{dst}"],
            log_file,
            "rsync",
        )


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
    otherwise.  The target is a temporary name renamed into place on success."""

    kind = m.TransferMethod.BBCP
    binary = "bbcp"
    missing_binary = (
        "transfer method 'bbcp' is configured but the bbcp binary is not installed on "
        "this worker (not on PATH); install bbcp or change the route's method"
    )
    streams = 4

    def local_command(self, exe: str, src_arg: str) -> list[str]:
        return [exe, "-P", "10", "-s", str(self.streams), src_arg]

    def send_to_host(
        self, exe: str, src_arg: str, dst_host: str, dst: str, log_file: TextIO
    ) -> None:
        tmp = _tmp_sibling(dst)
        ssh = ["ssh", "-o", "BatchMode=yes", dst_host]
        _run([*ssh, "mkdir", "-p", shlex.quote(os.path.dirname(dst))], log_file, "ssh mkdir")
        _run([*self.local_command(exe, src_arg), f"{dst_host}:{tmp}"], log_file, "bbcp")
        _run([*ssh, "mv", "-f", shlex.quote(tmp), shlex.quote(dst)], log_file, "ssh mv")


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


for _cls in (CopyMethod, RsyncMethod, S3Method, BbcpMethod):
    register_transfer_method(_cls.kind, _cls())
