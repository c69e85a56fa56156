"""Command line: deletion-plan (dry run), explain, disk-monitor, deletion-manager --once,
buffer-manager --once."""

from __future__ import annotations

import json

from ccat_data_transfer.cli import main
from ccat_ops_db import models as m
from helpers_lifecycle import copy_row, location, make_package_at, object_exists

S = m.PhysicalCopyStatus


def _setup(system):
    with system.session() as s:
        ok = make_package_at(system, s, ["ccat_telescope_buffer", "cologne_lta"], files=0)
        kept = make_package_at(
            system,
            s,
            {"ccat_telescope_buffer": S.PRESENT, "cologne_lta": S.DELETION_SCHEDULED},
            files=0,
        )
    return ok, kept


def test_deletion_plan_lists_deletable_and_the_rule_keeping_the_rest_without_changes(
    system, capsys
):
    ok, kept = _setup(system)
    assert main(["deletion-plan", "--location", "ccat_telescope_buffer", "--json"]) == 0
    items = {i["physical_copy_id"]: i for i in json.loads(capsys.readouterr().out)}
    assert items[ok.copy_ids["ccat_telescope_buffer"]]["deletable"] is True
    k = items[kept.copy_ids["ccat_telescope_buffer"]]
    assert k["deletable"] is False
    assert k["reason"].startswith("kept: no PRESENT copy at a LONG_TERM_ARCHIVE location")
    assert "cologne_lta copy is DELETION_SCHEDULED" in k["reason"]
    # A dry run: nothing changed.
    assert copy_row(system, ok.copy_ids["ccat_telescope_buffer"]).status == S.PRESENT
    assert object_exists(system, "ccat_telescope_buffer", ok.relative_path)
    assert main(["deletion-plan"]) == 0
    assert "Deletion plan (dry run)" in capsys.readouterr().out


def test_explain_prints_the_rule_for_one_copy(system, capsys):
    ok, _kept = _setup(system)
    assert main(["explain", str(ok.copy_ids["cologne_lta"])]) == 0
    assert "LONG_TERM_ARCHIVE" in capsys.readouterr().out
    assert main(["explain", "999999"]) == 2


def test_explain_shows_the_deletion_history_of_a_copy(system, capsys):
    ok, _kept = _setup(system)
    assert main(["deletion-manager", "--once"]) == 0
    capsys.readouterr()
    assert main(["explain", str(ok.copy_ids["ccat_telescope_buffer"])]) == 0
    out = capsys.readouterr().out
    assert "Deletion history" in out
    assert "SCHEDULED" in out and "DELETED" in out


def test_deletion_manager_once_runs_a_cycle(system, capsys):
    ok, kept = _setup(system)
    assert main(["deletion-manager", "--once"]) == 0
    assert json.loads(capsys.readouterr().out)["raw_data_packages"] == 1
    assert copy_row(system, ok.copy_ids["ccat_telescope_buffer"]).status == S.DELETED
    assert copy_row(system, kept.copy_ids["ccat_telescope_buffer"]).status == S.PRESENT


def test_disk_monitor_and_buffer_manager_once(system, capsys):
    with system.session() as s:
        location(s, "cologne_buffer").capacity_bytes = 1000
    assert main(["disk-monitor", "--location-name", "cologne_buffer", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["location"] == "cologne_buffer" and rows[0]["state"] == "normal"
    assert rows[0]["thresholds"] == {"warning": 70.0, "critical": 85.0, "emergency": 95.0}
    assert main(["disk-monitor", "--site", "cologne"]) == 0
    out = capsys.readouterr().out
    assert "cologne_buffer" in out and "cologne_lta" in out
    assert main(["disk-monitor", "--all"]) == 0
    assert "us_buffer" in capsys.readouterr().out
    assert main(["disk-monitor"]) == 2  # exactly one selector
    assert main(["buffer-manager", "--once"]) == 0
    assert "cologne_buffer" in json.loads(capsys.readouterr().out)
