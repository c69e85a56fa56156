"""S3 objects carry their SHA-256 (ChecksumSHA256 and x-amz-meta-sha256), checked with
boto3 against the moto server; audit trusts it, fixity re-reads the bytes."""

from __future__ import annotations

import base64
import hashlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from test_storage import _s3 as _store

from archive.test_archive import _us_lta_on_s3
from ccat_data_transfer import transfer_manager
from ccat_data_transfer.archive import cycle as archive_manager
from ccat_data_transfer.archive import proof as archive_proof
from ccat_data_transfer.core.storage import S3Storage
from ccat_data_transfer.core.storage import s3 as s3mod
from ccat_data_transfer.operations import audit
from ccat_ops_db import models as m
from helpers_transfer import drive, make_dtp_at_source_buffer


def _b64(hexdigest: str) -> str:
    return base64.b64encode(bytes.fromhex(hexdigest)).decode()


@contextmanager
def _calls(client: Any) -> Iterator[dict[str, int]]:
    """Count the S3 operations ``client`` sends (botocore's before-call event)."""
    counts: dict[str, int] = {}

    def hook(model: Any, **_: Any) -> None:
        counts[model.name] = counts.get(model.name, 0) + 1

    client.meta.events.register("before-call.s3", hook)
    try:
        yield counts
    finally:
        client.meta.events.unregister("before-call.s3", hook)


def _head(server: Any, bucket: str, key: str) -> dict[str, Any]:
    return server.client().head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")


def _download_sha256(server: Any, bucket: str, key: str) -> str:
    body = server.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return hashlib.sha256(body).hexdigest()


def test_small_s3_object_carries_sha256_metadata_and_checksum(s3_server, s3_bucket):
    data = os.urandom(100_000)
    with _store(s3_server, s3_bucket, "lta").open_write("a/b.tar") as f:
        f.write(data)
    want = hashlib.sha256(data).hexdigest()
    head = _head(s3_server, s3_bucket, "lta/a/b.tar")
    assert head["Metadata"]["sha256"] == want
    assert head["ChecksumSHA256"] == _b64(want)
    assert _download_sha256(s3_server, s3_bucket, "lta/a/b.tar") == want


def test_multipart_s3_object_carries_whole_object_sha256(s3_server, s3_bucket):
    data = os.urandom(1024 * 1024) * 19  # three parts of the streaming writer
    store = _store(s3_server, s3_bucket)
    with _calls(store.client) as calls, store.open_write("big.tar") as f:
        for i in range(0, len(data), 3_000_000):
            f.write(data[i : i + 3_000_000])
    assert calls["UploadPart"] == 3
    want = hashlib.sha256(data).hexdigest()
    head = _head(s3_server, s3_bucket, "big.tar")
    assert head["Metadata"]["sha256"] == want
    assert head["ContentLength"] == len(data)
    # The server recomputed the checksum when the metadata was set: a whole-object one.
    assert head.get("ChecksumSHA256") in (None, _b64(want))
    assert _download_sha256(s3_server, s3_bucket, "big.tar") == want
    assert not s3_server.client().list_multipart_uploads(Bucket=s3_bucket).get("Uploads")


def test_object_over_the_copy_limit_gets_its_sha256_by_a_multipart_copy(
    s3_server, s3_bucket, monkeypatch
):
    monkeypatch.setattr(s3mod, "_S3_MAX_COPY_SIZE", 1024 * 1024)
    data = os.urandom(9 * 1024 * 1024)
    store = _store(s3_server, s3_bucket)
    with _calls(store.client) as calls, store.open_write("huge.tar") as f:
        f.write(data)
    assert "UploadPartCopy" in calls and "CopyObject" not in calls
    want = hashlib.sha256(data).hexdigest()
    assert _head(s3_server, s3_bucket, "huge.tar")["Metadata"]["sha256"] == want
    assert _download_sha256(s3_server, s3_bucket, "huge.tar") == want


