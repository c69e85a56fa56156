"""Benchmark: bytes through the whole lifecycle against tar/cp + openssl dgst on the same hops.

Writes ``--size-gb`` of raw data with the instrument simulator (not timed), checks that
every raw file is resident in the page cache (``mincore``; read once first), then times,
alternating which goes first run by run, on the same files:

* ours: from the first manager round until every RawDataPackage is PRESENT at both
  LONG_TERM_ARCHIVE locations.  ``--mode embedded`` (default): the orchestrator's rounds
  in this process, tasks in-process, SQLite.  ``--mode celery``: a fresh PostgreSQL
  database, the Redis broker, one Celery worker per site (prefork, 2 children each) and
  the managers (``run --no-init``, 0.2 s between rounds) as separate processes, started
  before the clock (workers) or with it (managers).  Deletion runs in every round, as in
  production; staging is not exercised.
* baseline: per hop a copy and an ``openssl dgst -sha256`` of what landed, the outputs
  synced at the end (one ``sync``):
  1. raw files -> one tar per package at the telescope buffer (``tar -cf``), dgst;
  2. package tars -> one transfer tar at the telescope buffer (``tar -cf``), dgst;
  3. transfer tar -> cologne buffer -> us buffer (``cp``), dgst at each;
  4. unpack at each LTA-site buffer (``tar -xf``), dgst of every package tar;
  5. package tars -> each site's LTA (``cp``), dgst.

Prints each run, the best of each, ``target ours <= 1.3 x baseline``, the ratio and met or
missed, and the load average at the start and the end.  Everything is written under
``--dir`` and removed at the end.

    python bench/pipeline.py --size-gb 2 --runs 2
    python bench/pipeline.py --size-gb 2 --runs 2 --mode celery
"""

from __future__ import annotations

# `python bench/X.py` puts bench/ first on sys.path, where bench/packaging.py would shadow
# the `packaging` distribution that kombu imports.  Drop it before importing anything.
import sys as _sys  # noqa: E402
from pathlib import Path as _Path  # noqa: E402

_HERE = _Path(__file__).resolve().parent
_sys.path[:] = [p for p in _sys.path if _Path(p or ".").resolve() != _HERE]
_sys.path.insert(0, str(_HERE.parent / "tests"))

import argparse
import ctypes
import mmap
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("CCAT_DATA_TRANSFER_EXECUTION_MODE", "embedded")

from sqlalchemy import func, select  # noqa: E402

from ccat_data_transfer.core.celery_app import configure_celery  # noqa: E402
from ccat_data_transfer.core.config import settings  # noqa: E402
from ccat_data_transfer.core.database import DatabaseConnection, dispose_engines  # noqa: E402
from ccat_data_transfer.core.logs import configure_logging  # noqa: E402
from ccat_data_transfer.operations.orchestrator import Orchestrator  # noqa: E402
from ccat_data_transfer.operations.simulator import InstrumentSimulator  # noqa: E402
from ccat_ops_db import models as m  # noqa: E402
from ccat_ops_db.migrate import upgrade  # noqa: E402
from ccat_ops_db.topology import load_topology  # noqa: E402
from helpers_lifecycle import archived_at_both_ltas  # noqa: E402
from helpers_postgres import fresh_database  # noqa: E402

TOPOLOGY = (
    Path(__file__).resolve().parent.parent
    / "src"
    / "ccat_data_transfer"
    / "topology"
    / "default.toml"
)
MB = 1024 * 1024
TARGET = 1.3
CLI = [sys.executable, "-m", "ccat_data_transfer"]
_LIBC = ctypes.CDLL(None, use_errno=True)
_PAGE = os.sysconf("SC_PAGE_SIZE")


def load() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


def resident_fraction(paths: list[Path]) -> float:
    """Fraction of the files' pages in the page cache (``mincore`` on a private mapping,
    which reports the file's cached pages until one is written)."""
    cached = total = 0
    for path in paths:
        size = path.stat().st_size
        if not size:
            continue
        pages = -(-size // _PAGE)
        with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mm:
            anchor = ctypes.c_char.from_buffer(mm)
            vec = (ctypes.c_ubyte * pages)()
            rc = _LIBC.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), size, vec)
            del anchor
            if rc != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            cached += sum(v & 1 for v in vec)
            total += pages
    return cached / total if total else 1.0


