"""The documentation site builds cleanly and every name it documents exists.

The site (``docs/``) is built offline with warnings as errors and nitpicky references; these
tests make the same guarantees explicit and fast: every settings key has a meaning, every
Python name the pages or the user's lifecycle document refer to still imports, and the
whole build passes.
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
sys.path.insert(0, str(DOCS / "_ext"))

import ccat_docs  # noqa: E402  (docs/_ext, the extension that generates the tables)

# Every Python name the user's document (shared/seed/data-lifecycle-management.rst) names,
# kept here so the test runs without shared/ beside the clone.
LIFECYCLE_DOCUMENT_NAMES = [
    "ccat_data_transfer.buffer_manager",
    "ccat_data_transfer.buffer_manager.BufferManager",
    "ccat_data_transfer.buffer_manager.BufferManager._check_thresholds",
    "ccat_data_transfer.config.config",
    "ccat_data_transfer.database",
    "ccat_data_transfer.database.DatabaseConnection",
    "ccat_data_transfer.deletion_manager",
    "ccat_data_transfer.deletion_manager.DeletionTask",
    "ccat_data_transfer.deletion_manager._add_deletion_log",
    "ccat_data_transfer.deletion_manager._delete_bulk_raw_data_files_internal",
    "ccat_data_transfer.deletion_manager.can_delete_data_transfer_package_from_lta_buffer",
    "ccat_data_transfer.deletion_manager.can_delete_data_transfer_package_from_source_buffer",
    "ccat_data_transfer.deletion_manager.can_delete_raw_data_package_from_lta_buffer",
    "ccat_data_transfer.deletion_manager.can_delete_raw_data_package_from_source_buffer",
    "ccat_data_transfer.deletion_manager.delete_bulk_raw_data_files",
    "ccat_data_transfer.deletion_manager.delete_bulk_raw_data_packages",
    "ccat_data_transfer.deletion_manager.delete_data_packages",
    "ccat_data_transfer.deletion_manager.delete_data_transfer_packages",
    "ccat_data_transfer.deletion_manager.delete_physical_copy",
    "ccat_data_transfer.deletion_manager.delete_processing_raw_data_files",
    "ccat_data_transfer.deletion_manager.delete_raw_data_packages_bulk",
    "ccat_data_transfer.deletion_manager.delete_staged_raw_data_files_from_processing",
    "ccat_data_transfer.deletion_manager.find_deletable_data_transfer_packages",
    "ccat_data_transfer.deletion_manager.find_deletable_processing_raw_data_files",
    "ccat_data_transfer.deletion_manager.find_deletable_raw_data_packages_by_location",
    "ccat_data_transfer.deletion_manager.find_deletable_staged_raw_data_files_by_location",
    "ccat_data_transfer.deletion_manager.get_buffer_status_for_location",
    "ccat_data_transfer.deletion_manager.mark_raw_data_files_for_deletion",
    "ccat_data_transfer.deletion_manager.process_deletion_possible_raw_data_files",
    "ccat_data_transfer.deletion_manager.should_delete_based_on_buffer_status",
    "ccat_data_transfer.operation_types",
    "ccat_data_transfer.operation_types.OperationType",
    "ccat_data_transfer.queue_discovery",
    "ccat_data_transfer.queue_discovery.route_task_by_location",
    "ccat_data_transfer.staging_manager",
    "ccat_data_transfer.staging_manager._mark_package_as_staged_and_cleanup",
    "ccat_ops_db.models",
    "ccat_ops_db.models.DataLocation",
    "ccat_ops_db.models.DataTransfer",
    "ccat_ops_db.models.DataTransferPackage",
    "ccat_ops_db.models.DataTransferPackagePhysicalCopy",
    "ccat_ops_db.models.PackageState",
    "ccat_ops_db.models.PhysicalCopy",
    "ccat_ops_db.models.PhysicalCopyStatus",
    "ccat_ops_db.models.RawDataFile",
    "ccat_ops_db.models.RawDataFilePhysicalCopy",
    "ccat_ops_db.models.RawDataPackage",
    "ccat_ops_db.models.RawDataPackagePhysicalCopy",
    "ccat_ops_db.models.StagingJob",
]
LIFECYCLE_DOCUMENT = REPO.parent / "shared" / "seed" / "data-lifecycle-management.rst"

_ROLE = re.compile(r":(?:py:)?(func|class|mod|meth|exc|attr|obj|data):`~?([^`<]+?)`")
_AUTODOC = re.compile(r"^\s*\.\. auto(?:module|class|function|exception|method)::\s+(\S+)", re.M)
_PYOBJECT = re.compile(r"^\s*\.\. literalinclude::\s+(\S+\.py)\s*\n((?:\s+:[\w-]+:.*\n)*)", re.M)


def resolve(dotted: str) -> object:
    """Import the longest module prefix of ``dotted`` and walk the rest as attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)  # AttributeError: the name is gone
        return obj
    raise ModuleNotFoundError(dotted)


def _pages() -> list[Path]:
    return sorted(DOCS.glob("*.rst"))


