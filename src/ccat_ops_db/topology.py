"""Topology: the observatory, sites, data locations and routes, declared in a TOML file.

Sites and locations are data, not code: adding a site is an edit of the file followed by
``ccat_data_transfer init``.  Loading is idempotent (rows are matched by name and
updated, never duplicated) and all-or-nothing: the whole file is validated before the DB
is touched, every problem is reported at once, and a location that still holds data is
never removed.

File layout (see ``ccat_data_transfer/topology/default.toml``)::

    [observatory]            name, description
    [[telescopes]]           name, site, description
    [[instruments]]          name, telescope, modules = [...], description
    [[sites]]                name, short_name, description, host, ssh_*, xrootd_url
                             (how the site's machine is reached: topology_sites)
    [[locations]]            name, site, type, storage, path | bucket, priority, ...
    [[routes]]               origin, destination, type, method, relay, ...

Relative disk paths are resolved against the data directory given to the loader.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from ccat_ops_db import models as m
from ccat_ops_db.errors import TopologyError
from ccat_ops_db.topology_sites import NAME_RE, check_route_reach, check_sites, reach_values

_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "pb": 10**15,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "pib": 2**50,
}

LOCATION_KEYS = {
    "name",
    "site",
    "type",
    "storage",
    "path",
    "host",
    "endpoint_url",
    "bucket",
    "prefix",
    "region",
    "library",
    "priority",
    "active",
    "description",
    "instrument",
    "capacity",
    "capacity_bytes",
    "retention_period_minutes",
    "warning_threshold_percent",
    "critical_threshold_percent",
    "emergency_threshold_percent",
    "max_parallel_transfers",
}
ROUTE_KEYS = {
    "name",
    "origin",
    "destination",
    "type",
    "method",
    "relay",
    "origin_location",
    "destination_location",
    "active",
}
# Copies in these states still hold bytes: their location must not disappear.
HOLDING_STATES = (
    m.PhysicalCopyStatus.PRESENT,
    m.PhysicalCopyStatus.STAGED,
    m.PhysicalCopyStatus.DELETION_POSSIBLE,
    m.PhysicalCopyStatus.DELETION_SCHEDULED,
    m.PhysicalCopyStatus.DELETION_IN_PROGRESS,
    m.PhysicalCopyStatus.DELETION_FAILED,
)


@dataclass
class Topology:
    """A validated topology, ready to be applied."""

    observatory: dict[str, Any]
    telescopes: list[dict[str, Any]] = field(default_factory=list)
    instruments: list[dict[str, Any]] = field(default_factory=list)
    sites: list[dict[str, Any]] = field(default_factory=list)
    locations: list[dict[str, Any]] = field(default_factory=list)
    routes: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class LoadReport:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    deactivated: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{len(self.created)} created, {len(self.updated)} updated, "
            f"{len(self.deactivated)} deactivated"
        )


def parse_size(value: Any) -> int:
    """Bytes from an int or a string such as '500 GB' or '2TiB'."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"negative size: {value}")
        return value
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
        if match:
            unit = (match.group(2) or "b").lower()
            if unit in _UNITS:
                return int(float(match.group(1)) * _UNITS[unit])
    raise ValueError(f"not a size: {value!r} (use bytes or e.g. '500 GB', '2 TiB')")


def _enum_value(enum_cls: type, raw: Any, what: str, problems: list[str]) -> Any:
    if not isinstance(raw, str):
        problems.append(f"{what}: expected one of {_choices(enum_cls)}, got {raw!r}")
        return None
    key = raw.strip()
    for member in enum_cls:
        if key.lower() in (member.value.lower(), member.name.lower()):
            return member
    problems.append(f"{what}: unknown value {raw!r}; expected one of {_choices(enum_cls)}")
    return None


def _choices(enum_cls: type) -> str:
    return ", ".join(member.value for member in enum_cls)


