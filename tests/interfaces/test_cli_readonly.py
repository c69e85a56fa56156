"""Commands that only read write nothing: on a missing data folder or database they say so
in one line and leave no folder or file behind; ``init`` with a broken topology changes
nothing (no folder, no SQLite file, no tables on PostgreSQL).  And every ``--help`` reads
clean: no reStructuredText markup, no ``<bool>`` on flags.

Through the installed console script in a subprocess.
"""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, inspect

from conftest import BACKENDS
from helpers_cli import assert_one_line_error, run_script
from helpers_postgres import fresh_database

READ_ONLY = [
    ["list-locations"],
    ["list-locations", "--json"],
    ["health"],
    ["metrics"],
    ["deletion-plan"],
    ["disk-monitor", "--all"],
    ["explain", "1"],
    ["package", "show", "1"],
    ["transfers", "list"],
    ["stage", "list"],
    ["audit", "--dry-run"],
    ["run", "--no-init", "--once"],
]


@pytest.mark.parametrize("args", READ_ONLY, ids=[" ".join(a) for a in READ_ONLY])
def test_read_only_command_on_a_missing_data_dir_creates_nothing(tmp_path, args):
    missing = tmp_path / "nonexistent"
    result = run_script(["--data-dir", str(missing), *args], tmp_path / "unused")
    assert_one_line_error(result, 2, f"no database at {missing / 'ops_db.sqlite'}", "init")
    assert not missing.exists()
    assert not (tmp_path / "unused").exists()


def test_read_only_command_in_an_existing_folder_creates_no_database(tmp_path):
    result = run_script(["list-locations"], tmp_path)
    assert_one_line_error(result, 2, "no database at", "ccat_data_transfer init")
    assert list(tmp_path.iterdir()) == []


def _broken_topology(tmp_path):
    bad = tmp_path / "broken.toml"
    bad.write_text('[[sites]]\nname = "x"\n')  # valid TOML, not a valid topology
    return bad


def test_init_with_a_broken_topology_creates_no_folder_or_sqlite_file(tmp_path):
    data = tmp_path / "data"
    result = run_script(["init", "--topology", str(_broken_topology(tmp_path))], data)
    assert_one_line_error(result, 2, str(tmp_path / "broken.toml"))
    assert not data.exists()


@pytest.fixture
def empty_pg_url():
    if "postgresql" not in BACKENDS:
        pytest.skip("PostgreSQL not in CCAT_TEST_BACKENDS")
    with fresh_database("ccat_empty") as url:
        yield url


def test_init_with_a_broken_topology_leaves_a_fresh_postgresql_database_without_tables(
    tmp_path, empty_pg_url
):
    data = tmp_path / "data"
    result = run_script(
        ["init", "--topology", str(_broken_topology(tmp_path))],
        data,
        CCAT_DATA_TRANSFER_DATABASE_URL=empty_pg_url,
    )
    assert_one_line_error(result, 2, "broken.toml")
    engine = create_engine(empty_pg_url)
    try:
        assert inspect(engine).get_table_names() == []
    finally:
        engine.dispose()
    assert not data.exists()
    assert run_script(["list-locations"], data, CCAT_DATA_TRANSFER_DATABASE_URL=empty_pg_url)
    assert not data.exists()


def _command_paths():
    """Every command and group of the application, as argument lists."""
    from typer.main import get_command

    from ccat_data_transfer.cli import app

    paths, queue = [], [([], get_command(app))]
    while queue:
        prefix, command = queue.pop()
        paths.append(prefix)
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            queue.append(([*prefix, name], sub))
    return paths


def test_every_help_text_reads_clean_without_rst_markup_or_bool_metavar(tmp_path):
    paths = _command_paths()
    assert len(paths) > 25
    for prefix in paths:
        result = run_script([*prefix, "--help"], tmp_path / "data")
        assert result.returncode == 0, (prefix, result.stderr)
        assert "Usage:" in result.stdout
        for bad in ("``", ":py:", ":func:", ":class:", "<bool>"):
            assert bad not in result.stdout, (prefix, bad, result.stdout)
    assert not (tmp_path / "data").exists()
