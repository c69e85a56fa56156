"""Managers scoped to one site: each does only its site's work, and one process per site
does together exactly the work of one central process (``ccat_data_transfer.core.scope``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update

from ccat_data_transfer import deletion_manager, staging_manager, transfer_manager
from ccat_data_transfer.archive import cycle as archive_manager
from ccat_data_transfer.buffers import cycle as buffer_manager
from ccat_data_transfer.cli import main
from ccat_data_transfer.core.errors import NotFoundError
from ccat_data_transfer.core.manager_loop import stop_event
from ccat_data_transfer.core.scope import ALL_SITES, location_ids, scoped_name
from ccat_data_transfer.operations import recovery
from ccat_data_transfer.operations.orchestrator import lifecycle_counts
from ccat_data_transfer.packaging import raw_cycle, transfer_cycle
from ccat_ops_db import models as m
from helpers_lifecycle import make_dtp, make_package_at, make_staging_job, make_transfer
from helpers_pipeline import make_raw_files
from helpers_staging import add_processing_location, make_archived_package
from helpers_transfer import make_dtp_at_source_buffer

CLI = [sys.executable, "-m", "ccat_data_transfer"]
SITES = ("ccat", "cologne", "us", "processing")
PRESENT = m.PhysicalCopyStatus.PRESENT
DELETED = m.PhysicalCopyStatus.DELETED

#: Every manager's cycle, in the order of one round of ``run``, plus recovery.
MANAGERS: dict[str, Callable[..., Any]] = {
    "buffer_manager": buffer_manager.run_once,
    "raw_data_package_manager": raw_cycle.run_once,
    "data_transfer_package_manager": transfer_cycle.run_once,
    "transfer_manager": transfer_manager.run_once,
    "archive_manager": archive_manager.run_once,
    "staging_manager": staging_manager.run_once,
    "deletion_manager": deletion_manager.run_once,
    "recovery": recovery.run_once,
}


def _cycle(system: Any, manager: str | Callable[..., Any], site: str | None = None) -> Any:
    fn = MANAGERS[manager] if isinstance(manager, str) else manager
    with system.session() as s:
        return fn(s) if site is None else fn(s, site=site)


def _round(system: Any, sites: tuple[str, ...] = SITES) -> None:
    """Every manager once per site, each site in turn (one process per site)."""
    for site in sites:
        for name in MANAGERS:
            _cycle(system, name, site)


def _rounds_until(system: Any, done: Callable[[], bool], max_rounds: int = 20) -> int:
    for n in range(1, max_rounds + 1):
        _round(system)
        if done():
            return n
    raise AssertionError(f"not done after {max_rounds} rounds of site-scoped managers")


def _state(system: Any) -> dict[str, Any]:
    """Everything the managers decide about (not measurements)."""
    with system.session() as s:
        return {
            "copies": sorted(
                (c.id, c.type, c.data_location_id, c.status.name)
                for c in s.scalars(select(m.PhysicalCopy))
            ),
            "files": sorted(
                (str(f.id), f.raw_data_package_id) for f in s.scalars(select(m.RawDataFile))
            ),
            "packages": sorted(
                (p.id, p.state.name, p.status.name, p.data_transfer_package_id)
                for p in s.scalars(select(m.RawDataPackage))
            ),
            "dtps": sorted((d.id, d.status.name) for d in s.scalars(select(m.DataTransferPackage))),
            "transfers": sorted(
                (t.id, t.destination_location_id, t.status.name, t.unpack_status.name)
                for t in s.scalars(select(m.DataTransfer))
            ),
            "archive_transfers": sorted(
                (t.id, t.destination_location_id, t.status.name)
                for t in s.scalars(select(m.LongTermArchiveTransfer))
            ),
            "jobs": sorted(
                (j.id, j.status.name, j.active) for j in s.scalars(select(m.StagingJob))
            ),
        }


def _copy_status(system: Any, copy_id: int) -> m.PhysicalCopyStatus:
    with system.session() as s:
        return s.get(m.PhysicalCopy, copy_id).status


def _add_source_site(system: Any, session: Any, name: str = "apex") -> None:
    """A second telescope site with its own SOURCE and BUFFER locations."""
    site = m.Site(name=name, short_name=name, description="second telescope")
    session.add(site)
    for kind, suffix in ((m.LocationType.SOURCE, "raw_data"), (m.LocationType.BUFFER, "buffer")):
        path = system.data_dir / name / f"{name}_{suffix}"
        path.mkdir(parents=True, exist_ok=True)
        session.add(
            m.DiskDataLocation(
                name=f"{name}_{suffix}",
                site=site,
                location_type=kind,
                storage_type=m.StorageType.DISK,
                path=str(path),
                priority=0,
                active=True,
            )
        )
    session.flush()


def _packaged(system: Any, source: str) -> tuple[int, int]:
    """(packaged, all) raw files at a SOURCE location."""
    with system.session() as s:
        loc = system.location(s, source)
        f = m.RawDataFile
        total = s.scalar(select(func.count(f.id)).where(f.source_location_id == loc.id))
        done = s.scalar(
            select(func.count(f.id)).where(
                f.source_location_id == loc.id, f.raw_data_package_id.is_not(None)
            )
        )
        return done, total


# ---------------------------------------------------------------------------------------
# The scope itself
# ---------------------------------------------------------------------------------------


def test_location_ids_of_a_site_by_name_or_short_name_and_none_when_unscoped(system):
    with system.session() as s:
        cologne = {system.location(s, n).id for n in ("cologne_buffer", "cologne_lta")}
        assert set(location_ids(s, "cologne")) == cologne
        assert location_ids(s, "proc") == [system.location(s, "processing_scratch").id]
        assert location_ids(s, ALL_SITES) is None
        assert location_ids(s) is None  # MANAGER_SITE is empty by default


@pytest.mark.parametrize("manager", sorted(MANAGERS))
def test_unknown_site_is_refused_with_a_clear_error_and_nothing_changes(system, manager):
    make_raw_files(system, "primecam_raw_data", "eou-unknown", "primecam/280GHz", 2, 512)
    with system.session() as s:
        make_package_at(system, s, ["ccat_telescope_buffer", "cologne_lta"])
    before = _state(system)
    with pytest.raises(NotFoundError, match=r"no site named 'atlantis' \(known sites: ccat, "):
        _cycle(system, manager, "atlantis")
    assert _state(system) == before


def test_manager_site_setting_scopes_run_once_and_an_explicit_site_wins(system, override_settings):
    make_raw_files(system, "primecam_raw_data", "eou-setting", "primecam/280GHz", 2, 512)
    override_settings(MANAGER_SITE="cologne")
    assert _cycle(system, "raw_data_package_manager")["packages_submitted"] == 0
    assert _packaged(system, "primecam_raw_data") == (0, 2)
    assert _cycle(system, "raw_data_package_manager", ALL_SITES)["packages_created"] == 1
    assert _packaged(system, "primecam_raw_data") == (2, 2)


def test_scoped_names_carry_the_site():
    assert scoped_name("deletion_manager", "cologne") == "deletion_manager@cologne"
    assert scoped_name("deletion_manager", None) == "deletion_manager"


# ---------------------------------------------------------------------------------------
# Each manager keeps to its site
# ---------------------------------------------------------------------------------------


def test_raw_data_package_manager_packages_only_files_at_its_sites_source(system):
    with system.session() as s:
        _add_source_site(system, s)
    make_raw_files(system, "primecam_raw_data", "eou-ccat", "primecam/280GHz", 2, 512)
    make_raw_files(system, "apex_raw_data", "eou-apex", "primecam/350GHz", 3, 512)

    _cycle(system, "raw_data_package_manager", "cologne")
    assert _packaged(system, "primecam_raw_data") == (0, 2)
    assert _packaged(system, "apex_raw_data") == (0, 3)
    assert _cycle(system, "raw_data_package_manager", "apex")["files_packaged"] == 3
    assert _packaged(system, "primecam_raw_data") == (0, 2)
    assert _cycle(system, "raw_data_package_manager", "ccat")["files_packaged"] == 2
    with system.session() as s:
        buffers = {
            c.data_location.name
            for c in s.scalars(select(m.RawDataPackagePhysicalCopy))
            if c.status == PRESENT
        }
    assert buffers == {"ccat_telescope_buffer", "apex_buffer"}


def test_data_transfer_package_manager_bundles_only_at_its_sites_buffer(system):
    with system.session() as s:
        _add_source_site(system, s)
    make_raw_files(system, "primecam_raw_data", "eou-ccat", "primecam/280GHz", 2, 512)
    make_raw_files(system, "apex_raw_data", "eou-apex", "primecam/350GHz", 2, 512)
    _cycle(system, "raw_data_package_manager", ALL_SITES)

    def bundled() -> set[str]:
        with system.session() as s:
            return {
                d.origin_location.name
                for d in s.scalars(select(m.DataTransferPackage))
                if d.status == m.Status.PENDING
            }

    assert _cycle(system, "data_transfer_package_manager", "us")["packages_submitted"] == 0
    assert _cycle(system, "data_transfer_package_manager", "ccat")["packages_created"] == 1
    assert bundled() == {"ccat_telescope_buffer"}
    assert _cycle(system, "data_transfer_package_manager", "apex")["packages_created"] == 1
    assert bundled() == {"ccat_telescope_buffer", "apex_buffer"}


def test_transfer_manager_pushes_from_the_origin_site_and_unpacks_at_the_destination(system):
    with system.session() as s:
        dtp_id = make_dtp_at_source_buffer(system, s).id

    def transfers() -> list[tuple[str, str, str, str, bool]]:
        with system.session() as s:
            return [
                (
                    t.origin_location.site.name,
                    t.destination_location.site.name,
                    t.status.name,
                    t.unpack_status.name,
                    t.is_primary,
                )
                for t in s.scalars(select(m.DataTransfer).order_by(m.DataTransfer.id))
            ]

    nothing = {
        "primary_planned": 0,
        "onward_planned": 0,
        "transfers_dispatched": 0,
        "unpacks_dispatched": 0,
        "packages_completed": 0,
    }
    for site in ("cologne", "us", "processing"):
        assert _cycle(system, "transfer_manager", site) == nothing
    assert transfers() == []

    # The telescope site pushes the primary transfer; the unpack is not its work.
    summary = _cycle(system, "transfer_manager", "ccat")
    assert (summary["primary_planned"], summary["transfers_dispatched"]) == (1, 1)
    assert summary["unpacks_dispatched"] == 0
    [(_, first, status, unpack, _)] = transfers()
    other = "us" if first == "cologne" else "cologne"
    assert (status, unpack) == ("COMPLETED", "PENDING")

    assert _cycle(system, "transfer_manager", other) == nothing
    assert _cycle(system, "transfer_manager", first)["unpacks_dispatched"] == 1
    # The secondary transfer leaves from the primary LTA site: its manager pushes it.
    assert _cycle(system, "transfer_manager", "ccat") == nothing
    summary = _cycle(system, "transfer_manager", first)
    assert (summary["onward_planned"], summary["transfers_dispatched"]) == (1, 1)
    assert transfers()[1] == (first, other, "COMPLETED", "PENDING", False)
    assert _cycle(system, "transfer_manager", other)["unpacks_dispatched"] == 1
    # The transfer package's status belongs to its origin site.
    assert _cycle(system, "transfer_manager", first)["packages_completed"] == 0
    assert _cycle(system, "transfer_manager", "ccat")["packages_completed"] == 1
    with system.session() as s:
        assert s.get(m.DataTransferPackage, dtp_id).status == m.Status.COMPLETED


def _present_lta_copies(s: Any) -> dict[str, int]:
    """PRESENT raw data package copies per LONG_TERM_ARCHIVE location."""
    rows = s.execute(
        select(m.DataLocation.name, func.count())
        .join(m.RawDataPackagePhysicalCopy)
        .where(
            m.DataLocation.location_type == m.LocationType.LONG_TERM_ARCHIVE,
            m.RawDataPackagePhysicalCopy.status == PRESENT,
        )
        .group_by(m.DataLocation.name)
    ).all()
    return dict(rows)


def test_archive_manager_archives_only_into_its_sites_lta(system):
    with system.session() as s:
        make_dtp_at_source_buffer(system, s, n_packages=2)
    for _ in range(4):
        _cycle(system, "transfer_manager", ALL_SITES)

    def lta_copies() -> dict[str, int]:
        with system.session() as s:
            return _present_lta_copies(s)

    assert _cycle(system, "archive_manager", "ccat") == {
        "archive_planned": 0,
        "archive_dispatched": 0,
    }
    assert _cycle(system, "archive_manager", "us")["archive_dispatched"] == 2
    assert lta_copies() == {"us_lta": 2}
    assert _cycle(system, "archive_manager", "cologne")["archive_dispatched"] == 2
    assert lta_copies() == {"us_lta": 2, "cologne_lta": 2}


def test_staging_manager_claims_only_jobs_whose_destination_is_at_its_site(system):
    with system.session() as s:
        add_processing_location(system, s)
        pkg_id = make_archived_package(system, s).id
    with system.session() as s:
        here = staging_manager.create_staging_job(s, package_ids=[pkg_id]).id
        there = staging_manager.create_staging_job(
            s, package_ids=[pkg_id], destination="processing_second"
        ).id

    def status(job_id: int) -> str:
        with system.session() as s:
            return s.get(m.StagingJob, job_id).status.name

    assert _cycle(system, "staging_manager", "cologne")["claimed"] == 0
    assert _cycle(system, "staging_manager", "processing")["job_ids"] == [here]
    assert (status(here), status(there)) == ("COMPLETED", "PENDING")
    assert _cycle(system, "staging_manager", "processing_second_site")["job_ids"] == [there]
    assert status(there) == "COMPLETED"


def test_staging_manager_expires_only_jobs_whose_destination_is_at_its_site(system):
    with system.session() as s:
        add_processing_location(system, s)
        pkg = make_package_at(system, s, ["cologne_lta"])
    with system.session() as s:
        here = make_staging_job(s, [pkg.package_id])
        there = make_staging_job(s, [pkg.package_id], destination="processing_second")
        s.execute(
            update(m.StagingJob)
            .where(m.StagingJob.id.in_([here, there]))
            .values(expires_at=m.utcnow() - timedelta(minutes=1))
        )
    assert _cycle(system, "staging_manager", "processing")["expired"] == 1
    with system.session() as s:
        assert (s.get(m.StagingJob, here).active, s.get(m.StagingJob, there).active) == (
            False,
            True,
        )


def test_deletion_manager_acts_only_on_copies_at_its_site_but_reads_every_sites_copies(
    system,
):
    where = ["ccat_telescope_buffer", "cologne_buffer", "us_buffer", "cologne_lta"]
    with system.session() as s:
        pkg = make_package_at(system, s, where)
    copies = pkg.copy_ids

    _cycle(system, "deletion_manager", "us")  # no LTA copy at us: its buffer copy stays
    _cycle(system, "deletion_manager", "processing")
    assert {n: _copy_status(system, copies[n]) for n in where} == dict.fromkeys(where, PRESENT)

    _cycle(system, "deletion_manager", "cologne")
    assert _copy_status(system, copies["cologne_buffer"]) == DELETED
    assert _copy_status(system, copies["ccat_telescope_buffer"]) == PRESENT  # deletable, not ours

    # The telescope site's rule needs the copy in Cologne's archive: read, not acted on.
    _cycle(system, "deletion_manager", "ccat")
    assert _copy_status(system, copies["ccat_telescope_buffer"]) == DELETED
    assert _copy_status(system, copies["us_buffer"]) == PRESENT
    assert _copy_status(system, copies["cologne_lta"]) == PRESENT


def test_buffer_manager_measures_only_its_sites_locations(system):
    result = _cycle(system, buffer_manager.run_once, "cologne")
    assert set(result) == {"cologne_buffer", "cologne_lta"}
    with system.session() as s:
        measured = set(s.scalars(select(m.DataLocation.name).join(m.BufferUsageSample).distinct()))
    assert measured == {"cologne_buffer", "cologne_lta"}
    everything = _cycle(system, buffer_manager.run_once, ALL_SITES)
    assert set(everything) >= {"ccat_telescope_buffer", "us_buffer", "processing_scratch"}


def test_recovery_resets_only_stalled_work_at_its_site(system):
    with system.session() as s:
        pkg = make_package_at(system, s, ["ccat_telescope_buffer"], state=m.PackageState.WAITING)
        dtp = make_dtp(system, s, [pkg.package_id])
        pushed = make_transfer(
            s, dtp.dtp_id, "ccat_telescope_buffer", "us_buffer", status=m.Status.IN_PROGRESS
        )
        unpacking = make_transfer(
            s,
            dtp.dtp_id,
            "ccat_telescope_buffer",
            "cologne_buffer",
            status=m.Status.COMPLETED,
            unpack_status=m.Status.IN_PROGRESS,
        )
        job = make_staging_job(s, [pkg.package_id])
        long_ago = m.utcnow() - timedelta(hours=2)
        s.execute(
            update(m.DataTransfer)
            .where(m.DataTransfer.id.in_([pushed, unpacking]))
            .values(updated_at=long_ago)
        )
        s.execute(
            update(m.StagingJob)
            .where(m.StagingJob.id == job)
            # started (a heartbeat), then its worker died
            .values(status=m.Status.IN_PROGRESS, start_time=long_ago, heartbeat_at=long_ago)
        )

    def recover(site: str) -> dict[str, int]:
        with system.session() as s:
            result = recovery.run_once(s, timedelta(minutes=5), site=site)
        return {k: v for k, v in result.items() if v}

    assert recover("us") == {}  # the transfer to us is pushed, so it is the telescope's
    assert recover("cologne") == {"transfers": 1}  # the unpack at Cologne
    assert recover("ccat") == {"transfers": 1}
    assert recover("processing") == {"staging_jobs": 1}
    with system.session() as s:
        assert s.get(m.DataTransfer, pushed).status == m.Status.PENDING
        assert s.get(m.DataTransfer, unpacking).unpack_status == m.Status.PENDING
        assert s.get(m.StagingJob, job).status == m.Status.PENDING


# ---------------------------------------------------------------------------------------
# One process per site does the work of the central process
# ---------------------------------------------------------------------------------------


def test_whole_lifecycle_completes_with_every_manager_scoped_once_per_site(
    system, override_settings
):
    override_settings(RETENTION_PERIOD_MINUTES=0)
    make_raw_files(system, "primecam_raw_data", "eou-life-1", "primecam/280GHz", 3, 4096)
    make_raw_files(system, "primecam_raw_data", "eou-life-2", "primecam/350GHz", 2, 4096)
    make_raw_files(system, "chai_raw_data", "eou-life-3", "chai/LFA", 2, 4096)

    def counts() -> dict[str, int]:
        with system.session() as s:
            return lifecycle_counts(s)

    def archived_and_cleaned() -> bool:
        c = counts()
        return (
            c["packaged_files"] == c["files"] == 7
            and c["archived_everywhere"] == c["packages"] > 0
            and c["temporary_cleaned"] == c["temporary_copies"] > 0
        )

    _rounds_until(system, archived_and_cleaned)
    with system.session() as s:
        packages = counts()["packages"]
        assert _present_lta_copies(s) == {"cologne_lta": packages, "us_lta": packages}
        source_files_left = s.scalar(
            select(func.count(m.RawDataFilePhysicalCopy.id))
            .join(m.DataLocation)
            .where(
                m.DataLocation.location_type == m.LocationType.SOURCE,
                m.RawDataFilePhysicalCopy.status != DELETED,
            )
        )
        assert source_files_left == 0
        first = s.scalars(select(m.RawDataPackage.id).order_by(m.RawDataPackage.id)).first()
        job_id = staging_manager.create_staging_job(s, package_ids=[first]).id

    def job() -> m.StagingJob:
        with system.session() as s:
            row = s.get(m.StagingJob, job_id)
            s.expunge(row)
            return row

    _rounds_until(system, lambda: job().status == m.Status.COMPLETED)
    with system.session() as s:
        staging_manager.deactivate_staging_job(s, job_id)

    def staged_copies_left() -> int:
        with system.session() as s:
            return s.scalar(
                select(func.count(m.PhysicalCopy.id)).where(
                    m.PhysicalCopy.data_location_id == job().destination_location_id,
                    m.PhysicalCopy.status != DELETED,
                )
            )

    assert staged_copies_left() > 0
    _rounds_until(system, lambda: staged_copies_left() == 0)

    # Work never falls between scopes: a central (unscoped) round finds nothing left.
    before = _state(system)
    for name in MANAGERS:
        _cycle(system, name, ALL_SITES)
    assert _state(system) == before


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------

COMMANDS = [
    "raw-data-package-manager",
    "data-transfer-package-manager",
    "transfer-manager",
    "archive-manager",
    "staging-manager",
    "deletion-manager",
    "buffer-manager",
    "recovery",
]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_manager_command_accepts_site_once(system, command, capsys):
    rc = main([command, "--once", "--site", "cologne"])
    out = capsys.readouterr()
    assert rc == 0, out.err


@pytest.mark.parametrize("command", COMMANDS)
def test_every_manager_command_refuses_an_unknown_site_in_one_line(system, command, capsys):
    rc = main([command, "--once", "--site", "atlantis"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "no site named 'atlantis'" in err and "Traceback" not in err


def test_raw_data_package_manager_command_with_site_does_only_that_sites_work(system, capsys):
    make_raw_files(system, "primecam_raw_data", "eou-cli", "primecam/280GHz", 2, 512)
    assert main(["raw-data-package-manager", "--once", "--site", "us"]) == 0
    assert _packaged(system, "primecam_raw_data") == (0, 2)
    assert main(["raw-data-package-manager", "--once", "--site", "ccat"]) == 0
    assert _packaged(system, "primecam_raw_data") == (2, 2)


@pytest.fixture
def loop_stops_at_once():
    """A manager loop started in-process returns at once (the stop flag is already set);
    the test's signal handlers come back afterwards."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    stop_event.set()
    yield
    stop_event.clear()
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_scoped_manager_reports_health_under_a_name_with_its_site(
    system, loop_stops_at_once, capsys
):
    assert main(["deletion-manager", "--site", "cologne"]) == 0
    capsys.readouterr()
    main(["health"])
    out = capsys.readouterr().out
    assert "deletion_manager@cologne" in out
    with system.session() as s:
        assert s.get(m.ManagerState, "health:manager:deletion_manager@cologne") is not None


