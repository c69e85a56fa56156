"""Stage 1: grouping, size split, checksum verification, atomic writing, buffer failover,
emergency pause and concurrent managers."""

from __future__ import annotations

import tarfile
import threading

import pytest
from sqlalchemy import func, select

from ccat_data_transfer.core import buffer_status, tarutil
from ccat_data_transfer.core.database import DatabaseConnection
from ccat_data_transfer.core.tarutil import writing as tar_writing
from ccat_data_transfer.filing import register as filing
from ccat_data_transfer.packaging import raw_cycle, skeleton
from ccat_data_transfer.packaging import raw_packages as rdpm
from ccat_ops_db import models as m
from helpers_pipeline import build_started_and_died, make_raw_files

SRC = "primecam_raw_data"
BUF = "ccat_telescope_buffer"


def _run(system):
    with system.session() as s:
        return raw_cycle.run_once(s)


def _packages(system):
    with system.session() as s:
        stmt = select(m.RawDataPackage).order_by(m.RawDataPackage.id)
        pkgs = s.scalars(stmt).all()
        for p in pkgs:
            _ = p.instrument_module.name  # loaded for use after the session closes
        return pkgs


def _files_left(path):
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())


def _tar_names(system, pkg, location=BUF):
    with tarfile.open(system.location_path(location) / pkg.relative_path) as tf:
        return sorted(tf.getnames())


def test_files_of_one_obs_unit_and_module_become_one_package_at_the_buffer(system):
    a = make_raw_files(system, SRC, "eou-1", "primecam/280GHz", 3, 1000)
    b = make_raw_files(system, SRC, "eou-1", "primecam/350GHz", 2, 500)
    summary = _run(system)
    assert summary["packages_created"] == 2 and summary["files_packaged"] == 5
    pkgs = _packages(system)
    assert [p.status for p in pkgs] == [m.Status.COMPLETED] * 2
    assert all(p.state == m.PackageState.WAITING for p in pkgs)
    by_module = {p.instrument_module.name: p for p in pkgs}
    assert _tar_names(system, by_module["280GHz"]) == sorted(e["relative_path"] for e in a)
    assert _tar_names(system, by_module["350GHz"]) == sorted(e["relative_path"] for e in b)
    for p in pkgs:
        tar_path = system.location_path(BUF) / p.relative_path
        assert tarutil.sha256_file(tar_path) == p.checksum
        assert tar_path.stat().st_size == p.size
        assert p.relative_path.startswith("raw_data_packages/primecam/")
    with system.session() as s:
        copies = s.scalars(select(m.RawDataPackagePhysicalCopy)).all()
        assert {(c.data_location.name, c.status) for c in copies} == {
            (BUF, m.PhysicalCopyStatus.PRESENT)
        }
        assert len(copies) == 2
    # The SOURCE keeps only the raw files: the tar was moved, not copied.
    assert not (system.location_path(SRC) / "raw_data_packages").exists() or not _files_left(
        system.location_path(SRC) / "raw_data_packages"
    )
    assert _run(system)["packages_submitted"] == 0


def test_group_over_the_size_limit_is_split_into_parts(system, override_settings):
    override_settings(RAW_DATA_PACKAGE_MAX_SIZE_BYTES=2500)
    entries = make_raw_files(system, SRC, "eou-split", "primecam/280GHz", 5, 1000)
    summary = _run(system)
    assert summary["packages_created"] == 3
    pkgs = _packages(system)
    assert [p.part_number for p in pkgs] == [1, 2, 3]
    members = [_tar_names(system, p) for p in pkgs]
    assert [len(x) for x in members] == [2, 2, 1]
    assert sorted(sum(members, [])) == sorted(e["relative_path"] for e in entries)
    assert len({p.file_name for p in pkgs}) == 3


def test_split_keeps_an_oversized_file_alone_and_holds_back_a_growing_part():
    files = [("a", 10), ("b", 30), ("c", 5), ("d", 5)]
    assert rdpm.split_by_size(files, 20, complete=True) == [["a"], ["b"], ["c", "d"]]
    assert rdpm.split_by_size(files, 20, complete=False) == [["a"], ["b"]]


