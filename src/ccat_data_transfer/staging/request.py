"""What a staging request names, and whether it may be served.

Room in the house: turning a scientist's words (a location, a user, packages by ID, an
executed obs unit, an instrument and a time range, a retention) into rows, and refusing
a request that cannot be served before anything is written.  Reads only; raises
:class:`~ccat_data_transfer.core.errors.NotFoundError` or
:class:`~ccat_data_transfer.core.errors.ValidationError` with a reason a person reads.
May import: :mod:`ccat_data_transfer.staging.finders`, config, exceptions, ``ccat_ops_db``.

Choosing packages
-----------------
A job names its packages in one of three ways:

* by RawDataPackage ID (``package_ids``);
* by ExecutedObsUnit (``executed_obs_unit``: name or ID; optionally narrowed to one
  ``instrument``);
* by ``instrument`` and a time range ``start`` .. ``end``: every package of the instrument
  whose **observation** overlaps the half-open range ``[start, end)``.  The observation
  time is ``ExecutedObsUnit.start_time`` .. ``ExecutedObsUnit.end_time`` (when the obs unit
  has no ``end_time`` it is taken as an instant at its start; when it has no
  ``start_time`` its ``created_at`` stands in).  Scientists ask for "what was observed
  then", not for "what was packaged then", hence observation time and not
  ``RawDataPackage.created_at``.

Every chosen package must be ARCHIVED with at least one usable LTA copy (PRESENT, not
lost); otherwise :func:`refuse_unstageable` names the packages.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ccat_data_transfer.core.config import settings
from ccat_data_transfer.core.errors import NotFoundError, ValidationError
from ccat_data_transfer.staging.finders import in_chunks, usable_lta_copy_exists
from ccat_ops_db import models as m

LT = m.LocationType

__all__ = [
    "naive_utc",
    "refuse_unstageable",
    "resolve_location",
    "resolve_user",
    "retention_minutes_for",
    "select_packages",
]


def naive_utc(value: datetime | str | None, what: str) -> datetime | None:
    """``value`` (a datetime or ISO 8601 text; naive means UTC) as a naive UTC datetime."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ValidationError(f"{what}: {value!r} is not an ISO 8601 time") from None
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value


def _find(session: Session, model: Any, ident: Any, name_column: Any, unknown: str) -> Any:
    """The row of ``model`` that ``ident`` is or names: the row itself, by primary key when
    an int, else by ``name_column``; NotFoundError(``unknown``) when there is none.
    Staging requests may name locations, users and obs units either way."""
    if isinstance(ident, model):
        return ident
    if isinstance(ident, int):
        row = session.get(model, ident)
    else:
        row = session.scalars(select(model).where(name_column == ident)).one_or_none()
    if row is None:
        raise NotFoundError(unknown)
    return row


def resolve_location(session: Session, destination: str | int | m.DataLocation) -> m.DataLocation:
    """The destination: an active PROCESSING location (a DataLocation passed in is taken
    as it is)."""
    if isinstance(destination, m.DataLocation):
        return destination
    unknown = f"unknown data location {destination!r}; see `list-locations`"
    loc = _find(session, m.DataLocation, destination, m.DataLocation.name, unknown)
    if loc.location_type != LT.PROCESSING:
        raise ValidationError(
            f"destination {loc.name!r} is a {loc.location_type.value} location; "
            "data can only be staged to a PROCESSING location"
        )
    if not loc.active:
        raise ValidationError(f"destination {loc.name!r} is not active")
    return loc


def resolve_user(session: Session, user: str | int | m.User | None) -> m.User | None:
    if user is None:
        return None
    return _find(session, m.User, user, m.User.username, f"unknown user {user!r}")


def _resolve_instrument(session: Session, instrument: str | int) -> m.Instrument:
    stmt = select(m.Instrument)
    stmt = (
        stmt.where(m.Instrument.id == instrument)
        if isinstance(instrument, int)
        else stmt.where(func.lower(m.Instrument.name) == str(instrument).lower())
    )
    row = session.scalars(stmt).one_or_none()
    if row is None:
        raise NotFoundError(f"unknown instrument {instrument!r}")
    return row


def _resolve_obs_unit(session: Session, eou: str | int | m.ExecutedObsUnit) -> m.ExecutedObsUnit:
    E = m.ExecutedObsUnit
    return _find(session, E, eou, E.name, f"unknown executed obs unit {eou!r}")


