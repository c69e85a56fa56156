"""Archive proof: a worker at the archive's site looks at the object itself."""

from __future__ import annotations

import hashlib
from datetime import timedelta

import pytest
from sqlalchemy import select

from ccat_data_transfer.archive.proof import (
    CORRUPT,
    FIXITY_OK,
    MISSING,
    VERIFIED,
    request_verification,
    verify_copies,
)
from ccat_data_transfer.core.storage import storage_for_location
from ccat_ops_db import models as m
from helpers_lifecycle import make_package_at, write_object

CONTENT = b"archived package bytes " * 40


# These tests look at the verification alone: no repair runs after a bad finding (repair
# and freeze are tests/fixity/test_fixity.py's).
pytestmark = pytest.mark.usefixtures("without_archive_repair")


def _archived(system, locations=("cologne_lta", "us_lta")):
    """A package at both LTAs whose copies hold real bytes with the package's checksum."""
    with system.session() as s:
        fx = make_package_at(system, s, list(locations), package_size=len(CONTENT), read_back=False)
        package = s.get(m.RawDataPackage, fx.package_id)
        package.checksum = hashlib.sha256(CONTENT).hexdigest()
        for name, copy_id in fx.copy_ids.items():
            copy = s.get(m.PhysicalCopy, copy_id)
            copy.checksum = package.checksum
            copy.verified_at = m.utcnow() - timedelta(days=2)
            write_object(s, name, fx.relative_path, CONTENT)
    return fx


def _copy(system, copy_id):
    with system.session() as s:
        return s.get(m.PhysicalCopy, copy_id)


def _events(system, copy_id):
    with system.session() as s:
        return [
            e.event
            for e in s.scalars(
                select(m.ArchiveEvent)
                .where(m.ArchiveEvent.physical_copy_id == copy_id)
                .order_by(m.ArchiveEvent.id)
            )
        ]


def _storage_path(system, name, relative_path):
    with system.session() as s:
        loc = s.scalars(select(m.DataLocation).filter_by(name=name)).one()
        return storage_for_location(loc).local_path(relative_path)


def test_an_intact_copy_gets_fresh_proof(system):
    fx = _archived(system)
    copy_id = fx.copy_ids["cologne_lta"]
    before = m.utcnow()
    [finding] = verify_copies([copy_id])
    assert finding.outcome == VERIFIED
    copy = _copy(system, copy_id)
    assert copy.verified_at >= before and copy.lost_at is None
    assert copy.fixity_checked_at is None  # a stat is not a re-read of the bytes


def test_a_full_check_rereads_the_bytes_and_records_fixity(system):
    fx = _archived(system)
    copy_id = fx.copy_ids["cologne_lta"]
    [finding] = verify_copies([copy_id], full=True)
    assert finding.outcome == FIXITY_OK
    copy = _copy(system, copy_id)
    assert copy.fixity_checked_at is not None and copy.verified_at == copy.fixity_checked_at
    assert _events(system, copy_id) == [FIXITY_OK]


def test_a_vanished_archive_file_is_marked_lost_not_proven(system):
    fx = _archived(system)
    copy_id = fx.copy_ids["cologne_lta"]
    _storage_path(system, "cologne_lta", fx.relative_path).unlink()
    [finding] = verify_copies([copy_id])
    assert finding.outcome == MISSING
    copy = _copy(system, copy_id)
    assert copy.lost_at is not None
    assert copy.verified_at < m.utcnow() - timedelta(days=1)  # no proof was recorded
    assert _events(system, copy_id) == [MISSING]
    # The other archive's copy is untouched.
    assert _copy(system, fx.copy_ids["us_lta"]).lost_at is None


def test_a_flipped_byte_is_found_by_the_full_check_only(system):
    fx = _archived(system)
    copy_id = fx.copy_ids["us_lta"]
    path = _storage_path(system, "us_lta", fx.relative_path)
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01
    path.write_bytes(bytes(data))
    [quick] = verify_copies([copy_id])
    assert quick.outcome == VERIFIED  # same size: a stat cannot see it
    [full] = verify_copies([copy_id], full=True)
    assert full.outcome == CORRUPT and "sha256" in full.message
    copy = _copy(system, copy_id)
    assert copy.lost_at is not None
    assert _events(system, copy_id) == [CORRUPT]


def test_a_truncated_copy_is_corrupt_by_its_size(system):
    fx = _archived(system)
    copy_id = fx.copy_ids["cologne_lta"]
    path = _storage_path(system, "cologne_lta", fx.relative_path)
    path.write_bytes(CONTENT[:-10])
    [finding] = verify_copies([copy_id])
    assert finding.outcome == CORRUPT and "size" in finding.message


def test_a_copy_that_is_no_longer_present_is_not_touched(system):
    fx = _archived(system)
    copy_id = fx.copy_ids["cologne_lta"]
    with system.session() as s:
        s.get(m.PhysicalCopy, copy_id).status = m.PhysicalCopyStatus.DELETION_SCHEDULED
    assert verify_copies([copy_id]) == []


def test_request_runs_the_verification_at_the_copys_site_and_queues_each_copy_once(system):
    fx = _archived(system)
    ids = list(fx.copy_ids.values())
    with system.session() as s:
        assert request_verification(s, ids) == 2  # embedded: the task ran in-process
    for copy_id in ids:
        copy = _copy(system, copy_id)
        assert copy.verified_at > m.utcnow() - timedelta(minutes=1)
        assert copy.verification_requested_at is None  # answered
    # An outstanding request (a worker has not answered yet) is not queued again ...
    with system.session() as s:
        s.get(m.PhysicalCopy, ids[0]).verification_requested_at = m.utcnow()
    with system.session() as s:
        assert request_verification(s, ids[:1]) == 0
    # ... until it is older than the request timeout (its message or worker was lost).
    with system.session() as s:
        s.get(m.PhysicalCopy, ids[0]).verification_requested_at = m.utcnow() - timedelta(hours=1)
    with system.session() as s:
        assert request_verification(s, ids[:1]) == 1


def test_archive_verification_queue_is_consumed_by_the_archives_site():
    from ccat_data_transfer.core.operation_types import OperationType
    from ccat_data_transfer.core.queues import OPERATIONS_BY_LOCATION_TYPE

    assert (
        OperationType.ARCHIVE_VERIFICATION
        in OPERATIONS_BY_LOCATION_TYPE[m.LocationType.LONG_TERM_ARCHIVE]
    )
