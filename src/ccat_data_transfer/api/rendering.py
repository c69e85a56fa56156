"""The dashboard's Jinja2 templates and their filters, shared by the dashboard pages and
the login page (both render from the directory ``api/templates/``).  It is a module of its
own so that neither page module imports the other.

Room in the house: API layer.  Imports core (formatting) and ``ccat_ops_db`` only.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from fastapi.templating import Jinja2Templates

from ccat_data_transfer.core.formatting import human_bytes
from ccat_ops_db import models as m

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"


def _fmt_dt(value: datetime | str | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.strftime("%Y-%m-%d %H:%M UTC")


def _ago(value: datetime | str | None) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    seconds = (m.utcnow() - value).total_seconds()
    future = seconds < 0
    seconds = abs(seconds)
    if seconds < 90:
        text = f"{int(seconds)} s"
    elif seconds < 90 * 60:
        text = f"{int(seconds // 60)} min"
    elif seconds < 48 * 3600:
        text = f"{seconds / 3600:.0f} h"
    else:
        text = f"{seconds / 86400:.0f} d"
    return f"in {text}" if future else f"{text} ago"


templates = Jinja2Templates(directory=str(TEMPLATE_DIR))
templates.env.filters["bytes"] = human_bytes
templates.env.filters["dt"] = _fmt_dt
templates.env.filters["ago"] = _ago
