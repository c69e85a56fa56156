"""Archive truth on the command line: the consistency audit and its holds, the fixity
status, and a package's archive trail.

``audit`` (with its options) runs the audit as before; ``audit hold list`` and ``audit
hold clear LOCATION`` show and lift the holds a systematic fault leaves (``fixity-manager``,
which runs the fixity scan, comes from the registry: :mod:`.managers`); ``fixity status``
shows per LTA how far re-verification got; ``archive-events PACKAGE_ID`` prints the trail
of one package.

Room in the house: CLI layer (thin: parse, call, print).
"""

from __future__ import annotations

import json

import typer
from rich.table import Table
from sqlalchemy import select

from ccat_data_transfer.cli.common import (
    JSON_OPTION,
    app,
    console,
    get_db,
    human_bytes,
    print_listing,
)
from ccat_data_transfer.core.errors import NotFoundError
from ccat_ops_db import models as m

audit_app = typer.Typer(
    help="Consistency audit of storage against the DB, and the holds it leaves.",
    no_args_is_help=False,
)
app.add_typer(audit_app, name="audit")
hold_app = typer.Typer(help="Locations on hold after an audit found a systematic fault.")
audit_app.add_typer(hold_app, name="hold", no_args_is_help=True)
fixity_app = typer.Typer(help="Fixity: re-reading archive copies on a schedule.")
app.add_typer(fixity_app, name="fixity", no_args_is_help=True)


def _when(value: object) -> str:
    return value.isoformat(sep=" ", timespec="seconds") if value is not None else "-"  # type: ignore[attr-defined]


