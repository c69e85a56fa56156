"""Attempt ownership where the parts meet: two attempts at one piece of work (a transfer,
a package build, a verification, a repair), temporary names per attempt, stale partials,
and bytes renamed into place only after their checksum.  Runs on SQLite and PostgreSQL
(``system`` fixture); the attempts are real threads of this process, each running the
project's own task body against the same rows and files."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from ccat_data_transfer import transfer_manager
from ccat_data_transfer.archive import proof, verification
from ccat_data_transfer.core.storage import DiskStorage
from ccat_data_transfer.core.transfer_methods import (
    CopyMethod,
    RsyncMethod,
    get_transfer_method,
    register_transfer_method,
)
from ccat_data_transfer.fixity import repair
from ccat_data_transfer.fixity import tasks as fixity_tasks
from ccat_data_transfer.packaging import raw_cycle, skeleton
from ccat_data_transfer.packaging import raw_packages as rdpm
from ccat_data_transfer.packaging import tasks as packaging_tasks
from ccat_data_transfer.staging_manager import create_staging_job
from ccat_data_transfer.transfer.execution import execute_transfer
from ccat_ops_db import models as m
from helpers_lifecycle import make_package_at, write_object
from helpers_pipeline import build_started_and_died, make_raw_files
from helpers_staging import make_archived_package
from helpers_transfer import make_dtp_at_source_buffer

WAIT = 60  # seconds a paused attempt or a test waits at most for the other side


@pytest.fixture
def copy_method() -> Any:
    """Lets a test swap the COPY method; the real one comes back afterwards."""
    original = get_transfer_method(m.TransferMethod.COPY)
    yield lambda method: register_transfer_method(m.TransferMethod.COPY, method)
    register_transfer_method(m.TransferMethod.COPY, original)


class _Pause:
    """The first call of a wrapped step waits (after telling ``reached``) until
    ``resume`` is set; later calls pass straight through."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.resume = threading.Event()
        self.calls = 0
        self.lock = threading.Lock()

    def first(self) -> bool:
        with self.lock:
            self.calls += 1
            return self.calls == 1

    def hold(self) -> None:
        self.reached.set()
        assert self.resume.wait(WAIT), "the paused attempt was never resumed"


@pytest.fixture
def pause() -> Any:
    """A :class:`_Pause`, always resumed when the test ends (even a failing one)."""
    p = _Pause()
    yield p
    p.resume.set()


