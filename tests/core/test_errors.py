"""One error family: every exception class the project defines derives from
:class:`~ccat_data_transfer.core.errors.CcatError`, ``TopologyError`` is defined once, and a
person (CLI) or an API client meets every member as a clear message, not a traceback.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import ccat_data_transfer
import ccat_ops_db
from ccat_data_transfer.core.errors import CcatError
from conftest import DEFAULT_TOPOLOGY
from helpers_cli import assert_one_line_error, run_script

SRC = Path(ccat_data_transfer.__file__).resolve().parent.parent


def _project_modules() -> list[str]:
    names = []
    for package in (ccat_ops_db, ccat_data_transfer):
        names.append(package.__name__)
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if ".migrations." in info.name or info.name.endswith(".migrations"):
                continue  # Alembic scripts run only under Alembic's context
            if info.name.endswith(".__main__"):
                continue  # importing it runs the command line
            names.append(info.name)
    return names


def _exception_classes_defined_in_src() -> list[type]:
    found = []
    for name in _project_modules():
        module = importlib.import_module(name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == name and issubclass(cls, BaseException):
                found.append(cls)
    return found


def test_every_exception_class_defined_in_src_derives_from_ccat_error():
    classes = _exception_classes_defined_in_src()
    names = {cls.__name__ for cls in classes}
    # The walk does see the classes it is about (a walk that finds nothing proves nothing).
    assert {"StorageError", "ChecksumMismatchError", "TopologyError", "TarUtilError"} <= names
    outside = sorted(
        f"{cls.__module__}.{cls.__qualname__}" for cls in classes if not issubclass(cls, CcatError)
    )
    assert outside == []


def test_every_class_statement_with_an_exception_base_names_a_family_member():
    # Classes defined inside functions escape the import walk above; read every file.
    builtin_bases = {"Exception", "BaseException", "ValueError", "RuntimeError", "OSError"}
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if "migrations" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ClassDef):
                continue
            bases = {b.id for b in node.bases if isinstance(b, ast.Name)}
            if bases and bases <= builtin_bases and node.name != "CcatError":
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name}")
    assert offenders == []


def test_topology_error_is_defined_once_and_is_a_ccat_error():
    definitions = [
        f"{path.relative_to(SRC)}"
        for path in sorted(SRC.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.ClassDef) and node.name == "TopologyError"
    ]
    assert definitions == ["ccat_ops_db/errors.py"]
    from ccat_data_transfer.core.errors import TopologyError as CoreTopologyError
    from ccat_ops_db.topology import TopologyError

    assert CoreTopologyError is TopologyError
    assert issubclass(TopologyError, CcatError)


def test_ccat_ops_db_errors_import_nothing_from_ccat_data_transfer():
    tree = ast.parse((SRC / "ccat_ops_db" / "errors.py").read_text())
    imported = [
        node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
    ] + [
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    ]
    assert not [name for name in imported if name.startswith("ccat_data_transfer")]


def test_cli_reports_a_storage_error_as_one_line_naming_storage_not_as_unexpected(tmp_path):
    # A source location on tape: the storage factory refuses it (StorageError).
    topology = tmp_path / "with_tape.toml"
    topology.write_text(
        DEFAULT_TOPOLOGY.read_text()
        + '\n[[locations]]\nname = "chai_tape"\nsite = "ccat"\ntype = "source"\n'
        'storage = "tape"\npath = "tape/chai"\n'
    )
    data = tmp_path / "data"
    assert run_script(["init", "-t", str(topology)], data).returncode == 0
    args = ["file", "-l", "chai_tape", "--obs-unit", "a", "--module", "chai/LFA", "x"]
    line = assert_one_line_error(run_script(args, data), 2, "error: storage:", "chai_tape")
    assert "unexpected" not in line and "--verbose" not in line
    verbose = run_script(["--verbose", *args], data)
    assert verbose.returncode == 2
    assert "Traceback (most recent call last)" in verbose.stderr
    assert verbose.stderr.strip().splitlines()[-1].startswith("error: storage:")


@pytest.mark.parametrize(
    ("error", "status"),
    [
        ("StorageUnavailableError", 503),
        ("StorageFullError", 507),
        ("ObjectNotFound", 500),
        ("ConfigurationError", 500),
    ],
)
def test_api_answers_a_family_error_with_a_status_and_its_reason(db_url, error, status):
    from ccat_data_transfer.api.app import create_app
    from ccat_data_transfer.core import errors
    from ccat_data_transfer.core.storage import errors as storage_errors

    cls = getattr(storage_errors, error, None) or getattr(errors, error)
    app = create_app(db_url)

    @app.get("/test-raises")
    def _raises() -> None:
        raise cls("the reason a person reads")

    client = TestClient(app, raise_server_exceptions=False)
    response = client.get("/test-raises")
    assert response.status_code == status
    assert response.json()["detail"] == f"{error}: the reason a person reads"
