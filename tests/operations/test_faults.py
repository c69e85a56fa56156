"""Fault injection against the real services: PostgreSQL connections killed in the middle of
a deletion cycle, Redis unreachable, a full disk at the destination, the S3 server down,
and two managers of each kind running at once."""

from __future__ import annotations

import errno
import os
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, event, func, select, text, update

from ccat_data_transfer import deletion_manager, staging_manager, transfer_manager
from ccat_data_transfer.archive import cycle as archive_manager
from ccat_data_transfer.buffers import cycle as buffer_manager
from ccat_data_transfer.core import buffer_status, transfer_methods
from ccat_data_transfer.core import storage as storage_mod
from ccat_data_transfer.core.celery_app import app
from ccat_data_transfer.core.database import dispose_engines
from ccat_data_transfer.core.storage import S3Storage
from ccat_data_transfer.core.storage import interface as storage_interface
from ccat_data_transfer.filing.register import finish_executed_obs_unit
from ccat_data_transfer.operations.audit import run_audit
from ccat_data_transfer.packaging import raw_cycle, transfer_cycle
from ccat_data_transfer.staging import tasks as staging_task
from ccat_ops_db import models as m
from ccat_ops_db.topology import load_topology
from conftest import DEFAULT_TOPOLOGY
from helpers_lifecycle import make_package_at, make_transfer, set_buffer_status
from helpers_pipeline import make_raw_files
from helpers_postgres import PG_ADMIN_URL
from helpers_transfer import drive, make_dtp_at_source_buffer

S = m.PhysicalCopyStatus


def _is_pg(system: Any) -> bool:
    return system.url.startswith("postgresql")


def _cycle(system: Any, run_once: Callable[[Any], Any]) -> Any:
    with system.session() as s:
        return run_once(s)


def _archived_packages_at_source_buffer(system: Any, n: int) -> list[Any]:
    with system.session() as s:
        return [
            make_package_at(system, s, ["ccat_telescope_buffer", "cologne_lta"], files=0)
            for _ in range(n)
        ]


# ---------------------------------------------------------------------------------------
# PostgreSQL goes away during a deletion cycle
# ---------------------------------------------------------------------------------------


def _terminate_backends(url: str) -> int:
    """Kill every server process of this test's database (only ours: by name) and wait
    until they are gone (pg_terminate_backend only sends the signal)."""
    dbname = url.rsplit("/", 1)[1]
    others = "FROM pg_stat_activity WHERE datname = :db AND pid <> pg_backend_pid()"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            n = len(
                conn.execute(
                    text(f"SELECT pg_terminate_backend(pid) {others}"), {"db": dbname}
                ).all()
            )
            deadline = time.monotonic() + 10
            while conn.execute(text(f"SELECT count(*) {others}"), {"db": dbname}).scalar():
                assert time.monotonic() < deadline, "terminated backends did not go away"
                time.sleep(0.01)
            return n
    finally:
        admin.dispose()


