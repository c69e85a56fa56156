"""Where the proof meets the other parts: every reader of bad archive bytes records the
same finding; only a full re-read clears it; the last copies outside the archives go only
on proof taken after the decision, at the archive's site, of copies read back in full
since they were written; each waiting copy gets exactly the proof it needs."""

from __future__ import annotations

import hashlib
import re
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from ccat_data_transfer import deletion_manager as dm
from ccat_data_transfer.archive import proof as archive_proof
from ccat_data_transfer.archive.proof import verify_copies
from ccat_data_transfer.core.database import DatabaseConnection
from ccat_data_transfer.core.storage import storage_for_location
from ccat_data_transfer.fixity.repair import repair_copy
from ccat_data_transfer.operations.audit import run_audit
from ccat_data_transfer.staging.sources import Source, copy_from_best_lta
from ccat_ops_db import models as m
from ccat_ops_db.topology import load_topology
from helpers_lifecycle import (
    copy_row,
    location,
    log_rows,
    make_package_at,
    object_exists,
    run_deletion_cycle,
)

S = m.PhysicalCopyStatus
A = m.PackageState.ARCHIVED
BUF = "ccat_telescope_buffer"
SRC = "primecam_raw_data"
SIZE = 1000
GOOD = b"p" * SIZE  # what make_package_at writes
BAD = b"q" * SIZE  # same size, other bytes
GOOD_SUM = hashlib.sha256(GOOD).hexdigest()


def _package(system, locations, read_back=True, **kw):
    """make_package_at, with the package's real checksum on the package and its copies."""
    with system.session() as s:
        fx = make_package_at(system, s, locations, state=A, read_back=read_back, **kw)
        s.get(m.RawDataPackage, fx.package_id).checksum = GOOD_SUM
        for copy_id in fx.copy_ids.values():
            s.get(m.PhysicalCopy, copy_id).checksum = GOOD_SUM
    return fx


def _gone_from_buffer(system, **kw):
    """Archived at cologne_lta, gone from the source buffer; its raw files at SOURCE are
    DELETION_POSSIBLE since a day (the last copies outside the archives)."""
    return _package(
        system,
        {BUF: S.DELETED, "cologne_lta": S.PRESENT},
        file_status=S.DELETION_POSSIBLE,
        deletion_possible_at=m.utcnow() - timedelta(days=1),
        **kw,
    )


def _overwrite(system, name, relative_path, data):
    with system.session() as s:
        path = storage_for_location(location(s, name)).local_path(relative_path)
    Path(path).write_bytes(data)


def _remove(system, name, relative_path):
    with system.session() as s:
        Path(storage_for_location(location(s, name)).local_path(relative_path)).unlink()


def _events(system, copy_id):
    with system.session() as s:
        return [
            (e.event, e.actor)
            for e in s.scalars(
                select(m.ArchiveEvent)
                .where(m.ArchiveEvent.physical_copy_id == copy_id)
                .order_by(m.ArchiveEvent.id)
            )
        ]


@pytest.fixture
def repairs_queued(monkeypatch):
    """The findings handed to the repair (``archive_proof.on_bad_copies``), recorded
    instead of repaired."""
    import ccat_data_transfer.fixity.tasks  # noqa: F401 - its hook is registered first
    from ccat_data_transfer.archive import verification

    found: list[archive_proof.Finding] = []
    monkeypatch.setattr(verification, "on_bad_copies", [found.extend])
    return found


# --- Item 3: staging finds bad archive bytes ------------------------------------------


def test_staging_that_finds_bad_archive_bytes_records_the_fixity_finding_and_keeps_sources(
    system, override_settings, repairs_queued, tmp_path
):
    override_settings(RETENTION_PERIOD_MINUTES=0)
    fx = _gone_from_buffer(system)
    lta_id = fx.copy_ids["cologne_lta"]
    _overwrite(system, "cologne_lta", fx.relative_path, BAD)
    with system.session() as s:
        dest = storage_for_location(location(s, "processing_scratch"))
        loc_id = location(s, "cologne_lta").id
    source = Source(lta_id, loc_id, "cologne_lta", fx.relative_path)
    with pytest.raises(Exception, match="missing or corrupt"):
        copy_from_best_lta(
            DatabaseConnection(), fx.package_id, [source], dest, "t.tar", GOOD_SUM, SIZE, "p"
        )
    assert copy_row(system, lta_id).lost_at is not None
    assert ("CORRUPT", "staging") in _events(system, lta_id)
    assert [f.copy_id for f in repairs_queued] == [lta_id]
    run_deletion_cycle(system)
    for fid, path in zip(fx.file_copy_ids, fx.file_paths, strict=True):
        assert object_exists(system, SRC, path)
        assert copy_row(system, fid).status == S.DELETION_POSSIBLE


