"""Commands that run or inspect the system as a whole: workers and health."""

from __future__ import annotations

import socket

import typer
from rich.table import Table

from ccat_data_transfer.cli.common import app, console, get_db
from ccat_data_transfer.health import list_services


@app.command("health")
def health_command(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List the services that are alive and those that are dead."""
    services = list_services()
    if as_json:
        import json

        console.print_json(json.dumps(services, default=str))
        return
    if not services:
        console.print("no service has reported health yet")
        return
    table = Table(title="Services")
    for col in ("Type", "Name", "State", "Host", "PID", "Last beat"):
        table.add_column(col)
    for svc in services:
        table.add_row(
            svc["service_type"],
            svc["service_name"],
            "[green]alive[/]" if svc["alive"] else "[red]dead[/]",
            str(svc.get("host", "-")),
            str(svc.get("pid", "-")),
            str(svc.get("last_beat", "-")),
        )
    console.print(table)
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
    from ccat_data_transfer.celery_app import app as celery_app
    from ccat_data_transfer.celery_app import configure_celery
    from ccat_data_transfer.queue_discovery import discover_queues

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
