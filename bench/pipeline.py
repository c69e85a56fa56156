"""Benchmark: bytes through the embedded lifecycle against cp + openssl dgst on the same hops.

Writes ``--size-gb`` of raw data with the instrument simulator (not timed), then times:

* ours: the orchestrator's rounds (every manager's ``run_once``, tasks run in-process on
  the embedded default: SQLite, folders) from the first round until every RawDataPackage
  is PRESENT at both LONG_TERM_ARCHIVE locations.  Deletion is included (it runs in every
  round, as in production); staging is not exercised.
* baseline, on the same files, in the same run: per hop a copy and an
  ``openssl dgst -sha256`` of what landed:
  1. raw files -> one tar per package at the telescope buffer (``tar -cf``), dgst;
  2. package tars -> one transfer tar at the telescope buffer (``tar -cf``), dgst;
  3. transfer tar -> cologne buffer -> us buffer (``cp``), dgst at each;
  4. unpack at each LTA-site buffer (``tar -xf``), dgst of every package tar;
  5. package tars -> each site's LTA (``cp``), dgst.

The last line printed is ``ratio <ours/baseline>`` (target <= 2.0).  Everything is written
under ``--dir`` and removed at the end.

    python bench/pipeline.py --size-gb 5
    python bench/pipeline.py --size-gb 0.5     # quick
"""

from __future__ import annotations

# `python bench/X.py` puts bench/ first on sys.path, where bench/packaging.py would shadow
# the `packaging` distribution that kombu imports.  Drop it before importing anything.
import sys as _sys  # noqa: E402
from pathlib import Path as _Path  # noqa: E402

_HERE = _Path(__file__).resolve().parent
_sys.path[:] = [p for p in _sys.path if _Path(p or ".").resolve() != _HERE]

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("CCAT_DATA_TRANSFER_EXECUTION_MODE", "embedded")

from sqlalchemy import func, select  # noqa: E402

from ccat_data_transfer.celery_app import configure_celery  # noqa: E402
from ccat_data_transfer.config.config import settings  # noqa: E402
from ccat_data_transfer.database import DatabaseConnection, dispose_engines  # noqa: E402
from ccat_data_transfer.logging_utils import configure_logging  # noqa: E402
from ccat_data_transfer.orchestrator import Orchestrator  # noqa: E402
from ccat_data_transfer.simulator import InstrumentSimulator  # noqa: E402
from ccat_ops_db import models as m  # noqa: E402
from ccat_ops_db.migrate import upgrade  # noqa: E402
from ccat_ops_db.topology import load_topology  # noqa: E402

TOPOLOGY = (
    Path(__file__).resolve().parent.parent
    / "src"
    / "ccat_data_transfer"
    / "topology"
    / "default.toml"
)
MB = 1024 * 1024


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def dgst(*paths: Path) -> None:
    if paths:
        sh("openssl", "dgst", "-sha256", *map(str, paths))


