"""Low-level helpers for local files and relative paths, shared by the storage backends
(:mod:`ccat_data_transfer.core.storage`) and the tar code (:mod:`ccat_data_transfer.core.tarutil`).

Room in the house: core, at the bottom.  Imports the standard library and
:mod:`ccat_ops_db.names` (the temporary-name rule, shared with the topology loader); every
module may import it.  What is here: checking a relative POSIX path (no absolute paths, no
``..``, no NUL), the temporary-name rule (:func:`~ccat_ops_db.names.is_temporary_name`,
:func:`~ccat_ops_db.names.temporary_component`, re-exported), names cut to a byte limit
without losing their uniqueness (:func:`fit_name`), read-buffer sizing, the
sequential-read hint, fsync of a directory and the in-kernel copy of one file's bytes into
another (:func:`copy_fd`), and the walk beneath a location root that never
follows a symbolic link (:func:`open_dir_beneath`, :func:`parent_beneath`,
:func:`unlink_beneath`, :func:`link_beneath`).

Why the walk: every write, link and unlink inside a location root goes through directory
file descriptors opened one component at a time with ``O_NOFOLLOW``, then acts on the
last name relative to that descriptor (``openat``, ``mkdirat``, ``linkat``, ``renameat``,
``unlinkat``).  A path checked first and used afterwards leaves a window in which a folder
swapped for a symlink redirects the write or the unlink outside the root; a descriptor
does not.

"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ccat_data_transfer.core.errors import CcatError
from ccat_ops_db.names import TEMP_MARK, is_temporary_name, temporary_component

__all__ = [
    "COPY_BUFSIZE",
    "COPY_METHODS",
    "MIN_BUFSIZE",
    "NAME_MAX",
    "PathErrors",
    "TEMP_MARK",
    "SymlinkInPathError",
    "buffer_size",
    "clean_relative_path",
    "copy_fd",
    "fadvise_sequential",
    "file_size",
    "fit_name",
    "fsync_dir",
    "is_temporary_name",
    "temporary_component",
    "link_beneath",
    "open_dir_beneath",
    "parent_beneath",
    "unlink_beneath",
]

#: The longest file name (one path component) the filesystems take, in bytes.
NAME_MAX = 255

#: Hex digits of the SHA-256 of the full name that :func:`fit_name` appends.
_NAME_HASH_DIGITS = 16

#: Smallest read buffer, and the step buffers grow in: small files are not read through
#: a freshly zeroed buffer of several MiB.
MIN_BUFSIZE = 64 * 1024

#: Read size of the loops that move or hash bytes through Python (checksums, the tar
#: writer, the last fallback of :func:`copy_fd`, S3 and paced streams), one buffer reused.
#: Measured in bench/buffer_curve.py and bench/packaging.py (docs/performance.md): SHA-256
#: runs at the same rate from 64 KiB to 8 MiB; writing files, 8 MiB buffers cost more CPU
#: than 256 KiB-2 MiB ones, and 1 MiB keeps the tar writer's four buffers at 4 MiB.
COPY_BUFSIZE = 1024 * 1024

#: How :func:`copy_fd` moves bytes, fastest first: ``copy_file_range`` (in the kernel;
#: a filesystem that can shares extents), ``sendfile`` (in the kernel, any two files),
#: ``readinto`` (one reused buffer through Python, works everywhere).
COPY_METHODS = ("copy_file_range", "sendfile", "readinto")

# A kernel copy failing with one of these before it moved a byte means "not here" (other
# filesystem, old kernel, special file): the next method takes over.  Any other error
# (ENOSPC, EIO) is the copy's own and is raised.
_UNSUPPORTED = frozenset(
    {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.EBADF}
)
_KERNEL_STEP = 1 << 30  # bytes asked of one kernel call


@dataclass(frozen=True, slots=True)
class PathErrors:
    """The messages (format strings over ``{path!r}``) a caller of
    :func:`clean_relative_path` gives for each kind of bad path."""

    nul: str
    absolute: str
    dotdot: str


def fit_name(name: str, limit: int, key: str | None = None, always: bool = False) -> str:
    """``name`` if it fits ``limit`` bytes (UTF-8), else its longest head that leaves room
    for ``-`` and 16 hex digits of the SHA-256 of ``key`` (default: the full ``name``),
    followed by them.  Two names that differ anywhere (or two keys) give two results, so
    a cut never makes two things share a name.  ``always`` adds the suffix even when the
    name fits (for a name that was altered on the way, e.g. characters replaced)."""
    encoded = name.encode("utf-8")
    if len(encoded) <= limit and not always:
        return name
    suffix = "-" + hashlib.sha256((name if key is None else key).encode("utf-8")).hexdigest()
    suffix = suffix[: 1 + _NAME_HASH_DIGITS]
    room = limit - len(suffix)
    if room < 0:
        raise ValueError(f"a name limit of {limit} bytes leaves no room for its hash suffix")
    head = encoded[:room].decode("utf-8", "ignore")  # never half a character
    return head + suffix


def clean_relative_path(path: str, errors: PathErrors) -> str:
    """``path`` normalised (no ``.`` components, no doubled ``/``); ``ValueError`` (with
    the message of ``errors``) for a NUL byte, an absolute path or a ``..`` component.
    The result may be empty."""
    if "\x00" in path:
        raise ValueError(errors.nul.format(path=path))
    if path.startswith("/"):
        raise ValueError(errors.absolute.format(path=path))
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(errors.dotdot.format(path=path))
    return "/".join(parts)


def buffer_size(data_size: int | None, bufsize: int) -> int:
    """A read buffer for ``data_size`` bytes (None: unknown): at most ``bufsize``, at
    least ``MIN_BUFSIZE`` (or ``bufsize`` when that is smaller), in whole 64 KiB."""
    if data_size is None:
        return bufsize
    rounded = -(-max(data_size, 1) // MIN_BUFSIZE) * MIN_BUFSIZE
    return min(bufsize, rounded)


def file_size(f: Any) -> int | None:
    """Size of an open regular file (None for a stream without one)."""
    try:
        st = os.fstat(f.fileno())
    except (AttributeError, OSError, ValueError):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def fadvise_sequential(fd: int) -> None:
    """Tell the kernel the file will be read once, front to back (read-ahead)."""
    with contextlib.suppress(AttributeError, OSError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """fsync a directory, so a rename into it survives a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_fd(
    src_fd: int,
    dst_fd: int,
    methods: Sequence[str] = COPY_METHODS,
    bufsize: int = COPY_BUFSIZE,
) -> tuple[int, str]:
    """Copy ``src_fd`` from its offset to its end into ``dst_fd`` at its offset; returns
    the bytes copied and the method that finished the copy.

    ``methods`` are tried in order (a subset of ``COPY_METHODS``); a method the
    kernel or filesystem does not support hands over to the next one where the copy
    stands (both offsets advance together).  Durability is the caller's: fsync
    ``dst_fd``.  A file that grows while copied is copied to the end found."""
    unknown = set(methods) - set(COPY_METHODS)
    if unknown or not methods:
        raise ValueError(f"copy methods must be among {COPY_METHODS}, got {list(methods)}")
    total = 0
    for method in methods:
        try:
            if method == "copy_file_range":
                total += _kernel_copy(os.copy_file_range, src_fd, dst_fd)
            elif method == "sendfile":
                total += _kernel_copy(_sendfile, src_fd, dst_fd)
            else:
                total += _buffer_copy(src_fd, dst_fd, bufsize)
            return total, method
        except _Unsupported as exc:
            total += exc.done
    raise OSError(errno.EOPNOTSUPP, f"none of the copy methods {list(methods)} works here")


