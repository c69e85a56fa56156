"""The deletion rules as SQL: each rule of the document's matrix that runs set-based is
stated here once, as a condition or a selectable that the finders, the claims, the worker's
double-check and stage 1 all build on.

* :func:`_lta_present_exists`: "PRESENT at an active LONG_TERM_ARCHIVE" (every rule);
* :func:`_archived_in_lta`: the package half of the source-site raw-file rule (stages 1
  and 2): ARCHIVED and PRESENT at an active LTA;
* :func:`_left_source_site`: stage 1's "the package's copies at the source site are all
  DELETED";
* :func:`deletion_possible_candidates`: stage 2, the DELETION_POSSIBLE raw-file copies
  that may go, oldest first - the one statement both the SQLite selection and the
  PostgreSQL claim use;
* :func:`_raw_file_source_safe` / :func:`_raw_file_processing_safe`: the per-copy form the
  worker re-checks (:func:`_file_copies_still_deletable`);
* :func:`_package_copy_may_be_deletable`: the pre-filter of the package rules.

Room in the house: core of the deletion stage; imports ``deletion.base`` and
``ccat_ops_db`` only.  SQLite and PostgreSQL may differ in how a rule is claimed
(``deletion.claims``), never in what it says (here).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, exists, func, literal, select, true
from sqlalchemy.orm import Session

from ccat_data_transfer.deletion.base import (
    COPY_TYPE_RAW_DATA_FILE,
    COPY_TYPE_RAW_DATA_PACKAGE,
    DLT,
    LT,
    PCT,
    S,
    _alias,
)
from ccat_ops_db import models as m


def _per_row(conds: list[Any], *own: Any, per_row: bool = False) -> Any:
    """``EXISTS (SELECT 1 WHERE conds)``, correlated to everything but ``own``.  With
    ``per_row``, ``OFFSET 0`` keeps PostgreSQL from flattening it into a join that starts
    from the other side (every LTA copy, every transfer: the history); it is then checked
    once per outer row, by index, so its cost follows the rows asked about."""
    sub = select(literal(1)).where(*conds).correlate_except(*own)
    if per_row:
        sub = sub.offset(0)
    return sub.exists()


def _lta_present_exists(
    package_id_col: Any, same_site_id: Any = None, per_row: bool = False
) -> Any:
    """SQL: the package has a PRESENT, not-lost copy at an active LONG_TERM_ARCHIVE location
    (optionally at a given site).  An LTA-site BUFFER does not count.  ``per_row``: see
    :func:`_per_row`."""
    lpc = _alias(PCT, "lta_pc")
    lloc = _alias(DLT, "lta_loc")
    conds = [
        lpc.c.raw_data_package_id == package_id_col,
        lpc.c.type == COPY_TYPE_RAW_DATA_PACKAGE,
        lpc.c.status == S.PRESENT,
        lpc.c.lost_at.is_(None),
        lloc.c.id == lpc.c.data_location_id,
        lloc.c.location_type == LT.LONG_TERM_ARCHIVE,
        lloc.c.active.is_(True),
    ]
    if same_site_id is not None:
        conds.append(lloc.c.site_id == same_site_id)
    return _per_row(conds, lpc, lloc, per_row=per_row)


def _archived_in_lta(rdp: Any) -> list[Any]:
    """SQL, the package half of the source-site raw-file rule (stages 1 and 2): the package
    (a ``raw_data_package`` table or alias) is ARCHIVED and PRESENT at an active LTA."""
    return [rdp.c.state == m.PackageState.ARCHIVED, _lta_present_exists(rdp.c.id)]


def _left_source_site(rdp: Any, source_site_ids: Iterable[int]) -> Any:
    """SQL, stage 1: the package had a copy at a SOURCE or BUFFER location of a source site,
    and every such copy is DELETED."""
    spc = _alias(PCT, "src_pc")
    sloc = _alias(DLT, "src_loc")
    at_source_site = [
        spc.c.raw_data_package_id == rdp.c.id,
        spc.c.type == COPY_TYPE_RAW_DATA_PACKAGE,
        sloc.c.id == spc.c.data_location_id,
        sloc.c.location_type.in_([LT.SOURCE, LT.BUFFER]),
        sloc.c.site_id.in_(sorted(source_site_ids)),
    ]
    return and_(
        exists().where(*at_source_site, spc.c.status == S.DELETED).correlate_except(spc, sloc),
        ~exists().where(*at_source_site, spc.c.status != S.DELETED).correlate_except(spc, sloc),
    )


def _active_staging_job(package_id: Any, location_id: Any) -> Any:
    """SQL: an active StagingJob to ``location_id`` (a PROCESSING location) uses the
    package."""
    sj = m.StagingJob.__table__
    link = m.staging_job_raw_data_package
    return (
        exists()
        .where(
            link.c.raw_data_package_id == package_id,
            sj.c.id == link.c.staging_job_id,
            sj.c.active.is_(True),
            sj.c.destination_location_id == location_id,
        )
        .correlate_except(link, sj)
    )


def deletion_possible_candidates(
    location_id: int,
    *,
    expired_before: datetime | None = None,
    retained_after: datetime | None = None,
) -> Any:
    """Stage 2, stated once: the DELETION_POSSIBLE, not-lost raw-file copies at the location
    whose package is ARCHIVED and PRESENT at an active LTA (:func:`_archived_in_lta`), as a
    ``SELECT id, size`` oldest first (``deletion_possible_at`` - the start of the retention
    clock - then ``created_at``, ``id``).  ``expired_before`` / ``retained_after`` keep the
    copies marked at or before / after that time.

    Its cost follows the copies at this location: ``cand`` = the copies in the window (the
    partial index ix_physical_copy_deletion_possible) with their package; ``ok`` = those
    of their packages that pass the package rule, each checked once, not once per file.
    An empty location costs one index probe.  The SQLite path runs it as it is; the
    PostgreSQL claim takes its ids (``with_only_columns``) into one UPDATE."""
    pc = _alias(PCT, "f_pc")
    rdf = _alias(m.RawDataFile.__table__, "safe_rdf")
    rdp = _alias(m.RawDataPackage.__table__, "safe_rdp")
    since = pc.c.deletion_possible_at
    window = [since.is_not(None)]
    if expired_before is not None:
        window.append(since <= expired_before)
    if retained_after is not None:
        window.append(since > retained_after)
    cand = (
        select(
            pc.c.id,
            func.coalesce(pc.c.size, rdf.c.size).label("size"),
            since.label("since"),
            pc.c.created_at,
            rdf.c.raw_data_package_id.label("pkg"),
        )
        .join_from(pc, rdf, rdf.c.id == pc.c.raw_data_file_id)
        .where(
            pc.c.type == COPY_TYPE_RAW_DATA_FILE,
            pc.c.data_location_id == location_id,
            pc.c.status == S.DELETION_POSSIBLE,
            pc.c.lost_at.is_(None),
            *window,
        )
        .cte("cand")
        .prefix_with("MATERIALIZED")
    )
    ok = (
        select(rdp.c.id)
        .where(rdp.c.id.in_(select(cand.c.pkg)), *_archived_in_lta(rdp))
        .cte("ok")
        .prefix_with("MATERIALIZED")
    )
    return (
        select(cand.c.id, cand.c.size)
        .where(cand.c.pkg.in_(select(ok.c.id)))
        .order_by(cand.c.since, cand.c.created_at, cand.c.id)
    )


def _raw_file_source_safe(file_pc: Any) -> Any:
    """SQL, per copy: the file copy went through stage 1 (``deletion_possible_at`` is set)
    and its parent package passes :func:`_archived_in_lta` - the rule of
    :func:`deletion_possible_candidates`, for copies the worker re-checks."""
    rdf = _alias(m.RawDataFile.__table__, "safe_rdf")
    rdp = _alias(m.RawDataPackage.__table__, "safe_rdp")
    return and_(
        file_pc.c.deletion_possible_at.is_not(None),
        exists()
        .where(
            rdf.c.id == file_pc.c.raw_data_file_id,
            rdp.c.id == rdf.c.raw_data_package_id,
            *_archived_in_lta(rdp),
        )
        .correlate_except(rdf, rdp),
    )


def _raw_file_processing_safe(file_pc: Any) -> Any:
    """SQL: no active StagingJob for this PROCESSING location references the file's package,
    and the package still has a PRESENT copy at a LONG_TERM_ARCHIVE (so this copy is never
    the last one)."""
    rdf = _alias(m.RawDataFile.__table__, "safe_rdf")
    return (
        exists()
        .where(
            rdf.c.id == file_pc.c.raw_data_file_id,
            rdf.c.raw_data_package_id.is_not(None),
            ~_active_staging_job(rdf.c.raw_data_package_id, file_pc.c.data_location_id),
            _lta_present_exists(rdf.c.raw_data_package_id),
        )
        .correlate_except(rdf)
    )


def _file_copies_still_deletable(session: Session, ids: Sequence[int]) -> set[int]:
    """Of these raw-file copy ids, those whose rule holds now (one query per rule)."""
    if not ids:
        return set()
    pc = _alias(PCT, "f_pc")
    loc = _alias(DLT, "f_loc")
    base = (
        select(pc.c.id)
        .join(loc, loc.c.id == pc.c.data_location_id)
        .where(pc.c.id.in_(list(ids)), pc.c.type == COPY_TYPE_RAW_DATA_FILE, pc.c.lost_at.is_(None))
    )
    ok = set(
        session.scalars(
            base.where(loc.c.location_type.in_([LT.SOURCE, LT.BUFFER]), _raw_file_source_safe(pc))
        )
    )
    ok |= set(
        session.scalars(
            base.where(loc.c.location_type == LT.PROCESSING, _raw_file_processing_safe(pc))
        )
    )
    return ok


def _package_copy_may_be_deletable(copy_cls: type[m.PhysicalCopy]) -> Any:
    """SQL for a condition every deletable package copy meets (each rule of the matrix
    requires it), so that the per-copy rule runs only on the few copies that may pass it
    instead of on every copy in the buffers.  It never admits a copy: the rule decides.

    * RawDataPackage (source-site and LTA-site buffer rows): a PRESENT, not-lost copy at
      an active LONG_TERM_ARCHIVE exists (the same-site LTA copy is one of them).
    * DataTransferPackage (both rows): a DataTransfer of it is COMPLETED and unpacked.

    Both are checked per candidate copy (``per_row``): the copies at buffers are the
    backlog, while the LTA copies and transfers they are checked against are the history.
    """
    if copy_cls is m.RawDataPackagePhysicalCopy:
        return _lta_present_exists(copy_cls.raw_data_package_id, per_row=True)
    if copy_cls is m.DataTransferPackagePhysicalCopy:
        dt = m.DataTransfer.__table__
        return _per_row(
            [
                dt.c.data_transfer_package_id == copy_cls.data_transfer_package_id,
                dt.c.status == m.Status.COMPLETED,
                dt.c.unpack_status == m.Status.COMPLETED,
            ],
            dt,
            per_row=True,
        )
    return true()
