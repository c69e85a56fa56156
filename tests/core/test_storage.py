"""Storage backends: disk and S3 (a real moto server on loopback) behave the same."""

from __future__ import annotations

import enum
import errno
import hashlib
import os
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from ccat_data_transfer.core.storage import (
    DiskStorage,
    ObjectNotFound,
    S3Storage,
    Storage,
    StorageError,
    StorageFullError,
    StorageUnavailableError,
    is_temp_name,
    normalize_path,
    storage_for_location,
)


class _StorageType(enum.Enum):
    DISK = "disk"
    S3 = "s3"
    TAPE = "tape"


def _s3(server, bucket: str, prefix: str = "") -> S3Storage:
    return S3Storage(
        server.endpoint_url,
        bucket,
        prefix=prefix,
        access_key=server.access_key,
        secret_key=server.secret_key,
        region=server.region,
    )


@pytest.fixture(params=["disk", "s3", "s3-prefixed"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "disk":
        return DiskStorage(tmp_path / "root", create=True)
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return _s3(server, bucket, "site/buffer" if request.param == "s3-prefixed" else "")


def _raw_names(store: Storage, request: pytest.FixtureRequest) -> list[str]:
    """Everything physically present, bypassing the backend's own filtering."""
    if isinstance(store, DiskStorage):
        return sorted(
            str(Path(d, f).relative_to(store.root))
            for d, _, files in os.walk(store.root)
            for f in files
        )
    client = request.getfixturevalue("s3_server").client()
    resp = client.list_objects_v2(Bucket=store.bucket)
    uploads = client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])
    return sorted(o["Key"] for o in resp.get("Contents", [])) + [
        "upload:" + u["Key"] for u in uploads
    ]


def _write(store: Storage, path: str, data: bytes) -> None:
    with store.open_write(path) as f:
        f.write(data)


# --- basic operations -----------------------------------------------------------------------


def test_write_then_read_returns_same_bytes(store: Storage) -> None:
    _write(store, "a/b/c.dat", b"hello world")
    with store.open_read("a/b/c.dat") as f:
        assert f.read() == b"hello world"


def test_stat_reports_size_and_mtime_and_none_when_missing(store: Storage) -> None:
    before = time.time() - 5
    _write(store, "x/y.bin", b"12345")
    info = store.stat("x/y.bin")
    assert info is not None
    assert (info.path, info.size) == ("x/y.bin", 5)
    assert before <= info.mtime <= time.time() + 5
    assert store.stat("x/missing.bin") is None
    assert store.exists("x/y.bin") and not store.exists("x/missing.bin")


def test_open_read_of_missing_object_raises_object_not_found(store: Storage) -> None:
    with pytest.raises(ObjectNotFound):
        store.open_read("nope/nothing.dat")


def test_large_write_spanning_several_parts_round_trips(store: Storage) -> None:
    data = os.urandom(1024 * 1024) * 19  # 19 MiB: three S3 multipart parts
    with store.open_write("big/blob") as f:
        for i in range(0, len(data), 3 * 1024 * 1024 + 7):
            f.write(data[i : i + 3 * 1024 * 1024 + 7])
    assert store.stat("big/blob").size == len(data)
    assert store.sha256("big/blob") == hashlib.sha256(data).hexdigest()


def test_empty_object_can_be_written_and_read(store: Storage) -> None:
    _write(store, "empty", b"")
    assert store.stat("empty").size == 0
    with store.open_read("empty") as f:
        assert f.read() == b""


def test_open_write_replaces_existing_object(store: Storage) -> None:
    _write(store, "f", b"old")
    _write(store, "f", b"new content")
    with store.open_read("f") as f:
        assert f.read() == b"new content"


# --- atomic writes --------------------------------------------------------------------------


def test_exception_mid_write_leaves_no_object_and_no_temp_files(
    store: Storage, request: pytest.FixtureRequest
) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with store.open_write("dir/package.tar") as f:
            f.write(os.urandom(10 * 1024 * 1024))  # past the first S3 part
            raise RuntimeError("boom")
    assert store.stat("dir/package.tar") is None
    assert _raw_names(store, request) == []
    assert list(store.list()) == []


def test_exception_mid_overwrite_keeps_old_content(store: Storage) -> None:
    _write(store, "keep.dat", b"original")
    with pytest.raises(RuntimeError):
        with store.open_write("keep.dat") as f:
            f.write(b"partial")
            raise RuntimeError("fail")
    with store.open_read("keep.dat") as f:
        assert f.read() == b"original"


def test_object_is_invisible_until_write_finishes(store: Storage) -> None:
    with store.open_write("pending.dat") as f:
        f.write(b"some data")
        assert store.stat("pending.dat") is None
        assert [i.path for i in store.list()] == []
    assert store.stat("pending.dat").size == 9