def test_incomplete_group_waits_for_the_quiet_period_or_finish(system, override_settings):
    override_settings(RAW_DATA_PACKAGE_QUIET_PERIOD_SECONDS=3600)
    make_raw_files(system, SRC, "eou-quiet", "primecam/280GHz", 2, 100)
    summary = _run(system)
    assert summary["packages_submitted"] == 0 and summary["waiting_groups"] == 1
    with system.session() as s:
        filing.finish_executed_obs_unit(s, "eou-quiet")
    assert _run(system)["packages_created"] == 1


def test_incomplete_group_over_the_limit_packages_its_full_parts(system, override_settings):
    override_settings(
        RAW_DATA_PACKAGE_QUIET_PERIOD_SECONDS=3600, RAW_DATA_PACKAGE_MAX_SIZE_BYTES=250
    )
    make_raw_files(system, SRC, "eou-stream", "primecam/280GHz", 5, 100)
    summary = _run(system)
    assert summary["packages_created"] == 2  # [2 files][2 files], the 5th waits
    with system.session() as s:
        left = s.scalar(select(func.count()).where(m.RawDataFile.raw_data_package_id.is_(None)))
    assert left == 1


def test_file_not_matching_its_checksum_is_flagged_and_blocks_its_group(system):
    entries = make_raw_files(system, SRC, "eou-bad", "primecam/280GHz", 3, 256)
    good = make_raw_files(system, SRC, "eou-good", "primecam/280GHz", 1, 256)
    bad = entries[1]
    bad["path"].write_bytes(b"x" * 256)  # same size, different bytes
    summary = _run(system)
    assert [e["relative_path"] for e in summary["checksum_errors"]] == [bad["relative_path"]]
    assert summary["packages_created"] == 1 and summary["packages_failed"] == 1
    with system.session() as s:
        rows = {str(f.id): f for f in s.scalars(select(m.RawDataFile))}
        assert "sha256" in rows[bad["id"]].checksum_error
        assert all(rows[e["id"]].raw_data_package_id is None for e in entries)
        assert rows[entries[0]["id"]].checksum_error is None
        assert rows[good[0]["id"]].raw_data_package_id is not None
    assert len(_packages(system)) == 1
    again = _run(system)
    assert again["packages_submitted"] == 0 and again["blocked_groups"] == 1


def test_file_missing_at_source_is_flagged(system):
    entries = make_raw_files(system, SRC, "eou-missing", "primecam/280GHz", 2, 64)
    entries[0]["path"].unlink()
    summary = _run(system)
    assert summary["checksum_errors"][0]["reason"] == "file missing at SOURCE"
    assert _packages(system) == []


def test_crash_in_the_middle_of_writing_leaves_nothing(system, monkeypatch):
    entries = make_raw_files(system, SRC, "eou-crash", "primecam/280GHz", 3, 5000)
    real = skeleton.write_tar_with_checksums
    calls = {"n": 0}

    class Exploding:
        def __init__(self, out):
            self.out = out

        def write(self, data):
            calls["n"] += 1
            if calls["n"] > 3:
                raise OSError("disk exploded mid-write")
            return self.out.write(data)

    monkeypatch.setattr(
        skeleton, "write_tar_with_checksums", lambda members, out: real(members, Exploding(out))
    )
    summary = _run(system)
    assert summary["packages_failed"] == 1 and calls["n"] > 3
    assert _packages(system) == []
    for loc in (SRC, BUF):
        leftovers = [p for p in _files_left(system.location_path(loc)) if "raw_data_packages" in p]
        assert leftovers == [], leftovers
    with system.session() as s:
        assert s.scalar(select(func.count(m.RawDataPackagePhysicalCopy.id))) == 0
        claimed = s.scalar(
            select(func.count()).where(m.RawDataFile.raw_data_package_id.is_not(None))
        )
        assert claimed == 0
    monkeypatch.setattr(skeleton, "write_tar_with_checksums", real)
    assert _run(system)["packages_created"] == 1
    assert _tar_names(system, _packages(system)[0]) == sorted(e["relative_path"] for e in entries)


