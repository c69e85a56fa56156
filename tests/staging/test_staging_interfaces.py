"""Staging through its two front doors: the command line and the REST API."""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select

from ccat_data_transfer.api import staging as staging_api
from ccat_data_transfer.api.app import create_app
from ccat_data_transfer.api.auth import create_api_token
from ccat_data_transfer.cli import main
from ccat_ops_db import models as m
from helpers_staging import file_copies, make_archived_package

S = m.PhysicalCopyStatus


# --- command line -----------------------------------------------------------------------


def test_cli_stage_list_manager_and_done(system, capsys):
    with system.session() as s:
        a = make_archived_package(system, s).id
        b = make_archived_package(system, s).id
    assert main(["stage", "--package", f"{a},{b}", "--retention", "90", "--name", "run1"]) == 0
    out = capsys.readouterr().out
    assert "staging job 1 created: 2 package(s) to processing_scratch" in out

    assert main(["stage", "list"]) == 0
    table = capsys.readouterr().out
    assert "run1" in table and "PENDING" in table and "0/2" in table

    assert main(["staging-manager", "--once"]) == 0
    assert json.loads(capsys.readouterr().out)["claimed"] == 1
    assert main(["stage", "list", "--json"]) == 0
    [job] = json.loads(capsys.readouterr().out)
    assert job["status"] == "COMPLETED" and job["packages_done"] == 2 and job["active"]
    with system.session() as s:
        assert len(file_copies(s, a, "processing_scratch", [S.PRESENT])) == 3

    assert main(["stage", "done", "1"]) == 0
    assert "staging job 1 is inactive" in capsys.readouterr().out
    with system.session() as s:
        assert s.get(m.StagingJob, 1).active is False


def test_cli_stage_by_obs_unit_and_by_time_range(system, capsys):
    with system.session() as s:
        pkg = make_archived_package(system, s)
        eou = pkg.executed_obs_unit.name
    assert main(["stage", "--obs-unit", eou, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["package_ids"] == [pkg.id]
    args = [
        "stage",
        "--instrument",
        "primecam",
        "--from",
        "2024-05-01T00:00",
        "--to",
        "2024-05-02T00:00",
        "--json",
    ]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["package_ids"] == [pkg.id]


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["stage", "--package", "1", "--destination", "us_lta"], "PROCESSING"),
        (["stage", "--package", "x"], "not a package ID"),
        (
            ["stage", "--instrument", "primecam", "--from", "yesterday", "--to", "2024-01-01"],
            "not an ISO 8601 time",
        ),
        (["stage", "done", "77"], "no staging job 77"),
    ],
)
def test_cli_bad_input_is_one_line_without_traceback(system, capsys, args, text):
    with system.session() as s:
        make_archived_package(system, s)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert text in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


# --- REST API ---------------------------------------------------------------------------


@pytest.fixture
def api(system):
    with system.session() as s:
        tokens = {
            name: create_api_token(s, name, role)
            for name, role in (
                ("alice", "scientist"),
                ("bob", "scientist"),
                ("root", "admin"),
                ("vera", "viewer"),
            )
        }
    app: FastAPI = create_app(database_url=system.url)
    if not any(getattr(r, "path", "").startswith("/api/v1/staging-jobs") for r in app.routes):
        app.include_router(staging_api.router)
    client = TestClient(app, raise_server_exceptions=False)
    client.headers_for = lambda name: {"Authorization": f"Bearer {tokens[name]}"}
    yield client
    client.close()


def test_api_create_follow_and_finish_a_job(system, api):
    from ccat_data_transfer import staging_manager

    with system.session() as s:
        pkg_id = make_archived_package(system, s).id
    r = api.post(
        "/api/v1/staging-jobs",
        json={"package_ids": [pkg_id], "retention_minutes": 120},
        headers=api.headers_for("alice"),
    )
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["user"] == "alice" and job["status"] == "PENDING" and job["packages_total"] == 1

    with system.session() as s:
        staging_manager.run_once(s)
    r = api.get(f"/api/v1/staging-jobs/{job['id']}", headers=api.headers_for("bob"))
    assert r.status_code == 200 and r.json()["status"] == "COMPLETED"
    listed = api.get("/api/v1/staging-jobs?mine=true", headers=api.headers_for("alice")).json()
    assert [j["id"] for j in listed] == [job["id"]]
    assert api.get("/api/v1/staging-jobs?mine=true", headers=api.headers_for("bob")).json() == []

    r = api.post(f"/api/v1/staging-jobs/{job['id']}/done", headers=api.headers_for("bob"))
    assert r.status_code == 403 and "another user" in r.json()["detail"]
    r = api.post(f"/api/v1/staging-jobs/{job['id']}/done", headers=api.headers_for("alice"))
    assert r.status_code == 200 and r.json()["active"] is False
    assert r.json()["deactivated_at"] is not None


def test_api_admin_may_finish_anyones_job(system, api):
    with system.session() as s:
        pkg_id = make_archived_package(system, s).id
    job = api.post(
        "/api/v1/staging-jobs", json={"package_ids": [pkg_id]}, headers=api.headers_for("alice")
    ).json()
    r = api.post(f"/api/v1/staging-jobs/{job['id']}/done", headers=api.headers_for("root"))
    assert r.status_code == 200 and r.json()["active"] is False


@pytest.mark.parametrize(
    ("body", "code", "text"),
    [
        ({"package_ids": [424242]}, 404, "424242"),
        ({"destination": "nowhere"}, 404, "unknown data location"),
        ({"destination": "cologne_buffer"}, 400, "PROCESSING"),
        (
            {
                "instrument": "primecam",
                "start": "2024-01-02T00:00:00Z",
                "end": "2024-01-01T00:00:00Z",
                "package_ids": None,
            },
            400,
            "empty",
        ),
        ({"retention_minutes": -5}, 422, ""),
    ],
)
def test_api_bad_requests_are_4xx_with_a_reason(system, api, body, code, text):
    with system.session() as s:
        pkg_id = make_archived_package(system, s).id
    r = api.post(
        "/api/v1/staging-jobs",
        json={"package_ids": [pkg_id], **body},
        headers=api.headers_for("alice"),
    )
    assert r.status_code == code, r.text
    assert text in json.dumps(r.json())
    with system.session() as s:
        assert s.scalars(select(m.StagingJob)).all() == []


def test_api_needs_a_scientist_token(system, api):
    assert api.get("/api/v1/staging-jobs").status_code == 401
    assert api.get("/api/v1/staging-jobs", headers=api.headers_for("vera")).status_code == 403
    assert api.get("/api/v1/staging-jobs", headers=api.headers_for("root")).status_code == 200
    assert api.get("/api/v1/staging-jobs/5", headers=api.headers_for("alice")).status_code == 404
