"""The docker-compose deployment names only real commands, locations and settings.

No Docker engine runs here, so the file is checked for what can drift: every service
runs a command of our CLI with options it accepts, every worker's location exists in the
default topology, and every environment variable is a real setting.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import typer.main
import yaml

from ccat_data_transfer.cli import app

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
TOPOLOGY = tomllib.loads(
    (ROOT / "src" / "ccat_data_transfer" / "topology" / "default.toml").read_text()
)
SETTINGS = tomllib.loads(
    (ROOT / "src" / "ccat_data_transfer" / "core" / "settings.toml").read_text()
)["default"]


def _our_services():
    return {
        name: svc
        for name, svc in COMPOSE["services"].items()
        if "command" in svc and svc.get("image", "").startswith("ccat-data-transfer")
    }


def test_every_service_runs_a_real_command_with_valid_options():
    root = typer.main.get_command(app)
    services = _our_services()
    assert len(services) >= 10
    for name, svc in services.items():
        args = list(svc["command"])
        ctx = root.make_context("ccat_data_transfer", list(args), resilient_parsing=True)
        sub = root.get_command(ctx, args[0])
        assert sub is not None, f"{name}: unknown command {args[0]}"
        # parse the sub-command's own options (raises on unknown options)
        sub.make_context(args[0], args[1:])


def test_every_worker_location_is_in_the_default_topology():
    names = {loc["name"] for loc in TOPOLOGY["locations"]}
    workers = [s for n, s in _our_services().items() if n.startswith("worker-")]
    assert workers
    covered = set()
    for svc in workers:
        args = svc["command"]
        covered.add(args[args.index("--location") + 1])
    assert covered <= names
    assert covered == names  # one worker per location


def test_environment_names_real_settings():
    env = COMPOSE["x-common"]["environment"]
    for key in env:
        assert key.startswith("CCAT_DATA_TRANSFER_")
        name = key.removeprefix("CCAT_DATA_TRANSFER_")
        assert name in SETTINGS or name == "ENV", f"{key} is not a setting"
