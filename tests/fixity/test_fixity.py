"""Fixity: the scan re-reads archive copies on a byte budget, oldest check first; a bad
copy is repaired from a good one elsewhere, or its package frozen when none is left."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta

from sqlalchemy import select

from ccat_data_transfer.archive.proof import CORRUPT, MISSING, verify_copies
from ccat_data_transfer.cli import main
from ccat_data_transfer.core.manager_state import put_state
from ccat_data_transfer.core.storage import storage_for_location
from ccat_data_transfer.fixity import cycle as scan
from ccat_data_transfer.fixity.repair import FROZEN, REPAIR_FAILED, REPAIR_STARTED, REPAIRED
from ccat_ops_db import models as m
from helpers_lifecycle import location, make_package_at, write_object
from helpers_webhook import webhook_fixture  # noqa: F401 - the webhook fixture

SIZE = 1000


def _content(tag: str) -> bytes:
    return (f"package {tag} ".encode() * SIZE)[:SIZE]


def _archived(system, tag, locations=("cologne_lta", "us_lta"), fixity=None):
    """A package whose copies at ``locations`` hold real bytes with the package's
    checksum; ``fixity`` sets every copy's last full check."""
    data = _content(tag)
    with system.session() as s:
        fx = make_package_at(system, s, list(locations), package_size=SIZE)
        package = s.get(m.RawDataPackage, fx.package_id)
        package.checksum = hashlib.sha256(data).hexdigest()
        for name, copy_id in fx.copy_ids.items():
            copy = s.get(m.PhysicalCopy, copy_id)
            copy.checksum = package.checksum
            copy.fixity_checked_at = fixity
            write_object(s, name, fx.relative_path, data)
    return fx, data


def _path(system, name, relative_path):
    with system.session() as s:
        return storage_for_location(location(s, name)).local_path(relative_path)


def _flip(system, name, relative_path, at=100):
    path = _path(system, name, relative_path)
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def _copy(system, copy_id):
    with system.session() as s:
        return s.get(m.PhysicalCopy, copy_id)


def _events(system, copy_id=None, package_id=None):
    ev = m.ArchiveEvent
    stmt = select(ev.event).order_by(ev.id)
    if copy_id is not None:
        stmt = stmt.where(ev.physical_copy_id == copy_id)
    if package_id is not None:
        stmt = stmt.where(ev.raw_data_package_id == package_id)
    with system.session() as s:
        return list(s.scalars(stmt))


def _give_credit(system, name, credit):
    """The scan of ``name`` starts with ``credit`` bytes (and no time to earn more)."""
    with system.session() as s:
        loc = location(s, name)
        value = {"at": m.utcnow().isoformat(), "credit": credit}
        put_state(s, scan._state_key(loc), json.dumps(value))


def _scan(system):
    with system.session() as s:
        return scan.run_once(s, site="")


# --- The scan ----------------------------------------------------------------------------


def test_scan_rereads_the_oldest_checked_copies_first_within_the_budget(system, override_settings):
    override_settings(FIXITY_BYTES_PER_DAY=100 * SIZE)
    now = m.utcnow()
    ages = {"never": None, "old": now - timedelta(days=300), "recent": now - timedelta(days=1)}
    copies = {}
    for tag, checked in ages.items():
        fx, _ = _archived(system, tag, ["cologne_lta"], fixity=checked)
        copies[tag] = fx.copy_ids["cologne_lta"]
    _give_credit(system, "cologne_lta", 2.5 * SIZE)
    _give_credit(system, "us_lta", 0)
    result = _scan(system)
    assert result["fixity_requested"] == 2 and result["fixity_requested_bytes"] == 2 * SIZE
    assert _copy(system, copies["never"]).fixity_checked_at >= now
    assert _copy(system, copies["old"]).fixity_checked_at >= now
    assert _copy(system, copies["recent"]).fixity_checked_at == ages["recent"]  # over budget
    [cologne] = [r for r in result["locations"] if r["location"] == "cologne_lta"]
    assert 0.5 * SIZE - 1 <= cologne["credit_bytes"] <= 0.5 * SIZE + 1  # kept for next time
    # The next cycle goes on where this one stopped.
    _give_credit(system, "cologne_lta", SIZE)
    assert _scan(system)["fixity_requested"] == 1
    assert _copy(system, copies["recent"]).fixity_checked_at >= now


