"""Topology loading: idempotent, all-or-nothing, clear errors, data never orphaned."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select

from ccat_ops_db import models as m
from ccat_ops_db.topology import TopologyError, load_topology, parse_size
from conftest import DEFAULT_TOPOLOGY


def _counts(session):
    return {
        model.__tablename__: session.scalar(select(func.count()).select_from(model))
        for model in (
            m.Site,
            m.DataLocation,
            m.DataTransferRoute,
            m.Instrument,
            m.InstrumentModule,
            m.Telescope,
            m.Observatory,
        )
    }


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "topology.toml"
    path.write_text(text)
    return path


def test_default_topology_has_the_documented_names(system):
    with system.session() as s:
        names = {loc.name: loc for loc in s.scalars(select(m.DataLocation))}
        sites = {site.name for site in s.scalars(select(m.Site))}
    assert {"ccat", "cologne", "us"} <= sites
    expected = {
        "primecam_raw_data": m.LocationType.SOURCE,
        "chai_raw_data": m.LocationType.SOURCE,
        "ccat_telescope_buffer": m.LocationType.BUFFER,
        "cologne_buffer": m.LocationType.BUFFER,
        "us_buffer": m.LocationType.BUFFER,
        "cologne_lta": m.LocationType.LONG_TERM_ARCHIVE,
        "us_lta": m.LocationType.LONG_TERM_ARCHIVE,
    }
    for name, ltype in expected.items():
        assert names[name].location_type == ltype
    assert any(loc.location_type == m.LocationType.PROCESSING for loc in names.values())
    # every location is a folder under the one data directory
    for loc in names.values():
        assert Path(loc.path).is_relative_to(system.data_dir)


def test_loading_twice_changes_nothing(system):
    with system.session() as s:
        before = _counts(s)
        report = load_topology(s, DEFAULT_TOPOLOGY, system.data_dir)
        assert report.created == [] and report.updated == []
        assert _counts(s) == before


def test_edited_file_updates_rows_without_duplicating(system, tmp_path):
    text = DEFAULT_TOPOLOGY.read_text().replace(
        'name = "cologne_buffer"\nsite = "cologne"\ntype = "buffer"\nstorage = "disk"\n'
        'path = "cologne/cologne_buffer"\ncapacity = "500 GB"',
        'name = "cologne_buffer"\nsite = "cologne"\ntype = "buffer"\nstorage = "disk"\n'
        'path = "cologne/cologne_buffer"\ncapacity = "2 TB"\npriority = 3\n'
        "critical_threshold_percent = 80",
    )
    text += (
        '\n[[locations]]\nname = "cologne_buffer_2"\nsite = "cologne"\ntype = "buffer"\n'
        'storage = "disk"\npath = "cologne/buffer2"\npriority = 5\n'
    )
    path = _write(tmp_path, text)
    with system.session() as s:
        before = _counts(s)
        report = load_topology(s, path, system.data_dir)
        after = _counts(s)
        buf = system.location(s, "cologne_buffer")
        assert buf.capacity_bytes == 2 * 10**12
        assert buf.priority == 3
        assert buf.critical_threshold_percent == 80
    assert after["data_location"] == before["data_location"] + 1
    assert "data_location cologne_buffer" in report.updated


def _add_present_copy(session, location_name):
    loc = session.scalars(select(m.DataLocation).filter_by(name=location_name)).one()
    module = session.scalars(select(m.InstrumentModule)).first()
    eou = m.ExecutedObsUnit(name="e1", obs_unit=m.ObsUnit(name="o1"))
    pkg = m.RawDataPackage(
        file_name="p.tar",
        relative_path="p.tar",
        executed_obs_unit=eou,
        instrument_module_id=module.id,
    )
    session.add(m.RawDataPackagePhysicalCopy(raw_data_package=pkg, data_location=loc))


def test_removing_a_location_with_present_copies_is_refused(system, tmp_path):
    with system.session() as s:
        _add_present_copy(s, "us_buffer")
    text = DEFAULT_TOPOLOGY.read_text().replace('name = "us_buffer"', 'name = "us_buffer_new"')
    text = text.replace('path = "us/us_buffer"', 'path = "us/us_buffer_new"')
    path = _write(tmp_path, text)
    with system.session() as s:
        before = _counts(s)
        with pytest.raises(TopologyError, match="us_buffer.*still holds 1 copies"):
            load_topology(s, path, system.data_dir)
        s.rollback()
        assert _counts(s) == before
        assert system.location(s, "us_buffer").active


def test_removing_an_empty_location_deactivates_it(system, tmp_path):
    text = DEFAULT_TOPOLOGY.read_text().replace('name = "us_buffer"', 'name = "us_buffer_new"')
    path = _write(tmp_path, text)
    with system.session() as s:
        report = load_topology(s, path, system.data_dir)
        assert "data_location us_buffer" in report.deactivated
        assert not system.location(s, "us_buffer").active
        assert system.location(s, "us_buffer_new").active


BAD_INPUTS = {
    "route to unknown site": (
        lambda t: (
            t + '\n[[routes]]\norigin = "ccat"\ndestination = "mars"\n'
            'type = "direct"\nmethod = "copy"\n'
        ),
        "unknown destination site 'mars'",
    ),
    "duplicate location name": (
        lambda t: (
            t + '\n[[locations]]\nname = "us_lta"\nsite = "us"\ntype = "buffer"\n'
            'storage = "disk"\npath = "x"\n'
        ),
        "duplicate location name 'us_lta'",
    ),
    "missing field": (
        lambda t: (
            t + '\n[[locations]]\nname = "nowhere"\nsite = "us"\nstorage = "disk"\npath = "x"\n'
        ),
        "missing required field 'type'",
    ),
    "wrong enum value": (
        lambda t: (
            t + '\n[[locations]]\nname = "odd"\nsite = "us"\ntype = "attic"\n'
            'storage = "disk"\npath = "x"\n'
        ),
        "unknown value 'attic'",
    ),
    "wrong storage": (
        lambda t: t.replace(
            'storage = "disk"\npath = "us/us_lta"', 'storage = "floppy"\npath = "us/us_lta"'
        ),
        "unknown value 'floppy'",
    ),
    "bad capacity": (
        lambda t: t.replace('capacity = "1 TB"', 'capacity = "lots"'),
        "not a size",
    ),
    "not toml": (lambda t: t + "\n[[[broken\n", "not valid TOML"),
    "s3 without bucket": (
        lambda t: (
            t + '\n[[locations]]\nname = "s3x"\nsite = "us"\ntype = "long_term_archive"\n'
            'storage = "s3"\n'
        ),
        "needs a 'bucket'",
    ),
    "location path under a temporary name": (
        lambda t: t.replace('path = "ccat/chai_raw_data"', 'path = "ccat/.chai.tmp-1/raw"'),
        "holds '.chai.tmp-1', a temporary name",
    ),
    "s3 prefix under a temporary name": (
        lambda t: (
            t + '\n[[locations]]\nname = "s3x"\nsite = "us"\ntype = "long_term_archive"\n'
            'storage = "s3"\nbucket = "b"\nprefix = "lta/.x.tmp-resume"\n'
        ),
        "prefix 'lta/.x.tmp-resume' holds '.x.tmp-resume', a temporary name",
    ),
    "copy route to a site on its own host": (
        lambda t: _host_us(t, 'host = "127.0.0.3"\n'),
        "site 'us' is its own host (127.0.0.3); 'copy' cannot reach it",
    ),
    "xrootd route without endpoint": (
        lambda t: _host_us(t, 'host = "127.0.0.3"\n').replace(
            'method = "copy"', 'method = "xrootd"'
        ),
        "method 'xrootd' needs site 'us' to declare 'xrootd_url'",
    ),
    "xrootd route to a site without host": (
        lambda t: t.replace('method = "copy"', 'method = "xrootd"', 1),
        "method 'xrootd' needs site 'cologne' to declare 'host' and 'xrootd_url'",
    ),
    "ssh port out of range": (
        lambda t: _host_us(t, 'host = "127.0.0.3"\nssh_port = 70000\n'),
        "ssh_port must be an integer in 1..65535, got 70000",
    ),
    "ssh user without host": (
        lambda t: _host_us(t, 'ssh_user = "ccat-us"\n'),
        "'ssh_user' needs the site's 'host'",
    ),
    "relative ssh key": (
        lambda t: _host_us(t, 'host = "lta.example.org"\nssh_key = "keys/id"\n'),
        "ssh_key must be an absolute path (or ~/...), got 'keys/id'",
    ),
    "bad xrootd url": (
        lambda t: _host_us(t, 'host = "127.0.0.3"\nxrootd_url = "http://127.0.0.3:1094"\n'),
        "xrootd_url must look like root://host[:port], got 'http://127.0.0.3:1094'",
    ),
    "bad host": (
        lambda t: _host_us(t, 'host = "lta cologne"\n'),
        "host 'lta cologne' is not a host name or IP address",
    ),
    "unknown site field": (
        lambda t: _host_us(t, 'ssh_password = "x"\n'),
        "site #3 (us): unknown field 'ssh_password'",
    ),
}

_US_SITE = 'name = "us"\nshort_name = "us"\n'


def _host_us(text: str, reach: str) -> str:
    """The default topology with reach fields on site 'us' (its routes stay 'copy')."""
    assert _US_SITE in text
    return text.replace(_US_SITE, _US_SITE + reach, 1)


def test_site_reach_is_stored_and_routes_into_it_use_network_methods(system, tmp_path):
    reach = (
        'host = "127.0.0.3"\nssh_user = "ccat-us"\nssh_port = 2222\n'
        'ssh_key = "/etc/ccat/keys/%u/id_ed25519"\nxrootd_url = "root://127.0.0.3:1094"\n'
    )
    text = _host_us(DEFAULT_TOPOLOGY.read_text(), reach)
    text = text.replace(
        'destination = "us"\ntype = "direct"\nmethod = "copy"',
        'destination = "us"\ntype = "direct"\nmethod = "xrootd"',
    )
    with system.session() as s:
        load_topology(s, _write(tmp_path, text), system.data_dir)
        us = s.scalars(select(m.Site).where(m.Site.name == "us")).one()
        assert (us.host, us.ssh_user, us.ssh_port, us.xrootd_url) == (
            "127.0.0.3",
            "ccat-us",
            2222,
            "root://127.0.0.3:1094",
        )
        assert us.ssh_key == "/etc/ccat/keys/%u/id_ed25519"
        methods = {
            r.name: r.transfer_method
            for r in s.scalars(select(m.DataTransferRoute))
            if r.destination_site_id == us.id
        }
        assert set(methods.values()) == {m.TransferMethod.XROOTD}
        cologne = s.scalars(select(m.Site).where(m.Site.name == "cologne")).one()
        assert cologne.host is None


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_topology_gives_clear_error_and_changes_nothing(system, tmp_path, case):
    mutate, message = BAD_INPUTS[case]
    path = _write(tmp_path, mutate(DEFAULT_TOPOLOGY.read_text()))
    with system.session() as s:
        before = _counts(s)
        with pytest.raises(TopologyError) as err:
            load_topology(s, path, system.data_dir)
        assert message in str(err.value)
        assert str(path) in str(err.value)
        s.rollback()
        assert _counts(s) == before


def test_all_problems_are_reported_at_once(tmp_path, system):
    text = DEFAULT_TOPOLOGY.read_text() + (
        '\n[[routes]]\norigin = "ccat"\ndestination = "mars"\ntype = "direct"\nmethod = "copy"\n'
        '\n[[routes]]\norigin = "venus"\ndestination = "us"\ntype = "teleport"\nmethod = "copy"\n'
    )
    with pytest.raises(TopologyError) as err:
        with system.session() as s:
            load_topology(s, _write(tmp_path, text), system.data_dir)
    assert len(err.value.problems) >= 3


def test_parse_size_units():
    assert parse_size("500 GB") == 500 * 10**9
    assert parse_size("2TiB") == 2 * 2**40
    assert parse_size(1234) == 1234
    with pytest.raises(ValueError):
        parse_size(-1)
