"""The claim / build / release skeleton both packaging stages share.

Stage 1 (:mod:`ccat_data_transfer.packaging.raw_packages`) tars raw files into a
RawDataPackage; stage 2 (:mod:`ccat_data_transfer.packaging.transfer_packages`) tars
RawDataPackages into a DataTransferPackage.  Both follow the same steps, stated once here
and described for each stage by a :class:`PackageKind`:

1. **claim** (manager, :func:`claim_members`): insert the package row SCHEDULED, then
   ``UPDATE <member> SET <fk> = :package WHERE id IN (...) AND <fk> IS NULL``; a short row
   count means another manager got there first, and the claim is rolled back;
2. **start** (task, :func:`run_task`): SCHEDULED -> IN_PROGRESS in one conditional
   UPDATE, so a second delivery of the task does nothing;
3. **build** (:func:`load_work`, :func:`write_tar`): check every member where the package
   is built, write the tar in one read pass through the atomic ``Storage.open_write``,
   every member's checksum verified on the way; a mismatch writes nothing;
4. **record** (:func:`record_built`): the package row becomes built (only if still
   IN_PROGRESS) and gets a PRESENT physical copy;

   The start writes a fresh attempt token on the row (``attempt_id``); the rename of the
   tar into place, the record and any cleanup of the package's path run only while that
   attempt still owns the row (:mod:`ccat_data_transfer.core.attempts`).  A released
   claim frees the package's part number and path for another build: a stalled-but-alive
   build that wakes up then renames, records and removes nothing, so it cannot clean up
   what is by then another build's recorded copy;
5. **release** (:func:`release_claim`): on a mismatch the bad members are flagged
   (:func:`fail_members`, what "flagged" means is the stage's), on any other failure, and
   for started builds whose heartbeat stopped (:func:`release_stalled_claims`; a build
   stamps ``heartbeat_at`` every HEARTBEAT_SECONDS while it runs, see
   :mod:`ccat_data_transfer.core.liveness`), the members are un-claimed and the row removed, so
   nothing half-done is recorded.  A claim still queued is never released: its task is
   sent again when it waited longer than QUEUED_RESEND_SECONDS.

What is the stage's own stays in its module: the rule that forms packages, the package
row's fields, where the built tar goes, and how a bad member is flagged.

Room in the house: tasks/core.  Imports core (storage, tarutil, config, scope) and
:mod:`ccat_ops_db`; imported by the two packaging managers only.
"""

from __future__ import annotations

import enum
import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import ColumnElement, Select, delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ccat_data_transfer.core import scope
from ccat_data_transfer.core.attempts import (
    AttemptSuperseded,
    exit_owned,
    new_attempt,
    owned_step,
)
from ccat_data_transfer.core.database import DatabaseConnection
from ccat_data_transfer.core.errors import CcatError, NotFoundError
from ccat_data_transfer.core.fileio import temporary_component
from ccat_data_transfer.core.liveness import beating, resend_all, stopped, waited_in_queue
from ccat_data_transfer.core.operation_types import OperationType
from ccat_data_transfer.core.queues import route_task_by_location
from ccat_data_transfer.core.row_tasks import merge_inline_package_result, start_scheduled
from ccat_data_transfer.core.shared_rows import present_copy
from ccat_data_transfer.core.storage import Storage, StorageError, storage_for_location
from ccat_data_transfer.core.tarutil import (
    TarMember,
    TarResult,
    TarSourceChangedError,
    write_tar_with_checksums,
)
from ccat_ops_db import models as m

__all__ = [
    "ClaimLost",
    "MemberMismatch",
    "PackageKind",
    "Work",
    "claim_members",
    "fail_members",
    "load_work",
    "record_built",
    "release_claim",
    "release_stalled_claims",
    "report_built",
    "resend_queued_builds",
    "run_task",
    "submit",
    "write_tar",
]


