"""The janitor removes temporary names left by killed writes once they are old, never a
write in progress nor a real file; the audit lists temporary leftovers on their own."""

from __future__ import annotations

import os
import time

import pytest

from ccat_data_transfer.buffers import janitor
from ccat_data_transfer.buffers.cycle import BufferManager
from ccat_data_transfer.operations.audit import run_audit
from ccat_ops_db import models as m

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


def _file_row_under_temporary_folder(system, rel: str, data: bytes) -> int:
    """A raw file lying at SOURCE under a temporary-looking folder, with its rows built
    directly (as an older filing let through): returns its copy's id."""
    import hashlib

    from helpers_lifecycle import _module, location, make_executed_obs_unit

    path = system.location_path("primecam_raw_data") / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    old = time.time() - 10 * LIMIT
    os.utime(path, (old, old))
    with system.session() as s:
        src = location(s, "primecam_raw_data")
        rdf = m.RawDataFile(
            relative_path=rel,
            size=len(data),
            checksum=hashlib.sha256(data).hexdigest(),
            instrument_module_id=_module(s).id,
            executed_obs_unit_id=make_executed_obs_unit(s).id,
            source_location_id=src.id,
        )
        s.add(rdf)
        s.flush()
        copy = m.RawDataFilePhysicalCopy(
            raw_data_file_id=rdf.id,
            data_location_id=src.id,
            relative_path=rel,
            size=len(data),
            status=m.PhysicalCopyStatus.PRESENT,
        )
        s.add(copy)
        s.flush()
        return copy.id


def test_the_sweep_never_removes_a_filed_file_under_a_temporary_folder(system, override_settings):
    override_settings(JANITOR_MIN_AGE_SECONDS=0)
    copy_id = _file_row_under_temporary_folder(system, ".scan.tmp-7/obs1.fits", b"raw" * 100)
    orphan = system.location_path("primecam_raw_data") / ".gone.tmp-1" / "left.dat"
    orphan.parent.mkdir()
    orphan.write_bytes(b"o" * 10)
    with system.session() as s:
        result = BufferManager().run_once(s)
    root = system.location_path("primecam_raw_data")
    assert (root / ".scan.tmp-7" / "obs1.fits").read_bytes() == b"raw" * 100
    assert not orphan.parent.exists()  # nothing known there: swept
    assert result["janitor"]["primecam_raw_data"]["kept_known"] == 1
    with system.session() as s:
        assert s.get(m.PhysicalCopy, copy_id).status == m.PhysicalCopyStatus.PRESENT
        (report,) = run_audit(s, "primecam_raw_data", mark=False)
    (kept,) = report.temporary
    assert kept["path"] == ".scan.tmp-7" and kept["removable"] is False and kept["kept"]
    assert report.lost == [] and report.found == 1  # looked at directly, not lost


def _live_transfer_partial(system, heartbeat_age_seconds: float) -> tuple[int, object]:
    """A transfer to cologne_buffer IN_PROGRESS whose heartbeat (updated_at) is
    ``heartbeat_age_seconds`` old, and its resume file there, untouched for long."""
    from datetime import timedelta

    from ccat_data_transfer.core.transfer_methods import _resume_name
    from helpers_lifecycle import make_dtp, make_transfer

    with system.session() as s:
        dtp = make_dtp(system, s)
        tid = make_transfer(
            s, dtp.dtp_id, "ccat_telescope_buffer", "cologne_buffer", status=m.Status.IN_PROGRESS
        )
        s.get(m.DataTransfer, tid).updated_at = m.utcnow() - timedelta(
            seconds=heartbeat_age_seconds
        )
        rel = dtp.relative_path
    partial = system.location_path("cologne_buffer") / _resume_name(rel)
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(b"p" * 700)
    return tid, partial


def test_the_sweep_keeps_the_partial_of_a_live_transfer_and_removes_an_orphan(
    system, override_settings
):
    override_settings(JANITOR_MIN_AGE_SECONDS=LIMIT)
    _tid, partial = _live_transfer_partial(system, heartbeat_age_seconds=0)
    orphan = partial.with_name(".other.tar.tmp-0123abcd")
    orphan.write_bytes(b"x" * 50)
    later = time.time() + LIMIT + 60  # both older than the janitor's age
    with system.session() as s:
        result = janitor.sweep([system.location(s, "cologne_buffer")], now=later)
    assert partial.read_bytes() == b"p" * 700
    assert not orphan.exists()
    assert result["cologne_buffer"]["removed"] == 1
    assert result["cologne_buffer"]["kept_known"] == 1


def test_the_partial_of_a_stalled_transfer_is_swept_once_old(system, override_settings):
    override_settings(JANITOR_MIN_AGE_SECONDS=LIMIT)
    _tid, partial = _live_transfer_partial(system, heartbeat_age_seconds=10 * 86400)
    with system.session() as s:
        janitor.sweep([system.location(s, "cologne_buffer")], now=time.time() + LIMIT + 60)
    assert not partial.exists()


def test_the_sweep_keeps_the_work_folder_of_a_live_unpack(system, override_settings):
    from ccat_data_transfer.core.storage import work_dir_prefix
    from helpers_lifecycle import make_dtp, make_transfer

    override_settings(JANITOR_MIN_AGE_SECONDS=0)
    with system.session() as s:
        dtp = make_dtp(system, s)
        tid = make_transfer(
            s,
            dtp.dtp_id,
            "ccat_telescope_buffer",
            "cologne_buffer",
            unpack_status=m.Status.IN_PROGRESS,
        )
    root = system.location_path("cologne_buffer")
    live = root / f"{work_dir_prefix(f'dt{tid}')}abc" / "x"
    live.mkdir(parents=True)
    (live / "a.tar").write_bytes(b"a" * 10)
    dead = root / f"{work_dir_prefix(f'dt{tid + 1}')}abc"
    dead.mkdir()
    with system.session() as s:
        janitor.sweep([system.location(s, "cologne_buffer")])
    assert (live / "a.tar").exists()
    assert not dead.exists()
