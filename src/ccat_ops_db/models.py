"""The operations database: every table of the Data Transfer System.

SQLAlchemy 2 typed models.  Enums are stored by NAME in plain VARCHAR columns (no native
enum types), so ``status = 'DELETED'`` works in hand-written SQL on SQLite and PostgreSQL
alike, and adding a member needs no type migration.

Time stamps are naive UTC (``utcnow()``); the PostgreSQL connection runs in UTC so that
``NOW() - INTERVAL '24 hours'`` compares like with like.

Rows of ``physical_copy`` are never deleted: the audit trail depends on them.
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    Uuid,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    """Current time as naive UTC, the convention of every timestamp column."""
    return datetime.now(UTC).replace(tzinfo=None)


# ---------------------------------------------------------------------------------------
# Enums
# ---------------------------------------------------------------------------------------


class LocationType(enum.Enum):
    SOURCE = "source"
    BUFFER = "buffer"
    LONG_TERM_ARCHIVE = "long_term_archive"
    PROCESSING = "processing"


class StorageType(enum.Enum):
    DISK = "disk"
    S3 = "s3"
    TAPE = "tape"


class RouteType(enum.Enum):
    DIRECT = "direct"  # no intermediate site: lands in the destination site's best buffer
    RELAY = "relay"  # through an intermediate site
    CUSTOM = "custom"  # location-to-location override


class TransferMethod(enum.Enum):
    COPY = "copy"
    RSYNC = "rsync"
    S3 = "s3"
    BBCP = "bbcp"
    # xrdcp --streams N to the destination site's XRootD server (parallel streams).
    XROOTD = "xrootd"


class Status(enum.Enum):
    """State of a unit of work: packages, transfers, staging jobs."""

    PENDING = "pending"
    SCHEDULED = "scheduled"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"


class PackageState(enum.Enum):
    """High-level state of a RawDataPackage in the pipeline."""

    WAITING = "waiting"
    TRANSFERRING = "transferring"
    ARCHIVED = "archived"
    FAILED = "failed"


class PhysicalCopyStatus(enum.Enum):
    PRESENT = "present"
    STAGED = "staged"
    DELETION_SCHEDULED = "deletion_scheduled"
    DELETION_IN_PROGRESS = "deletion_in_progress"
    DELETION_POSSIBLE = "deletion_possible"
    DELETED = "deleted"
    DELETION_FAILED = "deletion_failed"


class DeletionOutcome(enum.Enum):
    SCHEDULED = "scheduled"
    DELETED = "deleted"
    FAILED = "failed"
    SKIPPED = "skipped"  # the worker's double-check found the rule no longer holds
    MARKED_POSSIBLE = "marked_possible"


def _enum(enum_cls: type[enum.Enum], length: int = 32) -> Enum:
    return Enum(
        enum_cls,
        native_enum=False,
        create_constraint=False,
        length=length,
        validate_strings=True,
    )


NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        datetime: DateTime(),
        dict[str, Any]: JSON(),
    }


# ---------------------------------------------------------------------------------------
# Observatory, instruments and observations
# ---------------------------------------------------------------------------------------


class Observatory(Base):
    __tablename__ = "observatory"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    description: Mapped[str | None] = mapped_column(Text)

    telescopes: Mapped[list[Telescope]] = relationship(back_populates="observatory")


class Telescope(Base):
    __tablename__ = "telescope"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    description: Mapped[str | None] = mapped_column(Text)
    observatory_id: Mapped[int] = mapped_column(ForeignKey("observatory.id"), index=True)
    site_id: Mapped[int | None] = mapped_column(ForeignKey("site.id"), index=True)

    observatory: Mapped[Observatory] = relationship(back_populates="telescopes")
    site: Mapped[Site | None] = relationship()
    instruments: Mapped[list[Instrument]] = relationship(back_populates="telescope")


class Instrument(Base):
    __tablename__ = "instrument"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    description: Mapped[str | None] = mapped_column(Text)
    telescope_id: Mapped[int] = mapped_column(ForeignKey("telescope.id"), index=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)

    telescope: Mapped[Telescope] = relationship(back_populates="instruments")
    modules: Mapped[list[InstrumentModule]] = relationship(back_populates="instrument")


class InstrumentModule(Base):
    __tablename__ = "instrument_module"
    __table_args__ = (UniqueConstraint("instrument_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    description: Mapped[str | None] = mapped_column(Text)
    instrument_id: Mapped[int] = mapped_column(ForeignKey("instrument.id"), index=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)

    instrument: Mapped[Instrument] = relationship(back_populates="modules")


class ObsUnit(Base):
    """A planned observation (a scan, a map); executed one or more times."""

    __tablename__ = "obs_unit"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(256), unique=True)
    description: Mapped[str | None] = mapped_column(Text)
    telescope_id: Mapped[int | None] = mapped_column(ForeignKey("telescope.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    executions: Mapped[list[ExecutedObsUnit]] = relationship(back_populates="obs_unit")


class ExecutedObsUnit(Base):
    """One execution of an ObsUnit.  Raw files belong to exactly one."""

    __tablename__ = "executed_obs_unit"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(256), unique=True)
    obs_unit_id: Mapped[int] = mapped_column(ForeignKey("obs_unit.id"), index=True)
    start_time: Mapped[datetime | None]
    end_time: Mapped[datetime | None]
    # Set when the instrument says the execution is over: its files can be packaged.
    finished_at: Mapped[datetime | None]
    status: Mapped[Status] = mapped_column(_enum(Status), default=Status.IN_PROGRESS)
    obs_metadata: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    obs_unit: Mapped[ObsUnit] = relationship(back_populates="executions")


# ---------------------------------------------------------------------------------------
# Sites, locations and routes (declared in the topology file)
# ---------------------------------------------------------------------------------------


class Site(Base):
    __tablename__ = "site"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    # Used in queue names: {site_short_name}_{location_name}_{operation}
    short_name: Mapped[str] = mapped_column(String(32), unique=True)
    description: Mapped[str | None] = mapped_column(Text)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    # How other sites' workers reach this site's machine (None: a shared filesystem).
    # See ccat_data_transfer.core.hosts.SiteReach.
    host: Mapped[str | None] = mapped_column(String(256))
    ssh_user: Mapped[str | None] = mapped_column(String(64))
    ssh_port: Mapped[int | None] = mapped_column(Integer)
    ssh_key: Mapped[str | None] = mapped_column(String(512))
    xrootd_url: Mapped[str | None] = mapped_column(String(256))

    locations: Mapped[list[DataLocation]] = relationship(back_populates="site")


class DataLocation(Base):
    """A place where data can lie.  Single-table polymorphic on ``storage_type``."""

    __tablename__ = "data_location"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    site_id: Mapped[int] = mapped_column(ForeignKey("site.id"), index=True)
    location_type: Mapped[LocationType] = mapped_column(_enum(LocationType), index=True)
    storage_type: Mapped[StorageType] = mapped_column(_enum(StorageType))
    # Lower is preferred; several buffers of one site give failover.
    priority: Mapped[int] = mapped_column(Integer, default=0)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    description: Mapped[str | None] = mapped_column(Text)
    # Instrument whose raw data this SOURCE location holds (None elsewhere).
    instrument_id: Mapped[int | None] = mapped_column(ForeignKey("instrument.id"))
    # Per-location overrides of the settings (None: use the global setting).
    capacity_bytes: Mapped[int | None] = mapped_column(BigInteger)
    retention_period_minutes: Mapped[int | None] = mapped_column(Integer)
    warning_threshold_percent: Mapped[float | None] = mapped_column(Float)
    critical_threshold_percent: Mapped[float | None] = mapped_column(Float)
    emergency_threshold_percent: Mapped[float | None] = mapped_column(Float)
    max_parallel_transfers: Mapped[int | None] = mapped_column(Integer)
    # How many verified LTA copies a copy here needs before it may go (None: the setting
    # MIN_VERIFIED_LTA_COPIES); read for SOURCE and BUFFER locations.
    min_verified_lta_copies: Mapped[int | None] = mapped_column(Integer)
    # Audit hold: set when an audit of this location found more discrepancies than
    # AUDIT_MAX_DISCREPANCY_FRACTION.  While set, no deletion relies on copies here and no
    # deletion runs here, until an operator clears it (`audit hold clear`).
    audit_hold_at: Mapped[datetime | None]
    audit_hold_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    # Disk and tape
    host: Mapped[str | None] = mapped_column(String(256))
    path: Mapped[str | None] = mapped_column(Text)
    # S3 (credentials come from the environment, never from here)
    endpoint_url: Mapped[str | None] = mapped_column(String(512))
    bucket: Mapped[str | None] = mapped_column(String(256))
    prefix: Mapped[str | None] = mapped_column(String(512))
    region: Mapped[str | None] = mapped_column(String(64))
    # Tape
    library: Mapped[str | None] = mapped_column(String(256))

    site: Mapped[Site] = relationship(back_populates="locations", lazy="joined")
    instrument: Mapped[Instrument | None] = relationship()

    __mapper_args__ = {"polymorphic_on": "storage_type", "polymorphic_abstract": False}

    @property
    def is_lta(self) -> bool:
        return self.location_type == LocationType.LONG_TERM_ARCHIVE

    def __repr__(self) -> str:
        return f"<DataLocation {self.name} {self.location_type.name} {self.storage_type.name}>"


class DiskDataLocation(DataLocation):
    __mapper_args__ = {"polymorphic_identity": StorageType.DISK}


class S3DataLocation(DataLocation):
    __mapper_args__ = {"polymorphic_identity": StorageType.S3}


class TapeDataLocation(DataLocation):
    __mapper_args__ = {"polymorphic_identity": StorageType.TAPE}


class DataTransferRoute(Base):
    __tablename__ = "data_transfer_route"
    __table_args__ = (
        UniqueConstraint("origin_site_id", "destination_site_id", "route_type", name="uq_route"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    origin_site_id: Mapped[int] = mapped_column(ForeignKey("site.id"), index=True)
    destination_site_id: Mapped[int] = mapped_column(ForeignKey("site.id"), index=True)
    route_type: Mapped[RouteType] = mapped_column(_enum(RouteType))
    transfer_method: Mapped[TransferMethod] = mapped_column(_enum(TransferMethod))
    relay_site_id: Mapped[int | None] = mapped_column(ForeignKey("site.id"))
    origin_location_id: Mapped[int | None] = mapped_column(ForeignKey("data_location.id"))
    destination_location_id: Mapped[int | None] = mapped_column(ForeignKey("data_location.id"))
    active: Mapped[bool] = mapped_column(Boolean, default=True)

    origin_site: Mapped[Site] = relationship(foreign_keys=[origin_site_id])
    destination_site: Mapped[Site] = relationship(foreign_keys=[destination_site_id])
    relay_site: Mapped[Site | None] = relationship(foreign_keys=[relay_site_id])
    origin_location: Mapped[DataLocation | None] = relationship(foreign_keys=[origin_location_id])
    destination_location: Mapped[DataLocation | None] = relationship(
        foreign_keys=[destination_location_id]
    )


# ---------------------------------------------------------------------------------------
# Data: files and packages
# ---------------------------------------------------------------------------------------


class RawDataFile(Base):
    """One raw file written by an instrument.  UUID key: instruments create files offline."""

    __tablename__ = "raw_data_file"
    __table_args__ = (
        UniqueConstraint("source_location_id", "relative_path"),
        Index("ix_raw_data_file_unpackaged", "raw_data_package_id", "executed_obs_unit_id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    relative_path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    checksum: Mapped[str] = mapped_column(String(128))
    checksum_algorithm: Mapped[str] = mapped_column(String(16), default="sha256")
    instrument_module_id: Mapped[int] = mapped_column(ForeignKey("instrument_module.id"))
    executed_obs_unit_id: Mapped[int] = mapped_column(
        ForeignKey("executed_obs_unit.id"), index=True
    )
    source_location_id: Mapped[int] = mapped_column(ForeignKey("data_location.id"), index=True)
    raw_data_package_id: Mapped[int | None] = mapped_column(ForeignKey("raw_data_package.id"))
    file_metadata: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Set when the bytes at SOURCE did not match the filed checksum: not packaged.
    checksum_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    instrument_module: Mapped[InstrumentModule] = relationship()
    executed_obs_unit: Mapped[ExecutedObsUnit] = relationship()
    source_location: Mapped[DataLocation] = relationship()
    raw_data_package: Mapped[RawDataPackage | None] = relationship(back_populates="raw_data_files")
    physical_copies: Mapped[list[RawDataFilePhysicalCopy]] = relationship(
        back_populates="raw_data_file"
    )


class _PackageFile:
    """The columns of a package file (a tar): its name, where it lies below a location's
    root, its size and checksum.  Shared by RawDataPackage and DataTransferPackage;
    ``sort_order`` keeps them the table's first columns, as in the migration."""

    id: Mapped[int] = mapped_column(primary_key=True, sort_order=-1)
    file_name: Mapped[str] = mapped_column(String(512), unique=True, sort_order=-1)
    relative_path: Mapped[str] = mapped_column(Text, sort_order=-1)
    size: Mapped[int] = mapped_column(BigInteger, default=0, sort_order=-1)
    checksum: Mapped[str | None] = mapped_column(String(128), sort_order=-1)
    checksum_algorithm: Mapped[str] = mapped_column(String(16), default="sha256", sort_order=-1)


