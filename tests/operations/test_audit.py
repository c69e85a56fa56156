"""Consistency audit: lost files, dark data, drift; marks lost copies, never deletes."""

from __future__ import annotations

import hashlib
import random

from sqlalchemy import select

from ccat_data_transfer.cli import main
from ccat_data_transfer.operations.audit import run_audit
from ccat_ops_db import models as m
from helpers_webhook import webhook_fixture  # noqa: F401 - the webhook fixture


def _files_at(system, location_name, n=10):
    """n raw files with PRESENT copies at a location, real bytes on disk."""
    root = system.location_path(location_name)
    ids = []
    with system.session() as s:
        loc = system.location(s, location_name)
        module = s.scalars(select(m.InstrumentModule)).first()
        eou = m.ExecutedObsUnit(
            name=f"audit-{location_name}", obs_unit=m.ObsUnit(name=f"o-{location_name}")
        )
        for i in range(n):
            data = f"file {i} at {location_name}".encode() * 100
            rel = f"d/f{i:03d}.dat"
            (root / "d").mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
            f = m.RawDataFile(
                relative_path=rel,
                size=len(data),
                checksum=hashlib.sha256(data).hexdigest(),
                instrument_module_id=module.id,
                executed_obs_unit=eou,
                source_location=loc,
            )
            copy = m.RawDataFilePhysicalCopy(
                raw_data_file=f, data_location=loc, relative_path=rel, size=len(data)
            )
            s.add(copy)
            s.flush()
            ids.append(copy.id)
    return root, ids


def test_clean_location_has_no_discrepancy(system):
    _files_at(system, "primecam_raw_data")
    with system.session() as s:
        (report,) = run_audit(s, "primecam_raw_data", full=True)
    assert report.expected == 10 and report.found == 10
    assert report.discrepancies == 0 and report.checksums_checked == 10


def test_finds_lost_dark_and_drift_and_marks_lost_copies(system):
    root, ids = _files_at(system, "primecam_raw_data", n=40)
    (root / "d/f000.dat").unlink()  # lost
    (root / "d/f001.dat").write_bytes(b"x" * 5)  # size drift
    data = bytearray((root / "d/f002.dat").read_bytes())
    data[10] ^= 0xFF
    (root / "d/f002.dat").write_bytes(bytes(data))  # checksum drift, same size
    (root / "stray.bin").write_bytes(b"dark")  # dark data
    with system.session() as s:
        (report,) = run_audit(s, "primecam_raw_data", full=True)
    assert [x["path"] for x in report.lost] == ["d/f000.dat"]
    assert {x["path"] for x in report.drift} == {"d/f001.dat", "d/f002.dat"}
    assert [x["path"] for x in report.dark] == ["stray.bin"]
    assert report.marked_lost == 3
    with system.session() as s:
        lost = s.scalars(select(m.PhysicalCopy.id).where(m.PhysicalCopy.lost_at.is_not(None))).all()
    assert sorted(lost) == sorted(ids[:3])
    # never deletes: the dark file is still there
    assert (root / "stray.bin").exists()


def test_found_again_copy_is_unmarked(system):
    root, ids = _files_at(system, "primecam_raw_data", n=20)
    saved = (root / "d/f005.dat").read_bytes()
    (root / "d/f005.dat").unlink()
    with system.session() as s:
        run_audit(s, "primecam_raw_data")
    (root / "d/f005.dat").write_bytes(saved)
    with system.session() as s:
        (report,) = run_audit(s, "primecam_raw_data")
        assert report.unmarked == 1
        assert s.get(m.PhysicalCopy, ids[5]).lost_at is None


def test_too_many_discrepancies_stop_the_audit_and_mark_nothing(system):
    root, _ = _files_at(system, "chai_raw_data", n=10)
    for i in range(5):
        (root / f"d/f{i:03d}.dat").unlink()
    with system.session() as s:
        (report,) = run_audit(s, "chai_raw_data")
        assert report.aborted and "Nothing was marked" in report.aborted
        assert (
            s.scalars(select(m.PhysicalCopy).where(m.PhysicalCopy.lost_at.is_not(None))).all() == []
        )


def test_sampled_checksums_check_about_the_fraction(system, override_settings):
    _files_at(system, "primecam_raw_data", n=40)
    with system.session() as s:
        from ccat_data_transfer.operations.audit import audit_location

        report = audit_location(
            s, system.location(s, "primecam_raw_data"), sample_fraction=0.25, rng=random.Random(1)
        )
    assert 2 <= report.checksums_checked <= 20