@audit_app.callback(invoke_without_command=True)
def audit_command(
    ctx: typer.Context,
    location: str | None = typer.Option(None, "--location", help="Audit one location only."),
    full: bool = typer.Option(False, "--full", help="Checksum every copy (default: a sample)."),
    sample: float | None = typer.Option(
        None, "--sample", min=0.0, max=1.0, help="Fraction of copies to checksum."
    ),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Report only; mark no copy (a systematic fault still puts a hold on the location).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Compare the DB with storage: lost files, dark data, size/checksum drift. Never deletes.

    Discrepancies over AUDIT_MAX_DISCREPANCY_FRACTION put the location on hold (see
    ``audit hold list``)."""
    if ctx.invoked_subcommand is not None:
        return

    from ccat_data_transfer.operations.audit import run_audit

    db = get_db()
    with db.session_scope() as session:
        reports = run_audit(session, location, full=full, sample_fraction=sample, mark=not dry_run)
    if as_json:
        console.print_json(json.dumps([r.as_dict() for r in reports]))
    else:
        table = Table(title="Consistency audit")
        for col in (
            "Location",
            "Expected",
            "Found",
            "Lost",
            "Dark",
            "Drift",
            "Checksummed",
            "Marked lost",
            "Note",
        ):
            table.add_column(col)
        for r in reports:
            table.add_row(
                r.location,
                str(r.expected),
                str(r.found),
                str(len(r.lost)),
                str(len(r.dark)),
                str(len(r.drift)),
                str(r.checksums_checked),
                str(r.marked_lost),
                r.error or r.aborted or "",
            )
        console.print(table)
        for r in reports:
            for kind, style, items, detail in (
                ("lost", "red", r.lost, lambda i: f" (copy {i['physical_copy_id']})"),
                ("drift", "red", r.drift, lambda i: f": {i['problem']}"),
                ("dark", "yellow", r.dark, lambda i: f" ({i['size']} B)"),
                (
                    "temporary",
                    "yellow",
                    r.temporary,
                    lambda i: f" ({i['size']} B, unchanged for {i['age_seconds']:.0f} s)",
                ),
            ):
                for item in items[:20]:
                    console.print(
                        f"[{style}]{kind}[/] {r.location}: {item['path']}{detail(item)}",
                        highlight=False,
                    )
    if any(r.discrepancies or r.error or r.aborted for r in reports):
        raise typer.Exit(1)


@hold_app.command("list")
def hold_list_command(
    as_json: bool = JSON_OPTION,
) -> None:
    """Locations on hold: no deletion relies on their copies until an operator clears it."""
    from ccat_data_transfer.operations.audit import list_holds

    with get_db().session_scope() as session:
        holds = list_holds(session)
    print_listing(
        holds,
        as_json=as_json,
        title="Audit holds",
        columns=("Location", "Site", "Since", "Reason"),
        row=lambda h: (h["location"], h["site"] or "-", _when(h["since"]), h["reason"] or ""),
        empty="no location is on hold",
    )


@hold_app.command("clear")
def hold_clear_command(
    location: str = typer.Argument(..., help="The location whose hold is lifted."),
    reason: str | None = typer.Option(
        None, "--reason", help="Why the hold may go (kept in the archive trail)."
    ),
) -> None:
    """Lift a location's hold (after the fault was understood and mended)."""
    from ccat_data_transfer.operations.audit import clear_hold

    with get_db().session_scope() as session:
        held = clear_hold(session, location, reason)
    console.print(
        f"hold on {held['location']} (since {_when(held['since'])}) cleared", highlight=False
    )


@fixity_app.command("status")
def fixity_status_command(
    as_json: bool = JSON_OPTION,
) -> None:
    """Per LTA: copies, bytes, oldest full check, copies never checked, and the period
    the budget achieves."""
    from ccat_data_transfer.fixity import cycle as scan

    with get_db().session_scope() as session:
        rows = [scan.location_fixity(session, loc) for loc in scan.lta_locations(session, "")]
    if as_json:
        console.print_json(json.dumps(rows, default=str))
        return
    table = Table(title="Fixity of the long-term archives")
    for col in ("Location", "Copies", "Bytes", "Oldest check", "Never checked", "Budget/day"):
        table.add_column(col)
    table.add_column("Full round")
    for r in rows:
        days = f"{r['round_days']:.1f} d"
        table.add_row(
            r["location"],
            str(r["copies"]),
            human_bytes(r["bytes"]),
            _when(r["oldest_fixity_check"]),
            str(r["never_checked"]),
            human_bytes(r["budget_bytes_per_day"]),
            days if r["meets_period"] else f"[red]{days} > {r['period_days']:g} d[/]",
        )
    console.print(table)


@app.command("archive-events")
def archive_events_command(
    package_id: int = typer.Argument(..., help="Raw data package id."),
    as_json: bool = JSON_OPTION,
) -> None:
    """The archive trail of a package: verifications, corruption found, repairs, freezes."""
    with get_db().session_scope() as session:
        package = session.get(m.RawDataPackage, package_id)
        if package is None:
            raise NotFoundError(f"no raw data package {package_id}")
        ev, loc = m.ArchiveEvent, m.DataLocation
        rows = [
            {
                "at": e.created_at,
                "event": e.event,
                "location": name,
                "copy": e.physical_copy_id,
                "actor": e.actor,
                "message": e.message,
            }
            for e, name in session.execute(
                select(ev, loc.name)
                .outerjoin(loc, loc.id == ev.data_location_id)
                .where(ev.raw_data_package_id == package_id)
                .order_by(ev.created_at, ev.id)
            )
        ]
        frozen = package.frozen_at, package.frozen_reason
    print_listing(
        rows,
        as_json=as_json,
        title=f"Archive trail of package {package_id}",
        columns=("At", "Event", "Location", "Copy", "Actor", "Message"),
        row=lambda r: (
            _when(r["at"]),
            r["event"],
            r["location"] or "-",
            str(r["copy"] or "-"),
            r["actor"],
            r["message"] or "",
        ),
    )
    if as_json:
        return
    if frozen[0] is not None:
        console.print(f"[bold red]frozen[/] since {_when(frozen[0])}: {frozen[1]}", highlight=False)
