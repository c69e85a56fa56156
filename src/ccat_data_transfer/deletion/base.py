"""Names every room of the deletion stage shares: the copy states and location types by
short name, the physical-copy and location tables, the copy-type discriminators and the
per-cycle batch cap, the stage's logger.  No logic.

Room in the house: core of the deletion stage (``ccat_data_transfer.deletion``); imports
only ``logging_utils``, ``ccat_ops_db`` and SQLAlchemy.
"""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy import select

from ccat_data_transfer.core.logs import get_logger
from ccat_ops_db import models as m

#: One logger for the whole stage, under the name its JSON lines have always carried.
log = get_logger("ccat_data_transfer.deletion_manager")

S = m.PhysicalCopyStatus
LT = m.LocationType
PCT = m.PhysicalCopy.__table__
DLT = m.DataLocation.__table__


@functools.cache
def table_alias(table: Any, name: str) -> Any:
    """A named alias of a table, built once: building an alias proxies every column, which
    cost about as much as the SQL of an idle cycle when done anew in every query."""
    return table.alias(name)


_KEPT: list[Any] = []


def kept(build: Any) -> Any:
    """A statement builder run once per distinct (hashable) arguments, its statement kept
    and reused: building a statement of the rules costs more than running it on an idle
    system.  A kept statement must take every value that changes between runs (times,
    settings, ids) as a named bound parameter passed with each execution (the rules' own:
    ``rule_sql.rule_params``)."""
    cached = functools.cache(build)
    _KEPT.append(cached)
    return cached


def run(session: Any, statement: Any, params: dict[str, Any] | None = None) -> Any:
    """Execute a Core statement (a kept one, or DML) on the session's connection and return
    its result: after the session's autoflush, as ``session.execute`` would do, but without
    the ORM's execution path (its per-statement set-up, and for a SELECT of mapped
    classes the loading of every column).  Rows are plain rows, never ORM objects: select
    ids here, then load objects only when some are found (:func:`load_in_order`).  A
    single-table subclass's discriminator is still added to the SQL."""
    if session.autoflush:
        session.flush()
    return session.connection().execute(statement, params or {})


#: Ids per query of :func:`load_in_order` (far below the drivers' limits on parameters).
_LOAD_CHUNK = 1000


def load_in_order(session: Any, cls: Any, ids: list[int]) -> list[Any]:
    """The ``cls`` objects of ``ids``, in the order of ``ids`` (one query per
    ``_LOAD_CHUNK`` ids; none when ``ids`` is empty, which is the idle case)."""
    found: dict[int, Any] = {}
    for start in range(0, len(ids), _LOAD_CHUNK):
        chunk = ids[start : start + _LOAD_CHUNK]
        found.update((o.id, o) for o in session.scalars(select(cls).where(cls.id.in_(chunk))))
    return [found[i] for i in ids if i in found]


def forget_kept() -> None:
    """Build every kept statement anew when next used: after the rules' SQL functions were
    replaced (a test that breaks a rule on purpose)."""
    for cached in _KEPT:
        cached.cache_clear()


#: Copy states that mean "a deletion is under way".
IN_FLIGHT = (S.DELETION_SCHEDULED, S.DELETION_IN_PROGRESS)
#: States the worker accepts: scheduled (normal), in progress (redelivered after a crash).
WORKER_ACCEPTS = (S.DELETION_SCHEDULED, S.DELETION_IN_PROGRESS)
MAX_BATCHES_PER_CYCLE = 10

COPY_TYPE_RAW_DATA_FILE = "raw_data_file"
COPY_TYPE_RAW_DATA_PACKAGE = "raw_data_package"
COPY_TYPE_DATA_TRANSFER_PACKAGE = "data_transfer_package"