def _require(entry: dict[str, Any], keys: tuple[str, ...], what: str, problems: list[str]) -> bool:
    ok = True
    for key in keys:
        if entry.get(key) in (None, ""):
            problems.append(f"{what}: missing required field '{key}'")
            ok = False
    return ok


def _check_fields(
    entry: dict[str, Any],
    allowed: set[str],
    required: tuple[str, ...],
    what: str,
    problems: list[str],
) -> bool:
    """Report the fields not ``allowed`` and the ``required`` ones missing; True when
    every required field is there."""
    for key in entry:
        if key not in allowed:
            problems.append(f"{what}: unknown field '{key}'")
    return _require(entry, required, what, problems)


def _check_unique(entries: list[dict[str, Any]], key: str, kind: str, problems: list[str]) -> None:
    seen: set[Any] = set()
    for entry in entries:
        value = entry.get(key)
        if value is None:
            continue
        if value in seen:
            problems.append(f"duplicate {kind} {key} {value!r}")
        seen.add(value)


def _table_list(raw: dict[str, Any], key: str, problems: list[str]) -> list[dict[str, Any]]:
    value = raw.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        problems.append(f"'{key}' must be an array of tables ([[{key}]])")
        return []
    return value


def parse_topology(raw: dict[str, Any], data_dir: Path, source: str = "topology") -> Topology:
    """Validate a topology read from TOML.  Raises TopologyError listing every problem."""
    problems: list[str] = []
    known_top = {"observatory", "telescopes", "instruments", "sites", "locations", "routes"}
    for key in raw:
        if key not in known_top:
            problems.append(f"unknown section '{key}'")

    observatory = raw.get("observatory")
    if not isinstance(observatory, dict) or not observatory.get("name"):
        problems.append("missing [observatory] section with a 'name'")
        observatory = {"name": ""}

    telescopes = _table_list(raw, "telescopes", problems)
    instruments = _table_list(raw, "instruments", problems)
    sites = _table_list(raw, "sites", problems)
    locations = _table_list(raw, "locations", problems)
    routes = _table_list(raw, "routes", problems)

    if not sites:
        problems.append("no [[sites]] declared")

    check_sites(sites, problems)
    _check_unique(sites, "name", "site", problems)
    _check_unique(sites, "short_name", "site", problems)
    site_names = {s.get("name") for s in sites}

    for i, tel in enumerate(telescopes):
        what = f"telescope #{i + 1} ({tel.get('name', '?')})"
        _require(tel, ("name",), what, problems)
        if tel.get("site") and tel["site"] not in site_names:
            problems.append(f"{what}: unknown site {tel['site']!r}")
    _check_unique(telescopes, "name", "telescope", problems)
    telescope_names = {t.get("name") for t in telescopes}

    for i, inst in enumerate(instruments):
        what = f"instrument #{i + 1} ({inst.get('name', '?')})"
        if _require(inst, ("name", "telescope"), what, problems):
            if inst["telescope"] not in telescope_names:
                problems.append(f"{what}: unknown telescope {inst['telescope']!r}")
        modules = inst.get("modules", [])
        if not isinstance(modules, list) or not all(isinstance(x, str) for x in modules):
            problems.append(f"{what}: 'modules' must be a list of names")
        elif len(set(modules)) != len(modules):
            problems.append(f"{what}: duplicate module names")
    _check_unique(instruments, "name", "instrument", problems)
    instrument_names = {i.get("name") for i in instruments}

    parsed_locations: list[dict[str, Any]] = []
    for i, loc in enumerate(locations):
        what = f"location #{i + 1} ({loc.get('name', '?')})"
        if not _check_fields(
            loc, LOCATION_KEYS, ("name", "site", "type", "storage"), what, problems
        ):
            continue
        if not NAME_RE.match(str(loc["name"])):
            problems.append(f"{what}: name must be lower case letters, digits and _")
        if loc["site"] not in site_names:
            problems.append(f"{what}: unknown site {loc['site']!r}")
        ltype = _enum_value(m.LocationType, loc["type"], f"{what}: type", problems)
        stype = _enum_value(m.StorageType, loc["storage"], f"{what}: storage", problems)
        entry: dict[str, Any] = {
            "name": loc["name"],
            "site": loc["site"],
            "location_type": ltype,
            "storage_type": stype,
            "priority": loc.get("priority", 0),
            "active": loc.get("active", True),
            "description": loc.get("description"),
            "instrument": loc.get("instrument"),
            "host": loc.get("host"),
            "path": None,
            "endpoint_url": loc.get("endpoint_url"),
            "bucket": loc.get("bucket"),
            "prefix": loc.get("prefix"),
            "region": loc.get("region"),
            "library": loc.get("library"),
            "capacity_bytes": None,
            "retention_period_minutes": loc.get("retention_period_minutes"),
            "warning_threshold_percent": loc.get("warning_threshold_percent"),
            "critical_threshold_percent": loc.get("critical_threshold_percent"),
            "emergency_threshold_percent": loc.get("emergency_threshold_percent"),
            "max_parallel_transfers": loc.get("max_parallel_transfers"),
        }
        if not isinstance(entry["priority"], int) or isinstance(entry["priority"], bool):
            problems.append(f"{what}: priority must be an integer")
        if not isinstance(entry["active"], bool):
            problems.append(f"{what}: active must be true or false")
        capacity = loc.get("capacity", loc.get("capacity_bytes"))
        if capacity is not None:
            try:
                entry["capacity_bytes"] = parse_size(capacity)
            except ValueError as exc:
                problems.append(f"{what}: capacity: {exc}")
        thresholds = []
        for key in (
            "warning_threshold_percent",
            "critical_threshold_percent",
            "emergency_threshold_percent",
        ):
            value = entry[key]
            if value is not None:
                if not isinstance(value, int | float) or not 0 < value <= 100:
                    problems.append(f"{what}: {key} must be a number in (0, 100]")
                else:
                    thresholds.append(value)
        if thresholds != sorted(thresholds):
            problems.append(f"{what}: thresholds must rise: warning < critical < emergency")
        if entry["instrument"] is not None and entry["instrument"] not in instrument_names:
            problems.append(f"{what}: unknown instrument {entry['instrument']!r}")
        if stype in (m.StorageType.DISK, m.StorageType.TAPE):
            if not loc.get("path"):
                problems.append(f"{what}: a {stype.value} location needs a 'path'")
            else:
                path = Path(str(loc["path"])).expanduser()
                if not path.is_absolute():
                    path = data_dir / path
                entry["path"] = str(path)
        elif stype == m.StorageType.S3:
            if not loc.get("bucket"):
                problems.append(f"{what}: an s3 location needs a 'bucket'")
            for secret in ("access_key", "secret_key", "aws_secret_access_key"):
                if secret in loc:
                    problems.append(f"{what}: credentials never go in the topology file")
        parsed_locations.append(entry)
    _check_unique(locations, "name", "location", problems)
    location_by_name = {loc["name"]: loc for loc in parsed_locations}

    parsed_routes: list[dict[str, Any]] = []
    site_by_name = {str(site.get("name")): site for site in sites}
    for i, route in enumerate(routes):
        what = f"route #{i + 1} ({route.get('origin', '?')} -> {route.get('destination', '?')})"
        if not _check_fields(
            route, ROUTE_KEYS, ("origin", "destination", "type", "method"), what, problems
        ):
            continue
        for key in ("origin", "destination", "relay"):
            if route.get(key) is not None and route[key] not in site_names:
                problems.append(f"{what}: unknown {key} site {route[key]!r}")
        if route["origin"] == route["destination"]:
            problems.append(f"{what}: origin and destination are the same site")
        rtype = _enum_value(m.RouteType, route["type"], f"{what}: type", problems)
        method = _enum_value(m.TransferMethod, route["method"], f"{what}: method", problems)
        if rtype == m.RouteType.RELAY and not route.get("relay"):
            problems.append(f"{what}: a relay route needs a 'relay' site")
        for key in ("origin_location", "destination_location"):
            if route.get(key) is not None and route[key] not in location_by_name:
                problems.append(f"{what}: unknown {key} {route[key]!r}")
        if rtype == m.RouteType.CUSTOM and not (
            route.get("origin_location") or route.get("destination_location")
        ):
            problems.append(f"{what}: a custom route names origin_location or destination_location")
        check_route_reach(
            {"destination": route["destination"], "transfer_method": method},
            site_by_name,
            what,
            problems,
        )
        parsed_routes.append(
            {
                "name": route.get("name") or f"{route['origin']}_to_{route['destination']}",
                "origin": route["origin"],
                "destination": route["destination"],
                "route_type": rtype,
                "transfer_method": method,
                "relay": route.get("relay"),
                "origin_location": route.get("origin_location"),
                "destination_location": route.get("destination_location"),
                "active": route.get("active", True),
            }
        )
    _check_unique(parsed_routes, "name", "route", problems)
    seen_routes: set[tuple[Any, ...]] = set()
    for route in parsed_routes:
        key = (route["origin"], route["destination"], route["route_type"])
        if key in seen_routes:
            problems.append(
                f"duplicate route {route['origin']} -> {route['destination']} "
                f"of type {route['route_type'].value if route['route_type'] else '?'}"
            )
        seen_routes.add(key)

    if problems:
        raise TopologyError(source, problems)
    return Topology(
        observatory=observatory,
        telescopes=telescopes,
        instruments=instruments,
        sites=sites,
        locations=parsed_locations,
        routes=parsed_routes,
    )


