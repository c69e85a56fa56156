"""What the tar code shares: the member and result types, its errors, member-name checks
and :func:`~ccat_data_transfer.core.tarutil.sha256_file`.

Raw data packages and data transfer packages are plain (uncompressed) POSIX tar files,
written by :mod:`~ccat_data_transfer.core.tarutil.writing` and read back by
:mod:`~ccat_data_transfer.core.tarutil.extraction`.

Room in the house: core.  Imports the standard library and
:mod:`ccat_data_transfer.core.fileio` only.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from ccat_data_transfer.core.errors import CcatError
from ccat_data_transfer.core.fileio import (
    COPY_BUFSIZE,
    PathErrors,
    buffer_size,
    clean_relative_path,
    fadvise_sequential,
    file_size,
    temporary_component,
)

__all__ = [
    "BLOCKSIZE",
    "CorruptTarError",
    "DEFAULT_BUFSIZE",
    "ExtractedMember",
    "RECORDSIZE",
    "TarEntry",
    "TarMember",
    "TarResult",
    "TarSourceChangedError",
    "TarUtilError",
    "UnsafeTarError",
    "sha256_file",
]

BLOCKSIZE = tarfile.BLOCKSIZE  # 512
RECORDSIZE = tarfile.RECORDSIZE  # 10240: archives are padded to whole records, as GNU tar does
#: Read size of the packaging loop (measured in bench/packaging.py and
#: bench/buffer_curve.py: see ``fileio.COPY_BUFSIZE``).
DEFAULT_BUFSIZE = COPY_BUFSIZE
ZERO_BLOCK = bytes(BLOCKSIZE)


class TarUtilError(CcatError):
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
    """Outcome of :func:`~ccat_data_transfer.core.tarutil.write_tar_with_checksums`."""

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
    """A regular file written by :func:`~ccat_data_transfer.core.tarutil.safe_extract`."""

    arcname: str
    path: Path
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class TarEntry:
    """One member as listed by :func:`~ccat_data_transfer.core.tarutil.list_tar_members`."""

    arcname: str
    size: int
    mtime: int
    kind: str  # file, dir, symlink, hardlink, chardev, blockdev, fifo, sparse, other
    mode: int
    linkname: str
    offset_data: int


# --- names --------------------------------------------------------------------------------

_ARCNAME_ERRORS = PathErrors(
    nul="tar member name contains a NUL byte: {path!r}",
    absolute="absolute path {path!r}",
    dotdot="'..' component in {path!r}",
)


def normalize_arcname(name: str) -> str:
    """Normalised member name, or ValueError for absolute paths, ``..`` and a component
    the storage treats as temporary (``.name.tmp-*``: hidden from listings, swept by the
    janitor, so a member placed there would be lost)."""
    norm = clean_relative_path(name, _ARCNAME_ERRORS)
    component = temporary_component(norm)
    if component is not None:
        raise ValueError(f"temporary name {component!r} in {name!r}")
    return norm


# --- checksums ----------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike[str], bufsize: int = DEFAULT_BUFSIZE) -> str:
    """Hex SHA-256 of a file, read with large reads into one reused buffer."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        fadvise_sequential(f.fileno())
        mv = memoryview(bytearray(buffer_size(file_size(f), bufsize)))
        while n := f.readinto(mv):
            h.update(mv[:n])
    return h.hexdigest()
