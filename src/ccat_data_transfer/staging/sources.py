"""Fetching a package from a long-term archive: which LTA copy, and a verified copy.

Room in the house: the storage side of staging's first step.  :func:`select_lta_copies`
orders the candidates; :func:`copy_from_best_lta` streams the tar from the first that
works into the PROCESSING location while hashing it, and moves on when one is down,
lacks the object or is corrupt.  An LTA on another host is pulled by rsync over ssh
(:func:`pull_verified`) and hashed here, where the bytes landed.  May import: the
staging finders, storage, hosts, transfer methods, config, database, exceptions,
logging, ``ccat_ops_db``.

LTA copy selection order
------------------------
Only PRESENT, not lost copies at active LONG_TERM_ARCHIVE locations are candidates,
ordered by: 1. the destination's own site first, 2. the order of the setting
``STAGING_PREFERRED_SITES`` (site names or short names; unlisted sites after),
3. ``DataLocation.priority`` (lower first), 4. location name.  Reachability is found out by
trying: the next candidate is used when one is down, lacks the object or is corrupt.

A checksum mismatch is logged as ``staging_source_corrupt`` and recorded as the fixity
scan records a bad copy (``archive.proof.record_bad_bytes``: the copy is marked lost, an
``archive_event`` CORRUPT, its repair queued); a missing object likewise
(``staging_source_missing``, MISSING).  Every candidate
unreachable is retryable; every candidate missing or corrupt is permanent.
"""

from __future__ import annotations

import hashlib
import tempfile
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_data_transfer.archive.proof import CORRUPT, MISSING, record_bad_bytes
from ccat_data_transfer.core.config import settings
from ccat_data_transfer.core.database import DatabaseConnection
from ccat_data_transfer.core.errors import CcatError, PermanentError, RetryableError
from ccat_data_transfer.core.hosts import SiteReach, reach_of
from ccat_data_transfer.core.logs import get_logger
from ccat_data_transfer.core.storage import (
    CHUNK_SIZE,
    ObjectNotFound,
    Storage,
    StorageError,
    StorageFullError,
    StorageUnavailableError,
    storage_for_location,
)
from ccat_data_transfer.core.transfer_methods import get_transfer_method
from ccat_data_transfer.staging.finders import usable_lta_copy
from ccat_ops_db import models as m

log = get_logger(__name__)

__all__ = [
    "CorruptCopy",
    "Source",
    "copy_from_best_lta",
    "copy_verified",
    "pull_verified",
    "select_lta_copies",
]


@dataclass(frozen=True)
class Source:
    """One candidate LTA copy of a package, as plain data (read in one session, used
    after it)."""

    copy_id: int
    location_id: int
    location_name: str
    relative_path: str


class CorruptCopy(CcatError):
    """The bytes copied do not match the package's checksum or size."""


def _preferred_sites() -> list[str]:
    value = settings.get("STAGING_PREFERRED_SITES", []) or []
    if isinstance(value, str):
        value = [v for v in value.split(",")]
    return [str(v).strip().lower() for v in value if str(v).strip()]


def select_lta_copies(
    session: Session, package: m.RawDataPackage, destination: m.DataLocation | None = None
) -> list[m.RawDataPackagePhysicalCopy]:
    """The usable LTA copies of ``package``, best first (see the module's selection order)."""
    PC = m.RawDataPackagePhysicalCopy
    copies = session.scalars(
        select(PC)
        .join(m.DataLocation, m.DataLocation.id == PC.data_location_id)
        .where(PC.raw_data_package_id == package.id, *usable_lta_copy(PC, m.DataLocation))
    ).all()
    preferred = _preferred_sites()

    def rank(copy: m.RawDataPackagePhysicalCopy) -> tuple[int, int, int, str, int]:
        loc = copy.data_location
        own = 0 if destination is not None and loc.site_id == destination.site_id else 1
        names = (loc.site.name.lower(), loc.site.short_name.lower())
        pref = next((i for i, s in enumerate(preferred) if s in names), len(preferred))
        return (own, pref, loc.priority or 0, loc.name, copy.id)

    return sorted(copies, key=rank)


