"""CLI: file, finish-obs-unit, the two managers, package show, token create."""

from __future__ import annotations

import hashlib
import json

from sqlalchemy import select

from ccat_data_transfer.api.auth import hash_token
from ccat_data_transfer.cli import main
from ccat_ops_db import models as m

SRC = "primecam_raw_data"


def _tree(system):
    root = system.location_path(SRC) / "scan-9"
    (root / "sub").mkdir(parents=True)
    (root / "a.fits").write_bytes(b"A" * 1000)
    (root / "sub" / "b.fits").write_bytes(b"B" * 2000)
    return root


def test_file_a_directory_tree_then_package_and_show_it(system, capsys):
    root = _tree(system)
    rc = main(
        [
            "file",
            str(root),
            "--location",
            SRC,
            "--obs-unit",
            "eou-cli",
            "--module",
            "primecam/280GHz",
            "--finish",
        ]
    )
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "filed 2 new files" in out.out and "finished" in out.out
    with system.session() as s:
        files = {f.relative_path: f for f in s.scalars(select(m.RawDataFile))}
        assert set(files) == {"scan-9/a.fits", "scan-9/sub/b.fits"}
        assert files["scan-9/a.fits"].checksum == hashlib.sha256(b"A" * 1000).hexdigest()
        assert files["scan-9/a.fits"].executed_obs_unit.finished_at is not None

    # Filing again is idempotent.
    assert (
        main(
            [
                "file",
                str(root),
                "--location",
                SRC,
                "--obs-unit",
                "eou-cli",
                "--module",
                "primecam/280GHz",
            ]
        )
        == 0
    )
    assert "0 new files, 2 already filed" in capsys.readouterr().out

    assert main(["raw-data-package-manager", "--once"]) == 0
    assert "packages_created=1" in capsys.readouterr().out
    assert main(["data-transfer-package-manager", "--once"]) == 0
    assert "packages_created=1" in capsys.readouterr().out

    with system.session() as s:
        pkg = s.scalars(select(m.RawDataPackage)).one()
    assert main(["package", "show", pkg.file_name]) == 0
    text = capsys.readouterr().out
    for needle in (
        "scan-9/sub/b.fits",
        "ccat_telescope_buffer",
        "PRESENT",
        "TRANSFERRING",
        "Data transfer package",
    ):
        assert needle in text, needle
    assert main(["package", "show", str(pkg.id), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["file_name"] == pkg.file_name and len(data["files"]) == 2
    assert data["data_transfer_package"]["status"] == "PENDING"
    assert data["data_transfer_package"]["physical_copies"][0]["status"] == "PRESENT"
    assert data["data_transfer_package"]["transfers"] == []


def test_file_refuses_paths_outside_the_location(system, capsys, tmp_path):
    outside = tmp_path / "elsewhere.fits"
    outside.write_bytes(b"x")
    rc = main(
        ["file", str(outside), "--location", SRC, "--obs-unit", "e", "--module", "primecam/280GHz"]
    )
    assert rc == 2 and "not inside the location" in capsys.readouterr().err


def test_conflicting_refile_from_the_cli_is_a_clear_error(system, capsys):
    root = _tree(system)
    args = [
        "file",
        str(root),
        "--location",
        SRC,
        "--obs-unit",
        "eou-x",
        "--module",
        "primecam/280GHz",
    ]
    assert main(args) == 0
    (root / "a.fits").write_bytes(b"Z" * 1000)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "different checksum" in err and "Traceback" not in err


def test_package_show_unknown_is_a_clear_error(system, capsys):
    assert main(["package", "show", "nope.tar"]) == 2
    assert "no raw data package" in capsys.readouterr().err


def test_finish_obs_unit_command(system, capsys):
    root = _tree(system)
    main(
        ["file", str(root), "--location", SRC, "--obs-unit", "eou-f", "--module", "primecam/280GHz"]
    )
    assert main(["finish-obs-unit", "eou-f"]) == 0
    assert main(["finish-obs-unit", "unknown"]) == 2


def test_token_create_prints_the_token_once_and_stores_its_hash(system, capsys):
    argv = ["token", "create", "--user", "primecam-daq", "--role", "instrument"]
    assert main([*argv, "--instrument", "primecam"]) == 0
    token = capsys.readouterr().out.strip()
    with system.session() as s:
        row = s.scalars(select(m.ApiToken)).one()
        assert row.token_hash == hash_token(token) and token not in row.token_hash
        assert row.role.name == "instrument" and row.user.username == "primecam-daq"
    assert main(["token", "create", "--user", "x", "--role", "wizard"]) == 2
    # An instrument token without its instrument would file anywhere: refused.
    assert main(argv) == 2
    assert "--instrument" in capsys.readouterr().err
