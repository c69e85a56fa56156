"""Benchmark: the deletion manager at observatory scale on PostgreSQL, against baselines
measured in the same run.

For each scale (default 100,000 and 1,000,000 raw files; ``--10m`` adds 10,000,000), a
PostgreSQL database is created, migrated, loaded with the default topology and filled
set-based by ``bench/deletion_fill.py`` (``INSERT ... SELECT generate_series``; 10M in
about 6 minutes): RawDataPackages of ``--files-per-package`` files, DataTransferPackages
of 10 packages, DataTransfers, physical copies at 7 locations (two SOURCEs, the telescope
buffer, the two LTA-site buffers and the two LTAs) and the audit trail.  The database is
dropped at the end, or kept with ``--keep`` (``ccat_bench_keep_<files>``, reused as it is
by the next run with ``--keep``; measures (b) and (c) change it).

The idle state is a steady state with its history in which nothing is eligible:
``--inflight`` packages in transfer (their raw files PRESENT at SOURCE: the backlog, the
same at every scale), ``--retained`` archived packages whose files are DELETION_POSSIBLE
since a day (in retention), and every older package archived and done: PRESENT at both
LTAs, DELETED at SOURCE and at every buffer, its raw files DELETED, with one audit row per
DELETED copy and the batch rows that scheduled them (see ``deletion_fill.fill``).

Measured (best of ``--runs``, alternating ours and the baseline):

(a) idle: ``deletion_manager.run_once`` as it runs between two stage-1 catch-ups (which
    run every DELETION_MARK_CATCHUP_SECONDS) and in a cycle that runs the catch-up,
    against the same cycle's own statements: every statement with its parameters and
    every COMMIT recorded from a warm cycle, replayed through the bare DB-API cursor (the
    project's SQL without its Python).  Targets: at most 10 ms between catch-ups, at most
    20 ms with the catch-up.  The ratio is printed, not targeted.
(b) mark: every package ready (ARCHIVED, left the source site) and all N raw-file copies
    PRESENT; ``mark_raw_data_files_for_deletion(session)`` + commit (including its audit
    rows) against one ``UPDATE physical_copy SET status='DELETION_POSSIBLE',
    deletion_possible_at=now() WHERE <same rule>`` + commit.  Target: at most 1.5x.
(c) schedule: all N copies DELETION_POSSIBLE past retention;
    ``process_deletion_possible_raw_data_files(session)`` - per location: selection,
    claim ``DELETION_POSSIBLE -> DELETION_SCHEDULED``, one SCHEDULED audit row per batch
    listing its copies (the worker writes the per-copy DELETED rows), commit, and
    submission of one Celery task per batch to an in-memory broker (tasks are published,
    not executed) - against one ``UPDATE ... SET status='DELETION_SCHEDULED' WHERE
    status='DELETION_POSSIBLE' AND <same rule>`` + commit (no audit rows, no task).
    DELETION_BATCH_SIZE is raised so that one call covers all N copies (the cycle limit
    is 10 batches per location).  Target: at most 1.5x.

Between measured runs of (b) and (c), state is restored with one UPDATE (and the audit
trail truncated), then ``VACUUM ANALYZE`` (not timed).  Each line of the report gives the
load average of the last minute.

    python bench/deletion_scale.py                    # 100k and 1M
    python bench/deletion_scale.py --only idle --10m --keep      # (a) at 100k, 1M and 10M
    python bench/deletion_scale.py --scales 100000 --only idle   # (a) only, quick
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
import contextlib
import functools
import importlib.util
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("CCAT_DATA_TRANSFER_EXECUTION_MODE", "embedded")

from sqlalchemy import create_engine, event, text  # noqa: E402

from ccat_data_transfer import deletion_manager as dm  # noqa: E402
from ccat_data_transfer.core.celery_app import app as celery_app  # noqa: E402
from ccat_data_transfer.core.config import settings  # noqa: E402
from ccat_data_transfer.core.database import DatabaseConnection, dispose_engines  # noqa: E402
from ccat_data_transfer.core.logs import configure_logging  # noqa: E402
from ccat_ops_db.migrate import upgrade  # noqa: E402
from ccat_ops_db.topology import load_topology  # noqa: E402
from helpers_postgres import ensure_database, fresh_database  # noqa: E402

TOPOLOGY = (
    Path(__file__).resolve().parent.parent
    / "src"
    / "ccat_data_transfer"
    / "topology"
    / "default.toml"
)


def _sibling(name: str):
    """A module of bench/ by its path (bench/ is not on sys.path: see above)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", _HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


