"""Stage 0, filing: instruments register the raw files they wrote at a SOURCE location.

The public entry points (the REST API, the CLI and scripts call these):
:func:`file_raw_data_files` and :func:`finish_executed_obs_unit`, in :mod:`.register`.
"""

from ccat_data_transfer.filing.register import (
    file_raw_data_files,
    finish_executed_obs_unit,
    parse_instrument_module,
)

#: The modules other stages may import (tests/test_import_contract.py checks it).
# No other stage imports filing (the API, the CLI and the simulator call it).
PUBLIC: tuple[str, ...] = ()

__all__ = ["file_raw_data_files", "finish_executed_obs_unit", "parse_instrument_module"]
