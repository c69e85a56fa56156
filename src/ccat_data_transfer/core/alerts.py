"""Administrator alerts: one JSON POST to ALERT_WEBHOOK_URL.

Room in the house: core.  Used by the buffer manager (a buffer in emergency), the audit
(a location put on hold) and fixity repair (a package frozen: no good copy left).  An
alert never stops its caller: a failure is logged and reported as False.
"""

from __future__ import annotations

from typing import Any

import httpx

from ccat_data_transfer.core.config import settings
from ccat_data_transfer.core.logs import get_logger

log = get_logger(__name__)


def send_alert(payload: dict[str, Any]) -> bool:
    """POST an alert as JSON to ALERT_WEBHOOK_URL; False (and a log line) on any failure."""
    url = str(settings.get("ALERT_WEBHOOK_URL", "") or "")
    if not url:
        return False
    try:
        response = httpx.post(
            url, json=payload, timeout=float(settings.get("ALERT_WEBHOOK_TIMEOUT_SECONDS", 5))
        )
        response.raise_for_status()
    except Exception as exc:  # an alert must never stop its caller
        log.error(
            "alert_webhook_failed",
            url=url,
            error=str(exc),
            alert=payload.get("event"),
            location=payload.get("location"),
        )
        return False
    return True
