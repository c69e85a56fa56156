"""Staging commands: ask for data at a PROCESSING location, follow the job, say done.

``stage`` is a group: with options it creates a job (``stage --package 3``,
``stage --obs-unit NAME``, ``stage --instrument primecam --from ISO --to ISO``); its
subcommands are ``stage list`` and ``stage done ID``.  ``staging-manager`` (a loop, or
one cycle with ``--once``) comes from the registry (:mod:`.managers`).
"""

from __future__ import annotations

import json

import typer

from ccat_data_transfer.cli.common import (
    JSON_OPTION,
    app,
    console,
    get_db,
    print_listing,
)
from ccat_data_transfer.core.errors import ValidationError
from ccat_data_transfer.staging import jobs as staging_jobs
from ccat_data_transfer.staging import retention as staging_retention

stage_app = typer.Typer(
    help="Stage archived data to a PROCESSING location; list jobs; mark a job done.",
    invoke_without_command=True,
    no_args_is_help=False,
)
app.add_typer(stage_app, name="stage")


def _package_ids(values: list[str] | None) -> list[int] | None:
    """``--package 3 --package 4`` or ``--package 3,4``."""
    if not values:
        return None
    ids: list[int] = []
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            if not part.isdigit():
                raise ValidationError(f"--package: {part!r} is not a package ID")
            ids.append(int(part))
    return ids


def _progress(job: dict) -> str:
    return f"{job['packages_done']}/{job['packages_total']}"


def _short_time(value: str | None) -> str:
    return value.replace("T", " ")[:16] if value else "-"


@stage_app.callback()
def stage_command(
    ctx: typer.Context,
    package: list[str] | None = typer.Option(
        None, "--package", "-p", help="RawDataPackage ID (repeat, or comma-separated)."
    ),
    obs_unit: str | None = typer.Option(
        None, "--obs-unit", help="Stage every package of this ExecutedObsUnit (name or ID)."
    ),
    instrument: str | None = typer.Option(
        None, "--instrument", help="Instrument (with --from/--to, or to narrow --obs-unit)."
    ),
    start: str | None = typer.Option(
        None, "--from", help="Start of the observation time range (ISO 8601, UTC)."
    ),
    end: str | None = typer.Option(
        None, "--to", help="End of the observation time range (ISO 8601, UTC; exclusive)."
    ),
    destination: str = typer.Option(
        "processing_scratch", "--destination", "-d", help="PROCESSING location."
    ),
    retention: int | None = typer.Option(
        None,
        "--retention",
        help="Retention in minutes (default: the location's, else RETENTION_PERIOD_MINUTES).",
    ),
    name: str | None = typer.Option(None, "--name", help="A name for the job."),
    user: str | None = typer.Option(None, "--user", help="Owner (an existing user name)."),
    as_json: bool = typer.Option(False, "--json", help="Print the new job as JSON."),
) -> None:
    """Create a staging job (with options), or run a subcommand: list, done."""
    if ctx.invoked_subcommand is not None:
        return
    selectors = [package, obs_unit, instrument, start, end]
    if not any(selectors):
        console.print(ctx.get_help())
        raise typer.Exit(0)
    eou: str | int | None = obs_unit
    if obs_unit is not None and obs_unit.isdigit():
        eou = int(obs_unit)
    db = get_db()
    with db.session_scope() as session:
        job = staging_jobs.create_staging_job(
            session,
            package_ids=_package_ids(package),
            executed_obs_unit=eou,
            instrument=instrument,
            start=start,
            end=end,
            destination=destination,
            retention_minutes=retention,
            name=name,
            user=user,
        )
        data = staging_jobs.job_as_dict(job)
    if as_json:
        console.print_json(json.dumps(data))
        return
    console.print(
        f"staging job {data['id']} created: {data['packages_total']} package(s) to "
        f"{data['destination']}, expires {_short_time(data['expires_at'])} UTC; "
        "the staging manager picks it up on its next cycle "
        f"(`ccat_data_transfer stage done {data['id']}` when finished)",
        highlight=False,
    )


@stage_app.command("list")
def stage_list(
    active_only: bool = typer.Option(False, "--active", help="Only active jobs."),
    limit: int = typer.Option(50, "--limit", "-n", min=1, help="Show at most this many."),
    as_json: bool = JSON_OPTION,
) -> None:
    """List staging jobs, newest first."""
    db = get_db()
    with db.session_scope() as session:
        jobs = [
            staging_jobs.job_as_dict(j)
            for j in staging_jobs.list_staging_jobs(
                session, active=True if active_only else None, limit=limit
            )
        ]
    print_listing(
        jobs,
        as_json=as_json,
        title="Staging jobs",
        columns=("ID", "Name", "Destination", "Status", "Progress", "Active", "Expires (UTC)"),
        row=_job_row,
        empty="no staging jobs",
    )


_STATUS_COLOURS = {"COMPLETED": "green", "FAILED": "red", "IN_PROGRESS": "yellow"}


def _job_row(j: dict) -> tuple[str, ...]:
    status = j["status"]
    colour = _STATUS_COLOURS.get(status)
    shown = f"[{colour}]{status}[/]" if colour else status
    if j["failure_reason"] and status != "COMPLETED":
        shown += f" ({j['failure_reason'][:60]})"
    return (
        str(j["id"]),
        j["name"] or "-",
        j["destination"],
        shown,
        _progress(j),
        "yes" if j["active"] else "no",
        _short_time(j["expires_at"]),
    )


@stage_app.command("done")
def stage_done(job_id: int = typer.Argument(..., help="Staging job ID.")) -> None:
    """Mark a staging job done (inactive) so that its files can be cleaned up."""
    db = get_db()
    with db.session_scope() as session:
        job = staging_retention.deactivate_staging_job(session, job_id)
        when = job.deactivated_at
    console.print(
        f"staging job {job_id} is inactive (since {when:%Y-%m-%d %H:%M} UTC); "
        "the deletion manager will clean up its files",
        highlight=False,
    )