@dataclass(frozen=True)
class PackageKind:
    """What the skeleton needs to know about one kind of package."""

    package_model: Any  # the package row (RawDataPackage, DataTransferPackage)
    member_model: Any  # what goes into it (RawDataFile, RawDataPackage)
    member_fk: str  # the member column naming its package
    member_order: tuple[Any, ...]  # order of the members in the tar
    copy_model: Any  # the physical copy row of a built package
    copy_fk: str  # the copy column naming its package
    location_attr: str  # the package's relationship to the location it is built at
    label: str  # "raw data package", in messages
    members_word: str  # "files", in "... has no files"
    id_key: str  # key of the package id in task results and log events
    event: str  # prefix of the log events ("raw_data_package")
    log: Any  # the stage's logger
    stalled: Select[Any]  # ids of unbuilt claims (SCHEDULED / IN_PROGRESS, no copy)
    stalled_scope: Any  # location column that scopes ``stalled`` to a site
    task: str  # name of the build task (sent again when its message was lost)
    operation: OperationType  # queue of the build task, at the package's location
    # Messages, format strings over {location} (and {actual}, {recorded}, {expected}):
    not_local: str
    missing: str
    wrong_size: str
    bad_checksum: str
    # A member changing while read fails the task as StorageError with this message
    # (over {exc}); None lets TarSourceChangedError itself fail it.
    source_changed: str | None = None
    log_skips: bool = False  # log a task delivery that finds its package not SCHEDULED

    def member_fk_column(self) -> Any:
        return getattr(self.member_model, self.member_fk)


class MemberMismatch(CcatError):
    """Members whose bytes do not match their record: ``(relative_path, reason)``."""

    def __init__(self, mismatches: list[tuple[str, str]]) -> None:
        super().__init__(f"{len(mismatches)} members do not match their recorded checksum")
        self.mismatches = mismatches


class ClaimLost(enum.Enum):
    """Why :func:`claim_members` claimed nothing."""

    MEMBERS_TAKEN = "members claimed by another manager"
    NAME_TAKEN = "package name taken by another manager"


# ---------------------------------------------------------------------------------------
# Claim and release (manager side)
# ---------------------------------------------------------------------------------------


def claim_members(
    session: Session,
    kind: PackageKind,
    package: Any,
    member_ids: Sequence[Any],
    *conditions: ColumnElement[bool],
) -> int | ClaimLost:
    """Insert ``package`` (a new SCHEDULED row) owning ``member_ids`` and COMMIT; returns
    its id, or why nothing changed.  ``conditions`` further restrict the members."""
    members = kind.member_model
    fk = kind.member_fk_column()
    try:
        session.add(package)
        session.flush()
        claimed = session.execute(
            update(members)
            .where(members.id.in_(list(member_ids)), fk.is_(None), *conditions)
            .values({kind.member_fk: package.id})
            .execution_options(synchronize_session=False)
        ).rowcount
        if claimed != len(member_ids):
            session.rollback()
            return ClaimLost.MEMBERS_TAKEN
        session.commit()
    except IntegrityError:
        session.rollback()
        return ClaimLost.NAME_TAKEN
    return package.id


def release_claim(
    session: Session,
    kind: PackageKind,
    package_id: int,
    expected: Sequence[m.Status] = (m.Status.IN_PROGRESS,),
) -> bool:
    """Un-claim the members of an unfinished package (status in ``expected``) and remove
    its row; False if it is in another state.  Does not commit."""
    model = kind.package_model
    gone = session.execute(
        update(model)
        .where(model.id == package_id, model.status.in_(list(expected)))
        .values(status=m.Status.FAILED)
        .execution_options(synchronize_session=False)
    ).rowcount
    if not gone:
        return False
    session.execute(
        update(kind.member_model)
        .where(kind.member_fk_column() == package_id)
        .values({kind.member_fk: None})
        .execution_options(synchronize_session=False)
    )
    session.execute(
        delete(model).where(model.id == package_id).execution_options(synchronize_session=False)
    )
    return True


def stalled_builds(kind: PackageKind, older_than: timedelta | None = None) -> Select[Any]:
    """Ids of ``kind``'s claims whose build STARTED and whose heartbeat stopped
    (:func:`ccat_data_transfer.core.liveness.stopped`; ``older_than`` overrides the window)."""
    model = kind.package_model
    return kind.stalled.where(
        model.status == m.Status.IN_PROGRESS,
        stopped(func.coalesce(model.heartbeat_at, model.created_at), window=older_than),
    )


