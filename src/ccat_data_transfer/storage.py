"""Storage backends: the one small interface every pipeline stage uses to touch data.

Stages never call ``open()``, ``os.remove()`` or boto3 directly on a data location; they
ask :func:`storage_for_location` for a :class:`Storage` and use its methods: read, write
(always atomic: a reader never sees a half-written object under its final name), stat,
list, delete (idempotent), usage and checksums.  Two backends exist:

* :class:`DiskStorage` - a directory tree on a POSIX filesystem.
* :class:`S3Storage` - a bucket (and optional key prefix) on an S3-compatible server.

Paths are always relative POSIX strings (``"primecam/2024/obs1/file.fits"``).  Absolute
paths and ``..`` components are refused with :class:`ValueError`, so a path can never
escape the location's root.  Errors are mapped onto a small hierarchy
(:class:`StorageError` and its subclasses) so callers can tell "disk full" or "server
unreachable" (retry later, maybe elsewhere) from "object missing".
"""

from __future__ import annotations

import abc
import contextlib
import errno
import hashlib
import io
import os
import shutil
import stat as stat_mod
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ccat_data_transfer.config.config import settings

__all__ = [
    "CHUNK_SIZE",
    "DiskStorage",
    "ObjectInfo",
    "ObjectNotFound",
    "S3Storage",
    "Storage",
    "StorageError",
    "StorageFullError",
    "StorageUnavailableError",
    "Usage",
    "is_temp_name",
    "normalize_path",
    "storage_for_location",
]

#: Read size for streaming copies and checksums.
CHUNK_SIZE = 8 * 1024 * 1024

_TEMP_MARK = ".tmp-"

# errno values that mean "no room left": a full filesystem or an exhausted quota.
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class StorageError(Exception):
    """A storage operation failed."""


class StorageFullError(StorageError):
    """The storage has no space left (ENOSPC, quota exceeded, S3 storage full)."""


class StorageUnavailableError(StorageError):
    """The storage cannot be reached: S3 server down, bucket or root directory missing."""


class ObjectNotFound(StorageError):
    """The requested object does not exist."""


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One stored object: relative path, size in bytes, modification time (epoch seconds)."""

    path: str
    size: int
    mtime: float


@dataclass(frozen=True, slots=True)
class Usage:
    """Space used by a storage.

    For :class:`DiskStorage` these are the figures of the whole *filesystem* holding the
    root (what ``df`` shows), which is what buffer thresholds are about; use
    :meth:`Storage.tree_bytes` for the bytes stored under the root itself.  For
    :class:`S3Storage`, ``used_bytes`` is the sum of object sizes under the prefix and
    ``total_bytes`` is ``None`` (S3 has no capacity to report).
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


def normalize_path(path: str, *, allow_empty: bool = False) -> str:
    """Check a relative POSIX path and return it normalised (no ``.``, no doubled ``/``).

    Raises ``ValueError`` for absolute paths, ``..`` components, NUL bytes and (unless
    ``allow_empty``) the empty path.  This is what keeps every operation inside the root.
    """
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str):
        raise TypeError(f"storage paths are str, not {type(path).__name__}")
    if "\x00" in path:
        raise ValueError(f"storage path contains a NUL byte: {path!r}")
    if path.startswith("/"):
        raise ValueError(f"storage paths must be relative, got absolute path {path!r}")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"storage path must not contain '..': {path!r}")
    norm = "/".join(parts)
    if not norm and not allow_empty:
        raise ValueError("storage path is empty")
    return norm


def is_temp_name(name: str) -> bool:
    """True for the temporary names that atomic writes use (``.name.tmp-<hex>``)."""
    base = name.rsplit("/", 1)[-1]
    return base.startswith(".") and _TEMP_MARK in base


def _temp_name(final_name: str) -> str:
    # Shortened so the temp name stays within NAME_MAX (255) for long final names.
    return f".{final_name[:200]}{_TEMP_MARK}{uuid.uuid4().hex}"


def _fadvise_sequential(fd: int) -> None:
    with contextlib.suppress(AttributeError, OSError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)


def _fsync_dir(directory: str | os.PathLike[str]) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS


