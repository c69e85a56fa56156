"""Janitor: removes the temporary names that killed writes leave behind.

Every write goes to a temporary name first (``.name.tmp-<hex>`` files, ``.unpack.tmp-*``
work directories of an unpack, unfinished S3 multipart uploads) and is renamed (or
completed) only when whole.  A worker killed mid-write leaves the temporary name forever,
and :meth:`~ccat_data_transfer.core.storage.Storage.list` does not show it (so neither do the
buffer measurement nor the audit's dark data).  The janitor removes such a leftover once
nothing has changed in it for JANITOR_MIN_AGE_SECONDS (longer than any write's heartbeat
window, so a write in progress, whose file keeps changing, is never touched).  It never
touches a name that is not temporary: the storage backends refuse one.  Each removal is
logged (``janitor_removed``: location, path, size, age) and the bytes freed reported.

The buffer manager runs :func:`sweep` for its own site's locations (every
JANITOR_MIN_AGE_SECONDS / 6 in its loop), where its workers write; ``audit`` lists the
leftovers as their own category (:func:`leftovers`).  Not covered: the temporary
directories an unpack makes in the system temp folder when a buffer is not a local disk
(``ccat-unpack-*``; the operating system's temp cleaning owns those).

Room in the house: core (storage effects on a location).  Imports storage, config,
logging and ``ccat_ops_db``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from ccat_data_transfer.core.config import settings
from ccat_data_transfer.core.logs import get_logger
from ccat_data_transfer.core.storage import StorageError, storage_for_location
from ccat_ops_db import models as m

log = get_logger(__name__)

__all__ = ["leftovers", "min_age_seconds", "sweep", "sweep_location", "sweep_storage"]


def min_age_seconds() -> float:
    return float(settings.get("JANITOR_MIN_AGE_SECONDS", 21600))


def leftovers(storage: Any, now: float | None = None) -> list[dict[str, Any]]:
    """Every temporary name in ``storage`` with its size and age (seconds since its last
    change), oldest first; ``removable`` when older than JANITOR_MIN_AGE_SECONDS."""
    lister = getattr(storage, "list_temporary", None)
    if lister is None:
        return []
    now = time.time() if now is None else now
    limit = min_age_seconds()
    found = [
        {
            "path": info.path,
            "size": int(info.size),
            "age_seconds": round(now - info.mtime, 1),
            "removable": now - info.mtime >= limit,
        }
        for info in lister()
    ]
    return sorted(found, key=lambda x: -x["age_seconds"])


def sweep_location(location: m.DataLocation, now: float | None = None) -> dict[str, Any]:
    """Remove the location's temporary leftovers older than the limit; returns
    ``{"removed": n, "bytes_freed": b, "kept_young": k}`` (or ``error``)."""
    try:
        storage = storage_for_location(location)
    except StorageError as exc:
        log.warning("janitor_storage_unreachable", location=location.name, error=str(exc))
        return {"removed": 0, "bytes_freed": 0, "kept_young": 0, "error": str(exc)}
    return sweep_storage(location.name, storage, now)


def sweep_storage(location_name: str, storage: Any, now: float | None = None) -> dict[str, Any]:
    """:func:`sweep_location` on an opened storage (logged under ``location_name``)."""
    result: dict[str, Any] = {"removed": 0, "bytes_freed": 0, "kept_young": 0}
    try:
        found = leftovers(storage, now)
    except StorageError as exc:
        log.warning("janitor_storage_unreachable", location=location_name, error=str(exc))
        return {**result, "error": str(exc)}
    for item in found:
        if not item["removable"]:
            result["kept_young"] += 1  # a write that may still be in progress
            continue
        try:
            freed = storage.remove_temporary(item["path"])
        except (StorageError, OSError) as exc:
            log.error(
                "janitor_remove_failed", location=location_name, path=item["path"], error=str(exc)
            )
            continue
        result["removed"] += 1
        result["bytes_freed"] += freed
        log.info(
            "janitor_removed",
            location=location_name,
            path=item["path"],
            size_bytes=freed,
            age_seconds=item["age_seconds"],
        )
    if result["removed"]:
        log.info("janitor_swept", location=location_name, **result)
    return result


def sweep(locations: Iterable[m.DataLocation], now: float | None = None) -> dict[str, Any]:
    """:func:`sweep_location` for every DISK and S3 location given: ``{name: result}``."""
    return {
        loc.name: sweep_location(loc, now)
        for loc in locations
        if loc.storage_type in (m.StorageType.DISK, m.StorageType.S3)
    }
