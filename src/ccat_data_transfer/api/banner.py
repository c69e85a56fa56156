"""The dashboard's banner: the one rule for what needs a person, stated once.

:func:`banner_items` turns the metrics snapshot (and the next-package verdicts of the
LTA-site buffers) into a list of items, each ``{"level", "kind", "text", "link"}``; the
HTML overview and its JSON twin show that list, and "All clear" only when it is empty.
What counts: a location whose buffer status is unknown or stale, files with a checksum
error and the groups they block, buffers at critical or emergency, a buffer that cannot
take the next package, audit holds, frozen packages, stalled work (started, its heartbeat
stopped, not reset by recovery) and failed work (packages, transfers, archive moves,
staging jobs, copy deletions).  Alerts (the webhook) are sent for buffer emergencies,
audit holds and frozen packages, each of which is an item here as long as it lasts.

Room in the house: API layer (read side).  Pure: no DB access, no imports of managers.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

#: Levels, most urgent first (the banner is sorted by them).
LEVELS = ("emergency", "critical", "warning")


def location_anchor(name: str) -> str:
    """The id of a location's row on the overview page."""
    return f"loc-{name}"


def _loc_link(name: str) -> str:
    return f"/dashboard/#{quote(location_anchor(name))}"


def _ago(seconds: float) -> str:
    if seconds < 90:
        return f"{int(seconds)} s"
    if seconds < 90 * 60:
        return f"{int(seconds // 60)} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} d"


def _item(level: str, kind: str, text: str, link: str) -> dict[str, str]:
    return {"level": level, "kind": kind, "text": text, "link": link}


def _buffer_items(snap: dict[str, Any]) -> list[dict[str, str]]:
    out = []
    for buf in sorted(snap["buffers"], key=lambda b: b["location"]):
        name = buf["location"]
        if buf["stale"] or buf["state"] == "unknown":
            if buf["age_seconds"] is None:
                text = (
                    f"{name}: buffer status UNKNOWN (never measured; is a buffer manager running?)"
                )
                out.append(_item("critical", "unknown_status", text, _loc_link(name)))
            else:
                text = (
                    f"{name}: buffer status UNKNOWN, stale: last measured "
                    f"{_ago(buf['age_seconds'])} ago (is a buffer manager running?)"
                )
                out.append(_item("critical", "stale_status", text, _loc_link(name)))
        elif buf["state"] in ("critical", "emergency"):
            text = f"{name} is {buf['state'].upper()} at {buf['disk_usage_percent']:.1f} % full"
            out.append(_item(buf["state"], "buffer_full", text, _loc_link(name)))
    return out


def _count_items(snap: dict[str, Any]) -> list[dict[str, str]]:
    """Items for the counted conditions: (count, level, kind, text, link) each."""
    pkgs = snap["package_states"]
    transfers = snap["transfers"]
    rows = [
        (
            snap["raw_files_checksum_errors"],
            "critical",
            "checksum_error",
            "{n} filed file(s) with a checksum error (checksum mismatch at filing)",
            "/dashboard/#tile-files",
        ),
        (
            snap["blocked_groups"],
            "critical",
            "blocked_group",
            "{n} group(s) blocked from packaging by a file's checksum error",
            "/dashboard/#tile-files",
        ),
        (
            snap["frozen_packages"],
            "critical",
            "frozen_package",
            "{n} package(s) FROZEN: no good copy left (see `archive-events`)",
            "/dashboard/packages",
        ),
        (
            pkgs.get("FAILED", {}).get("count", 0),
            "critical",
            "failed_package",
            "{n} package(s) FAILED",
            "/dashboard/packages?state=FAILED",
        ),
        (
            transfers.get("FAILED", {}).get("count", 0),
            "critical",
            "failed_transfer",
            "{n} transfer(s) FAILED",
            "/dashboard/#tile-transfers",
        ),
        (
            snap["archive_transfers"].get("FAILED", 0),
            "critical",
            "failed_archive_transfer",
            "{n} archive move(s) FAILED",
            "/dashboard/#tile-transfers",
        ),
        (
            snap["deletion_failures"],
            "warning",
            "deletion_failed",
            "{n} copy deletion(s) FAILED",
            "/dashboard/deletions",
        ),
        (
            snap["staging_jobs"].get("FAILED", 0),
            "warning",
            "failed_staging_job",
            "{n} staging job(s) FAILED",
            "/dashboard/staging",
        ),
    ]
    items = [_item(level, kind, text.format(n=n), link) for n, level, kind, text, link in rows if n]
    return items + _stalled_items(snap.get("stalled_work", {}))


#: Where the rows of each kind of stalled work are shown, and what they are called.
_STALLED = {
    "raw_data_package": ("raw data package build(s)", "/dashboard/packages?state=IN_PROGRESS"),
    "data_transfer_package": ("transfer package build(s)", "/dashboard/#tile-transfers"),
    "transfer": ("transfer(s)", "/dashboard/#tile-transfers"),
    "unpack": ("unpack(s)", "/dashboard/#tile-transfers"),
    "archive_transfer": ("archive move(s)", "/dashboard/#tile-transfers"),
    "staging_job": ("staging job(s)", "/dashboard/staging"),
    "deletion": ("copy deletion(s)", "/dashboard/deletions"),
}


def _stalled_items(stalled: dict[str, int]) -> list[dict[str, str]]:
    """Started work whose heartbeat stopped and that recovery has not reset: its worker
    is gone and nothing is bringing it back."""
    out = []
    for kind, (words, link) in _STALLED.items():
        n = stalled.get(kind, 0)
        if n:
            text = (
                f"{n} {words} STALLED: heartbeat stopped and not reset "
                "(is the `recovery` service running?)"
            )
            out.append(_item("critical", f"stalled_{kind}", text, link))
    return out


def banner_items(
    snap: dict[str, Any], next_package: dict[str, dict[str, Any]]
) -> list[dict[str, str]]:
    """Everything that needs a person, most urgent first; empty means "All clear".

    ``snap`` is :func:`ccat_data_transfer.operations.metrics.collect_snapshot`'s result and
    ``next_package`` :func:`ccat_data_transfer.core.buffer_room.next_package_verdicts`'.
    """
    items = [
        _item(
            "critical",
            "audit_hold",
            f"{h['location']} is ON HOLD since {h['since']}: {h['reason']} "
            "(`audit hold clear` once mended)",
            _loc_link(h["location"]),
        )
        for h in snap["audit_holds"]
    ]
    items += _buffer_items(snap)
    items += [
        _item("warning", "cannot_take_next_package", verdict["reason"], _loc_link(name))
        for name, verdict in sorted(next_package.items())
        if not verdict["can_take"]
    ]
    items += _count_items(snap)
    return sorted(items, key=lambda i: LEVELS.index(i["level"]))
