"""Low-level helpers for local files and relative paths, shared by the storage backends
(:mod:`ccat_data_transfer.storage`) and the tar code (:mod:`ccat_data_transfer.tarutil`).

Room in the house: core, at the bottom.  Imports only the standard library; every module
may import it.  What is here: checking a relative POSIX path (no absolute paths, no
``..``, no NUL), read-buffer sizing, the sequential-read hint and fsync of a directory.
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MIN_BUFSIZE",
    "PathErrors",
    "buffer_size",
    "clean_relative_path",
    "fadvise_sequential",
    "file_size",
    "fsync_dir",
]

#: Smallest read buffer, and the step buffers grow in: small files are not read through
#: a freshly zeroed buffer of several MiB.
MIN_BUFSIZE = 64 * 1024


@dataclass(frozen=True, slots=True)
class PathErrors:
    """The messages (format strings over ``{path!r}``) a caller of
    :func:`clean_relative_path` gives for each kind of bad path."""

    nul: str
    absolute: str
    dotdot: str


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
