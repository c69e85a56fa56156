"""Storage backends: the one small interface every pipeline stage uses to touch data.

A thin public face (imports only); the code lives in

* :mod:`~ccat_data_transfer.storage.interface` - :class:`Storage`, its errors, path
  checks and the atomic local write;
* :mod:`~ccat_data_transfer.storage.disk` - :class:`DiskStorage`, a directory tree;
* :mod:`~ccat_data_transfer.storage.s3` - :class:`S3Storage`, a bucket on an S3 server;
* :mod:`~ccat_data_transfer.storage.factory` - :func:`storage_for_location`.

Room in the house: core.  Imported by every stage; imports nothing above core.
"""

from ccat_data_transfer.storage.disk import DiskStorage
from ccat_data_transfer.storage.factory import storage_for_location
from ccat_data_transfer.storage.interface import (
    CHUNK_SIZE,
    ObjectInfo,
    ObjectNotFound,
    Storage,
    StorageError,
    StorageFullError,
    StorageUnavailableError,
    Usage,
    is_temp_name,
    normalize_path,
)
from ccat_data_transfer.storage.s3 import S3Storage

__all__ = [
    "CHUNK_SIZE",
    "DiskStorage",
    "ObjectInfo",
    "ObjectNotFound",
    "S3Storage",
    "Storage",
    "StorageError",
    "StorageFullError",
    "StorageUnavailableError",
    "Usage",
    "is_temp_name",
    "normalize_path",
    "storage_for_location",
]
