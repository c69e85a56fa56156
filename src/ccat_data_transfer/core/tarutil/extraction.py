"""Reading tars back: :func:`~ccat_data_transfer.core.tarutil.list_tar_members` and
:func:`~ccat_data_transfer.core.tarutil.safe_extract`, the only way the
pipeline unpacks a tar.

:func:`~ccat_data_transfer.core.tarutil.safe_extract` validates every member first (no absolute
paths, no ``..``, no links or devices, nothing that resolves outside the destination),
writes each file atomically while hashing it, and removes what it wrote if anything goes
wrong.  A truncated or damaged archive is
:class:`~ccat_data_transfer.core.tarutil.common.CorruptTarError` (``tarfile`` alone would read it
as a shorter valid one).

Room in the house: core.  Imports :mod:`ccat_data_transfer.core.tarutil.common` and
:mod:`ccat_data_transfer.core.fileio` only.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tarfile
import uuid
from pathlib import Path
from typing import BinaryIO

from ccat_data_transfer.core.config import settings
from ccat_data_transfer.core.fileio import (
    SymlinkInPathError,
    buffer_size,
    fadvise_sequential,
    fsync_dir,
    open_dir_beneath,
    parent_beneath,
)
from ccat_data_transfer.core.tarutil.common import (
    BLOCKSIZE,
    DEFAULT_BUFSIZE,
    ZERO_BLOCK,
    CorruptTarError,
    ExtractedMember,
    TarEntry,
    UnsafeTarError,
    normalize_arcname,
)

__all__ = ["list_tar_members", "safe_extract"]

# Member kinds, tested in this order (a sparse file is also a regular one).
_KIND_TESTS = (
    (tarfile.TarInfo.issparse, "sparse"),
    (tarfile.TarInfo.isreg, "file"),
    (tarfile.TarInfo.isdir, "dir"),
    (tarfile.TarInfo.issym, "symlink"),
    (tarfile.TarInfo.islnk, "hardlink"),
    (tarfile.TarInfo.ischr, "chardev"),
    (tarfile.TarInfo.isblk, "blockdev"),
    (tarfile.TarInfo.isfifo, "fifo"),
)


def _kind(info: tarfile.TarInfo) -> str:
    return next((kind for test, kind in _KIND_TESTS if test(info)), "other")


_KIND_WORDS = {
    "symlink": "symbolic link",
    "hardlink": "hard link",
    "chardev": "character device",
    "blockdev": "block device",
    "fifo": "fifo (named pipe)",
    "sparse": "sparse file",
    "other": "special member",
}


def _members_within_limits(
    tf: tarfile.TarFile, tar_path: Path, max_members: int, max_total_bytes: int
) -> list[tarfile.TarInfo]:
    """The member headers, read one by one and refused as soon as there are more than
    ``max_members`` or their files add up to more than ``max_total_bytes``: a tar bomb
    (hundreds of thousands of members, or more bytes than any package) is stopped before
    anything is written or all its headers are held in memory."""
    infos: list[tarfile.TarInfo] = []
    total = 0
    for info in tf:
        infos.append(info)
        total += info.size if info.isreg() else 0
        if len(infos) > max_members:
            raise UnsafeTarError(
                f"refusing {tar_path}: more than {max_members} members (EXTRACT_MAX_MEMBERS)"
            )
        if total > max_total_bytes:
            raise UnsafeTarError(
                f"refusing {tar_path}: its files hold more than {max_total_bytes} bytes "
                "(EXTRACT_MAX_TOTAL_BYTES)"
            )
    return infos


def _read_infos(
    tar_path: Path, max_members: int | None = None, max_total_bytes: int | None = None
) -> list[tarfile.TarInfo]:
    """All member headers, with checks ``tarfile`` leaves out.

    ``tarfile`` stops silently at a bad header or at end of file after the first member,
    so a truncated or damaged archive would look like a shorter valid one.  We require the
    end-of-archive zero block right after the last member's data.
    """
    try:
        size = os.path.getsize(tar_path)
    except OSError as exc:
        raise CorruptTarError(f"cannot read tar {tar_path}: {exc}") from exc
    try:
        with tarfile.open(tar_path, "r:", encoding="utf-8", errors="surrogateescape") as tf:
            infos = _members_within_limits(
                tf,
                tar_path,
                int(settings.EXTRACT_MAX_MEMBERS if max_members is None else max_members),
                int(
                    settings.EXTRACT_MAX_TOTAL_BYTES if max_total_bytes is None else max_total_bytes
                ),
            )
    except (tarfile.TarError, EOFError) as exc:
        raise CorruptTarError(f"{tar_path} is not a readable tar archive: {exc}") from exc
    except OSError as exc:
        raise CorruptTarError(f"cannot read tar {tar_path}: {exc}") from exc

    end = 0
    for info in infos:
        data_end = info.offset_data + (info.size if info.isreg() else 0)
        if data_end > size:
            raise CorruptTarError(
                f"{tar_path} is truncated: member {info.name!r} needs {data_end} bytes, "
                f"file has {size}"
            )
        end = data_end + (-data_end % BLOCKSIZE)
    with open(tar_path, "rb") as f:
        f.seek(end)
        marker = f.read(BLOCKSIZE)
    if marker != ZERO_BLOCK:
        after = f"after member {infos[-1].name!r} " if infos else ""
        what = "truncated" if len(marker) < BLOCKSIZE else "corrupt (unreadable header)"
        raise CorruptTarError(
            f"{tar_path} is {what}: no end-of-archive marker {after}at offset {end}"
        )
    return infos


def list_tar_members(tar_path: str | os.PathLike[str]) -> list[TarEntry]:
    """Every member of a tar as :class:`~ccat_data_transfer.core.tarutil.TarEntry`, in archive
    order (no validation of
    names; raises :class:`~ccat_data_transfer.core.tarutil.CorruptTarError` for a damaged
    archive)."""
    return [
        TarEntry(
            arcname=info.name,
            size=info.size,
            mtime=int(info.mtime),
            kind=_kind(info),
            mode=info.mode,
            linkname=info.linkname,
            offset_data=info.offset_data,
        )
        for info in _read_infos(Path(tar_path))
    ]


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root + os.sep)


def _validate(infos: list[tarfile.TarInfo], real_dest: str) -> list[tuple[str, tarfile.TarInfo]]:
    """Check every member; returns (normalised name, info) for files and directories."""
    plan: list[tuple[str, tarfile.TarInfo]] = []
    kinds: dict[str, str] = {}
    for info in infos:
        kind = _kind(info)
        if kind not in ("file", "dir"):
            target = f" -> {info.linkname}" if info.linkname else ""
            raise UnsafeTarError(
                f"refusing tar member {info.name!r}: it is a {_KIND_WORDS.get(kind, kind)}"
                f"{target}; only regular files and directories may be extracted"
            )
        try:
            name = normalize_arcname(info.name)
        except ValueError as exc:
            raise UnsafeTarError(f"refusing tar member {info.name!r}: {exc}") from None
        if not name:
            if kind == "dir":
                continue  # "./" is the destination itself
            raise UnsafeTarError(f"refusing tar member {info.name!r}: empty file name")
        if name in kinds:
            if kind == "dir" and kinds[name] == "dir":
                continue
            raise UnsafeTarError(f"refusing tar member {info.name!r}: duplicate name {name!r}")
        kinds[name] = kind
        plan.append((name, info))
    # A file may not double as a directory of another member ("a" and "a/b").
    for name in kinds:
        parts = name.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if kinds.get(parent) == "file":
                raise UnsafeTarError(
                    f"refusing tar member {name!r}: its parent {parent!r} is a file member"
                )
    # Resolve through anything already in the destination (e.g. a symlinked directory).
    for name, info in plan:
        target = os.path.join(real_dest, name)
        resolved = os.path.realpath(target)
        if not _within(resolved, real_dest):
            raise UnsafeTarError(
                f"refusing tar member {info.name!r}: it resolves to {resolved}, outside {real_dest}"
            )
        if info.isreg() and os.path.isdir(resolved):
            raise UnsafeTarError(
                f"refusing tar member {info.name!r}: {resolved} exists and is a directory"
            )
    return plan


def safe_extract(
    tar_path: str | os.PathLike[str],
    dest_dir: str | os.PathLike[str],
    *,
    overwrite: bool = True,
    bufsize: int = DEFAULT_BUFSIZE,
    max_members: int | None = None,
    max_total_bytes: int | None = None,
) -> list[ExtractedMember]:
    """Extract a tar into ``dest_dir`` after validating every member; returns the files.

    Refused with :class:`~ccat_data_transfer.core.tarutil.UnsafeTarError` before anything is
    written: absolute names, ``..`` components, symlinks, hardlinks, devices, fifos, sparse
    files, duplicate names and members that would resolve outside ``dest_dir`` (also through
    symlinks already in it).  Each file is first written under a temporary name (hashing it
    as it is written) and fsynced; only when every file is complete are they renamed into
    place. On any error the files and directories this call created are removed.  Existing
    files under the same names are replaced, unless ``overwrite=False``
    (``FileExistsError``).

    More than ``max_members`` members (EXTRACT_MAX_MEMBERS) or more than
    ``max_total_bytes`` of files (EXTRACT_MAX_TOTAL_BYTES) are refused before anything is
    written.  Modes are normalised: no setuid/setgid/sticky bits, nothing group- or
    world-writable; files are readable and writable by their owner.

    A damaged or truncated archive raises :class:`~ccat_data_transfer.core.tarutil.CorruptTarError`.
    """
    tar_path = Path(tar_path)
    dest = Path(dest_dir).absolute()
    infos = _read_infos(tar_path, max_members, max_total_bytes)

    state = _ExtractState()
    try:
        state.make_dirs(str(dest))
        real_dest = os.path.realpath(dest)
        plan = _validate(infos, real_dest)
        if not overwrite:
            _refuse_existing(plan, real_dest)
        _write_temporaries(tar_path, plan, real_dest, bufsize, state)
        _rename_into_place(state, real_dest)
        return state.results
    except BaseException as exc:
        state.undo()
        if isinstance(exc, SymlinkInPathError):
            raise UnsafeTarError(f"refusing to extract {tar_path}: {exc}") from exc
        raise


class _ExtractState:
    """What one :func:`safe_extract` call created so far, so that a failure can undo it."""

    def __init__(self) -> None:
        self.created_dirs: list[str] = []
        self.temps: list[tuple[str, str]] = []  # (temp path, final path) not yet renamed
        self.placed: list[str] = []  # final paths this call wrote
        self.results: list[ExtractedMember] = []

    def make_dirs(self, path: str) -> None:
        """Create ``path`` and its missing parents, remembering each one created."""
        missing = []
        p = path
        while not os.path.isdir(p):
            missing.append(p)
            parent = os.path.dirname(p)
            if parent == p:
                break
            p = parent
        for d in reversed(missing):
            os.mkdir(d, 0o755)
            self.created_dirs.append(d)

    def open_dir_beneath(self, root: str, rel: str) -> int:
        """The directory ``root/rel`` opened (made where missing) without following a
        symbolic link on the way; each folder made is remembered."""
        made: list[str] = []
        try:
            return open_dir_beneath(root, rel, create=True, created=made)
        finally:
            self.created_dirs.extend(os.path.join(root, d) for d in made)

    def undo(self) -> None:
        """Remove the temporaries, the files placed and the directories this call created."""
        for tmp, _ in self.temps[len(self.placed) :]:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        for path in self.placed:
            with contextlib.suppress(OSError):
                os.unlink(path)
        for d in reversed(self.created_dirs):
            with contextlib.suppress(OSError):
                os.rmdir(d)


def _refuse_existing(plan: list[tuple[str, tarfile.TarInfo]], real_dest: str) -> None:
    """With ``overwrite=False``: FileExistsError if any file member's target exists."""
    for name, info in plan:
        target = os.path.join(real_dest, name)
        if info.isreg() and os.path.lexists(target):
            raise FileExistsError(f"{target} already exists (tar member {info.name!r})")


