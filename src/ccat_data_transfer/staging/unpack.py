"""Unpacking a fetched package at a PROCESSING location, and recording it as STAGED.

Room in the house: staging's last two steps for one package.  :func:`extract_and_verify`
unpacks the tar with :func:`~ccat_data_transfer.core.tarutil.safe_extract` and checks every
file's SHA-256 and size against its RawDataFile;
:func:`mark_package_as_staged_and_cleanup` then writes one RawDataFilePhysicalCopy
PRESENT per file, deletes the tar and marks the RawDataPackagePhysicalCopy at the
location STAGED.  Physical copy rows are never deleted; re-staging after a deletion adds
new rows.  May import: the staging finders, storage, tarutil, exceptions, logging,
``ccat_ops_db``.

Path layout at PROCESSING
-------------------------
Files lie at ``<RawDataFile.relative_path>`` under the location root (the tar's members
are exactly these paths).  The tar is placed temporarily at
``<RawDataPackage.relative_path>`` (``raw_data_packages/<instrument>/<module>/<file>``)
and removed once unpacked; the STAGED package copy records that path.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from ccat_data_transfer.core.errors import PermanentError, RetryableError
from ccat_data_transfer.core.fileio import SymlinkInPathError, parent_beneath
from ccat_data_transfer.core.logs import get_logger
from ccat_data_transfer.core.storage import DiskStorage, Storage, work_dir_prefix
from ccat_data_transfer.core.tarutil import ExtractedMember, TarUtilError, safe_extract
from ccat_data_transfer.staging.finders import FileRecord, file_copies_at, package_copies_at
from ccat_ops_db import models as m

log = get_logger(__name__)

S = m.PhysicalCopyStatus

__all__ = ["mark_package_as_staged_and_cleanup", "extract_and_verify"]


def extract_and_verify(
    storage: DiskStorage, tar_path: str, files: list[FileRecord], package_id: int
) -> list[tuple[FileRecord, ExtractedMember]]:
    """Unpack the tar and check every file; then move into place what this call made.

    The tar is extracted into a private work folder under the location root
    (``.unpack.tmp-*``, which the janitor removes if a worker dies here), never straight
    into the root: a scientist's own file, or a file of another package, that happens to
    lie at a member's path is never overwritten and never deleted.  Only when every
    recorded file came out intact is each one moved to its place; a place already taken
    by the same bytes (staged earlier) is reused, one taken by other bytes stops the
    package with a clear error and leaves that file as it is."""
    local_tar = storage.local_path(tar_path)
    assert local_tar is not None
    # Named after the package: the janitor keeps it while a staging job holding the
    # package beats (.unpack.tmp-rdp<id>-*).
    work = Path(tempfile.mkdtemp(prefix=work_dir_prefix(f"rdp{package_id}"), dir=storage.root))
    try:
        members = _extract(local_tar, work, package_id)
        pairs = _match_records(members, files, package_id)
        return [(f, _move_into_place(mem, work, storage.root, package_id)) for f, mem in pairs]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _extract(local_tar: Path, work: Path, package_id: int) -> list[ExtractedMember]:
    try:
        return safe_extract(local_tar, work, overwrite=False)
    except TarUtilError as exc:
        raise PermanentError(f"package {package_id}: cannot unpack: {exc}") from exc
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise RetryableError(f"no space left unpacking package {package_id}: {exc}") from exc
        raise


def _match_records(
    members: list[ExtractedMember], files: list[FileRecord], package_id: int
) -> list[tuple[FileRecord, ExtractedMember]]:
    """Every recorded file must be a member with its recorded SHA-256 and size, and no
    member may be unrecorded."""
    by_name = {mem.arcname: mem for mem in members}
    problems: list[str] = []
    pairs: list[tuple[FileRecord, ExtractedMember]] = []
    for f in files:
        mem = by_name.pop(f.relative_path, None)
        if mem is None:
            problems.append(f"{f.relative_path}: not in the package")
        elif mem.sha256 != f.checksum or mem.size != f.size:
            problems.append(f"{f.relative_path}: sha256/size differ from the record")
        else:
            pairs.append((f, mem))
    extra = sorted(by_name)
    if extra:
        problems.append(f"unrecorded member(s) {', '.join(extra[:5])}")
    if problems:
        log.error(
            "staging_files_mismatch",
            raw_data_package_id=package_id,
            reason="; ".join(problems[:10]),
        )
        raise PermanentError(
            f"package {package_id}: unpacked files do not match their records: "
            + "; ".join(problems[:5])
        )
    return pairs


def _move_into_place(
    member: ExtractedMember, work: Path, root: Path, package_id: int
) -> ExtractedMember:
    """Move one verified file from the work folder to its place under ``root``; never
    replaces a file that is there (the same bytes are reused).  The folders on the way are
    opened (and made) without following a symlink: a symlinked folder in the location
    never leads the file outside it (:func:`~ccat_data_transfer.core.fileio.link_beneath`)."""
    target = Path(root) / member.arcname
    placed = ExtractedMember(member.arcname, target, member.size, member.sha256)
    try:
        with parent_beneath(root, member.arcname, create=True) as (dir_fd, name):
            try:
                # link, not rename: it fails if the place is taken, never replaces it.
                os.link(member.path, name, dst_dir_fd=dir_fd, follow_symlinks=False)
            except FileExistsError:
                if _same_file_at(dir_fd, name, member.sha256):
                    return placed
                raise PermanentError(
                    f"package {package_id}: {member.arcname} already exists at the location "
                    "with other content; it was left as it is (move it away, then retry the job)"
                ) from None
            os.fsync(dir_fd)
    except SymlinkInPathError as exc:
        raise PermanentError(f"package {package_id}: cannot place {member.arcname}: {exc}") from exc
    return placed


def _same_file_at(dir_fd: int, name: str, sha256: str) -> bool:
    """Whether ``name`` in the folder ``dir_fd`` is a regular file (not a symlink) holding
    the bytes with ``sha256``."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return False  # a symlink (ELOOP) or gone
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return False
        return hashlib.file_digest(f, "sha256").hexdigest() == sha256