def test_copy_in_to_s3_carries_the_whole_file_sha256(s3_server, s3_bucket, tmp_path: Path):
    src = tmp_path / "pkg.tar"
    src.write_bytes(os.urandom(1024 * 1024) * 17)
    _store(s3_server, s3_bucket).copy_in(src, "pkg.tar")
    want = hashlib.sha256(src.read_bytes()).hexdigest()
    assert _head(s3_server, s3_bucket, "pkg.tar")["Metadata"]["sha256"] == want


def test_s3_sha256_answers_from_metadata_and_rereads_only_when_asked(s3_server, s3_bucket):
    store = _store(s3_server, s3_bucket)
    data = os.urandom(50_000)
    with store.open_write("x.bin") as f:
        f.write(data)
    want = hashlib.sha256(data).hexdigest()
    with _calls(store.client) as calls:
        assert store.sha256("x.bin") == want
    assert calls == {"HeadObject": 1}
    with _calls(store.client) as calls:
        assert store.sha256("x.bin", reread=True) == want
    assert calls.get("GetObject") == 1 and "HeadObject" not in calls


def test_s3_sha256_reads_an_object_written_without_metadata(s3_server, s3_bucket):
    store = _store(s3_server, s3_bucket)
    data = os.urandom(20_000)
    s3_server.client().put_object(Bucket=s3_bucket, Key="foreign.bin", Body=data)
    assert store.stored_sha256("foreign.bin") is None
    with _calls(store.client) as calls:
        assert store.sha256("foreign.bin") == hashlib.sha256(data).hexdigest()
    assert calls.get("GetObject") == 1


# --- archived packages, audit and fixity on an S3 LTA --------------------------------------


@pytest.fixture
def archived_on_s3(system, s3_server, s3_bucket, override_settings):
    """Two packages archived at us_lta on S3 (prefix ``archive``); yields their
    (copy id, key, checksum) and the storage."""
    override_settings(
        S3_ACCESS_KEY_ID=s3_server.access_key, S3_SECRET_ACCESS_KEY=s3_server.secret_key
    )
    with system.session() as s:
        _us_lta_on_s3(system, s, s3_server.endpoint_url, s3_bucket)
        dtp = make_dtp_at_source_buffer(system, s, n_packages=2, files_per_package=2)
        rdps = [(p.id, p.relative_path, p.checksum) for p in dtp.raw_data_packages]
    drive(system.session, transfer_manager.run_once, archive_manager.run_once, cycles=3)
    with system.session() as s:
        us_lta = system.location(s, "us_lta")
        store = S3Storage(us_lta.endpoint_url, us_lta.bucket, prefix=us_lta.prefix)
        out = []
        for rdp_id, rel, checksum in rdps:
            copy = s.scalars(
                select(m.RawDataPackagePhysicalCopy).where(
                    m.RawDataPackagePhysicalCopy.raw_data_package_id == rdp_id,
                    m.RawDataPackagePhysicalCopy.data_location_id == us_lta.id,
                )
            ).one()
            assert copy.status == m.PhysicalCopyStatus.PRESENT
            out.append((copy.id, f"archive/{rel}", checksum))
    return out, store


def test_package_archived_to_s3_carries_its_checksum_as_sha256(archived_on_s3, s3_server):
    copies, store = archived_on_s3
    for _copy_id, key, checksum in copies:
        head = _head(s3_server, store.bucket, key)
        assert head["Metadata"]["sha256"] == checksum
        assert head.get("ChecksumSHA256") in (None, _b64(checksum))
        assert _download_sha256(s3_server, store.bucket, key) == checksum


def _rewrite_metadata(server: Any, bucket: str, key: str, sha256: str) -> None:
    server.client().copy_object(
        Bucket=bucket,
        Key=key,
        CopySource={"Bucket": bucket, "Key": key},
        Metadata={"sha256": sha256},
        MetadataDirective="REPLACE",
    )


