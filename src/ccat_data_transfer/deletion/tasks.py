"""The deletion stage's Celery tasks (names unchanged: deployed workers and queued work
know them by these names, which keep the old module name ``deletion_manager``).

Each task re-checks the rule of every copy it is given against the database before
storage is touched (:func:`~ccat_data_transfer.deletion.worker.delete_copies`); their
shared base :class:`~ccat_data_transfer.deletion.worker.DeletionTask` gives late
acknowledgement, retry with backoff for transient errors and a log line on a final
failure.

Room in the house: stage deletion (tasks).  Imports the deletion worker and core.
"""

from __future__ import annotations

from celery import Task

from ccat_data_transfer.core.celery_app import app
from ccat_data_transfer.deletion.worker import DeletionTask, delete_copies

__all__ = [
    "delete_bulk_data_transfer_packages",
    "delete_bulk_raw_data_files",
    "delete_bulk_raw_data_packages",
    "delete_physical_copy",
]


@app.task(
    bind=True, base=DeletionTask, name="ccat_data_transfer.deletion_manager.delete_physical_copy"
)
def delete_physical_copy(
    self: Task, physical_copy_id: int, queue_name: str | None = None
) -> dict[str, int]:
    """Delete one physical copy that is DELETION_SCHEDULED (the rule is checked again here
    before storage is touched; nothing happens if it no longer holds)."""
    return delete_copies([physical_copy_id])


@app.task(
    bind=True,
    base=DeletionTask,
    name="ccat_data_transfer.deletion_manager.delete_bulk_raw_data_files",
)
def delete_bulk_raw_data_files(
    self: Task, physical_copy_ids: list[int], queue_name: str | None = None
) -> dict[str, int]:
    """Delete a batch of raw-file copies at one location (one task per batch)."""
    return delete_copies(physical_copy_ids)


@app.task(
    bind=True,
    base=DeletionTask,
    name="ccat_data_transfer.deletion_manager.delete_bulk_raw_data_packages",
)
def delete_bulk_raw_data_packages(
    self: Task, physical_copy_ids: list[int], queue_name: str | None = None
) -> dict[str, int]:
    """Delete a batch of RawDataPackage copies at one location."""
    return delete_copies(physical_copy_ids)


@app.task(
    bind=True,
    base=DeletionTask,
    name="ccat_data_transfer.deletion_manager.delete_bulk_data_transfer_packages",
)
def delete_bulk_data_transfer_packages(
    self: Task, physical_copy_ids: list[int], queue_name: str | None = None
) -> dict[str, int]:
    """Delete a batch of DataTransferPackage copies at one location."""
    return delete_copies(physical_copy_ids)
