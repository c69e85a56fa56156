"""Benchmark: the deletion manager at observatory scale on PostgreSQL, against bare SQL.

For each scale (default 1,000,000 and 100,000 raw files), a fresh PostgreSQL database is
created, migrated, loaded with the default topology and filled with set-based SQL
(``INSERT ... SELECT generate_series``): ``--packages`` RawDataPackages of equal size,
their files, DataTransferPackages of 10 packages, DataTransfers, and physical copies at 7
locations (two SOURCEs, the telescope buffer, the two LTA-site buffers and the two LTAs).
The database is dropped at the end.

The idle state is a realistic steady state in which nothing is eligible:

* all but ``--inflight`` packages are ARCHIVED: PRESENT at both LTAs, DELETED from every
  buffer and from SOURCE; their raw files at SOURCE are DELETION_POSSIBLE since one day
  (retention, 30 days, has not passed);
* ``--inflight`` packages (the same number at every scale: the backlog depends on the
  data rate, not on the history) are in transfer: PRESENT at the telescope buffer, their
  transfer package IN_PROGRESS, their raw files PRESENT at SOURCE.

Measured, each against bare SQL on the same data (best of ``--runs``, alternating):

(a) idle: ``deletion_manager.run_once`` (twice: as it runs between two stage-1 catch-ups,
    which run every DELETION_MARK_CATCHUP_SECONDS, and with the catch-up in every cycle)
    against the lower bound = one hand-written SQL
    statement per rule of the cycle, each returning the copies the rule would act on
    (failed copies to retry, stalled deletions, transfer packages and raw packages
    deletable at buffers, processing and staged raw files, raw files to mark
    DELETION_POSSIBLE, DELETION_POSSIBLE files past retention) sent through the bare
    DB-API cursor.  Target: at most 100 ms and at most 3x the lower bound.
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

Between measured runs, state is restored with one UPDATE (and deletion_log truncated),
then ``VACUUM ANALYZE`` (not timed).

    python bench/deletion_scale.py                    # 1M and 100k
    python bench/deletion_scale.py --scales 100000    # quick
    python bench/deletion_scale.py --scales 100000 --only idle   # (a) only
"""

from __future__ import annotations

# `python bench/X.py` puts bench/ first on sys.path, where bench/packaging.py would shadow
# the `packaging` distribution that kombu imports.  Drop it before importing anything.
import sys as _sys  # noqa: E402
from pathlib import Path as _Path  # noqa: E402

_HERE = _Path(__file__).resolve().parent
_sys.path[:] = [p for p in _sys.path if _Path(p or ".").resolve() != _HERE]

import argparse
import contextlib
import functools
import os
import platform
import re
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("CCAT_DATA_TRANSFER_EXECUTION_MODE", "embedded")

from sqlalchemy import create_engine, event, text  # noqa: E402

from ccat_data_transfer import deletion_manager as dm  # noqa: E402
from ccat_data_transfer.celery_app import app as celery_app  # noqa: E402
from ccat_data_transfer.config.config import settings  # noqa: E402
from ccat_data_transfer.database import DatabaseConnection, dispose_engines  # noqa: E402
from ccat_data_transfer.logging_utils import configure_logging  # noqa: E402
from ccat_ops_db.migrate import upgrade  # noqa: E402
from ccat_ops_db.topology import load_topology  # noqa: E402

ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
TOPOLOGY = (
    Path(__file__).resolve().parent.parent
    / "src"
    / "ccat_data_transfer"
    / "topology"
    / "default.toml"
)
LOCS = (
    "primecam_raw_data",
    "chai_raw_data",
    "ccat_telescope_buffer",
    "cologne_buffer",
    "us_buffer",
    "cologne_lta",
    "us_lta",
)
PKGS_PER_DTP = 10
MB = 1024 * 1024


# ---------------------------------------------------------------------------------------
# Fill
# ---------------------------------------------------------------------------------------

#: Tables the fill loads by the million: their secondary indexes are dropped for the load
#: and built again after it (much faster than maintaining them row by row).
BIG = ("raw_data_file", "physical_copy", "deletion_log", "deletion_log_copy")


