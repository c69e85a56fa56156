"""Service health: every manager and worker says "alive" regularly.

Distributed mode writes Redis keys ``health:{service_type}:{service_name}`` with a TTL
(HEALTH_TTL_SECONDS, 90 s) refreshed every HEALTH_REFRESH_SECONDS (30 s); a service whose
key expired is dead.  The set ``health:known`` remembers every service ever seen so that
``ccat_data_transfer health`` can list the dead ones too.  The embedded mode keeps the
same records in the ``manager_state`` table.

A manager's service name is its entry's name in the stage registry
(:mod:`ccat_data_transfer.core.registry`), ``<name>@<site>`` when scoped to a site; the
managers ``health`` expects are the registry's (:func:`managers_not_reporting`).
"""

from __future__ import annotations

import json
import os
import socket
import threading
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select

from ccat_data_transfer.core.buffer_status import redis_client
from ccat_data_transfer.core.config import settings
from ccat_data_transfer.core.database import DatabaseConnection
from ccat_data_transfer.core.logs import get_logger
from ccat_data_transfer.core.manager_state import put_state
from ccat_data_transfer.core.registry import STAGES
from ccat_ops_db import models as m

log = get_logger(__name__)

KNOWN_SET = "health:known"


def health_key(service_type: str, service_name: str) -> str:
    return f"health:{service_type}:{service_name}"


def _use_redis() -> bool:
    return str(settings.get("EXECUTION_MODE", "embedded")).lower() != "embedded"


def _redis() -> Any:
    return redis_client()


def _ttl() -> int:
    return int(settings.HEALTH_TTL_SECONDS)


class HealthReporter:
    """Refreshes one service's health key from a background thread."""

    def __init__(self, service_type: str, service_name: str) -> None:
        self.service_type = service_type
        self.service_name = service_name
        self.key = health_key(service_type, service_name)
        self.started_at = datetime.now().astimezone().isoformat()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def payload(self) -> dict[str, Any]:
        return {
            "service_type": self.service_type,
            "service_name": self.service_name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": self.started_at,
            "last_beat": m.utcnow().isoformat(),
        }

    def beat(self) -> None:
        """Say "alive" now.  Never raises: health must not stop the work."""
        try:
            if _use_redis():
                client = _redis()
                client.set(self.key, json.dumps(self.payload()), ex=_ttl())
                client.sadd(KNOWN_SET, self.key)
            else:
                _beat_db(self.key, self.payload())
        except Exception as exc:
            log.warning("health_beat_failed", service=self.key, error=str(exc))

    def start(self) -> HealthReporter:
        self.beat()
        interval = float(settings.HEALTH_REFRESH_SECONDS)

        def loop() -> None:
            while not self._stop.wait(interval):
                self.beat()

        self._thread = threading.Thread(target=loop, name=f"health-{self.key}", daemon=True)
        self._thread.start()
        return self

    def stop(self, remove: bool = True) -> None:
        self._stop.set()
        if remove:
            try:
                if _use_redis():
                    _redis().delete(self.key)
                else:
                    _delete_db(self.key)
            except Exception as exc:
                log.warning("health_stop_failed", service=self.key, error=str(exc))


def _beat_db(key: str, payload: dict[str, Any]) -> None:
    with DatabaseConnection().session_scope() as s:
        put_state(s, key, json.dumps(payload))


def _delete_db(key: str) -> None:
    with DatabaseConnection().session_scope() as s:
        row = s.get(m.ManagerState, key)
        if row is not None:
            row.value = json.dumps({**json.loads(row.value), "stopped": True})
            row.updated_at = m.utcnow() - timedelta(seconds=_ttl() + 1)


def is_alive(service_type: str, service_name: str) -> bool | None:
    """True/False, or None if health cannot be read (store unreachable)."""
    key = health_key(service_type, service_name)
    try:
        if _use_redis():
            return bool(_redis().exists(key))

        session, _ = DatabaseConnection().get_connection()
        try:
            row = session.get(m.ManagerState, key)
            return row is not None and row.updated_at >= m.utcnow() - timedelta(seconds=_ttl())
        finally:
            session.close()
    except Exception as exc:
        log.warning("health_read_failed", service=key, error=str(exc))
        return None


def list_services() -> list[dict[str, Any]]:
    """Every known service with ``alive`` true or false."""
    services: list[dict[str, Any]] = []
    if _use_redis():
        client = _redis()
        for key in sorted(client.smembers(KNOWN_SET)):
            raw = client.get(key)
            _, service_type, service_name = key.split(":", 2)
            info = json.loads(raw) if raw else {}
            services.append(
                {
                    "key": key,
                    "service_type": service_type,
                    "service_name": service_name,
                    "alive": raw is not None,
                    **info,
                }
            )
        return services

    session, _ = DatabaseConnection().get_connection()
    try:
        cutoff = m.utcnow() - timedelta(seconds=_ttl())
        rows = session.scalars(
            select(m.ManagerState).where(m.ManagerState.key.like("health:%"))
        ).all()
        for row in rows:
            _, service_type, service_name = row.key.split(":", 2)
            services.append(
                {
                    "key": row.key,
                    "service_type": service_type,
                    "service_name": service_name,
                    "alive": row.updated_at >= cutoff,
                    **json.loads(row.value),
                }
            )
    finally:
        session.close()
    return sorted(services, key=lambda s: s["key"])


def managers_not_reporting(services: list[dict[str, Any]]) -> list[str]:
    """Names of the registry's managers (``health:manager:<name>``) that no service in
    ``services`` (from :func:`list_services`) stands for: no heartbeat under ``<name>`` or
    ``<name>@<site>``, and no ``run`` (which runs every manager) has reported.  Said, not
    counted as dead: a deployment may run only some managers against this database."""
    seen = {
        str(svc["service_name"]).partition("@")[0]
        for svc in services
        if svc.get("service_type") == "manager"
    }
    if "run" in seen:
        return []
    return [entry.name for entry in STAGES if entry.name not in seen]
