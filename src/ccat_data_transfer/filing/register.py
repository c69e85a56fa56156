"""Stage 0, filing: instruments register the raw files they wrote at a SOURCE location.

``file_raw_data_files(session, location_name, entries)`` is the one implementation; the
REST API (``POST /api/v1/files``) and the CLI (``ccat_data_transfer file``) call it.

What a filing must satisfy (anything else is refused, and a batch is all or nothing):

* the location exists, is an active SOURCE location, and (if it is bound to an
  instrument) the module belongs to that instrument;
* a caller scoped to an instrument (an API token with a scope) files only into SOURCE
  locations bound to that instrument (else 403);
* the path is relative, without ``..``, NUL or control characters, and outside the
  reserved ``raw_data_packages/`` tree;
* the file exists at the location and has the size given;
* the checksum is a SHA-256 hex digest (``checksum_algorithm`` "sha256"); the bytes are
  verified later, in the one read pass that packages them (stage 1);
* re-filing a file already filed with the same checksum, size, obs unit and module is a
  no-op; anything else under the same path is a conflict;
* a new file may not be added to an ExecutedObsUnit that is already finished.

Unknown ObsUnits and ExecutedObsUnits are created on first use.  Each new file gets a
``RawDataFilePhysicalCopy`` PRESENT at the SOURCE location.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic import ValidationError as PydanticValidationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, contains_eager

from ccat_data_transfer.core.config import settings
from ccat_data_transfer.core.errors import NotFoundError, ValidationError
from ccat_data_transfer.core.fileio import temporary_component
from ccat_data_transfer.core.logs import get_logger
from ccat_data_transfer.core.shared_rows import present_copy
from ccat_data_transfer.core.storage import (
    Storage,
    StorageError,
    normalize_path,
    storage_for_location,
)
from ccat_ops_db import models as m

log = get_logger(__name__)

__all__ = [
    "FiledFile",
    "FilingConflictError",
    "FilingEntry",
    "FilingError",
    "FilingResult",
    "FilingScopeError",
    "RESERVED_PREFIX",
    "file_raw_data_files",
    "finish_executed_obs_unit",
    "parse_instrument_module",
]

#: Packages are written under this folder of a SOURCE location; nobody may file there.
RESERVED_PREFIX = "raw_data_packages/"

_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+@=-]{0,255}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: INSTRUMENT/MODULE, neither part empty nor holding '/' or control characters.
#: Relative, '/'-separated, no control characters, not only '.' parts (empty once
#: normalised), no '..' part, not under the packages' reserved folder (the validator
#: checks the rest, e.g. temporary names).
_PATH_PATTERN = (
    r"^(?!(?:\.?/)*\.?$)(?!(?:.*/)?\.\.(?:/|$))(?!raw_data_packages(?:/|$))"
    r"[^/\\\x00-\x1f\x7f][^\\\x00-\x1f\x7f]*$"
)
_MODULE_PATTERN = r"^[^/\x00-\x1f\x7f]+/[^/\x00-\x1f\x7f]+$"
_MAX_JSON_INT = 2**53 - 1
_MAX_PATH = 4096
_MAX_METADATA_BYTES = 65536
_QUERY_CHUNK = 500


class FilingError(ValidationError):
    """A filing was refused; nothing was written.

    ``problems`` lists ``{"index", "relative_path", "reason"}`` per refused entry;
    ``status_code`` is the HTTP status the API answers with (400, 404 or 409).
    """

    status_code = 400

    def __init__(self, message: str, problems: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []

    def as_dict(self) -> dict[str, Any]:
        return {"reason": str(self), "problems": self.problems}


class FilingScopeError(FilingError):
    """The caller is scoped to another instrument than the location's."""

    status_code = 403


class FilingConflictError(FilingError):
    """The batch conflicts with files already filed (different checksum, finished unit)."""

    status_code = 409