def select_packages(
    session: Session,
    *,
    package_ids: Sequence[int] | None,
    executed_obs_unit: str | int | m.ExecutedObsUnit | None,
    instrument: str | int | None,
    start: datetime | None,
    end: datetime | None,
) -> tuple[list[m.RawDataPackage], str]:
    """The packages a request names, and a short description for the job's name."""
    by_ids = package_ids is not None and len(package_ids) > 0
    by_range = start is not None or end is not None
    modes = sum([by_ids, executed_obs_unit is not None, by_range])
    if modes == 0 and instrument is None:
        raise ValidationError(
            "name the packages to stage: package IDs, an executed obs unit, or an "
            "instrument with a time range (start and end)"
        )
    if modes > 1 or (by_ids and instrument is not None):
        raise ValidationError(
            "choose one way to name packages: package IDs, an executed obs unit "
            "(optionally with an instrument), or an instrument with a time range"
        )
    if by_ids:
        return _packages_by_id(session, package_ids or [])
    RDP = m.RawDataPackage
    stmt = select(RDP).join(m.InstrumentModule, m.InstrumentModule.id == RDP.instrument_module_id)
    inst = _resolve_instrument(session, instrument) if instrument is not None else None
    if inst is not None:
        stmt = stmt.where(m.InstrumentModule.instrument_id == inst.id)
    if executed_obs_unit is not None:
        eou = _resolve_obs_unit(session, executed_obs_unit)
        stmt = stmt.where(RDP.executed_obs_unit_id == eou.id)
        label = f"obs unit {eou.name}" + (f" ({inst.name})" if inst else "")
    else:
        if inst is None:
            raise ValidationError("a time range needs an instrument (--instrument)")
        if start is None or end is None:
            raise ValidationError("a time range needs both a start and an end")
        if start >= end:
            raise ValidationError(f"the time range is empty: start {start} is not before end {end}")
        E = m.ExecutedObsUnit
        obs_start = func.coalesce(E.start_time, E.created_at)
        obs_end = func.coalesce(E.end_time, E.start_time, E.created_at)
        stmt = stmt.join(E, E.id == RDP.executed_obs_unit_id).where(
            obs_start < end, obs_end >= start
        )
        label = f"{inst.name} {start.isoformat()}..{end.isoformat()}"
    rows = list(session.scalars(stmt.order_by(RDP.id)).unique().all())
    if not rows:
        raise NotFoundError(f"no raw data packages match {label}")
    return rows, label


def _packages_by_id(
    session: Session, package_ids: Sequence[int]
) -> tuple[list[m.RawDataPackage], str]:
    """The packages named by ID, in the order given (each once), and their label."""
    RDP = m.RawDataPackage
    wanted: list[int] = []
    for pid in package_ids:
        if not isinstance(pid, int) or isinstance(pid, bool):
            raise ValidationError(f"package ID {pid!r} is not an integer")
        if pid not in wanted:
            wanted.append(pid)
    rows = session.scalars(select(RDP).where(RDP.id.in_(wanted))).all()
    found = {p.id: p for p in rows}
    missing = [pid for pid in wanted if pid not in found]
    if missing:
        raise NotFoundError(f"unknown raw data package(s): {', '.join(map(str, missing))}")
    label = "packages " + ",".join(map(str, wanted[:10])) + ("..." if len(wanted) > 10 else "")
    return [found[pid] for pid in wanted], label


def retention_minutes_for(dest: m.DataLocation, retention_minutes: int | None) -> int:
    """The job's retention: the request's, else the destination's, else the setting
    ``RETENTION_PERIOD_MINUTES``; a positive whole number of minutes."""
    if retention_minutes is None:
        retention_minutes = dest.retention_period_minutes or int(settings.RETENTION_PERIOD_MINUTES)
    if (
        isinstance(retention_minutes, bool)
        or not isinstance(retention_minutes, int)
        or retention_minutes <= 0
    ):
        raise ValidationError(
            f"retention must be a positive whole number of minutes, not {retention_minutes!r}"
        )
    return retention_minutes


def refuse_unstageable(session: Session, packages: list[m.RawDataPackage]) -> None:
    """Raise ValidationError naming the packages that are not ARCHIVED with a usable LTA
    copy (a PRESENT, not lost copy at an active long-term archive)."""
    RDP = m.RawDataPackage
    usable: set[int] = set()
    for chunk in in_chunks([p.id for p in packages]):
        usable.update(
            session.scalars(
                select(RDP.id).where(
                    RDP.id.in_(chunk),
                    RDP.state == m.PackageState.ARCHIVED,
                    usable_lta_copy_exists(RDP.id),
                )
            ).all()
        )
    bad = [p for p in packages if p.id not in usable]
    if bad:
        shown = ", ".join(
            f"{p.id} ({p.state.name}"
            + (")" if p.state != m.PackageState.ARCHIVED else ", no usable LTA copy)")
            for p in bad[:20]
        )
        more = f" and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise ValidationError(
            f"cannot stage: package(s) not ARCHIVED with a PRESENT copy at an active "
            f"long-term archive: {shown}{more}"
        )
