"""Reusable helpers for end-to-end pipeline tests.

``make_raw_files(system, location_name, obs_unit, module, n, size)`` writes ``n`` real
files of ``size`` random bytes at a SOURCE location and files them with
``ccat_data_transfer.filing.register.file_raw_data_files`` (committed).  It returns the filed
entries: one dict per file with the filing keys (``relative_path``, ``size``,
``checksum``, ``checksum_algorithm``, ``executed_obs_unit``, ``instrument_module``)
plus ``id`` (the RawDataFile UUID as str) and ``path`` (the file on disk, a Path).

``obs_unit`` is the ExecutedObsUnit name (created on first use); ``module`` is
``"INSTRUMENT/MODULE"`` (e.g. ``"primecam/280GHz"``).  Paths are
``<obs_unit>/<module name>/<random>_<i>.dat`` so repeated calls never collide.

``package_everything(system)`` finishes nothing; it runs the raw data package manager
and then the data transfer package manager once each and returns both summaries.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy import update

from ccat_data_transfer.filing.register import file_raw_data_files
from ccat_ops_db import models as m


def make_raw_files(
    system: Any,
    location_name: str,
    obs_unit: str,
    module: str,
    n: int,
    size: int,
) -> list[dict[str, Any]]:
    """Write ``n`` files of ``size`` bytes at ``location_name`` and file them."""
    root = system.location_path(location_name)
    module_name = module.split("/", 1)[1]
    batch = uuid.uuid4().hex[:8]
    entries: list[dict[str, Any]] = []
    paths = []
    for i in range(n):
        rel = f"{obs_unit}/{module_name}/{batch}_{i:04d}.dat"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = os.urandom(size)
        path.write_bytes(data)
        paths.append(path)
        entries.append(
            {
                "relative_path": rel,
                "size": size,
                "checksum": hashlib.sha256(data).hexdigest(),
                "checksum_algorithm": "sha256",
                "executed_obs_unit": obs_unit,
                "instrument_module": module,
            }
        )
    with system.session() as session:
        result = file_raw_data_files(session, location_name, entries)
    ids = {f.relative_path: str(f.id) for f in result.files}
    for entry, path in zip(entries, paths, strict=True):
        entry["id"] = ids[entry["relative_path"]]
        entry["path"] = path
    return entries


def package_everything(system: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """One raw-data-package cycle, then one data-transfer-package cycle."""
    from ccat_data_transfer.packaging import raw_cycle, transfer_cycle

    with system.session() as session:
        raw = raw_cycle.run_once(session)
    with system.session() as session:
        dtp = transfer_cycle.run_once(session)
    return raw, dtp


def build_started_and_died(system, model, package_id):
    """A package build that started (IN_PROGRESS, a heartbeat) and whose worker died an
    hour ago."""
    with system.session() as s:
        s.execute(
            update(model)
            .where(model.id == package_id)
            .values(status=m.Status.IN_PROGRESS, heartbeat_at=m.utcnow() - timedelta(hours=1))
        )