class FilingEntry(BaseModel):
    """One file to register.  ``instrument_module`` is ``"INSTRUMENT/MODULE"``.

    The patterns are published in the JSON schema (the API's OpenAPI document); the
    validators below enforce them with a reason a person can act on."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)

    relative_path: str = Field(
        min_length=1, max_length=_MAX_PATH, json_schema_extra={"pattern": _PATH_PATTERN}
    )
    # 2**53 - 1: the largest integer every JSON client reads exactly (8 PiB).
    size: int = Field(ge=0, le=_MAX_JSON_INT)
    checksum: str = Field(
        min_length=64, max_length=64, json_schema_extra={"pattern": _SHA256.pattern}
    )
    checksum_algorithm: Literal["sha256"] = "sha256"
    executed_obs_unit: str = Field(
        min_length=1, max_length=256, json_schema_extra={"pattern": _NAME.pattern}
    )
    instrument_module: str = Field(
        min_length=3, max_length=257, json_schema_extra={"pattern": _MODULE_PATTERN}
    )
    obs_unit: str | None = Field(
        default=None, min_length=1, max_length=256, json_schema_extra={"pattern": _NAME.pattern}
    )
    metadata: dict[str, Any] | None = None

    @field_validator("checksum")
    @classmethod
    def _hex(cls, value: str) -> str:
        if not _SHA256.match(value):
            raise ValueError("checksum must be 64 hexadecimal characters (SHA-256)")
        return value.lower()

    @field_validator("executed_obs_unit", "obs_unit")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not _NAME.match(value):
            raise ValueError(
                "names use letters, digits and . _ : + @ = - (starting with a letter or digit)"
            )
        return value

    @field_validator("instrument_module")
    @classmethod
    def _module(cls, value: str) -> str:
        parse_instrument_module(value)
        return value

    @field_validator("relative_path")
    @classmethod
    def _path(cls, value: str) -> str:
        _check_text(value)
        if "\\" in value:
            raise ValueError("path must use '/' separators")
        try:
            norm = normalize_path(value)
        except (ValueError, TypeError) as exc:
            raise ValueError(str(exc)) from None
        if norm.startswith(RESERVED_PREFIX) or norm + "/" == RESERVED_PREFIX:
            raise ValueError(f"paths under {RESERVED_PREFIX} are reserved for packages")
        _refuse_temporary_component(norm)
        return norm

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        try:
            text = json.dumps(value, ensure_ascii=False, allow_nan=False)
            encoded = text.encode("utf-8")
        except (TypeError, ValueError, UnicodeEncodeError):
            raise ValueError("metadata must be plain JSON (UTF-8 text, finite numbers)") from None
        if len(encoded) > _MAX_METADATA_BYTES:
            raise ValueError(f"metadata larger than {_MAX_METADATA_BYTES} bytes")
        if "\\u0000" in text or "\x00" in text:
            raise ValueError("metadata must not contain NUL characters")
        return value


class FiledFile(BaseModel):
    id: uuid.UUID
    relative_path: str
    status: Literal["created", "unchanged"]


class FilingResult(BaseModel):
    """What a filing did: ``created`` new files, ``unchanged`` ones already filed."""

    location: str
    created: int = 0
    unchanged: int = 0
    files: list[FiledFile] = Field(default_factory=list)


def _refuse_temporary_component(path: str) -> None:
    """A path with a component the storage treats as temporary (``.name.tmp-*``) is
    refused: the storage hides everything under such a name and the janitor removes it."""
    component = temporary_component(path)
    if component is not None:
        raise ValueError(
            f"path component {component!r} is a temporary name (a hidden name holding "
            "'.tmp-'): the storage hides it and cleans it up, so nothing under it is filed"
        )


def _check_text(value: str) -> None:
    if _CONTROL.search(value):
        raise ValueError("control characters are not allowed")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid UTF-8 (no lone surrogates)") from None


def parse_instrument_module(value: str) -> tuple[str, str]:
    """``"primecam/280GHz"`` -> ``("primecam", "280GHz")``; ValueError otherwise."""
    _check_text(value)
    parts = value.split("/")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"instrument module must be written INSTRUMENT/MODULE, got {value!r}")
    return parts[0], parts[1]


def _parse_entries(entries: Iterable[FilingEntry | Mapping[str, Any]]) -> list[FilingEntry]:
    parsed: list[FilingEntry] = []
    problems: list[dict[str, Any]] = []
    for index, raw in enumerate(entries):
        if isinstance(raw, FilingEntry):
            parsed.append(raw)
            continue
        try:
            parsed.append(FilingEntry.model_validate(raw))
        except PydanticValidationError as exc:
            reasons = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'entry'}: {err['msg']}"
                for err in exc.errors()
            )
            path = raw.get("relative_path") if isinstance(raw, Mapping) else None
            problems.append({"index": index, "relative_path": _printable(path), "reason": reasons})
    if problems:
        raise FilingError(f"{len(problems)} entries are malformed", problems)
    return parsed


def _printable(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    return value.encode("utf-8", "backslashreplace").decode("utf-8")[:_MAX_PATH]


def _chunks(items: Sequence[Any], n: int = _QUERY_CHUNK) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def file_raw_data_files(
    session: Session,
    location_name: str,
    entries: Iterable[FilingEntry | Mapping[str, Any]],
    instrument: str | None = None,
) -> FilingResult:
    """Register raw files lying at SOURCE location ``location_name``.

    ``instrument`` is the scope of the caller: the location must be bound to it.

    ``entries`` are :class:`FilingEntry` objects or dicts with the same keys.  The whole
    batch is validated first; any refusal raises :class:`FilingError` (or
    :class:`FilingConflictError`) and nothing is written.  On success the rows are
    flushed into ``session``; the caller commits (``session_scope`` does).
    """
    batch = _parse_entries(entries)
    max_batch = int(settings.get("FILING_MAX_BATCH_SIZE", 10000))
    if len(batch) > max_batch:
        raise FilingError(f"batch of {len(batch)} files exceeds the limit of {max_batch}")
    result = FilingResult(location=location_name)
    if not batch:
        return result

    location = _filing_location(session, location_name, instrument)
    refusals = _Refusals()
    unique = _unique_entries(batch, refusals)
    modules = _check_modules(session, unique, location, location_name, refusals)
    eous = _existing_executed_obs_units(session, unique)
    existing = _existing_files(session, unique, location)
    for index, entry, reason in _foreign_unit_entries(session, unique, eous, existing):
        refusals.refuse(index, entry, reason, conflict=True)

    try:
        storage = storage_for_location(location)
    except StorageError as exc:
        raise FilingError(f"location {location_name!r} cannot be read: {exc}") from None

    new = _check_against_rows_and_storage(unique, existing, eous, storage, location_name, refusals)
    refusals.raise_if_any(len(batch))

    # Everything checked: write.
    _create_executed_obs_units(session, new, eous)
    created = _create_raw_files(session, new, modules, eous, location)
    _fill_result(result, unique, created, existing)
    log.info(
        "raw_data_files_filed",
        location=location_name,
        created=result.created,
        unchanged=result.unchanged,
        size_bytes=sum(e.size for _, e in new),
    )
    return result


def _filing_location(
    session: Session, location_name: str, instrument: str | None
) -> m.DataLocation:
    """Validate phase: the location exists, is an active SOURCE location and is in the
    caller's instrument scope."""
    location = session.scalars(
        select(m.DataLocation).where(m.DataLocation.name == location_name)
    ).one_or_none()
    if location is None:
        raise FilingError(f"no data location named {location_name!r}")
    if location.location_type != m.LocationType.SOURCE:
        raise FilingError(
            f"location {location_name!r} is a {location.location_type.value} location; "
            "raw files are filed at a SOURCE location"
        )
    if not location.active:
        raise FilingError(f"location {location_name!r} is not active")
    if instrument is not None and (
        location.instrument is None or location.instrument.name != instrument
    ):
        raise FilingScopeError(
            f"this token files only for instrument {instrument!r}; location "
            f"{location_name!r} is not one of its SOURCE locations"
        )
    return location


