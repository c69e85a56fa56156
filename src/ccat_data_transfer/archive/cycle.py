"""Stage 5: move RawDataPackages from an LTA-site buffer into that site's long-term archive.

For every RawDataPackage with a PRESENT copy at the BUFFER of a site that has a
LONG_TERM_ARCHIVE location, the manager records one LongTermArchiveTransfer (unique per
package and LTA location), claims it atomically and submits a task on the buffer's
``long_term_archive_transfer`` queue.  The task copies the tar into the LTA (disk or S3;
writes are atomic), checks the checksum of what landed, writes a JSON metadata sidecar at
``<relative_path>.json``, records the LTA copy PRESENT (verified) and marks the package
ARCHIVED.  The buffer copy is left alone: the deletion manager removes it by its rules.

This module is the manager's cycle (plan, claim, dispatch, reset stalled work); the task
is :mod:`ccat_data_transfer.archive.tasks`, its body
:mod:`ccat_data_transfer.archive.execution`.

Room in the house: stage archive (cycle).
"""

from __future__ import annotations

import functools
from datetime import timedelta
from typing import Any

from sqlalchemy import bindparam, exists, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from ccat_data_transfer.archive.tasks import archive_raw_data_package
from ccat_data_transfer.core import scope
from ccat_data_transfer.core.logs import get_logger
from ccat_data_transfer.core.operation_types import OperationType
from ccat_data_transfer.transfer.claims import claim, submit_claimed
from ccat_data_transfer.transfer.recovery import StalledWork, reset_stalled
from ccat_ops_db import models as m

log = get_logger(__name__)

#: Archive transfers in flight, reset (or their task sent again) by the site of the LTA
#: they go into; the task runs on the queue of the LTA-site buffer they come from.
STALLED_ARCHIVE_TRANSFERS = StalledWork(
    m.LongTermArchiveTransfer,
    m.LongTermArchiveTransfer.destination_location_id,
    "stalled in {status}: worker lost",
    "ccat_data_transfer.archive_manager.archive_raw_data_package",
    OperationType.LONG_TERM_ARCHIVE_TRANSFER,
    "origin_location",
)

__all__ = [
    "STALLED_ARCHIVE_TRANSFERS",
    "dispatch_archive_transfers",
    "plan_archive_transfers",
    "reset_stalled_archive_transfers",
    "run_once",
]


@functools.cache
def _archive_candidates() -> tuple[Any, Any]:
    """The candidates query of :func:`plan_archive_transfers` and its LTA id column,
    built once: its aliases of a polymorphic class make building it cost more than
    running it, every cycle."""
    buf = aliased(m.DataLocation)
    lta = aliased(m.DataLocation)
    copy = aliased(m.RawDataPackagePhysicalCopy)
    lta_copy = aliased(m.RawDataPackagePhysicalCopy)
    lta_t = m.LongTermArchiveTransfer
    candidates = (
        select(copy.raw_data_package_id, buf.id, lta.id)
        .join(buf, buf.id == copy.data_location_id)
        .join(lta, lta.site_id == buf.site_id)
        .where(
            copy.status == m.PhysicalCopyStatus.PRESENT,
            buf.location_type == m.LocationType.BUFFER,
            lta.location_type == m.LocationType.LONG_TERM_ARCHIVE,
            lta.active.is_(True),
            ~exists().where(
                lta_t.raw_data_package_id == copy.raw_data_package_id,
                lta_t.destination_location_id == lta.id,
            ),
            ~exists().where(
                lta_copy.raw_data_package_id == copy.raw_data_package_id,
                lta_copy.data_location_id == lta.id,
                lta_copy.status == m.PhysicalCopyStatus.PRESENT,
            ),
        )
        .order_by(copy.raw_data_package_id, buf.priority, lta.priority, lta.name)
    )
    return candidates, lta.id


