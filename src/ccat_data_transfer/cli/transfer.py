"""Transfer commands: the transfer and archive managers, and operator views of transfers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import typer
from rich.table import Table
from sqlalchemy import select

from ccat_data_transfer.cli.common import add_manager_command, app, console, get_db, human_bytes
from ccat_data_transfer.core.config import settings
from ccat_data_transfer.core.errors import ValidationError
from ccat_ops_db import models as m

transfers_app = typer.Typer(help="Inspect and retry data transfers.", no_args_is_help=True)
app.add_typer(transfers_app, name="transfers")


def _sleep_time(base_key: str) -> float:
    """The manager's base cycle time, shortened when any buffer is under pressure."""
    from ccat_data_transfer.core.buffer_status import manager_sleep_time, state_of
    from ccat_data_transfer.core.database import DatabaseConnection

    base = float(settings.get(base_key))
    try:
        session, _ = DatabaseConnection().get_connection()
        try:
            names = session.scalars(
                select(m.DataLocation.name).where(
                    m.DataLocation.location_type == m.LocationType.BUFFER,
                    m.DataLocation.active.is_(True),
                )
            ).all()
            states = [state_of(name, session) for name in names]
        finally:
            session.close()
    except Exception:  # the DB hiccuped: keep the normal pace, the cycle will report it
        return base
    return manager_sleep_time(base, states)


def _paced(key: str) -> Callable[[Any], float]:
    return lambda _module: _sleep_time(key)


def _report_as(name: str) -> Callable[[Any], None]:
    """``--once`` of the transfer and archive managers: ``name: key=value, ...``."""

    def report(result: Any) -> None:
        if isinstance(result, dict):
            console.print(
                f"{name}: " + ", ".join(f"{k}={v}" for k, v in result.items()), highlight=False
            )

    return report


for _command, _doc in (
    (
        "transfer-manager",
        """Send DataTransferPackages to the LTA sites (round-robin primary, then secondary),
        verify them at the destination and unpack them.  With ``--site``: transfers leaving
        the site and unpacks arriving there.""",
    ),
    ("archive-manager", "Move RawDataPackages from LTA-site buffers into the long-term archives."),
):
    add_manager_command(
        _command,
        _doc,
        _paced(f"{_command.replace('-', '_').upper()}_SLEEP_TIME"),
        _report_as(_command.replace("-", " ")),
        beat_each_cycle=True,
    )


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
