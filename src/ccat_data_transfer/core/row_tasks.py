"""Steps shared by the stage managers and their tasks.

A manager claims work by setting it SCHEDULED and submits a task; the task must then take
the row for itself before doing anything.  Celery may deliver a task twice (``acks_late``),
so that step is one conditional ``UPDATE`` (:func:`start_scheduled`): only the worker
whose update changed the row goes on, and a duplicate delivery does nothing.

In embedded mode a submitted task runs inline; the packaging managers fold its result
into their cycle summary (:func:`merge_inline_package_result`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from ccat_ops_db import models as m

__all__ = ["merge_inline_package_result", "start_scheduled"]


def start_scheduled(session: Session, model: Any, row_id: int, **values: Any) -> bool:
    """Move row ``row_id`` of ``model`` from SCHEDULED to IN_PROGRESS (also setting
    ``values``, e.g. ``start_time``) in one ``UPDATE ... WHERE status = SCHEDULED``.

    Returns True when this call made the change; False when the row is gone or in any
    other state (another worker started it, or recovery reset it), in which case the
    task must skip.  Does not commit.
    """
    changed = session.execute(
        update(model)
        .where(model.id == row_id, model.status == m.Status.SCHEDULED)
        .values(status=m.Status.IN_PROGRESS, **values)
        .execution_options(synchronize_session=False)
    ).rowcount
    return bool(changed)


def merge_inline_package_result(
    summary: dict[str, Any], outcome: Any, totals: Mapping[str, str]
) -> None:
    """Fold the result of a packaging task that ran inline (embedded mode) into a
    manager's cycle summary; a task queued for a worker (no result yet) is left alone.

    A ``completed`` result counts in ``packages_created`` and adds, for every
    ``summary key -> result key`` of ``totals``, that result value; a ``failed`` one
    counts in ``packages_failed``.  Checksum errors are collected either way.
    """
    from celery.result import EagerResult

    if not isinstance(outcome, EagerResult) or not isinstance(outcome.result, dict):
        return
    result = outcome.result
    if result.get("status") == "completed":
        summary["packages_created"] += 1
        for summary_key, result_key in totals.items():
            summary[summary_key] += result.get(result_key, 0)
    elif result.get("status") == "failed":
        summary["packages_failed"] += 1
    summary["checksum_errors"].extend(result.get("checksum_errors", []))
