"""The stage registry (:mod:`ccat_data_transfer.core.registry`) is the one list of stages:
the CLI's manager commands, Celery's task modules, the orchestrator and the health names
are built from it, and every stage package has the same shape (a cycle with ``run_once``,
``tasks.py`` with its Celery tasks, whose names never change).
"""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys

import pytest

from ccat_data_transfer.core.registry import STAGES, manager_health_keys, task_modules
from helpers_cli import SCRIPT

#: Every Celery task name deployed workers and queued work know today.  Never change one.
KNOWN_TASK_NAMES = [
    "ccat_data_transfer.create_raw_data_package",
    "ccat_data_transfer.create_data_transfer_package",
    "ccat_data_transfer.transfer_manager.transfer_data_transfer_package",
    "ccat_data_transfer.transfer_manager.unpack_data_transfer_package",
    "ccat_data_transfer.archive_manager.archive_raw_data_package",
    "ccat_data_transfer.verify_archive_copies",
    "ccat_data_transfer.stage_staging_job",
    "ccat_data_transfer.repair_archive_copy",
    "ccat_data_transfer.deletion_manager.delete_physical_copy",
    "ccat_data_transfer.deletion_manager.delete_bulk_raw_data_files",
    "ccat_data_transfer.deletion_manager.delete_bulk_raw_data_packages",
    "ccat_data_transfer.deletion_manager.delete_bulk_data_transfer_packages",
]

IDS = [entry.name for entry in STAGES]


def _python(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (nothing imported yet but what it imports)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCAT_DATA_TRANSFER_")}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )


def test_every_registry_entry_has_its_manager_command_in_the_installed_script(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCAT_DATA_TRANSFER_")}
    env.update({"CCAT_DATA_TRANSFER_DATA_DIR": str(tmp_path), "COLUMNS": "200"})
    done = subprocess.run(
        [str(SCRIPT), "--help"], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    listed = {line.split()[1] for line in done.stdout.splitlines() if line.startswith("│ ")}
    missing = [entry.command for entry in STAGES if entry.command not in listed]
    assert missing == []
    for entry in STAGES:
        helped = subprocess.run(
            [str(SCRIPT), entry.command, "--help"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert helped.returncode == 0, (entry.command, helped.stderr)
        assert "--once" in helped.stdout and "--site" in helped.stdout


def test_a_new_registry_entry_gets_a_manager_command_with_no_cli_change():
    done = _python(
        "from ccat_data_transfer.core import registry\n"
        "registry.STAGES += (registry.StageEntry('demo_manager', 'demo', 'staging.cycle'),)\n"
        "from ccat_data_transfer.cli import main\n"
        "raise SystemExit(main(['demo-manager', '--help']))\n"
    )
    assert done.returncode == 0, done.stderr
    assert "Run the demo manager." in done.stdout


@pytest.mark.parametrize("entry", STAGES, ids=IDS)
def test_every_registry_cycle_loads_and_has_run_once(entry):
    owner = entry.load_owner()
    assert callable(owner.run_once)
    assert callable(entry.load_cycle())
    params = inspect.signature(owner.run_once).parameters
    assert "site" in params


def test_every_stage_keeps_its_run_once_in_a_module_named_for_its_cycle():
    named_otherwise = [
        entry.cycle
        for entry in STAGES
        if "cycle" not in entry.cycle_module.rsplit(".", 1)[-1]
        or entry.cycle_module.rsplit(".", 1)[0] == "ccat_data_transfer"
    ]
    assert named_otherwise == []


def test_every_stage_with_tasks_keeps_them_in_its_own_tasks_module():
    for entry in STAGES:
        stage_package = entry.cycle_module.rsplit(".", 1)[0]
        assert all(f"ccat_data_transfer.{m}" == f"{stage_package}.tasks" for m in entry.tasks), (
            entry.name,
            entry.tasks,
        )


@pytest.mark.parametrize("module", task_modules())
def test_every_task_module_of_the_registry_registers_a_task(module):
    from ccat_data_transfer.core.celery_app import app

    importlib.import_module(module)
    defined_here = [
        name for name, task in app.tasks.items() if getattr(task.run, "__module__", "") == module
    ]
    assert defined_here, f"{module} registers no Celery task"


def test_every_project_task_is_defined_in_a_tasks_module_of_its_stage():
    from ccat_data_transfer.core.celery_app import app

    for module in task_modules():
        importlib.import_module(module)
    ours = {n: t for n, t in app.tasks.items() if n.startswith("ccat_data_transfer.")}
    assert set(KNOWN_TASK_NAMES) <= set(ours)
    elsewhere = {
        name: task.run.__module__
        for name, task in ours.items()
        if not task.run.__module__.endswith(".tasks")
        # the function's real home, not a name rewritten after the fact
        or inspect.getmodule(task.run).__name__ != task.run.__module__
    }
    assert elsewhere == {}


def test_every_known_task_name_is_registered_by_the_default_imports_alone():
    # What a deployed worker does: import the Celery app, then its include list.
    done = _python(
        "from ccat_data_transfer.core.celery_app import app\n"
        "app.loader.import_default_modules()\n"
        "print('\\n'.join(sorted(app.tasks)))\n"
    )
    assert done.returncode == 0, done.stderr
    registered = set(done.stdout.split())
    assert [name for name in KNOWN_TASK_NAMES if name not in registered] == []


def test_the_orchestrators_stages_are_the_registry_in_its_order():
    from ccat_data_transfer.operations.orchestrator import default_stages

    assert [(s.name, s.module) for s in default_stages()] == [(e.title, e.cycle) for e in STAGES]


def test_health_names_of_the_managers_come_from_the_registry():
    assert manager_health_keys() == [f"health:manager:{entry.name}" for entry in STAGES]


def test_health_says_which_registry_managers_no_service_stands_for():
    from ccat_data_transfer.core.health import managers_not_reporting

    names = [entry.name for entry in STAGES]
    assert managers_not_reporting([]) == names
    services = [
        {"service_type": "manager", "service_name": "deletion_manager@cologne"},
        {"service_type": "manager", "service_name": "buffer_manager"},
        {"service_type": "worker", "service_name": "transfer_manager"},
    ]
    assert managers_not_reporting(services) == [
        n for n in names if n not in ("deletion_manager", "buffer_manager")
    ]
    run = [{"service_type": "manager", "service_name": "run@ccat"}]
    assert managers_not_reporting(run) == []
