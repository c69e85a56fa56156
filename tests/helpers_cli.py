"""The installed console script in a subprocess, as a person runs it, and the check
that an error is one line on stderr with its exit code.  Shared by the CLI tests of every
room."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(sys.executable).with_name("ccat_data_transfer")


def run_script(args: list[str], data_dir: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CCAT_DATA_TRANSFER_")}
    full_env.update({"CCAT_DATA_TRANSFER_DATA_DIR": str(data_dir), "COLUMNS": "100", **env})
    return subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, env=full_env, timeout=120
    )


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *words: str) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]