def test_file_that_changes_while_being_read_leaves_no_package(system, monkeypatch):
    entries = make_raw_files(system, SRC, "eou-grow", "primecam/280GHz", 2, 4096)
    victim = entries[0]["path"]
    real_open = open

    def growing_open(path, *args, **kwargs):
        f = real_open(path, *args, **kwargs)
        if str(path) == str(victim) and "r" in (args[0] if args else kwargs.get("mode", "r")):
            with real_open(victim, "ab") as g:  # the instrument appends while we read
                g.write(b"more")
        return f

    monkeypatch.setattr(tar_writing, "open", growing_open, raising=False)
    summary = _run(system)
    assert summary["packages_created"] == 0 and summary["packages_failed"] == 1
    assert _packages(system) == []
    assert not [p for p in _files_left(system.location_path(BUF)) if p.endswith(".tar")]


def _add_buffer(system, name, priority, active=True):
    with system.session() as s:
        ccat = s.scalars(select(m.Site).filter_by(name="ccat")).one()
        path = system.data_dir / "ccat" / name
        path.mkdir(parents=True, exist_ok=True)
        s.add(
            m.DiskDataLocation(
                name=name,
                site=ccat,
                location_type=m.LocationType.BUFFER,
                priority=priority,
                active=active,
                path=str(path),
            )
        )
    return path


def _copy_locations(system):
    with system.session() as s:
        return [c.data_location.name for c in s.scalars(select(m.RawDataPackagePhysicalCopy))]


def test_inactive_best_buffer_fails_over_to_the_next(system):
    _add_buffer(system, "ccat_spare_buffer", priority=5)
    with system.session() as s:
        system.location(s, BUF).active = False
    make_raw_files(system, SRC, "eou-fo1", "primecam/280GHz", 1, 100)
    assert _run(system)["packages_created"] == 1
    assert _copy_locations(system) == ["ccat_spare_buffer"]


def test_unwritable_best_buffer_fails_over_to_the_next(system):
    import shutil

    _add_buffer(system, "ccat_spare_buffer", priority=5)
    shutil.rmtree(system.location_path(BUF))  # unmounted disk: root missing
    make_raw_files(system, SRC, "eou-fo2", "primecam/280GHz", 1, 100)
    assert _run(system)["packages_created"] == 1
    assert _copy_locations(system) == ["ccat_spare_buffer"]


def test_full_best_buffer_fails_over_to_the_next(system, monkeypatch):
    import errno
    import os

    from ccat_data_transfer.core.storage import interface

    spare = _add_buffer(system, "ccat_spare_buffer", priority=5)
    full = system.location_path(BUF)
    real_write = interface._FdWriter.write

    def write(self, data):  # the best buffer's disk fills up while the tar is written
        if os.readlink(f"/proc/self/fd/{self._fd}").startswith(str(full)):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(interface._FdWriter, "write", write)
    make_raw_files(system, SRC, "eou-fo3", "primecam/280GHz", 1, 100)
    assert _run(system)["packages_created"] == 1
    assert _copy_locations(system) == ["ccat_spare_buffer"]
    assert _files_left(full) == []  # the full buffer keeps no temporary name
    assert [p for p in _files_left(spare) if p.endswith(".tar")]


def _publish(system, name, state, percent):
    with system.session() as s:
        buffer_status.publish_status(
            {
                "location": name,
                "used_bytes": 1,
                "total_bytes": 100,
                "disk_usage_percent": percent,
                "state": state,
            },
            s,
        )


def test_emergency_buffer_pauses_package_creation_at_the_site(system):
    make_raw_files(system, SRC, "eou-emerg", "primecam/280GHz", 1, 100)
    _publish(system, BUF, "emergency", 97.0)
    summary = _run(system)
    assert summary["packages_submitted"] == 0 and summary["paused_sites"] == ["ccat"]
    _publish(system, BUF, "normal", 10.0)
    assert _run(system)["packages_created"] == 1


