"""Stage 6, staging: bring archived packages from a LONG_TERM_ARCHIVE to a PROCESSING
location for scientists, and let them go again.

Room in the house: the staging stage as a package, one file per concern.  Its modules
import downwards only (cli/api -> managers -> tasks/core -> ops_db); the CLI and the API
call :mod:`~ccat_data_transfer.staging.jobs` and :mod:`~ccat_data_transfer.staging.retention`.
This ``__init__`` imports nothing, so that reading a job does not load Celery.

=====================================================  ====================================
module                                                 holds
=====================================================  ====================================
:mod:`~ccat_data_transfer.staging.request`             what a request names (packages by
                                                       ID, obs unit, instrument and time
                                                       range), and when it is refused
:mod:`~ccat_data_transfer.staging.jobs`                create, get, list a job; a job as
                                                       plain data
:mod:`~ccat_data_transfer.staging.retention`           expiry, "done", which active jobs
                                                       still need a package
:mod:`~ccat_data_transfer.staging.finders`             the set-based queries and the job
                                                       claim
:mod:`~ccat_data_transfer.staging.cycle`               ``run_once``, ``sleep_time``
:mod:`~ccat_data_transfer.staging.tasks`               the Celery task ``stage_staging_job``
                                                       and the job's retries
:mod:`~ccat_data_transfer.staging.package`             staging one package at one location
                                                       (lock, reuse, plan)
:mod:`~ccat_data_transfer.staging.sources`             LTA copy selection order; the copy
                                                       from the archive, verified
:mod:`~ccat_data_transfer.staging.unpack`              unpack, verify every file, record the
                                                       copy STAGED
=====================================================  ====================================

:mod:`ccat_data_transfer.staging_manager` keeps the old name importable (the user's
document and the CLI use it) and re-exports the public names from here.
"""

#: The modules other stages may import (tests/test_import_contract.py checks it).
# None: no other stage imports staging (the orchestrator and the CLI are above the stages).
PUBLIC: tuple[str, ...] = ()