class RawDataPackage(_PackageFile, Base):
    """The tar of all files of one ExecutedObsUnit x InstrumentModule (maybe split in parts)."""

    __tablename__ = "raw_data_package"

    state: Mapped[PackageState] = mapped_column(
        _enum(PackageState), default=PackageState.WAITING, index=True
    )
    status: Mapped[Status] = mapped_column(_enum(Status), default=Status.PENDING)
    executed_obs_unit_id: Mapped[int] = mapped_column(
        ForeignKey("executed_obs_unit.id"), index=True
    )
    instrument_module_id: Mapped[int] = mapped_column(ForeignKey("instrument_module.id"))
    part_number: Mapped[int] = mapped_column(Integer, default=1)
    source_location_id: Mapped[int | None] = mapped_column(ForeignKey("data_location.id"))
    data_transfer_package_id: Mapped[int | None] = mapped_column(
        ForeignKey("data_transfer_package.id"), index=True
    )
    failure_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Last sign of life of the build: when its task was (last) sent while SCHEDULED, the
    # latest heartbeat of the worker while IN_PROGRESS (see ccat_data_transfer.core.liveness).
    heartbeat_at: Mapped[datetime | None]
    # The attempt that owns this work now (a fresh token per claim, see
    # ccat_data_transfer.core.attempts): checked before every irreversible step.
    attempt_id: Mapped[str | None] = mapped_column(String(36))
    archived_at: Mapped[datetime | None]
    # Frozen: no good copy of the package is known anywhere (every archive copy corrupt or
    # missing and nothing to repair from).  No copy of a frozen package is deleted.
    frozen_at: Mapped[datetime | None]
    frozen_reason: Mapped[str | None] = mapped_column(Text)

    executed_obs_unit: Mapped[ExecutedObsUnit] = relationship()
    instrument_module: Mapped[InstrumentModule] = relationship()
    source_location: Mapped[DataLocation | None] = relationship()
    raw_data_files: Mapped[list[RawDataFile]] = relationship(back_populates="raw_data_package")
    data_transfer_package: Mapped[DataTransferPackage | None] = relationship(
        back_populates="raw_data_packages"
    )
    physical_copies: Mapped[list[RawDataPackagePhysicalCopy]] = relationship(
        back_populates="raw_data_package"
    )