def _verified_copy(
    model: Any,
    status: m.PhysicalCopyStatus,
    content: tuple[str, int | None, str | None],
    at: tuple[int, datetime],
    **owner: Any,
) -> Any:
    """A new physical copy row of ``model`` for ``owner`` (the file or package):
    ``content`` is its (relative path, size, checksum), ``at`` the (location id, time) where
    and when it is created and verified."""
    location_id, now = at
    values = dict(zip(("relative_path", "size", "checksum"), content, strict=True))
    row = model(**owner, **values, status=status, data_location_id=location_id)
    row.created_at = row.verified_at = now
    return row


def mark_package_as_staged_and_cleanup(
    session: Session,
    package: m.RawDataPackage,
    location: m.DataLocation,
    storage: Storage,
    extracted: list[tuple[FileRecord, ExtractedMember]],
) -> m.RawDataPackagePhysicalCopy:
    """Record the unpacked files, delete the tar, mark the package copy STAGED.

    STAGED means "unpacked and archive removed": every RawDataFile of the package has a
    PRESENT RawDataFilePhysicalCopy at ``location`` (one per file and location, shared by
    every job that uses it), and the tar that was copied in is gone.  Existing rows are
    refreshed, missing ones added; rows are never deleted.
    """
    now = m.utcnow()
    at = (location.id, now)
    # The tar goes first: if the DB write then fails, a retry copies it again.
    storage.delete(package.relative_path)

    existing = {
        c.raw_data_file_id: c
        for c in file_copies_at(session, [f.id for f, _ in extracted], location.id, [S.PRESENT])
    }
    new_rows = []
    for record, member in extracted:
        copy = existing.get(record.id)
        if copy is not None:
            copy.verified_at = now
            continue
        content = (record.relative_path, member.size, member.sha256)
        new_rows.append(
            _verified_copy(
                m.RawDataFilePhysicalCopy, S.PRESENT, content, at, raw_data_file_id=record.id
            )
        )
    session.add_all(new_rows)

    staged = package_copies_at(session, package.id, location.id, [S.STAGED, S.PRESENT])
    if staged:
        package_copy = staged[0]
        package_copy.status = S.STAGED
        package_copy.verified_at = now
    else:
        content = (package.relative_path, package.size, package.checksum)
        package_copy = _verified_copy(
            m.RawDataPackagePhysicalCopy, S.STAGED, content, at, raw_data_package_id=package.id
        )
        session.add(package_copy)
    session.flush()
    log.info(
        "package_marked_staged",
        physical_copy_id=package_copy.id,
        copy_type="raw_data_package",
        raw_data_package_id=package.id,
        location=location.name,
        size_bytes=package.size,
        files_recorded=len(new_rows),
        files_reused=len(existing),
    )
    return package_copy