def test_emergency_best_buffer_is_skipped_for_a_usable_one(system):
    _add_buffer(system, "ccat_spare_buffer", priority=5)
    _publish(system, BUF, "emergency", 97.0)
    make_raw_files(system, SRC, "eou-emerg2", "primecam/280GHz", 1, 100)
    assert _run(system)["packages_created"] == 1
    assert _copy_locations(system) == ["ccat_spare_buffer"]


def test_a_second_manager_cannot_claim_files_already_claimed(system):
    make_raw_files(system, SRC, "eou-race", "primecam/280GHz", 4, 100)
    with system.session() as s1:
        plans = rdpm.plan_packages(s1)
    assert len(plans) == 1
    # Manager B runs a whole cycle between A's planning and A's claim.
    assert _run(system)["packages_created"] == 1
    with system.session() as s1:
        assert rdpm.claim_package(s1, plans[0], plans[0].parts[0]) is None
    assert len(_packages(system)) == 1


def test_two_managers_at_once_package_each_file_once(system):
    entries = []
    for i in range(6):
        entries += make_raw_files(system, SRC, f"eou-par-{i}", "primecam/280GHz", 3, 2000)
    errors = []
    barrier = threading.Barrier(2)

    def manager():
        try:
            barrier.wait()
            with DatabaseConnection(system.url).session_scope() as s:
                raw_cycle.run_once(s)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=manager) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    pkgs = _packages(system)
    assert len(pkgs) == 6 and all(p.status == m.Status.COMPLETED for p in pkgs)
    members = sum((_tar_names(system, p) for p in pkgs), [])
    assert sorted(members) == sorted(e["relative_path"] for e in entries)


def test_stalled_claim_is_released_and_repackaged(system, override_settings):
    make_raw_files(system, SRC, "eou-stall", "primecam/280GHz", 2, 100)
    with system.session() as s:
        plan = rdpm.plan_packages(s)[0]
        pkg_id = rdpm.claim_package(s, plan, plan.parts[0])
    assert pkg_id is not None
    build_started_and_died(system, m.RawDataPackage, pkg_id)
    summary = _run(system)
    assert summary["released_stalled"] == 1 and summary["packages_created"] == 1
    assert [p.part_number for p in _packages(system)] == [1]


@pytest.mark.parametrize("finished", [True, False])
def test_completeness_rule(finished):
    assert rdpm.group_is_complete(finished, 5, 10) is finished
    assert rdpm.group_is_complete(finished, 10, 10) is True


# --- the tar written once, straight into the buffer --------------------------------------


def _gnu_tar_listing(path):
    import subprocess

    out = subprocess.run(["tar", "-tf", str(path)], capture_output=True, text=True, check=True)
    return sorted(out.stdout.split())


def _gnu_tar_member_sha256(path, member):
    import hashlib
    import subprocess

    out = subprocess.run(["tar", "-xOf", str(path), member], capture_output=True, check=True)
    return hashlib.sha256(out.stdout).hexdigest()


