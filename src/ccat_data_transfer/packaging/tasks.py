"""The packaging stages' Celery tasks (names unchanged: deployed workers and queued work
know them by these names).

* ``ccat_data_transfer.create_raw_data_package`` - stage 1, body
  :func:`~ccat_data_transfer.packaging.raw_packages.build_raw_data_package`;
* ``ccat_data_transfer.create_data_transfer_package`` - stage 2, body
  :func:`~ccat_data_transfer.packaging.transfer_packages.build_data_transfer_package`.

Room in the house: stage packaging (tasks).  Imports the packaging modules and core.
"""

from __future__ import annotations

from typing import Any

from ccat_data_transfer.core.celery_app import app
from ccat_data_transfer.packaging.raw_packages import build_raw_data_package
from ccat_data_transfer.packaging.transfer_packages import build_data_transfer_package

__all__ = ["create_data_transfer_package", "create_raw_data_package"]


@app.task(bind=True, acks_late=True, name="ccat_data_transfer.create_raw_data_package")
def create_raw_data_package(self: Any, package_id: int) -> dict[str, Any]:
    """Build, place and record one claimed RawDataPackage (idempotent)."""
    return build_raw_data_package(package_id)


@app.task(bind=True, acks_late=True, name="ccat_data_transfer.create_data_transfer_package")
def create_data_transfer_package(self: Any, dtp_id: int) -> dict[str, Any]:
    """Build and record one claimed DataTransferPackage at its buffer (idempotent)."""
    return build_data_transfer_package(dtp_id)
