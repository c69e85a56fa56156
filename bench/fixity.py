"""Benchmark: fixity re-verification throughput, against sha256sum / openssl on the same files.

Creates ``--gb`` GB of archive copies (``--files`` packages) at the ``cologne_lta`` of a
fresh embedded system in a temporary data folder, then times, alternating, best of
``--runs``:

* ``verify_copies(ids, full=True)`` - the fixity task body exactly as a worker at the LTA
  runs it (read the DB, re-read every byte through SHA-256, record FIXITY_OK);
* ``sha256sum`` over the same files (one process), and ``openssl dgst -sha256`` when
  installed: the lower bound for one core.

Both run single-threaded on files just written, so the page cache holds them: this is the
CPU cost of the check (GB/h per core), not the read bandwidth of an archive's disks.
Then it prints how long a full re-verification of 5 PB takes at the default
FIXITY_BYTES_PER_DAY, and how many cores that budget keeps busy.

    python bench/fixity.py            # 2 GB in 16 files
    python bench/fixity.py --gb 0.5   # quick
"""

from __future__ import annotations

# `python bench/X.py` puts bench/ first on sys.path, where bench/packaging.py would shadow
# the `packaging` distribution that kombu imports.  Drop it before importing anything.
import sys as _sys  # noqa: E402
from pathlib import Path as _Path  # noqa: E402

_HERE = _Path(__file__).resolve().parent
_sys.path[:] = [p for p in _sys.path if _Path(p or ".").resolve() != _HERE]

import argparse
import hashlib
import os
import platform
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("CCAT_DATA_TRANSFER_EXECUTION_MODE", "embedded")

from sqlalchemy import select  # noqa: E402

from ccat_data_transfer.archive.proof import FIXITY_OK, verify_copies  # noqa: E402
from ccat_data_transfer.cli.core import initialise  # noqa: E402
from ccat_data_transfer.core.config import settings  # noqa: E402
from ccat_data_transfer.core.database import DatabaseConnection  # noqa: E402
from ccat_data_transfer.core.logs import configure_logging  # noqa: E402
from ccat_data_transfer.core.storage import storage_for_location  # noqa: E402
from ccat_data_transfer.fixity.cycle import budget_bytes_per_day  # noqa: E402
from ccat_ops_db import models as m  # noqa: E402

GB = 1e9
PB = 1e15


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime + children.ru_utime + children.ru_stime


def build(files: int, size: int) -> tuple[list[int], list[Path]]:
    """``files`` packages of ``size`` bytes at cologne_lta, with their real checksums."""
    db = DatabaseConnection()
    block = os.urandom(16 * 1024 * 1024)
    ids: list[int] = []
    paths: list[Path] = []
    with db.session_scope() as s:
        lta = s.scalars(select(m.DataLocation).filter_by(name="cologne_lta")).one()
        source = s.scalars(select(m.DataLocation).filter_by(name="primecam_raw_data")).one()
        module = s.scalars(select(m.InstrumentModule)).first()
        eou = m.ExecutedObsUnit(name="bench-fixity", obs_unit=m.ObsUnit(name="bench-fixity"))
        s.add(eou)
        s.flush()
        storage = storage_for_location(lta)
        for i in range(files):
            rel = f"raw_data_packages/bench/pkg_{i:04d}.tar"
            h = hashlib.sha256()
            with storage.open_write(rel) as f:
                left, first = size, f"package {i}\n".encode()
                f.write(first)
                h.update(first)
                left -= len(first)
                while left > 0:
                    chunk = block[: min(left, len(block))]
                    f.write(chunk)
                    h.update(chunk)
                    left -= len(chunk)
            package = m.RawDataPackage(
                file_name=Path(rel).name,
                relative_path=rel,
                size=size,
                checksum=h.hexdigest(),
                state=m.PackageState.ARCHIVED,
                status=m.Status.COMPLETED,
                executed_obs_unit_id=eou.id,
                instrument_module_id=module.id,
                source_location_id=source.id,
            )
            s.add(package)
            s.flush()
            copy = m.RawDataPackagePhysicalCopy(
                raw_data_package_id=package.id,
                data_location_id=lta.id,
                relative_path=rel,
                size=size,
                checksum=package.checksum,
            )
            s.add(copy)
            s.flush()
            ids.append(copy.id)
            paths.append(storage.local_path(rel))
    return ids, paths


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and its children)."""
    cpu, wall = _cpu(), time.perf_counter()
    fn()
    return time.perf_counter() - wall, _cpu() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0, help="GB of archive copies")
    parser.add_argument("--files", type=int, default=16, help="number of packages")
    parser.add_argument("--runs", type=int, default=2, help="best of this many runs")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="ccat-bench-fixity-"))
    try:
        settings.set("DATA_DIR", str(tmp / "data"))
        settings.set("DATABASE_URL", f"sqlite:///{tmp / 'ops.sqlite'}")
        settings.set("LOG_LEVEL", "WARNING")
        configure_logging()
        initialise()
        size = int(args.gb * GB / args.files)
        ids, paths = build(args.files, size)
        total = size * args.files
        files = [str(p) for p in paths]

        def ours() -> None:
            findings = verify_copies(ids, full=True)
            assert all(f.outcome == FIXITY_OK for f in findings), findings

        tools = {"ccat verify_copies(full=True)": ours}
        if shutil.which("sha256sum"):
            tools["sha256sum"] = lambda: subprocess.run(
                ["sha256sum", *files], check=True, capture_output=True
            )
        if shutil.which("openssl"):
            tools["openssl dgst -sha256"] = lambda: subprocess.run(
                ["openssl", "dgst", "-sha256", *files], check=True, capture_output=True
            )
        best: dict[str, tuple[float, float]] = {}
        for _ in range(args.runs):
            for name, fn in tools.items():
                wall, cpu = timed(fn)
                if name not in best or wall < best[name][0]:
                    best[name] = (wall, cpu)

        print(f"# fixity bench: {total / GB:.2f} GB in {args.files} files, page cache warm")
        print(f"# {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}")
        print(f"{'tool':32s} {'wall s':>8s} {'cpu s':>8s} {'GB/s':>7s} {'GB/h/core':>10s}")
        rates = {}
        for name, (wall, cpu) in best.items():
            rate = total / wall
            rates[name] = rate
            print(f"{name:32s} {wall:8.2f} {cpu:8.2f} {rate / GB:7.2f} {rate * 3600 / GB:10.0f}")
        ours_rate = rates["ccat verify_copies(full=True)"]
        for name, rate in rates.items():
            if name != "ccat verify_copies(full=True)":
                print(f"# ccat / {name}: {ours_rate / rate:.2f}x the throughput")
        budget = budget_bytes_per_day()
        print(
            f"# default FIXITY_BYTES_PER_DAY = {budget / 1e12:g} TB/day per LTA "
            f"({budget / 86400 / 1e6:.0f} MB/s sustained)"
        )
        print(f"# full re-verification of 5 PB at that budget: {5 * PB / budget:.0f} days")
        print(
            f"# cores busy hashing at that budget: {budget / 86400 / ours_rate:.2f} "
            f"(5 PB on one unbudgeted core: {5 * PB / ours_rate / 86400:.0f} days)"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
