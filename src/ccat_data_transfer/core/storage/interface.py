"""The storage interface every pipeline stage uses to touch data, and its atomic writes.

Stages never call ``open()``, ``os.remove()`` or boto3 directly on a data location; they ask
:func:`~ccat_data_transfer.core.storage.storage_for_location` for a
:class:`~ccat_data_transfer.core.storage.Storage` and use its methods: read, write (always
atomic: a reader never sees a half-written object under its final name), stat, list, delete
(idempotent), usage and checksums.  The backends are
:class:`~ccat_data_transfer.core.storage.disk.DiskStorage` and
:class:`~ccat_data_transfer.core.storage.s3.S3Storage`.

Paths are always relative POSIX strings (``"primecam/2024/obs1/file.fits"``).  Absolute
paths and ``..`` components are refused with :class:`ValueError`, so a path can never escape
the location's root.  Errors are mapped onto a small hierarchy
(:class:`~ccat_data_transfer.core.storage.StorageError` and its subclasses) so callers can tell
"disk full" or "server unreachable" (retry later, maybe elsewhere) from "object missing".

This module also holds the local atomic write (temporary name in the same directory,
fsync, rename, fsync of the directory) that the disk backend and ``copy_out`` use.

Room in the house: core.  Imports the standard library and
:mod:`ccat_data_transfer.core.fileio` only; the backends import this module.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import io
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ccat_data_transfer.core.fileio import (
    COPY_BUFSIZE,
    COPY_METHODS,
    TEMP_MARK,
    PathErrors,
    buffer_size,
    clean_relative_path,
    fadvise_sequential,
    file_size,
    fit_name,
    fsync_dir,
    is_temporary_name,
)
from ccat_data_transfer.core.storage.errors import StorageFullError, is_full

__all__ = [
    "CHUNK_SIZE",
    "ObjectInfo",
    "Storage",
    "Usage",
    "copy_stream",
    "TEMP_NAME_ROOM",
    "is_temp_name",
    "normalize_path",
    "read_chunks",
    "temporary_name",
    "temporary_prefix",
    "work_dir_prefix",
]

#: Read size for streaming copies and checksums (measured: bench/buffer_curve.py).
CHUNK_SIZE = COPY_BUFSIZE

#: Bytes of a final name kept in its temporary names (``.<name>.tmp-<32 hex>`` must fit
#: the 255-byte file name limit); longer names are cut with a hash suffix (``fit_name``).
TEMP_NAME_ROOM = 200


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One stored object: relative path, size in bytes, modification time (epoch seconds)."""

    path: str
    size: int
    mtime: float


@dataclass(frozen=True, slots=True)
class Usage:
    """Space used by a storage.

    For :class:`~ccat_data_transfer.core.storage.DiskStorage` these are the figures of the whole
    *filesystem* holding the root (what ``df`` shows), which is what buffer thresholds are
    about; use :meth:`Storage.tree_bytes` for the bytes stored under the root itself.  For
    :class:`~ccat_data_transfer.core.storage.S3Storage`, ``used_bytes`` is the sum of object
    sizes under the prefix and ``total_bytes`` is ``None`` (S3 has no capacity to report).
    """

    used_bytes: int
    total_bytes: int | None
    free_bytes: int | None = None

    @property
    def percent_used(self) -> float | None:
        """Used space as a percentage of the total, or ``None`` when there is no total."""
        if not self.total_bytes:
            return None
        return 100.0 * self.used_bytes / self.total_bytes


_PATH_ERRORS = PathErrors(
    nul="storage path contains a NUL byte: {path!r}",
    absolute="storage paths must be relative, got absolute path {path!r}",
    dotdot="storage path must not contain '..': {path!r}",
)


def normalize_path(path: str, *, allow_empty: bool = False) -> str:
    """Check a relative POSIX path and return it normalised (no ``.``, no doubled ``/``).

    Raises ``ValueError`` for absolute paths, ``..`` components, NUL bytes and (unless
    ``allow_empty``) the empty path.  This is what keeps every operation inside the root.
    """
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str):
        raise TypeError(f"storage paths are str, not {type(path).__name__}")
    norm = clean_relative_path(path, _PATH_ERRORS)
    if not norm and not allow_empty:
        raise ValueError("storage path is empty")
    return norm


def is_temp_name(name: str) -> bool:
    """True when the last component of ``name`` is temporary (the names that atomic
    writes use, ``.name.tmp-<hex>``): :func:`~ccat_ops_db.names.is_temporary_name`
    on it.  A path *under* a temporary folder: ``temporary_component``."""
    return is_temporary_name(name.rsplit("/", 1)[-1])


