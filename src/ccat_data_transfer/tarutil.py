"""Tar packaging with checksums in one pass, and extraction that cannot be abused.

Raw data packages and data transfer packages are plain (uncompressed) POSIX tar files.
:func:`write_tar_with_checksums` reads every source file exactly once: the bytes go to the
tar stream while the SHA-256 of each file and of the whole tar are computed, the hashing
spread over two threads (hashlib releases the GIL on large buffers, so two cores work at
once).  :func:`safe_extract` is the only way the pipeline unpacks a tar: it validates every
member first (no absolute paths, no ``..``, no links or devices, nothing that resolves
outside the destination), writes each file atomically while hashing it, and removes what
it wrote if anything goes wrong.

Header layout is deterministic: ``tarfile`` builds the headers (PAX format, so long names
and files over 8 GiB work), with uid/gid 0, no user or group names, mode 0644 and the
source file's mtime (whole seconds).  The data blocks are written by this module, so the
read loop stays under our control.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import stat
import tarfile
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "BLOCKSIZE",
    "CorruptTarError",
    "DEFAULT_BUFSIZE",
    "ExtractedMember",
    "TarEntry",
    "TarMember",
    "TarResult",
    "TarSourceChangedError",
    "TarUtilError",
    "UnsafeTarError",
    "list_tar_members",
    "safe_extract",
    "sha256_file",
    "write_tar_with_checksums",
]

BLOCKSIZE = tarfile.BLOCKSIZE  # 512
RECORDSIZE = tarfile.RECORDSIZE  # 10240: archives are padded to whole records, as GNU tar does
#: Read size of the packaging loop (measured in bench/packaging.py: 4-8 MiB is the plateau).
DEFAULT_BUFSIZE = 8 * 1024 * 1024
# Buffers in flight between the reader and the hashing thread.
_POOL_SIZE = 4
#: Smallest read buffer: buffers are sized to the data (up to the bufsize asked for), so
#: small files do not cost the allocation and zeroing of several 8 MiB buffers each time.
_MIN_BUFSIZE = 64 * 1024
_ZERO_BLOCK = bytes(BLOCKSIZE)
_FILE_MODE = 0o644


class TarUtilError(Exception):
    """Base class of this module's errors."""


class UnsafeTarError(TarUtilError, ValueError):
    """A tar member would be unsafe to extract (path escape, link, device, ...)."""


class CorruptTarError(TarUtilError, ValueError):
    """The file is not a readable tar archive (corrupt or truncated)."""


class TarSourceChangedError(TarUtilError):
    """A source file changed (size or mtime) while it was being packaged."""


@dataclass(frozen=True, slots=True)
class TarMember:
    """One file to put in a tar: name inside the archive, where it is, its expected size
    and (optionally) its expected SHA-256 as registered in the database."""

    arcname: str
    source_path: Path
    size: int
    expected_sha256: str | None = None


@dataclass(slots=True)
class TarResult:
    """Outcome of :func:`write_tar_with_checksums`."""

    sha256: str
    size: int
    member_sha256: dict[str, str] = field(default_factory=dict)
    #: (arcname, expected, actual) for every member whose checksum did not match.
    mismatches: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches


@dataclass(frozen=True, slots=True)
class ExtractedMember:
    """A regular file written by :func:`safe_extract`."""

    arcname: str
    path: Path
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class TarEntry:
    """One member as listed by :func:`list_tar_members`."""

    arcname: str
    size: int
    mtime: int
    kind: str  # file, dir, symlink, hardlink, chardev, blockdev, fifo, sparse, other
    mode: int
    linkname: str
    offset_data: int


# --- names --------------------------------------------------------------------------------


