"""The loop every manager runs: one cycle, sleep, repeat, until told to stop.

Looping managers report health (``health:manager:{name}``, ``{name}@{site}`` for a manager
scoped to one site, see :mod:`ccat_data_transfer.core.scope`) while they run.
A manager's work is a function ``cycle(session) -> result`` (its ``run_once``); tests and
``--once`` call it directly.  The loop commits after each cycle, logs failures without
dying, and stops cleanly on SIGINT/SIGTERM between cycles.  ``sleep_seconds`` is asked
again before every sleep so buffer pressure can shorten it.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

from ccat_data_transfer.core.celery_app import import_task_modules
from ccat_data_transfer.core.database import DatabaseConnection
from ccat_data_transfer.core.health import HealthReporter
from ccat_data_transfer.core.logs import get_logger

log = get_logger(__name__)

stop_event = threading.Event()


def request_stop(*_args: Any) -> None:
    stop_event.set()


def install_signal_handlers() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)


def run_cycle(
    name: str, cycle: Callable[[Session], Any], db: DatabaseConnection | None = None
) -> Any:
    """Run one cycle in its own session; commit on success, roll back on error."""
    db = db or DatabaseConnection()
    with db.session_scope() as session:
        return cycle(session)


def run_manager(
    name: str,
    cycle: Callable[[Session], Any],
    sleep_seconds: Callable[[], float],
    once: bool = False,
    db: DatabaseConnection | None = None,
    heartbeat: Callable[[], None] | None = None,
    max_cycles: int | None = None,
) -> Any:
    """Run ``cycle`` once (``once=True``) or in a loop until a stop is requested."""
    # A manager or the recovery service sends and re-sends tasks by name: it must know
    # every task (not only those of the modules it happened to import).
    import_task_modules()
    db = db or DatabaseConnection()
    if once:
        return run_cycle(name, cycle, db)
    install_signal_handlers()
    reporter = None
    if heartbeat is None:
        reporter = HealthReporter("manager", name).start()
    log.info("manager_started", manager=name)
    cycles = 0
    result = None
    while not stop_event.is_set():
        started = time.monotonic()
        try:
            result = run_cycle(name, cycle, db)
        except Exception as exc:  # keep the service alive; the next cycle retries
            log.exception("manager_cycle_failed", manager=name, error=str(exc))
        if heartbeat is not None:
            try:
                heartbeat()
            except Exception as exc:  # health reporting must not stop the work
                log.warning("heartbeat_failed", manager=name, error=str(exc))
        cycles += 1
        if max_cycles is not None and cycles >= max_cycles:
            break
        elapsed = time.monotonic() - started
        stop_event.wait(max(0.0, float(sleep_seconds()) - elapsed))
    if reporter is not None:
        reporter.stop()
    log.info("manager_stopped", manager=name, cycles=cycles)
    return result
