"""The archive stage's Celery tasks (names unchanged: deployed workers and queued work
know them by these names).

* ``ccat_data_transfer.archive_manager.archive_raw_data_package`` - body
  :func:`~ccat_data_transfer.archive.execution.execute_archive_transfer`, on the
  LTA-site buffer's queue;
* ``ccat_data_transfer.verify_archive_copies`` - body
  :func:`~ccat_data_transfer.archive.verification.verify_copies`, on the copies' own
  site's ``archive_verification`` queue (queued by
  :func:`~ccat_data_transfer.archive.proof.request_verification`).

Room in the house: stage archive (tasks).  Imports the archive stage's execution and
verification modules and core.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from ccat_data_transfer.archive.execution import execute_archive_transfer
from ccat_data_transfer.archive.verification import verify_copies
from ccat_data_transfer.core.celery_app import app

__all__ = ["archive_raw_data_package", "verify_archive_copies"]


@app.task(
    bind=True, acks_late=True, name="ccat_data_transfer.archive_manager.archive_raw_data_package"
)
def archive_raw_data_package(self: Any, archive_transfer_id: int) -> str:
    """Run :func:`~ccat_data_transfer.archive.execution.execute_archive_transfer` on the
    LTA-site buffer's queue (late acknowledgement; the body claims the row itself, so a
    duplicate delivery does nothing)."""
    return execute_archive_transfer(int(archive_transfer_id))


@app.task(bind=True, acks_late=True, name="ccat_data_transfer.verify_archive_copies")
def verify_archive_copies(self: Any, copy_ids: list[int], full: bool = False) -> dict[str, int]:
    """Celery task: :func:`~ccat_data_transfer.archive.verification.verify_copies` on the
    copies' own site's queue.  Idempotent: a duplicate delivery looks again and records
    the same outcome."""
    counts: dict[str, int] = defaultdict(int)
    for finding in verify_copies(copy_ids, full=full):
        counts[finding.outcome] += 1
    return dict(counts)