def test_package_is_written_once_straight_into_the_buffer(system, monkeypatch):
    import hashlib
    import os

    from ccat_data_transfer.core.storage import DiskStorage

    entries = make_raw_files(system, SRC, "eou-once", "primecam/280GHz", 3, 300_000)
    writes, copies = [], []
    real_open_write, real_copy_in = DiskStorage.open_write, DiskStorage.copy_in

    def open_write(self, path):
        writes.append(self.root)
        return real_open_write(self, path)

    def copy_in(self, *args, **kwargs):
        copies.append(self.root)
        return real_copy_in(self, *args, **kwargs)

    monkeypatch.setattr(DiskStorage, "open_write", open_write)
    monkeypatch.setattr(DiskStorage, "copy_in", copy_in)
    read_bytes = {"n": 0}
    real_write = os.write

    def counting_write(fd, data):  # bytes written to any tar, temporary name or not
        if ".tar" in os.readlink(f"/proc/self/fd/{fd}"):
            read_bytes["n"] += len(data)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", counting_write)
    assert _run(system)["packages_created"] == 1
    (pkg,) = _packages(system)
    buf = system.location_path(BUF)
    tar_path = buf / pkg.relative_path
    # One write, into the buffer; no copy; every tar byte written exactly once.
    assert writes == [buf] and copies == []
    assert read_bytes["n"] == tar_path.stat().st_size == pkg.size
    # Nothing at SOURCE but the raw files (no tar, no temporary name).
    src = system.location_path(SRC)
    assert sorted(_files_left(src)) == sorted(e["relative_path"] for e in entries)
    assert [p for p in _files_left(buf) if ".tmp-" in p] == []
    # GNU tar lists it, and its bytes hash to what was recorded, whole and per member.
    assert _gnu_tar_listing(tar_path) == sorted(e["relative_path"] for e in entries)
    assert hashlib.sha256(tar_path.read_bytes()).hexdigest() == pkg.checksum
    for e in entries:
        assert _gnu_tar_member_sha256(tar_path, e["relative_path"]) == e["checksum"]
    with system.session() as s:
        (copy,) = s.scalars(select(m.RawDataPackagePhysicalCopy)).all()
        assert (copy.checksum, copy.size) == (pkg.checksum, pkg.size)


def test_mismatch_while_writing_into_the_buffer_leaves_nothing_there(system):
    entries = make_raw_files(system, SRC, "eou-bad", "primecam/280GHz", 2, 200_000)
    with open(entries[1]["path"], "r+b") as f:  # same size, other bytes
        f.seek(1000)
        f.write(b"corrupt")
    summary = _run(system)
    assert summary["packages_created"] == 0 and len(summary["checksum_errors"]) == 1
    for loc in (SRC, BUF):
        assert [p for p in _files_left(system.location_path(loc)) if ".tar" in p] == []


def test_buffer_out_of_reach_gets_a_copy_of_a_tar_written_at_source(
    system, override_settings, s3_server, s3_bucket
):
    import hashlib

    from ccat_data_transfer.core.storage import S3Storage

    override_settings(
        S3_ACCESS_KEY_ID=s3_server.access_key, S3_SECRET_ACCESS_KEY=s3_server.secret_key
    )
    with system.session() as s:
        system.location(s, BUF).active = False
        ccat = s.scalars(select(m.Site).filter_by(name="ccat")).one()
        s.add(
            m.S3DataLocation(
                name="ccat_s3_buffer",
                site=ccat,
                location_type=m.LocationType.BUFFER,
                bucket=s3_bucket,
                endpoint_url=s3_server.endpoint_url,
                priority=5,
            )
        )
    entries = make_raw_files(system, SRC, "eou-s3", "primecam/280GHz", 2, 100_000)
    assert _run(system)["packages_created"] == 1
    (pkg,) = _packages(system)
    assert _copy_locations(system) == ["ccat_s3_buffer"]
    data = S3Storage(s3_server.endpoint_url, s3_bucket).open_read(pkg.relative_path).read()
    assert hashlib.sha256(data).hexdigest() == pkg.checksum and len(data) == pkg.size
    # The SOURCE tar it was copied from is gone, and so is any temporary name.
    src = system.location_path(SRC)
    assert sorted(_files_left(src)) == sorted(e["relative_path"] for e in entries)


def test_a_killed_write_into_the_buffer_leaves_only_a_temporary_name_the_janitor_removes(
    tmp_path,
):
    import os
    import signal
    import time

    from ccat_data_transfer.buffers import janitor
    from ccat_data_transfer.core.storage import DiskStorage, interface
    from ccat_data_transfer.core.tarutil import TarMember

    src = tmp_path / "src"
    src.mkdir()
    members = []
    for i in range(3):
        path = src / f"f{i}.dat"
        path.write_bytes(os.urandom(2_000_000))  # several writes of the 1 MiB buffer
        members.append(TarMember(f"f{i}.dat", path, 2_000_000))
    buf = DiskStorage(tmp_path / "buffer", create=True)
    work = skeleton.Work("p.tar", "raw_data_packages/p.tar", None, members, None)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the worker, killed in the middle of its write
        real_write = interface._FdWriter.write
        written = {"n": 0}

        def write(self, data):
            written["n"] += 1
            if written["n"] == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_write(self, data)

        interface._FdWriter.write = write
        skeleton.write_tar(rdpm.RAW_DATA_PACKAGE, buf, work)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert list(buf.list()) == []  # no final name
    (leftover,) = list(buf.list_temporary())
    assert leftover.path.startswith("raw_data_packages/.p.tar.tmp-") and leftover.size > 0
    result = janitor.sweep_storage("buffer", buf, now=time.time() + 10 * 86400)
    assert result["removed"] == 1 and list(buf.list_temporary()) == []


