"""The S3 backend: a :class:`~ccat_data_transfer.core.storage.interface.Storage` on a bucket
(and optional key prefix) of an S3-compatible server, through boto3.

Writes stream into a multipart upload that becomes visible only when complete; botocore
errors are mapped onto the storage error hierarchy (unreachable, full, missing).

Every object written here carries its SHA-256, computed while the bytes stream (no second
read): as the S3 API's ``ChecksumSHA256`` (which the server checks on receipt; for a
multipart upload it is S3's *composite* checksum, a SHA-256 of the parts' SHA-256s) and,
always, as the object metadata ``sha256`` (``x-amz-meta-sha256``: the hex digest of the
whole object).  A multipart upload gets its metadata by a server-side copy onto itself
once complete (the metadata of an S3 object cannot be set later any other way).
:meth:`S3Storage.sha256` answers from that metadata with one HEAD request unless asked to
re-read the bytes.

Room in the house: core.  Imports :mod:`ccat_data_transfer.core.storage.interface` and the
settings (credentials) only.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from ccat_data_transfer.core.config import settings
from ccat_data_transfer.core.errors import ConfigurationError
from ccat_data_transfer.core.fileio import temporary_component
from ccat_data_transfer.core.storage import errors
from ccat_data_transfer.core.storage.interface import (
    CHUNK_SIZE,
    ObjectInfo,
    Storage,
    Usage,
    normalize_path,
)

__all__ = ["SHA256_METADATA_KEY", "S3Storage", "upload_key"]

# S3 error codes that mean "the server is out of space" (MinIO, Ceph RGW).
_S3_FULL_CODES = {"XMinioStorageFull", "QuotaExceeded", "StorageFull", "InsufficientStorage"}
_S3_MISSING_BUCKET = {"NoSuchBucket"}
_S3_NOT_FOUND = {"NoSuchKey", "404", "NotFound", "NoSuchUpload"}

# How list_temporary names an unfinished multipart upload: ``<path>#upload=<id>``.
_UPLOAD_MARK = "#upload="


def upload_key(temporary: str) -> str:
    """The object path an unfinished upload listed by :meth:`S3Storage.list_temporary`
    (``<path>#upload=<id>``) was writing; any other name unchanged."""
    return temporary.partition(_UPLOAD_MARK)[0]


# First multipart part size; it doubles every 1000 parts so that an object of any size up
# to several TB fits in S3's 10,000 part limit while small objects use little memory.
_S3_PART_SIZE = 8 * 1024 * 1024
_S3_MAX_PART_SIZE = 512 * 1024 * 1024
# Largest object a single CopyObject may copy (bigger ones are copied in parts).
_S3_MAX_COPY_SIZE = 5 * 1024**3
# The object metadata key holding the whole object's hex SHA-256 (x-amz-meta-sha256).
SHA256_METADATA_KEY = "sha256"
_HEX_SHA256 = re.compile(r"[0-9a-f]{64}")


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
    :class:`~ccat_data_transfer.core.storage.errors.StorageUnavailableError` instead of
    hanging a worker.
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
        if bool(access_key) != bool(secret_key):
            given, missing = (
                ("S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY")
                if access_key
                else ("S3_SECRET_ACCESS_KEY", "S3_ACCESS_KEY_ID")
            )
            raise ConfigurationError(
                f"S3 credentials incomplete for bucket {bucket!r}: {given} is set but "
                f"{missing} is empty (set both, or neither to use the AWS defaults)"
            )
        self.region = region
        self.client = _s3_client(endpoint_url, access_key, secret_key, region)

    def __repr__(self) -> str:
        return f"S3Storage({self.endpoint_url!r}, {self.bucket!r}, prefix={self.prefix!r})"

    def _key(self, path: str) -> str:
        rel = normalize_path(path)
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def _where(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key} at {self.endpoint_url or 'AWS'}"

    def _map_error(self, exc: Exception, key: str = "") -> errors.StorageError:
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
            return errors.StorageUnavailableError(f"S3 server unreachable for {where}: {exc}")
        if isinstance(exc, NoCredentialsError):
            return errors.StorageError(f"no S3 credentials configured for {where}")
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _S3_MISSING_BUCKET:
                return errors.StorageUnavailableError(
                    f"bucket {self.bucket!r} does not exist ({where})"
                )
            if code in _S3_NOT_FOUND or status == 404:
                return errors.ObjectNotFound(f"{where} not found")
            if code in _S3_FULL_CODES or status == 507:
                return errors.StorageFullError(f"S3 storage full writing {where}: {code}")
            if status is not None and status >= 500:
                return errors.StorageUnavailableError(
                    f"S3 server error {status} {code} for {where}"
                )
            return errors.StorageError(
                f"S3 error {code or status} for {where}: {err.get('Message', '')}"
            )
        if isinstance(exc, BotoCoreError):
            return errors.StorageError(f"S3 client error for {where}: {exc}")
        if isinstance(exc, OSError) and errors.is_full(exc):
            return errors.StorageFullError(f"no space left for {where}: {exc}")
        return errors.StorageError(f"S3 operation failed for {where}: {exc}")

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
            if isinstance(exc, errors.StorageError):
                raise
            from botocore.exceptions import BotoCoreError, ClientError

            if isinstance(exc, BotoCoreError | ClientError):
                raise self._map_error(exc, key) from exc
            if errors.is_full(exc):
                raise errors.StorageFullError(f"no space left writing {self._where(key)}") from exc
            raise

    def stat(self, path: str) -> ObjectInfo | None:
        key = self._key(path)
        try:
            with self._errors(key):
                resp = self.client.head_object(Bucket=self.bucket, Key=key)
        except errors.ObjectNotFound:
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
        except errors.ObjectNotFound as exc:
            raise errors.StorageUnavailableError(
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
                    # As on disk: nothing under a temporary name is listed.
                    if not rel or rel.endswith("/") or temporary_component(rel):
                        continue
                    yield ObjectInfo(rel, int(obj["Size"]), obj["LastModified"].timestamp())

    def list_temporary(self) -> Iterator[ObjectInfo]:
        """Multipart uploads never completed nor aborted (a killed writer's leftovers):
        ``path`` is ``<key>#upload=<upload id>``, ``size`` the bytes of its parts and
        ``mtime`` its last activity (newest part, else its start)."""
        base = f"{self.prefix}/" if self.prefix else ""
        paginator = self.client.get_paginator("list_multipart_uploads")
        with self._errors(base):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=base):
                for up in page.get("Uploads", ()):
                    key, upload_id = up["Key"], up["UploadId"]
                    parts = self._upload_parts(key, upload_id)
                    changed = max(
                        [up["Initiated"].timestamp()]
                        + [p["LastModified"].timestamp() for p in parts]
                    )
                    size = sum(int(p["Size"]) for p in parts)
                    yield ObjectInfo(f"{key[len(base) :]}{_UPLOAD_MARK}{upload_id}", size, changed)

    def remove_temporary(self, path: str) -> int:
        """Abort one multipart upload found by :meth:`list_temporary`; returns the bytes
        of its parts.  Refuses a path that names no upload (an object is never touched)."""
        rel, mark, upload_id = path.partition(_UPLOAD_MARK)
        if not mark or not upload_id:
            raise ValueError(f"{path!r} names no multipart upload; the janitor never removes it")
        key = self._key(rel)
        with self._errors(key):
            parts = self._upload_parts(key, upload_id)
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        return sum(int(p["Size"]) for p in parts)

    def _upload_parts(self, key: str, upload_id: str) -> list[dict[str, Any]]:
        pages = self.client.get_paginator("list_parts").paginate(
            Bucket=self.bucket, Key=key, UploadId=upload_id
        )
        return [part for page in pages for part in page.get("Parts", ())]

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

    def stored_sha256(self, path: str) -> str | None:
        """The hex SHA-256 recorded in the object's metadata when it was written (one HEAD
        request, no bytes read), or ``None`` for an object written without it."""
        key = self._key(path)
        with self._errors(key):
            resp = self.client.head_object(Bucket=self.bucket, Key=key)
        value = str(resp.get("Metadata", {}).get(SHA256_METADATA_KEY, "")).strip().lower()
        return value if _HEX_SHA256.fullmatch(value) else None

    def sha256(self, path: str, *, reread: bool = False) -> str:
        """The object's hex SHA-256: from its metadata (:meth:`stored_sha256`) unless
        ``reread`` or the object has none, else by reading every byte."""
        if not reread:
            stored = self.stored_sha256(path)
            if stored is not None:
                return stored
        return super().sha256(path)

    # copy_in is the interface's streaming copy through open_write, which hashes the bytes
    # as they go (a parallel upload_file would need a second read for the SHA-256).


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
        self._hash = hashlib.sha256()
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
        self._hash.update(b)
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
                self._upload_id = c.create_multipart_upload(
                    Bucket=bucket, Key=key, ChecksumAlgorithm="SHA256"
                )["UploadId"]
            number = len(self._parts) + 1
            checksum = _b64(hashlib.sha256(data).digest())
            resp = c.upload_part(
                Bucket=bucket,
                Key=key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=data,
                ChecksumSHA256=checksum,
            )
        self._parts.append({"PartNumber": number, "ETag": resp["ETag"], "ChecksumSHA256": checksum})

    def finish(self) -> None:
        c, bucket, key = self._s.client, self._s.bucket, self._key
        metadata = {SHA256_METADATA_KEY: self._hash.hexdigest()}
        if self._upload_id is None:
            with self._s._errors(key):
                c.put_object(
                    Bucket=bucket,
                    Key=key,
                    Body=bytes(self._buf),
                    ChecksumAlgorithm="SHA256",
                    ChecksumSHA256=_b64(self._hash.digest()),
                    Metadata=metadata,
                )
        else:
            if self._buf:
                self._upload_part(bytes(self._buf))
            with self._s._errors(key):
                done = c.complete_multipart_upload(
                    Bucket=bucket,
                    Key=key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": self._parts},
                )
                self._done = True  # published: nothing left to abort
                self._set_metadata(done["ETag"], metadata)
        self._buf = bytearray()
        self._done = True
        super().close()

    def _set_metadata(self, etag: str, metadata: dict[str, str]) -> None:
        """Give the just-completed object its metadata: a server-side copy onto itself,
        only of the version just written (``CopySourceIfMatch``), with the SHA-256
        checksum recomputed by the server (a whole-object one for a single CopyObject)."""
        c, bucket, key = self._s.client, self._s.bucket, self._key
        args = {
            "Metadata": metadata,
            "MetadataDirective": "REPLACE",
            "ChecksumAlgorithm": "SHA256",
            "CopySourceIfMatch": etag,
        }
        if self.bytes_written <= _S3_MAX_COPY_SIZE:
            c.copy_object(Bucket=bucket, Key=key, CopySource={"Bucket": bucket, "Key": key}, **args)
            return
        from boto3.s3.transfer import TransferConfig

        c.copy(
            {"Bucket": bucket, "Key": key},
            bucket,
            key,
            ExtraArgs=args,
            Config=TransferConfig(
                multipart_threshold=_S3_MAX_COPY_SIZE,
                multipart_chunksize=max(_S3_MAX_PART_SIZE, -(-self.bytes_written // 9000)),
            ),
        )

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


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")