def test_postgresql_killed_mid_deletion_cycle_loses_nothing_and_next_cycle_completes(system):
    """The server processes of the test DB are terminated right when the worker records
    DELETED (objects already gone from storage): that write is lost.  Nothing is marked
    DELETED while its bytes exist, nothing is PRESENT while its bytes are gone, and the
    next cycle completes: the worker treats an already-missing object as deleted."""
    if not _is_pg(system):
        pytest.skip("a server that goes away is a PostgreSQL fault (SQLite is a file)")
    pkgs = _archived_packages_at_source_buffer(system, 4)
    buffer = system.location_path("ccat_telescope_buffer")
    _, engine = system.db.get_connection()
    killed: list[int] = []

    def kill_before_recording_deleted(conn, cursor, statement, params, context, executemany):
        if (
            not killed
            and statement.startswith("UPDATE physical_copy")
            and "deleted_at" in statement
        ):
            killed.append(_terminate_backends(system.url))

    event.listen(engine, "before_cursor_execute", kill_before_recording_deleted)
    try:
        _cycle(system, deletion_manager.run_once)
    except Exception:  # the cycle may fail (or its task retry absorbs it): cleanly either way
        pass
    finally:
        event.remove(engine, "before_cursor_execute", kill_before_recording_deleted)
    assert killed and killed[0] >= 1, "no server process of the test DB was terminated"

    dispose_engines()
    with system.session() as s:
        after_fault = {}
        for p in pkgs:
            copy = s.get(m.PhysicalCopy, p.copy_ids["ccat_telescope_buffer"])
            gone = not (buffer / p.relative_path).exists()
            after_fault[copy.id] = copy.status
            if gone:
                assert copy.status in (S.DELETION_IN_PROGRESS, S.DELETED), copy.status
            else:
                assert copy.status != S.DELETED, "DB says DELETED but the bytes are there"
    for _ in range(2):  # the next cycles complete and reconcile what the kill left
        _cycle(system, deletion_manager.run_once)
    with system.session() as s:
        for p in pkgs:
            copy = s.get(m.PhysicalCopy, p.copy_ids["ccat_telescope_buffer"])
            assert copy.status == S.DELETED and copy.deleted_at is not None
            assert not (buffer / p.relative_path).exists()
            lta = s.get(m.PhysicalCopy, p.copy_ids["cologne_lta"])
            assert lta.status == S.PRESENT
            assert (system.location_path("cologne_lta") / p.relative_path).exists()
            outcomes = s.scalars(
                select(m.DeletionLog.outcome).where(m.DeletionLog.physical_copy_id == copy.id)
            ).all()
            assert outcomes.count(m.DeletionOutcome.DELETED) == 1
        reasons = s.scalars(
            select(m.DeletionLog.message).where(m.DeletionLog.outcome == m.DeletionOutcome.DELETED)
        ).all()
        # The lost write was redone: the retry found the objects already gone from storage.
        assert any("already absent" in (r or "") for r in reasons), reasons
        for report in run_audit(s, "ccat_telescope_buffer", full=True, mark=False):
            assert report.lost == [] and report.dark == [], report.as_dict()


# ---------------------------------------------------------------------------------------
# Redis down
# ---------------------------------------------------------------------------------------


@pytest.fixture
def redis_down(override_settings: Any) -> Iterator[None]:
    """Distributed mode for the buffer-status store, pointing at a closed port; Celery stays
    eager so the tasks still run in-process."""
    override_settings(EXECUTION_MODE="distributed", REDIS_URL="redis://127.0.0.1:1/0")
    app.conf.task_always_eager = True
    yield
    # override_settings restores EXECUTION_MODE and reconfigures Celery afterwards.


def test_redis_down_status_unknown_no_pressure_deletion_safe_rules_run(
    system, redis_down, override_settings
):
    assert buffer_status._use_redis()
    safe = _archived_packages_at_source_buffer(system, 1)[0]
    with system.session() as s:
        # Raw files whose package left the source site recently: only pressure deletes them.
        waiting = make_package_at(
            system,
            s,
            {"ccat_telescope_buffer": S.DELETED, "cologne_lta": S.PRESENT},
            files=3,
            file_status=S.DELETION_POSSIBLE,
            deletion_possible_at=m.utcnow(),
        )
    measured = _cycle(system, buffer_manager.run_once)  # publishing fails: logged, no crash
    assert "ccat_telescope_buffer" in measured
    assert buffer_status.state_of("primecam_raw_data") == buffer_status.BufferState.UNKNOWN
    summary = _cycle(system, deletion_manager.run_once)
    assert summary["buffer_states"].get("primecam_raw_data", "unknown") == "unknown"
    with system.session() as s:
        assert s.get(m.PhysicalCopy, safe.copy_ids["ccat_telescope_buffer"]).status == S.DELETED
        for cid in waiting.file_copy_ids:
            assert s.get(m.PhysicalCopy, cid).status == S.DELETION_POSSIBLE
    for rel in waiting.file_paths:
        assert (system.location_path("primecam_raw_data") / rel).exists()

    # Control: the same files do go under a known 99 % pressure (status store reachable).
    override_settings(EXECUTION_MODE="embedded")
    with system.session() as s:
        set_buffer_status(s, "primecam_raw_data", 99 * 10**9, 100 * 10**9)
    _cycle(system, deletion_manager.run_once)
    with system.session() as s:
        assert {s.get(m.PhysicalCopy, c).status for c in waiting.file_copy_ids} == {S.DELETED}


