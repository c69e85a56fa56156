"""Tar packaging with checksums in one pass, and extraction that cannot be abused.

A thin public face (imports only); the code lives in

* :mod:`~ccat_data_transfer.core.tarutil.common` - member and result types, errors,
  :func:`sha256_file`;
* :mod:`~ccat_data_transfer.core.tarutil.writing` - :func:`write_tar_with_checksums`;
* :mod:`~ccat_data_transfer.core.tarutil.extraction` - :func:`list_tar_members` and
  :func:`safe_extract`.

Room in the house: core.  Imported by the packaging, transfer and staging stages.
"""

from ccat_data_transfer.core.tarutil import common, extraction, writing
from ccat_data_transfer.core.tarutil.common import *  # noqa: F403
from ccat_data_transfer.core.tarutil.extraction import *  # noqa: F403
from ccat_data_transfer.core.tarutil.writing import *  # noqa: F403

__all__ = [*common.__all__, *writing.__all__, *extraction.__all__]
