"""Metrics for dashboards: a Prometheus endpoint and an InfluxDB line-protocol writer.

Numbers are derived from the operations database at collection time (grouped counts and
sums, one query per family), plus buffer use from the buffer-status store and queue
lengths from the broker.  Deriving them from the DB means every process reports the same
truth and no stage has to remember to count.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ccat_data_transfer.core.buffer_status import (
    BufferState,
    last_samples,
    read_statuses,
    thresholds_for,
)
from ccat_data_transfer.core.celery_app import is_embedded
from ccat_data_transfer.core.config import settings
from ccat_data_transfer.core.database import DatabaseConnection
from ccat_data_transfer.core.logs import get_logger
from ccat_data_transfer.core.queues import discover_queues
from ccat_data_transfer.operations.recovery import stalled_work
from ccat_ops_db import models as m

log = get_logger(__name__)


def collect_snapshot(session: Session) -> dict[str, Any]:
    """All dashboard numbers as a plain dict (also what the web dashboard shows)."""
    snap: dict[str, Any] = {}
    _snap_files_and_packages(session, snap)
    _snap_transfers(session, snap)
    _snap_copies_and_deletions(session, snap)
    _snap_operations(session, snap)
    snap["stalled_work"] = stalled_work(session)
    return snap


def _snap_files_and_packages(session: Session, snap: dict[str, Any]) -> None:
    """Raw files, blocked groups and the states of both kinds of package."""
    snap["raw_files"] = dict(
        zip(
            ("count", "bytes"),
            session.execute(
                select(func.count(m.RawDataFile.id), func.coalesce(func.sum(m.RawDataFile.size), 0))
            ).one(),
            strict=True,
        )
    )
    snap["raw_files_unpackaged"] = session.scalar(
        select(func.count(m.RawDataFile.id)).where(m.RawDataFile.raw_data_package_id.is_(None))
    )
    snap["raw_files_checksum_errors"] = session.scalar(
        select(func.count(m.RawDataFile.id)).where(m.RawDataFile.checksum_error.is_not(None))
    )
    snap["blocked_groups"] = _blocked_groups(session)
    snap["package_states"] = {
        state.name: {"count": count, "bytes": int(size or 0)}
        for state, count, size in session.execute(
            select(m.RawDataPackage.state, func.count(), func.sum(m.RawDataPackage.size)).group_by(
                m.RawDataPackage.state
            )
        )
    }
    snap["transfer_package_status"] = {
        status.name: {"count": count, "bytes": int(size or 0)}
        for status, count, size in session.execute(
            select(
                m.DataTransferPackage.status, func.count(), func.sum(m.DataTransferPackage.size)
            ).group_by(m.DataTransferPackage.status)
        )
    }


def _snap_transfers(session: Session, snap: dict[str, Any]) -> None:
    """Transfers, unpacks, the last hour's rate and the archive transfers."""
    snap["transfers"] = {
        f"{status.name}": {"count": count, "bytes": int(size or 0)}
        for status, count, size in session.execute(
            select(
                m.DataTransfer.status, func.count(), func.sum(m.DataTransfer.bytes_transferred)
            ).group_by(m.DataTransfer.status)
        )
    }
    snap["unpacks"] = {
        status.name: count
        for status, count in session.execute(
            select(m.DataTransfer.unpack_status, func.count()).group_by(
                m.DataTransfer.unpack_status
            )
        )
    }
    hour_ago = m.utcnow() - timedelta(hours=1)
    moved = session.execute(
        select(
            func.coalesce(func.sum(m.DataTransfer.bytes_transferred), 0),
            func.coalesce(func.sum(m.DataTransfer.duration_seconds), 0.0),
        ).where(m.DataTransfer.status == m.Status.COMPLETED, m.DataTransfer.end_time >= hour_ago)
    ).one()
    # int()/float(): PostgreSQL sums BIGINT as NUMERIC, which arrives as Decimal.
    snap["transfer_bytes_last_hour"] = int(moved[0])
    rate = (int(moved[0]) / float(moved[1])) if moved[1] else 0.0
    snap["transfer_rate_bytes_per_second"] = rate
    snap["transfer_rate_mb_per_s"] = rate / 1e6  # the dashboard's and the JSON's unit
    snap["archive_transfers"] = {
        status.name: count
        for status, count in session.execute(
            select(m.LongTermArchiveTransfer.status, func.count()).group_by(
                m.LongTermArchiveTransfer.status
            )
        )
    }


