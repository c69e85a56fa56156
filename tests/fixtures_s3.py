"""Pytest plugin: a real S3-compatible HTTP server on loopback for the test session.

Loaded through ``pytest_plugins = ["fixtures_s3"]`` in ``tests/conftest.py``.  It runs
moto's standalone server (``moto.server.ThreadedMotoServer``) on 127.0.0.1 with a free
port, so code under test talks to it over real HTTP through boto3 exactly as it would to
MinIO or AWS; nothing is patched in-process.

Fixtures:

* ``s3_server`` (session): object with ``endpoint_url``, ``access_key``, ``secret_key``,
  ``region``, ``client()`` (a boto3 S3 client for assertions) and ``storage(bucket)``
  (our S3Storage of a bucket there).
* ``s3_bucket`` (function): the name of a freshly created, empty bucket, emptied and
  removed again after the test.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest


@dataclass(frozen=True)
class S3TestServer:
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def client(self) -> Any:
        """A boto3 client for this server (built once: building clients is slow)."""
        cached = _CLIENTS.get(self.endpoint_url)
        if cached is None:
            import boto3
            from botocore.config import Config

            cached = boto3.session.Session().client(
                "s3",
                endpoint_url=self.endpoint_url,
                aws_access_key_id=self.access_key,
                aws_secret_access_key=self.secret_key,
                region_name=self.region,
                config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
            )
            _CLIENTS[self.endpoint_url] = cached
        return cached

    def storage(self, bucket: str) -> Any:
        """An :class:`~ccat_data_transfer.core.storage.S3Storage` of ``bucket`` on this server,
        with this server's credentials."""
        from ccat_data_transfer.core.storage import S3Storage

        return S3Storage(
            self.endpoint_url,
            bucket,
            access_key=self.access_key,
            secret_key=self.secret_key,
            region=self.region,
        )


_CLIENTS: dict[str, Any] = {}


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3TestServer]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield S3TestServer(
            endpoint_url=f"http://{host}:{port}",
            access_key="ccat-test-access-key",
            secret_key="ccat-test-secret-key",
        )
    finally:
        server.stop()


def _empty_bucket(client: Any, bucket: str) -> None:
    for upload in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
        client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket):
        keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys})


@pytest.fixture
def s3_bucket(s3_server: S3TestServer) -> Iterator[str]:
    client = s3_server.client()
    name = f"test-{uuid.uuid4().hex[:20]}"
    client.create_bucket(Bucket=name)
    yield name
    try:
        _empty_bucket(client, name)
        client.delete_bucket(Bucket=name)
    except client.exceptions.NoSuchBucket:
        pass
