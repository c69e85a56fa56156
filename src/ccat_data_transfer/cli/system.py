"""Commands that run or inspect the system as a whole: workers and health."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import typer

from ccat_data_transfer.cli.common import (
    JSON_OPTION,
    SITE_HELP,
    VERBOSE_OPTION,
    app,
    console,
    get_db,
    manager_site,
    options,
    print_listing,
)
from ccat_data_transfer.core.config import settings
from ccat_data_transfer.core.health import list_services, managers_not_reporting

if TYPE_CHECKING:
    from ccat_data_transfer.core.database import DatabaseConnection


@app.command("health")
def health_command(
    as_json: bool = JSON_OPTION,
) -> None:
    """List the services that are alive and those that are dead."""
    if str(settings.get("EXECUTION_MODE", "embedded")).lower() == "embedded":
        get_db()  # the heartbeats are in the database: it must exist (nothing is created)
    services = list_services()
    print_listing(
        services,
        as_json=as_json,
        title="Services",
        columns=("Type", "Name", "State", "Host", "PID", "Last beat"),
        row=lambda svc: (
            svc["service_type"],
            svc["service_name"],
            "[green]alive[/]" if svc["alive"] else "[red]dead[/]",
            str(svc.get("host", "-")),
            str(svc.get("pid", "-")),
            str(svc.get("last_beat", "-")),
        ),
        empty="no service has reported health yet",
    )
    if as_json:
        return
    silent = managers_not_reporting(services)
    if silent:
        console.print(
            "managers of the registry with no heartbeat (none of their own, no `run`): "
            + ", ".join(silent),
            highlight=False,
        )
    dead = [s for s in services if not s["alive"]]
    if dead:
        raise typer.Exit(1)


@app.command("worker")
def worker_command(
    site: str | None = typer.Option(None, "--site", help="Consume every queue of this site."),
    location: str | None = typer.Option(
        None, "--location", help="Consume the queues of one location."
    ),
    concurrency: int = typer.Option(2, "--concurrency", "-c", min=1),
    name: str | None = typer.Option(None, "--name", help="Worker name (default: derived)."),
    list_only: bool = typer.Option(False, "--list-queues", help="Print the queues and exit."),
) -> None:
    """Start a Celery worker consuming the queues discovered from the DB."""
    from ccat_data_transfer.core.celery_app import app as celery_app
    from ccat_data_transfer.core.celery_app import configure_celery
    from ccat_data_transfer.core.queues import discover_queues

    db = get_db()
    with db.session_scope() as session:
        queues = discover_queues(session, site=site, location=location)
    if list_only:
        for queue in queues:
            console.print(queue, highlight=False)
        return
    configure_celery()
    worker_name = name or f"{location or site or 'all'}@{socket.gethostname()}"
    argv = [
        "worker",
        "--queues",
        ",".join(queues),
        "--hostname",
        worker_name,
        "--concurrency",
        str(concurrency),
        "--loglevel",
        "INFO",
        "--without-gossip",
        "--without-mingle",
    ]
    celery_app.worker_main(argv=argv)


# Demo settings: the lifecycle's clocks are shortened so that a whole run fits in a
# couple of minutes.  Production keeps the documented defaults.
DEMO_SETTINGS = {
    "RETENTION_PERIOD_MINUTES": 0,
    "RAW_DATA_PACKAGE_QUIET_PERIOD_SECONDS": 0,
    "DATA_TRANSFER_PACKAGE_MAX_WAIT_SECONDS": 0,
    "TRANSFER_RETRY_BASE_SECONDS": 0,
}


@app.command("run")
def run_command(
    simulate: bool = typer.Option(
        False,
        "--simulate",
        help="Simulate the instruments and a scientist, and stop once "
        "the whole lifecycle is done (the main job).",
    ),
    observations: int = typer.Option(6, "--observations", min=1, help="With --simulate."),
    files_per_module: int = typer.Option(4, "--files-per-module", min=1, help="With --simulate."),
    file_size_mb: float = typer.Option(4.0, "--file-size-mb", min=0.01, help="With --simulate."),
    rate_mb_per_s: float = typer.Option(
        0.0, "--rate-mb-per-s", min=0.0, help="Instrument write rate (0: as fast as possible)."
    ),
    timeout: float = typer.Option(600.0, "--timeout", help="Give up after this many seconds."),
    once: bool = typer.Option(False, "--once", help="One round of every manager, then exit."),
    init_first: bool = typer.Option(
        True, "--init/--no-init", help="Create/migrate the DB and load the topology first."
    ),
    log_file: str | None = typer.Option(
        None,
        "--log-file",
        help="JSON log file (default: DATA_DIR/logs/run.jsonl); the "
        "terminal then shows only warnings, progress and the summary.",
    ),
    site: str | None = typer.Option(
        None, "--site", help=SITE_HELP + " Not with --simulate (it runs every site)."
    ),
) -> None:
    """Run every manager in one process (tasks in-process in embedded mode); with
    ``--site``, every manager for that site only (one such process per site)."""
    from ccat_data_transfer.core.config import data_dir
    from ccat_data_transfer.core.logs import configure_logging

    if simulate and site:
        raise typer.BadParameter(
            "--site cannot be used with --simulate: the simulation runs the whole "
            "observatory in one process; run `run --site SITE` without --simulate per site"
        )
    if not init_first:
        get_db()  # --no-init: the database must exist; nothing is created
    log_path = log_file or str(data_dir() / "logs" / "run.jsonl")
    configure_logging(log_file=log_path, verbose=options.verbose)
    from ccat_data_transfer.cli.core import initialise
    from ccat_data_transfer.core.database import DatabaseConnection

    if init_first:
        console.print(initialise(), highlight=False)
    db = DatabaseConnection()
    if simulate:
        _run_simulation(
            db, observations, files_per_module, file_size_mb, rate_mb_per_s, timeout, log_path
        )
        return
    _run_managers(db, site, once)


def _run_simulation(
    db: DatabaseConnection,
    observations: int,
    files_per_module: int,
    file_size_mb: float,
    rate_mb_per_s: float,
    timeout: float,
    log_path: str,
) -> None:
    """``run --simulate``: demo settings, the whole lifecycle, then the summary (exit 1 if
    it did not complete)."""
    from ccat_data_transfer.operations.orchestrator import run_demo, summary_table

    for key, value in DEMO_SETTINGS.items():
        settings.set(key, value)
    console.print(
        "demo settings: " + ", ".join(f"{k}={v}" for k, v in DEMO_SETTINGS.items()),
        highlight=False,
    )
    result = run_demo(
        db=db,
        observations=observations,
        files_per_module=files_per_module,
        file_size=int(file_size_mb * 1024 * 1024),
        rate_mb_per_s=rate_mb_per_s,
        timeout_seconds=timeout,
    )
    console.print(summary_table(result))
    console.print(f"JSON log: {log_path}", highlight=False)
    if not result.completed:
        raise typer.Exit(1)


def _run_managers(db: DatabaseConnection, site: str | None, once: bool) -> None:
    """``run``: every manager (of ``site`` or all sites) in rounds until Ctrl-C."""
    from ccat_data_transfer.core.health import HealthReporter
    from ccat_data_transfer.core.manager_loop import install_signal_handlers, stop_event
    from ccat_data_transfer.core.scope import ALL_SITES, scoped_name
    from ccat_data_transfer.operations.orchestrator import Orchestrator

    site = manager_site(db, site)
    orchestrator = Orchestrator(db=db, site=site or ALL_SITES)
    if once:
        orchestrator.run_round()
        return
    install_signal_handlers()
    sleep = float(settings.get("EMBEDDED_ROUND_SLEEP_SECONDS", 2))
    reporter = HealthReporter("manager", scoped_name("run", site)).start()
    console.print(
        "running every manager" + (f" for site {site}" if site else "") + "; Ctrl-C stops cleanly",
        highlight=False,
    )
    try:
        while not stop_event.is_set():
            orchestrator.run_round()
            stop_event.wait(sleep)
    finally:
        reporter.stop()
    console.print("stopped", highlight=False)


@app.command("api")
def api_command(
    host: str | None = typer.Option(None, "--host", help="Bind address (setting API_HOST)."),
    port: int | None = typer.Option(None, "--port", help="Port (setting API_PORT)."),
) -> None:
    """Serve the REST API (filing, staging) and the web dashboard (/dashboard/)."""
    import uvicorn

    from ccat_data_transfer.api.app import create_app

    get_db()
    uvicorn.run(
        create_app(),
        host=host or str(settings.API_HOST),
        port=int(port or settings.API_PORT),
        log_config=None,
    )


@app.command("recovery")
def recovery_command(
    once: bool = typer.Option(False, "--once", help="One pass, then exit."),
    older_than: float | None = typer.Option(
        None,
        "--older-than",
        help="Seconds without a heartbeat after which started work is reset (default "
        "HEARTBEAT_SECONDS x HEARTBEAT_MISSED_BEATS).",
    ),
    verbose: bool = VERBOSE_OPTION,
    site: str | None = typer.Option(None, "--site", help=SITE_HELP),
) -> None:
    """Reset work stuck IN_PROGRESS whose worker died (retries are counted); with
    ``--site``, stalled work whose location is at the site."""
    from datetime import timedelta

    from ccat_data_transfer.core.logs import configure_logging
    from ccat_data_transfer.core.manager_loop import run_manager
    from ccat_data_transfer.core.scope import ALL_SITES, scoped_name
    from ccat_data_transfer.operations import recovery

    configure_logging(verbose=verbose or options.verbose)
    site = manager_site(get_db(), site)
    delta = timedelta(seconds=older_than) if older_than is not None else None
    result = run_manager(
        scoped_name("recovery", site),
        lambda session: recovery.run_once(session, delta, site=site or ALL_SITES),
        lambda: float(settings.RECOVERY_SERVICE_SLEEP_TIME),
        once=once,
    )
    if once:
        console.print_json(data=result)


@app.command("metrics")
def metrics_command(
    serve: bool = typer.Option(
        False, "--serve", help="Serve Prometheus metrics on PROMETHEUS_PORT until stopped."
    ),
    push: bool = typer.Option(False, "--push", help="Send one snapshot to InfluxDB."),
) -> None:
    """Print the metrics snapshot (JSON), serve it to Prometheus, or push it to InfluxDB."""
    import json

    from ccat_data_transfer.core.errors import ConfigurationError
    from ccat_data_transfer.operations.metrics import (
        DatabaseCollector,
        collect_snapshot,
        push_metrics,
    )

    db = get_db()
    if serve:
        if not settings.get("METRICS_ENABLED", True):
            raise ConfigurationError("metrics are disabled (METRICS_ENABLED = false)")
        from prometheus_client import CollectorRegistry, start_http_server

        from ccat_data_transfer.core.manager_loop import install_signal_handlers, stop_event

        registry = CollectorRegistry()
        registry.register(DatabaseCollector())
        port = int(settings.PROMETHEUS_PORT)
        start_http_server(port, addr=str(settings.API_HOST), registry=registry)
        console.print(f"serving Prometheus metrics on {settings.API_HOST}:{port}/metrics")
        install_signal_handlers()
        stop_event.wait()
        return
    with db.session_scope() as session:
        if push:
            result = push_metrics(session)
            if result is None:
                raise ConfigurationError("InfluxDB is disabled (INFLUXDB_ENABLED = false)")
            if not result:
                raise typer.Exit(1)
            console.print("pushed", highlight=False)
            return
        console.print_json(json.dumps(collect_snapshot(session), default=str))
