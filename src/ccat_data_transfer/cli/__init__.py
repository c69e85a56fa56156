"""Command line ``ccat_data_transfer``: thin, parse arguments, call, print.

Each area's commands live in their own module of this package and register themselves on
``app``.  ``main()`` turns every error meant for a person into one line on stderr and a
non-zero exit, never a traceback.
"""

from __future__ import annotations

import importlib
import sys

import click
import typer
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from ccat_data_transfer.cli.common import app, err_console
from ccat_data_transfer.exceptions import CcatError
from ccat_ops_db.topology import TopologyError

COMMAND_MODULES = [
    "core",
    "packaging",
    "transfer",
    "deletion",
    "staging",
    "system",
    "archive",
    "tokens",
]

for _name in COMMAND_MODULES:
    _module = f"ccat_data_transfer.cli.{_name}"
    try:
        importlib.import_module(_module)
    except ModuleNotFoundError as _exc:  # an area not built yet; anything else is a bug
        if _exc.name != _module:
            raise


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    try:
        # With standalone_mode=False click returns the code of typer.Exit instead of raising.
        rc = app(args=argv, prog_name="ccat_data_transfer", standalone_mode=False)
        if isinstance(rc, int):
            return rc
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        err_console.print("aborted")
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except (CcatError, TopologyError) as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        return 2
    except OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        err_console.print(f"[bold red]error:[/] database: {reason}", highlight=False)
        return 2
    except SQLAlchemyError as exc:
        err_console.print(
            f"[bold red]error:[/] database: {exc.__class__.__name__}: {str(exc).splitlines()[0]}"
            " (has `ccat_data_transfer init` been run?)",
            highlight=False,
        )
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    return 0


def _console_script() -> None:
    sys.exit(main())


__all__ = ["app", "main", "typer"]
