"""The command line's core commands and its error handling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib

from ccat_data_transfer.cli import main
from conftest import DEFAULT_TOPOLOGY

CLI = [sys.executable, "-m", "ccat_data_transfer"]


def _run(args, tmp_path, **env):
    full_env = {**os.environ, "CCAT_DATA_TRANSFER_DATA_DIR": str(tmp_path / "data"), **env}
    full_env.pop("CCAT_DATA_TRANSFER_DATABASE_URL", None)
    full_env.update(env)
    return subprocess.run(CLI + args, capture_output=True, text=True, env=full_env, timeout=120)


def test_init_then_list_locations_shows_default_topology(tmp_path):
    first = _run(["init"], tmp_path)
    assert first.returncode == 0, first.stderr
    assert "database ready" in first.stdout
    again = _run(["init"], tmp_path)
    assert again.returncode == 0 and "0 created, 0 updated" in again.stdout
    listing = _run(["list-locations"], tmp_path)
    assert listing.returncode == 0, listing.stderr
    topology = tomllib.loads(DEFAULT_TOPOLOGY.read_text())
    for name in (loc["name"] for loc in topology["locations"]):
        assert name in listing.stdout
    as_json = json.loads(_run(["list-locations", "--json"], tmp_path).stdout)
    assert {row["site"] for row in as_json} >= {"ccat", "cologne", "us"}


def test_bad_topology_prints_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[[[ not toml")
    result = _run(["init", "--topology", str(bad)], tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "not valid TOML" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unknown_topology_file_is_a_clear_error(tmp_path):
    result = _run(["init", "--topology", str(tmp_path / "missing.toml")], tmp_path)
    assert result.returncode == 2
    assert "no such file" in result.stderr and "Traceback" not in result.stderr


def test_unreachable_database_is_a_clear_error(tmp_path):
    result = _run(
        ["list-locations"],
        tmp_path,
        CCAT_DATA_TRANSFER_DATABASE_URL="postgresql+psycopg://nobody@127.0.0.1:1/x",
    )
    assert result.returncode == 2
    assert "cannot reach the database" in result.stderr
    assert "Traceback" not in result.stderr


def test_list_locations_before_init_says_to_run_init(tmp_path):
    result = _run(["list-locations"], tmp_path)
    assert result.returncode == 2
    assert "ccat_data_transfer init" in result.stderr


def test_version(capsys):
    assert main(["--version"]) == 0
    assert "ccat_data_transfer" in capsys.readouterr().out
