"""Stage 1's manager cycle: ``run_once`` of the raw data package manager.

One cycle releases stalled claims, plans complete groups
(:mod:`~ccat_data_transfer.packaging.raw_groups`), claims each part
(:func:`~ccat_data_transfer.packaging.raw_packages.claim_package`) and submits
:func:`~ccat_data_transfer.packaging.tasks.create_raw_data_package` on the source's queue
(in-process in embedded mode, its result folded into the summary).

Room in the house: stage packaging (cycle).  Imports the packaging modules, core and
:mod:`ccat_ops_db`.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from ccat_data_transfer.core import scope
from ccat_data_transfer.core.logs import get_logger
from ccat_data_transfer.core.operation_types import OperationType
from ccat_data_transfer.core.queues import route_task_by_location
from ccat_data_transfer.packaging import skeleton
from ccat_data_transfer.packaging.raw_packages import (
    claim_package,
    plan_packages,
    release_stalled_claims,
)
from ccat_data_transfer.packaging.tasks import create_raw_data_package
from ccat_ops_db import models as m

log = get_logger("ccat_data_transfer.packaging.raw_packages")

__all__ = ["run_once"]


def run_once(session: Session, site: str | None = None) -> dict[str, Any]:
    """One cycle: release stalled claims, plan, claim, submit.  Returns a summary.

    ``site`` scopes the cycle to raw files whose SOURCE location is at that site (default:
    the setting ``MANAGER_SITE``; see :mod:`ccat_data_transfer.core.scope`)."""
    location_ids = scope.location_ids(session, site)
    summary: dict[str, Any] = {
        "packages_submitted": 0,
        "packages_created": 0,
        "packages_failed": 0,
        "files_packaged": 0,
        "bytes_packaged": 0,
        "claims_lost": 0,
        "waiting_groups": 0,
        "blocked_groups": 0,
        "paused_sites": [],
        "checksum_errors": [],
        "released_stalled": release_stalled_claims(session, location_ids),
    }
    plans = plan_packages(session, summary, location_ids)
    session.commit()
    for plan in plans:
        for part in plan.parts:
            pkg_id = claim_package(session, plan, part)
            if pkg_id is None:
                summary["claims_lost"] += 1
                continue
            source = session.get(m.DataLocation, plan.source_location_id)
            assert source is not None
            queue = route_task_by_location(OperationType.RAW_DATA_PACKAGE_CREATION, source)
            session.commit()
            skeleton.submit(summary, create_raw_data_package, pkg_id, queue, _TOTALS)
    if summary["checksum_errors"]:
        log.error(
            "raw_data_files_checksum_mismatch",
            count=len(summary["checksum_errors"]),
            files=[e["relative_path"] for e in summary["checksum_errors"]][:50],
        )
    return summary


# Cycle summary key -> result key of a package built inline (embedded mode).
_TOTALS = {"files_packaged": "files", "bytes_packaged": "size_bytes"}