def read_topology_file(path: Path, data_dir: Path) -> Topology:
    """Read and validate a topology file."""
    path = Path(path)
    if not path.is_file():
        raise TopologyError(str(path), ["no such file"])
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise TopologyError(str(path), [f"not valid TOML: {exc}"]) from None
    except UnicodeDecodeError:
        raise TopologyError(str(path), ["not a UTF-8 text file"]) from None
    return parse_topology(raw, data_dir, source=str(path))


def _upsert(
    session: Session,
    model: type,
    lookup: dict[str, Any],
    values: dict[str, Any],
    report: LoadReport,
) -> Any:
    row = session.scalars(select(model).filter_by(**lookup)).one_or_none()
    label = f"{model.__tablename__} {'/'.join(str(v) for v in lookup.values())}"
    if row is None:
        row = model(**lookup, **values)
        session.add(row)
        session.flush()
        report.created.append(label)
        return row
    changed = False
    for key, value in values.items():
        if getattr(row, key) != value:
            setattr(row, key, value)
            changed = True
    if changed:
        session.flush()
        report.updated.append(label)
    return row


_LOCATION_CLASSES = {
    m.StorageType.DISK: m.DiskDataLocation,
    m.StorageType.S3: m.S3DataLocation,
    m.StorageType.TAPE: m.TapeDataLocation,
}


