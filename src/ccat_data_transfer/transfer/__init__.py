"""Stages 3 and 4 as a package: send DataTransferPackages between sites, verify them,
unpack them.

Flow of one DataTransferPackage (DTP)::

    source-site BUFFER --primary--> LTA-site BUFFER (round-robin site) --unpack-->
        RawDataPackage tars PRESENT at that buffer (the archive manager takes over)
    primary LTA-site BUFFER --secondary--> every other LTA site's BUFFER --unpack--> ...

One DataTransfer row exists per (DTP, destination location).  The manager claims work
with ``UPDATE ... WHERE status = <expected>`` and commits before submitting tasks; tasks
claim again (SCHEDULED -> IN_PROGRESS) so a task delivered twice does nothing the
second time.  Failures retry with exponential backoff up to TRANSFER_MAX_RETRIES.

One file per concern (imports point down the list only, and to core and ``ccat_ops_db``):

* :mod:`~ccat_data_transfer.transfer.cycle`: ``run_once``, the dispatch of transfers and
  unpacks, the package status (manager side; imports all of the below);
* :mod:`~ccat_data_transfer.transfer.planning`: primary transfers (round-robin LTA site)
  and onward transfers (relay second hops, secondaries);
* :mod:`~ccat_data_transfer.transfer.routes`: the LTA sites, routes and landing buffers;
* :mod:`~ccat_data_transfer.transfer.tasks`: the Celery tasks (transfer, unpack);
* :mod:`~ccat_data_transfer.transfer.execution`: the transfer task's body and its
  checksum check;
* :mod:`~ccat_data_transfer.transfer.unpack`: the unpack task's body;
* :mod:`~ccat_data_transfer.transfer.worker`: what the transfer, unpack and archive tasks
  share (worker name, heartbeat, log folder, recording a verified copy or a failure);
* :mod:`~ccat_data_transfer.transfer.recovery`: the retry policy, stalled-work resets and
  the operator's retry.

``ccat_data_transfer.transfer_manager`` re-exports the public names under the old module
name; the Celery task names and the log records (logger name) keep that name too.
"""

#: The modules other stages may import (tests/test_import_contract.py checks it).
# ``claims``, ``worker``, ``recovery``: the archive stage runs its row tasks the way the
# transfer stage does (claim and submit, the worker side of a row task, the retry policy
# and stalled-work resets), so it reuses these three rather than a copy of them.
PUBLIC: tuple[str, ...] = ("claims", "recovery", "worker")
