"""The transfer stage's Celery tasks (names unchanged: deployed workers and queued work
know them by these names, which keep the old module name ``transfer_manager``).

Each takes one DataTransfer row id; its body claims the row itself (SCHEDULED ->
IN_PROGRESS in one conditional UPDATE), so a duplicate delivery does nothing, and late
acknowledgement leaves the task queued when a worker is lost midway.

Room in the house: stage transfer (tasks).  Imports the transfer stage's execution and
unpack modules and core.
"""

from __future__ import annotations

from typing import Any

from ccat_data_transfer.core.celery_app import app
from ccat_data_transfer.transfer.execution import execute_transfer
from ccat_data_transfer.transfer.unpack import execute_unpack

__all__ = ["transfer_data_transfer_package", "unpack_data_transfer_package"]


@app.task(
    bind=True,
    acks_late=True,
    name="ccat_data_transfer.transfer_manager.transfer_data_transfer_package",
)
def transfer_data_transfer_package(self: Any, data_transfer_id: int) -> str:
    """Run :func:`~ccat_data_transfer.transfer.execution.execute_transfer` on the origin
    location's queue."""
    return execute_transfer(int(data_transfer_id))


@app.task(
    bind=True,
    acks_late=True,
    name="ccat_data_transfer.transfer_manager.unpack_data_transfer_package",
)
def unpack_data_transfer_package(self: Any, data_transfer_id: int) -> str:
    """Run :func:`~ccat_data_transfer.transfer.unpack.execute_unpack` on the destination
    buffer's queue."""
    return execute_unpack(int(data_transfer_id))