_fill = _sibling("deletion_fill")
fill = _fill.fill
MB = _fill.MB


LTA_PRESENT = """EXISTS (SELECT 1 FROM physical_copy l JOIN data_location ll
        ON ll.id = l.data_location_id
    WHERE l.raw_data_package_id = {pkg} AND l.type = 'raw_data_package'
      AND l.status = 'PRESENT' AND l.lost_at IS NULL
      AND ll.location_type = 'LONG_TERM_ARCHIVE' AND ll.active)"""

FILE_RULE = f"""pc.type = 'raw_data_file' AND pc.lost_at IS NULL
  AND pc.data_location_id IN (SELECT id FROM data_location
                              WHERE location_type IN ('SOURCE', 'BUFFER'))
  AND EXISTS (SELECT 1 FROM raw_data_file f JOIN raw_data_package p
                ON p.id = f.raw_data_package_id
              WHERE f.id = pc.raw_data_file_id AND p.state = 'ARCHIVED'
                AND {LTA_PRESENT.format(pkg="p.id")})"""

LEFT_SOURCE = """NOT EXISTS (SELECT 1 FROM physical_copy s JOIN data_location sl
        ON sl.id = s.data_location_id JOIN site ON site.id = sl.site_id
    WHERE s.raw_data_package_id = f.raw_data_package_id AND s.type = 'raw_data_package'
      AND s.status <> 'DELETED' AND sl.location_type IN ('SOURCE', 'BUFFER')
      AND sl.site_id IN (SELECT site_id FROM data_location WHERE location_type = 'SOURCE'))"""

MARK_RULE = (
    FILE_RULE
    + f"""
  AND EXISTS (SELECT 1 FROM raw_data_file f WHERE f.id = pc.raw_data_file_id
              AND {LEFT_SOURCE} AND {
        LEFT_SOURCE.replace("NOT EXISTS", "EXISTS").replace("<> 'DELETED'", "= 'DELETED'")
    })"""
)

BARE_MARK = f"""UPDATE physical_copy pc SET status = 'DELETION_POSSIBLE',
    deletion_possible_at = now() AT TIME ZONE 'utc'
WHERE pc.status = 'PRESENT' AND {MARK_RULE}"""

BARE_SCHEDULE = f"""UPDATE physical_copy pc SET status = 'DELETION_SCHEDULED',
    deletion_scheduled_at = now() AT TIME ZONE 'utc'
WHERE pc.status = 'DELETION_POSSIBLE' AND pc.deletion_possible_at IS NOT NULL
  AND pc.deletion_possible_at <= now() AT TIME ZONE 'utc' - interval '{{minutes}} minutes'
  AND {FILE_RULE}"""

# ---------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------


def best(
    fn: Callable[[], object], reset: Callable[[], None] | None, runs: int
) -> tuple[float, list]:
    times = []
    for _ in range(runs):
        if reset:
            reset()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), times


def alternate(
    ours: Callable[[], object],
    bare: Callable[[], object],
    reset: Callable[[], None] | None,
    runs: int,
) -> tuple[float, float]:
    """Best of ``runs`` for each, interleaved so that noise hits both alike."""
    to, tb = [], []
    for _ in range(runs):
        to.append(best(ours, reset, 1)[0])
        tb.append(best(bare, reset, 1)[0])
    return min(to), min(tb)


