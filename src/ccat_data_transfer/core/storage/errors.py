"""The storage error hierarchy: callers tell "disk full" or "server unreachable" (retry
later, maybe elsewhere) from "object missing".

Room in the house: core, at the bottom of :mod:`ccat_data_transfer.core.storage`.  Imports the
standard library and the error family (:mod:`ccat_data_transfer.core.errors`) only.
"""

from __future__ import annotations

import errno

from ccat_data_transfer.core.errors import CcatError

__all__ = [
    "ObjectNotFound",
    "StorageError",
    "StorageFullError",
    "StorageUnavailableError",
    "is_full",
]

# errno values that mean "no room left": a full filesystem or an exhausted quota.
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class StorageError(CcatError):
    """A storage operation failed."""


class StorageFullError(StorageError):
    """The storage has no space left (ENOSPC, quota exceeded, S3 storage full)."""


class StorageUnavailableError(StorageError):
    """The storage cannot be reached: S3 server down, bucket or root directory missing."""


class ObjectNotFound(StorageError):
    """The requested object does not exist."""


def is_full(exc: BaseException) -> bool:
    """True for an OSError that means "no room left" (a full filesystem or quota)."""
    return isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS
