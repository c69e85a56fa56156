"""Tar packaging with checksums in one pass, and extraction that cannot be abused.

A thin public face (imports only); the code lives in

* :mod:`~ccat_data_transfer.tarutil.common` - member and result types, errors,
  :func:`sha256_file`;
* :mod:`~ccat_data_transfer.tarutil.writing` - :func:`write_tar_with_checksums`;
* :mod:`~ccat_data_transfer.tarutil.extraction` - :func:`list_tar_members` and
  :func:`safe_extract`.

Room in the house: core.  Imported by the packaging, transfer and staging stages.
"""

from ccat_data_transfer.tarutil.common import (
    BLOCKSIZE,
    DEFAULT_BUFSIZE,
    CorruptTarError,
    ExtractedMember,
    TarEntry,
    TarMember,
    TarResult,
    TarSourceChangedError,
    TarUtilError,
    UnsafeTarError,
    sha256_file,
)
from ccat_data_transfer.tarutil.extraction import list_tar_members, safe_extract
from ccat_data_transfer.tarutil.writing import write_tar_with_checksums

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
