"""Stage 1's rules and planning: which filed files form raw data packages, and when.

When is a group complete?
-------------------------
A *group* is the set of filed, not yet packaged files of one ExecutedObsUnit x
InstrumentModule at one SOURCE location.  The group is **complete** when

1. its ExecutedObsUnit is marked finished (``finish-obs-unit`` or
   ``POST /api/v1/executed-obs-units/{name}/finish``), or
2. no new file was filed for it for ``RAW_DATA_PACKAGE_QUIET_PERIOD_SECONDS`` (the newest
   file's filing time is at least that old).

A complete group is split, in path order, into packages of at most
``RAW_DATA_PACKAGE_MAX_SIZE_BYTES`` (a single file larger than that is a package of its
own); every part is packaged.  An *incomplete* group whose files already exceed the size
limit packages its full parts now (every part except the last, still growing one) so
that a long observation streams out; the remainder waits for completeness.  A group with
a file flagged with ``checksum_error`` is **blocked**: none of its files are packaged
until an operator resolves the flagged file (its bytes or its filing), so that a package
never silently lacks a file.

The rules are plain functions of data (:func:`group_is_complete`, :func:`split_by_size`,
:func:`package_file_name`); :func:`plan_packages` applies them to the database with one
set-based query per cycle and writes nothing.  Sites whose buffers are all in EMERGENCY
state are skipped (:func:`usable_buffers`): package creation pauses there.

Room in the house: managers.  Imports core (config, scope, buffer status, shared rows)
and :mod:`ccat_ops_db`; used by :mod:`ccat_data_transfer.packaging.raw_packages`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ccat_data_transfer.core import buffer_status, scope
from ccat_data_transfer.core.config import settings
from ccat_data_transfer.core.fileio import fit_name
from ccat_data_transfer.core.logs import get_logger
from ccat_data_transfer.core.shared_rows import active_site_buffers
from ccat_ops_db import models as m

log = get_logger(__name__)

__all__ = [
    "GroupPlan",
    "group_is_complete",
    "package_file_name",
    "package_relative_path",
    "plan_packages",
    "split_by_size",
    "usable_buffers",
]


# ---------------------------------------------------------------------------------------
# Decisions (plain functions of data)
# ---------------------------------------------------------------------------------------


def split_by_size(
    files: Sequence[tuple[Any, int]], max_size: int, complete: bool
) -> list[list[Any]]:
    """Split ``(key, size)`` pairs, in the given order, into parts of at most ``max_size``
    bytes (a larger single file is a part of its own).  When the group is not ``complete``
    the last part is left out: it may still grow."""
    parts: list[list[Any]] = []
    current: list[Any] = []
    current_size = 0
    for key, size in files:
        if current and current_size + size > max_size:
            parts.append(current)
            current, current_size = [], 0
        current.append(key)
        current_size += size
    if current and complete:
        parts.append(current)
    return parts


def group_is_complete(finished: bool, newest_filed_age_seconds: float, quiet: float) -> bool:
    """The completeness rule of the module docstring."""
    return finished or newest_filed_age_seconds >= quiet


_UNSAFE = re.compile(r"[^A-Za-z0-9._+=@-]")

#: Longest package file name, in bytes: under the 255-byte file name limit with room for
#: what is derived from it (``<name>.json`` sidecars, ``.<name>.tmp-*`` temporary names).
PACKAGE_NAME_MAX = 200


def package_file_name(eou_name: str, instrument: str, module: str, part: int) -> str:
    """``<obs unit>__<instrument>_<module>__part<NNN>.tar``, characters outside
    ``[A-Za-z0-9._+=@-]`` replaced by ``_``.  Unique for the full names and at most
    PACKAGE_NAME_MAX bytes: when a character was replaced (``a:b`` and ``a_b`` would
    meet) or the name is too long, the obs unit part is cut and followed by a hash of
    all three full names (:func:`~ccat_data_transfer.core.fileio.fit_name`)."""

    def safe(text: str) -> str:
        return _UNSAFE.sub("_", text)

    unit = safe(eou_name)
    tail = f"__{safe(instrument)}_{safe(module)}__part{part:03d}.tar"
    altered = unit != eou_name or safe(instrument) != instrument or safe(module) != module
    if not altered and len((unit + tail).encode()) <= PACKAGE_NAME_MAX:
        return unit + tail
    key = "\0".join((eou_name, instrument, module))
    room = PACKAGE_NAME_MAX - len(tail.encode())
    if room < 24:  # instrument and module names too long themselves: hash the whole
        return (
            fit_name(unit + tail[:-4], PACKAGE_NAME_MAX - 4, key=f"{key}\0{part}", always=True)
            + ".tar"
        )
    return fit_name(unit, room, key=key, always=True) + tail


def package_relative_path(instrument: str, module: str, file_name: str) -> str:
    return (
        f"raw_data_packages/{_UNSAFE.sub('_', instrument)}/{_UNSAFE.sub('_', module)}/{file_name}"
    )


# ---------------------------------------------------------------------------------------
# Planning (reads only)
# ---------------------------------------------------------------------------------------


def usable_buffers(session: Session, site_id: int) -> list[m.DataLocation]:
    """Active BUFFER locations of a site, best first, without those in EMERGENCY state."""
    buffers = session.scalars(active_site_buffers(site_id).order_by(m.DataLocation.id)).all()
    usable = []
    states = buffer_status.states_of([buf.name for buf in buffers], session)
    for buf in buffers:
        state = states[buf.name]
        if state == buffer_status.BufferState.EMERGENCY:
            log.warning(
                "buffer_skipped_emergency", location=buf.name, reason="buffer in emergency state"
            )
            continue
        usable.append(buf)
    return usable


@dataclass
class GroupPlan:
    """Parts to package for one group (files as ``(id, size)``)."""

    source_location_id: int
    executed_obs_unit_id: int
    instrument_module_id: int
    complete: bool
    parts: list[list[Any]] = field(default_factory=list)


def plan_packages(
    session: Session,
    summary: dict[str, Any] | None = None,
    location_ids: list[int] | None = None,
) -> list[GroupPlan]:
    """Groups with something to package now, and how to split them (no writes).  With
    ``location_ids`` only files whose SOURCE location is one of them (a site's scope)."""
    summary = summary if summary is not None else {}
    max_size = int(settings.RAW_DATA_PACKAGE_MAX_SIZE_BYTES)
    quiet = float(settings.RAW_DATA_PACKAGE_QUIET_PERIOD_SECONDS)
    now = m.utcnow()
    f = m.RawDataFile
    groups = (
        select(
            f.source_location_id,
            f.executed_obs_unit_id,
            f.instrument_module_id,
            func.count(),
            func.sum(f.size),
            func.max(f.created_at),
            func.count(f.checksum_error),
            m.ExecutedObsUnit.finished_at,
        )
        .join(m.ExecutedObsUnit, m.ExecutedObsUnit.id == f.executed_obs_unit_id)
        .where(f.raw_data_package_id.is_(None))
        .group_by(
            f.source_location_id,
            f.executed_obs_unit_id,
            f.instrument_module_id,
            m.ExecutedObsUnit.finished_at,
        )
        .order_by(func.min(f.created_at))
    )
    rows = session.execute(scope.restrict(groups, f.source_location_id, location_ids)).all()

    paused_sites: dict[int, bool] = {}
    plans: list[GroupPlan] = []
    for loc_id, eou_id, mod_id, _count, total, newest, n_bad, finished_at in rows:
        if n_bad:
            summary["blocked_groups"] = summary.get("blocked_groups", 0) + 1
            continue
        complete = group_is_complete(finished_at is not None, (now - newest).total_seconds(), quiet)
        if not complete and int(total or 0) <= max_size:
            summary["waiting_groups"] = summary.get("waiting_groups", 0) + 1
            continue
        location = session.get(m.DataLocation, loc_id)
        if location is None or not location.active:
            continue
        if location.site_id not in paused_sites:
            paused = not usable_buffers(session, location.site_id)
            paused_sites[location.site_id] = paused
            if paused:
                log.warning(
                    "raw_data_package_creation_paused",
                    site=location.site.name,
                    location=location.name,
                    reason="no usable buffer at the site (all inactive or in emergency state)",
                )
                summary.setdefault("paused_sites", []).append(location.site.name)
        if paused_sites[location.site_id]:
            continue
        files = session.execute(
            select(f.id, f.size)
            .where(
                f.raw_data_package_id.is_(None),
                f.source_location_id == loc_id,
                f.executed_obs_unit_id == eou_id,
                f.instrument_module_id == mod_id,
            )
            .order_by(f.relative_path)
        ).all()
        parts = split_by_size([(r[0], int(r[1])) for r in files], max_size, complete)
        if not complete:
            summary["waiting_groups"] = summary.get("waiting_groups", 0) + 1
        if parts:
            plans.append(GroupPlan(loc_id, eou_id, mod_id, complete, parts))
    return plans
