"""Storage backends: the one small interface every pipeline stage uses to touch data.

A thin public face (imports only); the code lives in

* :mod:`~ccat_data_transfer.core.storage.interface` - :class:`Storage`, path checks and the
  atomic local write;
* :mod:`~ccat_data_transfer.core.storage.errors` - :class:`StorageError` and its kinds;
* :mod:`~ccat_data_transfer.core.storage.disk` - :class:`DiskStorage`, a directory tree;
* :mod:`~ccat_data_transfer.core.storage.s3` - :class:`S3Storage`, a bucket on an S3 server;
* :mod:`~ccat_data_transfer.core.storage.factory` - :func:`storage_for_location`.

Room in the house: core.  Imported by every stage; imports nothing above core.
"""

from ccat_data_transfer.core.storage import disk, errors, factory, interface, s3
from ccat_data_transfer.core.storage.disk import *  # noqa: F403
from ccat_data_transfer.core.storage.errors import *  # noqa: F403
from ccat_data_transfer.core.storage.factory import *  # noqa: F403
from ccat_data_transfer.core.storage.interface import *  # noqa: F403
from ccat_data_transfer.core.storage.s3 import *  # noqa: F403

__all__ = [*interface.__all__, *errors.__all__, *disk.__all__, *s3.__all__, *factory.__all__]