def _snap_copies_and_deletions(session: Session, snap: dict[str, Any]) -> None:
    """Physical copies per location, type and status; the last day's deletions."""
    snap["copies"] = [
        {
            "location": loc,
            "type": ctype,
            "status": status.name,
            "count": count,
            "bytes": int(size or 0),
        }
        for loc, ctype, status, count, size in session.execute(
            select(
                m.DataLocation.name,
                m.PhysicalCopy.type,
                m.PhysicalCopy.status,
                func.count(),
                func.sum(m.PhysicalCopy.size),
            )
            .join(m.DataLocation, m.DataLocation.id == m.PhysicalCopy.data_location_id)
            .group_by(m.DataLocation.name, m.PhysicalCopy.type, m.PhysicalCopy.status)
        )
    ]
    day_ago = m.utcnow() - timedelta(days=1)
    deleted = session.execute(
        select(
            func.count(m.PhysicalCopy.id), func.coalesce(func.sum(m.PhysicalCopy.size), 0)
        ).where(
            m.PhysicalCopy.status == m.PhysicalCopyStatus.DELETED,
            m.PhysicalCopy.deleted_at >= day_ago,
        )
    ).one()
    snap["deletions_last_day"] = {"count": deleted[0], "bytes": int(deleted[1])}
    snap["deletion_failures"] = session.scalar(
        select(func.count(m.PhysicalCopy.id)).where(
            m.PhysicalCopy.status == m.PhysicalCopyStatus.DELETION_FAILED
        )
    )


def _snap_operations(session: Session, snap: dict[str, Any]) -> None:
    """Staging jobs, buffers, queues, audit holds and frozen packages."""
    snap["staging_jobs"] = {
        status.name: count
        for status, count in session.execute(
            select(m.StagingJob.status, func.count()).group_by(m.StagingJob.status)
        )
    }
    snap["buffers"] = _buffers(session)
    snap["queues"] = _queue_lengths(session)
    snap["audit_holds"] = [
        {
            "location": loc.name,
            "site": loc.site.name,
            "since": loc.audit_hold_at.isoformat(timespec="seconds"),
            "reason": loc.audit_hold_reason,
        }
        for loc in session.scalars(
            select(m.DataLocation)
            .where(m.DataLocation.audit_hold_at.is_not(None))
            .order_by(m.DataLocation.name)
        )
    ]
    snap["frozen_packages"] = session.scalar(
        select(func.count(m.RawDataPackage.id)).where(m.RawDataPackage.frozen_at.is_not(None))
    )


def _blocked_groups(session: Session) -> int:
    """Groups (source location, observation, instrument module) held back from packaging
    because one of their unpackaged files is flagged with a checksum error."""
    f = m.RawDataFile
    groups = (
        select(f.source_location_id, f.executed_obs_unit_id, f.instrument_module_id)
        .where(f.raw_data_package_id.is_(None), f.checksum_error.is_not(None))
        .distinct()
        .subquery()
    )
    return int(session.scalar(select(func.count()).select_from(groups)) or 0)


def _buffers(session: Session) -> list[dict[str, Any]]:
    """Every active location's use and state.

    The state comes from the live status (Redis or the DB, with its TTL); when that has
    expired (no buffer manager measured it lately) the state is ``unknown`` but the last
    measured use is still reported from the DB's samples, with its age, so a dashboard or
    an alert sees "stale since ..." instead of the location disappearing.
    """
    locations = list(session.scalars(select(m.DataLocation).where(m.DataLocation.active.is_(True))))
    live = read_statuses([loc.name for loc in locations], session)
    samples = last_samples(session)
    now = m.utcnow()
    out = []
    for loc in locations:
        status = live.get(loc.name) or {}
        sample = samples.get(loc.id)
        measured_at = _parse_time(status.get("measured_at")) or (sample and sample.measured_at)
        th = thresholds_for(loc)
        out.append(
            {
                "location": loc.name,
                "site": loc.site.name,
                "location_type": loc.location_type.value,
                "disk_usage_percent": status.get(
                    "disk_usage_percent", sample.disk_usage_percent if sample else None
                ),
                "used_bytes": status.get("used_bytes", sample.used_bytes if sample else None),
                "total_bytes": status.get("total_bytes", sample.total_bytes if sample else None),
                "state": status.get("state", "unknown"),
                "stale": not status,
                "age_seconds": (now - measured_at).total_seconds() if measured_at else None,
                "warning": th.warning,
                "critical": th.critical,
                "emergency": th.emergency,
            }
        )
    return out