def _subprocess_env(system: Any, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "CCAT_DATA_TRANSFER_ENV": "test",
        "CCAT_DATA_TRANSFER_EXECUTION_MODE": "embedded",
        "CCAT_DATA_TRANSFER_DATABASE_URL": system.url,
        "CCAT_DATA_TRANSFER_DATA_DIR": str(system.data_dir),
        **extra,
    }


def test_manager_site_from_the_environment_scopes_a_manager_command(system):
    make_raw_files(system, "primecam_raw_data", "eou-env", "primecam/280GHz", 2, 512)
    env = _subprocess_env(system, CCAT_DATA_TRANSFER_MANAGER_SITE="cologne")
    cmd = CLI + ["raw-data-package-manager", "--once"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert _packaged(system, "primecam_raw_data") == (0, 2)
    env["CCAT_DATA_TRANSFER_MANAGER_SITE"] = "atlantis"
    bad = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no site named 'atlantis'" in bad.stderr


def test_run_with_site_runs_every_manager_for_that_site_only(system, tmp_path: Path):
    make_raw_files(system, "primecam_raw_data", "eou-run", "primecam/280GHz", 2, 512)
    env = _subprocess_env(system)
    base = CLI + ["run", "--no-init", "--once", "--log-file", str(tmp_path / "run.jsonl")]
    other = subprocess.run(
        base + ["--site", "cologne"], env=env, capture_output=True, text=True, timeout=120
    )
    assert other.returncode == 0, other.stderr
    assert _packaged(system, "primecam_raw_data") == (0, 2)
    own = subprocess.run(
        base + ["--site", "ccat"], env=env, capture_output=True, text=True, timeout=120
    )
    assert own.returncode == 0, own.stderr
    assert _packaged(system, "primecam_raw_data") == (2, 2)
    with system.session() as s:  # the telescope's managers went on: bundled at its buffer
        assert s.scalar(select(func.count(m.DataTransferPackage.id))) == 1


def test_run_simulate_refuses_site_with_a_clear_message(system, tmp_path: Path):
    env = _subprocess_env(system)
    done = subprocess.run(
        CLI + ["run", "--simulate", "--no-init", "--site", "ccat"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "--site cannot be used with --simulate" in done.stderr
    assert "Traceback" not in done.stderr
