"""The janitor removes temporary names left by killed writes once they are old, never a
write in progress nor a real file; the audit lists temporary leftovers on their own."""

from __future__ import annotations

import os
import time

import pytest

from ccat_data_transfer.buffers import janitor
from ccat_data_transfer.buffers.cycle import BufferManager
from ccat_data_transfer.operations.audit import run_audit

LIMIT = 3600


@pytest.fixture
def leftovers(system, override_settings):
    """A killed write's .tmp file, a killed unpack's folder, and a real file, in the
    cologne buffer; returns the buffer's root."""
    override_settings(JANITOR_MIN_AGE_SECONDS=LIMIT)
    root = system.location_path("cologne_buffer")
    (root / "data_transfer_packages").mkdir(parents=True)
    (root / "data_transfer_packages" / ".p.tar.tmp-0123abcd").write_bytes(b"x" * 1000)
    work = root / ".unpack.tmp-k1ll3d"
    (work / "x" / "raw").mkdir(parents=True)
    (work / "x" / "raw" / "a.tar").write_bytes(b"y" * 3000)
    (root / "data_transfer_packages" / "real.tar").write_bytes(b"z" * 500)
    return root


def _events(caplog, event):
    """The structured log records of ``event`` (each a dict, as the JSON log shows it)."""
    return [
        r.msg for r in caplog.records if isinstance(r.msg, dict) and r.msg.get("event") == event
    ]


def test_janitor_keeps_young_temporary_names_a_write_may_still_be_using(system, leftovers):
    with system.session() as s:
        result = janitor.sweep([system.location(s, "cologne_buffer")])["cologne_buffer"]
    assert result == {"removed": 0, "bytes_freed": 0, "kept_young": 2}
    assert (leftovers / "data_transfer_packages" / ".p.tar.tmp-0123abcd").exists()
    assert (leftovers / ".unpack.tmp-k1ll3d" / "x" / "raw" / "a.tar").exists()


def test_a_finished_member_with_an_old_mtime_is_still_young(system, leftovers):
    # Extraction sets a member's mtime to the tar's (years ago): its change time is now.
    tmp = leftovers / "data_transfer_packages" / ".p.tar.tmp-0123abcd"
    os.utime(tmp, (0, 0))
    os.utime(leftovers / ".unpack.tmp-k1ll3d" / "x" / "raw" / "a.tar", (0, 0))
    with system.session() as s:
        result = janitor.sweep([system.location(s, "cologne_buffer")])["cologne_buffer"]
    assert result["removed"] == 0 and tmp.exists()


def test_janitor_removes_old_tmp_files_and_unpack_folders_logs_each_and_keeps_real_files(
    system, leftovers, caplog
):
    caplog.set_level("INFO")
    later = time.time() + LIMIT + 60
    with system.session() as s:
        result = janitor.sweep([system.location(s, "cologne_buffer")], now=later)
    assert result["cologne_buffer"] == {"removed": 2, "bytes_freed": 4000, "kept_young": 0}
    assert not (leftovers / "data_transfer_packages" / ".p.tar.tmp-0123abcd").exists()
    assert not (leftovers / ".unpack.tmp-k1ll3d").exists()
    assert (leftovers / "data_transfer_packages" / "real.tar").read_bytes() == b"z" * 500
    removed = _events(caplog, "janitor_removed")
    assert {(e["path"], e["size_bytes"]) for e in removed} == {
        ("data_transfer_packages/.p.tar.tmp-0123abcd", 1000),
        (".unpack.tmp-k1ll3d", 3000),
    }
    assert all(e["location"] == "cologne_buffer" and e["age_seconds"] > LIMIT for e in removed)


def test_janitor_never_removes_a_name_that_is_not_temporary(system, leftovers):
    from ccat_data_transfer.core.storage import DiskStorage

    with pytest.raises(ValueError, match="not a temporary name"):
        DiskStorage(leftovers).remove_temporary("data_transfer_packages/real.tar")
    assert (leftovers / "data_transfer_packages" / "real.tar").exists()


def test_buffer_manager_cycle_runs_the_janitor_on_its_locations(
    system, leftovers, override_settings
):
    override_settings(JANITOR_MIN_AGE_SECONDS=0)
    with system.session() as s:
        result = BufferManager().run_once(s)
    assert result["janitor"]["cologne_buffer"]["removed"] == 2
    assert not (leftovers / ".unpack.tmp-k1ll3d").exists()


def test_audit_lists_temporary_leftovers_as_their_own_category(system, leftovers):
    with system.session() as s:
        (report,) = run_audit(s, "cologne_buffer", mark=False)
    assert {t["path"] for t in report.temporary} == {
        "data_transfer_packages/.p.tar.tmp-0123abcd",
        ".unpack.tmp-k1ll3d",
    }
    assert {t["size"] for t in report.temporary} == {1000, 3000}
    assert all(t["removable"] is False for t in report.temporary)
    assert [d["path"] for d in report.dark] == ["data_transfer_packages/real.tar"]
    assert report.as_dict()["temporary"] == report.temporary


def test_s3_janitor_aborts_old_unfinished_multipart_uploads_only(s3_server, s3_bucket):
    storage = s3_server.storage(s3_bucket)
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="done.tar", Body=b"d" * 10)
    upload = client.create_multipart_upload(Bucket=s3_bucket, Key="killed.tar")["UploadId"]
    client.upload_part(
        Bucket=s3_bucket, Key="killed.tar", UploadId=upload, PartNumber=1, Body=b"p" * 5000
    )
    (found,) = janitor.leftovers(storage)
    assert found["path"] == f"killed.tar#upload={upload}" and found["size"] == 5000
    assert found["removable"] is False
    with pytest.raises(ValueError, match="names no multipart upload"):
        storage.remove_temporary("done.tar")
    later = time.time() + 10 * janitor.min_age_seconds()
    result = janitor.sweep_storage("s3_buffer", storage, now=later)
    assert result == {"removed": 1, "bytes_freed": 5000, "kept_young": 0}
    assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert client.get_object(Bucket=s3_bucket, Key="done.tar")["Body"].read() == b"d" * 10
    assert [i.path for i in storage.list()] == ["done.tar"]
