"""Stage 0, filing: instruments register the raw files they wrote at a SOURCE location.

The public entry points (the REST API, the CLI and scripts call these):
:func:`file_raw_data_files` and :func:`finish_executed_obs_unit`, in :mod:`.register`.
"""

from ccat_data_transfer.filing.register import (
    file_raw_data_files,
    finish_executed_obs_unit,
    parse_instrument_module,
)

__all__ = ["file_raw_data_files", "finish_executed_obs_unit", "parse_instrument_module"]
