"""The one list of stages: every manager, the module with its cycle, and its Celery tasks.

Room in the house: core.  It names stage modules by their dotted path and imports none of
them, so that core stays below the stages; the readers import what they need:

- ``ccat_data_transfer.core.celery_app`` includes every entry's task modules (so that
  every process that sends or re-sends a task knows every task);
- the orchestrator (``ccat_data_transfer run``) calls every entry's cycle in this order;
- the command line registers one ``<name>-manager`` command per entry
  (``ccat_data_transfer.cli.managers``; its help, its pace between cycles and its
  ``--once`` report may be given there, keyed by the entry's name, else defaults apply);
- health reports use the entry's ``name`` (``health:manager:<name>``), and ``health``
  lists the managers it expects from here (:func:`manager_health_keys`);
- the documentation's CLI reference is generated from the command line.

Each stage package has the same shape: its cycle module (``run_once``), its rules and
queries, and ``tasks.py`` with its Celery tasks.

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

    @property
    def health_key(self) -> str:
        """The key its manager's heartbeat is written under (unscoped)."""
        return f"health:manager:{self.name}"

    def load_owner(self) -> Any:
        """What holds the stage's ``run_once``: its cycle module, or a fresh instance of
        the class the entry names (imports it)."""
        module, _, attribute = self.cycle.partition(":")
        target: Any = importlib.import_module(f"{PACKAGE}.{module}")
        if not attribute:
            return target
        target = getattr(target, attribute)
        return target() if isinstance(target, type) else target

    def load_cycle(self) -> Any:
        """The callable ``run_once(session, site=...)`` of the stage (imports it)."""
        owner = self.load_owner()
        return getattr(owner, "run_once", owner)


STAGES: tuple[StageEntry, ...] = (
    StageEntry("buffer_manager", "buffer monitoring", "buffers.cycle:BufferManager"),
    StageEntry(
        "raw_data_package_manager", "packaging", "packaging.raw_cycle", ("packaging.tasks",)
    ),
    StageEntry(
        "data_transfer_package_manager",
        "transfer packaging",
        "packaging.transfer_cycle",
        ("packaging.tasks",),
    ),
    StageEntry("transfer_manager", "transfer + unpack", "transfer.cycle", ("transfer.tasks",)),
    StageEntry("archive_manager", "archive", "archive.cycle", ("archive.tasks",)),
    StageEntry("staging_manager", "staging", "staging.cycle", ("staging.tasks",)),
    StageEntry("fixity_manager", "fixity", "fixity.cycle", ("fixity.tasks",)),
    StageEntry("deletion_manager", "deletion", "deletion.cycle", ("deletion.tasks",)),
)


def stage(name: str) -> StageEntry:
    """The entry called ``name`` (``transfer_manager``) or ``transfer-manager``."""
    key = name.replace("-", "_")
    for entry in STAGES:
        if entry.name == key:
            return entry
    raise KeyError(name)


def manager_health_keys() -> list[str]:
    """``health:manager:<name>`` of every stage, in stage order."""
    return [entry.health_key for entry in STAGES]


def task_modules() -> list[str]:
    """Every module that defines a Celery task, in stage order, each once."""
    seen: dict[str, None] = {}
    for entry in STAGES:
        for module in entry.tasks:
            seen.setdefault(f"{PACKAGE}.{module}", None)
    return list(seen)