class _Refusals:
    """The problems found in a batch; any one refuses the whole batch."""

    def __init__(self) -> None:
        self.problems: list[dict[str, Any]] = []
        self.conflicts = False

    def refuse(self, index: int, entry: FilingEntry, reason: str, conflict: bool = False) -> None:
        """Record why entry ``index`` is refused (``conflict``: it clashes with rows)."""
        self.conflicts = self.conflicts or conflict
        self.problems.append(
            {"index": index, "relative_path": entry.relative_path, "reason": reason}
        )

    def raise_if_any(self, batch_size: int) -> None:
        """Raise FilingConflictError or FilingError listing every problem, if any."""
        if self.problems:
            self.problems.sort(key=lambda p: p["index"])
            cls = FilingConflictError if self.conflicts else FilingError
            raise cls(
                f"{len(self.problems)} of {batch_size} files refused; nothing was filed",
                self.problems,
            )


def _unique_entries(
    batch: list[FilingEntry], refusals: _Refusals
) -> dict[str, tuple[int, FilingEntry]]:
    """Duplicates inside the batch: identical ones collapse, different ones are refused."""
    unique: dict[str, tuple[int, FilingEntry]] = {}
    for index, entry in enumerate(batch):
        seen = unique.get(entry.relative_path)
        if seen is None:
            unique[entry.relative_path] = (index, entry)
        elif _key(seen[1]) != _key(entry):
            refusals.refuse(
                index, entry, f"filed twice in this batch with different values (entry {seen[0]})"
            )
    return unique


