"""The archive-proof rule in Python, for one package's LONG_TERM_ARCHIVE copies: which
copies could prove the package (:func:`could_prove`), which count as proof now
(:func:`counts_as_proof`, the Python form of ``rule_sql._lta_present_exists``), and how
a copy or the lack of one is described in a Decision's reason.  The decision that uses
them (``rules._proof_of``, with the proof's age from ``archive_proof.proof_cutoff``) is in
``deletion.rules``.

:func:`request_proofs` and :func:`request_post_decision_proof` ask the archives' sites
for the proofs a deletion needs (before its decision, and after it).

Room in the house: core of the deletion stage; imports ``deletion.base``,
``deletion.rule_sql``, ``archive.proof`` (public: the request, the read-back rule) and
``ccat_ops_db``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ccat_data_transfer.archive.proof import read_back, request_verification
from ccat_data_transfer.deletion.base import LT, S, run
from ccat_data_transfer.deletion.rule_sql import lta_copies_for_decided
from ccat_ops_db import models as m


def lta_copies_of_package(session: Session, package_id: int) -> list[m.RawDataPackagePhysicalCopy]:
    return list(
        session.scalars(
            select(m.RawDataPackagePhysicalCopy)
            .join(
                m.DataLocation, m.DataLocation.id == m.RawDataPackagePhysicalCopy.data_location_id
            )
            .where(
                m.RawDataPackagePhysicalCopy.raw_data_package_id == package_id,
                m.DataLocation.location_type == LT.LONG_TERM_ARCHIVE,
            )
            .order_by(m.RawDataPackagePhysicalCopy.id)
        )
    )


def could_prove(copy: m.PhysicalCopy, package: m.RawDataPackage) -> bool:
    """The proof rule but for its age (SQL: ``rule_sql._lta_copy_could_prove``): PRESENT,
    not lost, at an active LONG_TERM_ARCHIVE without an audit hold, the package's
    checksum."""
    loc = copy.data_location
    return (
        copy.status == S.PRESENT
        and copy.lost_at is None
        and loc.location_type == LT.LONG_TERM_ARCHIVE
        and bool(loc.active)
        and loc.audit_hold_at is None
        and copy.checksum is not None
        and copy.checksum == package.checksum
    )


def counts_as_proof(copy: m.PhysicalCopy, package: m.RawDataPackage, cutoff: datetime) -> bool:
    """The proof rule for one LTA copy (SQL: ``rule_sql._lta_present_exists``): it could
    prove the package, was verified at its site at or after ``cutoff`` and was read back
    in full at least once since it was written (``archive_proof.read_back``)."""
    return (
        could_prove(copy, package)
        and copy.verified_at is not None
        and copy.verified_at >= cutoff
        and read_back(copy)
    )


def request_proofs(session: Session, wanted: list[tuple[int, bool]]) -> int:
    """Ask the archives' sites for exactly these proofs: (LTA copy id, full) - a full
    read for a copy never read back since it was written, a stat for the others
    (``archive_proof.request_verification`` on each copy's own site's queue; a copy with
    a request outstanding is not asked twice).  Commits; returns how many were queued."""
    full = sorted({i for i, f in wanted if f})
    stat = sorted({i for i, f in wanted if not f} - set(full))
    asked = request_verification(session, full, full=True) if full else 0
    if stat:
        asked += request_verification(session, stat)
    return asked


def request_post_decision_proof(session: Session, copy_ids: list[int]) -> int:
    """After the decision to delete these copies (committed): ask the archives' sites for
    the proof their deletion now needs (``rule_sql.lta_copies_for_decided``), taken after
    the decision.  In embedded mode it is taken before this returns; elsewhere the
    worker finds it, or keeps the copy and asks again."""
    if not copy_ids:
        return 0
    wanted = [(int(i), bool(f)) for i, f in run(session, lta_copies_for_decided(copy_ids))]
    session.commit()
    return request_proofs(session, wanted) if wanted else 0


def verified_ago(when: datetime | None) -> str:
    if when is None:
        return "never verified"
    seconds = max(0.0, (m.utcnow() - when).total_seconds())
    for unit, size, limit in (("s", 1, 120), ("min", 60, 7200), ("h", 3600, 172800)):
        if seconds < limit:
            return f"verified {int(seconds // size)} {unit} ago"
    return f"verified {int(seconds // 86400)} d ago"


def _describe_copy(copy: m.PhysicalCopy, package: m.RawDataPackage | None = None) -> str:
    loc = copy.data_location
    text = f"{loc.name} copy is {copy.status.name}"
    if copy.lost_at is not None:
        text += " and marked lost"
    elif not loc.active:
        text += " at an inactive location"
    elif loc.audit_hold_at is not None:
        text += f" at a location under an audit hold ({loc.audit_hold_reason or 'no reason'})"
    elif package is not None and (copy.checksum is None or copy.checksum != package.checksum):
        text += " with another checksum than the package's"
    elif copy.status == S.PRESENT:
        text += f", {verified_ago(copy.verified_at)}"
        if not read_back(copy):
            text += ", not yet read back in full since written"
    return text


def no_lta_detail(
    session: Session, package: m.RawDataPackage, lta_copies: list[Any], site_id: int | None
) -> str:
    if lta_copies:
        return "; ".join(_describe_copy(c, package) for c in lta_copies)
    others = session.scalars(
        select(m.RawDataPackagePhysicalCopy).where(
            m.RawDataPackagePhysicalCopy.raw_data_package_id == package.id,
            m.RawDataPackagePhysicalCopy.status != S.DELETED,
        )
    ).all()
    where = ", ".join(
        f"{c.data_location.name} ({c.data_location.location_type.name}, {c.status.name})"
        for c in others
    )
    scope = "at this site " if site_id is not None else ""
    return f"no copy {scope}at any LONG_TERM_ARCHIVE; copies: {where or 'none'}"