def plan_archive_transfers(session: Session, location_ids: list[int] | None = None) -> list[int]:
    """Create a PENDING LongTermArchiveTransfer for every RawDataPackage PRESENT at an
    LTA-site buffer that has neither a transfer nor a PRESENT copy at that site's LTA.

    One set-based query finds the candidates; each site archives into its active LTA
    location of best priority.  With ``location_ids`` only into LTA locations among them
    (a site's scope).  Returns the new ids (committed)."""
    candidates, lta_id = _archive_candidates()
    rows = session.execute(scope.restrict(candidates, lta_id, location_ids)).all()
    if not rows:
        return []
    site_of = dict(
        session.execute(
            select(m.DataLocation.id, m.DataLocation.site_id).where(
                m.DataLocation.id.in_({r[2] for r in rows})
            )
        ).all()
    )
    chosen: dict[tuple[int, int], tuple[int, int]] = {}
    for rdp_id, buf_id, lta_id in rows:
        chosen.setdefault((rdp_id, site_of[lta_id]), (buf_id, lta_id))
    created: list[int] = []
    for (rdp_id, _site), (buf_id, lta_id) in chosen.items():
        row = m.LongTermArchiveTransfer(
            raw_data_package_id=rdp_id,
            origin_location_id=buf_id,
            destination_location_id=lta_id,
            status=m.Status.PENDING,
        )
        try:
            with session.begin_nested():
                session.add(row)
        except IntegrityError:
            continue  # another manager recorded it first
        created.append(row.id)
    session.commit()
    return created


# Built once (a manager cycle runs it every time); ``now`` is bound at execution.
_DUE_ARCHIVE_TRANSFERS = (
    select(m.LongTermArchiveTransfer.id, m.LongTermArchiveTransfer.origin_location_id)
    .where(
        m.LongTermArchiveTransfer.status == m.Status.PENDING,
        (m.LongTermArchiveTransfer.next_attempt_at.is_(None))
        | (m.LongTermArchiveTransfer.next_attempt_at <= bindparam("now")),
    )
    .order_by(m.LongTermArchiveTransfer.id)
)


def dispatch_archive_transfers(
    session: Session, submit: bool = True, location_ids: list[int] | None = None
) -> list[int]:
    """Claim due PENDING archive transfers (-> SCHEDULED), commit, submit their tasks on
    the LTA-site buffer's queue.  With ``location_ids`` only transfers into LTA
    locations among them.  Returns the claimed ids."""
    t = m.LongTermArchiveTransfer
    rows = session.execute(
        scope.restrict(_DUE_ARCHIVE_TRANSFERS, t.destination_location_id, location_ids),
        {"now": m.utcnow()},
    ).all()
    claimed: list[tuple[int, int]] = []
    for lta_id, origin_id in rows:
        if claim(session, t, lta_id, t.status == m.Status.PENDING, status=m.Status.SCHEDULED):
            claimed.append((lta_id, origin_id))
    return submit_claimed(
        session,
        claimed,
        archive_raw_data_package,
        OperationType.LONG_TERM_ARCHIVE_TRANSFER,
        submit,
    )


def run_once(session: Session, site: str | None = None) -> dict[str, int]:
    """One cycle of the archive manager: record new archive transfers and dispatch.

    ``site`` scopes the cycle to archive transfers into that site's LTA (default: the
    setting ``MANAGER_SITE``; see :mod:`ccat_data_transfer.core.scope`)."""
    ids = scope.location_ids(session, site)
    planned = plan_archive_transfers(session, ids)
    dispatched = dispatch_archive_transfers(session, location_ids=ids)
    return {"archive_planned": len(planned), "archive_dispatched": len(dispatched)}


def reset_stalled_archive_transfers(
    session: Session,
    older_than: timedelta | float | None = None,
    location_ids: list[int] | None = None,
) -> int:
    """Started (IN_PROGRESS) archive transfers whose heartbeat stopped (``older_than``:
    default HEARTBEAT_SECONDS x HEARTBEAT_MISSED_BEATS): one failed attempt each (back to
    PENDING with backoff, or FAILED); queued ones are never reset.  With ``location_ids`` only
    transfers into LTA locations among them.  For the recovery service."""
    reset = reset_stalled(session, (STALLED_ARCHIVE_TRANSFERS,), older_than, location_ids)
    session.commit()
    return reset
