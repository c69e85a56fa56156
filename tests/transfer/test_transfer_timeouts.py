"""Every subprocess has a deadline scaled to its work, and a hung one is killed with its
whole process group and its attempt retried (the issue "Where the parts meet", item 16).
The transfer test runs on SQLite and PostgreSQL (``system`` fixture)."""

from __future__ import annotations

import ast
import os
import time
from pathlib import Path

import pytest
from sqlalchemy import select, update

from ccat_data_transfer import transfer_manager
from ccat_ops_db import models as m
from helpers_transfer import drive, make_dtp_at_source_buffer

SRC = Path(__file__).resolve().parents[2] / "src"
HELPER = SRC / "ccat_data_transfer" / "core" / "subprocesses.py"

# Calls that start a process, by module.
_STARTERS = {
    "subprocess": {"run", "Popen", "call", "check_call", "check_output", "getoutput"},
    "os": {"system", "popen", "execv", "execvp", "execve", "spawnv", "spawnvp", "posix_spawn"},
    "asyncio": {"create_subprocess_exec", "create_subprocess_shell"},
}


def _process_starts(path: Path) -> list[str]:
    """``module.call`` uses (and ``from module import call``) that start a process."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.attr in _STARTERS.get(node.value.id, ()):
                found.append(f"{path.relative_to(SRC)}:{node.lineno}: {node.value.id}.{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module in _STARTERS:
            for alias in node.names:
                if alias.name in _STARTERS[node.module]:
                    found.append(f"{path.relative_to(SRC)}:{node.lineno}: from {node.module}")
    return found


def test_every_subprocess_in_src_is_started_through_run_bounded():
    starts = [
        hit for path in sorted(SRC.rglob("*.py")) if path != HELPER for hit in _process_starts(path)
    ]
    assert starts == [], "start subprocesses only through core.subprocesses.run_bounded"
    assert _process_starts(HELPER)  # the walk does see a start where there is one


def _fake_hanging_tool(bin_dir: Path, name: str, pids: Path) -> None:
    """A ``name`` on PATH that starts a child of its own, records both process ids, and
    hangs (30 s: longer than any deadline below, short enough for the old code to end)."""
    bin_dir.mkdir(exist_ok=True)
    tool = bin_dir / name
    tool.write_text(
        f"#!/bin/bash\nsleep 30 >/dev/null 2>&1 &\necho $$ $! > {pids}\nsleep 30\n",
        encoding="utf-8",
    )
    tool.chmod(0o755)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _wait_dead(pids: list[int], seconds: float = 5.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return []
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def test_hung_rsync_is_killed_with_its_children_and_the_transfer_retried(
    system, tmp_path, monkeypatch, override_settings
):
    """A route's rsync hangs: within the deadline (2 s + bytes at a floor rate) it is
    killed with the child it started, and the transfer goes back to PENDING with a
    retry counted and a reason naming the command and the deadline."""
    override_settings(SUBPROCESS_TIMEOUT_BASE_SECONDS=2, SUBPROCESS_FLOOR_RATE_MB_PER_S=1000)
    pids = tmp_path / "pids"
    _fake_hanging_tool(tmp_path / "bin", "rsync", pids)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    with system.session() as s:
        s.execute(update(m.DataTransferRoute).values(transfer_method=m.TransferMethod.RSYNC))
        s.commit()
        dtp_id = make_dtp_at_source_buffer(system, s, n_packages=1).id

    started = time.monotonic()
    drive(system.session, transfer_manager.run_once, cycles=1)
    elapsed = time.monotonic() - started

    with system.session() as s:
        (t,) = s.scalars(
            select(m.DataTransfer).where(m.DataTransfer.data_transfer_package_id == dtp_id)
        ).all()
        assert t.status == m.Status.PENDING and t.retry_count == 1, t.failure_reason
        assert "did not finish within 2 s" in t.failure_reason
        assert "rsync" in t.failure_reason
    assert elapsed < 20, f"the hung rsync was waited for {elapsed:.0f} s"
    tool_pid, child_pid = (int(x) for x in pids.read_text().split())
    assert _wait_dead([tool_pid, child_pid]) == []


def test_deadline_grows_with_the_work(override_settings):
    from ccat_data_transfer.core.subprocesses import command_timeout

    override_settings(SUBPROCESS_TIMEOUT_BASE_SECONDS=60, SUBPROCESS_FLOOR_RATE_MB_PER_S=2.0)
    assert command_timeout(0) == 60
    assert command_timeout(10 * 10**9) == pytest.approx(60 + 5000)


def test_a_command_dies_with_the_worker_that_started_it(tmp_path):
    """Each command runs in its own session (so its deadline kills its whole group), which
    a kill of the worker's group no longer reaches: the parent-death signal does.  A
    command left running would keep writing into a partial the next attempt adopts."""
    import signal
    import subprocess
    import sys
    import time

    marker = tmp_path / "child.pid"
    code = (
        "import os, sys\n"
        "from ccat_data_transfer.core.subprocesses import run_bounded\n"
        f"run_bounded(['sh', '-c', 'echo $$ > {marker}; exec sleep 120'])\n"
    )
    worker = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    deadline = time.monotonic() + 30
    while not (marker.exists() and marker.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(marker.read_text())
    os.kill(child, 0)  # running
    os.killpg(worker.pid, signal.SIGKILL)  # the worker's group, as a supervisor does
    worker.wait(timeout=10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(child, signal.SIGKILL)
    raise AssertionError("the command outlived the worker that started it")