def _write_temporaries(
    tar_path: Path,
    plan: list[tuple[str, tarfile.TarInfo]],
    real_dest: str,
    bufsize: int,
    state: _ExtractState,
) -> None:
    """Write phase: create the directories and write each file under a temporary name."""
    with open(tar_path, "rb", buffering=0) as src:
        fadvise_sequential(src.fileno())
        largest = max((info.size for _, info in plan if info.isreg()), default=0)
        bufsize = buffer_size(largest, bufsize)
        buf = memoryview(bytearray(bufsize))
        for name, info in plan:
            target = os.path.join(real_dest, name)
            if info.isdir():
                os.close(state.open_dir_beneath(real_dest, name))
                continue
            # Folders are made and opened one by one without following a symlink, and the
            # file is created relative to its folder's descriptor: a folder swapped for a
            # link meanwhile cannot redirect the write outside the root.
            dir_fd = state.open_dir_beneath(real_dest, os.path.dirname(name))
            base = os.path.basename(target)[:200]  # temp name within NAME_MAX
            tmp_name = f".{base}.tmp-{uuid.uuid4().hex}"
            try:
                fd = os.open(
                    tmp_name,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                    dir_fd=dir_fd,
                )
            finally:
                os.close(dir_fd)
            state.temps.append((os.path.join(os.path.dirname(target), tmp_name), target))
            digest = _copy_member(src, fd, buf, bufsize, tar_path, info)
            state.results.append(ExtractedMember(name, Path(target), info.size, digest))


