"""API tokens carry their own role and scope; token create/list/revoke through the CLI."""

from __future__ import annotations

import hashlib

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from ccat_data_transfer.api.app import create_app
from ccat_data_transfer.api.auth import create_api_token, hash_token
from ccat_data_transfer.core.errors import ValidationError
from ccat_ops_db import models as m
from helpers_api_server import api_server

SRC = "primecam_raw_data"


def _body(system, rel, location=SRC, module="primecam/280GHz"):
    data = b"payload-" + rel.encode()
    path = system.location_path(location) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    entry = {
        "relative_path": rel,
        "size": len(data),
        "checksum": hashlib.sha256(data).hexdigest(),
        "executed_obs_unit": "eou-tokens",
        "instrument_module": module,
    }
    return {"location": location, "files": [entry]}


@pytest.fixture
def client(system):
    with TestClient(create_app(database_url=system.url), raise_server_exceptions=False) as c:
        yield c


def _bearer(token):
    return {"Authorization": f"Bearer {token}"}


def test_a_viewer_token_cannot_file_after_an_admin_token_is_made_for_the_same_user(system, client):
    with system.session() as s:
        viewer = create_api_token(s, "operator", "viewer")
        admin = create_api_token(s, "operator", "admin")
    body = _body(system, "a.fits")
    assert client.post("/api/v1/files", json=body, headers=_bearer(viewer)).status_code == 403
    assert client.post("/api/v1/files", json=body, headers=_bearer(admin)).status_code == 201


def _other_source(system) -> tuple[str, str, str]:
    """Another instrument's SOURCE location, that instrument, and one of its modules."""
    with system.session() as s:
        rows = s.scalars(
            select(m.DataLocation).where(m.DataLocation.location_type == m.LocationType.SOURCE)
        ).all()
        others = [
            (loc.name, loc.instrument.name)
            for loc in rows
            if loc.instrument is not None and loc.instrument.name != "primecam"
        ]
    assert others, "the default topology has SOURCE locations of two instruments"
    other_location, other_instrument = others[0]
    with system.session() as s:
        module = s.scalars(
            select(m.InstrumentModule)
            .join(m.Instrument)
            .where(m.Instrument.name == other_instrument)
        ).first()
        return other_location, other_instrument, f"{other_instrument}/{module.name}"


def test_an_instrument_token_files_only_into_its_instruments_source_locations(system, client):
    other_location, other_instrument, other_module = _other_source(system)
    with system.session() as s:
        scoped = create_api_token(s, "primecam-daq", "instrument", instrument="primecam")
    foreign = _body(system, "b.fits", other_location, other_module)
    r = client.post("/api/v1/files", json=foreign, headers=_bearer(scoped))
    assert r.status_code == 403, r.text
    assert "primecam" in r.json()["detail"]["reason"]
    with system.session() as s:
        assert s.scalars(select(m.RawDataFile)).first() is None
    own = client.post("/api/v1/files", json=_body(system, "c.fits"), headers=_bearer(scoped))
    assert own.status_code == 201, own.text


def test_an_instrument_token_must_name_its_instrument(system):
    with system.session() as s, pytest.raises(ValidationError, match="--instrument"):
        create_api_token(s, "daq", "instrument")


def test_an_unscoped_instrument_token_from_before_scopes_may_not_file_or_finish(system, client):
    # A token row made before scopes were required (no instrument) would file anywhere.
    legacy = "ccat_legacy-unscoped-instrument-token"
    with system.session() as s:
        create_api_token(s, "primecam-daq", "instrument", instrument="primecam")
        scoped_row = s.scalars(select(m.ApiToken)).one()
        s.add(
            m.ApiToken(
                user=scoped_row.user,
                role=scoped_row.role,
                instrument=None,
                name="legacy",
                token_hash=hash_token(legacy),
            )
        )
    r = client.post("/api/v1/files", json=_body(system, "d.fits"), headers=_bearer(legacy))
    assert r.status_code == 403, r.text
    assert "no instrument scope" in r.json()["detail"]
    with system.session() as s:
        assert s.scalars(select(m.RawDataFile)).first() is None
    r = client.post("/api/v1/executed-obs-units/eou-tokens/finish", headers=_bearer(legacy))
    assert r.status_code == 403, r.text


def test_an_instrument_token_finishes_only_its_instruments_obs_units(system, client):
    other_location, other_instrument, other_module = _other_source(system)
    with system.session() as s:
        scoped = create_api_token(s, "primecam-daq", "instrument", instrument="primecam")
        admin = create_api_token(s, "operator", "admin")
    foreign = _body(system, "e.fits", other_location, other_module)
    foreign["files"][0]["executed_obs_unit"] = "eou-other"
    assert client.post("/api/v1/files", json=foreign, headers=_bearer(admin)).status_code == 201
    own = _body(system, "f.fits")
    assert client.post("/api/v1/files", json=own, headers=_bearer(scoped)).status_code == 201

    def finish(name, token):
        return client.post(f"/api/v1/executed-obs-units/{name}/finish", headers=_bearer(token))

    refused = finish("eou-other", scoped)
    assert refused.status_code == 403, refused.text
    assert other_instrument in str(refused.json()["detail"])
    with system.session() as s:
        other = s.scalars(select(m.ExecutedObsUnit).filter_by(name="eou-other")).one()
        assert other.finished_at is None
    assert finish("eou-tokens", scoped).status_code == 200
    assert finish("eou-other", admin).status_code == 200
    assert finish("eou-unknown", scoped).status_code == 404


def test_a_token_records_when_it_was_last_used(system, client):
    with system.session() as s:
        token = create_api_token(s, "reader", "viewer")
    client.get("/api/v1/packages/1", headers=_bearer(token))
    with system.session() as s:
        assert s.scalars(select(m.ApiToken)).one().last_used_at is not None


def test_token_commands_create_list_and_revoke_through_the_console_script(tmp_path):
    with api_server(tmp_path) as server:
        created = server.cli(
            "token", "create", "--user", "daq", "--role", "instrument", "--instrument", "primecam"
        )
        assert created.returncode == 0, created.stderr
        secret = created.stdout.strip()
        assert secret.startswith("ccat_") and "instrument primecam" in created.stderr
        health = httpx.get(f"{server.base_url}/api/v1/packages/1", headers=_bearer(secret))
        assert health.status_code == 404  # authenticated: the package does not exist
        listed = server.cli("token", "list")
        assert listed.returncode == 0, listed.stderr
        assert secret not in listed.stdout
        row = next(line for line in listed.stdout.splitlines() if "daq" in line)
        for word in ("instrument", "primecam", "no"):
            assert word in row
        assert "never" not in row  # it was used just now
        token_id = row.split("│")[1].strip() if "│" in row else row.split()[0]
        revoked = server.cli("token", "revoke", token_id)
        assert revoked.returncode == 0 and "revoked" in revoked.stdout
        after = httpx.get(f"{server.base_url}/api/v1/packages/1", headers=_bearer(secret))
        assert after.status_code == 401
        assert "yes" in next(
            line for line in server.cli("token", "list").stdout.splitlines() if "daq" in line
        )
        assert server.cli("token", "revoke", "9999").returncode == 2
        wrong = server.cli(
            "token", "create", "--user", "v", "--role", "viewer", "--instrument", "primecam"
        )
        assert wrong.returncode == 2 and "instrument token" in wrong.stderr
