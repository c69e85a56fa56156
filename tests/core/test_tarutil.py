"""Tar packaging with one-pass checksums, and extraction that refuses hostile archives."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

from ccat_data_transfer.core.tarutil import (
    CorruptTarError,
    TarMember,
    TarSourceChangedError,
    UnsafeTarError,
    list_tar_members,
    safe_extract,
    sha256_file,
    write_tar_with_checksums,
)
from ccat_data_transfer.core.tarutil.writing import _LAYOUTS

SIZES = {
    "obs1/module0/empty.dat": 0,
    "obs1/module0/one.dat": 1,
    "obs1/module0/block.dat": 512,
    "obs1/module1/block_plus.dat": 513,
    "obs1/module1/deep/er/chunks.dat": 3 * 4096 + 17,
    "obs2/big.dat": 200_000,
    "top.txt": 511,
}


@pytest.fixture
def source(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "src"
    paths = {}
    for i, (rel, size) in enumerate(SIZES.items()):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(size))
        os.utime(p, (1_700_000_000 + i, 1_700_000_000 + i))
        paths[rel] = p
    return paths


def _members(paths: dict[str, Path], with_expected: bool = False) -> list[TarMember]:
    return [
        TarMember(rel, p, p.stat().st_size, sha256_file(p) if with_expected else None)
        for rel, p in paths.items()
    ]


def _write(members: list[TarMember], out_path: Path, **kw):
    with open(out_path, "wb") as f:
        return write_tar_with_checksums(members, f, **kw)


# --- writing --------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", _LAYOUTS)
def test_tar_round_trip_checksums_match_hashlib_and_tarfile_reads_it(
    source: dict[str, Path], tmp_path: Path, layout: str
) -> None:
    out = tmp_path / "pkg.tar"
    # A small buffer so files span several chunks and the buffer pool is recycled.
    result = _write(_members(source, with_expected=True), out, bufsize=4096, _layout=layout)
    data = out.read_bytes()
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert result.size == len(data) and len(data) % 10240 == 0
    assert result.mismatches == [] and result.ok
    for rel, p in source.items():
        assert result.member_sha256[rel] == hashlib.sha256(p.read_bytes()).hexdigest()
    with tarfile.open(out) as tf:
        assert tf.getnames() == list(SIZES)  # directory structure kept, order kept
        for info in tf.getmembers():
            assert info.isreg()
            assert tf.extractfile(info).read() == source[info.name].read_bytes()
            assert info.mtime == int(source[info.name].stat().st_mtime)


def test_tar_is_deterministic_with_neutral_owner(source: dict[str, Path], tmp_path: Path) -> None:
    a = _write(_members(source), tmp_path / "a.tar")
    b = _write(_members(source), tmp_path / "b.tar", bufsize=1024, _layout="serial")
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert a.sha256 == b.sha256
    with tarfile.open(tmp_path / "a.tar") as tf:
        for info in tf.getmembers():
            assert (info.uid, info.gid, info.uname, info.gname) == (0, 0, "", "")
            assert info.mode == 0o644


def test_system_tar_lists_the_archive(source: dict[str, Path], tmp_path: Path) -> None:
    import shutil
    import subprocess

    if shutil.which("tar") is None:
        pytest.skip("no tar binary")
    _write(_members(source), tmp_path / "p.tar")
    names = subprocess.run(
        ["tar", "-tf", str(tmp_path / "p.tar")], check=True, capture_output=True, text=True
    ).stdout.split()
    assert names == list(SIZES)


def test_long_and_unicode_names_round_trip(tmp_path: Path) -> None:
    rel = "/".join(["d" * 60] * 4) + "/fïlé_ñame.dat"
    p = tmp_path / "src" / rel
    p.parent.mkdir(parents=True)
    p.write_bytes(b"content")
    _write([TarMember(rel, p, 7)], tmp_path / "long.tar")
    extracted = safe_extract(tmp_path / "long.tar", tmp_path / "dest")
    assert [e.arcname for e in extracted] == [rel]
    assert (tmp_path / "dest" / rel).read_bytes() == b"content"


def test_checksum_mismatch_is_reported_not_hidden(source: dict[str, Path], tmp_path: Path) -> None:
    members = _members(source, with_expected=True)
    bad = members[1]
    members[1] = TarMember(bad.arcname, bad.source_path, bad.size, "0" * 64)
    expected = {"top.txt": "f" * 64}
    result = _write(members, tmp_path / "m.tar", expected=expected)
    assert not result.ok
    actual = {rel: sha256_file(p) for rel, p in source.items()}
    assert sorted(result.mismatches) == sorted(
        [
            (bad.arcname, "0" * 64, actual[bad.arcname]),
            ("top.txt", "f" * 64, actual["top.txt"]),
        ]
    )


def test_expected_dict_overrides_member_checksum(source: dict[str, Path], tmp_path: Path) -> None:
    members = [TarMember(m.arcname, m.source_path, m.size, "0" * 64) for m in _members(source)]
    right = {rel: sha256_file(p).upper() for rel, p in source.items()}
    assert _write(members, tmp_path / "x.tar", expected=right).mismatches == []


def test_size_differing_from_registered_size_is_an_error(
    source: dict[str, Path], tmp_path: Path
) -> None:
    p = source["top.txt"]
    with pytest.raises(TarSourceChangedError, match="expected 999"):
        write_tar_with_checksums([TarMember("top.txt", p, 999)], io.BytesIO())


def test_file_growing_while_being_read_is_an_error(tmp_path: Path) -> None:
    p = tmp_path / "growing.dat"
    p.write_bytes(b"a" * 10_000)

    class AppendOnFirstWrite(io.BytesIO):
        """An output stream whose first data write makes the source file grow."""

        grown = False

        def write(self, b) -> int:
            if not self.grown and len(b) == 1024:
                self.grown = True
                with open(p, "ab") as f:
                    f.write(b"more")
            return super().write(b)

    with pytest.raises(TarSourceChangedError, match="changed while being packaged"):
        write_tar_with_checksums([TarMember("g", p, 10_000)], AppendOnFirstWrite(), bufsize=1024)


def test_file_shrinking_while_being_read_is_an_error(tmp_path: Path) -> None:
    p = tmp_path / "shrinking.dat"
    p.write_bytes(b"a" * 10_000)

    class TruncateOnFirstWrite(io.BytesIO):
        done = False

        def write(self, b) -> int:
            if not self.done and len(b) == 1024:
                self.done = True
                os.truncate(p, 2048)
            return super().write(b)

    with pytest.raises(TarSourceChangedError, match="shrank"):
        write_tar_with_checksums([TarMember("s", p, 10_000)], TruncateOnFirstWrite(), bufsize=1024)


@pytest.mark.parametrize("name", ["/abs/path", "../up", "a/../../b", "", "."])
def test_unsafe_arcnames_are_refused_when_writing(tmp_path: Path, name: str) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"x")
    with pytest.raises(ValueError):
        write_tar_with_checksums([TarMember(name, p, 1)], io.BytesIO())


def test_duplicate_arcnames_are_refused(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"x")
    with pytest.raises(ValueError, match="duplicate"):
        write_tar_with_checksums([TarMember("a/f", p, 1), TarMember("./a/f", p, 1)], io.BytesIO())


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    p = tmp_path / "f"
    data = os.urandom(3 * 1024 * 1024 + 5)
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()
    assert sha256_file(p, bufsize=4096) == hashlib.sha256(data).hexdigest()


# --- extraction -----------------------------------------------------------------------------


def test_safe_extract_round_trip_with_checksums(source: dict[str, Path], tmp_path: Path) -> None:
    result = _write(_members(source), tmp_path / "p.tar")
    dest = tmp_path / "dest"
    extracted = safe_extract(tmp_path / "p.tar", dest, bufsize=4096)
    assert [e.arcname for e in extracted] == list(SIZES)
    for e in extracted:
        assert e.path == dest / e.arcname
        assert e.path.read_bytes() == source[e.arcname].read_bytes()
        assert e.sha256 == result.member_sha256[e.arcname] == sha256_file(e.path)
        assert e.size == SIZES[e.arcname]
        assert int(e.path.stat().st_mtime) == int(source[e.arcname].stat().st_mtime)
    leftovers = [p.name for p in dest.rglob("*") if ".tmp-" in p.name]
    assert leftovers == []


def test_list_tar_members_reports_kinds(tmp_path: Path) -> None:
    tar = _hostile_tar(tmp_path / "k.tar", [_dir("d"), _file("d/f", b"abc"), _symlink("l", "d")])
    entries = list_tar_members(tar)
    assert [(e.arcname, e.kind, e.size) for e in entries] == [
        ("d", "dir", 0),
        ("d/f", "file", 3),
        ("l", "symlink", 0),
    ]


def _file(name: str, data: bytes = b"payload") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _dir(name: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    return info, None


def _symlink(name: str, target: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info, None


def _special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info, None


def _hostile_tar(path: Path, entries) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in entries:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _hostile_cases(outside: Path) -> dict[str, list]:
    return {
        "absolute": [_file("ok.txt"), _file(str(outside / "abs.txt"))],
        "dotdot": [_file("ok.txt"), _file("../escape.txt")],
        "nested_dotdot": [_file("a/ok.txt"), _file("a/b/../../../escape.txt")],
        "symlink": [_file("ok.txt"), _symlink("link", str(outside))],
        "relative_symlink": [_symlink("link", "../outside")],
        "hardlink": [_file("ok.txt"), _special("hard", tarfile.LNKTYPE, "/etc/passwd")],
        "chardev": [_file("ok.txt"), _special("dev", tarfile.CHRTYPE)],
        "blockdev": [_special("blk", tarfile.BLKTYPE)],
        "fifo": [_file("ok.txt"), _special("fifo", tarfile.FIFOTYPE)],
        "dir_symlink_then_file": [
            _symlink("d", str(outside)),
            _file("d/evil.txt", b"pwned"),
        ],
        "file_then_same_name_dir": [_file("x"), _file("x/y")],
        "duplicate": [_file("dup"), _file("dup", b"other")],
    }


HOSTILE = list(_hostile_cases(Path("/x")))


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_tar_is_refused_and_nothing_is_written(tmp_path: Path, case: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "work" / "dest"
    dest.mkdir(parents=True)
    tar = _hostile_tar(tmp_path / f"{case}.tar", _hostile_cases(outside)[case])
    with pytest.raises(UnsafeTarError, match="refusing tar member") as excinfo:
        safe_extract(tar, dest)
    assert isinstance(excinfo.value, ValueError)
    assert list(outside.iterdir()) == []
    assert list(dest.iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["dest"]


def test_member_through_existing_symlink_in_dest_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "data").symlink_to(outside)
    tar = _hostile_tar(tmp_path / "t.tar", [_file("safe.txt"), _file("data/evil.txt")])
    with pytest.raises(UnsafeTarError, match="data/evil.txt"):
        safe_extract(tar, dest)
    assert list(outside.iterdir()) == []
    assert sorted(p.name for p in dest.iterdir()) == ["data"]


def test_error_names_the_offending_member(tmp_path: Path) -> None:
    tar = _hostile_tar(tmp_path / "t.tar", [_file("fine"), _symlink("sneaky/link", "/etc")])
    with pytest.raises(UnsafeTarError, match=r"'sneaky/link'.*symbolic link"):
        safe_extract(tar, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_failure_during_extraction_removes_everything_written(
    source: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(_members(source), tmp_path / "p.tar")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "preexisting.txt").write_bytes(b"keep me")
    real_write = os.write
    calls = {"n": 0}

    def failing_write(fd: int, data) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(dest)):
            calls["n"] += 1
            if calls["n"] == 4:  # the disk fills while writing the fourth file
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", failing_write)
    with pytest.raises(OSError) as excinfo:
        safe_extract(tmp_path / "p.tar", dest)
    assert excinfo.value.errno == errno.ENOSPC
    assert calls["n"] == 4
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*")) == ["preexisting.txt"]
    assert (dest / "preexisting.txt").read_bytes() == b"keep me"


def test_overwrite_false_refuses_existing_files(source: dict[str, Path], tmp_path: Path) -> None:
    _write(_members(source), tmp_path / "p.tar")
    dest = tmp_path / "dest"
    (dest / "obs2").mkdir(parents=True)
    (dest / "obs2" / "big.dat").write_bytes(b"old")
    with pytest.raises(FileExistsError):
        safe_extract(tmp_path / "p.tar", dest, overwrite=False)
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*")) == ["obs2", "obs2/big.dat"]
    extracted = safe_extract(tmp_path / "p.tar", dest)  # default: replace
    assert len(extracted) == len(SIZES)
    assert (dest / "obs2" / "big.dat").read_bytes() == source["obs2/big.dat"].read_bytes()


def test_dot_slash_names_and_directory_entries_are_fine(tmp_path: Path) -> None:
    tar = _hostile_tar(
        tmp_path / "t.tar", [_dir("./"), _dir("./a"), _file("./a/f", b"1"), _dir("./empty")]
    )
    extracted = safe_extract(tar, tmp_path / "dest")
    assert [(e.arcname, e.size) for e in extracted] == [("a/f", 1)]
    assert (tmp_path / "dest" / "empty").is_dir()


# --- corruption -----------------------------------------------------------------------------


@pytest.fixture
def good_tar(source: dict[str, Path], tmp_path: Path) -> Path:
    out = tmp_path / "good.tar"
    _write(_members(source), out)
    return out


def _truncation_points(tar: Path) -> dict[str, int]:
    entries = list_tar_members(tar)
    big = next(e for e in entries if e.arcname == "obs2/big.dat")
    last = entries[-1]
    return {
        "inside_first_header": 100,
        "inside_data": big.offset_data + 1000,
        "inside_later_header": big.offset_data - 200,
        "at_member_boundary_before_end_marker": last.offset_data + 512,  # top.txt is 511 bytes
        "inside_last_data": last.offset_data + 10,
    }


@pytest.mark.parametrize(
    "where",
    [
        "inside_first_header",
        "inside_data",
        "inside_later_header",
        "at_member_boundary_before_end_marker",
        "inside_last_data",
    ],
)
def test_truncated_tar_raises_corrupt_tar_error(good_tar: Path, tmp_path: Path, where: str) -> None:
    cut = _truncation_points(good_tar)[where]
    bad = tmp_path / "cut.tar"
    bad.write_bytes(good_tar.read_bytes()[:cut])
    dest = tmp_path / "dest"
    with pytest.raises(CorruptTarError):
        safe_extract(bad, dest)
    assert not dest.exists()
    with pytest.raises(CorruptTarError):
        list_tar_members(bad)


def test_corrupted_header_in_the_middle_raises_corrupt_tar_error(
    good_tar: Path, tmp_path: Path
) -> None:
    entries = list_tar_members(good_tar)
    header_at = entries[3].offset_data - 512
    data = bytearray(good_tar.read_bytes())
    data[header_at + 10 : header_at + 20] = b"XXXXXXXXXX"  # breaks the header checksum
    bad = tmp_path / "bad.tar"
    bad.write_bytes(bytes(data))
    with pytest.raises(CorruptTarError, match="corrupt"):
        safe_extract(bad, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


@pytest.mark.parametrize("content", [b"", b"not a tar at all" * 100, os.urandom(4096)])
def test_garbage_is_a_corrupt_tar(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "g.tar"
    bad.write_bytes(content)
    with pytest.raises(CorruptTarError):
        safe_extract(bad, tmp_path / "dest")


def test_system_tar_output_is_accepted(source: dict[str, Path], tmp_path: Path) -> None:
    import shutil
    import subprocess

    if shutil.which("tar") is None:
        pytest.skip("no tar binary")
    root = tmp_path / "src"
    subprocess.run(["tar", "-cf", str(tmp_path / "sys.tar"), "-C", str(root), "."], check=True)
    extracted = safe_extract(tmp_path / "sys.tar", tmp_path / "dest")
    assert sorted(e.arcname for e in extracted) == sorted(SIZES)


# --- limits and modes (tar bombs, hostile modes) -------------------------------------------


def _tar_of(tmp_path, members: dict[str, tuple[bytes, int]]):
    import io
    import tarfile

    path = tmp_path / "in.tar"
    with tarfile.open(path, "w") as tf:
        for name, (data, mode) in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tf.addfile(info, io.BytesIO(data))
    return path


def test_a_tar_with_too_many_members_is_refused_before_anything_is_written(tmp_path):
    from ccat_data_transfer.core.tarutil import UnsafeTarError, safe_extract

    tar = _tar_of(tmp_path, {f"f{i}": (b"x", 0o644) for i in range(11)})
    dest = tmp_path / "out"
    with pytest.raises(UnsafeTarError, match="more than 10 members"):
        safe_extract(tar, dest, max_members=10)
    assert not dest.exists() or not any(dest.iterdir())


def test_a_tar_whose_files_exceed_the_byte_limit_is_refused(tmp_path):
    from ccat_data_transfer.core.tarutil import UnsafeTarError, safe_extract

    tar = _tar_of(tmp_path, {"a": (b"x" * 600, 0o644), "b": (b"y" * 600, 0o644)})
    dest = tmp_path / "out"
    with pytest.raises(UnsafeTarError, match="more than 1000 bytes"):
        safe_extract(tar, dest, max_total_bytes=1000)
    assert not dest.exists() or not any(dest.iterdir())


def test_the_member_limit_is_a_setting(tmp_path, override_settings):
    from ccat_data_transfer.core.tarutil import UnsafeTarError, safe_extract

    override_settings(EXTRACT_MAX_MEMBERS=3)
    tar = _tar_of(tmp_path, {f"f{i}": (b"x", 0o644) for i in range(4)})
    with pytest.raises(UnsafeTarError, match="EXTRACT_MAX_MEMBERS"):
        safe_extract(tar, tmp_path / "out")


def test_extracted_modes_are_normalised_no_setuid_no_world_write(tmp_path):
    import stat

    from ccat_data_transfer.core.tarutil import safe_extract

    tar = _tar_of(
        tmp_path,
        {"suid": (b"x", 0o4777), "world": (b"y", 0o666), "private": (b"z", 0o400)},
    )
    dest = tmp_path / "out"
    safe_extract(tar, dest)
    for name in ("suid", "world", "private"):
        mode = stat.S_IMODE((dest / name).stat().st_mode)
        assert not mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX), (name, oct(mode))
        assert not mode & (stat.S_IWGRP | stat.S_IWOTH), (name, oct(mode))
        assert mode & stat.S_IRUSR and mode & stat.S_IWUSR, (name, oct(mode))


@pytest.mark.parametrize("name", [".scan.tmp-7/obs1.fits", "a/.unpack.tmp-x/b", "a/.f.tmp-1"])
def test_a_member_under_a_temporary_name_is_refused_when_writing(tmp_path: Path, name: str):
    p = tmp_path / "f"
    p.write_bytes(b"x")
    component = next(c for c in name.split("/") if ".tmp-" in c)
    with pytest.raises(ValueError, match=f"temporary name '{component}'"):
        write_tar_with_checksums([TarMember(name, p, 1)], io.BytesIO())


def test_a_member_under_a_temporary_name_is_refused_when_extracting(tmp_path: Path) -> None:
    # Written by another tool (tarfile): the storage would hide the member and the
    # janitor sweep it away, so it never reaches the destination.
    tar = _hostile_tar(tmp_path / "t.tar", [_file("ok.txt"), _file(".scan.tmp-7/obs1.fits")])
    dest = tmp_path / "dest"
    with pytest.raises(UnsafeTarError, match=r"'\.scan\.tmp-7/obs1\.fits'.*temporary name"):
        safe_extract(tar, dest)
    assert not dest.exists() or list(dest.iterdir()) == []
