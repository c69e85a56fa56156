"""Stages 3 and 4 under their old name: send DataTransferPackages between sites, verify
them, unpack them.

The stage lives in the package :mod:`ccat_data_transfer.transfer` (one file per
concern; its docstring maps them).  This module only re-exports the names scripts, the
CLI, tests and the docs use from here; the Celery task names keep this module's name.
"""

from ccat_data_transfer.transfer.cycle import (
    dispatch_transfers,
    dispatch_unpacks,
    run_once,
    update_package_status,
)
from ccat_data_transfer.transfer.execution import execute_transfer
from ccat_data_transfer.transfer.planning import (
    ROUND_ROBIN_KEY,
    next_round_robin_site,
    plan_onward_transfers,
    plan_primary_transfers,
)
from ccat_data_transfer.transfer.recovery import reset_stalled_transfers, retry_transfer
from ccat_data_transfer.transfer.routes import (
    best_buffer,
    find_route,
    lta_sites,
    resolve_destination,
)
from ccat_data_transfer.transfer.tasks import (
    transfer_data_transfer_package,
    unpack_data_transfer_package,
)
from ccat_data_transfer.transfer.unpack import execute_unpack
from ccat_data_transfer.transfer.worker import transfer_log_dir

__all__ = [
    "ROUND_ROBIN_KEY",
    "best_buffer",
    "dispatch_transfers",
    "dispatch_unpacks",
    "execute_transfer",
    "execute_unpack",
    "find_route",
    "lta_sites",
    "next_round_robin_site",
    "plan_onward_transfers",
    "plan_primary_transfers",
    "reset_stalled_transfers",
    "resolve_destination",
    "retry_transfer",
    "run_once",
    "transfer_data_transfer_package",
    "transfer_log_dir",
    "unpack_data_transfer_package",
    "update_package_status",
]