def _buffer_size(f: Any, chunk: int) -> int:
    """A read buffer for the rest of ``f``: ``chunk`` at most, but no bigger than what is
    left of a regular file (in whole 64 KiB), so small files are not read through a
    freshly zeroed 8 MiB buffer.  Streams of unknown size get ``chunk``."""
    try:
        st = os.fstat(f.fileno())
        if not stat_mod.S_ISREG(st.st_mode):
            return chunk
        left = st.st_size - f.tell()
    except (AttributeError, OSError, ValueError):
        return chunk
    step = 64 * 1024
    return min(chunk, max(step, -(-left // step) * step))


def _copy_stream(src: BinaryIO, dst: BinaryIO, chunk: int = CHUNK_SIZE) -> int:
    """Copy ``src`` to ``dst`` with one reused buffer; returns bytes copied."""
    buf = bytearray(_buffer_size(src, chunk))
    mv = memoryview(buf)
    total = 0
    readinto = getattr(src, "readinto", None)
    while True:
        if readinto is not None:
            n = readinto(mv)
            if not n:
                break
            data = mv[:n]
        else:
            data = src.read(chunk)
            if not data:
                break
            n = len(data)
        dst.write(data)
        total += n
    return total


def _atomic_local_write(target: Path) -> contextlib.AbstractContextManager[BinaryIO]:
    """Atomic write to a local file (temp name in the same dir, fsync, rename, fsync dir)."""
    return _atomic_file(target.parent, target.name)


@contextlib.contextmanager
def _atomic_file(directory: Path, name: str) -> Iterator[BinaryIO]:
    tmp = directory / _temp_name(name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
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
        os.replace(tmp, directory / name)
        _fsync_dir(directory)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if _is_full(exc):
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

        Raises :class:`ObjectNotFound` when it does not exist.
        """

    @abc.abstractmethod
    def open_write(self, path: str) -> contextlib.AbstractContextManager[BinaryIO]:
        """Context manager yielding a writable binary stream; the object appears under
        ``path`` only when the block ends without an exception (atomic replace of any old
        object).  On an exception nothing is left behind and the exception propagates
        (``ENOSPC`` as :class:`StorageFullError`)."""

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
        """Space used (see :class:`Usage` for what the numbers mean per backend)."""

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

    def copy_in(self, local_file: str | os.PathLike[str], path: str) -> int:
        """Copy a local file into the storage (atomically); returns bytes copied."""
        with open(local_file, "rb", buffering=0) as src:
            _fadvise_sequential(src.fileno())
            with self.open_write(path) as dst:
                return _copy_stream(src, dst)  # type: ignore[arg-type]

    def copy_out(self, path: str, local_file: str | os.PathLike[str]) -> int:
        """Copy an object to a local file (written atomically); returns bytes copied."""
        target = Path(local_file)
        with self.open_read(path) as src, _atomic_local_write(target) as dst:
            return _copy_stream(src, dst)

    def sha256(self, path: str) -> str:
        """Hex SHA-256 of an object, streamed in 8 MiB reads."""
        h = hashlib.sha256()
        with self.open_read(path) as f:
            mv = memoryview(bytearray(_buffer_size(f, CHUNK_SIZE)))
            readinto = getattr(f, "readinto", None)
            while True:
                if readinto is not None:
                    n = readinto(mv)
                    if not n:
                        break
                    h.update(mv[:n])
                else:
                    data = f.read(CHUNK_SIZE)
                    if not data:
                        break
                    h.update(data)
        return h.hexdigest()


class DiskStorage(Storage):
    """A directory tree on a local or mounted filesystem.

    The root must exist (``create=True`` makes it): a missing root usually means an
    unmounted disk, and writing into the mount point would fill the wrong filesystem, so
    every operation raises :class:`StorageUnavailableError` instead.  Objects are regular
    files; :meth:`list` does not follow symlinks, and no path may resolve outside the root.
    """

    kind = "disk"

    def __init__(self, root: str | os.PathLike[str], *, create: bool = False) -> None:
        self.root = Path(root).expanduser().absolute()
        if create:
            self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"DiskStorage({str(self.root)!r})"

    def _check_root(self) -> str:
        real = os.path.realpath(self.root)
        if not os.path.isdir(real):
            raise StorageUnavailableError(f"storage root {self.root} does not exist")
        return real

    def _full(self, path: str) -> Path:
        """Absolute path for ``path``, checked to stay inside the root (also via symlinks)."""
        rel = normalize_path(path)
        real_root = self._check_root()
        full = os.path.join(real_root, rel)
        resolved = os.path.realpath(full)
        if resolved != real_root and not resolved.startswith(real_root + os.sep):
            raise ValueError(f"storage path {path!r} resolves outside the root {self.root}")
        return Path(full)

    def open_read(self, path: str) -> BinaryIO:
        full = self._full(path)
        try:
            f = open(full, "rb", buffering=CHUNK_SIZE)  # noqa: SIM115 - returned to caller
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"{path} not found in {self.root}") from exc
        except IsADirectoryError as exc:
            raise ObjectNotFound(f"{path} is a directory in {self.root}") from exc
        _fadvise_sequential(f.fileno())
        return f

    @contextlib.contextmanager
    def open_write(self, path: str) -> Iterator[BinaryIO]:
        full = self._full(path)
        try:
            full.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            if _is_full(exc):
                raise StorageFullError(f"no space left creating {full.parent}: {exc}") from exc
            raise
        # Re-check after mkdir: a directory component could be a symlink created meanwhile.
        self._full(path)
        with _atomic_file(full.parent, full.name) as f:
            yield f

    def stat(self, path: str) -> ObjectInfo | None:
        full = self._full(path)
        try:
            st = os.stat(full)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not stat_mod.S_ISREG(st.st_mode):
            return None
        return ObjectInfo(normalize_path(path), st.st_size, st.st_mtime)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        norm = normalize_path(prefix, allow_empty=True)
        # Keep a trailing "/" meaningful ("a/" must not match "ab").
        if prefix.endswith("/") and norm:
            norm += "/"
        real_root = self._check_root()
        # Walk only the deepest directory the prefix pins down, then filter by string.
        start_rel = norm.rsplit("/", 1)[0] if "/" in norm else ""
        start = os.path.join(real_root, start_rel) if start_rel else real_root
        real_start = os.path.realpath(start)
        if real_start != start or not os.path.isdir(start):
            # Missing, or reached through a symlink (which could lead out of the root).
            return
        stack = [(start, start_rel)]
        while stack:
            directory, rel_dir = stack.pop()
            try:
                with os.scandir(directory) as it:
                    entries = sorted(it, key=lambda e: e.name, reverse=True)
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in entries:
                rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                if entry.is_dir(follow_symlinks=False):
                    if is_temp_name(entry.name):
                        continue  # work area of an unfinished write or unpack
                    if rel.startswith(norm) or norm.startswith(rel + "/"):
                        stack.append((entry.path, rel))
                    continue
                if not entry.is_file(follow_symlinks=False) or is_temp_name(entry.name):
                    continue
                if not rel.startswith(norm):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                yield ObjectInfo(rel, st.st_size, st.st_mtime)

    def delete(self, path: str) -> bool:
        full = self._full(path)
        try:
            os.unlink(full)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except IsADirectoryError as exc:
            raise StorageError(f"{path} is a directory, not an object") from exc
        return True

    def usage(self) -> Usage:
        real_root = self._check_root()
        du = shutil.disk_usage(real_root)
        return Usage(used_bytes=du.used, total_bytes=du.total, free_bytes=du.free)

    def local_path(self, path: str) -> Path | None:
        return self._full(path)

    def copy_in(self, local_file: str | os.PathLike[str], path: str) -> int:
        if not hasattr(os, "copy_file_range"):
            return super().copy_in(local_file, path)
        with open(local_file, "rb", buffering=0) as src:
            _fadvise_sequential(src.fileno())
            with self.open_write(path) as dst:
                n = 0
                size = os.fstat(src.fileno()).st_size
                # copy_file_range keeps the bytes in the kernel (and lets filesystems
                # that can, share extents); falls back to a read/write loop.
                dst.flush()
                try:
                    while n < size:
                        done = os.copy_file_range(src.fileno(), dst.fileno(), size - n)
                        if done == 0:
                            break
                        n += done
                except OSError as exc:
                    if _is_full(exc):
                        raise
                    if n:
                        raise
                    return _copy_stream(src, dst)  # type: ignore[arg-type]
                # The file may have grown since fstat: copy whatever remains.
                return n + _copy_stream(src, dst)  # type: ignore[arg-type]


# --- S3 ---------------------------------------------------------------------------------

# S3 error codes that mean "the server is out of space" (MinIO, Ceph RGW).
_S3_FULL_CODES = {"XMinioStorageFull", "QuotaExceeded", "StorageFull", "InsufficientStorage"}
_S3_MISSING_BUCKET = {"NoSuchBucket"}
_S3_NOT_FOUND = {"NoSuchKey", "404", "NotFound", "NoSuchUpload"}

# First multipart part size; it doubles every 1000 parts so that an object of any size up
# to several TB fits in S3's 10,000 part limit while small objects use little memory.
_S3_PART_SIZE = 8 * 1024 * 1024
_S3_MAX_PART_SIZE = 512 * 1024 * 1024


_client_lock = threading.Lock()
_client_cache: dict[tuple[Any, ...], Any] = {}
_boto_session: Any = None


def _s3_client(
    endpoint_url: str | None,
    access_key: str | None,
    secret_key: str | None,
    region: str | None,
) -> Any:
    """A boto3 S3 client, shared per (process, endpoint, credentials, region).

    Building a client loads botocore's service model (tens of milliseconds or more);
    clients are thread-safe, so one per configuration is reused.  The process id is part
    of the key so that forked Celery workers do not share connection pools.
    """
    global _boto_session
    key = (os.getpid(), endpoint_url or None, access_key, secret_key, region)
    client = _client_cache.get(key)
    if client is not None:
        return client
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=5,
        read_timeout=60,
        retries={"max_attempts": 3, "mode": "standard"},
        s3={"addressing_style": "path"},
        tcp_keepalive=True,
    )
    # boto3 sessions are not thread-safe: create clients under a lock.
    with _client_lock:
        client = _client_cache.get(key)
        if client is None:
            if _boto_session is None or _boto_session[0] != os.getpid():
                _boto_session = (os.getpid(), boto3.session.Session())
            client = _boto_session[1].client(
                "s3",
                endpoint_url=endpoint_url or None,
                aws_access_key_id=access_key or None,
                aws_secret_access_key=secret_key or None,
                region_name=region or None,
                config=config,
            )
            _client_cache[key] = client
    return client


class S3Storage(Storage):
    """A bucket (optionally a key prefix inside it) on an S3-compatible server.

    Credentials default to the settings ``S3_ACCESS_KEY_ID``, ``S3_SECRET_ACCESS_KEY`` and
    ``S3_REGION`` (set from the environment, never stored in the database).  The client
    gives up quickly (5 s connect timeout, 3 attempts) so an unreachable server surfaces as
    :class:`StorageUnavailableError` instead of hanging a worker.
    """

    kind = "s3"

    def __init__(
        self,
        endpoint_url: str | None,
        bucket: str,
        prefix: str = "",
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str | None = None,
    ) -> None:
        if not bucket:
            raise ValueError("S3Storage needs a bucket name")
        self.endpoint_url = endpoint_url
        self.bucket = bucket
        self.prefix = normalize_path(prefix, allow_empty=True)
        if access_key is None:
            access_key = str(settings.get("S3_ACCESS_KEY_ID", "") or "") or None
        if secret_key is None:
            secret_key = str(settings.get("S3_SECRET_ACCESS_KEY", "") or "") or None
        if region is None:
            region = str(settings.get("S3_REGION", "") or "") or None
        self.region = region
        self.client = _s3_client(endpoint_url, access_key, secret_key, region)

    def __repr__(self) -> str:
        return f"S3Storage({self.endpoint_url!r}, {self.bucket!r}, prefix={self.prefix!r})"

    def _key(self, path: str) -> str:
        rel = normalize_path(path)
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def _where(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key} at {self.endpoint_url or 'AWS'}"

    def _map_error(self, exc: Exception, key: str = "") -> StorageError:
        """Translate a botocore exception into our hierarchy."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionClosedError,
            ConnectionError,
            EndpointConnectionError,
            NoCredentialsError,
            ReadTimeoutError,
        )

        where = self._where(key)
        if isinstance(
            exc,
            EndpointConnectionError | ConnectionError | ConnectionClosedError | ReadTimeoutError,
        ):
            return StorageUnavailableError(f"S3 server unreachable for {where}: {exc}")
        if isinstance(exc, NoCredentialsError):
            return StorageError(f"no S3 credentials configured for {where}")
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _S3_MISSING_BUCKET:
                return StorageUnavailableError(f"bucket {self.bucket!r} does not exist ({where})")
            if code in _S3_NOT_FOUND or status == 404:
                return ObjectNotFound(f"{where} not found")
            if code in _S3_FULL_CODES or status == 507:
                return StorageFullError(f"S3 storage full writing {where}: {code}")
            if status is not None and status >= 500:
                return StorageUnavailableError(f"S3 server error {status} {code} for {where}")
            return StorageError(f"S3 error {code or status} for {where}: {err.get('Message', '')}")
        if isinstance(exc, BotoCoreError):
            return StorageError(f"S3 client error for {where}: {exc}")
        if isinstance(exc, OSError) and _is_full(exc):
            return StorageFullError(f"no space left for {where}: {exc}")
        return StorageError(f"S3 operation failed for {where}: {exc}")

    @contextlib.contextmanager
    def _errors(self, key: str = "") -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except (BotoCoreError, ClientError) as exc:
            raise self._map_error(exc, key) from exc

    def open_read(self, path: str) -> BinaryIO:
        key = self._key(path)
        with self._errors(key):
            resp = self.client.get_object(Bucket=self.bucket, Key=key)
        raw = _S3Reader(resp["Body"], self, key)
        return io.BufferedReader(raw, buffer_size=CHUNK_SIZE)  # type: ignore[return-value]

    @contextlib.contextmanager
    def open_write(self, path: str) -> Iterator[BinaryIO]:
        key = self._key(path)
        writer = _S3Writer(self, key)
        try:
            yield writer  # type: ignore[misc]
            writer.finish()
        except BaseException as exc:
            writer.abort()
            if isinstance(exc, StorageError):
                raise
            from botocore.exceptions import BotoCoreError, ClientError

            if isinstance(exc, BotoCoreError | ClientError):
                raise self._map_error(exc, key) from exc
            if _is_full(exc):
                raise StorageFullError(f"no space left writing {self._where(key)}") from exc
            raise

    def stat(self, path: str) -> ObjectInfo | None:
        key = self._key(path)
        try:
            with self._errors(key):
                resp = self.client.head_object(Bucket=self.bucket, Key=key)
        except ObjectNotFound:
            # HEAD has no error body, so a missing bucket is a bare 404 too; a vanished
            # bucket must not look like a lost object.
            self._check_bucket()
            return None
        return ObjectInfo(
            normalize_path(path), int(resp["ContentLength"]), resp["LastModified"].timestamp()
        )

    def _check_bucket(self) -> None:
        try:
            with self._errors():
                self.client.head_bucket(Bucket=self.bucket)
        except ObjectNotFound as exc:
            raise StorageUnavailableError(
                f"bucket {self.bucket!r} does not exist at {self.endpoint_url or 'AWS'}"
            ) from exc

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        norm = normalize_path(prefix, allow_empty=True)
        if prefix.endswith("/") and norm:
            norm += "/"
        base = f"{self.prefix}/" if self.prefix else ""
        paginator = self.client.get_paginator("list_objects_v2")
        with self._errors(base + norm):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=base + norm):
                for obj in page.get("Contents", ()):
                    rel = obj["Key"][len(base) :]
                    if not rel or rel.endswith("/") or is_temp_name(rel):
                        continue
                    yield ObjectInfo(rel, int(obj["Size"]), obj["LastModified"].timestamp())

    def delete(self, path: str) -> bool:
        key = self._key(path)
        # S3 DELETE succeeds for missing keys, so ask first to report what happened.
        existed = self.stat(path) is not None
        if existed:
            with self._errors(key):
                self.client.delete_object(Bucket=self.bucket, Key=key)
        return existed

    def usage(self) -> Usage:
        return Usage(used_bytes=self.tree_bytes(), total_bytes=None, free_bytes=None)

    def local_path(self, path: str) -> Path | None:
        normalize_path(path)
        return None

    def copy_in(self, local_file: str | os.PathLike[str], path: str) -> int:
        from boto3.s3.transfer import TransferConfig

        key = self._key(path)
        size = os.path.getsize(local_file)
        config = TransferConfig(
            multipart_threshold=64 * 1024 * 1024,
            multipart_chunksize=max(64 * 1024 * 1024, -(-size // 9000)),
            max_concurrency=4,
        )
        # upload_file aborts the multipart upload on failure: no partial object appears.
        with self._errors(key):
            self.client.upload_file(str(local_file), self.bucket, key, Config=config)
        return size


class _S3Reader(io.RawIOBase):
    """Raw stream over a GetObject body, mapping connection errors to StorageError."""

    def __init__(self, body: Any, storage: S3Storage, key: str) -> None:
        super().__init__()
        self._body = body
        self._storage = storage
        self._key = key

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:  # type: ignore[override]
        from botocore.exceptions import BotoCoreError

        try:
            data = self._body.read(len(b))
        except (BotoCoreError, OSError) as exc:
            raise self._storage._map_error(exc, self._key) from exc
        n = len(data)
        b[:n] = data
        return n

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(Exception):
                self._body.close()
        super().close()


class _S3Writer(io.RawIOBase):
    """Streams writes into a multipart upload; small objects become a single PUT.

    Nothing is visible under the key until :meth:`finish` completes the upload;
    :meth:`abort` throws the parts away.
    """

    def __init__(self, storage: S3Storage, key: str) -> None:
        super().__init__()
        self._s = storage
        self._key = key
        self._buf = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._done = False
        self.bytes_written = 0

    def writable(self) -> bool:
        return True

    def _part_size(self) -> int:
        return min(_S3_MAX_PART_SIZE, _S3_PART_SIZE << (len(self._parts) // 1000))

    def write(self, b: Any) -> int:  # type: ignore[override]
        if self._done:
            raise ValueError("write to a finished S3 upload")
        n = memoryview(b).nbytes
        self._buf += b
        self.bytes_written += n
        while len(self._buf) >= self._part_size():
            size = self._part_size()
            self._upload_part(bytes(self._buf[:size]))
            del self._buf[:size]
        return n

    def _upload_part(self, data: bytes) -> None:
        c, bucket, key = self._s.client, self._s.bucket, self._key
        with self._s._errors(key):
            if self._upload_id is None:
                self._upload_id = c.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
            number = len(self._parts) + 1
            resp = c.upload_part(
                Bucket=bucket, Key=key, UploadId=self._upload_id, PartNumber=number, Body=data
            )
        self._parts.append({"PartNumber": number, "ETag": resp["ETag"]})

    def finish(self) -> None:
        c, bucket, key = self._s.client, self._s.bucket, self._key
        if self._upload_id is None:
            with self._s._errors(key):
                c.put_object(Bucket=bucket, Key=key, Body=bytes(self._buf))
        else:
            if self._buf:
                self._upload_part(bytes(self._buf))
            with self._s._errors(key):
                c.complete_multipart_upload(
                    Bucket=bucket,
                    Key=key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": self._parts},
                )
        self._buf = bytearray()
        self._done = True
        super().close()

    def abort(self) -> None:
        self._buf = bytearray()
        if self._upload_id is not None and not self._done:
            with contextlib.suppress(Exception):
                self._s.client.abort_multipart_upload(
                    Bucket=self._s.bucket, Key=self._key, UploadId=self._upload_id
                )
        self._done = True
        super().close()

    def close(self) -> None:
        # Closing inside the with-block must not publish or discard: the context manager
        # decides.  Only mark the stream closed for further writes.
        pass


# --- factory ----------------------------------------------------------------------------


def _storage_type_name(location: Any) -> str:
    st = getattr(location, "storage_type", None)
    if st is None:
        raise StorageError(f"location {getattr(location, 'name', location)!r} has no storage_type")
    name = getattr(st, "name", st)
    return str(name).upper()


def storage_for_location(location: Any) -> Storage:
    """The :class:`Storage` for a DataLocation (duck-typed: any object with the same
    attributes works).

    DISK locations use ``path`` (a relative path is taken relative to the configured
    ``DATA_DIR``); S3 locations use ``endpoint_url`` (or ``endpoint``), ``bucket`` and
    ``prefix``, with credentials from the settings.
    """
    kind = _storage_type_name(location)
    label = getattr(location, "name", None) or repr(location)
    if kind == "DISK":
        path = getattr(location, "path", None)
        if not path:
            raise StorageError(f"disk location {label!r} has no path")
        root = Path(str(path)).expanduser()
        if not root.is_absolute():
            from ccat_data_transfer.config.config import data_dir

            root = data_dir() / root
        return DiskStorage(root)
    if kind == "S3":
        endpoint = getattr(location, "endpoint_url", None) or getattr(location, "endpoint", None)
        bucket = getattr(location, "bucket", None) or getattr(location, "bucket_name", None)
        if not bucket:
            raise StorageError(f"S3 location {label!r} has no bucket")
        return S3Storage(
            endpoint_url=endpoint or None,
            bucket=str(bucket),
            prefix=str(getattr(location, "prefix", "") or ""),
            region=getattr(location, "region", None) or None,
        )
    if kind == "TAPE":
        raise StorageError(
            f"tape locations are not supported by this backend yet (location {label!r}); "
            "use a DISK or S3 location, or front the tape system with a disk cache location"
        )
    raise StorageError(f"unknown storage type {kind!r} for location {label!r}")