def warm(paths: list[Path]) -> float:
    """Read every file (untimed for the runs); returns the fraction then resident."""
    buf = bytearray(MB)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return resident_fraction(paths)


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def dgst(*paths: Path) -> None:
    if paths:
        sh("openssl", "dgst", "-sha256", *map(str, paths))


def archived_everywhere(db: DatabaseConnection) -> bool:
    """Every package ARCHIVED with a PRESENT copy at both LTAs (deletion may still run)."""
    with db.session_scope() as s:
        packages = s.scalar(select(func.count(m.RawDataPackage.id))) or 0
        return packages > 0 and archived_at_both_ltas(s, packages)


@dataclass
class Dataset:
    data: Path
    url: str
    files: list[Path]
    total: int
    cleanup: ExitStack  # closed when the dataset is dropped


def prepare(work: Path, size_gb: float, file_mb: int, mode: str) -> Dataset:
    """A fresh database and locations, and the simulator's raw data (not timed)."""
    data = work / f"ours-{uuid.uuid4().hex[:6]}"
    data.mkdir(parents=True)
    cleanup = ExitStack()
    if mode == "celery":
        url = cleanup.enter_context(fresh_database("ccat_bench"))
    else:
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
    return Dataset(data, url, sorted(files), int(total), cleanup)


def prune(ds: Dataset) -> None:
    """Remove what ours wrote outside SOURCE (untimed; the baseline needs only the raw
    files), so the two runs never need the disk space of both."""
    with DatabaseConnection(ds.url).session_scope() as s:
        paths = s.scalars(
            select(m.DataLocation.path).where(m.DataLocation.location_type != m.LocationType.SOURCE)
        ).all()
    dispose_engines()
    for path in paths:
        if path:
            shutil.rmtree(path, ignore_errors=True)
    os.sync()


def drop(ds: Dataset) -> None:
    dispose_engines()
    ds.cleanup.close()
    shutil.rmtree(ds.data, ignore_errors=True)


def run_ours_embedded(ds: Dataset) -> tuple[float, list]:
    db = DatabaseConnection(ds.url)
    orch = Orchestrator(db=db)
    t0 = time.perf_counter()
    while True:
        orch.run_round()
        if archived_everywhere(db):
            break
        if time.perf_counter() - t0 > 3600:
            raise RuntimeError("lifecycle did not finish within an hour")
    elapsed = time.perf_counter() - t0
    stages = [(st.name, st.seconds, st.cycles) for st in orch.stages]
    dispose_engines()
    return elapsed, stages