def _check_modules(
    session: Session,
    unique: dict[str, tuple[int, FilingEntry]],
    location: m.DataLocation,
    location_name: str,
    refusals: _Refusals,
) -> dict[tuple[str, str], m.InstrumentModule]:
    """Each entry names a known module of the location's instrument; returns all modules."""
    # Instrument modules (a small table: read it whole).
    modules: dict[tuple[str, str], m.InstrumentModule] = {
        (mod.instrument.name, mod.name): mod
        for mod in session.scalars(
            select(m.InstrumentModule)
            .join(m.Instrument)
            .options(contains_eager(m.InstrumentModule.instrument))
        )
    }
    for index, entry in unique.values():
        key = parse_instrument_module(entry.instrument_module)
        module = modules.get(key)
        if module is None:
            refusals.refuse(index, entry, f"unknown instrument module {entry.instrument_module!r}")
        elif location.instrument_id is not None and module.instrument_id != location.instrument_id:
            refusals.refuse(
                index,
                entry,
                f"module {entry.instrument_module!r} does not belong to the instrument of "
                f"location {location_name!r}",
            )
    return modules


def _existing_executed_obs_units(
    session: Session, unique: dict[str, tuple[int, FilingEntry]]
) -> dict[str, m.ExecutedObsUnit]:
    """Executed obs units named by the batch that already exist, by name."""
    eou_names = sorted({e.executed_obs_unit for _, e in unique.values()})
    eous: dict[str, m.ExecutedObsUnit] = {}
    for chunk in _chunks(eou_names):
        for eou in session.scalars(
            select(m.ExecutedObsUnit).where(m.ExecutedObsUnit.name.in_(chunk))
        ):
            eous[eou.name] = eou
    return eous


def _existing_files(
    session: Session, unique: dict[str, tuple[int, FilingEntry]], location: m.DataLocation
) -> dict[str, m.RawDataFile]:
    """Files already filed at the location under the batch's paths, by path."""
    paths = sorted(unique)
    existing: dict[str, m.RawDataFile] = {}
    for chunk in _chunks(paths):
        for f in session.scalars(
            select(m.RawDataFile).where(
                m.RawDataFile.source_location_id == location.id,
                m.RawDataFile.relative_path.in_(chunk),
            )
        ):
            existing[f.relative_path] = f
    return existing


