"""Every write, link and unlink inside a location root refuses a symlink on the way (the
issue "Where the parts meet", item 10): staging's unpack, deletion and the disk storage's
writes never reach a file outside the root through a symlinked folder, even one swapped
in after the path was checked.  Runs on SQLite and PostgreSQL (``system`` fixture)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from sqlalchemy import select

from ccat_data_transfer import staging_manager
from ccat_data_transfer.core.fileio import SymlinkInPathError, open_dir_beneath
from ccat_data_transfer.core.storage import DiskStorage
from ccat_data_transfer.staging_manager import create_staging_job
from ccat_ops_db import models as m
from helpers_staging import make_archived_package


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_staging_unpack_refuses_a_symlinked_folder_and_writes_nothing_outside(system):
    """A PROCESSING location whose subfolder is a symlink to a folder outside it: the
    unpack stops with a reason naming the symlink; nothing lands outside the root."""
    with system.session() as s:
        pkg = make_archived_package(system, s, n_files=3)
        pkg_id = pkg.id
        paths = sorted(f.relative_path for f in pkg.raw_data_files)
    root = system.location_path("processing_scratch")
    outside = system.data_dir / "outside_processing"
    outside.mkdir()
    top = paths[0].split("/")[0]
    assert not (root / top).exists()
    (root / top).symlink_to(outside, target_is_directory=True)

    with system.session() as s:
        job_id = create_staging_job(s, package_ids=[pkg_id]).id
    with system.session() as s:
        staging_manager.run_once(s)

    with system.session() as s:
        job = s.get(m.StagingJob, job_id)
        assert job.status != m.Status.COMPLETED
        assert "symbolic link" in (job.failure_reason or ""), job.failure_reason
        present = s.scalars(
            select(m.RawDataFilePhysicalCopy)
            .join(m.DataLocation)
            .where(
                m.DataLocation.name == "processing_scratch",
                m.RawDataFilePhysicalCopy.status == m.PhysicalCopyStatus.PRESENT,
            )
        ).all()
        assert present == []
    assert _tree(outside) == []


def test_deletion_does_not_unlink_outside_when_its_folder_is_swapped_for_a_symlink(
    tmp_path, monkeypatch
):
    """The folder of the object is swapped for a symlink to another tree after the path
    was checked and before the unlink: the file outside keeps existing."""
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    (root / "raw").mkdir(parents=True)
    (root / "raw" / "obs1.fits").write_bytes(b"inside")
    outside.mkdir()
    (outside / "obs1.fits").write_bytes(b"someone else's file")
    store = DiskStorage(root)

    real_full = DiskStorage._full

    def check_then_swap(self, path):
        checked = real_full(self, path)  # the check sees the real folder
        shutil.rmtree(root / "raw")
        (root / "raw").symlink_to(outside, target_is_directory=True)
        return checked

    monkeypatch.setattr(DiskStorage, "_full", check_then_swap)
    with pytest.raises(ValueError, match="symbolic link"):
        store.delete("raw/obs1.fits")
    assert (outside / "obs1.fits").read_bytes() == b"someone else's file"


def test_disk_write_into_a_folder_swapped_for_a_symlink_is_refused(tmp_path, monkeypatch):
    """A write whose folder becomes a symlink after the path check writes nothing outside."""
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    (root / "pkg").mkdir(parents=True)
    outside.mkdir()
    store = DiskStorage(root)

    real_full = DiskStorage._full

    def check_then_swap(self, path):
        checked = real_full(self, path)
        if (root / "pkg").is_dir() and not (root / "pkg").is_symlink():
            shutil.rmtree(root / "pkg")
            (root / "pkg").symlink_to(outside, target_is_directory=True)
        return checked

    monkeypatch.setattr(DiskStorage, "_full", check_then_swap)
    with pytest.raises(ValueError):
        with store.open_write("pkg/sub/file.bin") as f:
            f.write(b"x" * 100)
    assert _tree(outside) == []  # not even the folder "sub"


def test_disk_write_through_a_symlinked_folder_inside_the_root_is_refused(tmp_path):
    """Even a symlink that stays inside the root is not followed by a write."""
    root = tmp_path / "root"
    (root / "real").mkdir(parents=True)
    (root / "alias").symlink_to(root / "real", target_is_directory=True)
    store = DiskStorage(root)
    with pytest.raises(ValueError, match="symbolic link"):
        with store.open_write("alias/file.bin") as f:
            f.write(b"x")
    assert _tree(root / "real") == []


def test_open_dir_beneath_makes_missing_folders_and_refuses_a_symlink(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    made: list[str] = []
    fd = open_dir_beneath(root, "a/b/c", create=True, created=made)
    os.close(fd)
    assert made == ["a", "a/b", "a/b/c"] and (root / "a/b/c").is_dir()
    (root / "a" / "link").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(SymlinkInPathError, match="'a/link'"):
        open_dir_beneath(root, "a/link/x", create=True)
    assert not (tmp_path / "x").exists()
    with pytest.raises(FileNotFoundError):
        open_dir_beneath(root, "a/missing")


def test_transfer_unpack_refuses_a_symlinked_folder_at_the_destination(system):
    """The LTA-site buffer's ``raw_data_packages`` folder is a symlink to a folder outside
    it: the unpack of a transferred package puts nothing there and is not recorded done."""
    from ccat_data_transfer import transfer_manager
    from helpers_transfer import drive, make_dtp_at_source_buffer

    outside = system.data_dir / "outside_buffer"
    outside.mkdir()
    for name in ("cologne_buffer", "us_buffer"):
        (system.location_path(name) / "raw_data_packages").symlink_to(
            outside, target_is_directory=True
        )
    with system.session() as s:
        make_dtp_at_source_buffer(system, s, n_packages=1)
    drive(system.session, transfer_manager.run_once, cycles=1)
    assert _tree(outside) == []
    with system.session() as s:
        unpacked = s.scalars(
            select(m.DataTransfer).where(m.DataTransfer.unpack_status == m.Status.COMPLETED)
        ).all()
        assert unpacked == []
