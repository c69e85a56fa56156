"""How the command line reports a failure: one line on stderr and an exit code.

Room in the house: CLI layer.  Exit code ``2`` for every error, a usage error (unknown
command or option, missing argument, invalid value) as for anything else: an error meant
for an operator (any :class:`~ccat_ops_db.errors.CcatError`: the whole family,
topology and storage errors included, or a database problem) is its message; an
unexpected exception is its class and message plus a hint to re-run with
``--verbose``, which shows the traceback.

Typer 0.29 and later ship their own copy of click (``typer._click``) whose exceptions are
not the installed ``click``'s; both are recognised.

Why not ``1`` for an operator error: ``1`` already means "the command ran and found a
problem" (``audit`` found discrepancies, ``health`` found a dead service, ``run
--simulate`` did not finish), which scripts tell apart from "the command could not run".
"""

from __future__ import annotations

import traceback
from typing import Any

from rich.markup import escape

from ccat_data_transfer.cli.common import err_console

USAGE_EXIT = 2
#: Not 1: that is "ran and found a problem" (see the module's docstring).
ERROR_EXIT = 2
INTERRUPTED_EXIT = 130


def _click_exception_classes() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(ClickException classes, NoArgsIsHelpError classes) of typer's click and of click."""
    errors: list[type] = []
    no_args: list[type] = []
    for module_name in ("typer._click.exceptions", "click.exceptions"):
        try:
            module = __import__(module_name, fromlist=["ClickException"])
        except ImportError:
            continue
        errors.append(module.ClickException)
        if hasattr(module, "NoArgsIsHelpError"):
            no_args.append(module.NoArgsIsHelpError)
    return tuple(errors), tuple(no_args)


CLICK_ERRORS, NO_ARGS_IS_HELP = _click_exception_classes()


def one_line(text: str) -> str:
    """``text`` on one line: its lines joined, runs of blanks collapsed."""
    return " ".join(" ".join(part.split()) for part in str(text).splitlines() if part.strip())


def say(message: str) -> None:
    """Print ``error: message`` as one line on stderr (the message is not read as markup)."""
    err_console.print(f"[bold red]error:[/] {escape(one_line(message))}", highlight=False)


def usage_error(exc: Any, prog: str) -> int:
    """A click usage error as one line: its message and where to find help."""
    ctx = getattr(exc, "ctx", None)
    command = getattr(ctx, "command_path", None) or prog
    hint = f" (see `{command} --help`)" if getattr(exc, "exit_code", 1) == USAGE_EXIT else ""
    say(exc.format_message() + hint)
    return int(getattr(exc, "exit_code", ERROR_EXIT) or ERROR_EXIT)


def operator_error(exc: BaseException, *, verbose: bool) -> int:
    """An error of the project's family (:class:`~ccat_ops_db.errors.CcatError`):
    its message as one line; a storage error says so first (``storage: ...``), since its
    message names a path or a bucket, not the command.  ``verbose`` shows the traceback
    first, as for an unexpected error (a storage failure deep in a cycle is where it
    helps)."""
    from ccat_data_transfer.core.storage.errors import StorageError

    if verbose:
        err_console.print(
            escape("".join(traceback.format_exception(exc)).rstrip()), highlight=False
        )
    say(f"storage: {exc}" if isinstance(exc, StorageError) else str(exc))
    return ERROR_EXIT


def unexpected_error(exc: BaseException, *, verbose: bool) -> int:
    """An exception nobody meant for a person: one line naming it and how to see more;
    with ``verbose`` the traceback first."""
    if verbose:
        err_console.print(
            escape("".join(traceback.format_exception(exc)).rstrip()), highlight=False
        )
        say(f"unexpected {type(exc).__name__}: {exc}")
    else:
        say(
            f"unexpected {type(exc).__name__}: {exc} "
            "(re-run with `ccat_data_transfer --verbose ...` to see the traceback)"
        )
    return ERROR_EXIT
