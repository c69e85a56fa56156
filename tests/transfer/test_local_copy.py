"""The local copy path: bytes moved by the kernel (copy_file_range, then sendfile, then one
reused buffer) into a temporary name that is fsynced and renamed, and verified by checksum
by the hop that copied."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest
from sqlalchemy import select

from ccat_data_transfer import transfer_manager
from ccat_data_transfer.core import fileio
from ccat_data_transfer.core.fileio import COPY_METHODS, copy_fd
from ccat_data_transfer.core.storage import DiskStorage, StorageFullError
from ccat_data_transfer.core.transfer_methods import CopyMethod
from ccat_ops_db import models as m
from helpers_transfer import drive, make_dtp_at_source_buffer

SIZE = 3 * 1024 * 1024 + 12345  # several kernel and buffer steps, not a whole number of them


def _data(size: int = SIZE) -> bytes:
    block = os.urandom(64 * 1024)
    return (block * (size // len(block) + 1))[:size]


def _source(tmp_path: Path, data: bytes) -> Path:
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    return src


def _temp_names(root: Path) -> list[str]:
    return [p.name for p in root.rglob("*") if ".tmp-" in p.name]


@pytest.mark.parametrize("methods", [COPY_METHODS, ("sendfile", "readinto"), ("readinto",)])
def test_copy_fd_copies_every_byte_with_the_method_asked_for(tmp_path, methods):
    data = _data()
    src = _source(tmp_path, data)
    dst = tmp_path / "dst.bin"
    with open(src, "rb") as r, open(dst, "wb") as w:
        n, used = copy_fd(r.fileno(), w.fileno(), methods, bufsize=256 * 1024)
    assert n == len(data) and used == methods[0]
    assert dst.read_bytes() == data


def test_copy_fd_refuses_unknown_methods(tmp_path):
    with pytest.raises(ValueError, match="copy methods"):
        copy_fd(0, 1, ("splice",))


def test_copy_fd_from_a_pipe_falls_back_to_the_buffer(tmp_path):
    # Neither copy_file_range nor sendfile reads from a pipe: the kernel refuses both
    # (EINVAL), and the copy carries on through the reused buffer.
    data = _data(200_000)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child writes the pipe and exits
        os.close(r)
        view = memoryview(data)
        while view:
            view = view[os.write(w, view) :]
        os._exit(0)
    os.close(w)
    dst = tmp_path / "from-pipe.bin"
    try:
        with open(dst, "wb") as out:
            n, used = copy_fd(r, out.fileno())
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    assert (n, used) == (len(data), "readinto")
    assert dst.read_bytes() == data


def test_copy_fd_continues_where_an_unsupported_method_stopped(tmp_path, monkeypatch):
    # copy_file_range moves part of the file, then the filesystem refuses it (EXDEV):
    # sendfile carries on from the offsets both files reached, nothing twice or lost.
    data = _data()
    src = _source(tmp_path, data)
    real = os.copy_file_range
    calls = {"n": 0}

    def refuses_after_one(src_fd, dst_fd, count):
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(src_fd, dst_fd, 1024 * 1024)

    monkeypatch.setattr(os, "copy_file_range", refuses_after_one)
    dst = tmp_path / "dst.bin"
    with open(src, "rb") as r, open(dst, "wb") as w:
        n, used = copy_fd(r.fileno(), w.fileno())
    assert (n, used) == (len(data), "sendfile") and calls["n"] == 2
    assert dst.read_bytes() == data


def test_copy_in_fsyncs_the_temporary_name_then_renames_it_then_fsyncs_the_directory(
    tmp_path, monkeypatch
):
    data = _data()
    src = _source(tmp_path, data)
    store = DiskStorage(tmp_path / "store", create=True)
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(a, b, **dir_fds):
        # Names relative to their folder's descriptor (no symlink followed): shown whole.
        full = [
            os.path.join(os.readlink(f"/proc/self/fd/{dir_fds[k]}"), os.fspath(p))
            if k in dir_fds
            else os.fspath(p)
            for k, p in (("src_dir_fd", a), ("dst_dir_fd", b))
        ]
        events.append(("rename", f"{full[0]} -> {full[1]}"))
        return real_replace(a, b, **dir_fds)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    assert store.copy_in(src, "a/b/pkg.tar") == len(data)
    final = store.root / "a" / "b" / "pkg.tar"
    kinds = [e[0] for e in events]
    assert kinds == ["fsync", "rename", "fsync"], events
    tmp = events[0][1]
    assert Path(tmp).parent == final.parent and Path(tmp).name.startswith(".pkg.tar.tmp-")
    assert events[1][1] == f"{tmp} -> {final}"
    assert events[2][1] == str(final.parent)
    assert final.read_bytes() == data
    assert _temp_names(store.root) == []


@pytest.mark.parametrize("methods", [COPY_METHODS, ("sendfile",), ("readinto",)])
@pytest.mark.parametrize("fault", [errno.EIO, errno.ENOSPC])
def test_fault_mid_copy_leaves_no_final_file_and_no_temporary_name(
    tmp_path, monkeypatch, methods, fault
):
    data = _data()
    src = _source(tmp_path, data)
    store = DiskStorage(tmp_path / "store", create=True)
    store.copy_in(src, "old.tar")  # an object of the same name must survive a failed overwrite
    calls = {"n": 0}
    name, real = {
        "copy_file_range": ("copy_file_range", os.copy_file_range),
        "sendfile": ("sendfile", os.sendfile),
        "readinto": ("write", os.write),
    }[methods[0]]
    dst_arg = 1 if name == "copy_file_range" else 0

    def failing(*args):  # the second step into a temporary name fails
        if ".tmp-" in os.readlink(f"/proc/self/fd/{args[dst_arg]}"):
            calls["n"] += 1
            if calls["n"] % 2 == 0:
                raise OSError(fault, os.strerror(fault))
            if name == "write":
                return real(args[0], args[1][:65536])
            return real(*args[:-1], 65536)
        return real(*args)

    monkeypatch.setattr(os, name, failing)
    expected = StorageFullError if fault == errno.ENOSPC else OSError
    with pytest.raises(expected):
        store.copy_in(src, "new.tar", methods=methods)
    with pytest.raises(expected):
        store.copy_in(src, "old.tar", methods=methods)
    assert calls["n"] > 2
    assert not (store.root / "new.tar").exists()
    assert (store.root / "old.tar").read_bytes() == data
    assert _temp_names(store.root) == []


def test_copy_between_filesystems(tmp_path):
    # /dev/shm (tmpfs) and the test's directory are different filesystems: the kernel may
    # refuse copy_file_range across them, and the copy still lands whole.
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem")
    data = _data()
    src_root = Path(os.environ.get("CCAT_TEST_SHM", shm)) / f"ccat-copy-{os.getpid()}"
    try:
        src = DiskStorage(src_root, create=True)
        with src.open_write("pkg.tar") as f:
            f.write(data)
        dst = DiskStorage(tmp_path / "dst", create=True)
        with open(tmp_path / "log.txt", "w") as log:
            stats = CopyMethod().transfer(src, "pkg.tar", dst, "pkg.tar", log)
        assert stats.bytes == len(data)
        assert (dst.root / "pkg.tar").read_bytes() == data
        assert dst.sha256("pkg.tar") == hashlib.sha256(data).hexdigest()
        # And back, each method forced: every one of them crosses filesystems.
        for methods in (("copy_file_range", "readinto"), ("sendfile",), ("readinto",)):
            assert src.copy_in(dst.root / "pkg.tar", f"back-{methods[0]}.tar", methods=methods)
            assert (src.root / f"back-{methods[0]}.tar").read_bytes() == data
    finally:
        import shutil

        shutil.rmtree(src_root, ignore_errors=True)


def test_copy_hop_of_a_missing_source_is_object_not_found(tmp_path):
    from ccat_data_transfer.core.storage import ObjectNotFound

    src = DiskStorage(tmp_path / "a", create=True)
    dst = DiskStorage(tmp_path / "b", create=True)
    with open(tmp_path / "log.txt", "w") as log, pytest.raises(ObjectNotFound):
        CopyMethod().transfer(src, "nope.tar", dst, "nope.tar", log)
    assert list(dst.root.iterdir()) == []


def test_paced_copy_streams_through_one_buffer(tmp_path, override_settings, monkeypatch):
    # A bandwidth limit takes the stream path (the kernel copy cannot be paced).
    override_settings(TRANSFER_BANDWIDTH_LIMIT_MB_PER_S=1000)
    data = _data()
    src = DiskStorage(tmp_path / "a", create=True)
    dst = DiskStorage(tmp_path / "b", create=True)
    with src.open_write("x.tar") as f:
        f.write(data)
    kernel: list[int] = []
    monkeypatch.setattr(fileio, "copy_fd", lambda *a, **k: kernel.append(1))
    with open(tmp_path / "log.txt", "w") as log:
        assert CopyMethod().transfer(src, "x.tar", dst, "x.tar", log).bytes == len(data)
    assert kernel == [] and (dst.root / "x.tar").read_bytes() == data


def test_corruption_in_the_kernel_copy_is_caught_by_the_hop_checksum(system, monkeypatch):
    # The real copy method, its bytes corrupted once on their way: the transfer's read-back
    # checksum catches it, the copy is removed, and the retry lands the right bytes.
    real = os.copy_file_range
    corrupted: list[int] = []

    def corrupting(src_fd, dst_fd, count):
        n = real(src_fd, dst_fd, count)
        if n and not corrupted:  # flip the last byte this call wrote
            at = os.lseek(dst_fd, 0, os.SEEK_CUR) - 1
            fd = os.open(f"/proc/self/fd/{dst_fd}", os.O_RDWR)
            try:
                os.pwrite(fd, bytes([os.pread(fd, 1, at)[0] ^ 0xFF]), at)
            finally:
                os.close(fd)
            corrupted.append(at)
        return n

    monkeypatch.setattr(os, "copy_file_range", corrupting)
    with system.session() as s:
        dtp = make_dtp_at_source_buffer(system, s, n_packages=1)
        dtp_id, rel, checksum = dtp.id, dtp.relative_path, dtp.checksum
        drive(system.session, transfer_manager.run_once, cycles=1)
        t = s.scalars(
            select(m.DataTransfer).where(m.DataTransfer.data_transfer_package_id == dtp_id)
        ).one()
        assert corrupted and t.retry_count == 1 and "checksum mismatch" in t.failure_reason
        dest = system.location_path(t.destination_location.name)
        assert not (dest / rel).exists()
        drive(system.session, transfer_manager.run_once, cycles=1)
        s.refresh(t)
        assert t.status == m.Status.COMPLETED
        assert hashlib.sha256((dest / rel).read_bytes()).hexdigest() == checksum