def fill(conn, n_files: int, n_pkgs: int, inflight: int, retained: int | None = None) -> None:
    """The idle state with its history, set-based.  Package p (1..P) is in flight when
    p >= fi = P - inflight + 1, archived and in retention when fr <= p < fi (``retained``
    packages, default as many as in flight), archived and done before that: the history.

    * raw-file copies (at SOURCE, ids 1..N): PRESENT (in flight), DELETION_POSSIBLE since
      one day (in retention), or DELETED with one DELETED audit row each (the history);
    * package copies: the SOURCE tar DELETED; archived packages DELETED at the three
      buffers and PRESENT at both LTAs (the package's checksum, verified an hour ago);
      in-flight packages PRESENT at the telescope buffer; an audit row per DELETED copy;
    * per archived package one MARKED_POSSIBLE row, per done package one SCHEDULED batch
      row listing its file copies (``copy_ids`` and ``deletion_log_copy``)."""
    retained = inflight if retained is None else retained
    loc = dict(conn.execute(text("SELECT name, id FROM data_location")).all())
    ids = {k: loc[k] for k in LOCS}
    im = conn.execute(text("SELECT min(id) FROM instrument_module")).scalar_one()
    per = n_files // n_pkgs
    n_dtp = (n_pkgs + PKGS_PER_DTP - 1) // PKGS_PER_DTP
    first_inflight = n_pkgs - inflight + 1
    first_retained = max(1, first_inflight - retained)
    first_inflight_dtp = (first_inflight - 1) // PKGS_PER_DTP + 1
    p = dict(
        P=n_pkgs,
        N=n_files,
        F=per,
        D=n_dtp,
        K=PKGS_PER_DTP,
        fi=first_inflight,
        fr=first_retained,
        fd=first_inflight_dtp,
        im=im,
        mb=MB,
        **ids,
    )
    src = "CASE WHEN {g} % 2 = 0 THEN :primecam_raw_data ELSE :chai_raw_data END"
    pkg = "((g - 1) / :F + 1)"
    stmts = [
        # No FK triggers while loading (every reference is made consistent by construction).
        "SET LOCAL session_replication_role = replica",
        "SET LOCAL work_mem = '256MB'",
        "INSERT INTO obs_unit (id, name, created_at) VALUES (1, 'bench', now())",
        """INSERT INTO executed_obs_unit (id, name, obs_unit_id, status, created_at, finished_at)
           SELECT g, 'eou_' || g, 1, 'COMPLETED', now(), now() FROM generate_series(1, :P) g""",
        """INSERT INTO data_transfer_package (id, file_name, relative_path, size, checksum,
               checksum_algorithm, status, origin_location_id, created_at)
           SELECT d, 'dtp_' || d || '.tar', 'data_transfer_packages/dtp_' || d || '.tar',
               :K * :F * :mb, md5(d::text), 'sha256',
               CASE WHEN d >= :fd THEN 'IN_PROGRESS' ELSE 'COMPLETED' END,
               :ccat_telescope_buffer, now() - interval '2 days'
           FROM generate_series(1, :D) d""",
        f"""INSERT INTO raw_data_package (id, file_name, relative_path, size, checksum,
               checksum_algorithm, state, status, executed_obs_unit_id, instrument_module_id,
               part_number, source_location_id, data_transfer_package_id, created_at,
               archived_at)
           SELECT g, 'pkg_' || g || '.tar', 'raw_data_packages/x/m/pkg_' || g || '.tar',
               :F * :mb, md5(g::text), 'sha256',
               CASE WHEN g >= :fi THEN 'TRANSFERRING' ELSE 'ARCHIVED' END,
               CASE WHEN g >= :fi THEN 'IN_PROGRESS' ELSE 'COMPLETED' END,
               g, :im, 1, {src.format(g="g")}, (g - 1) / :K + 1, now() - interval '2 days',
               CASE WHEN g >= :fi THEN NULL ELSE now() - interval '1 day' END
           FROM generate_series(1, :P) g""",
        f"""INSERT INTO raw_data_file (id, relative_path, size, checksum, checksum_algorithm,
               instrument_module_id, executed_obs_unit_id, source_location_id,
               raw_data_package_id, created_at)
           SELECT md5('f' || g)::uuid, 'obs/' || {pkg} || '/f_' || g || '.dat',
               :mb, md5(g::text), 'sha256', :im, {pkg}, {src.format(g=pkg)}, {pkg},
               now() - interval '3 days'
           FROM generate_series(1, :N) g""",
        # transfers: primary telescope buffer -> cologne, secondary cologne -> us
        """INSERT INTO data_transfer (data_transfer_package_id, origin_location_id,
               destination_location_id, transfer_method, is_primary, status, unpack_status,
               bytes_transferred, retry_count, unpack_retry_count, created_at, updated_at)
           SELECT d, :ccat_telescope_buffer, :cologne_buffer, 'COPY', true,
               CASE WHEN d >= :fd THEN 'IN_PROGRESS' ELSE 'COMPLETED' END,
               CASE WHEN d >= :fd THEN 'PENDING' ELSE 'COMPLETED' END, 0, 0, 0, now(), now()
           FROM generate_series(1, :D) d
           UNION ALL
           SELECT d, :cologne_buffer, :us_buffer, 'COPY', false, 'COMPLETED', 'COMPLETED',
               0, 0, 0, now(), now()
           FROM generate_series(1, :fd - 1) d""",
        # raw file copies at SOURCE, ids 1..N (the audit rows below refer to them)
        f"""INSERT INTO physical_copy (id, type, data_location_id, status, size, created_at,
               deletion_possible_at, deleted_at, deletion_retry_count, raw_data_file_id)
           SELECT g, 'raw_data_file', {src.format(g=pkg)},
               CASE WHEN {pkg} >= :fi THEN 'PRESENT'
                    WHEN {pkg} >= :fr THEN 'DELETION_POSSIBLE' ELSE 'DELETED' END,
               :mb, now() - interval '3 days',
               CASE WHEN {pkg} >= :fi THEN NULL ELSE now() - interval '1 day' END,
               CASE WHEN {pkg} >= :fr THEN NULL ELSE now() - interval '1 hour' END,
               0, md5('f' || g)::uuid
           FROM generate_series(1, :N) g""",
        "SELECT setval(pg_get_serial_sequence('physical_copy', 'id'), :N)",
        # transfer package copies: DELETED at the three buffers, or PRESENT at the
        # telescope buffer while in flight
        """INSERT INTO physical_copy (type, data_location_id, status, size, created_at,
               deleted_at, deletion_retry_count, data_transfer_package_id)
           SELECT 'data_transfer_package', l, 'DELETED', 0, now() - interval '2 days',
               now() - interval '1 day', 0, d
           FROM generate_series(1, :fd - 1) d,
               unnest(ARRAY[:ccat_telescope_buffer, :cologne_buffer, :us_buffer]) l
           UNION ALL
           SELECT 'data_transfer_package', :ccat_telescope_buffer, 'PRESENT', 0,
               now() - interval '2 days', NULL, 0, d
           FROM generate_series(:fd, :D) d""",
        # raw package copies: SOURCE tar DELETED (moved to the buffer); archived ones DELETED
        # at the three buffers and PRESENT at both LTAs; in-flight ones PRESENT at the
        # telescope buffer
        f"""INSERT INTO physical_copy (type, data_location_id, status, size, checksum,
               created_at, verified_at, deleted_at, deletion_retry_count, raw_data_package_id)
           SELECT 'raw_data_package', {src.format(g="g")}, 'DELETED', :F * :mb, NULL,
               now() - interval '2 days', NULL::timestamp, now() - interval '2 days', 0, g
           FROM generate_series(1, :P) g
           UNION ALL
           SELECT 'raw_data_package', l, 'DELETED', :F * :mb, NULL, now() - interval '2 days',
               NULL, now() - interval '1 day', 0, g
           FROM generate_series(1, :fi - 1) g,
               unnest(ARRAY[:ccat_telescope_buffer, :cologne_buffer, :us_buffer]) l
           UNION ALL
           SELECT 'raw_data_package', l, 'PRESENT', :F * :mb, md5(g::text),
               now() - interval '1 day', now() - interval '1 hour', NULL, 0, g
           FROM generate_series(1, :fi - 1) g, unnest(ARRAY[:cologne_lta, :us_lta]) l
           UNION ALL
           SELECT 'raw_data_package', :ccat_telescope_buffer, 'PRESENT', :F * :mb, NULL,
               now() - interval '1 day', NULL, NULL, 0, g
           FROM generate_series(:fi, :P) g""",
        # the audit trail: a DELETED row per DELETED copy (ids 1..), then per package a
        # MARKED_POSSIBLE row (archived) and a SCHEDULED batch row (done) with its members
        """INSERT INTO deletion_log (id, created_at, physical_copy_id, copy_type,
               data_location_id, location_name, size_bytes, reason, outcome, actor, message)
           SELECT row_number() OVER (ORDER BY pc.id), coalesce(pc.deleted_at, now()), pc.id,
               pc.type, pc.data_location_id, dl.name, pc.size, 'parent_package_archived',
               'DELETED', 'deletion_worker', 'deleted'
           FROM physical_copy pc JOIN data_location dl ON dl.id = pc.data_location_id
           WHERE pc.status = 'DELETED'""",
    ]
    # ids of the per-package rows: base + 2g - 1 (MARKED_POSSIBLE), base + 2g (SCHEDULED)
    batches = [
        f"""INSERT INTO deletion_log (id, created_at, physical_copy_id, copy_type,
               data_location_id, location_name, size_bytes, reason, outcome, actor, message,
               copy_ids)
           SELECT :base + 2 * g - 1 + k, now() - interval '1 day', NULL, 'raw_data_file',
               {src.format(g="g")}, 'source', :F * :mb, 'parent_package_archived',
               CASE WHEN k = 0 THEN 'MARKED_POSSIBLE' ELSE 'SCHEDULED' END, 'deletion_manager',
               :F || ' raw file copies of package ' || g,
               CASE WHEN k = 1 THEN '[' || array_to_string(ARRAY(SELECT generate_series(
                   (g - 1) * :F + 1, g * :F)), ',') || ']' END
           FROM generate_series(1, :fi - 1) g, generate_series(0, 1) k
           WHERE k = 0 OR g < :fr""",
        """INSERT INTO deletion_log_copy (deletion_log_id, physical_copy_id)
           SELECT :base + 2 * g, c FROM generate_series(1, :fr - 1) g,
               generate_series((g - 1) * :F + 1, g * :F) c""",
    ]

    def literal(mo: re.Match) -> str:  # ints only: no int2/int8 ambiguity in binds
        return str(int(p[mo.group(1)])) if mo.group(1) in p else mo.group(0)

    with _without_secondary_indexes(conn, BIG):
        for s in stmts:
            conn.execute(text(re.sub(r"(?<!:):([A-Za-z_]\w*)", literal, s)))
        p["base"] = conn.execute(text("SELECT coalesce(max(id), 0) FROM deletion_log")).scalar()
        for s in batches:
            conn.execute(text(re.sub(r"(?<!:):([A-Za-z_]\w*)", literal, s)))
    for table in (
        "obs_unit",
        "executed_obs_unit",
        "data_transfer_package",
        "raw_data_package",
        "deletion_log",
    ):
        conn.execute(
            text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), max(id)) FROM {table}")
        )


