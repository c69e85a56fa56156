"""Running an external command with a deadline: :func:`run_bounded`, the only way the
pipeline starts a subprocess (ssh, rsync, xrdcp, xrdfs, bbcp, openssl/sha256sum over ssh).

Why: a remote command that hangs (a stuck mount, a half-open TCP link) would keep its
worker busy, and its heartbeat fresh, forever.  Each command gets a deadline scaled to its
work, ``SUBPROCESS_TIMEOUT_BASE_SECONDS + work_bytes / SUBPROCESS_FLOOR_RATE_MB_PER_S``;
it runs in its own process group (session), so that on the deadline the whole group (ssh
and what it started, rsync and its receiver) is killed, and
:class:`~ccat_data_transfer.core.errors.RetryableError` sends the attempt to its retry.

Its own session also means that killing the worker's process group (``kill -9`` of a
worker, a supervisor stopping it) no longer reaches the command.  A command that outlived
its worker would keep writing into a partial that the next attempt adopts, so each
command is started through ``setpriv --pdeathsig KILL`` (util-linux): the kernel kills it
when the worker that started it dies.

Room in the house: core.  Imports config and errors only.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shlex
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from typing import IO, Any

from ccat_data_transfer.core.config import settings
from ccat_data_transfer.core.errors import RetryableError

__all__ = ["CommandTimeout", "command_timeout", "run_bounded"]


class CommandTimeout(RetryableError):
    """A command passed its deadline; its process group was killed."""


def command_timeout(work_bytes: int) -> float:
    """Seconds a command moving or reading ``work_bytes`` may run:
    SUBPROCESS_TIMEOUT_BASE_SECONDS + work_bytes / SUBPROCESS_FLOOR_RATE_MB_PER_S."""
    base = float(settings.get("SUBPROCESS_TIMEOUT_BASE_SECONDS", 600))
    rate = float(settings.get("SUBPROCESS_FLOOR_RATE_MB_PER_S", 1.0))
    per_byte = 1.0 / (rate * 1e6) if rate > 0 else 0.0
    return base + max(0, work_bytes) * per_byte


@functools.cache
def _dies_with_parent() -> list[str]:
    """The prefix that makes a command die with the process that started it (the
    parent-death signal), where ``setpriv`` exists; empty elsewhere."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


def run_bounded(
    cmd: Sequence[str],
    *,
    work_bytes: int = 0,
    env: Mapping[str, str] | None = None,
    stdin: IO[Any] | int | None = None,
    text: bool = True,
) -> subprocess.CompletedProcess[Any]:
    """Run ``cmd`` to its end, its stdout and stderr captured, within
    :func:`command_timeout` of ``work_bytes``; returns the finished process (a non-zero
    exit is the caller's to judge).  Past the deadline the command's whole process group
    is killed (SIGKILL) and reaped, then :class:`CommandTimeout` (retryable) names the
    command and the deadline."""
    timeout = command_timeout(work_bytes)
    argv = [os.fspath(a) for a in cmd]
    proc = subprocess.Popen(
        [*_dies_with_parent(), *argv],
        stdin=stdin if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(env) if env is not None else None,
        text=text,
        start_new_session=True,  # its own process group: killed as a whole
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise CommandTimeout(
            f"command {shlex.join(argv)[:300]} did not finish within {timeout:.0f} s "
            f"(SUBPROCESS_TIMEOUT_BASE_SECONDS + {work_bytes} bytes / "
            "SUBPROCESS_FLOOR_RATE_MB_PER_S); its process group was killed"
        ) from None
    except BaseException:
        _kill_group(proc)
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    """SIGKILL the process group of ``proc`` (its children and theirs), then reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.communicate(timeout=30)
    with contextlib.suppress(Exception):
        proc.kill()
        proc.wait()