def release_stalled_claims(
    session: Session,
    kind: PackageKind,
    location_ids: list[int] | None = None,
    older_than: timedelta | None = None,
    resend: bool = True,
) -> int:
    """Release the claims of ``kind.stalled`` whose build STARTED and whose heartbeat
    stopped (:func:`ccat_data_transfer.core.liveness.stopped`; ``older_than`` overrides the
    window), within ``location_ids`` if given: a worker died.  A build still running is
    never released, however long it takes.  Claims still queued are not released either:
    their task is sent again (:func:`resend_queued_builds`; ``resend=False`` leaves that
    to the caller, the recovery service's own step).  Commits; returns how many were
    released."""
    started = stalled_builds(kind, older_than)
    ids = session.scalars(scope.restrict(started, kind.stalled_scope, location_ids)).all()
    released = 0
    for package_id in ids:
        if release_claim(session, kind, package_id, (m.Status.IN_PROGRESS,)):
            released += 1
            kind.log.warning(
                f"{kind.event}_claim_released", **{kind.id_key: package_id}, reason="stalled"
            )
    session.commit()
    if resend:
        resend_queued_builds(session, kind, location_ids)
    return released


def resend_queued_builds(
    session: Session, kind: PackageKind, location_ids: list[int] | None = None
) -> int:
    """Send the build task again for claims still queued (SCHEDULED) whose task was sent
    longer than QUEUED_RESEND_SECONDS ago (the broker may have lost it); ``heartbeat_at``
    (the time it was sent) is stamped only after the send went out, and a failing send
    does not stop the others (:func:`~ccat_data_transfer.core.liveness.resend_all`).  A
    duplicate delivery does nothing (:func:`run_task` starts the build with a conditional
    UPDATE).  Commits; returns how many were sent again."""
    model = kind.package_model
    queued = kind.stalled.where(
        model.status == m.Status.SCHEDULED,
        waited_in_queue(func.coalesce(model.heartbeat_at, model.created_at)),
    )
    ids = session.scalars(scope.restrict(queued, kind.stalled_scope, location_ids)).all()
    sends: list[tuple[str, int, str]] = []
    for package_id in ids:
        location = getattr(session.get(model, package_id), kind.location_attr)
        if location is not None:
            sends.append((kind.task, package_id, route_task_by_location(kind.operation, location)))
    session.commit()  # end the read transaction before talking to the broker

    def stamp(_task: str, package_id: int, queue: str) -> None:
        session.execute(
            update(model)
            .where(model.id == package_id, model.status == m.Status.SCHEDULED)
            .values(heartbeat_at=m.utcnow())
            .execution_options(synchronize_session=False)
        )
        kind.log.warning(f"{kind.event}_task_resent", **{kind.id_key: package_id}, queue=queue)

    return resend_all(session, f"queued {kind.task}", sends, stamp)


def submit(
    summary: dict[str, Any], task: Any, package_id: int, queue: str, totals: dict[str, str]
) -> None:
    """Submit the build task of a claimed package and count it; in embedded mode the
    task ran inline and its result is folded into ``summary`` (``totals``: summary key
    to result key)."""
    outcome = task.apply_async(args=[package_id], queue=queue)
    summary["packages_submitted"] += 1
    merge_inline_package_result(summary, outcome, totals)


# ---------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------


