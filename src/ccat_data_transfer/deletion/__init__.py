"""The deletion stage: removes temporary copies when, and only when, it is provably safe.

The user's lifecycle document turned into code, one room per concern:

========================  ==============================================================
``deletion.rules``        the decision matrix: ``Decision``, ``decide_*``, ``can_delete_*``
``deletion.rule_sql``     the same rules as SQL, each stated once (stage 1, stage 2, ...)
``deletion.candidates``   set-based finders (``find_deletable_*``), oldest first
``deletion.pressure``     buffer status, pressure, bytes to free, batch sizes
``deletion.claims``       atomic claims, SCHEDULED audit rows, task submission
``deletion.marking``      stage 1: raw files of a package gone from the source site
``deletion.steps``        the five steps of a cycle (``delete_*``, stage 2)
``deletion.cycle``        ``run_once``, ``delete_data_packages``, ``sleep_time``, retries
``deletion.worker``       ``DeletionTask`` and the task bodies: re-check, delete, record
``deletion.tasks``        the Celery tasks (their names unchanged)
``deletion.trail``        ``deletion_log`` rows and ``deletion_history``
``deletion.plan``         the dry run: ``deletion_plan``, ``explain_copy``
``deletion.base``         shared names (states, tables, copy types, logger)
========================  ==============================================================

Copies move PRESENT -> DELETION_SCHEDULED -> DELETION_IN_PROGRESS -> DELETED (raw files at
SOURCE/BUFFER: PRESENT -> DELETION_POSSIBLE -> DELETION_SCHEDULED -> ...).  Rows are never
removed; every decision goes to the ``deletion_log`` table and to the JSON log.  Nothing
is ever deleted automatically from a LONG_TERM_ARCHIVE location: the finders never select
such copies, the worker refuses them as a last guard and leaves them as found.  A copy
that relies on the archives goes only on fresh proof of enough archive copies (the proof
rule, in ``rule_sql`` and ``rules``); the cycle asks the archives' sites for the proofs
it waits for.  Nothing is deleted at a location under an audit hold, nor any copy of a
frozen package.

The document's names stay importable from ``ccat_data_transfer.deletion_manager``.

Room in the house: a manager (cli/api -> managers -> tasks/core -> ops_db); this package
imports nothing from cli or api.  Import the modules themselves; this file imports none.
"""

#: The modules other stages may import (tests/test_import_contract.py checks it).
# ``cycle``: the buffer stage runs one deletion cycle at once when a buffer reaches
# its emergency state (BUFFER_EMERGENCY_TRIGGERS_DELETION).
PUBLIC: tuple[str, ...] = ("cycle",)
