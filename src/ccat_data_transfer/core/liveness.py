"""Liveness of work: heartbeats while it runs, and the one rule that says it is stalled.

Every long step (building a package, a transfer, an unpack, an archive copy, a staging
job, a deletion batch) runs inside :func:`beating`: a thread stamps the row's heartbeat
column every ``HEARTBEAT_SECONDS`` while the ``with`` block runs.  The recovery service
then tells three kinds of work apart:

* **started, alive**: heartbeat younger than :func:`stall_window` (``HEARTBEAT_SECONDS``
  x ``HEARTBEAT_MISSED_BEATS``): never touched, however long it has been running;
* **started, stalled** (:func:`stopped`): its heartbeat stopped, its worker is gone: the
  stage resets it (one failed attempt, or a released claim);
* **queued, not started**: never reset and never charged a retry.  If it has waited
  longer than ``QUEUED_RESEND_SECONDS`` (:func:`waited_in_queue`), the broker may have lost
  the message: the task is sent again (:func:`resend`) and the row's "sent" column
  stamped.  Every task takes its row with one conditional ``UPDATE``
  (:func:`ccat_data_transfer.core.row_tasks.start_scheduled`), so a duplicate delivery does
  nothing.

Room in the house: core.  Imports config, database, logging, the Celery app (to find a
task by name) and ``ccat_ops_db``; used by the tasks and the recovery service.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, update
from sqlalchemy.orm import Session

from ccat_data_transfer.core.celery_app import app, is_embedded, registered_task
from ccat_data_transfer.core.config import settings
from ccat_data_transfer.core.database import DatabaseConnection
from ccat_data_transfer.core.errors import RetryableError
from ccat_data_transfer.core.logs import get_logger
from ccat_ops_db import models as m

log = get_logger(__name__)

__all__ = [
    "beating",
    "heartbeat_seconds",
    "queued_resend_window",
    "ResendFailed",
    "resend",
    "resend_all",
    "resend_before",
    "stall_window",
    "stalled_before",
    "stopped",
    "waited_in_queue",
    "waiting_in_broker",
]


def heartbeat_seconds() -> float:
    """Seconds between two beats of running work (HEARTBEAT_SECONDS, at least 0.1)."""
    return max(0.1, float(settings.get("HEARTBEAT_SECONDS", 30)))


def stall_window() -> timedelta:
    """How long started work may go without a beat before it counts as stalled:
    HEARTBEAT_SECONDS x HEARTBEAT_MISSED_BEATS."""
    beats = float(settings.get("HEARTBEAT_MISSED_BEATS", 4))
    return timedelta(seconds=float(settings.get("HEARTBEAT_SECONDS", 30)) * beats)


def queued_resend_window() -> timedelta:
    """How long queued work waits before its task is sent again (QUEUED_RESEND_SECONDS)."""
    return timedelta(seconds=float(settings.get("QUEUED_RESEND_SECONDS", 300)))


def stopped(
    beat: Any, now: datetime | None = None, window: timedelta | None = None, before: Any = None
) -> ColumnElement[bool]:
    """THE stalled rule, for started work: its heartbeat column ``beat`` is older than
    ``window`` (default :func:`stall_window`), i.e. several beats were missed.  ``before``
    stands for :func:`stalled_before` (e.g. a bound parameter of a statement built once and
    given that value with each execution)."""
    return beat < (before if before is not None else stalled_before(now, window))


def stalled_before(now: datetime | None = None, window: timedelta | None = None) -> datetime:
    """Started work whose last beat is older than this has stopped (:func:`stopped`)."""
    return (now or m.utcnow()) - (window if window is not None else stall_window())


def waited_in_queue(
    sent: Any, now: datetime | None = None, before: Any = None
) -> ColumnElement[bool]:
    """Queued work whose task was (last) sent longer than QUEUED_RESEND_SECONDS ago.
    ``before`` stands for :func:`resend_before` (as in :func:`stopped`)."""
    return sent < (before if before is not None else resend_before(now))


def resend_before(now: datetime | None = None) -> datetime:
    """Queued work sent before this has waited too long (:func:`waited_in_queue`)."""
    return (now or m.utcnow()) - queued_resend_window()


def waiting_in_broker(queue: str) -> int | None:
    """Messages waiting in ``queue`` at the broker: 0 in embedded mode (no broker) and
    for a queue the broker does not know (Redis drops an empty list), None when the broker
    cannot be asked.  Looked up at most once per few seconds per queue (a recovery pass
    asks for every queued row of a backlog)."""
    if is_embedded():
        return 0
    now = time.monotonic()
    cached = _broker_depth.get(queue)
    if cached is not None and now - cached[0] < _BROKER_DEPTH_TTL:
        return cached[1]
    from kombu.exceptions import ChannelError

    depth: int | None
    try:
        with app.connection_for_read() as conn:
            try:
                ok = conn.default_channel.queue_declare(queue=queue, passive=True)
                depth = int(ok.message_count)
            except ChannelError:  # no such queue: nothing waits in it
                depth = 0
    except Exception as exc:  # the broker cannot be reached: do not guess
        log.warning("broker_queue_depth_unavailable", queue=queue, error=str(exc))
        depth = None
    _broker_depth[queue] = (now, depth)
    return depth


_BROKER_DEPTH_TTL = 5.0
_broker_depth: dict[str, tuple[float, int | None]] = {}


def resend(task_name: str, row_id: Any, queue: str, **kwargs: Any) -> bool:
    """Send the task ``task_name`` for ``row_id`` again on ``queue`` (runs inline in
    embedded mode) when the broker has lost it; returns whether it was sent.

    The broker is compared first: while messages still wait in ``queue`` the row's own
    message may be among them, so nothing is sent (a long backlog would otherwise gather
    one duplicate per queued row every QUEUED_RESEND_SECONDS).  An empty queue with the
    row still queued means the message was lost (e.g. Redis restarted without
    persistence): the task is sent again.  A duplicate is harmless anyway: the task takes
    its row with a conditional UPDATE and a second delivery does nothing.

    The task is looked up by name after importing every stage's task modules
    (``ccat_data_transfer.core.celery_app.registered_task``): the recovery process
    imports none of them itself.  A send that fails raises; the caller stamps the row as
    re-sent only when this returned True."""
    task = registered_task(task_name)
    waiting = waiting_in_broker(queue)
    if waiting is None or waiting > 0:
        return False
    task.apply_async(args=[row_id], kwargs=kwargs, queue=queue)
    return True


class ResendFailed(RetryableError):
    """Some re-sends of a recovery step failed (each logged); the others went out."""

    def __init__(self, what: str, counts: tuple[int, int, int], first: BaseException) -> None:
        sent, failed, total = counts
        super().__init__(f"{failed} of {total} re-send(s) of {what} failed; first: {first}")
        self.sent, self.failed = sent, failed


def resend_all(
    session: Session,
    what: str,
    sends: Iterable[tuple[str, Any, str]],
    stamp: Callable[[str, Any, str], Any],
) -> int:
    """Send again each ``(task name, row id, queue)`` (:func:`resend`); only after a send
    went out is ``stamp(task_name, row_id, queue)`` called (it stamps the row's "sent" column with a
    conditional UPDATE) and committed.  A failing send or stamp is logged and counted and
    never stops the others, and its row stays unstamped (the next pass tries it again);
    at the end :class:`ResendFailed` reports them.  Returns how many were sent."""
    sent = total = failed = 0
    first: BaseException | None = None
    for task_name, row_id, queue in sends:
        total += 1
        try:
            if not resend(task_name, row_id, queue):
                continue
            sent += 1
            stamp(task_name, row_id, queue)
            session.commit()
        except Exception as exc:
            failed += 1
            first = first or exc
            with contextlib.suppress(Exception):
                session.rollback()
            log.exception(
                "resend_failed", what=what, task=task_name, row_id=row_id, queue=queue,
                error=str(exc),
            )  # fmt: skip
    if first is not None:
        raise ResendFailed(what, (sent, failed, total), first)
    return sent


@contextlib.contextmanager
def beating(
    target: Any,
    *where: ColumnElement[bool],
    attempt: str | None = None,
    column: str = "heartbeat_at",
    label: str = "",
) -> Iterator[None]:
    """Stamp ``column`` of the rows of ``target`` (a model or a table) matching ``where``
    with the current time, at once and then every HEARTBEAT_SECONDS, in a thread of its
    own, while the ``with`` block runs.  A failing beat is logged, never raised: the
    heartbeat must not break the work.  With ``attempt``, only the rows whose
    ``attempt_id`` is still that attempt beat (a superseded attempt keeps no row alive)."""
    table = getattr(target, "__table__", target)
    if attempt is not None:
        where = (*where, table.c.attempt_id == attempt)
    statement = update(table).where(*where)
    interval = heartbeat_seconds()
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                with DatabaseConnection().session_scope() as s:
                    s.execute(statement.values({column: m.utcnow()}))
            except Exception as exc:  # the heartbeat must never break the work
                log.warning("heartbeat_failed", work=label or table.name, error=str(exc))
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{label or table.name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)
