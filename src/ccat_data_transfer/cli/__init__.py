"""Command line ``ccat_data_transfer``: thin, parse arguments, call, print.

Each area's commands live in their own module of this package and register themselves on
``app``.  ``main()`` turns every error into one line on stderr and exit code 2 (see
:mod:`ccat_data_transfer.cli.errors`), never a traceback unless ``--verbose`` asks for it.
"""

from __future__ import annotations

import importlib
import sys

import typer
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from ccat_data_transfer.cli import errors, helptext
from ccat_data_transfer.cli.common import app, err_console, options
from ccat_data_transfer.core.errors import CcatError

COMMAND_MODULES = [
    "core",
    "managers",
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

helptext.clean_app_help(app)

PROG = "ccat_data_transfer"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    options.verbose = False
    try:
        # With standalone_mode=False click returns the code of typer.Exit instead of raising.
        rc = app(args=argv, prog_name=PROG, standalone_mode=False)
        if isinstance(rc, int):
            return rc
    except typer.Exit as exc:  # click's Exit on older typer, typer's own on 0.29+
        return exc.exit_code
    except errors.NO_ARGS_IS_HELP as exc:  # bare `ccat_data_transfer`: the help, as asked
        exc.show()
        return errors.USAGE_EXIT
    except errors.CLICK_ERRORS as exc:
        return errors.usage_error(exc, PROG)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("interrupted")
        return errors.INTERRUPTED_EXIT
    except CcatError as exc:  # the project's family, TopologyError and StorageError included
        return errors.operator_error(exc, verbose=options.verbose)
    except OperationalError as exc:
        reason = str(exc.orig).strip() if exc.orig else str(exc)
        errors.say(f"database: {reason}")
        return errors.ERROR_EXIT
    except SQLAlchemyError as exc:
        errors.say(
            f"database: {exc.__class__.__name__}: {str(exc).splitlines()[0]}"
            " (has `ccat_data_transfer init` been run?)"
        )
        return errors.ERROR_EXIT
    except Exception as exc:  # noqa: BLE001 - the last resort: one line, never a traceback
        return errors.unexpected_error(exc, verbose=options.verbose)
    return 0


def console_script() -> None:
    sys.exit(main())


# The name the console-script entry point of installs made before it was public uses.
_console_script = console_script


__all__ = ["app", "main", "typer"]
