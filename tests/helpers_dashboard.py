"""A populated operations DB for the dashboard tests.

``populate_dashboard(system)`` writes, on top of the default topology, packages in every
state with their copies, transfer packages and transfers (spread over several days),
long-term archive moves, deletion-log entries inside and outside the last 24 hours,
staging jobs in several states, buffer statuses (normal, warning, critical) and a history
of buffer-use samples.  Tests compare what the dashboard shows with fresh DB counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import select

from ccat_data_transfer.core.buffer_status import publish_status
from ccat_ops_db import models as m

GB = 1_000_000_000

# Disk use published for the buffers: name -> (percent, state)
BUFFER_USE = {
    "ccat_telescope_buffer": (72.5, "warning"),
    "cologne_buffer": (41.0, "normal"),
    "us_buffer": (88.2, "critical"),
}


@dataclass
class DashboardData:
    """IDs of rows the tests look at."""

    archived_package_id: int = 0
    failed_package_id: int = 0
    package_ids: list[int] = field(default_factory=list)
    staging_job_ids: list[int] = field(default_factory=list)


def _package(
    s: Any,
    name: str,
    state: m.PackageState,
    eou: m.ExecutedObsUnit,
    module: m.InstrumentModule,
    size: int,
    created_at: Any,
    **extra: Any,
) -> m.RawDataPackage:
    rel = f"raw_data_packages/{module.instrument.name}/{module.name}/{name}"
    status = {
        m.PackageState.ARCHIVED: m.Status.COMPLETED,
        m.PackageState.FAILED: m.Status.FAILED,
        m.PackageState.TRANSFERRING: m.Status.IN_PROGRESS,
        m.PackageState.WAITING: m.Status.COMPLETED,
    }[state]
    pkg = m.RawDataPackage(
        file_name=name,
        relative_path=rel,
        size=size,
        checksum="ab" * 32,
        state=state,
        status=status,
        executed_obs_unit=eou,
        instrument_module_id=module.id,
        created_at=created_at,
        **extra,
    )
    s.add(pkg)
    return pkg


def _copy(
    s: Any,
    pkg: m.RawDataPackage,
    loc: m.DataLocation,
    status: m.PhysicalCopyStatus,
    created_at: Any,
    deleted_at: Any = None,
) -> m.RawDataPackagePhysicalCopy:
    c = m.RawDataPackagePhysicalCopy(
        raw_data_package=pkg,
        data_location=loc,
        status=status,
        relative_path=pkg.relative_path,
        size=pkg.size,
        checksum=pkg.checksum,
        created_at=created_at,
        verified_at=created_at + timedelta(minutes=2),
        deleted_at=deleted_at,
    )
    s.add(c)
    return c


def populate_dashboard(system: Any, bulk_waiting: int = 55) -> DashboardData:
    """Fill the DB of ``system``; ``bulk_waiting`` extra WAITING packages test paging."""
    out = DashboardData()
    now = m.utcnow()
    with system.session() as s:
        loc = {x.name: x for x in s.scalars(select(m.DataLocation))}
        modules = {
            (mod.instrument.name, mod.name): mod for mod in s.scalars(select(m.InstrumentModule))
        }
        pc280 = modules[("primecam", "280GHz")]
        lfa = modules[("chai", "LFA")]
        orion = m.ObsUnit(name="orion_bar_map")
        m83 = m.ObsUnit(name="m83_spectral_scan")
        eous = {
            "orion-001": m.ExecutedObsUnit(name="orion_bar_map-001", obs_unit=orion),
            "orion-002": m.ExecutedObsUnit(name="orion_bar_map-002", obs_unit=orion),
            "m83-001": m.ExecutedObsUnit(name="m83_spectral_scan-001", obs_unit=m83),
        }
        s.add_all([orion, m83, *eous.values()])
        alice = m.User(username="alice", email="alice@example.org")
        s.add(alice)

        # -- ARCHIVED: at both LTAs; buffer copies deleted; full transfer history -------
        archived = []
        for i in range(3):
            created = now - timedelta(days=6 - i)
            pkg = _package(
                s,
                f"orion_bar_map-001_primecam_280GHz_part{i + 1}.tar",
                m.PackageState.ARCHIVED,
                eous["orion-001"],
                pc280,
                (i + 1) * 12 * GB,
                created,
                archived_at=created + timedelta(hours=6),
            )
            archived.append(pkg)
        dtp = m.DataTransferPackage(
            file_name="dtp_ccat_0001.tar",
            relative_path="data_transfer_packages/dtp_ccat_0001.tar",
            size=sum(p.size for p in archived),
            status=m.Status.COMPLETED,
            origin_location_id=loc["ccat_telescope_buffer"].id,
        )
        s.add(dtp)
        for pkg in archived:
            pkg.data_transfer_package = dtp
            created = pkg.created_at
            _copy(
                s,
                pkg,
                loc["ccat_telescope_buffer"],
                m.PhysicalCopyStatus.DELETED,
                created,
                deleted_at=now - timedelta(hours=3),
            )
            _copy(
                s,
                pkg,
                loc["cologne_buffer"],
                m.PhysicalCopyStatus.DELETED,
                created + timedelta(hours=2),
                deleted_at=now - timedelta(days=3),
            )
            _copy(
                s,
                pkg,
                loc["cologne_lta"],
                m.PhysicalCopyStatus.PRESENT,
                created + timedelta(hours=5),
            )
            _copy(s, pkg, loc["us_lta"], m.PhysicalCopyStatus.PRESENT, created + timedelta(hours=6))
            for dest in ("cologne_lta", "us_lta"):
                buf = "cologne_buffer" if dest == "cologne_lta" else "us_buffer"
                s.add(
                    m.LongTermArchiveTransfer(
                        raw_data_package=pkg,
                        origin_location_id=loc[buf].id,
                        destination_location_id=loc[dest].id,
                        status=m.Status.COMPLETED,
                        bytes_transferred=pkg.size,
                        start_time=created + timedelta(hours=4),
                        end_time=created + timedelta(hours=5),
                        metadata_path=pkg.relative_path + ".json",
                    )
                )
        # Completed network transfers on several days (and one outside a 14-day window).
        for k, (days_ago, origin, dest, primary) in enumerate(
            [
                (0, "ccat_telescope_buffer", "cologne_buffer", True),
                (1, "cologne_buffer", "us_buffer", False),
            ]
        ):
            end = now - timedelta(days=days_ago, minutes=30)
            s.add(
                m.DataTransfer(
                    data_transfer_package=dtp,
                    origin_location_id=loc[origin].id,
                    destination_location_id=loc[dest].id,
                    is_primary=primary,
                    status=m.Status.COMPLETED,
                    unpack_status=m.Status.COMPLETED,
                    bytes_transferred=dtp.size,
                    start_time=end - timedelta(minutes=20 + k),
                    end_time=end,
                    duration_seconds=1200.0,
                    rate_mb_per_s=dtp.size / 1e6 / 1200,
                )
            )
        for n, days_ago in enumerate([0, 2, 3, 3, 9, 30]):
            other = m.DataTransferPackage(
                file_name=f"dtp_history_{n}.tar",
                relative_path=f"data_transfer_packages/dtp_history_{n}.tar",
                size=(n + 1) * 100 * GB,
                status=m.Status.COMPLETED,
            )
            s.add(other)
            end = now - timedelta(days=days_ago, minutes=5)
            s.add(
                m.DataTransfer(
                    data_transfer_package=other,
                    origin_location_id=loc["ccat_telescope_buffer"].id,
                    destination_location_id=loc["us_buffer"].id,
                    status=m.Status.COMPLETED,
                    unpack_status=m.Status.COMPLETED,
                    bytes_transferred=other.size,
                    start_time=end - timedelta(hours=1),
                    end_time=end,
                    duration_seconds=3600.0,
                )
            )

        # -- TRANSFERRING: in a transfer package on its way ----------------------------
        moving = m.DataTransferPackage(
            file_name="dtp_ccat_0002.tar",
            relative_path="data_transfer_packages/dtp_ccat_0002.tar",
            size=0,
            status=m.Status.IN_PROGRESS,
            origin_location_id=loc["ccat_telescope_buffer"].id,
        )
        s.add(moving)
        for i in range(2):
            pkg = _package(
                s,
                f"m83_spectral_scan-001_chai_LFA_part{i + 1}.tar",
                m.PackageState.TRANSFERRING,
                eous["m83-001"],
                lfa,
                8 * GB,
                now - timedelta(hours=10 - i),
            )
            pkg.data_transfer_package = moving
            moving.size += pkg.size
            _copy(
                s, pkg, loc["ccat_telescope_buffer"], m.PhysicalCopyStatus.PRESENT, pkg.created_at
            )
        s.add(
            m.DataTransfer(
                data_transfer_package=moving,
                origin_location_id=loc["ccat_telescope_buffer"].id,
                destination_location_id=loc["cologne_buffer"].id,
                status=m.Status.IN_PROGRESS,
                start_time=now - timedelta(minutes=15),
                bytes_transferred=4 * GB,
            )
        )
        s.add(
            m.DataTransfer(
                data_transfer_package=moving,
                origin_location_id=loc["ccat_telescope_buffer"].id,
                destination_location_id=loc["us_buffer"].id,
                is_primary=False,
                status=m.Status.FAILED,
                retry_count=5,
                failure_reason="rsync: connection reset by peer",
                start_time=now - timedelta(hours=2),
                end_time=now - timedelta(hours=1),
            )
        )

        # -- WAITING and FAILED --------------------------------------------------------
        for i in range(4):
            pkg = _package(
                s,
                f"orion_bar_map-002_primecam_280GHz_part{i + 1}.tar",
                m.PackageState.WAITING,
                eous["orion-002"],
                pc280,
                5 * GB,
                now - timedelta(hours=5, minutes=i),
            )
            _copy(
                s, pkg, loc["ccat_telescope_buffer"], m.PhysicalCopyStatus.PRESENT, pkg.created_at
            )
        failed = _package(
            s,
            "m83_spectral_scan-001_chai_LFA_part9.tar",
            m.PackageState.FAILED,
            eous["m83-001"],
            lfa,
            3 * GB,
            now - timedelta(hours=20),
            failure_reason="checksum mismatch after writing the tar",
        )
        for i in range(bulk_waiting):
            _package(
                s,
                f"bulk_orion_bar_map-002_{i:03d}.tar",
                m.PackageState.WAITING,
                eous["orion-002"],
                pc280,
                GB,
                now - timedelta(days=8, minutes=i),
            )

        # -- Deletion log: recent entries, one failure, one older than a day ----------
        s.flush()
        deleted = s.scalars(
            select(m.PhysicalCopy).where(m.PhysicalCopy.status == m.PhysicalCopyStatus.DELETED)
        ).all()
        for c in deleted:
            s.add(
                m.DeletionLog(
                    created_at=c.deleted_at,
                    physical_copy_id=c.id,
                    copy_type=c.type,
                    data_location_id=c.data_location_id,
                    location_name=c.data_location.name,
                    size_bytes=c.size,
                    reason="archived_at_all_lta_sites",
                    outcome=m.DeletionOutcome.DELETED,
                )
            )
        s.add(
            m.DeletionLog(
                created_at=now - timedelta(hours=1),
                copy_type="raw_data_package",
                data_location_id=loc["ccat_telescope_buffer"].id,
                location_name="ccat_telescope_buffer",
                size_bytes=5 * GB,
                reason="buffer_pressure",
                outcome=m.DeletionOutcome.FAILED,
                message="permission denied",
            )
        )
        s.add(
            m.DeletionLog(
                created_at=now - timedelta(minutes=40),
                copy_type="raw_data_file",
                data_location_id=loc["primecam_raw_data"].id,
                location_name="primecam_raw_data",
                size_bytes=GB,
                reason="package_archived",
                outcome=m.DeletionOutcome.MARKED_POSSIBLE,
            )
        )

        # -- Staging jobs ----------------------------------------------------------------
        scratch = loc["processing_scratch"]
        jobs = [
            m.StagingJob(
                name="orion reduction",
                user=alice,
                destination_location=scratch,
                status=m.Status.IN_PROGRESS,
                active=True,
                packages_total=5,
                packages_done=2,
                created_at=now - timedelta(hours=2),
                start_time=now - timedelta(hours=1),
                expires_at=now + timedelta(days=30),
            ),
            m.StagingJob(
                name="m83 quicklook",
                destination_location=scratch,
                status=m.Status.COMPLETED,
                active=False,
                packages_total=3,
                packages_done=3,
                created_at=now - timedelta(days=4),
                completed_at=now - timedelta(days=3),
                expires_at=now - timedelta(days=1),
            ),
            m.StagingJob(
                name="calibration check",
                destination_location=scratch,
                status=m.Status.FAILED,
                active=True,
                packages_total=4,
                packages_done=1,
                failure_reason="LTA copy missing",
                created_at=now - timedelta(days=1),
            ),
            m.StagingJob(
                name="new request",
                user=alice,
                destination_location=scratch,
                status=m.Status.PENDING,
                active=True,
                packages_total=1,
                created_at=now - timedelta(minutes=5),
            ),
        ]
        jobs[1].raw_data_packages = archived[:1]
        s.add_all(jobs)

        # -- Buffer status and history ---------------------------------------------------
        for name, (percent, state) in BUFFER_USE.items():
            total = 500 * GB
            publish_status(
                {
                    "location": name,
                    "used_bytes": int(total * percent / 100),
                    "total_bytes": total,
                    "disk_usage_percent": percent,
                    "state": state,
                },
                session=s,
            )
            for h in range(48, -1, -1):
                p = max(0.0, percent - h * 0.5)
                s.add(
                    m.BufferUsageSample(
                        data_location_id=loc[name].id,
                        used_bytes=int(total * p / 100),
                        total_bytes=total,
                        disk_usage_percent=p,
                        measured_at=now - timedelta(hours=h, minutes=1),
                    )
                )
        s.flush()
        out.archived_package_id = archived[0].id
        out.failed_package_id = failed.id
        out.package_ids = [p.id for p in s.scalars(select(m.RawDataPackage))]
        out.staging_job_ids = [j.id for j in jobs]
    return out


def make_app(database_url: str) -> Any:
    """The API app with the dashboard and metrics routers (added here until create_app
    includes them; never twice)."""
    from ccat_data_transfer.api import dashboard, metrics_routes
    from ccat_data_transfer.api.app import create_app

    app = create_app(database_url)
    paths = {getattr(r, "path", None) for r in app.routes}
    if "/dashboard/" not in paths:
        app.include_router(dashboard.router)
    if "/metrics" not in paths:
        app.include_router(metrics_routes.router)
    return app
