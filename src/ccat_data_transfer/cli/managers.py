"""The manager commands, one ``<name>-manager`` per entry of the stage registry
(:data:`ccat_data_transfer.core.registry.STAGES`).

What the command line adds to an entry, keyed by the entry's name, each optional:

* :data:`HELP` - the command's help (default: "Run the <title> manager.");
* :data:`PACE` - seconds between cycles, given the cycle's owner (default: the owner's
  ``sleep_time()`` if it has one, else the setting ``<NAME>_SLEEP_TIME``);
* :data:`REPORTS` - what ``--once`` prints of the cycle's result (default: JSON);
* :data:`BEAT_EACH_CYCLE` - the health heartbeat after each cycle, not from a thread;
* :data:`ONCE_HELP` - the help of ``--once`` when it means more than one cycle.

So a new registry entry gets a working command with no change here.

Room in the house: CLI layer.  Imports the registry (core) and the CLI's common parts;
the stage itself only when its command runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import select

from ccat_data_transfer.cli.common import (
    add_manager_command,
    console,
    err_console,
    print_result_json,
)
from ccat_data_transfer.core.config import settings
from ccat_data_transfer.core.registry import STAGES, StageEntry
from ccat_ops_db import models as m

HELP: dict[str, str] = {
    "buffer_manager": """Run the buffer manager: measure every active location (of
    ``--site``), publish its state, escalate.""",
    "raw_data_package_manager": "Package filed raw files into RawDataPackages and move "
    "them to the site buffer.",
    "data_transfer_package_manager": "Bundle waiting RawDataPackages at source-site buffers "
    "into DataTransferPackages.",
    "transfer_manager": """Send DataTransferPackages to the LTA sites (round-robin primary,
    then secondary), verify them at the destination and unpack them.  With ``--site``:
    transfers leaving the site and unpacks arriving there.""",
    "archive_manager": "Move RawDataPackages from LTA-site buffers into the long-term archives.",
    "staging_manager": """Run the staging manager: expire jobs, stage pending jobs from the
    archives (every STAGING_MANAGER_SLEEP_TIME seconds).  With ``--site``: jobs whose
    destination is at the site.""",
    "fixity_manager": """Run the fixity manager: re-read archive copies in full within
    FIXITY_BYTES_PER_DAY per LTA, oldest check first, and queue repairs of lost archive
    copies.""",
    "deletion_manager": """Run the deletion manager (every DELETION_MANAGER_SLEEP_TIME
    seconds, shorter under buffer pressure).  With ``--site``: copies at the site's
    locations only (the rules still consult every site's copies).""",
}

ONCE_HELP: dict[str, str] = {"buffer_manager": "Measure once and exit."}

BEAT_EACH_CYCLE = frozenset({"transfer_manager", "archive_manager"})


def _pressure_paced(base_key: str) -> Callable[[Any], float]:
    """The manager's base cycle time (setting ``base_key``, read each cycle), shortened
    when any buffer is under pressure."""

    def pace(_owner: Any) -> float:
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

    return pace


PACE: dict[str, Callable[[Any], float]] = {
    "transfer_manager": _pressure_paced("TRANSFER_MANAGER_SLEEP_TIME"),
    "archive_manager": _pressure_paced("ARCHIVE_MANAGER_SLEEP_TIME"),
}


def _default_pace(entry: StageEntry) -> Callable[[Any], float]:
    key = f"{entry.name.upper()}_SLEEP_TIME"

    def pace(owner: Any) -> float:
        own = getattr(owner, "sleep_time", None)
        # Read each cycle, so that a changed setting applies.
        return float(own()) if callable(own) else float(settings[key])

    return pace


def _print_summary(title: str, summary: dict[str, Any]) -> None:
    parts = [f"{k}={v}" for k, v in summary.items() if not isinstance(v, list) or v]
    console.print(f"{title}: " + ", ".join(parts), highlight=False)
    for err in summary.get("checksum_errors", []):
        err_console.print(
            f"[bold red]checksum mismatch:[/] {err.get('relative_path')}: {err.get('reason')}",
            highlight=False,
        )


def _summary(title: str) -> Callable[[Any], None]:
    """``--once`` of a packaging manager: its summary as ``title``."""

    def report(result: Any) -> None:
        if isinstance(result, dict):
            _print_summary(title, result)

    return report


def _report_as(name: str) -> Callable[[Any], None]:
    """``--once`` of the transfer and archive managers: ``name: key=value, ...``."""

    def report(result: Any) -> None:
        if isinstance(result, dict):
            console.print(
                f"{name}: " + ", ".join(f"{k}={v}" for k, v in result.items()), highlight=False
            )

    return report


REPORTS: dict[str, Callable[[Any], None]] = {
    "raw_data_package_manager": _summary("raw data packages"),
    "data_transfer_package_manager": _summary("data transfer packages"),
    "transfer_manager": _report_as("transfer manager"),
    "archive_manager": _report_as("archive manager"),
}


for _entry in STAGES:
    add_manager_command(
        _entry,
        HELP.get(_entry.name, f"Run the {_entry.title} manager."),
        PACE.get(_entry.name) or _default_pace(_entry),
        REPORTS.get(_entry.name, print_result_json),
        beat_each_cycle=_entry.name in BEAT_EACH_CYCLE,
        once_help=ONCE_HELP.get(_entry.name),
    )