def documented_names() -> set[str]:
    """Targets of Python roles and autodoc directives in the site's pages."""
    names: set[str] = set()
    for page in _pages():
        text = page.read_text(encoding="utf-8")
        names.update(target.strip() for _, target in _ROLE.findall(text))
        names.update(_AUTODOC.findall(text))
    return names


def included_pyobjects() -> list[tuple[Path, str]]:
    """(source file, object) of every ``literalinclude`` with ``:pyobject:``."""
    found = []
    for page in _pages():
        for path, options in _PYOBJECT.findall(page.read_text(encoding="utf-8")):
            match = re.search(r":pyobject:\s*(\S+)", options)
            if match:
                found.append(((page.parent / path).resolve(), match.group(1)))
    return found


def _defined_in(source: Path, dotted: str) -> bool:
    tree = ast.parse(source.read_text(encoding="utf-8"))
    body = tree.body
    for part in dotted.split("."):
        nodes = [
            n
            for n in body
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            and n.name == part
        ]
        if not nodes:
            return False
        body = nodes[0].body
    return True


def test_every_setting_is_documented():
    page = (DOCS / "configuration.rst").read_text(encoding="utf-8")
    assert ".. ccat-settings::" in page, "configuration.rst must generate the settings table"
    meanings = ccat_docs.meanings_in_rst(page)
    settings = ccat_docs.collect_settings()
    assert settings, "no keys parsed from settings.toml"
    missing = [s.key for s in settings if not (s.comment or meanings.get(s.key))]
    assert not missing, f"settings without a meaning (comment in settings.toml or docs): {missing}"
    keys = {s.key for s in settings}
    stale = sorted(set(meanings) - keys)
    assert not stale, f"configuration.rst describes keys settings.toml no longer has: {stale}"


def test_every_settings_key_is_parsed_with_its_default():
    import tomllib

    data = tomllib.loads(ccat_docs.SETTINGS_TOML.read_text(encoding="utf-8"))
    by_key = {s.key: s for s in ccat_docs.collect_settings()}
    for section, values in data.items():
        for key, value in values.items():
            assert key in by_key, f"[{section}] {key} is missing from the generated table"
            if section == "default":
                assert by_key[key].default == value
            else:
                assert by_key[key].overrides[section] == value


def test_documented_names_exist():
    names = documented_names()
    assert len(names) > 50, "the role parser found suspiciously few names"
    missing = []
    for name in sorted(names):
        try:
            resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
    assert not missing, f"the docs name Python objects that do not exist: {missing}"


def test_code_excerpts_name_existing_objects():
    excerpts = included_pyobjects()
    assert len(excerpts) >= 5
    missing = [
        f"{src.relative_to(REPO)}:{obj}"
        for src, obj in excerpts
        if not src.exists() or not _defined_in(src, obj)
    ]
    assert not missing, f"literalinclude :pyobject: targets that do not exist: {missing}"


@pytest.mark.parametrize("name", LIFECYCLE_DOCUMENT_NAMES)
def test_names_of_the_lifecycle_document_exist(name):
    resolve(name)


def test_lifecycle_document_names_are_all_listed():
    if not LIFECYCLE_DOCUMENT.exists():
        pytest.skip("shared/ is not beside the repository; the list above still ran")
    text = LIFECYCLE_DOCUMENT.read_text(encoding="utf-8")
    named = set(re.findall(r"ccat_data_transfer\.[a-z_\.]+[a-z_]", text))
    named |= set(re.findall(r"ccat_ops_db\.models\.[A-Za-z]+", text))
    missing = sorted(named - set(LIFECYCLE_DOCUMENT_NAMES))
    assert not missing, f"add these names of the user's document to the list: {missing}"


def test_cli_reference_lists_every_command():
    root, ctx = ccat_docs.cli_root()
    paths = {path for path, _, _ in ccat_docs.walk_commands(root, ctx)}
    for expected in (
        "ccat_data_transfer deletion-plan",
        "ccat_data_transfer explain",
        "ccat_data_transfer disk-monitor",
        "ccat_data_transfer transfers list",
        "ccat_data_transfer transfers retry",
        "ccat_data_transfer audit",
        "ccat_data_transfer health",
        "ccat_data_transfer recovery",
        "ccat_data_transfer init",
    ):
        assert expected in paths


def test_docs_build_without_warnings(tmp_path):
    out = tmp_path / "html"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "-n",
            "--keep-going",
            "-q",
            "-b",
            "html",
            "-d",
            str(tmp_path / "doctrees"),
            str(DOCS),
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"sphinx-build failed:\n{proc.stdout}\n{proc.stderr}"
    for page in ("concepts", "pipeline", "lifecycle", "operations", "configuration", "cli", "api"):
        assert (out / f"{page}.html").exists()
    lifecycle = (out / "lifecycle.html").read_text(encoding="utf-8")
    assert "mark_raw_data_files_for_deletion" in lifecycle
    assert "BUFFER_WARNING_THRESHOLD_PERCENT" in lifecycle