class DataTransferPackage(_PackageFile, Base):
    """A tar of RawDataPackages, the unit sent over the network."""

    __tablename__ = "data_transfer_package"

    status: Mapped[Status] = mapped_column(_enum(Status), default=Status.PENDING, index=True)
    origin_location_id: Mapped[int | None] = mapped_column(ForeignKey("data_location.id"))
    failure_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Last sign of life of the build: when its task was (last) sent while SCHEDULED, the
    # latest heartbeat of the worker while IN_PROGRESS (see ccat_data_transfer.core.liveness).
    heartbeat_at: Mapped[datetime | None]
    # The attempt that owns this work now (a fresh token per claim, see
    # ccat_data_transfer.core.attempts): checked before every irreversible step.
    attempt_id: Mapped[str | None] = mapped_column(String(36))

    origin_location: Mapped[DataLocation | None] = relationship()
    raw_data_packages: Mapped[list[RawDataPackage]] = relationship(
        back_populates="data_transfer_package"
    )
    physical_copies: Mapped[list[DataTransferPackagePhysicalCopy]] = relationship(
        back_populates="data_transfer_package"
    )
    transfers: Mapped[list[DataTransfer]] = relationship(back_populates="data_transfer_package")


# ---------------------------------------------------------------------------------------
# Work: transfers, archive moves, staging
# ---------------------------------------------------------------------------------------