def _copy_member(
    src: BinaryIO,
    fd: int,
    buf: memoryview,
    bufsize: int,
    tar_path: Path,
    info: tarfile.TarInfo,
) -> str:
    """Copy one member's bytes to ``fd`` (closed afterwards), hashing them, set its mode
    and fsync it; returns the SHA-256."""
    h = hashlib.sha256()
    try:
        src.seek(info.offset_data)
        remaining = info.size
        while remaining:
            n = src.readinto(buf[: min(bufsize, remaining)])
            if not n:
                raise CorruptTarError(f"{tar_path} is truncated inside member {info.name!r}")
            chunk = buf[:n]
            while chunk:
                w = os.write(fd, chunk)
                h.update(chunk[:w])
                chunk = chunk[w:]
            remaining -= n
        os.fchmod(fd, (info.mode & 0o755) | 0o600)
        os.fsync(fd)
        os.utime(fd, (info.mtime, info.mtime))
    finally:
        os.close(fd)
    return h.hexdigest()


def _rename_into_place(state: _ExtractState, real_dest: str) -> None:
    """Place phase: every file complete, rename them all into place (relative to the
    folder's descriptor, no symlink followed) and fsync their dirs."""
    dirs_touched: set[str] = set()
    for tmp, target in state.temps:
        with parent_beneath(real_dest, os.path.relpath(target, real_dest)) as (dfd, base):
            os.replace(os.path.basename(tmp), base, src_dir_fd=dfd, dst_dir_fd=dfd)
        state.placed.append(target)
        dirs_touched.add(os.path.dirname(target))
    for d in dirs_touched:
        fsync_dir(d)
