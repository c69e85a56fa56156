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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from ccat_ops_db import models as m
from ccat_ops_db.errors import TopologyError
from ccat_ops_db.names import temporary_component
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


def _refuse_temporary(path: str, what: str, problems: list[str]) -> None:
    """A location root under a name the storage treats as temporary would be hidden from
    listings and swept away by the janitor of an enclosing location: refused."""
    component = temporary_component(path)
    if component is not None:
        problems.append(
            f"{what} {path!r} holds {component!r}, a temporary name (a hidden name holding "
            "'.tmp-') that the storage hides and cleans up"
        )


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

    _check_telescopes(telescopes, site_names, problems)
    telescope_names = {t.get("name") for t in telescopes}

    _check_instruments(instruments, telescope_names, problems)
    instrument_names = {i.get("name") for i in instruments}

    parsed_locations: list[dict[str, Any]] = []
    for i, loc in enumerate(locations):
        entry = _parse_location(i, loc, site_names, instrument_names, data_dir, problems)
        if entry is not None:
            parsed_locations.append(entry)
    _check_unique(locations, "name", "location", problems)
    location_by_name = {loc["name"]: loc for loc in parsed_locations}

    parsed_routes: list[dict[str, Any]] = []
    site_by_name = {str(site.get("name")): site for site in sites}
    for i, route in enumerate(routes):
        parsed = _parse_route(i, route, site_names, site_by_name, location_by_name, problems)
        if parsed is not None:
            parsed_routes.append(parsed)
    _check_unique(parsed_routes, "name", "route", problems)
    _check_duplicate_routes(parsed_routes, problems)

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


def _check_telescopes(
    telescopes: list[dict[str, Any]], site_names: set[Any], problems: list[str]
) -> None:
    """Each telescope has a unique name and, if it names a site, a declared one."""
    for i, tel in enumerate(telescopes):
        what = f"telescope #{i + 1} ({tel.get('name', '?')})"
        _require(tel, ("name",), what, problems)
        if tel.get("site") and tel["site"] not in site_names:
            problems.append(f"{what}: unknown site {tel['site']!r}")
    _check_unique(telescopes, "name", "telescope", problems)


def _check_instruments(
    instruments: list[dict[str, Any]], telescope_names: set[Any], problems: list[str]
) -> None:
    """Each instrument has a unique name, a declared telescope and distinct module names."""
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


def _parse_location(
    i: int,
    loc: dict[str, Any],
    site_names: set[Any],
    instrument_names: set[Any],
    data_dir: Path,
    problems: list[str],
) -> dict[str, Any] | None:
    """Parse location #``i + 1`` into the row values; None if its fields are unusable."""
    what = f"location #{i + 1} ({loc.get('name', '?')})"
    if not _check_fields(loc, LOCATION_KEYS, ("name", "site", "type", "storage"), what, problems):
        return None
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
    _check_location_limits(entry, loc, what, problems)
    if entry["instrument"] is not None and entry["instrument"] not in instrument_names:
        problems.append(f"{what}: unknown instrument {entry['instrument']!r}")
    _check_location_storage(entry, loc, stype, what, data_dir, problems)
    return entry


def _check_location_limits(
    entry: dict[str, Any], loc: dict[str, Any], what: str, problems: list[str]
) -> None:
    """Priority, active flag, capacity and the rising fill thresholds of a location."""
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


def _check_location_storage(
    entry: dict[str, Any],
    loc: dict[str, Any],
    stype: Any,
    what: str,
    data_dir: Path,
    problems: list[str],
) -> None:
    """A disk or tape location has a path (made absolute); an s3 one a bucket, no secrets."""
    if stype in (m.StorageType.DISK, m.StorageType.TAPE):
        if not loc.get("path"):
            problems.append(f"{what}: a {stype.value} location needs a 'path'")
        else:
            path = Path(str(loc["path"])).expanduser()
            if not path.is_absolute():
                path = data_dir / path
            entry["path"] = str(path)
            _refuse_temporary(path.as_posix(), f"{what}: path", problems)
    elif stype == m.StorageType.S3:
        if not loc.get("bucket"):
            problems.append(f"{what}: an s3 location needs a 'bucket'")
        _refuse_temporary(str(loc.get("prefix") or ""), f"{what}: prefix", problems)
        for secret in ("access_key", "secret_key", "aws_secret_access_key"):
            if secret in loc:
                problems.append(f"{what}: credentials never go in the topology file")


