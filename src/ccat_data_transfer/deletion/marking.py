"""Stage 1 of raw-file deletion at the source site: once a package has left the source
site (its copies there are all DELETED) and is ARCHIVED, not frozen, with an archive copy
that could prove it (the proof rule of ``deletion.rule_sql`` but for the proof's age,
which stage 2 and the worker check again), the PRESENT copies of its files at SOURCE and
BUFFER locations become DELETION_POSSIBLE (one bulk UPDATE), and the retention clock of
stage 2 starts.

The worker calls :func:`mark_raw_data_files_for_deletion` in the transaction that records a
package's last source-site copy DELETED; the cycle's catch-up calls it over every package.
The rule's SQL is ``deletion.rule_sql.package_archived_in_lta`` and ``left_source_site``.

Room in the house: core of the deletion stage (used by the worker and the cycle); imports
``deletion.base``, ``deletion.claims`` (the ``ARRAY(SELECT ...)`` form),
``deletion.rule_sql``, ``deletion.rules`` (site roles),
``deletion.trail``, ``scope``, ``database`` and ``ccat_ops_db``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from sqlalchemy import BigInteger, any_, bindparam, except_, exists, func, select, union_all, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session

from ccat_data_transfer.core import scope
from ccat_data_transfer.core.database import is_postgresql
from ccat_data_transfer.deletion.base import COPY_TYPE_RAW_DATA_FILE, DLT, LT, PCT, S, kept, run
from ccat_data_transfer.deletion.claims import ArrayOfSelect
from ccat_data_transfer.deletion.rule_sql import left_source_site, package_archived_in_lta
from ccat_data_transfer.deletion.rules import site_roles
from ccat_data_transfer.deletion.trail import log_row, write_log_rows
from ccat_ops_db import models as m

RDF = m.RawDataFile.__table__
RDP = m.RawDataPackage.__table__


def mark_raw_data_files_for_deletion(
    session: Session,
    raw_data_package_ids: Sequence[int] | None = None,
    location_ids: list[int] | None = None,
    roles: Any = None,
) -> int:
    """Stage 1 of raw-file deletion, one bulk UPDATE: PRESENT raw-file copies at SOURCE and
    BUFFER locations become DELETION_POSSIBLE (``deletion_possible_at`` = now) once their
    parent package has left the source site (its copies there are all DELETED) and is
    ARCHIVED with an archive copy that could prove it.  Restricted to the given packages
    when ``raw_data_package_ids`` is set, and to copies at ``location_ids`` when set (a
    site's scope).  ``roles``: the site roles when the caller has read them.  Returns the
    number of copies marked."""
    roles = roles if roles is not None else site_roles(session)
    if not roles.source_site_ids:
        return 0
    sites = tuple(sorted(roles.source_site_ids))
    scope_ids = None if location_ids is None else tuple(location_ids)
    qualifying = None
    if raw_data_package_ids is None and is_postgresql(session):
        # (With raw_data_package_ids given, the rule is already restricted to them.)
        qualifying = list(run(session, _qualifying_statement(sites, scope_ids)).scalars())
        if not qualifying:
            return 0
    copy_rule, package_rule = _stage1_rules(sites, scope_ids)
    if raw_data_package_ids is not None:
        package_rule.append(RDP.c.id.in_(list(raw_data_package_ids)))
    elif qualifying is not None:
        _restrict_to(qualifying, copy_rule, package_rule)
    package_ok = (
        exists()
        .where(
            RDF.c.id == PCT.c.raw_data_file_id,
            RDP.c.id == RDF.c.raw_data_package_id,
            *package_rule,
        )
        .correlate_except(RDF, RDP)
    )
    stmt = (
        update(PCT)
        .where(*copy_rule, package_ok)
        .values(status=S.DELETION_POSSIBLE, deletion_possible_at=m.utcnow())
    )
    groups = _mark_and_group(session, stmt)
    if not groups:
        return 0
    _audit_marked(session, groups)
    return sum(int(g[2]) for g in groups)


def _stage1_rules(
    source_site_ids: tuple[int, ...], location_ids: tuple[int, ...] | None
) -> tuple[list[Any], list[Any]]:
    """The copy rule and the package rule of stage 1: a PRESENT raw-file copy at a SOURCE
    or BUFFER location (of ``location_ids`` when set); its package ARCHIVED, not frozen,
    with an LTA copy that could prove it (its age is stage 2's and the worker's concern:
    marking deletes nothing), gone from the source site."""
    package_rule = [
        *package_archived_in_lta(RDP, fresh=False),
        left_source_site(RDP, source_site_ids),
    ]
    file_locations = scope.restrict(
        select(DLT.c.id).where(DLT.c.location_type.in_([LT.SOURCE, LT.BUFFER])),
        DLT.c.id,
        None if location_ids is None else list(location_ids),
    )
    copy_rule = [
        PCT.c.type == COPY_TYPE_RAW_DATA_FILE,
        PCT.c.status == S.PRESENT,
        PCT.c.data_location_id.in_(file_locations),
    ]
    return copy_rule, package_rule


def _restrict_to(qualifying: list[int], copy_rule: list[Any], package_rule: list[Any]) -> None:
    """Narrow both rules to the ``qualifying`` packages.  The UPDATE keeps the whole rule
    (state may have moved since the SELECT) and is restricted to their files."""
    pkg_ids = bindparam("qualifying_ids", value=qualifying, type_=ARRAY(BigInteger))
    copy_rule.append(
        PCT.c.raw_data_file_id.in_(
            select(RDF.c.id).where(RDF.c.raw_data_package_id == any_(pkg_ids))
        )
    )
    package_rule.append(RDP.c.id == any_(pkg_ids))


@kept
def _qualifying_statement(
    source_site_ids: tuple[int, ...], location_ids: tuple[int, ...] | None
) -> Any:
    """PostgreSQL, ``SELECT id`` of the packages that qualify now for stage 1 and have a
    file copy that may be marked: set-based from the few that qualify, so that the idle
    cycle does not grow with the files already marked (the history).

    The PRESENT file copies at SOURCE and BUFFER locations (the backlog) name their
    packages by key, except the copies whose file is known to fail the rule anyway: the
    files of packages not ARCHIVED (the backlog in flight) and the files not yet packaged,
    found from those few packages by index (``= ANY(ARRAY(SELECT ...))``: one index scan
    per package, never a scan of every file), are set aside first (``EXCEPT``), so that
    the lookups follow what may qualify, not every file in flight."""
    copy_rule, package_rule = _stage1_rules(source_site_ids, location_ids)
    present = (
        select(PCT.c.raw_data_file_id.label("id")).where(*copy_rule).cte("present")
    ).prefix_with("MATERIALIZED")
    not_archived = [st for st in m.PackageState if st != m.PackageState.ARCHIVED]
    in_flight = ArrayOfSelect(select(RDP.c.id).where(RDP.c.state.in_(not_archived)))
    failing = (
        union_all(
            select(RDF.c.id).where(RDF.c.raw_data_package_id == any_(in_flight)),
            select(RDF.c.id).where(RDF.c.raw_data_package_id.is_(None)),
        )
        .cte("failing")
        .prefix_with("MATERIALIZED")
    )
    rest = (
        except_(select(present.c.id), select(failing.c.id)).cte("rest").prefix_with("MATERIALIZED")
    )
    candidates = select(RDF.c.raw_data_package_id).join(rest, rest.c.id == RDF.c.id)
    # The package rule per candidate (by key): a semi-join may start from the packages.
    return select(RDP.c.id).where(RDP.c.id == any_(ArrayOfSelect(candidates)), *package_rule)


def _mark_and_group(session: Session, stmt: Any) -> list[tuple[Any, Any, Any, Any]]:
    """Run the marking UPDATE; returns (package id, location id, copies marked, bytes) per
    package and location, for one audit row each, not one per file (a package has
    thousands)."""
    returning = stmt.returning(PCT.c.raw_data_file_id, PCT.c.data_location_id, PCT.c.size)
    if is_postgresql(session):
        # The UPDATE and the grouping in one statement: a million marked copies need not
        # travel to Python.
        marked = returning.cte("marked")
        return session.execute(
            select(
                RDF.c.raw_data_package_id,
                marked.c.data_location_id,
                func.count(),
                func.coalesce(func.sum(marked.c.size), 0),
            )
            .select_from(marked.outerjoin(RDF, RDF.c.id == marked.c.raw_data_file_id))
            .group_by(RDF.c.raw_data_package_id, marked.c.data_location_id)
        ).all()
    returned = session.execute(returning).all()
    file_pkg: dict[Any, Any] = {}
    file_ids = [r[0] for r in returned]
    for start in range(0, len(file_ids), 10000):
        file_pkg.update(
            session.execute(
                select(RDF.c.id, RDF.c.raw_data_package_id).where(
                    RDF.c.id.in_(file_ids[start : start + 10000])
                )
            ).all()
        )
    acc: dict[tuple[Any, int], list[int]] = defaultdict(lambda: [0, 0])
    for file_id, loc_id, size in returned:
        a = acc[(file_pkg.get(file_id), loc_id)]
        a[0] += 1
        a[1] += int(size or 0)
    return [(pkg, loc, n, size) for (pkg, loc), (n, size) in acc.items()]


def _audit_marked(session: Session, groups: list[tuple[Any, Any, Any, Any]]) -> None:
    """One MARKED_POSSIBLE row per package and location."""
    locations = {loc.id: loc for loc in session.scalars(select(m.DataLocation))}
    rows = [
        log_row(
            None,
            COPY_TYPE_RAW_DATA_FILE,
            locations.get(loc_id),
            int(size or 0),
            "parent_package_archived",
            m.DeletionOutcome.MARKED_POSSIBLE,
            f"{n} raw file copies of package {pkg_id} -> DELETION_POSSIBLE",
        )
        for pkg_id, loc_id, n, size in groups
    ]
    write_log_rows(session, rows)