@contextlib.contextmanager
def _without_secondary_indexes(conn, tables: tuple[str, ...]):
    """Drop the indexes of ``tables`` that back no constraint; build them again after."""
    rows = conn.execute(
        text(
            """SELECT i.indexname, i.indexdef FROM pg_indexes i
               WHERE i.schemaname = current_schema() AND i.tablename = ANY(:t)
                 AND NOT EXISTS (SELECT 1 FROM pg_constraint c
                                 WHERE c.conname = i.indexname)"""
        ),
        {"t": list(tables)},
    ).all()
    for name, _ in rows:
        conn.execute(text(f'DROP INDEX "{name}"'))
    yield
    conn.execute(text("SET LOCAL maintenance_work_mem = '512MB'"))
    for _, definition in rows:
        conn.execute(text(definition))


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
) -> list[dict]:
    name = f"ccat_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    url = ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    results: list[dict] = []
    try:
        upgrade(url)
        settings.set("DATABASE_URL", url)
        tmp = tempfile.mkdtemp(prefix="ccat-bench-del-")
        settings.set("DATA_DIR", tmp)
        db = DatabaseConnection(url)
        with db.session_scope() as s:
            load_topology(s, TOPOLOGY, Path(tmp))
        engine = create_engine(url)
        t0 = time.perf_counter()
        with engine.begin() as conn:
            fill(conn, n_files, n_pkgs, inflight, retained)
        vac = create_engine(url, isolation_level="AUTOCOMMIT")

        def vacuum() -> None:
            with vac.connect() as c:
                c.execute(text("VACUUM ANALYZE"))

        vacuum()
        with engine.connect() as c:
            rows = c.execute(text("SELECT count(*) FROM physical_copy")).scalar_one()
            logs = c.execute(text("SELECT count(*) FROM deletion_log")).scalar_one()
        print(
            f"[{n_files:,} files] filled in {time.perf_counter() - t0:.1f} s: "
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
    finally:
        dispose_engines()
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
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
            c.execute(text("TRUNCATE deletion_log"))
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
            c.execute(text("TRUNCATE deletion_log"))
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
        results += run_scale(n, pkgs, inflight, args.runs, only, retained)
    print(
        f"{'measure':48} {'files':>10} {'ours':>9} {'baseline':>9} {'ratio':>6} {'load':>5}  target"
    )
    for r in results:
        print(
            f"{r['what']:48} {r['n']:>10,} {_ms(r['ours']):>9} {_ms(r['bare']):>9} "
            f"{r['ratio']:>6.2f} {r['load']:>5.2f}  {r['target']} "
            f"{'met' if r['met'] else 'MISSED'}"
        )
    return 0


def _ms(s: float) -> str:
    return f"{s * 1000:.1f} ms" if s < 10 else f"{s:.2f} s"


if __name__ == "__main__":
    sys.exit(main())