def apply_topology(session: Session, topo: Topology) -> LoadReport:
    """Bring the DB in line with ``topo``.  Refuses (TopologyError) before any change if a
    location that would disappear still holds data.  The caller commits."""
    report = LoadReport()
    wanted_locations = {loc["name"] for loc in topo.locations}
    existing = session.scalars(select(m.DataLocation)).all()
    refusals = []
    to_deactivate = []
    for loc in existing:
        if loc.name in wanted_locations or not loc.active:
            continue
        holding = session.scalar(
            select(func.count(m.PhysicalCopy.id)).where(
                m.PhysicalCopy.data_location_id == loc.id,
                m.PhysicalCopy.status.in_(HOLDING_STATES),
            )
        )
        if holding:
            refusals.append(
                f"location {loc.name!r} is not in the file but still holds {holding} "
                "copies; move or delete its data first, or keep it with active = false"
            )
        else:
            to_deactivate.append(loc)
    if refusals:
        raise TopologyError("topology", refusals)

    obs = _upsert(
        session,
        m.Observatory,
        {"name": topo.observatory["name"]},
        {"description": topo.observatory.get("description")},
        report,
    )
    sites: dict[str, m.Site] = {}
    for site in topo.sites:
        sites[site["name"]] = _upsert(
            session,
            m.Site,
            {"name": site["name"]},
            {
                "short_name": site["short_name"],
                "description": site.get("description"),
                "active": site.get("active", True),
                **reach_values(site),
            },
            report,
        )
    telescopes: dict[str, m.Telescope] = {}
    for tel in topo.telescopes:
        telescopes[tel["name"]] = _upsert(
            session,
            m.Telescope,
            {"name": tel["name"]},
            {
                "observatory_id": obs.id,
                "site_id": sites[tel["site"]].id if tel.get("site") else None,
                "description": tel.get("description"),
            },
            report,
        )
    instruments: dict[str, m.Instrument] = {}
    for inst in topo.instruments:
        row = _upsert(
            session,
            m.Instrument,
            {"name": inst["name"]},
            {
                "telescope_id": telescopes[inst["telescope"]].id,
                "description": inst.get("description"),
            },
            report,
        )
        instruments[inst["name"]] = row
        for module in inst.get("modules", []):
            _upsert(
                session,
                m.InstrumentModule,
                {"instrument_id": row.id, "name": module},
                {},
                report,
            )

    locations: dict[str, m.DataLocation] = {}
    for loc in topo.locations:
        values = {k: v for k, v in loc.items() if k not in ("name", "site", "instrument")}
        values["site_id"] = sites[loc["site"]].id
        values["instrument_id"] = instruments[loc["instrument"]].id if loc["instrument"] else None
        row = session.scalars(select(m.DataLocation).filter_by(name=loc["name"])).one_or_none()
        if row is not None and row.storage_type != loc["storage_type"]:
            # The storage kind is the polymorphic identity: change it with a plain UPDATE
            # and reload the row as its new class.
            session.execute(
                update(m.DataLocation.__table__)
                .where(m.DataLocation.__table__.c.id == row.id)
                .values(storage_type=loc["storage_type"].name)
            )
            session.expunge(row)
        cls = _LOCATION_CLASSES[loc["storage_type"]]
        locations[loc["name"]] = _upsert(session, cls, {"name": loc["name"]}, values, report)

    wanted_routes = set()
    for route in topo.routes:
        wanted_routes.add(route["name"])
        _upsert(
            session,
            m.DataTransferRoute,
            {"name": route["name"]},
            {
                "origin_site_id": sites[route["origin"]].id,
                "destination_site_id": sites[route["destination"]].id,
                "route_type": route["route_type"],
                "transfer_method": route["transfer_method"],
                "relay_site_id": sites[route["relay"]].id if route["relay"] else None,
                "origin_location_id": locations[route["origin_location"]].id
                if route["origin_location"]
                else None,
                "destination_location_id": locations[route["destination_location"]].id
                if route["destination_location"]
                else None,
                "active": route["active"],
            },
            report,
        )

    for loc in to_deactivate:
        loc.active = False
        report.deactivated.append(f"data_location {loc.name}")
    for route in session.scalars(select(m.DataTransferRoute)).all():
        if route.name not in wanted_routes and route.active:
            route.active = False
            report.deactivated.append(f"data_transfer_route {route.name}")
    wanted_sites = {s["name"] for s in topo.sites}
    for site in session.scalars(select(m.Site)).all():
        if site.name not in wanted_sites and site.active:
            site.active = False
            report.deactivated.append(f"site {site.name}")
    session.flush()
    return report


def load_topology(session: Session, path: Path, data_dir: Path) -> LoadReport:
    """Validate ``path`` and apply it in the caller's transaction."""
    topo = read_topology_file(path, data_dir)
    return apply_topology(session, topo)