def test_disk_write_uses_temp_name_in_same_directory(tmp_path: Path) -> None:
    store = DiskStorage(tmp_path, create=True)
    with store.open_write("d/file.txt") as f:
        f.write(b"x")
        f.flush()
        names = os.listdir(tmp_path / "d")
        assert len(names) == 1 and is_temp_name(names[0]) and "file.txt" in names[0]
    assert os.listdir(tmp_path / "d") == ["file.txt"]


# --- ENOSPC ---------------------------------------------------------------------------------


def test_disk_enospc_during_write_raises_storage_full_and_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The filesystem fills after 1 MiB: the real write path gets ENOSPC from os.write."""
    root = tmp_path / "root"
    store = DiskStorage(root, create=True)
    real_write = os.write
    written = {"n": 0}

    def filling_write(fd: int, data) -> int:
        target = os.readlink(f"/proc/self/fd/{fd}")
        if not target.startswith(str(root)):
            return real_write(fd, data)
        room = 1024 * 1024 - written["n"]
        if room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real_write(fd, memoryview(data)[:room])
        written["n"] += n
        return n

    monkeypatch.setattr(os, "write", filling_write)
    with pytest.raises(StorageFullError, match="no space left"):
        with store.open_write("obs/raw.tar") as f:
            for _ in range(4):
                f.write(b"\0" * 1024 * 1024)
    assert written["n"] == 1024 * 1024  # the data really went to the file first
    assert store.stat("obs/raw.tar") is None
    assert [p for p in root.rglob("*") if p.is_file()] == []


def test_storage_full_error_is_a_storage_error() -> None:
    assert issubclass(StorageFullError, StorageError)
    assert issubclass(StorageUnavailableError, StorageError)
    assert issubclass(ObjectNotFound, StorageError)


# --- listing and deletion -------------------------------------------------------------------


def test_list_is_recursive_with_relative_paths(store: Storage) -> None:
    for p in ["a/1", "a/b/2", "a/b/c/3", "ab/4", "z"]:
        _write(store, p, p.encode())
    assert sorted(i.path for i in store.list()) == ["a/1", "a/b/2", "a/b/c/3", "ab/4", "z"]
    assert sorted(i.path for i in store.list("a/")) == ["a/1", "a/b/2", "a/b/c/3"]
    assert sorted(i.path for i in store.list("a")) == ["a/1", "a/b/2", "a/b/c/3", "ab/4"]
    assert sorted(i.path for i in store.list("a/b/c")) == ["a/b/c/3"]
    assert list(store.list("nothing/")) == []
    sizes = {i.path: i.size for i in store.list()}
    assert sizes["a/b/c/3"] == len(b"a/b/c/3")


def test_list_skips_temp_files_of_unfinished_writes(tmp_path: Path) -> None:
    store = DiskStorage(tmp_path, create=True)
    _write(store, "d/real.dat", b"1")
    (tmp_path / "d" / ".real2.dat.tmp-0123abcd").write_bytes(b"partial")
    (tmp_path / "d" / ".unpack.tmp-x1y2z3").mkdir()
    (tmp_path / "d" / ".unpack.tmp-x1y2z3" / "inner.dat").write_bytes(b"partial")
    assert [i.path for i in store.list()] == ["d/real.dat"]


def test_long_names_still_get_valid_temp_names(tmp_path: Path) -> None:
    store = DiskStorage(tmp_path, create=True)
    name = "n" * 250
    _write(store, f"d/{name}", b"1")
    assert [i.path for i in store.list()] == [f"d/{name}"]


def test_delete_is_idempotent(store: Storage) -> None:
    _write(store, "del/me", b"x")
    assert store.delete("del/me") is True
    assert store.stat("del/me") is None
    assert store.delete("del/me") is False
    assert store.delete("never/existed") is False


def test_usage_and_tree_bytes(store: Storage) -> None:
    _write(store, "u/1", b"x" * 1000)
    _write(store, "u/2", b"y" * 234)
    assert store.tree_bytes() == 1234
    assert store.tree_bytes("u/2") == 234
    usage = store.usage()
    if isinstance(store, DiskStorage):
        assert usage.total_bytes and 0 < usage.used_bytes <= usage.total_bytes
        assert 0 < usage.percent_used <= 100
    else:
        assert usage.used_bytes == 1234 and usage.total_bytes is None
        assert usage.percent_used is None


# --- helpers --------------------------------------------------------------------------------


def test_copy_in_copy_out_and_sha256(store: Storage, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 11)
    src = tmp_path / "local_src.bin"
    src.write_bytes(data)
    assert store.copy_in(src, "c/obj.bin") == len(data)
    assert store.sha256("c/obj.bin") == hashlib.sha256(data).hexdigest()
    dst = tmp_path / "out" / "copy.bin"
    dst.parent.mkdir()
    assert store.copy_out("c/obj.bin", dst) == len(data)
    assert dst.read_bytes() == data
    assert os.listdir(dst.parent) == ["copy.bin"]


def test_local_path_is_real_path_for_disk_and_none_for_s3(store: Storage) -> None:
    _write(store, "lp/f", b"1")
    lp = store.local_path("lp/f")
    if isinstance(store, DiskStorage):
        assert lp == store.root / "lp" / "f" and lp.read_bytes() == b"1"
    else:
        assert lp is None


# --- path safety ----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["/etc/passwd", "../x", "a/../../x", "a/..", "..", "", "a\0b"])
def test_paths_escaping_the_root_are_rejected(store: Storage, bad: str) -> None:
    for op in (store.stat, store.exists, store.delete, store.open_read, store.local_path):
        with pytest.raises(ValueError):
            op(bad)
    with pytest.raises(ValueError):
        with store.open_write(bad) as f:
            f.write(b"x")


def test_list_prefix_escaping_the_root_is_rejected(store: Storage) -> None:
    with pytest.raises(ValueError):
        list(store.list("../"))
    with pytest.raises(ValueError):
        list(store.list("/abs"))


def test_normalize_path_removes_dots_and_double_slashes() -> None:
    assert normalize_path("./a//b/./c") == "a/b/c"
    assert normalize_path("", allow_empty=True) == ""


def test_disk_path_through_symlink_out_of_root_is_rejected(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "evil").symlink_to(outside)
    store = DiskStorage(root)
    with pytest.raises(ValueError, match="outside"):
        with store.open_write("evil/x") as f:
            f.write(b"x")
    with pytest.raises(ValueError):
        store.delete("evil/x")
    assert list(outside.iterdir()) == []
    assert list(store.list()) == []


def test_disk_missing_root_is_unavailable(tmp_path: Path) -> None:
    store = DiskStorage(tmp_path / "not-mounted")
    with pytest.raises(StorageUnavailableError):
        store.stat("x")
    with pytest.raises(StorageUnavailableError):
        with store.open_write("x") as f:
            f.write(b"1")
    with pytest.raises(StorageUnavailableError):
        store.usage()
    assert not (tmp_path / "not-mounted").exists()


# --- S3 failure modes -----------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_s3_unreachable_server_fails_fast_as_unavailable() -> None:
    store = S3Storage(
        f"http://127.0.0.1:{_closed_port()}", "bucket", access_key="k", secret_key="s"
    )
    t0 = time.monotonic()
    with pytest.raises(StorageUnavailableError, match="unreachable"):
        store.stat("x")
    with pytest.raises(StorageUnavailableError):
        with store.open_write("x") as f:
            f.write(b"abc")
    with pytest.raises(StorageUnavailableError):
        list(store.list())
    assert time.monotonic() - t0 < 10  # three calls, each refused at once, few retries


def test_s3_missing_bucket_is_unavailable_not_missing_object(s3_server) -> None:
    store = _s3(s3_server, "no-such-bucket-here")
    with pytest.raises(StorageUnavailableError, match="does not exist"):
        store.stat("x")
    with pytest.raises(StorageUnavailableError):
        list(store.list())
    with pytest.raises(StorageUnavailableError):
        _write(store, "x", b"1")


def test_s3_prefix_keeps_objects_under_prefix(s3_server, s3_bucket: str) -> None:
    store = _s3(s3_server, s3_bucket, "site/lta")
    _write(store, "pkg/a.tar", b"1")
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert keys == ["site/lta/pkg/a.tar"]
    other = _s3(s3_server, s3_bucket, "site")
    assert [i.path for i in other.list()] == ["lta/pkg/a.tar"]


def test_s3_credentials_default_to_settings(s3_server, s3_bucket: str) -> None:
    from ccat_data_transfer.core.config import settings

    saved = {k: settings.get(k) for k in ("S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY")}
    settings.set("S3_ACCESS_KEY_ID", "from-settings-key")
    settings.set("S3_SECRET_ACCESS_KEY", "from-settings-secret")
    try:
        store = S3Storage(s3_server.endpoint_url, s3_bucket)
        creds = store.client._request_signer._credentials
        assert (creds.access_key, creds.secret_key) == ("from-settings-key", "from-settings-secret")
        _write(store, "k", b"v")  # moto accepts any key: the request goes through
        assert store.exists("k")
    finally:
        for k, v in saved.items():
            settings.set(k, v)


# --- factory --------------------------------------------------------------------------------


def test_storage_for_location_builds_disk_and_s3(tmp_path: Path, s3_server, s3_bucket) -> None:
    disk = storage_for_location(SimpleNamespace(storage_type=_StorageType.DISK, path=tmp_path))
    assert isinstance(disk, DiskStorage) and disk.root == tmp_path
    s3loc = SimpleNamespace(
        name="cologne_lta",
        storage_type=_StorageType.S3,
        endpoint_url=s3_server.endpoint_url,
        bucket=s3_bucket,
        prefix="lta",
    )
    s3 = storage_for_location(s3loc)
    assert isinstance(s3, S3Storage) and (s3.bucket, s3.prefix) == (s3_bucket, "lta")


def test_storage_for_tape_location_raises_clear_error() -> None:
    loc = SimpleNamespace(name="tape1", storage_type=_StorageType.TAPE)
    with pytest.raises(StorageError, match="tape locations are not supported"):
        storage_for_location(loc)