def run_scale(
    n_files: int,
    n_pkgs: int,
    inflight: int,
    runs: int,
    only: tuple[str, ...] = ("idle", "mark", "schedule"),
    retained: int | None = None,
    keep: str | None = None,
) -> list[dict]:
    """Measure at one scale.  ``keep``: a database name to fill once and keep (filled
    already: used as it is; measure (b) and (c) change it), else a fresh one dropped at
    the end."""
    if keep is None:
        database, exists = fresh_database("ccat_bench"), False
    else:
        url, exists = ensure_database(keep)
        database = contextlib.nullcontext(url)
    results: list[dict] = []
    with database as url:
        settings.set("DATABASE_URL", url)
        tmp = tempfile.mkdtemp(prefix="ccat-bench-del-")
        settings.set("DATA_DIR", tmp)
        db = DatabaseConnection(url)
        engine = create_engine(url)
        vac = create_engine(url, isolation_level="AUTOCOMMIT")

        def vacuum() -> None:
            with vac.connect() as c:
                c.execute(text("VACUUM ANALYZE"))

        t0 = time.perf_counter()
        if not exists:
            upgrade(url)
            with db.session_scope() as s:
                load_topology(s, TOPOLOGY, Path(tmp))
            with engine.begin() as conn:
                fill(conn, n_files, n_pkgs, inflight, retained)
            vacuum()
        with engine.connect() as c:
            rows = c.execute(text("SELECT count(*) FROM physical_copy")).scalar_one()
            logs = c.execute(text("SELECT count(*) FROM deletion_log")).scalar_one()
        print(
            f"[{n_files:,} files] {'filled' if not exists else 'reused'} in "
            f"{time.perf_counter() - t0:.1f} s (load {os.getloadavg()[0]:.2f}): "
            f"{n_pkgs:,} packages, {rows:,} physical copies, {logs:,} audit rows",
            file=sys.stderr,
        )
        if "idle" in only:
            results += measure_idle(db, n_files, runs)
        if "mark" in only:
            results += measure_mark(db, engine, vacuum, n_files, runs)
        if "schedule" in only:
            results += measure_schedule(db, engine, vacuum, n_files, runs)
        engine.dispose()
        vac.dispose()
        dispose_engines()
    return results