def copy_from_best_lta(
    db: DatabaseConnection,
    package_id: int,
    sources: list[Source],
    dest_storage: Storage,
    tar_path: str,
    checksum: str,
    size: int,
    dest_name: str,
    dest_location_id: int | None = None,
    *,
    attempt: str | None = None,
    holding: Callable[[], AbstractContextManager[Any]] = nullcontext,
) -> Source:
    """Copy the tar from the first LTA copy that is reachable, present and correct.  An
    LTA on another host (its site declares a ``host``) is pulled over ssh by rsync, as
    this worker (the staging destination's site) and verified here, where the bytes
    landed."""
    unreachable: list[str] = []
    bad: list[str] = []
    for src in sources:
        try:
            with db.session_scope() as s:
                location = s.get(m.DataLocation, src.location_id)
                src_storage = storage_for_location(location)
                dest = s.get(m.DataLocation, dest_location_id) if dest_location_id else None
                reach = reach_of(location, dest.site_id) if dest is not None else None
            if reach is None:
                copy_verified(
                    src_storage, src.relative_path, dest_storage, tar_path, checksum, size
                )
            else:
                pull_verified(
                    reach,
                    src_storage,
                    src.relative_path,
                    dest_storage,
                    tar_path,
                    checksum,
                    size,
                    attempt=attempt or uuid.uuid4().hex,
                    holding=holding,
                )
            return src
        except RetryableError as exc:  # the other host did not answer or rsync failed
            unreachable.append(f"{src.location_name}: {exc}")
            _source_problem(db, package_id, src, "staging_source_unavailable", None, exc)
        except StorageFullError as exc:
            raise RetryableError(f"PROCESSING location {dest_name} is full: {exc}") from exc
        except ObjectNotFound as exc:
            bad.append(f"{src.location_name}: missing")
            _source_problem(db, package_id, src, "staging_source_missing", "missing", exc)
        except CorruptCopy as exc:
            bad.append(f"{src.location_name}: {exc}")
            _source_problem(db, package_id, src, "staging_source_corrupt", "corrupt", exc)
        except (StorageUnavailableError, StorageError, OSError) as exc:
            unreachable.append(f"{src.location_name}: {exc}")
            _source_problem(db, package_id, src, "staging_source_unavailable", None, exc)
    if unreachable:
        raise RetryableError(
            f"package {package_id}: no long-term archive copy could be read "
            f"({'; '.join(unreachable + bad)})"
        )
    raise PermanentError(
        f"package {package_id}: every long-term archive copy is missing or corrupt "
        f"({'; '.join(bad)})"
    )


def _source_problem(
    db: DatabaseConnection,
    package_id: int,
    src: Source,
    event: str,
    noted_as: str | None,
    exc: BaseException,
) -> None:
    """Log why ``src`` could not serve (an error for a corrupt copy, else a warning) and,
    for a copy that is ``missing`` or ``corrupt`` (``noted_as``), note it on the copy's
    ``last_error``.  An unreachable archive says nothing about the copy itself."""
    level = log.error if noted_as == "corrupt" else log.warning
    level(
        event,
        raw_data_package_id=package_id,
        physical_copy_id=src.copy_id,
        location=src.location_name,
        reason=str(exc),
    )
    if noted_as is None:
        return
    # The same finding as the fixity scan's: the copy is marked lost (no deletion rule
    # counts it any more), an archive_event says so, and its repair is queued.
    with db.session_scope() as s:
        record_bad_bytes(
            s,
            src.copy_id,
            "staging",
            f"{noted_as} when staging from {src.location_name}: {exc}",
            outcome=CORRUPT if noted_as == "corrupt" else MISSING,
        )


def pull_verified(
    reach: SiteReach,
    src: Storage,
    src_path: str,
    dst: Storage,
    dst_path: str,
    checksum: str,
    size: int,
    *,
    attempt: str,
    holding: Callable[[], AbstractContextManager[Any]] = nullcontext,
) -> None:
    """rsync ``src_path`` from the host of ``reach`` to the temporary name of ``attempt``
    (the holder of the package's staging lock), resuming from an earlier partial it
    adopts (one as long as the source or longer is dropped: it is stale), then hash it
    here, at the temporary name; only verified bytes are renamed to ``dst_path``, a
    mismatch removes them.  ``holding()`` wraps the irreversible steps (adopting an
    earlier partial, the rename into place): they run only while the attempt holds the
    package's staging lock."""
    log_dir = Path(str(settings.get("TRANSFER_LOG_DIR", "") or "") or tempfile.gettempdir())
    log_dir.mkdir(parents=True, exist_ok=True)
    method = get_transfer_method(m.TransferMethod.RSYNC)
    temp = method.temp_name(dst, dst_path, attempt)
    with open(log_dir / "staging_pulls.log", "a", encoding="utf-8") as lf:
        with holding():
            method.adopt(dst, dst_path, attempt, lf)
        method.land(src, src_path, dst, dst_path, lf, attempt=attempt, size=size, src_host=reach)
        digest = dst.sha256(temp)
        info = dst.stat(temp)
        written = info.size if info else 0
        if digest == checksum and (not size or written == size):
            with holding():
                method.place(dst, dst_path, attempt, lf)
            return
    dst.delete(temp)
    raise CorruptCopy(
        f"checksum mismatch after pulling from {reach.label} ({written} bytes, "
        f"sha256 {digest[:16]}..., expected {checksum[:16]}... / {size} bytes)"
    )


def copy_verified(
    src: Storage, src_path: str, dst: Storage, dst_path: str, checksum: str, size: int
) -> None:
    """Stream ``src_path`` to ``dst_path`` while hashing; a mismatch removes the copy."""
    h = hashlib.sha256()
    written = 0
    buf = bytearray(CHUNK_SIZE)
    mv = memoryview(buf)
    with src.open_read(src_path) as r, dst.open_write(dst_path) as w:
        readinto = getattr(r, "readinto", None)
        while True:
            if readinto is not None:
                n = readinto(mv)
                data: Any = mv[:n]
            else:
                data = r.read(CHUNK_SIZE)
                n = len(data)
            if not n:
                break
            h.update(data)
            w.write(data)
            written += n
    digest = h.hexdigest()
    if digest != checksum or (size and written != size):
        dst.delete(dst_path)
        raise CorruptCopy(
            f"checksum mismatch after copying ({written} bytes, sha256 {digest[:16]}..., "
            f"expected {checksum[:16]}... / {size} bytes)"
        )
