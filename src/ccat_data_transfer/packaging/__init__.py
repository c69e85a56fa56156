"""The packaging stages' shared parts and the raw-data-package rules.

* :mod:`~ccat_data_transfer.packaging.skeleton` - the claim / build / release steps both
  packaging managers share;
* :mod:`~ccat_data_transfer.packaging.raw_groups` - stage 1's rules (when a group is
  complete, how it is split, package names) and its planning query;
* :mod:`~ccat_data_transfer.packaging.raw_report` - everything about one raw data package
  as plain data (CLI ``package show``, the API).

The two managers: stage 1's cycle is :mod:`ccat_data_transfer.packaging.raw_cycle`
(claims and the task's body in :mod:`ccat_data_transfer.packaging.raw_packages`), stage
2's :mod:`ccat_data_transfer.packaging.transfer_cycle` (aggregation rule, claims and the
task's body in :mod:`ccat_data_transfer.packaging.transfer_packages`); both Celery tasks
are in :mod:`ccat_data_transfer.packaging.tasks`.

Room in the house: managers/tasks.  Imports core and :mod:`ccat_ops_db`.
"""

#: The modules other stages may import (tests/test_import_contract.py checks it).
# No other stage imports packaging (operations.recovery does, from above).
PUBLIC: tuple[str, ...] = ()