class _Recorder:
    """Records what a cycle sends to the database: every statement with its parameters,
    and each COMMIT / ROLLBACK, in order; :meth:`replay` sends the same through the bare
    DB-API cursor (the baseline: the project's own SQL without the project's Python)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.script: list[tuple[str, object, bool]] = []

    def __enter__(self) -> _Recorder:
        event.listen(self.engine, "before_cursor_execute", self._statement)
        event.listen(self.engine, "commit", self._commit)
        event.listen(self.engine, "rollback", self._rollback)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._statement)
        event.remove(self.engine, "commit", self._commit)
        event.remove(self.engine, "rollback", self._rollback)

    def _statement(self, conn, cursor, statement, parameters, context, executemany) -> None:
        self.script.append((statement, parameters, executemany))

    def _commit(self, conn) -> None:
        self.script.append(("COMMIT", None, False))

    def _rollback(self, conn) -> None:
        self.script.append(("ROLLBACK", None, False))

    def replay(self, raw) -> None:
        cur = raw.cursor()
        for statement, parameters, many in self.script:
            if statement == "COMMIT":
                raw.commit()
            elif statement == "ROLLBACK":
                raw.rollback()
            elif many:
                cur.executemany(statement, parameters)
            else:
                cur.execute(statement, parameters)
                if cur.description is not None:
                    cur.fetchall()
        raw.rollback()


def measure_idle(db: DatabaseConnection, n: int, runs: int) -> list[dict]:
    """The idle cycle between two catch-ups, and with the stage-1 catch-up, each against
    its own statements replayed through the bare cursor (recorded from a warm cycle)."""
    summary: dict = {}

    def ours() -> None:
        with db.session_scope() as s:
            summary.update(dm.run_once(s))

    engine = db.engine
    results = []
    # The stage-1 catch-up runs at most every DELETION_MARK_CATCHUP_SECONDS (default 300 s):
    # first the cycles in between (its interval not yet passed), then one that includes it.
    for label, catch_up, target in (
        ("idle deletion cycle (run_once)", 3600, 0.010),
        ("idle cycle incl. stage-1 catch-up", 0, 0.020),
    ):
        settings.set("DELETION_MARK_CATCHUP_SECONDS", catch_up)
        try:
            for _ in range(3):
                ours()  # warm up: imports, compiled statements, connection pool, prepares
            with _Recorder(engine) as rec:
                ours()
            raw = engine.raw_connection()
            for _ in range(3):
                rec.replay(raw)
            t_ours, t_bare = alternate(
                ours, functools.partial(rec.replay, raw), None, max(runs, 5) * 4
            )
            raw.close()
        finally:
            settings.unset("DELETION_MARK_CATCHUP_SECONDS")
        did = {k: v for k, v in summary.items() if k != "buffer_states" and v}
        assert not did, f"the idle cycle did something: {did}"
        statements = sum(1 for q, _, _ in rec.script if q not in ("COMMIT", "ROLLBACK"))
        results.append(row(f"{label} [{statements} stmts]", n, t_ours, t_bare, None, max_s=target))
    return results


def make_all_ready(engine) -> None:
    """Every package ready: ARCHIVED, PRESENT at both LTAs, gone from the source site
    (idempotent; (b) and (c) start from here)."""
    with engine.begin() as c:
        c.execute(
            text(
                """UPDATE raw_data_package SET state = 'ARCHIVED', status = 'COMPLETED',
                   archived_at = now() WHERE state <> 'ARCHIVED'"""
            )
        )
        c.execute(
            text(
                """UPDATE physical_copy SET status = 'DELETED', deleted_at = now()
                   WHERE type IN ('raw_data_package', 'data_transfer_package')
                     AND status = 'PRESENT' AND data_location_id IN
                       (SELECT id FROM data_location WHERE location_type = 'BUFFER')"""
            )
        )
        c.execute(
            text(
                """INSERT INTO physical_copy (type, data_location_id, status, size, created_at,
                       deletion_retry_count, raw_data_package_id)
                   SELECT 'raw_data_package', l.id, 'PRESENT', p.size, now(), 0, p.id
                   FROM raw_data_package p CROSS JOIN data_location l
                   WHERE l.location_type = 'LONG_TERM_ARCHIVE' AND NOT EXISTS (
                     SELECT 1 FROM physical_copy x WHERE x.raw_data_package_id = p.id
                       AND x.data_location_id = l.id)"""
            )
        )
        # Proof: the package's checksum, verified now (measure (c) keeps it fresh by
        # raising LTA_PROOF_MAX_AGE_SECONDS for its duration).
        c.execute(
            text(
                """UPDATE physical_copy pc SET checksum = p.checksum,
                       verified_at = now() AT TIME ZONE 'utc'
                   FROM raw_data_package p, data_location l
                   WHERE p.id = pc.raw_data_package_id AND l.id = pc.data_location_id
                     AND pc.type = 'raw_data_package'
                     AND l.location_type = 'LONG_TERM_ARCHIVE'"""
            )
        )


def measure_mark(db: DatabaseConnection, engine, vacuum, n: int, runs: int) -> list[dict]:
    # Every package ready; every raw file copy PRESENT (reset below).
    make_all_ready(engine)

    def reset() -> None:
        with engine.begin() as c:
            c.execute(
                text(
                    """UPDATE physical_copy SET status = 'PRESENT', deletion_possible_at = NULL
                       WHERE type = 'raw_data_file' AND status <> 'PRESENT'"""
                )
            )
            c.execute(text("TRUNCATE deletion_log_copy, deletion_log"))
        vacuum()

    marked = {}

    def ours() -> None:
        with db.session_scope() as s:
            marked["n"] = dm.mark_raw_data_files_for_deletion(s)

    def bare() -> None:
        with engine.begin() as c:
            marked["bare"] = c.execute(text(BARE_MARK)).rowcount

    t_ours, t_bare = alternate(ours, bare, reset, runs)
    assert marked["n"] == n == marked["bare"], marked
    return [row("mark N raw files DELETION_POSSIBLE", n, t_ours, t_bare, 1.5)]


def measure_schedule(db: DatabaseConnection, engine, vacuum, n: int, runs: int) -> list[dict]:
    make_all_ready(engine)
    minutes = int(settings.RETENTION_PERIOD_MINUTES)
    n_src = 2
    # One call schedules everything: the cycle limit is 10 batches per location.
    settings.set("DELETION_BATCH_SIZE", max(1000, -(-n // (n_src * 10))))
    settings.set("LTA_PROOF_MAX_AGE_SECONDS", 10**9)  # the proof stays fresh for the measure
    # Tasks are published to an in-memory broker and never executed.
    celery_app.conf.update(task_always_eager=False, broker_url="memory://")

    def reset() -> None:
        with engine.begin() as c:
            c.execute(
                text(
                    f"""UPDATE physical_copy SET status = 'DELETION_POSSIBLE',
                          deletion_possible_at = now() AT TIME ZONE 'utc'
                              - interval '{minutes + 1440} minutes',
                          deletion_scheduled_at = NULL
                       WHERE type = 'raw_data_file'"""
                )
            )
            c.execute(text("TRUNCATE deletion_log_copy, deletion_log"))
        vacuum()
        _drain_memory_broker()

    done = {}

    def ours() -> None:
        with db.session_scope() as s:
            done["n"] = dm.process_deletion_possible_raw_data_files(s)

    def bare() -> None:
        with engine.begin() as c:
            done["bare"] = c.execute(text(BARE_SCHEDULE.format(minutes=minutes))).rowcount

    try:
        t_ours, t_bare = alternate(ours, bare, reset, runs)
    finally:
        celery_app.conf.update(task_always_eager=True)
        settings.unset("DELETION_BATCH_SIZE")
        settings.unset("LTA_PROOF_MAX_AGE_SECONDS")
    assert done["n"] == n == done["bare"], done
    return [row("schedule bulk deletion of N raw files", n, t_ours, t_bare, 1.5)]


def _drain_memory_broker() -> None:
    """Forget the messages published by the previous run (kombu's memory transport)."""
    try:
        from kombu.transport import memory

        memory.Channel.queues.clear()
    except Exception:  # noqa: BLE001 - best effort: only memory use
        pass


def row(
    what: str,
    n: int,
    ours: float,
    bare: float,
    max_ratio: float | None,
    max_s: float | None = None,
) -> dict:
    """One line of the report, with the load average of the last minute when measured."""
    ratio = ours / bare if bare else float("inf")
    met = (max_ratio is None or ratio <= max_ratio) and (max_s is None or ours <= max_s)
    target = ", ".join(
        ([f"<= {max_ratio:g}x"] if max_ratio is not None else [])
        + ([f"<= {max_s * 1000:.0f} ms"] if max_s else [])
    )
    load = os.getloadavg()[0]
    return dict(
        what=what, n=n, ours=ours, bare=bare, ratio=ratio, target=target, met=met, load=load
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scales", default="100000,1000000", help="raw files per run")
    ap.add_argument("--10m", dest="ten_m", action="store_true", help="also 10,000,000 raw files")
    ap.add_argument("--files-per-package", type=int, default=50)
    ap.add_argument("--inflight", type=int, default=200, help="packages in transfer (idle)")
    ap.add_argument(
        "--retained", type=int, default=2000, help="archived packages still in retention"
    )
    ap.add_argument("--runs", type=int, default=3, help="best of N (idle: 2*max(N,5))")
    ap.add_argument(
        "--keep",
        action="store_true",
        help="keep each scale's database (ccat_bench_keep_<files>) and reuse it next time",
    )
    ap.add_argument(
        "--only",
        default="idle,mark,schedule",
        help="comma-separated subset of the measures: idle (a), mark (b), schedule (c)",
    )
    args = ap.parse_args()
    # JSON log lines are rendered as in production, into /dev/null.
    configure_logging(fmt="json", stream=open(os.devnull, "w"))  # noqa: SIM115
    print(f"python {platform.python_version()}, {os.cpu_count()} cpus", file=sys.stderr)
    results = []
    scales = [int(x) for x in args.scales.split(",")] + ([10_000_000] if args.ten_m else [])
    for n in scales:
        pkgs = n // args.files_per_package
        only = tuple(x.strip() for x in args.only.split(",") if x.strip())
        inflight = min(args.inflight, pkgs // 4)
        retained = min(args.retained, pkgs // 4)
        keep = f"ccat_bench_keep_{n}" if args.keep else None
        results += run_scale(n, pkgs, inflight, args.runs, only, retained, keep)
        # Each line as soon as measured (a 10M scale takes minutes to fill).
        for r in results[-len(only) * 2 :]:
            print(_line(r), file=sys.stderr, flush=True)
    print(
        f"{'measure':48} {'files':>10} {'ours':>9} {'baseline':>9} {'ratio':>6} {'load':>5}  target"
    )
    for r in results:
        print(_line(r))
    return 0


def _line(r: dict) -> str:
    return (
        f"{r['what']:48} {r['n']:>10,} {_ms(r['ours']):>9} {_ms(r['bare']):>9} "
        f"{r['ratio']:>6.2f} {r['load']:>5.2f}  {r['target']} "
        f"{'met' if r['met'] else 'MISSED'}"
    )


def _ms(s: float) -> str:
    return f"{s * 1000:.1f} ms" if s < 10 else f"{s:.2f} s"


if __name__ == "__main__":
    sys.exit(main())
