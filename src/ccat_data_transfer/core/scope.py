"""Site scope of the managers: one central process, or one process per site.

Every manager can run for the whole observatory (one central process, the default) or
for one site only (one process per site, e.g. next to that site's workers).  The scope is
the setting ``MANAGER_SITE`` (empty: every site; from the environment
``CCAT_DATA_TRANSFER_MANAGER_SITE``), or is passed explicitly: ``run_once(session,
site="cologne")``, ``--site cologne`` on the command line.  ``site=None`` means "use the
setting"; ``site=""`` (``ALL_SITES``) means every site whatever the setting says.  A
site is named by its ``name`` or its ``short_name``; an unknown name is refused with
:class:`~ccat_data_transfer.core.errors.NotFoundError` before anything is changed.

A scoped manager finds its work with the same set-based queries as the central one, plus
one condition ``<location column> IN (<ids of the site's locations>)``
(:func:`location_ids`).  Each kind of work is owned by exactly one location, so by exactly
one site:

================================  ==========================================================
manager                           work it does when scoped to a site
================================  ==========================================================
raw data package manager          raw files whose SOURCE location is at the site (and the
                                  release of stalled packages built there)
data transfer package manager     raw data packages waiting at the site's source-site
                                  buffers (and stalled bundles whose origin is there)
transfer manager                  transfers whose origin location is at the site (push):
                                  planning of primary, relay and secondary hops from the
                                  site, dispatch, and the status of transfer packages that
                                  originate there; unpacks whose destination is at the site
archive manager                   archive transfers into the site's LONG_TERM_ARCHIVE
staging manager                   staging jobs whose destination location is at the site
                                  (expiry and claiming); their staged copies are cleaned
                                  up by the deletion manager of that site
deletion manager                  copies at the site's locations.  The rules still consult
                                  other sites' copies ("ARCHIVED at an LTA", "transferred
                                  to every LTA site"): only the set of copies acted on is
                                  scoped
buffer manager                    measures the site's locations (an emergency there runs a
                                  deletion cycle for the same site)
recovery                          stalled work whose location is at the site, with the
                                  owner of each kind as above
================================  ==========================================================

Work never falls between scopes: every location belongs to exactly one site, so running
every manager once per site does exactly the work of one central run (the rows the
managers write always name their location).  Concurrent scoped and central managers are
safe for the same reason two central managers are: every claim is atomic.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from ccat_data_transfer.core.config import settings
from ccat_data_transfer.core.errors import NotFoundError
from ccat_ops_db import models as m

#: Pass as ``site`` to mean every site, whatever ``MANAGER_SITE`` says.
ALL_SITES = ""

__all__ = [
    "ALL_SITES",
    "configured_site",
    "find_site",
    "location_ids",
    "resolve_site",
    "restrict",
    "scoped_name",
    "site_name",
]


def configured_site() -> str | None:
    """The site of the setting ``MANAGER_SITE``; None when empty (every site)."""
    value = settings.get("MANAGER_SITE", "")
    text = "" if value is None else str(value).strip()
    return text or None


def resolve_site(site: str | None) -> str | None:
    """The site a manager works for: ``site`` when given, else the setting.  None (and
    ``ALL_SITES``) mean every site."""
    if site is None:
        return configured_site()
    return str(site).strip() or None


def find_site(session: Session, site: str) -> m.Site:
    """The site named ``site`` (name or short name), or NotFoundError naming the known
    sites."""
    found = session.scalars(
        select(m.Site).where(or_(m.Site.name == site, m.Site.short_name == site))
    ).first()
    if found is None:
        known = ", ".join(session.scalars(select(m.Site.name).order_by(m.Site.name)).all())
        raise NotFoundError(
            f"no site named {site!r} (known sites: {known or 'none'}); check --site or the "
            "setting MANAGER_SITE"
        )
    return found


def site_name(session: Session, site: str | None = None) -> str | None:
    """The canonical name of the scope's site (``site``, else the setting); None for every
    site.  Raises NotFoundError for an unknown site."""
    wanted = resolve_site(site)
    if wanted is None:
        return None
    return find_site(session, wanted).name


def location_ids(session: Session, site: str | None = None) -> list[int] | None:
    """Ids of every DataLocation of the scope's site (active or not: inactive locations'
    leftover work belongs to the site too); None when unscoped.  Raises NotFoundError for
    an unknown site, before the caller changes anything."""
    wanted = resolve_site(site)
    if wanted is None:
        return None
    found = find_site(session, wanted)
    return list(
        session.scalars(
            select(m.DataLocation.id)
            .where(m.DataLocation.site_id == found.id)
            .order_by(m.DataLocation.id)
        )
    )


def restrict(stmt: Any, column: Any, ids: list[int] | None) -> Any:
    """``stmt`` with ``column IN (ids)`` added, or unchanged when unscoped (``ids`` None)."""
    if ids is None:
        return stmt
    return stmt.where(column.in_(ids))


def scoped_name(name: str, site: str | None) -> str:
    """A manager's name for health and logs: ``deletion_manager@cologne`` when scoped."""
    return f"{name}@{site}" if site else name
