"""Janitor: removes the temporary names that killed writes leave behind.

Every write goes to a temporary name first (``.name.tmp-<hex>`` files, ``.unpack.tmp-*``
work directories of an unpack, unfinished S3 multipart uploads) and is renamed (or
completed) only when whole.  A worker killed mid-write leaves the temporary name forever,
and :meth:`~ccat_data_transfer.core.storage.Storage.list` does not show it (so neither do the
buffer measurement nor the audit's dark data).

The rule: the janitor removes a leftover once nothing has changed in it for
JANITOR_MIN_AGE_SECONDS, and never removes a path the database knows (:func:`db_keeper`):

* a copy: the path is, or holds under it, the ``relative_path`` of a physical copy at that
  location in any status but DELETED, or of a raw file filed at that (SOURCE) location;
* live work: the path is a temporary name of the file that a row in progress with a
  fresh heartbeat (:func:`ccat_data_transfer.core.liveness.stopped` not true) is writing
  (a package being built, a transfer, an archive move, a staging job), or the work folder
  (``.unpack.tmp-<tag>-*``) of a live unpack.

It never touches a name that is not temporary: the storage backends refuse one.  Each
removal is logged (``janitor_removed``: location, path, size, age), each leftover kept by
the database too (``janitor_kept``: location, path, reason), and the bytes freed reported.

The buffer manager runs :func:`sweep` for its own site's locations (every
JANITOR_MIN_AGE_SECONDS / 6 in its loop), where its workers write; ``audit`` lists the
leftovers as their own category (:func:`leftovers`).  Not covered: the temporary
directories an unpack makes in the system temp folder when a buffer is not a local disk
(``ccat-unpack-*``; the operating system's temp cleaning owns those).

Room in the house: the buffers stage (storage effects on a location).  Imports storage,
config, liveness, logging and ``ccat_ops_db``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, object_session

from ccat_data_transfer.core.config import settings
from ccat_data_transfer.core.database import DatabaseConnection
from ccat_data_transfer.core.fileio import TEMP_MARK
from ccat_data_transfer.core.liveness import stalled_before, stopped
from ccat_data_transfer.core.logs import get_logger
from ccat_data_transfer.core.storage import (
    StorageError,
    storage_for_location,
    temporary_prefix,
    upload_key,
    work_dir_prefix,
)
from ccat_ops_db import models as m

log = get_logger(__name__)

__all__ = [
    "Keeper",
    "db_keeper",
    "leftovers",
    "live_work",
    "min_age_seconds",
    "sweep",
    "sweep_location",
    "sweep_storage",
]

#: Says why the database keeps a leftover path (a reason a person reads), or None.
Keeper = Callable[[str], "str | None"]


def min_age_seconds() -> float:
    return float(settings.get("JANITOR_MIN_AGE_SECONDS", 21600))


def live_work(session: Session) -> tuple[set[str], set[str]]:
    """What the rows in progress with a fresh heartbeat are writing: the final paths
    whose temporary names they hold, and the name prefixes of their unpack work folders.
    A handful of rows (work running now), read in a few small queries."""
    fresh = stalled_before()  # the stall rule's bound, computed once

    def beats(column: Any) -> Any:
        return ~stopped(column, before=fresh)  # NULL (never started) is not live

    targets: set[str] = set()
    folders: set[str] = set()
    dt, dtp, rdp = m.DataTransfer, m.DataTransferPackage, m.RawDataPackage
    targets.update(
        session.scalars(
            select(dtp.relative_path)
            .join(dt, dt.data_transfer_package_id == dtp.id)
            .where(dt.status == m.Status.IN_PROGRESS, beats(dt.updated_at))
        )
    )
    for transfer_id, path in session.execute(
        select(dt.id, rdp.relative_path)
        .outerjoin(rdp, rdp.data_transfer_package_id == dt.data_transfer_package_id)
        .where(dt.unpack_status == m.Status.IN_PROGRESS, beats(dt.updated_at))
    ):
        folders.add(work_dir_prefix(f"dt{transfer_id}"))
        if path is not None:
            targets.add(path)
    lta = m.LongTermArchiveTransfer
    targets.update(
        session.scalars(
            select(rdp.relative_path)
            .join(lta, lta.raw_data_package_id == rdp.id)
            .where(lta.status == m.Status.IN_PROGRESS, beats(lta.updated_at))
        )
    )
    for model in (rdp, dtp):
        targets.update(
            session.scalars(
                select(model.relative_path).where(
                    model.status == m.Status.IN_PROGRESS, beats(model.heartbeat_at)
                )
            )
        )
    sj, link = m.StagingJob, m.staging_job_raw_data_package
    for package_id, path in session.execute(
        select(rdp.id, rdp.relative_path)
        .join(link, link.c.raw_data_package_id == rdp.id)
        .join(sj, sj.id == link.c.staging_job_id)
        .where(sj.status == m.Status.IN_PROGRESS, beats(sj.heartbeat_at))
    ):
        folders.add(work_dir_prefix(f"rdp{package_id}"))
        targets.add(path)
    return {t for t in targets if t}, folders


def _known_temporary_paths(session: Session, location_id: int) -> set[str]:
    """The paths at the location, of copies (any status but DELETED) and of raw files
    filed there, that hold ``.tmp-``: the only ones that can be, or lie under, a
    temporary name (filing refuses such paths now; older rows may hold them).  One pass
    per sweep of a location, and only when it has leftovers."""
    pc, rdf = m.PhysicalCopy, m.RawDataFile
    copies = select(pc.relative_path).where(
        pc.data_location_id == location_id,
        pc.status != m.PhysicalCopyStatus.DELETED,
        pc.relative_path.contains(TEMP_MARK, autoescape=True),
    )
    filed = select(rdf.relative_path).where(
        rdf.source_location_id == location_id,
        rdf.relative_path.contains(TEMP_MARK, autoescape=True),
    )
    return {p for p in session.scalars(copies.union(filed)) if p}


def db_keeper(session: Session, location: m.DataLocation) -> Keeper:
    """The database's side of the rule (module docstring) for one location: a function
    that says why a leftover path must stay, or None when only its age decides."""
    targets, folders = live_work(session)
    prefixes = tuple(temporary_prefix(t) for t in targets)
    location_id = location.id
    known: set[str] | None = None

    def keep(path: str) -> str | None:
        nonlocal known
        final = upload_key(path)  # an S3 upload's object; a disk name as it is
        if final in targets or final.startswith(prefixes):
            return "live work: a row in progress with a fresh heartbeat writes it"
        if "/" not in path and path.startswith(tuple(folders)):
            return "live work: the work folder of an unpack in progress"
        if known is None:
            known = _known_temporary_paths(session, location_id)
        under = path + "/"
        if any(k == path or k.startswith(under) for k in known):
            return "a copy or a filed raw file at this location lies there"
        return None

    return keep


def leftovers(
    storage: Any, now: float | None = None, keep: Keeper | None = None
) -> list[dict[str, Any]]:
    """Every temporary name in ``storage`` with its size and age (seconds since its last
    change), oldest first; ``removable`` when older than JANITOR_MIN_AGE_SECONDS and not
    kept by ``keep`` (the database's knowledge, :func:`db_keeper`), whose reason is then
    given as ``kept``."""
    lister = getattr(storage, "list_temporary", None)
    if lister is None:
        return []
    now = time.time() if now is None else now
    limit = min_age_seconds()
    found = []
    for info in lister():
        item: dict[str, Any] = {
            "path": info.path,
            "size": int(info.size),
            "age_seconds": round(now - info.mtime, 1),
            "removable": now - info.mtime >= limit,
        }
        reason = keep(info.path) if keep is not None else None
        if reason:
            item["removable"] = False
            item["kept"] = reason
        found.append(item)
    return sorted(found, key=lambda x: -x["age_seconds"])


def sweep_location(
    location: m.DataLocation, now: float | None = None, session: Session | None = None
) -> dict[str, Any]:
    """Remove the location's temporary leftovers older than the limit that the database
    does not keep (:func:`db_keeper`, asked through ``session``, else the location's own
    session, else a new one); returns ``{"removed": n, "bytes_freed": b, "kept_young": k}``
    (or ``error``), with ``kept_known`` when the database kept any."""
    try:
        storage = storage_for_location(location)
    except StorageError as exc:
        log.warning("janitor_storage_unreachable", location=location.name, error=str(exc))
        return {"removed": 0, "bytes_freed": 0, "kept_young": 0, "error": str(exc)}
    session = session or object_session(location)
    if session is not None:
        return sweep_storage(location.name, storage, now, db_keeper(session, location))
    with DatabaseConnection().session_scope() as own:
        here = own.get(m.DataLocation, location.id)
        assert here is not None
        return sweep_storage(location.name, storage, now, db_keeper(own, here))


def sweep_storage(
    location_name: str, storage: Any, now: float | None = None, keep: Keeper | None = None
) -> dict[str, Any]:
    """:func:`sweep_location` on an opened storage (logged under ``location_name``);
    ``keep`` is the database's knowledge of the location (:func:`db_keeper`)."""
    result: dict[str, Any] = {"removed": 0, "bytes_freed": 0, "kept_young": 0}
    try:
        found = leftovers(storage, now, keep)
    except StorageError as exc:
        log.warning("janitor_storage_unreachable", location=location_name, error=str(exc))
        return {**result, "error": str(exc)}
    for item in found:
        if item.get("kept"):
            result["kept_known"] = result.get("kept_known", 0) + 1
            log.info("janitor_kept", location=location_name, path=item["path"], reason=item["kept"])
            continue
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


def sweep(
    locations: Iterable[m.DataLocation], now: float | None = None, session: Session | None = None
) -> dict[str, Any]:
    """:func:`sweep_location` for every DISK and S3 location given: ``{name: result}``."""
    return {
        loc.name: sweep_location(loc, now, session)
        for loc in locations
        if loc.storage_type in (m.StorageType.DISK, m.StorageType.S3)
    }
