"""Stage 6, staging: the old module name, which the user's document, the docs, the tests and
the CLI use.

Room in the house: a thin re-export of the :mod:`ccat_data_transfer.staging` package (no
logic here); importing it also registers the staging task with Celery (it is listed in
``celery_app.TASK_MODULES``).
"""

from ccat_data_transfer.staging.cycle import run_once, sleep_time
from ccat_data_transfer.staging.jobs import (
    create_staging_job,
    get_staging_job,
    job_as_dict,
    list_staging_jobs,
)
from ccat_data_transfer.staging.package import StagingBusy, stage_package
from ccat_data_transfer.staging.retention import (
    active_jobs_using_package,
    deactivate_staging_job,
    expire_staging_jobs,
)
from ccat_data_transfer.staging.sources import select_lta_copies
from ccat_data_transfer.staging.tasks import stage_staging_job

# The document's underscore name, kept as an alias of the public one.
from ccat_data_transfer.staging.unpack import (
    mark_package_as_staged_and_cleanup as _mark_package_as_staged_and_cleanup,
)

__all__ = [
    "StagingBusy",
    "_mark_package_as_staged_and_cleanup",
    "active_jobs_using_package",
    "create_staging_job",
    "deactivate_staging_job",
    "expire_staging_jobs",
    "get_staging_job",
    "job_as_dict",
    "list_staging_jobs",
    "run_once",
    "select_lta_copies",
    "sleep_time",
    "stage_package",
    "stage_staging_job",
]
