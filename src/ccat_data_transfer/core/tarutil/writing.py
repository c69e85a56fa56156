"""Writing a tar with checksums in one pass:
:func:`~ccat_data_transfer.core.tarutil.write_tar_with_checksums`.

Every source file is read exactly once: the bytes go to the tar stream while the SHA-256
of each file and of the whole tar are computed, the hashing spread over two threads
(hashlib releases the GIL on large buffers, so two cores work at once).

Header layout is deterministic: ``tarfile`` builds the headers (PAX format, so long names
and files over 8 GiB work), with uid/gid 0, no user or group names, mode 0644 and the
source file's mtime (whole seconds).  The data blocks are written by this module, so the
read loop stays under our control.

Room in the house: core.  Imports :mod:`ccat_data_transfer.core.tarutil.common` and
:mod:`ccat_data_transfer.core.fileio` only.
"""

from __future__ import annotations

import hashlib
import os
import queue
import stat
import tarfile
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, BinaryIO

from ccat_data_transfer.core.fileio import buffer_size, fadvise_sequential
from ccat_data_transfer.core.tarutil.common import (
    BLOCKSIZE,
    DEFAULT_BUFSIZE,
    RECORDSIZE,
    ZERO_BLOCK,
    TarMember,
    TarResult,
    TarSourceChangedError,
    normalize_arcname,
)

__all__ = ["write_tar_with_checksums"]

# Buffers in flight between the reader and the hashing thread.
_POOL_SIZE = 4
_FILE_MODE = 0o644