def temporary_name(final_name: str, suffix: str) -> str:
    """The temporary sibling name ``.<final_name>.tmp-<suffix>`` of one file name, the
    final name cut (with a hash of all of it) so the result fits the 255-byte limit."""
    return f".{fit_name(final_name, TEMP_NAME_ROOM)}{TEMP_MARK}{suffix}"


def temporary_prefix(final_path: str) -> str:
    """What every temporary name of ``final_path`` (a relative path) starts with: the
    janitor knows a write in progress of that path by it."""
    head, _, tail = final_path.rpartition("/")
    name = temporary_name(tail, "")
    return f"{head}/{name}" if head else name


def work_dir_prefix(tag: str) -> str:
    """The name prefix of a work folder at a location's root (``.unpack.tmp-<tag>-``): the
    tag names the row doing the work, so the janitor knows the folder of live work."""
    return f".unpack{TEMP_MARK}{tag}-"


def _temp_name(final_name: str) -> str:
    return temporary_name(final_name, uuid.uuid4().hex)


def _buffer_size(f: Any, chunk: int) -> int:
    """A read buffer for the rest of ``f``: ``chunk`` at most, but no bigger than what is
    left of a regular file (in whole 64 KiB), so small files are not read through a
    freshly zeroed buffer of the full size.  Streams of unknown size get ``chunk``."""
    size = file_size(f)
    if size is None:
        return chunk
    try:
        left = size - f.tell()
    except (AttributeError, OSError, ValueError):
        return chunk
    return buffer_size(left, chunk)


def read_chunks(src: BinaryIO, chunk: int = CHUNK_SIZE) -> Iterator[memoryview | bytes]:
    """The rest of ``src`` in pieces, read into one reused buffer where the stream can
    (``readinto``); each piece is valid only until the next one is asked for."""
    readinto = getattr(src, "readinto", None)
    if readinto is None:
        while data := src.read(chunk):
            yield data
        return
    mv = memoryview(bytearray(_buffer_size(src, chunk)))
    while n := readinto(mv):
        yield mv[:n]


def copy_stream(
    src: BinaryIO, dst: BinaryIO, chunk: int = CHUNK_SIZE, *, rate_limit: float = 0.0
) -> int:
    """Copy ``src`` to ``dst`` through one reused buffer; returns bytes copied.
    ``rate_limit`` (bytes per second, 0: none) paces the copy, as a slow link would."""
    total = 0
    started = time.monotonic()
    for data in read_chunks(src, chunk):
        dst.write(data)
        total += len(data)
        if rate_limit > 0:
            ahead = total / rate_limit - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
    return total


def _atomic_local_write(target: Path) -> contextlib.AbstractContextManager[BinaryIO]:
    """Atomic write to a local file (temp name in the same dir, fsync, rename, fsync dir)."""
    return atomic_file(target.parent, target.name)


@contextlib.contextmanager
def atomic_file(directory: Path, name: str, *, dir_fd: int | None = None) -> Iterator[BinaryIO]:
    """Write ``directory/name`` through a temporary name (fsync, rename, fsync the
    folder).  With ``dir_fd`` (the folder opened without following symlinks, see
    :func:`~ccat_data_transfer.core.fileio.open_dir_beneath`) every step is relative to
    it; ``directory`` then only names the folder in messages."""
    tmp_name = _temp_name(name)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    if dir_fd is None:
        tmp: str | Path = directory / tmp_name
        fd = os.open(tmp, flags, 0o644)
    else:
        tmp = tmp_name
        fd = os.open(tmp, flags, 0o644, dir_fd=dir_fd)
    raw = _FdWriter(fd)
    f = io.BufferedWriter(raw, buffer_size=1024 * 1024)
    try:
        try:
            yield f  # type: ignore[misc]
            f.flush()
            os.fsync(fd)
        finally:
            # Closing flushes; if the body failed we are discarding the data anyway.
            with contextlib.suppress(OSError):
                f.close()
            if not raw.closed:
                raw.close()
        if dir_fd is None:
            os.replace(tmp, directory / name)
            fsync_dir(directory)
        else:
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            os.fsync(dir_fd)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        if is_full(exc):
            raise StorageFullError(f"no space left writing {directory / name}: {exc}") from exc
        raise


