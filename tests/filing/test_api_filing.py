"""REST API: authentication, filing, finishing, package state; hostile input fuzzed."""

from __future__ import annotations

import hashlib
import json

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from ccat_data_transfer.api.app import create_app
from ccat_data_transfer.api.auth import create_api_token
from ccat_data_transfer.packaging import raw_cycle
from ccat_ops_db import models as m
from helpers_pipeline import make_raw_files

SRC = "primecam_raw_data"


@pytest.fixture
def api(system):
    with system.session() as s:
        tokens = {
            role: create_api_token(
                s, f"user-{role}", role, instrument="primecam" if role == "instrument" else None
            )
            for role in ("admin", "instrument", "scientist", "viewer")
        }
    client = TestClient(create_app(database_url=system.url), raise_server_exceptions=False)
    client.tokens = tokens
    client.system = system
    yield client
    client.close()


def _auth(api, role):
    return {"Authorization": f"Bearer {api.tokens[role]}"}


def _entry(system, rel, data=b"payload", eou="eou-api"):
    path = system.location_path(SRC) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {
        "relative_path": rel,
        "size": len(data),
        "checksum": hashlib.sha256(data).hexdigest(),
        "executed_obs_unit": eou,
        "instrument_module": "primecam/280GHz",
    }


def _counts(system):
    with system.session() as s:
        return tuple(
            s.scalar(select(func.count()).select_from(t))
            for t in (m.RawDataFile, m.PhysicalCopy, m.ExecutedObsUnit, m.ObsUnit)
        )


def test_filing_without_a_token_is_401(api):
    r = api.post("/api/v1/files", json={"location": SRC, "files": []})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    bad = api.post("/api/v1/files", json={}, headers={"Authorization": "Bearer not-a-token"})
    assert bad.status_code == 401


def test_filing_with_a_token_without_the_role_is_403(api):
    body = {"location": SRC, "files": [_entry(api.system, "r.fits")]}
    for role in ("viewer", "scientist"):
        r = api.post("/api/v1/files", json=body, headers=_auth(api, role))
        assert r.status_code == 403, r.text
    assert _counts(api.system) == (0, 0, 0, 0)


def test_revoked_token_is_401(api):
    with api.system.session() as s:
        for t in s.scalars(select(m.ApiToken)):
            t.revoked = True
    r = api.get("/api/v1/packages/1", headers=_auth(api, "viewer"))
    assert r.status_code == 401


def test_instrument_files_a_batch_then_refiles_it_idempotently(api):
    body = {
        "location": SRC,
        "files": [_entry(api.system, f"d/{i}.fits", bytes([i]) * 9) for i in range(3)],
    }
    r = api.post("/api/v1/files", json=body, headers=_auth(api, "instrument"))
    assert r.status_code == 201, r.text
    assert r.json()["created"] == 3
    again = api.post("/api/v1/files", json=body, headers=_auth(api, "admin"))
    assert again.status_code == 201 and again.json()["unchanged"] == 3
    assert [f["id"] for f in again.json()["files"]] == [f["id"] for f in r.json()["files"]]
    assert _counts(api.system)[0] == 3


def test_conflicting_refiling_is_409_with_a_reason(api):
    entry = _entry(api.system, "c.fits")
    headers = _auth(api, "instrument")
    assert (
        api.post(
            "/api/v1/files", json={"location": SRC, "files": [entry]}, headers=headers
        ).status_code
        == 201
    )
    before = _counts(api.system)
    entry["checksum"] = "f" * 64
    r = api.post("/api/v1/files", json={"location": SRC, "files": [entry]}, headers=headers)
    assert r.status_code == 409
    assert "different checksum" in r.json()["detail"]["problems"][0]["reason"]
    assert _counts(api.system) == before


def test_finish_endpoint_and_package_endpoint(api):
    make_raw_files(api.system, SRC, "eou-fin", "primecam/280GHz", 2, 50)
    headers = _auth(api, "instrument")
    r = api.post("/api/v1/executed-obs-units/eou-fin/finish", headers=headers)
    assert r.status_code == 200 and r.json()["status"] == "COMPLETED"
    assert api.post("/api/v1/executed-obs-units/nope/finish", headers=headers).status_code == 404
    assert (
        api.post(
            "/api/v1/executed-obs-units/eou-fin/finish", headers=_auth(api, "viewer")
        ).status_code
        == 403
    )
    with api.system.session() as s:
        raw_cycle.run_once(s)
        pkg = s.scalars(select(m.RawDataPackage)).one()
    for ident in (str(pkg.id), pkg.file_name):
        got = api.get(f"/api/v1/packages/{ident}", headers=_auth(api, "viewer"))
        assert got.status_code == 200, got.text
        data = got.json()
        assert data["id"] == pkg.id and len(data["files"]) == 2
        assert data["physical_copies"][0]["location"] == "ccat_telescope_buffer"
    assert api.get("/api/v1/packages/999", headers=_auth(api, "viewer")).status_code == 404
    assert api.get("/api/v1/packages/1").status_code == 401


def test_openapi_schema_lists_the_endpoints(api):
    paths = api.get("/openapi.json").json()["paths"]
    assert {
        "/api/v1/files",
        "/api/v1/executed-obs-units/{name}/finish",
        "/api/v1/packages/{ident}",
    } <= set(paths)


