"""Transfer commands: operator views of transfers (the transfer and archive managers'
commands come from the registry: :mod:`.managers`)."""

from __future__ import annotations

import typer
from rich.table import Table
from sqlalchemy import select

from ccat_data_transfer.cli.common import app, console, get_db, human_bytes
from ccat_data_transfer.core.errors import ValidationError
from ccat_ops_db import models as m

transfers_app = typer.Typer(help="Inspect and retry data transfers.", no_args_is_help=True)
app.add_typer(transfers_app, name="transfers")


def _parse_status(value: str | None) -> m.Status | None:
    if value is None:
        return None
    try:
        return m.Status[value.strip().upper()]
    except KeyError:
        choices = ", ".join(s.name.lower() for s in m.Status)
        raise ValidationError(f"unknown status {value!r} (choose from {choices})") from None


@transfers_app.command("list")
def transfers_list(
    status: str | None = typer.Option(
        None, "--status", "-s", help="Only transfers with this status (e.g. failed)."
    ),
    limit: int = typer.Option(100, "--limit", "-n", help="Show at most this many (newest)."),
) -> None:
    """List data transfers: route, status, unpack status, size, rate, retries, reason."""
    wanted = _parse_status(status)
    db = get_db()
    with db.session_scope() as session:
        stmt = select(m.DataTransfer).order_by(m.DataTransfer.id.desc()).limit(limit)
        if wanted is not None:
            stmt = stmt.where(m.DataTransfer.status == wanted)
        rows = session.scalars(stmt).all()
        table = Table(title="Data transfers" + (f" ({wanted.name})" if wanted else ""))
        for col in (
            "ID",
            "Package",
            "From",
            "To",
            "Kind",
            "Method",
            "Status",
            "Unpack",
            "Size",
            "MB/s",
            "Retries",
            "Reason",
        ):
            table.add_column(col, overflow="fold")
        for t in rows:
            reason = t.failure_reason or t.unpack_failure_reason or ""
            table.add_row(
                str(t.id),
                t.data_transfer_package.file_name,
                t.origin_location.name,
                t.destination_location.name,
                "primary" if t.is_primary else "secondary",
                t.transfer_method.value,
                t.status.name,
                t.unpack_status.name,
                human_bytes(t.bytes_transferred or t.data_transfer_package.size),
                f"{t.rate_mb_per_s:.1f}" if t.rate_mb_per_s is not None else "-",
                f"{t.retry_count}/{t.unpack_retry_count}",
                reason[:120],
            )
        if not rows:
            console.print("no transfers" + (f" with status {wanted.name}" if wanted else ""))
            return
        console.print(table)


@transfers_app.command("retry")
def transfers_retry(transfer_id: int = typer.Argument(..., help="DataTransfer id.")) -> None:
    """Reset a FAILED transfer (or its FAILED unpack) to PENDING; the manager picks it up."""
    from ccat_data_transfer.transfer.recovery import retry_transfer

    db = get_db()
    with db.session_scope() as session:
        t = retry_transfer(session, transfer_id)
        what = "transfer" if t.status == m.Status.PENDING else "unpack"
        console.print(
            f"{what} of transfer {t.id} ({t.data_transfer_package.file_name} -> "
            f"{t.destination_location.name}) reset to PENDING",
            highlight=False,
        )
