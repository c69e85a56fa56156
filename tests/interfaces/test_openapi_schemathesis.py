"""The OpenAPI document says what the API does: schemathesis (``--checks all``) against a
real API process finds no failure -- no 5xx, no undocumented status, auth declared where
it is enforced and only there, the schema's validation rules equal to the API's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers_api_server import api_server

pytestmark = pytest.mark.slow

SCHEMATHESIS = str(Path(sys.executable).with_name("schemathesis"))
CONFIG = Path(__file__).parent.parent / "data" / "schemathesis.toml"


@pytest.mark.parametrize("public", ["true", "false"])
def test_schemathesis_finds_no_failure_against_a_real_api(tmp_path, public):
    with api_server(tmp_path, DASHBOARD_PUBLIC=public) as server:
        admin = server.token("--user", "fuzz", "--role", "admin")
        done = subprocess.run(
            [
                SCHEMATHESIS,
                "--config-file",
                str(CONFIG),
                "run",
                f"{server.base_url}/openapi.json",
                "--checks",
                "all",
                "--max-examples",
                "20",
                "--seed",
                "1",
                "--request-timeout",
                "10",
                "--header",
                f"Authorization: Bearer {admin}",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=240,
        )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    generated = re.search(r"(\d+) generated", done.stdout)
    assert generated and int(generated.group(1)) >= 200, done.stdout[-2000:]