class DataTransfer(Base):
    """One origin-to-destination move of a DataTransferPackage."""

    __tablename__ = "data_transfer"
    __table_args__ = (
        UniqueConstraint("data_transfer_package_id", "destination_location_id"),
        Index("ix_data_transfer_status", "status", "unpack_status"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    data_transfer_package_id: Mapped[int] = mapped_column(
        ForeignKey("data_transfer_package.id"), index=True
    )
    origin_location_id: Mapped[int] = mapped_column(ForeignKey("data_location.id"), index=True)
    destination_location_id: Mapped[int] = mapped_column(ForeignKey("data_location.id"), index=True)
    route_id: Mapped[int | None] = mapped_column(ForeignKey("data_transfer_route.id"))
    transfer_method: Mapped[TransferMethod] = mapped_column(
        _enum(TransferMethod), default=TransferMethod.COPY
    )
    # Primary: from the source site to the round-robin LTA site; secondary: onwards.
    is_primary: Mapped[bool] = mapped_column(Boolean, default=True)
    status: Mapped[Status] = mapped_column(_enum(Status), default=Status.PENDING)
    unpack_status: Mapped[Status] = mapped_column(_enum(Status), default=Status.PENDING)
    bytes_transferred: Mapped[int] = mapped_column(BigInteger, default=0)
    duration_seconds: Mapped[float | None] = mapped_column(Float)
    rate_mb_per_s: Mapped[float | None] = mapped_column(Float)
    start_time: Mapped[datetime | None]
    end_time: Mapped[datetime | None]
    unpack_start_time: Mapped[datetime | None]
    unpack_end_time: Mapped[datetime | None]
    retry_count: Mapped[int] = mapped_column(Integer, default=0)
    unpack_retry_count: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None]
    failure_reason: Mapped[str | None] = mapped_column(Text)
    unpack_failure_reason: Mapped[str | None] = mapped_column(Text)
    log_path: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(256))
    # The attempt that owns this work now (a fresh token per claim, see
    # ccat_data_transfer.core.attempts): checked before every irreversible step.
    attempt_id: Mapped[str | None] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    data_transfer_package: Mapped[DataTransferPackage] = relationship(back_populates="transfers")
    origin_location: Mapped[DataLocation] = relationship(foreign_keys=[origin_location_id])
    destination_location: Mapped[DataLocation] = relationship(
        foreign_keys=[destination_location_id]
    )
    route: Mapped[DataTransferRoute | None] = relationship()


