"""Transfer methods: how the bytes of one object get from one location to another.

A method is a small class with one call, :meth:`TransferMethodBase.transfer`, registered
under a :class:`ccat_ops_db.models.TransferMethod` member.  Adding a method touches only
this module: write the class, register it.  Routes (``DataTransferRoute.transfer_method``)
name the method a transfer uses.

Every method writes the destination atomically, in two calls: :meth:`~TransferMethodBase.land`
puts the bytes under a temporary name of the attempt (:meth:`~TransferMethodBase.temp_name`),
the caller computes the checksum *there* (:meth:`~TransferMethodBase.checksum`) and only
verified bytes are renamed into place (:meth:`~TransferMethodBase.place`); bytes that fail
are removed (:meth:`~TransferMethodBase.discard`).  So a transfer killed midway, or one
whose bytes are wrong, never leaves anything under the final name.  ``transfer`` (land
and place, no verification) stays for callers that verify afterwards.  Methods only move
bytes and log the commands they ran into the per-transfer log file.

Attempts never share a temporary file: an attempt (a token, see
:mod:`ccat_data_transfer.core.attempts`) writes to ``.name.tmp-resume-<attempt>``.  To
resume after a lost attempt, the next owner first *adopts* (:meth:`~TransferMethodBase.adopt`)
the longest earlier partial (``.name.tmp-resume`` or another attempt's) by renaming it to
its own name and removes the others; the caller does that only while it owns the row, so
the previous attempt has lost its ownership by then.  A partial as long as the source or
longer (left by another version of the file) is dropped, never resumed.

Across hosts (sites on their own machines, :mod:`ccat_data_transfer.core.hosts`) the pushing
worker is the origin's, ``dst_host`` is the destination site's
:class:`~ccat_data_transfer.core.hosts.SiteReach`, and the network methods write to the
attempt's temporary name there, renamed into place on the destination host when verified;
a retry resumes from the bytes already there (adopted as above).  The checksum
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
    "attempt_name",
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
        """Move ``src_path`` of ``src_storage`` to ``dst_path`` of ``dst_storage``: land
        the bytes at the parked resume name and rename them into place, unverified (the
        caller checks the final name).  Transfer tasks use :meth:`land`, :meth:`checksum`
        at the temporary name and :meth:`place` instead.

        ``src_host``/``dst_host`` say how to reach an end on another machine (a
        :class:`~ccat_data_transfer.core.hosts.SiteReach` or a bare host name) for the network
        methods (rsync, xrootd, bbcp); ``None`` means the storage is reachable from here.  Raises
        :class:`~ccat_data_transfer.core.errors.RetryableError` for transient failures and
        :class:`~ccat_ops_db.errors.ConfigurationError`
        when the method cannot work at all with this setup.
        """
        stats = self.land(
            src_storage,
            src_path,
            dst_storage,
            dst_path,
            log_file,
            src_host=src_host,
            dst_host=dst_host,
        )
        self.place(dst_storage, dst_path, None, log_file, dst_host=dst_host)
        return stats

    def temp_name(self, dst_storage: Storage, dst_path: str, attempt: str | None) -> str:
        """Where :meth:`land` puts the bytes of ``attempt`` (``None``: the parked resume
        name ``.name.tmp-resume``): ``.name.tmp-resume-<attempt>`` beside the final name
        on a disk location; the final name itself on S3 (an object appears there only
        when whole, and S3 has no rename)."""
        if not isinstance(dst_storage, DiskStorage):
            return dst_path
        return attempt_name(dst_path, attempt)

    def land(
        self,
        src_storage: Storage,
        src_path: str,
        dst_storage: Storage,
        dst_path: str,
        log_file: TextIO,
        *,
        attempt: str | None = None,
        size: int | None = None,
        src_host: SiteReach | str | None = None,
        dst_host: SiteReach | str | None = None,
    ) -> TransferStats:
        """Move the bytes of ``src_path`` to :meth:`temp_name` of ``dst_path`` for
        ``attempt``; nothing is renamed into place.  ``size`` is the source's size when
        the caller knows it (a source on another host), for the stale-partial rule."""
        raise NotImplementedError

    def place(
        self,
        dst_storage: Storage,
        dst_path: str,
        attempt: str | None,
        log_file: TextIO,
        *,
        dst_host: SiteReach | str | None = None,
    ) -> None:
        """Rename the landed (and verified) bytes of ``attempt`` to ``dst_path``, on the
        host where they lie.  Irreversible: the caller checks it still owns its row."""
        temp = self.temp_name(dst_storage, dst_path, attempt)
        if temp == dst_path:
            return
        reach = as_reach(dst_host)
        src = _local_root_path(dst_storage, temp, "place")
        dst = _local_root_path(dst_storage, dst_path, "place")
        _rename_into_place(src, dst, reach, log_file)

    def adopt(
        self,
        dst_storage: Storage,
        dst_path: str,
        attempt: str,
        log_file: TextIO,
        *,
        dst_host: SiteReach | str | None = None,
    ) -> None:
        """Make the longest earlier partial of ``dst_path`` (the parked
        ``.name.tmp-resume`` or an earlier attempt's ``.name.tmp-resume-*``) this
        attempt's, by renaming it to :meth:`temp_name`, and remove the other ones (and
        their xrootd ``-tail`` pieces).  Irreversible for the earlier attempts: the
        caller runs it only while it owns its row, i.e. after they lost theirs."""
        if not isinstance(dst_storage, DiskStorage):
            return
        own = _local_root_path(dst_storage, attempt_name(dst_path, attempt), "adopt")
        parked = _local_root_path(dst_storage, attempt_name(dst_path, None), "adopt")
        reach = as_reach(dst_host)
        if reach is None:
            _adopt_here(parked, own, log_file)
            return
        q_parked, q_own = shlex.quote(os.path.basename(parked)), shlex.quote(os.path.basename(own))
        script = (
            f"cd {shlex.quote(os.path.dirname(parked))} 2>/dev/null || exit 0; "
            f"best=; bs=-1; for f in {q_parked} {q_parked}-*; do "
            '[ -f "$f" ] || continue; '
            f'[ "$f" = {q_own} ] && continue; '
            'case "$f" in *-tail) rm -f -- "$f"; continue;; esac; '
            's=$(stat -c %s -- "$f") || continue; '
            'if [ "$s" -gt "$bs" ]; then [ -n "$best" ] && rm -f -- "$best"; best=$f; bs=$s; '
            'else rm -f -- "$f"; fi; done; '
            f'if [ -n "$best" ]; then mv -f -- "$best" {q_own} '
            '&& echo "adopted $best ($bs bytes)"; fi; '
            "exit 0"
        )
        _run(reach.ssh_script(script), log_file, "adopt", reach)

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


def attempt_name(path: str, attempt: str | None) -> str:
    """The temporary name of ``attempt`` beside ``path``: ``.name.tmp-resume-<attempt>``,
    or the parked resume name ``.name.tmp-resume`` (``attempt`` None)."""
    base = _resume_name(path)
    return base if attempt is None else f"{base}-{attempt}"


def _adopt_here(parked: str, own: str, log_file: TextIO) -> None:
    """:meth:`TransferMethodBase.adopt` on this machine's filesystem."""
    head, parked_name = os.path.split(parked)
    try:
        names = os.listdir(head)
    except (FileNotFoundError, NotADirectoryError):
        return
    own_name = os.path.basename(own)
    candidates: list[tuple[int, str]] = []
    for name in names:
        if name == own_name or not (name == parked_name or name.startswith(parked_name + "-")):
            continue
        full = os.path.join(head, name)
        if not os.path.isfile(full):
            continue
        if name.endswith("-tail"):
            _unlink_quietly(full)
            continue
        candidates.append((os.path.getsize(full), full))
    if not candidates:
        return
    candidates.sort(reverse=True)
    size, best = candidates[0]
    for _, other in candidates[1:]:
        _unlink_quietly(other)
    os.replace(best, own)
    _log(log_file, f"adopted {os.path.basename(best)} ({size} bytes)")


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _drop_stale_partial(
    partial: str, size: int | None, reach: SiteReach | None, log_file: TextIO
) -> None:
    """A partial as long as the source or longer was left by another version of the
    file (or is whole but unverified): neither rsync's ``--append-verify`` nor a resume
    would rewrite it, so it is removed and the bytes are sent again."""
    if size is None:
        return
    if reach is None:
        try:
            there = os.path.getsize(partial)
        except OSError:
            return
        if there >= size:
            _log(log_file, f"dropping a stale partial of {there} bytes (source {size})")
            _unlink_quietly(partial)
        return
    q = shlex.quote(partial)
    _run(
        reach.ssh_script(
            f'if [ -f {q} ] && [ "$(stat -c %s -- {q})" -ge {int(size)} ]; then '
            f'echo "dropping a stale partial"; rm -f -- {q}; fi'
        ),
        log_file,
        "drop stale partial",
        reach,
    )


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

    def land(
        self,
        src_storage,
        src_path,
        dst_storage,
        dst_path,
        log_file,
        *,
        attempt=None,
        size=None,
        **hosts,
    ):
        for key, host in hosts.items():
            if not _is_local_host(host):
                raise ConfigurationError(
                    f"the 'copy' method needs a shared filesystem but {key}={host!r}; "
                    "use 'rsync', 'xrootd' or 'bbcp' for a remote host"
                )
        temp = self.temp_name(dst_storage, dst_path, attempt)
        _log(log_file, f"copy {src_storage!r}:{src_path} -> {dst_storage!r}:{temp}")
        start = time.monotonic()
        n = _stream_copy(src_storage, src_path, dst_storage, temp)
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

    def land(
        self,
        src_storage,
        src_path,
        dst_storage,
        dst_path,
        log_file,
        *,
        attempt=None,
        size=None,
        src_host=None,
        dst_host=None,
    ):
        exe = shutil.which(self.binary)
        if exe is None:
            raise ConfigurationError(self.missing_binary)
        src = _local_root_path(src_storage, src_path, self.binary)
        _local_root_path(dst_storage, dst_path, self.binary)
        dst = _local_root_path(
            dst_storage, self.temp_name(dst_storage, dst_path, attempt), self.binary
        )
        src_reach, dst_reach = as_reach(src_host), as_reach(dst_host)
        if src_reach is not None and dst_reach is not None:
            raise ConfigurationError(
                f"'{self.binary}' cannot copy between two other hosts "
                f"({src_reach.label} -> {dst_reach.label}); the origin site's worker pushes"
            )
        if size is None and src_reach is None:
            size = os.path.getsize(src)
        start = time.monotonic()
        self.copy(exe, src, src_reach, dst, dst_reach, log_file, size)
        return _command_stats(self.binary, src, src_host, start, log_file)

    def copy(
        self,
        exe: str,
        src: str,
        src_reach: SiteReach | None,
        dst: str,
        dst_reach: SiteReach | None,
        log_file: TextIO,
        size: int | None,
    ) -> None:
        """Copy ``src`` (on ``src_reach``, None: here; ``size`` bytes when known) to the
        temporary name ``dst`` (on ``dst_reach``), resuming from what is there where the
        tool can; never renamed into place here."""
        raise NotImplementedError


