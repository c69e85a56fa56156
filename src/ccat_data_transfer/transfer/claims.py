"""How the transfer and archive stages take rows and hand them to workers.

A manager moves a row on (PENDING -> SCHEDULED, a package PENDING -> IN_PROGRESS) and a
task starts its work (unpack SCHEDULED -> IN_PROGRESS) only when the row is still in
the state it expects (:func:`claim`, one conditional ``UPDATE``), so two managers, or a
task delivered twice, never take the same row twice.  The task start of a ``status``
column is :func:`ccat_data_transfer.core.row_tasks.start_scheduled`.  A manager commits its
claims before it submits their tasks (:func:`submit_claimed`).

Room in the house: steps shared by the transfer stage's managers and tasks and the
archive manager.  Imports core (queue routing) and ``ccat_ops_db``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from ccat_data_transfer.core.operation_types import OperationType
from ccat_data_transfer.core.queues import route_task_by_location
from ccat_ops_db import models as m

__all__ = ["claim", "submit_claimed"]


def claim(session: Session, model: Any, row_id: int, *expected: Any, **values: Any) -> bool:
    """Set ``values`` on row ``row_id`` of ``model`` if it still matches every condition
    of ``expected``, in one ``UPDATE``.  True when this call changed the row.  Does not
    commit."""
    changed = session.execute(
        update(model).where(model.id == row_id, *expected).values(**values)
    ).rowcount
    return changed == 1


def submit_claimed(
    session: Session,
    claimed: list[tuple[int, int]],
    task: Any,
    operation: OperationType,
    submit: bool = True,
) -> list[int]:
    """Commit the claims ``(row id, location id)``, then (with ``submit``) send ``task``
    for each row to the ``operation`` queue of its location.  Returns the row ids."""
    session.commit()
    if submit:
        for row_id, location_id in claimed:
            location = session.get(m.DataLocation, location_id)
            queue = route_task_by_location(operation, location)
            task.apply_async(args=[row_id], queue=queue)
        session.expire_all()
    return [row_id for row_id, _ in claimed]