class LongTermArchiveTransfer(Base):
    """Move of a RawDataPackage from an LTA-site buffer into that site's LTA location."""

    __tablename__ = "long_term_archive_transfer"
    __table_args__ = (UniqueConstraint("raw_data_package_id", "destination_location_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    raw_data_package_id: Mapped[int] = mapped_column(ForeignKey("raw_data_package.id"), index=True)
    origin_location_id: Mapped[int] = mapped_column(ForeignKey("data_location.id"))
    destination_location_id: Mapped[int] = mapped_column(ForeignKey("data_location.id"), index=True)
    status: Mapped[Status] = mapped_column(_enum(Status), default=Status.PENDING, index=True)
    bytes_transferred: Mapped[int] = mapped_column(BigInteger, default=0)
    duration_seconds: Mapped[float | None] = mapped_column(Float)
    start_time: Mapped[datetime | None]
    end_time: Mapped[datetime | None]
    retry_count: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None]
    failure_reason: Mapped[str | None] = mapped_column(Text)
    metadata_path: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(256))
    # The attempt that owns this work now (a fresh token per claim, see
    # ccat_data_transfer.core.attempts): checked before every irreversible step.
    attempt_id: Mapped[str | None] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    raw_data_package: Mapped[RawDataPackage] = relationship()
    origin_location: Mapped[DataLocation] = relationship(foreign_keys=[origin_location_id])
    destination_location: Mapped[DataLocation] = relationship(
        foreign_keys=[destination_location_id]
    )


staging_job_raw_data_package = Table(
    "staging_job_raw_data_package",
    Base.metadata,
    Column("staging_job_id", ForeignKey("staging_job.id"), primary_key=True),
    Column("raw_data_package_id", ForeignKey("raw_data_package.id"), primary_key=True, index=True),
)