def _rename_into_place(partial: str, dst: str, reach: SiteReach | None, log_file: TextIO) -> None:
    """Rename the complete ``partial`` to ``dst``, on the host where they lie."""
    if reach is None:
        os.replace(partial, dst)
    else:
        _run(reach.ssh("mv", "-f", "--", partial, dst), log_file, "rename", reach)


class RsyncMethod(CommandLineMethod):
    """rsync between disk locations, locally or with one end over ssh (``user@host:path``).

    Resumable: rsync writes to the attempt's temporary name with ``--append-verify``, so
    a retry (which adopted the earlier partial) sends only the bytes not already there
    (and rsync re-sends the whole file if the whole-file checksum of the result does not
    match).  A partial as long as the source or longer is dropped first: rsync would
    take it as done.
    TRANSFER_BANDWIDTH_LIMIT_MB_PER_S paces it (``--bwlimit``).
    """

    kind = m.TransferMethod.RSYNC
    binary = "rsync"
    missing_binary = "rsync is not installed on this worker; install it or use 'copy'"

    def copy(self, exe, src, src_reach, dst, dst_reach, log_file, size):
        partial = dst
        _drop_stale_partial(partial, size, dst_reach, log_file)
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
        work = size or _work_bytes(src, src_reach)
        _run([*cmd, src_arg, dst_arg], log_file, "rsync", reach, work_bytes=work)


