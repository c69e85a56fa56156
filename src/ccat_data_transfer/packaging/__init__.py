"""The packaging stages' shared parts and the raw-data-package rules.

* :mod:`~ccat_data_transfer.packaging.skeleton` - the claim / build / release steps both
  packaging managers share;
* :mod:`~ccat_data_transfer.packaging.raw_groups` - stage 1's rules (when a group is
  complete, how it is split, package names) and its planning query;
* :mod:`~ccat_data_transfer.packaging.raw_report` - everything about one raw data package
  as plain data (CLI ``package show``, the API).

The managers themselves stay :mod:`ccat_data_transfer.packaging.raw_packages` and
:mod:`ccat_data_transfer.packaging.transfer_packages` (cycle and Celery task).

Room in the house: managers/tasks.  Imports core and :mod:`ccat_ops_db`.
"""