def test_audit_cli_exits_nonzero_on_discrepancy(system, capsys):
    root, _ = _files_at(system, "primecam_raw_data", n=20)
    (root / "stray.bin").write_bytes(b"dark")
    assert main(["audit", "--location", "primecam_raw_data", "--dry-run"]) == 1
    out = capsys.readouterr().out
    assert "stray.bin" in out
    assert main(["audit", "--location", "nowhere"]) == 2


# --- Audit holds -------------------------------------------------------------------------


def _over_threshold(system, name="chai_raw_data"):
    root, _ = _files_at(system, name, n=10)
    for i in range(5):
        (root / f"d/f{i:03d}.dat").unlink()
    return root


def _events(system, kind):
    with system.session() as s:
        return [
            (e.event, e.data_location_id, e.actor, e.message)
            for e in s.scalars(
                select(m.ArchiveEvent)
                .where(m.ArchiveEvent.event == kind)
                .order_by(m.ArchiveEvent.id)
            )
        ]


def test_audit_over_threshold_puts_the_location_on_hold_with_event_and_alert(
    system, override_settings, webhook
):
    url, received = webhook
    override_settings(ALERT_WEBHOOK_URL=url)
    _over_threshold(system)
    with system.session() as s:
        (report,) = run_audit(s, "chai_raw_data")
        assert report.held
    with system.session() as s:
        loc = system.location(s, "chai_raw_data")
        assert loc.audit_hold_at is not None
        assert "5 lost" in loc.audit_hold_reason and "10 expected" in loc.audit_hold_reason
        loc_id = loc.id
    [(event, where, actor, message)] = _events(system, "HOLD_SET")
    assert (event, where, actor) == ("HOLD_SET", loc_id, "audit") and "5 lost" in message
    assert len(received) == 1
    assert received[0]["event"] == "audit_hold" and received[0]["location"] == "chai_raw_data"
    # A second audit that finds the same fault keeps the first hold: no new event or alert.
    with system.session() as s:
        (again,) = run_audit(s, "chai_raw_data")
        assert again.aborted and not again.held
    assert len(_events(system, "HOLD_SET")) == 1 and len(received) == 1


def test_hold_list_and_clear_through_the_cli(system, capsys):
    _over_threshold(system)
    assert main(["audit", "--location", "chai_raw_data"]) == 1
    capsys.readouterr()
    assert main(["audit", "hold", "list"]) == 0
    out = capsys.readouterr().out
    assert "chai_raw_data" in out and "5 lost" in out
    assert main(["audit", "hold", "clear", "nowhere"]) == 2
    assert "no data location named 'nowhere'" in capsys.readouterr().err
    assert main(["audit", "hold", "clear", "primecam_raw_data"]) == 2
    assert "not on hold" in capsys.readouterr().err
    assert main(["audit", "hold", "clear", "chai_raw_data", "--reason", "disk remounted"]) == 0
    assert "cleared" in capsys.readouterr().out
    with system.session() as s:
        assert system.location(s, "chai_raw_data").audit_hold_at is None
    [(_, _, actor, message)] = _events(system, "HOLD_CLEARED")
    assert actor == "operator" and "disk remounted" in message
    assert main(["audit", "hold", "list"]) == 0
    assert "no location is on hold" in capsys.readouterr().out


def test_a_hold_is_a_metric_and_needs_attention_on_the_dashboard(system):
    from ccat_data_transfer.api.dashboard_queries import overview_data
    from ccat_data_transfer.operations.metrics import collect_snapshot, snapshot_to_prometheus

    _over_threshold(system)
    with system.session() as s:
        run_audit(s, "chai_raw_data")
    with system.session() as s:
        snap = collect_snapshot(s)
        overview = overview_data(s)
    assert [h["location"] for h in snap["audit_holds"]] == ["chai_raw_data"]
    [gauge] = [f for f in snapshot_to_prometheus(snap) if f.name == "ccat_audit_hold"]
    values = {sample.labels["location"]: sample.value for sample in gauge.samples}
    assert values["chai_raw_data"] == 1.0 and values["primecam_raw_data"] == 0.0
    assert set(values) >= {b["location"] for b in snap["buffers"]}
    assert any("chai_raw_data is ON HOLD" in a["text"] for a in overview["attention"])
