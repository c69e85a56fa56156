"""A private dashboard (DASHBOARD_PUBLIC=false) has a login: a viewer token traded for a
signed HttpOnly cookie; browsers without it are sent to the login page, JSON requests get
401; /metrics follows the same setting."""

from __future__ import annotations

import httpx
import pytest
from fastapi.testclient import TestClient

from ccat_data_transfer.api.app import create_app
from ccat_data_transfer.api.auth import create_api_token
from ccat_data_transfer.api.login import COOKIE
from ccat_ops_db import models as m
from helpers_api_server import api_server

HTML = {"Accept": "text/html,application/xhtml+xml"}


@pytest.fixture
def private(system, override_settings):
    override_settings(DASHBOARD_PUBLIC=False, DASHBOARD_COOKIE_SECRET="test-secret")
    with system.session() as s:
        tokens = {
            "viewer": create_api_token(s, "u-viewer", "viewer"),
            "instrument": create_api_token(s, "u-instrument", "instrument", instrument="primecam"),
        }
    with TestClient(create_app(database_url=system.url), follow_redirects=False) as client:
        yield system, client, tokens


def test_a_browser_without_login_is_redirected_to_the_login_page(private):
    _, client, _ = private
    r = client.get("/dashboard/packages", headers=HTML)
    assert r.status_code == 303
    assert r.headers["location"] == "/dashboard/login?next=/dashboard/packages"
    page = client.get("/dashboard/login", headers=HTML)
    assert page.status_code == 200 and 'name="token"' in page.text
    assert client.get("/dashboard/api/overview", headers=HTML).status_code == 401


def test_login_sets_a_signed_httponly_samesite_cookie_that_opens_the_dashboard(private):
    _, client, tokens = private
    r = client.post(
        "/dashboard/login", data={"token": tokens["viewer"], "next": "/dashboard/staging"}
    )
    assert r.status_code == 303 and r.headers["location"] == "/dashboard/staging"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=") and "HttpOnly" in cookie
    assert "samesite=strict" in cookie.lower()
    assert tokens["viewer"] not in cookie
    assert client.get("/dashboard/staging", headers=HTML).status_code == 200
    assert client.get("/dashboard/api/overview").status_code == 200
    assert client.get("/metrics").status_code == 200
    out = client.post("/dashboard/logout")
    assert out.status_code == 303
    assert client.get("/dashboard/staging", headers=HTML).status_code == 303


def test_login_refuses_bad_tokens_and_tokens_without_the_viewer_role(private):
    _, client, tokens = private
    assert client.post("/dashboard/login", data={"token": "nonsense"}).status_code == 401
    assert client.post("/dashboard/login", data={"token": tokens["instrument"]}).status_code == 403
    assert COOKIE not in client.cookies


def test_a_forged_or_revoked_login_cookie_opens_nothing(private):
    system, client, tokens = private
    client.post("/dashboard/login", data={"token": tokens["viewer"]})
    good = client.cookies[COOKIE]
    token_id, expires, _sig = good.split(".")
    client.cookies.set(COOKIE, f"{int(token_id) + 1}.{expires}.{_sig}")
    assert client.get("/dashboard/api/overview").status_code == 401
    client.cookies.set(COOKIE, good)
    assert client.get("/dashboard/api/overview").status_code == 200
    with system.session() as s:
        s.get(m.ApiToken, int(token_id)).revoked = True
    assert client.get("/dashboard/api/overview").status_code == 401


def test_login_redirects_only_inside_the_dashboard(private):
    _, client, tokens = private
    r = client.post(
        "/dashboard/login", data={"token": tokens["viewer"], "next": "https://evil.example/"}
    )
    assert r.headers["location"] == "/dashboard/"


def test_metrics_need_a_viewer_when_the_dashboard_is_private(private):
    _, client, tokens = private
    assert client.get("/metrics").status_code == 401
    ok = client.get("/metrics", headers={"Authorization": f"Bearer {tokens['viewer']}"})
    assert ok.status_code == 200 and "ccat_" in ok.text
    other = client.get("/metrics", headers={"Authorization": f"Bearer {tokens['instrument']}"})
    assert other.status_code == 403


def test_login_through_a_real_server(tmp_path):
    with api_server(tmp_path, DASHBOARD_PUBLIC="false", DASHBOARD_COOKIE_SECRET="s3") as server:
        viewer = server.token("--user", "night", "--role", "viewer")
        with httpx.Client(base_url=server.base_url, headers=HTML) as browser:
            first = browser.get("/dashboard/", follow_redirects=True)
            assert first.url.path == "/dashboard/login" and 'name="token"' in first.text
            assert browser.get("/metrics").status_code == 401
            done = browser.post(
                "/dashboard/login",
                data={"token": viewer, "next": "/dashboard/"},
                follow_redirects=True,
            )
            assert done.status_code == 200 and done.url.path == "/dashboard/"
            assert "Log out" in done.text
            assert browser.get("/metrics").status_code == 200
