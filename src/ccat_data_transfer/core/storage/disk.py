"""The disk backend: a :class:`~ccat_data_transfer.core.storage.interface.Storage` on a
directory tree of a local or mounted filesystem.

Room in the house: core.  Imports :mod:`ccat_data_transfer.core.storage.interface` and
:mod:`ccat_data_transfer.core.fileio` only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat as stat_mod
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ccat_data_transfer.core.fileio import (
    copy_fd,
    fadvise_sequential,
    is_temporary_name,
    parent_beneath,
    unlink_beneath,
)
from ccat_data_transfer.core.storage.errors import (
    ObjectNotFound,
    StorageError,
    StorageFullError,
    StorageUnavailableError,
    is_full,
)
from ccat_data_transfer.core.storage.interface import (
    CHUNK_SIZE,
    ObjectInfo,
    Storage,
    Usage,
    atomic_file,
    is_temp_name,
    normalize_path,
)

__all__ = ["DiskStorage"]


class DiskStorage(Storage):
    """A directory tree on a local or mounted filesystem.

    The root must exist (``create=True`` makes it): a missing root usually means an
    unmounted disk, and writing into the mount point would fill the wrong filesystem, so
    every operation raises :class:`~ccat_data_transfer.core.storage.StorageUnavailableError`
    instead.  Objects are regular files; :meth:`list` does not follow symlinks, and no path
    may resolve outside the root.
    """

    kind = "disk"

    def __init__(self, root: str | os.PathLike[str], *, create: bool = False) -> None:
        self.root = Path(root).expanduser().absolute()
        if create:
            self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"DiskStorage({str(self.root)!r})"

    def _check_root(self) -> str:
        real = os.path.realpath(self.root)
        if not os.path.isdir(real):
            raise StorageUnavailableError(f"storage root {self.root} does not exist")
        return real

    def _full(self, path: str) -> Path:
        """Absolute path for ``path``, checked to stay inside the root (also via symlinks)."""
        rel = normalize_path(path)
        real_root = self._check_root()
        full = os.path.join(real_root, rel)
        resolved = os.path.realpath(full)
        if resolved != real_root and not resolved.startswith(real_root + os.sep):
            raise ValueError(f"storage path {path!r} resolves outside the root {self.root}")
        return Path(full)

    def open_read(self, path: str) -> BinaryIO:
        full = self._full(path)
        try:
            f = open(full, "rb", buffering=CHUNK_SIZE)  # noqa: SIM115 - returned to caller
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"{path} not found in {self.root}") from exc
        except IsADirectoryError as exc:
            raise ObjectNotFound(f"{path} is a directory in {self.root}") from exc
        fadvise_sequential(f.fileno())
        return f

    @contextlib.contextmanager
    def open_write(self, path: str) -> Iterator[BinaryIO]:
        full = self._full(path)
        # The folders are made and the file written through descriptors opened without
        # following symlinks: a folder swapped for a symlink after the check above cannot
        # redirect the write outside the root.
        parent = contextlib.ExitStack()
        try:
            dir_fd, name = parent.enter_context(
                parent_beneath(self.root, normalize_path(path), create=True)
            )
        except OSError as exc:
            if is_full(exc):
                raise StorageFullError(f"no space left creating {full.parent}: {exc}") from exc
            raise
        with parent, atomic_file(full.parent, name, dir_fd=dir_fd) as f:
            yield f

    def stat(self, path: str) -> ObjectInfo | None:
        full = self._full(path)
        try:
            st = os.stat(full)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not stat_mod.S_ISREG(st.st_mode):
            return None
        return ObjectInfo(normalize_path(path), st.st_size, st.st_mtime)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        norm = normalize_path(prefix, allow_empty=True)
        # Keep a trailing "/" meaningful ("a/" must not match "ab").
        if prefix.endswith("/") and norm:
            norm += "/"
        real_root = self._check_root()
        # Walk only the deepest directory the prefix pins down, then filter by string.
        start_rel = norm.rsplit("/", 1)[0] if "/" in norm else ""
        start = os.path.join(real_root, start_rel) if start_rel else real_root
        real_start = os.path.realpath(start)
        if real_start != start or not os.path.isdir(start):
            # Missing, or reached through a symlink (which could lead out of the root).
            return
        stack = [(start, start_rel)]
        while stack:
            directory, rel_dir = stack.pop()
            try:
                with os.scandir(directory) as it:
                    entries = sorted(it, key=lambda e: e.name, reverse=True)
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in entries:
                rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                if entry.is_dir(follow_symlinks=False):
                    if is_temporary_name(entry.name):
                        continue  # work area of an unfinished write or unpack
                    if rel.startswith(norm) or norm.startswith(rel + "/"):
                        stack.append((entry.path, rel))
                    continue
                if not entry.is_file(follow_symlinks=False) or is_temporary_name(entry.name):
                    continue
                if not rel.startswith(norm):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                yield ObjectInfo(rel, st.st_size, st.st_mtime)

    def list_temporary(self) -> Iterator[ObjectInfo]:
        """The temporary names of unfinished writes that :meth:`list` skips: files
        ``.name.tmp-*`` and work directories such as ``.unpack.tmp-*`` (not entered).  A
        directory's size is that of the files in it; ``mtime`` is the last change of the
        name or anything in it (newest mtime or ctime), so a write in progress looks young.
        Symlinks are never reported."""
        real_root = self._check_root()
        for dirpath, dirnames, filenames in os.walk(real_root):
            rel_dir = os.path.relpath(dirpath, real_root)
            rel_dir = "" if rel_dir == "." else rel_dir + "/"
            for name in sorted(d for d in dirnames if is_temporary_name(d)):
                dirnames.remove(name)
                full = os.path.join(dirpath, name)
                if os.path.islink(full):
                    continue
                size, changed = _tree_size_and_change(full)
                yield ObjectInfo(rel_dir + name, size, changed)
            for name in sorted(f for f in filenames if is_temporary_name(f)):
                try:
                    st = os.lstat(os.path.join(dirpath, name))
                except FileNotFoundError:
                    continue  # the write finished (renamed) meanwhile
                if stat_mod.S_ISREG(st.st_mode):
                    yield ObjectInfo(rel_dir + name, st.st_size, max(st.st_mtime, st.st_ctime))

    def remove_temporary(self, path: str) -> int:
        """Remove one temporary name found by :meth:`list_temporary` (a file, or a work
        directory with everything in it); returns the bytes freed (0 if already gone).
        Refuses any name that is not temporary."""
        if not is_temp_name(path):
            raise ValueError(f"{path!r} is not a temporary name; the janitor never removes it")
        full = self._full(path)
        try:
            with parent_beneath(self.root, normalize_path(path)) as (dir_fd, name):
                st = os.lstat(name, dir_fd=dir_fd)
                if stat_mod.S_ISDIR(st.st_mode):
                    size, _ = _tree_size_and_change(str(full))
                    shutil.rmtree(name, dir_fd=dir_fd)  # fd-based: never follows a symlink
                    return size
                if not stat_mod.S_ISREG(st.st_mode):
                    raise ValueError(f"{path!r} is neither a file nor a directory")
                os.unlink(name, dir_fd=dir_fd)
                return st.st_size
        except (FileNotFoundError, NotADirectoryError):
            return 0

    def delete(self, path: str) -> bool:
        self._full(path)
        # Unlinked relative to its folder, opened without following symlinks: a folder
        # swapped for a symlink after the check above cannot redirect the unlink.
        try:
            return unlink_beneath(self.root, normalize_path(path))
        except IsADirectoryError as exc:
            raise StorageError(f"{path} is a directory, not an object") from exc

    def usage(self) -> Usage:
        real_root = self._check_root()
        du = shutil.disk_usage(real_root)
        return Usage(used_bytes=du.used, total_bytes=du.total, free_bytes=du.free)

    def local_path(self, path: str) -> Path | None:
        return self._full(path)

    def _copy_open_file(self, src: BinaryIO, dst: BinaryIO, methods: tuple[str, ...]) -> int:
        """The bytes moved by the kernel where it can (``fileio.copy_fd``: ``copy_file_range``,
        then ``sendfile``, then one reused buffer; ``methods`` narrows the choice), into the
        fsynced temporary name of :meth:`open_write`."""
        dst.flush()  # nothing buffered may land after the kernel's bytes
        n, _ = copy_fd(src.fileno(), dst.fileno(), methods)
        return n


def _tree_size_and_change(top: str) -> tuple[int, float]:
    """Bytes of the regular files under ``top`` and the newest mtime/ctime of anything
    there (``top`` included); symlinks are not followed."""
    st = os.lstat(top)
    size, changed = 0, max(st.st_mtime, st.st_ctime)
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue
            changed = max(changed, st.st_mtime, st.st_ctime)
            if stat_mod.S_ISREG(st.st_mode):
                size += st.st_size
    return size, changed