# --- Item 4: the last copies need archive copies read back in full ----------------------


def test_same_size_damaged_archive_copy_never_read_back_blocks_the_last_deletion(
    system, without_archive_repair
):
    fx = _package(system, [BUF, "cologne_lta"], read_back=False, files=0)
    _overwrite(system, "cologne_lta", fx.relative_path, BAD)
    for _ in range(2):
        run_deletion_cycle(system)
    assert object_exists(system, BUF, fx.relative_path)
    assert copy_row(system, fx.copy_ids[BUF]).status == S.PRESENT
    assert copy_row(system, fx.copy_ids["cologne_lta"]).lost_at is not None


def test_an_intact_archive_copy_read_back_once_lets_the_last_copy_go(system):
    fx = _package(system, [BUF, "cologne_lta"], read_back=False, files=0)
    with system.session() as s:
        decision = dm.decide_copy(s, s.get(m.PhysicalCopy, fx.copy_ids[BUF]))
    assert decision.code == "waiting_for_proof" and "read back in full" in decision.reason
    run_deletion_cycle(system)  # asks for the full read
    lta = copy_row(system, fx.copy_ids["cologne_lta"])
    assert lta.fixity_checked_at is not None and lta.fixity_checked_at >= lta.created_at
    run_deletion_cycle(system)
    assert copy_row(system, fx.copy_ids[BUF]).status == S.DELETED
    assert not object_exists(system, BUF, fx.relative_path)


# --- Item 5: proof taken after the decision --------------------------------------------


def test_archive_file_removed_after_the_decision_keeps_the_buffer_copy(
    system, without_archive_repair
):
    fx = _package(system, [BUF, "cologne_lta"], files=0)
    buf_id = fx.copy_ids[BUF]
    with system.session() as s:
        assert dm.claim_for_deletion(s, [buf_id]) == [buf_id]
    _remove(system, "cologne_lta", fx.relative_path)
    dm.delete_bulk_raw_data_packages.apply_async(args=[[buf_id]])
    assert object_exists(system, BUF, fx.relative_path)
    assert copy_row(system, buf_id).status == S.PRESENT
    assert copy_row(system, fx.copy_ids["cologne_lta"]).lost_at is not None
    assert ("MISSING", "archive_verifier") in _events(system, fx.copy_ids["cologne_lta"])


def test_archive_file_removed_after_the_decision_keeps_the_source_raw_files(
    system, without_archive_repair
):
    fx = _gone_from_buffer(system, files=1)
    fid = fx.file_copy_ids[0]
    with system.session() as s:
        assert dm.claim_for_deletion(s, [fid], [S.DELETION_POSSIBLE]) == [fid]
    _remove(system, "cologne_lta", fx.relative_path)
    dm.delete_bulk_raw_data_files.apply_async(args=[[fid]])
    assert object_exists(system, SRC, fx.file_paths[0])
    assert copy_row(system, fid).status == S.DELETION_POSSIBLE


def test_the_worker_deletes_on_proof_taken_after_the_decision(system):
    fx = _package(system, [BUF, "cologne_lta"], files=0)
    buf_id = fx.copy_ids[BUF]
    with system.session() as s:
        assert dm.claim_for_deletion(s, [buf_id]) == [buf_id]
    decided = copy_row(system, buf_id).deletion_decided_at
    dm.delete_bulk_raw_data_packages.apply_async(args=[[buf_id]])
    assert copy_row(system, buf_id).status == S.DELETED
    assert copy_row(system, fx.copy_ids["cologne_lta"]).verified_at >= decided


def test_a_copy_whose_post_decision_proof_has_not_arrived_stays_scheduled(system, monkeypatch):
    """Distributed: the archive's site has not answered yet.  The copy stays scheduled
    (not deleted, not sent back through the rules), and a re-send after the answer
    deletes it."""
    sent: list[list[int]] = []
    monkeypatch.setattr(
        archive_proof.verify_archive_copies,
        "apply_async",
        lambda args, kwargs=None, queue=None: sent.append(list(args[0])),
    )
    fx = _package(system, [BUF, "cologne_lta"], files=0)
    buf_id = fx.copy_ids[BUF]
    lta_id = fx.copy_ids["cologne_lta"]
    run_deletion_cycle(system)
    assert sent == [[lta_id]]
    assert copy_row(system, buf_id).status == S.DELETION_SCHEDULED
    assert log_rows(system, buf_id)[-1] == ("SKIPPED", "waiting_for_proof_after_decision")
    assert object_exists(system, BUF, fx.relative_path)
    verify_copies([lta_id])  # the archive's site answers
    dm.delete_bulk_raw_data_packages.apply_async(args=[[buf_id]])  # the re-send
    assert copy_row(system, buf_id).status == S.DELETED


