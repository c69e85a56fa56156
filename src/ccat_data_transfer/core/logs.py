"""Structured logging: JSON lines for machines, a readable format on a terminal.

Every module logs with ``get_logger(__name__)``; events carry the fields the user's
document shows (``event``, ``physical_copy_id``, ``copy_type``, ``location``,
``size_bytes``, ``reason`` ...).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from ccat_data_transfer.core.config import settings

_configured = False


def configure_logging(
    verbose: bool = False,
    fmt: str | None = None,
    stream: Any = None,
    log_file: str | None = None,
    console_level: str | None = None,
) -> None:
    """Set up structlog and the stdlib root logger.  Safe to call more than once.

    With ``log_file``, every record also goes to that file as JSON lines, and the
    stream only shows records at ``console_level`` or above (the main job keeps its
    terminal for progress bars).
    """
    global _configured
    stream = stream or sys.stderr
    fmt = (fmt or str(settings.get("LOG_FORMAT", "auto"))).lower()
    if fmt == "auto":
        fmt = "console" if getattr(stream, "isatty", lambda: False)() else "json"
    level_name = "DEBUG" if verbose else str(settings.get("LOG_LEVEL", "INFO")).upper()
    level = getattr(logging, level_name, logging.INFO)

    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(default=str)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=getattr(stream, "isatty", lambda: False)())

    structlog.configure(
        processors=[
            *shared,
            _uppercase_level,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        processor=renderer,
        foreign_pre_chain=[*shared, _uppercase_level],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handlers: list[logging.Handler] = [handler]
    if log_file:
        from pathlib import Path

        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                processor=structlog.processors.JSONRenderer(default=str),
                foreign_pre_chain=[*shared, _uppercase_level],
            )
        )
        file_handler.setLevel(level)
        handlers.append(file_handler)
        handler.setLevel(getattr(logging, (console_level or "WARNING").upper(), logging.WARNING))
    root = logging.getLogger()
    root.handlers = handlers
    root.setLevel(level)
    for noisy in ("sqlalchemy.engine", "botocore", "boto3", "urllib3", "alembic", "celery"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    _configured = True


def _uppercase_level(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    if "level" in event:
        event["level"] = str(event["level"]).upper()
    return event


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    if not _configured:
        configure_logging()
    return structlog.get_logger(name)
