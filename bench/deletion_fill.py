"""The idle state of the deletion benchmarks with its history, loaded set-based
(``INSERT ... SELECT generate_series``): :func:`fill`.  Used by ``bench/deletion_scale.py``
and by ``tests/deletion/test_query_plans.py``."""

from __future__ import annotations

import contextlib
import re

from sqlalchemy import text

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