class _Hasher:
    """A thread that feeds chunks to hash objects, in order, then hands buffers back.

    ``update(h, data, release)`` queues ``h.update(data)``; ``release()`` (if given) runs
    afterwards so the producer may reuse the buffer.  hashlib drops the GIL for buffers
    over 2 KiB, so this thread hashes while the producer reads and writes.
    """

    _STOP = object()

    def __init__(self) -> None:
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="tar-hasher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        q = self._q
        while True:
            item = q.get()
            if item is self._STOP:
                return
            h, data, release = item
            try:
                if self._error is None and h is not None:
                    h.update(data)
            except BaseException as exc:  # pragma: no cover - hashlib does not fail
                self._error = exc
            finally:
                if release is not None:
                    release()

    def update(self, h: Any, data: Any, release: Callable[[], None] | None = None) -> None:
        self._q.put((h, data, release))

    def call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` in the hashing thread after everything queued so far."""
        self._q.put((None, None, fn))

    def close(self) -> None:
        self._q.put(self._STOP)
        self._thread.join()
        if self._error is not None:
            raise self._error


class _BufferPool:
    """At most ``count`` reusable buffers, allocated when first needed; a buffer returns
    once every consumer released it."""

    def __init__(self, count: int, size: int) -> None:
        self.views: list[memoryview] = []
        self._count = count
        self._size = size
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._refs = [0] * count
        self._lock = threading.Lock()

    def acquire(self, consumers: int) -> int:
        try:
            idx = self._free.get_nowait()
        except queue.Empty:
            if len(self.views) < self._count:  # only the producer thread allocates
                self.views.append(memoryview(bytearray(self._size)))
                idx = len(self.views) - 1
            else:
                idx = self._free.get()
        self._refs[idx] = consumers
        return idx

    def releaser(self, idx: int) -> Callable[[], None]:
        def release() -> None:
            with self._lock:
                self._refs[idx] -= 1
                last = self._refs[idx] == 0
            if last:
                self._free.put(idx)

        return release

    def release_now(self, idx: int) -> None:
        """Give a buffer back that no consumer has seen."""
        self._free.put(idx)


# --- writing ------------------------------------------------------------------------------

# Where the two hashes run.  "file_thread": the main thread reads, writes and hashes the
# tar stream, a worker hashes each file.  "tar_thread": the reverse.  "both_threads": the
# main thread only does I/O and two workers hash.  "serial": no threads (reference).
# bench/packaging.py measures them; the default is the fastest measured on 2 cores.
_LAYOUTS = ("file_thread", "tar_thread", "both_threads", "serial")
_DEFAULT_LAYOUT = "both_threads"


def _write_all(out: BinaryIO, data: memoryview | bytes) -> None:
    n = out.write(data)
    if n is None or n >= len(data):
        return
    view = memoryview(data)[n:]
    while len(view):
        n = out.write(view)
        if not n:
            raise OSError("short write to the tar output stream")
        view = view[n:]


def _store_digest(digests: dict[str, str], arcname: str, h: Any) -> Callable[[], None]:
    def store() -> None:
        digests[arcname] = h.hexdigest()

    return store


def _header(arcname: str, size: int, mtime: int) -> bytes:
    info = tarfile.TarInfo(arcname)
    info.size = size
    info.mtime = mtime
    info.mode = _FILE_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def write_tar_with_checksums(
    members: Sequence[TarMember] | Iterable[TarMember],
    out: BinaryIO,
    expected: dict[str, str] | None = None,
    bufsize: int = DEFAULT_BUFSIZE,
    *,
    _layout: str = _DEFAULT_LAYOUT,
) -> TarResult:
    """Write a tar of ``members`` to ``out`` in one read pass, with checksums.

    Each file is read once; its bytes go to ``out`` while its SHA-256 and the SHA-256 of
    the whole tar stream are computed.  Expected checksums come from ``expected``
    (arcname to hex digest) or else from ``TarMember.expected_sha256``; differences are
    reported in ``TarResult.mismatches`` (the tar is still complete: the caller decides).

    Raises :class:`~ccat_data_transfer.core.tarutil.TarSourceChangedError` if a file's size
    differs from ``TarMember.size`` or it changes while being read, ``ValueError`` for
    unsafe or duplicate arcnames, ``OSError`` for read/write errors.  ``out`` is then left
    partially written: write to an atomic target (``Storage.open_write``) so a failure
    leaves nothing behind.
    """
    if _layout not in _LAYOUTS:
        raise ValueError(f"unknown layout {_layout!r}")
    if bufsize < BLOCKSIZE:
        raise ValueError("bufsize must be at least 512")
    expected_norm = {normalize_arcname(k): v.lower() for k, v in (expected or {}).items()}

    checks: list[tuple[str, str | None]] = []
    seen: set[str] = set()

    if isinstance(members, Sequence):  # buffers no larger than the largest member
        bufsize = buffer_size(max((mem.size for mem in members), default=0), bufsize)
    stream = _TarStream(out, bufsize, _layout)
    try:
        for member in members:
            arcname = _member_arcname(member, seen)
            want = expected_norm.get(arcname) or (
                member.expected_sha256.lower() if member.expected_sha256 else None
            )
            checks.append((arcname, want))
            stream.add_file(member, arcname)
        stream.finish()
    finally:
        stream.close()

    digests = stream.digests
    mismatches = [
        (name, want, digests[name]) for name, want in checks if want and want != digests[name]
    ]
    return TarResult(
        sha256=stream.tar_hash.hexdigest(),
        size=stream.total,
        member_sha256=digests,
        mismatches=mismatches,
    )


def _member_arcname(member: TarMember, seen: set[str]) -> str:
    """Validate phase: the member's normalised arcname, safe, non-empty and not in ``seen``
    (it is added)."""
    try:
        arcname = normalize_arcname(member.arcname)
    except ValueError as exc:
        raise ValueError(f"bad tar member name: {exc}") from None
    if not arcname:
        raise ValueError(f"empty tar member name for {member.source_path}")
    if arcname in seen:
        raise ValueError(f"duplicate tar member name {arcname!r}")
    seen.add(arcname)
    return arcname


class _TarStream:
    """The tar being written: its output, running SHA-256 and size, the per-file digests,
    and the hashing threads and buffers of the chosen layout."""

    def __init__(self, out: BinaryIO, bufsize: int, layout: str) -> None:
        self.out = out
        self.bufsize = bufsize
        self.tar_hash = hashlib.sha256()
        self.digests: dict[str, str] = {}
        self.total = 0
        self.file_worker = _Hasher() if layout in ("file_thread", "both_threads") else None
        self.tar_worker = _Hasher() if layout in ("tar_thread", "both_threads") else None
        self.consumers = (self.file_worker is not None) + (self.tar_worker is not None)
        self.pool = _BufferPool(_POOL_SIZE if self.consumers else 1, bufsize)

    def emit_small(self, data: bytes) -> None:
        """Headers and padding: written and hashed in stream order."""
        _write_all(self.out, data)
        self.total += len(data)
        if self.tar_worker is not None:
            self.tar_worker.update(self.tar_hash, data)
        else:
            self.tar_hash.update(data)

    def add_file(self, member: TarMember, arcname: str) -> None:
        """Write one member (header, data, padding), checking the source did not change."""
        file_worker = self.file_worker
        with open(member.source_path, "rb", buffering=0) as src:
            fd = src.fileno()
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):
                raise ValueError(f"{member.source_path} is not a regular file")
            if before.st_size != member.size:
                raise TarSourceChangedError(
                    f"{member.source_path} is {before.st_size} bytes, expected "
                    f"{member.size} (file changed since it was registered?)"
                )
            fadvise_sequential(fd)
            self.emit_small(_header(arcname, member.size, int(before.st_mtime)))

            file_hash = hashlib.sha256()
            self._copy_data(src, member, file_hash)

            after = os.fstat(fd)
            if (
                after.st_size != before.st_size
                or after.st_mtime_ns != before.st_mtime_ns
                or src.read(1)
            ):
                raise TarSourceChangedError(f"{member.source_path} changed while being packaged")

        if file_worker is not None:
            file_worker.call(_store_digest(self.digests, arcname, file_hash))
        else:
            self.digests[arcname] = file_hash.hexdigest()
        pad = -member.size % BLOCKSIZE
        if pad:
            self.emit_small(ZERO_BLOCK[:pad])

    def _copy_data(self, src: BinaryIO, member: TarMember, file_hash: Any) -> None:
        """The read loop: each buffer is written once and hashed for the file and the tar."""
        out, pool, bufsize, consumers = self.out, self.pool, self.bufsize, self.consumers
        tar_hash, tar_worker, file_worker = self.tar_hash, self.tar_worker, self.file_worker
        remaining = member.size
        while remaining:
            idx = pool.acquire(consumers)
            view = pool.views[idx]
            n = src.readinto(view[: min(bufsize, remaining)])
            if not n:
                pool.release_now(idx)
                raise TarSourceChangedError(
                    f"{member.source_path} shrank while being packaged "
                    f"({member.size - remaining} of {member.size} bytes read)"
                )
            chunk = view[:n]
            _write_all(out, chunk)
            if tar_worker is None:
                tar_hash.update(chunk)
            if file_worker is None:
                file_hash.update(chunk)
            if consumers:
                release = pool.releaser(idx)
                if tar_worker is not None:
                    tar_worker.update(tar_hash, chunk, release)
                if file_worker is not None:
                    file_worker.update(file_hash, chunk, release)
            else:
                pool.release_now(idx)
            remaining -= n
            self.total += n

    def finish(self) -> None:
        """End of archive: two zero blocks, then pad to a whole record like GNU tar."""
        end = 2 * BLOCKSIZE
        end += -(self.total + end) % RECORDSIZE
        self.emit_small(bytes(end))

    def close(self) -> None:
        """Stop the hashing threads (all queued hashing done); re-raise a hashing error."""
        for worker in (self.file_worker, self.tar_worker):
            if worker is not None:
                worker.close()
