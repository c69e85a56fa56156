"""The Celery application: one task engine for both ways to run.

Embedded mode (``EXECUTION_MODE = "embedded"``) runs every task in-process, eagerly, with
no broker; distributed mode sends tasks to the broker (Redis, or RabbitMQ by URL) where
workers consume the ``{site}_{location}_{operation}`` queues.  The task code is the same.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from ccat_data_transfer.core.config import settings
from ccat_data_transfer.core.health import HealthReporter
from ccat_data_transfer.core.registry import task_modules

TASK_MODULES = task_modules()

app = Celery("ccat_data_transfer")


def is_embedded() -> bool:
    return str(settings.get("EXECUTION_MODE", "embedded")).lower() == "embedded"


def configure_celery() -> Celery:
    """(Re)apply the settings to the Celery app; call after changing settings."""
    embedded = is_embedded()
    app.conf.update(
        broker_url=str(settings.BROKER_URL),
        result_backend=str(settings.get("RESULT_BACKEND_URL", "") or "") or None,
        task_always_eager=embedded,
        task_eager_propagates=False,
        task_store_eager_result=False,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_default_queue="ccat_default",
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        include=TASK_MODULES,
        # A task whose worker died is delivered again after this long (Redis broker).
        broker_transport_options={
            "visibility_timeout": int(settings.get("BROKER_VISIBILITY_TIMEOUT_SECONDS", 300))
        },
    )
    return app


configure_celery()


def import_task_modules() -> None:
    """Import every stage's task modules (the registry's list, Celery's ``include``), as
    a worker does at start: a process that sends or re-sends a task by name (recovery,
    the managers, the API) then knows every task.  Idempotent and cheap once done."""
    app.loader.import_default_modules()


def registered_task(name: str) -> Any:
    """The task called ``name``, importing the task modules first if this process has
    not yet; ``celery.exceptions.NotRegistered`` only for a name no stage defines."""
    if name not in app.tasks:
        import_task_modules()
    return app.tasks[name]


def _start_worker_health(sender: object = None, **_kwargs: object) -> None:
    """A worker says it is alive (health:worker:{hostname}) for as long as it runs."""
    hostname = getattr(sender, "hostname", None) or "worker"
    reporter = HealthReporter("worker", str(hostname)).start()
    app.conf.ccat_health_reporter = reporter


def _stop_worker_health(**_kwargs: object) -> None:
    reporter = app.conf.get("ccat_health_reporter")
    if reporter is not None:
        reporter.stop()


def _connect_worker_signals() -> None:
    from celery.signals import worker_ready, worker_shutdown

    worker_ready.connect(_start_worker_health, weak=False)
    worker_shutdown.connect(_stop_worker_health, weak=False)


_connect_worker_signals()