class _Unsupported(CcatError):
    def __init__(self, done: int) -> None:
        super().__init__(done)
        self.done = done


def _sendfile(src_fd: int, dst_fd: int, count: int) -> int:
    return os.sendfile(dst_fd, src_fd, None, count)


def _kernel_copy(call: object, src_fd: int, dst_fd: int) -> int:
    """Repeat a kernel copy call until the source's end; :class:`_Unsupported` (with the
    bytes already moved) when the kernel refuses it for these files."""
    done = 0
    while True:
        try:
            n = call(src_fd, dst_fd, _KERNEL_STEP)  # type: ignore[operator]
        except AttributeError:  # os.copy_file_range missing (not Linux)
            raise _Unsupported(done) from None
        except OSError as exc:
            if exc.errno in _UNSUPPORTED:
                raise _Unsupported(done) from exc
            raise
        if n == 0:
            return done
        done += n


def _buffer_copy(src_fd: int, dst_fd: int, bufsize: int) -> int:
    """Read into one reused buffer and write it out, to the source's end."""
    buf = bytearray(bufsize)
    mv = memoryview(buf)
    done = 0
    while n := os.readv(src_fd, [buf]):
        view = mv[:n]
        while view:
            view = view[os.write(dst_fd, view) :]
        done += n
    return done


