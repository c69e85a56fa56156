"""Safety invariants of the whole lifecycle over random histories with faults.

A hypothesis ``RuleBasedStateMachine`` drives the real pipeline (SQLite, tasks in-process,
real files) through random interleavings of:

* filing tiny raw files at a SOURCE location (and finishing their obs units);
* one cycle of one manager at a time, in any order (buffer, packaging, transfer
  packaging, transfer + unpack, archive, staging, deletion, recovery);
* task executions outside the managers (a duplicate delivery of a transfer, archive or
  deletion task);
* faults during a manager cycle: a transfer method that crashes, one that corrupts the
  bytes in transit, a full disk (``StorageFullError``) at a location, a location whose
  storage root is missing (renamed away, then back); a flipped byte in a copy at a buffer;
* archive faults: an LTA file removed behind the system's back (its last proof made
  stale, as if the removal came some time after its last verification), a flipped byte in
  an LTA copy while another archive copy of the package is good, and an audit of a location
  that goes over its discrepancy threshold (a hold until an operator clears it); the
  fixity scan and the repair of bad archive copies run as a manager;
* arbitrary disk use published for a location (up to 99 %, or unknown);
* staging jobs created, deactivated and expired.

After every step the invariants are checked against the DB *and the storage*:

1. every filed file can still be read: its own copy at its SOURCE location is there with
   the right checksum, or its package has a PRESENT copy at a LONG_TERM_ARCHIVE location
   whose tar exists, matches the package checksum and holds the file with its checksum;
2. no copy at a LONG_TERM_ARCHIVE location was deleted (or scheduled for deletion);
3. source-site data (raw files at SOURCE, packages at the source-site buffer) is deleted
   only when the package is ARCHIVED; a transfer package at the source buffer only after
   a completed and unpacked transfer; an ARCHIVED package has a PRESENT LTA copy;
4. no PhysicalCopy row was removed (the ids seen are all still there; the count never
   drops);
5. every DELETED copy has ``deleted_at`` and a DELETED entry in ``deletion_log``;
6. no stage re-creates a storage root that is missing (it could fill the wrong disk).

CI mode runs ``CCAT_PROPERTY_EXAMPLES`` examples (default 2000) of ``CCAT_PROPERTY_STEPS``
steps (default 10, plus the initial filing) on SQLite.  ``scripts/test`` runs them through
``scripts/property-test``: split over one pytest process per core (each drawing its own
examples), in the background, in parallel with the rest of the suite.  Ten steps are
enough for the whole chain: one step of ``every_manager_once_in_pipeline_order`` takes a
finished observation from filing through packaging, transfer and archive to the deletion
of its source-site copies (and of its raw files at SOURCE when a disk use under pressure
is published first).  The test prints how many examples reached ARCHIVED, deletions at a
BUFFER and at SOURCE, and staging (``scripts/property-test`` adds them up over its
processes); over 2,000 examples about 50 %, 50 %, 7 % and 12 % (the same seeds reach the
same states as before the speed-up of the managers; 300 examples varied between about
55 % and 70 % reaching ARCHIVED from run to run).  Measured on a 2-core machine: about
0.25 s per example early in a run (0.45-0.5 s before the speed-up), 0.36 s of CPU per
example over 2,000 (later examples are longer); 2,000 examples take about 8 minutes in 2
processes, 13 when the machine is shared with other work.  A quick local run:
``CCAT_PROPERTY_EXAMPLES=100``; a long run, on every core::

    CCAT_PROPERTY_EXAMPLES=20000 CCAT_PROPERTY_STEPS=25 scripts/property-test

The machine runs on SQLite only (whatever CCAT_TEST_BACKENDS says).  All examples use the
same DB file and so the same engine (its compiled-statement cache is most of what makes a
manager cycle cheap): each example starts by restoring a migrated template with the default
topology loaded, through SQLite's backup API, and with empty storage roots.  The
invariants check the same properties after every step, on the DB and on the bytes in
storage, cheaply: column queries built once, on a plain connection (one query reads every
copy); a file or tar is hashed again only when it changed on disk (inode, size, mtime or
ctime differ: any write changes the ctime), and a verified tar's members are read once.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import shutil
import sqlite3
import tarfile
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import bindparam, delete, func, select

from ccat_data_transfer import deletion_manager, staging_manager, transfer_manager
from ccat_data_transfer.archive import cycle as archive_manager
from ccat_data_transfer.archive import execution as archive_execution
from ccat_data_transfer.buffers import cycle as buffer_manager
from ccat_data_transfer.core import buffer_status, transfer_methods
from ccat_data_transfer.core import storage as storage_mod
from ccat_data_transfer.core.config import settings
from ccat_data_transfer.core.database import DatabaseConnection, dispose_engines
from ccat_data_transfer.core.errors import CcatError
from ccat_data_transfer.core.storage import StorageFullError
from ccat_data_transfer.deletion import rule_sql, rules, worker
from ccat_data_transfer.filing.register import file_raw_data_files, finish_executed_obs_unit
from ccat_data_transfer.fixity import cycle as fixity_scan
from ccat_data_transfer.operations import audit, recovery
from ccat_data_transfer.packaging import raw_cycle, transfer_cycle
from ccat_ops_db import models as m
from ccat_ops_db.migrate import upgrade
from ccat_ops_db.topology import load_topology
from helpers_lifecycle import lta_package_copies

EXAMPLES = int(os.environ.get("CCAT_PROPERTY_EXAMPLES", "2000"))
STEPS = int(os.environ.get("CCAT_PROPERTY_STEPS", "10"))
TOPOLOGY = Path(__file__).resolve().parents[2] / "src/ccat_data_transfer/topology/default.toml"

S = m.PhysicalCopyStatus
LT = m.LocationType
SOURCES = {"primecam_raw_data": "primecam/280GHz", "chai_raw_data": "chai/LFA"}
BUFFERS = ["ccat_telescope_buffer", "cologne_buffer", "us_buffer"]
LTAS = ["cologne_lta", "us_lta"]
ALL_DISK = [*SOURCES, *BUFFERS, *LTAS, "processing_scratch"]
MANAGERS = {
    "buffer": buffer_manager.run_once,
    "packaging": raw_cycle.run_once,
    "transfer_packaging": transfer_cycle.run_once,
    "transfer": transfer_manager.run_once,
    "archive": archive_manager.run_once,
    "staging": staging_manager.run_once,
    "deletion": deletion_manager.run_once,
    "recovery": recovery.run_once,
    "fixity": fixity_scan.run_once,
}
#: The managers in the order data flows through them: one such round takes a finished
#: observation from SOURCE to ARCHIVED and deletes its source-site copies (the raw files
#: at SOURCE too if a disk use under pressure was published; the buffer manager, which
#: measures the real use, comes last).
PIPELINE_ORDER = [
    "packaging",
    "transfer_packaging",
    "transfer",
    "archive",
    "staging",
    "deletion",
    "recovery",
    "buffer",
]
#: Any order of the managers, with the pipeline's own order drawn often so that short
#: examples still get through the whole lifecycle.
ORDERS = st.one_of(st.just(PIPELINE_ORDER), st.permutations(sorted(MANAGERS)))
FAULTS = ["crash", "full", "corrupt", "disk_full", "unavailable"]
DELETING = (S.DELETION_SCHEDULED, S.DELETION_IN_PROGRESS, S.DELETED)
#: How far the examples got (printed by the test; see it with ``-s``).
REACHED: Counter[str] = Counter()

# The invariants' queries, built once (they run after every step).
_PC, _LOC = m.PhysicalCopy, m.DataLocation
_FILE_COPY = m.RawDataFilePhysicalCopy.__mapper__.polymorphic_identity
_RDP_COPY = m.RawDataPackagePhysicalCopy.__mapper__.polymorphic_identity
_DTP_COPY = m.DataTransferPackagePhysicalCopy.__mapper__.polymorphic_identity
#: Every copy, with its location and (for a raw file) the file's package.
_Q_COPIES = (
    select(
        _PC.id,
        _PC.type,
        _PC.status,
        _PC.deleted_at,
        _PC.raw_data_package_id,
        _PC.data_transfer_package_id,
        m.RawDataFile.raw_data_package_id.label("file_package_id"),
        _LOC.name.label("location"),
        _LOC.location_type,
        _LOC.site_id,
    )
    .outerjoin(_LOC, _LOC.id == _PC.data_location_id)
    .outerjoin(m.RawDataFile, m.RawDataFile.id == _PC.raw_data_file_id)
)
_Q_DELETED_LOGGED = select(m.DeletionLog.physical_copy_id).where(
    m.DeletionLog.outcome == m.DeletionOutcome.DELETED
)
_Q_SOURCE_SITE_IDS = select(_LOC.site_id).where(_LOC.location_type == LT.SOURCE)
_Q_PACKAGE_STATES = select(m.RawDataPackage.id, m.RawDataPackage.state)
_Q_UNPACKED_DTPS = select(m.DataTransfer.data_transfer_package_id).where(
    m.DataTransfer.status == m.Status.COMPLETED,
    m.DataTransfer.unpack_status == m.Status.COMPLETED,
)
#: Each filed file with its package and the status of its own copy at its SOURCE.
_Q_FILE_SOURCES = select(m.RawDataFile.id, m.RawDataFile.raw_data_package_id, _PC.status).join(
    _PC,
    (_PC.raw_data_file_id == m.RawDataFile.id)
    & (_PC.data_location_id == m.RawDataFile.source_location_id),
)
#: The PRESENT LTA copies of a package: where its tar lies, and the package checksum.
_Q_LTA_TARS = (
    select(_PC.relative_path, _LOC.path, m.RawDataPackage.checksum)
    .join(_LOC, _LOC.id == _PC.data_location_id)
    .join(m.RawDataPackage, m.RawDataPackage.id == _PC.raw_data_package_id)
    .where(
        _PC.type == _RDP_COPY,
        _PC.raw_data_package_id == bindparam("package_id"),
        _PC.status == S.PRESENT,
        _LOC.location_type == LT.LONG_TERM_ARCHIVE,
    )
    .order_by(_PC.id)
)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Environment:
    """One template DB (migrated, topology loaded) for a fixed data folder.

    Every example runs on the same SQLite file (so the same cached engine, whose compiled
    statement cache is what makes the manager cycles cheap); ``fresh()`` overwrites its
    contents with the template through SQLite's backup API and empties the data folder.
    """

    def __init__(self, base: Path) -> None:
        self.base = base
        self.data_dir = base / "data"
        self.data_dir.mkdir()
        template = base / "template.sqlite"
        url = f"sqlite:///{template}"
        upgrade(url)
        with DatabaseConnection(url).session_scope() as session:
            load_topology(session, TOPOLOGY, self.data_dir)
        with DatabaseConnection(url).session_scope() as session:
            self.paths = {
                loc.name: Path(loc.path)
                for loc in session.scalars(select(m.DataLocation))
                if loc.path
            }
        dispose_engines()
        self.template = sqlite3.connect(":memory:")
        with contextlib.closing(sqlite3.connect(template)) as src:
            src.backup(self.template)
        self.url = f"sqlite:///{base / 'example.sqlite'}"
        settings.set("DATABASE_URL", self.url)
        self.db = DatabaseConnection(self.url)

    def fresh(self) -> tuple[str, DatabaseConnection]:
        """The template's rows in the example DB, and empty storage roots."""
        raw = self.db.engine.raw_connection()
        try:
            self.template.backup(raw.driver_connection)
        finally:
            raw.close()
        shutil.rmtree(self.data_dir)
        for path in self.paths.values():
            path.mkdir(parents=True, exist_ok=True)
        return self.url, self.db

    def close(self) -> None:
        self.template.close()
        dispose_engines()


