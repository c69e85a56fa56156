"""The fixity stage's Celery task and the hook that queues it.

A verification that finds an archive copy MISSING or CORRUPT marks it lost and calls the
hooks of ``archive_proof.on_bad_copies``; :func:`on_bad_copies` (registered when this
module is imported; the archive verification imports it by name before it runs the
hooks) queues :func:`repair_archive_copy` (name ``ccat_data_transfer.repair_archive_copy``,
unchanged) on the bad copy's own LTA ``archive_verification`` queue, so the repair runs
at the site that writes the bytes.  Its body is
:func:`~ccat_data_transfer.fixity.repair.repair_copy`.

Room in the house: stage fixity (tasks).  Imports the fixity repair, the archive stage's
public ``proof``, core and ccat_ops_db.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from ccat_data_transfer.archive import proof as archive_proof
from ccat_data_transfer.archive.proof import Finding
from ccat_data_transfer.core.celery_app import app
from ccat_data_transfer.core.database import DatabaseConnection
from ccat_data_transfer.core.operation_types import OperationType
from ccat_data_transfer.core.queues import route_task_by_location
from ccat_data_transfer.fixity.repair import repair_copy
from ccat_ops_db import models as m

__all__ = ["on_bad_copies", "queue_repair", "repair_archive_copy"]


@app.task(bind=True, acks_late=True, name="ccat_data_transfer.repair_archive_copy")
def repair_archive_copy(self: Any, copy_id: int) -> str:
    """Celery task: :func:`~ccat_data_transfer.fixity.repair.repair_copy` at the bad
    copy's site.  Idempotent: a copy that is no longer lost is left alone."""
    return repair_copy(copy_id)


def queue_repair(session: Session, copy_id: int) -> None:
    """Queue the repair of ``copy_id`` on its LTA's archive_verification queue."""
    copy = session.get(m.PhysicalCopy, copy_id)
    if copy is None:
        return
    queue = route_task_by_location(OperationType.ARCHIVE_VERIFICATION, copy.data_location)
    repair_archive_copy.apply_async(args=[copy_id], queue=queue)


def on_bad_copies(findings: list[Finding]) -> None:
    """``archive_proof.on_bad_copies`` hook: queue a repair of every bad archive copy."""
    db = DatabaseConnection()
    with db.session_scope() as session:
        lta_ids = [
            f.copy_id
            for f in findings
            if f.package_id is not None
            and session.get(m.DataLocation, f.location_id).location_type
            == m.LocationType.LONG_TERM_ARCHIVE
        ]
    for copy_id in lta_ids:
        with db.session_scope() as session:
            queue_repair(session, copy_id)


if on_bad_copies not in archive_proof.on_bad_copies:
    archive_proof.on_bad_copies.append(on_bad_copies)
