"""Every error of the command line is one line on stderr and a non-zero exit: 2 for a usage
error as for any other (1 means "ran and found a problem", e.g. ``audit``); never a
traceback unless ``--verbose`` asks for one.

Run through the installed console script (``.venv/bin/ccat_data_transfer``) in a
subprocess, on the typer and click versions a fresh install resolves.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import DEFAULT_TOPOLOGY
from helpers_cli import SCRIPT, assert_one_line_error, run_script


@pytest.fixture
def initialised(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    done = run_script(["init"], data)
    assert done.returncode == 0, done.stderr
    return data


def test_console_script_is_the_installed_one():
    assert SCRIPT.is_file(), f"run scripts/setup-venv: {SCRIPT} is missing"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["no-such-command"], ["No such command", "--help"]),
        (["list-locations", "--bogus-option"], ["No such option: --bogus-option"]),
        (["package", "show"], ["Missing argument"]),
        (["audit", "--sample", "5"], ["Invalid value for '--sample'"]),
        (["stage", "list", "--limit", "many"], ["Invalid value"]),
        (["run", "--simulate", "--site", "ccat"], ["--site cannot be used with --simulate"]),
    ],
    ids=[
        "unknown-command",
        "unknown-option",
        "missing-argument",
        "out-of-range",
        "not-int",
        "conflict",
    ],
)
def test_usage_errors_are_one_line_and_exit_2(tmp_path, args, words):
    result = run_script(args, tmp_path / "data")
    assert_one_line_error(result, 2, "error:", *words)


def test_postgresql_url_without_driver_means_psycopg3(tmp_path):
    # Nothing listens on port 1: the error is the connection's, not a missing psycopg2.
    for scheme in ("postgresql", "postgres"):
        result = run_script(
            ["list-locations"],
            tmp_path / "data",
            CCAT_DATA_TRANSFER_DATABASE_URL=f"{scheme}://nobody:pw@127.0.0.1:1/x",
        )
        line = assert_one_line_error(result, 2, "cannot reach the database")
        assert "psycopg2" not in line and "pw" not in line


def test_postgresql_url_without_driver_works_against_a_real_server(db_url, tmp_path):
    if not db_url.startswith("postgresql"):
        pytest.skip("a PostgreSQL URL")
    plain_url = db_url.replace("postgresql+psycopg://", "postgresql://", 1)
    result = run_script(["init"], tmp_path / "data", CCAT_DATA_TRANSFER_DATABASE_URL=plain_url)
    assert result.returncode == 0, result.stderr
    listing = run_script(
        ["list-locations", "--json"], tmp_path / "data", CCAT_DATA_TRANSFER_DATABASE_URL=plain_url
    )
    assert listing.returncode == 0, listing.stderr
    assert "cologne_lta" in listing.stdout


@pytest.mark.parametrize("url", ["mysql://u:secret@127.0.0.1/x", "postgresql+psycopg2://u@h/x"])
def test_unsupported_database_url_is_refused_in_one_line_naming_the_schemes(tmp_path, url):
    result = run_script(["list-locations"], tmp_path / "data", CCAT_DATA_TRANSFER_DATABASE_URL=url)
    line = assert_one_line_error(result, 2, "DATABASE_URL", "sqlite:///", "postgresql://")
    assert "secret" not in line


def test_s3_access_key_without_secret_is_one_line(initialised, tmp_path):
    topology = tmp_path / "with_s3.toml"
    topology.write_text(
        DEFAULT_TOPOLOGY.read_text()
        + '\n[[locations]]\nname = "us_s3"\nsite = "us"\ntype = "long_term_archive"\n'
        'storage = "s3"\nbucket = "archive"\nendpoint_url = "http://127.0.0.1:1"\n'
    )
    assert run_script(["init", "-t", str(topology)], initialised).returncode == 0
    result = run_script(
        ["audit", "--location", "us_s3"],
        initialised,
        CCAT_DATA_TRANSFER_S3_ACCESS_KEY_ID="AKIAEXAMPLE",
        CCAT_DATA_TRANSFER_S3_SECRET_ACCESS_KEY="",
    )
    assert_one_line_error(result, 2, "S3_ACCESS_KEY_ID is set", "S3_SECRET_ACCESS_KEY is empty")


def test_operator_error_is_one_line_and_exit_2(initialised):
    result = run_script(["package", "show", "no-such-package"], initialised)
    assert_one_line_error(result, 2, "error:", "no-such-package")


def test_unexpected_error_is_one_line_with_a_hint_and_verbose_shows_the_traceback(initialised):
    env = {"CCAT_DATA_TRANSFER_PROMETHEUS_PORT": "not-a-port"}
    result = run_script(["metrics", "--serve"], initialised, **env)
    assert_one_line_error(result, 2, "unexpected ValueError", "not-a-port", "--verbose")
    verbose = run_script(["--verbose", "metrics", "--serve"], initialised, **env)
    assert verbose.returncode == 2
    assert "Traceback (most recent call last)" in verbose.stderr
    assert verbose.stderr.strip().splitlines()[-1].startswith("error: unexpected ValueError")
