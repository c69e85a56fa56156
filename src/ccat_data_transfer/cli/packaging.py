"""Packaging commands: file data, show a package (the packaging managers' commands come from
the registry: :mod:`.managers`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from sqlalchemy import select

from ccat_data_transfer.cli.common import (
    app,
    console,
    err_console,
    get_db,
    human_bytes,
)
from ccat_data_transfer.core.errors import NotFoundError, ValidationError
from ccat_data_transfer.core.fileio import COPY_BUFSIZE, temporary_component
from ccat_data_transfer.core.storage import storage_for_location
from ccat_ops_db import models as m

package_app = typer.Typer(help="Inspect packages.", no_args_is_help=True)
app.add_typer(package_app, name="package")


def _collect(paths: list[Path], root: Path) -> list[tuple[Path, str]]:
    """(absolute file, path relative to the location root) for every regular file."""
    real_root = Path(os.path.realpath(root))
    found: dict[str, Path] = {}
    for given in paths:
        candidate = given if given.is_absolute() else Path.cwd() / given
        if not candidate.exists() and not given.is_absolute():
            candidate = root / given
        if not candidate.exists():
            raise ValidationError(f"{given}: no such file or directory")
        real = Path(os.path.realpath(candidate))
        if real != real_root and real_root not in real.parents:
            raise ValidationError(f"{given} is not inside the location's folder {root}")
        files = [real] if real.is_file() else sorted(p for p in real.rglob("*") if p.is_file())
        for f in files:
            rel = f.relative_to(real_root).as_posix()
            # Skipped as the storage's listing skips them (filing would refuse them).
            if temporary_component(rel) or rel.startswith("raw_data_packages/"):
                continue
            found[rel] = f
    if not found:
        raise ValidationError("no files to file")
    return [(found[rel], rel) for rel in sorted(found)]


def _checksums(files: list[tuple[Path, str]]) -> list[tuple[str, int, str]]:
    import hashlib

    total = sum(f.stat().st_size for f, _ in files)
    out = []
    with Progress(
        TextColumn("[bold]checksums[/] {task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    ) as progress:
        task = progress.add_task(f"{len(files)} files", total=total)
        buf = bytearray(COPY_BUFSIZE)
        view = memoryview(buf)
        for path, rel in files:
            h = hashlib.sha256()
            size = 0
            with open(path, "rb", buffering=0) as fh:
                while n := fh.readinto(view):
                    h.update(view[:n])
                    size += n
                    progress.advance(task, n)
            out.append((rel, size, h.hexdigest()))
    return out


@app.command("file")
def file_command(
    paths: list[Path] = typer.Argument(..., help="Files or folders inside the location."),
    location: str = typer.Option(..., "--location", "-l", help="SOURCE location name."),
    obs_unit: str = typer.Option(..., "--obs-unit", help="ExecutedObsUnit name."),
    module: str = typer.Option(..., "--module", help="INSTRUMENT/MODULE, e.g. primecam/280GHz."),
    parent: str | None = typer.Option(
        None, "--parent-obs-unit", help="ObsUnit of a new ExecutedObsUnit (default: same name)."
    ),
    finish: bool = typer.Option(False, "--finish", help="Mark the obs unit finished after."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """File raw data lying at a SOURCE location (checksums computed here)."""
    from ccat_data_transfer.filing.register import file_raw_data_files, finish_executed_obs_unit

    db = get_db()
    with db.session_scope() as session:
        loc = session.scalars(select(m.DataLocation).where(m.DataLocation.name == location))
        loc = loc.one_or_none()
        if loc is None:
            raise NotFoundError(f"no data location named {location!r}; see `list-locations`")
        root = getattr(storage_for_location(loc), "root", None)
        if root is None:
            raise ValidationError(f"location {location!r} is not a local folder")
    files = _collect(list(paths), root)
    sums = _checksums(files)
    entries = [
        {
            "relative_path": rel,
            "size": size,
            "checksum": digest,
            "executed_obs_unit": obs_unit,
            "instrument_module": module,
            **({"obs_unit": parent} if parent else {}),
        }
        for rel, size, digest in sums
    ]
    from ccat_data_transfer.filing.register import FilingError

    try:
        with db.session_scope() as session:
            result = file_raw_data_files(session, location, entries)
            if finish:
                finish_executed_obs_unit(session, obs_unit)
    except FilingError as exc:
        for p in exc.problems[:20]:
            err_console.print(f"  {p['relative_path']}: {p['reason']}", highlight=False)
        if len(exc.problems) > 20:
            err_console.print(f"  ... and {len(exc.problems) - 20} more", highlight=False)
        raise
    if as_json:
        console.print_json(result.model_dump_json())
        return
    size = sum(s for _, s, _ in sums)
    console.print(
        f"filed {result.created} new files, {result.unchanged} already filed "
        f"({human_bytes(size)}) at {location} for {obs_unit}"
        + (" (obs unit finished)" if finish else ""),
        highlight=False,
    )


@app.command("finish-obs-unit")
def finish_obs_unit_command(name: str = typer.Argument(..., help="ExecutedObsUnit name.")) -> None:
    """Mark an executed obs unit finished: its files are packaged without waiting."""
    from ccat_data_transfer.filing.register import finish_executed_obs_unit

    with get_db().session_scope() as session:
        eou = finish_executed_obs_unit(session, name)
        console.print(f"{eou.name} finished at {eou.finished_at:%Y-%m-%d %H:%M:%S} UTC")


def _copies_table(title: str, copies: list[dict[str, Any]]) -> Table:
    table = Table(title=title)
    for col in ("Copy", "Location", "Type", "Status", "Size", "Created", "Deleted"):
        table.add_column(col)
    for c in copies:
        table.add_row(
            str(c["id"]),
            c["location"],
            c["location_type"],
            c["status"],
            human_bytes(c["size"]),
            (c["created_at"] or "-")[:19],
            (c["deleted_at"] or "-")[:19],
        )
    return table


def _transfer_cells(t: dict[str, Any]) -> tuple[str, ...]:
    """The first cells of a transfer's row, the same in every transfer table."""
    return str(t["id"]), t["origin"], t["destination"], t["status"]