def _parse_time(value: Any) -> Any:
    """A status's ``measured_at`` (ISO text from Redis or a datetime) as a naive UTC
    datetime comparable with the DB's, or None."""
    if value is None:
        return None
    when = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    if when.tzinfo is not None:
        when = when.astimezone(UTC).replace(tzinfo=None)
    return when


def _queue_lengths(session: Session) -> dict[str, int]:
    """Messages waiting per queue (distributed mode with a Redis broker only)."""
    broker = str(settings.BROKER_URL)
    if is_embedded() or not broker.startswith("redis"):
        return {}

    try:
        import redis

        client = redis.Redis.from_url(broker, socket_connect_timeout=2, socket_timeout=2)
        return {q: int(client.llen(q)) for q in discover_queues(session)}
    except Exception as exc:  # metrics must not break on a broker outage
        log.warning("queue_length_unavailable", error=str(exc))
        return {}


# ---------------------------------------------------------------------------------------
# Prometheus
# ---------------------------------------------------------------------------------------


class DatabaseCollector:
    """A Prometheus collector that reads a fresh snapshot at every scrape."""

    def __init__(self, session_factory: Any = None) -> None:
        self._session_factory = session_factory

    def _snapshot(self) -> dict[str, Any]:
        if self._session_factory is not None:
            session = self._session_factory()
        else:
            session, _ = DatabaseConnection().get_connection()
        try:
            return collect_snapshot(session)
        finally:
            session.close()

    def collect(self) -> Any:
        snap = self._snapshot()
        yield from snapshot_to_prometheus(snap)


def _total(name: str, documentation: str, value: Any) -> GaugeMetricFamily:
    """A gauge with a single unlabelled sample: one of the snapshot's totals."""
    g = GaugeMetricFamily(name, documentation)
    g.add_metric([], value)
    return g


def _counts_and_bytes(
    label: str, by_label: dict[str, dict[str, Any]], count: tuple[str, str], size: tuple[str, str]
) -> list[GaugeMetricFamily]:
    """Two gauges from ``{label value: {"count": ..., "bytes": ...}}``: how many rows and
    how many bytes per ``label`` value.  ``count`` and ``size`` are each gauge's
    ``(name, documentation)``."""
    g = GaugeMetricFamily(*count, labels=[label])
    b = GaugeMetricFamily(*size, labels=[label])
    for value, v in by_label.items():
        g.add_metric([value], v["count"])
        b.add_metric([value], v["bytes"])
    return [g, b]


def snapshot_to_prometheus(snap: dict[str, Any]) -> list[GaugeMetricFamily]:
    """The Prometheus gauges of a :func:`collect_snapshot` result."""
    families = _work_families(snap)
    families += _copy_families(snap)
    families += _buffer_families(snap["buffers"])
    families += _archive_truth_families(snap)
    families += _queue_and_failure_families(snap)
    return families


def _work_families(snap: dict[str, Any]) -> list[GaugeMetricFamily]:
    """Raw files, packages, transfers and their rate, checksum errors and blocked groups."""
    families = [
        _total("ccat_raw_files", "Filed raw data files", snap["raw_files"]["count"]),
        _total("ccat_raw_file_bytes", "Bytes of filed raw data files", snap["raw_files"]["bytes"]),
        _total(
            "ccat_raw_files_unpackaged",
            "Filed files not yet in a package",
            snap["raw_files_unpackaged"],
        ),
    ]
    families += _counts_and_bytes(
        "state",
        snap["package_states"],
        ("ccat_raw_data_packages", "RawDataPackages by state"),
        ("ccat_raw_data_package_bytes", "Bytes of RawDataPackages by state"),
    )
    families += _counts_and_bytes(
        "status",
        snap["transfers"],
        ("ccat_data_transfers", "DataTransfers by status"),
        ("ccat_data_transfer_bytes", "Bytes moved by DataTransfers by status"),
    )
    families.append(
        _total(
            "ccat_transfer_rate_bytes_per_second",
            "Mean transfer rate of the transfers completed in the last hour",
            snap["transfer_rate_bytes_per_second"],
        )
    )
    families += [
        _total(
            "ccat_raw_files_checksum_errors",
            "Filed raw data files flagged with a checksum error (need a person)",
            snap["raw_files_checksum_errors"],
        ),
        _total(
            "ccat_blocked_groups",
            "Groups held back from packaging by a file with a checksum error",
            snap["blocked_groups"],
        ),
    ]
    return families