def _file_plain(system, eou: str, count: int, size: int = 300) -> list[str]:
    """Write and file ``count`` files of obs unit ``eou`` under short paths (a 256-char
    obs unit name cannot be a folder name); returns their paths."""
    import hashlib
    import os
    import uuid

    root = system.location_path(SRC)
    entries = []
    for i in range(count):
        rel = f"long/{uuid.uuid4().hex[:8]}_{i}.dat"
        data = os.urandom(size)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        entries.append(
            {
                "relative_path": rel,
                "size": size,
                "checksum": hashlib.sha256(data).hexdigest(),
                "executed_obs_unit": eou,
                "instrument_module": "primecam/280GHz",
            }
        )
    with system.session() as s:
        filing.file_raw_data_files(s, SRC, entries)
        filing.finish_executed_obs_unit(s, eou)
    return [e["relative_path"] for e in entries]


def test_obs_units_with_256_char_names_sharing_a_head_are_packaged_under_distinct_names(
    system, override_settings
):
    override_settings(RAW_DATA_PACKAGE_MAX_SIZE_BYTES=700)  # two parts per unit
    first, second = "a" * 256, "a" * 255 + "b"
    paths = {eou: _file_plain(system, eou, 4) for eou in (first, second)}
    summary = _run(system)
    assert summary["packages_created"] == 4, summary
    pkgs = _packages(system)
    assert [p.status for p in pkgs] == [m.Status.COMPLETED] * 4
    names = [p.file_name for p in pkgs]
    assert len(set(names)) == 4
    assert all(len(n.encode()) <= 255 and n.endswith(".tar") for n in names)
    with system.session() as s:
        for eou, expected in paths.items():
            rows = s.scalars(
                select(m.RawDataPackage)
                .join(m.ExecutedObsUnit)
                .where(m.ExecutedObsUnit.name == eou)
                .order_by(m.RawDataPackage.part_number)
            ).all()
            assert [r.part_number for r in rows] == [1, 2]
            members = sorted(sum((_tar_names(system, r) for r in rows), []))
            assert members == sorted(expected)


def test_obs_unit_names_that_differ_only_in_replaced_characters_get_two_packages(system):
    _file_plain(system, "scan:1", 1)
    _file_plain(system, "scan_1", 1)
    assert _run(system)["packages_created"] == 2
    pkgs = _packages(system)
    assert [p.status for p in pkgs] == [m.Status.COMPLETED] * 2
    assert len({p.file_name for p in pkgs}) == 2


def test_a_filed_file_under_a_temporary_folder_is_flagged_not_packaged(system):
    """Rows built directly (an older filing let the path through): the packaging cycle
    never puts a member under a temporary name into a tar; it flags the file."""
    import hashlib

    from helpers_lifecycle import _module, location, make_executed_obs_unit

    rel = ".scan.tmp-7/obs1.fits"
    data = b"raw bytes" * 50
    path = system.location_path(SRC) / rel
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    with system.session() as s:
        src = location(s, SRC)
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
        file_id = rdf.id
    summary = _run(system)
    assert summary["packages_created"] == 0
    with system.session() as s:
        row = s.get(m.RawDataFile, file_id)
        assert row.raw_data_package_id is None
        assert "temporary name '.scan.tmp-7'" in (row.checksum_error or "")
        assert s.scalar(select(func.count()).select_from(m.RawDataPackage)) == 0
    assert path.read_bytes() == data