def _parse_route(
    i: int,
    route: dict[str, Any],
    site_names: set[Any],
    site_by_name: dict[str, dict[str, Any]],
    location_by_name: dict[str, dict[str, Any]],
    problems: list[str],
) -> dict[str, Any] | None:
    """Parse route #``i + 1`` into the row values; None if its fields are unusable."""
    what = f"route #{i + 1} ({route.get('origin', '?')} -> {route.get('destination', '?')})"
    if not _check_fields(
        route, ROUTE_KEYS, ("origin", "destination", "type", "method"), what, problems
    ):
        return None
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
    return {
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


def _check_duplicate_routes(parsed_routes: list[dict[str, Any]], problems: list[str]) -> None:
    """At most one route of each type from an origin to a destination."""
    seen_routes: set[tuple[Any, ...]] = set()
    for route in parsed_routes:
        key = (route["origin"], route["destination"], route["route_type"])
        if key in seen_routes:
            problems.append(
                f"duplicate route {route['origin']} -> {route['destination']} "
                f"of type {route['route_type'].value if route['route_type'] else '?'}"
            )
        seen_routes.add(key)


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


def _upsert_by_name(
    session: Session,
    model: type,
    entries: list[dict[str, Any]],
    values: Callable[[dict[str, Any]], dict[str, Any]],
    report: LoadReport,
) -> dict[str, Any]:
    """Upsert one ``model`` row per entry, looked up by its name; returns the rows by name."""
    return {
        entry["name"]: _upsert(session, model, {"name": entry["name"]}, values(entry), report)
        for entry in entries
    }


_LOCATION_CLASSES = {
    m.StorageType.DISK: m.DiskDataLocation,
    m.StorageType.S3: m.S3DataLocation,
    m.StorageType.TAPE: m.TapeDataLocation,
}


def apply_topology(session: Session, topo: Topology) -> LoadReport:
    """Bring the DB in line with ``topo``.  Refuses (TopologyError) before any change if a
    location that would disappear still holds data.  The caller commits."""
    report = LoadReport()
    to_deactivate = _locations_to_deactivate(session, topo)
    sites, instruments = _apply_sites_and_instruments(session, topo, report)
    rows = _Rows(sites=sites, instruments=instruments)
    rows.locations = _apply_locations(session, topo, rows, report)
    wanted_routes = _apply_routes(session, topo, rows, report)
    _deactivate_missing(session, topo, to_deactivate, wanted_routes, report)
    session.flush()
    return report


def _locations_to_deactivate(session: Session, topo: Topology) -> list[m.DataLocation]:
    """Check phase: the active locations missing from ``topo``; TopologyError if any of
    them still holds copies."""
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
    return to_deactivate


def _apply_sites_and_instruments(
    session: Session, topo: Topology, report: LoadReport
) -> tuple[dict[str, m.Site], dict[str, m.Instrument]]:
    """Apply phase: the observatory, sites, telescopes, instruments and their modules."""
    obs = _upsert(
        session,
        m.Observatory,
        {"name": topo.observatory["name"]},
        {"description": topo.observatory.get("description")},
        report,
    )
    sites: dict[str, m.Site] = _upsert_by_name(
        session,
        m.Site,
        topo.sites,
        lambda site: {
            "short_name": site["short_name"],
            "description": site.get("description"),
            "active": site.get("active", True),
            **reach_values(site),
        },
        report,
    )
    telescopes: dict[str, m.Telescope] = _upsert_by_name(
        session,
        m.Telescope,
        topo.telescopes,
        lambda tel: {
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
    return sites, instruments


@dataclass
class _Rows:
    """The rows applied so far, by name: what the next rows refer to."""

    sites: dict[str, m.Site]
    instruments: dict[str, m.Instrument]
    locations: dict[str, m.DataLocation] = field(default_factory=dict)


def _apply_locations(
    session: Session, topo: Topology, rows: _Rows, report: LoadReport
) -> dict[str, m.DataLocation]:
    """Apply phase: the data locations (a changed storage kind switches the row's class)."""
    sites, instruments = rows.sites, rows.instruments
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
    return locations


def _apply_routes(session: Session, topo: Topology, rows: _Rows, report: LoadReport) -> set[str]:
    """Apply phase: the transfer routes; returns the names of the routes in ``topo``."""
    sites, locations = rows.sites, rows.locations
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
    return wanted_routes


def _deactivate_missing(
    session: Session,
    topo: Topology,
    to_deactivate: list[m.DataLocation],
    wanted_routes: set[str],
    report: LoadReport,
) -> None:
    """Deactivate phase: locations, routes and sites no longer in the topology."""
    for loc in to_deactivate:
        loc.active = False
        report.deactivated.append(f"data_location {loc.name}")
    _deactivate_unlisted(session, m.DataTransferRoute, wanted_routes, report)
    _deactivate_unlisted(session, m.Site, {s["name"] for s in topo.sites}, report)


def _deactivate_unlisted(
    session: Session, model: type, wanted: set[str], report: LoadReport
) -> None:
    """Deactivate every active ``model`` row whose name is not in ``wanted``."""
    for row in session.scalars(select(model)).all():
        if row.name not in wanted and row.active:
            row.active = False
            report.deactivated.append(f"{model.__tablename__} {row.name}")


def load_topology(session: Session, path: Path, data_dir: Path) -> LoadReport:
    """Validate ``path`` and apply it in the caller's transaction."""
    topo = read_topology_file(path, data_dir)
    return apply_topology(session, topo)