class _CrashingMethod(transfer_methods.CopyMethod):
    def land(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected crash in the transfer method")


class _FullDiskMethod(transfer_methods.CopyMethod):
    def land(self, *args: Any, **kwargs: Any) -> Any:
        raise StorageFullError("injected: no space left on device")


class _CorruptingMethod(transfer_methods.CopyMethod):
    """Copies, then flips one byte of what landed (corruption in transit)."""

    def land(self, src_storage, src_path, dst_storage, dst_path, log_file, **kw):
        stats = super().land(src_storage, src_path, dst_storage, dst_path, log_file, **kw)
        # Corrupted in transit: the bytes at the attempt's temporary name.
        temp = self.temp_name(dst_storage, dst_path, kw.get("attempt"))
        _flip_byte(dst_storage.local_path(temp))
        return stats


def _flip_byte(path: Path | None) -> bool:
    if path is None or not path.is_file() or path.stat().st_size == 0:
        return False
    data = bytearray(path.read_bytes())
    i = len(data) // 2
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    return True


@contextlib.contextmanager
def _method(method: transfer_methods.TransferMethodBase) -> Iterator[None]:
    previous = transfer_methods.register_transfer_method(m.TransferMethod.COPY, method)
    try:
        yield
    finally:
        transfer_methods.register_transfer_method(m.TransferMethod.COPY, previous)


@contextlib.contextmanager
def _disk_full(root: Path) -> Iterator[None]:
    """Every atomic write under ``root`` fails with ENOSPC (as StorageFullError)."""
    original = storage_mod.DiskStorage.open_write
    root_s = str(root)

    def open_write(self: Any, path: str) -> Any:
        if str(self.root).startswith(root_s):
            raise StorageFullError(f"injected: no space left under {root_s}")
        return original(self, path)

    storage_mod.DiskStorage.open_write = open_write  # type: ignore[method-assign]
    try:
        yield
    finally:
        storage_mod.DiskStorage.open_write = original  # type: ignore[method-assign]


class LifecycleMachine(RuleBasedStateMachine):
    env: _Environment

    def __init__(self) -> None:
        super().__init__()
        self.url, self.db = self.env.fresh()
        self.files: dict[str, dict[str, Any]] = {}  # RawDataFile id -> what was filed
        self.open_obs: list[str] = []
        self.copy_ids: set[int] = set()
        self.copy_count = 0
        self.lta_copy_ids: set[int] = set()
        self.root_recreated: str | None = None
        self.hashed: dict[tuple[Any, ...], str] = {}  # file (path, stat) -> its SHA-256
        self.tar_members: dict[tuple[str, str], dict[str, str]] = {}  # verified LTA tars
        self.tag = uuid.uuid4().hex[:6]
        self.seq = itertools.count()

    # -- filing ---------------------------------------------------------------------------

    @initialize(source=st.sampled_from(sorted(SOURCES)))
    def first_observation(self, source: str) -> None:
        self.file_observation(source, [100, 1500], True)

    @rule(
        source=st.sampled_from(sorted(SOURCES)),
        sizes=st.lists(st.integers(min_value=1, max_value=2048), min_size=1, max_size=3),
        finish=st.booleans(),
    )
    def file_observation(self, source: str, sizes: list[int], finish: bool) -> None:
        obs = f"obs_{self.tag}_{next(self.seq)}"
        module = SOURCES[source]
        root = self.env.paths[source]
        entries = []
        blobs = {}
        for i, size in enumerate(sizes):
            rel = f"{obs}/{module.split('/')[1]}/f{i}.dat"
            data = os.urandom(size)
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
            blobs[rel] = data
            entries.append(
                {
                    "relative_path": rel,
                    "size": size,
                    "checksum": _sha(data),
                    "checksum_algorithm": "sha256",
                    "executed_obs_unit": obs,
                    "instrument_module": module,
                }
            )
        with self.db.session_scope() as session:
            result = file_raw_data_files(session, source, entries)
            if finish:
                finish_executed_obs_unit(session, obs)
            for f in result.files:
                self.files[str(f.id)] = {
                    "source": source,
                    "relative_path": f.relative_path,
                    "checksum": _sha(blobs[f.relative_path]),
                }
        if not finish:
            self.open_obs.append(obs)

    @precondition(lambda self: self.open_obs)
    @rule(data=st.data())
    def finish_observation(self, data: st.DataObject) -> None:
        obs = data.draw(st.sampled_from(self.open_obs))
        self.open_obs.remove(obs)
        with self.db.session_scope() as session:
            finish_executed_obs_unit(session, obs)

    # -- managers and tasks ---------------------------------------------------------------

    def _cycle(self, name: str) -> None:
        with self.db.session_scope() as session:
            MANAGERS[name](session)

    @rule(name=st.sampled_from(sorted(MANAGERS)))
    def manager_cycle(self, name: str) -> None:
        self._cycle(name)

    @rule(order=ORDERS)
    def every_manager_once_in_random_order(self, order: list[str]) -> None:
        for name in order:
            self._cycle(name)

    @rule(pressure_at=st.one_of(st.none(), st.sampled_from([*SOURCES, *BUFFERS])))
    def every_manager_once_in_pipeline_order(self, pressure_at: str | None) -> None:
        """A round in data-flow order, optionally after a disk use under pressure (96 %)
        was published for a location (that is how raw files at SOURCE get deleted before
        their retention period is over)."""
        if pressure_at is not None:
            self.publish_disk_use(pressure_at, 96.0)
        for name in PIPELINE_ORDER:
            self._cycle(name)

    @rule(
        order=ORDERS,
        fault=st.sampled_from(FAULTS),
        where=st.sampled_from(ALL_DISK),
    )
    def every_manager_once_during_a_fault(self, order: list[str], fault: str, where: str) -> None:
        with self._fault(fault, where):
            for name in order:
                self._cycle(name)

    @contextlib.contextmanager
    def _fault(self, fault: str, where: str) -> Iterator[None]:
        methods = {"crash": _CrashingMethod, "full": _FullDiskMethod, "corrupt": _CorruptingMethod}
        if fault in methods:
            with _method(methods[fault]()):
                yield
        elif fault == "disk_full":
            with _disk_full(self.env.paths[where]):
                yield
        else:  # the location's storage root is missing (unmounted disk)
            root = self.env.paths[where]
            away = root.with_name(root.name + ".offline")
            root.rename(away)
            try:
                yield
            finally:
                if root.exists():
                    self.root_recreated = f"a stage re-created the missing root of {where}"
                    for child in list(root.iterdir()):
                        if not (away / child.name).exists():
                            child.rename(away / child.name)
                    shutil.rmtree(root)
                away.rename(root)

    @rule(kind=st.sampled_from(["transfer", "archive", "deletion"]), data=st.data())
    def duplicate_task_delivery(self, kind: str, data: st.DataObject) -> None:
        model = {
            "transfer": m.DataTransfer,
            "archive": m.LongTermArchiveTransfer,
            "deletion": m.PhysicalCopy,
        }[kind]
        with self.db.session_scope() as session:
            ids = sorted(session.scalars(select(model.id)))
        if not ids:
            return
        target = data.draw(st.sampled_from(ids))
        if kind == "transfer":
            transfer_manager.execute_transfer(target)
        elif kind == "archive":
            archive_execution.execute_archive_transfer(target)
        else:
            worker.delete_copies([target])

    # -- storage faults and disk use --------------------------------------------------------

    @rule(data=st.data())
    def corrupt_a_buffer_copy(self, data: st.DataObject) -> None:
        with self.db.session_scope() as session:
            rows = session.execute(
                select(m.DataLocation.name, m.PhysicalCopy.relative_path)
                .join(m.DataLocation, m.DataLocation.id == m.PhysicalCopy.data_location_id)
                .where(
                    m.DataLocation.location_type == LT.BUFFER,
                    m.PhysicalCopy.status == S.PRESENT,
                )
                .order_by(m.PhysicalCopy.id)
            ).all()
        if rows:
            name, rel = data.draw(st.sampled_from(rows))
            _flip_byte(self.env.paths[name] / rel)

    def _good_lta_copies(self, session: Any) -> list[Any]:
        """(copy id, package id, location, relative path) of every PRESENT LTA package copy
        whose tar holds the package's bytes."""
        return [
            (cid, pid, name, rel)
            for pid, checksum, rel, name, _path, cid in lta_package_copies(session)
            if self._sha_of(self.env.paths[name] / rel) == checksum
        ]

    def _source_intact(self, session: Any, package_id: int) -> bool:
        """Every raw file of the package still has its SOURCE copy, untouched by deletion."""
        statuses = session.scalars(
            select(m.PhysicalCopy.status)
            .join(m.RawDataFile, m.RawDataFile.id == m.PhysicalCopy.raw_data_file_id)
            .where(
                m.RawDataFile.raw_data_package_id == package_id,
                m.PhysicalCopy.data_location_id == m.RawDataFile.source_location_id,
            )
        ).all()
        return bool(statuses) and all(st_ in (S.PRESENT, S.DELETION_POSSIBLE) for st_ in statuses)

    @rule(data=st.data())
    def lose_an_lta_file(self, data: st.DataObject) -> None:
        """An archive file vanishes some time after its last verification (its proof is
        made stale).  Only where the package is still whole elsewhere (another good
        archive copy, or every raw file at its SOURCE): the fault itself must not destroy
        the last good copy; the system must then not delete that other copy on the
        strength of the lost one."""
        with self.db.session_scope() as session:
            good = self._good_lta_copies(session)
            candidates = [
                g
                for g in good
                if any(o[1] == g[1] and o[0] != g[0] for o in good)
                or self._source_intact(session, g[1])
            ]
            if not candidates:
                return
            copy_id, _pid, name, rel = data.draw(st.sampled_from(candidates))
            (self.env.paths[name] / rel).unlink()
            session.get(m.PhysicalCopy, copy_id).verified_at = m.utcnow() - timedelta(days=2)

    @rule(data=st.data())
    def flip_a_byte_at_an_lta(self, data: st.DataObject) -> None:
        """A silent byte flip in an archive copy (same size: only a re-read of the bytes
        sees it) while another archive copy of the package is good."""
        with self.db.session_scope() as session:
            good = self._good_lta_copies(session)
        candidates = [g for g in good if any(o[1] == g[1] and o[0] != g[0] for o in good)]
        if candidates:
            _cid, _pid, name, rel = data.draw(st.sampled_from(candidates))
            _flip_byte(self.env.paths[name] / rel)

    @rule(where=st.sampled_from([*BUFFERS, *LTAS]))
    def audit_over_threshold(self, where: str) -> None:
        """An audit of ``where`` with a zero discrepancy threshold: any discrepancy (a lost
        or corrupt copy, dark data) puts the location on hold."""
        with self.db.session_scope() as session:
            location = session.scalars(select(m.DataLocation).filter_by(name=where)).one()
            audit.audit_location(session, location, full=True, max_fraction=0.0)

    @rule()
    def operator_clears_audit_holds(self) -> None:
        with self.db.session_scope() as session:
            held = [h["location"] for h in audit.list_holds(session)]
        for name in held:
            with self.db.session_scope() as session:
                audit.clear_hold(session, name, reason="checked by the property test")

    @rule(
        where=st.sampled_from([*SOURCES, *BUFFERS, "processing_scratch"]),
        percent=st.one_of(st.none(), st.sampled_from([0.0, 50.0, 75.0, 90.0, 96.0, 99.0])),
    )
    def publish_disk_use(self, where: str, percent: float | None) -> None:
        with self.db.session_scope() as session:
            if percent is None:  # unknown: no fresh measurement
                loc_id = session.scalar(select(m.DataLocation.id).filter_by(name=where))
                session.execute(
                    delete(m.BufferStatus).where(m.BufferStatus.data_location_id == loc_id)
                )
                return
            total = 10_000_000
            loc = session.scalars(select(m.DataLocation).filter_by(name=where)).one()
            buffer_status.publish_status(
                {
                    "location": where,
                    "used_bytes": int(total * percent / 100),
                    "total_bytes": total,
                    "disk_usage_percent": percent,
                    "state": buffer_status.classify(
                        percent, buffer_status.thresholds_for(loc)
                    ).value,
                    "measured_at": m.utcnow().isoformat(),
                },
                session,
            )

    # -- staging ------------------------------------------------------------------------------

    @rule(data=st.data())
    def create_staging_job(self, data: st.DataObject) -> None:
        with self.db.session_scope() as session:
            ids = sorted(
                session.scalars(
                    select(m.RawDataPackage.id).where(
                        m.RawDataPackage.state == m.PackageState.ARCHIVED
                    )
                )
            )
        if not ids:
            return
        chosen = data.draw(st.lists(st.sampled_from(ids), min_size=1, max_size=2, unique=True))
        try:
            with self.db.session_scope() as session:
                staging_manager.create_staging_job(
                    session, package_ids=chosen, destination="processing_scratch"
                )
        except CcatError:
            pass  # e.g. no usable LTA copy any more: refused, nothing written

    @rule(data=st.data(), expire=st.booleans())
    def end_staging_job(self, data: st.DataObject, expire: bool) -> None:
        with self.db.session_scope() as session:
            ids = sorted(
                session.scalars(select(m.StagingJob.id).where(m.StagingJob.active.is_(True)))
            )
        if not ids:
            return
        job_id = data.draw(st.sampled_from(ids))
        with self.db.session_scope() as session:
            if expire:
                session.get(m.StagingJob, job_id).expires_at = m.utcnow()
                session.flush()
                staging_manager.expire_staging_jobs(session)
            else:
                staging_manager.deactivate_staging_job(session, job_id)

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def safety_invariants(self) -> None:
        assert self.root_recreated is None, self.root_recreated
        # A plain connection and statements built once (``_Q_*``): this runs after every
        # step, so it reads columns only (no Session, no ORM objects, no lazy loads).
        with self.db.engine.connect() as conn:
            copies = conn.execute(_Q_COPIES).all()
            self._check_copies_never_removed(copies)
            self._check_lta_never_deleted(copies)
            self._check_deleted_copies_are_logged(conn, copies)
            self._check_source_deleted_only_when_archived(conn, copies)
            self._check_every_file_readable(conn)

    def _check_copies_never_removed(self, copies: list[Any]) -> None:
        ids = {c.id for c in copies}
        missing = self.copy_ids - ids
        assert not missing, f"PhysicalCopy rows removed: {sorted(missing)}"
        assert len(ids) >= self.copy_count
        self.copy_ids, self.copy_count = ids, len(ids)

    def _check_lta_never_deleted(self, copies: list[Any]) -> None:
        rows = [c for c in copies if c.location_type == LT.LONG_TERM_ARCHIVE]
        for c in rows:
            assert c.status not in DELETING, f"LTA copy {c.id} at {c.location} is {c.status.name}"
            if c.status == S.PRESENT:
                self.lta_copy_ids.add(c.id)
        present = {c.id for c in rows if c.status == S.PRESENT}
        gone = self.lta_copy_ids - present
        assert not gone, f"LTA copies no longer PRESENT: {sorted(gone)}"

    def _check_deleted_copies_are_logged(self, conn: Any, copies: list[Any]) -> None:
        deleted = [c for c in copies if c.status == S.DELETED]
        if not deleted:
            return
        logged = set(conn.scalars(_Q_DELETED_LOGGED))
        for c in deleted:
            assert c.deleted_at is not None, f"DELETED copy {c.id} has no deleted_at"
            assert c.id in logged, f"DELETED copy {c.id} has no deletion_log entry"

    def _check_source_deleted_only_when_archived(self, conn: Any, copies: list[Any]) -> None:
        src_site_ids = set(conn.scalars(_Q_SOURCE_SITE_IDS))
        states = dict(conn.execute(_Q_PACKAGE_STATES).all())
        deleting = [c for c in copies if c.site_id in src_site_ids and c.status in DELETING]
        if any(c.type == _DTP_COPY for c in deleting):
            unpacked = set(conn.scalars(_Q_UNPACKED_DTPS))
        for c in deleting:
            if c.type == _FILE_COPY:
                package_id = c.file_package_id
            elif c.type == _RDP_COPY:
                package_id = c.raw_data_package_id
            else:
                assert c.data_transfer_package_id in unpacked, (
                    f"transfer package copy {c.id} at {c.location} is "
                    f"{c.status.name} without a completed and unpacked transfer"
                )
                continue
            state = states.get(package_id)
            assert state == m.PackageState.ARCHIVED, (
                f"{c.type} copy {c.id} at {c.location} is {c.status.name} but its package is "
                f"{state.name if state else 'missing'}"
            )
        lta_present = {
            c.raw_data_package_id
            for c in copies
            if c.type == _RDP_COPY
            and c.status == S.PRESENT
            and c.location_type == LT.LONG_TERM_ARCHIVE
            and c.raw_data_package_id is not None
        }
        unbacked = sorted(
            pid
            for pid, state in states.items()
            if state == m.PackageState.ARCHIVED and pid not in lta_present
        )
        assert not unbacked, f"packages {unbacked} are ARCHIVED without a PRESENT LTA copy"

    def _check_every_file_readable(self, conn: Any) -> None:
        if not self.files:
            return
        by_file = {str(fid): (pkg, status) for fid, pkg, status in conn.execute(_Q_FILE_SOURCES)}
        tar_cache: dict[int, dict[str, str]] = {}
        for fid, info in self.files.items():
            pkg_id, status = by_file.get(fid, (None, None))
            path = self.env.paths[info["source"]] / info["relative_path"]
            if status is not None and status != S.DELETED and path.is_file():
                if self._sha_of(path) == info["checksum"]:
                    continue
            assert pkg_id is not None, (
                f"file {info['relative_path']} is not readable at its source "
                f"(copy {status.name if status else 'missing'}) and has no package"
            )
            if pkg_id not in tar_cache:
                tar_cache[pkg_id] = self._verified_lta_members(conn, pkg_id)
            assert tar_cache[pkg_id].get(info["relative_path"]) == info["checksum"], (
                f"file {info['relative_path']} is not readable at its source (copy "
                f"{status.name if status else 'missing'}) and not in a verified LTA copy of "
                f"package {pkg_id}"
            )

    def _sha_of(self, path: Path) -> str | None:
        """SHA-256 of a file's bytes; read again only when the file changed since it was
        last hashed (any write changes its ctime, so the cached value is its bytes')."""
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if key not in self.hashed:
            self.hashed[key] = _sha(path.read_bytes())
        return self.hashed[key]

    def _verified_lta_members(self, conn: Any, package_id: int) -> dict[str, str]:
        """Member checksums of the first LTA copy whose bytes match the package checksum."""
        for rel, root, checksum in conn.execute(_Q_LTA_TARS, {"package_id": package_id}):
            path = Path(root) / rel
            if not path.is_file() or self._sha_of(path) != checksum:
                continue
            key = (str(path), checksum)
            if key not in self.tar_members:
                with tarfile.open(path) as tar:
                    members = {}
                    for member in tar.getmembers():
                        fh = tar.extractfile(member)
                        if fh is not None:
                            members[member.name] = _sha(fh.read())
                self.tar_members[key] = members
            return self.tar_members[key]
        return {}

    def teardown(self) -> None:
        with self.db.session_scope() as session:
            deleted = session.execute(
                select(m.DataLocation.location_type, func.count())
                .join(m.PhysicalCopy, m.PhysicalCopy.data_location_id == m.DataLocation.id)
                .where(m.PhysicalCopy.status == S.DELETED)
                .group_by(m.DataLocation.location_type)
            ).all()
            archived = session.scalar(
                select(func.count(m.RawDataPackage.id)).where(
                    m.RawDataPackage.state == m.PackageState.ARCHIVED
                )
            )
            staged = session.scalar(select(func.count(m.StagingJob.id)))
            archive_events = set(session.scalars(select(m.ArchiveEvent.event).distinct()))
        REACHED["examples"] += 1
        REACHED["with packages archived"] += bool(archived)
        REACHED["with staging jobs"] += bool(staged)
        for ltype, _ in deleted:
            REACHED[f"with copies deleted at a {ltype.name}"] += 1
        for event in archive_events & {"MISSING", "CORRUPT", "REPAIRED", "FROZEN", "HOLD_SET"}:
            REACHED[f"with an archive event {event}"] += 1


@pytest.fixture
def lifecycle_environment(override_settings: Any) -> Iterator[_Environment]:
    shm = Path("/dev/shm")
    parent = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    base = Path(tempfile.mkdtemp(prefix="ccat_props_", dir=parent))
    # The faults make the stages log errors by design, thousands over a run: silenced, so
    # that a failure's report shows Hypothesis's steps rather than every example's logs.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)
    try:
        override_settings(
            DATA_DIR=str(base / "data"),
            DATABASE_URL="",
            LOG_LEVEL="ERROR",
            # The fixity scan re-reads every archive copy in each of its cycles (the
            # examples last milliseconds: a real day's budget would read nothing).
            FIXITY_BYTES_PER_DAY=10**18,
        )
        env = _Environment(base)
        try:
            yield env
        finally:
            env.close()
    finally:
        root.setLevel(level)
        dispose_engines()
        shutil.rmtree(base, ignore_errors=True)


def _machine_settings(examples: int) -> hsettings:
    return hsettings(
        max_examples=examples,
        stateful_step_count=STEPS,
        # Each process of scripts/property-test draws its own examples, also where the CI
        # environment makes Hypothesis load its "ci" profile (derandomize=True), under
        # which every process would run the same examples.
        derandomize=False,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )


def test_lifecycle_invariants_hold_over_random_histories_with_faults(lifecycle_environment, capsys):
    LifecycleMachine.env = lifecycle_environment
    REACHED.clear()
    started = time.perf_counter()
    run_state_machine_as_test(LifecycleMachine, settings=_machine_settings(EXAMPLES))
    elapsed = time.perf_counter() - started
    n = max(REACHED["examples"], 1)
    with capsys.disabled():  # shown even when pytest captures output
        print(f"\nlifecycle property examples: {n} in {elapsed:.0f} s ({elapsed / n:.3f} s each)")
        for what, count in sorted(REACHED.items()):
            print(f"  {what}: {count} ({100 * count / n:.0f} %)")


def test_the_machine_finds_a_broken_source_deletion_rule(
    lifecycle_environment, monkeypatch, request
):
    """The invariants can fail: with the rule "source data only when ARCHIVED in an LTA"
    removed (finder and worker re-check), the machine finds a history that breaks them."""
    from sqlalchemy import true

    from ccat_data_transfer.deletion.base import forget_kept

    monkeypatch.setattr(rule_sql, "_lta_present_exists", lambda *a, **k: true())
    monkeypatch.setattr(
        rules,
        "_decide_rdp_source",
        lambda *a, **k: rules.delete_because("rule broken on purpose", "broken"),
    )
    # Statements built once and kept hold the rule they were built with: build them anew
    # with the broken rule, and forget those when the test ends, so that no later test
    # runs a statement built with it.
    forget_kept()
    request.addfinalizer(forget_kept)
    LifecycleMachine.env = lifecycle_environment
    with pytest.raises(AssertionError, match="package is|not readable") as found:
        run_state_machine_as_test(
            LifecycleMachine,
            settings=hsettings(_machine_settings(300), database=None, phases=_find_phases()),
        )
    assert "ccat_telescope_buffer" in str(found.value) or "not readable" in str(found.value)


def _find_phases() -> tuple[Any, ...]:
    from hypothesis import Phase

    return (Phase.generate, Phase.target)  # finding is enough; no shrinking