def test_redis_down_transfers_continue_at_the_critical_limit(system, redis_down, override_settings):
    override_settings(MAX_NORMAL_TRANSFERS=5, MAX_CRITICAL_TRANSFERS=1)
    app.conf.task_always_eager = True
    with system.session() as s:
        dtps = [make_dtp_at_source_buffer(system, s, n_packages=1) for _ in range(3)]
        for dtp in dtps:
            make_transfer(
                s,
                dtp.id,
                "ccat_telescope_buffer",
                "cologne_buffer",
                status=m.Status.PENDING,
                unpack_status=m.Status.PENDING,
            )
    with system.session() as s:
        claimed = transfer_manager.dispatch_transfers(s, submit=False)
    assert len(claimed) == 1  # unknown state counts as critical: neither stop nor full speed
    with system.session() as s:
        s.execute(
            update(m.DataTransfer)
            .where(m.DataTransfer.id.in_(claimed))
            .values(status=m.Status.PENDING)
        )
    _cycle(system, transfer_manager.dispatch_transfers)  # and the one sent really completes
    with system.session() as s:
        done = s.scalars(
            select(m.DataTransfer).where(m.DataTransfer.status == m.Status.COMPLETED)
        ).all()
        assert len(done) == 1


# ---------------------------------------------------------------------------------------
# A full disk at the destination
# ---------------------------------------------------------------------------------------


