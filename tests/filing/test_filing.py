"""Stage 0: filing raw files (the Python function)."""

from __future__ import annotations

import hashlib

import pytest
from sqlalchemy import func, select

from ccat_data_transfer.core.errors import NotFoundError, ValidationError
from ccat_data_transfer.filing.register import (
    FilingConflictError,
    FilingError,
    file_raw_data_files,
    finish_executed_obs_unit,
)
from ccat_ops_db import models as m
from helpers_pipeline import make_raw_files

SRC = "primecam_raw_data"


def _write(system, rel, data=b"hello world", location=SRC):
    path = system.location_path(location) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {
        "relative_path": rel,
        "size": len(data),
        "checksum": hashlib.sha256(data).hexdigest(),
        "executed_obs_unit": "eou-f",
        "instrument_module": "primecam/280GHz",
    }


def _counts(system):
    with system.session() as s:
        return (
            s.scalar(select(func.count()).select_from(m.RawDataFile)),
            s.scalar(select(func.count()).select_from(m.PhysicalCopy)),
            s.scalar(select(func.count()).select_from(m.ExecutedObsUnit)),
            s.scalar(select(func.count()).select_from(m.ObsUnit)),
        )


def test_filing_creates_files_copies_and_obs_units(system):
    entry = _write(system, "a/b.fits")
    entry["obs_unit"] = "ou-1"
    entry["metadata"] = {"scan": 7}
    with system.session() as s:
        result = file_raw_data_files(s, SRC, [entry])
    assert result.created == 1 and result.unchanged == 0
    with system.session() as s:
        f = s.scalars(select(m.RawDataFile)).one()
        assert (f.relative_path, f.size, f.checksum_algorithm) == ("a/b.fits", 11, "sha256")
        assert f.executed_obs_unit.obs_unit.name == "ou-1"
        assert f.file_metadata == {"scan": 7}
        [copy] = f.physical_copies
        assert copy.status == m.PhysicalCopyStatus.PRESENT and copy.data_location.name == SRC
        assert str(f.id) == str(result.files[0].id)


def test_refiling_the_same_file_is_idempotent(system):
    entries = make_raw_files(system, SRC, "eou-idem", "primecam/280GHz", 2, 10)
    clean = [{k: v for k, v in e.items() if k not in ("id", "path")} for e in entries]
    before = _counts(system)
    with system.session() as s:
        result = file_raw_data_files(s, SRC, clean)
    assert result.created == 0 and result.unchanged == 2
    assert {str(f.id) for f in result.files} == {e["id"] for e in entries}
    assert _counts(system) == before


def test_refiling_with_a_different_checksum_is_refused(system):
    entry = _write(system, "c.fits")
    with system.session() as s:
        file_raw_data_files(s, SRC, [entry])
    before = _counts(system)
    other = dict(entry, checksum="0" * 64)
    with pytest.raises(FilingConflictError) as err, system.session() as s:
        file_raw_data_files(s, SRC, [other])
    assert "different checksum" in err.value.problems[0]["reason"]
    assert _counts(system) == before


def test_a_batch_with_one_bad_entry_files_nothing(system):
    good = _write(system, "ok.fits")
    bad = _write(system, "wrong-size.fits")
    bad["size"] += 1
    with pytest.raises(FilingError) as err, system.session() as s:
        file_raw_data_files(s, SRC, [good, bad])
    assert err.value.problems[0]["relative_path"] == "wrong-size.fits"
    assert _counts(system) == (0, 0, 0, 0)


@pytest.mark.parametrize(
    "path, reason",
    [
        ("../escape.fits", ".."),
        ("/etc/passwd", "relative"),
        ("a/../../b", ".."),
        ("raw_data_packages/x.tar", "reserved"),
        ("bad\nname", "control"),
        ("missing.fits", "no such file"),
    ],
)
def test_bad_paths_are_refused(system, path, reason):
    entry = _write(system, "real.fits")
    entry["relative_path"] = path
    with pytest.raises(FilingError) as err, system.session() as s:
        file_raw_data_files(s, SRC, [entry])
    assert reason in err.value.problems[0]["reason"]
    assert _counts(system) == (0, 0, 0, 0)


def test_module_of_another_instrument_is_refused(system):
    entry = _write(system, "x.fits")
    entry["instrument_module"] = "chai/LFA"
    with pytest.raises(FilingError, match="refused"), system.session() as s:
        file_raw_data_files(s, SRC, [entry])


def test_filing_into_a_non_source_location_is_refused(system):
    entry = _write(system, "x.fits", location="ccat_telescope_buffer")
    with pytest.raises(FilingError, match="SOURCE"), system.session() as s:
        file_raw_data_files(s, "ccat_telescope_buffer", [entry])


def test_new_files_for_a_finished_obs_unit_are_refused(system):
    first = _write(system, "1.fits")
    with system.session() as s:
        file_raw_data_files(s, SRC, [first])
        finish_executed_obs_unit(s, "eou-f")
    late = _write(system, "2.fits", b"late")
    with pytest.raises(FilingConflictError), system.session() as s:
        file_raw_data_files(s, SRC, [late])
    with system.session() as s:  # re-filing what is there stays fine
        assert file_raw_data_files(s, SRC, [first]).unchanged == 1


def test_finishing_an_unknown_obs_unit_is_not_found(system):
    with pytest.raises(NotFoundError), system.session() as s:
        finish_executed_obs_unit(s, "nope")


@pytest.mark.parametrize(
    "path, component",
    [
        (".scan.tmp-7/obs1.fits", ".scan.tmp-7"),
        ("night/.unpack.tmp-x/a/obs1.fits", ".unpack.tmp-x"),
        ("night/.obs1.fits.tmp-resume", ".obs1.fits.tmp-resume"),
    ],
)
def test_a_path_with_a_temporary_component_anywhere_is_refused_naming_it(system, path, component):
    entry = _write(system, path)
    with pytest.raises(FilingError) as err, system.session() as s:
        file_raw_data_files(s, SRC, [entry])
    reason = err.value.problems[0]["reason"]
    assert repr(component) in reason and "temporary" in reason
    assert _counts(system) == (0, 0, 0, 0)
    assert (system.location_path(SRC) / path).exists()


def test_filing_into_another_instruments_obs_unit_is_refused_and_the_owner_still_finishes(
    system,
):
    mine = _write(system, "p/1.fits")
    with system.session() as s:
        file_raw_data_files(s, SRC, [mine], instrument="primecam")
    before = _counts(system)
    theirs = _write(system, "c/1.fits", b"chai bytes", location="chai_raw_data")
    theirs["instrument_module"] = "chai/LFA"
    with pytest.raises(FilingConflictError) as err, system.session() as s:
        file_raw_data_files(s, "chai_raw_data", [theirs], instrument="chai")
    assert isinstance(err.value, ValidationError)
    reason = err.value.problems[0]["reason"]
    assert "'eou-f' belongs to instrument 'primecam'" in reason and "'chai'" in reason
    assert _counts(system) == before
    with system.session() as s:  # the owner's token can still finish its own unit
        eou = finish_executed_obs_unit(s, "eou-f", instrument="primecam")
        assert eou.finished_at is not None
    with system.session() as s:  # and the other instrument files under a name of its own
        theirs["executed_obs_unit"] = "eou-chai"
        assert file_raw_data_files(s, "chai_raw_data", [theirs], instrument="chai").created == 1
