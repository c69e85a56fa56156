"""Attempt ownership: every attempt at a piece of work owns its row, and checks that it
still does before each irreversible step.

When a task takes its row (``SCHEDULED -> IN_PROGRESS``, one conditional ``UPDATE``) it
writes a fresh token, :func:`new_attempt`, into the row's ``attempt_id``.  Recovery may
reset a row whose heartbeat stopped while its worker is in fact still alive (a dropped
database link, a paused process); a second attempt then takes the row with a token of its
own.  The first attempt must not touch anything the second may use, so every
irreversible step -- renaming bytes into place, discarding a temporary or partial file,
recording the result -- runs inside :func:`owned_step`: one conditional ``UPDATE ...
WHERE id = :id AND attempt_id = :attempt AND status = IN_PROGRESS`` with a rowcount check,
and the step runs while that transaction holds the row (PostgreSQL's row lock, SQLite's
write lock), so recovery cannot reset the row between the check and the step.  When the
check fails the attempt raises :class:`AttemptSuperseded` (logged ``attempt_superseded``)
and stops without touching anything.

Copies have no work status of their own: a verification or a repair of a physical copy
owns the copy through a ``copy_claim`` row (:func:`claim_copies`), taken with an insert,
taken over only when its heartbeat has stopped (:func:`~ccat_data_transfer.core.liveness.stopped`),
and removed when the attempt ends (:func:`release_copies`).

Room in the house: core.  Imports database, liveness, logging and ``ccat_ops_db``.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ccat_data_transfer.core.database import DatabaseConnection
from ccat_data_transfer.core.errors import CcatError
from ccat_data_transfer.core.liveness import stopped
from ccat_data_transfer.core.logs import get_logger
from ccat_ops_db import models as m

log = get_logger(__name__)

__all__ = [
    "AttemptSuperseded",
    "beat_copies",
    "claim_copies",
    "exit_owned",
    "new_attempt",
    "owned_step",
    "release_copies",
    "still_owns",
]


class AttemptSuperseded(CcatError):
    """This attempt no longer owns its row (recovery reset it, another attempt took it):
    it must stop without renaming, discarding or recording anything."""


def new_attempt() -> str:
    """A fresh attempt token (36 characters), written on the row when a task takes it."""
    return str(uuid.uuid4())


def still_owns(
    session: Session, model: Any, row_id: Any, attempt: str, *, status: str = "status"
) -> bool:
    """Whether ``attempt`` still owns row ``row_id`` of ``model``: one conditional
    ``UPDATE`` (``attempt_id`` and ``status`` = IN_PROGRESS, the latter named by
    ``status``, e.g. ``unpack_status``) with a rowcount check.  The update keeps the row
    locked until the caller's transaction ends.  Does not commit."""
    changed = session.execute(
        update(model)
        .where(
            model.id == row_id,
            model.attempt_id == attempt,
            getattr(model, status) == m.Status.IN_PROGRESS,
        )
        .values(attempt_id=attempt)
        .execution_options(synchronize_session=False)
    ).rowcount
    return changed == 1


@contextlib.contextmanager
def owned_step(
    model: Any,
    row_id: Any,
    attempt: str,
    step: str,
    *,
    status: str = "status",
    db: DatabaseConnection | None = None,
) -> Iterator[Session]:
    """Run one irreversible ``step`` (a name for the log) of ``attempt`` at row
    ``row_id``: yields a session whose transaction has checked ownership
    (:func:`still_owns`) and holds the row until the block ends (then it commits: a
    result recorded with that session is recorded only if the attempt still owns the
    row).  Raises :class:`AttemptSuperseded` before the block runs when it does not."""
    with (db or DatabaseConnection()).session_scope() as session:
        if not still_owns(session, model, row_id, attempt, status=status):
            log.warning(
                "attempt_superseded",
                work=model.__tablename__,
                row_id=row_id,
                attempt=attempt,
                step=step,
                reason="the row was reset or taken by another attempt; nothing touched",
            )
            raise AttemptSuperseded(f"{model.__tablename__} {row_id}: attempt {attempt} superseded")
        yield session