def _check_against_rows_and_storage(
    unique: dict[str, tuple[int, FilingEntry]],
    existing: dict[str, m.RawDataFile],
    eous: dict[str, m.ExecutedObsUnit],
    storage: Storage,
    location_name: str,
    refusals: _Refusals,
) -> list[tuple[int, FilingEntry]]:
    """Compare each entry with its filed row, its obs unit and the file on storage;
    returns the entries to create."""
    new: list[tuple[int, FilingEntry]] = []
    for index, entry in unique.values():
        old = existing.get(entry.relative_path)
        if old is not None:
            old_module = old.instrument_module
            same = (
                old.checksum.lower() == entry.checksum
                and old.checksum_algorithm == entry.checksum_algorithm
                and old.size == entry.size
                and old.executed_obs_unit.name == entry.executed_obs_unit
                and f"{old_module.instrument.name}/{old_module.name}" == entry.instrument_module
            )
            if not same:
                refusals.refuse(
                    index,
                    entry,
                    "already filed with a different checksum, size, obs unit or module "
                    f"(checksum {old.checksum})",
                    conflict=True,
                )
            continue
        eou = eous.get(entry.executed_obs_unit)
        if eou is not None and eou.finished_at is not None:
            refusals.refuse(
                index,
                entry,
                f"executed obs unit {entry.executed_obs_unit!r} is finished; "
                "no new files can be added",
                conflict=True,
            )
            continue
        try:
            info = storage.stat(entry.relative_path)
        except (StorageError, ValueError, OSError) as exc:
            refusals.refuse(index, entry, f"cannot check the file at {location_name}: {exc}")
            continue
        if info is None:
            refusals.refuse(index, entry, f"no such file at location {location_name!r}")
        elif info.size != entry.size:
            refusals.refuse(
                index, entry, f"file is {info.size} bytes at the location, filed as {entry.size}"
            )
        else:
            new.append((index, entry))
    return new


def _create_executed_obs_units(
    session: Session, new: list[tuple[int, FilingEntry]], eous: dict[str, m.ExecutedObsUnit]
) -> None:
    """Write phase: create the obs units and executed obs units the new files name."""
    obs_units: dict[str, m.ObsUnit] = {}
    for _, entry in new:
        if entry.executed_obs_unit in eous:
            continue
        ou_name = entry.obs_unit or entry.executed_obs_unit
        ou = (
            obs_units.get(ou_name)
            or session.scalars(select(m.ObsUnit).where(m.ObsUnit.name == ou_name)).one_or_none()
        )
        if ou is None:
            ou = m.ObsUnit(name=ou_name)
            session.add(ou)
        obs_units[ou_name] = ou
        eou = m.ExecutedObsUnit(
            name=entry.executed_obs_unit,
            obs_unit=ou,
            status=m.Status.IN_PROGRESS,
            start_time=m.utcnow(),
        )
        session.add(eou)
        eous[entry.executed_obs_unit] = eou


def _create_raw_files(
    session: Session,
    new: list[tuple[int, FilingEntry]],
    modules: dict[tuple[str, str], m.InstrumentModule],
    eous: dict[str, m.ExecutedObsUnit],
    location: m.DataLocation,
) -> dict[str, m.RawDataFile]:
    """Write phase: one RawDataFile and its PRESENT source copy per new entry, flushed."""
    created: dict[str, m.RawDataFile] = {}
    for _, entry in new:
        rdf = m.RawDataFile(
            id=uuid.uuid4(),
            relative_path=entry.relative_path,
            size=entry.size,
            checksum=entry.checksum,
            checksum_algorithm=entry.checksum_algorithm,
            instrument_module=modules[parse_instrument_module(entry.instrument_module)],
            executed_obs_unit=eous[entry.executed_obs_unit],
            source_location_id=location.id,
            file_metadata=entry.metadata,
        )
        session.add(rdf)
        session.add(
            present_copy(
                m.RawDataFilePhysicalCopy,
                raw_data_file=rdf,
                data_location_id=location.id,
                relative_path=entry.relative_path,
                size=entry.size,
                checksum=entry.checksum,
            )
        )
        created[entry.relative_path] = rdf
    try:
        session.flush()
    except IntegrityError as exc:
        raise FilingConflictError(
            "another filing registered some of these files at the same time; retry: "
            + str(exc.orig).splitlines()[0]
        ) from None
    return created


def _fill_result(
    result: FilingResult,
    unique: dict[str, tuple[int, FilingEntry]],
    created: dict[str, m.RawDataFile],
    existing: dict[str, m.RawDataFile],
) -> None:
    """List each path of the batch in ``result`` as created or unchanged, in batch order."""
    for _index, entry in sorted(unique.values(), key=lambda t: t[0]):
        is_new = entry.relative_path in created
        rdf = created[entry.relative_path] if is_new else existing[entry.relative_path]
        status = "created" if is_new else "unchanged"
        result.files.append(FiledFile(id=rdf.id, relative_path=rdf.relative_path, status=status))
        if is_new:
            result.created += 1
        else:
            result.unchanged += 1