class StagingJob(Base):
    """A scientist's request to stage packages from an LTA to a PROCESSING location."""

    __tablename__ = "staging_job"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str | None] = mapped_column(String(256))
    user_id: Mapped[int | None] = mapped_column(ForeignKey("user.id"))
    destination_location_id: Mapped[int] = mapped_column(ForeignKey("data_location.id"), index=True)
    # False once the scientist is done or the retention expired: files may be cleaned up.
    active: Mapped[bool] = mapped_column(Boolean, default=True, index=True)
    retention_period_minutes: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[Status] = mapped_column(_enum(Status), default=Status.PENDING, index=True)
    packages_total: Mapped[int] = mapped_column(Integer, default=0)
    packages_done: Mapped[int] = mapped_column(Integer, default=0)
    retry_count: Mapped[int] = mapped_column(Integer, default=0)
    # Not claimed again before this time (backoff after a retryable failure).
    next_attempt_at: Mapped[datetime | None]
    failure_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    start_time: Mapped[datetime | None]
    # NULL while the claimed job waits in the queue; the worker's latest heartbeat once
    # its task has taken the job (see ccat_data_transfer.core.liveness).
    heartbeat_at: Mapped[datetime | None]
    # The attempt that owns this work now (a fresh token per claim, see
    # ccat_data_transfer.core.attempts): checked before every irreversible step.
    attempt_id: Mapped[str | None] = mapped_column(String(36))
    completed_at: Mapped[datetime | None]
    deactivated_at: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]

    destination_location: Mapped[DataLocation] = relationship()
    user: Mapped[User | None] = relationship()
    raw_data_packages: Mapped[list[RawDataPackage]] = relationship(
        secondary=staging_job_raw_data_package
    )


# ---------------------------------------------------------------------------------------
# Physical copies and the audit trail
# ---------------------------------------------------------------------------------------


