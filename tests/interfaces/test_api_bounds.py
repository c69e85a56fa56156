"""The API never answers 5xx to bad input: out-of-range numbers are 4xx, and request
bodies over API_MAX_BODY_BYTES are refused (413) before they are parsed."""

from __future__ import annotations

import httpx
import pytest
from fastapi.testclient import TestClient

from ccat_data_transfer.api.app import create_app
from ccat_data_transfer.api.auth import create_api_token
from helpers_api_server import api_server


@pytest.fixture
def client(system):
    with system.session() as s:
        admin = create_api_token(s, "root", "admin")
    app = create_app(database_url=system.url)
    with TestClient(app, raise_server_exceptions=False) as c:
        c.headers["Authorization"] = f"Bearer {admin}"
        yield c


@pytest.mark.parametrize(
    "url",
    [
        "/api/v1/packages/99999999999999999999",
        "/api/v1/packages/²",
        "/api/v1/staging-jobs/99999999999999999999",
        "/dashboard/api/packages/99999999999999999999",
        "/dashboard/packages/33082996827278001178088432467968",
        "/dashboard/api/packages?page=62195880634866393466011648",
        "/dashboard/api/packages?page=9999999",
    ],
)
def test_out_of_range_numbers_are_a_4xx(client, url):
    r = client.get(url)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)


def test_a_staging_request_with_huge_numbers_is_422(client):
    for body in (
        {"package_ids": [2**70]},
        {"executed_obs_unit": 2**40},
        {"package_ids": [1], "retention_minutes": 10**20},
    ):
        r = client.post("/api/v1/staging-jobs", json=body)
        assert r.status_code == 422, (body, r.status_code, r.text)


def test_an_unsupported_method_lists_every_allowed_method(client):
    r = client.request("OPTIONS", "/api/v1/staging-jobs")
    assert r.status_code == 405
    assert set(r.headers["allow"].split(", ")) >= {"GET", "POST"}


def test_a_body_declared_too_large_is_refused_before_it_is_read(client, override_settings):
    override_settings(API_MAX_BODY_BYTES=1000)
    r = client.post(
        "/api/v1/files",
        content=b"{" + b" " * 5000 + b"}",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413 and "API_MAX_BODY_BYTES" in r.json()["detail"]


def test_a_streamed_body_is_counted_and_refused_past_the_limit(client, override_settings):
    override_settings(API_MAX_BODY_BYTES=1000)
    sent = []

    def chunks():
        for _ in range(100):
            sent.append(1)
            yield b" " * 500

    r = client.post("/api/v1/files", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413, r.text


def test_a_96_mb_filing_body_is_refused_by_a_real_server_without_being_parsed(tmp_path):
    with api_server(tmp_path, API_MAX_BODY_BYTES="1048576") as server:
        token = server.token("--user", "daq", "--role", "instrument", "--instrument", "primecam")
        headers = {"Authorization": f"Bearer {token}", "content-type": "application/json"}
        big = b'{"location": "primecam_raw_data", "files": [' + b" " * (96 * 1024 * 1024) + b"]}"
        r = httpx.post(f"{server.base_url}/api/v1/files", content=big, headers=headers, timeout=60)
        assert r.status_code == 413

        def streamed():
            yield b'{"location": "primecam_raw_data", "files": ['
            for _ in range(96):
                yield b" " * (1024 * 1024)
            yield b"]}"

        r = httpx.post(
            f"{server.base_url}/api/v1/files", content=streamed(), headers=headers, timeout=60
        )
        assert r.status_code == 413
        small = httpx.post(
            f"{server.base_url}/api/v1/files",
            json={"location": "primecam_raw_data", "files": []},
            headers=headers,
        )
        assert small.status_code == 422  # under the limit: parsed and validated
