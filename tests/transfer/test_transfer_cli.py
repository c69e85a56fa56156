"""Command line of stages 3-5: managers with --once, `transfers list` and `transfers retry`."""

from __future__ import annotations

from sqlalchemy import select, update

from ccat_data_transfer.cli import main
from ccat_ops_db import models as m
from helpers_transfer import make_dtp_at_source_buffer


def test_manager_commands_once_move_a_package_to_archived(system, capsys):
    with system.session() as s:
        dtp = make_dtp_at_source_buffer(system, s, n_packages=1)
        rdp_id = dtp.raw_data_packages[0].id
    assert main(["transfer-manager", "--once"]) == 0
    out = capsys.readouterr().out
    assert "primary_planned=1" in out and "transfers_dispatched=1" in out
    assert main(["archive-manager", "--once", "-v"]) == 0
    assert "archive_dispatched=1" in capsys.readouterr().out
    with system.session() as s:
        assert s.get(m.RawDataPackage, rdp_id).state == m.PackageState.ARCHIVED


def test_transfers_list_filters_by_status_and_retry_resets_a_failed_one(system, capsys):
    with system.session() as s:
        make_dtp_at_source_buffer(system, s, n_packages=1)
    assert main(["transfer-manager", "--once"]) == 0
    with system.session() as s:
        (t,) = s.scalars(select(m.DataTransfer)).all()
        s.execute(
            update(m.DataTransfer)
            .where(m.DataTransfer.id == t.id)
            .values(status=m.Status.FAILED, failure_reason="disk on fire")
        )
    capsys.readouterr()
    assert main(["transfers", "list", "--status", "failed"]) == 0
    out = capsys.readouterr().out
    assert "disk on fire" in out and "cologne_buffer" in out
    assert main(["transfers", "list", "--status", "pending"]) == 0
    assert "no transfers" in capsys.readouterr().out
    assert main(["transfers", "list", "--status", "bogus"]) == 2
    assert main(["transfers", "retry", str(t.id)]) == 0
    assert "reset to PENDING" in capsys.readouterr().out
    with system.session() as s:
        assert s.get(m.DataTransfer, t.id).status == m.Status.PENDING
    assert main(["transfers", "retry", str(t.id)]) == 2  # not FAILED any more
    assert main(["transfers", "retry", "9999"]) == 2