def _run_in_thread(target: Any, *args: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = target(*args)
        except BaseException as exc:  # reported to the test
            out["error"] = exc

    thread = threading.Thread(target=run, name="first-attempt")
    thread.start()
    return thread, out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- Item 6: two attempts at one transfer -------------------------------------------------


def _scheduled_transfer(system: Any) -> tuple[int, int, str, str]:
    """A primary transfer of a fresh DTP, claimed (SCHEDULED) but not yet run."""
    with system.session() as s:
        dtp = make_dtp_at_source_buffer(system, s, n_packages=1)
        dtp_id, rel, checksum = dtp.id, dtp.relative_path, dtp.checksum
        transfer_manager.plan_primary_transfers(s)
        s.commit()
        (tid,) = transfer_manager.dispatch_transfers(s, submit=False)
    return tid, dtp_id, rel, checksum


def _recovery_resets_and_reschedules(system: Any, tid: int) -> None:
    """What recovery does to a transfer whose heartbeat stopped (its worker stalled),
    then the next cycle's claim: the row is SCHEDULED again for a second attempt."""
    with system.session() as s:
        s.execute(
            update(m.DataTransfer)
            .where(m.DataTransfer.id == tid)
            .values(updated_at=m.utcnow() - timedelta(hours=2))
        )
        s.commit()
        assert transfer_manager.reset_stalled_transfers(s, timedelta(hours=1)) == 1
        s.execute(
            update(m.DataTransfer).where(m.DataTransfer.id == tid).values(next_attempt_at=None)
        )
        s.commit()
        assert transfer_manager.dispatch_transfers(s, submit=False) == [tid]


def test_a_superseded_transfer_attempt_neither_discards_renames_nor_records(
    system, copy_method, override_settings, caplog, pause
):
    """The first attempt pushes its bytes, then stalls (its checksum waits); recovery
    resets the row and a second attempt completes the transfer.  When the first wakes
    up and finds bad bytes (as after the XRootD method's ``truncate`` by the second),
    it must not remove anything: the verified file of the second attempt stays."""
    override_settings(HEARTBEAT_SECONDS=600)

    class StallsInItsChecksum(CopyMethod):
        def checksum(self, dst_storage, dst_path, **kw):
            if pause.first():
                pause.hold()
                return "0" * 64  # what the first attempt reads after the second's rewrite
            return super().checksum(dst_storage, dst_path, **kw)

    copy_method(StallsInItsChecksum())
    tid, dtp_id, rel, checksum = _scheduled_transfer(system)
    first, out = _run_in_thread(execute_transfer, tid)
    assert pause.reached.wait(WAIT)

    _recovery_resets_and_reschedules(system, tid)
    assert execute_transfer(tid) == "completed"  # the second attempt
    with system.session() as s:
        t = s.get(m.DataTransfer, tid)
        dest = system.location_path(t.destination_location.name)
    final = dest / rel
    assert _sha(final) == checksum

    caplog.set_level(logging.WARNING)
    pause.resume.set()
    first.join(WAIT)
    assert "error" not in out, out
    assert final.is_file() and _sha(final) == checksum  # the verified file stayed
    assert out["result"] == "superseded"
    assert any("attempt_superseded" in str(r.msg) for r in caplog.records)
    with system.session() as s:
        t = s.get(m.DataTransfer, tid)
        assert t.status == m.Status.COMPLETED and t.retry_count == 1
        (copy,) = s.scalars(
            select(m.DataTransferPackagePhysicalCopy).where(
                m.DataTransferPackagePhysicalCopy.data_transfer_package_id == dtp_id,
                m.DataTransferPackagePhysicalCopy.data_location_id == t.destination_location_id,
            )
        ).all()
        assert copy.status == m.PhysicalCopyStatus.PRESENT and copy.verified_at is not None


def test_a_superseded_transfer_attempt_does_not_charge_a_failure_to_the_next_one(
    system, copy_method, override_settings, pause
):
    """The first attempt's push fails after recovery gave the row to a second attempt
    that is running now: the failure is not recorded on the second attempt's row."""
    override_settings(HEARTBEAT_SECONDS=600)
    second_running = threading.Event()
    second_may_finish = threading.Event()

    class FirstFailsLate(CopyMethod):
        def step(self, move, *args, **kw):
            if pause.first():
                pause.hold()
                raise OSError("the first attempt's link dropped")
            second_running.set()
            assert second_may_finish.wait(WAIT)
            return move(*args, **kw)

        def land(self, *args, **kw):
            return self.step(super().land, *args, **kw)

        def transfer(self, *args, **kw):  # the one call of a method before attempts
            return self.step(super().transfer, *args, **kw)

    copy_method(FirstFailsLate())
    tid, _dtp_id, _rel, _checksum = _scheduled_transfer(system)
    first, out = _run_in_thread(execute_transfer, tid)
    assert pause.reached.wait(WAIT)
    _recovery_resets_and_reschedules(system, tid)
    second, out2 = _run_in_thread(execute_transfer, tid)
    assert second_running.wait(WAIT)
    pause.resume.set()
    first.join(WAIT)
    assert out.get("result") == "skipped", out
    with system.session() as s:
        t = s.get(m.DataTransfer, tid)
        assert t.status == m.Status.IN_PROGRESS and t.retry_count == 1  # untouched
    second_may_finish.set()
    second.join(WAIT)
    assert out2.get("result") == "completed", out2


# --- Item 7: only verified bytes under the final name; stale partials dropped ------------


def test_transfer_bytes_reach_the_final_name_only_after_their_checksum(system, copy_method):
    seen: list[bool] = []

    class Watching(CopyMethod):
        def checksum(self, dst_storage, dst_path, **kw):
            seen.append(dst_storage.exists(final_rel))
            return super().checksum(dst_storage, dst_path, **kw)

    copy_method(Watching())
    tid, _dtp_id, final_rel, checksum = _scheduled_transfer(system)
    assert execute_transfer(tid) == "completed"
    assert seen == [False]  # nothing under the final name while the checksum ran
    with system.session() as s:
        dest = system.location_path(s.get(m.DataTransfer, tid).destination_location.name)
    assert _sha(dest / final_rel) == checksum
    assert not [p for p in (dest / final_rel).parent.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("extra", [0, 100], ids=["same-size", "longer"])
def test_rsync_drops_a_stale_partial_not_shorter_than_the_source(tmp_path, extra):
    """A partial left by another version of the file, as long as the source or longer:
    ``--append-verify`` would take it as done; it is dropped and the bytes sent again."""
    data = os.urandom(256 * 1024)
    (tmp_path / "src").mkdir()
    (tmp_path / "src/pkg.tar").write_bytes(data)
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst/.pkg.tar.tmp-resume").write_bytes(os.urandom(len(data) + extra))
    src, dst = DiskStorage(tmp_path / "src"), DiskStorage(tmp_path / "dst")
    with open(tmp_path / "log", "w") as lf:
        RsyncMethod().transfer(src, "pkg.tar", dst, "pkg.tar", lf)
    assert (tmp_path / "dst/pkg.tar").read_bytes() == data
    assert "stale partial" in (tmp_path / "log").read_text()


def test_the_next_attempt_adopts_the_partial_of_a_lost_one_and_resumes_from_it(tmp_path):
    """Attempts never share a temporary file, yet a retry resumes: the owner of the row
    renames the lost attempt's partial to its own name (and removes other leftovers),
    and rsync sends only the rest."""
    data = os.urandom(512 * 1024)
    (tmp_path / "src").mkdir()
    (tmp_path / "src/pkg.tar").write_bytes(data)
    dst_root = tmp_path / "dst"
    dst_root.mkdir()
    (dst_root / ".pkg.tar.tmp-resume-lost").write_bytes(data[: len(data) // 2])
    (dst_root / ".pkg.tar.tmp-resume").write_bytes(data[:1000])  # older, shorter
    (dst_root / ".pkg.tar.tmp-resume-lost-tail").write_bytes(b"x")
    src, dst = DiskStorage(tmp_path / "src"), DiskStorage(dst_root)
    method = RsyncMethod()
    with open(tmp_path / "log", "w") as lf:
        method.adopt(dst, "pkg.tar", "next", lf)
        assert sorted(p.name for p in dst_root.iterdir()) == [".pkg.tar.tmp-resume-next"]
        assert (dst_root / ".pkg.tar.tmp-resume-next").stat().st_size == len(data) // 2
        method.land(src, "pkg.tar", dst, "pkg.tar", lf, attempt="next")
        temp = method.temp_name(dst, "pkg.tar", "next")
        assert not (dst_root / "pkg.tar").exists()  # landed, not placed
        assert method.checksum(dst, temp) == hashlib.sha256(data).hexdigest()
        method.place(dst, "pkg.tar", "next", lf)
    assert (dst_root / "pkg.tar").read_bytes() == data
    assert sorted(p.name for p in dst_root.iterdir()) == ["pkg.tar"]
    assert "adopted .pkg.tar.tmp-resume-lost" in (tmp_path / "log").read_text()


# --- Item 13: a stale partial at a staging pull's resume name ----------------------------

_FAKE_SSH = """#!/bin/sh
# ssh for tests: the "remote" host is this machine; options are dropped.
while [ $# -gt 0 ]; do
  case "$1" in
    -o|-p|-i|-l) shift 2;;
    -*) shift;;
    *) break;;
  esac
done
shift
[ "$1" = "--" ] && shift
exec sh -c "$*"
"""


def test_a_stale_partial_at_a_staging_pulls_resume_name_is_fetched_again_and_nobody_blamed(
    system, tmp_path, monkeypatch
):
    """The LTA's site is another host (reached by rsync over ssh; here an ssh that runs
    the far side on this machine).  A partial of the package's full size with other
    bytes sits at the pull's resume name: it is dropped, the good archive copy is pulled
    again, the job completes and the archive copy is not noted as corrupt."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ssh = bin_dir / "ssh"
    ssh.write_text(_FAKE_SSH)
    ssh.chmod(ssh.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with system.session() as s:
        s.execute(update(m.Site).where(m.Site.name == "cologne").values(host="cologne-lta-host"))
        pkg = make_archived_package(system, s, lta_locations=("cologne_lta",))
        pkg_id, tar_path, size = pkg.id, pkg.relative_path, pkg.size
        s.commit()
    stale = system.location_path("processing_scratch") / tar_path
    stale = stale.with_name(f".{stale.name}.tmp-resume")
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(os.urandom(size))
    with system.session() as s:
        job_id = create_staging_job(s, package_ids=[pkg_id]).id
    from ccat_data_transfer import staging_manager

    with system.session() as s:
        staging_manager.run_once(s)
    with system.session() as s:
        job = s.get(m.StagingJob, job_id)
        assert job.status == m.Status.COMPLETED, job.failure_reason
        (lta_copy,) = s.scalars(
            select(m.RawDataPackagePhysicalCopy).where(
                m.RawDataPackagePhysicalCopy.raw_data_package_id == pkg_id,
                m.RawDataPackagePhysicalCopy.data_location_id
                == system.location(s, "cologne_lta").id,
            )
        ).all()
        assert lta_copy.last_error is None and lta_copy.lost_at is None
    assert not stale.exists()


# --- Item 9: a released package claim and a stalled-but-alive build ----------------------


def test_a_stalled_build_whose_claim_was_released_leaves_the_next_builds_copy_alone(
    system, monkeypatch, override_settings, pause
):
    """Build A writes its tar, then stalls; recovery releases its claim (part number and
    path freed) and build B packages the same files under the same path and records its
    copy.  When A wakes up it must neither rename its tar over B's nor remove B's."""
    override_settings(HEARTBEAT_SECONDS=600)
    make_raw_files(system, "primecam_raw_data", "eou-stall-alive", "primecam/280GHz", 2, 300)
    with system.session() as s:
        plan = rdpm.plan_packages(s)[0]
        a_id = rdpm.claim_package(s, plan, plan.parts[0])
        s.commit()
    real_write = skeleton.write_tar_with_checksums

    def write_then_stall(members, out):
        result = real_write(members, out)
        if pause.first():
            pause.hold()
        return result

    monkeypatch.setattr(skeleton, "write_tar_with_checksums", write_then_stall)
    first, out = _run_in_thread(
        lambda: packaging_tasks.create_raw_data_package.apply(args=[a_id]).result
    )
    assert pause.reached.wait(WAIT)

    build_started_and_died(system, m.RawDataPackage, a_id)  # its beats look stopped
    with system.session() as s:
        summary = raw_cycle.run_once(s)
    assert summary["released_stalled"] == 1 and summary["packages_created"] == 1
    with system.session() as s:
        (b,) = s.scalars(select(m.RawDataPackage)).all()
        b_id, b_path, b_sum = b.id, b.relative_path, b.checksum
        assert b.status == m.Status.COMPLETED
    tar = system.location_path("ccat_telescope_buffer") / b_path
    assert _sha(tar) == b_sum

    pause.resume.set()
    first.join(WAIT)
    assert tar.is_file() and _sha(tar) == b_sum  # B's recorded copy is still there
    assert out.get("result", {}).get("status") == "superseded", out
    with system.session() as s:
        (copy,) = s.scalars(
            select(m.RawDataPackagePhysicalCopy).where(
                m.RawDataPackagePhysicalCopy.raw_data_package_id == b_id
            )
        ).all()
        assert copy.status == m.PhysicalCopyStatus.PRESENT


# --- Item 15: verifications and repairs take their copy ---------------------------------

SIZE = 1000


def _archived(system: Any, tag: str, locations: list[str]) -> tuple[Any, bytes]:
    data = (f"package {tag} ".encode() * SIZE)[:SIZE]
    with system.session() as s:
        fx = make_package_at(system, s, locations, package_size=SIZE)
        package = s.get(m.RawDataPackage, fx.package_id)
        package.checksum = hashlib.sha256(data).hexdigest()
        for name, copy_id in fx.copy_ids.items():
            s.get(m.PhysicalCopy, copy_id).checksum = package.checksum
            write_object(s, name, fx.relative_path, data)
    return fx, data


def _events(system: Any, copy_id: int) -> list[str]:
    ev = m.ArchiveEvent
    with system.session() as s:
        return list(
            s.scalars(select(ev.event).where(ev.physical_copy_id == copy_id).order_by(ev.id))
        )


def test_a_redelivered_verification_does_nothing_while_the_first_is_live(
    system, monkeypatch, pause
):
    fx, _data = _archived(system, "verify-twice", ["cologne_lta"])
    copy_id = fx.copy_ids["cologne_lta"]
    with system.session() as s:
        s.get(m.PhysicalCopy, copy_id).verified_at = None
    real_look = verification._look

    def slow_look(expected, full):
        if pause.first():
            pause.hold()
        return real_look(expected, full)

    monkeypatch.setattr(verification, "_look", slow_look)
    first, out = _run_in_thread(proof.verify_copies, [copy_id])
    assert pause.reached.wait(WAIT)
    # The broker delivers the task again while the first run still reads the bytes.
    again = proof.verify_archive_copies.apply(args=[[copy_id]], kwargs={"full": True}).result
    assert again == {}
    assert pause.calls == 1  # the second run did not look at the copy at all
    with system.session() as s:
        assert s.get(m.PhysicalCopy, copy_id).verified_at is None
    pause.resume.set()
    first.join(WAIT)
    assert [f.outcome for f in out["result"]] == [proof.VERIFIED]
    with system.session() as s:
        assert s.get(m.PhysicalCopy, copy_id).verified_at is not None
        assert s.scalars(select(m.CopyClaim)).all() == []  # released


def test_a_concurrent_repair_of_the_same_copy_does_nothing_while_the_first_is_live(
    system, monkeypatch, pause
):
    fx, data = _archived(system, "repair-twice", ["cologne_lta", "us_lta"])
    bad = fx.copy_ids["us_lta"]
    path = system.location_path("us_lta") / fx.relative_path
    path.write_bytes(b"x" * len(data))
    with system.session() as s:
        s.get(m.PhysicalCopy, bad).lost_at = m.utcnow()
    real_copy = repair._copy_bytes

    def slow_copy(source, target, *args):
        if pause.first():
            pause.hold()
        return real_copy(source, target, *args)

    monkeypatch.setattr(repair, "_copy_bytes", slow_copy)
    first, out = _run_in_thread(repair.repair_copy, bad)
    assert pause.reached.wait(WAIT)
    assert fixity_tasks.repair_archive_copy.apply(args=[bad]).result == "busy"
    assert _events(system, bad) == [repair.REPAIR_STARTED]  # the first attempt's only
    pause.resume.set()
    first.join(WAIT)
    assert out.get("result") == "repaired", out
    assert path.read_bytes() == data
    assert _events(system, bad) == [repair.REPAIR_STARTED, repair.REPAIRED]


def test_a_claim_whose_attempt_stopped_beating_is_taken_over(system):
    fx, _data = _archived(system, "claim-stale", ["cologne_lta"])
    copy_id = fx.copy_ids["cologne_lta"]
    with system.session() as s:
        s.add(
            m.CopyClaim(
                physical_copy_id=copy_id,
                work="verification",
                attempt_id="gone",
                heartbeat_at=m.utcnow() - timedelta(hours=1),
            )
        )
    assert [f.outcome for f in proof.verify_copies([copy_id])] == [proof.VERIFIED]
    with system.session() as s:
        fresh = m.CopyClaim(
            physical_copy_id=copy_id, work="repair", attempt_id="alive", heartbeat_at=m.utcnow()
        )
        s.add(fresh)
    assert proof.verify_copies([copy_id]) == []  # a live claim is left alone
