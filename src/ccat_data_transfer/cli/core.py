"""Core commands: initialise the DB and topology, list locations."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table
from sqlalchemy import select

from ccat_data_transfer.cli.common import JSON_OPTION, app, console, get_db, human_bytes
from ccat_data_transfer.core.config import data_dir, settings
from ccat_data_transfer.core.database import init_database
from ccat_ops_db import models as m
from ccat_ops_db.topology import apply_topology, read_topology_file

DEFAULT_TOPOLOGY = Path(__file__).resolve().parent.parent / "topology" / "default.toml"


def default_topology_file() -> Path:
    configured = str(settings.get("TOPOLOGY_FILE", "") or "")
    return Path(configured) if configured else DEFAULT_TOPOLOGY


def initialise(topology: Path | None = None) -> str:
    """Create or migrate the DB, load the topology, create location folders.  Returns a
    one-line summary.  Used by `init` and by the main job.

    The topology file is read and validated first: a broken file changes nothing (no
    folder, no database file, no tables)."""
    topology = topology or default_topology_file()
    topo = read_topology_file(topology, data_dir())
    db = init_database()
    with db.session_scope() as session:
        report = apply_topology(session, topo)
        for loc in session.scalars(select(m.DataLocation).where(m.DataLocation.active)):
            if loc.storage_type == m.StorageType.DISK and loc.path:
                Path(loc.path).mkdir(parents=True, exist_ok=True)
    return f"database ready at {db.url}; topology {topology.name}: {report.summary()}"


@app.command("init")
def init_command(
    topology: Path | None = typer.Option(
        None,
        "--topology",
        "-t",
        help="Topology TOML file (default: setting TOPOLOGY_FILE or the shipped default).",
    ),
) -> None:
    """Create or migrate the database and load the topology (idempotent)."""
    console.print(initialise(topology), highlight=False)


@app.command("list-locations")
def list_locations(
    as_json: bool = JSON_OPTION,
    include_inactive: bool = typer.Option(False, "--all", help="Include inactive locations."),
) -> None:
    """Show all configured sites and their data locations."""
    db = get_db()
    with db.session_scope() as session:
        stmt = select(m.DataLocation).join(m.Site)
        if not include_inactive:
            stmt = stmt.where(m.DataLocation.active.is_(True))
        order = list(m.LocationType)
        rows = sorted(
            session.scalars(stmt).all(),
            key=lambda loc: (loc.site.name, order.index(loc.location_type), loc.priority, loc.name),
        )
        if as_json:
            console.print_json(
                json.dumps(
                    [
                        {
                            "name": loc.name,
                            "site": loc.site.name,
                            "site_short_name": loc.site.short_name,
                            "location_type": loc.location_type.value,
                            "storage_type": loc.storage_type.value,
                            "path": loc.path,
                            "bucket": loc.bucket,
                            "priority": loc.priority,
                            "active": loc.active,
                            "capacity_bytes": loc.capacity_bytes,
                        }
                        for loc in rows
                    ]
                )
            )
            return
        table = Table(title="Data locations", show_lines=False)
        for col in (
            "Site",
            "Location",
            "Type",
            "Storage",
            "Where",
            "Priority",
            "Capacity",
            "Active",
        ):
            table.add_column(col)
        last_site = None
        for loc in rows:
            site_cell = (
                f"{loc.site.name} ({loc.site.short_name})" if loc.site.name != last_site else ""
            )
            if loc.site.name != last_site and last_site is not None:
                table.add_section()
            last_site = loc.site.name
            where = loc.path or (f"s3://{loc.bucket}/{loc.prefix or ''}" if loc.bucket else "-")
            table.add_row(
                site_cell,
                loc.name,
                loc.location_type.value,
                loc.storage_type.value,
                where,
                str(loc.priority),
                human_bytes(loc.capacity_bytes),
                "yes" if loc.active else "no",
            )
        console.print(table)