class XrootdMethod(CommandLineMethod):
    """``xrdcp --streams N`` (parallel TCP streams, for long fat links) from this host to
    the destination site's XRootD server (the site's ``xrootd_url``).

    The file goes to the attempt's temporary name (renamed into place over ssh once
    verified, :meth:`TransferMethodBase.place`).  Resumable, though xrdcp 5.5 refuses ``--continue``
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

    def copy(self, exe, src, src_reach, dst, dst_reach, log_file, size):
        if src_reach is not None or dst_reach is None or not dst_reach.xrootd_url:
            raise ConfigurationError(
                "the 'xrootd' method pushes a local file to the destination site's XRootD "
                "server: the destination site needs 'host' and 'xrootd_url' in the topology"
            )
        partial = dst
        streams = max(1, int(settings.get("TRANSFER_XROOTD_STREAMS", 4)))
        cmd = [exe, "--nopbar", "--path", "--force", "--streams", str(streams)]
        limit = float(settings.get("TRANSFER_BANDWIDTH_LIMIT_MB_PER_S", 0) or 0)
        if limit > 0:
            cmd += ["--xrate", str(max(1, int(limit * 1e6)))]  # bytes per second
        size = os.path.getsize(src)
        there = self._size_there(dst_reach, partial)
        # A partial as long as the source or longer is stale: everything is sent again.
        keep = 0 if there >= size else there - 2 * XROOTD_IN_FLIGHT
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

    def land(
        self,
        src_storage,
        src_path,
        dst_storage,
        dst_path,
        log_file,
        *,
        attempt=None,
        size=None,
        **hosts,
    ):
        dst_path = self.temp_name(dst_storage, dst_path, attempt)
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

    def copy(self, exe, src, src_reach, dst, dst_reach, log_file, size):
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