def _enospc_under(monkeypatch: Any, root: Path) -> list[str]:
    """Writes to files under ``root`` put some of the bytes on disk, then fail with ENOSPC
    (what a full filesystem does), whether written by us or copied by the kernel
    (``copy_file_range``, ``sendfile``).  Returns the list of paths that hit it."""
    hits: list[str] = []
    original = storage_interface._FdWriter.write
    prefix = os.path.realpath(root) + os.sep

    def write(self: Any, b: Any) -> int:
        target = os.readlink(f"/proc/self/fd/{self.fileno()}")
        if target.startswith(prefix):
            hits.append(target)
            data = bytes(b)
            os.write(self.fileno(), data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(self, b)

    def kernel_copy(original_call: Any, dst_position: int) -> Any:
        # Copies by the kernel (copy_file_range, sendfile) hit the same full disk.
        def call(*args: Any) -> int:
            dst = args[dst_position]
            target = os.readlink(f"/proc/self/fd/{dst}")
            if target.startswith(prefix):
                hits.append(target)
                src = args[1 - dst_position]
                os.write(dst, os.pread(src, 4096, os.lseek(src, 0, os.SEEK_CUR)))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return original_call(*args)

        return call

    monkeypatch.setattr(storage_interface._FdWriter, "write", write)
    monkeypatch.setattr(os, "copy_file_range", kernel_copy(os.copy_file_range, 1))
    monkeypatch.setattr(os, "sendfile", kernel_copy(os.sendfile, 0))
    return hits


def _files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_full_disk_at_transfer_destination_retries_later_without_partial_file(system, monkeypatch):
    with system.session() as s:
        dtp = make_dtp_at_source_buffer(system, s, n_packages=1)
        dtp_id = dtp.id
    roots = [system.location_path(n) for n in ("cologne_buffer", "us_buffer")]
    hits = [_enospc_under(monkeypatch, r) for r in roots][0]
    _cycle(system, transfer_manager.run_once)
    assert hits, "the injected ENOSPC was never reached"
    with system.session() as s:
        t = s.scalars(select(m.DataTransfer)).one()
        assert t.status == m.Status.PENDING and t.retry_count == 1
        assert "space" in (t.failure_reason or "").lower()
        copies = s.scalars(
            select(m.DataTransferPackagePhysicalCopy).where(
                m.DataTransferPackagePhysicalCopy.data_transfer_package_id == dtp_id,
                m.DataTransferPackagePhysicalCopy.data_location_id == t.destination_location_id,
            )
        ).all()
        assert copies == []
    for root in roots:
        assert _files_under(root) == [], "a partial or temporary file was left behind"

    monkeypatch.undo()  # space freed
    _cycle(system, transfer_manager.run_once)
    with system.session() as s:
        t = s.scalars(select(m.DataTransfer)).first()
        assert t.status == m.Status.COMPLETED


def test_full_disk_at_the_lta_retries_archive_and_never_marks_archived(system, monkeypatch):
    with system.session() as s:
        dtp = make_dtp_at_source_buffer(system, s, n_packages=1)
        rdp_id = dtp.raw_data_packages[0].id
    drive(system.session, transfer_manager.run_once, cycles=2)
    lta_roots = [system.location_path(n) for n in ("cologne_lta", "us_lta")]
    hits = [_enospc_under(monkeypatch, r) for r in lta_roots][0]
    _cycle(system, archive_manager.run_once)
    assert hits
    with system.session() as s:
        assert s.get(m.RawDataPackage, rdp_id).state != m.PackageState.ARCHIVED
        rows = s.scalars(select(m.LongTermArchiveTransfer)).all()
        assert rows and {r.status for r in rows} == {m.Status.PENDING}
        assert all("space" in (r.failure_reason or "").lower() for r in rows)
        assert not s.scalars(
            select(m.RawDataPackagePhysicalCopy)
            .join(m.DataLocation)
            .where(m.DataLocation.location_type == m.LocationType.LONG_TERM_ARCHIVE)
        ).all()
    for root in lta_roots:
        assert _files_under(root) == []
    monkeypatch.undo()
    _cycle(system, archive_manager.run_once)
    with system.session() as s:
        assert s.get(m.RawDataPackage, rdp_id).state == m.PackageState.ARCHIVED


# ---------------------------------------------------------------------------------------
# The S3 server down
# ---------------------------------------------------------------------------------------


class _OwnS3:
    """A moto server only this test uses (the session one keeps running)."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._cls = ThreadedMotoServer
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        self.host, self.port = self.server.get_host_and_port()
        self.running = True

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        if self.running:
            self.server.stop()
            self.running = False

    def start_again(self) -> None:
        """A new server on the same port (moto keeps its data in this process)."""
        self.server = self._cls(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.running = True


@pytest.fixture
def own_s3(override_settings: Any) -> Iterator[_OwnS3]:
    override_settings(S3_ACCESS_KEY_ID="fault-test-key", S3_SECRET_ACCESS_KEY="fault-test-secret")
    server = _OwnS3()
    yield server
    server.stop()


def _us_lta_on_s3(system: Any, endpoint_url: str, bucket: str) -> None:
    text_ = DEFAULT_TOPOLOGY.read_text()
    block = (
        '[[locations]]\nname = "us_lta"\nsite = "us"\ntype = "long_term_archive"\n'
        f'storage = "s3"\nbucket = "{bucket}"\nendpoint_url = "{endpoint_url}"\n'
        'prefix = "archive"\n'
    )
    text_, n = re.subn(
        r'\[\[locations\]\]\nname = "us_lta"\n(?:[^\[\n][^\n]*\n)*', block + "\n", text_
    )
    assert n == 1
    path = system.data_dir / "topology_s3.toml"
    path.write_text(text_)
    with system.session() as s:
        load_topology(s, path, system.data_dir)


def _s3_archive_state(system: Any, rdp_id: int) -> tuple[m.LongTermArchiveTransfer, Any, Any]:
    with system.session() as s:
        us_lta = system.location(s, "us_lta")
        row = s.scalars(
            select(m.LongTermArchiveTransfer).where(
                m.LongTermArchiveTransfer.raw_data_package_id == rdp_id,
                m.LongTermArchiveTransfer.destination_location_id == us_lta.id,
            )
        ).one()
        copy = s.scalars(
            select(m.RawDataPackagePhysicalCopy).where(
                m.RawDataPackagePhysicalCopy.raw_data_package_id == rdp_id,
                m.RawDataPackagePhysicalCopy.data_location_id == us_lta.id,
            )
        ).first()
        s.expunge_all()
        return row, copy, None


def _s3_lta_setup(system: Any, own_s3: _OwnS3) -> tuple[int, str, str]:
    bucket = f"fault-{uuid.uuid4().hex[:12]}"
    S3Storage(own_s3.endpoint_url, bucket).client.create_bucket(Bucket=bucket)
    _us_lta_on_s3(system, own_s3.endpoint_url, bucket)
    with system.session() as s:
        dtp = make_dtp_at_source_buffer(system, s, n_packages=1)
        rdp = dtp.raw_data_packages[0]
        rdp_id, rel, checksum = rdp.id, rdp.relative_path, rdp.checksum
    drive(system.session, transfer_manager.run_once, cycles=2)  # now at both LTA-site buffers
    return rdp_id, rel, checksum


def test_s3_down_archive_retries_and_archives_once_a_server_is_back(system, own_s3):
    rdp_id, rel, checksum = _s3_lta_setup(system, own_s3)
    own_s3.stop()
    for attempt in (1, 2):
        _cycle(system, archive_manager.run_once)
        row, copy, _ = _s3_archive_state(system, rdp_id)
        assert row.status == m.Status.PENDING and row.retry_count == attempt
        assert row.failure_reason and "Storage" in row.failure_reason
        assert copy is None  # nothing recorded at the S3 LTA while it is unreachable
    own_s3.start_again()
    _cycle(system, archive_manager.run_once)
    row, copy, _ = _s3_archive_state(system, rdp_id)
    assert row.status == m.Status.COMPLETED
    assert copy.status == S.PRESENT and copy.verified_at is not None
    with system.session() as s:
        us_lta = system.location(s, "us_lta")
        s3 = S3Storage(us_lta.endpoint_url, us_lta.bucket, prefix=us_lta.prefix)
        assert s3.sha256(rel) == checksum
        assert s.get(m.RawDataPackage, rdp_id).state == m.PackageState.ARCHIVED


def test_s3_down_past_the_retry_cap_is_failed_with_a_reason_and_not_archived(
    system, own_s3, override_settings
):
    override_settings(TRANSFER_MAX_RETRIES=1)
    rdp_id, _, _ = _s3_lta_setup(system, own_s3)
    own_s3.stop()
    # The disk LTA (cologne) archives fine: make ARCHIVED depend on the S3 LTA only.
    with system.session() as s:
        s.execute(
            update(m.DataLocation).where(m.DataLocation.name == "cologne_lta").values(active=False)
        )
    for _ in range(3):
        _cycle(system, archive_manager.run_once)
    row, copy, _ = _s3_archive_state(system, rdp_id)
    assert row.status == m.Status.FAILED
    assert row.failure_reason and "Storage" in row.failure_reason
    assert copy is None
    with system.session() as s:
        assert s.get(m.RawDataPackage, rdp_id).state != m.PackageState.ARCHIVED


# ---------------------------------------------------------------------------------------
# Two managers of each kind at once
# ---------------------------------------------------------------------------------------


def _twice_at_once(system: Any, run_once: Callable[[Any], Any]) -> list[BaseException]:
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait()
            with system.session() as s:
                run_once(s)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return errors


class _CountingCopy(transfer_methods.CopyMethod):
    def __init__(self) -> None:
        self.sent: Counter[tuple[str, str]] = Counter()
        self.lock = threading.Lock()

    def land(self, src_storage, src_path, dst_storage, dst_path, log_file, **kw):
        with self.lock:
            self.sent[(repr(dst_storage), dst_path)] += 1
        return super().land(src_storage, src_path, dst_storage, dst_path, log_file, **kw)


def test_two_managers_of_each_kind_at_once_do_every_piece_of_work_once(system, monkeypatch):
    for i in range(3):
        make_raw_files(system, "primecam_raw_data", f"obs_twice_{i}", "primecam/280GHz", 2, 64)
        with system.session() as s:
            finish_executed_obs_unit(s, f"obs_twice_{i}")
    counting = _CountingCopy()
    previous = transfer_methods.register_transfer_method(m.TransferMethod.COPY, counting)
    deleted: Counter[str] = Counter()
    original_delete = storage_mod.DiskStorage.delete
    lock = threading.Lock()

    def counting_delete(self: Any, path: str) -> bool:
        existed = original_delete(self, path)
        if existed:
            with lock:
                deleted[f"{self.root}/{path}"] += 1
        return existed

    monkeypatch.setattr(storage_mod.DiskStorage, "delete", counting_delete)
    staged_runs: Counter[int] = Counter()
    original_run_job = staging_task._run_job

    def counting_run_job(db: Any, job_id: int) -> Any:
        with lock:
            staged_runs[job_id] += 1
        return original_run_job(db, job_id)

    monkeypatch.setattr(staging_task, "_run_job", counting_run_job)
    errors: list[BaseException] = []
    try:
        kinds = [
            raw_cycle.run_once,
            transfer_cycle.run_once,
            transfer_manager.run_once,
            transfer_manager.run_once,
            transfer_manager.run_once,
            archive_manager.run_once,
            deletion_manager.run_once,
        ]
        for run_once in kinds:
            errors += _twice_at_once(system, run_once)
        with system.session() as s:
            pkg_id = s.scalars(
                select(m.RawDataPackage.id).where(m.RawDataPackage.state == m.PackageState.ARCHIVED)
            ).first()
            assert pkg_id is not None
            job = staging_manager.create_staging_job(s, package_ids=[pkg_id])
            job_id = job.id
        errors += _twice_at_once(system, staging_manager.run_once)
        errors += _twice_at_once(system, deletion_manager.run_once)
    finally:
        transfer_methods.register_transfer_method(m.TransferMethod.COPY, previous)
    assert errors == [], errors

    with system.session() as s:
        files = s.scalars(select(m.RawDataFile)).all()
        assert len(files) == 6 and all(f.raw_data_package_id is not None for f in files)
        assert s.scalar(select(func.count(m.RawDataPackage.id))) == 3  # one per obs unit
        per_dest = Counter(
            (t.data_transfer_package_id, t.destination_location_id)
            for t in s.scalars(select(m.DataTransfer))
        )
        assert per_dest and max(per_dest.values()) == 1
        lta_rows = Counter(
            (t.raw_data_package_id, t.destination_location_id)
            for t in s.scalars(select(m.LongTermArchiveTransfer))
        )
        assert max(lta_rows.values()) == 1
        logged = Counter(
            s.scalars(
                select(m.DeletionLog.physical_copy_id).where(
                    m.DeletionLog.outcome == m.DeletionOutcome.DELETED
                )
            )
        )
        assert logged and max(logged.values()) == 1
    assert counting.sent and max(counting.sent.values()) == 1, counting.sent
    assert deleted and max(deleted.values()) == 1, deleted
    assert staged_runs[job_id] == 1


def test_two_deletion_managers_schedule_each_expired_raw_file_once(system, override_settings):
    """Stage 2 claims by ``UPDATE ... WHERE status = 'DELETION_POSSIBLE'`` alone (no row
    locks taken first): two managers racing over the same expired copies schedule and
    delete each of them exactly once, and the batch audit rows do not overlap."""
    import json
    from datetime import timedelta

    from helpers_lifecycle import make_package_at

    override_settings(RETENTION_PERIOD_MINUTES=60, DELETION_BATCH_SIZE=3)
    S = m.PhysicalCopyStatus
    ids: list[int] = []
    with system.session() as s:
        for _ in range(4):
            pkg = make_package_at(
                system,
                s,
                {"ccat_telescope_buffer": S.DELETED, "cologne_lta": S.PRESENT},
                files=5,
                file_status=S.DELETION_POSSIBLE,
                deletion_possible_at=m.utcnow() - timedelta(minutes=61),
            )
            ids += pkg.file_copy_ids
    errors = _twice_at_once(system, deletion_manager.process_deletion_possible_raw_data_files)
    assert errors == [], errors
    # A batch whose post-decision proof was being taken by the other manager's
    # verification (its copy claim) stays DELETION_SCHEDULED for the re-send that
    # recovery makes; make it now.
    from ccat_data_transfer.deletion.cycle import resubmit_stalled_deletions

    override_settings(QUEUED_RESEND_SECONDS=0)
    with system.session() as s:
        resubmit_stalled_deletions(s)
    with system.session() as s:
        statuses = Counter(
            s.scalars(select(m.PhysicalCopy.status).where(m.PhysicalCopy.id.in_(ids)))
        )
        assert statuses == Counter({S.DELETED: len(ids)})
        batches = s.scalars(
            select(m.DeletionLog.copy_ids).where(
                m.DeletionLog.outcome == m.DeletionOutcome.SCHEDULED,
                m.DeletionLog.copy_ids.is_not(None),
            )
        ).all()
        listed = [i for b in batches for i in json.loads(b)]
        assert sorted(listed) == sorted(ids)  # every copy in exactly one batch row
        deleted = Counter(
            s.scalars(
                select(m.DeletionLog.physical_copy_id).where(
                    m.DeletionLog.outcome == m.DeletionOutcome.DELETED
                )
            )
        )
        assert set(deleted) == set(ids) and max(deleted.values()) == 1