def _unit_owners(session: Session, eou_ids: Sequence[int]) -> dict[int, str]:
    """The instrument owning each executed obs unit: that of its first filed file."""
    owners: dict[int, str] = {}
    for chunk in _chunks(list(eou_ids)):
        for eou_id, instrument in session.execute(
            select(m.RawDataFile.executed_obs_unit_id, m.Instrument.name)
            .join(m.InstrumentModule, m.InstrumentModule.id == m.RawDataFile.instrument_module_id)
            .join(m.Instrument, m.Instrument.id == m.InstrumentModule.instrument_id)
            .where(m.RawDataFile.executed_obs_unit_id.in_(chunk))
            .order_by(m.RawDataFile.created_at, m.RawDataFile.id)
        ):
            owners.setdefault(eou_id, instrument)
    return owners


def _foreign_unit_entries(
    session: Session,
    unique: Mapping[str, tuple[int, FilingEntry]],
    eous: Mapping[str, m.ExecutedObsUnit],
    existing: Mapping[str, m.RawDataFile],
) -> list[tuple[int, FilingEntry, str]]:
    """New entries naming an executed obs unit of another instrument: a unit belongs to
    the instrument that first filed into it (its finishing, packaging and scope follow
    that instrument), so another instrument's files never join it.  For a unit this batch
    creates, its first entry's instrument owns it."""
    owners = _unit_owners(session, [eou.id for eou in eous.values()])
    owner_by_name = {name: owners[eou.id] for name, eou in eous.items() if eou.id in owners}
    found: list[tuple[int, FilingEntry, str]] = []
    for index, entry in sorted(unique.values(), key=lambda t: t[0]):
        if entry.relative_path in existing:
            continue  # a re-filing: judged with the file already filed
        instrument = parse_instrument_module(entry.instrument_module)[0]
        owner = owner_by_name.setdefault(entry.executed_obs_unit, instrument)
        if owner != instrument:
            found.append(
                (
                    index,
                    entry,
                    f"executed obs unit {entry.executed_obs_unit!r} belongs to instrument "
                    f"{owner!r}; instrument {instrument!r} cannot file into it (use an obs "
                    "unit name of its own)",
                )
            )
    return found


def _key(entry: FilingEntry) -> tuple[Any, ...]:
    return (
        entry.size,
        entry.checksum,
        entry.checksum_algorithm,
        entry.executed_obs_unit,
        entry.instrument_module,
    )


def finish_executed_obs_unit(
    session: Session, name: str, instrument: str | None = None
) -> m.ExecutedObsUnit:
    """Mark an ExecutedObsUnit finished: its files can be packaged as soon as they are
    filed (no quiet period).  Idempotent; NotFoundError for an unknown name.

    ``instrument`` is the scope of the caller: it may finish only a unit whose filed
    files are all of that instrument (and that has at least one), so one instrument's
    token cannot hurry another instrument's packaging."""
    eou = session.scalars(select(m.ExecutedObsUnit).filter_by(name=name)).one_or_none()
    if eou is None:
        raise NotFoundError(f"no executed obs unit named {name!r}")
    if instrument is not None:
        owners = set(
            session.scalars(
                select(m.Instrument.name)
                .join(m.InstrumentModule, m.InstrumentModule.instrument_id == m.Instrument.id)
                .join(m.RawDataFile, m.RawDataFile.instrument_module_id == m.InstrumentModule.id)
                .where(m.RawDataFile.executed_obs_unit_id == eou.id)
                .distinct()
            )
        )
        if owners != {instrument}:
            whose = ", ".join(sorted(owners)) if owners else "no instrument (no files filed)"
            raise FilingScopeError(
                f"this token finishes only obs units of instrument {instrument!r}; "
                f"{name!r} holds files of {whose}"
            )
    if eou.finished_at is None:
        now = m.utcnow()
        eou.finished_at = now
        eou.end_time = eou.end_time or now
        eou.status = m.Status.COMPLETED
        session.flush()
        log.info("executed_obs_unit_finished", executed_obs_unit=name)
    return eou