def run_task(
    kind: PackageKind,
    package_id: int,
    build: Callable[[DatabaseConnection, int], dict[str, Any]],
    flag_member: Callable[[Session, int, Any, str, str], dict[str, Any] | None],
) -> dict[str, Any]:
    """The body of a packaging task: start the claimed package, ``build`` it, and on
    failure flag mismatching members (``flag_member``, see :func:`fail_members`) or
    release the claim.  Returns the task result.  ``build(db, package_id, attempt)``
    renames, records and cleans up only while ``attempt`` owns the row."""
    db = DatabaseConnection()
    model = kind.package_model
    attempt = new_attempt()
    with db.session_scope() as session:
        started = start_scheduled(
            session, model, package_id, heartbeat_at=m.utcnow(), attempt_id=attempt
        )
    if not started:
        if kind.log_skips:
            kind.log.info(
                f"{kind.event}_task_skipped", **{kind.id_key: package_id}, reason="not scheduled"
            )
        return {"status": "skipped", kind.id_key: package_id}
    try:
        # A duplicate delivery (broker visibility timeout) finds the row IN_PROGRESS and
        # skips above; recovery sees the beats and leaves the running build alone.
        with beating(
            model, model.id == package_id, attempt=attempt, label=f"{kind.event}-{package_id}"
        ):
            return build(db, package_id, attempt)
    except AttemptSuperseded:
        return {"status": "superseded", kind.id_key: package_id}
    except MemberMismatch as exc:
        try:
            errors = fail_members(db, kind, package_id, exc.mismatches, flag_member, attempt)
        except AttemptSuperseded:
            return {"status": "superseded", kind.id_key: package_id}
        return {"status": "failed", kind.id_key: package_id, "checksum_errors": errors}
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        kind.log.error(f"{kind.event}_failed", **{kind.id_key: package_id}, reason=reason)
        try:
            with owned_step(model, package_id, attempt, "release claim", db=db) as session:
                release_claim(session, kind, package_id)
        except AttemptSuperseded:
            return {"status": "superseded", kind.id_key: package_id}
        return {"status": "failed", kind.id_key: package_id, "reason": reason}


@dataclass
class Work:
    """A started package, read from the database: what to tar and where (detached rows)."""

    file_name: str
    relative_path: str
    location: m.DataLocation
    members: list[TarMember]
    extra: Any = None
    package_id: int = 0
    #: The attempt that builds it ("" outside a task: no ownership check).
    attempt: str = ""


def load_work(
    db: DatabaseConnection,
    kind: PackageKind,
    package_id: int,
    extra: Callable[[Session, m.DataLocation], Any] | None = None,
    attempt: str = "",
) -> Work:
    """The package's members, each checked where the package is built (a local file of
    the recorded size).  ``extra(session, location)`` adds what the stage needs from the
    same session.  Raises :class:`MemberMismatch` for missing or resized members,
    NotFoundError / StorageError when the package cannot be built at all."""
    with db.session_scope() as session:
        pkg = session.get(kind.package_model, package_id)
        location = getattr(pkg, kind.location_attr) if pkg is not None else None
        if pkg is None or location is None:
            raise NotFoundError(f"{kind.label} {package_id} vanished")
        storage = storage_for_location(location)
        rows = session.scalars(
            select(kind.member_model)
            .where(kind.member_fk_column() == package_id)
            .order_by(*kind.member_order)
        ).all()
        if not rows:
            raise NotFoundError(f"{kind.label} {package_id} has no {kind.members_word}")
        members: list[TarMember] = []
        missing: list[tuple[str, str]] = []
        for row in rows:
            local = storage.local_path(row.relative_path)
            if local is None:
                raise StorageError(kind.not_local.format(location=location.name))
            info = storage.stat(row.relative_path)
            if temporary_component(row.relative_path):
                # Never a tar member: hidden by listings and swept by the janitor where
                # the package is unpacked.  Flagged, so its group waits for a person.
                missing.append((row.relative_path, _temporary_member(row.relative_path)))
            elif info is None:
                missing.append((row.relative_path, kind.missing.format(location=location.name)))
            elif info.size != row.size:
                reason = kind.wrong_size.format(
                    location=location.name, actual=info.size, recorded=row.size
                )
                missing.append((row.relative_path, reason))
            members.append(
                TarMember(row.relative_path, local, row.size, (row.checksum or "").lower())
            )
        more = extra(session, location) if extra is not None else None
        session.expunge_all()
        work = Work(pkg.file_name, pkg.relative_path, location, members, more, package_id, attempt)
    if missing:
        raise MemberMismatch(missing)
    return work


def _temporary_member(path: str) -> str:
    return (
        f"path holds the temporary name {temporary_component(path)!r} (a hidden name holding "
        "'.tmp-'); not packaged: move the file and file it again under another path"
    )