def run_ours_celery(ds: Dataset) -> tuple[float, list]:
    import redis

    broker = f"redis://127.0.0.1:6379/{random.randint(4, 15)}"
    redis.Redis.from_url(broker).flushdb()
    env = {
        **os.environ,
        "CCAT_DATA_TRANSFER_EXECUTION_MODE": "distributed",
        "CCAT_DATA_TRANSFER_DATABASE_URL": ds.url,
        "CCAT_DATA_TRANSFER_BROKER_URL": broker,
        "CCAT_DATA_TRANSFER_REDIS_URL": broker,
        "CCAT_DATA_TRANSFER_DATA_DIR": str(ds.data),
        "CCAT_DATA_TRANSFER_LOG_FORMAT": "json",
        "CCAT_DATA_TRANSFER_LOG_LEVEL": "WARNING",
        "CCAT_DATA_TRANSFER_RAW_DATA_PACKAGE_QUIET_PERIOD_SECONDS": "0",
        "CCAT_DATA_TRANSFER_DATA_TRANSFER_PACKAGE_MAX_WAIT_SECONDS": "0",
        "CCAT_DATA_TRANSFER_EMBEDDED_ROUND_SLEEP_SECONDS": "0.2",
    }
    logs = ds.data / "logs"
    logs.mkdir(exist_ok=True)
    procs: list[subprocess.Popen] = []

    def start(name: str, args: list[str]) -> None:
        log = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        procs.append(
            subprocess.Popen(
                CLI + args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        )

    db = DatabaseConnection(ds.url)
    try:
        for site in ("ccat", "cologne", "us"):
            start(f"worker-{site}", ["worker", "--site", site, "--name", f"{site}@bench"])
        time.sleep(8)  # workers up and listening before the clock starts
        t0 = time.perf_counter()
        start("managers", ["run", "--no-init"])
        while True:
            if archived_everywhere(db):
                break
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(f"a process of the celery run exited; logs in {logs}")
            if time.perf_counter() - t0 > 3600:
                raise RuntimeError("lifecycle did not finish within an hour")
            time.sleep(0.2)
        elapsed = time.perf_counter() - t0
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        dispose_engines()
        redis.Redis.from_url(broker).flushdb()
    return elapsed, []


def run_baseline(work: Path, files: list[Path], per_package: int, frees: bool = False) -> float:
    """The baseline's hops; with ``frees`` each intermediate tar (package tars and the
    transfer tar at the telescope, the transfer tar at each LTA-site buffer) is removed
    after its last use (timed; its dirty pages then need no writeback at the final sync,
    which favours the baseline), so a big run needs less disk space."""

    def done_with(*paths: Path) -> None:
        if frees:
            for p in paths:
                p.unlink()

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
    done_with(*tars)
    for src, dst in ((dtp, cb / "dtp.tar"), (cb / "dtp.tar", ub / "dtp.tar")):  # 3.
        sh("cp", str(src), str(dst))
        dgst(dst)
    done_with(dtp)
    for buf, lta in ((cb, cl), (ub, ul)):  # 4. unpack, 5. to the LTA
        sh("tar", "-xf", str(buf / "dtp.tar"), "-C", str(buf))
        done_with(buf / "dtp.tar")
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
    ap.add_argument("--runs", type=int, default=2, help="runs of each, alternating")
    ap.add_argument("--mode", choices=("embedded", "celery"), default="embedded")
    ap.add_argument("--dir", type=Path, default=None, help="work dir (removed at the end)")
    ap.add_argument(
        "--baseline-frees",
        action="store_true",
        help="the baseline removes each intermediate file after its last use (less disk)",
    )
    args = ap.parse_args()
    configure_logging(fmt="json", stream=open(os.devnull, "w"))  # noqa: SIM115
    work = Path(tempfile.mkdtemp(prefix="ccat-bench-pipeline-", dir=args.dir))
    run_ours = run_ours_celery if args.mode == "celery" else run_ours_embedded
    load0 = load()
    ours: list[float] = []
    base: list[float] = []
    cache: list[str] = []
    total = 0
    try:
        for run in range(args.runs):
            ds = prepare(work, args.size_gb, args.file_mb, args.mode)
            total = ds.total
            try:
                order = ("ours", "baseline") if run % 2 == 0 else ("baseline", "ours")
                for name in order:
                    resident = warm(ds.files)
                    cache.append(f"{name} {100 * resident:.0f}%")
                    if name == "ours":
                        t, stages = run_ours(ds)
                        ours.append(t)
                        prune(ds)
                        print(
                            f"run {run} ours {t:.1f} s, files cached {resident:.0%}",
                            file=sys.stderr,
                        )
                        for stage, secs, cycles in stages:
                            print(f"  {stage:22} {secs:8.1f} s {cycles:5d} cycles", file=sys.stderr)
                    else:
                        # Same files, same grouping (4 files per module and observation).
                        t = run_baseline(work, ds.files, 4, args.baseline_frees)
                        base.append(t)
                        print(
                            f"run {run} baseline {t:.1f} s, files cached {resident:.0%}",
                            file=sys.stderr,
                        )
            finally:
                drop(ds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    gb = total / 1e9
    where = "PostgreSQL + Celery workers" if args.mode == "celery" else "embedded, SQLite"
    print(
        f"{gb:.2f} GB in {args.file_mb} MB files, {where}; {os.cpu_count()} cpus; "
        f"load {load0} at start, {load()} at end; page-cached before each run: {', '.join(cache)}"
    )
    print(f"{'run':48} {'best s':>8} {'GB/s':>6}   all runs (s)")
    for label, times in (
        ("ours: the lifecycle to both LTAs", ours),
        ("baseline: tar/cp + openssl dgst on every hop", base),
    ):
        runs = " ".join(f"{t:.1f}" for t in times)
        print(f"{label:48} {min(times):8.1f} {gb / min(times):6.2f}   {runs}")
    ratio = min(ours) / min(base)
    print(
        f"target ours <= {TARGET}x baseline: ratio {ratio:.2f} -> "
        f"{'met' if ratio <= TARGET else 'missed'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