class PhysicalCopy(Base):
    """One copy of one thing at one data location.  Never deleted: only marked."""

    __tablename__ = "physical_copy"
    __table_args__ = (
        Index("ix_physical_copy_type_status_location", "type", "status", "data_location_id"),
        # What a location holds (bytes held against a quota, a buffer's room when no
        # measurement is known): by location first, whatever the copy type.
        Index("ix_physical_copy_location_status", "data_location_id", "status"),
        Index("ix_physical_copy_status_deleted_at", "status", "deleted_at"),
        Index("ix_physical_copy_raw_data_file", "raw_data_file_id", "status"),
        Index("ix_physical_copy_raw_data_package", "raw_data_package_id", "status"),
        Index("ix_physical_copy_data_transfer_package", "data_transfer_package_id", "status"),
        # The deletion manager's stage 2: DELETION_POSSIBLE copies of a location past their
        # retention, oldest first.  Partial: the millions of other copies are not in it.
        Index(
            "ix_physical_copy_deletion_possible",
            "data_location_id",
            "deletion_possible_at",
            postgresql_where=text("status = 'DELETION_POSSIBLE'"),
            sqlite_where=text("status = 'DELETION_POSSIBLE'"),
        ),
        # The stage-1 catch-up: the raw files still PRESENT at a location (the backlog in
        # flight), read from the index alone.  Partial: the history is not in it.
        Index(
            "ix_physical_copy_present_files",
            "data_location_id",
            "raw_data_file_id",
            postgresql_where=text("status = 'PRESENT' AND type = 'raw_data_file'"),
            sqlite_where=text("status = 'PRESENT' AND type = 'raw_data_file'"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    type: Mapped[str] = mapped_column(String(32))
    data_location_id: Mapped[int] = mapped_column(ForeignKey("data_location.id"))
    status: Mapped[PhysicalCopyStatus] = mapped_column(
        _enum(PhysicalCopyStatus), default=PhysicalCopyStatus.PRESENT
    )
    # Path relative to the location's root.
    relative_path: Mapped[str | None] = mapped_column(Text)
    size: Mapped[int | None] = mapped_column(BigInteger)
    checksum: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Last proof, taken where the bytes are (a worker at the copy's site): the object
    # exists with the recorded size (and, when fixity_checked_at is set at the same time,
    # its checksum was re-read).
    verified_at: Mapped[datetime | None]
    # Last full re-read of the bytes with the checksum (the fixity scan).
    fixity_checked_at: Mapped[datetime | None]
    # A verification was queued at the copy's site and has not answered yet.
    verification_requested_at: Mapped[datetime | None]
    # When the copy became DELETION_POSSIBLE (start of its retention clock).
    deletion_possible_at: Mapped[datetime | None]
    # When the deletion task was (last) sent while DELETION_SCHEDULED; the worker's
    # heartbeat while DELETION_IN_PROGRESS (see ccat_data_transfer.core.liveness).
    deletion_scheduled_at: Mapped[datetime | None]
    # When the deletion of the copy was decided (claimed DELETION_SCHEDULED; a re-send
    # keeps it): a copy that may be the last outside the archives goes only on proof
    # taken at the archives' sites after this moment.
    deletion_decided_at: Mapped[datetime | None]
    deleted_at: Mapped[datetime | None]
    deletion_retry_count: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    # Set by the consistency audit when storage has no such object.
    lost_at: Mapped[datetime | None]

    raw_data_file_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("raw_data_file.id"))
    raw_data_package_id: Mapped[int | None] = mapped_column(ForeignKey("raw_data_package.id"))
    data_transfer_package_id: Mapped[int | None] = mapped_column(
        ForeignKey("data_transfer_package.id")
    )

    data_location: Mapped[DataLocation] = relationship(lazy="joined")

    __mapper_args__ = {"polymorphic_on": "type", "polymorphic_abstract": True}


class RawDataFilePhysicalCopy(PhysicalCopy):
    __mapper_args__ = {"polymorphic_identity": "raw_data_file"}

    raw_data_file: Mapped[RawDataFile] = relationship(back_populates="physical_copies")


class RawDataPackagePhysicalCopy(PhysicalCopy):
    __mapper_args__ = {"polymorphic_identity": "raw_data_package"}

    raw_data_package: Mapped[RawDataPackage] = relationship(back_populates="physical_copies")


class DataTransferPackagePhysicalCopy(PhysicalCopy):
    __mapper_args__ = {"polymorphic_identity": "data_transfer_package"}

    data_transfer_package: Mapped[DataTransferPackage] = relationship(
        back_populates="physical_copies"
    )


class DeletionLog(Base):
    """Audit trail of deletion decisions: who, what, where, why, when, size, outcome."""

    __tablename__ = "deletion_log"
    __table_args__ = (Index("ix_deletion_log_location_time", "data_location_id", "created_at"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    physical_copy_id: Mapped[int | None] = mapped_column(ForeignKey("physical_copy.id"), index=True)
    copy_type: Mapped[str | None] = mapped_column(String(32))
    data_location_id: Mapped[int | None] = mapped_column(ForeignKey("data_location.id"))
    location_name: Mapped[str | None] = mapped_column(String(128))
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(String(128))
    outcome: Mapped[DeletionOutcome] = mapped_column(_enum(DeletionOutcome))
    actor: Mapped[str] = mapped_column(String(128), default="deletion_manager")
    message: Mapped[str | None] = mapped_column(Text)
    #: A row for a whole batch (bulk scheduling of raw-file copies) has no
    #: ``physical_copy_id``; it lists the copies it covers here, as a JSON array of ids (to
    #: read), and in ``deletion_log_copy`` (to look up by copy).
    #: ``deletion_manager.deletion_history(session, copy_id)`` finds both kinds of row.
    copy_ids: Mapped[str | None] = mapped_column(Text)


class DeletionLogCopy(Base):
    """Membership of a copy in a batch row of ``deletion_log``: one row per copy the batch
    covers, so that a copy's history is found by index (``ix_deletion_log_copy_copy``)
    instead of by searching every batch's ``copy_ids``.

    No foreign keys, like ``copy_ids`` which it indexes: the rows are written by the
    million, with the batch row they belong to, in the same transaction as the claim of
    the copies they name, and never changed; checking two keys per row made scheduling a
    batch about four times as costly to write."""

    __tablename__ = "deletion_log_copy"
    __table_args__ = (Index("ix_deletion_log_copy_copy", "physical_copy_id"),)

    deletion_log_id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True
    )
    physical_copy_id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True
    )


class CopyClaim(Base):
    """The attempt that is verifying or repairing one physical copy now: one row per copy
    while the work runs (taken with an insert, or taken over once its heartbeat stopped),
    removed when the attempt ends.  A redelivered or concurrent verification or repair of
    the same copy finds the row held by a live attempt and leaves the copy alone (see
    ccat_data_transfer.core.attempts)."""

    __tablename__ = "copy_claim"

    physical_copy_id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"),
        ForeignKey("physical_copy.id"),
        primary_key=True,
    )
    #: What the attempt does: "verification" or "repair".
    work: Mapped[str] = mapped_column(String(32))
    attempt_id: Mapped[str] = mapped_column(String(36))
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)


class ArchiveEvent(Base):
    """Trail of what was learnt about archive copies and done about it: verifications,
    fixity results, corruption or loss found, repairs (each step), freezes, audit holds."""

    __tablename__ = "archive_event"
    __table_args__ = (Index("ix_archive_event_package_time", "raw_data_package_id", "created_at"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    #: What happened, e.g. VERIFIED, FIXITY_OK, CORRUPT, MISSING, REPAIR_STARTED, REPAIRED,
    #: REPAIR_FAILED, FROZEN, HOLD_SET, HOLD_CLEARED.
    event: Mapped[str] = mapped_column(String(32))
    physical_copy_id: Mapped[int | None] = mapped_column(ForeignKey("physical_copy.id"), index=True)
    raw_data_package_id: Mapped[int | None] = mapped_column(ForeignKey("raw_data_package.id"))
    data_location_id: Mapped[int | None] = mapped_column(ForeignKey("data_location.id"))
    actor: Mapped[str] = mapped_column(String(128), default="system")
    message: Mapped[str | None] = mapped_column(Text)


# ---------------------------------------------------------------------------------------
# Operational state
# ---------------------------------------------------------------------------------------


class BufferStatus(Base):
    """Latest measured use of a location (embedded-mode store; Redis holds it otherwise)."""

    __tablename__ = "buffer_status"

    data_location_id: Mapped[int] = mapped_column(ForeignKey("data_location.id"), primary_key=True)
    used_bytes: Mapped[int] = mapped_column(BigInteger)
    total_bytes: Mapped[int | None] = mapped_column(BigInteger)
    disk_usage_percent: Mapped[float] = mapped_column(Float)
    state: Mapped[str] = mapped_column(String(16))
    measured_at: Mapped[datetime] = mapped_column(default=utcnow)


class BufferUsageSample(Base):
    """History of buffer use, for the dashboard's plots."""

    __tablename__ = "buffer_usage_sample"
    __table_args__ = (Index("ix_buffer_usage_sample_loc_time", "data_location_id", "measured_at"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    data_location_id: Mapped[int] = mapped_column(ForeignKey("data_location.id"))
    used_bytes: Mapped[int] = mapped_column(BigInteger)
    total_bytes: Mapped[int | None] = mapped_column(BigInteger)
    disk_usage_percent: Mapped[float] = mapped_column(Float)
    measured_at: Mapped[datetime] = mapped_column(default=utcnow)


class ManagerState(Base):
    """Small persistent key/value state of managers (e.g. the round-robin position)."""

    __tablename__ = "manager_state"

    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


# ---------------------------------------------------------------------------------------
# Users, roles and API tokens (filing API)
# ---------------------------------------------------------------------------------------


class User(Base):
    """A person or a program using the API.  Roles belong to its tokens, not to it."""

    __tablename__ = "user"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(128), unique=True)
    email: Mapped[str | None] = mapped_column(String(256))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    tokens: Mapped[list[ApiToken]] = relationship(back_populates="user")


class Role(Base):
    __tablename__ = "role"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str | None] = mapped_column(Text)


class ApiToken(Base):
    """An API token; only its SHA-256 hash is stored.

    The token carries its own role: another token of the same user grants nothing to
    this one.  ``instrument_id`` (optional) scopes an ``instrument`` token: it files only
    into SOURCE locations bound to that instrument.
    """

    __tablename__ = "api_token"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("user.id"), index=True)
    role_id: Mapped[int] = mapped_column(ForeignKey("role.id"), index=True)
    instrument_id: Mapped[int | None] = mapped_column(ForeignKey("instrument.id"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)

    user: Mapped[User] = relationship(back_populates="tokens")
    role: Mapped[Role] = relationship()
    instrument: Mapped[Instrument | None] = relationship()


__all__ = [
    "ApiToken",
    "Base",
    "BufferStatus",
    "BufferUsageSample",
    "DataLocation",
    "DataTransfer",
    "DataTransferPackage",
    "DataTransferPackagePhysicalCopy",
    "DataTransferRoute",
    "DeletionLog",
    "DeletionOutcome",
    "DiskDataLocation",
    "ExecutedObsUnit",
    "Instrument",
    "InstrumentModule",
    "LocationType",
    "LongTermArchiveTransfer",
    "ManagerState",
    "ObsUnit",
    "Observatory",
    "PackageState",
    "PhysicalCopy",
    "PhysicalCopyStatus",
    "RawDataFile",
    "RawDataFilePhysicalCopy",
    "RawDataPackage",
    "RawDataPackagePhysicalCopy",
    "Role",
    "RouteType",
    "S3DataLocation",
    "Site",
    "StagingJob",
    "Status",
    "StorageType",
    "TapeDataLocation",
    "Telescope",
    "TransferMethod",
    "User",
    "staging_job_raw_data_package",
    "utcnow",
]