# --- The walk beneath a root that never follows a symlink ---------------------------------

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class SymlinkInPathError(CcatError, OSError, ValueError):
    """A folder on the way to a name beneath a location root is a symbolic link: the
    write, link or unlink is refused.  Also a ``ValueError``, as a path that resolves
    outside the root is for the storage."""


def _components(relpath: str | os.PathLike[str]) -> list[str]:
    parts = [p for p in os.fspath(relpath).split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"refusing path {os.fspath(relpath)!r}: it contains '..'")
    return parts


def _open_component(fd: int, name: str, root: str, walked: str, *, create: bool) -> int:
    """``name`` under the directory ``fd`` opened without following a symlink (made
    first when ``create``)."""
    for _ in range(2):
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=fd)
        except FileNotFoundError:
            if not create:
                raise
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o755, dir_fd=fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_link_at(fd, name):
                raise SymlinkInPathError(
                    errno.ELOOP,
                    f"refusing {walked!r} beneath {root}: it is a symbolic link "
                    "(nothing is written, linked or removed through it)",
                ) from None
            raise
    return os.open(name, _DIR_FLAGS, dir_fd=fd)


def open_dir_beneath(
    root: str | os.PathLike[str],
    relpath: str | os.PathLike[str],
    *,
    create: bool = False,
    created: list[str] | None = None,
) -> int:
    """A file descriptor of the directory ``root/relpath``, opened component by component
    from ``root`` with ``O_DIRECTORY | O_NOFOLLOW``; the caller closes it.

    The root itself may be a symlink (a configured mount point); nothing beneath it may:
    :class:`SymlinkInPathError`.  ``create`` makes the missing folders (mode 0755); their
    relative paths are appended to ``created`` when given, outermost first.  A missing
    folder without ``create`` is ``FileNotFoundError``."""
    parts = _components(relpath)
    root_s = os.fspath(root)
    fd = os.open(root_s, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    walked = ""
    try:
        for part in parts:
            walked = f"{walked}/{part}" if walked else part
            existed = created is None or _lexists_at(fd, part)
            nxt = _open_component(fd, part, root_s, walked, create=create)
            os.close(fd)
            fd = nxt
            if not existed:
                created.append(walked)  # type: ignore[union-attr]
    except BaseException:
        os.close(fd)
        raise
    return fd


def _is_link_at(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


def _lexists_at(dir_fd: int, name: str) -> bool:
    try:
        os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True


@contextlib.contextmanager
def parent_beneath(
    root: str | os.PathLike[str],
    relpath: str | os.PathLike[str],
    *,
    create: bool = False,
    created: list[str] | None = None,
) -> Iterator[tuple[int, str]]:
    """``(fd of the parent folder, last name)`` of ``root/relpath``, the parent opened by
    :func:`open_dir_beneath` (closed on exit): act on the name with ``dir_fd=fd``."""
    parts = _components(relpath)
    if not parts:
        raise ValueError(f"{os.fspath(relpath)!r} names the root itself, not an entry in it")
    fd = open_dir_beneath(root, "/".join(parts[:-1]), create=create, created=created)
    try:
        yield fd, parts[-1]
    finally:
        os.close(fd)


def unlink_beneath(root: str | os.PathLike[str], relpath: str | os.PathLike[str]) -> bool:
    """Unlink ``root/relpath`` without following a symlink on the way (a symlink as the
    last name is itself removed, never its target); False if it was not there.
    ``IsADirectoryError`` for a directory; :class:`SymlinkInPathError` for a symlinked
    folder on the way."""
    try:
        with parent_beneath(root, relpath) as (fd, name):
            st = os.lstat(name, dir_fd=fd)
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, f"{os.fspath(relpath)} is a directory")
            os.unlink(name, dir_fd=fd)
    except (FileNotFoundError, NotADirectoryError):
        return False
    return True


def link_beneath(
    src: str | os.PathLike[str],
    root: str | os.PathLike[str],
    relpath: str | os.PathLike[str],
    *,
    create: bool = True,
) -> None:
    """Hard-link the file ``src`` (never through a symlink as its last name) to
    ``root/relpath``, making missing folders; refuses a symlink on the way
    (:class:`SymlinkInPathError`); ``FileExistsError`` if the name is taken (never
    replaced).  The folder is fsynced."""
    with parent_beneath(root, relpath, create=create) as (fd, name):
        os.link(src, name, dst_dir_fd=fd, follow_symlinks=False)
        os.fsync(fd)
