"""Which :class:`~ccat_data_transfer.core.storage.interface.Storage` serves a data location:
:func:`storage_for_location` builds the disk or S3 backend from a DataLocation's fields.

Room in the house: core.  Imports the storage backends and the configuration only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ccat_data_transfer.core.config import data_dir
from ccat_data_transfer.core.storage.disk import DiskStorage
from ccat_data_transfer.core.storage.errors import StorageError
from ccat_data_transfer.core.storage.interface import Storage
from ccat_data_transfer.core.storage.s3 import S3Storage

__all__ = ["storage_for_location"]


def _storage_type_name(location: Any) -> str:
    st = getattr(location, "storage_type", None)
    if st is None:
        raise StorageError(f"location {getattr(location, 'name', location)!r} has no storage_type")
    name = getattr(st, "name", st)
    return str(name).upper()


def storage_for_location(location: Any) -> Storage:
    """The :class:`~ccat_data_transfer.core.storage.Storage` for a DataLocation (duck-typed: any
    object with the same
    attributes works).

    DISK locations use ``path`` (a relative path is taken relative to the configured
    ``DATA_DIR``); S3 locations use ``endpoint_url`` (or ``endpoint``), ``bucket`` and
    ``prefix``, with credentials from the settings.
    """
    kind = _storage_type_name(location)
    label = getattr(location, "name", None) or repr(location)
    if kind == "DISK":
        path = getattr(location, "path", None)
        if not path:
            raise StorageError(f"disk location {label!r} has no path")
        root = Path(str(path)).expanduser()
        if not root.is_absolute():
            root = data_dir() / root
        return DiskStorage(root)
    if kind == "S3":
        endpoint = getattr(location, "endpoint_url", None) or getattr(location, "endpoint", None)
        bucket = getattr(location, "bucket", None) or getattr(location, "bucket_name", None)
        if not bucket:
            raise StorageError(f"S3 location {label!r} has no bucket")
        return S3Storage(
            endpoint_url=endpoint or None,
            bucket=str(bucket),
            prefix=str(getattr(location, "prefix", "") or ""),
            region=getattr(location, "region", None) or None,
        )
    if kind == "TAPE":
        raise StorageError(
            f"tape locations are not supported by this backend yet (location {label!r}); "
            "use a DISK or S3 location, or front the tape system with a disk cache location"
        )
    raise StorageError(f"unknown storage type {kind!r} for location {label!r}")
