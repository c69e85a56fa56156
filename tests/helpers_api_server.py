"""A real API process for tests: ``ccat_data_transfer init`` on a fresh SQLite data dir,
an admin token from ``token create``, and ``ccat_data_transfer api`` (uvicorn) on a free
127.0.0.1 port.  The process is stopped when the context ends."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

CLI = str(Path(sys.executable).with_name("ccat_data_transfer"))


@dataclass
class ApiServer:
    base_url: str
    env: dict[str, str]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [CLI, *args], env=self.env, capture_output=True, text=True, timeout=60
        )

    def token(self, *args: str) -> str:
        done = self.cli("token", "create", *args)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def api_server(tmp_path: Path, **settings: str) -> Iterator[ApiServer]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCAT_DATA_TRANSFER_")}
    env["CCAT_DATA_TRANSFER_DATA_DIR"] = str(tmp_path / "api-data")
    env.update({f"CCAT_DATA_TRANSFER_{k}": v for k, v in settings.items()})
    port = _free_port()
    server = ApiServer(f"http://127.0.0.1:{port}", env)
    done = server.cli("init")
    assert done.returncode == 0, done.stderr
    log = (tmp_path / "api.log").open("w")
    proc = subprocess.Popen(
        [CLI, "api", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{server.base_url}/api/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((tmp_path / "api.log").read_text())
            time.sleep(0.1)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