def test_a_copy_bigger_than_the_credit_waits_for_a_full_days_credit(system, override_settings):
    override_settings(FIXITY_BYTES_PER_DAY=SIZE // 2)  # one copy is two days' budget
    fx, _ = _archived(system, "big", ["cologne_lta"])
    _give_credit(system, "cologne_lta", SIZE // 4)
    assert _scan(system)["fixity_requested"] == 0
    _give_credit(system, "cologne_lta", SIZE // 2)  # a full day saved: it goes, in debt
    result = _scan(system)
    assert result["fixity_requested"] == 1
    [cologne] = [r for r in result["locations"] if r["location"] == "cologne_lta"]
    assert cologne["credit_bytes"] < 0
    assert _copy(system, fx.copy_ids["cologne_lta"]).fixity_checked_at is not None


def test_scan_says_whether_the_budget_meets_the_period(system, override_settings):
    _archived(system, "a")
    _archived(system, "b")
    override_settings(FIXITY_BYTES_PER_DAY=SIZE, FIXITY_PERIOD_DAYS=3)
    result = _scan(system)
    [cologne] = [r for r in result["locations"] if r["location"] == "cologne_lta"]
    assert cologne["bytes"] == 2 * SIZE and cologne["round_days"] == 2.0
    assert cologne["meets_period"] and result["budget_meets_period"]
    override_settings(FIXITY_PERIOD_DAYS=1)
    assert not _scan(system)["budget_meets_period"]


# --- Repair ------------------------------------------------------------------------------


def test_a_byte_flip_at_one_lta_is_found_by_the_scan_and_repaired_from_the_other(system):
    fx, data = _archived(system, "flip")
    bad = fx.copy_ids["us_lta"]
    _flip(system, "us_lta", fx.relative_path)
    _give_credit(system, "cologne_lta", 10 * SIZE)
    _give_credit(system, "us_lta", 10 * SIZE)
    before = m.utcnow()
    _scan(system)
    assert _path(system, "us_lta", fx.relative_path).read_bytes() == data
    copy = _copy(system, bad)
    assert copy.status == m.PhysicalCopyStatus.PRESENT and copy.lost_at is None
    assert copy.verified_at >= before and copy.fixity_checked_at >= before
    assert _events(system, copy_id=bad) == [CORRUPT, REPAIR_STARTED, REPAIRED]
    with system.session() as s:
        started = s.scalars(
            select(m.ArchiveEvent).filter_by(physical_copy_id=bad, event=REPAIR_STARTED)
        ).one()
        assert "cologne_lta" in started.message
        assert s.get(m.RawDataPackage, fx.package_id).frozen_at is None


def test_a_missing_lta_copy_is_repaired_from_a_buffer_copy(system):
    fx, data = _archived(system, "buffer", ["us_lta", "cologne_buffer"])
    bad = fx.copy_ids["us_lta"]
    _path(system, "us_lta", fx.relative_path).unlink()
    [finding] = verify_copies([bad])
    assert finding.outcome == MISSING
    assert _path(system, "us_lta", fx.relative_path).read_bytes() == data
    assert _copy(system, bad).lost_at is None
    assert _events(system, copy_id=bad) == [MISSING, REPAIR_STARTED, REPAIRED]


def test_no_good_copy_anywhere_freezes_the_package_with_an_alert(
    system, override_settings, webhook
):
    url, received = webhook
    override_settings(ALERT_WEBHOOK_URL=url)
    fx, _ = _archived(system, "lost")
    for name in ("cologne_lta", "us_lta"):
        _flip(system, name, fx.relative_path)
    _give_credit(system, "cologne_lta", 10 * SIZE)
    _give_credit(system, "us_lta", 10 * SIZE)
    _scan(system)
    with system.session() as s:
        package = s.get(m.RawDataPackage, fx.package_id)
        assert package.frozen_at is not None and "no good copy" in package.frozen_reason
    assert _events(system, package_id=fx.package_id).count(FROZEN) == 1
    assert REPAIRED not in _events(system, package_id=fx.package_id)
    frozen = [a for a in received if a["event"] == "package_frozen"]
    assert len(frozen) == 1 and frozen[0]["package_id"] == fx.package_id
    for copy_id in fx.copy_ids.values():
        assert _copy(system, copy_id).lost_at is not None


def test_a_repair_whose_source_is_corrupt_too_does_not_mark_the_target_repaired(system):
    # The source looks good to the DB (a fresh full check) but its bytes changed since.
    fx, _ = _archived(system, "both", fixity=m.utcnow())
    bad, source = fx.copy_ids["cologne_lta"], fx.copy_ids["us_lta"]
    _flip(system, "cologne_lta", fx.relative_path, at=10)
    _flip(system, "us_lta", fx.relative_path, at=20)
    flipped = _path(system, "cologne_lta", fx.relative_path).read_bytes()
    [finding] = verify_copies([bad], full=True)
    assert finding.outcome == CORRUPT
    assert _events(system, copy_id=bad) == [CORRUPT, REPAIR_STARTED, REPAIR_FAILED]
    assert _copy(system, bad).lost_at is not None
    assert _path(system, "cologne_lta", fx.relative_path).read_bytes() == flipped  # untouched
    assert _copy(system, source).lost_at is not None  # found bad at its own site
    assert CORRUPT in _events(system, copy_id=source)
    assert REPAIRED not in _events(system, package_id=fx.package_id)
    with system.session() as s:
        assert s.get(m.RawDataPackage, fx.package_id).frozen_at is not None


def test_the_scan_requeues_the_repair_of_a_copy_the_audit_marked_lost(system):
    fx, data = _archived(system, "audit")
    bad = fx.copy_ids["us_lta"]
    _flip(system, "us_lta", fx.relative_path)
    with system.session() as s:
        s.get(m.PhysicalCopy, bad).lost_at = m.utcnow()  # as the audit marks it
    _give_credit(system, "cologne_lta", 0)
    _give_credit(system, "us_lta", 0)
    assert _scan(system)["repairs_queued"] == 1
    assert _path(system, "us_lta", fx.relative_path).read_bytes() == data
    assert _events(system, copy_id=bad) == [REPAIR_STARTED, REPAIRED]
    assert _scan(system)["repairs_queued"] == 0


# --- Wiring: orchestrator stage, command line --------------------------------------------


def test_fixity_is_a_stage_of_the_orchestrator():
    from ccat_data_transfer.operations.orchestrator import default_stages

    [stage] = [s for s in default_stages() if s.name == "fixity"]
    assert stage.callable() is scan.run_once


def test_fixity_commands(system, capsys):
    fx, _ = _archived(system, "cli")
    _give_credit(system, "cologne_lta", 10 * SIZE)
    assert main(["fixity-manager", "--once"]) == 0
    assert '"fixity_requested": 2' in capsys.readouterr().out  # one copy at each LTA
    assert main(["fixity", "status"]) == 0
    out = capsys.readouterr().out
    assert "cologne_lta" in out and "us_lta" in out
    assert main(["archive-events", str(fx.package_id)]) == 0
    assert "FIXITY_OK" in capsys.readouterr().out
    assert main(["archive-events", "999999"]) == 2


def test_locations_on_audit_hold_are_neither_scanned_repaired_nor_used_as_sources(system):
    fx, data = _archived(system, "held")
    _flip(system, "us_lta", fx.relative_path)
    with system.session() as s:
        location(s, "cologne_lta").audit_hold_at = m.utcnow()
    _give_credit(system, "cologne_lta", 10 * SIZE)
    _give_credit(system, "us_lta", 10 * SIZE)
    result = _scan(system)
    [cologne] = [r for r in result["locations"] if r["location"] == "cologne_lta"]
    assert cologne["held"] and cologne["requested"] == 0
    bad = fx.copy_ids["us_lta"]
    # The only good copy is at a held location: not used, no repair, and no freeze.
    assert _events(system, copy_id=bad) == [CORRUPT, REPAIR_FAILED]
    with system.session() as s:
        assert s.get(m.RawDataPackage, fx.package_id).frozen_at is None  # not known bad
        location(s, "cologne_lta").audit_hold_at = None
    _give_credit(system, "us_lta", 0)
    with system.session() as s:
        s.execute(m.ArchiveEvent.__table__.delete())  # as if the retry interval had passed
    assert _scan(system)["repairs_queued"] == 1
    assert _path(system, "us_lta", fx.relative_path).read_bytes() == data
