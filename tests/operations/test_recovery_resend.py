"""The recovery service re-sends queued work whose message the broker lost (the issue
"Where the parts meet", item 18): the ``recovery`` process knows every task it sends (it
runs as its own process against a real Redis broker here), one failing re-send or step
never stops the others, and a row is stamped as re-sent only after its send went out.
Runs on SQLite and PostgreSQL (``system`` fixture)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from sqlalchemy import update

from ccat_data_transfer import transfer_manager
from ccat_data_transfer.archive import cycle as archive_manager
from ccat_data_transfer.operations import recovery
from ccat_data_transfer.packaging import raw_packages as rdpm
from ccat_data_transfer.packaging import transfer_packages as dtpm
from ccat_data_transfer.transfer import recovery as transfer_recovery
from ccat_ops_db import models as m
from helpers_pipeline import make_raw_files
from helpers_staging import make_archived_package
from helpers_transfer import drive, make_dtp_at_source_buffer

#: A Redis database no other test uses (0, 1: settings; 4-15: the distributed tests).
BROKER = "redis://127.0.0.1:6379/3"
LONG_AGO = timedelta(hours=2)
CLI = Path(sys.executable).with_name("ccat_data_transfer")

#: Every task the recovery service re-sends, by the kind of row that waits for it.
RESENT_TASKS = {
    rdpm.RAW_DATA_PACKAGE.task,
    dtpm.DATA_TRANSFER_PACKAGE.task,
    transfer_recovery.STALLED_TRANSFERS.task,
    transfer_recovery.STALLED_UNPACKS.task,
    archive_manager.STALLED_ARCHIVE_TRANSFERS.task,
    "ccat_data_transfer.stage_staging_job",
}


def _set(system, model, row_id, **values) -> None:
    with system.session() as s:
        s.execute(update(model).where(model.id == row_id).values(**values))


def _queued_rows_of_every_kind(system, override_settings) -> dict[str, int]:
    """One row of each kind, committed as queued (its task "sent") two hours ago, whose
    message never reached the broker."""
    override_settings(MAX_NORMAL_TRANSFERS=5, MAX_CRITICAL_TRANSFERS=5)
    old = m.utcnow() - LONG_AGO
    rows: dict[str, int] = {}
    # An archive transfer: a package transferred and unpacked, then its archive copy
    # scheduled without a message.
    with system.session() as s:
        make_dtp_at_source_buffer(system, s, n_packages=1)
    drive(system.session, transfer_manager.run_once, cycles=1)
    with system.session() as s:
        archive_manager.plan_archive_transfers(s)
        (aid,) = archive_manager.dispatch_archive_transfers(s, submit=False)
    _set(system, m.LongTermArchiveTransfer, aid, updated_at=old)
    rows[archive_manager.STALLED_ARCHIVE_TRANSFERS.task] = aid
    # A transfer, and an unpack.
    with system.session() as s:
        make_dtp_at_source_buffer(system, s, n_packages=1)
        make_dtp_at_source_buffer(system, s, n_packages=1)
    with system.session() as s:
        transfer_manager.plan_primary_transfers(s)
        tids = transfer_manager.dispatch_transfers(s, submit=False)
    assert len(tids) == 2, tids
    _set(system, m.DataTransfer, tids[0], updated_at=old)
    rows[transfer_recovery.STALLED_TRANSFERS.task] = tids[0]
    _set(
        system,
        m.DataTransfer,
        tids[1],
        status=m.Status.COMPLETED,
        unpack_status=m.Status.SCHEDULED,
        updated_at=old,
    )
    rows[transfer_recovery.STALLED_UNPACKS.task] = tids[1]
    # A raw data package build.
    make_raw_files(system, "primecam_raw_data", "resend", "primecam/280GHz", 2, 100)
    with system.session() as s:
        plan = rdpm.plan_packages(s)[0]
        pkg_id = rdpm.claim_package(s, plan, plan.parts[0])
    assert pkg_id is not None
    _set(system, m.RawDataPackage, pkg_id, status=m.Status.SCHEDULED, heartbeat_at=old)
    rows[rdpm.RAW_DATA_PACKAGE.task] = pkg_id
    # A data transfer package build (claimed, nothing built yet).
    with system.session() as s:
        buffer = system.location(s, "ccat_telescope_buffer")
        dtp = m.DataTransferPackage(
            file_name="resend.tar",
            relative_path="data_transfer_packages/resend.tar",
            size=0,
            status=m.Status.SCHEDULED,
            origin_location_id=buffer.id,
        )
        s.add(dtp)
        s.flush()
        dtp.heartbeat_at = old
        rows[dtpm.DATA_TRANSFER_PACKAGE.task] = dtp.id
    # A staging job.
    from ccat_data_transfer.staging.finders import claim_staging_job
    from ccat_data_transfer.staging_manager import create_staging_job

    with system.session() as s:
        staged_pkg = make_archived_package(system, s).id
        job = create_staging_job(s, package_ids=[staged_pkg], destination="processing_scratch")
        s.flush()
        job_id = job.id
    with system.session() as s:
        assert claim_staging_job(s, job_id, old)
    rows["ccat_data_transfer.stage_staging_job"] = job_id
    assert set(rows) == RESENT_TASKS
    return rows


def _broker_messages(client: redis.Redis) -> list[tuple[str, str, object]]:
    """(queue, task name, first argument) of every message waiting at the broker."""
    found = []
    for key in client.keys("*"):
        if client.type(key) != b"list":
            continue
        for raw in client.lrange(key, 0, -1):
            message = json.loads(raw)
            headers = message["headers"]
            args = ast.literal_eval(headers["argsrepr"])
            found.append((key.decode(), headers["task"], args[0]))
    return found


def test_recovery_process_resends_every_kind_of_lost_message_to_a_real_broker(
    system, override_settings
):
    """The ``recovery --once`` command, a process of its own (it imports no task module
    itself), finds one queued row of every kind whose message never reached the broker
    and puts exactly one message per row, with the row's task name, into the broker."""
    rows = _queued_rows_of_every_kind(system, override_settings)
    client = redis.Redis.from_url(BROKER)
    client.flushdb()
    env = {
        **os.environ,
        "CCAT_DATA_TRANSFER_ENV": "test",
        "CCAT_DATA_TRANSFER_EXECUTION_MODE": "distributed",
        "CCAT_DATA_TRANSFER_DATABASE_URL": system.url,
        "CCAT_DATA_TRANSFER_BROKER_URL": BROKER,
        "CCAT_DATA_TRANSFER_REDIS_URL": BROKER,
        "CCAT_DATA_TRANSFER_DATA_DIR": str(system.data_dir),
        "CCAT_DATA_TRANSFER_LOG_FORMAT": "json",
    }
    try:
        proc = subprocess.run(
            [str(CLI), "recovery", "--once"], env=env, capture_output=True, text=True, timeout=180
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "NotRegistered" not in proc.stdout + proc.stderr
        messages = _broker_messages(client)
    finally:
        client.flushdb()
    sent = sorted((task, row_id) for _, task, row_id in messages)
    assert sent == sorted(rows.items()), proc.stdout[-3000:] + proc.stderr[-3000:]
    # Every row was stamped as sent (not re-sent again at the next pass).
    with system.session() as s:
        assert s.get(m.DataTransfer, rows[transfer_recovery.STALLED_TRANSFERS.task]).updated_at > (
            m.utcnow() - timedelta(minutes=10)
        )


def _two_queued_transfers_and_a_staging_job(system, override_settings) -> tuple[list[int], int]:
    from ccat_data_transfer.staging.finders import claim_staging_job
    from ccat_data_transfer.staging_manager import create_staging_job

    override_settings(MAX_NORMAL_TRANSFERS=5, MAX_CRITICAL_TRANSFERS=5)
    old = m.utcnow() - LONG_AGO
    with system.session() as s:
        make_dtp_at_source_buffer(system, s, n_packages=1)
        make_dtp_at_source_buffer(system, s, n_packages=1)
    with system.session() as s:
        transfer_manager.plan_primary_transfers(s)
        tids = transfer_manager.dispatch_transfers(s, submit=False)  # messages lost
    for tid in tids:
        _set(system, m.DataTransfer, tid, updated_at=old)
    with system.session() as s:
        pkg_id = make_archived_package(system, s).id
        job = create_staging_job(s, package_ids=[pkg_id], destination="processing_scratch")
        s.flush()
        job_id = job.id
    with system.session() as s:
        assert claim_staging_job(s, job_id, old)
    return sorted(tids), job_id


def test_a_failing_resend_stops_neither_the_other_rows_nor_the_other_steps(
    system, monkeypatch, override_settings
):
    """The first transfer's send fails (broker down for it): the second transfer and the
    staging job are still sent (and run, embedded); the failed row is not stamped as
    sent, so the next pass sends it again; the pass counts the failed step."""
    from ccat_data_transfer.transfer.tasks import transfer_data_transfer_package

    (first, second), job_id = _two_queued_transfers_and_a_staging_job(system, override_settings)
    with system.session() as s:
        stamped_before = s.get(m.DataTransfer, first).updated_at
    real_apply_async = transfer_data_transfer_package.apply_async

    def broker_down_for_the_first(*args, **kwargs):
        if kwargs.get("args") == [first]:
            raise ConnectionError("broker down")
        return real_apply_async(*args, **kwargs)

    monkeypatch.setattr(transfer_data_transfer_package, "apply_async", broker_down_for_the_first)
    with system.session() as s:
        summary = recovery.run_once(s)

    with system.session() as s:
        failed_row = s.get(m.DataTransfer, first)
        assert failed_row.status == m.Status.SCHEDULED
        assert failed_row.updated_at == stamped_before  # not stamped: it was not sent
        assert s.get(m.DataTransfer, second).status == m.Status.COMPLETED
        assert s.get(m.StagingJob, job_id).status == m.Status.COMPLETED
    assert summary["queued_resent"] == 2 and summary["failed_steps"] == 1

    monkeypatch.setattr(transfer_data_transfer_package, "apply_async", real_apply_async)
    with system.session() as s:
        assert recovery.run_once(s)["queued_resent"] == 1  # the next pass sends it
    with system.session() as s:
        assert s.get(m.DataTransfer, first).status == m.Status.COMPLETED


def test_a_raising_recovery_step_does_not_stop_the_later_steps(
    system, monkeypatch, override_settings
):
    """The transfers' re-send step raises as a whole: the staging job is still sent."""
    _, job_id = _two_queued_transfers_and_a_staging_job(system, override_settings)

    def broken(*args, **kwargs):
        raise RuntimeError("step broken")

    monkeypatch.setattr(transfer_recovery, "resend_queued", broken)
    with system.session() as s:
        summary = recovery.run_once(s)
    with system.session() as s:
        assert s.get(m.StagingJob, job_id).status == m.Status.COMPLETED
    assert summary["queued_resent"] == 1 and summary["failed_steps"] >= 1


@pytest.mark.parametrize("name", sorted(RESENT_TASKS))
def test_a_fresh_process_finds_every_resent_task_by_name(name):
    """A process that imported only the recovery module knows every task it re-sends."""
    code = (
        "from ccat_data_transfer.operations import recovery\n"
        "from ccat_data_transfer.core.celery_app import registered_task\n"
        f"print(registered_task({name!r}).name)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CCAT_DATA_TRANSFER_ENV": "test"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == name
