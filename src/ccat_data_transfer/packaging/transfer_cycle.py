"""Stage 2's manager cycle: ``run_once`` of the data transfer package manager.

One cycle releases stalled claims, refuses raw packages too large for any LTA-site
buffer, bundles the waiting ones at every source-site buffer
(:func:`~ccat_data_transfer.packaging.transfer_packages.bundle_packages`), claims each
bundle and submits
:func:`~ccat_data_transfer.packaging.tasks.create_data_transfer_package` on the buffer's
queue.

Room in the house: stage packaging (cycle).  Imports the packaging modules, core and
:mod:`ccat_ops_db`.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from ccat_data_transfer.core import scope
from ccat_data_transfer.core.buffer_room import largest_landing_capacity
from ccat_data_transfer.core.config import settings
from ccat_data_transfer.core.operation_types import OperationType
from ccat_data_transfer.core.queues import route_task_by_location
from ccat_data_transfer.packaging import skeleton
from ccat_data_transfer.packaging.tasks import create_data_transfer_package
from ccat_data_transfer.packaging.transfer_packages import (
    bundle_packages,
    claim_bundle,
    find_waiting_packages,
    refuse_too_large,
    release_stalled_claims,
    source_site_buffers,
)
from ccat_ops_db import models as m

__all__ = ["run_once"]


def run_once(session: Session, site: str | None = None) -> dict[str, Any]:
    """One cycle: bundle waiting packages at every source-site buffer and submit tasks.

    ``site`` scopes the cycle to the source-site buffers of that site (default: the
    setting ``MANAGER_SITE``; see :mod:`ccat_data_transfer.core.scope`)."""
    location_ids = scope.location_ids(session, site)
    target = int(settings.DATA_TRANSFER_PACKAGE_TARGET_SIZE_BYTES)
    max_wait = float(settings.DATA_TRANSFER_PACKAGE_MAX_WAIT_SECONDS)
    summary: dict[str, Any] = {
        "packages_submitted": 0,
        "packages_created": 0,
        "packages_failed": 0,
        "raw_data_packages_bundled": 0,
        "bytes_bundled": 0,
        "claims_lost": 0,
        "waiting_raw_data_packages": 0,
        "checksum_errors": [],
        "released_stalled": release_stalled_claims(session, location_ids),
        "refused_too_large": [],
    }
    now = m.utcnow()
    limit = largest_landing_capacity(session)
    for buffer in source_site_buffers(session, location_ids):
        waiting, refused = refuse_too_large(
            session, buffer, find_waiting_packages(session, buffer), limit
        )
        summary["refused_too_large"] += refused
        bundles = bundle_packages(waiting, target, max_wait, now, limit[0] if limit else None)
        summary["waiting_raw_data_packages"] += len(waiting) - sum(len(b) for b in bundles)
        session.commit()
        for ids in bundles:
            dtp_id = claim_bundle(session, buffer, ids)
            if dtp_id is None:
                summary["claims_lost"] += 1
                continue
            queue = route_task_by_location(OperationType.DATA_TRANSFER_PACKAGE_CREATION, buffer)
            skeleton.submit(summary, create_data_transfer_package, dtp_id, queue, _TOTALS)
    return summary


# Cycle summary key -> result key of a package built inline (embedded mode).
_TOTALS = {"raw_data_packages_bundled": "members", "bytes_bundled": "size_bytes"}
