"""``python -m ccat_data_transfer`` runs the command line."""

from ccat_data_transfer.cli import _console_script

_console_script()
