"""Stage 5, archive: move packages from an LTA-site buffer into the site's long-term
archive, and prove archive copies.

* ``cycle`` - the archive manager's ``run_once`` (plan, claim, dispatch, reset stalled);
* ``tasks`` - its Celery tasks (``archive_raw_data_package``, ``verify_archive_copies``);
* ``execution`` - the archive task's body (copy, verify, sidecar, record);
* ``verification`` - the verification task's body (look at the bytes, record findings);
* ``proof`` - public to the deletion and fixity stages and the operations: request a
  verification, how fresh a proof must be, and the verification's names re-exported.
"""

#: The modules other stages may import (tests/test_import_contract.py checks it).
# ``proof``: the deletion stage waits for fresh archive proofs before it deletes a
# copy that relies on the archives, the staging stage reads only proven archive copies,
# and the fixity stage asks for full re-reads and repairs what a proof found bad.
PUBLIC: tuple[str, ...] = ("proof",)