def _normalize_arcname(name: str) -> str:
    """Normalised member name, or ValueError for absolute paths and ``..``."""
    if "\x00" in name:
        raise ValueError(f"tar member name contains a NUL byte: {name!r}")
    if name.startswith("/"):
        raise ValueError(f"absolute path {name!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"'..' component in {name!r}")
    return "/".join(parts)


# --- checksums ----------------------------------------------------------------------------


def _fadvise_sequential(fd: int) -> None:
    with contextlib.suppress(AttributeError, OSError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)


def sha256_file(path: str | os.PathLike[str], bufsize: int = DEFAULT_BUFSIZE) -> str:
    """Hex SHA-256 of a file, read with large reads into one reused buffer."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        _fadvise_sequential(f.fileno())
        mv = memoryview(bytearray(_buffer_size(_file_size(f), bufsize)))
        while n := f.readinto(mv):
            h.update(mv[:n])
    return h.hexdigest()


def _buffer_size(data_size: int | None, bufsize: int) -> int:
    """A read buffer for ``data_size`` bytes (None: unknown): at most ``bufsize``, at
    least ``_MIN_BUFSIZE`` (or ``bufsize`` when that is smaller), in whole 64 KiB."""
    if data_size is None:
        return bufsize
    rounded = -(-max(data_size, 1) // _MIN_BUFSIZE) * _MIN_BUFSIZE
    return min(bufsize, rounded)


def _file_size(f: Any) -> int | None:
    """Size of an open file (None for a stream without one)."""
    try:
        st = os.fstat(f.fileno())
    except (AttributeError, OSError, ValueError):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


class _Hasher:
    """A thread that feeds chunks to hash objects, in order, then hands buffers back.

    ``update(h, data, release)`` queues ``h.update(data)``; ``release()`` (if given) runs
    afterwards so the producer may reuse the buffer.  hashlib drops the GIL for buffers
    over 2 KiB, so this thread hashes while the producer reads and writes.
    """

    _STOP = object()

    def __init__(self) -> None:
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="tar-hasher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        q = self._q
        while True:
            item = q.get()
            if item is self._STOP:
                return
            h, data, release = item
            try:
                if self._error is None and h is not None:
                    h.update(data)
            except BaseException as exc:  # pragma: no cover - hashlib does not fail
                self._error = exc
            finally:
                if release is not None:
                    release()

    def update(self, h: Any, data: Any, release: Callable[[], None] | None = None) -> None:
        self._q.put((h, data, release))

    def call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` in the hashing thread after everything queued so far."""
        self._q.put((None, None, fn))

    def close(self) -> None:
        self._q.put(self._STOP)
        self._thread.join()
        if self._error is not None:
            raise self._error


class _BufferPool:
    """At most ``count`` reusable buffers, allocated when first needed; a buffer returns
    once every consumer released it."""

    def __init__(self, count: int, size: int) -> None:
        self.views: list[memoryview] = []
        self._count = count
        self._size = size
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._refs = [0] * count
        self._lock = threading.Lock()

    def acquire(self, consumers: int) -> int:
        try:
            idx = self._free.get_nowait()
        except queue.Empty:
            if len(self.views) < self._count:  # only the producer thread allocates
                self.views.append(memoryview(bytearray(self._size)))
                idx = len(self.views) - 1
            else:
                idx = self._free.get()
        self._refs[idx] = consumers
        return idx

    def releaser(self, idx: int) -> Callable[[], None]:
        def release() -> None:
            with self._lock:
                self._refs[idx] -= 1
                last = self._refs[idx] == 0
            if last:
                self._free.put(idx)

        return release

    def release_now(self, idx: int) -> None:
        """Give a buffer back that no consumer has seen."""
        self._free.put(idx)


# --- writing ------------------------------------------------------------------------------

# Where the two hashes run.  "file_thread": the main thread reads, writes and hashes the
# tar stream, a worker hashes each file.  "tar_thread": the reverse.  "both_threads": the
# main thread only does I/O and two workers hash.  "serial": no threads (reference).
# bench/packaging.py measures them; the default is the fastest measured on 2 cores.
_LAYOUTS = ("file_thread", "tar_thread", "both_threads", "serial")
_DEFAULT_LAYOUT = "both_threads"


def _write_all(out: BinaryIO, data: memoryview | bytes) -> None:
    n = out.write(data)
    if n is None or n >= len(data):
        return
    view = memoryview(data)[n:]
    while len(view):
        n = out.write(view)
        if not n:
            raise OSError("short write to the tar output stream")
        view = view[n:]


def _store_digest(digests: dict[str, str], arcname: str, h: Any) -> Callable[[], None]:
    def store() -> None:
        digests[arcname] = h.hexdigest()

    return store


def _header(arcname: str, size: int, mtime: int) -> bytes:
    info = tarfile.TarInfo(arcname)
    info.size = size
    info.mtime = mtime
    info.mode = _FILE_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def write_tar_with_checksums(
    members: Sequence[TarMember] | Iterable[TarMember],
    out: BinaryIO,
    expected: dict[str, str] | None = None,
    bufsize: int = DEFAULT_BUFSIZE,
    *,
    _layout: str = _DEFAULT_LAYOUT,
) -> TarResult:
    """Write a tar of ``members`` to ``out`` in one read pass, with checksums.

    Each file is read once; its bytes go to ``out`` while its SHA-256 and the SHA-256 of
    the whole tar stream are computed.  Expected checksums come from ``expected``
    (arcname to hex digest) or else from ``TarMember.expected_sha256``; differences are
    reported in ``TarResult.mismatches`` (the tar is still complete: the caller decides).

    Raises :class:`TarSourceChangedError` if a file's size differs from ``TarMember.size``
    or it changes while being read, ``ValueError`` for unsafe or duplicate arcnames,
    ``OSError`` for read/write errors.  ``out`` is then left partially written: write to
    an atomic target (``Storage.open_write``) so a failure leaves nothing behind.
    """
    if _layout not in _LAYOUTS:
        raise ValueError(f"unknown layout {_layout!r}")
    if bufsize < BLOCKSIZE:
        raise ValueError("bufsize must be at least 512")
    expected_norm = {_normalize_arcname(k): v.lower() for k, v in (expected or {}).items()}

    tar_hash = hashlib.sha256()
    digests: dict[str, str] = {}
    checks: list[tuple[str, str | None]] = []
    seen: set[str] = set()
    total = 0

    if isinstance(members, Sequence):  # buffers no larger than the largest member
        bufsize = _buffer_size(max((mem.size for mem in members), default=0), bufsize)
    file_worker = _Hasher() if _layout in ("file_thread", "both_threads") else None
    tar_worker = _Hasher() if _layout in ("tar_thread", "both_threads") else None
    consumers = (file_worker is not None) + (tar_worker is not None)
    pool = _BufferPool(_POOL_SIZE if consumers else 1, bufsize)

    def emit_small(data: bytes) -> None:
        # Headers and padding: written and hashed in stream order.
        nonlocal total
        _write_all(out, data)
        total += len(data)
        if tar_worker is not None:
            tar_worker.update(tar_hash, data)
        else:
            tar_hash.update(data)

    try:
        for member in members:
            try:
                arcname = _normalize_arcname(member.arcname)
            except ValueError as exc:
                raise ValueError(f"bad tar member name: {exc}") from None
            if not arcname:
                raise ValueError(f"empty tar member name for {member.source_path}")
            if arcname in seen:
                raise ValueError(f"duplicate tar member name {arcname!r}")
            seen.add(arcname)
            want = expected_norm.get(arcname) or (
                member.expected_sha256.lower() if member.expected_sha256 else None
            )
            checks.append((arcname, want))

            with open(member.source_path, "rb", buffering=0) as src:
                fd = src.fileno()
                before = os.fstat(fd)
                if not stat.S_ISREG(before.st_mode):
                    raise ValueError(f"{member.source_path} is not a regular file")
                if before.st_size != member.size:
                    raise TarSourceChangedError(
                        f"{member.source_path} is {before.st_size} bytes, expected "
                        f"{member.size} (file changed since it was registered?)"
                    )
                _fadvise_sequential(fd)
                emit_small(_header(arcname, member.size, int(before.st_mtime)))

                file_hash = hashlib.sha256()
                remaining = member.size
                while remaining:
                    idx = pool.acquire(consumers)
                    view = pool.views[idx]
                    n = src.readinto(view[: min(bufsize, remaining)])
                    if not n:
                        pool.release_now(idx)
                        raise TarSourceChangedError(
                            f"{member.source_path} shrank while being packaged "
                            f"({member.size - remaining} of {member.size} bytes read)"
                        )
                    chunk = view[:n]
                    _write_all(out, chunk)
                    if tar_worker is None:
                        tar_hash.update(chunk)
                    if file_worker is None:
                        file_hash.update(chunk)
                    if consumers:
                        release = pool.releaser(idx)
                        if tar_worker is not None:
                            tar_worker.update(tar_hash, chunk, release)
                        if file_worker is not None:
                            file_worker.update(file_hash, chunk, release)
                    else:
                        pool.release_now(idx)
                    remaining -= n
                    total += n

                after = os.fstat(fd)
                if (
                    after.st_size != before.st_size
                    or after.st_mtime_ns != before.st_mtime_ns
                    or src.read(1)
                ):
                    raise TarSourceChangedError(
                        f"{member.source_path} changed while being packaged"
                    )

            if file_worker is not None:
                file_worker.call(_store_digest(digests, arcname, file_hash))
            else:
                digests[arcname] = file_hash.hexdigest()
            pad = -member.size % BLOCKSIZE
            if pad:
                emit_small(_ZERO_BLOCK[:pad])

        # End of archive: two zero blocks, then pad to a whole record like GNU tar.
        end = 2 * BLOCKSIZE
        end += -(total + end) % RECORDSIZE
        emit_small(bytes(end))
    finally:
        for worker in (file_worker, tar_worker):
            if worker is not None:
                worker.close()

    mismatches = [
        (name, want, digests[name]) for name, want in checks if want and want != digests[name]
    ]
    return TarResult(
        sha256=tar_hash.hexdigest(), size=total, member_sha256=digests, mismatches=mismatches
    )


# --- reading ------------------------------------------------------------------------------


def _kind(info: tarfile.TarInfo) -> str:
    if info.issparse():
        return "sparse"
    if info.isreg():
        return "file"
    if info.isdir():
        return "dir"
    if info.issym():
        return "symlink"
    if info.islnk():
        return "hardlink"
    if info.ischr():
        return "chardev"
    if info.isblk():
        return "blockdev"
    if info.isfifo():
        return "fifo"
    return "other"


_KIND_WORDS = {
    "symlink": "symbolic link",
    "hardlink": "hard link",
    "chardev": "character device",
    "blockdev": "block device",
    "fifo": "fifo (named pipe)",
    "sparse": "sparse file",
    "other": "special member",
}


def _read_infos(tar_path: Path) -> list[tarfile.TarInfo]:
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
            infos = tf.getmembers()
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
    if marker != _ZERO_BLOCK:
        after = f"after member {infos[-1].name!r} " if infos else ""
        what = "truncated" if len(marker) < BLOCKSIZE else "corrupt (unreadable header)"
        raise CorruptTarError(
            f"{tar_path} is {what}: no end-of-archive marker {after}at offset {end}"
        )
    return infos


def list_tar_members(tar_path: str | os.PathLike[str]) -> list[TarEntry]:
    """Every member of a tar as :class:`TarEntry`, in archive order (no validation of
    names; raises :class:`CorruptTarError` for a damaged archive)."""
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
            name = _normalize_arcname(info.name)
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


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def safe_extract(
    tar_path: str | os.PathLike[str],
    dest_dir: str | os.PathLike[str],
    *,
    overwrite: bool = True,
    bufsize: int = DEFAULT_BUFSIZE,
) -> list[ExtractedMember]:
    """Extract a tar into ``dest_dir`` after validating every member; returns the files.

    Refused with :class:`UnsafeTarError` before anything is written: absolute names,
    ``..`` components, symlinks, hardlinks, devices, fifos, sparse files, duplicate names
    and members that would resolve outside ``dest_dir`` (also through symlinks already
    in it).  Each file is first written under a temporary name (hashing it as it is
    written) and fsynced; only when every file is complete are they renamed into place.
    On any error the files and directories this call created are removed.  Existing files
    under the same names are replaced, unless ``overwrite=False`` (``FileExistsError``).

    A damaged or truncated archive raises :class:`CorruptTarError`.
    """
    tar_path = Path(tar_path)
    dest = Path(dest_dir).absolute()
    infos = _read_infos(tar_path)

    created_dirs: list[str] = []
    temps: list[tuple[str, str]] = []  # (temp path, final path) not yet renamed
    placed: list[str] = []  # final paths this call wrote
    results: list[ExtractedMember] = []

    def make_dirs(path: str) -> None:
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
            created_dirs.append(d)

    try:
        make_dirs(str(dest))
        real_dest = os.path.realpath(dest)
        plan = _validate(infos, real_dest)
        if not overwrite:
            for name, info in plan:
                target = os.path.join(real_dest, name)
                if info.isreg() and os.path.lexists(target):
                    raise FileExistsError(f"{target} already exists (tar member {info.name!r})")

        with open(tar_path, "rb", buffering=0) as src:
            _fadvise_sequential(src.fileno())
            largest = max((info.size for _, info in plan if info.isreg()), default=0)
            bufsize = _buffer_size(largest, bufsize)
            buf = memoryview(bytearray(bufsize))
            for name, info in plan:
                target = os.path.join(real_dest, name)
                if info.isdir():
                    make_dirs(target)
                    continue
                parent = os.path.dirname(target)
                make_dirs(parent)
                # Re-check right before writing: the tree may have changed meanwhile.
                if not _within(os.path.realpath(parent), real_dest):
                    raise UnsafeTarError(f"refusing tar member {info.name!r}: parent escapes")
                base = os.path.basename(target)[:200]  # temp name within NAME_MAX
                tmp = os.path.join(parent, f".{base}.tmp-{uuid.uuid4().hex}")
                fd = os.open(
                    tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
                )
                temps.append((tmp, target))
                h = hashlib.sha256()
                try:
                    src.seek(info.offset_data)
                    remaining = info.size
                    while remaining:
                        n = src.readinto(buf[: min(bufsize, remaining)])
                        if not n:
                            raise CorruptTarError(
                                f"{tar_path} is truncated inside member {info.name!r}"
                            )
                        chunk = buf[:n]
                        while chunk:
                            w = os.write(fd, chunk)
                            h.update(chunk[:w])
                            chunk = chunk[w:]
                        remaining -= n
                    os.fchmod(fd, (info.mode & 0o777) | 0o600)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.utime(tmp, (info.mtime, info.mtime))
                results.append(ExtractedMember(name, Path(target), info.size, h.hexdigest()))

        dirs_touched: set[str] = set()
        for tmp, target in temps:
            os.replace(tmp, target)
            placed.append(target)
            dirs_touched.add(os.path.dirname(target))
        for d in dirs_touched:
            _fsync_dir(d)
        return results
    except BaseException:
        for tmp, _ in temps[len(placed) :]:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        for path in placed:
            with contextlib.suppress(OSError):
                os.unlink(path)
        for d in reversed(created_dirs):
            with contextlib.suppress(OSError):
                os.rmdir(d)
        raise