# --- Item 14: an LTA-site buffer copy gets its own site's proof -------------------------


def test_lta_site_buffer_copy_gets_its_own_sites_proof_requested_in_the_same_cycle(system):
    fx = _package(system, ["cologne_buffer", "cologne_lta", "us_lta"], files=0)
    with system.session() as s:
        s.get(m.PhysicalCopy, fx.copy_ids["cologne_lta"]).verified_at = m.utcnow() - timedelta(
            days=2
        )
    before = m.utcnow()
    summary = run_deletion_cycle(system)
    assert summary["verifications_requested"] >= 1
    assert copy_row(system, fx.copy_ids["cologne_lta"]).verified_at >= before
    run_deletion_cycle(system)
    assert copy_row(system, fx.copy_ids["cologne_buffer"]).status == S.DELETED


# --- Item 2: the audit and fixity on S3 --------------------------------------------------


def _us_lta_on_s3(system, endpoint_url, bucket):
    topology = (
        Path(__file__).resolve().parents[2]
        / "src"
        / "ccat_data_transfer"
        / "topology"
        / "default.toml"
    )
    block = (
        '[[locations]]\nname = "us_lta"\nsite = "us"\ntype = "long_term_archive"\n'
        f'storage = "s3"\nbucket = "{bucket}"\nendpoint_url = "{endpoint_url}"\n'
        'prefix = "archive"\n'
    )
    text, n = re.subn(
        r'\[\[locations\]\]\nname = "us_lta"\n(?:[^\[\n][^\n]*\n)*',
        block + "\n",
        topology.read_text(),
    )
    assert n == 1
    path = system.data_dir / "topology_s3.toml"
    path.write_text(text)
    with system.session() as s:
        load_topology(s, path, system.data_dir)


def test_audit_on_s3_does_not_clear_a_fixity_finding_from_metadata_and_repair_still_happens(
    system, s3_server, s3_bucket, override_settings, without_archive_repair
):
    override_settings(
        S3_ACCESS_KEY_ID=s3_server.access_key,
        S3_SECRET_ACCESS_KEY=s3_server.secret_key,
        # One bad copy among the many of a real archive: no hold for a systematic fault.
        AUDIT_MAX_DISCREPANCY_FRACTION=1.0,
    )
    _us_lta_on_s3(system, s3_server.endpoint_url, s3_bucket)
    fx = _package(system, ["cologne_lta", "us_lta"], files=0)
    us_id = fx.copy_ids["us_lta"]
    key = f"archive/{fx.relative_path}"
    client = s3_server.client()
    meta = client.head_object(Bucket=s3_bucket, Key=key)["Metadata"]
    assert meta["sha256"] == GOOD_SUM
    client.put_object(Bucket=s3_bucket, Key=key, Body=BAD, Metadata=meta)  # bytes replaced
    [finding] = verify_copies([us_id], full=True)
    assert finding.outcome == "CORRUPT"
    assert copy_row(system, us_id).lost_at is not None
    with system.session() as s:
        (report,) = run_audit(s, "us_lta", sample_fraction=1.0)
    assert report.unmarked == 0
    assert copy_row(system, us_id).lost_at is not None
    assert repair_copy(us_id) == "repaired"
    body = client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == GOOD_SUM
    assert copy_row(system, us_id).lost_at is None


# --- One finding, cleared only by a full re-read -----------------------------------------


def test_only_a_full_reread_clears_a_finding_of_bad_bytes(system, repairs_queued):
    from ccat_data_transfer.archive.proof import record_bad_bytes

    fx = _package(system, ["cologne_lta"], files=0)
    lta_id = fx.copy_ids["cologne_lta"]
    with system.session() as s:
        record_bad_bytes(s, lta_id, "unpack", "member sha256 differs")
    assert ("CORRUPT", "unpack") in _events(system, lta_id)
    assert [f.copy_id for f in repairs_queued] == [lta_id]
    [stat] = verify_copies([lta_id])
    assert stat.outcome == "VERIFIED" and copy_row(system, lta_id).lost_at is not None
    [full] = verify_copies([lta_id], full=True)
    assert full.outcome == "FIXITY_OK" and copy_row(system, lta_id).lost_at is None


def test_a_repair_that_reads_bad_source_bytes_records_the_finding_itself(system):
    fx = _package(system, ["cologne_lta", "us_lta"], files=0)
    for name in ("cologne_lta", "us_lta"):
        _overwrite(system, name, fx.relative_path, BAD)
    [finding] = verify_copies([fx.copy_ids["cologne_lta"]], full=True)
    assert finding.outcome == "CORRUPT"
    source = fx.copy_ids["us_lta"]
    assert ("CORRUPT", "repair") in _events(system, source)
    assert copy_row(system, source).lost_at is not None
