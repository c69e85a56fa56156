"""The deletion rules as SQL: each rule of the document's matrix that runs set-based is
stated here once, as a condition or a selectable that the finders, the claims, the worker's
double-check and stage 1 all build on.

* :func:`_lta_present_exists`: the proof rule - at least N LTA copies count as proof
  (PRESENT, not lost, at an active LONG_TERM_ARCHIVE without an audit hold, the
  package's checksum, verified at or after ``archive_proof.proof_cutoff()``); N is
  :func:`min_verified_lta_copies` of the location whose copy would go;
* :func:`lta_copies_awaiting_proof`: the LTA copies to verify for candidates that wait
  only for a fresh proof;
* :func:`package_archived_in_lta`: the package half of the source-site raw-file rule (stages 1
  and 2): ARCHIVED, not frozen, and the proof rule;
* :func:`_not_frozen`, :func:`_location_not_held`: nothing of a frozen package, nothing
  at a location under an audit hold is deleted;
* :func:`copy_bytes`: the bytes of a copy (its size, else its raw file's), for the
  selection and for ``bytes_to_free`` alike;
* :func:`left_source_site`: stage 1's "the package's copies at the source site are all
  DELETED";
* :func:`deletion_possible_candidates`: stage 2, the DELETION_POSSIBLE raw-file copies
  that may go, oldest first - the one statement both the SQLite selection and the
  PostgreSQL claim use;
* :func:`_raw_file_source_safe` / :func:`raw_file_processing_safe`: the per-copy form the
  worker re-checks (:func:`file_copies_still_deletable`);
* :func:`package_copy_may_be_deletable`: the pre-filter of the package rules.

Room in the house: core of the deletion stage; imports ``deletion.base``, config,
``archive_proof`` (the proof's age) and ``ccat_ops_db`` only.  SQLite and PostgreSQL may
differ in how a rule is claimed (``deletion.claims``), never in what it says (here).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    DateTime,
    Integer,
    and_,
    bindparam,
    case,
    exists,
    func,
    literal,
    or_,
    select,
    true,
    union_all,
)
from sqlalchemy.orm import Session

from ccat_data_transfer.archive.proof import proof_cutoff, read_back_sql
from ccat_data_transfer.core.config import settings
from ccat_data_transfer.deletion.base import (
    COPY_TYPE_RAW_DATA_FILE,
    COPY_TYPE_RAW_DATA_PACKAGE,
    DLT,
    LT,
    PCT,
    S,
    table_alias,
)
from ccat_ops_db import models as m


def exists_per_row(conds: list[Any], *own: Any, per_row: bool = False) -> Any:
    """``EXISTS (SELECT 1 WHERE conds)``, correlated to everything but ``own``.  With
    ``per_row``, ``OFFSET 0`` keeps PostgreSQL from flattening it into a join that starts
    from the other side (every LTA copy, every transfer: the history); it is then checked
    once per outer row, by index, so its cost follows the rows asked about."""
    sub = select(literal(1)).where(*conds).correlate_except(*own)
    if per_row:
        sub = sub.offset(0)
    return sub.exists()


def min_verified_lta_copies(location: m.DataLocation | None = None) -> int:
    """How many LTA copies must count as proof before a copy at ``location`` goes: the
    location's ``min_verified_lta_copies``, else the setting MIN_VERIFIED_LTA_COPIES.  Never
    fewer than one: a value below 1 is ignored (a location's) or raised to 1 (the
    setting's) - no copy that relies on the archives goes without proof."""
    own = location.min_verified_lta_copies if location is not None else None
    if own is not None and own >= 1:
        return int(own)
    return max(1, int(settings.get("MIN_VERIFIED_LTA_COPIES", 1)))


def _min_copies() -> Any:
    """SQL, the setting MIN_VERIFIED_LTA_COPIES as :func:`min_verified_lta_copies` reads
    it, as the bound parameter ``min_lta_copies`` (see :func:`rule_params`)."""
    return bindparam("min_lta_copies", min_verified_lta_copies(), type_=Integer)


def _proof_cutoff() -> Any:
    """SQL, ``archive_proof.proof_cutoff()`` as the bound parameter ``proof_cutoff``."""
    return bindparam("proof_cutoff", proof_cutoff(), type_=DateTime)


def rule_params() -> dict[str, Any]:
    """Fresh values of the rules' named parameters (the settings and the time they
    depend on), to pass with every execution of a statement built once and kept
    (``deletion.base.kept``): a kept statement otherwise carries the values of its
    build."""
    return {"min_lta_copies": min_verified_lta_copies(), "proof_cutoff": proof_cutoff()}


def proof_needed(loc: Any) -> Any:
    """SQL form of :func:`min_verified_lta_copies` for a location table or alias."""
    own = loc.c.min_verified_lta_copies
    return func.coalesce(case((own >= 1, own)), _min_copies())


def copy_bytes(pc: Any, rdf: Any = None) -> Any:
    """SQL, the bytes a copy holds, as every deletion step counts them: its recorded size,
    else its raw file's (``rdf``: the ``raw_data_file`` row when the query joins it,
    else looked up by key)."""
    if rdf is None:
        rdf_t = m.RawDataFile.__table__
        file_size = (
            select(rdf_t.c.size).where(rdf_t.c.id == pc.c.raw_data_file_id).scalar_subquery()
        )
    else:
        file_size = rdf.c.size
    return func.coalesce(pc.c.size, file_size)


def _lta_copy_could_prove(lpc: Any, lloc: Any, package_id_col: Any) -> list[Any]:
    """SQL, the proof rule but for its age: ``lpc`` (at ``lloc``) is a copy of the package
    that is PRESENT, not lost, at an active LONG_TERM_ARCHIVE without an audit hold (an
    LTA-site BUFFER does not count) and holds the package's checksum."""
    prdp = table_alias(m.RawDataPackage.__table__, "proof_rdp")
    return [
        lpc.c.raw_data_package_id == package_id_col,
        lpc.c.type == COPY_TYPE_RAW_DATA_PACKAGE,
        lpc.c.status == S.PRESENT,
        lpc.c.lost_at.is_(None),
        lloc.c.id == lpc.c.data_location_id,
        lloc.c.location_type == LT.LONG_TERM_ARCHIVE,
        lloc.c.active.is_(True),
        lloc.c.audit_hold_at.is_(None),
        prdp.c.id == lpc.c.raw_data_package_id,
        lpc.c.checksum == prdp.c.checksum,
    ]


def _counts_now(lpc: Any, decided_at: Any = None) -> list[Any]:
    """SQL, what makes a copy that could prove the package count as proof: verified at
    its site at or after ``archive_proof.proof_cutoff()`` (and, with ``decided_at``, at or
    after that moment: the worker's post-decision proof), and read back in full at least
    once since it was written (``archive_proof.read_back_sql``)."""
    conds = [lpc.c.verified_at >= _proof_cutoff(), read_back_sql(lpc)]
    if decided_at is not None:
        conds.append(lpc.c.verified_at >= decided_at)
    return conds


def _decided_at(file_pc: Any) -> Any:
    """SQL: when the deletion of ``file_pc`` was decided (a row claimed before the column
    existed: when it was last sent)."""
    return func.coalesce(file_pc.c.deletion_decided_at, file_pc.c.deletion_scheduled_at)


def _lta_present_exists(
    package_id_col: Any,
    need: Any = 1,
    *,
    fresh: bool = True,
    same_site_id: Any = None,
    per_row: bool = False,
    decided_at: Any = None,
) -> Any:
    """SQL, the proof rule (stated once; :func:`proof.counts_as_proof` is its Python
    form): at least ``need`` (an int or SQL) copies of the package count as proof - each
    one passes :func:`_lta_copy_could_prove`, was verified at its site at or after
    ``archive_proof.proof_cutoff()`` and was read back in full since it was written
    (:func:`_counts_now`).  ``decided_at`` (SQL): the verification must also be at or
    after that moment (the worker: proof taken after the decision to delete).
    ``fresh=False`` leaves the age and the read-back out (the copy could prove once
    verified: stage 1's marking and the PROCESSING rule, which delete nothing that the
    archive's proof must cover, and the pre-filters).  ``same_site_id``: only copies at
    that site count.  ``per_row``: see :func:`exists_per_row` (a count is evaluated per outer
    row anyway)."""
    lpc = table_alias(PCT, "lta_pc")
    lloc = table_alias(DLT, "lta_loc")
    conds = _lta_copy_could_prove(lpc, lloc, package_id_col)
    if fresh:
        conds.extend(_counts_now(lpc, decided_at))
    if same_site_id is not None:
        conds.append(lloc.c.site_id == same_site_id)
    prdp = table_alias(m.RawDataPackage.__table__, "proof_rdp")
    if isinstance(need, int) and need <= 1:
        return exists_per_row(conds, lpc, lloc, prdp, per_row=per_row)
    count = select(func.count()).where(*conds).correlate_except(lpc, lloc, prdp)
    return count.scalar_subquery() >= need


def _not_frozen(rdp: Any) -> Any:
    """SQL: the package (a ``raw_data_package`` table or alias) is not frozen."""
    return rdp.c.frozen_at.is_(None)


def _location_not_held(location_id_col: Any) -> Any:
    """SQL: the location has no audit hold (nothing is deleted at a held location)."""
    hloc = table_alias(DLT, "held_loc")
    return ~exists().where(hloc.c.id == location_id_col, hloc.c.audit_hold_at.is_not(None))


def package_archived_in_lta(
    rdp: Any, need: Any = 1, fresh: bool = True, decided_at: Any = None
) -> list[Any]:
    """SQL, the package half of the source-site raw-file rule (stages 1 and 2): the package
    (a ``raw_data_package`` table or alias) is ARCHIVED, not frozen, and the proof rule
    holds (:func:`_lta_present_exists`; stage 1 asks ``fresh=False``; the worker passes
    ``decided_at``)."""
    return [
        rdp.c.state == m.PackageState.ARCHIVED,
        _not_frozen(rdp),
        _lta_present_exists(rdp.c.id, need, fresh=fresh, decided_at=decided_at),
    ]


def lta_copies_awaiting_proof(waiting: Any) -> Any:
    """SQL, ``SELECT id, full`` of the LTA copies to verify for candidates that wait only
    for proof, and whether each needs a full read (it was never read back in full since
    it was written) or a stat.  ``waiting`` is a selectable of candidate copies with
    columns ``pkg`` (their package), ``need`` (their location's :func:`proof_needed`) and
    ``site`` (an LTA-site buffer's site, whose own archive must prove the package; else
    NULL).  A package waits when fewer than ``need`` of its LTA copies count as proof but
    at least ``need`` could, once verified; an LTA-site buffer's copy also waits for its
    own site's archive copy, whatever the other archives hold.  The copies that could
    prove but do not count now are returned: exactly the proof each waiting copy
    needs."""
    cand = waiting.cte("awaiting").prefix_with("MATERIALIZED")
    pkgs = (
        select(cand.c.pkg)
        .where(
            _lta_present_exists(cand.c.pkg, cand.c.need, fresh=False),
            ~_lta_present_exists(cand.c.pkg, cand.c.need),
        )
        .cte("awaiting_pkg")
        .prefix_with("MATERIALIZED")
    )
    lpc = table_alias(PCT, "verify_pc")
    lloc = table_alias(DLT, "verify_loc")
    own_site = (
        exists()
        .where(
            cand.c.pkg == lpc.c.raw_data_package_id,
            cand.c.site == lloc.c.site_id,
        )
        .correlate_except(cand)
    )
    return (
        select(lpc.c.id, (~read_back_sql(lpc)).label("full"))
        .where(
            or_(lpc.c.raw_data_package_id.in_(select(pkgs.c.pkg)), own_site),
            *_lta_copy_could_prove(lpc, lloc, lpc.c.raw_data_package_id),
            or_(
                lpc.c.verified_at.is_(None),
                lpc.c.verified_at < _proof_cutoff(),
                ~read_back_sql(lpc),
            ),
        )
        .distinct()
    )


def lta_copies_for_decided(copy_ids: Sequence[int]) -> Any:
    """SQL, ``SELECT id, full`` of the LTA copies whose proof the deletion of these copies
    needs after its decision (:func:`_lta_present_exists` with ``decided_at``): every LTA
    copy that could prove the package of a package copy at a SOURCE or BUFFER location, or
    of a raw-file copy there that went through stage 1; ``full`` when it was never read
    back in full since it was written.  Copies at PROCESSING locations and transfer
    packages need no archive proof (they are never the last copies)."""
    pc = table_alias(PCT, "dec_pc")
    ploc = table_alias(DLT, "dec_loc")
    rdf = table_alias(m.RawDataFile.__table__, "dec_rdf")
    at_source_or_buffer = [
        pc.c.id.in_(list(copy_ids)),
        ploc.c.id == pc.c.data_location_id,
        ploc.c.location_type.in_([LT.SOURCE, LT.BUFFER]),
    ]
    packages = select(pc.c.raw_data_package_id).where(
        *at_source_or_buffer, pc.c.type == COPY_TYPE_RAW_DATA_PACKAGE
    )
    files = (
        select(rdf.c.raw_data_package_id)
        .select_from(pc)
        .join(rdf, rdf.c.id == pc.c.raw_data_file_id)
        .where(
            *at_source_or_buffer,
            pc.c.type == COPY_TYPE_RAW_DATA_FILE,
            pc.c.deletion_possible_at.is_not(None),
        )
    )
    lpc = table_alias(PCT, "decv_pc")
    lloc = table_alias(DLT, "decv_loc")
    return (
        select(lpc.c.id, (~read_back_sql(lpc)).label("full"))
        .where(
            lpc.c.raw_data_package_id.in_(union_all(packages, files)),
            *_lta_copy_could_prove(lpc, lloc, lpc.c.raw_data_package_id),
        )
        .distinct()
    )


def left_source_site(rdp: Any, source_site_ids: Iterable[int]) -> Any:
    """SQL, stage 1: the package had a copy at a SOURCE or BUFFER location of a source site,
    and every such copy is DELETED."""
    spc = table_alias(PCT, "src_pc")
    sloc = table_alias(DLT, "src_loc")
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


def active_staging_job(package_id: Any, location_id: Any) -> Any:
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
    whose package is ARCHIVED, not frozen and proven (:func:`package_archived_in_lta`, with the
    location's :func:`min_verified_lta_copies`), at a location not under an audit hold, as a
    ``SELECT id, size`` oldest first (``deletion_possible_at`` - the start of the retention
    clock - then ``created_at``, ``id``).  ``expired_before`` / ``retained_after`` keep the
    copies marked at or before / after that time.

    Its cost follows the copies at this location: ``cand`` = the copies in the window (the
    partial index ix_physical_copy_deletion_possible) with their package; ``ok`` = those
    of their packages that pass the package rule, each checked once, not once per file.
    An empty location costs one index probe.  The SQLite path runs it as it is; the
    PostgreSQL claim takes its ids (``with_only_columns``) into one UPDATE."""
    pc = table_alias(PCT, "f_pc")
    rdf = table_alias(m.RawDataFile.__table__, "safe_rdf")
    rdp = table_alias(m.RawDataPackage.__table__, "safe_rdp")
    nloc = table_alias(DLT, "need_loc")
    need = select(proof_needed(nloc)).where(nloc.c.id == location_id).scalar_subquery()
    since = pc.c.deletion_possible_at
    window = [since.is_not(None)]
    if expired_before is not None:
        window.append(since <= bindparam("expired_before", expired_before, type_=DateTime))
    if retained_after is not None:
        window.append(since > bindparam("retained_after", retained_after, type_=DateTime))
    cand = (
        select(
            pc.c.id,
            copy_bytes(pc, rdf).label("size"),
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
            _location_not_held(literal(location_id)),
            *window,
        )
        .cte("cand")
        .prefix_with("MATERIALIZED")
    )
    ok = (
        select(rdp.c.id)
        .where(rdp.c.id.in_(select(cand.c.pkg)), *package_archived_in_lta(rdp, need))
        .cte("ok")
        .prefix_with("MATERIALIZED")
    )
    return (
        select(cand.c.id, cand.c.size)
        .where(cand.c.pkg.in_(select(ok.c.id)))
        .order_by(cand.c.since, cand.c.created_at, cand.c.id)
    )


def oldest_marked(location_id: Any) -> Any:
    """SQL, scalar: when the oldest DELETION_POSSIBLE raw-file copy at the location was
    marked (NULL: none).  The first entry of ix_physical_copy_deletion_possible, whatever
    the plan: a location whose oldest mark is after its retention cutoff has nothing that
    :func:`deletion_possible_candidates` with ``expired_before`` could pick."""
    pc = table_alias(PCT, "x_pc")
    return (
        select(func.min(pc.c.deletion_possible_at))
        .where(
            pc.c.data_location_id == location_id,
            pc.c.status == S.DELETION_POSSIBLE,
            pc.c.type == COPY_TYPE_RAW_DATA_FILE,
        )
        .scalar_subquery()
    )


def _raw_file_source_safe(file_pc: Any, need: Any = 1, post_decision: bool = False) -> Any:
    """SQL, per copy: the file copy went through stage 1 (``deletion_possible_at`` is set)
    and its parent package passes :func:`package_archived_in_lta` with ``need`` proofs (the copy's
    location's) - the rule of :func:`deletion_possible_candidates`, for copies the worker
    re-checks; with ``post_decision`` the proofs must be taken after the copy's deletion
    was decided (:func:`_decided_at`)."""
    rdf = table_alias(m.RawDataFile.__table__, "safe_rdf")
    rdp = table_alias(m.RawDataPackage.__table__, "safe_rdp")
    decided = _decided_at(file_pc) if post_decision else None
    return and_(
        file_pc.c.deletion_possible_at.is_not(None),
        exists()
        .where(
            rdf.c.id == file_pc.c.raw_data_file_id,
            rdp.c.id == rdf.c.raw_data_package_id,
            *package_archived_in_lta(rdp, need, decided_at=decided),
        )
        .correlate_except(rdf, rdp),
    )


def raw_file_processing_safe(file_pc: Any) -> Any:
    """SQL: the PROCESSING location has no audit hold, no active StagingJob for it
    references the file's package, the package is not frozen and still has an LTA copy
    that could prove it (:func:`_lta_present_exists` with ``fresh=False``: this copy is
    never the last one; a copy staged from the archive needs no fresh proof to go)."""
    rdf = table_alias(m.RawDataFile.__table__, "safe_rdf")
    rdp = table_alias(m.RawDataPackage.__table__, "safe_rdp")
    return and_(
        _location_not_held(file_pc.c.data_location_id),
        exists()
        .where(
            rdf.c.id == file_pc.c.raw_data_file_id,
            rdp.c.id == rdf.c.raw_data_package_id,
            _not_frozen(rdp),
            ~active_staging_job(rdf.c.raw_data_package_id, file_pc.c.data_location_id),
            _lta_present_exists(rdf.c.raw_data_package_id, fresh=False),
        )
        .correlate_except(rdf, rdp),
    )


def file_copies_still_deletable(
    session: Session, ids: Sequence[int], post_decision: bool = False
) -> set[int]:
    """Of these raw-file copy ids, those whose rule holds now (one query per rule); with
    ``post_decision`` (the worker) the source-site rule needs proof taken after each
    copy's deletion was decided."""
    if not ids:
        return set()
    pc = table_alias(PCT, "f_pc")
    loc = table_alias(DLT, "f_loc")
    base = (
        select(pc.c.id)
        .join(loc, loc.c.id == pc.c.data_location_id)
        .where(
            pc.c.id.in_(list(ids)),
            pc.c.type == COPY_TYPE_RAW_DATA_FILE,
            pc.c.lost_at.is_(None),
            loc.c.audit_hold_at.is_(None),
        )
    )
    source = [
        loc.c.location_type.in_([LT.SOURCE, LT.BUFFER]),
        _raw_file_source_safe(pc, proof_needed(loc), post_decision),
    ]
    ok = set(session.scalars(base.where(*source)))
    ok |= set(
        session.scalars(
            base.where(loc.c.location_type == LT.PROCESSING, raw_file_processing_safe(pc))
        )
    )
    return ok


def package_copy_may_be_deletable(copy_cls: type[m.PhysicalCopy]) -> Any:
    """SQL for a condition every deletable package copy meets (each rule of the matrix
    requires it), so that the per-copy rule runs only on the few copies that may pass it
    instead of on every copy in the buffers.  It never admits a copy: the rule decides.

    * RawDataPackage (source-site and LTA-site buffer rows): the package is not frozen and
      an LTA copy could prove it (:func:`_lta_present_exists` without the age, so that a
      copy waiting for proof reaches the rule, which asks for the verification).
    * DataTransferPackage (both rows): a DataTransfer of it is COMPLETED and unpacked.

    Both are checked per candidate copy (``per_row``): the copies at buffers are the
    backlog, while the LTA copies and transfers they are checked against are the history.
    """
    if copy_cls is m.RawDataPackagePhysicalCopy:
        rdp = table_alias(m.RawDataPackage.__table__, "pre_rdp")
        return and_(
            _lta_present_exists(copy_cls.raw_data_package_id, fresh=False, per_row=True),
            ~exists()
            .where(rdp.c.id == copy_cls.raw_data_package_id, rdp.c.frozen_at.is_not(None))
            .correlate_except(rdp),
        )
    if copy_cls is m.DataTransferPackagePhysicalCopy:
        dt = m.DataTransfer.__table__
        return exists_per_row(
            [
                dt.c.data_transfer_package_id == copy_cls.data_transfer_package_id,
                dt.c.status == m.Status.COMPLETED,
                dt.c.unpack_status == m.Status.COMPLETED,
            ],
            dt,
            per_row=True,
        )
    return true()
