"""Shared pieces of the command line: the Typer app, consoles, global options, and the
one body every manager command runs.

Room in the house: CLI layer (thin: parse, call, print).  May import managers (lazily,
inside commands, so that ``--help`` stays fast), core and ccat_ops_db.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from ccat_data_transfer import __version__
from ccat_data_transfer.core import formatting
from ccat_data_transfer.core.config import settings
from ccat_data_transfer.core.database import DatabaseConnection
from ccat_data_transfer.core.logs import configure_logging
from ccat_data_transfer.core.registry import StageEntry

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
#: Options of this run that the error handling reads: ``verbose`` shows tracebacks.
options = SimpleNamespace(verbose=False)


def _set_verbose(value: bool) -> bool:
    if value:
        options.verbose = True
    return value


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
    verbose: bool = typer.Option(
        False,
        "--verbose",
        callback=_set_verbose,
        is_eager=True,
        help="Debug logging, and the traceback of an unexpected error.",
    ),
) -> None:
    if data_dir is not None:
        settings.set("DATA_DIR", str(data_dir))
    if database_url is not None:
        settings.set("DATABASE_URL", database_url)
    if log_format is not None:
        settings.set("LOG_FORMAT", log_format)
    configure_logging(verbose=verbose)


def get_db() -> DatabaseConnection:
    """A checked connection: a clear error if the DB is unreachable or not initialised."""
    from ccat_data_transfer.core.errors import ConfigurationError

    db = DatabaseConnection()
    db.check()  # a missing embedded database is an error here, not an empty new file
    if not db.has_schema():
        raise ConfigurationError(
            "the database has no schema yet; run `ccat_data_transfer init` first"
        )
    return db


#: The command line's byte labels: plain ASCII capitals for terminals and log files.
_CLI_BYTE_UNITS = ("B", "KB", "MB", "GB", "TB", "PB")


def human_bytes(n: int | float | None) -> str:
    """A size for terminal output: :func:`ccat_data_transfer.core.formatting.human_bytes` with
    ASCII labels (``KB``, ``-`` for an unknown size)."""
    return formatting.human_bytes(n, missing="-", units=_CLI_BYTE_UNITS)


def print_listing(
    items: list[Any],
    *,
    as_json: bool,
    title: str | None,
    columns: Sequence[str],
    row: Callable[[Any], Sequence[str]],
    empty: str | None = None,
) -> None:
    """The body of a list command: ``items`` as JSON with ``--json``; else the line
    ``empty`` when there are none (if given); else a table of ``columns`` with one
    ``row(item)`` per item."""
    if as_json:
        console.print_json(json.dumps(items, default=str))
        return
    if not items and empty is not None:
        console.print(empty)
        return
    table = Table(*columns, title=title)
    for item in items:
        table.add_row(*row(item))
    console.print(table)


#: Help of the ``--site`` option of every manager command.
SITE_HELP = (
    "Only this site's work (site name or short name); one manager process per site. "
    "Default: the setting MANAGER_SITE (empty: every site)."
)


def manager_site(db: DatabaseConnection, site: str | None) -> str | None:
    """The checked site of a manager command: ``--site``, else the setting MANAGER_SITE;
    its canonical name, or None for every site.  An unknown site is a clear error before
    the manager starts (not a failure logged every cycle)."""
    from ccat_data_transfer.core import scope
    from ccat_data_transfer.core.errors import CcatError

    with db.session_scope() as session:
        try:
            return scope.site_name(session, site)
        except CcatError as exc:
            if site:  # a wrong --site is a usage error (exit 2); a wrong setting is not
                raise typer.BadParameter(str(exc), param_hint="'--site'") from None
            raise


def scoped_cycle(cycle: Any, site: str | None) -> Any:
    """``cycle(session)`` bound to the checked ``site`` (None: every site, whatever the
    setting says, since :func:`manager_site` already read it)."""
    from ccat_data_transfer.core import scope

    return functools.partial(cycle, site=site if site else scope.ALL_SITES)


#: The options of a manager command: one cycle, debug logging, one site.
ONCE_OPTION = typer.Option(False, "--once", help="Run one cycle and exit.")
VERBOSE_OPTION = typer.Option(
    False,
    "-v",
    "--verbose",
    callback=_set_verbose,
    help="Debug logging, and the traceback of an unexpected error.",
)
SITE_OPTION = typer.Option(None, "--site", help=SITE_HELP)
#: The ``--json`` option of the commands that otherwise print a table.
JSON_OPTION = typer.Option(False, "--json", help="Print JSON instead of a table.")


def run_manager_command(
    name: str,
    cycle: Callable[..., Any],
    sleep_seconds: Callable[[], float],
    *,
    once: bool,
    verbose: bool,
    site: str | None,
    beat_each_cycle: bool = False,
) -> Any:
    """What every manager command does: set up logging, check the database and the site,
    then run ``cycle`` (scoped to the site) in the manager loop as ``name[@site]``; the
    cycle's result with ``once``.  ``beat_each_cycle``: the health heartbeat is sent after
    each cycle (not by a background thread)."""
    from ccat_data_transfer.core.manager_loop import run_manager
    from ccat_data_transfer.core.scope import scoped_name

    configure_logging(verbose=verbose or options.verbose)
    db = get_db()
    site = manager_site(db, site)
    heartbeat = None
    if beat_each_cycle:
        from ccat_data_transfer.core.health import HealthReporter

        heartbeat = HealthReporter("manager", scoped_name(name, site)).beat
    return run_manager(
        scoped_name(name, site),
        scoped_cycle(cycle, site),
        sleep_seconds,
        once=once,
        db=db,
        heartbeat=heartbeat,
    )


def print_result_json(result: Any) -> None:
    """A cycle's result as JSON (``--once`` of the deletion and staging managers)."""
    console.print_json(json.dumps(result, default=str))


def add_manager_command(
    entry: StageEntry,
    doc: str,
    sleep_seconds: Callable[[Any], float],
    report: Callable[[Any], None],
    *,
    beat_each_cycle: bool = False,
    once_help: str | None = None,
) -> Callable[..., None]:
    """Register the command of registry entry ``entry`` (``transfer-manager``; options
    ``--once``, ``-v``, ``--site``; help ``doc``): it runs the entry's ``run_once`` in the
    manager loop as ``entry.name`` (its health name), ``sleep_seconds(owner)`` between
    cycles (``owner``: the cycle module, or the instance the entry names), and with
    ``--once`` hands the result to ``report``.  The stage is imported when the command
    runs, not at start-up."""
    once_option = typer.Option(False, "--once", help=once_help) if once_help else ONCE_OPTION

    def manager_command(
        once: bool = once_option, verbose: bool = VERBOSE_OPTION, site: str | None = SITE_OPTION
    ) -> None:
        owner = entry.load_owner()
        result = run_manager_command(
            entry.name,
            owner.run_once,
            lambda: sleep_seconds(owner),
            once=once,
            verbose=verbose,
            site=site,
            beat_each_cycle=beat_each_cycle,
        )
        if once:
            report(result)

    manager_command.__name__ = f"{entry.name}_command"
    manager_command.__doc__ = doc
    app.command(entry.command)(manager_command)
    return manager_command