# ---------------------------------------------------------------------------------------
# Claims of copies (verification, repair)
# ---------------------------------------------------------------------------------------

CC = m.CopyClaim


def claim_copies(session: Session, copy_ids: Sequence[int], work: str, attempt: str) -> list[int]:
    """Take the ``copy_claim`` of each of ``copy_ids`` for ``attempt``: a copy with no
    claim, or whose claim's heartbeat stopped (its attempt is gone), becomes this
    attempt's; a copy claimed by a live attempt is left out.  Returns the ids taken.
    Commits each claim (a claim must be visible to the others at once)."""
    ids = sorted({int(i) for i in copy_ids})
    if not ids:
        return []
    now = m.utcnow()
    # A claim whose attempt stopped beating is taken over (one conditional UPDATE).
    session.execute(
        update(CC)
        .where(CC.physical_copy_id.in_(ids), stopped(CC.heartbeat_at, now))
        .values(attempt_id=attempt, work=work, heartbeat_at=now)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    held = set(session.scalars(select(CC.physical_copy_id).where(CC.physical_copy_id.in_(ids))))
    for copy_id in ids:
        if copy_id in held:
            continue
        try:
            session.add(
                CC(physical_copy_id=copy_id, work=work, attempt_id=attempt, heartbeat_at=now)
            )
            session.commit()
        except IntegrityError:  # another attempt inserted it first
            session.rollback()
    taken = list(
        session.scalars(
            select(CC.physical_copy_id).where(
                CC.physical_copy_id.in_(ids), CC.attempt_id == attempt
            )
        )
    )
    left = sorted(set(ids) - set(taken))
    if left:
        log.info("copy_claimed_elsewhere", work=work, copies=left, reason="a live attempt has them")
    return sorted(taken)


def beat_copies(session: Session, copy_ids: Sequence[int], attempt: str) -> set[int]:
    """Stamp the heartbeat of ``attempt``'s claims among ``copy_ids``; returns the ids it
    still owns (a conditional UPDATE per batch: the check before recording).  Does not
    commit: the caller records in the same transaction."""
    ids = [int(i) for i in copy_ids]
    if not ids:
        return set()
    session.execute(
        update(CC)
        .where(CC.physical_copy_id.in_(ids), CC.attempt_id == attempt)
        .values(heartbeat_at=m.utcnow())
        .execution_options(synchronize_session=False)
    )
    return set(
        session.scalars(
            select(CC.physical_copy_id).where(
                CC.physical_copy_id.in_(ids), CC.attempt_id == attempt
            )
        )
    )


def release_copies(session: Session, copy_ids: Sequence[int], attempt: str) -> None:
    """Remove ``attempt``'s claims among ``copy_ids`` (others' claims stay).  Does not
    commit."""
    ids = [int(i) for i in copy_ids]
    if ids:
        session.execute(
            delete(CC)
            .where(CC.physical_copy_id.in_(ids), CC.attempt_id == attempt)
            .execution_options(synchronize_session=False)
        )


def exit_owned(
    writer: contextlib.AbstractContextManager[Any],
    model: Any,
    row_id: Any,
    attempt: str,
    step: str,
    *,
    db: DatabaseConnection | None = None,
) -> None:
    """Leave the atomic write ``writer`` (an entered ``Storage.open_write``: leaving it
    renames the temporary file into place) inside :func:`owned_step`, so the rename
    happens only while ``attempt`` owns its row; a superseded attempt leaves it with
    :class:`AttemptSuperseded` instead (its temporary file is removed) and re-raises."""
    try:
        with owned_step(model, row_id, attempt, step, db=db):
            writer.__exit__(None, None, None)
    except AttemptSuperseded as exc:
        writer.__exit__(type(exc), exc, exc.__traceback__)
        raise
