"""``python -m ccat_data_transfer`` runs the command line."""

from ccat_data_transfer.cli import console_script

console_script()