class _FdWriter(io.RawIOBase):
    """Unbuffered writer on a file descriptor.

    Writes go through ``os.write`` so that every OS-level write error (ENOSPC, EIO) comes
    back to us as an ``OSError`` we can map; ``io.BufferedWriter`` on top handles short
    writes and small-write batching.
    """

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def write(self, b: Any) -> int:  # type: ignore[override]
        return os.write(self._fd, b)

    def close(self) -> None:
        if not self.closed:
            try:
                os.close(self._fd)
            finally:
                super().close()


class Storage(abc.ABC):
    """One data location's storage: the operations every stage needs, nothing more."""

    #: Short backend name for messages and logs ("disk", "s3").
    kind: str = "abstract"

    # --- primitives each backend implements -------------------------------------------

    @abc.abstractmethod
    def open_read(self, path: str) -> BinaryIO:
        """Open an object for reading; use as a context manager.

        Raises :class:`~ccat_data_transfer.core.storage.ObjectNotFound` when it does not exist.
        """

    @abc.abstractmethod
    def open_write(self, path: str) -> contextlib.AbstractContextManager[BinaryIO]:
        """Context manager yielding a writable binary stream; the object appears under
        ``path`` only when the block ends without an exception (atomic replace of any old
        object).  On an exception nothing is left behind and the exception propagates
        (``ENOSPC`` as :class:`~ccat_data_transfer.core.storage.StorageFullError`)."""

    @abc.abstractmethod
    def stat(self, path: str) -> ObjectInfo | None:
        """Size and mtime of an object, or ``None`` if it does not exist."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """All objects whose relative path starts with ``prefix`` (recursive, string prefix
        as in S3).  Temporary files of unfinished writes (and, on disk, temporary work
        directories such as ``.unpack.tmp-*``) are skipped.  Order unspecified."""

    @abc.abstractmethod
    def delete(self, path: str) -> bool:
        """Remove an object.  Idempotent: returns ``False`` when there was nothing to remove."""

    @abc.abstractmethod
    def usage(self) -> Usage:
        """Space used (see :class:`~ccat_data_transfer.core.storage.Usage` for what the numbers
        mean per backend)."""

    @abc.abstractmethod
    def local_path(self, path: str) -> Path | None:
        """The object's real filesystem path, or ``None`` if the backend is not local."""

    # --- helpers built on the primitives ----------------------------------------------

    def exists(self, path: str) -> bool:
        """True if the object exists."""
        return self.stat(path) is not None

    def tree_bytes(self, prefix: str = "") -> int:
        """Sum of the sizes of all objects under ``prefix`` (walks everything: slow on
        big trees; prefer :meth:`usage` for threshold checks)."""
        return sum(info.size for info in self.list(prefix))

    def copy_in(
        self,
        local_file: str | os.PathLike[str],
        path: str,
        *,
        methods: tuple[str, ...] = COPY_METHODS,
    ) -> int:
        """Copy a local file into the storage (atomically: temporary name, fsync, rename);
        returns bytes copied.  ``methods`` (of ``fileio.COPY_METHODS``)
        are the ways a local backend may move the bytes, fastest first; a backend that
        cannot use them streams through one reused buffer."""
        with open(local_file, "rb", buffering=0) as src:
            fadvise_sequential(src.fileno())
            with self.open_write(path) as dst:
                return self._copy_open_file(src, dst, methods)

    def _copy_open_file(self, src: BinaryIO, dst: BinaryIO, methods: tuple[str, ...]) -> int:
        """The byte-moving step of :meth:`copy_in`: one reused buffer here; a local backend
        overrides it to let the kernel move the bytes by ``methods``."""
        return copy_stream(src, dst)  # type: ignore[arg-type]

    def copy_out(self, path: str, local_file: str | os.PathLike[str]) -> int:
        """Copy an object to a local file (written atomically); returns bytes copied."""
        target = Path(local_file)
        with self.open_read(path) as src, _atomic_local_write(target) as dst:
            return copy_stream(src, dst)

    def sha256(self, path: str, *, reread: bool = False) -> str:
        """Hex SHA-256 of an object, streamed through one reused buffer of CHUNK_SIZE.

        A backend that stores each object's SHA-256 when writing it (S3: the object
        metadata ``sha256``) answers from that record unless ``reread``; a fixity check
        (bytes at rest still what they were) passes ``reread=True``.  Disk always reads.
        """
        h = hashlib.sha256()
        with self.open_read(path) as f:
            for data in read_chunks(f, CHUNK_SIZE):
                h.update(data)
        return h.hexdigest()