def archived_everywhere(db: DatabaseConnection) -> tuple[int, int]:
    with db.session_scope() as s:
        pkgs = s.scalar(select(func.count(m.RawDataPackage.id))) or 0
        done = s.scalar(
            select(func.count(m.RawDataPackage.id)).where(
                m.RawDataPackage.state == m.PackageState.ARCHIVED
            )
        )
        lta = s.scalar(
            select(func.count(m.PhysicalCopy.id))
            .join(m.DataLocation, m.DataLocation.id == m.PhysicalCopy.data_location_id)
            .where(
                m.PhysicalCopy.type == "raw_data_package",
                m.PhysicalCopy.status == m.PhysicalCopyStatus.PRESENT,
                m.DataLocation.location_type == m.LocationType.LONG_TERM_ARCHIVE,
            )
        )
    return pkgs, min(done or 0, (lta or 0) // 2)


def run_ours(work: Path, size_gb: float, file_mb: int) -> tuple[float, int, list]:
    data = work / "ours"
    data.mkdir(parents=True)
    url = f"sqlite:///{data / 'ops.sqlite'}"
    upgrade(url)
    settings.set("DATABASE_URL", url)
    settings.set("DATA_DIR", str(data))
    settings.set("RAW_DATA_PACKAGE_QUIET_PERIOD_SECONDS", 0)
    settings.set("DATA_TRANSFER_PACKAGE_MAX_WAIT_SECONDS", 0)
    configure_celery()
    db = DatabaseConnection(url)
    with db.session_scope() as s:
        load_topology(s, TOPOLOGY, data)
        for loc in s.scalars(select(m.DataLocation)):
            if loc.path:
                Path(loc.path).mkdir(parents=True, exist_ok=True)
    files_per_module = 4
    observations = max(1, round(size_gb * 1024 / (file_mb * files_per_module * 2)))
    sim = InstrumentSimulator(
        db=db,
        observations=observations,
        files_per_module=files_per_module,
        file_size=file_mb * MB,
        modules_per_instrument=2,
    )
    while not sim.finished:
        sim.step()
    files = []
    with db.session_scope() as s:
        for rdf, loc in s.execute(
            select(m.RawDataFile.relative_path, m.DataLocation.path).join(
                m.DataLocation, m.DataLocation.id == m.RawDataFile.source_location_id
            )
        ):
            files.append(Path(loc) / rdf)
        total = s.scalar(select(func.sum(m.RawDataFile.size))) or 0
    os.sync()
    orch = Orchestrator(db=db)
    t0 = time.perf_counter()
    while True:
        orch.run_round()
        pkgs, done = archived_everywhere(db)
        if pkgs and done == pkgs:
            break
        if time.perf_counter() - t0 > 3600:
            raise RuntimeError("lifecycle did not finish within an hour")
    elapsed = time.perf_counter() - t0
    stages = [(st.name, st.seconds, st.cycles) for st in orch.stages]
    dispose_engines()
    return elapsed, total, stages, files


def run_baseline(work: Path, files: list[Path], per_package: int) -> float:
    base = work / "baseline"
    tb, cb, ub, cl, ul = (base / n for n in ("tb", "cb", "ub", "cl", "ul"))
    for d in (tb / "pkgs", cb, ub, cl, ul):
        d.mkdir(parents=True)
    groups = [files[i : i + per_package] for i in range(0, len(files), per_package)]
    os.sync()
    t0 = time.perf_counter()
    tars = []
    for n, group in enumerate(groups):  # 1. package tars at the buffer
        tar = tb / "pkgs" / f"pkg_{n}.tar"
        root = os.path.commonpath([str(p.parent) for p in group])
        sh("tar", "-cf", str(tar), "-C", root, *[os.path.relpath(p, root) for p in group])
        tars.append(tar)
    dgst(*tars)
    dtp = tb / "dtp.tar"  # 2. transfer tar
    sh("tar", "-cf", str(dtp), "-C", str(tb / "pkgs"), *[t.name for t in tars])
    dgst(dtp)
    for src, dst in ((dtp, cb / "dtp.tar"), (cb / "dtp.tar", ub / "dtp.tar")):  # 3.
        sh("cp", str(src), str(dst))
        dgst(dst)
    for buf, lta in ((cb, cl), (ub, ul)):  # 4. unpack, 5. to the LTA
        sh("tar", "-xf", str(buf / "dtp.tar"), "-C", str(buf))
        unpacked = [buf / t.name for t in tars]
        dgst(*unpacked)
        for t in unpacked:
            sh("cp", str(t), str(lta / t.name))
        dgst(*[lta / t.name for t in tars])
    os.sync()
    elapsed = time.perf_counter() - t0
    shutil.rmtree(base)
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gb", type=float, default=5.0)
    ap.add_argument("--file-mb", type=int, default=64, help="size of each raw file")
    ap.add_argument("--dir", type=Path, default=None, help="work dir (removed at the end)")
    args = ap.parse_args()
    configure_logging(fmt="json", stream=open(os.devnull, "w"))  # noqa: SIM115
    work = Path(tempfile.mkdtemp(prefix="ccat-bench-pipeline-", dir=args.dir))
    try:
        ours, total, stages, files = run_ours(work, args.size_gb, args.file_mb)
        print(f"ours: {total / 1e9:.2f} GB in {ours:.1f} s", file=sys.stderr)
        for name, secs, cycles in stages:
            print(f"  {name:22} {secs:8.1f} s {cycles:5d} cycles", file=sys.stderr)
        # Same files, same grouping (4 files per module and observation = one package).
        baseline = run_baseline(work, sorted(files), 4)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'run':48} {'s':>8} {'GB/s':>6}")
    print(f"{'ours: embedded lifecycle to both LTAs':48} {ours:8.1f} {total / 1e9 / ours:6.2f}")
    print(
        f"{'baseline: tar/cp + openssl dgst on every hop':48} {baseline:8.1f} "
        f"{total / 1e9 / baseline:6.2f}"
    )
    print(f"ratio {ours / baseline:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