def _audit_us_lta(system: Any, full: bool, mark: bool = True) -> audit.LocationAudit:
    with system.session() as s:
        return audit.audit_location(
            s,
            system.location(s, "us_lta"),
            full=full,
            sample_fraction=1.0,
            max_fraction=1.0,
            mark=mark,
        )


def test_audit_of_s3_lta_reports_metadata_disagreeing_with_the_copy_without_reading(
    system, archived_on_s3, s3_server, without_archive_repair
):
    # The audit's finding queues a repair (as fixity's does), which reads the bytes of a
    # good copy; that is the repair's work, not the audit's: held back here.
    copies, store = archived_on_s3
    bad_id, bad_key, _ = copies[0]
    _rewrite_metadata(s3_server, store.bucket, bad_key, "0" * 64)
    with _calls(store.client) as calls:
        report = _audit_us_lta(system, full=False)
    assert "GetObject" not in calls and calls.get("HeadObject", 0) >= 2
    assert report.checksums_checked == 2
    assert [d["physical_copy_id"] for d in report.drift] == [bad_id]
    assert report.drift[0]["problem"].startswith("sha256 000000000000")
    with system.session() as s:
        assert s.get(m.PhysicalCopy, bad_id).lost_at is not None
        assert s.get(m.PhysicalCopy, copies[1][0]).lost_at is None


def _rot_bytes_keep_metadata(server: Any, bucket: str, key: str) -> None:
    """Bit rot at rest: same size, other bytes, the metadata of the good object."""
    client = server.client()
    head = client.head_object(Bucket=bucket, Key=key)
    body = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0xFF
    client.put_object(Bucket=bucket, Key=key, Body=bytes(body), Metadata=head["Metadata"])


def test_full_audit_and_fixity_reread_s3_bytes_the_quick_audit_trusts(
    system, archived_on_s3, s3_server
):
    copies, store = archived_on_s3
    bad_id, bad_key, _ = copies[1]
    _rot_bytes_keep_metadata(s3_server, store.bucket, bad_key)
    # The quick audit sees the stored SHA-256 only: the rot is invisible to it.
    assert _audit_us_lta(system, full=False).drift == []
    report = _audit_us_lta(system, full=True, mark=False)
    assert [d["physical_copy_id"] for d in report.drift] == [bad_id]
    findings = {f.copy_id: f.outcome for f in archive_proof.verify_copies([bad_id], full=True)}
    assert findings == {bad_id: archive_proof.CORRUPT}


# --- the documented S3 topology example -----------------------------------------------------


def _documented_s3_location() -> str:
    text = (Path(__file__).resolve().parents[2] / "docs" / "configuration.rst").read_text()
    section = text.split(".. _s3-locations:", 1)[1]
    block = section.split(".. code-block:: toml\n\n", 1)[1].split("\n\n", 1)[0]
    return "\n".join(line[3:] for line in block.splitlines()) + "\n"


def test_documented_s3_location_example_loads_with_every_s3_key(tmp_path: Path):
    import tomllib

    from archive.test_archive import DEFAULT_TOPOLOGY
    from ccat_ops_db.topology import LOCATION_KEYS, parse_topology

    example = _documented_s3_location()
    uncommented = re.sub(r"(?m)^# (\w+ = )", r"\1", example)
    documented = set(tomllib.loads(uncommented)["locations"][0])
    assert documented == LOCATION_KEYS - {"path", "host", "library", "capacity_bytes"}
    raw = tomllib.loads(DEFAULT_TOPOLOGY.read_text())
    raw["locations"] = [loc for loc in raw["locations"] if loc["name"] != "us_lta"]
    raw["locations"] += tomllib.loads(example)["locations"]
    topo = parse_topology(raw, tmp_path)
    (us_lta,) = [loc for loc in topo.locations if loc["name"] == "us_lta"]
    assert us_lta["storage_type"] == m.StorageType.S3
    assert (us_lta["bucket"], us_lta["prefix"], us_lta["region"]) == (
        "ccat-archive",
        "us_lta",
        "us-east-1",
    )
    assert us_lta["capacity_bytes"] == 500 * 10**12
