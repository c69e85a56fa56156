"""Fixity: every archive copy is re-read in full on a schedule, and a bad one is repaired.

* :mod:`.cycle` - the fixity manager (``run_once``, the scan): per LTA location, within
  FIXITY_BYTES_PER_DAY, asks for a full re-read
  (``archive_proof.request_verification(..., full=True)``, run by a worker at the LTA's
  site) of the copies checked longest ago, and says whether the budget re-verifies
  everything within FIXITY_PERIOD_DAYS.  It also re-queues repairs of archive copies
  still marked lost (found by the audit, or a repair that failed).
* :mod:`.tasks` - the Celery task ``repair_archive_copy`` and the hook into
  ``archive_proof.on_bad_copies`` that queues it;
* :mod:`.repair` - the repair task's body: copies a
  good copy of the package (another LTA's, or a buffer's) over the bad one, verifies
  it, and records every step in ``archive_event``; with no good copy anywhere the
  package is frozen and an alert sent.

Room in the house: stage fixity: its cycle (the scan), its task (tasks) and the task's body
(repair).  This ``__init__`` imports nothing, so importing :mod:`.tasks` from a worker
does not pull in the manager.
"""

#: The modules other stages may import (tests/test_import_contract.py checks it).
# No other stage imports fixity statically (archive.proof loads the repair hook
# by name, REPAIR_HOOK_MODULE).
PUBLIC: tuple[str, ...] = ()
