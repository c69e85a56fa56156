"""The whole system in one process: every manager in turn, tasks in-process.

``ccat_data_transfer run`` uses this in embedded mode (and it is handy on a single host in
distributed mode, where the tasks go to the workers instead).  Each round calls every
stage's ``run_once`` in its own transaction; stages are independent, so a failing stage
is logged and the others go on.  Stopping (Ctrl-C, SIGTERM) happens between stages: all
writes are atomic (temporary name, fsync, rename), so no half-written file is left, and a
restart resumes from the DB state.

``Orchestrator(site="cologne")`` (``run --site cologne``) runs every manager for one site
only (see :mod:`ccat_data_transfer.core.scope`): one such process per site does the work of
one central process.  Without ``site`` the managers follow the setting ``MANAGER_SITE``.

``run_demo`` adds the instrument simulator and a scientist's staging job, and runs until
the whole lifecycle is done: data archived at every LTA site, source and buffers cleaned
by the rules, and a staging job served and cleaned up.  It always runs every site.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ccat_data_transfer.core.config import settings
from ccat_data_transfer.core.database import DatabaseConnection
from ccat_data_transfer.core.logs import get_logger
from ccat_data_transfer.core.manager_loop import install_signal_handlers, stop_event
from ccat_data_transfer.core.registry import STAGES, StageEntry
from ccat_data_transfer.core.scope import ALL_SITES
from ccat_data_transfer.operations.metrics import push_metrics
from ccat_data_transfer.operations.simulator import InstrumentSimulator
from ccat_data_transfer.staging.jobs import create_staging_job
from ccat_data_transfer.staging.retention import deactivate_staging_job
from ccat_ops_db import models as m

log = get_logger(__name__)


@dataclass
class Stage:
    name: str
    module: str
    seconds: float = 0.0
    cycles: int = 0
    failures: int = 0

    def callable(self) -> Callable[[Session], Any]:
        return StageEntry(self.name, self.name, self.module).load_cycle()


def default_stages() -> list[Stage]:
    """Every stage of the registry, in its order."""
    return [Stage(entry.title, entry.cycle) for entry in STAGES]


@dataclass
class Orchestrator:
    db: DatabaseConnection = field(default_factory=DatabaseConnection)
    stages: list[Stage] = field(default_factory=default_stages)
    #: The managers' site scope: None follows MANAGER_SITE, "" is every site.
    site: str | None = None
    _last_push: float = field(default=float("-inf"), repr=False)

    def run_round(self) -> None:
        """One call of every stage, each in its own transaction."""
        for stage in self.stages:
            if stop_event.is_set():
                return
            started = time.monotonic()
            try:
                with self.db.session_scope() as session:
                    cycle = stage.callable()
                    if self.site is None:
                        cycle(session)
                    else:
                        cycle(session, site=self.site)
            except Exception as exc:  # one stage failing must not stop the others
                stage.failures += 1
                log.exception("stage_failed", stage=stage.name, error=str(exc))
            stage.seconds += time.monotonic() - started
            stage.cycles += 1
        self._push_metrics()

    def _push_metrics(self) -> None:
        """InfluxDB push once per METRICS_PUSH_INTERVAL_SECONDS, when enabled."""
        if not settings.get("INFLUXDB_ENABLED", False):
            return
        now = time.monotonic()
        if now - self._last_push < float(settings.get("METRICS_PUSH_INTERVAL_SECONDS", 60)):
            return
        self._last_push = now
        try:
            with self.db.session_scope() as session:
                push_metrics(session)
        except Exception as exc:  # metrics never stop the pipeline
            log.warning("metrics_push_failed", error=str(exc))


# ---------------------------------------------------------------------------------------
# Lifecycle progress, read from the DB
# ---------------------------------------------------------------------------------------


def lifecycle_counts(session: Session) -> dict[str, int]:
    """Counts that show how far the lifecycle got (set-based, cheap)."""
    lta_sites = session.scalar(
        select(func.count(func.distinct(m.DataLocation.site_id))).where(
            m.DataLocation.location_type == m.LocationType.LONG_TERM_ARCHIVE,
            m.DataLocation.active.is_(True),
        )
    )
    files = session.scalar(select(func.count(m.RawDataFile.id))) or 0
    packaged = session.scalar(
        select(func.count(m.RawDataFile.id)).where(m.RawDataFile.raw_data_package_id.is_not(None))
    )
    packages = session.scalar(select(func.count(m.RawDataPackage.id))) or 0
    archived_everywhere = _archived_everywhere(session, lta_sites)
    in_transfer_pkgs = session.scalar(
        select(func.count(m.RawDataPackage.id)).where(
            m.RawDataPackage.data_transfer_package_id.is_not(None)
        )
    )
    temporary, temporary_total = _temporary_copies(session)
    transfers_done = session.scalar(
        select(func.count(m.DataTransfer.id)).where(
            m.DataTransfer.status == m.Status.COMPLETED,
            m.DataTransfer.unpack_status == m.Status.COMPLETED,
        )
    )
    transfers = session.scalar(select(func.count(m.DataTransfer.id)))
    return {
        "lta_sites": lta_sites or 0,
        "files": files,
        "bytes": session.scalar(select(func.coalesce(func.sum(m.RawDataFile.size), 0))) or 0,
        "packaged_files": packaged or 0,
        "packages": packages,
        "packages_in_transfer_packages": in_transfer_pkgs or 0,
        "transfer_packages": session.scalar(select(func.count(m.DataTransferPackage.id))) or 0,
        "transfers": transfers or 0,
        "transfers_done": transfers_done or 0,
        "archived_everywhere": archived_everywhere or 0,
        "archived": session.scalar(
            select(func.count(m.RawDataPackage.id)).where(
                m.RawDataPackage.state == m.PackageState.ARCHIVED
            )
        )
        or 0,
        "temporary_copies": temporary_total or 0,
        "temporary_cleaned": (temporary_total or 0) - (temporary or 0),
        "deleted_copies": session.scalar(
            select(func.count(m.PhysicalCopy.id)).where(
                m.PhysicalCopy.status == m.PhysicalCopyStatus.DELETED
            )
        )
        or 0,
        "deleted_bytes": session.scalar(
            select(func.coalesce(func.sum(m.PhysicalCopy.size), 0)).where(
                m.PhysicalCopy.status == m.PhysicalCopyStatus.DELETED
            )
        )
        or 0,
        "failed_packages": session.scalar(
            select(func.count(m.RawDataPackage.id)).where(
                m.RawDataPackage.state == m.PackageState.FAILED
            )
        )
        or 0,
        "checksum_errors": session.scalar(
            select(func.count(m.RawDataFile.id)).where(m.RawDataFile.checksum_error.is_not(None))
        )
        or 0,
    }


def _archived_everywhere(session: Session, lta_sites: int | None) -> int | None:
    """Packages with a PRESENT copy at every one of the ``lta_sites`` archive sites."""
    present = m.PhysicalCopyStatus.PRESENT
    lta_copies = (
        select(
            m.PhysicalCopy.raw_data_package_id.label("pkg"),
            func.count(func.distinct(m.DataLocation.site_id)).label("sites"),
        )
        .join(m.DataLocation, m.DataLocation.id == m.PhysicalCopy.data_location_id)
        .where(
            m.PhysicalCopy.type == "raw_data_package",
            m.PhysicalCopy.status == present,
            m.DataLocation.location_type == m.LocationType.LONG_TERM_ARCHIVE,
        )
        .group_by(m.PhysicalCopy.raw_data_package_id)
        .subquery()
    )
    archived_everywhere = session.scalar(
        select(func.count()).select_from(lta_copies).where(lta_copies.c.sites >= lta_sites)
    )
    return archived_everywhere


def _temporary_copies(session: Session) -> tuple[int | None, int | None]:
    """Copies at SOURCE and BUFFER locations: those not DELETED, and all of them."""
    temporary = session.scalar(
        select(func.count(m.PhysicalCopy.id))
        .join(m.DataLocation, m.DataLocation.id == m.PhysicalCopy.data_location_id)
        .where(
            m.DataLocation.location_type.in_([m.LocationType.SOURCE, m.LocationType.BUFFER]),
            m.PhysicalCopy.status != m.PhysicalCopyStatus.DELETED,
        )
    )
    temporary_total = session.scalar(
        select(func.count(m.PhysicalCopy.id))
        .join(m.DataLocation, m.DataLocation.id == m.PhysicalCopy.data_location_id)
        .where(m.DataLocation.location_type.in_([m.LocationType.SOURCE, m.LocationType.BUFFER]))
    )
    return temporary, temporary_total


@dataclass
class DemoResult:
    completed: bool
    seconds: float
    counts: dict[str, int]
    staging_job_id: int | None
    staging_status: str | None
    stages: list[Stage]


def run_demo(
    db: DatabaseConnection | None = None,
    observations: int = 4,
    files_per_module: int = 3,
    file_size: int = 2 * 1024 * 1024,
    rate_mb_per_s: float = 0.0,
    timeout_seconds: float = 600.0,
    console: Console | None = None,
    show_progress: bool = True,
) -> DemoResult:
    """Simulate instruments and run every manager until the whole lifecycle is done."""
    db = db or DatabaseConnection()
    console = console or Console(stderr=True)
    install_signal_handlers()
    orchestrator = Orchestrator(db=db, site=ALL_SITES)
    simulator = InstrumentSimulator(
        db=db,
        observations=observations,
        files_per_module=files_per_module,
        file_size=file_size,
        rate_mb_per_s=rate_mb_per_s,
    )
    started = time.monotonic()
    staging_job_id: int | None = None
    staging_done_marked = False
    staging_status: str | None = None
    completed = False

    progress = _demo_progress(console, show_progress)
    expected_files = None
    with progress:
        bars = _demo_bars(progress)
        while not stop_event.is_set():
            if time.monotonic() - started > timeout_seconds:
                log.error("demo_timeout", seconds=timeout_seconds)
                break
            simulator.step()
            orchestrator.run_round()
            with db.session_scope() as session:
                counts = lifecycle_counts(session)
                if expected_files is None:
                    expected_files = (
                        simulator.observations
                        * files_per_module
                        * max(1, len(simulator._sources()) and simulator.modules_per_instrument)
                    )
                if simulator.finished and staging_job_id is None and counts["archived_everywhere"]:
                    staging_job_id = _start_staging_job(session)
                staging_status = _staging_progress(session, staging_job_id)
                if staging_status == "COMPLETED" and not staging_done_marked:
                    _finish_staging_job(session, staging_job_id)
                    staging_done_marked = True
                staging_cleaned = staging_done_marked and _staging_cleaned(session, staging_job_id)
            _update_bars(
                progress,
                bars,
                counts,
                expected_files,
                staging_job_id,
                staging_status,
                staging_cleaned,
            )
            if _lifecycle_done(simulator.finished, counts, staging_cleaned):
                completed = True
                break
            if simulator.finished:
                stop_event.wait(0.05)
    with db.session_scope() as session:
        counts = lifecycle_counts(session)
    return DemoResult(
        completed=completed,
        seconds=time.monotonic() - started,
        counts=counts,
        staging_job_id=staging_job_id,
        staging_status=staging_status,
        stages=orchestrator.stages,
    )


def _demo_progress(console: Console, show_progress: bool) -> Progress:
    """The demo's progress display (disabled without ``show_progress``)."""
    return Progress(
        TextColumn("{task.description:<24}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not show_progress,
    )


def _demo_bars(progress: Progress) -> dict[str, Any]:
    """One bar per lifecycle step, by name."""
    return {
        "filed": progress.add_task("instruments: filed", total=None),
        "packaged": progress.add_task("packaged (files)", total=None),
        "transferred": progress.add_task("transferred + unpacked", total=None),
        "archived": progress.add_task("archived at all LTAs", total=None),
        "cleaned": progress.add_task("temporary copies cleaned", total=None),
        "staged": progress.add_task("staging job", total=3),
    }


def _update_bars(
    progress: Progress,
    bars: dict[str, Any],
    counts: dict[str, int],
    expected_files: int | None,
    staging_job_id: int | None,
    staging_status: str | None,
    staging_cleaned: bool,
) -> None:
    """Move each bar to the counts of this round."""
    progress.update(bars["filed"], completed=counts["files"], total=expected_files)
    for bar, done, of in (
        ("packaged", "packaged_files", "files"),
        ("transferred", "transfers_done", "transfers"),
        ("archived", "archived_everywhere", "packages"),
        ("cleaned", "temporary_cleaned", "temporary_copies"),
    ):
        progress.update(bars[bar], completed=counts[done], total=max(counts[of], 1))
    progress.update(
        bars["staged"],
        completed=(staging_job_id is not None)
        + (staging_status == "COMPLETED")
        + bool(staging_cleaned),
    )


def _lifecycle_done(
    simulator_finished: bool, counts: dict[str, int], staging_cleaned: bool
) -> bool:
    """Everything filed is packaged, archived at every LTA, cleaned and staged once."""
    return bool(
        simulator_finished
        and counts["files"] > 0
        and counts["packaged_files"] == counts["files"]
        and counts["archived_everywhere"] == counts["packages"]
        and counts["temporary_cleaned"] == counts["temporary_copies"]
        and staging_cleaned
    )


def _start_staging_job(session: Session) -> int | None:
    """A scientist asks for the first archived observation at the processing site."""
    pkg = session.scalars(
        select(m.RawDataPackage)
        .where(m.RawDataPackage.state == m.PackageState.ARCHIVED)
        .order_by(m.RawDataPackage.id)
    ).first()
    dest = session.scalars(
        select(m.DataLocation).where(
            m.DataLocation.location_type == m.LocationType.PROCESSING,
            m.DataLocation.active.is_(True),
        )
    ).first()
    if pkg is None or dest is None:
        return None
    job = create_staging_job(
        session, package_ids=[pkg.id], destination=dest.name, name="demo-scientist"
    )
    session.flush()
    return job.id


def _staging_progress(session: Session, job_id: int | None) -> str | None:
    if job_id is None:
        return None
    job = session.get(m.StagingJob, job_id)
    return job.status.name if job else None


def _finish_staging_job(session: Session, job_id: int | None) -> None:
    if job_id is not None:
        deactivate_staging_job(session, job_id)


def _staging_cleaned(session: Session, job_id: int | None) -> bool:
    """True once nothing of the job is left at its processing location."""
    job = session.get(m.StagingJob, job_id) if job_id else None
    if job is None:
        return False
    left = session.scalar(
        select(func.count(m.PhysicalCopy.id)).where(
            m.PhysicalCopy.data_location_id == job.destination_location_id,
            m.PhysicalCopy.status != m.PhysicalCopyStatus.DELETED,
        )
    )
    return left == 0


def summary_table(result: DemoResult) -> Table:
    c = result.counts
    table = Table(title="Lifecycle summary" + ("" if result.completed else " (NOT complete)"))
    table.add_column("What")
    table.add_column("Value", justify="right")
    rows = [
        ("files filed", f"{c['files']}"),
        ("bytes filed", f"{c['bytes'] / 1e6:.1f} MB"),
        ("raw data packages", f"{c['packages']}"),
        ("transfer packages", f"{c['transfer_packages']}"),
        ("transfers (completed + unpacked / all)", f"{c['transfers_done']} / {c['transfers']}"),
        ("packages archived at all LTA sites", f"{c['archived_everywhere']} / {c['packages']}"),
        ("temporary copies cleaned", f"{c['temporary_cleaned']} / {c['temporary_copies']}"),
        ("copies deleted (bytes)", f"{c['deleted_copies']} ({c['deleted_bytes'] / 1e6:.1f} MB)"),
        ("staging job", f"#{result.staging_job_id} {result.staging_status or '-'}"),
        ("checksum errors / failed packages", f"{c['checksum_errors']} / {c['failed_packages']}"),
        ("wall time", f"{result.seconds:.1f} s"),
    ]
    for what, value in rows:
        table.add_row(what, value)
    table.add_section()
    for stage in result.stages:
        table.add_row(
            f"time in {stage.name}",
            f"{stage.seconds:.2f} s ({stage.cycles} cycles"
            + (f", {stage.failures} failed" if stage.failures else "")
            + ")",
        )
    return table