def write_tar(kind: PackageKind, storage: Storage, work: Work) -> TarResult:
    """Write the tar of ``work`` atomically at ``work.relative_path`` of ``storage``;
    on a checksum mismatch nothing appears and :class:`MemberMismatch` is raised.  The
    rename into place happens only while ``work.attempt`` owns the package row
    (:func:`~ccat_data_transfer.core.attempts.exit_owned`); a superseded build raises
    :class:`~ccat_data_transfer.core.attempts.AttemptSuperseded` and nothing appears."""
    try:
        writer = storage.open_write(work.relative_path)
        out = writer.__enter__()
        try:
            result = write_tar_with_checksums(work.members, out)
            if result.mismatches:
                # Raising inside the write discards the temporary file: nothing appears.
                raise MemberMismatch(
                    [
                        (
                            path,
                            kind.bad_checksum.format(
                                location=work.location.name, actual=actual, expected=expected
                            ),
                        )
                        for path, expected, actual in result.mismatches
                    ]
                )
        except BaseException as exc:
            writer.__exit__(type(exc), exc, exc.__traceback__)
            raise
        if work.attempt:
            _sync(out)
            exit_owned(
                writer, kind.package_model, work.package_id, work.attempt, "rename tar into place"
            )
        else:
            writer.__exit__(None, None, None)
    except TarSourceChangedError as exc:
        if kind.source_changed is None:
            raise
        raise StorageError(kind.source_changed.format(exc=exc)) from exc
    return result


def _sync(out: Any) -> None:
    """Flush and fsync a written local file before its owned rename: the rename step
    holds the package row, and a long fsync there (gigabytes) would hold it while the
    heartbeat cannot beat, so recovery would take the build for a stalled one."""
    fileno = getattr(out, "fileno", None)
    try:
        fd = fileno() if fileno is not None else None
    except (io.UnsupportedOperation, ValueError):  # not a local file (S3)
        fd = None
    if fd is not None:
        out.flush()
        os.fsync(fd)


def record_built(
    session: Session,
    kind: PackageKind,
    package_id: int,
    location_id: int,
    relative_path: str,
    result: TarResult,
    **values: Any,
) -> None:
    """Record the built package (its row gets ``values``, size and checksum, only if it is
    still IN_PROGRESS) and its PRESENT copy at ``location_id``.  StorageError if the
    claim was released meanwhile.  Does not commit."""
    model = kind.package_model
    done = session.execute(
        update(model)
        .where(model.id == package_id, model.status == m.Status.IN_PROGRESS)
        .values(
            **values,
            size=result.size,
            checksum=result.sha256,
            checksum_algorithm="sha256",
            failure_reason=None,
        )
        .execution_options(synchronize_session=False)
    ).rowcount
    if not done:
        raise StorageError("the claim was released while the package was built")
    session.add(
        present_copy(
            kind.copy_model,
            data_location_id=location_id,
            relative_path=relative_path,
            size=result.size,
            checksum=result.sha256,
            verified_at=m.utcnow(),
            **{kind.copy_fk: package_id},
        )
    )


def report_built(
    kind: PackageKind, package_id: int, work: Work, location: str, result: TarResult
) -> dict[str, Any]:
    """Log a built package (``<event>_created``) and return the task's result for it."""
    count = {kind.members_word: len(work.members)}
    kind.log.info(
        f"{kind.event}_created",
        **{kind.id_key: package_id},
        file_name=work.file_name,
        location=location,
        size_bytes=result.size,
        **count,
    )
    return {
        "status": "completed",
        kind.id_key: package_id,
        **count,
        "size_bytes": result.size,
        "location": location,
    }


def fail_members(
    db: DatabaseConnection,
    kind: PackageKind,
    package_id: int,
    mismatches: list[tuple[str, str]],
    flag_member: Callable[[Session, int, Any, str, str], dict[str, Any] | None],
    attempt: str,
) -> list[dict[str, Any]]:
    """Flag every mismatching member and release the claim, in one transaction owned by
    ``attempt`` (:class:`~ccat_data_transfer.core.attempts.AttemptSuperseded` when it
    no longer owns the row).
    ``flag_member(session, package_id, package, path, reason)`` flags one and returns
    the error to report, or None if there is no such member.  Returns the errors."""
    errors: list[dict[str, Any]] = []
    with owned_step(kind.package_model, package_id, attempt, "flag members", db=db) as session:
        pkg = session.get(kind.package_model, package_id)
        for path, reason in mismatches:
            error = flag_member(session, package_id, pkg, path, reason)
            if error is not None:
                errors.append(error)
        session.flush()
        release_claim(session, kind, package_id)
    return errors
