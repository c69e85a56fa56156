"""The one list of stages: every manager, the module with its cycle, and its Celery tasks.

Room in the house: core.  It names stage modules by their dotted path and imports none of
them, so that core stays below the stages; the readers import what they need:

- :mod:`ccat_data_transfer.core.celery_app` includes every entry's task modules (so that
  every process that sends or re-sends a task knows every task);
- the orchestrator (``ccat_data_transfer run``) calls every entry's cycle in this order;
- the command line registers one ``<name>-manager`` command per entry with a ``cli`` of
  its own;
- health reports use the entry's ``name`` (``health:manager:<name>``);
- the documentation's CLI reference is generated from the command line.

Adding a stage is one entry here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

PACKAGE = "ccat_data_transfer"


@dataclass(frozen=True)
class StageEntry:
    #: The manager's name: health key ``health:manager:<name>``, log and CLI name.
    name: str
    #: What ``run`` shows for it.
    title: str
    #: ``module`` or ``module:Attribute`` (relative to the package) of its ``run_once``;
    #: an attribute that is a class is instantiated and its ``run_once`` called.
    cycle: str
    #: Modules (relative to the package) that define its Celery tasks.
    tasks: tuple[str, ...] = ()

    @property
    def command(self) -> str:
        """The CLI command that runs the manager loop."""
        return self.name.replace("_", "-")

    @property
    def cycle_module(self) -> str:
        return f"{PACKAGE}.{self.cycle.partition(':')[0]}"

    def load_cycle(self) -> Any:
        """The callable ``run_once(session, site=...)`` of the stage (imports it)."""
        module, _, attribute = self.cycle.partition(":")
        target: Any = importlib.import_module(f"{PACKAGE}.{module}")
        if not attribute:
            return target.run_once
        target = getattr(target, attribute)
        return target().run_once if isinstance(target, type) else target


STAGES: tuple[StageEntry, ...] = (
    StageEntry("buffer_manager", "buffer monitoring", "buffers.cycle:BufferManager"),
    StageEntry(
        "raw_data_package_manager",
        "packaging",
        "packaging.raw_packages",
        ("packaging.raw_packages",),
    ),
    StageEntry(
        "data_transfer_package_manager",
        "transfer packaging",
        "packaging.transfer_packages",
        ("packaging.transfer_packages",),
    ),
    StageEntry(
        "transfer_manager",
        "transfer + unpack",
        "transfer.cycle",
        ("transfer.execution", "transfer.unpack"),
    ),
    StageEntry("archive_manager", "archive", "archive.cycle", ("archive.cycle", "archive.proof")),
    StageEntry("staging_manager", "staging", "staging.cycle", ("staging.task",)),
    StageEntry("fixity_manager", "fixity", "fixity.scan", ("fixity.repair",)),
    StageEntry("deletion_manager", "deletion", "deletion.cycle", ("deletion.worker",)),
)


def stage(name: str) -> StageEntry:
    """The entry called ``name`` (``transfer_manager``) or ``transfer-manager``."""
    key = name.replace("-", "_")
    for entry in STAGES:
        if entry.name == key:
            return entry
    raise KeyError(name)


def task_modules() -> list[str]:
    """Every module that defines a Celery task, in stage order, each once."""
    seen: dict[str, None] = {}
    for entry in STAGES:
        for module in entry.tasks:
            seen.setdefault(f"{PACKAGE}.{module}", None)
    return list(seen)
