"""Shared pieces of the command line: the Typer app, consoles, global options."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from ccat_data_transfer import __version__, formatting
from ccat_data_transfer.config.config import settings
from ccat_data_transfer.database import DatabaseConnection
from ccat_data_transfer.logging_utils import configure_logging

app = typer.Typer(
    name="ccat_data_transfer",
    help="Observatory Data Transfer System: file, package, transfer, archive, stage and "
    "safely delete raw telescope data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
# Pipes and log files get wide, unwrapped tables; a terminal gets its own width.
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        console.print(f"ccat_data_transfer {__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
    data_dir: Path | None = typer.Option(
        None, "--data-dir", help="Data folder of the embedded mode (setting DATA_DIR)."
    ),
    database_url: str | None = typer.Option(
        None, "--database-url", help="Database URL (setting DATABASE_URL)."
    ),
    log_format: str | None = typer.Option(
        None, "--log-format", help="Log format: auto, json or console."
    ),
) -> None:
    if data_dir is not None:
        settings.set("DATA_DIR", str(data_dir))
    if database_url is not None:
        settings.set("DATABASE_URL", database_url)
    if log_format is not None:
        settings.set("LOG_FORMAT", log_format)
    configure_logging()


def get_db() -> DatabaseConnection:
    """A checked connection: a clear error if the DB is unreachable or not initialised."""
    from ccat_data_transfer.exceptions import ConfigurationError

    db = DatabaseConnection()
    db.check()
    if not db.has_schema():
        raise ConfigurationError(
            "the database has no schema yet; run `ccat_data_transfer init` first"
        )
    return db


#: The command line's byte labels: plain ASCII capitals for terminals and log files.
_CLI_BYTE_UNITS = ("B", "KB", "MB", "GB", "TB", "PB")


def human_bytes(n: int | float | None) -> str:
    """A size for terminal output: :func:`ccat_data_transfer.formatting.human_bytes` with
    ASCII labels (``KB``, ``-`` for an unknown size)."""
    return formatting.human_bytes(n, missing="-", units=_CLI_BYTE_UNITS)


#: Help of the ``--site`` option of every manager command.
SITE_HELP = (
    "Only this site's work (site name or short name); one manager process per site. "
    "Default: the setting MANAGER_SITE (empty: every site)."
)


def manager_site(db: DatabaseConnection, site: str | None) -> str | None:
    """The checked site of a manager command: ``--site``, else the setting MANAGER_SITE;
    its canonical name, or None for every site.  An unknown site is a clear error before
    the manager starts (not a failure logged every cycle)."""
    from ccat_data_transfer import scope

    with db.session_scope() as session:
        return scope.site_name(session, site)


def scoped_cycle(cycle: Any, site: str | None) -> Any:
    """``cycle(session)`` bound to the checked ``site`` (None: every site, whatever the
    setting says, since :func:`manager_site` already read it)."""
    from ccat_data_transfer import scope

    return functools.partial(cycle, site=site if site else scope.ALL_SITES)
