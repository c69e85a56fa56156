"""Secrets: read only from the environment (through the settings), never written to the DB,
the logs or the transfer logs.

Covered elsewhere: REST authentication (401 without / with a revoked token, 403 without
the role, hostile filings) in tests/filing/test_api_filing.py; hostile tars (absolute paths,
``..``, symlinks, hard links, devices, fifos, duplicates) in tests/core/test_tarutil.py and
tests/transfer/test_unpack.py.
"""

from __future__ import annotations

import logging
import re
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import select, text

from ccat_data_transfer import transfer_manager
from ccat_data_transfer.api.auth import create_api_token
from ccat_data_transfer.archive import cycle as archive_manager
from ccat_ops_db import models as m
from ccat_ops_db.topology import load_topology
from helpers_transfer import drive, make_dtp_at_source_buffer

SRC = Path(__file__).resolve().parents[2] / "src"
CONFIG = SRC / "ccat_data_transfer" / "core" / "config.py"
DEFAULT_TOPOLOGY = SRC / "ccat_data_transfer" / "topology" / "default.toml"
ENV_READ = re.compile(
    r"\bos\.environ\b|\bgetenv\s*\(|\bfrom\s+os\s+import\s+[^\n]*\b(environ|getenv)\b"
)


def test_only_the_config_module_reads_the_environment():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path == CONFIG:
            continue
        for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if ENV_READ.search(line):
                offenders.append(f"{path.relative_to(SRC)}:{no}: {line.strip()}")
    assert offenders == [], "read settings via ccat_data_transfer.core.config:\n" + "\n".join(
        offenders
    )


def test_the_environment_check_finds_an_offender(tmp_path):
    assert ENV_READ.search('key = os.environ["SECRET"]')
    assert ENV_READ.search("key = os.getenv('SECRET')")
    assert ENV_READ.search("from os import environ")
    assert not ENV_READ.search("settings.S3_SECRET_ACCESS_KEY")


def _us_lta_on_s3(system: Any, endpoint_url: str, bucket: str) -> None:
    block = (
        '[[locations]]\nname = "us_lta"\nsite = "us"\ntype = "long_term_archive"\n'
        f'storage = "s3"\nbucket = "{bucket}"\nendpoint_url = "{endpoint_url}"\n'
        'prefix = "archive"\n'
    )
    topology, n = re.subn(
        r'\[\[locations\]\]\nname = "us_lta"\n(?:[^\[\n][^\n]*\n)*',
        block + "\n",
        DEFAULT_TOPOLOGY.read_text(),
    )
    assert n == 1
    path = system.data_dir / "topology_s3.toml"
    path.write_text(topology)
    with system.session() as s:
        load_topology(s, path, system.data_dir)


def _db_text(system: Any) -> str:
    """Every value of every row of every table, as one string."""
    chunks = []
    with system.session() as s:
        for table in m.Base.metadata.sorted_tables:
            for row in s.execute(select(table)).all():
                chunks.append(" ".join(str(v) for v in row))
        s.execute(text("SELECT 1"))
    return "\n".join(chunks)


def test_s3_credentials_never_reach_the_db_or_the_logs(
    system, s3_server, s3_bucket, override_settings, caplog, capfd
):
    access = f"AKIA{uuid.uuid4().hex[:16].upper()}"
    secret = f"secret-{uuid.uuid4().hex}"
    override_settings(S3_ACCESS_KEY_ID=access, S3_SECRET_ACCESS_KEY=secret, LOG_LEVEL="DEBUG")
    _us_lta_on_s3(system, s3_server.endpoint_url, s3_bucket)
    with system.session() as s:
        dtp = make_dtp_at_source_buffer(system, s, n_packages=1)
        rdp_id = dtp.raw_data_packages[0].id
    with caplog.at_level(logging.DEBUG):
        drive(system.session, transfer_manager.run_once, archive_manager.run_once, cycles=3)
    with system.session() as s:
        assert s.get(m.RawDataPackage, rdp_id).state == m.PackageState.ARCHIVED
        archived_on_s3 = s.scalars(
            select(m.LongTermArchiveTransfer)
            .join(
                m.DataLocation,
                m.DataLocation.id == m.LongTermArchiveTransfer.destination_location_id,
            )
            .where(m.DataLocation.name == "us_lta")
        ).one()
        assert archived_on_s3.status == m.Status.COMPLETED  # the S3 path really ran
        log_paths = [
            Path(p)
            for p in s.scalars(select(m.DataTransfer.log_path)).all()
            if p and Path(p).exists()
        ]
    out, err = capfd.readouterr()
    transfer_logs = "\n".join(p.read_text() for p in log_paths)
    archive_logs = "\n".join(
        p.read_text() for p in transfer_manager.transfer_log_dir().glob("*.log")
    )
    assert archive_logs, "no transfer log was written"
    places = {
        "database": _db_text(system),
        "log records": "\n".join(r.getMessage() + repr(r.__dict__) for r in caplog.records),
        "stdout/stderr": out + err,
        "transfer logs": transfer_logs + archive_logs,
    }
    for where, content in places.items():
        assert secret not in content, f"the S3 secret key appears in the {where}"
        assert access not in content, f"the S3 access key id appears in the {where}"


def test_api_tokens_are_stored_only_as_hashes(system):
    with system.session() as s:
        token = create_api_token(s, "security-check", "instrument", instrument="primecam")
    assert token not in _db_text(system)