def _copy_families(snap: dict[str, Any]) -> list[GaugeMetricFamily]:
    """Physical copies by location, type and status; the last day's deletions."""
    families: list[GaugeMetricFamily] = []
    g = GaugeMetricFamily(
        "ccat_physical_copies", "Physical copies", labels=["location", "type", "status"]
    )
    b = GaugeMetricFamily(
        "ccat_physical_copy_bytes",
        "Bytes of physical copies",
        labels=["location", "type", "status"],
    )
    for row in snap["copies"]:
        labels = [row["location"], row["type"], row["status"]]
        g.add_metric(labels, row["count"])
        b.add_metric(labels, row["bytes"])
    families += [g, b]
    families += [
        _total(
            "ccat_deletions_last_day",
            "Copies deleted in the last 24 h",
            snap["deletions_last_day"]["count"],
        ),
        _total(
            "ccat_deleted_bytes_last_day",
            "Bytes deleted in the last 24 h",
            snap["deletions_last_day"]["bytes"],
        ),
        _total("ccat_deletion_failures", "Copies in DELETION_FAILED", snap["deletion_failures"]),
    ]
    return families


def _queue_and_failure_families(snap: dict[str, Any]) -> list[GaugeMetricFamily]:
    """Queue lengths, stalled work by kind and work items in FAILED by kind."""
    families: list[GaugeMetricFamily] = []
    g = GaugeMetricFamily("ccat_queue_length", "Tasks waiting in a queue", labels=["queue"])
    for queue, length in snap["queues"].items():
        g.add_metric([queue], length)
    families.append(g)
    g = GaugeMetricFamily(
        "ccat_stalled_work",
        "Started work whose heartbeat stopped and that recovery has not reset",
        labels=["kind"],
    )
    for kind, count in snap["stalled_work"].items():
        g.add_metric([kind], count)
    families.append(g)
    g = GaugeMetricFamily("ccat_failures", "Work items in FAILED", labels=["kind"])
    g.add_metric(["raw_data_package"], snap["package_states"].get("FAILED", {}).get("count", 0))
    g.add_metric(["data_transfer"], snap["transfers"].get("FAILED", {}).get("count", 0))
    g.add_metric(["archive_transfer"], snap["archive_transfers"].get("FAILED", 0))
    g.add_metric(["staging_job"], snap["staging_jobs"].get("FAILED", 0))
    families.append(g)
    return families


#: Every state a buffer can be in, so that ``ccat_buffer_state`` has a fixed set of series
#: per location (1 for the current state, 0 for the others) that alerts can rely on.
BUFFER_STATES = tuple(state.value for state in BufferState)


def _buffer_families(buffers: list[dict[str, Any]]) -> list[GaugeMetricFamily]:
    """Use, state and age of every location's last measurement.  The state is its own
    gauge: as a label of the usage gauge, a change of state would end one series and
    start another."""
    usage = GaugeMetricFamily(
        "ccat_buffer_usage_percent",
        "Disk use of a location at its last measurement",
        labels=["location", "site"],
    )
    state = GaugeMetricFamily(
        "ccat_buffer_state",
        "Buffer state of a location (1 for the current state; unknown when not measured lately)",
        labels=["location", "site", "state"],
    )
    age = GaugeMetricFamily(
        "ccat_buffer_status_age_seconds",
        "Seconds since the location's use was last measured",
        labels=["location", "site"],
    )
    for buf in buffers:
        where = [buf["location"], buf["site"]]
        if buf["disk_usage_percent"] is not None:
            usage.add_metric(where, buf["disk_usage_percent"])
        current = buf["state"] if buf["state"] in BUFFER_STATES else "unknown"
        for name in BUFFER_STATES:
            state.add_metric([*where, name], 1.0 if name == current else 0.0)
        if buf.get("age_seconds") is not None:
            age.add_metric(where, buf["age_seconds"])
    return [usage, state, age]