# --- fuzzing -----------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
_hostile_path = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "../x",
            "/abs",
            "a/../../b",
            "raw_data_packages/p.tar",
            "",
            ".",
            "a\x00b",
            "\ud800",
            "a\\..\\b",
            "x" * 5000,
            "ok.fits",
            "ok.fits/",
        ]
    ),
)
_hostile_entry = st.fixed_dictionaries(
    {
        "relative_path": _hostile_path,
        "size": st.one_of(st.integers(), st.just(7), st.integers(min_value=2**63)),
        "checksum": st.one_of(
            st.text(max_size=70), st.just("0" * 64), st.just(hashlib.sha256(b"payload").hexdigest())
        ),
        "executed_obs_unit": st.one_of(st.text(max_size=300), st.just("eou-ok")),
        "instrument_module": st.one_of(
            st.text(max_size=30), st.sampled_from(["primecam/280GHz", "chai/LFA", "x/y"])
        ),
    },
    optional={
        "metadata": _json,
        "obs_unit": st.text(max_size=20),
        "checksum_algorithm": st.sampled_from(["sha256", "md5", ""]),
        "extra": _json,
    },
)
_body = st.one_of(
    _json,
    st.fixed_dictionaries(
        {
            "location": st.one_of(
                st.text(max_size=20),
                st.sampled_from([SRC, "ccat_telescope_buffer", "chai_raw_data"]),
            ),
            "files": st.one_of(st.lists(_hostile_entry, max_size=4), _json),
        }
    ),
)


def _is_valid_by_chance(body):
    """A generated body that happens to be a correct filing of the real file."""
    try:
        files = body["files"]
        return (
            body["location"] == SRC
            and files
            and all(
                f.get("relative_path") == "ok.fits"
                and f.get("size") == 7
                and f.get("checksum") == hashlib.sha256(b"payload").hexdigest()
                and f.get("instrument_module") == "primecam/280GHz"
                and set(f)
                <= {
                    "relative_path",
                    "size",
                    "checksum",
                    "executed_obs_unit",
                    "instrument_module",
                    "checksum_algorithm",
                }
                and f.get("checksum_algorithm", "sha256") == "sha256"
                and f.get("executed_obs_unit") == "eou-ok"
                for f in files
            )
        )
    except Exception:
        return False


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=_body)
@example(body=float("inf"))  # once echoed by FastAPI's default 422 handler: a 500
@example(body={"location": SRC, "files": [{"relative_path": "\ud800", "size": float("nan")}]})
@example(body={"location": "\udc00", "files": [{"\ud800": 1}]})
def test_hostile_filings_get_a_4xx_and_write_nothing(api, body):
    (api.system.location_path(SRC) / "ok.fits").write_bytes(b"payload")
    if _is_valid_by_chance(body):
        return
    before = _counts(api.system)
    # ensure_ascii escapes lone surrogates, so hostile text reaches the server intact.
    r = api.post(
        "/api/v1/files",
        content=json.dumps(body).encode(),
        headers={**_auth(api, "instrument"), "Content-Type": "application/json"},
    )
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert "detail" in r.json()
    assert _counts(api.system) == before


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(raw=st.binary(max_size=200))
def test_malformed_bytes_get_a_4xx(api, raw):
    before = _counts(api.system)
    r = api.post(
        "/api/v1/files",
        content=raw,
        headers={**_auth(api, "instrument"), "Content-Type": "application/json"},
    )
    assert 400 <= r.status_code < 500
    assert _counts(api.system) == before


def _kill_backends(url: str) -> int:
    """Terminate every other connection to the test database (as a PostgreSQL restart
    does to its clients); returns how many."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    side = create_engine(url, poolclass=NullPool)
    try:
        with side.connect() as conn:
            killed = conn.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = :db AND pid <> pg_backend_pid()"
                ),
                {"db": make_url(url).database},
            ).scalar()
            conn.commit()
    finally:
        side.dispose()
    return int(killed or 0)


def test_a_lost_database_connection_during_a_filing_is_503_with_retry_after_and_nothing_filed(
    api, monkeypatch
):
    if not api.system.url.startswith("postgresql"):
        pytest.skip("a connection to lose needs a database server (PostgreSQL)")
    from ccat_data_transfer.api import filing as filing_routes

    real = filing_routes.file_raw_data_files
    kills: list[int] = []

    def file_then_lose_the_connection(*args, **kwargs):
        result = real(*args, **kwargs)  # every row written (flushed), not committed
        kills.append(_kill_backends(api.system.url))
        return result

    monkeypatch.setattr(filing_routes, "file_raw_data_files", file_then_lose_the_connection)
    body = {
        "location": SRC,
        "files": [_entry(api.system, f"pg/{i}.fits", bytes([i]) * 9) for i in range(3)],
    }
    r = api.post("/api/v1/files", json=body, headers=_auth(api, "instrument"))
    assert kills and kills[0] >= 1
    assert r.status_code == 503, r.text
    assert int(r.headers["retry-after"]) > 0
    assert "database" in r.json()["detail"] and "retry" in r.json()["detail"]
    assert _counts(api.system) == (0, 0, 0, 0)  # none of the batch
    monkeypatch.setattr(filing_routes, "file_raw_data_files", real)
    again = api.post("/api/v1/files", json=body, headers=_auth(api, "instrument"))
    assert again.status_code == 201, again.text
    assert again.json()["created"] == 3 and _counts(api.system)[0] == 3


def test_an_unreachable_database_is_503_with_retry_after(api, tmp_path):
    # SQLite: a file that cannot be opened; PostgreSQL: a port nobody listens on.
    url = (
        f"sqlite:///{tmp_path}/no/such/dir/ops.sqlite"
        if api.system.url.startswith("sqlite")
        else "postgresql+psycopg://postgres@127.0.0.1:9/ccat"
    )
    client = TestClient(create_app(database_url=url), raise_server_exceptions=False)
    body = {"location": SRC, "files": [_entry(api.system, "u.fits")]}
    r = client.post("/api/v1/files", json=body, headers=_auth(api, "instrument"))
    assert r.status_code == 503, r.text
    assert int(r.headers["retry-after"]) > 0 and "database" in r.json()["detail"]
    client.close()
