"""What the archives hold, read by the clients the observatory's team uses: after the main
job, every package at both LTA sites lists and extracts with GNU tar, its bytes hash with
``openssl dgst -sha256`` to the package's checksum, and every member to its file's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from ccat_data_transfer.core.database import DatabaseConnection, dispose_engines
from ccat_ops_db import models as m
from helpers_lifecycle import lta_package_copies


def _client(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is required in CI")
        pytest.skip(f"{name} not installed")
    return path


def _openssl_sha256(openssl: str, path: Path) -> str:
    out = subprocess.run(
        [openssl, "dgst", "-sha256", "-r", str(path)], capture_output=True, text=True, check=True
    ).stdout
    return out.split()[0]


def test_archived_packages_at_both_ltas_read_with_gnu_tar_and_openssl(tmp_path):
    tar, openssl = _client("tar"), _client("openssl")
    data = tmp_path / "data"
    env = {
        **os.environ,
        "CCAT_DATA_TRANSFER_DATA_DIR": str(data),
        "CCAT_DATA_TRANSFER_ENV": "default",
    }
    env.pop("CCAT_DATA_TRANSFER_DATABASE_URL", None)
    run = subprocess.run(
        [sys.executable, "-m", "ccat_data_transfer", "run", "--simulate", "--observations", "2",
         "--files-per-module", "2", "--file-size-mb", "1"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    db = DatabaseConnection(f"sqlite:///{data / 'ops_db.sqlite'}")
    with db.session_scope() as s:
        rows = lta_package_copies(s)
        files = {
            pid: dict(
                s.execute(
                    select(m.RawDataFile.relative_path, m.RawDataFile.checksum).where(
                        m.RawDataFile.raw_data_package_id == pid
                    )
                ).all()
            )
            for pid in {r[0] for r in rows}
        }
    dispose_engines()
    assert files and {r[3] for r in rows} == {"cologne_lta", "us_lta"}
    for package_id in files:  # every package is at both archives
        assert {r[3] for r in rows if r[0] == package_id} == {"cologne_lta", "us_lta"}
    for package_id, checksum, rel, lta, root, _copy in rows:
        package = Path(root) / rel
        assert _openssl_sha256(openssl, package) == checksum, (lta, rel)
        listed = subprocess.run(
            [tar, "-tf", str(package)], capture_output=True, text=True, check=True
        ).stdout.split()
        assert sorted(listed) == sorted(files[package_id]), (lta, rel)
        out = tmp_path / "extract" / lta / str(package_id)
        out.mkdir(parents=True)
        subprocess.run([tar, "-xf", str(package), "-C", str(out)], check=True)
        for name, file_checksum in files[package_id].items():
            assert _openssl_sha256(openssl, out / name) == file_checksum, (lta, name)
