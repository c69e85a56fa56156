"""Deletion manager: the name the user's lifecycle document uses for the deletion stage.

A thin re-export, no logic: the code lives in the package ``ccat_data_transfer.deletion``
(rules, their SQL, candidates, pressure, claims, steps, cycle, worker, trail, dry run).
Importing this module also registers the deletion tasks with Celery
(``celery_app.TASK_MODULES`` lists it); their names stay
``ccat_data_transfer.deletion_manager.*``.
"""

from ccat_data_transfer.deletion.base import (
    COPY_TYPE_DATA_TRANSFER_PACKAGE,
    COPY_TYPE_RAW_DATA_FILE,
    COPY_TYPE_RAW_DATA_PACKAGE,
    IN_FLIGHT,
    WORKER_ACCEPTS,
)
from ccat_data_transfer.deletion.candidates import (
    find_deletable_data_transfer_packages,
    find_deletable_processing_raw_data_files,
    find_deletable_raw_data_packages_by_location,
    find_deletable_staged_raw_data_files_by_location,
)
from ccat_data_transfer.deletion.claims import claim_for_deletion
from ccat_data_transfer.deletion.cycle import (
    ask_for_proof,
    delete_data_packages,
    mark_catch_up,
    reschedule_failed_deletions,
    resubmit_stalled_deletions,
    run_once,
    sleep_time,
)
from ccat_data_transfer.deletion.marking import mark_raw_data_files_for_deletion
from ccat_data_transfer.deletion.plan import PlanItem, deletion_plan, explain_copy
from ccat_data_transfer.deletion.pressure import (
    bytes_to_free,
    get_buffer_status_for_location,
    pressure_threshold_percent,
    should_delete_based_on_buffer_status,
)
from ccat_data_transfer.deletion.rule_sql import min_verified_lta_copies
from ccat_data_transfer.deletion.rules import (
    WAITING_FOR_PROOF,
    Decision,
    SiteRoles,
    can_delete_data_transfer_package_from_lta_buffer,
    can_delete_data_transfer_package_from_source_buffer,
    can_delete_raw_data_package_from_lta_buffer,
    can_delete_raw_data_package_from_source_buffer,
    decide_copy,
    decide_data_transfer_package,
    decide_raw_data_file_copy,
    decide_raw_data_package,
    site_roles,
)
from ccat_data_transfer.deletion.steps import (
    delete_data_transfer_packages,
    delete_processing_raw_data_files,
    delete_raw_data_packages_bulk,
    delete_staged_raw_data_files_from_processing,
    process_deletion_possible_raw_data_files,
)
from ccat_data_transfer.deletion.tasks import (
    delete_bulk_data_transfer_packages,
    delete_bulk_raw_data_files,
    delete_bulk_raw_data_packages,
    delete_physical_copy,
)

# The document's two underscore names, kept as aliases of the public ones.
from ccat_data_transfer.deletion.trail import add_deletion_log as _add_deletion_log
from ccat_data_transfer.deletion.trail import deletion_history
from ccat_data_transfer.deletion.worker import DeletionTask
from ccat_data_transfer.deletion.worker import (
    delete_bulk_raw_data_files_internal as _delete_bulk_raw_data_files_internal,
)

__all__ = [
    "COPY_TYPE_DATA_TRANSFER_PACKAGE",
    "COPY_TYPE_RAW_DATA_FILE",
    "COPY_TYPE_RAW_DATA_PACKAGE",
    "IN_FLIGHT",
    "WAITING_FOR_PROOF",
    "WORKER_ACCEPTS",
    "Decision",
    "DeletionTask",
    "PlanItem",
    "SiteRoles",
    "_add_deletion_log",
    "_delete_bulk_raw_data_files_internal",
    "ask_for_proof",
    "bytes_to_free",
    "can_delete_data_transfer_package_from_lta_buffer",
    "can_delete_data_transfer_package_from_source_buffer",
    "can_delete_raw_data_package_from_lta_buffer",
    "can_delete_raw_data_package_from_source_buffer",
    "claim_for_deletion",
    "decide_copy",
    "decide_data_transfer_package",
    "decide_raw_data_file_copy",
    "decide_raw_data_package",
    "delete_bulk_data_transfer_packages",
    "delete_bulk_raw_data_files",
    "delete_bulk_raw_data_packages",
    "delete_data_packages",
    "delete_data_transfer_packages",
    "delete_physical_copy",
    "delete_processing_raw_data_files",
    "delete_raw_data_packages_bulk",
    "delete_staged_raw_data_files_from_processing",
    "deletion_history",
    "deletion_plan",
    "explain_copy",
    "find_deletable_data_transfer_packages",
    "find_deletable_processing_raw_data_files",
    "find_deletable_raw_data_packages_by_location",
    "find_deletable_staged_raw_data_files_by_location",
    "get_buffer_status_for_location",
    "mark_catch_up",
    "mark_raw_data_files_for_deletion",
    "min_verified_lta_copies",
    "pressure_threshold_percent",
    "process_deletion_possible_raw_data_files",
    "reschedule_failed_deletions",
    "resubmit_stalled_deletions",
    "run_once",
    "should_delete_based_on_buffer_status",
    "site_roles",
    "sleep_time",
]