def _archive_truth_families(snap: dict[str, Any]) -> list[GaugeMetricFamily]:
    """Audit holds (1/0 for every active location, and any held inactive one) and frozen
    packages: both need a person."""
    hold = GaugeMetricFamily(
        "ccat_audit_hold",
        "1 while an audit hold is on the location (no deletion relies on it)",
        labels=["location", "site"],
    )
    held = {h["location"]: h for h in snap["audit_holds"]}
    for buf in snap["buffers"]:
        hold.add_metric([buf["location"], buf["site"]], 1.0 if buf["location"] in held else 0.0)
    active = {buf["location"] for buf in snap["buffers"]}
    for name, h in held.items():
        if name not in active:
            hold.add_metric([name, h["site"]], 1.0)
    frozen = _total(
        "ccat_frozen_packages",
        "Packages frozen because no good copy was left to repair from",
        snap["frozen_packages"],
    )
    return [hold, frozen]


def prometheus_text(session_factory: Any = None) -> bytes:
    """The Prometheus exposition text for one scrape."""
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(session_factory))
    return generate_latest(registry)


# ---------------------------------------------------------------------------------------
# InfluxDB
# ---------------------------------------------------------------------------------------


def _escape_tag(value: str) -> str:
    return (
        str(value).replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=").replace(" ", "\\ ")
    )


def snapshot_to_line_protocol(snap: dict[str, Any], timestamp: int | None = None) -> list[str]:
    """InfluxDB line protocol (precision: seconds) for a snapshot."""
    ts = int(timestamp if timestamp is not None else time.time())
    lines = [
        f"raw_files count={snap['raw_files']['count']}i,bytes={snap['raw_files']['bytes']}i,"
        f"unpackaged={snap['raw_files_unpackaged']}i {ts}"
    ]
    for state, v in snap["package_states"].items():
        lines.append(
            f"raw_data_packages,state={_escape_tag(state)} "
            f"count={v['count']}i,bytes={v['bytes']}i {ts}"
        )
    for status, v in snap["transfers"].items():
        lines.append(
            f"data_transfers,status={_escape_tag(status)} "
            f"count={v['count']}i,bytes={v['bytes']}i {ts}"
        )
    lines.append(f"transfer_rate mb_per_s={float(snap['transfer_rate_mb_per_s'])} {ts}")
    lines.append(
        f"deletions count_24h={snap['deletions_last_day']['count']}i,"
        f"bytes_24h={snap['deletions_last_day']['bytes']}i,failed={snap['deletion_failures']}i {ts}"
    )
    for buf in snap["buffers"]:
        if buf["disk_usage_percent"] is None:
            continue
        lines.append(
            f"buffer_usage,location={_escape_tag(buf['location'])},site={_escape_tag(buf['site'])},"
            f"state={_escape_tag(buf['state'])} percent={float(buf['disk_usage_percent'])},"
            f"used_bytes={int(buf['used_bytes'] or 0)}i {ts}"
        )
    for queue, length in snap["queues"].items():
        lines.append(f"queue_length,queue={_escape_tag(queue)} length={int(length)}i {ts}")
    return lines


class InfluxWriter:
    """Writes line protocol to InfluxDB 2 (``/api/v2/write``), when INFLUXDB_ENABLED."""

    def __init__(
        self,
        url: str | None = None,
        org: str | None = None,
        bucket: str | None = None,
        token: str | None = None,
    ) -> None:
        self.url = (url or str(settings.INFLUXDB_URL)).rstrip("/")
        self.org = org or str(settings.INFLUXDB_ORG)
        self.bucket = bucket or str(settings.INFLUXDB_BUCKET)
        self.token = token if token is not None else str(settings.get("INFLUXDB_TOKEN", "") or "")

    def write(self, lines: list[str]) -> bool:
        """Send the lines; returns False (and logs) on failure, never raises."""
        headers = {"Content-Type": "text/plain; charset=utf-8"}
        if self.token:
            headers["Authorization"] = f"Token {self.token}"
        try:
            resp = httpx.post(
                f"{self.url}/api/v2/write",
                params={"org": self.org, "bucket": self.bucket, "precision": "s"},
                content="\n".join(lines).encode(),
                headers=headers,
                timeout=5.0,
            )
            if resp.status_code >= 300:
                log.warning("influxdb_write_refused", status=resp.status_code, body=resp.text[:200])
                return False
            return True
        except httpx.HTTPError as exc:
            log.warning("influxdb_write_failed", error=str(exc))
            return False


def push_metrics(session: Session) -> bool | None:
    """One InfluxDB push of the current snapshot (None when InfluxDB is disabled)."""
    if not settings.get("INFLUXDB_ENABLED", False):
        return None
    return InfluxWriter().write(snapshot_to_line_protocol(collect_snapshot(session)))
