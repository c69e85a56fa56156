"""Instrument simulator for the main job and tests: writes realistic raw files and files them.

Each simulated observation is one ExecutedObsUnit; each instrument module writes a few
files into ``<date>/<executed obs unit>/<module>/`` at the instrument's SOURCE location:
FITS-like files (a 2880-byte ASCII header block, then binary data) for Prime-Cam, and
spectra for CHAI.  Checksums are computed while writing, as an instrument would, and
the files are filed through the same function the REST API uses.  When an observation
is complete its ExecutedObsUnit is marked finished, which lets packaging start.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select

from ccat_data_transfer.core.database import DatabaseConnection
from ccat_data_transfer.core.logs import get_logger
from ccat_data_transfer.filing.register import file_raw_data_files, finish_executed_obs_unit
from ccat_ops_db import models as m

log = get_logger(__name__)

FITS_BLOCK = 2880


def _fits_header(cards: dict[str, object]) -> bytes:
    lines = []
    for key, value in cards.items():
        if isinstance(value, str):
            text = f"{key:<8}= '{value}'"
        elif isinstance(value, bool):
            text = f"{key:<8}= {'T' if value else 'F':>20}"
        else:
            text = f"{key:<8}= {value:>20}"
        lines.append(text[:80].ljust(80))
    lines.append("END".ljust(80))
    raw = "".join(lines).encode("ascii")
    return raw + b" " * (-len(raw) % FITS_BLOCK)


@dataclass
class SimulatedObservation:
    executed_obs_unit: str
    instrument: str
    files: int = 0
    bytes: int = 0
    paths: list[str] = field(default_factory=list)


class InstrumentSimulator:
    """Writes and files ``observations`` observations, round-robin over the instruments.

    ``rate_mb_per_s`` paces the writing (0: as fast as the disk allows).
    """

    def __init__(
        self,
        db: DatabaseConnection | None = None,
        observations: int = 4,
        files_per_module: int = 3,
        file_size: int = 2 * 1024 * 1024,
        modules_per_instrument: int = 2,
        rate_mb_per_s: float = 0.0,
        seed: int = 0,
        run_id: str | None = None,
    ) -> None:
        self.db = db or DatabaseConnection()
        self.observations = observations
        self.files_per_module = files_per_module
        self.file_size = file_size
        self.modules_per_instrument = modules_per_instrument
        self.rate_mb_per_s = rate_mb_per_s
        self.seed = seed
        self.run_id = run_id or time.strftime("%Y%m%dT%H%M%S")
        self.done: list[SimulatedObservation] = []
        self._block = hashlib.sha256(f"ccat-sim-{seed}".encode()).digest() * 2048  # 64 KiB

    @property
    def finished(self) -> bool:
        return len(self.done) >= self.observations

    def _sources(self) -> list[tuple[str, str, Path, list[str]]]:
        """(instrument, location name, root, module names) of each SOURCE location."""
        with self.db.session_scope() as session:
            rows = session.scalars(
                select(m.DataLocation)
                .where(
                    m.DataLocation.location_type == m.LocationType.SOURCE,
                    m.DataLocation.active.is_(True),
                    m.DataLocation.instrument_id.is_not(None),
                )
                .order_by(m.DataLocation.name)
            ).all()
            out = []
            for loc in rows:
                modules = sorted(mod.name for mod in loc.instrument.modules if mod.active)
                out.append(
                    (
                        loc.instrument.name,
                        loc.name,
                        Path(loc.path),
                        modules[: self.modules_per_instrument],
                    )
                )
            return out

    def _write_file(self, path: Path, header: bytes, size: int, salt: bytes) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        tmp = path.with_name(f".{path.name}.writing")
        started = time.monotonic()
        with open(tmp, "wb") as fh:
            fh.write(header)
            digest.update(header)
            remaining = max(0, size - len(header))
            counter = 0
            while remaining:
                # Unique bytes per file: a salted first chunk, then the shared block.
                chunk = (salt + counter.to_bytes(8, "big") + self._block)[
                    : min(remaining, len(self._block))
                ]
                fh.write(chunk)
                digest.update(chunk)
                remaining -= len(chunk)
                counter += 1
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        if self.rate_mb_per_s > 0:
            wanted = size / (self.rate_mb_per_s * 1e6)
            spent = time.monotonic() - started
            if wanted > spent:
                time.sleep(wanted - spent)
        return digest.hexdigest()

    def step(self) -> SimulatedObservation | None:
        """Write, file and finish the next observation; None once all are done."""
        if self.finished:
            return None
        index = len(self.done)
        sources = self._sources()
        if not sources:
            raise RuntimeError("no SOURCE location with an instrument in the topology")
        instrument, location, root, modules = sources[index % len(sources)]
        start = m.utcnow()
        eou = f"{instrument}-{self.run_id}-obs{index + 1:04d}"
        obs = SimulatedObservation(executed_obs_unit=eou, instrument=instrument)
        entries = []
        day = start.strftime("%Y%m%d")
        for module in modules:
            for n in range(self.files_per_module):
                kind = "spec" if instrument == "chai" else "scan"
                rel = f"{day}/{eou}/{module}/{kind}_{n:04d}.fits"
                header = _fits_header(
                    {
                        "SIMPLE": True,
                        "BITPIX": 16 if instrument != "chai" else -32,
                        "NAXIS": 1,
                        "NAXIS1": max(0, (self.file_size - FITS_BLOCK) // 2),
                        "TELESCOP": "FYST",
                        "INSTRUME": instrument.upper(),
                        "MODULE": module,
                        "OBSID": eou,
                        "SCAN": n,
                        "DATE-OBS": (start + timedelta(seconds=n)).isoformat(timespec="seconds"),
                    }
                )
                checksum = self._write_file(
                    root / rel, header, self.file_size, f"{eou}/{module}/{n}".encode()
                )
                entries.append(
                    {
                        "relative_path": rel,
                        "size": self.file_size,
                        "checksum": checksum,
                        "checksum_algorithm": "sha256",
                        "executed_obs_unit": eou,
                        "obs_unit": f"{instrument}-field-{index % 3 + 1}",
                        "instrument_module": f"{instrument}/{module}",
                        "metadata": {"scan": n, "simulated": True},
                    }
                )
                obs.files += 1
                obs.bytes += self.file_size
                obs.paths.append(rel)
        with self.db.session_scope() as session:
            file_raw_data_files(session, location, entries)
            eou_row = session.scalars(select(m.ExecutedObsUnit).filter_by(name=eou)).one()
            eou_row.start_time = start
            eou_row.end_time = m.utcnow()
        with self.db.session_scope() as session:
            finish_executed_obs_unit(session, eou)
        log.info(
            "observation_simulated",
            executed_obs_unit=eou,
            files=obs.files,
            size_bytes=obs.bytes,
            location=location,
        )
        self.done.append(obs)
        return obs