@package_app.command("show")
def package_show(
    ident: str = typer.Argument(..., help="RawDataPackage id or file name."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Everything about one RawDataPackage: files, copies, transfer package, transfers."""
    from ccat_data_transfer.packaging.raw_report import describe_raw_data_package

    with get_db().session_scope() as session:
        info = describe_raw_data_package(session, ident)
    if as_json:
        console.print_json(json.dumps(info, default=str))
        return
    head = Table(title=f"RawDataPackage {info['id']}", show_header=False)
    head.add_column("field", style="bold")
    head.add_column("value")
    for key in (
        "file_name", "state", "status", "executed_obs_unit", "instrument_module",
        "part_number", "source_location", "relative_path", "checksum", "failure_reason",
        "created_at", "archived_at",
    ):  # fmt: skip
        head.add_row(key, str(info[key]) if info[key] is not None else "-")
    head.add_row("size", human_bytes(info["size"]))
    console.print(head)

    files = Table(title=f"Files ({len(info['files'])})")
    for col in ("Path", "Size", "Checksum", "Checksum error"):
        files.add_column(col)
    for f in info["files"]:
        files.add_row(
            f["relative_path"],
            human_bytes(f["size"]),
            f["checksum"][:16],
            f["checksum_error"] or "",
        )
    console.print(files)
    console.print(_copies_table("Physical copies", info["physical_copies"]))

    dtp = info["data_transfer_package"]
    if dtp is None:
        console.print("Data transfer package: none yet")
    else:
        console.print(
            f"Data transfer package {dtp['id']} {dtp['file_name']}: {dtp['status']}, "
            f"{human_bytes(dtp['size'])}, from {dtp['origin_location']}",
            highlight=False,
        )
        console.print(_copies_table("Data transfer package copies", dtp["physical_copies"]))
        transfers = Table(title="Data transfers")
        for col in ("Id", "Origin", "Destination", "Status", "Unpack", "Bytes", "Rate MB/s"):
            transfers.add_column(col)
        for t in dtp["transfers"]:
            transfers.add_row(
                *_transfer_cells(t),
                t["unpack_status"],
                human_bytes(t["bytes_transferred"]),
                f"{t['rate_mb_per_s']:.1f}" if t["rate_mb_per_s"] is not None else "-",
            )
        console.print(transfers)
    lta = Table(title="Long-term archive transfers")
    for col in ("Id", "Origin", "Destination", "Status", "Bytes", "End"):
        lta.add_column(col)
    for t in info["long_term_archive_transfers"]:
        lta.add_row(
            *_transfer_cells(t), human_bytes(t["bytes_transferred"]), (t["end_time"] or "-")[:19]
        )
    console.print(lta)
