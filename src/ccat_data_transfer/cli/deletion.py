"""Deletion and buffer commands: disk-monitor, deletion-plan (dry run) and explain (the
deletion and buffer managers' commands come from the registry: :mod:`.managers`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import typer
from rich.table import Table
from sqlalchemy import select

from ccat_data_transfer.cli.common import (
    JSON_OPTION,
    app,
    console,
    get_db,
    human_bytes,
)
from ccat_data_transfer.core.config import settings
from ccat_data_transfer.core.errors import NotFoundError, ValidationError
from ccat_ops_db import models as m

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

_STATE_STYLE = {
    "normal": "green",
    "warning": "yellow",
    "critical": "red",
    "emergency": "bold red",
    "unknown": "dim",
}


@app.command("disk-monitor")
def disk_monitor_command(
    all_locations: bool = typer.Option(False, "--all", help="Every active location."),
    location_name: str | None = typer.Option(None, "--location-name", help="One location."),
    site: str | None = typer.Option(None, "--site", help="Every active location of a site."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Measure disk use now and show use, state and thresholds; for an LTA-site buffer,
    whether it can take the next package waiting to be sent (else it says "cannot take
    next package (X needed, Y free)" and the round-robin skips it)."""
    from ccat_data_transfer.buffers.cycle import measure_location
    from ccat_data_transfer.core import buffer_status as bs
    from ccat_data_transfer.core.buffer_room import next_package_verdicts

    if sum(bool(x) for x in (all_locations, location_name, site)) != 1:
        raise ValidationError("give exactly one of --all, --location-name NAME, --site SITE")
    db = get_db()
    with db.session_scope() as session:
        locations = _monitored_locations(session, location_name, site)
        rows = []
        measured = {loc.name: measure_location(session, loc) or {} for loc in locations}
        # Can each LTA-site buffer take the next package waiting to be sent?
        verdicts = next_package_verdicts(
            session, locations, {n: st for n, st in measured.items() if st}
        )
        for loc in locations:
            status = measured[loc.name]
            t = bs.thresholds_for(loc)
            rows.append(
                {
                    "location": loc.name,
                    "site": loc.site.name,
                    "location_type": loc.location_type.value,
                    "storage_type": loc.storage_type.value,
                    "used_bytes": status.get("used_bytes"),
                    "total_bytes": status.get("total_bytes"),
                    "disk_usage_percent": status.get("disk_usage_percent"),
                    "state": status.get("state", "unknown"),
                    "next_package": verdicts.get(loc.name),
                    "thresholds": {
                        "warning": t.warning,
                        "critical": t.critical,
                        "emergency": t.emergency,
                    },
                }
            )
    if as_json:
        console.print_json(json.dumps(rows))
        return
    _print_disk_use(rows)


def _monitored_locations(
    session: Session, location_name: str | None, site: str | None
) -> Sequence[m.DataLocation]:
    """The active locations asked for (one, a site's or all); NotFoundError if none."""
    stmt = select(m.DataLocation).join(m.Site).where(m.DataLocation.active.is_(True))
    if location_name:
        stmt = stmt.where(m.DataLocation.name == location_name)
    if site:
        stmt = stmt.where((m.Site.name == site) | (m.Site.short_name == site))
    locations = session.scalars(stmt.order_by(m.DataLocation.name)).all()
    if not locations:
        what = (
            f"location {location_name!r}" if location_name else f"site {site!r}" if site else "any"
        )
        raise NotFoundError(f"no active data location for {what}; see `list-locations`")
    return locations


def _print_disk_use(rows: list[dict[str, Any]]) -> None:
    """The disk use table, then why a buffer cannot take its next package."""
    table = Table(title="Disk usage")
    for col in (
        "Location",
        "Site",
        "Type",
        "Used",
        "Capacity",
        "Use %",
        "State",
        "Thresholds (w/c/e)",
    ):
        table.add_column(col)
    for r in rows:
        pct = r["disk_usage_percent"]
        style = _STATE_STYLE.get(r["state"], "")
        th = r["thresholds"]
        table.add_row(
            r["location"],
            r["site"],
            r["location_type"],
            human_bytes(r["used_bytes"]),
            human_bytes(r["total_bytes"]),
            "-" if pct is None else f"{pct:.1f}",
            f"[{style}]{r['state']}[/]" if style else r["state"],
            f"{th['warning']:g}/{th['critical']:g}/{th['emergency']:g}",
        )
    console.print(table)
    for r in rows:
        nxt = r["next_package"]
        if nxt and not nxt["can_take"]:
            console.print(
                f"[red]{nxt['reason']}[/] (next package: data transfer package "
                f"{nxt['data_transfer_package_id']})",
                highlight=False,
            )


@app.command("deletion-plan")
def deletion_plan_command(
    location: str | None = typer.Option(None, "--location", help="Only this location."),
    as_json: bool = JSON_OPTION,
    max_kept: int = typer.Option(1000, "--max-kept", help="List at most this many kept copies."),
) -> None:
    """Dry run: what the deletion manager would delete now and, for each copy kept, the
    rule that keeps it.  Nothing is changed."""
    from ccat_data_transfer.deletion.plan import deletion_plan

    db = get_db()
    with db.session_scope() as session:
        if location is not None and not session.scalar(
            select(m.DataLocation.id).where(m.DataLocation.name == location)
        ):
            raise NotFoundError(f"no data location {location!r}; see `list-locations`")
        items = deletion_plan(session, location, max_kept=max_kept)
        session.rollback()
    if as_json:
        console.print_json(json.dumps([i.as_dict() for i in items]))
        return
    deletable = [i for i in items if i.deletable]
    kept = len(items) - len(deletable)
    table = Table(title=f"Deletion plan (dry run): {len(deletable)} to delete, {kept} kept")
    for col in ("Copy", "Type", "Location", "Name", "Size", "Status", "Decision"):
        table.add_column(col)
    for i in items:
        decision = f"[red]{i.reason}[/]" if i.deletable else i.reason
        table.add_row(
            str(i.physical_copy_id),
            i.copy_type,
            i.location,
            i.name,
            human_bytes(i.size_bytes),
            i.status,
            decision,
        )
    console.print(table)
    total = sum(i.size_bytes or 0 for i in deletable)
    console.print(
        f"would free {human_bytes(total)} (batch size {settings.DELETION_BATCH_SIZE})",
        highlight=False,
    )


@app.command("explain")
def explain_command(copy_id: int = typer.Argument(..., help="A physical copy id.")) -> None:
    """Why one physical copy would or would not be deleted now, and its deletion history."""
    from rich.table import Table

    from ccat_data_transfer.deletion.plan import explain_copy
    from ccat_data_transfer.deletion.trail import deletion_history

    db = get_db()
    with db.session_scope() as session:
        item = explain_copy(session, copy_id)
        history = [
            (str(r.created_at)[:19], r.outcome.name, r.reason, r.actor, r.message or "")
            for r in deletion_history(session, copy_id)
        ]
        session.rollback()
    if item is None:
        raise NotFoundError(f"no physical copy with id {copy_id}")
    console.print(
        f"copy {item.physical_copy_id} ({item.copy_type} {item.name}) at {item.location} "
        f"[{item.status}]: {item.reason}",
        highlight=False,
    )
    if history:
        table = Table(title="Deletion history")
        for col in ("Time (UTC)", "Outcome", "Reason", "Actor", "Message"):
            table.add_column(col)
        for row in history:
            table.add_row(*row)
        console.print(table)
